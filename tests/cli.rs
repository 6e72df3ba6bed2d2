//! The `latent-tap` binary end to end on a synthetic model: outputs on disk,
//! and bad input giving one clear line, a non-zero exit and no panic.

mod common;
use common::{bin, synth_model};

use std::path::Path;
use std::process::Output;

fn capture(model: &Path, out: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["capture", "--quiet", "-m"])
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// A failed run: non-zero exit, exactly one stderr line starting with "error:", no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "'{needle}' not in: {err}");
}

#[test]
fn capture_writes_tokens_latents_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("run");
    let o = capture(
        &m,
        &out,
        &[
            "-p",
            "hi there",
            "-n",
            "4",
            "--tensors",
            "l_out-*",
            "--layers",
            "1..3",
            "--top-k",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tokens = std::fs::read_to_string(out.join("tokens.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = tokens
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 9 + 4, "BOS + 8 prompt bytes, then 4 generated");
    assert_eq!(lines[0]["prompt"], true);
    assert!(lines[0].get("logprob").is_none());
    let g = &lines[9];
    assert_eq!(g["prompt"], false);
    assert_eq!(g["pos"], 9);
    assert_eq!(g["top"].as_array().unwrap().len(), 3);
    assert!(g["logprob"].as_f64().unwrap() <= 0.0);
    assert!(g["entropy"].as_f64().unwrap() >= 0.0);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
    }
    // safetensors: header names every tensor with [rows, width] and .pos/.seq.
    let st = std::fs::read(out.join("latents.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&st[8..8 + n]).unwrap();
    assert_eq!(h["l_out-1"]["shape"], serde_json::json!([12, 64]));
    assert_eq!(
        h["l_out-2"]["shape"],
        serde_json::json!([4, 64]),
        "last layer: output rows only"
    );
    assert_eq!(h["l_out-2.pos"]["dtype"], "I32");
    assert!(
        h.get("l_out-0").is_none(),
        "layer filter 1..3 excludes layer 0"
    );
    let (a, b) = (
        h["l_out-2.pos"]["data_offsets"][0].as_u64().unwrap() as usize,
        h["l_out-2.pos"]["data_offsets"][1].as_u64().unwrap() as usize,
    );
    let pos: Vec<i32> = st[8 + n + a..8 + n + b]
        .chunks(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(pos, [8, 9, 10, 11]);
    // The reference safetensors reader agrees, and pos/seq are I32 vectors.
    let parsed = safetensors::SafeTensors::deserialize(&st).unwrap();
    let l1 = parsed.tensor("l_out-1").unwrap();
    assert_eq!(l1.dtype(), safetensors::Dtype::F32);
    assert_eq!(l1.shape(), [12, 64]);
    assert_eq!(
        parsed.tensor("l_out-1.seq").unwrap().data(),
        vec![0u8; 12 * 4].as_slice()
    );
    assert!(
        l1.data().chunks(4).any(|c| c != [0, 0, 0, 0]),
        "latents are not all zero"
    );
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(man["model"]["n_layer"], 3);
    assert_eq!(man["model"]["n_embd"], 64);
    // The build that wrote it: this test's own target CPU (same flags) and ggml's features.
    assert_eq!(man["build"]["target_cpu"], env!("LATENT_TAP_TARGET_CPU"));
    assert_eq!(man["build"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(!man["build"]["cpu_features"].as_array().unwrap().is_empty());
    assert_eq!(man["counters"]["drops"], 0);
    assert_eq!(man["counters"]["frames"], 2 * 4);
    assert_eq!(man["tensors"].as_array().unwrap().len(), 2);
    let t = &man["timings"];
    assert_eq!(t["generated_tokens"], 4);
    assert!(t["decode_ms_per_token"].as_f64().unwrap() > 0.0);
    assert!(t["ms_per_token"].as_f64().unwrap() >= t["decode_ms_per_token"].as_f64().unwrap());
}

#[test]
fn version_names_the_target_cpu_and_cpu_features() {
    let o = bin().arg("--version").output().unwrap();
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(format!("latent-tap {}", env!("CARGO_PKG_VERSION")).as_str())
    );
    let build = lines.next().unwrap_or_default();
    assert!(
        build.starts_with(&format!(
            "target-cpu {}; CPU features: ",
            env!("LATENT_TAP_TARGET_CPU")
        )),
        "{text}"
    );
    #[cfg(target_arch = "x86_64")]
    assert!(build.split(' ').any(|f| f == "SSE3"), "{text}");
}

#[test]
fn tensors_lists_layers() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let o = bin().args(["tensors", "-m"]).arg(&m).output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("layer 2:"));
    assert!(s.contains("l_out-2"));
    assert!(s.contains("result_output"));
}

#[test]
fn missing_truncated_and_foreign_model_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let o = capture(&dir.path().join("nope.gguf"), &out, &["-p", "x"]);
    assert_clean_error(&o, "cannot load model");
    let foreign = dir.path().join("foreign.gguf");
    std::fs::write(&foreign, b"PK\x03\x04 definitely a zip file").unwrap();
    assert_clean_error(&capture(&foreign, &out, &["-p", "x"]), "not a GGUF file");
    let good = std::fs::read(synth_model(dir.path())).unwrap();
    let trunc = dir.path().join("trunc.gguf");
    std::fs::write(&trunc, &good[..good.len() / 2]).unwrap();
    assert_clean_error(&capture(&trunc, &out, &["-p", "x"]), "cannot load model");
    let tiny = dir.path().join("tiny.gguf");
    std::fs::write(&tiny, b"GG").unwrap();
    assert_clean_error(&capture(&tiny, &out, &["-p", "x"]), "too short");
}

#[test]
fn bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    assert_clean_error(
        &capture(&m, &out, &["-p", "x", "--tensors", "l_outt-*"]),
        "matches no tensor",
    );
    assert_clean_error(&capture(&m, &out, &["-p", ""]), "empty prompt");
    assert_clean_error(&capture(&m, &out, &["-p", "x", "-n", "0"]), "n-predict");
    let long = "y".repeat(300);
    assert_clean_error(&capture(&m, &out, &["-p", &long, "-c", "128"]), "context");
    assert_clean_error(
        &capture(&m, &out, &["-p", "x", "--layers", "9..2"]),
        "layer filter",
    );
    assert_clean_error(&capture(&m, &out, &["-p", "x", "--dtype", "f8"]), "dtype");
    assert_clean_error(
        &capture(&m, &out, &["-p", "x", "--poll", "101"]),
        "--poll must be between 0 and 100, not 101",
    );
    assert!(!out.exists(), "failed runs write nothing");
}

/// `tensors PATTERNS` lists only what the globs match; per-layer views such as
/// `Kcur-0 (view)` and `cache_k_l0 (view)` are grouped under their layer, not
/// under `global:`; a pattern that matches nothing is one clear error.
#[test]
fn tensors_filter_and_layer_grouping() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let list = |extra: &[&str]| {
        let o = bin()
            .args(["tensors", "-m"])
            .arg(&m)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let all = list(&[]);
    let global: Vec<&str> = all
        .lines()
        .skip_while(|l| *l != "global:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(str::trim)
        .collect();
    assert!(
        global.iter().any(|l| l.starts_with("result_output")),
        "{all}"
    );
    for l in &global {
        let name = l.split("  ").next().unwrap();
        assert_eq!(
            latent_tap::select::layer_of(name),
            None,
            "'{name}' belongs to a layer but is listed under global:\n{all}"
        );
    }
    // The synthetic llama graph has per-layer KV-cache views; they sit in their layer.
    let layer0: Vec<&str> = all
        .lines()
        .skip_while(|l| *l != "layer 0:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    assert!(
        layer0.iter().any(|l| l.trim().starts_with("cache_k_l0")),
        "{all}"
    );

    let some = list(&["l_out-*,attn_norm-1"]);
    let names: Vec<&str> = some
        .lines()
        .filter(|l| l.starts_with("  "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["l_out-0", "attn_norm-1", "l_out-1", "l_out-2"],
        "{some}"
    );
    assert!(!some.contains("global:"), "{some}");

    let o = bin()
        .args(["tensors", "-m"])
        .arg(&m)
        .arg("nope-*")
        .output()
        .unwrap();
    assert_clean_error(&o, "'nope-*' matches no node");
    let o = bin()
        .args(["tensors", "-m"])
        .arg(&m)
        .arg(" , ")
        .output()
        .unwrap();
    assert_clean_error(&o, "blank");
}

/// `--ring-mb 1` (the documented minimum) works with the default ubatch: the
/// ubatch is lowered to the rows one frame of the ring can carry, and a note
/// says so; with `--ubatch-size` given, a frame that does not fit stays an error.
#[test]
fn ring_mb_1_lowers_the_default_ubatch() {
    use latent_tap::record::{frame_len, Dtype};
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("wide.gguf");
    let o = bin()
        .arg("synth-model")
        .arg(&m)
        .args(["--layers", "2", "--embd", "512"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let max = latent_tap::ring::max_record_for(1 << 20);
    let head = frame_len(0, 0, Dtype::F32);
    let rows = (max - head) / (frame_len(1, 512, Dtype::F32) - head);
    assert!(
        frame_len(512, 512, Dtype::F32) > max,
        "the default ubatch must not fit"
    );
    assert!(rows > 0 && rows < 512);

    let out = dir.path().join("r1");
    let o = capture(
        &m,
        &out,
        &["-p", "hello world", "-n", "3", "--ring-mb", "1"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("note: --ubatch-size {rows} (not 512)")),
        "{err}"
    );
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(man["capture"]["n_ubatch"], rows as u64);
    assert_eq!(man["capture"]["ring_bytes"], 1 << 20);
    assert_eq!(man["tensors"].as_array().unwrap().len(), 2, "{man}");
    assert_eq!(man["counters"]["drops"], 0);
    // The default threads: every core but one.
    assert_eq!(
        man["capture"]["threads"],
        latent_tap::settings::spare_core_threads()
    );

    // Dataset capture takes the same rule.
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "hello world\nsecond prompt\n").unwrap();
    let ds = dir.path().join("ds");
    let o = capture(
        &m,
        &ds,
        &[
            "--prompts",
            prompts.to_str().unwrap(),
            "-n",
            "0",
            "--ring-mb",
            "1",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("note: --ubatch-size {rows}")),
        "{err}"
    );

    let o = capture(
        &m,
        &dir.path().join("r2"),
        &["-p", "hello", "--ring-mb", "1", "--ubatch-size", "512"],
    );
    assert_clean_error(&o, "raise the ring capacity or lower n_ubatch");
}
