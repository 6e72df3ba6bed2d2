//! The tap's state and the functions it interposes.

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::config::Config;
use crate::convert::{convert_run, ggml_type_size, SrcTensor};
use crate::host::{self, EvalCallback, Host, Tensor, TYPE_I32};
use crate::labels::{Batch, GraphRows, Label, Mismatch, POS_UNSET};
use crate::link::Link;
use crate::record::{frame_len, kind, put, FrameHeader, RowMeta};
use crate::ring::WriteError;
use crate::select::{layer_of, NameHasher};
use crate::wire::{SeqRm, CONNECT_INTERVAL_MS, LIVENESS_INTERVAL_MS, ROW_OUTPUT};

/// `GGML_STATUS_FAILED`.
const STATUS_FAILED: i32 = -1;

/// Log a line on stderr (unless `LATENT_TAP_LOG=0`).
fn log(msg: &str) {
    if config().map_or(true, |c| c.log) {
        eprintln!("latent-tap: {msg}");
    }
}

/// The settings, or why there are none (logged once).
fn config() -> Option<&'static Config> {
    static CFG: OnceLock<Option<Config>> = OnceLock::new();
    CFG.get_or_init(|| match Config::from_env() {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("latent-tap: {}: the tap is off", e.message());
            None
        }
    })
    .as_ref()
}

/// Milliseconds on a coarse monotonic clock (vDSO, no syscall).
fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Everything that changes while the host runs. Only the thread computing a
/// graph touches it (see [`STATE`]).
#[derive(Debug, Default)]
struct State {
    link: Option<Link>,
    connections: u32,
    next_connect_ms: u64,
    next_check_ms: u64,
    /// Graph computes seen (`FrameHeader::step`).
    graphs: u32,
    /// Frames produced on this connection, dropped ones included.
    frame_seq: u64,
    frames_dropped: u64,
    /// Graphs computed while attached whose rows could not be labelled.
    graphs_skipped: u64,
    /// The current graph's inputs and row labels (empty labels: not tapped).
    rows: GraphRows,
    labels: Vec<Label>,
    /// Rows of the current frame: (source row, label index).
    pick: Vec<usize>,
    /// Device tensors that need conversion are staged here.
    staging: Vec<u8>,
    /// Selection by node name, remembered: glob matching allocates, and the
    /// eval callback asks about every node of every tapped graph.
    names: HashMap<Box<[u8]>, Option<u32>, BuildHasherDefault<NameHasher>>,
    /// Permanently off, and why (logged once).
    off: Option<String>,
    layout_checked: bool,
    unlabelled_logged: bool,
    too_large_logged: bool,
}

/// Distinct node names remembered (a model's graph has a few hundred).
const MAX_NAMES: usize = 4096;

impl State {
    /// `cfg.select(name)`, allocation-free once a name has been seen.
    fn selected(&mut self, cfg: &Config, name: &[u8]) -> Option<u32> {
        if let Some(&s) = self.names.get(name) {
            return s;
        }
        let s = cfg.select(name);
        if self.names.len() < MAX_NAMES {
            self.names.insert(name.into(), s);
        }
        s
    }
}

/// The tap. `try_lock` only: a thread that finds it taken computes its graph
/// untapped rather than wait (two host threads computing at once is rare;
/// waiting on the compute thread is never acceptable).
static STATE: Mutex<Option<State>> = Mutex::new(None);

thread_local! {
    /// While this thread computes a tapped graph: the state it holds locked.
    static CURRENT: Cell<*mut State> = const { Cell::new(std::ptr::null_mut()) };
    /// The host's answer to the last "ask" of the eval callback.
    static HOST_WANTED: Cell<bool> = const { Cell::new(false) };
    /// The batch being decoded on this thread.
    static BATCH: RefCell<Batch> = RefCell::new(Batch::default());
}

/// Turn the tap off for good, with one log line.
fn turn_off(st: &mut State, why: String) {
    if st.off.is_none() {
        log(&format!("{why}; the tap is off, the host runs untouched"));
        st.link = None;
        st.off = Some(why);
    }
}

// ---------------------------------------------------------------------------
// Per-scheduler host callbacks

