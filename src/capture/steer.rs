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
use crate::steer::{Positions, Steer};

/// A tap's steering state, built once so the compute thread only looks up.
#[derive(Debug)]
pub(super) struct Steering {
    /// Layer → index into `add` (`u32::MAX`: not steered).
    by_layer: Vec<u32>,
    /// Per steered layer: (layer, the row added; empty when all zero).
    add: Vec<(usize, Vec<f32>)>,
    n_embd: usize,
    positions: Positions,
    seqs: Option<Vec<i32>>,
    /// The steered layer (index into `add`) of the node asked last.
    pub(super) pending: Option<u32>,
    /// Host copy of a device tensor (grown on first use only).
    staging: Vec<u8>,
}

impl Steering {
    pub(super) fn new(s: &Steer) -> Self {
        let top = s.directions.keys().next_back().map_or(0, |&l| l + 1);
        let mut by_layer = vec![u32::MAX; top];
        let mut add = Vec::new();
        for (l, row) in s.scaled() {
            by_layer[l] = add.len() as u32;
            // Adding zeros changes nothing (but the sign of a zero): skip it, so a
            // scale of 0 leaves every value bit for bit as it was.
            let row = if row.iter().all(|&x| x == 0.0) {
                Vec::new()
            } else {
                row
            };
            add.push((l, row));
        }
        Self {
            by_layer,
            add,
            n_embd: s.n_embd,
            positions: s.positions,
            seqs: s.seqs.clone(),
            pending: None,
            staging: Vec::new(),
        }
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
        match self.by_layer.get(layer) {
            Some(&k) if k != u32::MAX => {
                self.pending = Some(k);
                true
            }
            _ => false,
        }
    }

    /// Data phase: add steered layer `k`'s row to the rows of `t` that the
    /// steer applies to. `plan` and `ubatch` label the rows, as for frames.
    pub(super) fn apply(
        &mut self,
        k: u32,
        t: &sys::ggml_tensor,
        plan: &Plan,
        ubatch: i64,
    ) -> Result<()> {
        let (layer, ref add) = self.add[k as usize];
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
        if add.is_empty() {
            return Ok(());
        }
        // SAFETY: `t.buffer` is the tensor's live backend buffer during the data phase.
        let host = t.buffer.is_null() || unsafe { sys::ggml_backend_buffer_is_host(t.buffer) };
        // SAFETY: t is a valid tensor during the callback.
        let nbytes = unsafe { sys::ggml_nbytes(t) };
        let base = if host {
            t.data as *mut u8
        } else {
            if self.staging.len() < nbytes {
                self.staging.resize(nbytes, 0);
            }
            // SAFETY: staging holds nbytes writable bytes; the backend copies the whole tensor.
            unsafe {
                sys::ggml_backend_tensor_get(t, self.staging.as_mut_ptr() as *mut c_void, 0, nbytes)
            };
            self.staging.as_mut_ptr()
        };
        let mut row = 0usize;
        let mut changed = false;
        for (i, &f) in flags.iter().enumerate() {
            if !all && f & PLAN_OUTPUT == 0 {
                continue;
            }
            let r = plan.rows[start + i];
            let on = self.seqs.as_ref().map_or(true, |s| s.contains(&r.seq_id))
                && self.positions.contains(r.pos, r.flags & ROW_PROMPT != 0);
            if on {
                debug_assert!(row < n);
                // SAFETY: row < ne[1], and a row of ne[0] f32 values at stride nb[0] = 4
                // lies inside the tensor's memory (host data or the staging copy of all of
                // it); f32 data is 4-byte aligned in ggml buffers and in our staging
                // (`read_unaligned`/`write_unaligned` make no assumption anyway).
                unsafe {
                    let p = base.add(row * t.nb[1]) as *mut f32;
                    for (j, &a) in add.iter().enumerate() {
                        let x = p.add(j).read_unaligned();
                        p.add(j).write_unaligned(x + a);
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
                    self.staging.as_ptr() as *const c_void,
                    0,
                    nbytes,
                )
            };
        }
        Ok(())
    }
}
