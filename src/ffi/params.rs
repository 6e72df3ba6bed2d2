//! Parameter structs of the C API. Each starts with `struct_size`, set by its
//! `_default` function, so fields can be appended without breaking old callers.

use std::ffi::c_char;
use std::time::Duration;

use super::{c_str, guard, lt_status, read_sized, write_sized, FfiError};
use crate::capture::{CaptureMode, Policy, Rows};
use crate::engine::{ContextOptions, SamplingOptions};
use crate::record::Dtype;
use crate::select::LayerFilter;
use crate::session::{CaptureSpec, GenerateOptions};

/// `lt_capture_params.rows`: every row.
pub const LT_ROWS_ALL: u32 = 0;
/// `lt_capture_params.rows`: only the rows whose next-token distribution is
/// computed (a prompt's last token and every generated token).
pub const LT_ROWS_LAST: u32 = 1;
/// Element type f32 (`dtype` fields).
pub const LT_DTYPE_F32: u32 = 0;
/// Element type f16.
pub const LT_DTYPE_F16: u32 = 1;
/// Element type bf16.
pub const LT_DTYPE_BF16: u32 = 2;
/// `lt_capture_params.policy`: lossless, wait for space.
pub const LT_POLICY_BLOCK: u32 = 0;
/// `lt_capture_params.policy`: drop new frames when full, count them.
pub const LT_POLICY_DROP_NEWEST: u32 = 1;
/// `lt_row_meta.flags` / `lt_token_header.flags`: part of the prompt.
pub const LT_ROW_PROMPT: u32 = 1;
const _: () = assert!(LT_ROW_PROMPT == crate::record::ROW_PROMPT);

/// What to capture and how to ship it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct lt_capture_params {
    /// `sizeof(lt_capture_params)`; set by `lt_capture_params_default`.
    pub struct_size: u32,
    /// Keep: 0 = all rows, 1 = the rows whose next-token distribution is computed.
    pub rows: u32,
    /// Comma-separated glob patterns over graph node names, e.g. "l_out-*".
    /// NULL or "" captures nothing (token events only).
    pub patterns: *const c_char,
    /// Optional layer filter ("4..12", "4..=12", "7", comma lists); NULL for all.
    pub layers: *const c_char,
    /// Output element type: 0 = f32, 1 = f16, 2 = bf16.
    pub dtype: u32,
    /// Full-ring policy: 0 = block (lossless), 1 = drop-newest.
    pub policy: u32,
    /// Ring capacity in bytes. It must hold the largest frame: a frame of
    /// `n_ubatch` rows of the widest selected tensor, `sizeof(lt_frame_header)
    /// + n_ubatch * (sizeof(lt_row_meta) + width * element size)`, plus a few
    /// bytes of ring overhead; else creating the session or tap fails with
    /// `LT_FRAME_TOO_LARGE`.
    pub ring_bytes: u64,
    /// With `policy` block: ms to wait for space before the decode is cancelled.
    pub block_timeout_ms: u32,
    /// How tensors leave the graph: 0 = auto (deferred where supported, else
    /// callback), 1 = callback (the graph is cut at each selected tensor),
    /// 2 = deferred (selected tensors are kept and copied after each graph
    /// compute; falls back to callback where unsupported). Deferred needs a
    /// library linked with the scheduler wrappers (the shared library is; see
    /// the README's "Capture modes"). Was a reserved zero field: old callers get auto.
    pub capture_mode: u32,
}

/// Context settings for sessions the library runs.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct lt_context_params {
    /// `sizeof(lt_context_params)`.
    pub struct_size: u32,
    /// Context length in tokens.
    pub n_ctx: u32,
    /// Largest batch per llama_decode.
    pub n_batch: u32,
    /// Largest batch per graph compute.
    pub n_ubatch: u32,
    /// Compute threads; 0 = number of cores.
    pub n_threads: i32,
    /// Layers offloaded to a GPU backend (-1 all). Used by `lt_model_new`.
    pub n_gpu_layers: i32,
    /// 1 = keep the KV cache in f32 (bit-stable comparisons); 0 = f16.
    pub f32_kv: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// llama.cpp RPC workers that take offloaded layers, as
    /// `"HOST:PORT[,HOST:PORT...]"` (llama-server's `--rpc`), or NULL. Used by
    /// `lt_model_new`. Added in 0.1 after the first release: callers whose
    /// `struct_size` ends before it get NULL.
    pub rpc_servers: *const c_char,
}

/// Sampling settings of one generation.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct lt_sampling_params {
    /// `sizeof(lt_sampling_params)`.
    pub struct_size: u32,
    /// Tokens to generate (at least 1).
    pub n_predict: u32,
    /// Temperature; 0 = greedy.
    pub temperature: f32,
    /// Top-k cut for sampling (0 = off).
    pub top_k: i32,
    /// Top-p cut for sampling (1 = off).
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u32,
    /// Alternatives reported per generated token (top-k logprobs).
    pub report_top_k: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Smallest `struct_size` accepted for each struct: its size in version 0.1.
const CAPTURE_PARAMS_MIN: usize = 48;
const CONTEXT_PARAMS_MIN: usize = 32;
const SAMPLING_PARAMS_MIN: usize = 32;
const _: () = assert!(std::mem::size_of::<lt_capture_params>() == CAPTURE_PARAMS_MIN);
// `rpc_servers` came after the first release: 32 bytes then, 40 now (LP64).
const _: () = assert!(std::mem::offset_of!(lt_context_params, rpc_servers) == CONTEXT_PARAMS_MIN);
const _: () = assert!(std::mem::size_of::<lt_sampling_params>() == SAMPLING_PARAMS_MIN);