/// One scheduler's callback as the host set it.
#[derive(Debug)]
struct Sched {
    sched: AtomicUsize,
    cb: AtomicUsize,
    ud: AtomicUsize,
    /// The tap's callback is installed on it right now.
    ours: AtomicBool,
}

const N_SCHEDS: usize = 64;
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Sched = Sched {
    sched: AtomicUsize::new(0),
    cb: AtomicUsize::new(0),
    ud: AtomicUsize::new(0),
    ours: AtomicBool::new(false),
};
static SCHEDS: [Sched; N_SCHEDS] = [EMPTY; N_SCHEDS];

/// The entry of `sched`, created on first sight; `None` when the table is full.
fn sched_entry(sched: *mut c_void) -> Option<&'static Sched> {
    let key = sched as usize;
    if let Some(e) = SCHEDS
        .iter()
        .find(|e| e.sched.load(Ordering::Acquire) == key)
    {
        return Some(e);
    }
    SCHEDS.iter().find(|e| {
        e.sched
            .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
            .is_ok_and(|_| true)
            || e.sched.load(Ordering::Acquire) == key
    })
}

fn host_cb(e: &Sched) -> (EvalCallback, *mut c_void) {
    let cb = e.cb.load(Ordering::Acquire);
    // SAFETY: 0 or a function pointer the host passed as its eval callback.
    let cb: EvalCallback = unsafe { std::mem::transmute::<usize, EvalCallback>(cb) };
    (cb, e.ud.load(Ordering::Acquire) as *mut c_void)
}

/// The eval callback the tap installs: the host's own callback keeps working,
/// and selected tensors of a labelled graph are copied into the ring.
unsafe extern "C" fn tap_callback(t: *mut Tensor, ask: bool, ud: *mut c_void) -> bool {
    // SAFETY: `ud` is the `&'static Sched` this callback was installed with.
    let e = unsafe { &*(ud as *const Sched) };
    let (hcb, hud) = host_cb(e);
    let r = catch_unwind(AssertUnwindSafe(|| {
        let st = CURRENT.get();
        if st.is_null() || t.is_null() {
            return false;
        }
        // SAFETY: `CURRENT` is set by `around_compute` on this thread while it
        // holds `STATE` locked for the duration of the compute that calls us;
        // nothing else touches the state meanwhile.
        let st = unsafe { &mut *st };
        // SAFETY: the scheduler passes a live node of the graph.
        let t = unsafe { &*t };
        let Some(cfg) = config() else { return false };
        let Some(pattern) = st.selected(cfg, t.name()) else {
            return false;
        };
        if ask {
            return true;
        }
        write_frame(st, cfg, t, pattern);
        true
    }));
    let mine = r.unwrap_or(false);
    if ask {
        // SAFETY: the host's callback, called as the scheduler would.
        let theirs = hcb.is_some_and(|f| unsafe { f(t, true, hud) });
        HOST_WANTED.set(theirs);
        mine || theirs
    } else if HOST_WANTED.get() {
        // SAFETY: as above; the host asked for this node.
        hcb.map_or(true, |f| unsafe { f(t, false, hud) })
    } else {
        true
    }
}

// ---------------------------------------------------------------------------
// Graph computes

