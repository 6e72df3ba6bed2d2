//! Minimal safetensors writer (the format is a JSON header plus raw bytes).

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::TensorRows;
use crate::error::{Error, ErrorKind, Result};

/// One named array of a safetensors file: `dtype` is the safetensors name
/// (`F32`, `I32`, `I64`...), `data` its little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Safetensors dtype name.
    pub dtype: &'static str,
    /// Shape.
    pub shape: [usize; 2],
    /// Rank: 1 uses `shape[0]` only.
    pub rank: usize,
    /// Raw bytes.
    pub data: &'a [u8],
}

/// Write each tensor as `[n_rows, width]` plus `<name>.pos` and `<name>.seq` (I32).
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorRows],
    metadata: &[(&str, String)],
) -> Result<()> {
    let ints = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let owned: Vec<(String, String, Vec<u8>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            (
                format!("{}.pos", t.name),
                format!("{}.seq", t.name),
                ints(&t.pos),
                ints(&t.seq),
            )
        })
        .collect();
    let mut entries = Vec::with_capacity(3 * tensors.len());
    for (t, (pn, sn, pos, seq)) in tensors.iter().zip(&owned) {
        entries.push(Entry {
            name: &t.name,
            dtype: t.dtype.safetensors_name(),
            shape: [t.n_rows(), t.width],
            rank: 2,
            data: &t.data,
        });
        entries.push(Entry {
            name: pn,
            dtype: "I32",
            shape: [t.n_rows(), 0],
            rank: 1,
            data: pos,
        });
        entries.push(Entry {
            name: sn,
            dtype: "I32",
            shape: [t.n_rows(), 0],
            rank: 1,
            data: seq,
        });
    }
    write_entries(path, &entries, metadata)
}

/// Write `entries` (in order) as one safetensors file at `path`, synced to disk.
/// Errors name the path.
pub fn write_entries(
    path: &Path,
    entries: &[Entry<'_>],
    metadata: &[(&str, String)],
) -> Result<()> {
    let metas: Vec<EntryMeta<'_>> = entries
        .iter()
        .map(|e| EntryMeta {
            name: e.name,
            dtype: e.dtype,
            shape: &e.shape[..e.rank.clamp(1, 2)],
            len: e.data.len(),
        })
        .collect();
    let h = header(&metas, metadata);
    let io =
        |e: std::io::Error| Error::new(ErrorKind::Io, format!("writing {}: {e}", path.display()));
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    w.write_all(&h).map_err(io)?;
    for e in entries {
        w.write_all(e.data).map_err(io)?;
    }
    w.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    Ok(())
}

/// An entry's name, type, shape and byte length (its data written by the caller).
#[derive(Debug, Clone, Copy)]
pub struct EntryMeta<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Safetensors dtype name.
    pub dtype: &'static str,
    /// Shape.
    pub shape: &'a [usize],
    /// Bytes of data.
    pub len: usize,
}

/// The start of a safetensors file: the 8-byte header length and the JSON
/// header (padded to 8 bytes) for `entries` laid out in order. The data follows.
pub fn header(entries: &[EntryMeta<'_>], metadata: &[(&str, String)]) -> Vec<u8> {
    let mut header = Map::new();
    let mut off = 0usize;
    for e in entries {
        header.insert(
            e.name.to_string(),
            json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [off, off + e.len]}),
        );
        off += e.len;
    }
    let meta: Map<String, Value> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.clone())))
        .collect();
    header.insert("__metadata__".into(), Value::Object(meta));
    let mut h = serde_json::to_vec(&Value::Object(header)).expect("json");
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out
}
