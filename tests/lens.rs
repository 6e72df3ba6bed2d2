//! The logit lens: on the synthetic model every layer's lens equals an
//! independent ndarray computation (RMS norm + matmul + log-softmax) within
//! 1e-4; on the real model the last layer's lens equals llama.cpp's own
//! distribution (top-k ids, log-probabilities within 1e-3); bad input gives
//! clear errors, never an abort.

mod common;

use std::path::Path;
use std::sync::Arc;

use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::lens::{inputs_from_collected, Lens, LensInput, OwnedInput};
use latent_tap::output::Collected;
use latent_tap::session::{CaptureSpec, GenerateOptions};
use latent_tap::synth::{SynthConfig, SynthModel};
use ndarray::{Array1, Array2, ArrayView1};

const TOL: f64 = 1e-4;

fn capture(model: &Arc<Model>, pattern: &str, prompt: &str, n_predict: usize) -> Collected {
    let spec = CaptureSpec {
        patterns: vec![pattern.into()],
        ..Default::default()
    };
    let ctx = ContextOptions {
        n_ctx: 256,
        n_threads: Some(2),
        ..Default::default()
    };
    let toks = vec![model.tokenize(prompt, true).unwrap()];
    let opts = GenerateOptions {
        n_predict,
        n_probs: 10,
        ..Default::default()
    };
    common::capture_run(model, &spec, &ctx, &toks, &opts)
}

/// log-softmax(W · (rms_norm(h) ⊙ g)) in f64, W row-major `[n_vocab][n_embd]`.
fn reference(h: &[f32], gain: &[f32], w: &[f32], eps: f32) -> Array1<f64> {
    let e = h.len();
    let h = ArrayView1::from(h).mapv(f64::from);
    let ms = h.dot(&h) / e as f64;
    let hn = &h / (ms + f64::from(eps)).sqrt() * ArrayView1::from(gain).mapv(f64::from);
    let w = Array2::from_shape_vec((w.len() / e, e), w.iter().map(|&x| f64::from(x)).collect())
        .unwrap();
    let z = w.dot(&hn);
    let m = z.fold(f64::MIN, |a, &b| a.max(b));
    let lse = m + z.mapv(|x| (x - m).exp()).sum().ln();
    z.mapv(|x| x - lse)
}

fn synth_fixture() -> (
    tempfile::TempDir,
    SynthModel,
    std::path::PathBuf,
    Arc<Model>,
) {
    let dir = tempfile::tempdir().unwrap();
    let synth = SynthModel::random(SynthConfig::default());
    let path = dir.path().join("synth.gguf");
    synth.write_gguf(&path).unwrap();
    let model = Model::load(&path, &ModelOptions::default()).unwrap();
    (dir, synth, path, model)
}

