//! A completion request, read and checked: its tokens, generation settings,
//! latent selection and transport; then submitted to the engine.

use axum::http::{header, HeaderMap};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::budget::{Events, Window};
use crate::engine::Token;
use crate::sched::{Job, JobEvent, JobHandle, LatentFilter, SubmitError};
use crate::server::error::ApiError;
use crate::server::request::{self, GenParams};
use crate::server::wire::FRAMES_MEDIA_TYPE;
use crate::server::App;

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
pub(crate) enum Flavor {
    Native,
    OaiCmpl,
    OaiChat,
}

pub(crate) struct Prepared {
    pub(super) tokens: Vec<Token>,
    pub(super) params: GenParams,
    pub(super) filter: Option<LatentFilter>,
    /// The `lens` request, if any.
    pub(super) lens: Option<std::sync::Arc<super::lens::LensPlan>>,
    /// What the job captures: `filter`, plus the lens's rows.
    pub(super) job_filter: Option<LatentFilter>,
    pub(super) flavor: Flavor,
    pub(super) include_usage: bool,
    pub(super) return_tokens: bool,
    pub(super) binary: bool,
    pub(super) id: String,
    /// The `steer` and `patch` fields, checked.
    pub(super) edits: Option<crate::server::edits::RequestEdits>,
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

pub(crate) fn prepare(
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
    if !engine.prompt_fits(tokens.len()) {
        return Err(ApiError::exceeds_context(
            tokens.len(),
            false,
            engine.n_ctx_slot(),
        ));
    }
    let n_ctx_slot = engine.n_ctx_slot() as usize;
    let limits = crate::server::edits::Limits {
        n_layer: engine.model().n_layer(),
        n_embd: engine.model().n_embd(),
        n_ctx_slot,
        end: params.n_predict.map_or(n_ctx_slot, |n| {
            tokens.len().saturating_add(n).min(n_ctx_slot)
        }),
        steer_dir: app.cfg.steer_dir.as_deref(),
        graph: engine.graph(),
    };
    let edits = crate::server::edits::edits(m, &limits)?;
    let filter = params
        .latents
        .as_ref()
        .map(|l| engine.compile(l))
        .transpose()
        .map_err(ApiError::latents)?;
    let lens = super::lens::plan(engine, m)?;
    let job_filter = super::lens::job_filter(engine, filter.as_ref(), lens.as_ref())?;
    let include_usage = m
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Prepared {
        tokens,
        filter,
        lens: lens.map(std::sync::Arc::new),
        job_filter,
        flavor,
        include_usage,
        return_tokens: request::boolean(m, "return_tokens")?.unwrap_or(false),
        binary: wants_binary(headers),
        id: completion_id(),
        params,
        edits,
    })
}

/// Cancels the job when the response (or its stream) is dropped, e.g. on disconnect.
pub(super) struct CancelGuard(pub(super) JobHandle);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

pub(super) fn submit(app: &App, p: &Prepared) -> Result<(CancelGuard, Events), ApiError> {
    let engine = app.engine()?;
    let (tx, rx) = mpsc::unbounded_channel();
    // A graph compute hands on all its frames at once: the window holds two.
    let ubatch = p.tokens.len().min(app.cfg.engine.ctx.n_ubatch as usize);
    let row = p.filter.as_ref().map_or(0, |f| f.row_bytes());
    let limit = app.cfg.max_latents.max(2 * ubatch * row);
    let window = Window::new(limit, !p.binary && !p.params.stream);
    let job = Job {
        prompt: p.tokens.clone(),
        n_predict: p.params.n_predict.unwrap_or(usize::MAX),
        sampling: p.params.sampling.clone(),
        n_probs: p.params.n_probs,
        ignore_eos: p.params.ignore_eos,
        latents: p.job_filter.clone(),
        // Binary token records carry logprob and entropy; JSON shows them only with n_probs.
        token_stats: p.binary,
        edits: p.edits.as_ref().map(|e| e.edits.clone()),
    };
    let w = window.clone();
    let sink = Box::new(move |ev: JobEvent| {
        // A frame past the window cancels the job (see `Events`).
        if let JobEvent::Frame(f) = &ev {
            if !w.add(f.data.len()) {
                return false;
            }
        }
        tx.send(ev).is_ok()
    });
    match engine.submit(job, sink) {
        Ok(h) => Ok((CancelGuard(h), Events::new(rx, window))),
        Err(SubmitError::Busy) => Err(ApiError::unavailable(
            "the server is busy: every slot is in use and the wait queue is full",
        )),
        Err(SubmitError::Stopped) => Err(ApiError::unavailable("the server is shutting down")),
        Err(SubmitError::Invalid(e)) => Err(e.into()),
    }
}
