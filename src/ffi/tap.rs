//! Mode 2: plug a tap into an app that drives llama.cpp itself.
//!
//! ```c
//! lt_tap *tap; lt_tap_new(model, &cap, n_ubatch, &tap);   // 1. from a spec
//! lt_tap_attach(tap, &ctx_params);                         // 2. before llama_init_from_model
//! lt_tap_begin_batch(tap, ctx, &batch, step);              // 3. before each llama_decode
//! ```
//! The app must use the llama.cpp inside this library (link the static
//! `liblatent_tap.a`, which carries and exports it), so both share one build.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llama_cpp_sys_2 as sys;

use super::event::{lt_event, Next, Reader, EVENT_MIN};
use super::params::{capture_spec, lt_capture_params};
use super::{guard, lt_status, nonnull, write_sized, FfiError};
use crate::capture::{self, abort_callback, abort_flag_ptr, eval_callback, Tap};
use crate::engine::{ContextOptions, Model};
use crate::record::{RowMeta, TokenHeader, ROW_PROMPT};
use crate::tokens::token_stats;

/// A tap for an app-owned llama.cpp context (opaque).
pub struct lt_tap {
    // Raw so that the decode thread (through llama.cpp's callback) and a reader
    // thread never hold Rust references to the same allocation.
    tap: *mut Tap,
    producing: AtomicBool,
    reader: Mutex<Reader>,
    model: Arc<Model>,
    last_step: std::cell::Cell<Option<u32>>,
    ubatch_base: std::cell::Cell<u32>,
    rows: std::cell::RefCell<Vec<RowMeta>>,
    outputs: std::cell::RefCell<Vec<bool>>,
    // Decided when the tap is created; see `lt_tap_capture_mode`.
    mode: u32,
}

impl std::fmt::Debug for lt_tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Producer-side state belongs to the decoding thread; show the flags only.
        f.debug_struct("lt_tap")
            .field("producing", &self.producing)
            .finish_non_exhaustive()
    }
}

// SAFETY: producer-side state (tap, last_step, ubatch_base, rows, outputs) is only
// touched under the `producing` flag; the reader is behind a Mutex.
unsafe impl Sync for lt_tap {}
// SAFETY: the tap owns its data; the raw Tap pointer is uniquely owned.
unsafe impl Send for lt_tap {}

/// Check that `i` names an output row of the batch whose flags are `outputs`,
/// the way `llama_get_logits_ith` resolves it.
fn check_batch_index(outputs: &[bool], i: i32) -> Result<(), FfiError> {
    let n_out = outputs.iter().filter(|&&o| o).count();
    let ok = if i < 0 {
        (i.unsigned_abs() as usize) <= n_out
    } else {
        outputs.get(i as usize) == Some(&true)
    };
    if ok {
        return Ok(());
    }
    let mut rows: Vec<String> = outputs
        .iter()
        .enumerate()
        .filter(|(_, &o)| o)
        .map(|(i, _)| i.to_string())
        .take(9)
        .collect();
    if rows.len() == 9 {
        rows[8] = "...".into();
    }
    Err(FfiError::new(
        lt_status::LT_INVALID_ARGUMENT,
        if outputs.is_empty() {
            format!(
                "batch index {i}: no batch was begun (call lt_tap_begin_batch before llama_decode)"
            )
        } else {
            format!(
                "batch index {i} has no logits: the last batch ({} tokens) has logits at index {}, or use -1..-{n_out}",
                outputs.len(),
                rows.join(", ")
            )
        },
    ))
}

/// Holds a tap's `producing` flag; clears it when dropped, so a panic caught
/// at the C boundary (see `guard`) does not leave the tap answering LT_BUSY.
struct Producing<'a>(&'a AtomicBool);

impl Producing<'_> {
    /// Take `flag`, or LT_BUSY when another thread holds it.
    fn enter(flag: &AtomicBool) -> Result<Producing<'_>, FfiError> {
        if flag.swap(true, Ordering::Acquire) {
            return Err(FfiError::new(
                lt_status::LT_BUSY,
                "another thread is feeding this tap",
            ));
        }
        Ok(Producing(flag))
    }
}

impl Drop for Producing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Enter the producer side exclusively, or LT_BUSY.
fn producing<R>(
    t: &lt_tap,
    f: impl FnOnce(&mut Tap) -> Result<R, FfiError>,
) -> Result<R, FfiError> {
    let _producing = Producing::enter(&t.producing)?;
    // SAFETY: `producing` gives this thread exclusive access to the Tap outside llama_decode.
    f(unsafe { &mut *t.tap })
}

