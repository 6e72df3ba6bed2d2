//! The interposed functions (exported C symbols).

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::resolve::resolve;

use crate::host::{self, EvalCallback};
use crate::labels::POS_UNSET;

use super::batch::{
    begin_ext_batch, end_batch, forget_shadow, note_seq_rm, record_llama_batch, with_shadow,
};
use super::callback::sched_entry;
use super::compute::around_compute;

/// `GGML_STATUS_FAILED`.
const STATUS_FAILED: i32 = -1;

/// Every interposed function: the host's definition it forwards to (0: not
/// found yet), by name.
macro_rules! interposed {
    ($($f:ident),* $(,)?) => {
        #[allow(non_upper_case_globals)]
        mod slot {
            use std::sync::atomic::AtomicUsize;
            $( pub(super) static $f: AtomicUsize = AtomicUsize::new(0); )*
        }

        /// For `dlsym`: this library's function of that name and its slot.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        fn lookup(name: &[u8]) -> Option<(usize, &'static AtomicUsize)> {
            $( if name == stringify!($f).as_bytes() {
                return Some(($f as *const () as usize, &slot::$f));
            } )*
            None
        }
    };
}

interposed!(
    ggml_backend_sched_set_eval_callback,
    ggml_backend_sched_graph_compute_async,
    ggml_backend_sched_graph_compute,
    llama_decode,
    llama_process,
    llama_batch_ext_init,
    llama_batch_ext_free,
    llama_batch_ext_clear,
    llama_batch_ext_add,
    llama_batch_ext_add_token,
    llama_batch_ext_add_embd,
    llama_batch_ext_add_seq,
    llama_batch_ext_set_pos,
    llama_batch_ext_set_output_logits,
    llama_batch_ext_set_output_embd,
    llama_memory_seq_rm,
    llama_memory_clear,
);

/// The host's definition of `$f`, resolved at its first call (the host may
/// load llama.cpp long after this library) and kept; `None` (logged once):
/// the process has none.
macro_rules! real {
    ($f:ident, $ty:ty) => {{
        let mut p = slot::$f.load(Ordering::Acquire);
        if p == 0 {
            const NAME: &CStr =
                match CStr::from_bytes_with_nul(concat!(stringify!($f), "\0").as_bytes()) {
                    Ok(n) => n,
                    Err(_) => panic!("bad name"),
                };
            p = resolve(NAME, $f as *const () as usize).unwrap_or(0);
            if p == 0 {
                static LOGGED: AtomicBool = AtomicBool::new(false);
                if !LOGGED.swap(true, Ordering::Relaxed) {
                    super::log(&format!(
                        "{} is not in this process: the call fails as the host's would without it",
                        stringify!($f)
                    ));
                }
            } else {
                let _ = slot::$f.compare_exchange(0, p, Ordering::AcqRel, Ordering::Acquire);
                p = slot::$f.load(Ordering::Acquire);
            }
        }
        // SAFETY: 0 or the host's function of this name, whose C signature
        // (llama.h, ggml-backend.h) is `$ty`.
        unsafe { std::mem::transmute::<usize, Option<$ty>>(p) }
    }};
}

/// Calls the host's `$f` with `args`, or evaluates to `default` when the
/// host has no such function.
macro_rules! call_real {
    ($f:ident, $ty:ty, $default:expr; $($arg:expr),*) => {
        match real!($f, $ty) {
            // SAFETY: the host's function with the host's arguments.
            Some(f) => unsafe { f($($arg),*) },
            None => $default,
        }
    };
}

/// `dlsym`: glibc's, except that a host looking up an interposed llama.cpp
/// function in its own handle (ctypes: `dlsym(libllama, "llama_decode")`)
/// gets this library's (see [`crate::resolve`]). `RTLD_NEXT` lookups must
/// see their caller's return address, so they jump straight to glibc's.
///
/// # Safety
///
/// As glibc's.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // RTLD_NEXT is (void *) -1. A tail jump keeps the caller's return
    // address, which glibc reads to know whose "next" is meant; everything
    // else goes to `dlsym_rust`.
    std::arch::naked_asm!(
        "cmp rdi, -1",
        "jne 2f",
        "mov rax, qword ptr [rip + {real}]",
        "test rax, rax",
        "jz 2f",
        "jmp rax",
        "2:",
        "jmp {imp}",
        real = sym REAL_DLSYM_FOR_ASM,
        imp = sym dlsym_rust,
    )
}

/// glibc's `dlsym` for the `RTLD_NEXT` jump of [`dlsym`] (0 until known).
static REAL_DLSYM_FOR_ASM: AtomicUsize = AtomicUsize::new(0);

/// Set [`REAL_DLSYM_FOR_ASM`] (at load, before the host runs).
pub(super) fn init_dlsym() {
    if let Some(f) = crate::resolve::real_dlsym() {
        REAL_DLSYM_FOR_ASM.store(f as usize, Ordering::Release);
    }
}

#[cfg(target_arch = "x86_64")]
unsafe extern "C" fn dlsym_rust(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // SAFETY: the caller's arguments, as dlsym's.
    unsafe { crate::resolve::dlsym_impl(handle, name, lookup) }
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
        ggml_backend_sched_set_eval_callback,
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
    match real!(ggml_backend_sched_graph_compute_async, ComputeFn) {
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
    match real!(ggml_backend_sched_graph_compute, ComputeFn) {
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
    let r = call_real!(llama_decode, unsafe extern "C" fn(*mut c_void, host::LlamaBatch) -> i32, -2; ctx, batch);
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
    let r = call_real!(llama_process, unsafe extern "C" fn(*mut c_void, i32, *mut c_void) -> i32, -2; ctx, typ, batch);
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
        llama_batch_ext_init,
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
    if let Some(f) = real!(llama_batch_ext_free, unsafe extern "C" fn(*mut c_void)) {
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
    if let Some(f) = real!(llama_batch_ext_clear, unsafe extern "C" fn(*mut c_void)) {
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
    let r =
        call_real!(llama_batch_ext_add, unsafe extern "C" fn(*mut c_void, i32) -> i32, -1; b, seq);
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
    let r = call_real!(llama_batch_ext_add_token, unsafe extern "C" fn(*mut c_void, i32, i32) -> i32, -1; b, seq, id);
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
    let r = call_real!(llama_batch_ext_add_embd, unsafe extern "C" fn(*mut c_void, i32, host::LlamaEmbd) -> i32, -1; b, seq, embd);
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
    let r = call_real!(llama_batch_ext_add_seq, unsafe extern "C" fn(*mut c_void, i32, i32) -> bool, false; b, idx, seq);
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
    let r = call_real!(llama_batch_ext_set_pos, unsafe extern "C" fn(*mut c_void, i32, *const i32) -> bool, false; b, idx, pos);
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
    let r = call_real!(llama_batch_ext_set_output_logits, unsafe extern "C" fn(*mut c_void, i32, bool) -> bool, false; b, idx, v);
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
    let r = call_real!(llama_batch_ext_set_output_embd, unsafe extern "C" fn(*mut c_void, i32, bool) -> bool, false; b, idx, v);
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
    let r = call_real!(llama_memory_seq_rm, unsafe extern "C" fn(*mut c_void, i32, i32, i32) -> bool, false; mem, seq, p0, p1);
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
    if let Some(f) = real!(llama_memory_clear, unsafe extern "C" fn(*mut c_void, bool)) {
        // SAFETY: the host's function with the host's arguments.
        unsafe { f(mem, data) }
    }
    note_seq_rm(-1, -1, -1);
}
