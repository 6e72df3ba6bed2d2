//! Deferred capture: no graph split, no per-node synchronisation.
//!
//! In callback mode ggml's scheduler cuts the graph at every node the eval
//! callback asks for and synchronises before handing it over; the cost is the
//! thread pool's wake-up per piece, not our copy. In deferred mode the selected
//! nodes are marked as graph outputs *before the allocator plans the graph*, so
//! their memory survives the whole compute; the callback's ask phase answers
//! "no" for them (the graph runs in one piece) and remembers them, and right
//! after the compute the tap copies their rows into the same ring frames the
//! callback mode writes, in the same order.
//!
//! llama.cpp offers no hook between building a graph and allocating it, so the
//! build links three ggml scheduler calls through wrappers (`cbits/sched_hooks.c`,
//! `-Wl,--wrap`): `set_eval_callback` tells which tap drives the scheduler,
//! `alloc_graph` marks the nodes and re-plans the allocation, `graph_compute_async`
//! delivers the frames. Where the wrappers are not linked (a program linking the
//! static library without the flags, a crate depending on this one) or a GPU
//! backend is present (deferred mode is verified on CPU only), taps use callback
//! mode and say so. See docs/capture-modes.md.

use std::cell::Cell;
use std::ffi::{c_int, c_void};

use llama_cpp_sys_2 as sys;

use super::callback::{eval_callback, tensor_name};
use super::config::CaptureMode;
use super::{Mode, Tap};
use crate::error::{Error, ErrorKind};

extern "C" {
    fn latent_tap_sched_hooks_linked() -> c_int;
}

/// True when this program was linked with the scheduler wrappers.
pub fn hooks_linked() -> bool {
    // SAFETY: a C function without arguments that only compares addresses.
    unsafe { latent_tap_sched_hooks_linked() != 0 }
}

/// Why deferred mode cannot run in this process, or `None` when it can.
pub fn unavailable_reason() -> Option<&'static str> {
    if !hooks_linked() {
        return Some("the program was linked without the ggml scheduler wrappers (see docs/capture-modes.md)");
    }
    if gpu_present() && !on_gpu_allowed() {
        return Some("an offload device (a GPU, or llama.cpp RPC workers) is present: deferred capture is verified on CPU only");
    }
    None
}

/// `LATENT_TAP_DEFERRED_ON_GPU=1`: run deferred mode with a GPU backend, device
/// tensors included (for `scripts/gpu-check`, until it has passed there).
fn on_gpu_allowed() -> bool {
    std::env::var_os("LATENT_TAP_DEFERRED_ON_GPU").is_some_and(|v| v == "1")
}

fn gpu_present() -> bool {
    // SAFETY: ggml's device registry is initialised with the backends; reading it is safe.
    unsafe {
        (0..sys::ggml_backend_dev_count()).any(|i| {
            let d = sys::ggml_backend_dev_get(i);
            !d.is_null()
                && matches!(
                    sys::ggml_backend_dev_type(d),
                    sys::GGML_BACKEND_DEVICE_TYPE_GPU | sys::GGML_BACKEND_DEVICE_TYPE_IGPU
                )
        })
    }
}

/// A tap's deferred-mode state. Vectors are sized when the selection is set,
/// so the compute thread never allocates.
#[derive(Debug, Default)]
pub(super) struct Deferred {
    /// Mode the user asked for.
    pub(super) requested: CaptureMode,
    /// Deferred mode runs for this tap.
    pub(super) enabled: bool,
    /// Why it does not, when it was asked for (or left to `auto`).
    pub(super) note: Option<&'static str>,
    /// Device (non-host) tensors may be deferred too (verification runs only).
    device: bool,
    /// Nodes of the graph last allocated that were marked as outputs, in graph order.
    marked: Vec<usize>,
    cursor: usize,
    /// Marked nodes met in the compute in flight: (tensor, selected tensor index).
    pending: Vec<(usize, u32)>,
}

impl Deferred {
    pub(super) fn new(requested: CaptureMode) -> Self {
        let (enabled, note) = match requested {
            CaptureMode::Callback => (false, None),
            CaptureMode::Auto | CaptureMode::Deferred => match unavailable_reason() {
                None => (true, None),
                Some(r) => (false, Some(r)),
            },
        };
        Self {
            requested,
            enabled,
            note,
            device: enabled && on_gpu_allowed(),
            ..Self::default()
        }
    }

    /// Size the scratch vectors for a selection of `n` tensors.
    pub(super) fn resize(&mut self, n: usize) {
        let cap = 2 * n + 16;
        self.marked = Vec::with_capacity(cap);
        self.pending = Vec::with_capacity(cap);
        self.cursor = 0;
    }