/// Create a tap for `model` (the app's `struct llama_model *`) capturing what
/// `capture` selects (NULL: defaults). `n_ubatch` is the app context's
/// `n_ubatch`, used to check that frames fit the ring. The tap probes the
/// graph with a small private context, so patterns are checked here.
///
/// Thread-safe. The model must outlive the tap.
#[no_mangle]
pub extern "C" fn lt_tap_new(
    model: *const sys::llama_model,
    capture: *const lt_capture_params,
    n_ubatch: u32,
    out: *mut *mut lt_tap,
) -> lt_status {
    guard(|| {
        nonnull(model, "model")?;
        nonnull(out, "out")?;
        let spec = if capture.is_null() {
            Default::default()
        } else {
            capture_spec(capture)?
        };
        if spec.captures_nothing() {
            return Err(FfiError::new(
                lt_status::LT_INVALID_ARGUMENT,
                "a tap needs at least one pattern",
            ));
        }
        if n_ubatch == 0 {
            return Err(FfiError::new(
                lt_status::LT_INVALID_ARGUMENT,
                "n_ubatch must be positive",
            ));
        }
        // SAFETY: non-NULL model pointer owned by the app, which keeps it alive.
        let model = unsafe { Model::borrow_raw(model as *mut sys::llama_model) };
        let opts = ContextOptions {
            n_ctx: 64,
            n_batch: 8,
            n_ubatch: 8,
            ..ContextOptions::default()
        };
        let (ctx, graph) = crate::engine::probe_context(model.clone(), &opts)?;
        drop(ctx);
        let (tap, stream) = capture::arm(Some(&graph), spec.arming(n_ubatch as usize)?)?;
        let mode = super::mode_code(tap.mode().used);
        let t = lt_tap {
            mode,
            tap: Box::into_raw(Box::new(tap)),
            producing: AtomicBool::new(false),
            reader: Mutex::new(Reader::new(stream)),
            model,
            last_step: Default::default(),
            ubatch_base: Default::default(),
            rows: Default::default(),
            outputs: Default::default(),
        };
        // SAFETY: out is non-NULL and writable.
        unsafe { out.write(Box::into_raw(Box::new(t))) };
        Ok(())
    })
}

/// Free a tap. NULL is a no-op. Call it only after `llama_free` of every
/// context it is attached to (the context calls into the tap while it lives).
///
/// Must not race with other calls on the same tap.
#[no_mangle]
pub extern "C" fn lt_tap_free(tap: *mut lt_tap) {
    guard(|| {
        if !tap.is_null() {
            // SAFETY: from lt_tap_new, freed once; `tap.tap` came from Box::into_raw.
            let t = unsafe { Box::from_raw(tap) };
            // SAFETY: as above; no context calls into it any more (documented contract).
            drop(unsafe { Box::from_raw(t.tap) });
        }
        Ok(())
    });
}

/// Install the tap into `params` before `llama_init_from_model`: sets
/// `cb_eval`, `cb_eval_user_data`, `abort_callback(_data)` (used to cancel a
/// decode when a lossless ring times out) and `kv_unified = true` (keeps
/// llama.cpp's ubatch split sequential, which row alignment relies on).
///
/// Not thread-safe with other producer-side calls on the same tap.
#[no_mangle]
pub extern "C" fn lt_tap_attach(
    tap: *mut lt_tap,
    params: *mut sys::llama_context_params,
) -> lt_status {
    guard(|| {
        let t = nonnull(tap, "tap")?;
        nonnull(params, "params")?;
        producing(t, |tap| {
            // SAFETY: params is non-NULL and points to the app's writable struct.
            let p = unsafe { &mut *params };
            p.cb_eval = Some(eval_callback);
            p.cb_eval_user_data = tap as *mut Tap as *mut c_void;
            p.abort_callback = Some(abort_callback);
            p.abort_callback_data = abort_flag_ptr(tap);
            p.kv_unified = true;
            Ok(())
        })
    })
}

