//! `unicorn serve`: an OpenAI-compatible HTTP server on libunicorn's Rust API.
//!
//! It is an unprivileged client of unicornd like any other: every HTTP request that generates
//! runs in a session of its own with a context of its own, so the daemon batches concurrent
//! requests with each other and with native clients under one scheduler. axum on a small tokio
//! runtime serves HTTP; generation runs on blocking threads (the client API blocks) and sends
//! its text through a channel to the response. A client that goes away drops its response,
//! which cancels the decode in flight in the daemon.
//!
//! Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (with
//! `stream: true` as server-sent events ending with `data: [DONE]`), `GET /health`, `GET
//! /metrics` (Prometheus text). Bounded: request bodies, requests running and waiting.

#![forbid(unsafe_code)]

pub mod api;
mod engine;
pub mod error;
mod metrics;
mod stop;

use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use unicorn::Client;

use api::{Header, Kind};
use engine::{Engine, EngineConfig, Event, Job, Prompt};
pub use error::{ApiError, ServeError};
use metrics::Metrics;

/// The environment variable that gives the API key when `--api-key` does not.
pub const API_KEY_ENV: &str = "UNICORN_API_KEY";

/// How the server runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub host: String,
    /// 0 picks a free port (the address is printed).
    pub port: u16,
    /// GGUF files to serve; each is named by its file name without `.gguf`.
    pub models: Vec<PathBuf>,
    /// Required as `Authorization: Bearer KEY` on `/v1/*` and `/metrics` when set.
    pub api_key: Option<String>,
    /// Positions of each request's context (0: the daemon's default).
    pub ctx_size: u32,
    /// Generations at once; each holds a session and a context.
    pub max_concurrent: usize,
    /// Requests that may wait for a slot; more get 429.
    pub max_queue: usize,
    pub max_body_bytes: usize,
    /// A chat template name or file for every model instead of their own.
    pub chat_template: Option<String>,
}

/// Whether every address `host` names is a loopback address.
pub fn is_loopback(host: &str) -> bool {
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
        return ip.is_loopback();
    }
    match (host, 0).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// Refuses to expose the server beyond this machine without an API key.
pub fn check_exposure(host: &str, api_key: Option<&str>) -> Result<(), ServeError> {
    if api_key.is_some_and(str::is_empty) {
        return Err(ServeError::Config("the API key is empty".into()));
    }
    if !is_loopback(host) && api_key.is_none() {
        return Err(ServeError::Config(format!(
            "--host {host} is reachable from other machines: give an API key with --api-key or ${API_KEY_ENV}, or serve on 127.0.0.1"
        )));
    }
    Ok(())
}

/// Compares in time that depends only on the lengths, so that a guess cannot be refined by
/// timing how far it matched.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != key.len());
    for (i, k) in key.iter().enumerate() {
        diff |= k ^ given.get(i).copied().unwrap_or(!k);
    }
    diff == 0
}

#[derive(Debug)]
struct App {
    engine: Arc<Engine>,
    api_key: Option<String>,
    /// Requests running or waiting; none free: 429.
    admit: Arc<Semaphore>,
    /// Requests running.
    slots: Arc<Semaphore>,
    max_body: usize,
}

/// Serves until SIGINT or SIGTERM. `control` is a session with the daemon to serve through
/// (the CLI connects it, starting a user daemon if it must).
pub fn run(config: Config, control: Client) -> Result<(), ServeError> {
    check_exposure(&config.host, config.api_key.as_deref())?;
    if config.max_concurrent == 0 {
        return Err(ServeError::Config("--max-concurrent must be at least 1".into()));
    }
    let engine_config = EngineConfig {
        socket: control.socket_path().to_owned(),
        ctx_size: config.ctx_size,
        max_idle: config.max_concurrent,
    };
    let engine =
        Engine::new(control, &config.models, config.chat_template.as_deref(), engine_config)?;
    let app = Arc::new(App {
        engine: Arc::new(engine),
        api_key: config.api_key.clone(),
        admit: Arc::new(Semaphore::new(config.max_concurrent + config.max_queue)),
        slots: Arc::new(Semaphore::new(config.max_concurrent)),
        max_body: config.max_body_bytes,
    });
    // Two workers carry the HTTP side; generation has blocking threads, one per slot.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(config.max_concurrent + 2)
        .thread_name("unicorn-serve")
        .enable_all()
        .build()?;
    runtime.block_on(serve(app, &config.host, config.port))
}

