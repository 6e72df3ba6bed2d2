//! `latent-tap serve`: a llama-server-compatible HTTP server that streams the
//! latents of every layer next to the tokens, to the requester (JSON, SSE or
//! binary records) and to subscribers of every request.
//!
//! Layers: HTTP (axum on hyper, tokio) → [`crate::sched::Scheduler`] (slots,
//! continuous batching, one inference thread, frames through the ring, a
//! router thread). Nothing here runs on the inference thread.

mod chat;
mod completion;
mod edits;
mod error;
mod info;
mod mem;
mod metrics;
mod page;
mod request;
mod subscribe;
mod text;
mod tokenize;
mod wire;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;

pub use chat::chat_template_option;
pub(crate) use error::not_found;
pub use error::ApiError;
pub(crate) use subscribe::{subscriber_channel, RawQuery, SubscribeQuery};
pub use wire::{FRAMES_MEDIA_TYPE, KIND_JSON};

use crate::engine::{Model, ModelOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::sched::{Scheduler, SchedulerOptions};

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// GGUF model.
    pub model: PathBuf,
    /// Address to bind.
    pub host: String,
    /// Port (0: any free port; the chosen one is printed).
    pub port: u16,
    /// Scheduler (context, slots, queue, ring).
    pub engine: SchedulerOptions,
    /// How the model is loaded: layers offloaded to a GPU or RPC workers.
    pub model_options: ModelOptions,
    /// Default token limit of a request (-1: none).
    pub n_predict: i64,
    /// Bearer key required on every endpoint but `/health`.
    pub api_key: Option<String>,
    /// Model name reported to clients (default: the file's path).
    pub alias: Option<String>,
    /// Serve `/metrics`.
    pub metrics: bool,
    /// Header read / idle timeout.
    pub timeout: Duration,
    /// Largest request body.
    pub max_body: usize,
    /// How long a request body may take to arrive in full (408 beyond; see
    /// [`crate::settings::check_body_timeout`]).
    pub body_timeout: Duration,
    /// How long in-flight requests may run after SIGINT/SIGTERM before they are cancelled.
    pub shutdown_grace: Duration,
    /// Bytes of latents one request may hold (`--max-latents-mb`; see
    /// `completion::budget`).
    pub max_latents: usize,
    /// Bytes of frames a subscriber may have queued before its frames are dropped.
    pub subscriber_queue: usize,
    /// Chat template for `/v1/chat/completions` (a llama.cpp built-in name, or a
    /// template text it recognises; see [`chat_template_option`]); `None`: the
    /// model's, else `chatml`.
    pub chat_template: Option<String>,
    /// `--steer-dir`: the only directory a request's `steer[].file` is read from.
    pub steer_dir: Option<PathBuf>,
    /// `--control-vector FILE` (scale 1) and `--control-vector-scaled
    /// FILE:SCALE`: llama.cpp's own control vectors, summed, on the whole
    /// context (every request), checked against the model at start-up.
    pub control_vectors: Vec<(PathBuf, f32)>,
    /// `--control-vector-layer-range START END` (inclusive; ≤ 0: 1 and n_layer).
    pub control_vector_layers: Option<(i32, i32)>,
    /// Called once with the bound address (tests use port 0).
    pub on_listen: Option<fn(SocketAddr)>,
}

/// Refuse a non-loopback bind without an API key.
pub fn check_exposure(host: &str, api_key: Option<&str>) -> Result<()> {
    let loopback = match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host == "localhost",
    };
    if !loopback && api_key.map_or(true, str::is_empty) {
        return Err(Error::invalid(format!(
            "refusing to listen on non-loopback address {host} without an API key"
        )));
    }
    Ok(())
}

pub(crate) struct App {
    pub(crate) cfg: ServeConfig,
    pub(crate) engine: OnceLock<Scheduler>,
    pub(crate) model_name: String,
    pub(crate) shutting_down: AtomicBool,
    /// The logit lens, loaded by the first request that asks for one.
    pub(crate) lens: tokio::sync::OnceCell<Arc<crate::lens::Lens>>,
    /// Whether the model file has what the lens needs (checked once, for `/props`).
    pub(crate) lens_available: OnceLock<bool>,
}

impl App {
    pub(crate) fn engine(&self) -> std::result::Result<&Scheduler, ApiError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        self.engine
            .get()
            .ok_or_else(|| ApiError::unavailable("Loading model"))
    }

    pub(crate) fn model(&self) -> std::result::Result<&Arc<Model>, ApiError> {
        self.engine().map(Scheduler::model)
    }

    /// Threads the lens computes on: the engine's (it runs beside the decode,
    /// on a blocking-pool thread).
    pub(crate) fn lens_threads(&self) -> usize {
        self.cfg
            .engine
            .ctx
            .n_threads
            .unwrap_or_else(crate::settings::default_threads)
            .max(1) as usize
    }

    /// The chat template in use: `--chat-template`/`--chat-template-file`, else
    /// the model's, else `chatml` (llama-server's fallback).
    pub(crate) fn chat_template(&self, model: &Model) -> String {
        self.cfg
            .chat_template
            .clone()
            .or_else(|| model.chat_template())
            .unwrap_or_else(|| "chatml".into())
    }
}

