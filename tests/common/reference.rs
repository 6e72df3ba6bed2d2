//! An independent forward pass of [`SynthModel`] with `ndarray`, mirroring the
//! semantics of llama.cpp's `llama` architecture graph, so tests can check what
//! llama.cpp (and anything tapped out of it) computes against known values.
//!
//! Everything is computed in f64 and stored as f32 arrays `[n_tokens, width]`.

use latent_tap::synth::SynthModel;
use ndarray::{s, Array1, Array2, ArrayView2, Axis};

/// Intermediate and final tensors for one sequence at positions `0..n`.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Residual stream after each layer (`l_out-N`), `[n_tokens, n_embd]`.
    pub l_out: Vec<Array2<f32>>,
    /// Output of the attention output projection, before the residual add.
    pub attn_out: Vec<Array2<f32>>,
    /// Output of the FFN down projection, before the residual add.
    pub ffn_out: Vec<Array2<f32>>,
    /// Final normed hidden state (`result_norm`), `[n_tokens, n_embd]`.
    pub result_norm: Array2<f32>,
    /// LM-head output, `[n_tokens, n_vocab]`.
    pub logits: Array2<f32>,
}

/// A ggml-layout weight (`n_out` rows of `n_in`) as an `[n_out, n_in]` matrix.
fn weight(w: &[f32], n_in: usize, n_out: usize) -> Array2<f64> {
    assert_eq!(w.len(), n_in * n_out);
    Array2::from_shape_vec((n_out, n_in), w.iter().map(|&x| f64::from(x)).collect()).unwrap()
}

fn gain(g: &[f32]) -> Array1<f64> {
    g.iter().map(|&x| f64::from(x)).collect()
}

/// `x @ Wᵀ` for rows of `x`, i.e. `y = W·x` per token.
fn project(x: &Array2<f64>, w: &Array2<f64>) -> Array2<f64> {
    x.dot(&w.t())
}

/// Row-wise `x / sqrt(mean(x²) + eps) * g`.
fn rms_norm(x: &Array2<f64>, g: &Array1<f64>, eps: f64) -> Array2<f64> {
    let mut y = x.clone();
    for mut row in y.rows_mut() {
        let ms = row.mapv(|v| v * v).mean().unwrap();
        let inv = 1.0 / (ms + eps).sqrt();
        row.zip_mut_with(g, |v, &gi| *v *= inv * gi);
    }
    y
}

/// RoPE NORM mode (llama): rotate adjacent pairs `(2i, 2i+1)` of each head by
/// `pos * base^(-2i/head_dim)`. `x` is `[n_tokens, n_heads * head_dim]`.
fn rope(x: &mut Array2<f64>, head_dim: usize, base: f64) {
    for (pos, mut row) in x.rows_mut().into_iter().enumerate() {
        for head in row.exact_chunks_mut(head_dim) {
            let mut head = head;
            for i in (0..head_dim).step_by(2) {
                let theta = pos as f64 * base.powf(-(i as f64) / head_dim as f64);
                let (sin, cos) = theta.sin_cos();
                let (x0, x1) = (head[i], head[i + 1]);
                head[i] = x0 * cos - x1 * sin;
                head[i + 1] = x0 * sin + x1 * cos;
            }
        }
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn to_f32(x: &Array2<f64>) -> Array2<f32> {
    x.mapv(|v| v as f32)
}

/// Causal GQA attention; returns the concatenated head outputs `[n, n_head*hd]`.
fn attention(
    q: ArrayView2<f64>,
    k: ArrayView2<f64>,
    v: ArrayView2<f64>,
    n_head: usize,
    n_head_kv: usize,
    hd: usize,
) -> Array2<f64> {
    let n = q.nrows();
    let group = n_head / n_head_kv;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = Array2::<f64>::zeros((n, n_head * hd));
    for h in 0..n_head {
        let kvh = h / group;
        let qh = q.slice(s![.., h * hd..(h + 1) * hd]);
        let kh = k.slice(s![.., kvh * hd..(kvh + 1) * hd]);
        let vh = v.slice(s![.., kvh * hd..(kvh + 1) * hd]);
        let scores = qh.dot(&kh.t()) * scale;
        for t in 0..n {
            let row = scores.slice(s![t, ..=t]);
            let max = row.fold(f64::NEG_INFINITY, |m, &x| m.max(x));
            let p = row.mapv(|x| (x - max).exp());
            let p = &p / p.sum();
            let o = p.dot(&vh.slice(s![..=t, ..]));
            out.slice_mut(s![t, h * hd..(h + 1) * hd]).assign(&o);
        }
    }
    out
}

/// Runs `tokens` through `model` at positions `0..tokens.len()`.
pub fn forward(model: &SynthModel, tokens: &[i32]) -> Reference {
    let c = &model.cfg;
    let (e, hd, nv) = (c.n_embd, c.head_dim(), model.n_vocab());
    let (q_dim, kv_dim) = (c.n_head * hd, c.n_head_kv * hd);
    let eps = f64::from(c.rms_eps);
    let base = f64::from(c.rope_freq_base);

    let embd = weight(&model.tok_embd, e, nv);
    let idx: Vec<usize> = tokens
        .iter()
        .map(|&t| usize::try_from(t).expect("negative token"))
        .collect();
    let mut x = embd.select(Axis(0), &idx);

    let mut r = Reference {
        l_out: Vec::new(),
        attn_out: Vec::new(),
        ffn_out: Vec::new(),
        result_norm: Array2::zeros((0, 0)),
        logits: Array2::zeros((0, 0)),
    };
    for l in &model.layers {
        let h = rms_norm(&x, &gain(&l.attn_norm), eps);
        let mut q = project(&h, &weight(&l.wq, e, q_dim));
        let mut k = project(&h, &weight(&l.wk, e, kv_dim));
        let v = project(&h, &weight(&l.wv, e, kv_dim));
        rope(&mut q, hd, base);
        rope(&mut k, hd, base);
        let attn = attention(q.view(), k.view(), v.view(), c.n_head, c.n_head_kv, hd);
        let attn_out = project(&attn, &weight(&l.wo, q_dim, e));
        let x1 = &x + &attn_out;

        let h2 = rms_norm(&x1, &gain(&l.ffn_norm), eps);
        let gate = project(&h2, &weight(&l.ffn_gate, e, c.n_ff));
        let up = project(&h2, &weight(&l.ffn_up, e, c.n_ff));
        let act = gate.mapv(silu) * up;
        let ffn_out = project(&act, &weight(&l.ffn_down, c.n_ff, e));
        x = &x1 + &ffn_out;

        r.attn_out.push(to_f32(&attn_out));
        r.ffn_out.push(to_f32(&ffn_out));
        r.l_out.push(to_f32(&x));
    }
    let norm = rms_norm(&x, &gain(&model.output_norm), eps);
    r.logits = to_f32(&project(&norm, &weight(&model.output, e, nv)));
    r.result_norm = to_f32(&norm);
    r
}
