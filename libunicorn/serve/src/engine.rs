//! The daemon's side of the server: the models served, a pool of sessions (each a connection to
//! unicornd with one context), and the blocking generation loop that feeds a request's events
//! to its HTTP handler.
//!
//! Each running request has a session of its own, so concurrent requests are separate contexts
//! in separate sessions and the daemon batches and schedules them like any other clients. A
//! session goes back to the pool after its request and keeps its context, so a later request
//! that starts with the same tokens (a system prompt, an earlier turn) skips that prefix.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use unicorn::protocol::messages::MAX_TOKENIZE_BYTES;
use unicorn::{Client, ClientOptions, ContextParams, Priority, SamplerParams, Status};
use unicorn_generate::{generate, Message, Session, StopReason, Template};

use crate::api::{Finish, Usage};
use crate::error::ApiError;
use crate::metrics::{DaemonGauges, Metrics};
use crate::stop::StopMatcher;

/// A model the server offers.
#[derive(Debug)]
pub struct ServedModel {
    /// Its name in the API: the file name without `.gguf`.
    pub id: String,
    pub path: PathBuf,
    pub template: Template,
}

/// What a request asks the model for.
#[derive(Debug)]
pub enum Prompt {
    /// `/v1/completions`: text, with BOS as the model wants it.
    Text(String),
    /// `/v1/chat/completions`: rendered with the model's chat template.
    Chat(Vec<Message>),
}

/// One request's generation.
#[derive(Debug)]
pub struct Job {
    pub model: usize,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    pub sampler: SamplerParams,
    pub stops: Vec<String>,
    /// When the request arrived, for the time to first token.
    pub arrived: Instant,
    pub endpoint: &'static str,
}

/// How long a generation waits for its client to take the next piece before it gives up: a
/// client that keeps its connection open and reads nothing must not hold a slot for ever.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `ev` to the request's handler, waiting while the channel is full (the client reads
/// slowly) for at most [`STALL_TIMEOUT`]. False when the handler is gone or stalled.
fn send(tx: &mpsc::Sender<Event>, ev: Event) -> bool {
    send_within(tx, ev, STALL_TIMEOUT)
}

fn send_within(tx: &mpsc::Sender<Event>, mut ev: Event, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match tx.try_send(ev) {
            Ok(()) => return true,
            Err(TrySendError::Closed(_)) => return false,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                ev = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(TrySendError::Full(_)) => {
                log::warn!("a client read nothing for {timeout:?}; its generation stops");
                return false;
            }
        }
    }
}

/// What the generation thread tells the request's handler, in this order: `Started` or
/// `Failed`; then `Text` pieces; then `Done` or `Failed`.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// The prompt fits and decoding starts.
    Started,
    Text(String),
    Done {
        finish: Finish,
        usage: Usage,
    },
    Failed(ApiError),
}

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Positions of each request's context; 0 for the daemon's default.
    pub ctx_size: u32,
    /// Idle sessions kept for later requests.
    pub max_idle: usize,
}

/// Models, the session pool and the metrics.
#[derive(Debug)]
pub struct Engine {
    pub models: Vec<ServedModel>,
    pub metrics: Arc<Metrics>,
    config: EngineConfig,
    /// The server's own session: status and health, and it holds every served model loaded.
    control: Mutex<Option<Client>>,
    /// Idle sessions, by model index; the most recently used last.
    idle: Mutex<Vec<(usize, Session)>>,
    /// When the models were loaded (`created` in the model list).
    pub created: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing a panicking holder could leave half-done in these: take the value as it is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Loads every model in `paths` through `control` (which keeps them loaded) and compiles
    /// their chat templates.
    pub fn new(
        mut control: Client,
        paths: &[PathBuf],
        chat_template: Option<&str>,
        config: EngineConfig,
    ) -> Result<Engine, unicorn_generate::Error> {
        let mut models = Vec::new();
        for path in paths {
            let m = control
                .load_model(path)
                .map_err(|source| unicorn_generate::Error::Load { path: path.clone(), source })?;
            let name =
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let id = name.strip_suffix(".gguf").unwrap_or(&name).to_owned();
            log::info!(
                "serving {} as `{id}` ({}, {})",
                path.display(),
                m.info().arch,
                m.info().file_type
            );
            models.push(ServedModel {
                id,
                path: path.clone(),
                template: Template::for_model(&m, chat_template)?,
            });
        }
        Ok(Engine {
            models,
            metrics: Arc::default(),
            config,
            control: Mutex::new(Some(control)),
            idle: Mutex::new(Vec::new()),
            created: crate::api::unix_now(),
        })
    }

