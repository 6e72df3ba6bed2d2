//! Steering and patching: adding `scale × v[N]` to the rows of `l_out-N`, and
//! replacing the row of a node at a position, while the graph runs (see
//! [`crate::steer::Steer`] and [`crate::steer::Patch`] for what goes where).
//!
//! The ask phase answers yes for the edited nodes (other captured nodes keep
//! their mode, e.g. deferred), so the scheduler stops right after computing
//! each; the data phase changes every row of the tensor whose `(seq, pos)` an
//! edit applies to, in place (host memory) or through the backend (device
//! memory: copy out, change, write back), and the graph goes on from the
//! changed memory. A captured node that is edited is copied after the edit. A
//! tap without edits asks for nothing more.
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
use crate::steer::{Edits, Positions, Steer};

/// What one edit does to a matching row.
#[derive(Debug)]
enum Op {
    /// Add `row` (`scale × v[N]`; empty when all zero) to the rows at `positions`.
    Add { positions: Positions, row: Vec<f32> },
    /// Replace the row at position `pos` by `row`.
    Set { pos: i32, row: Vec<f32> },
}

/// One edit of one node's rows.
#[derive(Debug)]
struct Edit {
    /// The ggml name of the node edited.
    node: Vec<u8>,
    /// Whose edit: `None` for [`Steering::set_all`]'s (the whole tap's), `Some(seq)`
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
    /// The names of the nodes some edit touches, sorted, each once.
    targets: Vec<Vec<u8>>,
    edits: Vec<Edit>,
    n_embd: usize,
    /// The index in `targets` of the node asked last, when it is edited.
    pub(super) pending: Option<usize>,
    /// Host copy of a device tensor (grown on first use only).
    staging: Vec<u8>,
}

impl Steering {
    /// No edits yet, for rows `n_embd` wide.
    pub(super) fn empty(n_embd: usize) -> Self {
        Self {
            targets: Vec::new(),
            edits: Vec::new(),
            n_embd,
            pending: None,
            staging: Vec::new(),
        }
    }

