//! Endpoint handlers: llama-server's paths, fields and shapes, plus the latents extension.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::request::{self, GenParams};
use super::text::TextState;
use super::wire::{self, FRAMES_MEDIA_TYPE};
use super::App;
use crate::engine::{apply_chat_template, Token};
use crate::sched::{
    FrameOut, Job, JobDone, JobEvent, JobHandle, LatentFilter, Offer, RequestRecord, StopReason,
    SubmitError, SubscriberSink, TokenOut, KIND_REQUEST,
};

type AppState = State<Arc<App>>;

fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut r = (status, serde_json::to_string(v).unwrap_or_default()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

async fn read_body(app: &App, body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, app.cfg.max_body)
        .await
        .map_err(|_| ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            message: format!(
                "request body is larger than {} bytes (or could not be read)",
                app.cfg.max_body
            ),
        })
}

pub(crate) async fn health(State(app): AppState) -> Response {
    match app.engine() {
        Ok(_) => json_response(StatusCode::OK, &json!({"status": "ok"})),
        Err(e) => json_response(
            e.status,
            &json!({"error": {"message": e.message, "type": e.kind, "code": e.status.as_u16()}}),
        ),
    }
}

pub(crate) async fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}),
    )
}

pub(crate) async fn out_of_scope() -> Response {
    ApiError::unsupported(
        "this llama-server feature (embeddings, reranking, infill, LoRA, slot save/restore) is not supported by latent-tap serve",
    )
    .into_response()
}

/// Fields that select llama-server features latent-tap serve does not have.
fn refuse_unsupported(m: &Map<String, Value>) -> Result<(), ApiError> {
    for key in [
        "grammar",
        "json_schema",
        "tools",
        "tool_choice",
        "image_data",
        "multimodal_data",
        "lora",
        "logit_bias",
        "mirostat",
        "response_format",
    ] {
        let present = match m.get(key) {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            Some(Value::Object(o)) => {
                !(key == "response_format" && o.get("type").and_then(Value::as_str) == Some("text"))
            }
            Some(Value::Bool(b)) => *b,
        };
        if present {
            return Err(ApiError::unsupported(format!(
                "'{key}' is not supported by latent-tap serve"
            )));
        }
    }
    if let Some(n) = request::int(m, "n")?.or(request::int(m, "n_cmpl")?) {
        if n != 1 {
            return Err(ApiError::unsupported(
                "'n' other than 1 is not supported by latent-tap serve; send one request per completion",
            ));
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Native,
    OaiCmpl,
    OaiChat,
}

struct Prepared {
    tokens: Vec<Token>,
    params: GenParams,
    filter: Option<LatentFilter>,
    flavor: Flavor,
    include_usage: bool,
    return_tokens: bool,
    binary: bool,
    id: String,
}

fn wants_binary(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(FRAMES_MEDIA_TYPE))
}

fn completion_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    const ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut s = String::from("chatcmpl-");
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    for i in 0..32u64 {
        h.write_u64(i);
        s.push(ALNUM[(h.finish() % ALNUM.len() as u64) as usize] as char);
    }
    s
}

fn prepare(
    app: &App,
    m: &Map<String, Value>,
    flavor: Flavor,
    tokens: Vec<Token>,
    headers: &HeaderMap,
) -> Result<Prepared, ApiError> {
    let engine = app.engine()?;
    refuse_unsupported(m)?;
    let keys: &[&str] = &["n_predict", "max_completion_tokens", "max_tokens"];
    let mut params = request::gen_params(m, keys, app.cfg.n_predict)?;
    match flavor {
        Flavor::OaiChat => {
            let lp = request::boolean(m, "logprobs")?.unwrap_or(false);
            let top = request::int(m, "top_logprobs")?;
            if top.is_some() && !lp {
                return Err(ApiError::bad(
                    "top_logprobs requires logprobs to be set to true",
                ));
            }
            if lp {
                let n = top.unwrap_or(20);
                if !(0..=request::MAX_N_PROBS as i64).contains(&n) {
                    return Err(ApiError::bad(format!(
                        "'top_logprobs' must be between 0 and {}, not {n}",
                        request::MAX_N_PROBS
                    )));
                }
                params.n_probs = n as usize;
            }
        }
        Flavor::OaiCmpl | Flavor::Native => {
            if let Some(n) = request::int(m, "logprobs")? {
                if !(0..=request::MAX_N_PROBS as i64).contains(&n) {
                    return Err(ApiError::bad(format!(
                        "'logprobs' must be between 0 and {}, not {n}",
                        request::MAX_N_PROBS
                    )));
                }
                if params.n_probs == 0 {
                    params.n_probs = n as usize;
                }
            }
        }
    }
    let slot_ctx = engine.n_ctx_slot() as usize;
    if tokens.len() >= slot_ctx {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "exceed_context_size_error",
            message: format!(
                "request ({} tokens) exceeds the available context size ({slot_ctx} tokens), try increasing it",
                tokens.len()
            ),
        });
    }
    let filter = params
        .latents
        .as_ref()
        .map(|l| engine.compile(l))
        .transpose()
        .map_err(latent_error)?;
    let include_usage = m
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Prepared {
        tokens,
        filter,
        flavor,
        include_usage,
        return_tokens: request::boolean(m, "return_tokens")?.unwrap_or(false),
        binary: wants_binary(headers),
        id: completion_id(),
        params,
    })
}