async fn serve(app: Arc<App>, host: &str, port: u16) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .map_err(|source| ServeError::Bind { addr: format!("{host}:{port}"), source })?;
    let addr = listener.local_addr()?;
    let ids: Vec<&str> = app.engine.models.iter().map(|m| m.id.as_str()).collect();
    // On stdout, so that scripts and tests can read the port when they asked for port 0.
    println!("unicorn serve: listening on http://{addr} (models: {})", ids.join(", "));
    log::info!("listening on {addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(app)).with_graceful_shutdown(async move {
        let _ = stop_rx.await;
    });
    let server = tokio::spawn(server.into_future());
    shutdown_signal().await;
    log::info!("shutting down");
    let _ = stop_tx.send(());
    // Streams still running get a moment to end; then the process goes anyway.
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => log::error!("the server task failed: {e}"),
        Err(_) => log::warn!("requests still running after 5 s; exiting"),
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    let int = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    futures_util::future::select(Box::pin(term), Box::pin(int)).await;
}

fn router(app: Arc<App>) -> Router {
    let max_body = app.max_body;
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth))
        .route("/health", get(health))
        .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

/// The endpoint label of a path, for the metrics.
fn endpoint_of(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "completions",
        "/metrics" => "metrics",
        p if p.starts_with("/v1/models") => "models",
        _ => "other",
    }
}

async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_key(g.as_bytes(), key.as_bytes())) {
            app.engine.metrics.request(endpoint_of(req.uri().path()), 401, Duration::ZERO);
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

fn model_object(app: &App, id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": app.engine.created, "owned_by": "unicorn"})
}

async fn list_models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<_> = app.engine.models.iter().map(|m| model_object(&app, &m.id)).collect();
    app.engine.metrics.request("models", 200, Duration::ZERO);
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.engine.model_index(&id) {
        Some(_) => {
            app.engine.metrics.request("models", 200, Duration::ZERO);
            Json(model_object(&app, &id)).into_response()
        }
        None => {
            app.engine.metrics.request("models", 404, Duration::ZERO);
            ApiError::model_not_found(&id).into_response()
        }
    }
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let engine = app.engine.clone();
    match tokio::task::spawn_blocking(move || engine.ping()).await {
        Ok(Ok(())) => Json(json!({"status": "ok"})).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::internal(format!("health check: {e}")).into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let engine = app.engine.clone();
    let daemon = tokio::task::spawn_blocking(move || engine.daemon_gauges()).await.ok().flatten();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        app.engine.metrics.render(daemon),
    )
        .into_response()
}

async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    generation(app, Kind::Chat, body).await
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    generation(app, Kind::Completion, body).await
}

/// Counts a gauge up while alive.
struct Held<'a>(&'a AtomicI64);