/// Tell the tap which batch the next `llama_decode(ctx, *batch)` computes, so
/// frame rows map to `(seq_id, pos, token)`. `step` is the app's generation step
/// (0 for the prompt; rows of step 0 are flagged as prompt). `batch->pos` must
/// be set; a NULL `batch->logits` means "last token only", as in llama.cpp.
///
/// Call on the decoding thread, before each llama_decode (else LT_BUSY).
#[no_mangle]
pub extern "C" fn lt_tap_begin_batch(
    tap: *mut lt_tap,
    ctx: *const sys::llama_context,
    batch: *const sys::llama_batch,
    step: u32,
) -> lt_status {
    guard(|| {
        let t = nonnull(tap, "tap")?;
        nonnull(ctx, "ctx")?;
        let b = nonnull(batch, "batch")?;
        if b.n_tokens <= 0 || b.pos.is_null() {
            return Err(FfiError::new(
                lt_status::LT_INVALID_ARGUMENT,
                "batch must have n_tokens > 0 and pos set",
            ));
        }
        let n = b.n_tokens as usize;
        producing(t, |tap| {
            let mut rows = t.rows.borrow_mut();
            let mut outputs = t.outputs.borrow_mut();
            rows.clear();
            outputs.clear();
            for i in 0..n {
                // SAFETY: llama_batch arrays hold n_tokens entries when non-NULL.
                unsafe {
                    let token = if b.token.is_null() {
                        -1
                    } else {
                        *b.token.add(i)
                    };
                    let seq =
                        if b.seq_id.is_null() || b.n_seq_id.is_null() || *b.n_seq_id.add(i) < 1 {
                            0
                        } else {
                            **b.seq_id.add(i)
                        };
                    let out = if b.logits.is_null() {
                        i + 1 == n
                    } else {
                        *b.logits.add(i) != 0
                    };
                    rows.push(RowMeta {
                        seq_id: seq,
                        pos: *b.pos.add(i),
                        token,
                        flags: if step == 0 { ROW_PROMPT } else { 0 },
                    });
                    outputs.push(out);
                }
            }
            // Consecutive batches of one step (a prompt over n_batch) continue the ubatch count.
            let base = if t.last_step.get() == Some(step) {
                t.ubatch_base.get() + tap.ubatches_seen()
            } else {
                0
            };
            t.last_step.set(Some(step));
            t.ubatch_base.set(base);
            // SAFETY: valid context pointer from the app.
            let n_ubatch = unsafe { sys::llama_n_ubatch(ctx) } as usize;
            tap.begin_decode(step, base, n_ubatch, &rows, &outputs);
            Ok(())
        })
    })
}

/// Optional: after a decode, add the token the app sampled to the stream, with
/// its logprob, entropy and `top_k` alternatives computed from
/// `llama_get_logits_ith(ctx, batch_index)`.
///
/// `batch_index` is the index llama.cpp's `llama_get_logits_ith` takes: the
/// token's index in the batch passed to the last `lt_tap_begin_batch` /
/// `llama_decode` (whose `logits` flag must be set; for a prompt batch with
/// logits on its last token only, that is `n_tokens - 1`), or a negative index
/// counting back from the last output (-1 = last). Other indices fail with
/// `LT_INVALID_ARGUMENT` before llama.cpp is asked.
///
/// Call on the decoding thread (else LT_BUSY).
#[no_mangle]
pub extern "C" fn lt_tap_push_token(
    tap: *mut lt_tap,
    ctx: *mut sys::llama_context,
    batch_index: i32,
    token: i32,
    seq_id: i32,
    pos: i32,
    step: u32,
    top_k: u32,
) -> lt_status {
    guard(|| {
        let t = nonnull(tap, "tap")?;
        nonnull(ctx, "ctx")?;
        let n_vocab = t.model.n_vocab();
        if token < 0 || token as usize >= n_vocab {
            return Err(FfiError::new(
                lt_status::LT_INVALID_ARGUMENT,
                format!("token {token} is outside the vocabulary"),
            ));
        }
        producing(t, |tap| {
            check_batch_index(&t.outputs.borrow(), batch_index)?;
            // SAFETY: valid context; the index names an output row of the last batch
            // (checked above), and llama.cpp returns NULL for a bad one anyway.
            let p = unsafe { sys::llama_get_logits_ith(ctx, batch_index) };
            if p.is_null() {
                return Err(FfiError::new(
                    lt_status::LT_INVALID_ARGUMENT,
                    format!("llama.cpp has no logits for batch index {batch_index}"),
                ));
            }
            // SAFETY: a logits row has n_vocab floats, valid until the next decode.
            let logits = unsafe { std::slice::from_raw_parts(p, n_vocab) };
            let st = token_stats(logits, token, top_k as usize);
            let piece = t.model.token_bytes(token);
            let h = TokenHeader::event(step, seq_id, pos, token, 0, st.logprob, st.entropy);
            Ok(tap.push_token(h, &st.top, &piece)?)
        })
    })
}