/// Finds the graph's `inp_tokens`, `inp_pos` and `out_ids` inputs and reads them.
///
/// # Safety
///
/// `graph` must be the host's graph being computed.
unsafe fn read_inputs(h: &Host, graph: *mut c_void, rows: &mut GraphRows) {
    rows.tokens.clear();
    rows.pos.clear();
    rows.out_ids.clear();
    let mut found: [*const Tensor; 3] = [std::ptr::null(); 3];
    // SAFETY: the host's graph (caller).
    let n = unsafe { (h.graph_n_nodes)(graph) };
    'nodes: for i in 0..n {
        // SAFETY: `i` is below the node count.
        let node = unsafe { (h.graph_node)(graph, i) };
        if node.is_null() {
            continue;
        }
        // SAFETY: a live node of the graph.
        let node = unsafe { &*node };
        for &s in node.src.iter() {
            if s.is_null() {
                continue;
            }
            // SAFETY: a live tensor the node reads.
            let st = unsafe { &*s };
            let slot = match st.name() {
                b"inp_tokens" => 0,
                b"inp_pos" => 1,
                b"out_ids" => 2,
                _ => continue,
            };
            found[slot] = s;
            if found.iter().all(|p| !p.is_null()) {
                break 'nodes;
            }
        }
    }
    for (slot, &t) in found.iter().enumerate() {
        if t.is_null() {
            continue;
        }
        // SAFETY: a live input tensor of the graph.
        let tr = unsafe { &*t };
        if tr.typ != TYPE_I32 || tr.buffer.is_null() || tr.data.is_null() || tr.ne[0] < 0 {
            continue;
        }
        let n = tr.ne[0] as usize;
        let v = match slot {
            0 => &mut rows.tokens,
            1 => &mut rows.pos,
            _ => &mut rows.out_ids,
        };
        v.resize(n, 0);
        // SAFETY: the tensor holds at least `n` i32 (its first row); `v` has
        // room for them; ggml copies from host or device memory.
        unsafe { (h.tensor_get)(t, v.as_mut_ptr() as *mut c_void, 0, n * 4) };
    }
    rows.n_tokens = if found[0].is_null() {
        rows.pos.len()
    } else {
        rows.tokens.len()
    };
}

/// Connects, checks the listener, labels the graph; says whether to tap it.
///
/// # Safety
///
/// `graph` must be the host's graph about to be computed.
unsafe fn prepare(st: &mut State, h: &Host, cfg: &Config, graph: *mut c_void) -> bool {
    st.graphs = st.graphs.wrapping_add(1);
    let now = now_ms();
    if let Some(link) = &st.link {
        if now >= st.next_check_ms {
            st.next_check_ms = now + LIVENESS_INTERVAL_MS;
            if !link.alive() {
                let drops = link.producer.stats().drops;
                log(&format!(
                    "listener {} left after {} frames ({drops} dropped, {} graphs unlabelled); \
                     waiting for the next one",
                    link.connection, st.frame_seq, st.graphs_skipped
                ));
                st.link = None;
            }
        }
    } else if now >= st.next_connect_ms {
        st.next_connect_ms = now + CONNECT_INTERVAL_MS;
        match Link::connect(cfg, st.connections + 1) {
            Ok(Some(link)) => {
                st.connections += 1;
                st.frame_seq = 0;
                st.frames_dropped = 0;
                st.graphs_skipped = 0;
                st.unlabelled_logged = false;
                st.next_check_ms = now + LIVENESS_INTERVAL_MS;
                log(&format!(
                    "listener {} attached at {} ({} MiB ring)",
                    st.connections,
                    cfg.sink,
                    cfg.ring_bytes >> 20
                ));
                st.link = Some(link);
            }
            Ok(None) => {}
            Err(e) => log(&format!(
                "could not attach to the listener at {}: {e}",
                cfg.sink
            )),
        }
    }
    if st.link.is_none() {
        return false;
    }
    if !st.layout_checked {
        // SAFETY: the host's graph (caller); its first node is a live tensor.
        let first = unsafe {
            if (h.graph_n_nodes)(graph) > 0 {
                (h.graph_node)(graph, 0)
            } else {
                std::ptr::null_mut()
            }
        };
        if first.is_null() {
            return false;
        }
        // SAFETY: a live tensor of the host.
        if let Err(e) = unsafe { h.check_layout(first) } {
            turn_off(
                st,
                format!("this llama.cpp's ggml_tensor differs from what the tap reads ({e})"),
            );
            return false;
        }
        st.layout_checked = true;
    }
    // SAFETY: the host's graph (caller).
    unsafe { read_inputs(h, graph, &mut st.rows) };
    let taken = BATCH.with(|b| {
        b.try_borrow_mut()
            .map_err(|_| Mismatch::NoBatch)
            .and_then(|mut b| b.take(&st.rows, &mut st.labels))
    });
    match taken {
        Ok(()) => true,
        Err(m @ Mismatch::Unknown { .. }) => {
            turn_off(st, format!("cannot label rows: {m}"));
            false
        }
        Err(m) => {
            st.labels.clear();
            st.graphs_skipped += 1;
            if !st.unlabelled_logged {
                st.unlabelled_logged = true;
                log(&format!("a graph was not tapped: {m}"));
            }
            false
        }
    }
}