/// A latent selection the graph cannot serve: 400, with where to look.
fn latent_error(e: crate::Error) -> ApiError {
    let hint = if e.kind() == crate::ErrorKind::NoMatch {
        " (GET /latents/tensors lists every name)"
    } else {
        ""
    };
    ApiError::bad(format!("latents: {}{hint}", e.message()))
}

/// Cancels the job when the response (or its stream) is dropped, e.g. on disconnect.
struct CancelGuard(JobHandle);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn submit(
    app: &App,
    p: &Prepared,
) -> Result<(CancelGuard, mpsc::UnboundedReceiver<JobEvent>), ApiError> {
    let engine = app.engine()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt: p.tokens.clone(),
        n_predict: p.params.n_predict.unwrap_or(usize::MAX),
        sampling: p.params.sampling.clone(),
        n_probs: p.params.n_probs,
        ignore_eos: p.params.ignore_eos,
        latents: p.filter.clone(),
        // Binary token records carry logprob and entropy; JSON shows them only with n_probs.
        token_stats: p.binary,
    };
    let sink = Box::new(move |ev: JobEvent| tx.send(ev).is_ok());
    match engine.submit(job, sink) {
        Ok(h) => Ok((CancelGuard(h), rx)),
        Err(SubmitError::Busy) => Err(ApiError::unavailable(
            "the server is busy: every slot is in use and the wait queue is full",
        )),
        Err(SubmitError::Stopped) => Err(ApiError::unavailable("the server is shutting down")),
        Err(SubmitError::Invalid(e)) => Err(e.into()),
    }
}

/// What one sampled token adds to a response.
struct Step {
    token: Token,
    delta: String,
    prob: Option<Value>,
    frames: Vec<FrameOut>,
}

/// Accumulates a job's events into llama-server's response fields.
struct Acc {
    text: TextState,
    n_prompt: usize,
    n_probs: usize,
    model: Arc<crate::engine::Model>,
    slot: i64,
    tokens: Vec<Token>,
    probs: Vec<Value>,
    pending: Vec<FrameOut>,
    all_frames: Vec<FrameOut>,
    keep_frames: bool,
    has_new_line: bool,
    done: Option<JobDone>,
}

fn piece_json(model: &crate::engine::Model, id: Token) -> (String, Vec<u8>) {
    let b = model.token_bytes(id);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

impl Acc {
    fn new(app: &App, p: &Prepared) -> Result<Self, ApiError> {
        Ok(Self {
            text: TextState::new(p.params.stop.clone()),
            n_prompt: p.tokens.len(),
            n_probs: p.params.n_probs,
            model: app.model()?.clone(),
            slot: -1,
            tokens: Vec::new(),
            probs: Vec::new(),
            pending: Vec::new(),
            all_frames: Vec::new(),
            keep_frames: false,
            has_new_line: false,
            done: None,
        })
    }

    /// Apply one event; `Some(step)` for a sampled token.
    fn on(&mut self, ev: JobEvent, guard: &CancelGuard) -> Option<Step> {
        match ev {
            JobEvent::Started { slot } => {
                self.slot = slot as i64;
                None
            }
            JobEvent::Frame(f) => {
                self.pending.push(f);
                None
            }
            JobEvent::Token(t) if t.prompt => None,
            JobEvent::Token(t) => {
                if self.text.stopped.is_some() {
                    // Sampled after the stop string was seen: not part of the answer.
                    self.pending.clear();
                    return None;
                }
                let delta = self.text.push(&t.piece);
                if self.text.stopped.is_some() {
                    guard.0.cancel();
                }
                self.has_new_line |= delta.contains('\n');
                self.tokens.push(t.token);
                let prob = (self.n_probs > 0).then(|| self.prob_entry(&t));
                if let Some(p) = &prob {
                    self.probs.push(p.clone());
                }
                let frames = std::mem::take(&mut self.pending);
                if self.keep_frames {
                    self.all_frames.extend(frames.iter().cloned());
                }
                Some(Step {
                    token: t.token,
                    delta,
                    prob,
                    frames,
                })
            }
            JobEvent::Done(d) => {
                if self.keep_frames {
                    self.all_frames.append(&mut self.pending);
                }
                self.done = Some(d);
                None
            }
        }
    }

    fn prob_entry(&self, t: &TokenOut) -> Value {
        let top: Vec<Value> = t
            .top
            .iter()
            .map(|e| {
                let (s, b) = piece_json(&self.model, e.id);
                json!({"id": e.id, "token": s, "bytes": b, "logprob": e.logprob})
            })
            .collect();
        json!({
            "id": t.token,
            "token": String::from_utf8_lossy(&t.piece),
            "bytes": t.piece,
            "logprob": t.logprob,
            "top_logprobs": top,
        })
    }

    fn stop_type(&self) -> &'static str {
        if self.text.stopped.is_some() {
            return "word";
        }
        match self.done.as_ref().map(|d| d.reason) {
            Some(StopReason::Eos) => "eos",
            Some(StopReason::Limit) => "limit",
            _ => "none",
        }
    }

    fn finish_reason(&self) -> &'static str {
        match self.stop_type() {
            "word" | "eos" => "stop",
            _ => "length",
        }
    }

    fn error(&self) -> Option<ApiError> {
        let d = self.done.as_ref()?;
        if d.reason != StopReason::Error {
            return None;
        }
        let msg = d
            .error
            .as_ref()
            .map_or("generation failed".into(), |e| e.message().to_string());
        Some(ApiError::internal(msg))
    }

    fn n_gen(&self) -> usize {
        self.tokens.len()
    }

    fn timings(&self) -> Value {
        let d = self.done.as_ref();
        let prompt_ms = d.map_or(0.0, |d| d.prompt_ms);
        let gen_ms = d.map_or(0.0, |d| d.gen_ms).max(1e-3);
        let n = self.n_gen();
        let per = |ms: f64, n: usize| if n > 0 { ms / n as f64 } else { 0.0 };
        let rate = |ms: f64, n: usize| if ms > 0.0 { 1e3 * n as f64 / ms } else { 0.0 };
        json!({
            "cache_n": 0,
            "prompt_n": self.n_prompt,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": per(prompt_ms, self.n_prompt),
            "prompt_per_second": rate(prompt_ms, self.n_prompt),
            "predicted_n": n,
            "predicted_ms": gen_ms,
            "predicted_per_token_ms": per(gen_ms, n.saturating_sub(1)),
            "predicted_per_second": rate(gen_ms, n.saturating_sub(1)),
        })
    }

    fn usage(&self) -> Value {
        json!({
            "completion_tokens": self.n_gen(),
            "prompt_tokens": self.n_prompt,
            "total_tokens": self.n_gen() + self.n_prompt,
            "prompt_tokens_details": {"cached_tokens": 0},
        })
    }
}