    /// Replace the whole tap's edits (those of no one sequence) by `edits`:
    /// each steer for the sequences it names, each patch for all of them.
    pub(super) fn set_all(&mut self, edits: &Edits) {
        self.edits.retain(|e| e.owner.is_some());
        self.push(edits, None, None);
        self.reindex();
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
                node: s.node(layer).into_bytes(),
                owner,
                seqs: seqs.clone(),
                op: Op::Add {
                    positions: s.positions,
                    row,
                },
            });
        }
    }

    fn push(&mut self, edits: &Edits, owner: Option<i32>, seqs: Option<Vec<i32>>) {
        for s in &edits.steers {
            let seqs = seqs.clone().or_else(|| s.seqs.clone());
            self.push_steer(s, owner, seqs);
        }
        for p in &edits.patches {
            self.edits.push(Edit {
                node: p.tensor.clone().into_bytes(),
                owner,
                seqs: seqs.clone(),
                op: Op::Set {
                    pos: p.pos,
                    row: p.data.clone(),
                },
            });
        }
    }

    fn reindex(&mut self) {
        self.targets = self.edits.iter().map(|e| e.node.clone()).collect();
        self.targets.sort();
        self.targets.dedup();
        if let Some(w) = self.edits.iter().find_map(|e| match &e.op {
            Op::Add { row, .. } | Op::Set { row, .. } if !row.is_empty() => Some(row.len()),
            _ => None,
        }) {
            self.n_embd = w;
        }
    }

    /// Replace sequence `seq`'s own edits by `edits` (empty: the sequence is
    /// no longer edited); they apply to that sequence only.
    pub(super) fn set_seq(&mut self, seq: i32, edits: &Edits) {
        self.edits.retain(|e| e.owner != Some(seq));
        self.push(edits, Some(seq), Some(vec![seq]));
        self.reindex();
    }

    /// Ask phase: is `name` (a node the graph computes when `computed`) one
    /// that an edit touches? Remembers it for the data phase.
    pub(super) fn ask(&mut self, name: &[u8], computed: bool) -> bool {
        self.pending = None;
        if !computed {
            return false;
        }
        match self.targets.binary_search_by(|t| t.as_slice().cmp(name)) {
            Ok(k) => {
                self.pending = Some(k);
                true
            }
            Err(_) => false,
        }
    }

    /// Data phase: apply the edits of the node `targets[k]` (as asked) to the
    /// rows of `t` they match. `plan` and `ubatch` label the rows, as for frames.
    pub(super) fn apply(
        &mut self,
        k: usize,
        t: &sys::ggml_tensor,
        plan: &Plan,
        ubatch: i64,
    ) -> Result<()> {
        let Some(node) = self.targets.get(k) else {
            return Ok(());
        };
        let cannot = |why: String| {
            Error::new(
                ErrorKind::Internal,
                format!("cannot edit {}: {why}", String::from_utf8_lossy(node)),
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
            targets,
            ..
        } = self;
        let node = &targets[k];
        let live =
            |e: &&Edit| e.node == *node && !matches!(&e.op, Op::Add { row, .. } if row.is_empty());
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
    use crate::steer::{ControlVector, Patch};

    fn steer(layers: &str, scale: f32) -> Steer {
        let v = ControlVector::from_values(&[1.0, 2.0], 4, 2).unwrap();
        let f = LayerFilter::parse(layers).unwrap();
        Steer::new(&v, scale, Some(&f), Positions::All, 4, 2).unwrap()
    }

    fn one(steers: Vec<Steer>, patches: Vec<Patch>) -> Edits {
        Edits { steers, patches }
    }

    fn asked(s: &mut Steering, name: &[u8]) -> Option<Vec<u8>> {
        s.ask(name, true)
            .then(|| s.targets[s.pending.unwrap()].clone())
    }

    #[test]
    fn edits_come_and_go_per_sequence() {
        let mut s = Steering::empty(2);
        assert!(s.is_empty() && !s.ask(b"l_out-1", true));
        s.set_seq(0, &one(vec![steer("1", 2.0)], vec![]));
        let patch = Patch::new("l_out-3", 1, vec![5.0, 6.0], 2, 8).unwrap();
        s.set_seq(2, &one(vec![steer("2", 1.0)], vec![patch]));
        for name in [&b"l_out-1"[..], b"l_out-2", b"l_out-3"] {
            assert_eq!(asked(&mut s, name).as_deref(), Some(name));
        }
        assert!(!s.ask(b"l_out-0", true) && s.pending.is_none());
        assert!(
            !s.ask(b"l_out-1", false),
            "a node not computed is never asked"
        );
        assert!(!s.ask(b"attn_norm-1", true) && !s.ask(b"l_out-x", true));
        // Sequence 0 leaves: its layer is no longer asked, sequence 2's are.
        s.set_seq(0, &Edits::default());
        assert!(!s.ask(b"l_out-1", true) && s.ask(b"l_out-3", true));
        assert!(s.edits.iter().all(|e| e.seqs.as_deref() == Some(&[2][..])));
        s.set_seq(2, &Edits::default());
        assert!(s.is_empty() && !s.ask(b"l_out-2", true));
        // A scale of 0 asks (the node is handed over) but adds nothing.
        s.set_seq(1, &one(vec![steer("1", 0.0)], vec![]));
        assert!(s.ask(b"l_out-1", true));
        assert!(matches!(&s.edits[0].op, Op::Add { row, .. } if row.is_empty()));
    }

    #[test]
    fn whole_tap_edits_sit_beside_a_sequence_s_and_patch_any_node() {
        let mut s = Steering::empty(2);
        let patch = Patch::new("attn_out-2", 4, vec![1.0, 1.0], 2, 8).unwrap();
        let mut st = steer("1", 1.0);
        st.seqs = Some(vec![3]);
        s.set_all(&one(vec![st], vec![patch]));
        s.set_seq(
            5,
            &one(
                vec![],
                vec![Patch::new("l_out-2", 0, vec![0.0, 1.0], 2, 8).unwrap()],
            ),
        );
        assert_eq!(
            asked(&mut s, b"attn_out-2").as_deref(),
            Some(&b"attn_out-2"[..])
        );
        assert!(s.ask(b"l_out-1", true) && s.ask(b"l_out-2", true) && !s.ask(b"attn_out-1", true));
        // The steer keeps its own sequences; the whole tap's patch is for all.
        let seqs: Vec<_> = s.edits.iter().map(|e| (e.owner, e.seqs.clone())).collect();
        assert_eq!(
            seqs,
            [
                (None, Some(vec![3])),
                (None, None),
                (Some(5), Some(vec![5]))
            ]
        );
        // Replacing the whole tap's edits leaves sequence 5's.
        s.set_all(&Edits::default());
        assert!(!s.ask(b"attn_out-2", true) && s.ask(b"l_out-2", true));
        s.set_seq(5, &Edits::default());
        assert!(s.is_empty());
    }
}
