//! Decode and prompt cost of capturing, per capture mode, in one run on one model:
//! no capture, `callback` (the graph is cut at each selected node) and `deferred`
//! (selected nodes kept as outputs, copied after the compute).
//!
//! `cargo bench --bench capture_overhead`. The real model (`models/gemma-3-270m-q4_k_m.gguf`,
//! fetched by `scripts/fetch-model`, or `LT_BENCH_MODEL=PATH`) is used when present,
//! a synthetic 8x512 model otherwise. Modes are measured alternately (A B C A B C ...)
//! so a noisy machine moves them alike; medians, spreads and ratios are printed.
//! Settings by environment: `LT_BENCH_THREADS` (comma list, default `2,<cores>`),
//! `LT_BENCH_ROUNDS` (default 7), `LT_BENCH_TOKENS` (decode tokens per round, default 32),
//! `LT_BENCH_PROMPT` (prompt tokens, default 512), `LT_BENCH_QUICK=1` (one round, for CI smoke).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use latent_tap::capture::CaptureMode;
use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator};
use latent_tap::synth::{SynthConfig, SynthModel};

const MODES: [(&str, Option<CaptureMode>); 3] = [
    ("none", None),
    ("callback", Some(CaptureMode::Callback)),
    ("deferred", Some(CaptureMode::Deferred)),
];

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

struct Run {
    gen: Generator,
    stop: Arc<AtomicBool>,
    drain: Option<std::thread::JoinHandle<()>>,
}

impl Run {
    fn new(model: &Arc<Model>, ctx: &ContextOptions, mode: Option<CaptureMode>) -> Self {
        let spec = CaptureSpec {
            patterns: vec![if mode.is_some() { "l_out-*" } else { "" }.into()],
            mode: mode.unwrap_or_default(),
            ..Default::default()
        };
        let (gen, mut stream) = Generator::new(model.clone(), ctx, &spec).unwrap();
        if let (Some(asked), Some(m)) = (mode, gen.capture_mode()) {
            assert_eq!(m.used, asked, "mode {asked:?} not in effect: {:?}", m.note);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let drain = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let _ = stream.next(Duration::from_millis(2));
            }
        });
        Self {
            gen,
            stop,
            drain: Some(drain),
        }
    }

    /// (prompt ms, llama_decode ms per generated token).
    fn run(&mut self, prompt: &[i32], n: usize) -> (f64, f64) {
        let opts = GenerateOptions {
            n_predict: n,
            n_probs: 0,
            ..Default::default()
        };
        let s = self
            .gen
            .run(&[prompt.to_vec()], &opts, &mut |_| {})
            .unwrap();
        (s.prompt_ms, s.decode_ms_per_token)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
    }
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn model() -> (Arc<Model>, String, Option<tempfile::TempDir>) {
    let real = std::env::var_os("LT_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf")
        });
    if real.exists() {
        let m = Model::load(&real, &ModelOptions::default()).unwrap();
        return (m, real.display().to_string(), None);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.gguf");
    let cfg = SynthConfig {
        n_layer: 8,
        n_embd: 512,
        n_head: 8,
        n_head_kv: 4,
        n_ff: 1536,
        ..Default::default()
    };
    SynthModel::random(cfg).write_gguf(&path).unwrap();
    let m = Model::load(&path, &ModelOptions::default()).unwrap();
    (m, "synthetic 8x512".into(), Some(dir))
}

fn prompt_tokens(model: &Model, n: usize) -> Vec<i32> {
    let text = "The history of the Roman empire begins with a small city on the banks of the \
                Tiber, which over many centuries grew into a power that ruled the lands around \
                the Mediterranean sea. ";
    let mut t = model.tokenize(&text.repeat(n / 8 + 1), true).unwrap();
    t.truncate(n);
    t
}

fn overhead(c: &mut Criterion) {
    let (model, name, _dir) = model();
    let quick = std::env::var_os("LT_BENCH_QUICK").is_some();
    let rounds = if quick {
        1
    } else {
        env_usize("LT_BENCH_ROUNDS", 7)
    };
    let n_tok = env_usize("LT_BENCH_TOKENS", if quick { 4 } else { 32 });
    let n_prompt = env_usize("LT_BENCH_PROMPT", if quick { 64 } else { 512 });
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut threads: Vec<usize> = std::env::var("LT_BENCH_THREADS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2.min(cores), cores]);
    threads.dedup();
    let short = prompt_tokens(&model, 8);
    let long = prompt_tokens(&model, n_prompt);
    println!(
        "capture_overhead: {name}, all l_out-* (all rows), {rounds} alternating rounds; decode {n_tok} tokens after an 8-token prompt; prompt {} tokens",
        long.len()
    );
    for &t in &threads {
        let ctx = ContextOptions {
            n_ctx: (long.len() + n_tok + 16).next_power_of_two() as u32,
            n_threads: Some(t as i32),
            ..Default::default()
        };
        let mut runs: Vec<Run> = MODES
            .iter()
            .map(|(_, m)| Run::new(&model, &ctx, *m))
            .collect();
        // Warm-up: first graphs, allocations, page faults.
        for r in runs.iter_mut() {
            r.run(&short, 2);
        }
        let mut dec = vec![Vec::new(); MODES.len()];
        let mut pp = vec![Vec::new(); MODES.len()];
        for _ in 0..rounds {
            for (i, r) in runs.iter_mut().enumerate() {
                dec[i].push(r.run(&short, n_tok).1);
            }
            for (i, r) in runs.iter_mut().enumerate() {
                pp[i].push(r.run(&long, 1).0);
            }
        }
        for (what, v, unit) in [("decode", &mut dec, "ms/token"), ("prompt", &mut pp, "ms")] {
            let s: Vec<_> = v.iter_mut().map(|x| stats(x)).collect();
            let base = s[0].0;
            let line: Vec<String> = MODES
                .iter()
                .zip(&s)
                .map(|((m, _), (med, lo, hi))| {
                    format!("{m} {med:.3} {unit} [{lo:.3}..{hi:.3}] x{:.3}", med / base)
                })
                .collect();
            println!("  {t} threads, {what}: {}", line.join(" | "));
        }
    }
    // Criterion's own view of one decode per mode (2 threads), for regressions.
    let ctx = ContextOptions {
        n_ctx: 256,
        n_threads: Some(2),
        ..Default::default()
    };
    let mut g = c.benchmark_group("decode_8_tokens");
    g.sample_size(10);
    for (m, mode) in MODES {
        let mut r = Run::new(&model, &ctx, mode);
        g.bench_function(m, |b| b.iter(|| r.run(&short, 8)));
    }
    g.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