/// Which positions' latents were computed: every one (no prefix is ever reused,
/// whatever `cache_prompt` says), so `cache_n` is 0.
fn latents_computed(acc: &Acc) -> Value {
    json!({"from": 0, "to": acc.n_prompt + acc.n_gen().saturating_sub(1), "cache_n": 0})
}

/// llama-server's `generation_settings`, key for key (floats printed as the double
/// of the f32 value, as llama-server does). `samplers` lists the stages this
/// server really applies (llama-server's penalties, DRY, typical-p and XTC are
/// no-ops at their defaults and not supported here).
fn generation_settings(p: &GenParams) -> Value {
    let n_predict = p.n_predict.map_or(-1, |n| n as i64);
    let f = |x: f32| x as f64;
    json!({
        "seed": if p.seed_requested < 0 { 4294967295i64 } else { p.seed_requested },
        "temperature": f(p.sampling.temperature),
        "dynatemp_range": 0.0,
        "dynatemp_exponent": 1.0,
        "top_k": p.sampling.top_k,
        "top_p": f(p.sampling.top_p),
        "min_p": f(p.sampling.min_p),
        "top_n_sigma": -1.0,
        "xtc_probability": 0.0,
        "xtc_threshold": f(0.1),
        "typical_p": 1.0,
        "repeat_last_n": 64,
        "repeat_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "dry_multiplier": 0.0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_penalty_last_n": 64,
        "dry_sequence_breakers": ["\n", ":", "\"", "*"],
        "mirostat": 0,
        "mirostat_tau": 5.0,
        "mirostat_eta": f(0.1),
        "adaptive_target": -1.0,
        "adaptive_decay": f(0.9),
        "stop": p.stop,
        "max_tokens": n_predict,
        "n_predict": n_predict,
        "n_keep": 0,
        "n_discard": 0,
        "ignore_eos": p.ignore_eos,
        "stream": p.stream,
        "logit_bias": [],
        "n_probs": p.n_probs,
        "min_keep": 0,
        "grammar": "",
        "grammar_lazy": false,
        "grammar_triggers": [],
        "preserved_tokens": [],
        "chat_format": "Content-only",
        "reasoning_format": "deepseek",
        "reasoning_in_content": false,
        "generation_prompt": "",
        "samplers": ["top_k", "top_p", "min_p", "temperature"],
        "speculative.types": "none",
        "timings_per_token": false,
        "post_sampling_probs": false,
        "backend_sampling": false,
        "lora": [],
    })
}