impl<'a> Held<'a> {
    fn new(g: &'a AtomicI64) -> Held<'a> {
        g.fetch_add(1, Ordering::Relaxed);
        Held(g)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Records how a request ended. Dropped before that (the client went away: hyper drops the
/// handler or the response stream), it cancels the request's generation and counts a 499.
#[derive(Debug)]
struct Watch {
    metrics: Arc<Metrics>,
    endpoint: &'static str,
    arrived: Instant,
    cancel: Arc<AtomicBool>,
    done: bool,
}

impl Watch {
    fn finish(&mut self, status: u16) {
        if !self.done {
            self.done = true;
            self.metrics.request(self.endpoint, status, self.arrived.elapsed());
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.done {
            self.cancel.store(true, Ordering::Release);
            self.metrics.disconnect();
            self.finish(499);
        }
    }
}

async fn generation(app: Arc<App>, kind: Kind, body: Result<Bytes, BytesRejection>) -> Response {
    let endpoint = match kind {
        Kind::Chat => "chat",
        Kind::Completion => "completions",
    };
    let mut watch = Watch {
        metrics: app.engine.metrics.clone(),
        endpoint,
        arrived: Instant::now(),
        cancel: Arc::new(AtomicBool::new(false)),
        done: false,
    };
    match start(&app, kind, body, &mut watch).await {
        Ok(Started::Stream(header, include_usage, rx)) => stream(header, include_usage, rx, watch),
        Ok(Started::Whole(response)) => {
            watch.finish(200);
            response
        }
        Err(e) => {
            watch.finish(e.status.as_u16());
            e.into_response()
        }
    }
}

enum Started {
    Stream(Header, bool, mpsc::Receiver<Event>),
    Whole(Response),
}

async fn start(
    app: &App,
    kind: Kind,
    body: Result<Bytes, BytesRejection>,
    watch: &mut Watch,
) -> Result<Started, ApiError> {
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(app.max_body),
        _ => ApiError::invalid(None, r.body_text()),
    })?;
    let (prompt, params) = match kind {
        Kind::Chat => api::parse_chat(&body).map(|(m, p)| (Prompt::Chat(m), p))?,
        Kind::Completion => api::parse_completion(&body).map(|(t, p)| (Prompt::Text(t), p))?,
    };
    let model = app
        .engine
        .model_index(&params.model)
        .ok_or_else(|| ApiError::model_not_found(&params.model))?;
    let admitted = app.admit.clone().try_acquire_owned().map_err(|_| ApiError::busy())?;
    let slot = {
        let _queued = Held::new(&app.engine.metrics.queued);
        app.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::unavailable("shutting down"))?
    };
    let job = Job {
        model,
        prompt,
        max_tokens: params.max_tokens,
        sampler: params.sampler,
        stops: params.stops.clone(),
        arrived: watch.arrived,
        endpoint: watch.endpoint,
    };
    // Room for a burst of pieces while the response is being written.
    let (tx, mut rx) = mpsc::channel(256);
    let engine = app.engine.clone();
    let cancel = watch.cancel.clone();
    tokio::task::spawn_blocking(move || {
        let _running = Held::new(&engine.metrics.running);
        engine.run(job, &tx, cancel);
        // The slot is free only when the generation is over, whatever became of its client.
        drop((slot, admitted));
    });
    match rx.recv().await {
        Some(Event::Started) => {}
        Some(Event::Failed(e)) => return Err(e),
        _ => return Err(ApiError::internal("the generation ended before it started")),
    }
    let header = Header::new(kind, &params.model);
    if params.stream {
        return Ok(Started::Stream(header, params.include_usage, rx));
    }
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done { finish, usage }) => {
                return Ok(Started::Whole(
                    Json(header.answer(&text, finish, usage)).into_response(),
                ))
            }
            Some(Event::Failed(e)) => return Err(e),
            Some(Event::Started) | None => {
                return Err(ApiError::internal("the generation ended without an answer"))
            }
        }
    }
}

/// Where a stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Role,
    Body,
    Usage(api::Usage),
    Done,
    End,
}

