//! The logit lens (see `docs/lens.md`): each layer's residual-stream row
//! projected through the model's own final norm and unembedding, as stored in
//! its GGUF, with ggml's CPU kernels (`project`), then summarised per cell
//! (top-k, entropy, target log-probability and rank, KL to the final layer;
//! the math is the core's [`latent_tap_core::lens::stats`]).
//!
//! A [`Lens`] is independent of any llama.cpp context: it reads its three
//! tensors from the file and computes wherever its caller runs it (`serve` on
//! a blocking-pool thread beside the decode, the CLI after generation), so a
//! decode nobody asked a lens of pays nothing.

mod frames;
mod project;
mod weights;

use std::collections::HashMap;
use std::path::Path;

pub use self::frames::{inputs_from_collected, inputs_from_frames, layer_of_name, OwnedInput};
use self::project::Projector;
use crate::engine::{Model, Token};
use crate::error::{Error, Result};
use crate::settings;
pub use latent_tap_core::lens::dense::write_dense;
pub use latent_tap_core::lens::json::jsonl_lines;
pub use latent_tap_core::lens::{
    lens_json, summarize, CellStats, LayerSpec, LensOptions, LensRow, LensRows, Reference, Target,
    Translators,
};

/// Check that the GGUF at `path` has what a lens needs (final norm, an
/// unembedding ggml's CPU backend multiplies, the norm's epsilon) without
/// reading the unembedding.
pub fn check_model_file(path: impl AsRef<Path>) -> Result<()> {
    weights::read_meta(path.as_ref()).map(|_| ())
}

/// Rows projected per ggml graph (bounds the logits buffer: rows × n_vocab f32).
pub const BATCH_ROWS: usize = 32;

/// One residual-stream row to read.
#[derive(Debug, Clone, Copy)]
pub struct LensInput<'a> {
    /// Layer the row comes from (`l_out-N`: the output of block N).
    pub layer: usize,
    /// Sequence id.
    pub seq: i32,
    /// Position.
    pub pos: i32,
    /// Job step that computed it.
    pub step: u32,
    /// The row, `n_embd` values.
    pub h: &'a [f32],
}

/// A model's final norm and unembedding, ready to read rows.
#[derive(Debug)]
pub struct Lens {
    proj: Projector,
    arch: String,
    n_layer: usize,
    unembd_type: String,
    translators: Option<Translators>,
    threads: usize,
}

impl Lens {
    /// Read the lens's tensors from the GGUF at `path` (only the final norm and
    /// the unembedding, as stored); compute on `threads` threads. A model
    /// without them, or whose unembedding ggml's CPU backend cannot multiply,
    /// is an [`crate::ErrorKind::ModelLoad`] error naming the tensor.
    pub fn open(path: impl AsRef<Path>, threads: usize) -> Result<Self> {
        let path = path.as_ref();
        let meta = weights::read_meta(path)?;
        let proj = Projector::load(path, &meta)?;
        Ok(Self {
            proj,
            arch: meta.arch,
            n_layer: meta.n_layer,
            unembd_type: format!(
                "{} {}",
                meta.unembd.name,
                weights::type_name(meta.unembd.ty)
            ),
            translators: None,
            threads: threads.max(1),
        })
    }

    /// The lens of a loaded model (read from the file it was loaded from).
    pub fn for_model(model: &Model, threads: usize) -> Result<Self> {
        let lens = Self::open(model.path(), threads)?;
        if lens.n_embd() != model.n_embd() || lens.n_vocab() != model.n_vocab() {
            return Err(Error::invalid(format!(
                "logit lens: the unembedding is [{}, {}] but the model has n_embd {} and {} tokens",
                lens.n_embd(),
                lens.n_vocab(),
                model.n_embd(),
                model.n_vocab()
            )));
        }
        Ok(lens)
    }

    /// Read translators (tuned lens) from a safetensors file; see
    /// [`Translators::load`] for names and checks.
    pub fn load_translators(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.translators = Some(Translators::load(
            path.as_ref(),
            self.n_embd(),
            self.n_layer,
        )?);
        Ok(())
    }

    /// The layers that have a translator (empty without translators).
    pub fn translated_layers(&self) -> Vec<usize> {
        self.translators
            .as_ref()
            .map(Translators::layers)
            .unwrap_or_default()
    }

    /// Architecture name.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Transformer blocks.
    pub fn n_layer(&self) -> usize {
        self.n_layer
    }

    /// Residual width.
    pub fn n_embd(&self) -> usize {
        self.proj.n_embd
    }

    /// Vocabulary size (rows of the unembedding).
    pub fn n_vocab(&self) -> usize {
        self.proj.n_vocab
    }

