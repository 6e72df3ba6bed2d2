//! The lens's weights read from a GGUF file as stored: the final norm
//! (`output_norm.weight`, and `output_norm.bias` for a layer norm), the
//! unembedding (`output.weight`, or the tied `token_embd.weight`), the norm's
//! epsilon and the final logit soft-cap. Only these tensors are read; every
//! check ggml would assert on is made here first.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use llama_cpp_sys_2 as sys;

use crate::error::{Error, ErrorKind, Result};

/// Where one tensor lies in the file and what it is.
#[derive(Debug, Clone)]
pub(super) struct TensorRef {
    pub(super) name: String,
    pub(super) ty: sys::ggml_type,
    pub(super) ne: [i64; 4],
    /// Absolute file offset of the data.
    pub(super) offset: u64,
    pub(super) nbytes: usize,
}

/// Everything the projection needs, checked.
#[derive(Debug)]
pub(super) struct Meta {
    pub(super) arch: String,
    pub(super) n_embd: usize,
    pub(super) n_vocab: usize,
    pub(super) n_layer: usize,
    pub(super) eps: f32,
    /// `{arch}.final_logit_softcapping`, when the GGUF has one (> 0).
    pub(super) softcap: Option<f32>,
    /// `output_norm.weight` as f32.
    pub(super) norm: Vec<f32>,
    /// `output_norm.bias` as f32: a layer norm (mean removed) instead of RMS.
    pub(super) norm_bias: Option<Vec<f32>>,
    /// `output.weight` or `token_embd.weight`, as stored.
    pub(super) unembd: TensorRef,
}

fn fail(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::ModelLoad,
        format!("logit lens for {}: {why}", path.display()),
    )
}

/// An open `gguf_context` (metadata only), freed on drop.
struct Gguf(*mut sys::gguf_context);

impl Drop for Gguf {
    fn drop(&mut self) {
        // SAFETY: the pointer came from gguf_init_from_file and is freed once.
        unsafe { sys::gguf_free(self.0) }
    }
}

impl Gguf {
    fn key(&self, key: &str) -> Option<i64> {
        let k = CString::new(key).ok()?;
        // SAFETY: valid context; k is NUL-terminated.
        let id = unsafe { sys::gguf_find_key(self.0, k.as_ptr()) };
        (id >= 0).then_some(id)
    }

    fn str(&self, key: &str) -> Option<String> {
        let id = self.key(key)?;
        // SAFETY: valid context and key id.
        if unsafe { sys::gguf_get_kv_type(self.0, id) } != sys::GGUF_TYPE_STRING {
            return None;
        }
        // SAFETY: the key holds a string (checked above), owned by the context.
        let s = unsafe { CStr::from_ptr(sys::gguf_get_val_str(self.0, id)) };
        Some(s.to_string_lossy().into_owned())
    }

    fn num(&self, key: &str) -> Option<f64> {
        let id = self.key(key)?;
        // SAFETY: valid context and key id; each getter is called for its own type only.
        unsafe {
            Some(match sys::gguf_get_kv_type(self.0, id) {
                sys::GGUF_TYPE_FLOAT32 => f64::from(sys::gguf_get_val_f32(self.0, id)),
                sys::GGUF_TYPE_FLOAT64 => sys::gguf_get_val_f64(self.0, id),
                sys::GGUF_TYPE_UINT32 => f64::from(sys::gguf_get_val_u32(self.0, id)),
                sys::GGUF_TYPE_INT32 => f64::from(sys::gguf_get_val_i32(self.0, id)),
                sys::GGUF_TYPE_UINT64 => sys::gguf_get_val_u64(self.0, id) as f64,
                sys::GGUF_TYPE_INT64 => sys::gguf_get_val_i64(self.0, id) as f64,
                _ => return None,
            })
        }
    }

    fn tensor(&self, name: &str) -> Option<TensorRef> {
        let c = CString::new(name).ok()?;
        // SAFETY: valid context; c is NUL-terminated.
        let id = unsafe { sys::gguf_find_tensor(self.0, c.as_ptr()) };
        if id < 0 {
            return None;
        }
        // SAFETY: id is a valid tensor id of this context; ne points at 4 values
        // owned by the context.
        unsafe {
            let ne = std::slice::from_raw_parts(sys::gguf_get_tensor_ne(self.0, id), 4);
            Some(TensorRef {
                name: name.to_string(),
                ty: sys::gguf_get_tensor_type(self.0, id),
                ne: [ne[0], ne[1], ne[2], ne[3]],
                offset: (sys::gguf_get_data_offset(self.0)
                    + sys::gguf_get_tensor_offset(self.0, id)) as u64,
                nbytes: sys::gguf_get_tensor_size(self.0, id),
            })
        }
    }
}

/// The name of a ggml type, or its number when ggml has none.
pub(super) fn type_name(ty: sys::ggml_type) -> String {
    if ty < sys::GGML_TYPE_COUNT {
        // SAFETY: ty is in range; ggml returns a static string (possibly NULL for removed types).
        let p = unsafe { sys::ggml_type_name(ty) };
        if !p.is_null() {
            // SAFETY: a NUL-terminated static string.
            return unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        }
    }
    format!("type {ty}")
}

/// True when ggml's CPU backend has a dot product for `ty` and `n_embd` is a
/// whole number of its blocks: what `ggml_mul_mat` would otherwise assert on.
fn cpu_can_multiply(ty: sys::ggml_type, n_embd: usize) -> bool {
    if ty >= sys::GGML_TYPE_COUNT {
        return false;
    }
    // SAFETY: ty < GGML_TYPE_COUNT, the size of ggml's trait tables.
    let (traits, blck) = unsafe { (sys::ggml_get_type_traits_cpu(ty), sys::ggml_blck_size(ty)) };
    // SAFETY: a pointer into ggml's static table (checked non-NULL).
    let has_dot = !traits.is_null() && unsafe { (*traits).vec_dot.is_some() };
    has_dot && blck > 0 && n_embd % blck as usize == 0
}

