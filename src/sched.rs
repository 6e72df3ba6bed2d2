//! Continuous batching over a fixed number of *slots* (llama.cpp sequence ids)
//! on one tapped context: the serving engine behind `latent-tap serve`, and the
//! piece dataset capture builds on. No HTTP here.
//!
//! Threads: the *engine* thread owns the context and the tap (the ring's
//! producer): it admits jobs into free slots, builds one batch per step from
//! every active slot (a prompt chunk for new jobs, one token for generating
//! ones), decodes, samples and writes token events into the ring right after
//! the step's frames. The *router* thread owns the ring's consumer and turns
//! the ordered stream into per-job events (frames cut down to the job's own
//! rows and tensors, tokens, the end) and into subscriber records.
//!
//! Routing: frames carry each row's sequence id, which is a slot. Which job holds
//! a slot changes over time, so the engine announces every assignment and every
//! finish *in band*: a marker record in the ring (a token record with
//! [`CTRL_FLAG`]) whose payload travels through a side channel in the same
//! order. The router applies it exactly between the frames of the old and the
//! new job. One KV stream (`kv_unified`) keeps llama.cpp's rows in batch order.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::capture::{CaptureMode, ModeReport, Policy, Rows, Tap, TapSettings};
use crate::engine::{Batch, Context, ContextOptions, Model, Sampler, SamplingOptions, Token};
use crate::error::{Error, ErrorKind, Result};
use crate::record::{self, Dtype, FrameHeader, Record, RowMeta, TokenHeader, TopEntry, ROW_PROMPT};
use crate::select::{GraphNode, LayerFilter, Selection};
use crate::stream::Stream;
use crate::tokens::token_stats;

/// Token-record flag that marks an engine → router control message (never
/// leaves the engine's private ring).
pub const CTRL_FLAG: u32 = 1 << 31;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Context settings; `n_seq_max` is set to `n_parallel`.
    pub ctx: ContextOptions,
    /// Slots decoded together.
    pub n_parallel: usize,
    /// Jobs that may wait for a slot; beyond that [`Engine::submit`] answers
    /// [`ErrorKind::Busy`]-like errors (see [`SubmitError`]).
    pub queue: usize,
    /// Capacity of the engine's ring in bytes.
    pub ring_bytes: usize,
    /// Positions one slot may use; `None`: the whole context (slots share the
    /// KV pool, like llama-server's default `-np auto`).
    pub slot_ctx: Option<u32>,
    /// How tensors leave the graph.
    pub capture_mode: CaptureMode,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            ctx: ContextOptions::default(),
            n_parallel: 1,
            queue: 64,
            ring_bytes: crate::settings::DEFAULT_RING_BYTES,
            slot_ctx: None,
            capture_mode: CaptureMode::Auto,
        }
    }
}

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
    set: HashSet<String>,
    /// Rows kept.
    pub rows: Rows,
    /// Element type delivered.
    pub dtype: Dtype,
}

impl LatentFilter {
    /// A filter that selects no tensor (tokens only).
    pub fn none(rows: Rows, dtype: Dtype) -> Self {
        Self {
            names: Vec::new(),
            set: HashSet::new(),
            rows,
            dtype,
        }
    }

    fn index_of(&self, name: &str) -> Option<u32> {
        if !self.set.contains(name) {
            return None;
        }
        self.names.iter().position(|n| n == name).map(|i| i as u32)
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
    /// Latents to deliver with the tokens, compiled by [`Engine::compile`].
    pub latents: Option<LatentFilter>,
    /// Compute each sampled token's log-probability and entropy over the full
    /// vocabulary even when `n_probs` is 0 (one pass over the logits: ~2-3 ms
    /// per token at a 262k vocabulary on 2 cores). Subscribers always get them.
    pub token_stats: bool,
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

/// Error of [`Engine::submit`].
#[derive(Debug)]
pub enum SubmitError {
    /// The wait queue is full.
    Busy,
    /// The engine has stopped.
    Stopped,
    /// The job itself is invalid.
    Invalid(Error),
}

/// Engine-wide counters (for metrics).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Jobs finished.
    pub jobs_done: AtomicU64,
    /// Prompt tokens evaluated.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Total prompt evaluation time, µs.
    pub prompt_us: AtomicU64,
    /// Total generation time, µs.
    pub gen_us: AtomicU64,
    /// Decode calls.
    pub decodes: AtomicU64,
    /// Frames produced by the tap.
    pub frames: AtomicU64,
    /// Frame bytes delivered to jobs and subscribers.
    pub frame_bytes_out: AtomicU64,
    /// Frames dropped by the tap (ring full).
    pub tap_drops: AtomicU64,
    /// Jobs running in slots.
    pub active: AtomicUsize,
    /// Jobs waiting for a slot.
    pub queued: AtomicUsize,
    /// KV cells in use (sum of slot positions).
    pub kv_tokens: AtomicU64,
}

/// What one slot is doing, for `/slots`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SlotInfo {
    /// Slot id.
    pub id: usize,
    /// Job id, when busy.
    pub job: Option<u64>,
    /// Prompt tokens of the job.
    pub n_prompt: usize,
    /// Tokens generated so far.
    pub n_generated: usize,
    /// Most tokens the job may generate.
    pub n_predict: usize,
}

