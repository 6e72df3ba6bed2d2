//! A tiny, deterministic, synthetic llama model written as GGUF.
//!
//! Tests need a real model that llama.cpp loads and runs, but checking in (or
//! downloading) weights is slow and opaque. [`SynthModel::random`] builds a
//! sub-megabyte llama-architecture model from a seed, keeps every weight in
//! memory so an independent reference implementation can recompute the forward
//! pass, and [`SynthModel::write_gguf`] serialises it in the exact layout
//! llama.cpp's loader expects. Nothing here depends on llama.cpp itself.
//!
//! Matrices use ggml's layout: a weight with ggml shape `ne = [n_in, n_out]` is
//! stored row-major as `n_out` rows of `n_in` floats, so `y = W·x` means
//! `y[o] = Σ_i W[o * n_in + i] · x[i]`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::gguf::write::{write_f32_gguf, Value, ALIGNMENT};

/// Hyperparameters of a synthetic llama model.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Number of query heads; must divide `n_embd`.
    pub n_head: usize,
    /// Number of key/value heads; must divide `n_head` (GQA when smaller).
    pub n_head_kv: usize,
    /// Hidden width of the SwiGLU feed-forward block.
    pub n_ff: usize,
    /// Training context length advertised in the metadata.
    pub n_ctx_train: usize,
    /// RoPE frequency base.
    pub rope_freq_base: f32,
    /// Epsilon of every RMS norm.
    pub rms_eps: f32,
    /// PRNG seed; equal seeds give bit-identical weights.
    pub seed: u64,
}

impl Default for SynthConfig {
    /// Small enough to run in milliseconds, with GQA so head mapping is exercised.
    fn default() -> Self {
        Self {
            n_layer: 3,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            n_ctx_train: 512,
            rope_freq_base: 10000.0,
            rms_eps: 1e-5,
            seed: 42,
        }
    }
}

/// Most transformer blocks llama.cpp loads (`LLAMA_MAX_LAYERS`).
pub const MAX_LAYERS: usize = 512;
/// Widest residual stream a synthetic model may have.
pub const MAX_EMBD: usize = 16384;
/// Largest synthetic model, in bytes of weights (1 GiB).
pub const MAX_WEIGHT_BYTES: u128 = 1 << 30;

impl SynthConfig {
    /// Per-head dimension (`n_embd / n_head`), also the RoPE dimension count.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Number of f32 weights the model holds (saturating).
    pub fn n_weights(&self) -> u128 {
        let m = |a: u128, b: u128| a.saturating_mul(b);
        let (e, v, ff) = (self.n_embd as u128, N_VOCAB as u128, self.n_ff as u128);
        let hd = self.head_dim() as u128;
        let (q, kv) = (m(self.n_head as u128, hd), m(self.n_head_kv as u128, hd));
        let layer = [m(2, e), m(e, q), m(m(2, e), kv), m(q, e), m(m(3, e), ff)]
            .iter()
            .fold(0u128, |a, &b| a.saturating_add(b));
        m(m(2, v), e)
            .saturating_add(e)
            .saturating_add(m(self.n_layer as u128, layer))
    }