#[test]
fn synthetic_every_layer_equals_ndarray() {
    let (_dir, synth, path, model) = synth_fixture();
    let c = capture(&model, "l_out-*", "hello lens", 3);
    let lens = Lens::open(&path, 2).unwrap();
    assert_eq!(
        (lens.n_layer(), lens.n_embd(), lens.n_vocab()),
        (3, 64, 260)
    );
    let inputs = inputs_from_collected(&c, lens.n_embd()).unwrap();
    let layers: Vec<usize> = (0..3).collect();
    for l in &layers {
        assert!(inputs.iter().any(|i| i.layer == *l), "no rows of layer {l}");
    }
    let eps = synth.cfg.rms_eps;
    let refs: Vec<Array1<f64>> = inputs
        .iter()
        .map(|i| reference(&i.h, &synth.output_norm, &synth.output, eps))
        .collect();
    // Raw logits: the log-softmax of every row equals the reference.
    let flat: Vec<f32> = inputs.iter().flat_map(|i| i.h.iter().copied()).collect();
    let logits = lens.logits(&flat).unwrap();
    let v = lens.n_vocab();
    for (k, r) in refs.iter().enumerate() {
        let z = &logits[k * v..(k + 1) * v];
        let m = z.iter().copied().fold(f32::MIN, f32::max) as f64;
        let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        for (t, (&zi, &ri)) in z.iter().zip(r.iter()).enumerate() {
            let d = (zi as f64 - lse - ri).abs();
            assert!(d < TOL, "row {k} token {t}: {} vs {ri}", zi as f64 - lse);
        }
    }
    // The statistics of every cell.
    let tokens: Vec<i32> = {
        let mut t: Vec<_> = c.tokens.iter().collect();
        t.sort_by_key(|t| t.pos);
        t.iter().map(|t| t.token).collect()
    };
    let target = |_: i32, pos: i32| tokens.get(pos as usize + 1).copied();
    let borrowed: Vec<LensInput> = inputs.iter().map(OwnedInput::as_input).collect();
    let rows = lens.compute(&borrowed, &layers, 5, &target).unwrap();
    let n_pos = tokens.len() - 1; // the last sampled token is never decoded
    assert_eq!(rows.len(), n_pos);
    let mut kls = 0;
    for r in &rows {
        let find = |l: usize| {
            inputs
                .iter()
                .position(|i| i.layer == l && i.pos == r.pos)
                .map(|k| &refs[k])
        };
        let fin = find(2);
        for (l, cell) in layers.iter().zip(&r.cells) {
            let Some(want) = find(*l) else {
                assert!(cell.is_none());
                continue;
            };
            let cell = cell.as_ref().expect("a cell where the layer has a row");
            let mut order: Vec<usize> = (0..want.len()).collect();
            order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
            for (j, &(id, lp)) in cell.top.iter().enumerate() {
                assert_eq!(id as usize, order[j], "pos {} layer {l} top {j}", r.pos);
                assert!((lp as f64 - want[order[j]]).abs() < TOL);
            }
            let h: f64 = -want.iter().map(|&x| x.exp() * x).sum::<f64>();
            assert!(
                (cell.entropy as f64 - h).abs() < TOL,
                "entropy {} vs {h}",
                cell.entropy
            );
            let t = r.target.expect("every decoded row has a next token") as usize;
            assert!((cell.target_logprob.unwrap() as f64 - want[t]).abs() < TOL);
            let rank = want.iter().filter(|&&x| x > want[t]).count() as u32;
            assert_eq!(cell.target_rank, Some(rank));
            match fin {
                Some(f) => {
                    let kl: f64 = f
                        .iter()
                        .zip(want.iter())
                        .map(|(&p, &q)| p.exp() * (p - q))
                        .sum();
                    assert!(
                        (cell.kl.unwrap() as f64 - kl).abs() < TOL,
                        "kl {:?} vs {kl}",
                        cell.kl
                    );
                    kls += 1;
                }
                None => assert_eq!(cell.kl, None),
            }
        }
    }
    // Rows with an output (the last prompt row and each generated row) have a KL.
    assert!(kls >= 3 * 3, "{kls} cells with a KL");
}

#[test]
fn translators_apply_h_plus_ah_plus_b() {
    let (dir, synth, path, model) = synth_fixture();
    let c = capture(&model, "l_out-*", "ab", 1);
    let e = synth.cfg.n_embd;
    let a: Vec<f32> = (0..e * e).map(|k| ((k % 7) as f32 - 3.0) * 0.01).collect();
    let b: Vec<f32> = (0..e).map(|k| (k % 5) as f32 * 0.1).collect();
    let tpath = dir.path().join("t.safetensors");
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (ab, bb) = (bytes(&a), bytes(&b));
    let views = vec![
        (
            "layers.1.weight".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![e, e], &ab).unwrap(),
        ),
        (
            "layers.1.bias".to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![e], &bb).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, &None, &tpath).unwrap();
    let mut lens = Lens::open(&path, 1).unwrap();
    lens.load_translators(&tpath).unwrap();
    assert_eq!(lens.translated_layers(), vec![1]);
    let inputs = inputs_from_collected(&c, e).unwrap();
    let one = inputs.iter().find(|i| i.layer == 1).unwrap();
    let mut t = one.h.clone();
    for (i, out) in t.iter_mut().enumerate() {
        *out += (0..e).map(|j| a[i * e + j] * one.h[j]).sum::<f32>() + b[i];
    }
    let want = reference(&t, &synth.output_norm, &synth.output, synth.cfg.rms_eps);
    let rows = lens
        .compute(&[one.as_input()], &[1], 3, &|_, _| Some(5))
        .unwrap();
    let cell = rows[0].cells[0].as_ref().unwrap();
    assert!((cell.target_logprob.unwrap() as f64 - want[5]).abs() < TOL);
    // Wrong shapes are refused with the tensor's name.
    let bad = vec![(
        "layers.0.weight".to_string(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![e], &bb).unwrap(),
    )];
    safetensors::serialize_to_file(bad, &None, &tpath).unwrap();
    let err = lens.load_translators(&tpath).unwrap_err();
    assert!(
        err.message().contains("'layers.0.weight' has shape [64]"),
        "{err}"
    );
}

