//! Pairing: a tapped host's frames and sequence removals → requests of rows,
//! each row with its input token, whether that token was sampled, and the
//! token sampled from it (the input token of the next row of the sequence).
//!
//! Rules (one host connection):
//! - rows of a sequence arrive in position order; every tensor of one graph
//!   compute (`FrameHeader::step`) carries rows of the same positions (or a
//!   subset: a last layer pruned to output rows), so a `(seq, pos)` seen again
//!   in the same compute is the same row;
//! - a request ends, and the next row of its sequence begins a new one, at a
//!   [`SeqRm`] of that sequence (or of every sequence) whose `p0` is at most
//!   the last position seen, or when a later compute brings a position that is
//!   not past the last one;
//! - a row's input token was sampled iff the row at `pos - 1` of the same
//!   request has [`ROW_OUTPUT`]; that row's `sampled_next` is then this row's
//!   token. An output row without a successor (a request's last) keeps
//!   `sampled_next: None`; a row after a gap (dropped frames) counts as prompt.

use std::collections::HashMap;

use super::wire::{SeqRm, ROW_OUTPUT};
use crate::record::{Dtype, FrameView, RowMeta, ROW_PROMPT};

/// One row of a request's token stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRow {
    /// Position.
    pub pos: i32,
    /// Input token at that position.
    pub token: i32,
    /// The token came from the prompt (was not sampled from the row before).
    pub prompt: bool,
    /// llama.cpp computed logits for this row ([`ROW_OUTPUT`]).
    pub output: bool,
    /// The host's graph compute that first carried the row.
    pub step: u32,
    /// The token sampled from this row, when it is an output row and the
    /// next row arrived.
    pub sampled_next: Option<i32>,
}

/// One tensor's rows of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRows {
    /// Elements per row.
    pub width: usize,
    /// Element type.
    pub dtype: Dtype,
    /// Row-major payload.
    pub data: Vec<u8>,
    /// Position of each row.
    pub pos: Vec<i32>,
}

/// A request: one sequence's rows between two boundaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Id given when it began (see [`Pairer::new`]).
    pub id: u64,
    /// The host's sequence id.
    pub seq: i32,
    /// Its rows, in position order.
    pub tokens: Vec<TokenRow>,
    /// Its latents per tensor name, in order of first appearance.
    pub tensors: Vec<(String, RequestRows)>,
}

/// What pairing reports, in stream order.
#[derive(Debug)]
pub enum Event<'a> {
    /// A request begins.
    Begin {
        /// Its id.
        id: u64,
        /// Its sequence.
        seq: i32,
    },
    /// A new row (its input token; `sampled_next` is not known yet).
    Token {
        /// Request id.
        id: u64,
        /// Sequence.
        seq: i32,
        /// The row.
        row: TokenRow,
    },
    /// Rows of one request in a frame, with their flags relabelled
    /// ([`ROW_PROMPT`] as paired, [`ROW_OUTPUT`] as sent).
    Frame {
        /// Request id.
        id: u64,
        /// The frame.
        frame: &'a FrameView<'a>,
        /// Its rows `lo..hi`.
        lo: usize,
        /// End of the rows.
        hi: usize,
        /// Their row descriptors, relabelled.
        rows: &'a [RowMeta],
    },
    /// A request ended, with everything it holds.
    End(Request),
}

struct SeqState {
    req: Request,
    step: u32,
    step_first: i32,
    last_pos: i32,
}

/// Pairing state of one host connection.
pub struct Pairer {
    seqs: HashMap<i32, SeqState>,
    next_id: Box<dyn FnMut() -> u64 + Send>,
    /// Rows skipped because their tensor changed width within a request.
    pub unaligned: u64,
    rows_buf: Vec<RowMeta>,
}

impl std::fmt::Debug for Pairer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pairer")
            .field("sequences", &self.seqs.len())
            .finish()
    }
}

impl Pairer {
    /// New state; `next_id` numbers requests as they begin.
    pub fn new(next_id: Box<dyn FnMut() -> u64 + Send>) -> Self {
        Self {
            seqs: HashMap::new(),
            next_id,
            unaligned: 0,
            rows_buf: Vec::new(),
        }
    }

    /// Requests in flight.
    pub fn open_requests(&self) -> usize {
        self.seqs.len()
    }