    /// Threads the projection uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Raw logits (after the soft-cap, if any) of `rows.len() / n_embd` rows,
    /// row-major `rows × n_vocab`; no translator is applied.
    pub fn logits(&self, rows: &[f32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(rows.len() / self.n_embd().max(1) * self.n_vocab());
        for chunk in rows.chunks(BATCH_ROWS * self.n_embd()) {
            out.extend(self.proj.logits(chunk, self.threads)?);
        }
        Ok(out)
    }

    /// ggml's `mul_mat` of the unembedding (as stored) with `rows` alone, in
    /// the same batches as [`Lens::logits`]: the roofline of the lens, for
    /// benchmarks (`benches/lens.rs`).
    pub fn mul_mat_only(&self, rows: &[f32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(rows.len() / self.n_embd().max(1) * self.n_vocab());
        for chunk in rows.chunks(BATCH_ROWS * self.n_embd()) {
            out.extend(self.proj.mul_mat_only(chunk, self.threads)?);
        }
        Ok(out)
    }

    /// The unembedding tensor and its ggml type as stored (e.g. `token_embd.weight q6_K`).
    pub fn unembedding_type(&self) -> &str {
        &self.unembd_type
    }

    fn check(&self, inputs: &[LensInput], layers: &[usize], top_k: usize) -> Result<()> {
        settings::check_lens_top_k(top_k)?;
        let last = self.n_layer.saturating_sub(1);
        if let Some(l) = layers.iter().find(|&&l| l >= self.n_layer) {
            return Err(Error::invalid(format!(
                "lens layer {l} does not exist: the model has layers 0..={last}"
            )));
        }
        for i in inputs {
            if i.layer >= self.n_layer {
                return Err(Error::invalid(format!(
                    "lens row of layer {} (pos {}) names a layer the model does not have (0..={last})",
                    i.layer, i.pos
                )));
            }
            if i.h.len() != self.n_embd() {
                return Err(Error::invalid(format!(
                    "lens row of layer {} (pos {}) has width {}, not n_embd {}: only residual-stream rows can be read",
                    i.layer,
                    i.pos,
                    i.h.len(),
                    self.n_embd()
                )));
            }
            if i.h.iter().any(|x| !x.is_finite()) {
                return Err(Error::invalid(format!(
                    "lens row of layer {} (pos {}) holds a non-finite value",
                    i.layer, i.pos
                )));
            }
        }
        Ok(())
    }

    /// The lens of `inputs` at `layers`: one [`LensRow`] per (seq, pos), in
    /// (step, seq, pos) order, with a cell per entry of `layers` (`None` where
    /// that layer has no row there). `target(seq, pos)` gives the token a row
    /// is scored against. KL is to the final layer's row at the same position
    /// (untranslated), where one is among `inputs`.
    pub fn compute(
        &self,
        inputs: &[LensInput],
        layers: &[usize],
        top_k: usize,
        target: &(dyn Fn(i32, i32) -> Option<Token> + Sync),
    ) -> Result<Vec<LensRow>> {
        self.check(inputs, layers, top_k)?;
        let final_layer = self.n_layer - 1;
        // Group by (seq, pos): the last input of each layer wins.
        let mut groups: Vec<(u32, i32, i32, HashMap<usize, usize>)> = Vec::new();
        let mut at: HashMap<(i32, i32), usize> = HashMap::new();
        for (k, i) in inputs.iter().enumerate() {
            let g = *at.entry((i.seq, i.pos)).or_insert_with(|| {
                groups.push((i.step, i.seq, i.pos, HashMap::new()));
                groups.len() - 1
            });
            groups[g].0 = groups[g].0.min(i.step);
            groups[g].3.insert(i.layer, k);
        }
        groups.sort_by_key(|g| (g.0, g.1, g.2));
        let translated = |l: usize| {
            self.translators
                .as_ref()
                .is_some_and(|t| t.layers().contains(&l))
        };
        let mut rows = Vec::with_capacity(groups.len());
        let mut start = 0;
        while start < groups.len() {
            // Take groups until about BATCH_ROWS vectors.
            let mut x: Vec<f32> = Vec::new();
            // Per group: (cell vector index per layer, reference vector index).
            let mut plan: Vec<(Vec<Option<usize>>, Option<usize>)> = Vec::new();
            let mut end = start;
            let mut n = 0;
            while end < groups.len() && (n < BATCH_ROWS || end == start) {
                let by = &groups[end].3;
                let mut push = |h: &[f32], layer: Option<usize>| {
                    let from = x.len();
                    x.extend_from_slice(h);
                    if let (Some(l), Some(t)) = (layer, self.translators.as_ref()) {
                        t.apply(l, &mut x[from..]);
                    }
                    n += 1;
                    n - 1
                };
                let mut cells = Vec::with_capacity(layers.len());
                let mut reference = None;
                for &l in layers {
                    cells.push(by.get(&l).map(|&k| push(inputs[k].h, Some(l))));
                    if l == final_layer && !translated(l) {
                        reference = *cells.last().unwrap_or(&None);
                    }
                }
                if reference.is_none() {
                    reference = by.get(&final_layer).map(|&k| push(inputs[k].h, None));
                }
                plan.push((cells, reference));
                end += 1;
            }
            let logits = self.proj.logits(&x, self.threads)?;
            let v = self.n_vocab();
            let row = |i: usize| &logits[i * v..(i + 1) * v];
            let summarise = |g: usize, p: &(Vec<Option<usize>>, Option<usize>)| {
                let (_, seq, pos, _) = groups[g];
                let t = target(seq, pos);
                let r = p.1.map(|i| Reference::new(row(i)));
                p.0.iter()
                    .map(|c| c.map(|i| summarize(row(i), top_k, t, r.as_ref())))
                    .collect::<Vec<_>>()
            };
            let cells = parallel_map(&plan, self.threads, |k, p| summarise(start + k, p));
            for (k, cells) in cells.into_iter().enumerate() {
                let (step, seq, pos, _) = groups[start + k];
                rows.push(LensRow {
                    pos,
                    step,
                    seq,
                    target: target(seq, pos),
                    cells,
                });
            }
            start = end;
        }
        Ok(rows)
    }
}

/// `f` over `items` on up to `threads` scoped threads, results in order.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(usize, &T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().enumerate().map(|(k, t)| f(k, t)).collect();
    }
    let per = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(per)
            .enumerate()
            .map(|(c, chunk)| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .enumerate()
                        .map(|(k, t)| f(c * per + k, t))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}
