//! What a job and a subscriber ask for and what they get back: requests,
//! compiled filters, the events a job's sink receives and the sinks' types.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::capture::Rows;
use crate::engine::{SamplingOptions, Token};
use crate::error::Error;
use crate::record::{self, Dtype, FrameHeader, RowMeta, TokenHeader, TopEntry, ROW_PROMPT};
use crate::select::{LayerFilter, SkippedTensor};
use crate::steer::Edits;

use super::SubscriberStats;

/// Latents a job (or a subscriber) asks for, as given.
#[derive(Debug, Clone)]
pub struct LatentRequest {
    /// Glob patterns (comma lists allowed).
    pub patterns: Vec<String>,
    /// Optional layer filter.
    pub layers: Option<LayerFilter>,
    /// All rows, or only rows whose distribution was sampled (the last prompt
    /// token's and every generated step's).
    pub rows: Rows,
    /// Element type delivered.
    pub dtype: Dtype,
}

/// A [`LatentRequest`] compiled against the engine's graph.
#[derive(Debug, Clone)]
pub struct LatentFilter {
    /// Selected display names, in graph order; a frame's `tensor_index` indexes this.
    pub names: Vec<String>,
    /// Name → its index in `names` (the first, should a name repeat): one
    /// lookup per frame and consumer.
    index: HashMap<String, u32>,
    /// Rows kept.
    pub rows: Rows,
    /// Element type delivered.
    pub dtype: Dtype,
    /// Nodes a glob matched that are not delivered, with the reason (see
    /// [`Scheduler::compile`](super::Scheduler::compile)).
    pub skipped: Vec<SkippedTensor>,
    /// Elements per row of each selected tensor (as `names`), where known (set
    /// by [`Scheduler::compile`](super::Scheduler::compile); empty otherwise).
    pub widths: Vec<usize>,
}

impl LatentFilter {
    /// A filter that selects no tensor (tokens only).
    pub fn none(rows: Rows, dtype: Dtype) -> Self {
        Self::new(Vec::new(), rows, dtype)
    }

    /// A filter selecting `names` (display names, in graph order).
    pub(crate) fn new(names: Vec<String>, rows: Rows, dtype: Dtype) -> Self {
        let mut index = HashMap::with_capacity(names.len());
        for (i, n) in names.iter().enumerate() {
            index.entry(n.clone()).or_insert(i as u32);
        }
        Self {
            names,
            index,
            rows,
            dtype,
            skipped: Vec::new(),
            widths: Vec::new(),
        }
    }

    /// Bytes of one row of every selected tensor in the delivered dtype (0 when
    /// the widths are not known): what one token position adds to the latents.
    pub fn row_bytes(&self) -> usize {
        self.widths.iter().sum::<usize>() * self.dtype.size()
    }

    /// The index of tensor `name` in [`LatentFilter::names`], if selected.
    pub(crate) fn index_of(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct Job {
    /// Prompt tokens (non-empty).
    pub prompt: Vec<Token>,
    /// Most tokens to generate; 0 evaluates the prompt only.
    pub n_predict: usize,
    /// Sampler settings.
    pub sampling: SamplingOptions,
    /// Alternatives reported per generated token.
    pub n_probs: usize,
    /// Keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Latents to deliver with the tokens, compiled by
    /// [`Scheduler::compile`](super::Scheduler::compile).
    pub latents: Option<LatentFilter>,
    /// Compute each sampled token's log-probability and entropy over the full
    /// vocabulary even when `n_probs` is 0 (one pass over the logits: ~2-3 ms
    /// per token at a 262k vocabulary on 2 cores). Subscribers always get them.
    pub token_stats: bool,
    /// Steering and patching of this job's own sequence, checked against the
    /// model beforehand (`None`: its rows are left as computed, and the job
    /// costs nothing more). The steers' own `seqs` are ignored: the job's
    /// slot is edited.
    pub edits: Option<Arc<Edits>>,
}

/// Why a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    /// An end-of-generation token was sampled.
    Eos,
    /// `n_predict` tokens were generated, or the slot's context is full.
    Limit,
    /// The caller cancelled (or went away).
    Cancelled,
    /// Decoding failed.
    Error,
}

/// A frame cut down to one job's rows (or one subscriber's view of a job).
#[derive(Debug, Clone)]
pub struct FrameOut {
    /// The header: `seq` counts this consumer's frames, `step` is the job's own
    /// step (0: prompt, k: the decode that sampled the k-th generated token... see
    /// the module docs), `tensor_index` indexes the consumer's name list.
    pub header: FrameHeader,
    /// One entry per row.
    pub rows: Vec<RowMeta>,
    /// `rows.len() * width` elements of `header.dtype`, little-endian.
    pub data: Vec<u8>,
}

impl FrameOut {
    /// Tensor name.
    pub fn name(&self) -> &str {
        let n = &self.header.name;
        let end = n.iter().position(|&b| b == 0).unwrap_or(n.len());
        std::str::from_utf8(&n[..end]).unwrap_or("")
    }

