//! Which token each row of a ubatch belongs to.
//!
//! The host's batch is observed where it crosses into libllama (`llama_decode`
//! with a `llama_batch`, or the extended batch API and `llama_process`), kept
//! as a [`Batch`] of per-token labels. Each graph compute then takes the next
//! `n_tokens` labels of the batch, and checks them against what the graph
//! itself holds (its `inp_tokens` and `inp_pos` inputs): llama.cpp keeps batch
//! order when it has one KV stream (`split_simple`); with several streams
//! (`-np N` without a unified KV cache) it may reorder rows (`split_equal`),
//! which the check detects, so rows are never mislabelled.

/// Labels of one token of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label {
    /// Token id (-1: an embedding input).
    pub token: i32,
    /// Position (`i32::MIN`: not given; llama.cpp assigns it).
    pub pos: i32,
    /// First sequence id.
    pub seq: i32,
    /// More than one sequence id.
    pub multi_seq: bool,
    /// Logits requested.
    pub output: bool,
}

/// Position not given by the caller.
pub const POS_UNSET: i32 = i32::MIN;

/// A batch's labels, and which of them the graphs computed so far took.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub labels: Vec<Label>,
    /// Per label: a graph took it.
    pub used: Vec<bool>,
    /// Labels before this index are all used.
    pub taken: usize,
    /// Labels are known (a batch was seen for the current decode).
    pub active: bool,
}

/// What a graph's inputs say about its rows.
#[derive(Debug, Default)]
pub struct GraphRows {
    /// `inp_tokens` values (empty when the graph takes embeddings).
    pub tokens: Vec<i32>,
    /// `inp_pos` values (the first `n_tokens`; M-RoPE has more).
    pub pos: Vec<i32>,
    /// `out_ids` values: the ubatch rows whose logits are computed, in the
    /// order of the pruned last layer's rows.
    pub out_ids: Vec<i32>,
    /// Rows of the ubatch.
    pub n_tokens: usize,
}

/// Why a ubatch could not be labelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// No batch was seen for this compute.
    NoBatch,
    /// The graph has more rows than the batch has labels left.
    Short { need: usize, left: usize },
    /// Row `row` of the graph is no token of the batch that is still to come.
    Unknown { row: usize },
    /// The graph's rows are not in batch order, and row `row` matches more
    /// than one token of the batch (same token and position in several
    /// sequences): its sequence is unknown.
    Ambiguous { row: usize },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoBatch => f.write_str("a graph was computed outside llama_decode/llama_process"),
            Self::Short { need, left } => write!(
                f,
                "a graph of {need} rows, but the batch has {left} tokens left"
            ),
            Self::Unknown { row } => write!(
                f,
                "row {row} of the graph is no token of the batch being decoded"
            ),
            Self::Ambiguous { row } => write!(
                f,
                "llama.cpp reordered the batch (several KV streams: -np N without -kvu) and row \
                 {row} has the same token and position in several sequences, so its sequence is \
                 unknown; such graphs are skipped (-kvu keeps batch order)"
            ),
        }
    }
}

impl Batch {
    /// Start a new batch (keeps the allocation).
    pub fn reset(&mut self) {
        self.labels.clear();
        self.used.clear();
        self.taken = 0;
        self.active = true;
    }

    /// Label slot `idx`, growing the batch as needed.
    pub fn at(&mut self, idx: usize) -> &mut Label {
        if self.labels.len() <= idx {
            self.labels.resize(
                idx + 1,
                Label {
                    token: -1,
                    pos: POS_UNSET,
                    seq: 0,
                    multi_seq: false,
                    output: false,
                },
            );
        }
        &mut self.labels[idx]
    }

