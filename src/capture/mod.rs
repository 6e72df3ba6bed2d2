//! *How* bytes leave the graph: the ggml scheduler eval callback (`cb_eval`).
//!
//! The [`Tap`] runs in two modes. A *probe* records every node the graph
//! computes (names, types, shapes) so patterns can be compiled against the real
//! graph. *Capture* answers the callback's ask phase from the compiled
//! [`Selection`] and, on the data phase, writes the tensor's rows straight into
//! a ring slot with their `(seq, pos, token)`: no allocation, no lock, and (with
//! `drop-newest`) no syscall on the compute thread.
//!
//! Row alignment: llama.cpp splits one `llama_decode` batch into ubatches of
//! `n_ubatch` consecutive tokens (`split_simple`, guaranteed by one KV stream),
//! and computes one graph per ubatch. A graph compute starts with the same node
//! every time (the *sentinel*, learned by the probe), which tells the tap which
//! ubatch, and so which batch rows, a tensor belongs to. A tensor whose token
//! axis has the ubatch's output count (llama.cpp prunes the last layer to output
//! rows) maps to the output rows only.
//!
//! Getting a tap onto a context (probe the graph, then arm a tap on a new ring
//! with a selection compiled against it) happens in one place, `arm.rs`, for
//! sessions, the serving engine and C plugin taps alike.

mod arm;
mod callback;
mod config;
use crate::convert;
mod deferred;
mod frame;
mod records;
mod steer;

pub use arm::ubatch_for_ring;
pub(crate) use arm::{arm, fitting_selection, Arming};
pub use callback::eval_callback;
use callback::tensor_name;
pub(crate) use callback::{abort_callback, abort_flag_ptr};
pub use config::{CaptureMode, ModeReport, Policy, Rows, TapCounters, TapSettings};
pub use convert::{convert_from_f32, convert_to_f32};
use deferred::Deferred;
pub use deferred::{hooks_linked, unavailable_reason};
use frame::{check_fits, ring_error};

use std::sync::atomic::{AtomicBool, Ordering};

use llama_cpp_sys_2 as sys;

use crate::error::{Error, ErrorKind, Result};
use crate::record::{Dtype, RowMeta};
use crate::ring::Producer;
use crate::select::Selection;

/// Row flag in the batch plan: llama.cpp computes logits for this token
/// (what [`Rows::Last`] keeps).
const PLAN_OUTPUT: u8 = 1;

/// Raw node record of a probe: (ggml name, ggml type, shape).
pub type ProbeNode = (String, u32, [i64; 4]);

enum Mode {
    Probe(Vec<ProbeNode>),
    Capture(Box<Armed>),
}

/// State that exists once a selection is compiled.
struct Armed {
    sel: Selection,
    sentinel: Vec<u8>,
    producer: Producer,
    rows: Rows,
    dtype: Dtype,
    policy: Policy,
    occ: Vec<u16>,
    pending: Option<u32>,
    // Scratch, sized once at arm time so the data phase never allocates.
    pick: Vec<u32>,
    // Host copy of device tensors (grown on first use only).
    staging: Vec<u8>,
}

/// The batch being decoded, as the callback needs to know it.
#[derive(Default)]
struct Plan {
    step: u32,
    ubatch_base: u32,
    n_ubatch: usize,
    rows: Vec<RowMeta>,
    flags: Vec<u8>,
}

/// The eval-callback target owned by a tapped context.
pub struct Tap {
    mode: Mode,
    plan: Plan,
    ubatch: i64,
    seq: u64,
    counters: TapCounters,
    failure: Option<Error>,
    deferred: Deferred,
    // Steering (None: the tap adds nothing and asks for nothing more).
    steer: Option<Box<steer::Steering>>,
    // Boxed separately: llama.cpp's CPU workers poll it through the abort callback
    // while the compute thread may hold `&mut Tap`.
    abort: Box<AtomicBool>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("probing", &matches!(self.mode, Mode::Probe(_)))
            .field("selected", &self.selection().len())
            .field("ubatch", &self.ubatch)
            .field("seq", &self.seq)
            .field("counters", &self.counters)
            .field("steering", &self.steer.is_some())
            .finish_non_exhaustive()
    }
}

