//! Applying a steering vector (`capture --steer`, `Generator::new_edited`):
//! scale 0 changes nothing; the layers before the first steered one are
//! untouched and the first steered layer's rows gain exactly `scale × v`;
//! only the chosen positions and sequences are steered; the result equals
//! llama.cpp's own control vector (`llama_set_adapter_cvec`) on the synthetic
//! and the real model; bad flags give one clear error each and write nothing.

mod common;

use std::path::Path;
use std::sync::Arc;

use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::output::{collect, Collected};
use latent_tap::select::LayerFilter;
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator};
use latent_tap::steer::{ControlVector, Edits, Positions, Steer};

/// Deterministic directions for `layers`, each of unit length, `n_embd` wide.
fn vector(layers: impl IntoIterator<Item = usize>, n_embd: usize, hint: &str) -> ControlVector {
    let mut x = 0x2545_f491_u32;
    let directions = layers
        .into_iter()
        .map(|l| (l, common::unit_direction(&mut x, n_embd)))
        .collect();
    ControlVector {
        n_embd,
        model_hint: hint.into(),
        directions,
    }
}

fn ctx(n_seq: u32) -> ContextOptions {
    ContextOptions {
        n_ctx: 256,
        n_batch: 8,
        n_ubatch: 4,
        n_seq_max: n_seq,
        n_threads: Some(1),
        f32_kv: true,
        flash_attn: Some(false),
        ..Default::default()
    }
}

/// One run: capture `patterns` ("" for tokens only), steered by `steer` and/or
/// with llama.cpp's control vector `cvec` installed on the context.
fn run(
    model: &Arc<Model>,
    ctx: &ContextOptions,
    patterns: &str,
    prompts: &[Vec<i32>],
    n_predict: usize,
    steer: Option<&Steer>,
    cvec: Option<(&ControlVector, f32)>,
) -> Collected {
    let spec = CaptureSpec {
        patterns: vec![patterns.into()],
        ..Default::default()
    };
    let (mut gen, stream) =
        Generator::new_edited(model.clone(), ctx, &spec, &edits(steer)).unwrap();
    assert_eq!(gen.editing(), steer.is_some());
    gen.context_mut().set_control_vector(cvec).unwrap();
    let sel = gen.selection().to_vec();
    let consumer = std::thread::spawn(move || collect(stream, &sel, spec.dtype));
    let opts = GenerateOptions {
        n_predict,
        n_probs: 10,
        ..Default::default()
    };
    let stats = gen.run(prompts, &opts, &mut |_| {}).unwrap();
    let c = stats.counters;
    if patterns == "l_out-*"
        && steer.is_some()
        && latent_tap::capture::unavailable_reason().is_none()
    {
        // The steered layers go through the callback; the other captured ones
        // stay deferred.
        let mode = stats.capture_mode.unwrap();
        assert_eq!(mode.used, latent_tap::capture::CaptureMode::Deferred);
        assert!(c.deferred > 0 && c.frames > c.deferred, "{c:?}");
    }
    drop(gen);
    consumer.join().unwrap().unwrap()
}

/// The generated tokens: (seq, pos, id, logprob, top-k).
type Gen = Vec<(i32, i32, i32, f32, Vec<(i32, f32)>)>;

fn generated(c: &Collected) -> Gen {
    c.tokens
        .iter()
        .filter(|t| !t.prompt)
        .map(|t| {
            (
                t.seq,
                t.pos,
                t.token,
                t.logprob.unwrap(),
                t.top.clone().unwrap(),
            )
        })
        .collect()
}

/// Rows of `name` at decode step 0 (the prompt), keyed by (seq, pos).
fn prompt_rows(c: &Collected, name: &str) -> Vec<((i32, i32), Vec<f32>)> {
    let t = c.tensor(name).unwrap();
    let mut v: Vec<_> = (0..t.n_rows())
        .filter(|&i| t.step[i] == 0)
        .map(|i| ((t.seq[i], t.pos[i]), t.row_f32(i)))
        .collect();
    v.sort_by_key(|(k, _)| *k);
    v
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Same top-k ids, log-probabilities within `tol`; the largest difference.
fn same_logits(a: &Gen, b: &Gen, tol: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.0, x.1, x.2), (y.0, y.1, y.2), "token differs");
        let ids = |t: &[(i32, f32)]| t.iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(ids(&x.4), ids(&y.4), "top-k ids differ at pos {}", x.1);
        worst = worst.max((x.3 - y.3).abs());
        for (p, q) in x.4.iter().zip(&y.4) {
            worst = worst.max((p.1 - q.1).abs());
        }
    }
    assert!(worst <= tol, "log-probabilities differ by {worst}");
    worst
}

