//! Steering: adding `scale × v[N]` to the rows of `l_out-N` while the graph
//! runs (see [`crate::steer::Steer`] for what is added where).
//!
//! The ask phase answers yes for the steered `l_out-N` nodes (other captured
//! nodes keep their mode, e.g. deferred), so the scheduler stops right after
//! computing each; the data phase adds the layer's row to every row of the
//! tensor whose `(seq, pos)` the steer applies to, in place (host memory) or
//! through the backend (device memory: copy out, add, write back), and the
//! graph goes on from the changed memory. A captured `l_out-N` of a steered
//! layer is copied after the add. A tap without steering asks for nothing more.
//!
//! The add is `x + a` in f32 with `a = scale × v` rounded once: what llama.cpp's
//! own control vector (`llama_set_adapter_cvec`, added after block `N` and
//! before the node is named `l_out-N`) computes for a vector loaded at that
//! strength.

use std::ffi::c_void;

use llama_cpp_sys_2 as sys;

use super::{convert, Plan, PLAN_OUTPUT};
use crate::error::{Error, ErrorKind, Result};
use crate::record::ROW_PROMPT;
use crate::steer::{Patch, Positions, Steer};

/// What one edit does to a matching row.
#[derive(Debug)]
enum Op {
    /// Add `row` (`scale × v[N]`; empty when all zero) to the rows at `positions`.
    Add { positions: Positions, row: Vec<f32> },
    /// Replace the row at position `pos` by `row`.
    Set { pos: i32, row: Vec<f32> },
}

/// One edit of one layer's `l_out-N` rows.
#[derive(Debug)]
struct Edit {
    layer: usize,
    /// Whose edit: `None` for [`Steering::new`]'s (the whole tap's), `Some(seq)`
    /// for one sequence's ([`Steering::set_seq`]).
    owner: Option<i32>,
    /// The sequence ids edited; `None`: all of them.
    seqs: Option<Vec<i32>>,
    op: Op,
}

/// A tap's steering state, built between decodes so the compute thread only
/// looks up: the edits (additions and row replacements) of the whole tap and
/// of single sequences.
#[derive(Debug)]
pub(super) struct Steering {
    /// Layer → true when some edit touches its `l_out-N`.
    by_layer: Vec<bool>,
    edits: Vec<Edit>,
    n_embd: usize,
    /// The steered layer of the node asked last.
    pub(super) pending: Option<u32>,
    /// Host copy of a device tensor (grown on first use only).
    staging: Vec<u8>,
}

impl Steering {
    /// No edits yet, for rows `n_embd` wide.
    pub(super) fn empty(n_embd: usize) -> Self {
        Self {
            by_layer: Vec::new(),
            edits: Vec::new(),
            n_embd,
            pending: None,
            staging: Vec::new(),
        }
    }

    /// The edits of `s`, for the sequences it names.
    pub(super) fn new(s: &Steer) -> Self {
        let mut me = Self::empty(s.n_embd);
        me.push_steer(s, None, s.seqs.clone());
        me.reindex();
        me
    }

    /// No edits of any owner left.
    pub(super) fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    fn push_steer(&mut self, s: &Steer, owner: Option<i32>, seqs: Option<Vec<i32>>) {
        for (layer, row) in s.scaled() {
            // Adding zeros changes nothing (but the sign of a zero): skip it, so a
            // scale of 0 leaves every value bit for bit as it was.
            let row = if row.iter().all(|&x| x == 0.0) {
                Vec::new()
            } else {
                row
            };
            self.edits.push(Edit {
                layer,
                owner,
                seqs: seqs.clone(),
                op: Op::Add {
                    positions: s.positions,
                    row,
                },
            });
        }
    }

    fn reindex(&mut self) {
        let top = self.edits.iter().map(|e| e.layer + 1).max().unwrap_or(0);
        self.by_layer = vec![false; top];
        for e in &self.edits {
            self.by_layer[e.layer] = true;
        }
    }