    pub fn model_index(&self, id: &str) -> Option<usize> {
        self.models.iter().position(|m| m.id == id)
    }

    fn options(&self) -> ClientOptions {
        ClientOptions {
            socket: Some(self.config.socket.clone()),
            name: "unicorn-serve".into(),
            priority: Priority::Normal,
            ..ClientOptions::default()
        }
    }

    /// Runs `f` on the control session, reconnecting (and loading the models again) once if
    /// the daemon went away since.
    fn with_control<R>(&self, f: impl Fn(&mut Client) -> unicorn::Result<R>) -> unicorn::Result<R> {
        let mut guard = lock(&self.control);
        if let Some(c) = guard.as_mut() {
            match f(c) {
                Err(e)
                    if matches!(
                        e.status(),
                        Status::Disconnected | Status::Timeout | Status::Protocol
                    ) =>
                {
                    log::warn!("the control session failed ({e}); reconnecting");
                    *guard = None;
                }
                r => return r,
            }
        }
        let mut c = Client::connect(&self.options())?;
        for m in &self.models {
            c.load_model(&m.path)?;
        }
        let r = f(&mut c);
        *guard = Some(c);
        r
    }

    /// The daemon's figures for `/metrics`, `None` when it does not answer.
    pub fn daemon_gauges(&self) -> Option<DaemonGauges> {
        match self.with_control(|c| c.status()) {
            Ok(st) => Some(DaemonGauges {
                engine_queue: u64::from(st.engine_queue),
                engine_steps: st.engine_steps,
                engine_batched_steps: st.engine_batched_steps,
                sessions: st.sessions.len() as u64,
            }),
            Err(e) => {
                log::warn!("unicornd status: {e}");
                None
            }
        }
    }

    /// A round trip through the daemon's rings.
    pub fn ping(&self) -> Result<(), ApiError> {
        self.with_control(|c| c.ping()).map(drop).map_err(ApiError::from)
    }

    fn checkout(&self, model: usize) -> Result<Session, ApiError> {
        {
            let mut idle = lock(&self.idle);
            if let Some(i) = idle.iter().rposition(|(m, _)| *m == model) {
                return Ok(idle.remove(i).1);
            }
        }
        let client = Client::connect(&self.options())?;
        let params = ContextParams {
            n_ctx: self.config.ctx_size,
            kv_f32: false,
            sampler: SamplerParams::GREEDY,
        };
        Ok(Session::open(client, &self.models[model].path, &params)?)
    }

    fn checkin(&self, model: usize, s: Session) {
        let mut idle = lock(&self.idle);
        idle.push((model, s));
        if idle.len() > self.config.max_idle {
            // The least recently used goes (its session and context with it).
            idle.remove(0);
        }
    }

    /// Runs `job` on this thread (it blocks), sending its events to `tx`. Once `cancel` is
    /// set (the client went away), the decode in flight is cancelled in the daemon.
    pub fn run(&self, job: Job, tx: &mpsc::Sender<Event>, cancel: Arc<AtomicBool>) {
        let mut s = match self.checkout(job.model) {
            Ok(s) => s,
            Err(e) => {
                send(tx, Event::Failed(e));
                return;
            }
        };
        s.set_cancel(Some(cancel));
        let r = self.generate(&mut s, &job, tx);
        s.set_cancel(None);
        match r {
            Ok(()) => self.checkin(job.model, s),
            Err(e) => {
                if e.status == Some(Status::Cancelled) {
                    self.metrics.daemon_cancel();
                } else {
                    log::debug!("request failed: {}", e.error.message);
                    send(tx, Event::Failed(e.error));
                }
                // A refused request or a cancelled decode leaves the context as it was; any
                // other failure may have broken the session (the daemon gone): it is dropped,
                // and its context with it.
                match e.status {
                    None
                    | Some(Status::Cancelled | Status::InvalidArgument | Status::LimitExceeded) => {
                        self.checkin(job.model, s)
                    }
                    Some(_) => {}
                }
            }
        }
    }