/// One subscriber's counters.
#[derive(Debug, Default)]
pub struct SubscriberStats {
    /// Subscriber id.
    pub id: u64,
    /// Records delivered.
    pub delivered: AtomicU64,
    /// Frames dropped because its queue was full.
    pub drops: AtomicU64,
}

struct Shared {
    stats: EngineStats,
    slots: Mutex<Vec<SlotInfo>>,
    subscribers: Mutex<Vec<Arc<SubscriberStats>>>,
    union_dirty: AtomicBool,
}

enum Msg {
    Job(Box<Queued>),
    Subscribe(Box<SubEntry>),
    Shutdown { cancel: bool },
}

struct Queued {
    id: u64,
    job: Job,
    sink: JobSink,
    cancel: Arc<AtomicBool>,
}

struct SubEntry {
    filter: LatentFilter,
    sink: Box<dyn SubscriberSink>,
    stats: Arc<SubscriberStats>,
}

/// Engine → router messages, one per in-band marker, in the same order.
enum Ctrl {
    Assign {
        slot: usize,
        id: u64,
        n_prompt: usize,
        filter: Option<LatentFilter>,
        sink: JobSink,
        cancel: Arc<AtomicBool>,
    },
    Finish {
        slot: usize,
        done: JobDone,
    },
    /// A new subscriber: it sees everything after this point of the stream.
    Subscribe(Box<SubEntry>),
}

/// A submitted job: its id and a way to cancel it.
#[derive(Debug)]
pub struct JobHandle {
    /// Engine-wide job id.
    pub id: u64,
    cancel: Arc<AtomicBool>,
}

impl JobHandle {
    /// Stop the job after its current step (its sink still gets `Done`).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// A flag shared with the engine; set it to cancel.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }
}

/// The serving engine: a context, its slots, and the two threads.
pub struct Engine {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    graph: Vec<GraphNode>,
    model: Arc<Model>,
    n_ctx: u32,
    n_ctx_slot: u32,
    n_parallel: usize,
    queue: usize,
    next_id: AtomicU64,
    next_sub: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    capture_mode: ModeReport,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("n_parallel", &self.n_parallel)
            .field("n_ctx", &self.n_ctx)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Create the context (probing its graph), arm an empty tap and start the
    /// engine and router threads.
    pub fn start(model: Arc<Model>, opts: &EngineOptions) -> Result<Self> {
        Self::start_sized(model, opts, &|_, _| Ok(opts.ring_bytes))
    }

