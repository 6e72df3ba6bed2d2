//! Mode 1: the library runs the model. A session owns a tapped context and a
//! generation thread; the caller's thread only reads the ordered stream.

use std::ffi::{c_char, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::event::{lt_event, Next, Reader, EVENT_MIN, LT_EVENT_END};
use super::params::{
    capture_spec, context_options, context_params, generate_options, lt_capture_params,
    lt_context_params, lt_sampling_params,
};
use super::{c_str, guard, lt_status, nonnull, write_sized, FfiError};
use crate::engine::{Model, ModelOptions};
use crate::error::Error;
use crate::session::{Generator, RunStats};
use crate::steer::{ControlVector, Edits, Patch, Positions, Steer};

/// A loaded model (opaque). Shareable by several sessions and threads.
#[derive(Debug)]
pub struct lt_model {
    pub(crate) model: Arc<Model>,
}

/// A generation session (opaque): one tapped context plus its stream.
pub struct lt_session {
    // Decided when the session is created; see `lt_session_capture_mode`.
    mode: u32,
    busy: AtomicBool,
    cancel: Arc<AtomicBool>,
    state: std::cell::UnsafeCell<SessionState>,
}

impl std::fmt::Debug for lt_session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The state is only read by the thread that holds `busy`; show the flags only.
        f.debug_struct("lt_session")
            .field("busy", &self.busy)
            .field("cancel", &self.cancel)
            .finish_non_exhaustive()
    }
}

struct SessionState {
    model: Arc<Model>,
    generator: Option<Generator>,
    worker: Option<JoinHandle<(Generator, Result<RunStats, Error>)>>,
    reader: Reader,
    last: Option<Result<RunStats, Error>>,
    // Whether the last run was asked to stop early, and the message of its END event.
    cancelled: bool,
    end_message: CString,
    // The steer and patches every later generation gets (`lt_session_set_steer`,
    // `lt_session_add_patch`).
    edits: Edits,
}

// SAFETY: `state` is only touched by the thread that won `busy` (see `with_session`).
unsafe impl Sync for lt_session {}

/// Enter `s` exclusively, or fail with LT_BUSY when another thread is inside.
fn with_session<R>(
    s: *mut lt_session,
    f: impl FnOnce(&mut SessionState) -> Result<R, FfiError>,
) -> Result<R, FfiError> {
    let s = nonnull(s, "session")?;
    if s.busy.swap(true, Ordering::Acquire) {
        return Err(FfiError::new(
            lt_status::LT_BUSY,
            "the session is in use by another thread",
        ));
    }
    struct Release<'a>(&'a AtomicBool);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _release = Release(&s.busy);
    // SAFETY: we hold `busy`, so no other thread has a reference into `state`.
    f(unsafe { &mut *s.state.get() })
}

/// Load a GGUF model. Only `params->n_gpu_layers` and `params->rpc_servers` are used; `params` may be NULL
/// for defaults. On success `*out` owns the model; free it with `lt_model_free`
/// after every session using it.
///
/// Thread-safe.
#[no_mangle]
pub extern "C" fn lt_model_new(
    path: *const c_char,
    params: *const lt_context_params,
    out: *mut *mut lt_model,
) -> lt_status {
    guard(|| {
        let path = c_str(path, "path")?;
        nonnull(out, "out")?;
        let mut opts = ModelOptions::default();
        if !params.is_null() {
            let p = context_params(params)?;
            opts.n_gpu_layers = p.n_gpu_layers;
            if !p.rpc_servers.is_null() {
                let list = c_str(p.rpc_servers, "params->rpc_servers")?;
                opts.rpc_servers = crate::rpc::parse_servers(list)?;
            }
        }
        let model = Model::load(path, &opts)?;
        // SAFETY: out is non-NULL and writable.
        unsafe { out.write(Box::into_raw(Box::new(lt_model { model }))) };
        Ok(())
    })
}

/// Free a model. NULL is a no-op. Sessions keep their own reference, so a
/// model may be freed while its sessions live on.
///
/// Not thread-safe with other calls on the same `lt_model`.
#[no_mangle]
pub extern "C" fn lt_model_free(model: *mut lt_model) {
    guard(|| {
        if !model.is_null() {
            // SAFETY: the pointer came from lt_model_new and is freed once.
            drop(unsafe { Box::from_raw(model) });
        }
        Ok(())
    });
}

