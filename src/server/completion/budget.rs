//! The per-request latents budget (`--max-latents-mb`): what one request may
//! hold of latents. Checked before the request runs where the size is known
//! from the request ([`check`]), else while it runs: [`super::acc::Acc`] counts
//! what it holds (a JSON answer's latents, an SSE chunk's step) and the job's
//! event queue counts what waits for a slow reader ([`Window`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::prepare::Prepared;
use crate::capture::Rows;
use crate::error::Error;
use crate::sched::{JobDone, JobEvent, LatentFilter, StopReason};
use crate::server::error::ApiError;

/// What to do instead, in every budget message.
const ADVICE: &str =
    "select fewer tensors or layers, ask for \"rows\": \"last\" or \"dtype\": \"f16\", \
or stream them: the binary stream (Accept: application/vnd.latent-tap.frames) and \
GET /latents/subscribe send frames as they are made instead of holding them";

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn over(what: &str, bytes: usize, limit: usize) -> String {
    format!(
        "latents: {what} would hold {} of latents, more than this server's budget of {} per request (--max-latents-mb); {ADVICE}",
        mib(bytes),
        mib(limit)
    )
}

/// Rows of one tensor a request delivers if it generates `n_gen` tokens
/// (docs/PROTOCOL.md, "Steps and rows"), at most a slot's positions.
fn rows(f: &LatentFilter, n_prompt: usize, n_gen: usize, n_ctx_slot: usize) -> usize {
    let r = match f.rows {
        Rows::All => n_prompt + n_gen.saturating_sub(1),
        _ => n_gen.max(1),
    };
    r.min(n_ctx_slot.max(n_prompt))
}

/// Refuse, before it runs, a request whose latents cannot fit the budget: a
/// JSON answer's whole selection (with no `n_predict` limit: what the prompt
/// and the first token alone need), an SSE answer's largest chunk (the
/// prompt's step). The binary stream holds no more than a window ([`Window`]).
/// The estimate is an upper bound: the last layer has rows only for sampled
/// positions.
pub(super) fn check(p: &Prepared, limit: usize, n_ctx_slot: usize) -> Result<(), ApiError> {
    let Some(f) = &p.filter else { return Ok(()) };
    let row = f.row_bytes();
    if p.binary || row == 0 {
        return Ok(());
    }
    let n_prompt = p.tokens.len();
    let shape = |rows: usize| {
        format!(
            "{rows} rows × {row} bytes: {} tensors in {}",
            f.names.len(),
            f.dtype.name()
        )
    };
    if p.params.stream {
        let r = rows(f, n_prompt, 1, n_ctx_slot);
        if r * row > limit {
            let what = format!("the SSE chunk of the prompt's step ({})", shape(r));
            return Err(ApiError::bad(over(&what, r * row, limit)));
        }
        return Ok(());
    }
    let (n_gen, at_least) = match p.params.n_predict {
        Some(n) => (n, ""),
        None => (1, "at least "),
    };
    let r = rows(f, n_prompt, n_gen, n_ctx_slot);
    if r * row > limit {
        let what = format!("this request's JSON answer ({at_least}{})", shape(r));
        return Err(ApiError::bad(over(&what, r * row, limit)));
    }
    Ok(())
}

/// The message when a request passes the budget while it runs.
pub(super) fn exceeded(limit: usize, stream: bool) -> String {
    let what = if stream {
        "one step of this request's SSE answer"
    } else {
        "this request's JSON answer"
    };
    format!(
        "latents: {what} came to hold more than this server's budget of {} per request (--max-latents-mb), so it was stopped; {ADVICE}",
        mib(limit)
    )
}

/// Latent bytes queued for one requester (frames the router handed on that
/// the answer has not taken yet, and chunks waiting to be written): a reader
/// slower than the model is cut off when they pass the budget, instead of the
/// server buffering without bound.
pub(super) struct Window {
    queued: AtomicUsize,
    limit: usize,
    overflow: AtomicBool,
    /// The answer is one JSON object: what waits here is on its way into it.
    json: bool,
}

impl Window {
    pub(super) fn new(limit: usize, json: bool) -> Arc<Self> {
        Arc::new(Self {
            queued: AtomicUsize::new(0),
            limit,
            overflow: AtomicBool::new(false),
            json,
        })
    }

    /// `n` bytes queued; false (and the window marked overflowed) past the limit.
    pub(super) fn add(&self, n: usize) -> bool {
        let now = self.queued.fetch_add(n, Ordering::Relaxed) + n;
        if now > self.limit {
            self.overflow.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub(super) fn sub(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
    }
}

/// A job's events as the answer takes them, counted out of its [`Window`].
/// When the window overflowed (the sink refused a frame, which cancels the job
/// and ends its events without a `Done`), the last event is a `Done` with the
/// error, so every transport answers it as a failed request.
pub(super) struct Events {
    rx: mpsc::UnboundedReceiver<JobEvent>,
    pub(super) window: Arc<Window>,
    ended: bool,
}

impl Events {
    pub(super) fn new(rx: mpsc::UnboundedReceiver<JobEvent>, window: Arc<Window>) -> Self {
        Self {
            rx,
            window,
            ended: false,
        }
    }

    fn took(&mut self, ev: JobEvent) -> JobEvent {
        if let JobEvent::Frame(f) = &ev {
            self.window.sub(f.data.len());
        }
        if matches!(ev, JobEvent::Done(_)) {
            self.ended = true;
        }
        ev
    }

    /// The next event if one is waiting now (`None`: none yet, or the end:
    /// [`Events::recv`] tells which).
    pub(super) fn try_recv(&mut self) -> Option<JobEvent> {
        let ev = self.rx.try_recv().ok()?;
        Some(self.took(ev))
    }

    pub(super) async fn recv(&mut self) -> Option<JobEvent> {
        match self.rx.recv().await {
            Some(ev) => Some(self.took(ev)),
            None if !self.ended && self.window.overflow.load(Ordering::Relaxed) => {
                self.ended = true;
                let limit = self.window.limit;
                let msg = if self.window.json {
                    exceeded(limit, false)
                } else {
                    format!(
                    "latents: the client read this answer too slowly: more than {} of latents waited to be sent (--max-latents-mb); read faster, or select fewer tensors or layers, \"rows\": \"last\" or \"dtype\": \"f16\"",
                    mib(limit)
                )
                };
                Some(JobEvent::Done(JobDone {
                    reason: StopReason::Error,
                    error: Some(Error::invalid(msg)),
                    n_prompt: 0,
                    n_generated: 0,
                    prompt_ms: 0.0,
                    gen_ms: 0.0,
                    frames: 0,
                }))
            }
            None => None,
        }
    }
}