    fn end(&mut self, seq: i32, out: &mut dyn FnMut(Event<'_>)) {
        if let Some(st) = self.seqs.remove(&seq) {
            out(Event::End(st.req));
        }
    }

    /// A removal of positions `[p0, p1)` of a sequence (or of all).
    pub fn seq_rm(&mut self, r: &SeqRm, out: &mut dyn FnMut(Event<'_>)) {
        if r.seq_id < 0 {
            self.finish(out);
            return;
        }
        let ends = self
            .seqs
            .get(&r.seq_id)
            .is_some_and(|st| r.p0 < 0 || r.p0 <= st.last_pos);
        if ends {
            self.end(r.seq_id, out);
        }
    }

    /// End every request (the host left, or the listener stops).
    pub fn finish(&mut self, out: &mut dyn FnMut(Event<'_>)) {
        let mut seqs: Vec<i32> = self.seqs.keys().copied().collect();
        seqs.sort_unstable();
        for s in seqs {
            self.end(s, out);
        }
    }

    /// A latent frame.
    pub fn frame<'a>(&mut self, f: &'a FrameView<'a>, out: &mut dyn FnMut(Event<'_>)) {
        let name = f.name();
        let step = f.header.step;
        let width = f.header.width as usize;
        let dtype = f.dtype();
        let row_bytes = width * dtype.size();
        let mut rows = std::mem::take(&mut self.rows_buf);
        rows.clear();
        // Rows of the run being gathered for one request.
        let mut run: Option<(u64, usize)> = None;
        for (i, meta) in f.rows.iter().enumerate() {
            let (seq, pos) = (meta.seq_id, meta.pos);
            let output = meta.flags & ROW_OUTPUT != 0;
            // Boundary?
            let restart = match self.seqs.get(&seq) {
                None => false,
                Some(st) if st.step != step => pos <= st.last_pos,
                Some(st) => pos < st.step_first,
            };
            if restart {
                self.flush(f, &mut run, i, &rows, out);
                rows.clear();
                self.end(seq, out);
            }
            if !self.seqs.contains_key(&seq) {
                let id = (self.next_id)();
                self.flush(f, &mut run, i, &rows, out);
                rows.clear();
                out(Event::Begin { id, seq });
                self.seqs.insert(
                    seq,
                    SeqState {
                        req: Request {
                            id,
                            seq,
                            tokens: Vec::new(),
                            tensors: Vec::new(),
                        },
                        step,
                        step_first: pos,
                        last_pos: pos.saturating_sub(1),
                    },
                );
            }
            let st = self.seqs.get_mut(&seq).expect("inserted above");
            if st.step != step {
                st.step = step;
                st.step_first = pos;
            }
            let id = st.req.id;
            if run.is_some_and(|(rid, _)| rid != id) {
                self.flush(f, &mut run, i, &rows, out);
                rows.clear();
            }
            let st = self.seqs.get_mut(&seq).expect("present");
            let prompt = if pos > st.last_pos {
                let mut prompt = true;
                if let Some(prev) = st.req.tokens.last_mut() {
                    if prev.pos.checked_add(1) == Some(pos) && prev.output {
                        prev.sampled_next = Some(meta.token);
                        prompt = false;
                    }
                }
                let row = TokenRow {
                    pos,
                    token: meta.token,
                    prompt,
                    output,
                    step,
                    sampled_next: None,
                };
                st.req.tokens.push(row);
                st.last_pos = pos;
                out(Event::Token { id, seq, row });
                prompt
            } else {
                // A row seen in this compute already (another tensor).
                match st.req.tokens.iter_mut().rev().find(|t| t.pos == pos) {
                    Some(t) => {
                        t.output |= output;
                        t.prompt
                    }
                    None => true,
                }
            };
            // Latents.
            let t = match st.req.tensors.iter().position(|(n, _)| n == name) {
                Some(k) => k,
                None => {
                    st.req.tensors.push((
                        name.to_string(),
                        RequestRows {
                            width,
                            dtype,
                            data: Vec::new(),
                            pos: Vec::new(),
                        },
                    ));
                    st.req.tensors.len() - 1
                }
            };
            let tr = &mut st.req.tensors[t].1;
            if tr.width != width || tr.dtype != dtype {
                self.unaligned += 1;
            } else {
                tr.data
                    .extend_from_slice(&f.data[i * row_bytes..(i + 1) * row_bytes]);
                tr.pos.push(pos);
            }
            let flags = (meta.flags & !ROW_PROMPT) | if prompt { ROW_PROMPT } else { 0 };
            rows.push(RowMeta { flags, ..*meta });
            if run.is_none() {
                run = Some((id, i));
            }
        }
        self.flush(f, &mut run, f.rows.len(), &rows, out);
        rows.clear();
        self.rows_buf = rows;
    }

    fn flush<'a>(
        &self,
        f: &'a FrameView<'a>,
        run: &mut Option<(u64, usize)>,
        hi: usize,
        rows: &[RowMeta],
        out: &mut dyn FnMut(Event<'_>),
    ) {
        if let Some((id, lo)) = run.take() {
            if hi > lo {
                out(Event::Frame {
                    id,
                    frame: f,
                    lo,
                    hi,
                    rows,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{kind, put, FrameHeader, Record};

    /// A frame record of `name` with `(seq, pos, token, flags)` rows, each
    /// row's values `[pos as f32; width]`.
    fn frame(name: &str, step: u32, rows: &[(i32, i32, i32, u32)]) -> Vec<u64> {
        let width = 2;
        let len = crate::record::frame_len(rows.len(), width, Dtype::F32);
        let mut words = vec![0u64; len.div_ceil(8)];
        // SAFETY: the Vec owns words.len() * 8 writable bytes.
        let b = unsafe {
            std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8)
        };
        let mut h = FrameHeader {
            kind: kind::FRAME,
            header_size: std::mem::size_of::<FrameHeader>() as u32,
            seq: 0,
            step,
            ubatch: 0,
            tensor_index: 0,
            layer: 0,
            dtype: Dtype::F32 as u32,
            n_rows: rows.len() as u32,
            width: width as u64,
            ne: [width as i64, rows.len() as i64, 1, 1],
            name: [0; 64],
        };
        h.name[..name.len()].copy_from_slice(name.as_bytes());
        put(b, 0, &h);
        let mut off = std::mem::size_of::<FrameHeader>();
        for &(seq_id, pos, token, flags) in rows {
            put(
                b,
                off,
                &RowMeta {
                    seq_id,
                    pos,
                    token,
                    flags,
                },
            );
            off += 16;
        }
        for &(_, pos, _, _) in rows {
            for _ in 0..width {
                put(b, off, &(pos as f32));
                off += 4;
            }
        }
        words
    }

    fn feed(p: &mut Pairer, words: &[u64], ends: &mut Vec<Request>) {
        // SAFETY: viewing initialised u64s as bytes.
        let b = unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 8) };
        let Record::Frame(f) = Record::parse(b).unwrap() else {
            panic!()
        };
        p.frame(&f, &mut |e| {
            if let Event::End(r) = e {
                ends.push(r)
            }
        });
    }

    #[test]
    fn rows_pair_into_requests() {
        let mut n = 0;
        let mut p = Pairer::new(Box::new(move || {
            n += 1;
            n - 1
        }));
        let mut ends = Vec::new();
        const O: u32 = ROW_OUTPUT;
        // Prompt 10 11 12 on seq 0 (last row output), two tensors.
        for name in ["a", "b"] {
            feed(
                &mut p,
                &frame(name, 0, &[(0, 0, 10, 0), (0, 1, 11, 0), (0, 2, 12, O)]),
                &mut ends,
            );
        }
        // Sampled 13 (output), then 14 (output).
        feed(&mut p, &frame("a", 1, &[(0, 3, 13, O)]), &mut ends);
        feed(&mut p, &frame("b", 1, &[(0, 3, 13, O)]), &mut ends);
        feed(&mut p, &frame("a", 2, &[(0, 4, 14, O)]), &mut ends);
        // A new prompt at position 0 without a SeqRm: a new request.
        feed(&mut p, &frame("a", 3, &[(0, 0, 20, O)]), &mut ends);
        assert_eq!(ends.len(), 1);
        let r = &ends[0];
        assert_eq!(r.id, 0);
        let got: Vec<_> = r
            .tokens
            .iter()
            .map(|t| (t.pos, t.token, t.prompt, t.output, t.sampled_next))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 10, true, false, None),
                (1, 11, true, false, None),
                (2, 12, true, true, Some(13)),
                (3, 13, false, true, Some(14)),
                (4, 14, false, true, None),
            ]
        );
        assert_eq!(r.tensors[0].0, "a");
        assert_eq!(r.tensors[0].1.pos, vec![0, 1, 2, 3, 4]);
        assert_eq!(r.tensors[1].1.pos, vec![0, 1, 2, 3]);
        // A SeqRm past the last position is no boundary; one at it is.
        p.seq_rm(&SeqRm::new(0, 5, -1, 4), &mut |_| panic!("no boundary"));
        let mut ended = Vec::new();
        p.seq_rm(&SeqRm::new(0, 0, -1, 4), &mut |e| {
            if let Event::End(r) = e {
                ended.push(r)
            }
        });
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].id, 1);
        assert_eq!(ended[0].tokens[0].sampled_next, None);
    }
}