    /// A new graph compute starts.
    pub(super) fn restart(&mut self) -> bool {
        self.cursor = 0;
        let clean = self.pending.is_empty();
        self.pending.clear();
        clean
    }

    /// Ask phase: take `t` (the selected tensor `ti`) for after the compute when
    /// it was marked at allocation and lives in host memory.
    pub(super) fn take(&mut self, t: &sys::ggml_tensor, ti: u32) -> bool {
        if !self.enabled || self.marked.is_empty() || self.pending.len() == self.pending.capacity()
        {
            return false;
        }
        let p = t as *const sys::ggml_tensor as usize;
        if self.marked.get(self.cursor) == Some(&p) {
            self.cursor += 1;
        } else if let Some(k) = self.marked.iter().position(|&m| m == p) {
            self.cursor = k + 1;
        } else {
            return false;
        }
        if t.flags & sys::GGML_TENSOR_FLAG_OUTPUT as i32 == 0 || t.buffer.is_null() {
            return false;
        }
        // SAFETY: the buffer of an allocated tensor is live during its graph's compute.
        if !self.device && !unsafe { sys::ggml_backend_buffer_is_host(t.buffer) } {
            return false;
        }
        self.pending.push((p, ti));
        true
    }
}

/// The tensor whose memory `t` uses (itself unless it is a view).
fn root(mut t: *mut sys::ggml_tensor) -> *mut sys::ggml_tensor {
    // SAFETY: graph tensors; `view_src` chains are finite and end at a non-view tensor.
    unsafe {
        while !(*t).view_src.is_null() {
            t = (*t).view_src;
        }
    }
    t
}

/// True when computing `t` writes memory (it is not a mere view).
fn writes(t: *mut sys::ggml_tensor) -> bool {
    // SAFETY: a graph tensor.
    let op = unsafe { (*t).op };
    !matches!(
        op,
        sys::GGML_OP_NONE
            | sys::GGML_OP_VIEW
            | sys::GGML_OP_RESHAPE
            | sys::GGML_OP_PERMUTE
            | sys::GGML_OP_TRANSPOSE
    )
}

/// True when node `m` comes before node `w` in `graph` (both are nodes of it).
fn before(m: usize, w: *mut sys::ggml_tensor, graph: *mut sys::ggml_cgraph, n: c_int) -> bool {
    for i in 0..n {
        // SAFETY: i < n_nodes of a live graph.
        let t = unsafe { sys::ggml_graph_node(graph, i) } as usize;
        if t == m {
            return true;
        }
        if t == w as usize {
            return false;
        }
    }
    false
}

thread_local! {
    /// The scheduler whose eval callback was set last on this thread, and its tap
    /// (0 when the callback is not ours). llama.cpp sets it right before it builds
    /// and allocates a graph, on the thread that decodes.
    static CURRENT: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// The tap holding deferred tensors of the compute in flight on this thread.
    static PENDING: Cell<usize> = const { Cell::new(0) };
}

impl Tap {
    /// Before llama.cpp allocates `graph`: mark the selected nodes as outputs and
    /// make the allocator plan with them kept alive.
    fn before_alloc(&mut self, sched: sys::ggml_backend_sched_t, graph: *mut sys::ggml_cgraph) {
        let d = &mut self.deferred;
        d.marked.clear();
        d.cursor = 0;
        let Mode::Capture(a) = &self.mode else {
            return;
        };
        if !d.enabled || self.failure.is_some() || a.sel.tensors().is_empty() {
            return;
        }
        // SAFETY: llama.cpp passes the graph it is about to allocate; its nodes are valid.
        let n = unsafe { sys::ggml_graph_n_nodes(graph) };
        let node = |i: c_int| {
            // SAFETY: i < n_nodes of a live graph.
            unsafe { sys::ggml_graph_node(graph, i) }
        };
        for i in 0..n {
            let t = node(i);
            // SAFETY: a node of a live graph.
            if t.is_null() || a.sel.slot(tensor_name(unsafe { &*t })).is_none() {
                continue;
            }
            if d.marked.len() == d.marked.capacity() {
                break;
            }
            d.marked.push(t as usize);
        }
        // A node that a later op writes into (an in-place op or a copy through a view
        // of the same memory) holds other values after the compute than when it was
        // computed: those stay with the callback, which reads them in time.
        for j in 0..n {
            let w = node(j);
            // SAFETY: a node of a live graph.
            if w.is_null() || unsafe { (*w).view_src.is_null() } || !writes(w) {
                continue;
            }
            let r = root(w);
            d.marked.retain(|&m| {
                // SAFETY: marked nodes belong to this graph.
                root(m as *mut sys::ggml_tensor) != r || !before(m, w, graph, n)
            });
        }
        for &m in &d.marked {
            // Keep the node and the memory it views: the allocator frees a view's
            // source unless the source itself is an output.
            let mut t = m as *mut sys::ggml_tensor;
            while !t.is_null() {
                // SAFETY: the graph is not allocated yet; setting a flag is what its
                // builder does. `view_src` chains end at a non-view tensor.
                unsafe {
                    sys::ggml_set_output(t);
                    t = (*t).view_src;
                }
            }
        }
        if d.marked.is_empty() {
            return;
        }
        // The allocator re-uses its last plan while the graph's shape is unchanged and
        // ignores flags then: plan anew with the outputs marked. The real allocation
        // that follows finds this plan valid and keeps it.
        // SAFETY: the scheduler is reset (llama.cpp did so before building the graph).
        if !unsafe { sys::ggml_backend_sched_reserve(sched, graph) } {
            d.marked.clear();
        }
    }

