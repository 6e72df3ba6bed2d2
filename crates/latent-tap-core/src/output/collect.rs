//! Gather a stream into per-tensor row arrays and a token list.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::record::{Dtype, EndRecord, Record};
use crate::select::SelectedTensor;
use crate::stream::Stream;

/// A token event, owned (one line of `tokens.jsonl`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenEvent {
    /// Order in the stream.
    pub index: usize,
    /// Sequence id.
    pub seq: i32,
    /// Position in the sequence.
    pub pos: i32,
    /// Token id.
    pub token: i32,
    /// Text of the token (lossy UTF-8).
    pub piece: String,
    /// Part of the prompt.
    pub prompt: bool,
    /// Decode step whose distribution it was drawn from (prompt tokens: 0).
    pub step: u32,
    /// log p of the token (generated tokens only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprob: Option<f32>,
    /// Entropy of its distribution, nats (generated tokens only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f32>,
    /// Top-k `(id, logprob)` (generated tokens only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top: Option<Vec<(i32, f32)>>,
}

/// All rows captured for one tensor, in stream (token) order.
#[derive(Debug, Clone)]
pub struct TensorRows {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Elements per row (0 until the first frame).
    pub width: usize,
    /// Row-major payload, `pos.len() * width` elements.
    pub data: Vec<u8>,
    /// Position of each row.
    pub pos: Vec<i32>,
    /// Sequence of each row.
    pub seq: Vec<i32>,
    /// Decode step of each row.
    pub step: Vec<u32>,
    /// Frames received.
    pub frames: u64,
    /// Elements that are NaN or ±inf.
    pub nonfinite: u64,
}

impl TensorRows {
    /// Number of rows.
    pub fn n_rows(&self) -> usize {
        self.pos.len()
    }

    /// Row `i` as f32 (converting f16/bf16).
    pub fn row_f32(&self, i: usize) -> Vec<f32> {
        let es = self.dtype.size();
        let row = self.width * es;
        let bytes = self
            .data
            .get(i * row..(i + 1) * row)
            .expect("row index below n_rows");
        let mut out = vec![0u8; self.width * 4];
        crate::convert::convert_to_f32(bytes, self.dtype, &mut out);
        out.chunks_exact(4)
            .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Index of the row for `(seq, pos)`, if captured.
    pub fn find(&self, seq: i32, pos: i32) -> Option<usize> {
        self.pos
            .iter()
            .zip(&self.seq)
            .position(|(&p, &s)| p == pos && s == seq)
    }
}

/// Everything a stream carried.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    /// Token events in order.
    pub tokens: Vec<TokenEvent>,
    /// One entry per selected tensor, in selection order.
    pub tensors: Vec<TensorRows>,
    /// The end record, if the stream was closed normally.
    pub end: Option<EndRecord>,
    /// Frames missing from the sequence numbers seen (drops).
    pub seq_gaps: u64,
}

impl Collected {
    /// The rows of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorRows> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Write `tokens.jsonl` (errors name the path).
    pub fn write_tokens_jsonl(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| {
            Error::new(ErrorKind::Io, format!("writing {}: {e}", path.display()))
        };
        let mut w = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        for t in &self.tokens {
            serde_json::to_writer(&mut w, t).map_err(|e| io(e.into()))?;
            w.write_all(b"\n").map_err(io)?;
        }
        w.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        Ok(())
    }
}

/// Folds records into a [`Collected`].
#[derive(Debug)]
pub struct Collector {
    out: Collected,
    next_seq: u64,
}

impl Collector {
    /// A collector for `selection`, whose frames carry `dtype`.
    pub fn new(selection: &[SelectedTensor], dtype: Dtype) -> Self {
        let tensors = selection
            .iter()
            .map(|s| TensorRows {
                name: s.name.clone(),
                dtype,
                width: 0,
                data: Vec::new(),
                pos: Vec::new(),
                seq: Vec::new(),
                step: Vec::new(),
                frames: 0,
                nonfinite: 0,
            })
            .collect();
        Self {
            out: Collected {
                tensors,
                ..Collected::default()
            },
            next_seq: 0,
        }
    }

