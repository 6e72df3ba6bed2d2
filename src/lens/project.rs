//! The projection through ggml's own CPU kernels: `rms_norm` (or `norm`),
//! `mul` by the norm weight (`add` its bias), `mul_mat` with the unembedding
//! as stored (quantized), then the soft-cap; many rows per graph.

use std::fs::File;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Mutex;

use llama_cpp_sys_2 as sys;

use super::weights::{read_at, Meta};
use crate::error::{Error, ErrorKind, Result};

/// A ggml context, freed on drop.
struct Ctx(NonNull<sys::ggml_context>);

impl Ctx {
    fn new(mem_size: usize) -> Result<Self> {
        let params = sys::ggml_init_params {
            mem_size,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: false,
        };
        // SAFETY: plain parameters; ggml allocates mem_size bytes (NULL when it cannot).
        let raw = unsafe { sys::ggml_init(params) };
        NonNull::new(raw).map(Self).ok_or_else(|| {
            Error::new(
                ErrorKind::Internal,
                format!("logit lens: ggml could not allocate {} MiB", mem_size >> 20),
            )
        })
    }

    fn as_ptr(&self) -> *mut sys::ggml_context {
        self.0.as_ptr()
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: the context came from ggml_init and is freed once.
        unsafe { sys::ggml_free(self.as_ptr()) }
    }
}

/// The weights in a ggml context, ready to project rows.
pub(super) struct Projector {
    // Guards the weight context: graphs are built and computed one at a time.
    weights: Mutex<WeightCtx>,
    pub(super) n_embd: usize,
    pub(super) n_vocab: usize,
    eps: f32,
    softcap: Option<f32>,
}

struct WeightCtx {
    _ctx: Ctx,
    unembd: *mut sys::ggml_tensor,
    norm: *mut sys::ggml_tensor,
    bias: Option<*mut sys::ggml_tensor>,
}

// SAFETY: the tensors point into the context this struct owns; they are only
// used under the Mutex of Projector, never concurrently.
unsafe impl Send for WeightCtx {}

impl std::fmt::Debug for Projector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projector")
            .field("n_embd", &self.n_embd)
            .field("n_vocab", &self.n_vocab)
            .field("eps", &self.eps)
            .field("softcap", &self.softcap)
            .finish()
    }
}

/// Copy `v` into a new F32 vector tensor.
///
/// # Safety
/// `ctx` must be a live, allocating context with room for the tensor.
unsafe fn vector(ctx: *mut sys::ggml_context, v: &[f32]) -> *mut sys::ggml_tensor {
    // SAFETY: per the contract; the tensor's data holds v.len() f32.
    unsafe {
        let t = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_F32, v.len() as i64);
        std::ptr::copy_nonoverlapping(v.as_ptr(), sys::ggml_get_data_f32(t), v.len());
        t
    }
}

impl Projector {
    /// Load the unembedding as stored into a ggml context.
    pub(super) fn load(path: &Path, m: &Meta) -> Result<Self> {
        // SAFETY: ggml's CPU tables are initialised once (idempotent).
        unsafe { sys::ggml_cpu_init() };
        let u = &m.unembd;
        // SAFETY: plain queries on a type and shape validated by read_meta.
        let row = unsafe { sys::ggml_row_size(u.ty, u.ne[0]) };
        if row * u.ne[1] as usize != u.nbytes {
            return Err(Error::new(
                ErrorKind::ModelLoad,
                format!(
                    "logit lens for {}: {} holds {} bytes, not {} rows of {row}",
                    path.display(),
                    u.name,
                    u.nbytes,
                    u.ne[1]
                ),
            ));
        }
        // SAFETY: a plain size query.
        let overhead = unsafe { sys::ggml_tensor_overhead() };
        let ctx = Ctx::new(u.nbytes + 3 * m.n_embd * 4 + 4 * overhead + 1024)?;
        // SAFETY: ctx has room for the three tensors (sized above); the
        // unembedding's data is nbytes long and filled from the file.
        let (unembd, norm, bias) = unsafe {
            let t = sys::ggml_new_tensor_2d(ctx.as_ptr(), u.ty, u.ne[0], u.ne[1]);
            let data = std::slice::from_raw_parts_mut(sys::ggml_get_data(t) as *mut u8, u.nbytes);
            let mut f = File::open(path).map_err(|e| Error::io(path, "open", e))?;
            read_at(path, &mut f, u.offset, data)?;
            let norm = vector(ctx.as_ptr(), &m.norm);
            let bias = m.norm_bias.as_ref().map(|b| vector(ctx.as_ptr(), b));
            (t, norm, bias)
        };
        Ok(Self {
            weights: Mutex::new(WeightCtx {
                _ctx: ctx,
                unembd,
                norm,
                bias,
            }),
            n_embd: m.n_embd,
            n_vocab: m.n_vocab,
            eps: m.eps,
            softcap: m.softcap,
        })
    }