    /// Check that llama.cpp can load and run a model with these settings and
    /// that it stays small ([`MAX_WEIGHT_BYTES`]). [`SynthModel::random`]
    /// needs a valid config.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::invalid(format!("synthetic model: {m}")));
        if !(1..=MAX_LAYERS).contains(&self.n_layer) {
            return bad(format!(
                "n_layer is {}; it must be 1 to {MAX_LAYERS}",
                self.n_layer
            ));
        }
        if self.n_embd == 0 || self.n_embd % 8 != 0 || self.n_embd > MAX_EMBD {
            return bad(format!(
                "n_embd is {}; it must be a positive multiple of 8, at most {MAX_EMBD}",
                self.n_embd
            ));
        }
        if self.n_head == 0 || self.n_embd % self.n_head != 0 || self.head_dim() % 2 != 0 {
            return bad(format!(
                "n_head {} must divide n_embd {} into heads of even size",
                self.n_head, self.n_embd
            ));
        }
        if self.n_head_kv == 0 || self.n_head % self.n_head_kv != 0 {
            return bad(format!(
                "n_head_kv {} must divide n_head {}",
                self.n_head_kv, self.n_head
            ));
        }
        if !(1..=4 * MAX_EMBD).contains(&self.n_ff) {
            return bad(format!(
                "n_ff is {}; it must be 1 to {}",
                self.n_ff,
                4 * MAX_EMBD
            ));
        }
        if !(1..=1 << 24).contains(&self.n_ctx_train) {
            return bad(format!(
                "n_ctx_train is {}; it must be 1 to {}",
                self.n_ctx_train,
                1 << 24
            ));
        }
        if !(self.rope_freq_base.is_finite() && self.rope_freq_base > 0.0) {
            return bad(format!(
                "rope_freq_base is {}; it must be finite and positive",
                self.rope_freq_base
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!(
                "rms_eps is {}; it must be finite and >= 0",
                self.rms_eps
            ));
        }
        let bytes = self.n_weights() * 4;
        if bytes > MAX_WEIGHT_BYTES {
            return bad(format!(
                "{} layers of width {} take {} MiB of weights, more than {} MiB",
                self.n_layer,
                self.n_embd,
                bytes >> 20,
                MAX_WEIGHT_BYTES >> 20
            ));
        }
        Ok(())
    }
}

/// Vocabulary size of every synthetic model (see [`SynthModel::tokens`]).
pub const N_VOCAB: usize = 260;

/// Weights of one transformer block, in ggml layout (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct SynthLayer {
    /// RMS-norm gain before attention, `[n_embd]`.
    pub attn_norm: Vec<f32>,
    /// Query projection, ne `[n_embd, n_head * head_dim]`.
    pub wq: Vec<f32>,
    /// Key projection, ne `[n_embd, n_head_kv * head_dim]`.
    pub wk: Vec<f32>,
    /// Value projection, ne `[n_embd, n_head_kv * head_dim]`.
    pub wv: Vec<f32>,
    /// Attention output projection, ne `[n_head * head_dim, n_embd]`.
    pub wo: Vec<f32>,
    /// RMS-norm gain before the feed-forward block, `[n_embd]`.
    pub ffn_norm: Vec<f32>,
    /// SwiGLU gate projection, ne `[n_embd, n_ff]`.
    pub ffn_gate: Vec<f32>,
    /// SwiGLU up projection, ne `[n_embd, n_ff]`.
    pub ffn_up: Vec<f32>,
    /// Down projection, ne `[n_ff, n_embd]`.
    pub ffn_down: Vec<f32>,
}

/// A complete synthetic llama model: config, vocabulary and all weights.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthModel {
    /// Hyperparameters the weights were generated for.
    pub cfg: SynthConfig,
    /// Vocabulary: `<unk>`, `<s>`, `</s>`, `<0x00>`..`<0xFF>`, then `▁` (space).
    pub tokens: Vec<String>,
    /// Token embeddings, ne `[n_embd, n_vocab]` (one row per token).
    pub tok_embd: Vec<f32>,
    /// Final RMS-norm gain, `[n_embd]`.
    pub output_norm: Vec<f32>,
    /// LM head, ne `[n_embd, n_vocab]`.
    pub output: Vec<f32>,
    /// Transformer blocks, in order.
    pub layers: Vec<SynthLayer>,
}

/// Id of `<unk>`.
pub const TOKEN_UNK: i32 = 0;
/// Id of `<s>` (BOS), which llama.cpp prepends when `add_special` is set.
pub const TOKEN_BOS: i32 = 1;
/// Id of `</s>` (EOS).
pub const TOKEN_EOS: i32 = 2;
/// Id of the first byte token `<0x00>`; byte `b` is `TOKEN_BYTE0 + b`.
pub const TOKEN_BYTE0: i32 = 3;
/// Id of `▁` (U+2581), which SentencePiece substitutes for every space.
pub const TOKEN_SPACE: i32 = TOKEN_BYTE0 + 256;