/// Runs the host's `compute` with the tap around it.
///
/// # Safety
///
/// As the host's `ggml_backend_sched_graph_compute(_async)`.
unsafe fn around_compute(
    sched: *mut c_void,
    graph: *mut c_void,
    real: unsafe extern "C" fn(*mut c_void, *mut c_void) -> i32,
) -> i32 {
    let Ok(h) = host::host() else {
        // SAFETY: the host's function, called with the host's arguments.
        return unsafe { real(sched, graph) };
    };
    let mut guard = STATE.try_lock().ok();
    let entry = sched_entry(sched);
    let tap = catch_unwind(AssertUnwindSafe(|| {
        let (Some(g), Some(cfg)) = (guard.as_mut(), config()) else {
            return false;
        };
        let st = g.get_or_insert_with(State::default);
        if st.off.is_some() {
            return false;
        }
        // SAFETY: the host's graph about to be computed.
        unsafe { prepare(st, h, cfg, graph) }
    }))
    .unwrap_or_else(|_| {
        if let Some(st) = guard.as_mut().and_then(|g| g.as_mut()) {
            turn_off(st, "internal error (panic) while preparing a graph".into());
        }
        false
    });
    let Some(e) = entry else {
        // SAFETY: as above.
        return unsafe { real(sched, graph) };
    };
    if tap {
        // SAFETY: installing a callback on the host's scheduler, with a
        // 'static user pointer.
        unsafe {
            (h.set_eval_callback)(sched, Some(tap_callback), e as *const Sched as *mut c_void)
        };
        e.ours.store(true, Ordering::Release);
        let st = guard
            .as_mut()
            .and_then(|g| g.as_mut())
            .expect("tapping implies a state");
        CURRENT.set(st as *mut State);
    } else if e.ours.swap(false, Ordering::AcqRel) {
        let (cb, ud) = host_cb(e);
        // SAFETY: restoring the host's own callback.
        unsafe { (h.set_eval_callback)(sched, cb, ud) };
    }
    // SAFETY: the host's function with the host's arguments.
    let r = unsafe { real(sched, graph) };
    CURRENT.set(std::ptr::null_mut());
    r
}