/// Read the next event (frames, and tokens pushed with `lt_tap_push_token`),
/// waiting up to `timeout_ms` (0 polls: returns at once); LT_TIMEOUT if none.
/// Releases the previous event. Set `event->struct_size = sizeof(lt_event)` first.
/// A reader thread may call this while another thread decodes.
///
/// A tap has no END event: the app knows when it stops decoding. Every frame
/// of a decode is in the ring (or counted as dropped) once `llama_decode`
/// returns, so after it returns, reading with `timeout_ms = 0` until
/// LT_TIMEOUT yields exactly that decode's frames.
///
/// One reader thread at a time (else LT_BUSY).
#[no_mangle]
pub extern "C" fn lt_tap_next(
    tap: *mut lt_tap,
    timeout_ms: u32,
    event: *mut lt_event,
) -> lt_status {
    guard(|| {
        let t = nonnull(tap, "tap")?;
        nonnull(event, "event")?;
        let mut r = t
            .reader
            .try_lock()
            .map_err(|_| FfiError::new(lt_status::LT_BUSY, "another thread is reading this tap"))?;
        match r.next(Duration::from_millis(timeout_ms as u64))? {
            Next::Event(ev) => write_sized(event, ev, EVENT_MIN, "event"),
            Next::Timeout => Err(FfiError::new(
                lt_status::LT_TIMEOUT,
                "no event within the timeout",
            )),
        }
    })
}

/// Release the current event so the ring can reuse its space.
///
/// One reader thread at a time (else LT_BUSY).
#[no_mangle]
pub extern "C" fn lt_tap_release(tap: *mut lt_tap) -> lt_status {
    guard(|| {
        let t = nonnull(tap, "tap")?;
        let mut r = t
            .reader
            .try_lock()
            .map_err(|_| FfiError::new(lt_status::LT_BUSY, "another thread is reading this tap"))?;
        r.release();
        Ok(())
    })
}

/// Records committed to the ring so far (frames and token events) and frames
/// dropped by a drop-newest ring (out-params may be NULL).
///
/// Thread-safe.
#[no_mangle]
pub extern "C" fn lt_tap_counters(
    tap: *const lt_tap,
    records: *mut u64,
    drops: *mut u64,
) -> lt_status {
    guard(|| {
        let t = nonnull(tap, "tap")?;
        let r = t
            .reader
            .try_lock()
            .map_err(|_| FfiError::new(lt_status::LT_BUSY, "another thread is reading this tap"))?;
        let s = r.stream().ring_stats();
        for (p, v) in [(records, s.records), (drops, s.drops)] {
            if !p.is_null() {
                // SAFETY: non-NULL out-param.
                unsafe { p.write(v) };
            }
        }
        Ok(())
    })
}

/// How this tap gets tensors out of the graph: 1 = callback, 2 = deferred (see
/// `lt_capture_params.capture_mode`). Deferred needs the program to be linked
/// with the scheduler wrappers (`pkg-config --libs latent_tap-static` lists the
/// flags); without them the tap uses callback mode and this says 1.
///
/// Thread-safe.
#[no_mangle]
pub extern "C" fn lt_tap_capture_mode(tap: *const lt_tap, mode: *mut u32) -> lt_status {
    guard(|| {
        let t = nonnull(tap, "tap")?;
        nonnull(mode, "mode")?;
        // SAFETY: non-NULL out-param.
        unsafe { mode.write(t.mode) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_producing_leaves_the_tap_usable() {
        let flag = AtomicBool::new(false);
        // Held: a second producer is refused.
        let Ok(held) = Producing::enter(&flag) else {
            panic!("a new tap is busy");
        };
        let busy = Producing::enter(&flag).map(|_| ());
        assert_eq!(busy.map_err(|e| e.0), Err(lt_status::LT_BUSY));
        drop(held);
        assert!(!flag.load(Ordering::Acquire));
        // A panic inside the guarded region, caught at the C boundary as every
        // entry point catches it: the flag is released on the way out.
        let st = guard(|| {
            let _p = Producing::enter(&flag)?;
            panic!("simulated panic inside a producer-side call");
        });
        assert_eq!(st, lt_status::LT_INTERNAL);
        assert!(!flag.load(Ordering::Acquire), "the panic left the tap busy");
        let again = Producing::enter(&flag).map(|_| ());
        assert!(
            again.is_ok(),
            "the tap answers LT_BUSY after a caught panic"
        );
        // And an error return releases it too.
        let st = guard(|| {
            let _p = Producing::enter(&flag)?;
            Err(FfiError::new(lt_status::LT_INVALID_ARGUMENT, "refused"))
        });
        assert_eq!(st, lt_status::LT_INVALID_ARGUMENT);
        assert!(!flag.load(Ordering::Acquire));
    }
}