    /// Replace sequence `seq`'s own edits by `steers` and `patches` (none:
    /// the sequence is no longer edited).
    pub(super) fn set_seq(&mut self, seq: i32, steers: &[Steer], patches: &[Patch]) {
        self.edits.retain(|e| e.owner != Some(seq));
        for s in steers {
            self.push_steer(s, Some(seq), Some(vec![seq]));
        }
        for p in patches {
            self.edits.push(Edit {
                layer: p.layer,
                owner: Some(seq),
                seqs: Some(vec![seq]),
                op: Op::Set {
                    pos: p.pos,
                    row: p.data.clone(),
                },
            });
        }
        self.reindex();
    }

    /// Ask phase: is `name` (a node the graph computes when `computed`) the
    /// `l_out-N` of a steered layer? Remembers it for the data phase.
    pub(super) fn ask(&mut self, name: &[u8], computed: bool) -> bool {
        self.pending = None;
        if !computed {
            return false;
        }
        let Some(digits) = name.strip_prefix(b"l_out-") else {
            return false;
        };
        if digits.is_empty() || digits.len() > 6 || !digits.iter().all(u8::is_ascii_digit) {
            return false;
        }
        let layer = digits
            .iter()
            .fold(0usize, |n, &d| n * 10 + usize::from(d - b'0'));
        if self.by_layer.get(layer).copied().unwrap_or(false) {
            self.pending = Some(layer as u32);
            true
        } else {
            false
        }
    }

