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
}

impl TensorRows {
    /// Number of rows.
    pub fn n_rows(&self) -> usize {
        self.pos.len()
    }

    /// Row `i` as f32 (converting f16/bf16).
    pub fn row_f32(&self, i: usize) -> Vec<f32> {
        let es = self.dtype.size();
        let bytes = &self.data[i * self.width * es..(i + 1) * self.width * es];
        let mut out = vec![0u8; self.width * 4];
        crate::capture::convert_to_f32(bytes, self.dtype, &mut out);
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

    /// Write `tokens.jsonl`.
    pub fn write_tokens_jsonl(&self, path: &Path) -> Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
        for t in &self.tokens {
            serde_json::to_writer(&mut w, t)
                .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        Ok(())
    }
}

/// Folds records into a [`Collected`].
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
                if t.width == 0 {
                    t.width = h.width as usize;
                } else if t.width != h.width as usize {
                    return Err(Error::new(
                        ErrorKind::Internal,
                        format!(
                            "tensor '{}' changed width from {} to {}",
                            t.name, t.width, h.width
                        ),
                    ));
                }
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
