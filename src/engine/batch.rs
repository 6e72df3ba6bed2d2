//! RAII wrapper over `llama_batch`.

use llama_cpp_sys_2 as sys;

use super::model::Token;
use crate::record::RowMeta;

/// A batch of tokens for `llama_decode`, one sequence id per token.
#[derive(Debug)]
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
}

// SAFETY: the batch owns its arrays; nothing else points into them.
unsafe impl Send for Batch {}

impl Batch {
    /// A batch holding up to `capacity` tokens.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // SAFETY: llama_batch_init allocates arrays for `capacity` tokens, 1 seq id each.
        let raw = unsafe { sys::llama_batch_init(capacity as i32, 0, 1) };
        Self { raw, capacity }
    }

    /// Remove all tokens.
    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append a token; returns false when the batch is full.
    pub fn push(&mut self, token: Token, pos: i32, seq: i32, logits: bool) -> bool {
        let i = self.len();
        if i >= self.capacity {
            return false;
        }
        // SAFETY: i < capacity, and every array was allocated for `capacity` entries
        // (seq_id[i] for one id).
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = logits as i8;
        }
        self.raw.n_tokens += 1;
        true
    }

    pub(crate) fn raw(&self) -> sys::llama_batch {
        self.raw
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: the arrays were allocated by llama_batch_init and are freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

/// A batch with what the tap needs to label its rows: each token's
/// [`RowMeta`] (sequence, position, token, flags) and whether llama.cpp
/// computes its next-token distribution. Built the same way by the generator
/// (`session`) and the scheduler's engine thread; decoded with
/// [`super::Context::decode_labelled`].
#[derive(Debug)]
pub(crate) struct LabelledBatch {
    pub(crate) batch: Batch,
    pub(crate) rows: Vec<RowMeta>,
    pub(crate) outputs: Vec<bool>,
}

impl LabelledBatch {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            batch: Batch::new(capacity),
            rows: Vec::with_capacity(capacity),
            outputs: Vec::with_capacity(capacity),
        }
    }

    pub(crate) fn clear(&mut self) {
        self.batch.clear();
        self.rows.clear();
        self.outputs.clear();
    }

    /// Add `token` at `pos` of sequence `seq` (`flags`: [`crate::record::ROW_PROMPT`]
    /// for prompt tokens); `output`: compute its next-token distribution.
    pub(crate) fn push(&mut self, token: Token, pos: i32, seq: i32, output: bool, flags: u32) {
        self.batch.push(token, pos, seq, output);
        self.rows.push(RowMeta {
            seq_id: seq,
            pos,
            token,
            flags,
        });
        self.outputs.push(output);
    }

    pub(crate) fn len(&self) -> usize {
        self.batch.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }
}