/// Fill `out` with defaults: all rows of `l_out-*`, f32, block for 10 s, 64 MiB ring.
///
/// Set `out->struct_size = sizeof(*out)` first. Thread-safe.
#[no_mangle]
pub extern "C" fn lt_capture_params_default(out: *mut lt_capture_params) -> lt_status {
    guard(|| write_sized(out, default_capture(), CAPTURE_PARAMS_MIN, "out"))
}

/// Fill `out` with defaults: n_ctx 4096, n_batch = n_ubatch = 512, all cores, all GPU layers.
///
/// Set `out->struct_size = sizeof(*out)` first. Thread-safe.
#[no_mangle]
pub extern "C" fn lt_context_params_default(out: *mut lt_context_params) -> lt_status {
    guard(|| write_sized(out, default_context(), CONTEXT_PARAMS_MIN, "out"))
}

/// Fill `out` with defaults: 16 tokens, greedy, top-10 logprobs.
///
/// Set `out->struct_size = sizeof(*out)` first. Thread-safe.
#[no_mangle]
pub extern "C" fn lt_sampling_params_default(out: *mut lt_sampling_params) -> lt_status {
    guard(|| write_sized(out, default_sampling(), SAMPLING_PARAMS_MIN, "out"))
}

pub(crate) fn capture_spec(p: *const lt_capture_params) -> Result<CaptureSpec, FfiError> {
    let p = &read_sized(p, CAPTURE_PARAMS_MIN, default_capture(), "capture")?;
    let patterns = if p.patterns.is_null() {
        Vec::new()
    } else {
        vec![c_str(p.patterns, "patterns")?.to_string()]
    };
    let layers = if p.layers.is_null() {
        None
    } else {
        Some(LayerFilter::parse(c_str(p.layers, "layers")?)?)
    };
    let rows = match p.rows {
        0 => Rows::All,
        1 => Rows::Last,
        r => {
            return Err(FfiError::new(
                lt_status::LT_INVALID_ARGUMENT,
                format!("rows must be 0 or 1, not {r}"),
            ))
        }
    };
    let dtype = match p.dtype {
        0 => Dtype::F32,
        1 => Dtype::F16,
        2 => Dtype::BF16,
        d => {
            return Err(FfiError::new(
                lt_status::LT_INVALID_ARGUMENT,
                format!("dtype must be 0, 1 or 2, not {d}"),
            ))
        }
    };
    let policy = match p.policy {
        0 => Policy::Block {
            timeout: Duration::from_millis(p.block_timeout_ms as u64),
        },
        1 => Policy::DropNewest,
        x => {
            return Err(FfiError::new(
                lt_status::LT_INVALID_ARGUMENT,
                format!("policy must be 0 or 1, not {x}"),
            ))
        }
    };
    let mode = match p.capture_mode {
        0 => CaptureMode::Auto,
        1 => CaptureMode::Callback,
        2 => CaptureMode::Deferred,
        m => {
            return Err(FfiError::new(
                lt_status::LT_INVALID_ARGUMENT,
                format!("capture_mode must be 0, 1 or 2, not {m}"),
            ))
        }
    };
    let ring_bytes = usize::try_from(p.ring_bytes)
        .ok()
        .filter(|&b| b > 0)
        .ok_or_else(|| {
            FfiError::new(
                lt_status::LT_INVALID_ARGUMENT,
                format!("ring_bytes {} is out of range", p.ring_bytes),
            )
        })?;
    Ok(CaptureSpec {
        patterns,
        layers,
        rows,
        dtype,
        ring_bytes,
        policy,
        mode,
    })
}

/// Read a caller's context parameters.
pub(crate) fn context_params(p: *const lt_context_params) -> Result<lt_context_params, FfiError> {
    read_sized(p, CONTEXT_PARAMS_MIN, default_context(), "ctx")
}

pub(crate) fn context_options(p: *const lt_context_params) -> Result<ContextOptions, FfiError> {
    let p = &context_params(p)?;
    Ok(ContextOptions {
        n_ctx: p.n_ctx,
        n_batch: p.n_batch,
        n_ubatch: p.n_ubatch,
        n_threads: (p.n_threads > 0).then_some(p.n_threads),
        f32_kv: p.f32_kv != 0,
        ..ContextOptions::default()
    })
}

pub(crate) fn generate_options(p: *const lt_sampling_params) -> Result<GenerateOptions, FfiError> {
    let p = &read_sized(p, SAMPLING_PARAMS_MIN, default_sampling(), "sampling")?;
    Ok(GenerateOptions {
        n_predict: p.n_predict as usize,
        sampling: SamplingOptions {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: 0.0,
            seed: p.seed,
        },
        n_probs: p.report_top_k as usize,
    })
}

fn default_capture() -> lt_capture_params {
    lt_capture_params {
        struct_size: std::mem::size_of::<lt_capture_params>() as u32,
        rows: 0,
        patterns: c"l_out-*".as_ptr(),
        layers: std::ptr::null(),
        dtype: 0,
        policy: 0,
        ring_bytes: crate::settings::DEFAULT_RING_BYTES as u64,
        block_timeout_ms: 10_000,
        capture_mode: 0,
    }
}

fn default_context() -> lt_context_params {
    let d = ContextOptions::default();
    lt_context_params {
        struct_size: std::mem::size_of::<lt_context_params>() as u32,
        n_ctx: d.n_ctx,
        n_batch: d.n_batch,
        n_ubatch: d.n_ubatch,
        n_threads: 0,
        n_gpu_layers: -1,
        f32_kv: 0,
        reserved: 0,
        rpc_servers: std::ptr::null(),
    }
}

fn default_sampling() -> lt_sampling_params {
    lt_sampling_params {
        struct_size: std::mem::size_of::<lt_sampling_params>() as u32,
        n_predict: 16,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        report_top_k: 10,
        reserved: 0,
    }
}
