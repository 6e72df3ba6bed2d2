//! The C entry points llama.cpp calls: the eval callback (ask and data phases)
//! and the abort callback. Neither ever unwinds into C.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};

use llama_cpp_sys_2 as sys;

use super::Tap;

/// The tensor's name up to its NUL.
pub(super) fn tensor_name(t: &sys::ggml_tensor) -> &[u8] {
    // SAFETY: c_char and u8 have the same layout; the array lives as long as `t`.
    let bytes: &[u8; 64] = unsafe { &*(&t.name as *const _ as *const [u8; 64]) };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(64);
    &bytes[..end]
}

/// `cb_eval` entry point. Never unwinds into C.
///
/// # Safety
/// `user` must be the `Tap` registered with this context and `t` a valid tensor,
/// as llama.cpp guarantees; it calls from the decoding thread only.
pub unsafe extern "C" fn eval_callback(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user: *mut c_void,
) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if t.is_null() || user.is_null() {
            return false;
        }
        // SAFETY: per the contract above; no other reference to the tap exists during decode.
        let tap = unsafe { &mut *(user as *mut Tap) };
        // SAFETY: t is valid for the duration of the call.
        let t = unsafe { &*t };
        if ask {
            tap.on_ask(t)
        } else {
            tap.on_data(t)
        }
    }))
    .unwrap_or(false)
}

/// Where a tap's abort flag lives, for `llama_context_params.abort_callback_data`.
pub(crate) fn abort_flag_ptr(tap: &Tap) -> *mut c_void {
    &*tap.abort as *const AtomicBool as *mut c_void
}

/// `abort_callback`: true once the tap has failed, so llama.cpp stops computing.
///
/// # Safety
/// `data` must be the pointer returned by [`abort_flag_ptr`] for a live tap.
pub(crate) unsafe extern "C" fn abort_callback(data: *mut c_void) -> bool {
    if data.is_null() {
        return false;
    }
    // SAFETY: data points to the tap's boxed AtomicBool, which outlives the context.
    unsafe { &*(data as *const AtomicBool) }.load(Ordering::Relaxed)
}