/// The token ids llama.cpp produces for `text` with this vocabulary and
/// `add_special = true`: BOS, then one token per UTF-8 byte, with spaces
/// mapped to [`TOKEN_SPACE`]. Lets tests and callers predict tokenisation.
pub fn expected_tokens(text: &str) -> Vec<i32> {
    std::iter::once(TOKEN_BOS)
        .chain(text.bytes().map(|b| {
            if b == b' ' {
                TOKEN_SPACE
            } else {
                TOKEN_BYTE0 + i32::from(b)
            }
        }))
        .collect()
}

/// splitmix64: tiny, seedable and good enough for test weights; avoids a
/// `rand` dependency in the library.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`, from the top 24 bits so it is exact in f32.
    fn uniform(&mut self) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        2.0 * u - 1.0
    }

    /// `n` values uniform in `[-scale, scale)`.
    fn fill(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    /// A weight matrix with `fan_in` inputs, scaled to unit variance
    /// (`U(-1,1)` has variance 1/3) so activations stay O(1) through depth.
    fn matrix(&mut self, fan_in: usize, fan_out: usize) -> Vec<f32> {
        let scale = (3.0 / fan_in as f32).sqrt();
        self.fill(fan_in * fan_out, scale)
    }

    /// A norm gain near 1, so norms are not a no-op but stay well conditioned.
    fn norm(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| 1.0 + 0.1 * self.uniform()).collect()
    }
}

fn vocabulary() -> Vec<String> {
    let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    tokens.push("\u{2581}".to_owned());
    tokens
}

impl SynthModel {
    /// Generates a model deterministically from `cfg.seed`.
    ///
    /// # Panics
    /// If [`SynthConfig::validate`] fails.
    pub fn random(cfg: SynthConfig) -> Self {
        if let Err(e) = cfg.validate() {
            panic!("{e}");
        }

        let tokens = vocabulary();
        let n_vocab = tokens.len();
        debug_assert_eq!(n_vocab, N_VOCAB);
        let (e, hd) = (cfg.n_embd, cfg.head_dim());
        let (q_dim, kv_dim) = (cfg.n_head * hd, cfg.n_head_kv * hd);
        let mut rng = SplitMix64(cfg.seed);

        let tok_embd = rng.fill(n_vocab * e, 1.0);
        let layers = (0..cfg.n_layer)
            .map(|_| SynthLayer {
                attn_norm: rng.norm(e),
                wq: rng.matrix(e, q_dim),
                wk: rng.matrix(e, kv_dim),
                wv: rng.matrix(e, kv_dim),
                wo: rng.matrix(q_dim, e),
                ffn_norm: rng.norm(e),
                ffn_gate: rng.matrix(e, cfg.n_ff),
                ffn_up: rng.matrix(e, cfg.n_ff),
                ffn_down: rng.matrix(cfg.n_ff, e),
            })
            .collect();
        let output_norm = rng.norm(e);
        let output = rng.matrix(e, n_vocab);

        Self {
            cfg,
            tokens,
            tok_embd,
            output_norm,
            output,
            layers,
        }
    }

    /// Vocabulary size (260: 3 specials, 256 bytes, `▁`).
    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// Writes the model as a GGUF v3 file that llama.cpp loads as `llama`.
    ///
    /// The vocabulary is a byte-fallback SentencePiece one with
    /// `add_space_prefix = false`, so any UTF-8 text tokenises to BOS plus one
    /// token per byte (see [`expected_tokens`]).
    pub fn write_gguf(&self, path: &Path) -> io::Result<()> {
        let mut w = BufWriter::new(File::create(path)?);
        self.write_gguf_to(&mut w)?;
        w.flush()
    }