/// Copies one selected node's labelled rows into the ring.
fn write_frame(st: &mut State, cfg: &Config, t: &Tensor, pattern: u32) {
    let Ok(h) = host::host() else { return };
    // Per-token rows (F32/F16/BF16, any strides on the host; contiguous rows
    // on a device, which are fetched whole).
    let Some(ts) = ggml_type_size(t.typ as u32) else {
        return;
    };
    // SAFETY: a live node the scheduler just computed.
    let on_host = !t.buffer.is_null() && unsafe { (h.buffer_is_host)(t.buffer) };
    if st.labels.is_empty()
        || t.ne[2] != 1
        || t.ne[3] != 1
        || t.ne[0] <= 0
        || (!on_host && t.nb[0] != ts)
    {
        return;
    }
    let width = t.ne[0] as usize;
    let n_src = t.ne[1].max(0) as usize;
    // Row `i` of the node is ubatch row `i`, or (the last layer, pruned to the
    // rows with logits) ubatch row `out_ids[i]`.
    st.pick.clear();
    if n_src == st.labels.len() {
        st.pick.extend(0..n_src);
    } else if n_src == st.rows.out_ids.len() {
        st.pick
            .extend(st.rows.out_ids.iter().map(|&r| r.max(0) as usize));
    } else {
        return;
    }
    let labels = &st.labels;
    let keep =
        |i: usize, r: usize| r < labels.len() && (!cfg.last_only || labels[r].output) && i < n_src;
    let n_rows = st
        .pick
        .iter()
        .enumerate()
        .filter(|&(i, &r)| keep(i, r))
        .count();
    if n_rows == 0 {
        return;
    }
    let dtype = cfg.dtype;
    let len = frame_len(n_rows, width, dtype);
    let seq = st.frame_seq;
    st.frame_seq += 1;
    let Some(link) = st.link.as_mut() else { return };
    let mut g = match link.producer.try_write(len) {
        Ok(g) => g,
        Err(e) => {
            link.producer.note_drop();
            st.frames_dropped += 1;
            if matches!(e, WriteError::TooLarge { .. }) && !st.too_large_logged {
                st.too_large_logged = true;
                log(&format!(
                    "a frame of {len} bytes does not fit the ring: raise LATENT_TAP_RING_MB"
                ));
            }
            return;
        }
    };
    let mut name = [0u8; 64];
    let tn = t.name();
    name[..tn.len().min(63)].copy_from_slice(&tn[..tn.len().min(63)]);
    let hdr = FrameHeader {
        kind: kind::FRAME,
        header_size: std::mem::size_of::<FrameHeader>() as u32,
        seq,
        step: st.graphs,
        ubatch: 0,
        tensor_index: pattern,
        layer: std::str::from_utf8(tn)
            .ok()
            .and_then(layer_of)
            .unwrap_or(-1),
        dtype: dtype as u32,
        n_rows: n_rows as u32,
        width: width as u64,
        ne: t.ne,
        name,
    };
    put(&mut g, 0, &hdr);
    let mut off = std::mem::size_of::<FrameHeader>();
    for (i, &r) in st.pick.iter().enumerate() {
        if !keep(i, r) {
            continue;
        }
        let l = &labels[r];
        let meta = RowMeta {
            seq_id: l.seq,
            pos: if l.pos == POS_UNSET { -1 } else { l.pos },
            token: l.token,
            flags: if l.output { ROW_OUTPUT } else { 0 },
        };
        put(&mut g, off, &meta);
        off += std::mem::size_of::<RowMeta>();
    }
    let src = SrcTensor {
        base: t.data as *const u8,
        ty: t.typ as u32,
        ne: t.ne,
        nb: t.nb,
    };
    let row_bytes = width * ts;
    let esz = dtype.size();
    for (i, &r) in st.pick.iter().enumerate() {
        if !keep(i, r) {
            continue;
        }
        let dst = &mut g[off..off + width * esz];
        if on_host {
            // SAFETY: row `i` (< ne[1]) of a computed host tensor, every
            // element addressed by its ne/nb readable.
            unsafe { src.copy_row(1, i, dtype, dst) };
        } else {
            st.staging.resize(row_bytes, 0);
            // SAFETY: one contiguous row into the staging buffer; ggml copies
            // it from the device.
            unsafe {
                (h.tensor_get)(
                    t,
                    st.staging.as_mut_ptr() as *mut c_void,
                    i * t.nb[1],
                    row_bytes,
                )
            };
            convert_run(&st.staging, src.ty, dst, dtype);
        }
        off += width * esz;
    }
    g.commit();
}

/// Writes a [`SeqRm`] if a listener is attached (best-effort).
fn note_seq_rm(seq: i32, p0: i32, p1: i32) {
    let _ = catch_unwind(|| {
        let Ok(mut g) = STATE.try_lock() else { return };
        let Some(st) = g.as_mut() else { return };
        let step = st.graphs;
        let Some(link) = st.link.as_mut() else { return };
        let rec = SeqRm::new(seq, p0, p1, step).to_bytes();
        match link.producer.try_write(rec.len()) {
            Ok(mut w) => {
                w.copy_from_slice(&rec);
                w.commit();
            }
            Err(_) => link.producer.note_drop(),
        }
    });
}

// ---------------------------------------------------------------------------
// Batches

fn record_llama_batch(b: &host::LlamaBatch) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        BATCH.with(|cur| {
            let Ok(mut cur) = cur.try_borrow_mut() else {
                return;
            };
            cur.reset();
            let n = b.n_tokens.max(0) as usize;
            for i in 0..n {
                // SAFETY: llama.h: each non-null array of a llama_batch has
                // `n_tokens` entries, `seq_id[i]` has `n_seq_id[i]`.
                unsafe {
                    let l = cur.at(i);
                    l.token = if b.token.is_null() {
                        -1
                    } else {
                        *b.token.add(i)
                    };
                    l.pos = if b.pos.is_null() {
                        POS_UNSET
                    } else {
                        *b.pos.add(i)
                    };
                    if !b.seq_id.is_null() && !b.n_seq_id.is_null() && *b.n_seq_id.add(i) > 0 {
                        l.seq = **b.seq_id.add(i);
                        l.multi_seq = *b.n_seq_id.add(i) > 1;
                    }
                    l.output = if b.logits.is_null() {
                        i + 1 == n
                    } else {
                        *b.logits.add(i) != 0
                    };
                }
            }
        })
    }));
}

