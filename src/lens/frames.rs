//! Lens inputs from captured frames: `l_out-N` rows of any dtype, as f32.

use crate::convert::convert_to_f32;
use crate::error::{Error, Result};
use crate::sched::FrameOut;

use super::LensInput;

/// A residual row taken out of a frame.
#[derive(Debug, Clone)]
pub struct OwnedInput {
    /// Layer (`N` of `l_out-N`).
    pub layer: usize,
    /// Sequence id.
    pub seq: i32,
    /// Position.
    pub pos: i32,
    /// Job step.
    pub step: u32,
    /// Token at this position (the row's own token, not its target; -1 when unknown).
    pub token: i32,
    /// The row as f32.
    pub h: Vec<f32>,
}

impl OwnedInput {
    /// Borrow as a [`LensInput`].
    pub fn as_input(&self) -> LensInput<'_> {
        LensInput {
            layer: self.layer,
            seq: self.seq,
            pos: self.pos,
            step: self.step,
            h: &self.h,
        }
    }
}

/// `l_out-N` → `N` (the residual stream after block N); other names → `None`.
pub fn layer_of_name(name: &str) -> Option<usize> {
    name.strip_prefix("l_out-")?.parse().ok()
}

/// The rows of the `l_out-N` frames among `frames` (others are skipped) as
/// f32 inputs. A frame whose width is not `n_embd` is an error naming it.
pub fn inputs_from_frames(frames: &[FrameOut], n_embd: usize) -> Result<Vec<OwnedInput>> {
    let mut out = Vec::new();
    for f in frames {
        let Some(layer) = layer_of_name(f.name()) else {
            continue;
        };
        let w = f.header.width as usize;
        if w != n_embd {
            return Err(Error::invalid(format!(
                "tensor {} has rows of width {w}, not n_embd {n_embd}: the lens reads residual-stream rows only",
                f.name()
            )));
        }
        let dt = f.dtype();
        let row_bytes = w * dt.size();
        for (k, r) in f.rows.iter().enumerate() {
            let src = f
                .data
                .get(k * row_bytes..(k + 1) * row_bytes)
                .ok_or_else(|| {
                    Error::invalid(format!("frame of {} is shorter than its rows", f.name()))
                })?;
            let mut bytes = vec![0u8; w * 4];
            convert_to_f32(src, dt, &mut bytes);
            let h = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            out.push(OwnedInput {
                layer,
                seq: r.seq_id,
                pos: r.pos,
                step: f.header.step,
                token: r.token,
                h,
            });
        }
    }
    Ok(out)
}

/// The rows of the `l_out-N` tensors of a collected stream (CLI, tests) as
/// f32 inputs; a tensor whose width is not `n_embd` is an error naming it.
pub fn inputs_from_collected(
    c: &crate::output::Collected,
    n_embd: usize,
) -> Result<Vec<OwnedInput>> {
    let mut out = Vec::new();
    for t in &c.tensors {
        let Some(layer) = layer_of_name(&t.name) else {
            continue;
        };
        if t.n_rows() == 0 {
            continue;
        }
        if t.width != n_embd {
            return Err(Error::invalid(format!(
                "tensor {} has rows of width {}, not n_embd {n_embd}: the lens reads residual-stream rows only",
                t.name, t.width
            )));
        }
        for i in 0..t.n_rows() {
            out.push(OwnedInput {
                layer,
                seq: t.seq[i],
                pos: t.pos[i],
                step: t.step[i],
                token: -1,
                h: t.row_f32(i),
            });
        }
    }
    Ok(out)
}