    /// The exact ring record bytes (the C ABI's frame layout).
    pub fn to_record(&self) -> Vec<u8> {
        let mut buf =
            vec![0u8; record::frame_len(self.rows.len(), self.header.width as usize, self.dtype())];
        record::put(&mut buf, 0, &self.header);
        let mut off = std::mem::size_of::<FrameHeader>();
        for r in &self.rows {
            record::put(&mut buf, off, r);
            off += std::mem::size_of::<RowMeta>();
        }
        buf[off..].copy_from_slice(&self.data);
        buf
    }

    /// Payload dtype.
    pub fn dtype(&self) -> Dtype {
        Dtype::from_u32(self.header.dtype).unwrap_or(Dtype::F32)
    }
}

/// A token event of one job.
#[derive(Debug, Clone)]
pub struct TokenOut {
    /// Job step: 0 for prompt tokens and the first sampled token, k for the k-th decode after.
    pub step: u32,
    /// Slot (sequence id).
    pub slot: i32,
    /// Position the token takes.
    pub pos: i32,
    /// Token id.
    pub token: Token,
    /// True for prompt tokens.
    pub prompt: bool,
    /// log p of the token (NaN for prompt tokens).
    pub logprob: f32,
    /// Entropy of its distribution in nats (NaN for prompt tokens).
    pub entropy: f32,
    /// Top alternatives, most likely first.
    pub top: Vec<TopEntry>,
    /// Raw text bytes.
    pub piece: Vec<u8>,
}

impl TokenOut {
    /// The exact ring record bytes (the C ABI's token layout).
    pub fn to_record(&self) -> Vec<u8> {
        let mut buf = vec![0u8; record::token_len(self.top.len(), self.piece.len())];
        let flags = if self.prompt { ROW_PROMPT } else { 0 };
        let mut h = TokenHeader::event(
            self.step,
            self.slot,
            self.pos,
            self.token,
            flags,
            self.logprob,
            self.entropy,
        );
        h.n_top = self.top.len() as u32;
        h.piece_len = self.piece.len() as u32;
        record::put(&mut buf, 0, &h);
        let mut off = std::mem::size_of::<TokenHeader>();
        for t in &self.top {
            record::put(&mut buf, off, t);
            off += std::mem::size_of::<TopEntry>();
        }
        buf[off..].copy_from_slice(&self.piece);
        buf
    }
}

/// How a job ended, with its counts and timings.
#[derive(Debug, Clone)]
pub struct JobDone {
    /// Why it stopped.
    pub reason: StopReason,
    /// The error, when `reason` is [`StopReason::Error`].
    pub error: Option<Error>,
    /// Prompt tokens evaluated.
    pub n_prompt: usize,
    /// Tokens generated.
    pub n_generated: usize,
    /// Prompt evaluation time, ms (admission to first sampled token).
    pub prompt_ms: f64,
    /// Generation time after the first token, ms.
    pub gen_ms: f64,
    /// Frames delivered to the job.
    pub frames: u64,
}

/// What a job's sink receives, in order: `Started`, then per step the step's
/// frames followed by its token events, then `Done`.
#[derive(Debug)]
pub enum JobEvent {
    /// The job got slot `slot`.
    Started {
        /// Slot (sequence id of its rows).
        slot: usize,
    },
    /// Latent rows of this job.
    Frame(FrameOut),
    /// A prompt token (before the prompt's frames) or a sampled token.
    Token(TokenOut),
    /// The end.
    Done(JobDone),
}

/// Receives a job's events on the router thread. Returning `false` cancels the job
/// (the receiver is gone). Blocking here holds up every job's routing and, once
/// the ring is full, the decode itself: a lossless consumer may use that as
/// backpressure (dataset capture does, through a bounded channel); a server must not.
pub type JobSink = Box<dyn FnMut(JobEvent) -> bool + Send>;

/// Receives subscriber records on the router thread; must not block.
pub trait SubscriberSink: Send {
    /// Offer one record (a complete wire record, see `docs/PROTOCOL.md`);
    /// `droppable` records may be refused when the consumer is behind.
    fn offer(&mut self, rec: Vec<u8>, droppable: bool) -> Offer;