/// Number of layers, residual width and vocabulary size of `model`.
/// Out-params may individually be NULL.
///
/// Thread-safe.
#[no_mangle]
pub extern "C" fn lt_model_dims(
    model: *const lt_model,
    n_layer: *mut u32,
    n_embd: *mut u32,
    n_vocab: *mut u32,
) -> lt_status {
    guard(|| {
        let m = &nonnull(model, "model")?.model;
        for (p, v) in [
            (n_layer, m.n_layer()),
            (n_embd, m.n_embd()),
            (n_vocab, m.n_vocab()),
        ] {
            if !p.is_null() {
                // SAFETY: non-NULL out-param, writable per the contract.
                unsafe { p.write(v as u32) };
            }
        }
        Ok(())
    })
}

/// Open a session on `model` capturing what `capture` selects. Probes the graph,
/// so a pattern that matches nothing fails here (LT_NO_MATCH, with close names
/// in `lt_last_error`). `ctx` and `capture` may be NULL for defaults.
///
/// Thread-safe. The session holds its own reference to the model.
#[no_mangle]
pub extern "C" fn lt_session_new(
    model: *const lt_model,
    ctx: *const lt_context_params,
    capture: *const lt_capture_params,
    out: *mut *mut lt_session,
) -> lt_status {
    guard(|| {
        let model = nonnull(model, "model")?.model.clone();
        nonnull(out, "out")?;
        let ctx_opts = if ctx.is_null() {
            Default::default()
        } else {
            context_options(ctx)?
        };
        let spec = if capture.is_null() {
            Default::default()
        } else {
            capture_spec(capture)?
        };
        let (generator, stream) = Generator::new(model.clone(), &ctx_opts, &spec)?;
        let s = lt_session {
            mode: generator
                .capture_mode()
                .map_or(0, |m| super::mode_code(m.used)),
            busy: AtomicBool::new(false),
            cancel: generator.cancel_flag(),
            state: std::cell::UnsafeCell::new(SessionState {
                model,
                generator: Some(generator),
                worker: None,
                reader: Reader::new(stream),
                last: None,
                cancelled: false,
                end_message: CString::default(),
                edits: Edits::default(),
            }),
        };
        // SAFETY: out is non-NULL and writable.
        unsafe { out.write(Box::into_raw(Box::new(s))) };
        Ok(())
    })
}

/// Free a session: cancels a running generation, waits for its thread, frees
/// the context and the ring. NULL is a no-op. Every event pointer obtained from
/// the session dangles afterwards.
///
/// Must not race with other calls on the same session.
#[no_mangle]
pub extern "C" fn lt_session_free(session: *mut lt_session) {
    guard(|| {
        if session.is_null() {
            return Ok(());
        }
        // SAFETY: the pointer came from lt_session_new and is freed once.
        let s = unsafe { Box::from_raw(session) };
        s.cancel.store(true, Ordering::Relaxed);
        let mut st = s.state.into_inner();
        if let Some(w) = st.worker.take() {
            // The worker may wait on a full ring: drain until it finishes.
            while !w.is_finished() {
                st.reader.release();
                let _ = st.reader.next(Duration::from_millis(10));
            }
            let _ = w.join();
        }
        Ok(())
    });
}

impl SessionState {
    /// Collect a finished worker, restoring the generator.
    fn reap(&mut self, wait: bool) -> Result<(), FfiError> {
        if let Some(w) = self.worker.take() {
            if !wait && !w.is_finished() {
                self.worker = Some(w);
                return Ok(());
            }
            let (g, r) = w.join().map_err(|_| {
                FfiError::new(lt_status::LT_INTERNAL, "the generation thread panicked")
            })?;
            self.cancelled = g.cancel_flag().load(Ordering::Relaxed);
            self.generator = Some(g);
            self.last = Some(r);
        }
        Ok(())
    }
}