    /// Logits of `x.len() / n_embd` rows (row-major, each `n_embd` wide), as
    /// `rows × n_vocab` f32, computed on `n_threads` threads.
    pub(super) fn logits(&self, x: &[f32], n_threads: usize) -> Result<Vec<f32>> {
        self.run(x, n_threads, true)
    }

    /// `ggml_mul_mat` of the unembedding with the raw rows alone (no norm, no
    /// soft-cap): the roofline the benchmark compares the lens with.
    pub(super) fn mul_mat_only(&self, x: &[f32], n_threads: usize) -> Result<Vec<f32>> {
        self.run(x, n_threads, false)
    }

    fn run(&self, x: &[f32], n_threads: usize, full: bool) -> Result<Vec<f32>> {
        let (e, v) = (self.n_embd, self.n_vocab);
        if x.is_empty() || x.len() % e != 0 {
            return Err(Error::invalid(format!(
                "logit lens: {} values are not whole rows of n_embd {e}",
                x.len()
            )));
        }
        let n = x.len() / e;
        let w = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: plain size queries.
        let (overhead, graph) =
            unsafe { (sys::ggml_tensor_overhead(), sys::ggml_graph_overhead()) };
        let caps = if self.softcap.is_some() { 3 } else { 0 };
        let mem = 16 * overhead + graph + 4 * n * e * 4 + (1 + caps) * n * v * 4 + (1 << 16);
        let ctx = Ctx::new(mem)?;
        let c = ctx.as_ptr();
        // SAFETY: every tensor is created in `c`, sized above; the weight tensors
        // live in the locked weight context; shapes were validated at load (the
        // unembedding is [n_embd, n_vocab] of a type the CPU multiplies) and the
        // input is [n_embd, n]. The result is contiguous f32 [n_vocab, n].
        unsafe {
            let inp = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_F32, e as i64, n as i64);
            std::ptr::copy_nonoverlapping(x.as_ptr(), sys::ggml_get_data_f32(inp), x.len());
            let mut cur = inp;
            if full {
                cur = match w.bias {
                    Some(_) => sys::ggml_norm(c, cur, self.eps),
                    None => sys::ggml_rms_norm(c, cur, self.eps),
                };
                cur = sys::ggml_mul(c, cur, w.norm);
                if let Some(b) = w.bias {
                    cur = sys::ggml_add(c, cur, b);
                }
            }
            cur = sys::ggml_mul_mat(c, w.unembd, cur);
            if let (true, Some(cap)) = (full, self.softcap) {
                cur = sys::ggml_scale(c, cur, 1.0 / cap);
                cur = sys::ggml_tanh(c, cur);
                cur = sys::ggml_scale(c, cur, cap);
            }
            let gf = sys::ggml_new_graph(c);
            sys::ggml_build_forward_expand(gf, cur);
            compute(gf, n_threads)?;
            let out = std::slice::from_raw_parts(sys::ggml_get_data_f32(cur), n * v);
            Ok(out.to_vec())
        }
    }
}

/// Run a graph on the CPU with its own work buffer.
///
/// # Safety
/// `gf` must be a valid graph whose tensors are all allocated.
unsafe fn compute(gf: *mut sys::ggml_cgraph, n_threads: usize) -> Result<()> {
    let threads = n_threads.clamp(1, 512) as i32;
    // SAFETY: per the contract; the work buffer outlives the computation.
    unsafe {
        let mut plan = sys::ggml_graph_plan(gf, threads, std::ptr::null_mut());
        let mut work = vec![0u8; plan.work_size];
        plan.work_data = if work.is_empty() {
            std::ptr::null_mut()
        } else {
            work.as_mut_ptr()
        };
        let status = sys::ggml_graph_compute(gf, &mut plan);
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("logit lens: ggml's graph computation failed (status {status})"),
            ));
        }
    }
    Ok(())
}
