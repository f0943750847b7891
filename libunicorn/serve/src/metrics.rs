//! Counters and histograms for `GET /metrics`, in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets: from a cached short answer to a long
/// generation on a slow CPU.
const BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len() + 1];
        }
        let i = BUCKETS.iter().position(|&b| s <= b).unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += s;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().map(|b| b.to_string()).chain(["+Inf".into()]).enumerate() {
            cumulative += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// (endpoint, HTTP status) -> requests answered.
    requests: BTreeMap<(&'static str, u16), u64>,
    latency: BTreeMap<&'static str, Histogram>,
    ttft: BTreeMap<&'static str, Histogram>,
    prompt_tokens: u64,
    completion_tokens: u64,
    disconnects: u64,
    daemon_cancels: u64,
}

/// The daemon's side, read with a status request at each scrape.
#[derive(Clone, Copy, Debug, Default)]
pub struct DaemonGauges {
    pub engine_queue: u64,
    pub engine_steps: u64,
    pub engine_batched_steps: u64,
    pub sessions: u64,
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Generations running (holding a slot).
    pub running: AtomicI64,
    /// Requests waiting for a slot.
    pub queued: AtomicI64,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic elsewhere while holding the lock leaves counters that are still valid.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// A request answered with `status` after `took`.
    pub fn request(&self, endpoint: &'static str, status: u16, took: Duration) {
        self.with(|m| {
            *m.requests.entry((endpoint, status)).or_default() += 1;
            m.latency.entry(endpoint).or_default().observe(took);
        });
    }

    pub fn first_token(&self, endpoint: &'static str, after: Duration) {
        self.with(|m| m.ttft.entry(endpoint).or_default().observe(after));
    }

    pub fn tokens(&self, prompt: usize, completion: usize) {
        self.with(|m| {
            m.prompt_tokens += prompt as u64;
            m.completion_tokens += completion as u64;
        });
    }

    /// A client went away before its answer was complete.
    pub fn disconnect(&self) {
        self.with(|m| m.disconnects += 1);
    }

    /// A decode the daemon stopped on our CANCEL.
    pub fn daemon_cancel(&self) {
        self.with(|m| m.daemon_cancels += 1);
    }

    /// The text format; `daemon` is `None` when the daemon did not answer.
    pub fn render(&self, daemon: Option<DaemonGauges>) -> String {
        let m = self.with(|m| {
            (
                m.requests.clone(),
                m.latency.clone(),
                m.ttft.clone(),
                m.prompt_tokens,
                m.completion_tokens,
                m.disconnects,
                m.daemon_cancels,
            )
        });
        let (requests, latency, ttft, prompt, completion, disconnects, cancels) = m;
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "unicorn_serve_requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status (499: the client went away).",
        );
        for ((endpoint, status), n) in &requests {
            let _ = writeln!(
                out,
                "unicorn_serve_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        head(
            &mut out,
            "unicorn_serve_request_duration_seconds",
            "histogram",
            "Time from a request's arrival to the end of its answer.",
        );
        for (endpoint, h) in &latency {
            h.render(
                &mut out,
                "unicorn_serve_request_duration_seconds",
                &format!("endpoint=\"{endpoint}\""),
            );
        }
        head(
            &mut out,
            "unicorn_serve_time_to_first_token_seconds",
            "histogram",
            "Time from a request's arrival to its first generated token.",
        );
        for (endpoint, h) in &ttft {
            h.render(
                &mut out,
                "unicorn_serve_time_to_first_token_seconds",
                &format!("endpoint=\"{endpoint}\""),
            );
        }
        let counters = [
            ("unicorn_serve_prompt_tokens_total", "Prompt tokens of the requests served.", prompt),
            ("unicorn_serve_completion_tokens_total", "Tokens generated.", completion),
            (
                "unicorn_serve_client_disconnects_total",
                "Requests whose client went away before the answer was complete.",
                disconnects,
            ),
            (
                "unicorn_serve_daemon_jobs_cancelled_total",
                "Decodes cancelled in the daemon because their client went away.",
                cancels,
            ),
        ];
        for (name, help, v) in counters {
            head(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {v}");
        }
        let gauges = [
            ("unicorn_serve_requests_running", "Generations holding a slot.", &self.running),
            ("unicorn_serve_requests_queued", "Requests waiting for a slot.", &self.queued),
        ];
        for (name, help, v) in gauges {
            head(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        head(&mut out, "unicorn_daemon_up", "gauge", "Whether unicornd answered this scrape.");
        let _ = writeln!(out, "unicorn_daemon_up {}", u8::from(daemon.is_some()));
        if let Some(d) = daemon {
            let daemon = [
                (
                    "unicorn_daemon_engine_queue",
                    "gauge",
                    "Jobs queued for the daemon's engine (all clients).",
                    d.engine_queue,
                ),
                (
                    "unicorn_daemon_sessions",
                    "gauge",
                    "Sessions the daemon holds (all clients).",
                    d.sessions,
                ),
                (
                    "unicorn_daemon_engine_steps_total",
                    "counter",
                    "Engine steps run by the daemon.",
                    d.engine_steps,
                ),
                (
                    "unicorn_daemon_engine_batched_steps_total",
                    "counter",
                    "Engine steps that batched several contexts.",
                    d.engine_batched_steps,
                ),
            ];
            for (name, kind, help, v) in daemon {
                head(&mut out, name, kind, help);
                let _ = writeln!(out, "{name} {v}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_has_help_type_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request("chat", 200, Duration::from_millis(30));
        m.request("chat", 200, Duration::from_secs(500));
        m.request("chat", 400, Duration::from_millis(1));
        m.first_token("chat", Duration::from_millis(20));
        m.tokens(10, 5);
        let text = m.render(Some(DaemonGauges { engine_queue: 3, ..Default::default() }));
        assert!(text.contains("# TYPE unicorn_serve_requests_total counter\n"));
        assert!(text.contains("unicorn_serve_requests_total{endpoint=\"chat\",status=\"200\"} 2\n"));
        assert!(text.contains("unicorn_serve_requests_total{endpoint=\"chat\",status=\"400\"} 1\n"));
        let b = "unicorn_serve_request_duration_seconds_bucket{endpoint=\"chat\",";
        assert!(text.contains(&format!("{b}le=\"0.01\"}} 1\n")), "{text}");
        assert!(text.contains(&format!("{b}le=\"0.05\"}} 2\n")));
        assert!(text.contains(&format!("{b}le=\"120\"}} 2\n")));
        assert!(text.contains(&format!("{b}le=\"+Inf\"}} 3\n")));
        assert!(
            text.contains("unicorn_serve_request_duration_seconds_count{endpoint=\"chat\"} 3\n")
        );
        assert!(text.contains("unicorn_serve_prompt_tokens_total 10\n"));
        assert!(text.contains("unicorn_daemon_engine_queue 3\n"));
        assert!(text.contains("unicorn_daemon_up 1\n"));
        // Every sample line belongs to a family announced with HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
                .unwrap_or(name);
            assert!(text.contains(&format!("# HELP {family} ")), "{line}");
        }
        assert!(!m.render(None).contains("unicorn_daemon_engine_queue"));
    }
}
