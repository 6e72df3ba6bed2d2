//! Latents on the wire: JSON (base64) and the binary record stream
//! (`application/vnd.latent-tap.frames`, see `docs/PROTOCOL.md`).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::record::EndRecord;
use crate::sched::FrameOut;

/// Media type of the binary record stream.
pub const FRAMES_MEDIA_TYPE: &str = "application/vnd.latent-tap.frames";

/// Wire record kind of the JSON summary that closes a binary completion.
pub const KIND_JSON: u32 = crate::record::kind::JSON;

/// Bytes of the length prefix before every record.
pub const LEN_PREFIX: usize = 4;

/// One record with its little-endian u32 length prefix.
pub fn framed(rec: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(LEN_PREFIX + rec.len());
    push_framed(&mut out, rec);
    out
}

/// Append `rec` with its length prefix to `out` (several records in one chunk).
pub fn push_framed(out: &mut Vec<u8>, rec: &[u8]) {
    out.extend_from_slice(&(rec.len() as u32).to_le_bytes());
    out.extend_from_slice(rec);
}

/// An END record (C ABI layout) with a consumer's totals.
pub fn end_record(frames: u64, drops: u64) -> Vec<u8> {
    let end = EndRecord {
        kind: crate::record::kind::END,
        header_size: std::mem::size_of::<EndRecord>() as u32,
        frames,
        drops,
    };
    let mut b = vec![0u8; std::mem::size_of::<EndRecord>()];
    crate::record::put(&mut b, 0, &end);
    b
}

/// A JSON record: `{kind=5, header_size=16, len: u64}` then `len` bytes of UTF-8 JSON.
pub fn json_record(v: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut b = Vec::with_capacity(16 + body.len());
    b.extend_from_slice(&KIND_JSON.to_le_bytes());
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    b.extend_from_slice(&body);
    b
}

/// A lens record: `{kind=7, header_size=16, len: u64}` then `len` bytes of
/// UTF-8 JSON, the `lens` object of one step's rows (see `docs/PROTOCOL.md`).
pub fn lens_record(v: &Value) -> Vec<u8> {
    let mut b = json_record(v);
    b[..4].copy_from_slice(&crate::record::kind::LENS.to_le_bytes());
    b
}

/// Rows of one tensor gathered from frames, for JSON.
#[derive(Debug, Default)]
struct Gathered {
    width: u64,
    dtype: &'static str,
    pos: Vec<i32>,
    step: Vec<u32>,
    data: Vec<u8>,
}

/// Frames → `{name: {shape, dtype, pos, step, data}}`, rows in arrival order.
pub fn latents_json(frames: &[FrameOut]) -> Value {
    let mut by: BTreeMap<(u32, String), Gathered> = BTreeMap::new();
    for f in frames {
        let g = by
            .entry((f.header.tensor_index, f.name().to_string()))
            .or_default();
        g.width = f.header.width;
        g.dtype = f.dtype().name();
        for r in &f.rows {
            g.pos.push(r.pos);
            g.step.push(f.header.step);
        }
        g.data.extend_from_slice(&f.data);
    }
    let mut out = serde_json::Map::new();
    for ((_, name), g) in by {
        out.insert(
            name,
            json!({
                "shape": [g.pos.len(), g.width],
                "dtype": g.dtype,
                "pos": g.pos,
                "step": g.step,
                "data": base64::engine::general_purpose::STANDARD.encode(&g.data),
            }),
        );
    }
    Value::Object(out)
}

/// A request's latents gathered for its JSON answer as they arrive: one buffer
/// per tensor (the frames are not kept), written out by [`Gather::write`]
/// straight into the answer, each tensor's rows freed once written, so the
/// answer is built without a second full copy of the latents.
#[derive(Debug, Default)]
pub struct Gather {
    /// By `tensor_index`: the name and its rows so far.
    tensors: Vec<Option<(String, Gathered)>>,
}

impl Gather {
    /// Add one frame's rows.
    pub fn push(&mut self, f: &FrameOut) {
        let ix = f.header.tensor_index as usize;
        if self.tensors.len() <= ix {
            self.tensors.resize_with(ix + 1, || None);
        }
        let (_, g) = self.tensors[ix].get_or_insert_with(|| {
            let g = Gathered {
                width: f.header.width,
                dtype: f.dtype().name(),
                ..Gathered::default()
            };
            (f.name().to_string(), g)
        });
        for r in &f.rows {
            g.pos.push(r.pos);
            g.step.push(f.header.step);
        }
        g.data.extend_from_slice(&f.data);
    }

    /// Append `{name: {shape, dtype, pos, step, data}, …}` (as [`latents_json`],
    /// tensors in graph order) to `out`, base64 written in place.
    pub fn write(self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        // base64 text, the row lists (at most 12 bytes a row each) and the keys.
        let need: usize = self
            .tensors
            .iter()
            .flatten()
            .map(|(n, g)| g.data.len().div_ceil(3) * 4 + g.pos.len() * 24 + n.len() + 96)
            .sum();
        out.reserve(need + 2);
        out.push(b'{');
        let mut first = true;
        for (name, g) in self.tensors.into_iter().flatten() {
            if !first {
                out.push(b',');
            }
            first = false;
            // Writing JSON into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, &name);
            let _ = write!(
                out,
                ":{{\"shape\":[{},{}],\"dtype\":\"{}\",\"pos\":",
                g.pos.len(),
                g.width,
                g.dtype
            );
            let _ = serde_json::to_writer(&mut *out, &g.pos);
            out.extend_from_slice(b",\"step\":");
            let _ = serde_json::to_writer(&mut *out, &g.step);
            out.extend_from_slice(b",\"data\":\"");
            {
                let mut enc = base64::write::EncoderWriter::new(
                    &mut *out,
                    &base64::engine::general_purpose::STANDARD,
                );
                let _ = enc.write_all(&g.data);
                let _ = enc.finish();
            }
            drop(g);
            out.extend_from_slice(b"\"}");
        }
        out.push(b'}');
    }
}
