//! The data phase: one selected tensor's rows of the current ubatch, copied
//! (and converted) straight into a ring slot as a frame. No allocation, no lock.

use std::ffi::c_void;

use llama_cpp_sys_2 as sys;

use super::convert::{ggml_type_size, SrcTensor};
use super::{Mode, Policy, Rows, Tap, PLAN_OUTPUT};
use crate::error::{Error, ErrorKind, Result};
use crate::record::{self, Dtype, FrameHeader, RowMeta};
use crate::ring::WriteError;
use crate::select::Selection;

impl Tap {
    pub(super) fn capture(&mut self, t: &sys::ggml_tensor) -> Result<()> {
        let Mode::Capture(a) = &mut self.mode else {
            return Ok(());
        };
        let Some(ti) = a.pending.take() else {
            return Ok(());
        };
        // A tensor with no element (e.g. the last layer pruned to the outputs of a
        // ubatch that has none) holds no row: no frame.
        if t.ne.iter().any(|&n| n <= 0) {
            return Ok(());
        }
        let plan = &self.plan;
        let start = self.ubatch.max(0) as usize * plan.n_ubatch;
        let end = (start + plan.n_ubatch).min(plan.rows.len());
        if start >= end {
            self.counters.unaligned += 1;
            return Ok(());
        }
        let n_tok = (end - start) as i64;
        let n_out = plan.flags[start..end]
            .iter()
            .filter(|&&f| f & PLAN_OUTPUT != 0)
            .count() as i64;
        // Token axis: the outermost axis whose size is the ubatch's token (or output) count.
        // Prefer the token count: with one output, a trailing axis of size 1 would match too.
        let axis_of = |n: i64| {
            (1..4usize)
                .rev()
                .find(|&ax| t.ne[ax] == n && t.ne[ax + 1..].iter().all(|&m| m == 1))
        };
        let Some(axis) = axis_of(n_tok).or_else(|| axis_of(n_out)) else {
            self.counters.unaligned += 1;
            return Ok(());
        };
        let all = t.ne[axis] == n_tok;
        a.pick.clear();
        let mut k = 0u32;
        for (i, &f) in plan.flags[start..end].iter().enumerate() {
            if all || f & PLAN_OUTPUT != 0 {
                if a.rows == Rows::All || f & PLAN_OUTPUT != 0 {
                    a.pick.push(k | ((i as u32) << 16));
                }
                k += 1;
            }
        }
        if a.pick.is_empty() {
            return Ok(());
        }
        let width = t.ne[..axis].iter().product::<i64>() as usize;
        let sel = &a.sel.tensors()[ti as usize];
        if width != sel.row_width {
            // Not the per-token row the probe saw (e.g. a view whose size follows the
            // KV cache): skip the frame rather than ship rows of another shape.
            self.counters.unaligned += 1;
            return Ok(());
        }
        let n_rows = a.pick.len();
        let len = record::frame_len(n_rows, width, a.dtype);
        let seq = self.seq;
        self.seq += 1;
        self.counters.frames += 1;
        let grant = match a.policy {
            Policy::DropNewest => match a.producer.try_write(len) {
                Err(WriteError::Full) => {
                    a.producer.note_drop();
                    self.counters.drops += 1;
                    return Ok(());
                }
                other => other,
            },
            Policy::Block { timeout } => a.producer.write_blocking(len, timeout),
        };
        let mut g = grant.map_err(ring_error)?;
        let ts = ggml_type_size(t.type_).unwrap_or(4);
        // Device tensors are fetched once into host staging; host tensors are read in place.
        // SAFETY: `t.buffer` is the tensor's live backend buffer during the data phase.
        let host = t.buffer.is_null() || unsafe { sys::ggml_backend_buffer_is_host(t.buffer) };
        let base = if host {
            t.data as *const u8
        } else {
            // SAFETY: t is a valid tensor during the callback.
            let nbytes = unsafe { sys::ggml_nbytes(t) };
            if a.staging.len() < nbytes {
                a.staging.resize(nbytes, 0);
            }
            // SAFETY: staging holds nbytes writable bytes; the backend copies the whole tensor.
            unsafe {
                sys::ggml_backend_tensor_get(t, a.staging.as_mut_ptr() as *mut c_void, 0, nbytes)
            };
            a.staging.as_ptr()
        };
        let src = SrcTensor {
            base,
            ty: t.type_,
            ne: t.ne,
            nb: t.nb,
        };
        let mut header = FrameHeader {
            kind: record::kind::FRAME,
            header_size: std::mem::size_of::<FrameHeader>() as u32,
            seq,
            step: plan.step,
            ubatch: plan.ubatch_base + self.ubatch.max(0) as u32,
            tensor_index: ti,
            layer: sel.layer.unwrap_or(-1),
            dtype: a.dtype as u32,
            n_rows: n_rows as u32,
            width: width as u64,
            ne: t.ne,
            name: [0; 64],
        };
        let nb = sel.name.as_bytes();
        let nl = nb.len().min(63);
        header.name[..nl].copy_from_slice(&nb[..nl]);
        record::put(&mut g, 0, &header);
        let mut off = std::mem::size_of::<FrameHeader>();
        for &p in &a.pick {
            let r = plan.rows[start + (p >> 16) as usize];
            record::put(&mut g, off, &r);
            off += std::mem::size_of::<RowMeta>();
        }
        let row_bytes = width * a.dtype.size();
        let mut overflow = 0;
        for &p in &a.pick {
            let row = (p & 0xffff) as usize;
            debug_assert!(ts > 0 && row < t.ne[axis] as usize);
            // SAFETY: base covers the tensor (host data, or the staging copy of all of it)
            // and row < ne[axis].
            overflow += unsafe { src.copy_row(axis, row, a.dtype, &mut g[off..off + row_bytes]) };
            off += row_bytes;
        }
        g.commit();
        self.counters.bytes += len as u64;
        if overflow > 0 {
            // Cold path: the run fails, so formatting the message may allocate.
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "tensor '{}' holds {overflow} finite values beyond f16's range (|x| > 65504) at step {}: capture it as bf16 or f32",
                    sel.name, plan.step
                ),
            ));
        }
        Ok(())
    }
}

/// Every frame must fit in the ring, or a lossless capture could never finish.
pub(super) fn check_fits(
    sel: &Selection,
    n_ubatch: usize,
    dtype: Dtype,
    max_len: usize,
) -> Result<()> {
    for t in sel.tensors() {
        let need = record::frame_len(n_ubatch, t.row_width.max(1), dtype);
        if need > max_len {
            return Err(Error::new(
                ErrorKind::FrameTooLarge,
                format!(
                    "a frame of '{}' can take {} bytes ({} rows), more than the ring's largest record ({} bytes): raise the ring capacity or lower n_ubatch",
                    t.name, need, n_ubatch, max_len
                ),
            ));
        }
    }
    Ok(())
}

pub(super) fn ring_error(e: WriteError) -> Error {
    match e {
        WriteError::TooLarge { .. } => Error::new(
            ErrorKind::FrameTooLarge,
            format!("{e}: raise the ring capacity"),
        ),
        WriteError::Timeout => Error::new(
            ErrorKind::RingTimeout,
            "the ring stayed full past its timeout (the consumer is too slow): decode cancelled",
        ),
        _ => Error::new(ErrorKind::RingTimeout, format!("{e}: decode cancelled")),
    }
}
