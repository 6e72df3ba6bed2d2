//! A job's events accumulated into llama-server's response fields.

use std::sync::Arc;

use serde_json::{json, Value};

use super::lens::Split;
use super::prepare::{CancelGuard, Prepared};
use crate::engine::{Model, Token};
use crate::sched::LatentFilter;
use crate::sched::{FrameOut, JobDone, JobEvent, StopReason, TokenOut};
use crate::server::error::ApiError;
use crate::server::text::TextState;
use crate::server::App;

/// What one sampled token adds to a response.
pub(super) struct Step {
    pub(super) token: Token,
    pub(super) delta: String,
    pub(super) prob: Option<Value>,
    pub(super) frames: Vec<FrameOut>,
    /// The step's rows for the lens (empty without a lens request).
    pub(super) lens_frames: Vec<FrameOut>,
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
    pub(super) all_frames: Vec<FrameOut>,
    pub(super) keep_frames: bool,
    pub(super) has_new_line: bool,
    pub(super) done: Option<JobDone>,
    /// The prompt's tokens (lens targets).
    pub(super) prompt: Vec<Token>,
    /// The requester's own latents filter, when a lens shares the job's.
    user_filter: Option<LatentFilter>,
    split: Option<Split>,
    pub(super) lens_pending: Vec<FrameOut>,
    pub(super) all_lens_frames: Vec<FrameOut>,
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
            all_frames: Vec::new(),
            keep_frames: false,
            has_new_line: false,
            done: None,
            prompt: p.tokens.clone(),
            user_filter: p.filter.clone(),
            split: p.lens.clone().map(|l| Split::new(l, p.tokens.len())),
            lens_pending: Vec::new(),
            all_lens_frames: Vec::new(),
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
                match &self.split {
                    None => self.pending.push(f),
                    Some(s) => {
                        if let Some(l) = s.lens_frame(&f) {
                            self.lens_pending.push(l);
                        }
                        if let Some(u) = s.user_frame(self.user_filter.as_ref(), &f) {
                            self.pending.push(u);
                        }
                    }
                }
                None
            }
            JobEvent::Token(t) if t.prompt => None,
            JobEvent::Token(t) => {
                if self.text.stopped.is_some() {
                    // Sampled after the stop string was seen: not part of the answer.
                    self.pending.clear();
                    self.lens_pending.clear();
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
                let lens_frames = std::mem::take(&mut self.lens_pending);
                if self.keep_frames {
                    self.all_lens_frames.extend(lens_frames.iter().cloned());
                }
                Some(Step {
                    token: t.token,
                    delta,
                    prob,
                    frames,
                    lens_frames,
                })
            }
            JobEvent::Done(d) => {
                if self.keep_frames {
                    self.all_frames.append(&mut self.pending);
                    self.all_lens_frames.append(&mut self.lens_pending);
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

    pub(super) fn error(&self) -> Option<ApiError> {
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

    /// The prompt, then every token generated so far.
    pub(super) fn all_tokens(&self) -> Vec<Token> {
        let mut t = self.prompt.clone();
        t.extend_from_slice(&self.tokens);
        t
    }

    /// The FRAME record of a frame as the requester asked for it (`None`: the
    /// lens's alone), for the binary stream.
    pub(super) fn user_record(&self, f: &FrameOut) -> Option<Vec<u8>> {
        match &self.split {
            None => Some(f.to_record()),
            Some(s) => s
                .user_frame(self.user_filter.as_ref(), f)
                .map(|u| u.to_record()),
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

/// Which positions' latents were computed: every one (no prefix is ever reused,
/// whatever `cache_prompt` says), so `cache_n` is 0.
pub(super) fn latents_computed(acc: &Acc) -> Value {
    json!({"from": 0, "to": acc.n_prompt + acc.n_gen().saturating_sub(1), "cache_n": 0})
}