    fn tensors(&self) -> Vec<(String, [usize; 2], &[f32])> {
        let c = &self.cfg;
        let (e, hd, v) = (c.n_embd, c.head_dim(), self.n_vocab());
        let (q_dim, kv_dim) = (c.n_head * hd, c.n_head_kv * hd);
        let mut t: Vec<(String, [usize; 2], &[f32])> = vec![
            ("token_embd.weight".into(), [e, v], &self.tok_embd),
            ("output_norm.weight".into(), [e, 1], &self.output_norm),
            ("output.weight".into(), [e, v], &self.output),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            t.push((n("attn_norm"), [e, 1], &l.attn_norm));
            t.push((n("attn_q"), [e, q_dim], &l.wq));
            t.push((n("attn_k"), [e, kv_dim], &l.wk));
            t.push((n("attn_v"), [e, kv_dim], &l.wv));
            t.push((n("attn_output"), [q_dim, e], &l.wo));
            t.push((n("ffn_norm"), [e, 1], &l.ffn_norm));
            t.push((n("ffn_gate"), [e, c.n_ff], &l.ffn_gate));
            t.push((n("ffn_up"), [e, c.n_ff], &l.ffn_up));
            t.push((n("ffn_down"), [c.n_ff, e], &l.ffn_down));
        }
        t
    }

    /// Write the model as GGUF to `w`.
    pub fn write_gguf_to(&self, w: &mut impl Write) -> io::Result<()> {
        let c = &self.cfg;
        let u32_of = |x: usize| {
            u32::try_from(x).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too large"))
        };
        let n_vocab = self.n_vocab();
        let scores = vec![0.0f32; n_vocab];
        let token_types: Vec<i32> = (0..n_vocab)
            .map(|i| match i {
                0 => TOKTYPE_UNKNOWN,
                1 | 2 => TOKTYPE_CONTROL,
                i if i < 259 => TOKTYPE_BYTE,
                _ => TOKTYPE_NORMAL,
            })
            .collect();

        let kvs: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::Str("llama")),
            ("general.name", Value::Str("latent-tap synthetic")),
            ("general.alignment", Value::U32(ALIGNMENT as u32)),
            ("llama.context_length", Value::U32(u32_of(c.n_ctx_train)?)),
            ("llama.embedding_length", Value::U32(u32_of(c.n_embd)?)),
            ("llama.block_count", Value::U32(u32_of(c.n_layer)?)),
            ("llama.feed_forward_length", Value::U32(u32_of(c.n_ff)?)),
            ("llama.attention.head_count", Value::U32(u32_of(c.n_head)?)),
            (
                "llama.attention.head_count_kv",
                Value::U32(u32_of(c.n_head_kv)?),
            ),
            ("llama.rope.freq_base", Value::F32(c.rope_freq_base)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                Value::F32(c.rms_eps),
            ),
            (
                "llama.rope.dimension_count",
                Value::U32(u32_of(c.head_dim())?),
            ),
            ("llama.vocab_size", Value::U32(u32_of(n_vocab)?)),
            ("tokenizer.ggml.model", Value::Str("llama")),
            ("tokenizer.ggml.tokens", Value::StrArr(&self.tokens)),
            ("tokenizer.ggml.scores", Value::F32Arr(&scores)),
            ("tokenizer.ggml.token_type", Value::I32Arr(&token_types)),
            (
                "tokenizer.ggml.unknown_token_id",
                Value::U32(TOKEN_UNK as u32),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(TOKEN_BOS as u32)),
            ("tokenizer.ggml.eos_token_id", Value::U32(TOKEN_EOS as u32)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
            ("tokenizer.ggml.add_eos_token", Value::Bool(false)),
            // SPM defaults to prepending a space; off so token counts equal byte counts.
            ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
        ];
        let tensors: Vec<(String, Vec<usize>, &[f32])> = self
            .tensors()
            .into_iter()
            .map(|(name, ne, data)| {
                let dims = if ne[1] == 1 { vec![ne[0]] } else { ne.to_vec() };
                (name, dims, data)
            })
            .collect();
        write_f32_gguf(w, &kvs, &tensors)?;
        Ok(())
    }
}

