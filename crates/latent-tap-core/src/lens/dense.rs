//! `lens.safetensors`: a lens as dense arrays (R rows × L layers × K alternatives).
//!
//! | name | dtype | shape | what |
//! |---|---|---|---|
//! | `layers` | I32 | `[L]` | the lens's layers, in cell order |
//! | `pos`, `seq`, `step`, `target` | I32 | `[R]` | per row; `target` -1 where none |
//! | `present` | U8 | `[R, L]` | 1 where the layer has a row at that position |
//! | `top_ids` | I32 | `[R·L, K]` | cell (r, l) is row r·L + l; -1 where absent |
//! | `top_logprobs` | F32 | `[R·L, K]` | NaN where absent |
//! | `entropy`, `target_logprob`, `kl` | F32 | `[R, L]` | NaN where absent or unknown |
//! | `target_rank` | I32 | `[R, L]` | -1 where absent or no target |

use std::path::Path;

use super::json::LensRow;
use crate::error::Result;
use crate::output::{write_entries, Entry};

fn i32s(v: impl IntoIterator<Item = i32>) -> Vec<u8> {
    v.into_iter().flat_map(i32::to_le_bytes).collect()
}

fn f32s(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// `(name, dtype, shape, rank, bytes)` of one array.
type Array = (&'static str, &'static str, [usize; 2], usize, Vec<u8>);

/// Write `rows` (cells in `layers` order, `k` alternatives each) to `path`.
pub fn write_dense(
    path: &Path,
    layers: &[usize],
    rows: &[LensRow],
    k: usize,
    metadata: &[(&str, String)],
) -> Result<()> {
    let (r, l) = (rows.len(), layers.len());
    let cells = || rows.iter().flat_map(|row| row.cells.iter());
    let per_cell = |f: &dyn Fn(&super::CellStats) -> f32| {
        f32s(cells().map(|c| c.as_ref().map_or(f32::NAN, f)))
    };
    let top_ids = i32s(cells().flat_map(|c| {
        (0..k).map(move |j| c.as_ref().and_then(|c| c.top.get(j)).map_or(-1, |t| t.0))
    }));
    let top_lp = f32s(cells().flat_map(|c| {
        (0..k).map(move |j| {
            c.as_ref()
                .and_then(|c| c.top.get(j))
                .map_or(f32::NAN, |t| t.1)
        })
    }));
    let arrays: Vec<Array> = vec![
        (
            "layers",
            "I32",
            [l, 0],
            1,
            i32s(layers.iter().map(|&x| x as i32)),
        ),
        ("pos", "I32", [r, 0], 1, i32s(rows.iter().map(|x| x.pos))),
        ("seq", "I32", [r, 0], 1, i32s(rows.iter().map(|x| x.seq))),
        (
            "step",
            "I32",
            [r, 0],
            1,
            i32s(rows.iter().map(|x| x.step as i32)),
        ),
        (
            "target",
            "I32",
            [r, 0],
            1,
            i32s(rows.iter().map(|x| x.target.unwrap_or(-1))),
        ),
        (
            "present",
            "U8",
            [r, l],
            2,
            cells().map(|c| u8::from(c.is_some())).collect(),
        ),
        ("top_ids", "I32", [r * l, k], 2, top_ids),
        ("top_logprobs", "F32", [r * l, k], 2, top_lp),
        ("entropy", "F32", [r, l], 2, per_cell(&|c| c.entropy)),
        (
            "target_logprob",
            "F32",
            [r, l],
            2,
            per_cell(&|c| c.target_logprob.unwrap_or(f32::NAN)),
        ),
        (
            "kl",
            "F32",
            [r, l],
            2,
            per_cell(&|c| c.kl.unwrap_or(f32::NAN)),
        ),
        (
            "target_rank",
            "I32",
            [r, l],
            2,
            i32s(cells().map(|c| {
                c.as_ref()
                    .and_then(|c| c.target_rank)
                    .map_or(-1, |x| x as i32)
            })),
        ),
    ];
    let entries: Vec<Entry> = arrays
        .iter()
        .map(|(name, dtype, shape, rank, data)| Entry {
            name,
            dtype,
            shape: *shape,
            rank: *rank,
            data,
        })
        .collect();
    write_entries(path, &entries, metadata)
}
