//! RAII wrapper over `llama_context`, with an optional tap installed through
//! `llama_context_params.cb_eval`. The context holds an `Arc<Model>`, so it can
//! never outlive its model.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use super::batch::{Batch, LabelledBatch};
use super::model::{Model, Token};
use crate::capture::Tap;
use crate::error::{Error, ErrorKind, Result};
use crate::settings;

/// Context settings. Defaults suit a 2-core laptop as well as a GPU box.
#[derive(Debug, Clone)]
pub struct ContextOptions {
    /// Context length in tokens (all sequences together).
    pub n_ctx: u32,
    /// Largest batch handed to one `llama_decode`.
    pub n_batch: u32,
    /// Largest batch one graph compute handles; a longer batch is split.
    pub n_ubatch: u32,
    /// Parallel sequences (distinct seq ids) the context must hold.
    pub n_seq_max: u32,
    /// Compute threads; `None` uses every core. (llama.cpp's default of 4 made
    /// decoding 140× slower on a 2-core machine: its thread pool spins.)
    pub n_threads: Option<i32>,
    /// Also compute embeddings (`result_norm`) for every token.
    pub embeddings: bool,
    /// Keep the KV cache in f32 instead of f16 (exact comparisons in tests).
    pub f32_kv: bool,
    /// Flash attention: `None` lets llama.cpp decide.
    pub flash_attn: Option<bool>,
    /// CPU thread polling level 0..=100 while waiting for work (`None`:
    /// llama.cpp's default, 50). 0 sleeps instead of spinning, which keeps
    /// decode speed when other processes share the cores.
    pub poll: Option<u32>,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_batch: 512,
            n_ubatch: 512,
            n_seq_max: 1,
            n_threads: None,
            embeddings: false,
            f32_kv: false,
            flash_attn: None,
            poll: None,
        }
    }
}

pub use crate::settings::default_threads;

/// A llama.cpp context, optionally tapped.
#[derive(Debug)]
pub struct Context {
    ptr: NonNull<sys::llama_context>,
    // Boxed so its address, handed to llama.cpp as callback user data, is stable.
    tap: Option<Box<Tap>>,
    model: Arc<Model>,
    n_batch: u32,
    // A thread pool of our own when `poll` is set; freed after the context.
    threadpool: Option<NonNull<sys::ggml_threadpool>>,
}

// SAFETY: a llama_context may move between threads; it is used by one thread at a time
// (&mut self for every mutating call), and the tap it points to moves with it.
unsafe impl Send for Context {}

