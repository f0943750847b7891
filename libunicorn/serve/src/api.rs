//! OpenAI's request and response bodies: parsing, validation of every parameter before any work
//! starts, and the JSON of answers and stream chunks.

use serde::Deserialize;
use serde_json::{json, Value};
use unicorn::SamplerParams;
use unicorn_generate::Message;

use crate::error::ApiError;

/// Most stop strings a request may give, as OpenAI.
pub const MAX_STOPS: usize = 4;
/// Longest stop string, in bytes: matching holds back this much text.
pub const MAX_STOP_BYTES: usize = 256;
/// `max_tokens` of a completion that does not say (OpenAI's default for /v1/completions).
pub const DEFAULT_COMPLETION_TOKENS: u32 = 16;

/// The sampling fields both endpoints take (OpenAI's, plus llama.cpp's `top_k`, `min_p` and
/// `repeat_penalty`). Numbers are read wide and range-checked here, so that a bad value gets a
/// message naming it rather than a type error.
#[derive(Debug, Default, Deserialize)]
pub struct CommonFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub tools: Option<Value>,
    pub functions: Option<Value>,
    pub response_format: Option<Value>,
    pub best_of: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(flatten)]
    pub common: CommonFields,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Option<Value>,
    #[serde(flatten)]
    pub common: CommonFields,
}

/// A request's generation settings, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct GenParams {
    pub model: String,
    /// `None`: as many as the context holds (chat) after the prompt.
    pub max_tokens: Option<u32>,
    pub sampler: SamplerParams,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_data() { "invalid request" } else { "malformed JSON body" };
        ApiError::invalid(None, format!("{what}: {e}"))
    })
}

/// A seed for requests that give none.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ N.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

impl CommonFields {
    /// Checks every field; `default_max` is the `max_tokens` of a request that gives none.
    pub fn validate(&self, default_max: Option<u32>) -> Result<GenParams, ApiError> {
        let model = match &self.model {
            Some(m) if !m.is_empty() => m.clone(),
            _ => return Err(ApiError::invalid(Some("model"), "`model` is required")),
        };
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(
                Some("n"),
                format!("n = {n}: only one choice (n = 1) is supported"),
            ));
        }
        if let Some(b) = self.best_of.filter(|&b| b != 1) {
            return Err(ApiError::invalid(
                Some("best_of"),
                format!("best_of = {b}: only 1 is supported"),
            ));
        }
        let unsupported = [
            (
                "logprobs",
                self.logprobs
                    .as_ref()
                    .is_some_and(|v| !v.is_null() && *v != json!(false) && *v != json!(0)),
            ),
            (
                "top_logprobs",
                self.top_logprobs.as_ref().is_some_and(|v| !v.is_null() && *v != json!(0)),
            ),
            ("tools", self.tools.as_ref().is_some_and(|v| !v.is_null() && *v != json!([]))),
            ("functions", self.functions.as_ref().is_some_and(|v| !v.is_null() && *v != json!([]))),
            ("echo", self.echo == Some(true)),
            ("suffix", self.suffix.as_ref().is_some_and(|v| !v.is_null() && *v != json!(""))),
            (
                "response_format",
                self.response_format
                    .as_ref()
                    .is_some_and(|v| !v.is_null() && v.get("type") != Some(&json!("text"))),
            ),
        ];
        if let Some((param, _)) = unsupported.iter().find(|(_, bad)| *bad) {
            return Err(ApiError::invalid(
                Some(param),
                format!("`{param}` is not supported by this server"),
            ));
        }
        for (param, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            let p = checked(param, v, 0.0, |p| (-2.0..=2.0).contains(&p), "between -2 and 2")?;
            if p != 0.0 {
                return Err(ApiError::invalid(
                    Some(param),
                    format!("{param} = {p}: only 0 is supported (repeat_penalty is)"),
                ));
            }
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        let max_tokens = match max_tokens {
            Some((param, m)) if m < 1 || m > i64::from(u32::MAX) => {
                return Err(ApiError::invalid(
                    Some(param),
                    format!("{param} = {m}: must be at least 1"),
                ))
            }
            Some((_, m)) => Some(m as u32),
            None => default_max,
        };
        let temperature = checked(
            "temperature",
            self.temperature,
            1.0,
            |t| (0.0..=2.0).contains(&t),
            "between 0 and 2",
        )?;
        let top_p = checked(
            "top_p",
            self.top_p,
            1.0,
            |p| p > 0.0 && p <= 1.0,
            "greater than 0 and at most 1",
        )?;
        let top_k = self.top_k.unwrap_or(0);
        let top_k = u32::try_from(top_k).map_err(|_| {
            ApiError::invalid(Some("top_k"), format!("top_k = {top_k}: must be at least 0"))
        })?;
        let min_p =
            checked("min_p", self.min_p, 0.0, |p| (0.0..=1.0).contains(&p), "between 0 and 1")?;
        let repeat_penalty = checked(
            "repeat_penalty",
            self.repeat_penalty,
            1.0,
            |p| p > 0.0 && p <= 10.0,
            "greater than 0 and at most 10",
        )?;
        let stops = parse_stop(self.stop.as_ref())?;
        // Any 64-bit seed: negative ones are taken as their two's complement.
        let seed = self.seed.map(|s| s as u64).unwrap_or_else(fresh_seed);
        let sampler = if temperature == 0.0 {
            SamplerParams { seed, ..SamplerParams::GREEDY }
        } else {
            SamplerParams {
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                min_p: min_p as f32,
                repeat_penalty: repeat_penalty as f32,
                repeat_last_n: if repeat_penalty == 1.0 { 0 } else { 64 },
                seed,
            }
        };
        let stream = self.stream.unwrap_or(false);
        let include_usage = stream && self.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(GenParams { model, max_tokens, sampler, stops, stream, include_usage })
    }
}