fn detok_special(model: &crate::engine::Model, toks: &[Token]) -> String {
    let bytes: Vec<u8> = toks
        .iter()
        .flat_map(|&t| model.token_bytes_special(t))
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The final `/completion` object (content given separately: "" for a stream's last chunk).
fn native_final(app: &App, p: &Prepared, acc: &Acc, content: &str, with_probs: bool) -> Value {
    let mut v = json!({
        "index": 0,
        "content": content,
        "tokens": if p.return_tokens { acc.tokens.clone() } else { Vec::new() },
        "id_slot": acc.slot,
        "stop": true,
        "model": app.model_name,
        "tokens_predicted": acc.n_gen(),
        "tokens_evaluated": acc.n_prompt,
        "generation_settings": generation_settings(&p.params),
        "prompt": detok_special(&acc.model, &p.tokens),
        "has_new_line": acc.has_new_line,
        "truncated": false,
        "stop_type": acc.stop_type(),
        "stopping_word": acc.text.stopped.clone().unwrap_or_default(),
        "tokens_cached": (acc.n_prompt + acc.n_gen()).saturating_sub(1),
        "timings": acc.timings(),
    });
    if with_probs && p.params.n_probs > 0 {
        v["completion_probabilities"] = Value::Array(acc.probs.clone());
    }
    v
}

fn oai_final(app: &App, p: &Prepared, acc: &Acc, content: &str) -> Value {
    let created = unix_now();
    let logprobs = (p.params.n_probs > 0).then(|| json!({"content": acc.probs}));
    if p.flavor == Flavor::OaiChat {
        let mut choice = json!({
            "finish_reason": acc.finish_reason(),
            "index": 0,
            "message": {"role": "assistant", "content": content},
        });
        if let Some(lp) = logprobs {
            choice["logprobs"] = lp;
        }
        json!({
            "choices": [choice],
            "created": created,
            "model": app.model_name,
            "system_fingerprint": fingerprint(),
            "object": "chat.completion",
            "usage": acc.usage(),
            "id": p.id,
            "timings": acc.timings(),
        })
    } else {
        json!({
            "choices": [{"text": content, "index": 0, "logprobs": logprobs, "finish_reason": acc.finish_reason()}],
            "created": created,
            "model": app.model_name,
            "system_fingerprint": fingerprint(),
            "object": "text_completion",
            "usage": acc.usage(),
            "id": p.id,
            "timings": acc.timings(),
        })
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fingerprint() -> String {
    format!("latent-tap-{}", env!("CARGO_PKG_VERSION"))
}

async fn run(app: Arc<App>, p: Prepared) -> Result<Response, ApiError> {
    let (guard, rx) = submit(&app, &p)?;
    if p.binary {
        return Ok(binary_response(app, p, guard, rx));
    }
    if p.params.stream {
        return Ok(sse_response(app, p, guard, rx));
    }
    let mut rx = rx;
    let mut acc = Acc::new(&app, &p)?;
    acc.keep_frames = p.filter.is_some();
    while let Some(ev) = rx.recv().await {
        let done = matches!(ev, JobEvent::Done(_));
        acc.on(ev, &guard);
        if done {
            break;
        }
    }
    if let Some(e) = acc.error() {
        return Err(e);
    }
    acc.text.finish();
    let content = acc.text.content().to_string();
    let mut v = match p.flavor {
        Flavor::Native => native_final(&app, &p, &acc, &content, true),
        _ => oai_final(&app, &p, &acc, &content),
    };
    if p.filter.is_some() {
        v["latents"] = wire::latents_json(&acc.all_frames);
        v["latents_computed"] = latents_computed(&acc);
    }
    Ok(json_response(StatusCode::OK, &v))
}

fn stream_body(rx: mpsc::Receiver<Bytes>) -> Body {
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Body::from_stream(s)
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        serde_json::to_string(v).unwrap_or_default()
    ))
}

fn sse_response(
    app: Arc<App>,
    p: Prepared,
    guard: CancelGuard,
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
) -> Response {
    let (out, body_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let Ok(mut acc) = Acc::new(&app, &p) else {
            return;
        };
        let created = unix_now();
        let chunk_base = |choices: Value| {
            json!({
                "choices": choices,
                "created": created,
                "id": p.id,
                "model": app.model_name,
                "system_fingerprint": fingerprint(),
                "object": if p.flavor == Flavor::OaiChat { "chat.completion.chunk" } else { "text_completion" },
            })
        };
        let mut sent_role = false;
        while let Some(ev) = rx.recv().await {
            let done = matches!(ev, JobEvent::Done(_));
            let step = acc.on(ev, &guard);
            if let Some(s) = step {
                let latents = (!s.frames.is_empty()).then(|| wire::latents_json(&s.frames));
                let mut chunks = Vec::new();
                match p.flavor {
                    Flavor::Native => {
                        let mut c = json!({
                            "index": 0,
                            "content": s.delta,
                            "tokens": [s.token],
                            "stop": false,
                            "id_slot": -1,
                            "tokens_predicted": acc.n_gen(),
                            "tokens_evaluated": acc.n_prompt,
                        });
                        if let Some(pr) = &s.prob {
                            c["completion_probabilities"] = json!([pr]);
                        }
                        chunks.push(c);
                    }
                    Flavor::OaiCmpl => {
                        let lp = s.prob.as_ref().map(|pr| json!({"content": [pr]}));
                        chunks.push(chunk_base(json!([{"text": s.delta, "index": 0, "logprobs": lp, "finish_reason": null}])));
                    }
                    Flavor::OaiChat => {
                        if !sent_role {
                            sent_role = true;
                            chunks.push(chunk_base(json!([{"finish_reason": null, "index": 0, "delta": {"role": "assistant", "content": null}}])));
                        }
                        if !s.delta.is_empty() || latents.is_some() {
                            let mut c = chunk_base(
                                json!([{"finish_reason": null, "index": 0, "delta": {"content": s.delta}}]),
                            );
                            if let Some(pr) = &s.prob {
                                c["choices"][0]["logprobs"] = json!({"content": [pr]});
                            }
                            chunks.push(c);
                        }
                    }
                }
                if let (Some(l), Some(last)) = (latents, chunks.last_mut()) {
                    last["latents"] = l;
                }
                for c in &chunks {
                    if out.send(sse(c)).await.is_err() {
                        return; // client gone: the guard cancels the job
                    }
                }
            }
            if done {
                break;
            }
        }
        if let Some(e) = acc.error() {
            let _ = out.send(sse(&e.body())).await;
            return;
        }
        let tail = acc.text.finish();
        let leftover = std::mem::take(&mut acc.pending);
        let latents = (!leftover.is_empty()).then(|| wire::latents_json(&leftover));
        let mut finals = Vec::new();
        match p.flavor {
            Flavor::Native => {
                let mut v = native_final(&app, &p, &acc, &tail, false);
                if let Some(l) = latents {
                    v["latents"] = l;
                }
                finals.push(v);
            }
            Flavor::OaiCmpl => {
                let mut v = oai_final(&app, &p, &acc, &tail);
                v["choices"][0]["logprobs"] = Value::Null;
                if let Some(l) = latents {
                    v["latents"] = l;
                }
                finals.push(v);
            }
            Flavor::OaiChat => {
                if !tail.is_empty() {
                    finals.push(chunk_base(
                        json!([{"finish_reason": null, "index": 0, "delta": {"content": tail}}]),
                    ));
                }
                let mut v = chunk_base(
                    json!([{"finish_reason": acc.finish_reason(), "index": 0, "delta": {}}]),
                );
                if let Some(l) = latents {
                    v["latents"] = l;
                }
                finals.push(v);
                if p.include_usage {
                    let mut u = chunk_base(json!([]));
                    u["usage"] = acc.usage();
                    finals.push(u);
                }
                if let Some(last) = finals.last_mut() {
                    last["timings"] = acc.timings();
                }
            }
        }
        for v in &finals {
            if out.send(sse(v)).await.is_err() {
                return;
            }
        }
        if p.flavor != Flavor::Native {
            let _ = out.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        }
        drop(guard);
    });
    let mut r = Response::new(stream_body(body_rx));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

fn request_record(id: u64, slot: i64, event: u32, n_tokens: u64) -> Vec<u8> {
    RequestRecord {
        kind: KIND_REQUEST,
        header_size: std::mem::size_of::<RequestRecord>() as u32,
        request_id: id,
        seq_id: slot as i32,
        event,
        dropped: 0,
        n_tokens,
    }
    .to_record()
}

fn binary_response(
    app: Arc<App>,
    p: Prepared,
    guard: CancelGuard,
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
) -> Response {
    let (out, body_rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let Ok(mut acc) = Acc::new(&app, &p) else {
            return;
        };
        let id = guard.0.id;
        let mut frames = 0u64;
        while let Some(ev) = rx.recv().await {
            let rec = match &ev {
                JobEvent::Started { slot } => {
                    Some(request_record(id, *slot as i64, 1, p.tokens.len() as u64))
                }
                // After a stop string, later steps are not part of the answer (as in JSON/SSE).
                JobEvent::Frame(f) if acc.text.stopped.is_none() => {
                    frames += 1;
                    Some(f.to_record())
                }
                JobEvent::Frame(_) => None,
                JobEvent::Token(t) if acc.text.stopped.is_none() => Some(t.to_record()),
                JobEvent::Token(_) => None,
                JobEvent::Done(_) => None,
            };
            let done = matches!(ev, JobEvent::Done(_));
            acc.on(ev, &guard);
            if let Some(r) = rec {
                if out.send(Bytes::from(wire::framed(&r))).await.is_err() {
                    return;
                }
            }
            if done {
                break;
            }
        }
        let _ = acc.text.finish();
        let content = acc.text.content().to_string();
        let mut summary = match p.flavor {
            Flavor::Native => native_final(&app, &p, &acc, &content, true),
            _ => oai_final(&app, &p, &acc, &content),
        };
        if let Some(e) = acc.error() {
            summary = e.body();
        }
        let tail = [
            request_record(id, acc.slot, 2, acc.n_gen() as u64),
            wire::end_record(frames, 0),
            wire::json_record(&summary),
        ];
        for r in tail {
            if out.send(Bytes::from(wire::framed(&r))).await.is_err() {
                return;
            }
        }
        drop(guard);
    });
    let mut r = Response::new(stream_body(body_rx));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(FRAMES_MEDIA_TYPE),
    );
    r
}

