//! Reading rows back from a capture's `latents.safetensors` (or any
//! safetensors file in that layout: `NAME` `[rows, width]` in F32, F16 or
//! BF16, with `NAME.pos` and `NAME.seq` as I32): what `capture --patch-from`
//! takes its rows from.

use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, ErrorKind, Result};

/// The rows of one tensor of a capture file, widened to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRows {
    /// Values per row.
    pub width: usize,
    /// `rows × width` values, row-major.
    pub data: Vec<f32>,
    /// Each row's position.
    pub pos: Vec<i32>,
    /// Each row's sequence.
    pub seq: Vec<i32>,
}

impl StoredRows {
    /// The row of sequence `seq` at `pos` (the first such row).
    pub fn row(&self, seq: i32, pos: i32) -> Option<&[f32]> {
        let i = (0..self.pos.len()).find(|&i| self.pos[i] == pos && self.seq[i] == seq)?;
        self.data.get(i * self.width..(i + 1) * self.width)
    }

    /// The positions sequence `seq` has rows for, ascending, each once.
    pub fn positions(&self, seq: i32) -> Vec<i32> {
        let mut p: Vec<i32> = (0..self.pos.len())
            .filter(|&i| self.seq[i] == seq)
            .map(|i| self.pos[i])
            .collect();
        p.sort_unstable();
        p.dedup();
        p
    }
}

/// Every tensor `NAME` of the file at `path` that has rows (a `NAME.pos`).
pub fn stored_tensors(path: &Path) -> Result<Vec<String>> {
    let bytes = read(path)?;
    let st = parse(path, &bytes)?;
    Ok(with_rows(&st))
}

fn with_rows(st: &SafeTensors<'_>) -> Vec<String> {
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| st.tensor(&format!("{n}.pos")).is_ok())
        .cloned()
        .collect();
    names.sort();
    names
}

/// The rows of `tensor` in the file at `path`. Errors name the file and say
/// what is wrong: unreadable, not safetensors, no such tensor (listing those
/// it has), a dtype other than F32/F16/BF16, or `.pos`/`.seq` missing or of
/// the wrong length.
pub fn read_rows(path: &Path, tensor: &str) -> Result<StoredRows> {
    let bytes = read(path)?;
    let st = parse(path, &bytes)?;
    let bad = |why: String| Error::invalid(format!("{}: {why}", path.display()));
    let t = st.tensor(tensor).map_err(|_| {
        let have = with_rows(&st);
        let have = if have.is_empty() {
            "none".to_string()
        } else {
            have.join(", ")
        };
        bad(format!("has no tensor '{tensor}' (it has: {have})"))
    })?;
    let shape = t.shape();
    if shape.len() != 2 {
        return Err(bad(format!(
            "'{tensor}' has shape {shape:?}, not [rows, width]"
        )));
    }
    let (rows, width) = (shape[0], shape[1]);
    let data: Vec<f32> = match t.dtype() {
        StDtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        StDtype::F16 => t
            .data()
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        StDtype::BF16 => t
            .data()
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        d => {
            return Err(bad(format!(
                "'{tensor}' is {d:?}; rows are read from F32, F16 or BF16"
            )))
        }
    };
    let ints = |name: String| -> Result<Vec<i32>> {
        let v = st
            .tensor(&name)
            .map_err(|_| bad(format!("has no '{name}' (not a latent-tap capture file?)")))?;
        if v.dtype() != StDtype::I32 || v.shape() != [rows] {
            return Err(bad(format!(
                "'{name}' is {:?} {:?}, not I32 [{rows}]",
                v.dtype(),
                v.shape()
            )));
        }
        Ok(v.data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    Ok(StoredRows {
        width,
        data,
        pos: ints(format!("{tensor}.pos"))?,
        seq: ints(format!("{tensor}.seq"))?,
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::with_source(
            ErrorKind::Io,
            format!("cannot read {}: {e}", path.display()),
            e,
        )
    })
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| Error::invalid(format!("{}: not a safetensors file ({e})", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{write_entries, Entry};

    fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|&x| f(x)).collect()
    }

    #[test]
    fn rows_come_back_as_written_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("latents.safetensors");
        let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let (d, pos, seq) = (
            le(&data, f32::to_le_bytes),
            le(&[0i32, 1, 0], i32::to_le_bytes),
            le(&[0i32, 0, 1], i32::to_le_bytes),
        );
        let half: Vec<u8> = le(&data, |x| f16::from_f32(x).to_le_bytes());
        let e = |name, dtype, rank, data| Entry {
            name,
            dtype,
            shape: [3, if rank == 2 { 2 } else { 0 }],
            rank,
            data,
        };
        let entries = [
            e("l_out-1", "F32", 2, &d[..]),
            e("l_out-1.pos", "I32", 1, &pos[..]),
            e("l_out-1.seq", "I32", 1, &seq[..]),
            e("h", "F16", 2, &half[..]),
            e("h.pos", "I32", 1, &pos[..]),
            e("h.seq", "I32", 1, &seq[..]),
            e("bad", "F32", 2, &d[..]),
        ];
        write_entries(&p, &entries, &[]).unwrap();
        let r = read_rows(&p, "l_out-1").unwrap();
        assert_eq!(r.width, 2);
        assert_eq!(r.row(0, 1), Some(&[1.0, 1.5][..]));
        assert_eq!(r.row(1, 0), Some(&[2.0, 2.5][..]));
        assert_eq!(r.row(1, 1), None);
        assert_eq!(r.positions(0), [0, 1]);
        assert_eq!(read_rows(&p, "h").unwrap(), r, "f16 widens exactly here");
        assert_eq!(stored_tensors(&p).unwrap(), ["h", "l_out-1"]);
        let e = read_rows(&p, "l_out-2").unwrap_err().to_string();
        assert!(
            e.contains("has no tensor 'l_out-2' (it has: h, l_out-1)"),
            "{e}"
        );
        let e = read_rows(&p, "bad").unwrap_err().to_string();
        assert!(e.contains("has no 'bad.pos'"), "{e}");
        std::fs::write(&p, b"not safetensors").unwrap();
        let e = read_rows(&p, "l_out-1").unwrap_err().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        let e = read_rows(&dir.path().join("none"), "x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
    }
}
