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
//!
//! Files: [`Scheduler`] and its shared state here; what jobs ask for and get back
//! in `job.rs`; the engine thread in `worker.rs`; the router thread in
//! `router.rs`; the subscribers' request notice is [`crate::record::RequestRecord`].

mod job;
mod router;
mod worker;

pub use job::{
    FrameOut, Job, JobDone, JobEvent, JobSink, LatentFilter, LatentRequest, Offer, StopReason,
    SubmitError, SubscriberSink, TokenOut,
};
/// Wire record kind of a subscriber's request notice ([`crate::record::kind::REQUEST`]).
pub const KIND_REQUEST: u32 = crate::record::kind::REQUEST;
pub use crate::record::RequestRecord;
pub(crate) use job::Subscriber;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::capture::{self, Arming, CaptureMode, ModeReport, Policy, Rows, TapSettings};
use crate::engine::{ContextOptions, Model};
use crate::error::{Error, ErrorKind, Result};
use crate::record::Dtype;
use crate::select::GraphNode;
use router::Router;
use worker::Worker;

/// Token-record flag that marks an engine → router control message (never
/// leaves the engine's private ring).
pub const CTRL_FLAG: u32 = 1 << 31;

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Context settings; `n_seq_max` is set to `n_parallel`.
    pub ctx: ContextOptions,
    /// Slots decoded together.
    pub n_parallel: usize,
    /// Jobs that may wait for a slot; beyond that [`Scheduler::submit`] answers
    /// [`SubmitError::Busy`].
    pub queue: usize,
    /// Capacity of the engine's ring in bytes.
    pub ring_bytes: usize,
    /// Positions one slot may use; `None`: the whole context (slots share the
    /// KV pool, like llama-server's default `-np auto`).
    pub slot_ctx: Option<u32>,
    /// How tensors leave the graph.
    pub capture_mode: CaptureMode,
    /// llama.cpp's own control vector on the whole context (serve's
    /// `--control-vector`, summed and scaled), applied to the layers
    /// `start..=end` when given: every request is steered by it.
    pub control_vector: Option<ContextVector>,
}

/// A control vector for the whole context and the layers (`start..=end`) it
/// is applied to (`None`: the layers it has).
pub type ContextVector = (crate::steer::ControlVector, Option<(i32, i32)>);

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            ctx: ContextOptions::default(),
            n_parallel: 1,
            queue: 64,
            ring_bytes: crate::settings::DEFAULT_RING_BYTES,
            slot_ctx: None,
            capture_mode: CaptureMode::Auto,
            control_vector: None,
        }
    }
}

/// Scheduler-wide counters (for metrics).
#[derive(Debug, Default)]
pub struct SchedulerStats {
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
    /// Frames dropped because its queue was full (by the router, or not
    /// captured at all while it was behind).
    pub drops: AtomicU64,
    /// Its queue was full at its last frame and has not drained to half since:
    /// the engine then stops capturing tensors only it wants (see
    /// [`SubscriberSink::drained`]), so a subscriber that does not read costs the
    /// decode nothing.
    pub behind: AtomicBool,
}

struct Shared {
    stats: SchedulerStats,
    slots: Mutex<Vec<SlotInfo>>,
    subscribers: Mutex<Vec<Arc<SubscriberStats>>>,
    union_dirty: AtomicBool,
}

impl Shared {
    fn new(n_slots: usize) -> Self {
        Shared {
            stats: SchedulerStats::default(),
            slots: Mutex::new(
                (0..n_slots)
                    .map(|id| SlotInfo {
                        id,
                        ..SlotInfo::default()
                    })
                    .collect(),
            ),
            subscribers: Mutex::new(Vec::new()),
            union_dirty: AtomicBool::new(false),
        }
    }
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

/// Scheduler → router messages, one per in-band marker, in the same order.
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
    /// Scheduler-wide job id.
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
pub struct Scheduler {
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    graph: Vec<GraphNode>,
    /// Rows of a graph compute and the ring's largest record: what a selected
    /// frame must fit ([`Scheduler::compile`]).
    n_ubatch: usize,
    max_record: usize,
    /// [`Model::max_token_text_bytes`], found once.
    max_token_bytes: Option<usize>,
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

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("n_parallel", &self.n_parallel)
            .field("n_ctx", &self.n_ctx)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// Create the context (probing its graph), arm an empty tap and start the
    /// engine and router threads.
    pub fn start(model: Arc<Model>, opts: &SchedulerOptions) -> Result<Self> {
        Self::start_sized(model, opts, &|_, _| Ok(opts.ring_bytes))
    }