pub(crate) async fn completion(State(app): AppState, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        let model = app.model()?.clone();
        let tokens = request::prompt(&model, m.get("prompt"))?;
        let p = prepare(&app, &m, Flavor::Native, tokens, &headers)?;
        run(app.clone(), p).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn oai_completions(
    State(app): AppState,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        let model = app.model()?.clone();
        let tokens = request::prompt(&model, m.get("prompt"))?;
        let p = prepare(&app, &m, Flavor::OaiCmpl, tokens, &headers)?;
        run(app.clone(), p).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Messages → `(role, text)`; content may be a string or text parts.
fn messages(m: &Map<String, Value>) -> Result<Vec<(String, String)>, ApiError> {
    let arr = match m.get("messages") {
        None | Some(Value::Null) => return Err(ApiError::bad("'messages' is required")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::bad("Expected 'messages' to be an array")),
    };
    let mut out = Vec::new();
    for msg in arr {
        let Some(o) = msg.as_object() else {
            return Err(ApiError::bad("each message must be an object"));
        };
        let role = o
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad("each message needs a string 'role'"))?;
        let content = match o.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        (t, _) => {
                            return Err(ApiError::unsupported(format!(
                                "message content part of type {} is not supported by latent-tap serve (text only)",
                                t.unwrap_or("?")
                            )))
                        }
                    }
                }
                s
            }
            None | Some(Value::Null) if role == "assistant" => String::new(),
            None | Some(Value::Null) => {
                return Err(ApiError::bad(
                    "All non-assistant messages must contain 'content'",
                ))
            }
            Some(_) => {
                return Err(ApiError::bad(
                    "message 'content' must be a string or an array of parts",
                ))
            }
        };
        out.push((role.to_string(), content));
    }
    if out.is_empty() {
        return Err(ApiError::bad("'messages' must not be empty"));
    }
    Ok(out)
}