/// Read a small F32/F16/BF16 vector tensor of `n` elements.
fn read_vector(path: &Path, f: &mut File, t: &TensorRef, n: usize) -> Result<Vec<f32>> {
    if t.ne != [n as i64, 1, 1, 1] {
        return Err(fail(
            path,
            format!("{} has shape {:?}; it must be [{n}] (n_embd)", t.name, t.ne),
        ));
    }
    let elem = match t.ty {
        sys::GGML_TYPE_F32 => 4,
        sys::GGML_TYPE_F16 | sys::GGML_TYPE_BF16 => 2,
        ty => {
            return Err(fail(
                path,
                format!(
                    "{} is {}; the lens reads norm weights in F32, F16 or BF16",
                    t.name,
                    type_name(ty)
                ),
            ))
        }
    };
    let mut b = vec![0u8; n * elem];
    read_at(path, f, t.offset, &mut b)?;
    Ok(match t.ty {
        sys::GGML_TYPE_F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        sys::GGML_TYPE_F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    })
}

/// Read `buf.len()` bytes at `offset`.
pub(super) fn read_at(path: &Path, f: &mut File, offset: u64, buf: &mut [u8]) -> Result<()> {
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(buf))
        .map_err(|e| {
            Error::with_source(
                ErrorKind::ModelLoad,
                format!(
                    "logit lens for {}: cannot read tensor data: {e}",
                    path.display()
                ),
                e,
            )
        })
}

/// The architectures whose llama.cpp graph soft-caps the final logits
/// (`tanh(z / c) · c`), with the cap llama.cpp uses when the GGUF has no
/// `{arch}.final_logit_softcapping` (0: none). Other architectures ignore the key.
const SOFTCAP_ARCHS: &[(&str, f64)] = &[
    ("gemma2", 30.0),
    ("gemma3", 0.0),
    ("gemma3n", 30.0),
    ("gemma4", 30.0),
    ("grok", 0.0),
    ("dflash", 0.0),
];

/// Read and check the lens's metadata and small tensors from `path`.
pub(super) fn read_meta(path: &Path) -> Result<Meta> {
    crate::gguf::check_file(path)?;
    crate::engine::backend::init();
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| fail(path, "the path contains a NUL byte"))?;
    let params = sys::gguf_init_params {
        no_alloc: true,
        ctx: std::ptr::null_mut(),
    };
    // SAFETY: c is NUL-terminated; with ctx NULL no ggml context is made.
    let raw = unsafe { sys::gguf_init_from_file(c.as_ptr(), params) };
    if raw.is_null() {
        return Err(fail(path, "ggml cannot read the GGUF file"));
    }
    let g = Gguf(raw);
    let arch = g
        .str("general.architecture")
        .ok_or_else(|| fail(path, "no general.architecture"))?;
    let int = |k: &str| {
        g.num(&format!("{arch}.{k}"))
            .filter(|&x| x >= 1.0 && x.fract() == 0.0)
            .map(|x| x as usize)
            .ok_or_else(|| fail(path, format!("no {arch}.{k}")))
    };
    let n_embd = int("embedding_length")?;
    let n_layer = int("block_count")?;
    let norm_t = g
        .tensor("output_norm.weight")
        .ok_or_else(|| fail(path, "the model has no output_norm.weight (its final norm)"))?;
    let bias_t = g.tensor("output_norm.bias");
    let eps_key = if bias_t.is_some() {
        "attention.layer_norm_epsilon"
    } else {
        "attention.layer_norm_rms_epsilon"
    };
    let eps = g
        .num(&format!("{arch}.{eps_key}"))
        .filter(|e| e.is_finite() && *e >= 0.0)
        .ok_or_else(|| {
            fail(
                path,
                format!("no {arch}.{eps_key} (the final norm's epsilon)"),
            )
        })? as f32;
    let softcap = SOFTCAP_ARCHS
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|&(_, default)| {
            g.num(&format!("{arch}.final_logit_softcapping"))
                .unwrap_or(default)
        })
        .filter(|c| c.is_finite() && *c > 0.0)
        .map(|c| c as f32);
    let unembd = g
        .tensor("output.weight")
        .or_else(|| g.tensor("token_embd.weight"))
        .ok_or_else(|| {
            fail(
                path,
                "the model has neither output.weight nor token_embd.weight (its unembedding)",
            )
        })?;
    let [ne0, ne1, ne2, ne3] = unembd.ne;
    if ne0 != n_embd as i64 || ne1 < 1 || ne2 != 1 || ne3 != 1 {
        return Err(fail(
            path,
            format!(
                "{} has shape {:?}; it must be [{n_embd}, n_vocab]",
                unembd.name, unembd.ne
            ),
        ));
    }
    if !cpu_can_multiply(unembd.ty, n_embd) {
        return Err(fail(
            path,
            format!(
                "{} is {}, a type ggml's CPU backend cannot multiply",
                unembd.name,
                type_name(unembd.ty)
            ),
        ));
    }
    let mut f = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let norm = read_vector(path, &mut f, &norm_t, n_embd)?;
    let norm_bias = bias_t
        .map(|b| read_vector(path, &mut f, &b, n_embd))
        .transpose()?;
    Ok(Meta {
        arch,
        n_embd,
        n_vocab: ne1 as usize,
        n_layer,
        eps,
        softcap,
        norm,
        norm_bias,
        unembd,
    })
}
