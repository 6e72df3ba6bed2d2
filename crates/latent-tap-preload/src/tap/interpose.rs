//! The interposed functions (exported C symbols).

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::host::{self, EvalCallback};
use crate::labels::POS_UNSET;

use super::batch::{
    begin_ext_batch, end_batch, forget_shadow, note_seq_rm, record_llama_batch, with_shadow,
};
use super::callback::sched_entry;
use super::compute::around_compute;

/// `GGML_STATUS_FAILED`.
const STATUS_FAILED: i32 = -1;

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
pub unsafe extern "C" fn llama_memory_seq_rm(mem: *mut c_void, seq: i32, p0: i32, p1: i32) -> bool {
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