impl Context {
    /// Create a context on `model`, with `tap` receiving the eval callbacks.
    pub(crate) fn new(
        model: Arc<Model>,
        opts: &ContextOptions,
        tap: Option<Box<Tap>>,
    ) -> Result<Self> {
        opts.validate()?;
        let mut tap = tap;
        // SAFETY: plain value returned by llama.cpp.
        let mut p = unsafe { sys::llama_context_default_params() };
        p.n_ctx = opts.n_ctx;
        p.n_batch = opts.n_batch;
        p.n_ubatch = opts.n_ubatch;
        p.n_seq_max = opts.n_seq_max;
        let threads = opts.threads();
        p.n_threads = threads;
        p.n_threads_batch = threads;
        p.embeddings = opts.embeddings;
        p.pooling_type = sys::LLAMA_POOLING_TYPE_NONE;
        // One KV stream keeps llama.cpp's ubatch split sequential (split_simple),
        // which the tap relies on to map rows to tokens.
        p.kv_unified = true;
        if opts.f32_kv {
            p.type_k = sys::GGML_TYPE_F32;
            p.type_v = sys::GGML_TYPE_F32;
        }
        p.flash_attn_type = match opts.flash_attn {
            None => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
            Some(true) => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            Some(false) => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        };
        if let Some(t) = tap.as_deref_mut().filter(|t| t.wants_eval()) {
            p.abort_callback = Some(crate::capture::abort_callback);
            p.abort_callback_data = crate::capture::abort_flag_ptr(t);
            p.cb_eval = Some(crate::capture::eval_callback);
            p.cb_eval_user_data = t as *mut Tap as *mut c_void;
        }
        // SAFETY: the model pointer is valid (we hold an Arc); the tap box outlives the
        // context because the context field drops first (see Drop).
        let raw = unsafe { sys::llama_init_from_model(model.as_ptr(), p) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            let why = super::backend::take_last_llama_error()
                .unwrap_or_else(|| "llama_init_from_model failed".into());
            Error::new(
                ErrorKind::InvalidArgument,
                format!("cannot create context: {why}"),
            )
        })?;
        // SAFETY: valid context pointer.
        let n_batch = unsafe { sys::llama_n_batch(ptr.as_ptr()) };
        let mut ctx = Self {
            ptr,
            tap,
            model,
            n_batch,
            threadpool: None,
        };
        if let Some(poll) = opts.poll {
            if poll > 100 {
                return Err(Error::invalid(format!(
                    "poll must be between 0 and 100, not {poll}"
                )));
            }
            // SAFETY: plain value returned by ggml for a thread count it accepts.
            let mut tp = unsafe { sys::ggml_threadpool_params_default(threads) };
            tp.poll = poll;
            let pool = cpu_threadpool_fns()
                // SAFETY: tp is a valid parameter block; the function returns NULL on failure.
                .and_then(|(new, _)| NonNull::new(unsafe { new(&mut tp) }))
                .ok_or_else(|| {
                    Error::new(ErrorKind::Internal, "cannot create the CPU thread pool")
                })?;
            ctx.threadpool = Some(pool);
            // SAFETY: both pointers are valid; the pool outlives the context (see Drop).
            unsafe { sys::llama_attach_threadpool(ctx.as_ptr(), pool.as_ptr(), pool.as_ptr()) };
        }
        Ok(ctx)
    }

    /// The model this context runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_context {
        self.ptr.as_ptr()
    }

    /// Context length.
    pub fn n_ctx(&self) -> u32 {
        // SAFETY: valid context pointer.
        unsafe { sys::llama_n_ctx(self.as_ptr()) }
    }

    /// Parallel sequences the context holds.
    pub fn n_seq_max(&self) -> u32 {
        // SAFETY: valid context pointer.
        unsafe { sys::llama_n_seq_max(self.as_ptr()) }
    }

    /// Largest batch per `llama_decode`.
    pub fn n_batch(&self) -> u32 {
        self.n_batch
    }

    /// Physical batch size.
    pub fn n_ubatch(&self) -> u32 {
        // SAFETY: valid context pointer.
        unsafe { sys::llama_n_ubatch(self.as_ptr()) }
    }

    pub(crate) fn tap_mut(&mut self) -> Option<&mut Tap> {
        self.tap.as_deref_mut()
    }

    /// Swap the probe tap for a capturing one. The tap box stays put, so the
    /// eval callback's user data stays valid; the abort flag lives in the new
    /// tap, so llama.cpp is pointed at it here, in the one place that knows.
    pub(crate) fn replace_tap(&mut self, tap: Tap) -> Result<()> {
        let ctx = self.as_ptr();
        let slot = self
            .tap
            .as_deref_mut()
            .filter(|t| t.wants_eval())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Internal,
                    "context was created without an eval callback",
                )
            })?;
        *slot = tap;
        // SAFETY: valid context; the flag lives in the boxed tap, which outlives the context.
        unsafe {
            sys::llama_set_abort_callback(
                ctx,
                Some(crate::capture::abort_callback),
                crate::capture::abort_flag_ptr(slot),
            )
        };
        Ok(())
    }

    /// Take the tap of a context created without the eval callback (a
    /// tokens-only tap), e.g. to move it and its ring to another context.
    pub(crate) fn take_tap(&mut self) -> Result<Tap> {
        if self.tap.as_deref().is_some_and(Tap::wants_eval) {
            return Err(Error::new(
                ErrorKind::Internal,
                "the tap of a context with an eval callback cannot be taken",
            ));
        }
        self.tap
            .take()
            .map(|t| *t)
            .ok_or_else(|| Error::new(ErrorKind::Internal, "context has no tap"))
    }

    pub(crate) fn tap(&self) -> Option<&Tap> {
        self.tap.as_deref()
    }

    /// Tell the tap how the rows of `lb` are labelled, decode it, and return
    /// the number of ubatches llama.cpp computed. `step` and `ubatch_base`
    /// number the frames (see `Tap::begin_decode`).
    pub(crate) fn decode_labelled(
        &mut self,
        lb: &LabelledBatch,
        step: u32,
        ubatch_base: u32,
    ) -> Result<u32> {
        let n_ubatch = self.n_ubatch() as usize;
        self.tap
            .as_deref_mut()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "context has no tap"))?
            .begin_decode(step, ubatch_base, n_ubatch, &lb.rows, &lb.outputs);
        self.decode(&lb.batch)?;
        Ok(self.tap().map_or(0, Tap::ubatches_seen))
    }

    /// Run one `llama_decode`. The batch must not exceed `n_batch` (llama.cpp
    /// asserts on that, so we check first).
    pub fn decode(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Err(Error::invalid("cannot decode an empty batch"));
        }
        if batch.len() > self.n_batch as usize {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "batch of {} tokens exceeds n_batch {}",
                    batch.len(),
                    self.n_batch
                ),
            ));
        }
        // SAFETY: the context is valid, the batch's arrays are valid for its n_tokens,
        // and no Rust reference into the tap is alive while llama.cpp calls back into it.
        let rc = unsafe { sys::llama_decode(self.as_ptr(), batch.raw()) };
        if let Some(err) = self.tap_mut().and_then(|t| t.take_failure()) {
            return Err(err);
        }
        match rc {
            0 => Ok(()),
            1 => Err(Error::new(
                ErrorKind::PromptTooLong,
                "no room left in the KV cache: the context size is too small",
            )),
            _ => {
                let why = super::backend::take_last_llama_error().unwrap_or_default();
                Err(Error::new(
                    ErrorKind::Decode,
                    format!(
                        "llama_decode failed with code {rc}{}{why}",
                        if why.is_empty() { "" } else { ": " }
                    ),
                ))
            }
        }
    }

    /// Logits of output row `i` of the last decode (`n_vocab` floats).
    pub fn logits_ith(&mut self, i: i32) -> Result<&[f32]> {
        let n = self.model.n_vocab();
        self.output_row(sys::llama_get_logits_ith, i, n, "logits")
    }

    /// Embeddings (`result_norm`) of output row `i`; needs `embeddings: true`.
    pub fn embeddings_ith(&mut self, i: i32) -> Result<&[f32]> {
        let n = self.model.n_embd();
        self.output_row(sys::llama_get_embeddings_ith, i, n, "embeddings")
    }

    /// One row of llama.cpp's output buffers, borrowed until the next decode (&mut self).
    fn output_row(
        &mut self,
        get: unsafe extern "C" fn(*mut sys::llama_context, i32) -> *mut f32,
        i: i32,
        len: usize,
        what: &str,
    ) -> Result<&[f32]> {
        // SAFETY: valid context; llama.cpp returns NULL for an invalid index or a disabled output.
        let p = unsafe { get(self.as_ptr(), i) };
        if p.is_null() {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("no {what} for output {i}"),
            ));
        }
        // SAFETY: the row has `len` floats and lives until the next decode, which needs &mut self.
        Ok(unsafe { std::slice::from_raw_parts(p, len) })
    }

    /// Install llama.cpp's own control vector on this context
    /// (`llama_set_adapter_cvec`, as `--control-vector-scaled FILE:SCALE`
    /// does): `scale × direction.N` is added to the output of every layer `N`
    /// the vector has, for every row and sequence, until replaced; `None`
    /// removes it. Refuses a vector of another model (width or layers).
    pub fn set_control_vector(
        &mut self,
        v: Option<(&crate::steer::ControlVector, f32)>,
    ) -> Result<()> {
        self.set_control_vector_in(v, None)
    }

    /// [`Context::set_control_vector`], applied only to the layers
    /// `start..=end` when `layers` is given (llama-server's
    /// `--control-vector-layer-range`, see [`crate::steer::layer_range`]).
    pub fn set_control_vector_in(
        &mut self,
        v: Option<(&crate::steer::ControlVector, f32)>,
        layers: Option<(i32, i32)>,
    ) -> Result<()> {
        let n_embd = self.model.n_embd();
        let (data, il_start, il_end) = match v {
            None => (Vec::new(), -1, -1),
            Some((v, scale)) => {
                let n_layer = self.model.n_layer();
                v.validate()?;
                v.check_model(n_layer, n_embd)?;
                crate::steer::check_scale(scale)?;
                // llama.cpp's layout: layer N ≥ 1 at offset (N − 1) × n_embd.
                let mut data = vec![0f32; n_embd * n_layer.saturating_sub(1)];
                for (&l, d) in &v.directions {
                    let row = &mut data[(l - 1) * n_embd..l * n_embd];
                    for (x, &y) in row.iter_mut().zip(d) {
                        *x = y * scale;
                    }
                }
                let first = v.directions.keys().next().copied().unwrap_or(1);
                let last = v.directions.keys().next_back().copied().unwrap_or(1);
                let (first, last) = layers.unwrap_or((first as i32, last as i32));
                (data, first, last)
            }
        };
        let ptr = if v.is_some() {
            data.as_ptr()
        } else {
            std::ptr::null()
        };
        // SAFETY: valid context; `data` holds `len` floats (llama.cpp copies them) or
        // is NULL, which removes the control vector.
        let rc = unsafe {
            sys::llama_set_adapter_cvec(
                self.as_ptr(),
                ptr,
                data.len(),
                n_embd as i32,
                il_start,
                il_end,
            )
        };
        if rc != 0 {
            return Err(Error::new(
                ErrorKind::Internal,
                "llama_set_adapter_cvec refused the control vector",
            ));
        }
        Ok(())
    }

    /// Forget all sequences (clears the KV cache).
    pub fn clear(&mut self) {
        // SAFETY: valid context; the memory handle belongs to it.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.as_ptr()), true) }
    }

    /// Forget sequence `seq` (frees its KV cells). Returns false if llama.cpp refused.
    pub fn seq_rm(&mut self, seq: i32) -> bool {
        // SAFETY: valid context; the memory handle belongs to it; -1/-1 is the whole range.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.as_ptr()), seq, -1, -1) }
    }

    /// Sample the next token for output row `i` with `sampler`.
    pub fn sample(&mut self, sampler: &mut super::Sampler, i: i32) -> Token {
        // SAFETY: both pointers valid; llama.cpp checks the index.
        unsafe { sys::llama_sampler_sample(sampler.as_ptr(), self.as_ptr(), i) }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: we own the context; freeing it first means llama.cpp never calls the
        // tap after the box below is dropped.
        unsafe { sys::llama_free(self.as_ptr()) }
        if let Some(pool) = self.threadpool.take() {
            if let Some((_, free)) = cpu_threadpool_fns() {
                // SAFETY: created by ggml_threadpool_new; the context using it is gone.
                unsafe { free(pool.as_ptr()) }
            }
        }
    }
}