/// Start generating from `prompt` (UTF-8, non-empty) on a library-owned thread
/// and return at once; read the results with `lt_session_next`. `sampling`
/// may be NULL for defaults. LT_BUSY while a previous generation still runs.
///
/// The stream of one generation, in order: one TOKEN event per prompt token
/// (step 0, `LT_ROW_PROMPT`, NaN logprob and entropy, no alternatives), then
/// the frames of step 0 (the prompt) and the first sampled token (step 0),
/// then for each step k >= 1 its frames followed by its token, then one END
/// event. Frame `seq` and the END counters start from 0 with each generation.
///
/// What the library does, so that an app driving llama.cpp itself (mode 2)
/// can reproduce a run: a context with `n_ctx`, `n_batch`, `n_ubatch` from
/// `lt_context_params`, `n_seq_max` 1, `n_threads` = `n_threads_batch` (all
/// cores when 0), `kv_unified` true, pooling none, flash attention auto, KV
/// cache f16 (f32 with `f32_kv`); the prompt is tokenized with
/// `llama_tokenize(add_special = true, parse_special = false)` (BOS when the
/// model asks for it; special-token text is not parsed), decoded in chunks of
/// `n_batch` tokens with logits for its last token only; then one token per
/// `llama_decode`. Sampling: greedy when `temperature` <= 0, else the chain
/// top_k (when > 0), top_p (when < 1), temp, dist(`seed`). The KV cache is
/// cleared before each generation.
///
/// Call from one thread at a time (else LT_BUSY).
#[no_mangle]
pub extern "C" fn lt_session_submit(
    session: *mut lt_session,
    prompt: *const c_char,
    sampling: *const lt_sampling_params,
) -> lt_status {
    guard(|| {
        let prompt = c_str(prompt, "prompt")?;
        let opts = if sampling.is_null() {
            Default::default()
        } else {
            generate_options(sampling)?
        };
        with_session(session, |st| {
            st.reap(false)?;
            if st.worker.is_some() {
                return Err(FfiError::new(
                    lt_status::LT_BUSY,
                    "a generation is still running on this session",
                ));
            }
            if prompt.is_empty() {
                return Err(FfiError::new(
                    lt_status::LT_INVALID_ARGUMENT,
                    "empty prompt",
                ));
            }
            if opts.n_predict == 0 {
                return Err(FfiError::new(
                    lt_status::LT_INVALID_ARGUMENT,
                    "n_predict must be at least 1",
                ));
            }
            let tokens = st.model.tokenize(prompt, true)?;
            let mut g = st.generator.take().ok_or_else(|| {
                FfiError::new(lt_status::LT_INTERNAL, "session lost its generator")
            })?;
            st.last = None;
            let worker = std::thread::Builder::new()
                .name("latent-tap-gen".into())
                .spawn(move || {
                    // END counters and frame seq numbers are per generation.
                    if let Some(t) = g.context_mut().tap_mut() {
                        t.reset_counters();
                    }
                    let r = g.run(&[tokens], &opts, &mut |_| {});
                    (g, r)
                })
                .map_err(|e| {
                    FfiError::new(
                        lt_status::LT_INTERNAL,
                        format!("cannot spawn the generation thread: {e}"),
                    )
                })?;
            st.worker = Some(worker);
            Ok(())
        })
    })
}

/// Wait up to `timeout_ms` for the next event of the stream and write it to
/// `*event` (set `event->struct_size = sizeof(lt_event)` first). The previous event is released first. Returns LT_TIMEOUT when
/// nothing arrived, LT_END when no generation runs and nothing is left. An
/// END event's `end_status` tells how the generation ended.
///
/// Call from one thread at a time (else LT_BUSY).
#[no_mangle]
pub extern "C" fn lt_session_next(
    session: *mut lt_session,
    timeout_ms: u32,
    event: *mut lt_event,
) -> lt_status {
    guard(|| {
        nonnull(event, "event")?;
        with_session(session, |st| {
            let running = st.worker.is_some();
            if !running {
                // Nothing can arrive any more: answer at once instead of waiting out the timeout.
                st.reader.release();
                if st.reader.stream().is_empty() {
                    return Err(FfiError::new(lt_status::LT_END, "no generation is running"));
                }
            }
            match st.reader.next(Duration::from_millis(timeout_ms as u64))? {
                Next::Event(mut ev) => {
                    if ev.kind == LT_EVENT_END {
                        st.reap(true)?;
                        let (status, msg) = match &st.last {
                            Some(Err(e)) => (e.kind().into(), e.message().to_string()),
                            _ if st.cancelled => (lt_status::LT_CANCELLED, "cancelled".to_string()),
                            _ => (lt_status::LT_OK, String::new()),
                        };
                        ev.end_status = status;
                        st.end_message = CString::new(msg.replace('\0', " ")).unwrap_or_default();
                        ev.end_message = st.end_message.as_ptr();
                    }
                    write_sized(event, ev, EVENT_MIN, "event")
                }
                Next::Timeout if running => Err(FfiError::new(
                    lt_status::LT_TIMEOUT,
                    "no event within the timeout",
                )),
                Next::Timeout => Err(FfiError::new(lt_status::LT_END, "no generation is running")),
            }
        })
    })
}