// llama.cpp's `llama_token_type` values, stored in `tokenizer.ggml.token_type`.
const TOKTYPE_NORMAL: i32 = 1;
const TOKTYPE_UNKNOWN: i32 = 2;
const TOKTYPE_CONTROL: i32 = 3;
const TOKTYPE_BYTE: i32 = 6;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::write::padded;

    #[test]
    fn deterministic_and_seed_sensitive() {
        let a = SynthModel::random(SynthConfig::default());
        let b = SynthModel::random(SynthConfig::default());
        assert_eq!(a, b);
        let c = SynthModel::random(SynthConfig {
            seed: 7,
            ..SynthConfig::default()
        });
        assert_ne!(a.tok_embd, c.tok_embd);
        assert_eq!(a.n_vocab(), 260);
        assert_eq!(a.tokens[TOKEN_SPACE as usize], "\u{2581}");
        assert_eq!(a.tokens[(TOKEN_BYTE0 + 0x41) as usize], "<0x41>");
    }

    #[test]
    fn gguf_layout_is_aligned_and_sized() {
        let m = SynthModel::random(SynthConfig::default());
        let mut buf = Vec::new();
        m.write_gguf_to(&mut buf).unwrap();
        assert_eq!(&buf[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(buf[4..8].try_into().unwrap()), 3);
        let n_tensors = u64::from_le_bytes(buf[8..16].try_into().unwrap());
        assert_eq!(n_tensors as usize, 3 + 9 * m.cfg.n_layer);
        let data: usize = m.tensors().iter().map(|t| padded(t.2.len() * 4)).sum();
        assert_eq!(buf.len() % ALIGNMENT, 0);
        // The last tensor's bytes end the file.
        let last = m
            .layers
            .last()
            .unwrap()
            .ffn_down
            .last()
            .unwrap()
            .to_le_bytes();
        let end =
            buf.len() - (padded(m.cfg.n_ff * m.cfg.n_embd * 4) - m.cfg.n_ff * m.cfg.n_embd * 4);
        assert_eq!(&buf[end - 4..end], &last);
        assert!(buf.len() > data);
    }

    #[test]
    fn validate_bounds_the_config() {
        assert!(SynthConfig::default().validate().is_ok());
        let with = |f: &dyn Fn(&mut SynthConfig)| {
            let mut c = SynthConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(with(&|c| c.n_layer = 513).contains("n_layer is 513"));
        assert!(with(&|c| c.n_layer = 0).contains("n_layer is 0"));
        assert!(with(&|c| c.n_embd = 800_000).contains("n_embd is 800000"));
        assert!(with(&|c| c.n_embd = 60).contains("multiple of 8"));
        assert!(with(&|c| c.n_head_kv = 3).contains("n_head_kv 3"));
        assert!(with(&|c| c.rms_eps = f32::NAN).contains("rms_eps is NaN"));
        // Each bound alone is fine, together they are too big.
        let big = with(&|c| {
            c.n_layer = 512;
            c.n_embd = 4096;
            c.n_ff = 8192;
        });
        assert!(big.contains("MiB of weights"), "{big}");
        let c = SynthConfig {
            n_layer: 512,
            ..SynthConfig::default()
        };
        assert!(c.validate().is_ok());
    }

    #[test]
    fn expected_tokens_maps_bytes_and_spaces() {
        assert_eq!(expected_tokens("A b"), vec![1, 3 + 65, TOKEN_SPACE, 3 + 98]);
        assert_eq!(expected_tokens("é").len(), 3);
    }
}