type ThreadpoolNew =
    unsafe extern "C" fn(*mut sys::ggml_threadpool_params) -> *mut sys::ggml_threadpool;
type ThreadpoolFree = unsafe extern "C" fn(*mut sys::ggml_threadpool);

/// The CPU backend's thread-pool constructor and destructor, looked up through
/// its registry entry: with `dynamic-backends` the CPU backend is a module loaded
/// at run time, so its functions cannot be linked directly.
fn cpu_threadpool_fns() -> Option<(ThreadpoolNew, ThreadpoolFree)> {
    // SAFETY: registry lookups by NUL-terminated names; the CPU backend's
    // `get_proc_address` returns these two functions with exactly these signatures
    // (ggml-cpu.cpp), or NULL.
    unsafe {
        let reg = sys::ggml_backend_reg_by_name(c"CPU".as_ptr());
        if reg.is_null() {
            return None;
        }
        let new = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_threadpool_new".as_ptr());
        let free = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_threadpool_free".as_ptr());
        if new.is_null() || free.is_null() {
            return None;
        }
        Some((
            std::mem::transmute::<*mut std::ffi::c_void, ThreadpoolNew>(new),
            std::mem::transmute::<*mut std::ffi::c_void, ThreadpoolFree>(free),
        ))
    }
}

impl ContextOptions {
    /// Check the bounds ([`settings::check_context`], [`settings::check_threads`]).
    pub fn validate(&self) -> Result<()> {
        settings::check_context(self.n_ctx, self.n_batch, self.n_ubatch, self.n_seq_max)?;
        match self.n_threads {
            Some(t) => settings::check_threads(t),
            None => Ok(()),
        }
    }

    /// The thread count a context built from these options uses.
    pub fn threads(&self) -> i32 {
        self.n_threads
            .unwrap_or_else(settings::default_threads)
            .max(1)
    }
}
