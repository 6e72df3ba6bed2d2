//! A job's events accumulated into llama-server's response fields.

use std::sync::Arc;

use serde_json::{json, Value};

use super::budget;
use super::prepare::{CancelGuard, Prepared};
use crate::engine::{Model, Token};
use crate::sched::{FrameOut, JobDone, JobEvent, StopReason, TokenOut};
use crate::server::error::ApiError;
use crate::server::text::TextState;
use crate::server::wire::Gather;
use crate::server::App;

/// What one sampled token adds to a response.
pub(super) struct Step {
    pub(super) token: Token,
    pub(super) delta: String,
    pub(super) prob: Option<Value>,
    pub(super) frames: Vec<FrameOut>,
}

/// Accumulates a job's events into llama-server's response fields.
pub(super) struct Acc {
    pub(super) text: TextState,
    pub(super) n_prompt: usize,
    pub(super) n_probs: usize,
    pub(super) model: Arc<Model>,
    pub(super) slot: i64,
    pub(super) tokens: Vec<Token>,
    pub(super) probs: Vec<Value>,
    pub(super) pending: Vec<FrameOut>,
    pub(super) all_frames: Gather,
    pub(super) keep_frames: bool,
    /// Latent bytes held now (`pending` and `all_frames`), their budget, and
    /// the message once they passed it (the job is then cancelled).
    held: usize,
    limit: usize,
    over_budget: Option<String>,
    /// Latent bytes this request received in all.
    pub(super) seen: usize,
    pub(super) has_new_line: bool,
    pub(super) done: Option<JobDone>,
}

fn piece_json(model: &Model, id: Token) -> (String, Vec<u8>) {
    let b = model.token_bytes(id);
    (String::from_utf8_lossy(&b).into_owned(), b)
}

impl Acc {
    pub(super) fn new(app: &App, p: &Prepared) -> Result<Self, ApiError> {
        Ok(Self {
            text: TextState::new(p.params.stop.clone()),
            n_prompt: p.tokens.len(),
            n_probs: p.params.n_probs,
            model: app.model()?.clone(),
            slot: -1,
            tokens: Vec::new(),
            probs: Vec::new(),
            pending: Vec::new(),
            all_frames: Gather::default(),
            keep_frames: false,
            held: 0,
            limit: app.cfg.max_latents,
            over_budget: None,
            seen: 0,
            has_new_line: false,
            done: None,
        })
    }

    /// Apply one event; `Some(step)` for a sampled token.
    pub(super) fn on(&mut self, ev: JobEvent, guard: &CancelGuard) -> Option<Step> {
        match ev {
            JobEvent::Started { slot } => {
                self.slot = slot as i64;
                None
            }
            JobEvent::Frame(f) => {
                let n = f.data.len();
                self.seen += n;
                if self.keep_frames {
                    // Gathered for the JSON answer at once (the frame is freed).
                    // A step's frames come before its token: frames arriving
                    // after the stop string was seen are not part of the answer.
                    if self.text.stopped.is_none() {
                        self.all_frames.push(&f);
                        self.held += n;
                    }
                } else {
                    self.held += n;
                    self.pending.push(f);
                }
                if self.held > self.limit && self.over_budget.is_none() {
                    self.over_budget = Some(budget::exceeded(self.limit, !self.keep_frames));
                    guard.0.cancel();
                }
                None
            }
            JobEvent::Token(t) if t.prompt => None,
            JobEvent::Token(t) => {
                if self.text.stopped.is_some() {
                    // Sampled after the stop string was seen: not part of the answer.
                    self.held -= frame_bytes(&self.pending);
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
                // Handed on to the caller (an SSE chunk), no longer held here.
                self.held -= frame_bytes(&frames);
                Some(Step {
                    token: t.token,
                    delta,
                    prob,
                    frames,
                })
            }
            JobEvent::Done(d) => {
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

    pub(super) fn stop_type(&self) -> &'static str {
        if self.text.stopped.is_some() {
            return "word";
        }
        match self.done.as_ref().map(|d| d.reason) {
            Some(StopReason::Eos) => "eos",
            Some(StopReason::Limit) => "limit",
            _ => "none",
        }
    }

    pub(super) fn finish_reason(&self) -> &'static str {
        match self.stop_type() {
            "word" | "eos" => "stop",
            _ => "length",
        }
    }

    /// How the request failed, if it did: over its latents budget (400), an
    /// error of the engine or of the answer's window (see `budget::Events`), or
    /// cut short by a shutdown (503; a job the engine ends while stopping carries
    /// that error, a stop string or a client that left does not).
    pub(super) fn error(&self) -> Option<ApiError> {
        if let Some(m) = &self.over_budget {
            return Some(ApiError::bad(m.clone()));
        }
        let d = self.done.as_ref()?;
        match (d.reason, &d.error) {
            (StopReason::Error, Some(e)) => Some(ApiError::from(e.clone())),
            (StopReason::Error, None) => Some(ApiError::internal("generation failed")),
            (StopReason::Cancelled, Some(_)) if self.text.stopped.is_none() => {
                let cut = if self.slot >= 0 {
                    ": the request was cut short at the end of the shutdown grace period"
                } else {
                    ""
                };
                Some(ApiError::unavailable(format!(
                    "the server is shutting down{cut}"
                )))
            }
            _ => None,
        }
    }

    pub(super) fn n_gen(&self) -> usize {
        self.tokens.len()
    }

    pub(super) fn timings(&self) -> Value {
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

    pub(super) fn usage(&self) -> Value {
        json!({
            "completion_tokens": self.n_gen(),
            "prompt_tokens": self.n_prompt,
            "total_tokens": self.n_gen() + self.n_prompt,
            "prompt_tokens_details": {"cached_tokens": 0},
        })
    }
}

fn frame_bytes(frames: &[FrameOut]) -> usize {
    frames.iter().map(|f| f.data.len()).sum()
}

/// Which positions' latents were computed: every one (no prefix is ever reused,
/// whatever `cache_prompt` says), so `cache_n` is 0.
pub(super) fn latents_computed(acc: &Acc) -> Value {
    json!({"from": 0, "to": acc.n_prompt + acc.n_gen().saturating_sub(1), "cache_n": 0})
}