/// How far apart two runs' first generated distributions are (max |Δ logprob|
/// over the top-k of the first token): proof that a steer did something.
fn moved(a: &Gen, b: &Gen) -> f32 {
    a[0].4
        .iter()
        .zip(&b[0].4)
        .map(|(p, q)| {
            if p.0 == q.0 {
                (p.1 - q.1).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

fn fixture() -> (tempfile::TempDir, Arc<Model>, Vec<Vec<i32>>) {
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_layers(dir.path(), 6);
    let model = Model::load(&m, &ModelOptions::default()).unwrap();
    let prompts = vec![
        model.tokenize("the quick brown fox jumps", true).unwrap(),
        model
            .tokenize("over a lazy dog again and again", true)
            .unwrap(),
    ];
    assert!(prompts[0].len() > 5, "several ubatches of 4");
    (dir, model, prompts)
}

#[test]
fn scale_zero_is_bit_identical_to_no_steering() {
    let (_d, model, prompts) = fixture();
    let v = vector(1..6, model.n_embd(), "llama");
    let s = Steer::new(&v, 0.0, None, Positions::All, 6, model.n_embd()).unwrap();
    let c = ctx(2);
    let plain = run(&model, &c, "l_out-*", &prompts, 6, None, None);
    let zero = run(&model, &c, "l_out-*", &prompts, 6, Some(&s), None);
    assert_eq!(generated(&plain).len(), 12);
    assert_eq!(
        format!("{:?}", generated(&plain)),
        format!("{:?}", generated(&zero))
    );
    assert_eq!(plain.tensors.len(), 6);
    for (a, b) in plain.tensors.iter().zip(&zero.tensors) {
        assert_eq!((&a.name, &a.pos, &a.seq), (&b.name, &b.pos, &b.seq));
        assert!(a.data == b.data, "{} differs at scale 0", a.name);
    }
    // Tokens only, steered at scale 0: the same tokens.
    let tokens_only = run(&model, &c, "", &prompts, 6, Some(&s), None);
    assert_eq!(
        format!("{:?}", generated(&plain)),
        format!("{:?}", generated(&tokens_only))
    );
}

#[test]
fn steered_layer_gains_exactly_scale_times_v_and_earlier_layers_do_not_move() {
    let (_d, model, prompts) = fixture();
    let e = model.n_embd();
    let v = vector(1..6, e, "llama");
    let scale = 3.5f32;
    let layers = LayerFilter::parse("2..=3").unwrap();
    let s = Steer::new(&v, scale, Some(&layers), Positions::All, 6, e).unwrap();
    let c = ctx(2);
    let plain = run(&model, &c, "l_out-*", &prompts, 4, None, None);
    let steered = run(&model, &c, "l_out-*", &prompts, 4, Some(&s), None);
    // Layers 0 and 1 (before the first steered one): bit-identical at the prompt
    // step (later steps decode other tokens once the steer changed the first one).
    for name in ["l_out-0", "l_out-1"] {
        let (a, b) = (prompt_rows(&plain, name), prompt_rows(&steered, name));
        assert_eq!(a.len(), prompts[0].len() + prompts[1].len());
        assert!(a == b, "{name} moved, steering starts at layer 2");
    }
    // Layer 2 at the prompt step: every row is the unsteered row plus scale × v[2],
    // the sum rounded once in f32 (so equal to it bit for bit).
    let add: Vec<f32> = v.directions[&2].iter().map(|x| x * scale).collect();
    let (a, b) = (
        prompt_rows(&plain, "l_out-2"),
        prompt_rows(&steered, "l_out-2"),
    );
    assert_eq!(a.len(), prompts[0].len() + prompts[1].len());
    let mut worst = 0f64;
    for ((ka, ra), (kb, rb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        let want: Vec<f32> = ra.iter().zip(&add).map(|(x, y)| x + y).collect();
        assert_eq!(bits(rb), bits(&want), "row {ka:?} of l_out-2");
        for ((s, u), y) in rb.iter().zip(ra).zip(&add) {
            worst = worst.max((f64::from(*s) - f64::from(*u) - f64::from(*y)).abs());
        }
    }
    // |(steered − unsteered) − scale·v| in exact arithmetic: at most half an ulp of
    // the row values (one rounding); rows here are O(1).
    assert!(worst < 1e-6, "{worst}");
    // And the steer propagates: the last layer and the tokens' distributions move.
    assert!(moved(&generated(&plain), &generated(&steered)) > 1e-3);
}

#[test]
fn only_the_chosen_positions_and_sequences_are_steered() {
    let (_d, model, prompts) = fixture();
    let e = model.n_embd();
    let v = vector(1..6, e, "llama");
    let layers = LayerFilter::parse("2").unwrap();
    let c = ctx(2);
    let plain = run(&model, &c, "l_out-*", &prompts, 4, None, None);
    // Positions 2..4 only: at layer 2, rows 2 and 3 gain the vector, the rest are as before.
    let range = Positions::parse("2..4").unwrap();
    let s = Steer::new(&v, 2.0, Some(&layers), range, 6, e).unwrap();
    let steered = run(&model, &c, "l_out-*", &prompts, 4, Some(&s), None);
    let add: Vec<f32> = v.directions[&2].iter().map(|x| x * 2.0).collect();
    let (a, b) = (
        prompt_rows(&plain, "l_out-2"),
        prompt_rows(&steered, "l_out-2"),
    );
    let mut n_steered = 0;
    for ((k, ra), (_, rb)) in a.iter().zip(&b) {
        if (2..4).contains(&k.1) {
            let want: Vec<f32> = ra.iter().zip(&add).map(|(x, y)| x + y).collect();
            assert_eq!(bits(rb), bits(&want), "row {k:?}");
            n_steered += 1;
        } else {
            assert_eq!(bits(rb), bits(ra), "row {k:?} is outside 2..4");
        }
    }
    assert_eq!(n_steered, 4, "two rows in each of two sequences");

    // Generated rows only: the prompt step is untouched everywhere.
    let s = Steer::new(&v, 2.0, Some(&layers), Positions::Generated, 6, e).unwrap();
    let gen_only = run(&model, &c, "l_out-*", &prompts, 4, Some(&s), None);
    for l in 0..5 {
        let name = format!("l_out-{l}");
        let (a, b) = (prompt_rows(&plain, &name), prompt_rows(&gen_only, &name));
        assert!(a == b, "{name}: prompt rows moved with positions=generated");
    }
    assert_eq!(generated(&plain)[0], generated(&gen_only)[0]);

    // One sequence of the batch: the other's tokens and rows are bit-identical.
    let s = Steer {
        seqs: Some(vec![1]),
        ..Steer::new(&v, 4.0, None, Positions::All, 6, e).unwrap()
    };
    let one = run(&model, &c, "l_out-*", &prompts, 4, Some(&s), None);
    let of = |g: Gen, seq| g.into_iter().filter(|t| t.0 == seq).collect::<Gen>();
    assert_eq!(
        format!("{:?}", of(generated(&plain), 0)),
        format!("{:?}", of(generated(&one), 0))
    );
    for (a, b) in plain.tensors.iter().zip(&one.tensors) {
        for i in (0..a.n_rows()).filter(|&i| a.seq[i] == 0) {
            assert_eq!(bits(&a.row_f32(i)), bits(&b.row_f32(i)), "{} seq 0", a.name);
        }
    }
    assert!(moved(&of(generated(&plain), 1), &of(generated(&one), 1)) > 1e-3);
}

/// `--steer` on every row equals llama.cpp's control vector on every row.
fn matches_llama_cpp_control_vector(model: &Arc<Model>, prompts: &[Vec<i32>], scale: f32) {
    let (n_layer, e) = (model.n_layer(), model.n_embd());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v.gguf");
    vector(1..n_layer, e, &model.arch()).write(&file).unwrap();
    let v = ControlVector::read(&file).unwrap();
    let s = Steer::new(&v, scale, None, Positions::All, n_layer, e).unwrap();
    let c = ContextOptions {
        n_seq_max: prompts.len() as u32,
        ..ctx(1)
    };
    let plain = generated(&run(model, &c, "", prompts, 8, None, None));
    let ours = generated(&run(model, &c, "", prompts, 8, Some(&s), None));
    let theirs = generated(&run(model, &c, "", prompts, 8, None, Some((&v, scale))));
    let worst = same_logits(&ours, &theirs, 1e-4);
    let effect = moved(&plain, &ours);
    eprintln!(
        "{}: steer vs llama_set_adapter_cvec at scale {scale}: largest |Δ logprob| {worst:e}; vs unsteered {effect}",
        model.arch()
    );
    assert!(effect > 1e-2, "the vector changed nothing ({effect})");
}

#[test]
fn steering_equals_llama_cpp_control_vectors_on_the_synthetic_model() {
    let (_d, model, prompts) = fixture();
    matches_llama_cpp_control_vector(&model, &prompts, 4.0);
}

#[test]
fn steering_equals_llama_cpp_control_vectors_on_the_real_model() {
    let Some(m) = common::real_model() else {
        return;
    };
    let model = Model::load(&m, &ModelOptions::default()).unwrap();
    let prompts = vec![model.tokenize("The capital of France is", true).unwrap()];
    // The residual rows of this model have norms near 3·10⁴: a small scale does nothing.
    matches_llama_cpp_control_vector(&model, &prompts, 4000.0);
}

/// `capture -m M -p P -n 3 -t 1 --out OUT ARGS…`.
fn capture(m: &Path, out: &Path, args: &[&str]) -> std::process::Output {
    common::bin()
        .args([
            "capture",
            "-q",
            "-t",
            "1",
            "-n",
            "3",
            "-c",
            "256",
            "-p",
            "the quick brown fox",
            "-m",
        ])
        .arg(m)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_steers_records_what_it_applied_and_refuses_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_layers(dir.path(), 6);
    let e = 64;
    let good = dir.path().join("v.gguf");
    vector(1..6, e, "llama").write(&good).unwrap();
    let some = dir.path().join("some.gguf");
    vector([1, 2], e, "llama").write(&some).unwrap();
    let wide = dir.path().join("wide.gguf");
    vector(1..6, e + 1, "llama").write(&wide).unwrap();
    let deep = dir.path().join("deep.gguf");
    vector(1..7, e, "llama").write(&deep).unwrap();
    let (g, w, d, so) = (
        good.to_str().unwrap(),
        wide.to_str().unwrap(),
        deep.to_str().unwrap(),
        some.to_str().unwrap(),
    );

    // A steered run, tokens only (no --tensors): it works and says what it applied.
    let plain_dir = dir.path().join("plain");
    let o = capture(&m, &plain_dir, &["--tensors", ""]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("steered");
    let arg = format!("{g}:2.5");
    let o = capture(
        &m,
        &out,
        &[
            "--tensors",
            "",
            "--steer",
            &arg,
            "--steer-layers",
            "2..=3",
            "--steer-positions",
            "generated",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let st = &man["steer"];
    assert_eq!(st["file"], g);
    assert_eq!(st["scale"], 2.5);
    assert_eq!(st["layers"], serde_json::json!([2, 3]));
    assert_eq!(st["positions"], "generated");
    assert_eq!(st["tensors"], serde_json::json!(["l_out-2", "l_out-3"]));
    let n2 = st["vector_norm"]["2"].as_f64().unwrap();
    assert!((n2 - 1.0).abs() < 1e-6, "{n2}");
    let unsteered: serde_json::Value =
        serde_json::from_slice(&std::fs::read(plain_dir.join("manifest.json")).unwrap()).unwrap();
    assert!(unsteered["steer"].is_null());
    // Positions "generated": the first token comes from the unsteered prompt.
    let (tp, ts) = (common::tokens(&plain_dir), common::tokens(&out));
    let first = |t: &[serde_json::Value]| {
        t.iter()
            .find(|x| x["prompt"] == false)
            .map(|x| x["top"].clone())
    };
    assert_eq!(first(&tp), first(&ts));

    // With tensors: the steered layer's rows are captured after the add.
    let o = capture(
        &m,
        &dir.path().join("with"),
        &["--tensors", "l_out-*", "--steer", g],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Bad input: one clear error each, naming the value; nothing written.
    let missing = dir.path().join("missing.gguf");
    let missing = missing.to_str().unwrap();
    let nan = format!("{g}:nan");
    let inf = format!("{g}:inf");
    let word = format!("{g}:loud");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (vec!["--steer", w], format!("--steer {w}: its directions are 65 wide but the model's n_embd is 64")),
        (vec!["--steer", d], format!("--steer {d}: it has direction.6 but the model has 6 layers")),
        (vec!["--steer", &nan], format!("--steer {nan}: scale NaN is not a finite number")),
        (vec!["--steer", &inf], format!("--steer {inf}: scale inf is not a finite number")),
        (vec!["--steer", &word], "the scale 'loud' is not a number".into()),
        (vec!["--steer", missing], format!("cannot open control vector {missing}")),
        (vec!["--steer", g, "--steer-layers", "0"], "--steer-layers 0: layer 0 cannot be steered".into()),
        (vec!["--steer", g, "--steer-layers", "4..=9"], "--steer-layers 4..=9: layer 9 cannot be steered: the model's steerable layers are 1..=5".into()),
        (vec!["--steer", g, "--steer-layers", "x"], "--steer-layers x: bad layer filter 'x'".into()),
        (vec!["--steer", so, "--steer-layers", "2..=3"], "--steer-layers 2..=3: layer 3: the vector has no direction.3 (it has layers 1..=2)".into()),
        (vec!["--steer", g, "--steer-positions", "5..2"], "--steer-positions 5..2: positions '5..2'".into()),
        (vec!["--steer", g, "--steer-positions", "middle"], "--steer-positions middle: positions 'middle'".into()),
        (vec!["--steer", g, "--steer-positions", "300..400"], "--steer-positions 300..400: positions 300..400 start outside the context of 256".into()),
        (vec!["--steer-layers", "2"], "--steer-layers needs --steer".into()),
        (vec!["--steer-positions", "all"], "--steer-positions needs --steer".into()),
        (vec!["--steer-tensor", "attn_out"], "--steer-tensor needs --steer".into()),
        (vec!["--steer", g, "--steer-tensor", "a b"], "--steer-tensor: tensor 'a b' is not a node family".into()),
        (vec!["--steer", g, "--steer-tensor", "ffn_up"], "'ffn_up-1' cannot be edited: only F32 nodes with one row of n_embd = 64".into()),
        (vec!["--steer", g, "--steer-tensor", "nope"], "the model's graph has no node 'nope-1' to edit".into()),
    ];
    for (args, needle) in cases {
        let bad = dir.path().join("bad");
        let o = capture(&m, &bad, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("error: ") && err.contains(&needle),
            "{args:?}: want {needle:?}, got {err}"
        );
        assert!(!bad.exists(), "{args:?}: {} was written", bad.display());
    }
}

/// The edits of one optional steer.
fn edits(steer: Option<&Steer>) -> Edits {
    Edits {
        steers: steer.into_iter().cloned().collect(),
        patches: Vec::new(),
    }
}

#[test]
fn a_steer_of_another_node_family_adds_to_its_rows() {
    let (_d, model, prompts) = fixture();
    let e = model.n_embd();
    let v = vector(1..6, e, "llama");
    let two = LayerFilter::parse("2").unwrap();
    let s = Steer::new(&v, 3.0, Some(&two), Positions::All, 6, e)
        .unwrap()
        .on("attn_out")
        .unwrap();
    let c = ctx(2);
    let plain = run(&model, &c, "attn_out-*,l_out-*", &prompts, 3, None, None);
    let steered = run(
        &model,
        &c,
        "attn_out-*,l_out-*",
        &prompts,
        3,
        Some(&s),
        None,
    );
    for name in ["attn_out-0", "attn_out-1", "l_out-0", "l_out-1"] {
        assert!(
            prompt_rows(&plain, name) == prompt_rows(&steered, name),
            "{name}: before the steered node"
        );
    }
    let add: Vec<f32> = v.directions[&2].iter().map(|x| x * 3.0).collect();
    let (a, b) = (
        prompt_rows(&plain, "attn_out-2"),
        prompt_rows(&steered, "attn_out-2"),
    );
    assert_eq!(a.len(), b.len());
    for ((k, x), (_, y)) in a.iter().zip(&b) {
        let want: Vec<f32> = x.iter().zip(&add).map(|(p, q)| p + q).collect();
        assert_eq!(bits(y), bits(&want), "attn_out-2 {k:?} = unsteered + 3v");
    }
    assert!(prompt_rows(&plain, "l_out-2") != prompt_rows(&steered, "l_out-2"));
    assert!(moved(&generated(&plain), &generated(&steered)) > 0.0);
}