impl Tap {
    /// A tap that only records the graph's nodes.
    pub(crate) fn probe() -> Self {
        Self {
            mode: Mode::Probe(Vec::new()),
            plan: Plan::default(),
            ubatch: -1,
            seq: 0,
            counters: TapCounters::default(),
            failure: None,
            deferred: Deferred::default(),
            steer: None,
            abort: Box::new(AtomicBool::new(false)),
        }
    }

    /// Nodes recorded by the probe so far, in graph order (first compute only).
    pub(crate) fn probed_nodes(&self) -> &[ProbeNode] {
        match &self.mode {
            Mode::Probe(v) => v,
            Mode::Capture(_) => &[],
        }
    }

    /// A capturing tap for a graph whose every compute starts with the node named
    /// `sentinel` (the first node a probe sees).
    pub fn armed(
        sentinel: &str,
        sel: Selection,
        producer: Producer,
        settings: TapSettings,
    ) -> Result<Self> {
        let TapSettings {
            rows,
            dtype,
            policy,
            n_ubatch,
            mode,
        } = settings;
        let max = crate::settings::MAX_UBATCH as usize;
        if n_ubatch == 0 || n_ubatch > max {
            return Err(Error::invalid(format!(
                "n_ubatch must be between 1 and {max}"
            )));
        }
        check_fits(&sel, n_ubatch, dtype, producer.max_record_len())?;
        let n_slots = sel.n_slots();
        let mut tap = Self::probe();
        tap.deferred = Deferred::new(mode);
        tap.deferred.resize(sel.tensors().len());
        tap.mode = Mode::Capture(Box::new(Armed {
            sel,
            sentinel: sentinel.as_bytes().to_vec(),
            producer,
            rows,
            dtype,
            policy,
            occ: vec![0; n_slots],
            pending: None,
            pick: Vec::with_capacity(n_ubatch),
            staging: Vec::new(),
        }));
        tap.plan.n_ubatch = n_ubatch;
        tap.plan.rows.reserve(n_ubatch);
        tap.plan.flags.reserve(n_ubatch);
        Ok(tap)
    }

    /// Swap an armed tap's selection between decodes, keeping its ring and
    /// counters (a server changes what it captures as requests come and go).
    /// The context must have been created with an eval callback.
    pub(crate) fn reselect(&mut self, sel: Selection) -> Result<()> {
        let n_ubatch = self.plan.n_ubatch;
        let Mode::Capture(a) = &mut self.mode else {
            return Err(Error::new(ErrorKind::Internal, "tap is not armed"));
        };
        check_fits(&sel, n_ubatch, a.dtype, a.producer.max_record_len())?;
        a.occ = vec![0; sel.n_slots()];
        self.deferred.resize(sel.tensors().len());
        a.sel = sel;
        a.pending = None;
        Ok(())
    }

    /// The tensors this tap captures, in graph order (none while probing).
    pub fn selection(&self) -> &[crate::select::SelectedTensor] {
        match &self.mode {
            Mode::Probe(_) => &[],
            Mode::Capture(a) => a.sel.tensors(),
        }
    }

    /// The largest record its ring takes (0 while probing): what a frame must
    /// fit (see [`fitting_selection`]).
    pub(crate) fn max_record_len(&self) -> usize {
        match &self.mode {
            Mode::Probe(_) => 0,
            Mode::Capture(a) => a.producer.max_record_len(),
        }
    }

    /// Nodes the patterns matched that this tap does not capture.
    pub fn skipped(&self) -> &[crate::select::SkippedTensor] {
        match &self.mode {
            Mode::Probe(_) => &[],
            Mode::Capture(a) => a.sel.skipped(),
        }
    }

    /// True when llama.cpp must call this tap's eval callback (it selects tensors,
    /// or it is probing). A tokens-only tap leaves the graph untouched.
    pub(crate) fn wants_eval(&self) -> bool {
        match &self.mode {
            Mode::Probe(_) => true,
            Mode::Capture(a) => !a.sel.tensors().is_empty() || self.steer.is_some(),
        }
    }