    /// [`Engine::start`], with the ring's capacity chosen once the graph is
    /// known: `ring_bytes(graph, n_ubatch)` replaces [`EngineOptions::ring_bytes`]
    /// (e.g. a few frames of the tensors a caller will select).
    pub fn start_sized(
        model: Arc<Model>,
        opts: &EngineOptions,
        ring_bytes: &dyn Fn(&[GraphNode], usize) -> Result<usize>,
    ) -> Result<Self> {
        if opts.n_parallel == 0 || opts.n_parallel > 256 {
            return Err(Error::invalid(format!(
                "parallel slots {} out of range 1..=256",
                opts.n_parallel
            )));
        }
        let mut ctx_opts = opts.ctx.clone();
        ctx_opts.n_seq_max = opts.n_parallel as u32;
        let mut ctx = Context::new(model.clone(), &ctx_opts, Some(Box::new(Tap::probe())))?;
        let graph = crate::session::probe_graph_on(&mut ctx)?;
        let sentinel = graph
            .first()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "the probe saw no named graph node"))?
            .ggml_name
            .clone();
        let n_ubatch = ctx.n_ubatch() as usize;
        let ring_bytes = ring_bytes(&graph, n_ubatch)?;
        // The same memory check as every other ring (refuse, rather than be OOM-killed later).
        crate::ring::check_memory(ring_bytes)?;
        let (producer, consumer) = crate::ring::channel(ring_bytes)
            .map_err(|e| Error::invalid(format!("ring capacity {ring_bytes}: {e}")))?;
        let tap = Tap::armed(
            &sentinel,
            Selection::empty(),
            producer,
            TapSettings {
                rows: Rows::All,
                dtype: Dtype::F32,
                policy: Policy::Block {
                    timeout: Duration::from_secs(60),
                },
                n_ubatch,
                mode: opts.capture_mode,
            },
        )?;
        let capture_mode = tap.mode();
        ctx.replace_tap(tap)?;
        let n_ctx = ctx.n_ctx();
        let n_ctx_slot = opts.slot_ctx.map_or(n_ctx, |c| c.min(n_ctx)).max(1);
        let shared = Arc::new(Shared {
            stats: EngineStats::default(),
            slots: Mutex::new(
                (0..opts.n_parallel)
                    .map(|id| SlotInfo {
                        id,
                        ..SlotInfo::default()
                    })
                    .collect(),
            ),
            subscribers: Mutex::new(Vec::new()),
            union_dirty: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel::<Msg>();
        let (ctrl_tx, ctrl_rx) = mpsc::channel::<Ctrl>();
        let stream = crate::stream::Stream::new(consumer);
        let router = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("latent-tap-router".into())
                .spawn(move || Router::new(shared, ctrl_rx).run(stream))
                .map_err(|e| Error::new(ErrorKind::Internal, format!("spawn router: {e}")))?
        };
        let worker = {
            let shared = shared.clone();
            let graph = graph.clone();
            let n_parallel = opts.n_parallel;
            std::thread::Builder::new()
                .name("latent-tap-engine".into())
                .spawn(move || {
                    let mut w = Worker::new(ctx, graph, shared, ctrl_tx, n_parallel, n_ctx_slot);
                    w.run(rx);
                })
                .map_err(|e| Error::new(ErrorKind::Internal, format!("spawn engine: {e}")))?
        };
        Ok(Self {
            tx,
            shared,
            graph,
            model,
            n_ctx,
            n_ctx_slot,
            n_parallel: opts.n_parallel,
            queue: opts.queue,
            next_id: AtomicU64::new(1),
            next_sub: AtomicU64::new(1),
            threads: Mutex::new(vec![worker, router]),
            capture_mode,
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The capture mode asked for and in effect for the engine's tap.
    pub fn capture_mode(&self) -> ModeReport {
        self.capture_mode
    }

    /// Every node of the graph (from the probe).
    pub fn graph(&self) -> &[GraphNode] {
        &self.graph
    }

    /// Context size in effect (all slots).
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    /// Positions available to one slot.
    pub fn n_ctx_slot(&self) -> u32 {
        self.n_ctx_slot
    }

    /// Number of slots.
    pub fn n_parallel(&self) -> usize {
        self.n_parallel
    }

    /// Counters.
    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    /// What each slot is doing.
    pub fn slots(&self) -> Vec<SlotInfo> {
        self.shared
            .slots
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Subscribers' counters.
    pub fn subscribers(&self) -> Vec<Arc<SubscriberStats>> {
        self.shared
            .subscribers
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Compile a latent request against the graph (errors list close names).
    pub fn compile(&self, req: &LatentRequest) -> Result<LatentFilter> {
        let sel = Selection::compile(&req.patterns, req.layers.as_ref(), &self.graph)?;
        let names: Vec<String> = sel.tensors().iter().map(|t| t.name.clone()).collect();
        Ok(LatentFilter {
            set: names.iter().cloned().collect(),
            names,
            rows: req.rows,
            dtype: req.dtype,
        })
    }

    /// Queue a job. Its events go to `sink` on the router thread.
    pub fn submit(&self, job: Job, sink: JobSink) -> std::result::Result<JobHandle, SubmitError> {
        if job.prompt.is_empty() {
            return Err(SubmitError::Invalid(Error::invalid("empty prompt")));
        }
        let n_vocab = self.model.n_vocab() as i64;
        if let Some(t) = job.prompt.iter().find(|&&t| t < 0 || t as i64 >= n_vocab) {
            return Err(SubmitError::Invalid(Error::invalid(format!(
                "token id {t} is out of range 0..{n_vocab}"
            ))));
        }
        if job.prompt.len() >= self.n_ctx_slot as usize {
            return Err(SubmitError::Invalid(Error::new(
                ErrorKind::PromptTooLong,
                format!(
                    "the prompt has {} tokens but a slot holds {} positions (context {}, {} slots)",
                    job.prompt.len(),
                    self.n_ctx_slot,
                    self.n_ctx,
                    self.n_parallel
                ),
            )));
        }
        let st = &self.shared.stats;
        let waiting = st.queued.load(Ordering::Relaxed);
        let active = st.active.load(Ordering::Relaxed);
        if waiting >= self.queue && active + waiting >= self.n_parallel {
            return Err(SubmitError::Busy);
        }
        st.queued.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        let q = Queued {
            id,
            job,
            sink,
            cancel: cancel.clone(),
        };
        if self.tx.send(Msg::Job(Box::new(q))).is_err() {
            st.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::Stopped);
        }
        Ok(JobHandle { id, cancel })
    }

    /// Observe every job's latents (per `filter`) and tokens. Returns the
    /// subscriber's counters; it stays until its sink answers [`Offer::Closed`].
    pub fn subscribe(
        &self,
        filter: LatentFilter,
        sink: Box<dyn SubscriberSink>,
    ) -> Result<Arc<SubscriberStats>> {
        let stats = Arc::new(SubscriberStats {
            id: self.next_sub.fetch_add(1, Ordering::Relaxed),
            ..SubscriberStats::default()
        });
        self.tx
            .send(Msg::Subscribe(Box::new(SubEntry {
                filter,
                sink,
                stats: stats.clone(),
            })))
            .map_err(|_| Error::new(ErrorKind::Internal, "the engine has stopped"))?;
        Ok(stats)
    }

    /// Stop: with `cancel`, running and queued jobs are cancelled; otherwise
    /// queued jobs are refused and running ones finish. Joins the threads.
    pub fn shutdown(&self, cancel: bool) {
        self.begin_shutdown(cancel);
        self.join();
    }

    /// Ask the engine to stop (see [`Engine::shutdown`]) without waiting; may be
    /// called again with `cancel` set to cut running jobs short.
    pub fn begin_shutdown(&self, cancel: bool) {
        let _ = self.tx.send(Msg::Shutdown { cancel });
    }

    /// Wait for the engine and router threads to end.
    pub fn join(&self) {
        if let Ok(mut t) = self.threads.lock() {
            for h in t.drain(..) {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(true);
    }
}

// ---------------------------------------------------------------- engine thread

struct Active {
    job: Job,
    cancel: Arc<AtomicBool>,
    sampler: Sampler,
    /// Prompt tokens already in a batch.
    fed: usize,
    /// Next token to decode (after the prompt).
    next: Option<Token>,
    /// Next position.
    pos: i32,
    generated: usize,
    started: Instant,
    first_token: Option<Instant>,
    /// Batch index of this slot's output row in the current decode.
    out_index: Option<i32>,
    /// The row decoded this step was the prompt's last.
    step: u32,
}

struct Worker {
    ctx: Context,
    graph: Vec<GraphNode>,
    shared: Arc<Shared>,
    ctrl: Sender<Ctrl>,
    slots: Vec<Option<Active>>,
    pending: VecDeque<Box<Queued>>,
    sub_filters: Vec<(Arc<SubscriberStats>, LatentFilter)>,
    batch: Batch,
    rows: Vec<RowMeta>,
    outputs: Vec<bool>,
    n_ctx_slot: u32,
    decodes: u32,
    union: Vec<String>,
    stopping: bool,
}

impl Worker {
    fn new(
        ctx: Context,
        graph: Vec<GraphNode>,
        shared: Arc<Shared>,
        ctrl: Sender<Ctrl>,
        n_parallel: usize,
        n_ctx_slot: u32,
    ) -> Self {
        let n_batch = ctx.n_batch() as usize;
        Self {
            ctx,
            graph,
            shared,
            ctrl,
            slots: (0..n_parallel).map(|_| None).collect(),
            pending: VecDeque::new(),
            sub_filters: Vec::new(),
            batch: Batch::new(n_batch),
            rows: Vec::with_capacity(n_batch),
            outputs: Vec::with_capacity(n_batch),
            n_ctx_slot,
            decodes: 0,
            union: Vec::new(),
            stopping: false,
        }
    }

    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            let idle = self.slots.iter().all(Option::is_none) && self.pending.is_empty();
            if idle && self.stopping {
                break;
            }
            // Block only when there is nothing to decode.
            let first = if idle {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.stopping = true;
                        None
                    }
                }
            } else {
                None
            };
            for m in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                self.on_msg(m);
            }
            self.prune_subscribers();
            self.admit();
            self.reap_cancelled();
            if self.slots.iter().all(Option::is_none) {
                continue;
            }
            if let Err(e) = self.sync_selection() {
                self.fail_all(e);
                continue;
            }
            self.step();
        }
        // Closing the ring (dropping the context and its tap) ends the router.
    }

    fn on_msg(&mut self, m: Msg) {
        // A job that never got a slot because the engine is stopping.
        let refuse_shutting_down = |q: Box<Queued>| {
            let mut sink = q.sink;
            sink(JobEvent::Done(JobDone {
                reason: StopReason::Cancelled,
                error: Some(Error::new(
                    ErrorKind::Internal,
                    "the server is shutting down",
                )),
                n_prompt: 0,
                n_generated: 0,
                prompt_ms: 0.0,
                gen_ms: 0.0,
                frames: 0,
            }));
        };
        match m {
            Msg::Job(q) => {
                if self.stopping {
                    self.shared.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    refuse_shutting_down(q);
                } else {
                    self.pending.push_back(q);
                }
            }
            Msg::Subscribe(s) => {
                if let Ok(mut v) = self.shared.subscribers.lock() {
                    v.push(s.stats.clone());
                }
                self.sub_filters.push((s.stats.clone(), s.filter.clone()));
                let _ = self.announce(Ctrl::Subscribe(s), 0);
            }
            Msg::Shutdown { cancel } => {
                self.stopping = true;
                let queued: Vec<_> = self.pending.drain(..).collect();
                for q in queued {
                    self.shared.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    refuse_shutting_down(q);
                }
                if cancel {
                    for a in self.slots.iter().flatten() {
                        a.cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    fn prune_subscribers(&mut self) {
        if self.shared.union_dirty.swap(false, Ordering::Relaxed) {
            let live: Vec<u64> = self
                .shared
                .subscribers
                .lock()
                .map(|v| v.iter().map(|s| s.id).collect())
                .unwrap_or_default();
            self.sub_filters.retain(|(s, _)| live.contains(&s.id));
        }
    }

    /// Put waiting jobs into free slots: announce each, then its prompt tokens.
    fn admit(&mut self) {
        while let Some(free) = self.slots.iter().position(Option::is_none) {
            let Some(q) = self.pending.pop_front() else {
                break;
            };
            let Queued {
                id,
                job,
                sink,
                cancel,
            } = *q;
            self.shared.stats.queued.fetch_sub(1, Ordering::Relaxed);
            self.shared.stats.active.fetch_add(1, Ordering::Relaxed);
            self.ctx.seq_rm(free as i32);
            let ctrl = Ctrl::Assign {
                slot: free,
                id,
                n_prompt: job.prompt.len(),
                filter: job.latents.clone(),
                sink,
                cancel: cancel.clone(),
            };
            if let Ok(mut s) = self.shared.slots.lock() {
                s[free] = SlotInfo {
                    id: free,
                    job: Some(id),
                    n_prompt: job.prompt.len(),
                    n_generated: 0,
                    n_predict: job.n_predict,
                };
            }
            let sampler = Sampler::new(&job.sampling);
            let mut a = Active {
                job,
                cancel,
                sampler,
                fed: 0,
                next: None,
                pos: 0,
                generated: 0,
                started: Instant::now(),
                first_token: None,
                out_index: None,
                step: 0,
            };
            if let Err(e) = self.announce(ctrl, free) {
                self.slots[free] = Some(a);
                self.finish(free, StopReason::Error, Some(e));
                continue;
            }
            let model = self.ctx.model().clone();
            let mut err = None;
            for (i, &t) in a.job.prompt.iter().enumerate() {
                let h =
                    TokenHeader::event(0, free as i32, i as i32, t, ROW_PROMPT, f32::NAN, f32::NAN);
                if let Err(e) = self.push_token(h, &[], &model.token_bytes(t)) {
                    err = Some(e);
                    break;
                }
            }
            a.started = Instant::now();
            self.slots[free] = Some(a);
            if let Some(e) = err {
                self.finish(free, StopReason::Error, Some(e));
            }
        }
    }

    fn reap_cancelled(&mut self) {
        for s in 0..self.slots.len() {
            if self.slots[s]
                .as_ref()
                .is_some_and(|a| a.cancel.load(Ordering::Relaxed))
            {
                self.finish(s, StopReason::Cancelled, None);
            }
        }
    }

    /// Keep the tap's selection equal to the union of what active jobs and
    /// subscribers want (nothing wanted: the graph is not split at all).
    fn sync_selection(&mut self) -> Result<()> {
        let mut want: HashSet<&str> = HashSet::new();
        for a in self.slots.iter().flatten() {
            if let Some(f) = &a.job.latents {
                want.extend(f.names.iter().map(String::as_str));
            }
        }
        for (_, f) in &self.sub_filters {
            want.extend(f.names.iter().map(String::as_str));
        }
        let union: Vec<String> = self
            .graph
            .iter()
            .filter(|n| want.contains(n.name.as_str()))
            .map(|n| n.name.clone())
            .collect();
        if union == self.union {
            return Ok(());
        }
        let sel = if union.is_empty() {
            Selection::empty()
        } else {
            // Display names contain no glob characters, so each matches only itself.
            Selection::compile(&union, None, &self.graph)?
        };
        self.tap()?.reselect(sel)?;
        self.union = union;
        Ok(())
    }

    fn tap(&mut self) -> Result<&mut Tap> {
        self.ctx
            .tap_mut()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "context has no tap"))
    }

    fn push_token(&mut self, h: TokenHeader, top: &[TopEntry], piece: &[u8]) -> Result<()> {
        self.tap()?.push_token(h, top, piece)
    }

    /// Send a control message and its in-band marker (message first: the
    /// router reads it only after it sees the marker).
    fn announce(&mut self, c: Ctrl, slot: usize) -> Result<()> {
        self.ctrl
            .send(c)
            .map_err(|_| Error::new(ErrorKind::Internal, "router stopped"))?;
        let h = TokenHeader::event(0, slot as i32, -1, -1, CTRL_FLAG, f32::NAN, f32::NAN);
        self.push_token(h, &[], &[])
    }

    fn finish(&mut self, slot: usize, reason: StopReason, error: Option<Error>) {
        let Some(a) = self.slots[slot].take() else {
            return;
        };
        let now = Instant::now();
        let prompt_ms = a
            .first_token
            .map_or(now - a.started, |t| t - a.started)
            .as_secs_f64()
            * 1e3;
        let gen_ms = a.first_token.map_or(0.0, |t| (now - t).as_secs_f64() * 1e3);
        let st = &self.shared.stats;
        st.active.fetch_sub(1, Ordering::Relaxed);
        st.jobs_done.fetch_add(1, Ordering::Relaxed);
        st.prompt_tokens.fetch_add(a.fed as u64, Ordering::Relaxed);
        st.generated_tokens
            .fetch_add(a.generated as u64, Ordering::Relaxed);
        st.prompt_us
            .fetch_add((prompt_ms * 1e3) as u64, Ordering::Relaxed);
        st.gen_us
            .fetch_add((gen_ms * 1e3) as u64, Ordering::Relaxed);
        self.ctx.seq_rm(slot as i32);
        if let Ok(mut s) = self.shared.slots.lock() {
            s[slot] = SlotInfo {
                id: slot,
                ..SlotInfo::default()
            };
        }
        let done = JobDone {
            reason,
            error,
            n_prompt: a.job.prompt.len(),
            n_generated: a.generated,
            prompt_ms,
            gen_ms,
            frames: 0,
        };
        // If the ring is gone there is nobody to tell.
        let _ = self.announce(Ctrl::Finish { slot, done }, slot);
    }

    fn fail_all(&mut self, e: Error) {
        for s in 0..self.slots.len() {
            if self.slots[s].is_some() {
                self.finish(s, StopReason::Error, Some(e.clone()));
            }
        }
    }

    /// One decode over every active slot.
    fn step(&mut self) {
        let n_batch = self.ctx.n_batch() as usize;
        self.batch.clear();
        self.rows.clear();
        self.outputs.clear();
        // Generating slots first (one token each), then prompt chunks.
        for (s, slot) in self.slots.iter_mut().enumerate() {
            let Some(a) = slot else { continue };
            a.out_index = None;
            if let Some(tok) = a.next {
                if self.batch.len() >= n_batch {
                    continue;
                }
                a.out_index = Some(self.batch.len() as i32);
                self.batch.push(tok, a.pos, s as i32, true);
                self.rows.push(RowMeta {
                    seq_id: s as i32,
                    pos: a.pos,
                    token: tok,
                    flags: 0,
                });
                self.outputs.push(true);
            }
        }
        for (s, slot) in self.slots.iter_mut().enumerate() {
            let Some(a) = slot else { continue };
            if a.next.is_some() || a.fed >= a.job.prompt.len() {
                continue;
            }
            while a.fed < a.job.prompt.len() && self.batch.len() < n_batch {
                let i = a.fed;
                let last = i + 1 == a.job.prompt.len();
                let t = a.job.prompt[i];
                if last {
                    a.out_index = Some(self.batch.len() as i32);
                }
                self.batch.push(t, i as i32, s as i32, last);
                self.rows.push(RowMeta {
                    seq_id: s as i32,
                    pos: i as i32,
                    token: t,
                    flags: ROW_PROMPT,
                });
                self.outputs.push(last);
                a.fed += 1;
            }
        }
        if self.batch.is_empty() {
            return;
        }
        let step = self.decodes;
        self.decodes = self.decodes.wrapping_add(1);
        let n_ubatch = self.ctx.n_ubatch() as usize;
        let (rows, outputs) = (
            std::mem::take(&mut self.rows),
            std::mem::take(&mut self.outputs),
        );
        let r = self
            .tap()
            .map(|t| t.begin_decode(step, 0, n_ubatch, &rows, &outputs));
        (self.rows, self.outputs) = (rows, outputs);
        let r = r.and_then(|()| self.ctx.decode(&self.batch));
        self.shared.stats.decodes.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = self.ctx.tap() {
            let c = t.counters();
            self.shared.stats.frames.store(c.frames, Ordering::Relaxed);
            self.shared
                .stats
                .tap_drops
                .store(c.drops, Ordering::Relaxed);
        }
        if let Err(e) = r {
            // Every job in this batch failed; their KV cells are freed by finish.
            let in_batch: Vec<usize> = self.rows.iter().map(|r| r.seq_id as usize).collect();
            for s in 0..self.slots.len() {
                if in_batch.contains(&s) {
                    self.finish(s, StopReason::Error, Some(e.clone()));
                }
            }
            return;
        }
        let model = self.ctx.model().clone();
        let mut kv = 0u64;
        for s in 0..self.slots.len() {
            let Some(i) = self.slots[s].as_ref().and_then(|a| a.out_index) else {
                if let Some(a) = &self.slots[s] {
                    kv += a.fed as u64;
                }
                continue;
            };
            let a = self.slots[s].as_mut().expect("slot checked above");
            if a.next.is_some() {
                a.pos += 1;
            } else {
                a.pos = a.job.prompt.len() as i32;
            }
            kv += a.pos as u64;
            if a.job.n_predict == 0 {
                self.finish(s, StopReason::Limit, None);
                continue;
            }
            let tok = self.ctx.sample(&mut a.sampler, i);
            let Ok(logits) = self.ctx.logits_ith(i) else {
                self.finish(
                    s,
                    StopReason::Error,
                    Some(Error::new(
                        ErrorKind::Internal,
                        "no logits for an output row",
                    )),
                );
                continue;
            };
            let want_stats = a.job.n_probs > 0 || a.job.token_stats || !self.sub_filters.is_empty();
            let st = if want_stats {
                token_stats(logits, tok, a.job.n_probs)
            } else {
                crate::tokens::TokenStats {
                    logprob: f32::NAN,
                    entropy: f32::NAN,
                    top: Vec::new(),
                }
            };
            let a = self.slots[s].as_mut().expect("slot checked above");
            if a.first_token.is_none() {
                a.first_token = Some(Instant::now());
            }
            let step = a.step;
            a.step += 1;
            a.generated += 1;
            a.next = Some(tok);
            let pos = a.pos;
            let eog = model.is_eog(tok) && !a.job.ignore_eos;
            let limit = a.generated >= a.job.n_predict || a.pos as u32 + 1 >= self.n_ctx_slot;
            let n_generated = a.generated;
            let h = TokenHeader::event(step, s as i32, pos, tok, 0, st.logprob, st.entropy);
            if let Ok(mut si) = self.shared.slots.lock() {
                si[s].n_generated = n_generated;
            }
            if let Err(e) = self.push_token(h, &st.top, &model.token_bytes(tok)) {
                self.finish(s, StopReason::Error, Some(e));
                continue;
            }
            if eog {
                self.finish(s, StopReason::Eos, None);
            } else if limit {
                self.finish(s, StopReason::Limit, None);
            }
        }
        self.shared.stats.kv_tokens.store(kv, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------- router thread

struct Route {
    id: u64,
    n_prompt: usize,
    filter: Option<LatentFilter>,
    sink: JobSink,
    cancel: Arc<AtomicBool>,
    frames: u64,
    alive: bool,
}

struct Sub {
    filter: LatentFilter,
    sink: Box<dyn SubscriberSink>,
    stats: Arc<SubscriberStats>,
    frames: u64,
    alive: bool,
}

/// Wire record kind of a subscriber's request notice (see docs/PROTOCOL.md).
pub const KIND_REQUEST: u32 = 4;

/// A request notice: sent to subscribers when a request takes a slot and when it ends.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestRecord {
    /// [`KIND_REQUEST`].
    pub kind: u32,
    /// `size_of::<RequestRecord>()` (40).
    pub header_size: u32,
    /// Request id.
    pub request_id: u64,
    /// Slot (the `seq_id` of its rows and tokens).
    pub seq_id: i32,
    /// 1: begins, 2: ends.
    pub event: u32,
    /// Frames this subscriber has dropped so far (all requests).
    pub dropped: u64,
    /// Prompt tokens (begin) or tokens generated (end).
    pub n_tokens: u64,
}

const _: () = assert!(std::mem::size_of::<RequestRecord>() == 40);

impl RequestRecord {
    /// Encode.
    pub fn to_record(&self) -> Vec<u8> {
        let mut b = vec![0u8; std::mem::size_of::<Self>()];
        record::put(&mut b, 0, self);
        b
    }
}

struct Router {
    shared: Arc<Shared>,
    ctrl: Receiver<Ctrl>,
    routes: Vec<Option<Route>>,
    subs: Vec<Sub>,
}

impl Router {
    fn new(shared: Arc<Shared>, ctrl: Receiver<Ctrl>) -> Self {
        let n = shared.slots.lock().map(|s| s.len()).unwrap_or(0);
        Self {
            shared,
            ctrl,
            routes: (0..n).map(|_| None).collect(),
            subs: Vec::new(),
        }
    }

    fn run(mut self, mut stream: Stream) {
        loop {
            if stream.is_finished() {
                break;
            }
            let Ok(Some(item)) = stream.next(Duration::from_millis(20)) else {
                continue;
            };
            let Ok(rec) = item.record() else { continue };
            match rec {
                Record::Frame(f) => self.on_frame(&f),
                Record::Token(t) if t.header.flags & CTRL_FLAG != 0 => {
                    drop(item);
                    match self.ctrl.recv() {
                        Ok(c) => self.on_ctrl(c),
                        Err(_) => break,
                    }
                    continue;
                }
                Record::Token(t) => {
                    let out = TokenOut {
                        step: t.header.step,
                        slot: t.header.seq_id,
                        pos: t.header.pos,
                        token: t.header.token,
                        prompt: t.is_prompt(),
                        logprob: t.header.logprob,
                        entropy: t.header.entropy,
                        top: t.top.to_vec(),
                        piece: t.piece.to_vec(),
                    };
                    self.on_token(out);
                }
                Record::End(_) => {}
            }
            self.prune();
        }
        // The engine is gone: anything still routed ends now.
        for r in self.routes.iter_mut().filter_map(Option::take) {
            let mut sink = r.sink;
            sink(JobEvent::Done(JobDone {
                reason: StopReason::Error,
                error: Some(Error::new(ErrorKind::Internal, "the engine stopped")),
                n_prompt: r.n_prompt,
                n_generated: 0,
                prompt_ms: 0.0,
                gen_ms: 0.0,
                frames: r.frames,
            }));
        }
    }

    fn prune(&mut self) {
        let before = self.subs.len();
        self.subs.retain(|s| s.alive);
        if self.subs.len() != before {
            let live: Vec<u64> = self.subs.iter().map(|s| s.stats.id).collect();
            if let Ok(mut v) = self.shared.subscribers.lock() {
                v.retain(|s| live.contains(&s.id));
            }
            self.shared.union_dirty.store(true, Ordering::Relaxed);
        }
    }

    fn on_ctrl(&mut self, c: Ctrl) {
        match c {
            Ctrl::Assign {
                slot,
                id,
                n_prompt,
                filter,
                mut sink,
                cancel,
            } => {
                let alive = sink(JobEvent::Started { slot });
                if !alive {
                    cancel.store(true, Ordering::Relaxed);
                }
                self.notify_subs(id, slot, 1, n_prompt as u64);
                self.routes[slot] = Some(Route {
                    id,
                    n_prompt,
                    filter,
                    sink,
                    cancel,
                    frames: 0,
                    alive,
                });
            }
            Ctrl::Subscribe(s) => self.subs.push(Sub {
                filter: s.filter,
                sink: s.sink,
                stats: s.stats,
                frames: 0,
                alive: true,
            }),
            Ctrl::Finish { slot, mut done } => {
                if let Some(mut r) = self.routes[slot].take() {
                    done.frames = r.frames;
                    self.notify_subs(r.id, slot, 2, done.n_generated as u64);
                    if r.alive {
                        (r.sink)(JobEvent::Done(done));
                    }
                }
            }
        }
    }

    fn notify_subs(&mut self, id: u64, slot: usize, event: u32, n_tokens: u64) {
        for s in &mut self.subs {
            let rec = RequestRecord {
                kind: KIND_REQUEST,
                header_size: std::mem::size_of::<RequestRecord>() as u32,
                request_id: id,
                seq_id: slot as i32,
                event,
                dropped: s.stats.drops.load(Ordering::Relaxed),
                n_tokens,
            };
            deliver(s, rec.to_record(), false);
        }
    }

    fn on_token(&mut self, t: TokenOut) {
        let slot = t.slot as usize;
        if !self.subs.is_empty() {
            let rec = t.to_record();
            for s in &mut self.subs {
                deliver(s, rec.clone(), false);
            }
        }
        if let Some(r) = self.routes.get_mut(slot).and_then(Option::as_mut) {
            if r.alive && !(r.sink)(JobEvent::Token(t)) {
                r.alive = false;
                r.cancel.store(true, Ordering::Relaxed);
            }
        }
    }

    fn on_frame(&mut self, f: &record::FrameView<'_>) {
        let name = f.name();
        let stats = &self.shared.stats;
        // Rows of one slot are contiguous in a frame (the batch lists each slot's rows together).
        let mut i = 0;
        while i < f.rows.len() {
            let slot = f.rows[i].seq_id;
            let mut j = i;
            while j < f.rows.len() && f.rows[j].seq_id == slot {
                j += 1;
            }
            let (lo, hi) = (i, j);
            i = j;
            let Some(route) = usize::try_from(slot)
                .ok()
                .and_then(|s| self.routes.get_mut(s))
                .and_then(Option::as_mut)
            else {
                continue;
            };
            let want_job = if route.alive {
                route
                    .filter
                    .as_ref()
                    .and_then(|flt| flt.index_of(name).map(|ix| (ix, flt.rows, flt.dtype)))
            } else {
                None
            };
            let n_prompt = route.n_prompt;
            if let Some((ix, rows, dtype)) = want_job {
                if let Some(out) = cut(f, lo, hi, n_prompt, ix, rows, dtype, route.frames) {
                    route.frames += 1;
                    stats
                        .frame_bytes_out
                        .fetch_add(out.data.len() as u64, Ordering::Relaxed);
                    if !(route.sink)(JobEvent::Frame(out)) {
                        route.alive = false;
                        route.cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
            for s in &mut self.subs {
                let Some(ix) = s.filter.index_of(name) else {
                    continue;
                };
                // Behind already: count the drop without copying the rows.
                let most = record::frame_len(hi - lo, f.header.width as usize, s.filter.dtype);
                if s.alive && !s.sink.has_room(most) {
                    s.frames += 1;
                    s.stats.drops.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some(out) = cut(
                    f,
                    lo,
                    hi,
                    n_prompt,
                    ix,
                    s.filter.rows,
                    s.filter.dtype,
                    s.frames,
                ) {
                    s.frames += 1;
                    let n = out.data.len() as u64;
                    if deliver(s, out.to_record(), true) {
                        stats.frame_bytes_out.fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

fn deliver(s: &mut Sub, rec: Vec<u8>, droppable: bool) -> bool {
    if !s.alive {
        return false;
    }
    match s.sink.offer(rec, droppable) {
        Offer::Taken => {
            s.stats.delivered.fetch_add(1, Ordering::Relaxed);
            true
        }
        Offer::Full => {
            s.stats.drops.fetch_add(1, Ordering::Relaxed);
            false
        }
        Offer::Closed => {
            s.alive = false;
            false
        }
    }
}

/// Rows `lo..hi` of `f` (one slot's) as a frame of their own, with the job's step,
/// the consumer's tensor index and dtype; `None` when `rows` keeps none of them.
#[allow(clippy::too_many_arguments)]
fn cut(
    f: &record::FrameView<'_>,
    lo: usize,
    hi: usize,
    n_prompt: usize,
    tensor_index: u32,
    rows: Rows,
    dtype: Dtype,
    seq: u64,
) -> Option<FrameOut> {
    let keep: Vec<usize> = (lo..hi)
        .filter(|&r| {
            rows == Rows::All
                || f.rows[r].flags & ROW_PROMPT == 0
                || f.rows[r].pos as usize + 1 == n_prompt
        })
        .collect();
    if keep.is_empty() || f.header.width == 0 {
        return None;
    }
    let width = f.header.width as usize;
    let src_dt = f.dtype();
    let mut data = vec![0u8; keep.len() * width * dtype.size()];
    let mut f32buf = Vec::new();
    for (k, &r) in keep.iter().enumerate() {
        let src = f.row_bytes(r);
        let dst = &mut data[k * width * dtype.size()..(k + 1) * width * dtype.size()];
        if src_dt == dtype {
            dst.copy_from_slice(src);
        } else {
            f32buf.resize(width * 4, 0);
            crate::capture::convert_to_f32(src, src_dt, &mut f32buf);
            crate::capture::convert_from_f32(&f32buf, dtype, dst);
        }
    }
    let first = &f.rows[keep[0]];
    // Job step: 0 for prompt rows (and the decode that samples the first token),
    // k for the decode of the k-th generated token.
    let step = if first.flags & ROW_PROMPT != 0 {
        0
    } else {
        (first.pos as i64 - n_prompt as i64 + 1).max(0) as u32
    };
    let header = FrameHeader {
        seq,
        step,
        tensor_index,
        dtype: dtype as u32,
        n_rows: keep.len() as u32,
        ..*f.header
    };
    Some(FrameOut {
        header,
        rows: keep.iter().map(|&r| f.rows[r]).collect(),
        data,
    })
}