fn end_batch() {
    BATCH.with(|cur| {
        if let Ok(mut cur) = cur.try_borrow_mut() {
            cur.active = false;
        }
    });
}

/// Shadows of the host's extended batches, by address.
static SHADOWS: Mutex<Vec<(usize, Batch)>> = Mutex::new(Vec::new());

fn with_shadow(b: *mut c_void, f: impl FnOnce(&mut Batch)) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let Ok(mut all) = SHADOWS.lock() else { return };
        let key = b as usize;
        let i = match all.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                let mut s = Batch::default();
                s.reset();
                all.push((key, s));
                all.len() - 1
            }
        };
        f(&mut all[i].1);
    }));
}

fn forget_shadow(b: *mut c_void) {
    if let Ok(mut all) = SHADOWS.lock() {
        all.retain(|(k, _)| *k != b as usize);
    }
}

fn begin_ext_batch(b: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let Ok(all) = SHADOWS.lock() else { return };
        BATCH.with(|cur| {
            let Ok(mut cur) = cur.try_borrow_mut() else {
                return;
            };
            cur.reset();
            if let Some((_, s)) = all.iter().find(|(k, _)| *k == b as usize) {
                cur.labels.extend_from_slice(&s.labels);
            } else {
                cur.active = false;
            }
        });
    }));
}

/// Log once at load whether this process can be tapped at all.
extern "C" fn at_load() {
    let _ = catch_unwind(|| {
        let Some(cfg) = config() else { return };
        match host::host() {
            Ok(_) => log(&format!(
                "loaded: tensors {}, layers {}, rows {}; frames go to a listener at {}",
                cfg.tensors,
                cfg.layers_text,
                if cfg.last_only { "last" } else { "all" },
                cfg.sink
            )),
            Err(missing) => log(&format!(
                "{missing} is not in this process (not a shared-library llama.cpp program?): \
                 the tap is off, the program runs untouched"
            )),
        }
    });
}

#[used]
#[link_section = ".init_array"]
static AT_LOAD: extern "C" fn() = at_load;

/// The interposed functions (exported C symbols).
pub mod interpose {
    use super::*;
    use std::ffi::CStr;

    /// The host's definition of `name`, resolved once per call site.
    macro_rules! real {
        ($name:literal, $ty:ty) => {{
            static P: AtomicUsize = AtomicUsize::new(0);
            let mut p = P.load(Ordering::Acquire);
            if p == 0 {
                const NAME: &CStr = $name;
                p = host::next(NAME) as usize;
                P.store(p, Ordering::Release);
            }
            // SAFETY: 0 or the host's function of this name, whose C signature
            // (llama.h, ggml-backend.h) is `$ty`.
            unsafe { std::mem::transmute::<usize, Option<$ty>>(p) }
        }};
    }

    /// Calls the host's `name` with `args`, or evaluates to `default` when the
    /// host has no such function.
    macro_rules! call_real {
        ($name:literal, $ty:ty, $default:expr; $($arg:expr),*) => {
            match real!($name, $ty) {
                // SAFETY: the host's function with the host's arguments.
                Some(f) => unsafe { f($($arg),*) },
                None => $default,
            }
        };
    }

    type ComputeFn = unsafe extern "C" fn(*mut c_void, *mut c_void) -> i32;

    /// `ggml_backend_sched_set_eval_callback`: keeps the host's callback.
    ///
    /// # Safety
    ///
    /// As ggml's.
    #[no_mangle]
    pub unsafe extern "C" fn ggml_backend_sched_set_eval_callback(
        sched: *mut c_void,
        cb: EvalCallback,
        ud: *mut c_void,
    ) {
        if let Some(e) = sched_entry(sched) {
            e.cb.store(cb.map_or(0, |f| f as usize), Ordering::Release);
            e.ud.store(ud as usize, Ordering::Release);
            e.ours.store(false, Ordering::Release);
        }
        if let Some(f) = real!(
            c"ggml_backend_sched_set_eval_callback",
            unsafe extern "C" fn(*mut c_void, EvalCallback, *mut c_void)
        ) {
            // SAFETY: the host's function with the host's arguments.
            unsafe { f(sched, cb, ud) }
        }
    }

