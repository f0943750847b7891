//! Stop strings across token boundaries: text that could still grow into a stop string is held
//! back until it either does (and generation ends before it) or cannot any more.

/// Finds the first of up to a few stop strings in streamed text.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received and not yet released.
    held: String,
}

impl StopMatcher {
    /// `stops` must not hold empty strings (the request validation refuses them).
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops, held: String::new() }
    }

    /// Adds generated text. Returns the text that is safe to release and whether a stop string
    /// was found; then the text before it is released and nothing after it ever is.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return (out, true);
        }
        let cut = self.held.len() - self.partial_suffix();
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        (out, false)
    }

    /// The bytes at the end of `held` that some stop string starts with: the longest such
    /// suffix, so that no stop string can begin in the text released.
    fn partial_suffix(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let from = self.held.len().saturating_sub(longest);
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= from)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .map_or(0, |i| self.held.len() - i)
    }

    /// At the end of generation: whatever is still held.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, stopped) = m.push(p);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn a_stop_string_split_over_tokens_is_found_and_never_released() {
        assert_eq!(run(&["\n\n"], &["Hello", "\n", "\nWorld"]), ("Hello".into(), true));
        assert_eq!(run(&["END"], &["abc E", "N", "D more"]), ("abc ".into(), true));
        // The earliest of several stops wins.
        assert_eq!(run(&["c", "ab"], &["xabc"]), ("x".into(), true));
    }

    #[test]
    fn held_text_is_released_when_it_cannot_become_a_stop() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("the E"), ("the ".into(), false));
        assert_eq!(m.push("ND"), (String::new(), true));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("the E"), ("the ".into(), false));
        assert_eq!(m.push("X"), ("EX".into(), false));
        // Overlapping prefixes: "aab" after "xaa" holds "aa", not just "a".
        assert_eq!(run(&["aab"], &["xaa", "b"]), ("x".into(), true));
        assert_eq!(run(&["END"], &["no stop here E"]), ("no stop here E".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&["日本"], &["こんにちは日", "x"]), ("こんにちは日x".into(), false));
    }
}