    /// [`Scheduler::start`], with the ring's capacity chosen once the graph is
    /// known: `ring_bytes(graph, n_ubatch)` replaces [`SchedulerOptions::ring_bytes`]
    /// (e.g. a few frames of the tensors a caller will select).
    pub fn start_sized(
        model: Arc<Model>,
        opts: &SchedulerOptions,
        ring_bytes: &dyn Fn(&[GraphNode], usize) -> Result<usize>,
    ) -> Result<Self> {
        let max = crate::settings::MAX_SEQ as usize;
        if opts.n_parallel == 0 || opts.n_parallel > max {
            return Err(Error::invalid(format!(
                "parallel slots {} out of range 1..={max}",
                opts.n_parallel
            )));
        }
        let mut ctx_opts = opts.ctx.clone();
        ctx_opts.n_seq_max = opts.n_parallel as u32;
        let (mut ctx, graph) = crate::engine::probe_context(model.clone(), &ctx_opts)?;
        if let Some((v, layers)) = &opts.control_vector {
            ctx.set_control_vector_in(Some((v, 1.0)), *layers)?;
        }
        let n_ubatch = ctx.n_ubatch() as usize;
        // Nothing selected yet: the worker keeps the selection equal to what
        // jobs and subscribers want (`Tap::reselect`), in f32 with every row.
        let (tap, stream) = capture::arm(
            Some(&graph),
            Arming {
                patterns: &[],
                layers: None,
                ring_bytes: ring_bytes(&graph, n_ubatch)?,
                settings: TapSettings {
                    rows: Rows::All,
                    dtype: Dtype::F32,
                    policy: Policy::Block {
                        timeout: Duration::from_secs(60),
                    },
                    n_ubatch,
                    mode: opts.capture_mode,
                },
            },
        )?;
        let capture_mode = tap.mode();
        let max_record = tap.max_record_len();
        ctx.replace_tap(tap)?;
        let n_ctx = ctx.n_ctx();
        let n_ctx_slot = opts.slot_ctx.map_or(n_ctx, |c| c.min(n_ctx)).max(1);
        let shared = Arc::new(Shared::new(opts.n_parallel));
        let (tx, rx) = mpsc::channel::<Msg>();
        let (ctrl_tx, ctrl_rx) = mpsc::channel::<Ctrl>();
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
            n_ubatch,
            max_record,
            max_token_bytes: model.max_token_text_bytes(),
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

    /// The one rule for whether a prompt of `n_tokens` fits a slot (the
    /// server, dataset capture and [`Scheduler::submit`] all ask this): it must
    /// leave a position free, as llama-server's does. The first token is
    /// sampled from the prompt's last row; each later one takes a position
    /// until the slot is full.
    pub fn prompt_fits(&self, n_tokens: usize) -> bool {
        n_tokens < self.n_ctx_slot as usize
    }

    /// The fewest tokens prompt text of `text_bytes` bytes can become, known
    /// without tokenizing it: every token stands for at most the vocabulary's
    /// longest text ([`Model::max_token_text_bytes`]; 0 where that gives no
    /// bound). A prompt for which [`Scheduler::prompt_fits`] refuses this many
    /// can be refused before it is tokenized (an 8 MB prompt takes seconds).
    pub fn fewest_tokens(&self, text_bytes: usize) -> usize {
        fewest_tokens(text_bytes, self.max_token_bytes)
    }

    /// Number of slots.
    pub fn n_parallel(&self) -> usize {
        self.n_parallel
    }

    /// Counters.
    pub fn stats(&self) -> &SchedulerStats {
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

    /// Compile a latent request against the graph with the tap's own rule
    /// (`capture::fitting_selection`; the engine's ring carries f32 frames of
    /// a whole ubatch): nodes a glob matched that cannot be delivered are left
    /// out and listed in [`LatentFilter::skipped`]; a node named exactly that
    /// cannot be is an error, as is a pattern that matches nothing (its
    /// message lists close names).
    pub fn compile(&self, req: &LatentRequest) -> Result<LatentFilter> {
        let sel = capture::fitting_selection(
            &req.patterns,
            req.layers.as_ref(),
            &self.graph,
            self.n_ubatch,
            Dtype::F32,
            self.max_record,
        )?;
        let names: Vec<String> = sel.tensors().iter().map(|t| t.name.clone()).collect();
        let mut f = LatentFilter::new(names, req.rows, req.dtype);
        f.skipped = sel.skipped().to_vec();
        f.widths = sel.tensors().iter().map(|t| t.row_width).collect();
        Ok(f)
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
        if !self.prompt_fits(job.prompt.len()) {
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

    /// Ask the engine to stop (see [`Scheduler::shutdown`]) without waiting; may be
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

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown(true);
    }
}

/// `text_bytes` bytes of text, when no token stands for more than `max_token_bytes`.
fn fewest_tokens(text_bytes: usize, max_token_bytes: Option<usize>) -> usize {
    max_token_bytes.map_or(0, |m| text_bytes.div_ceil(m.max(1)))
}

#[cfg(test)]
mod tests {
    use super::fewest_tokens;

    #[test]
    fn fewest_tokens_is_the_text_at_the_longest_token_rounded_up() {
        assert_eq!(fewest_tokens(0, Some(5)), 0);
        assert_eq!(fewest_tokens(1, Some(5)), 1);
        assert_eq!(fewest_tokens(5, Some(5)), 1);
        assert_eq!(fewest_tokens(6, Some(5)), 2);
        // An 8 MiB prompt with Gemma 3's longest token text (48 bytes).
        assert_eq!(fewest_tokens(8 << 20, Some(48)), 174_763);
        // No bound known: nothing is refused before tokenizing.
        assert_eq!(fewest_tokens(usize::MAX, None), 0);
        assert_eq!(fewest_tokens(usize::MAX, Some(1)), usize::MAX);
    }
}