    /// Edit the graph by `edits` from the next decode on, for every sequence
    /// (each steer for the sequences it names; empty: stop; edits of single
    /// sequences, [`Tap::set_seq_edits`], stay). Needs an armed tap that knows
    /// where each graph compute starts (armed on a probed graph), on a
    /// context created with the eval callback.
    pub(crate) fn set_edits(&mut self, edits: &crate::steer::Edits) -> Result<()> {
        self.edit(None, edits)
    }

    /// Edit sequence `seq`'s rows from the next decode on by `edits` (empty:
    /// stop editing it; other sequences keep their edits). Needs a tap armed
    /// on a probed graph, on a context created with the eval callback. With
    /// no edits left the tap asks for nothing more.
    pub(crate) fn set_seq_edits(&mut self, seq: i32, edits: &crate::steer::Edits) -> Result<()> {
        self.edit(Some(seq), edits)
    }

    fn edit(&mut self, seq: Option<i32>, edits: &crate::steer::Edits) -> Result<()> {
        let Mode::Capture(a) = &self.mode else {
            return Err(Error::new(ErrorKind::Internal, "tap is not armed"));
        };
        if edits.is_empty() && self.steer.is_none() {
            return Ok(());
        }
        if !edits.is_empty() && a.sentinel.is_empty() {
            return Err(Error::new(
                ErrorKind::Internal,
                "steering and patching need a tap armed on a probed graph",
            ));
        }
        let n_embd = edits
            .steers
            .first()
            .map(|s| s.n_embd)
            .or(edits.patches.first().map(|p| p.data.len()));
        let s = self
            .steer
            .get_or_insert_with(|| Box::new(steer::Steering::empty(n_embd.unwrap_or_default())));
        match seq {
            Some(seq) => s.set_seq(seq, edits),
            None => s.set_all(edits),
        }
        if s.is_empty() {
            self.steer = None;
        }
        Ok(())
    }

    /// The first node of every graph compute, for a tap armed without a probed
    /// graph that moves to a probed context (`Generator::set_edits`).
    pub(crate) fn set_sentinel(&mut self, sentinel: &str) {
        if let Mode::Capture(a) = &mut self.mode {
            a.sentinel = sentinel.as_bytes().to_vec();
        }
    }

    /// True while the tap edits the graph (steers or patches).
    pub(crate) fn editing(&self) -> bool {
        self.steer.is_some()
    }

    /// Describe the batch about to be decoded: `rows[i]` and whether llama.cpp
    /// outputs logits for it (`outputs[i]`). Called before every `llama_decode`.
    pub(crate) fn begin_decode(
        &mut self,
        step: u32,
        ubatch_base: u32,
        n_ubatch: usize,
        rows: &[RowMeta],
        outputs: &[bool],
    ) {
        self.plan.step = step;
        self.plan.ubatch_base = ubatch_base;
        self.plan.n_ubatch = n_ubatch;
        self.plan.rows.clear();
        self.plan.rows.extend_from_slice(rows);
        let plan = &mut self.plan;
        plan.flags.clear();
        plan.flags
            .extend(outputs.iter().map(|&o| u8::from(o) * PLAN_OUTPUT));
        self.ubatch = -1;
    }

    /// Ubatches the last decode computed.
    pub(crate) fn ubatches_seen(&self) -> u32 {
        (self.ubatch + 1).max(0) as u32
    }

    /// The error that made the callback cancel the decode, if any.
    pub(crate) fn take_failure(&mut self) -> Option<Error> {
        self.abort.store(false, Ordering::Relaxed);
        self.failure.take()
    }

    /// The capture mode asked for and the one in effect.
    pub fn mode(&self) -> ModeReport {
        let d = &self.deferred;
        ModeReport {
            requested: d.requested,
            used: if d.enabled {
                CaptureMode::Deferred
            } else {
                CaptureMode::Callback
            },
            note: d.note,
        }
    }

    /// Counters so far.
    pub fn counters(&self) -> TapCounters {
        self.counters
    }

    /// Start counting afresh (frame `seq` and counters from 0): a session calls
    /// this before each generation, whose end record reports that generation alone.
    pub(crate) fn reset_counters(&mut self) {
        self.seq = 0;
        self.counters = TapCounters::default();
    }

    fn fail(&mut self, e: Error) {
        if self.failure.is_none() {
            self.failure = Some(e);
        }
        self.abort.store(true, Ordering::Relaxed);
    }