    fn generate(
        &self,
        s: &mut Session,
        job: &Job,
        tx: &mpsc::Sender<Event>,
    ) -> Result<(), JobError> {
        let (text, add_special, param) = match &job.prompt {
            Prompt::Text(text) => (text.clone(), true, "prompt"),
            // The rendered template already holds BOS where the model wants it.
            Prompt::Chat(messages) => {
                (self.models[job.model].template.render(messages)?, false, "messages")
            }
        };
        if text.len() > MAX_TOKENIZE_BYTES {
            // The daemon tokenizes at most this much text at once, and no context holds it.
            return Err(ApiError::context_exceeded(
                param,
                format!(
                    "The prompt has {} bytes: at most {MAX_TOKENIZE_BYTES} are taken.",
                    text.len()
                ),
            )
            .into());
        }
        let ids = s.tokenize(&text, add_special)?;
        let n_ctx = s.ctx.n_ctx() as usize;
        let room = n_ctx.saturating_sub(ids.len());
        if ids.is_empty() {
            return Err(ApiError::invalid(Some(param), "the prompt has no tokens").into());
        }
        if room == 0 {
            return Err(ApiError::context_exceeded(
                param,
                format!("This model's context holds {n_ctx} tokens; the prompt has {}.", ids.len()),
            )
            .into());
        }
        let max = match job.max_tokens {
            Some(m) if m as usize > room => {
                return Err(ApiError::context_exceeded(
                    param,
                    format!(
                        "This model's context holds {n_ctx} tokens; the prompt has {} and max_tokens asks for {m}.",
                        ids.len()
                    ),
                )
                .into())
            }
            Some(m) => m,
            None => room as u32,
        };
        s.set_sampler(job.sampler)?;
        if !send(tx, Event::Started) {
            return Ok(());
        }
        let mut stops = StopMatcher::new(job.stops.clone());
        let mut first = true;
        let mut stopped = false;
        let g = generate(s, &ids, max, false, |_, piece| {
            if first {
                first = false;
                self.metrics.first_token(job.endpoint, job.arrived.elapsed());
            }
            let (text, hit) = stops.push(piece);
            if !text.is_empty() && !send(tx, Event::Text(text)) {
                return Ok::<_, JobError>(ControlFlow::Break(()));
            }
            stopped = hit;
            Ok(if hit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) })
        })?;
        let usage = Usage { prompt: ids.len(), completion: g.tokens.len() };
        self.metrics.tokens(usage.prompt, usage.completion);
        if g.stop == StopReason::Caller && !stopped {
            // The handler is gone; nobody reads on.
            return Ok(());
        }
        let rest = stops.finish();
        if !rest.is_empty() {
            send(tx, Event::Text(rest));
        }
        let finish = match g.stop {
            StopReason::Eog | StopReason::Caller => Finish::Stop,
            StopReason::Length | StopReason::Context => Finish::Length,
        };
        send(tx, Event::Done { finish, usage });
        Ok(())
    }
}

/// A failed job: what the client is told, and the daemon's status when the daemon failed it
/// (`None`: the request was refused before any decode).
#[derive(Debug)]
struct JobError {
    error: ApiError,
    status: Option<Status>,
}

impl From<ApiError> for JobError {
    fn from(error: ApiError) -> JobError {
        JobError { error, status: None }
    }
}

impl From<unicorn_generate::Error> for JobError {
    fn from(e: unicorn_generate::Error) -> JobError {
        JobError { status: e.status(), error: e.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_gives_up_on_a_reader_that_is_gone_or_stalled() {
        let (tx, mut rx) = mpsc::channel(1);
        assert!(send_within(&tx, Event::Started, Duration::from_millis(50)));
        // Full: waits, then gives up.
        let t = Instant::now();
        assert!(!send_within(&tx, Event::Started, Duration::from_millis(50)));
        assert!(t.elapsed() >= Duration::from_millis(50));
        // A reader that takes the piece meanwhile lets it through.
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let got = rx.blocking_recv();
            (got, rx)
        });
        assert!(send_within(&tx, Event::Text("x".into()), Duration::from_secs(10)));
        let (got, rx) = reader.join().unwrap();
        assert_eq!(got, Some(Event::Started));
        drop(rx);
        assert!(!send_within(&tx, Event::Started, Duration::from_secs(10)));
    }
}