/// `value` (or `default` when absent) if `ok` holds for it, else a 400 naming `param` and saying
/// what `rule` asks.
fn checked(
    param: &'static str,
    value: Option<f64>,
    default: f64,
    ok: impl Fn(f64) -> bool,
    rule: &str,
) -> Result<f64, ApiError> {
    let v = value.unwrap_or(default);
    if ok(v) {
        Ok(v)
    } else {
        Err(ApiError::invalid(Some(param), format!("{param} = {v}: must be {rule}")))
    }
}

/// `stop`: null, a string, or an array of at most [`MAX_STOPS`] non-empty strings.
fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = |m: String| ApiError::invalid(Some("stop"), m);
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOPS {
                return Err(bad(format!("{} stop strings: at most {MAX_STOPS}", items.len())));
            }
            items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad("stop strings must be strings".into()))
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => return Err(bad("`stop` must be a string or an array of strings".into())),
    };
    if let Some(s) = list.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(bad(format!("stop string {s:?}: must be 1 to {MAX_STOP_BYTES} bytes")));
    }
    Ok(list)
}

/// A chat request: the conversation and its settings.
pub fn parse_chat(body: &[u8]) -> Result<(Vec<Message>, GenParams), ApiError> {
    let req: ChatRequest = parse(body)?;
    let params = req.common.validate(None)?;
    let messages = req.messages.unwrap_or_default();
    if messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "`messages` must hold at least one message",
        ));
    }
    let messages = messages
        .into_iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        Some("messages"),
                        format!(
                        "role {other:?}: only system, developer, user and assistant are supported"
                    ),
                    ))
                }
            };
            Ok(Message { role: role.into(), content: message_text(&m.content)? })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((messages, params))
}

/// A message's content: a string, or an array of text parts.
fn message_text(content: &Value) -> Result<String, ApiError> {
    let bad = |m: &str| ApiError::invalid(Some("messages"), m.to_owned());
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str))
                {
                    (Some("text"), Some(t)) => Ok(t),
                    _ => Err(bad("only text content parts are supported")),
                }
            })
            .collect(),
        _ => Err(bad("a message's content must be a string or an array of text parts")),
    }
}

/// A completion request: the prompt and its settings.
pub fn parse_completion(body: &[u8]) -> Result<(String, GenParams), ApiError> {
    let req: CompletionRequest = parse(body)?;
    let params = req.common.validate(Some(DEFAULT_COMPLETION_TOKENS))?;
    let prompt = match req.prompt {
        Some(Value::String(s)) => s,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_owned()
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                format!("{} prompts: one per request is supported", a.len()),
            ))
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(Some("prompt"), "`prompt` is required"))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "`prompt` must be a string (token arrays are not supported)",
            ))
        }
    };
    Ok((prompt, params))
}

/// Why a choice ended, as OpenAI says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// Token counts of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: usize,
    pub completion: usize,
}

impl Usage {
    pub fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        })
    }
}