fn data(v: &serde_json::Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

/// The server-sent events of a streamed request: (for chat) a first chunk with the role, one
/// chunk per piece of text, one with the finish reason, (if asked) one with the usage, then
/// `data: [DONE]`. A failure after the start is sent as an error object and ends the stream.
fn stream_events(
    header: Header,
    include_usage: bool,
    rx: mpsc::Receiver<Event>,
    watch: Watch,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let phase = if header.kind == Kind::Chat { Phase::Role } else { Phase::Body };
    let state = (header, rx, watch, phase);
    futures_util::stream::unfold(state, move |(header, mut rx, mut watch, phase)| async move {
        let (item, next) = match phase {
            Phase::Role => (data(&header.chunk(Some(""), true, None)), Phase::Body),
            Phase::Body => match rx.recv().await {
                Some(Event::Text(t)) => (data(&header.chunk(Some(&t), false, None)), Phase::Body),
                Some(Event::Done { finish, usage }) => {
                    let next = if include_usage { Phase::Usage(usage) } else { Phase::Done };
                    (data(&header.chunk(None, false, Some(finish))), next)
                }
                Some(Event::Failed(e)) => {
                    watch.finish(e.status.as_u16());
                    (data(&e.body()), Phase::End)
                }
                Some(Event::Started) | None => {
                    let e = ApiError::internal("the generation ended without finishing");
                    watch.finish(e.status.as_u16());
                    (data(&e.body()), Phase::End)
                }
            },
            Phase::Usage(usage) => (data(&header.usage_chunk(usage)), Phase::Done),
            Phase::Done => {
                watch.finish(200);
                (Ok(SseEvent::default().data("[DONE]")), Phase::End)
            }
            Phase::End => return None,
        };
        Some((item, (header, rx, watch, next)))
    })
}

fn stream(
    header: Header,
    include_usage: bool,
    rx: mpsc::Receiver<Event>,
    watch: Watch,
) -> Response {
    Sse::new(stream_events(header, include_usage, rx, watch))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::{Finish, Usage};

    fn watch(metrics: &Arc<Metrics>) -> Watch {
        Watch {
            metrics: metrics.clone(),
            endpoint: "chat",
            arrived: Instant::now(),
            cancel: Arc::new(AtomicBool::new(false)),
            done: false,
        }
    }

    fn body_of(
        events: Vec<Event>,
        kind: Kind,
        include_usage: bool,
        metrics: &Arc<Metrics>,
    ) -> String {
        let (tx, rx) = mpsc::channel(16);
        for e in events {
            tx.try_send(e).unwrap();
        }
        drop(tx);
        let header = Header { kind, id: "id".into(), created: 1, model: "m".into() };
        let response =
            Sse::new(stream_events(header, include_usage, rx, watch(metrics))).into_response();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = rt.block_on(axum::body::to_bytes(response.into_body(), 1 << 20)).unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn sse_frames_are_data_lines_ending_with_done() {
        let m = Arc::new(Metrics::default());
        let usage = Usage { prompt: 2, completion: 2 };
        let body = body_of(
            vec![
                Event::Text("Hel".into()),
                Event::Text("lo\nworld".into()),
                Event::Done { finish: Finish::Stop, usage },
            ],
            Kind::Chat,
            true,
            &m,
        );
        let frames: Vec<&str> = body.split_terminator("\n\n").collect();
        assert_eq!(frames.len(), 6, "{body}");
        assert!(frames.iter().all(|f| f.starts_with("data: ") && !f[6..].contains('\n')), "{body}");
        let json = |f: &str| serde_json::from_str::<serde_json::Value>(&f[6..]).unwrap();
        assert_eq!(json(frames[0])["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(json(frames[2])["choices"][0]["delta"]["content"], "lo\nworld");
        assert_eq!(json(frames[3])["choices"][0]["finish_reason"], "stop");
        assert_eq!(json(frames[4])["usage"]["total_tokens"], 4);
        assert_eq!(frames[5], "data: [DONE]");
        assert!(m.render(None).contains("status=\"200\"} 1"));
    }

    #[test]
    fn a_failure_mid_stream_is_an_error_object_and_no_done() {
        let m = Arc::new(Metrics::default());
        let body = body_of(
            vec![Event::Text("x".into()), Event::Failed(ApiError::unavailable("gone"))],
            Kind::Completion,
            false,
            &m,
        );
        let frames: Vec<&str> = body.split_terminator("\n\n").collect();
        assert_eq!(frames.len(), 2, "{body}");
        assert!(frames[1].contains("\"daemon_unavailable\""));
        assert!(!body.contains("[DONE]"));
        assert!(m.render(None).contains("status=\"503\"} 1"));
    }

    #[test]
    fn a_dropped_stream_cancels_its_generation() {
        let m = Arc::new(Metrics::default());
        let w = watch(&m);
        let cancel = w.cancel.clone();
        let (_tx, rx) = mpsc::channel(1);
        let header = Header { kind: Kind::Chat, id: "id".into(), created: 1, model: "m".into() };
        drop(stream_events(header, false, rx, w));
        assert!(cancel.load(Ordering::Acquire));
        let text = m.render(None);
        assert!(text.contains("unicorn_serve_client_disconnects_total 1"));
        assert!(text.contains("status=\"499\"} 1"));
    }

    #[test]
    fn keys_compare_whole_and_exposure_needs_one() {
        assert!(same_key(b"secret", b"secret"));
        for wrong in [&b"secreT"[..], b"secret2", b"", b"secre"] {
            assert!(!same_key(wrong, b"secret"));
        }
        assert!(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("[::1]"));
        assert!(is_loopback("localhost"));
        assert!(!is_loopback("0.0.0.0") && !is_loopback("192.0.2.1"));
        check_exposure("127.0.0.1", None).unwrap();
        assert!(check_exposure("0.0.0.0", None).is_err());
        check_exposure("0.0.0.0", Some("k")).unwrap();
        assert!(check_exposure("127.0.0.1", Some("")).is_err());
    }
}