/// Release the current event (its pointers become invalid) so the ring can
/// reuse its space. Optional: `lt_session_next` releases it too.
///
/// Call from one thread at a time (else LT_BUSY).
#[no_mangle]
pub extern "C" fn lt_session_release(session: *mut lt_session) -> lt_status {
    guard(|| {
        with_session(session, |st| {
            st.reader.release();
            Ok(())
        })
    })
}

/// Ask a running generation to stop after the current step. Its END event
/// still arrives. Safe to call from any thread.
#[no_mangle]
pub extern "C" fn lt_session_cancel(session: *mut lt_session) -> lt_status {
    guard(|| {
        let s = nonnull(session, "session")?;
        s.cancel.store(true, Ordering::Relaxed);
        Ok(())
    })
}

/// Called for each event by `lt_session_generate`; return 0 to stop early.
pub type lt_event_callback =
    Option<unsafe extern "C" fn(user_data: *mut std::ffi::c_void, event: *const lt_event) -> i32>;

/// Callback API: submit `prompt` and call `callback` on this thread for every
/// event, in order, until the END event (included). When the callback returns
/// 0 the generation is cancelled and the events still queued are skipped, but
/// the END event is always delivered (its `end_status` is `LT_CANCELLED`, and
/// its counters cover the frames produced before the stop). Returns the
/// generation's status (`LT_CANCELLED` if the callback stopped it). The event is
/// valid only during the callback.
///
/// Call from one thread at a time (else LT_BUSY).
#[no_mangle]
pub extern "C" fn lt_session_generate(
    session: *mut lt_session,
    prompt: *const c_char,
    sampling: *const lt_sampling_params,
    callback: lt_event_callback,
    user_data: *mut std::ffi::c_void,
) -> lt_status {
    let Some(cb) = callback else {
        return guard(|| {
            Err(FfiError::new(
                lt_status::LT_NULL_POINTER,
                "callback is NULL",
            ))
        });
    };
    let st = lt_session_submit(session, prompt, sampling);
    if st != lt_status::LT_OK {
        return st;
    }
    let mut stopped = false;
    loop {
        let mut ev = std::mem::MaybeUninit::<lt_event>::zeroed();
        // SAFETY: the first field of lt_event is its u32 struct_size.
        unsafe { (ev.as_mut_ptr() as *mut u32).write(std::mem::size_of::<lt_event>() as u32) };
        match lt_session_next(session, 100, ev.as_mut_ptr()) {
            lt_status::LT_OK => {
                // SAFETY: zero-initialised, and LT_OK means the event was written in full.
                let ev = unsafe { ev.assume_init() };
                // After a stop, the rest of the stream is skipped but END still arrives.
                if !stopped || ev.kind == LT_EVENT_END {
                    // SAFETY: calling the user's callback with a valid event pointer.
                    let keep = unsafe { cb(user_data, &ev) };
                    if keep == 0 && !stopped {
                        stopped = true;
                        lt_session_cancel(session);
                    }
                }
                if ev.kind == LT_EVENT_END {
                    lt_session_release(session);
                    return if stopped {
                        lt_status::LT_CANCELLED
                    } else {
                        ev.end_status
                    };
                }
            }
            lt_status::LT_TIMEOUT => continue,
            other => return other,
        }
    }
}

/// Steer every later generation of `session` (see docs/steer.md): add
/// `scale` × `direction.N` of the control vector at `path` (llama.cpp's GGUF
/// format, e.g. from `latent-tap steer-vector`) to the rows of `l_out-N`.
/// `layers`: a layer filter ("4..12" half-open, "4..=12", "7", "1,3,5..8") of
/// layers the vector has, NULL for all of them; `positions`: "all",
/// "prompt", "generated", "A..B" or "A..=B", NULL for all. `path` NULL
/// stops steering (the other arguments are then ignored).
///
/// Everything is checked before anything changes (a vector of another model,
/// a non-finite scale, unknown or out-of-range layers, bad positions:
/// LT_INVALID_ARGUMENT, or LT_IO for an unreadable file, with the reason in
/// `lt_last_error`); on error the session steers as before. A session that
/// captures nothing probes the model's graph on its first steer.
///
/// Call from one thread at a time, not while a generation runs (LT_BUSY).
#[no_mangle]
pub extern "C" fn lt_session_set_steer(
    session: *mut lt_session,
    path: *const c_char,
    scale: f32,
    layers: *const c_char,
    positions: *const c_char,
) -> lt_status {
    guard(|| {
        nonnull(session, "session")?;
        let spec = if path.is_null() {
            None
        } else {
            let path = std::path::Path::new(c_str(path, "path")?);
            let layers = if layers.is_null() {
                None
            } else {
                Some(crate::select::LayerFilter::parse(c_str(layers, "layers")?)?)
            };
            let positions = if positions.is_null() {
                Positions::All
            } else {
                Positions::parse(c_str(positions, "positions")?)?
            };
            crate::steer::check_scale(scale)?;
            Some((ControlVector::read(path)?, layers, positions))
        };
        edit_session(session, |edits, n_layer, n_embd, _| {
            edits.steers = spec
                .as_ref()
                .map(|(v, l, p)| Steer::new(v, scale, l.as_ref(), *p, n_layer, n_embd))
                .transpose()?
                .into_iter()
                .collect();
            Ok(())
        })
    })
}

