//! Capture overhead: the eval callback's ask phase per graph node, and decode
//! ms/token on a synthetic model without a tap vs with every `l_out-*` captured.
//!
//! `cargo bench --bench capture`. The decode comparison alternates A and B in
//! one process and prints medians and their ratio (the machines are noisy).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use latent_tap::capture::{eval_callback, CaptureMode, Policy, Rows, Tap, TapSettings};
use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::record::Dtype;
use latent_tap::select::{GraphNode, Selection};
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator};
use latent_tap::synth::{SynthConfig, SynthModel};
use llama_cpp_sys_2 as sys;

/// Node names shaped like a Gemma-3 graph of 18 layers (~28 nodes per layer).
fn gemma_like_names() -> Vec<String> {
    let per_layer = [
        "norm",
        "attn_norm",
        "Qcur",
        "Qcur",
        "norm",
        "Qcur_normed",
        "Qcur",
        "Kcur",
        "Kcur",
        "norm",
        "Kcur_normed",
        "Kcur",
        "Vcur",
        "Vcur",
        "kqv_out",
        "norm",
        "attn_post_norm",
        "sa_out",
        "norm",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_geglu",
        "ffn_out",
        "ffn_post_norm",
        "l_out",
    ];
    let mut v = vec!["inp_embd".to_string(), "inp_scaled".to_string()];
    for l in 0..18 {
        v.extend(per_layer.iter().map(|b| format!("{b}-{l}")));
        v.push(format!("cache_k_l{l} (view)"));
        v.push(format!("node_{}", 100 + l));
    }
    v.extend(["result_norm".to_string(), "result_output".to_string()]);
    v
}

fn tensor(name: &str) -> sys::ggml_tensor {
    // SAFETY: ggml_tensor is a plain C struct; all-zero is a valid (empty) value.
    let mut t: sys::ggml_tensor = unsafe { std::mem::zeroed() };
    for (d, s) in t.name.iter_mut().zip(name.bytes()) {
        *d = s as _;
    }
    t.ne = [640, 1, 1, 1];
    t.flags = sys::GGML_TENSOR_FLAG_COMPUTE as i32;
    t
}

fn ask_phase(c: &mut Criterion) {
    let names = gemma_like_names();
    let raw: Vec<_> = names
        .iter()
        .map(|n| (n.clone(), 0u32, [640i64, 1, 1, 1]))
        .collect();
    let graph = GraphNode::list_from_raw(&raw);
    let sel = Selection::compile(&["l_out-*".to_string()], None, &graph).unwrap();
    let (producer, _consumer) = latent_tap::ring::channel(1 << 20).unwrap();
    let settings = TapSettings {
        rows: Rows::All,
        dtype: Dtype::F32,
        policy: Policy::DropNewest,
        n_ubatch: 8,
        mode: CaptureMode::Callback,
    };
    let mut tap = Tap::armed(&graph[0].ggml_name, sel, producer, settings).unwrap();
    let mut tensors: Vec<sys::ggml_tensor> = names.iter().map(|n| tensor(n)).collect();
    let user = &mut tap as *mut Tap as *mut c_void;
    let mut g = c.benchmark_group("callback");
    g.throughput(Throughput::Elements(tensors.len() as u64));
    g.bench_function(
        format!("ask phase, {} nodes, 18 selected", tensors.len()),
        |b| {
            b.iter(|| {
                let mut hits = 0;
                for t in tensors.iter_mut() {
                    // SAFETY: valid tensor and the tap it was armed for; ask phase only.
                    hits += unsafe { eval_callback(t, true, user) } as u32;
                }
                assert_eq!(hits, 18);
            })
        },
    );
    g.finish();
}

struct Bench {
    gen: Generator,
    stop: Arc<AtomicBool>,
    drain: Option<std::thread::JoinHandle<()>>,
    prompt: Vec<Vec<i32>>,
}

impl Bench {
    fn new(model: &Arc<Model>, patterns: &[&str]) -> Self {
        let ctx = ContextOptions {
            n_ctx: 512,
            ..Default::default()
        };
        let spec = CaptureSpec {
            patterns: patterns.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let (gen, mut stream) = Generator::new(model.clone(), &ctx, &spec).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let drain = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let _ = stream.next(Duration::from_millis(2));
            }
        });
        let prompt = vec![model.tokenize("The quick brown fox", true).unwrap()];
        Self {
            gen,
            stop,
            drain: Some(drain),
            prompt,
        }
    }

    /// llama_decode ms per generated token over `n` tokens.
    fn ms_per_token(&mut self, n: usize) -> f64 {
        let opts = GenerateOptions {
            n_predict: n,
            n_probs: 0,
            ..Default::default()
        };
        self.gen
            .run(&self.prompt, &opts, &mut |_| {})
            .unwrap()
            .ms_per_token
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn decode(c: &mut Criterion) {
    let cfg = SynthConfig {
        n_layer: 8,
        n_embd: 512,
        n_head: 8,
        n_head_kv: 4,
        n_ff: 1536,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.gguf");
    SynthModel::random(cfg).write_gguf(&path).unwrap();
    let model = Model::load(&path, &ModelOptions::default()).unwrap();
    let mut plain = Bench::new(&model, &[]);
    let mut tapped = Bench::new(&model, &["l_out-*"]);
    // Alternate A and B; quote medians and the ratio of medians.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        a.push(plain.ms_per_token(32));
        b.push(tapped.ms_per_token(32));
    }
    let (ma, mb) = (median(&mut a), median(&mut b));
    println!(
        "decode synthetic 8x512 (alternating, 15 rounds x 32 tokens): no tap {ma:.3} ms/token, tap l_out-* {mb:.3} ms/token, ratio {:.3}",
        mb / ma
    );
    let mut g = c.benchmark_group("decode");
    g.sample_size(10);
    g.bench_function("no tap, 16 tokens", |bch| {
        bch.iter(|| plain.ms_per_token(16))
    });
    g.bench_function("tap l_out-*, 16 tokens", |bch| {
        bch.iter(|| tapped.ms_per_token(16))
    });
    g.finish();
}

criterion_group!(benches, ask_phase, decode);
criterion_main!(benches);
