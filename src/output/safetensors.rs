//! Minimal safetensors writer (the format is a JSON header plus raw bytes).

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::TensorRows;
use crate::error::{Error, ErrorKind, Result};

/// Write each tensor as `[n_rows, width]` plus `<name>.pos` and `<name>.seq` (I32).
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorRows],
    metadata: &[(&str, String)],
) -> Result<()> {
    let mut header = Map::new();
    let mut blobs: Vec<&[u8]> = Vec::new();
    let mut owned: Vec<Vec<u8>> = Vec::new();
    for t in tensors {
        let ints = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        owned.push(ints(&t.pos));
        owned.push(ints(&t.seq));
    }
    let mut off = 0usize;
    let mut add = |name: String,
                   dtype: &str,
                   shape: Vec<usize>,
                   len: usize,
                   header: &mut Map<String, Value>| {
        header.insert(
            name,
            json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + len]}),
        );
        off += len;
    };
    for (i, t) in tensors.iter().enumerate() {
        add(
            t.name.clone(),
            t.dtype.safetensors_name(),
            vec![t.n_rows(), t.width],
            t.data.len(),
            &mut header,
        );
        blobs.push(&t.data);
        add(
            format!("{}.pos", t.name),
            "I32",
            vec![t.n_rows()],
            owned[2 * i].len(),
            &mut header,
        );
        blobs.push(&owned[2 * i]);
        add(
            format!("{}.seq", t.name),
            "I32",
            vec![t.n_rows()],
            owned[2 * i + 1].len(),
            &mut header,
        );
        blobs.push(&owned[2 * i + 1]);
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
    let io =
        |e: std::io::Error| Error::new(ErrorKind::Io, format!("writing {}: {e}", path.display()));
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&h).map_err(io)?;
    for b in blobs {
        w.write_all(b).map_err(io)?;
    }
    w.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    Ok(())
}