/// Patch every later generation of `session` (see docs/steer.md): the row of
/// graph node `tensor` (e.g. "l_out-6", "attn_out-6": any node computed once
/// per graph with one F32 row of n_embd values per token) at position `pos`
/// becomes the `n` floats at `data` (`n` = n_embd), in every sequence. The
/// row is copied; patches add up (one per call, a later one of the same
/// tensor and position wins) until `lt_session_clear_patches`.
///
/// Checked before anything changes (an unknown or ambiguous node, a row of
/// the wrong width or with a non-finite value, a position outside the
/// context: LT_INVALID_ARGUMENT with the reason in `lt_last_error`); on error
/// the session is patched as before. A session that captures nothing probes
/// the model's graph on its first patch.
///
/// Call from one thread at a time, not while a generation runs (LT_BUSY).
#[no_mangle]
pub extern "C" fn lt_session_add_patch(
    session: *mut lt_session,
    tensor: *const c_char,
    pos: i32,
    data: *const f32,
    n: usize,
) -> lt_status {
    guard(|| {
        nonnull(session, "session")?;
        let tensor = c_str(tensor, "tensor")?;
        nonnull(data, "data")?;
        if n > 1 << 24 {
            return Err(Error::invalid(format!("n = {n} is not a row width")).into());
        }
        // SAFETY: the caller passes `n` readable floats at the non-NULL `data`.
        let row = unsafe { std::slice::from_raw_parts(data, n) }.to_vec();
        edit_session(session, |edits, _, n_embd, n_ctx| {
            let p = Patch::new(tensor, i64::from(pos), row, n_embd, n_ctx)?;
            edits
                .patches
                .retain(|q| (q.tensor.as_str(), q.pos) != (tensor, pos));
            edits.patches.push(p);
            Ok(())
        })
    })
}

/// Remove every patch of `session` (`lt_session_add_patch`); its steer stays.
///
/// Call from one thread at a time, not while a generation runs (LT_BUSY).
#[no_mangle]
pub extern "C" fn lt_session_clear_patches(session: *mut lt_session) -> lt_status {
    guard(|| {
        nonnull(session, "session")?;
        edit_session(session, |edits, _, _, _| {
            edits.patches.clear();
            Ok(())
        })
    })
}

/// Change a copy of the session's edits by `change(edits, n_layer, n_embd,
/// n_ctx)` and install it; on any error the session keeps its edits.
fn edit_session(
    session: *mut lt_session,
    change: impl FnOnce(&mut Edits, usize, usize, usize) -> Result<(), Error>,
) -> Result<(), FfiError> {
    with_session(session, |st| {
        st.reap(false)?;
        let busy = || {
            FfiError::new(
                lt_status::LT_BUSY,
                "a generation is still running on this session",
            )
        };
        if st.worker.is_some() {
            return Err(busy());
        }
        let (n_layer, n_embd) = (st.model.n_layer(), st.model.n_embd());
        let g = st.generator.as_mut().ok_or_else(busy)?;
        let n_ctx = g.context().n_ctx() as usize;
        let mut edits = st.edits.clone();
        change(&mut edits, n_layer, n_embd, n_ctx)?;
        g.set_edits(&edits)?;
        st.edits = edits;
        Ok(())
    })
}

/// How this session gets tensors out of the graph: 0 = nothing is captured
/// (token events only), 1 = callback, 2 = deferred (see
/// `lt_capture_params.capture_mode`).
///
/// Thread-safe.
#[no_mangle]
pub extern "C" fn lt_session_capture_mode(session: *const lt_session, mode: *mut u32) -> lt_status {
    guard(|| {
        let s = nonnull(session, "session")?;
        nonnull(mode, "mode")?;
        // SAFETY: non-NULL out-param.
        unsafe { mode.write(s.mode) };
        Ok(())
    })
}