    /// Fold one record in.
    pub fn push(&mut self, rec: &Record<'_>) -> Result<()> {
        match rec {
            Record::Frame(f) => {
                let h = f.header;
                self.out.seq_gaps += h.seq.saturating_sub(self.next_seq);
                self.next_seq = h.seq + 1;
                let t = self
                    .out
                    .tensors
                    .get_mut(h.tensor_index as usize)
                    .ok_or_else(|| {
                        Error::new(ErrorKind::Internal, "frame for an unknown tensor")
                    })?;
                let width = usize::try_from(h.width).unwrap_or(usize::MAX);
                if t.frames == 0 {
                    t.width = width;
                } else if t.width != width {
                    return Err(Error::new(
                        ErrorKind::Internal,
                        format!(
                            "tensor '{}' changed width from {} to {}",
                            t.name, t.width, h.width
                        ),
                    ));
                }
                if t.dtype as u32 != h.dtype
                    || Some(f.data.len())
                        != f.rows
                            .len()
                            .checked_mul(width)
                            .and_then(|n| n.checked_mul(t.dtype.size()))
                {
                    return Err(Error::new(
                        ErrorKind::Internal,
                        format!(
                            "frame of tensor '{}' does not match its rows, width and dtype",
                            t.name
                        ),
                    ));
                }
                t.nonfinite += count_nonfinite(f.data, t.dtype);
                t.data.extend_from_slice(f.data);
                for r in f.rows {
                    t.pos.push(r.pos);
                    t.seq.push(r.seq_id);
                    t.step.push(h.step);
                }
                t.frames += 1;
            }
            Record::Token(tv) => {
                let h = tv.header;
                let prompt = tv.is_prompt();
                self.out.tokens.push(TokenEvent {
                    index: self.out.tokens.len(),
                    seq: h.seq_id,
                    pos: h.pos,
                    token: h.token,
                    piece: String::from_utf8_lossy(tv.piece).into_owned(),
                    prompt,
                    step: h.step,
                    logprob: (!prompt).then_some(h.logprob),
                    entropy: (!prompt).then_some(h.entropy),
                    top: (!prompt).then(|| tv.top.iter().map(|e| (e.id, e.logprob)).collect()),
                });
            }
            Record::End(e) => {
                self.out.seq_gaps += e.frames.saturating_sub(self.next_seq);
                self.next_seq = e.frames;
                self.out.end = Some(*e);
            }
        }
        Ok(())
    }

    /// The result.
    pub fn finish(self) -> Collected {
        self.out
    }
}

/// Elements of `data` (of `dtype`) that are NaN or infinite.
pub fn count_nonfinite(data: &[u8], dtype: Dtype) -> u64 {
    let n = match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .filter(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000)
            .count(),
        Dtype::F16 => data
            .chunks_exact(2)
            .filter(|c| u16::from_ne_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00)
            .count(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .filter(|c| u16::from_ne_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80)
            .count(),
    };
    n as u64
}

/// Drain `stream` to its end into a [`Collected`].
pub fn collect(
    mut stream: Stream,
    selection: &[SelectedTensor],
    dtype: Dtype,
) -> Result<Collected> {
    let mut c = Collector::new(selection, dtype);
    while !stream.is_finished() {
        if let Some(item) = stream.next(Duration::from_millis(50))? {
            c.push(&item.record()?)?;
        }
    }
    Ok(c.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{kind, FrameHeader, FrameView, RowMeta};

    fn header(width: u64, n_rows: u32, seq: u64) -> FrameHeader {
        FrameHeader {
            kind: kind::FRAME,
            header_size: std::mem::size_of::<FrameHeader>() as u32,
            seq,
            step: 0,
            ubatch: 0,
            tensor_index: 0,
            layer: 0,
            dtype: Dtype::F32 as u32,
            n_rows,
            width,
            ne: [width as i64, n_rows as i64, 1, 1],
            name: [0; 64],
        }
    }

    fn selection() -> Vec<SelectedTensor> {
        vec![SelectedTensor {
            name: "l_out-0".into(),
            layer: Some(0),
            ggml_type: 0,
            ne: [2, 1, 1, 1],
            row_width: 2,
        }]
    }

    #[test]
    fn a_width_change_is_an_error_not_a_panic() {
        let mut c = Collector::new(&selection(), Dtype::F32);
        let rows = [RowMeta::default()];
        // A frame with a row but no elements, then a real one: the collector used to
        // take the second width as the first and later panic slicing rows.
        let h0 = header(0, 1, 0);
        c.push(&Record::Frame(FrameView {
            header: &h0,
            rows: &rows,
            data: &[],
        }))
        .unwrap();
        let h1 = header(2, 1, 1);
        let data: Vec<u8> = [1f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let e = c
            .push(&Record::Frame(FrameView {
                header: &h1,
                rows: &rows,
                data: &data,
            }))
            .unwrap_err();
        assert!(e.message().contains("changed width from 0 to 2"), "{e}");
        // A payload that disagrees with rows × width is refused too.
        let mut c = Collector::new(&selection(), Dtype::F32);
        let e = c
            .push(&Record::Frame(FrameView {
                header: &h1,
                rows: &rows,
                data: &data[..4],
            }))
            .unwrap_err();
        assert!(e.message().contains("does not match"), "{e}");
        c.push(&Record::Frame(FrameView {
            header: &h1,
            rows: &rows,
            data: &data,
        }))
        .unwrap();
        let out = c.finish();
        assert_eq!(out.tensors[0].nonfinite, 1);
        assert_eq!(out.tensors[0].row_f32(0)[0], 1.0);
    }

    #[test]
    fn nonfinite_counts_per_dtype() {
        let f: Vec<u8> = [0.0f32, f32::INFINITY, -f32::INFINITY, f32::NAN, 3.0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        assert_eq!(count_nonfinite(&f, Dtype::F32), 3);
        let h: Vec<u8> = [half::f16::INFINITY, half::f16::ONE, half::f16::NAN]
            .iter()
            .flat_map(|v| v.to_bits().to_ne_bytes())
            .collect();
        assert_eq!(count_nonfinite(&h, Dtype::F16), 2);
        let b: Vec<u8> = [half::bf16::NEG_INFINITY, half::bf16::ONE]
            .iter()
            .flat_map(|v| v.to_bits().to_ne_bytes())
            .collect();
        assert_eq!(count_nonfinite(&b, Dtype::BF16), 1);
    }
}
