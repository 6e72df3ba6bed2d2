//! Request boundaries and batches: `seq_rm` notes, the labels of each
//! `llama_batch`, and the shadows of the host's extended batches.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use crate::host;
use crate::labels::{Batch, POS_UNSET};
use crate::wire::SeqRm;

use super::{BATCH, STATE};

/// Writes a [`SeqRm`] if a listener is attached (best-effort).
pub(super) fn note_seq_rm(seq: i32, p0: i32, p1: i32) {
    let _ = catch_unwind(|| {
        let Ok(mut g) = STATE.try_lock() else { return };
        let Some(st) = g.as_mut() else { return };
        let step = st.graphs;
        let Some(link) = st.link.as_mut() else { return };
        let rec = SeqRm::new(seq, p0, p1, step).to_bytes();
        match link.producer.try_write(rec.len()) {
            Ok(mut w) => {
                w.copy_from_slice(&rec);
                w.commit();
            }
            Err(_) => link.producer.note_drop(),
        }
    });
}

pub(super) fn record_llama_batch(b: &host::LlamaBatch) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        BATCH.with(|cur| {
            let Ok(mut cur) = cur.try_borrow_mut() else {
                return;
            };
            cur.reset();
            let n = b.n_tokens.max(0) as usize;
            for i in 0..n {
                // SAFETY: llama.h: each non-null array of a llama_batch has
                // `n_tokens` entries, `seq_id[i]` has `n_seq_id[i]`.
                unsafe {
                    let l = cur.at(i);
                    l.token = if b.token.is_null() {
                        -1
                    } else {
                        *b.token.add(i)
                    };
                    l.pos = if b.pos.is_null() {
                        POS_UNSET
                    } else {
                        *b.pos.add(i)
                    };
                    if !b.seq_id.is_null() && !b.n_seq_id.is_null() && *b.n_seq_id.add(i) > 0 {
                        l.seq = **b.seq_id.add(i);
                        l.multi_seq = *b.n_seq_id.add(i) > 1;
                    }
                    l.output = if b.logits.is_null() {
                        i + 1 == n
                    } else {
                        *b.logits.add(i) != 0
                    };
                }
            }
        })
    }));
}

pub(super) fn end_batch() {
    BATCH.with(|cur| {
        if let Ok(mut cur) = cur.try_borrow_mut() {
            cur.active = false;
        }
    });
}

/// Shadows of the host's extended batches, by address.
static SHADOWS: Mutex<Vec<(usize, Batch)>> = Mutex::new(Vec::new());

pub(super) fn with_shadow(b: *mut c_void, f: impl FnOnce(&mut Batch)) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let Ok(mut all) = SHADOWS.lock() else { return };
        let key = b as usize;
        let i = match all.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                let mut s = Batch::default();
                s.reset();
                all.push((key, s));
                all.len() - 1
            }
        };
        f(&mut all[i].1);
    }));
}

pub(super) fn forget_shadow(b: *mut c_void) {
    if let Ok(mut all) = SHADOWS.lock() {
        all.retain(|(k, _)| *k != b as usize);
    }
}

pub(super) fn begin_ext_batch(b: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let Ok(all) = SHADOWS.lock() else { return };
        BATCH.with(|cur| {
            let Ok(mut cur) = cur.try_borrow_mut() else {
                return;
            };
            cur.reset();
            if let Some((_, s)) = all.iter().find(|(k, _)| *k == b as usize) {
                cur.labels.extend_from_slice(&s.labels);
            } else {
                cur.active = false;
            }
        });
    }));
}