    /// Whether a droppable record of `len` bytes would be taken now. A full
    /// subscriber's frames are then counted as dropped without being built.
    fn has_room(&self, len: usize) -> bool {
        let _ = len;
        true
    }

    /// Whether a subscriber that fell behind has caught up enough (its queue
    /// at most half full) for the engine to capture its tensors again.
    fn drained(&self) -> bool {
        true
    }
}

/// A subscriber as its router holds it (the engine's router, `latent-tap
/// listen`'s hub): the sink, its counters and whether it is still there.
pub(crate) struct Subscriber {
    pub(crate) sink: Box<dyn SubscriberSink>,
    pub(crate) stats: Arc<SubscriberStats>,
    pub(crate) alive: bool,
}

impl Subscriber {
    pub(crate) fn new(sink: Box<dyn SubscriberSink>, stats: Arc<SubscriberStats>) -> Self {
        Self {
            sink,
            stats,
            alive: true,
        }
    }

    /// Offer one record: counted as delivered or (a full queue) dropped; a
    /// closed sink marks the subscriber gone. True when taken.
    pub(crate) fn deliver(&mut self, rec: Vec<u8>, droppable: bool) -> bool {
        if !self.alive {
            return false;
        }
        match self.sink.offer(rec, droppable) {
            Offer::Taken => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                true
            }
            Offer::Full => {
                self.drop_one();
                false
            }
            Offer::Closed => {
                self.alive = false;
                false
            }
        }
    }

    /// Whether a droppable record of `len` bytes would be taken now; when not,
    /// the record counts as dropped (so it need not be built).
    pub(crate) fn take_or_drop(&mut self, len: usize) -> bool {
        let room = self.alive && self.sink.has_room(len);
        if self.alive && !room {
            self.drop_one();
            self.stats.behind.store(true, Ordering::Relaxed);
        }
        room
    }

    /// Clear the `behind` mark once the sink has drained (the engine reads it
    /// before each decode).
    pub(crate) fn catch_up(&self) {
        if self.stats.behind.load(Ordering::Relaxed) && self.sink.drained() {
            self.stats.behind.store(false, Ordering::Relaxed);
        }
    }

    fn drop_one(&self) {
        self.stats.drops.fetch_add(1, Ordering::Relaxed);
    }

    /// Frames dropped so far.
    pub(crate) fn drops(&self) -> u64 {
        self.stats.drops.load(Ordering::Relaxed)
    }
}

/// A subscriber sink's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued.
    Taken,
    /// Queue full: the record was dropped (counted).
    Full,
    /// The subscriber is gone.
    Closed,
}

/// Error of [`Scheduler::submit`](super::Scheduler::submit).
#[derive(Debug)]
pub enum SubmitError {
    /// The wait queue is full.
    Busy,
    /// The engine has stopped.
    Stopped,
    /// The job itself is invalid.
    Invalid(Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_filter_index_of_is_the_position_in_names() {
        let names: Vec<String> = ["l_out-0", "attn_norm-3", "l_out-7", "l_out-0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let f = LatentFilter::new(names, Rows::All, Dtype::F16);
        assert_eq!(
            f.index_of("l_out-0"),
            Some(0),
            "a repeated name keeps its first index"
        );
        assert_eq!(f.index_of("attn_norm-3"), Some(1));
        assert_eq!(f.index_of("l_out-7"), Some(2));
        for miss in ["l_out-1", "l_out", "", "L_OUT-0", "l_out-*"] {
            assert_eq!(f.index_of(miss), None, "{miss:?}");
        }
        let none = LatentFilter::none(Rows::Last, Dtype::F32);
        assert!(none.names.is_empty());
        assert_eq!(none.index_of("l_out-0"), None);
    }
}