/// Which endpoint an answer is for: the object names and the shape of a choice differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// What every answer and chunk of one request shares.
#[derive(Clone, Debug)]
pub struct Header {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Header {
    pub fn new(kind: Kind, model: &str) -> Header {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let created = unix_now();
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        let n = N.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
        let id = format!("{prefix}-{created:x}{n:06x}");
        Header { kind, id, created, model: model.to_owned() }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn wrap(&self, chunk: bool, choices: Value, usage: Option<Usage>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u.json();
        } else if !chunk {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The whole answer of a request that did not stream.
    pub fn answer(&self, text: &str, finish: Finish, usage: Usage) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }),
            Kind::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str(),
            }),
        };
        self.wrap(false, json!([choice]), Some(usage))
    }

    /// A stream chunk: `text` (and for chat, the role in the first one), or the end with
    /// `finish`.
    pub fn chunk(&self, text: Option<&str>, role: bool, finish: Option<Finish>) -> Value {
        let finish = finish.map(Finish::as_str);
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
        };
        self.wrap(true, json!([choice]), None)
    }

    /// The last chunk of a stream that asked for `stream_options.include_usage`.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        self.wrap(true, json!([]), Some(usage))
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<(Vec<Message>, GenParams), ApiError> {
        parse_chat(body.to_string().as_bytes())
    }

    fn param_of(body: Value) -> Option<&'static str> {
        chat(body).unwrap_err().param
    }

    #[test]
    fn a_plain_chat_request_gets_openai_defaults() {
        let (msgs, p) = chat(json!({
            "model": "m", "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            ]
        }))
        .unwrap();
        assert_eq!(msgs[0].role, "system");
        assert_eq!(msgs[1].content, "hi there");
        assert_eq!(p.max_tokens, None);
        assert_eq!(p.sampler.temperature, 1.0);
        assert_eq!((p.sampler.top_k, p.sampler.top_p, p.sampler.min_p), (0, 1.0, 0.0));
        assert!(!p.stream && !p.include_usage);
        let (_, p) = chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "temperature": 0, "seed": 7, "stop": "\n", "max_tokens": 5, "stream": true,
            "stream_options": {"include_usage": true}}))
        .unwrap();
        assert_eq!(p.sampler, SamplerParams { seed: 7, ..SamplerParams::GREEDY });
        assert_eq!(p.stops, vec!["\n".to_string()]);
        assert_eq!(p.max_tokens, Some(5));
        assert!(p.stream && p.include_usage);
    }

    #[test]
    fn out_of_range_and_unsupported_parameters_are_refused_by_name() {
        let base = |extra: Value| {
            let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        for (extra, param) in [
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_completion_tokens": -3}), "max_completion_tokens"),
            (json!({"n": 2}), "n"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stop": [""]}), "stop"),
            (json!({"stop": 5}), "stop"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"presence_penalty": 3}), "presence_penalty"),
            (json!({"frequency_penalty": 0.5}), "frequency_penalty"),
            (json!({"min_p": 2}), "min_p"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (json!({"messages": []}), "messages"),
            (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages",
            ),
            (json!({"model": ""}), "model"),
        ] {
            assert_eq!(param_of(base(extra.clone())), Some(param), "{extra}");
        }
        // Zero penalties, n = 1 and a plain response format are fine.
        chat(base(json!({"presence_penalty": 0, "frequency_penalty": 0, "n": 1,
            "response_format": {"type": "text"}, "logprobs": false})))
        .unwrap();
        // Malformed JSON and wrong types are 400s without a param.
        let e = parse_chat(b"{\"model\": ").unwrap_err();
        assert_eq!((e.status.as_u16(), e.param), (400, None));
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        let e = chat(json!({"model": "m", "messages": "hi"})).unwrap_err();
        assert!(e.message.starts_with("invalid request"), "{}", e.message);
    }

    #[test]
    fn completions_take_one_string_prompt_and_default_to_16_tokens() {
        let (prompt, p) =
            parse_completion(json!({"model": "m", "prompt": ["Once"]}).to_string().as_bytes())
                .unwrap();
        assert_eq!((prompt.as_str(), p.max_tokens), ("Once", Some(DEFAULT_COMPLETION_TOKENS)));
        for bad in [
            json!({"model": "m"}),
            json!({"model": "m", "prompt": ["a", "b"]}),
            json!({"model": "m", "prompt": [1, 2]}),
            json!({"model": "m", "prompt": "x", "echo": true}),
        ] {
            let e = parse_completion(bad.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{bad}");
        }
    }

    #[test]
    fn answers_and_chunks_have_openai_shape() {
        let h = Header::new(Kind::Chat, "m");
        assert!(h.id.starts_with("chatcmpl-"));
        let a = h.answer("hi", Finish::Stop, Usage { prompt: 3, completion: 1 });
        assert_eq!(a["object"], "chat.completion");
        assert_eq!(a["choices"][0]["message"]["content"], "hi");
        assert_eq!(a["usage"]["total_tokens"], 4);
        let first = h.chunk(Some(""), true, None);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
        assert!(first.get("usage").is_none());
        let last = h.chunk(None, false, Some(Finish::Length));
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(h.usage_chunk(Usage::default())["choices"], json!([]));
        let c = Header::new(Kind::Completion, "m");
        assert_eq!(c.chunk(Some("x"), false, None)["choices"][0]["text"], "x");
        assert_eq!(c.answer("x", Finish::Length, Usage::default())["object"], "text_completion");
    }
}