    /// Take the labels of the next ubatch, checked against the graph's own
    /// inputs, into `out` (one per graph row; positions from the graph when
    /// the batch did not give them).
    ///
    /// llama.cpp keeps batch order with one KV stream (`split_simple`): the
    /// next `n_tokens` labels, which must agree with the graph's tokens and
    /// positions. With several streams (`split_equal`) it may take tokens out
    /// of order: then each row is matched to the one unused label with its
    /// token and position; a row that matches none or several is refused.
    pub fn take(&mut self, g: &GraphRows, out: &mut Vec<Label>) -> Result<(), Mismatch> {
        out.clear();
        if !self.active {
            return Err(Mismatch::NoBatch);
        }
        self.used.resize(self.labels.len(), false);
        let n = g.n_tokens;
        let left = self.used[self.taken..].iter().filter(|u| !**u).count();
        if n > left {
            return Err(Mismatch::Short { need: n, left });
        }
        let agrees = |l: &Label, row: usize| {
            g.tokens.get(row).is_none_or(|&t| t == l.token)
                && (l.pos == POS_UNSET || g.pos.get(row).is_none_or(|&p| p == l.pos))
        };
        // Batch order: the next n unused labels.
        let next: Vec<usize> = (self.taken..self.labels.len())
            .filter(|&i| !self.used[i])
            .take(n)
            .collect();
        let in_order = next
            .iter()
            .enumerate()
            .all(|(row, &i)| agrees(&self.labels[i], row));
        let picked = if in_order {
            next
        } else {
            if g.tokens.len() < n || g.pos.len() < n {
                return Err(Mismatch::Unknown { row: 0 });
            }
            let mut picked = Vec::with_capacity(n);
            for row in 0..n {
                let mut found = None;
                for i in self.taken..self.labels.len() {
                    let l = &self.labels[i];
                    if self.used[i] || picked.contains(&i) || l.pos == POS_UNSET {
                        continue;
                    }
                    if l.token == g.tokens[row] && l.pos == g.pos[row] {
                        if found.is_some() {
                            return Err(Mismatch::Ambiguous { row });
                        }
                        found = Some(i);
                    }
                }
                picked.push(found.ok_or(Mismatch::Unknown { row })?);
            }
            picked
        };
        for (row, &i) in picked.iter().enumerate() {
            self.used[i] = true;
            let mut l = self.labels[i];
            if l.pos == POS_UNSET {
                l.pos = g.pos.get(row).copied().unwrap_or(POS_UNSET);
            }
            out.push(l);
        }
        while self.taken < self.used.len() && self.used[self.taken] {
            self.taken += 1;
        }
        // Output rows are what the graph computes logits for (llama.cpp may
        // force one, e.g. the last token, when the caller flagged none).
        if !g.out_ids.is_empty() {
            for l in out.iter_mut() {
                l.output = false;
            }
            for &r in &g.out_ids {
                if let Some(l) = out.get_mut(r as usize) {
                    l.output = true;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(tokens: &[(i32, i32, i32, bool)]) -> Batch {
        let mut b = Batch::default();
        b.reset();
        for (i, &(token, pos, seq, output)) in tokens.iter().enumerate() {
            *b.at(i) = Label {
                token,
                pos,
                seq,
                multi_seq: false,
                output,
            };
        }
        b
    }

    fn rows(tokens: &[i32], pos: &[i32], out_ids: &[i32]) -> GraphRows {
        GraphRows {
            tokens: tokens.to_vec(),
            pos: pos.to_vec(),
            out_ids: out_ids.to_vec(),
            n_tokens: tokens.len().max(pos.len()),
        }
    }

    #[test]
    fn ubatches_take_consecutive_labels() {
        // Two sequences in one batch, split into ubatches of 3 and 1.
        let mut b = batch(&[
            (10, 0, 0, false),
            (11, 1, 0, true),
            (20, 5, 1, false),
            (21, 6, 1, true),
        ]);
        let mut out = Vec::new();
        b.take(&rows(&[10, 11, 20], &[0, 1, 5], &[1]), &mut out)
            .unwrap();
        assert_eq!(
            out.iter()
                .map(|l| (l.seq, l.pos, l.output))
                .collect::<Vec<_>>(),
            [(0, 0, false), (0, 1, true), (1, 5, false)]
        );
        b.take(&rows(&[21], &[6], &[0]), &mut out).unwrap();
        assert_eq!(
            (out[0].seq, out[0].pos, out[0].token, out[0].output),
            (1, 6, 21, true)
        );
        assert_eq!(
            b.take(&rows(&[1], &[0], &[]), &mut out),
            Err(Mismatch::Short { need: 1, left: 0 })
        );
    }

    #[test]
    fn a_reordered_ubatch_is_matched_by_token_and_position() {
        // split_equal takes one token of each sequence: rows 0, 2, then 1, 3.
        let mut b = batch(&[
            (10, 0, 0, false),
            (11, 1, 0, true),
            (20, 0, 1, false),
            (21, 1, 1, true),
        ]);
        let mut out = Vec::new();
        b.take(&rows(&[10, 20], &[0, 0], &[]), &mut out).unwrap();
        assert_eq!(
            out.iter().map(|l| (l.seq, l.token)).collect::<Vec<_>>(),
            [(0, 10), (1, 20)]
        );
        b.take(&rows(&[11, 21], &[1, 1], &[0, 1]), &mut out)
            .unwrap();
        assert_eq!(
            out.iter()
                .map(|l| (l.seq, l.token, l.output))
                .collect::<Vec<_>>(),
            [(0, 11, true), (1, 21, true)]
        );
        assert_eq!(b.taken, 4);
    }

    #[test]
    fn rows_that_match_several_sequences_or_none_are_refused() {
        // Same token at the same position in both sequences, out of order.
        let mut b = batch(&[
            (7, 0, 0, false),
            (8, 1, 0, true),
            (7, 0, 1, false),
            (9, 1, 1, true),
        ]);
        let mut out = Vec::new();
        assert_eq!(
            b.take(&rows(&[7, 7], &[0, 0], &[]), &mut out),
            Err(Mismatch::Ambiguous { row: 0 })
        );
        // Nothing was consumed: batch order still works.
        b.take(&rows(&[7, 8], &[0, 1], &[]), &mut out).unwrap();
        assert_eq!(out[1].seq, 0);
        let mut b = batch(&[(1, 0, 0, false), (2, 1, 0, false)]);
        assert_eq!(
            b.take(&rows(&[2, 3], &[1, 2], &[]), &mut out),
            Err(Mismatch::Unknown { row: 1 })
        );
    }

    #[test]
    fn positions_come_from_the_graph_when_the_batch_left_them_out() {
        let mut b = batch(&[(5, POS_UNSET, 0, false), (6, POS_UNSET, 0, false)]);
        let mut out = Vec::new();
        b.take(&rows(&[5, 6], &[40, 41], &[1]), &mut out).unwrap();
        assert_eq!((out[0].pos, out[1].pos, out[1].output), (40, 41, true));
        let mut idle = Batch::default();
        assert_eq!(
            idle.take(&rows(&[5], &[0], &[]), &mut out),
            Err(Mismatch::NoBatch)
        );
    }
}