    /// `ggml_backend_sched_graph_compute_async`.
    ///
    /// # Safety
    ///
    /// As ggml's.
    #[no_mangle]
    pub unsafe extern "C" fn ggml_backend_sched_graph_compute_async(
        sched: *mut c_void,
        graph: *mut c_void,
    ) -> i32 {
        match real!(c"ggml_backend_sched_graph_compute_async", ComputeFn) {
            // SAFETY: the host's function with the host's arguments.
            Some(f) => unsafe { around_compute(sched, graph, f) },
            None => STATUS_FAILED,
        }
    }

    /// `ggml_backend_sched_graph_compute`.
    ///
    /// # Safety
    ///
    /// As ggml's.
    #[no_mangle]
    pub unsafe extern "C" fn ggml_backend_sched_graph_compute(
        sched: *mut c_void,
        graph: *mut c_void,
    ) -> i32 {
        match real!(c"ggml_backend_sched_graph_compute", ComputeFn) {
            // SAFETY: the host's function with the host's arguments.
            Some(f) => unsafe { around_compute(sched, graph, f) },
            None => STATUS_FAILED,
        }
    }

    /// `llama_decode`: notes the batch's labels.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_decode(ctx: *mut c_void, batch: host::LlamaBatch) -> i32 {
        record_llama_batch(&batch);
        let r = call_real!(c"llama_decode", unsafe extern "C" fn(*mut c_void, host::LlamaBatch) -> i32, -2; ctx, batch);
        end_batch();
        r
    }

    /// `llama_process` (extended batch API): the batch's labels come from its shadow.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_process(ctx: *mut c_void, typ: i32, batch: *mut c_void) -> i32 {
        begin_ext_batch(batch);
        let r = call_real!(c"llama_process", unsafe extern "C" fn(*mut c_void, i32, *mut c_void) -> i32, -2; ctx, typ, batch);
        end_batch();
        r
    }

    /// `llama_batch_ext_init`.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_batch_ext_init(ctx: *mut c_void) -> *mut c_void {
        let b = match real!(
            c"llama_batch_ext_init",
            unsafe extern "C" fn(*mut c_void) -> *mut c_void
        ) {
            // SAFETY: the host's function with the host's arguments.
            Some(f) => unsafe { f(ctx) },
            None => std::ptr::null_mut(),
        };
        if !b.is_null() {
            forget_shadow(b);
            with_shadow(b, |_| {});
        }
        b
    }

    /// `llama_batch_ext_free`.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_batch_ext_free(b: *mut c_void) {
        forget_shadow(b);
        if let Some(f) = real!(c"llama_batch_ext_free", unsafe extern "C" fn(*mut c_void)) {
            // SAFETY: the host's function with the host's arguments.
            unsafe { f(b) }
        }
    }

    /// `llama_batch_ext_clear`.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_batch_ext_clear(b: *mut c_void) {
        with_shadow(b, |s| s.reset());
        if let Some(f) = real!(c"llama_batch_ext_clear", unsafe extern "C" fn(*mut c_void)) {
            // SAFETY: the host's function with the host's arguments.
            unsafe { f(b) }
        }
    }

    fn added(b: *mut c_void, idx: i32, seq: i32, token: i32) {
        if idx >= 0 {
            with_shadow(b, |s| {
                let l = s.at(idx as usize);
                l.token = token;
                l.seq = seq;
                l.pos = POS_UNSET;
                l.multi_seq = false;
                l.output = false;
            });
        }
    }

    /// `llama_batch_ext_add`.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_batch_ext_add(b: *mut c_void, seq: i32) -> i32 {
        let r = call_real!(c"llama_batch_ext_add", unsafe extern "C" fn(*mut c_void, i32) -> i32, -1; b, seq);
        added(b, r, seq, -1);
        r
    }

    /// `llama_batch_ext_add_token`.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_batch_ext_add_token(b: *mut c_void, seq: i32, id: i32) -> i32 {
        let r = call_real!(c"llama_batch_ext_add_token", unsafe extern "C" fn(*mut c_void, i32, i32) -> i32, -1; b, seq, id);
        added(b, r, seq, id);
        r
    }

    /// `llama_batch_ext_add_embd`.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_batch_ext_add_embd(
        b: *mut c_void,
        seq: i32,
        embd: host::LlamaEmbd,
    ) -> i32 {
        let r = call_real!(c"llama_batch_ext_add_embd", unsafe extern "C" fn(*mut c_void, i32, host::LlamaEmbd) -> i32, -1; b, seq, embd);
        added(b, r, seq, -1);
        r
    }

    /// `llama_batch_ext_add_seq`.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_batch_ext_add_seq(b: *mut c_void, idx: i32, seq: i32) -> bool {
        let r = call_real!(c"llama_batch_ext_add_seq", unsafe extern "C" fn(*mut c_void, i32, i32) -> bool, false; b, idx, seq);
        if r && idx >= 0 {
            with_shadow(b, |s| s.at(idx as usize).multi_seq = true);
        }
        r
    }

    /// `llama_batch_ext_set_pos`.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_batch_ext_set_pos(
        b: *mut c_void,
        idx: i32,
        pos: *const i32,
    ) -> bool {
        let r = call_real!(c"llama_batch_ext_set_pos", unsafe extern "C" fn(*mut c_void, i32, *const i32) -> bool, false; b, idx, pos);
        if r && idx >= 0 && !pos.is_null() {
            // SAFETY: llama.h: `pos` points at (at least) one position.
            let p = unsafe { *pos };
            with_shadow(b, |s| s.at(idx as usize).pos = p);
        }
        r
    }

    /// `llama_batch_ext_set_output_logits`.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_batch_ext_set_output_logits(
        b: *mut c_void,
        idx: i32,
        v: bool,
    ) -> bool {
        let r = call_real!(c"llama_batch_ext_set_output_logits", unsafe extern "C" fn(*mut c_void, i32, bool) -> bool, false; b, idx, v);
        if r && idx >= 0 {
            with_shadow(b, |s| s.at(idx as usize).output = v);
        }
        r
    }

    /// `llama_batch_ext_set_output_embd`.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_batch_ext_set_output_embd(
        b: *mut c_void,
        idx: i32,
        v: bool,
    ) -> bool {
        let r = call_real!(c"llama_batch_ext_set_output_embd", unsafe extern "C" fn(*mut c_void, i32, bool) -> bool, false; b, idx, v);
        if r && idx >= 0 {
            with_shadow(b, |s| s.at(idx as usize).output = v);
        }
        r
    }

    /// `llama_memory_seq_rm`: a request boundary in llama-server.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_memory_seq_rm(
        mem: *mut c_void,
        seq: i32,
        p0: i32,
        p1: i32,
    ) -> bool {
        let r = call_real!(c"llama_memory_seq_rm", unsafe extern "C" fn(*mut c_void, i32, i32, i32) -> bool, false; mem, seq, p0, p1);
        if r {
            note_seq_rm(seq, p0, p1);
        }
        r
    }

    /// `llama_memory_clear`.
    ///
    /// # Safety
    ///
    /// As llama.cpp's.
    #[no_mangle]
    pub unsafe extern "C" fn llama_memory_clear(mem: *mut c_void, data: bool) {
        if let Some(f) = real!(
            c"llama_memory_clear",
            unsafe extern "C" fn(*mut c_void, bool)
        ) {
            // SAFETY: the host's function with the host's arguments.
            unsafe { f(mem, data) }
        }
        note_seq_rm(-1, -1, -1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_is_remembered_per_name_and_agrees_with_the_patterns() {
        let cfg = Config::from_lookup(|k| {
            (k == "LATENT_TAP_TENSORS").then(|| "attn_out-*,l_out-*".to_string())
        })
        .unwrap();
        let mut st = State::default();
        for _ in 0..3 {
            for name in [&b"l_out-3"[..], b"attn_out-0", b"norm-2", b"l_out-3"] {
                assert_eq!(st.selected(&cfg, name), cfg.select(name), "{name:?}");
            }
        }
        // Three distinct names, each matched once.
        assert_eq!(st.names.len(), 3);
        assert_eq!(st.names.get(&b"norm-2"[..]), Some(&None));
    }
}