    /// After the graph compute: copy the deferred tensors into the ring.
    fn after_compute(&mut self, sched: sys::ggml_backend_sched_t, ok: bool) {
        if !ok || self.failure.is_some() {
            self.deferred.pending.clear();
            return;
        }
        // SAFETY: the scheduler llama.cpp just computed with; waits for its backends.
        unsafe { sys::ggml_backend_sched_synchronize(sched) };
        let before = self.counters.frames;
        for i in 0..self.deferred.pending.len() {
            let (t, ti) = self.deferred.pending[i];
            if let Mode::Capture(a) = &mut self.mode {
                a.pending = Some(ti);
            }
            // SAFETY: a node of the graph just computed, kept alive as an output.
            if let Err(e) = self.capture(unsafe { &*(t as *const sys::ggml_tensor) }) {
                self.fail(e);
                break;
            }
        }
        self.counters.deferred += self.counters.frames - before;
        self.deferred.pending.clear();
    }

    /// Ask phase, deferred path: `Some(false)` when `t` was taken for after the compute.
    pub(super) fn defer(&mut self, t: &sys::ggml_tensor, ti: u32) -> bool {
        if !self.deferred.take(t, ti) {
            return false;
        }
        PENDING.with(|p| p.set(self as *mut Tap as usize));
        true
    }

    /// A new graph compute starts (the sentinel node): nothing may be left over.
    pub(super) fn deferred_restart(&mut self) {
        if !self.deferred.restart() {
            self.fail(Error::new(
                ErrorKind::Internal,
                "deferred frames of the previous graph compute were never delivered",
            ));
        }
    }
}

/// `ggml_backend_sched_set_eval_callback` was called (wrapped).
#[no_mangle]
extern "C" fn latent_tap_hook_set_eval_callback(
    sched: sys::ggml_backend_sched_t,
    cb: sys::ggml_backend_sched_eval_callback,
    user: *mut c_void,
) {
    let ours =
        cb.map(|f| f as usize) == Some(eval_callback as *const () as usize) && !user.is_null();
    CURRENT.with(|c| c.set((sched as usize, if ours { user as usize } else { 0 })));
}

/// `ggml_backend_sched_alloc_graph` is about to run (wrapped).
#[no_mangle]
extern "C" fn latent_tap_hook_before_alloc(
    sched: sys::ggml_backend_sched_t,
    graph: *mut sys::ggml_cgraph,
) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (s, tap) = CURRENT.with(Cell::get);
        if s != sched as usize || tap == 0 || graph.is_null() {
            return;
        }
        // SAFETY: `tap` is the user data llama.cpp passes to our eval callback on this
        // scheduler: a live Tap used by this thread alone while it decodes.
        unsafe { &mut *(tap as *mut Tap) }.before_alloc(sched, graph);
    }));
}

/// `ggml_backend_sched_graph_compute_async` returned `status` (wrapped).
#[no_mangle]
extern "C" fn latent_tap_hook_after_compute(
    sched: sys::ggml_backend_sched_t,
    _graph: *mut sys::ggml_cgraph,
    status: c_int,
) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let tap = PENDING.with(|p| p.replace(0));
        if tap == 0 {
            return;
        }
        // SAFETY: set by this thread's ask phase during this compute: the live Tap.
        unsafe { &mut *(tap as *mut Tap) }.after_compute(sched, status == sys::GGML_STATUS_SUCCESS);
    }));
}