/// The handlers' state.
pub(crate) type AppState = State<Arc<App>>;

/// `v` as a JSON answer with `status`.
pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, serde_json::to_string(v).unwrap_or_default()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// The request body, at most `--max-body-kb` of it: a larger announced
/// `Content-Length` is refused before any of it is read, and a body that keeps
/// coming is cut off at the limit (413); one that has not arrived in full
/// within `--body-timeout` is a 408. Both close the connection
/// ([`ApiError::closes_connection`]); after a 413 the rest of the body is read
/// and discarded for up to `--body-timeout` first ([`discard_rest`]).
pub(crate) async fn read_body(app: &App, body: Body) -> std::result::Result<Bytes, ApiError> {
    use axum::body::HttpBody as _;
    use futures_util::StreamExt as _;
    let (max, timeout) = (app.cfg.max_body, app.cfg.body_timeout);
    let too_large = || {
        ApiError::with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {max} bytes"),
        )
    };
    // hyper's body reports an announced Content-Length as its exact size.
    let announced = body.size_hint().lower();
    let mut chunks = body.into_data_stream();
    if announced > max as u64 {
        discard_rest(chunks, timeout);
        return Err(too_large());
    }
    let mut buf = Vec::new();
    let read = async {
        while let Some(chunk) = chunks.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::bad(format!("request body could not be read: {e}")))?;
            if buf.len() + chunk.len() > max {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => Ok(Bytes::from(buf)),
        Ok(Err(e)) => {
            if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                discard_rest(chunks, timeout);
            }
            Err(e)
        }
        Err(_) => Err(ApiError::with_status(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
        )),
    }
}

/// A lingering close: the answer goes out at once while what the client still
/// sends of a refused body is read and thrown away (for at most `within`), so a
/// client that writes its whole body before it reads gets the answer instead of
/// a connection reset. The connection closes when the body ends or `within` passes.
fn discard_rest(mut chunks: axum::body::BodyDataStream, within: Duration) {
    use futures_util::StreamExt as _;
    tokio::spawn(async move {
        let drain = async { while let Some(Ok(_)) = chunks.next().await {} };
        let _ = tokio::time::timeout(within, drain).await;
    });
}

/// Seconds since the Unix epoch (`created` fields).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `system_fingerprint` / `build_info`.
pub(crate) fn fingerprint() -> String {
    format!("latent-tap-{}", env!("CARGO_PKG_VERSION"))
}

/// Run the server until SIGINT/SIGTERM; returns after a graceful shutdown.
pub fn run(cfg: ServeConfig) -> Result<()> {
    check_exposure(&cfg.host, cfg.api_key.as_deref())?;
    crate::settings::check_body_timeout(cfg.body_timeout)?;
    mem::fix_mmap_threshold();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("latent-tap-http")
        .build()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("tokio runtime: {e}")))?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: ServeConfig) -> Result<()> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| Error::new(ErrorKind::Io, format!("cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::new(ErrorKind::Io, format!("{addr}: {e}")))?;
    let model_name = cfg
        .alias
        .clone()
        .unwrap_or_else(|| cfg.model.display().to_string());
    let app = Arc::new(App {
        cfg: cfg.clone(),
        engine: OnceLock::new(),
        model_name,
        shutting_down: AtomicBool::new(false),
        lens: tokio::sync::OnceCell::new(),
        lens_available: OnceLock::new(),
    });
    println!(
        "latent-tap serve: listening on http://{local} (loading model {})",
        cfg.model.display()
    );
    if let Some(f) = cfg.on_listen {
        f(local);
    }
    // Load in the background so /health can answer 503 meanwhile.
    let loader = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let model = Model::load(&app.cfg.model, &app.cfg.model_options)?;
            if let Some(w) = chat::template_warning(app.cfg.chat_template.as_deref(), &model) {
                eprintln!("latent-tap serve: warning: {w}");
            }
            let mut opts = app.cfg.engine.clone();
            opts.control_vector = edits::control_vector(&app.cfg, &model)?;
            let engine = Scheduler::start(model, &opts)?;
            println!(
                "latent-tap serve: model ready ({} slots, context {} tokens, {} per slot)",
                engine.n_parallel(),
                engine.n_ctx(),
                engine.n_ctx_slot()
            );
            let _ = app.engine.set(engine);
            Ok(())
        })
    };
    let router = routes(app.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut loader = Some(loader);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            r = async { loader.as_mut().expect("polled only while Some").await }, if loader.is_some() => {
                loader = None;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(Error::new(ErrorKind::Internal, format!("model loader: {e}"))),
                }
            }
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let io = hyper_util::rt::TokioIo::new(stream);
                let svc = hyper_util::service::TowerToHyperService::new(router.clone());
                let mut b = hyper::server::conn::http1::Builder::new();
                // half_close: a client that sends its request and then shuts down its
                // write side (`nc -N`, `shutdown(SHUT_WR)`) still gets its answer;
                // without it hyper takes the EOF for a disconnect and drops the
                // connection before answering. A client that is really gone is found
                // when a write fails: a streamed answer (SSE, binary) is cancelled
                // within its next chunks, a JSON answer runs to its end (a FIN cannot
                // be told from a half-close without writing).
                b.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(cfg.timeout)
                    .keep_alive(true)
                    .half_close(true);
                let conn = b.serve_connection(io, svc);
                let fut = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = fut.await;
                });
            }
            _ = &mut signal => break,
        }
    }
    // Let in-flight requests finish, then cancel what is left. Meanwhile the
    // listener stays open: `/health` and new requests are answered 503.
    eprintln!(
        "latent-tap serve: shutting down (in-flight requests get {:?})",
        cfg.shutdown_grace
    );
    app.shutting_down.store(true, Ordering::Relaxed);
    if let Some(e) = app.engine.get() {
        e.begin_shutdown(false);
    }
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    let grace_end = tokio::time::sleep(cfg.shutdown_grace);
    tokio::pin!(grace_end);
    let done = loop {
        tokio::select! {
            _ = &mut drained => break true,
            _ = &mut grace_end => break false,
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                // One answer (503) per connection; not waited for.
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(cfg.timeout.min(Duration::from_secs(5)))
                    .keep_alive(false);
                let conn = b.serve_connection(
                    hyper_util::rt::TokioIo::new(stream),
                    hyper_util::service::TowerToHyperService::new(router.clone()),
                );
                tokio::spawn(conn);
            }
        }
    };
    drop(listener);
    if let Some(e) = app.engine.get() {
        if !done {
            // Cut what still runs: each answer ends with its error (503), which
            // gets a moment to reach its client.
            e.begin_shutdown(true);
            let _ = tokio::time::timeout(CUT_FLUSH, &mut drained).await;
        }
        let app2 = app.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(e) = app2.engine.get() {
                e.join();
            }
        })
        .await;
    }
    Ok(())
}

