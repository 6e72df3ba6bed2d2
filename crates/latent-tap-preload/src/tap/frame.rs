//! Frames: one selected node's labelled rows, copied into the ring.

use std::ffi::c_void;

use crate::config::Config;
use crate::convert::{convert_run, ggml_type_size, SrcTensor};
use crate::host::{self, Tensor};
use crate::labels::POS_UNSET;
use crate::record::{frame_len, kind, put, FrameHeader, RowMeta};
use crate::ring::WriteError;
use crate::select::layer_of;
use crate::wire::ROW_OUTPUT;

use super::{log, State};

/// Copies one selected node's labelled rows into the ring.
pub(super) fn write_frame(st: &mut State, cfg: &Config, t: &Tensor, pattern: u32) {
    let Ok(h) = host::host() else { return };
    // Per-token rows (F32/F16/BF16, any strides on the host; contiguous rows
    // on a device, which are fetched whole).
    let Some(ts) = ggml_type_size(t.typ as u32) else {
        return;
    };
    // SAFETY: a live node the scheduler just computed.
    let on_host = !t.buffer.is_null() && unsafe { (h.buffer_is_host)(t.buffer) };
    if st.labels.is_empty()
        || t.ne[2] != 1
        || t.ne[3] != 1
        || t.ne[0] <= 0
        || (!on_host && t.nb[0] != ts)
    {
        return;
    }
    let width = t.ne[0] as usize;
    let n_src = t.ne[1].max(0) as usize;
    // Row `i` of the node is ubatch row `i`, or (the last layer, pruned to the
    // rows with logits) ubatch row `out_ids[i]`.
    st.pick.clear();
    if n_src == st.labels.len() {
        st.pick.extend(0..n_src);
    } else if n_src == st.rows.out_ids.len() {
        st.pick
            .extend(st.rows.out_ids.iter().map(|&r| r.max(0) as usize));
    } else {
        return;
    }
    let labels = &st.labels;
    let keep =
        |i: usize, r: usize| r < labels.len() && (!cfg.last_only || labels[r].output) && i < n_src;
    let n_rows = st
        .pick
        .iter()
        .enumerate()
        .filter(|&(i, &r)| keep(i, r))
        .count();
    if n_rows == 0 {
        return;
    }
    let dtype = cfg.dtype;
    let len = frame_len(n_rows, width, dtype);
    let seq = st.frame_seq;
    st.frame_seq += 1;
    let Some(link) = st.link.as_mut() else { return };
    let mut g = match link.producer.try_write(len) {
        Ok(g) => g,
        Err(e) => {
            link.producer.note_drop();
            st.frames_dropped += 1;
            if matches!(e, WriteError::TooLarge { .. }) && !st.too_large_logged {
                st.too_large_logged = true;
                log(&format!(
                    "a frame of {len} bytes does not fit the ring: raise LATENT_TAP_RING_MB"
                ));
            }
            return;
        }
    };
    let mut name = [0u8; 64];
    let tn = t.name();
    name[..tn.len().min(63)].copy_from_slice(&tn[..tn.len().min(63)]);
    let hdr = FrameHeader {
        kind: kind::FRAME,
        header_size: std::mem::size_of::<FrameHeader>() as u32,
        seq,
        step: st.graphs,
        ubatch: 0,
        tensor_index: pattern,
        layer: std::str::from_utf8(tn)
            .ok()
            .and_then(layer_of)
            .unwrap_or(-1),
        dtype: dtype as u32,
        n_rows: n_rows as u32,
        width: width as u64,
        ne: t.ne,
        name,
    };
    put(&mut g, 0, &hdr);
    let mut off = std::mem::size_of::<FrameHeader>();
    for (i, &r) in st.pick.iter().enumerate() {
        if !keep(i, r) {
            continue;
        }
        let l = &labels[r];
        let meta = RowMeta {
            seq_id: l.seq,
            pos: if l.pos == POS_UNSET { -1 } else { l.pos },
            token: l.token,
            flags: if l.output { ROW_OUTPUT } else { 0 },
        };
        put(&mut g, off, &meta);
        off += std::mem::size_of::<RowMeta>();
    }
    let src = SrcTensor {
        base: t.data as *const u8,
        ty: t.typ as u32,
        ne: t.ne,
        nb: t.nb,
    };
    let row_bytes = width * ts;
    let esz = dtype.size();
    for (i, &r) in st.pick.iter().enumerate() {
        if !keep(i, r) {
            continue;
        }
        let dst = &mut g[off..off + width * esz];
        if on_host {
            // SAFETY: row `i` (< ne[1]) of a computed host tensor, every
            // element addressed by its ne/nb readable.
            unsafe { src.copy_row(1, i, dtype, dst) };
        } else {
            st.staging.resize(row_bytes, 0);
            // SAFETY: one contiguous row into the staging buffer; ggml copies
            // it from the device.
            unsafe {
                (h.tensor_get)(
                    t,
                    st.staging.as_mut_ptr() as *mut c_void,
                    i * t.nb[1],
                    row_bytes,
                )
            };
            convert_run(&st.staging, src.ty, dst, dtype);
        }
        off += width * esz;
    }
    g.commit();
}