    /// Data phase: apply the edits of layer `layer` (as asked) to the rows of
    /// `t` they match. `plan` and `ubatch` label the rows, as for frames.
    pub(super) fn apply(
        &mut self,
        layer: u32,
        t: &sys::ggml_tensor,
        plan: &Plan,
        ubatch: i64,
    ) -> Result<()> {
        let layer = layer as usize;
        let cannot = |why: String| {
            Error::new(
                ErrorKind::Internal,
                format!("cannot steer l_out-{layer}: {why}"),
            )
        };
        if t.type_ != convert::GGML_F32 {
            return Err(cannot(format!("its ggml type is {}, not F32", t.type_)));
        }
        if t.ne[0] as usize != self.n_embd || t.ne[2] != 1 || t.ne[3] != 1 || t.nb[0] != 4 {
            return Err(cannot(format!(
                "its shape {:?} is not rows of n_embd {}",
                t.ne, self.n_embd
            )));
        }
        let start = ubatch.max(0) as usize * plan.n_ubatch;
        let end = (start + plan.n_ubatch).min(plan.rows.len());
        let n = t.ne[1] as usize;
        let n_tok = end.saturating_sub(start);
        let flags = plan.flags.get(start..end).unwrap_or(&[]);
        let n_out = flags.iter().filter(|&&f| f & PLAN_OUTPUT != 0).count();
        // Every row of the ubatch, or (the last layer, pruned) its output rows.
        let all = n == n_tok;
        if n_tok == 0 || (!all && n != n_out) {
            return Err(cannot(format!(
                "its {n} rows match neither the ubatch's {n_tok} tokens nor its {n_out} outputs"
            )));
        }
        let Self {
            edits,
            staging,
            n_embd,
            ..
        } = self;
        let live =
            |e: &&Edit| e.layer == layer && !matches!(&e.op, Op::Add { row, .. } if row.is_empty());
        if !edits.iter().any(|e| live(&e)) {
            return Ok(());
        }
        // SAFETY: `t.buffer` is the tensor's live backend buffer during the data phase.
        let host = t.buffer.is_null() || unsafe { sys::ggml_backend_buffer_is_host(t.buffer) };
        // SAFETY: t is a valid tensor during the callback.
        let nbytes = unsafe { sys::ggml_nbytes(t) };
        let mut fetched = false;
        let mut row = 0usize;
        let mut changed = false;
        for (i, &f) in flags.iter().enumerate() {
            if !all && f & PLAN_OUTPUT == 0 {
                continue;
            }
            let r = plan.rows[start + i];
            let prompt = r.flags & ROW_PROMPT != 0;
            for e in edits.iter().filter(live) {
                if !e.seqs.as_ref().map_or(true, |s| s.contains(&r.seq_id)) {
                    continue;
                }
                let (add, src) = match &e.op {
                    Op::Add { positions, row } if positions.contains(r.pos, prompt) => (true, row),
                    Op::Set { pos, row } if *pos == r.pos => (false, row),
                    _ => continue,
                };
                if !host && !fetched {
                    if staging.len() < nbytes {
                        staging.resize(nbytes, 0);
                    }
                    // SAFETY: staging holds nbytes writable bytes; the backend copies the
                    // whole tensor.
                    unsafe {
                        sys::ggml_backend_tensor_get(
                            t,
                            staging.as_mut_ptr() as *mut c_void,
                            0,
                            nbytes,
                        )
                    };
                    fetched = true;
                }
                let base = if host {
                    t.data as *mut u8
                } else {
                    staging.as_mut_ptr()
                };
                debug_assert!(row < n && src.len() == *n_embd);
                // SAFETY: row < ne[1], and a row of ne[0] = n_embd f32 values (src has as
                // many) at stride nb[0] = 4 lies inside the tensor's memory (host data or
                // the staging copy of all of it); `read_unaligned`/`write_unaligned` make
                // no assumption on alignment.
                unsafe {
                    let p = base.add(row * t.nb[1]) as *mut f32;
                    for (j, &a) in src.iter().enumerate() {
                        let x = if add {
                            p.add(j).read_unaligned() + a
                        } else {
                            a
                        };
                        p.add(j).write_unaligned(x);
                    }
                }
                changed = true;
            }
            row += 1;
        }
        if changed && !host {
            // SAFETY: the staging copy holds the whole tensor; the backend writes it back.
            unsafe {
                sys::ggml_backend_tensor_set(
                    t as *const sys::ggml_tensor as *mut sys::ggml_tensor,
                    staging.as_ptr() as *const c_void,
                    0,
                    nbytes,
                )
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::LayerFilter;
    use crate::steer::ControlVector;

    fn steer(layers: &str, scale: f32) -> Steer {
        let v = ControlVector::from_values(&[1.0, 2.0], 4, 2).unwrap();
        let f = LayerFilter::parse(layers).unwrap();
        Steer::new(&v, scale, Some(&f), Positions::All, 4, 2).unwrap()
    }

    #[test]
    fn edits_come_and_go_per_sequence() {
        let mut s = Steering::empty(2);
        assert!(s.is_empty() && !s.ask(b"l_out-1", true));
        s.set_seq(0, &[steer("1", 2.0)], &[]);
        let patch = Patch::new("l_out-3", 1, vec![5.0, 6.0], 4, 2, 8).unwrap();
        s.set_seq(2, &[steer("2", 1.0)], &[patch]);
        for (name, layer) in [(&b"l_out-1"[..], 1), (b"l_out-2", 2), (b"l_out-3", 3)] {
            assert!(s.ask(name, true) && s.pending == Some(layer));
        }
        assert!(!s.ask(b"l_out-0", true) && s.pending.is_none());
        assert!(
            !s.ask(b"l_out-1", false),
            "a node not computed is never asked"
        );
        assert!(!s.ask(b"attn_norm-1", true) && !s.ask(b"l_out-x", true));
        // Sequence 0 leaves: its layer is no longer asked, sequence 2's are.
        s.set_seq(0, &[], &[]);
        assert!(!s.ask(b"l_out-1", true) && s.ask(b"l_out-3", true));
        assert!(s.edits.iter().all(|e| e.seqs.as_deref() == Some(&[2][..])));
        s.set_seq(2, &[], &[]);
        assert!(s.is_empty() && !s.ask(b"l_out-2", true));
        // A scale of 0 asks (the node is handed over) but adds nothing.
        s.set_seq(1, &[steer("1", 0.0)], &[]);
        assert!(s.ask(b"l_out-1", true));
        assert!(matches!(&s.edits[0].op, Op::Add { row, .. } if row.is_empty()));
    }
}