/// How long streams cut at the end of the grace period get to send their error.
const CUT_FLUSH: Duration = Duration::from_secs(2);

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn routes(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/health", get(info::health))
        .route("/v1/health", get(info::health))
        .route("/completion", post(completion::completion))
        .route("/completions", post(completion::completion))
        .route("/v1/completions", post(completion::oai_completions))
        .route("/v1/chat/completions", post(chat::oai_chat))
        .route("/chat/completions", post(chat::oai_chat))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/apply-template", post(chat::apply_template))
        .route("/props", get(info::props))
        .route("/models", get(info::models))
        .route("/v1/models", get(info::models))
        .route("/slots", get(info::slots))
        .route("/metrics", get(metrics::metrics))
        .route("/latents/tensors", get(info::latent_tensors))
        .route("/latents/subscribe", get(subscribe::subscribe))
        .route("/embedding", post(info::out_of_scope))
        .route("/embeddings", post(info::out_of_scope))
        .route("/v1/embeddings", post(info::out_of_scope))
        .route("/rerank", post(info::out_of_scope))
        .route("/reranking", post(info::out_of_scope))
        .route("/v1/rerank", post(info::out_of_scope))
        .route("/v1/reranking", post(info::out_of_scope))
        .route("/infill", post(info::out_of_scope))
        .route(
            "/lora-adapters",
            get(info::out_of_scope).post(info::out_of_scope),
        )
        .route("/slots/{id}", post(info::out_of_scope))
        // After every route: a known path with another method gets the same 404.
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(app)
}

/// Constant-time comparison (the time taken does not depend on where the keys differ).
fn same_key(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= (x ^ y) as usize;
    }
    diff == 0
}

async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(key) = app.cfg.api_key.as_deref().filter(|k| !k.is_empty()) else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    // `/` is the page, which holds no data; its requests carry the key.
    if path == "/health" || path == "/v1/health" || path == "/" {
        return next.run(req).await;
    }
    if bearer(req.headers()).is_some_and(|got| same_key(got.as_bytes(), key.as_bytes())) {
        return next.run(req).await;
    }
    ApiError::unauthorized().into_response()
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(str::trim);
    }
    h.get("x-api-key").and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison() {
        assert!(same_key(b"secret", b"secret"));
        assert!(!same_key(b"secret", b"secreT"));
        assert!(!same_key(b"secret", b"secret2"));
        assert!(!same_key(b"", b"x"));
    }

    #[test]
    fn exposure_needs_a_key() {
        assert!(check_exposure("127.0.0.1", None).is_ok());
        assert!(check_exposure("::1", None).is_ok());
        assert!(check_exposure("localhost", None).is_ok());
        assert!(check_exposure("0.0.0.0", None).is_err());
        assert!(check_exposure("0.0.0.0", Some("")).is_err());
        assert!(check_exposure("0.0.0.0", Some("k")).is_ok());
    }
}