#[test]
fn real_model_last_layer_equals_llama_logits() {
    let Some(path) = common::real_model() else {
        return;
    };
    let model = Model::load(&path, &ModelOptions::default()).unwrap();
    let n_layer = model.n_layer();
    let last = format!("l_out-{}", n_layer - 1);
    let c = capture(&model, &last, "The capital of France is", 4);
    let lens = Lens::for_model(&model, 2).unwrap();
    let inputs = inputs_from_collected(&c, lens.n_embd()).unwrap();
    let borrowed: Vec<LensInput> = inputs.iter().map(OwnedInput::as_input).collect();
    let rows = lens
        .compute(&borrowed, &[n_layer - 1], 10, &|_, _| None)
        .unwrap();
    let mut checked = 0;
    for t in c.tokens.iter().filter(|t| !t.prompt) {
        let Some(row) = rows.iter().find(|r| r.pos == t.pos - 1) else {
            continue;
        };
        let cell = row.cells[0].as_ref().unwrap();
        let top = t.top.as_ref().unwrap();
        let ids: Vec<i32> = top.iter().map(|e| e.0).collect();
        let got: Vec<i32> = cell.top.iter().map(|e| e.0).collect();
        assert_eq!(got, ids, "pos {}: lens top-10 vs llama.cpp's", row.pos);
        for (a, b) in cell.top.iter().zip(top) {
            assert!(
                (a.1 - b.1).abs() < 1e-3,
                "pos {}: {} vs {}",
                row.pos,
                a.1,
                b.1
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 4, "every generated token compared");
}

#[test]
fn bad_rows_layers_and_top_k_are_errors() {
    let (_dir, _synth, path, _model) = synth_fixture();
    let lens = Lens::open(&path, 1).unwrap();
    let h = vec![0.5f32; 64];
    let ok = LensInput {
        layer: 0,
        seq: 0,
        pos: 3,
        step: 0,
        h: &h,
    };
    let none = |_: i32, _: i32| None;
    let msg = |r: latent_tap::Result<Vec<latent_tap::lens::LensRow>>| r.unwrap_err().to_string();
    let e = msg(lens.compute(&[ok], &[7], 5, &none));
    assert!(e.contains("lens layer 7 does not exist"), "{e}");
    let e = msg(lens.compute(&[LensInput { layer: 9, ..ok }], &[0], 5, &none));
    assert!(e.contains("layer 9"), "{e}");
    let short = vec![0.5f32; 63];
    let e = msg(lens.compute(&[LensInput { h: &short, ..ok }], &[0], 5, &none));
    assert!(e.contains("has width 63, not n_embd 64"), "{e}");
    for k in [0, 21] {
        let e = msg(lens.compute(&[ok], &[0], k, &none));
        assert!(
            e.contains(&format!("lens top_k {k} is out of range 1..=20")),
            "{e}"
        );
    }
    let nan = vec![f32::NAN; 64];
    let e = msg(lens.compute(&[LensInput { h: &nan, ..ok }], &[0], 5, &none));
    assert!(e.contains("non-finite"), "{e}");
    // The raw projection refuses partial rows too.
    assert!(lens.logits(&short).is_err());
    assert_eq!(lens.compute(&[ok], &[0], 5, &none).unwrap().len(), 1);
}

/// A GGUF v3 file with the given metadata and tensors (data as given).
fn write_gguf(path: &Path, kv: &[(&str, Kv)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) {
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        s(&mut b, k);
        match v {
            Kv::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Kv::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Kv::Str(x) => {
                b.extend(8u32.to_le_bytes());
                s(&mut b, x);
            }
        }
    }
    let mut off = 0u64;
    for (name, ne, ty, data) in tensors {
        s(&mut b, name);
        b.extend((ne.len() as u32).to_le_bytes());
        for n in ne {
            b.extend(n.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
        off += (data.len() as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        b.extend(data);
        while b.len() % 32 != 0 {
            b.push(0);
        }
    }
    std::fs::write(path, b).unwrap();
}

enum Kv {
    U32(u32),
    F32(f32),
    Str(&'static str),
}

#[test]
fn models_without_usable_output_tensors_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let (e, v) = (32u64, 10u64);
    let f32s = |n: u64, x: f32| {
        (0..n)
            .flat_map(|i| (x + i as f32 * 0.01).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let meta = |eps: bool| {
        let mut kv = vec![
            ("general.architecture", Kv::Str("llama")),
            ("llama.embedding_length", Kv::U32(e as u32)),
            ("llama.block_count", Kv::U32(2)),
            ("llama.attention.head_count", Kv::U32(4)),
        ];
        if eps {
            kv.push(("llama.attention.layer_norm_rms_epsilon", Kv::F32(1e-5)));
        }
        kv
    };
    let norm = ("output_norm.weight", vec![e], 0u32, f32s(e, 1.0));
    let err = |kv: &[(&str, Kv)], t: &[(&str, Vec<u64>, u32, Vec<u8>)]| {
        write_gguf(&p, kv, t);
        Lens::open(&p, 1).unwrap_err().to_string()
    };
    let tied = ("token_embd.weight", vec![e, v], 0u32, f32s(e * v, -0.1));
    let m = err(&meta(true), std::slice::from_ref(&tied));
    assert!(m.contains("no output_norm.weight"), "{m}");
    let m = err(&meta(true), std::slice::from_ref(&norm));
    assert!(
        m.contains("neither output.weight nor token_embd.weight"),
        "{m}"
    );
    let m = err(&meta(false), &[norm.clone(), tied.clone()]);
    assert!(
        m.contains("no llama.attention.layer_norm_rms_epsilon"),
        "{m}"
    );
    // I32 has no dot product in ggml's CPU backend: refused before ggml asserts.
    let ints = (
        "output.weight",
        vec![e, v],
        26u32,
        vec![0u8; (e * v * 4) as usize],
    );
    let m = err(&meta(true), &[norm.clone(), ints]);
    assert!(
        m.contains("output.weight is i32, a type ggml's CPU backend cannot multiply"),
        "{m}"
    );
    let wide = (
        "output.weight",
        vec![e + 1, v],
        0u32,
        f32s((e + 1) * v, 0.0),
    );
    let m = err(&meta(true), &[norm.clone(), wide]);
    assert!(m.contains("output.weight has shape"), "{m}");
    // The tied embedding is used when output.weight is absent.
    write_gguf(&p, &meta(true), &[norm.clone(), tied.clone()]);
    let lens = Lens::open(&p, 1).unwrap();
    assert_eq!((lens.n_embd(), lens.n_vocab()), (32, 10));
    let h: Vec<f32> = (0..e).map(|i| (i as f32).sin()).collect();
    let raw = |b: &[u8]| {
        b.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<f32>>()
    };
    let want = reference(&h, &raw(&norm.3), &raw(&tied.3), 1e-5);
    let z = lens.logits(&h).unwrap();
    let m = z.iter().copied().fold(f32::MIN, f32::max) as f64;
    let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    for (a, b) in z.iter().zip(want.iter()) {
        assert!((*a as f64 - lse - b).abs() < TOL);
    }
}

/// `latent-tap CMD… -m MODEL ARGS… --out DIR` fails with `needle` in its
/// error and leaves no manifest or lens file in DIR.
fn refused(cmd: &[&str], model: &Path, args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad");
    let o = common::bin()
        .args(cmd)
        .arg("-m")
        .arg(model)
        .args(args)
        .arg("--out")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains(needle),
        "{args:?}: {err}"
    );
    assert!(!bad.join("manifest.json").exists() && !bad.join("lens.jsonl").exists());
}

#[test]
fn cli_writes_jsonl_safetensors_html_png_and_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_model(dir.path());
    let out = dir.path().join("out");
    let o = common::bin()
        .args([
            "lens", "-t", "1", "-p", "hi there", "-n", "3", "--top-k", "4", "--layers", "0,2", "-m",
        ])
        .arg(&m)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.starts_with(" pos token"), "{stdout}");
    assert!(stdout.contains("L0") && stdout.contains("L2"), "{stdout}");
    // BOS + 8 bytes: 9 prompt rows, 2 decoded tokens; the final layer has a row
    // at the last prompt position and after: 11 + 3 cells.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("lens.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 11 + 3);
    assert!(lines
        .iter()
        .all(|l| l["top"].as_array().unwrap().len() == 4));
    let bytes = std::fs::read(out.join("lens.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("top_ids").unwrap().shape(), &[11 * 2, 4]);
    assert_eq!(st.tensor("entropy").unwrap().shape(), &[11, 2]);
    let present = st.tensor("present").unwrap().data().to_vec();
    assert_eq!(present.iter().filter(|&&p| p == 1).count(), 14);
    let html = std::fs::read_to_string(out.join("lens.html")).unwrap();
    assert!(html.contains("id=\"lens-data\""));
    assert!(std::fs::read(out.join("lens.png"))
        .unwrap()
        .starts_with(b"\x89PNG"));
    // Bad values: clear errors, nothing written.
    for (args, needle) in [
        (vec!["--top-k", "0"], "lens top_k 0 is out of range 1..=20"),
        (vec!["--layers", "7"], "lens layer 7 does not exist"),
        (vec!["--target", "hello"], "--target 'hello' is 5 tokens"),
    ] {
        refused(
            &["lens", "-t", "1", "-p", "x", "-n", "1"],
            &m,
            &args,
            needle,
        );
    }
}

fn jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn capture_lens_adds_the_lens_to_a_capture() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_model(dir.path());
    // One prompt: the same lens as the `lens` command's.
    let (by_lens, by_capture) = (dir.path().join("l"), dir.path().join("c"));
    let o = common::bin()
        .args([
            "lens", "-t", "1", "-p", "hi there", "-n", "3", "--top-k", "4", "--layers", "0,2", "-m",
        ])
        .arg(&m)
        .arg("--out")
        .arg(&by_lens)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = common::bin()
        .args([
            "capture",
            "-q",
            "-t",
            "1",
            "-p",
            "hi there",
            "-n",
            "3",
            "--lens",
            "0,2",
            "--lens-top-k",
            "4",
            "-m",
        ])
        .arg(&m)
        .arg("--out")
        .arg(&by_capture)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (
        jsonl(&by_lens.join("lens.jsonl")),
        jsonl(&by_capture.join("lens.jsonl")),
    );
    assert_eq!(a.len(), 14);
    assert_eq!(a, b);
    assert_eq!(
        std::fs::read(by_lens.join("lens.safetensors"))
            .unwrap()
            .len(),
        std::fs::read(by_capture.join("lens.safetensors"))
            .unwrap()
            .len()
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(by_capture.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["lens"]["layers"], serde_json::json!([0, 2]));
    assert_eq!(manifest["lens"]["rows"], 11);
    // Two prompts: each row is scored against the next token of its own sequence.
    let two = dir.path().join("two");
    let o = common::bin()
        .args([
            "capture", "-q", "-t", "1", "-p", "abc", "-p", "xyz!", "-n", "2", "--lens", "-m",
        ])
        .arg(&m)
        .arg("--out")
        .arg(&two)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let toks = jsonl(&two.join("tokens.jsonl"));
    let token_at = |seq: i64, pos: i64| {
        toks.iter()
            .find(|t| t["seq"] == seq && t["pos"] == pos)
            .map(|t| t["token"].as_i64().unwrap())
    };
    let lens = jsonl(&two.join("lens.jsonl"));
    let seqs: std::collections::BTreeSet<i64> =
        lens.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    let mut scored = 0;
    for l in &lens {
        let (seq, pos) = (l["seq"].as_i64().unwrap(), l["pos"].as_i64().unwrap());
        assert_eq!(l["target"].as_i64(), token_at(seq, pos + 1), "{l}");
        scored += usize::from(l["target"].is_i64());
    }
    assert!(scored > 0);
    // Bad settings: one clear error each, nothing written.
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"text\": \"a\"}\n").unwrap();
    for (args, needle) in [
        (
            vec!["-p", "x", "--lens-top-k", "3"],
            "--lens-top-k needs --lens",
        ),
        (
            vec!["-p", "x", "--lens", "--lens-top-k", "0"],
            "--lens-top-k: lens top_k 0 is out of range",
        ),
        (
            vec!["-p", "x", "--lens", "9"],
            "lens layer 9 does not exist",
        ),
        (
            vec!["-p", "x", "--lens", "--lens-target", "hello"],
            "--lens-target 'hello' is 5 tokens",
        ),
        (
            vec!["-p", "x", "--lens", "--lens-target=-3"],
            "--lens-target -3 is out of range",
        ),
        (
            vec!["-p", "x", "--lens", "--tensors", "attn_norm-*"],
            "captures none of it",
        ),
        (
            vec!["--prompts", prompts.to_str().unwrap(), "--lens"],
            "--lens applies to capture with -p/-f only",
        ),
    ] {
        refused(&["capture", "-q", "-t", "1", "-n", "1"], &m, &args, needle);
    }
}