fn render_chat(app: &App, m: &Map<String, Value>) -> Result<String, ApiError> {
    let model = app.model()?;
    let msgs = messages(m)?;
    let add_gen = request::boolean(m, "add_generation_prompt")?.unwrap_or(true)
        && msgs.last().map_or(true, |(r, _)| r != "assistant");
    let tmpl = model
        .chat_template()
        .unwrap_or_else(|| "chatml".to_string());
    let mut text = apply_chat_template(&tmpl, &msgs, add_gen)?;
    // llama-server strips a rendered BOS when the tokenizer adds one itself.
    let bos = model.tokenize_ext("", true, false)?;
    if let Some(&b) = bos.first() {
        let bos_text = String::from_utf8_lossy(&model.token_bytes_special(b)).into_owned();
        if !bos_text.is_empty() && text.starts_with(&bos_text) {
            text.drain(..bos_text.len());
        }
    }
    Ok(text)
}

pub(crate) async fn oai_chat(State(app): AppState, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        let text = render_chat(&app, &m)?;
        let model = app.model()?.clone();
        let tokens = model.tokenize_ext(&text, true, true)?;
        if tokens.is_empty() {
            return Err(ApiError::bad("the rendered prompt is empty"));
        }
        let p = prepare(&app, &m, Flavor::OaiChat, tokens, &headers)?;
        run(app.clone(), p).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn apply_template(State(app): AppState, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({"prompt": render_chat(&app, &m)?}),
        ))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn tokenize(State(app): AppState, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        let model = app.model()?.clone();
        let add_special = request::boolean(&m, "add_special")?.unwrap_or(false);
        let parse_special = request::boolean(&m, "parse_special")?.unwrap_or(true);
        let with_pieces = request::boolean(&m, "with_pieces")?.unwrap_or(false);
        let toks = match request::string(&m, "content")? {
            None => Vec::new(),
            Some(s) => model.tokenize_ext(s, add_special, parse_special)?,
        };
        let tokens: Vec<Value> = if with_pieces {
            toks.iter()
                .map(|&t| {
                    let b = model.token_bytes_special(t);
                    let piece = match String::from_utf8(b) {
                        Ok(s) => json!(s),
                        Err(e) => json!(e.into_bytes()),
                    };
                    json!({"id": t, "piece": piece})
                })
                .collect()
        } else {
            toks.iter().map(|&t| json!(t)).collect()
        };
        Ok::<_, ApiError>(json_response(StatusCode::OK, &json!({"tokens": tokens})))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn detokenize(State(app): AppState, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        let model = app.model()?.clone();
        let n_vocab = model.n_vocab() as i64;
        let toks: Vec<Token> = match m.get("tokens") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v.as_i64() {
                    Some(t) if (0..n_vocab).contains(&t) => Ok(t as Token),
                    _ => Err(ApiError::bad(format!(
                        "'tokens' must be token ids in 0..{n_vocab}"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(ApiError::bad("'tokens' must be an array of token ids")),
        };
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({"content": detok_special(&model, &toks)}),
        ))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn props(State(app): AppState) -> Response {
    let r = (|| {
        let engine = app.engine()?;
        let model = engine.model();
        let defaults = request::gen_params(&Map::new(), &["n_predict"], -1)?;
        let tok_text = |t: Option<Token>| {
            t.map(|t| String::from_utf8_lossy(&model.token_bytes_special(t)).into_owned())
                .unwrap_or_default()
        };
        let bos = model.tokenize_ext("", true, false)?.first().copied();
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({
                "default_generation_settings": {"params": generation_settings(&defaults), "n_ctx": engine.n_ctx_slot()},
                "total_slots": engine.n_parallel(),
                "model_alias": app.model_name,
                "model_path": app.cfg.model.display().to_string(),
                "modalities": {"vision": false, "video": false, "audio": false},
                "endpoint_slots": true,
                "endpoint_props": false,
                "endpoint_metrics": app.cfg.metrics,
                "chat_template": model.chat_template().unwrap_or_else(|| "chatml".into()),
                "bos_token": tok_text(bos),
                "build_info": fingerprint(),
                "is_sleeping": false,
                "latents": {
                    "n_layer": model.n_layer(),
                    "n_embd": model.n_embd(),
                    "capturable": engine.graph().len(),
                    "binary_media_type": FRAMES_MEDIA_TYPE,
                    "capture_mode": engine.capture_mode(),
                },
            }),
        ))
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn models(State(app): AppState) -> Response {
    let r = (|| {
        let engine = app.engine()?;
        let model = engine.model();
        let name = &app.model_name;
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({
                "models": [{
                    "name": name, "model": name, "modified_at": "", "size": "", "digest": "",
                    "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
                    "parameters": "",
                    "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""], "parameter_size": "", "quantization_level": ""},
                }],
                "object": "list",
                "data": [{
                    "id": name, "aliases": app.cfg.alias.iter().collect::<Vec<_>>(), "tags": [], "object": "model",
                    "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                    "created": unix_now(), "owned_by": "llamacpp",
                    "meta": {"n_vocab": model.n_vocab(), "n_ctx": engine.n_ctx_slot(), "n_embd": model.n_embd(), "n_layer": model.n_layer()},
                }],
            }),
        ))
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn slots(State(app): AppState) -> Response {
    let r = (|| {
        let engine = app.engine()?;
        let v: Vec<Value> = engine
            .slots()
            .iter()
            .map(|s| {
                let mut v = json!({
                    "id": s.id,
                    "n_ctx": engine.n_ctx_slot(),
                    "speculative": false,
                    "is_processing": s.job.is_some(),
                });
                // Like llama-server, task fields appear only while (or once) a slot works.
                if let Some(job) = s.job {
                    v["id_task"] = json!(job);
                    v["n_prompt_tokens"] = json!(s.n_prompt);
                    v["next_token"] = json!([{"has_next_token": true, "n_remain": s.n_predict.saturating_sub(s.n_generated), "n_decoded": s.n_generated}]);
                }
                v
            })
            .collect();
        Ok::<_, ApiError>(json_response(StatusCode::OK, &Value::Array(v)))
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn metrics(State(app): AppState) -> Response {
    if !app.cfg.metrics {
        return ApiError::unsupported(
            "This server does not support metrics endpoint. Start it with `--metrics`",
        )
        .into_response();
    }
    let engine = match app.engine() {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    let st = engine.stats();
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let prompt_s = ld(&st.prompt_us) / 1e6;
    let gen_s = ld(&st.gen_us) / 1e6;
    let rate = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, v: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    };
    metric(
        "llamacpp:prompt_tokens_total",
        "counter",
        "Number of prompt tokens processed, excluding cached tokens.",
        ld(&st.prompt_tokens),
    );
    metric(
        "llamacpp:prompt_seconds_total",
        "counter",
        "Total time spent processing prompts.",
        prompt_s,
    );
    metric(
        "llamacpp:tokens_predicted_total",
        "counter",
        "Number of generation tokens processed.",
        ld(&st.generated_tokens),
    );
    metric(
        "llamacpp:tokens_predicted_seconds_total",
        "counter",
        "Total time spent generating tokens.",
        gen_s,
    );
    metric(
        "llamacpp:n_decode_total",
        "counter",
        "Total number of llama_decode() calls.",
        ld(&st.decodes),
    );
    metric(
        "llamacpp:prompt_tokens_seconds",
        "gauge",
        "Average prompt throughput in tokens/s.",
        rate(ld(&st.prompt_tokens), prompt_s),
    );
    metric(
        "llamacpp:predicted_tokens_seconds",
        "gauge",
        "Average generation throughput in tokens/s.",
        rate(ld(&st.generated_tokens), gen_s),
    );
    metric(
        "llamacpp:requests_processing",
        "gauge",
        "Number of requests processing.",
        st.active.load(Ordering::Relaxed) as f64,
    );
    metric(
        "llamacpp:requests_deferred",
        "gauge",
        "Number of requests deferred.",
        st.queued.load(Ordering::Relaxed) as f64,
    );
    metric(
        "llamacpp:kv_cache_tokens",
        "gauge",
        "KV cache tokens in use.",
        ld(&st.kv_tokens),
    );
    metric(
        "latent_tap:frames_total",
        "counter",
        "Latent frames produced by the tap.",
        ld(&st.frames),
    );
    metric(
        "latent_tap:frame_bytes_out_total",
        "counter",
        "Latent payload bytes delivered to requesters and subscribers.",
        ld(&st.frame_bytes_out),
    );
    metric(
        "latent_tap:tap_drops_total",
        "counter",
        "Frames the tap dropped because its ring was full.",
        ld(&st.tap_drops),
    );
    metric(
        "latent_tap:queue_depth",
        "gauge",
        "Requests waiting for a slot.",
        st.queued.load(Ordering::Relaxed) as f64,
    );
    let subs = engine.subscribers();
    metric(
        "latent_tap:subscribers",
        "gauge",
        "Connected latent subscribers.",
        subs.len() as f64,
    );
    out.push_str("# HELP latent_tap:subscriber_drops_total Frames dropped for a subscriber whose queue was full.\n# TYPE latent_tap:subscriber_drops_total counter\n");
    for s in &subs {
        out.push_str(&format!(
            "latent_tap:subscriber_drops_total{{subscriber=\"{}\"}} {}\n",
            s.id,
            s.drops.load(Ordering::Relaxed)
        ));
    }
    let mut r = (StatusCode::OK, out).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

pub(crate) async fn latent_tensors(State(app): AppState) -> Response {
    let r = (|| {
        let engine = app.engine()?;
        let mut global = Vec::new();
        let mut layers: std::collections::BTreeMap<i32, Vec<Value>> = Default::default();
        for n in engine.graph() {
            // One token's shape, trailing unit axes dropped ([640, 1, 1, 1] → [640]).
            let mut ne: Vec<i64> = n.ne.iter().copied().take_while(|&d| d > 0).collect();
            while ne.len() > 1 && ne.last() == Some(&1) {
                ne.pop();
            }
            let e = json!({"name": n.name, "shape": ne, "ggml_type": n.ggml_type});
            match n.layer {
                Some(l) => layers.entry(l).or_default().push(e),
                None => global.push(e),
            }
        }
        let layers: Map<String, Value> = layers
            .into_iter()
            .map(|(l, v)| (l.to_string(), Value::Array(v)))
            .collect();
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({"model": app.model_name, "n_layer": engine.model().n_layer(), "global": global, "layers": layers}),
        ))
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

/// A subscriber's queue: frames are refused beyond `budget` queued bytes (and
/// counted as drops); a consumer that falls 4× behind is cut off.
struct ChannelSink {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    budget: usize,
}

impl SubscriberSink for ChannelSink {
    fn has_room(&self, len: usize) -> bool {
        self.queued.load(Ordering::Relaxed) + len <= self.budget
    }

    fn offer(&mut self, rec: Vec<u8>, droppable: bool) -> Offer {
        if self.tx.is_closed() {
            return Offer::Closed;
        }
        let q = self.queued.load(Ordering::Relaxed);
        if droppable && q + rec.len() > self.budget {
            return Offer::Full;
        }
        if q > self.budget.saturating_mul(4) {
            return Offer::Closed;
        }
        let b = Bytes::from(wire::framed(&rec));
        self.queued.fetch_add(b.len(), Ordering::Relaxed);
        if self.tx.send(b).is_err() {
            return Offer::Closed;
        }
        Offer::Taken
    }
}

pub(crate) async fn subscribe(
    State(app): AppState,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let r = (|| {
        let engine = app.engine()?;
        for k in q.keys() {
            if !matches!(
                k.as_str(),
                "tensors" | "layers" | "rows" | "dtype" | "queue_mb"
            ) {
                return Err(ApiError::bad(format!("unknown subscribe parameter '{k}'")));
            }
        }
        let req = request::latent_request(
            q.get("tensors").map(String::as_str),
            q.get("layers").map(String::as_str),
            q.get("rows").map(String::as_str),
            q.get("dtype").map(String::as_str),
        )?;
        let budget = match q.get("queue_mb") {
            None => app.cfg.subscriber_queue,
            Some(s) => match s.parse::<usize>() {
                Ok(mb) if (1..=4096).contains(&mb) => mb << 20,
                _ => {
                    return Err(ApiError::bad(format!(
                        "'queue_mb' must be an integer in 1..=4096, not '{s}'"
                    )))
                }
            },
        };
        let filter = engine.compile(&req).map_err(latent_error)?;
        let (sink, resp) = subscriber_channel(budget);
        engine.subscribe(filter, sink)?;
        Ok::<_, ApiError>(resp)
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

/// A subscriber's sink (queue of `budget` bytes) and the response that streams
/// what it takes (also `latent-tap listen`'s subscribe endpoint).
pub(crate) fn subscriber_channel(budget: usize) -> (Box<dyn SubscriberSink>, Response) {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let queued = Arc::new(AtomicUsize::new(0));
    let sink = Box::new(ChannelSink {
        tx,
        queued: queued.clone(),
        budget,
    });
    let s = futures_util::stream::unfold((rx, queued), |(mut rx, queued)| async move {
        let b = rx.recv().await?;
        queued.fetch_sub(b.len(), Ordering::Relaxed);
        Some((Ok::<_, Infallible>(b), (rx, queued)))
    });
    let mut resp = Response::new(Body::from_stream(s));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(FRAMES_MEDIA_TYPE),
    );
    (sink, resp)
}