    fn on_ask(&mut self, t: &sys::ggml_tensor) -> bool {
        let name = tensor_name(t);
        match &mut self.mode {
            Mode::Probe(nodes) => {
                // A node of a branch the graph does not compute (e.g. the embeddings-input
                // path of `ggml_build_forward_select`) never holds this run's values:
                // it is not listed, and capture ignores it the same way.
                if t.flags & sys::GGML_TENSOR_FLAG_COMPUTE as i32 == 0 {
                    return false;
                }
                // A probe decodes a single token: one graph compute, every node once.
                nodes.push((String::from_utf8_lossy(name).into_owned(), t.type_, t.ne));
                false
            }
            Mode::Capture(a) => {
                if self.failure.is_some() {
                    return false;
                }
                let sentinel = name == a.sentinel.as_slice();
                if sentinel {
                    self.ubatch += 1;
                    a.occ.iter_mut().for_each(|c| *c = 0);
                }
                let computed = t.flags & sys::GGML_TENSOR_FLAG_COMPUTE as i32 != 0;
                let pending = a.sel.slot(name).filter(|_| computed).and_then(|slot| {
                    let occ = a.occ[slot] as usize;
                    a.occ[slot] = a.occ[slot].saturating_add(1);
                    a.sel.tensor_at(slot, occ)
                });
                a.pending = None;
                if sentinel {
                    self.deferred_restart();
                }
                // A steered node is handed over mid-graph (and captured, if it is,
                // after the add); the others keep their mode.
                let steered = match &mut self.steer {
                    Some(s) => s.ask(name, computed),
                    None => false,
                };
                let Some(ti) = pending else {
                    return steered;
                };
                // Deferred: kept alive as an output, copied after the compute.
                if !steered && self.defer(t, ti) {
                    return false;
                }
                if let Mode::Capture(a) = &mut self.mode {
                    a.pending = Some(ti);
                }
                true
            }
        }
    }

