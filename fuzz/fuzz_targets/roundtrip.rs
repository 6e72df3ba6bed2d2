//! Synthetic model writer → GGUF pre-check → llama.cpp loader → one decode:
//! every config `SynthConfig::validate` accepts loads and runs (no abort), and
//! every file the pre-check accepts loads without aborting the process.
#![no_main]

use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::synth::{SynthConfig, SynthModel};
use libfuzzer_sys::fuzz_target;

fn u(data: &[u8], i: usize) -> usize {
    data.get(i).copied().unwrap_or(0) as usize
}

fn f(data: &[u8], i: usize) -> f32 {
    let mut b = [0u8; 4];
    for (k, x) in b.iter_mut().enumerate() {
        *x = data.get(i + k).copied().unwrap_or(0);
    }
    f32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let cfg = SynthConfig {
        n_layer: u(data, 0) % 5,
        n_embd: 8 * (u(data, 1) % 9),
        n_head: u(data, 2) % 9,
        n_head_kv: u(data, 3) % 9,
        n_ff: u(data, 4) % 65,
        n_ctx_train: u(data, 5) * 4,
        rope_freq_base: if u(data, 6) & 1 == 0 {
            10000.0
        } else {
            f(data, 8)
        },
        rms_eps: if u(data, 7) & 1 == 0 {
            1e-5
        } else {
            f(data, 12)
        },
        seed: u(data, 16) as u64,
    };
    if cfg.validate().is_err() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("lt-fuzz-roundtrip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.gguf");
    SynthModel::random(cfg.clone()).write_gguf(&path).unwrap();
    latent_tap::gguf::check_file(&path).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
    let model =
        Model::load(&path, &ModelOptions::default()).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
    assert_eq!(model.n_layer(), cfg.n_layer);
    let opts = ContextOptions {
        n_ctx: 32,
        n_batch: 8,
        n_ubatch: 8,
        n_threads: Some(1),
        ..ContextOptions::default()
    };
    let nodes =
        latent_tap::session::probe_graph(&model, &opts).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
    assert!(nodes
        .iter()
        .any(|n| n.name == format!("l_out-{}", cfg.n_layer - 1)));
});
