//! Helpers shared by integration tests.
#![allow(dead_code)]

pub mod capi;
pub mod http;
pub mod reference;

use std::path::{Path, PathBuf};
use std::process::Command;

use latent_tap::engine::{ContextOptions, Model};
use latent_tap::output::{collect, Collected};
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator};
use latent_tap::synth::{SynthConfig, SynthModel};

/// The `latent-tap` binary this test run built.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_latent-tap"))
}

/// The lines of a run's `tokens.jsonl` (capture, dataset, listen).
pub fn tokens(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("tokens.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A default synthetic model written into `dir`.
pub fn synth_model(dir: &Path) -> PathBuf {
    let p = dir.join("synth.gguf");
    SynthModel::random(SynthConfig::default())
        .write_gguf(&p)
        .unwrap();
    p
}

/// A synthetic model of `n_layer` layers (otherwise the defaults) written into
/// `dir` as `synth{n_layer}.gguf`.
pub fn synth_layers(dir: &Path, n_layer: usize) -> PathBuf {
    let p = dir.join(format!("synth{n_layer}.gguf"));
    SynthModel::random(SynthConfig {
        n_layer,
        ..SynthConfig::default()
    })
    .write_gguf(&p)
    .unwrap();
    p
}

/// The real model when `scripts/fetch-model` has run; in CI (`CI` set) its
/// absence is a failure, elsewhere the caller skips.
pub fn real_model() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing in CI (scripts/fetch-model)",
        p.display()
    );
    eprintln!(
        "SKIPPED: {} is missing; run scripts/fetch-model",
        p.display()
    );
    None
}

/// A deterministic unit-length row of `n` values from an xorshift state
/// (advanced), for test steering vectors.
pub fn unit_direction(state: &mut u32, n: usize) -> Vec<f32> {
    let d: Vec<f32> = (0..n)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 17;
            *state ^= *state << 5;
            (*state as f32 / u32::MAX as f32) - 0.5
        })
        .collect();
    let norm = d.iter().map(|v| v * v).sum::<f32>().sqrt();
    d.iter().map(|v| v / norm).collect()
}

/// Generate from `prompts` (tokens) with the library's `Generator`, capturing
/// by `spec` on a context made of `ctx`, and return what its consumer collected.
pub fn capture_run(
    model: &std::sync::Arc<Model>,
    spec: &CaptureSpec,
    ctx: &ContextOptions,
    prompts: &[Vec<i32>],
    opts: &GenerateOptions,
) -> Collected {
    let (mut gen, stream) = Generator::new(model.clone(), ctx, spec).unwrap();
    let sel = gen.selection().to_vec();
    let dtype = spec.dtype;
    let consumer = std::thread::spawn(move || collect(stream, &sel, dtype));
    gen.run(prompts, opts, &mut |_| {}).unwrap();
    drop(gen);
    consumer.join().unwrap().unwrap()
}