    fn on_data(&mut self, t: &sys::ggml_tensor) -> bool {
        if let Some(s) = self.steer.as_deref_mut() {
            if let Some(k) = s.pending.take() {
                if let Err(e) = s.apply(k, t, &self.plan, self.ubatch) {
                    self.fail(e);
                    return false;
                }
            }
        }
        if let Err(e) = self.capture(t) {
            self.fail(e);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    //! The compute thread's side of the tap, driven with hand-made tensors: rows
    //! land with the right `(seq, pos, token)`, and in drop-newest mode the
    //! callback makes no Rust heap allocation at all.

    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    use std::ffi::c_void;

    use super::*;
    use crate::record::{Record, ROW_PROMPT};
    use crate::select::GraphNode;

    /// Counts allocations made by the current thread.
    struct Counting;

    thread_local! {
        static ALLOCS: Cell<u64> = const { Cell::new(0) };
    }

    // SAFETY: forwards to System; the counter is a thread-local Cell that never allocates.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: same contract as the caller's.
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            // SAFETY: same contract as the caller's.
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: same contract as the caller's.
            unsafe { System.realloc(p, l, n) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    fn allocs() -> u64 {
        ALLOCS.with(Cell::get)
    }

    fn tensor(name: &str, data: &mut [f32], ne: [i64; 4]) -> sys::ggml_tensor {
        // SAFETY: ggml_tensor is plain C data; all-zero is a valid empty tensor.
        let mut t: sys::ggml_tensor = unsafe { std::mem::zeroed() };
        for (d, s) in t.name.iter_mut().zip(name.bytes()) {
            *d = s as _;
        }
        t.type_ = convert::GGML_F32;
        t.flags = sys::GGML_TENSOR_FLAG_COMPUTE as i32;
        t.ne = ne;
        t.nb = [
            4,
            4 * ne[0] as usize,
            4 * (ne[0] * ne[1]) as usize,
            4 * (ne[0] * ne[1] * ne[2]) as usize,
        ];
        t.data = data.as_mut_ptr() as *mut c_void;
        t
    }

    /// One graph compute: every node asked, the selected ones delivered.
    fn compute(tap: &mut Tap, nodes: &mut [sys::ggml_tensor]) {
        let user = tap as *mut Tap as *mut c_void;
        for t in nodes.iter_mut() {
            // SAFETY: valid tensors and the tap they were built for, one thread.
            unsafe {
                if eval_callback(t, true, user) {
                    assert!(eval_callback(t, false, user));
                }
            }
        }
    }

    #[test]
    fn frames_carry_rows_and_the_callback_never_allocates() {
        let raw: Vec<ProbeNode> = [
            "inp_embd",
            "attn_norm-0",
            "l_out-0",
            "l_out-1",
            "result_norm",
        ]
        .iter()
        .map(|n| (n.to_string(), 0, [8, 1, 1, 1]))
        .collect();
        let graph = GraphNode::list_from_raw(&raw);
        let sel = Selection::compile(&["l_out-*".into()], None, &graph).unwrap();
        // Room for a few frames only, so the loop below also exercises drops.
        let (producer, mut consumer) = crate::ring::channel(4096).unwrap();
        let settings = TapSettings {
            rows: Rows::All,
            dtype: Dtype::F32,
            policy: Policy::DropNewest,
            n_ubatch: 4,
            mode: CaptureMode::Callback,
        };
        let mut tap = Tap::armed("inp_embd", sel, producer, settings).unwrap();
        let rows: Vec<RowMeta> = (0..6)
            .map(|i| RowMeta {
                seq_id: 0,
                pos: i,
                token: 100 + i,
                flags: ROW_PROMPT,
            })
            .collect();
        let outputs = [false, false, false, false, false, true];
        let mut emb = vec![0f32; 32];
        let mut l0: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let mut l1: Vec<f32> = (0..32).map(|i| -(i as f32)).collect();
        let mut l0_tail: Vec<f32> = (0..16).map(|i| 1000.0 + i as f32).collect();
        let mut l1_tail: Vec<f32> = (0..8).map(|i| 2000.0 + i as f32).collect();

        let mut in_callbacks = 0;
        for _ in 0..50 {
            tap.begin_decode(0, 0, 4, &rows, &outputs);
            let before = allocs();
            // ubatch 0: 4 prompt rows, no output row
            let mut g0 = [
                tensor("inp_embd", &mut emb, [8, 4, 1, 1]),
                tensor("l_out-0", &mut l0, [8, 4, 1, 1]),
                tensor("l_out-1", &mut l1, [8, 4, 1, 1]),
            ];
            compute(&mut tap, &mut g0);
            // ubatch 1: 2 rows; the last layer is pruned to the one output row
            let mut g1 = [
                tensor("inp_embd", &mut emb, [8, 2, 1, 1]),
                tensor("l_out-0", &mut l0_tail, [8, 2, 1, 1]),
                tensor("l_out-1", &mut l1_tail[..8], [8, 1, 1, 1]),
            ];
            compute(&mut tap, &mut g1);
            in_callbacks += allocs() - before;
        }
        assert_eq!(
            in_callbacks, 0,
            "Rust heap allocations inside the eval callback"
        );
        let c = tap.counters();
        assert_eq!(c.frames, 200);
        assert!(c.drops > 0, "the small ring dropped frames: {c:?}");

        // The first frames in the ring are from the first decode, in graph order.
        let mut seen = Vec::new();
        while let Some(g) = consumer.try_read() {
            if let Record::Frame(f) = Record::parse(&g).unwrap() {
                seen.push((
                    f.name().to_string(),
                    f.header.seq,
                    f.header.ubatch,
                    f.rows.to_vec(),
                    f.as_f32().unwrap().to_vec(),
                ));
            }
        }
        let (name, seq, ub, r, v) = &seen[0];
        assert_eq!((name.as_str(), *seq, *ub), ("l_out-0", 0, 0));
        assert_eq!(
            r.iter().map(|r| (r.pos, r.token)).collect::<Vec<_>>(),
            [(0, 100), (1, 101), (2, 102), (3, 103)]
        );
        assert_eq!(v, &l0);
        let (name, _, ub, r, v) = &seen[3];
        assert_eq!((name.as_str(), *ub), ("l_out-1", 1));
        assert_eq!(
            r.iter().map(|r| r.pos).collect::<Vec<_>>(),
            [5],
            "pruned layer maps to the output row"
        );
        assert_eq!(v, &l1_tail[..8]);
        assert_eq!(seen.len() as u64 + c.drops, c.frames);
    }
}
