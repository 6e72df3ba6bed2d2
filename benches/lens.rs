//! Logit lens throughput on the real model, in one process:
//! - `mul_mat`: ggml's own `mul_mat` of the unembedding (as stored) with the
//!   rows alone, in the lens's batches: the roofline;
//! - `logits`: the lens's graph (norm, gain, `mul_mat`, soft-cap);
//! - `lens`: logits plus the per-cell statistics (top-5, entropy, target, KL);
//! - `output layer`: `mul_mat` of one row, what the model's own output layer
//!   costs per decoded token.
//!
//! `cargo bench --bench lens` (`LENS_BENCH_THREADS`, default 2; `LENS_BENCH_ROWS`,
//! default 288 = 18 layers × 16 positions). Needs `models/gemma-3-270m-q4_k_m.gguf`.

use std::time::Instant;

use latent_tap::lens::{Lens, LensInput};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Best of `n` runs of `f`, seconds.
fn best(n: usize, mut f: impl FnMut()) -> f64 {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/gemma-3-270m-q4_k_m.gguf"
    );
    if !std::path::Path::new(path).exists() {
        eprintln!("SKIPPED: {path} is missing; run scripts/fetch-model");
        return;
    }
    let threads = env("LENS_BENCH_THREADS", 2);
    let n_rows = env("LENS_BENCH_ROWS", 288);
    let lens = Lens::open(path, threads).expect("lens");
    let (e, v, l) = (lens.n_embd(), lens.n_vocab(), lens.n_layer());
    // Deterministic rows of residual-like scale.
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let rows: Vec<f32> = (0..n_rows * e)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 40.0
        })
        .collect();
    println!(
        "lens bench: {} ({}), n_embd {e}, n_vocab {v}, {n_rows} rows, {threads} threads, batches of {}",
        path.rsplit('/').next().unwrap_or(path),
        lens.unembedding_type(),
        latent_tap::lens::BATCH_ROWS
    );
    let _ = lens.logits(&rows[..e]); // warm up
    let reps = 3;
    let mm = best(reps, || {
        lens.mul_mat_only(&rows).unwrap();
    });
    let lg = best(reps, || {
        lens.logits(&rows).unwrap();
    });
    let inputs: Vec<LensInput> = (0..n_rows)
        .map(|i| LensInput {
            layer: i % l,
            seq: 0,
            pos: (i / l) as i32,
            step: 0,
            h: &rows[i * e..(i + 1) * e],
        })
        .collect();
    let layers: Vec<usize> = (0..l).collect();
    let full = best(reps, || {
        lens.compute(&inputs, &layers, 5, &|_, p| Some(p)).unwrap();
    });
    let one = best(10, || {
        lens.mul_mat_only(&rows[..e]).unwrap();
    });
    let rate = |t: f64| n_rows as f64 / t;
    println!(
        "mul_mat (roofline)   {:>9.1} rows/s  ({:.2} ms/row)",
        rate(mm),
        1e3 * mm / n_rows as f64
    );
    println!(
        "lens logits          {:>9.1} rows/s  ({:.2} ms/row)  {:.2}x of mul_mat",
        rate(lg),
        1e3 * lg / n_rows as f64,
        mm / lg
    );
    println!(
        "lens + statistics    {:>9.1} rows/s  ({:.2} ms/row)  {:.2}x of mul_mat",
        rate(full),
        1e3 * full / n_rows as f64,
        mm / full
    );
    println!(
        "output layer, 1 row  {:>9.2} ms/row (mul_mat of one row, as in one decode step)",
        1e3 * one
    );
    println!(
        "a lens of all {l} layers per token costs {:.1} ms ({:.1}x the output layer's {:.2} ms)",
        1e3 * full / n_rows as f64 * l as f64,
        full / n_rows as f64 * l as f64 / one,
        1e3 * one
    );
}
