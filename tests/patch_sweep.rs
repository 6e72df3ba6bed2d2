//! `latent-tap patch-sweep` (causal tracing): with the clean prompt equal to
//! the corrupt one every cell is the baseline exactly; a cell equals an
//! independent `capture --patch TENSOR-L:p --patch-from CLEAN` run; patching
//! the last layer's row at the last position gives the clean run's
//! distribution exactly (and its other positions have no row); the picture is
//! a PNG of the expected size; bad input is one error each with nothing
//! written; on the real model the Eiffel/Colosseum trace restores " Paris" at
//! the subject position in an early layer and not in a late one.

mod common;

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use latent_tap::synth::N_VOCAB;

const N_LAYER: usize = 5;
// Same number of tokens (the synthetic tokenizer is per byte): BOS + 9.
const CLEAN: &str = "brown fox";
const CORRUPT: &str = "lazy dogs";

fn sweep(m: &Path, clean: &str, corrupt: &str, args: &[&str], out: &Path) -> Output {
    common::bin()
        .args(["patch-sweep", "-q", "-t", "1", "-m"])
        .arg(m)
        .args(["--clean", clean, "--corrupt", corrupt])
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn json(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("sweep.json")).unwrap()).unwrap()
}

/// `m[li][pi]` of matrix `key`.
fn cell<'a>(v: &'a Value, key: &str, li: usize, pi: usize) -> &'a Value {
    &v[key][li][pi]
}

#[test]
fn identical_prompts_give_the_baseline_in_every_cell() {
    let d = tempfile::tempdir().unwrap();
    let m = common::synth_layers(d.path(), N_LAYER);
    let out = d.path().join("same");
    let o = ok(sweep(&m, CLEAN, CLEAN, &[], &out));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("wrote"), "{stdout}");
    let v = json(&out);
    let layers: Vec<u64> = serde_json::from_value(v["layers"].clone()).unwrap();
    assert_eq!(layers, (0..N_LAYER as u64).collect::<Vec<_>>());
    let positions = v["positions"].as_array().unwrap().len();
    assert_eq!(positions, 10);
    assert_eq!(v["clean"]["tokens"].as_array().unwrap().len(), 10);
    assert_eq!(v["clean"]["tokens"][1]["piece"], "b");
    let base = &v["baselines"]["corrupt"];
    assert_eq!(v["baselines"]["clean"], *base);
    assert_eq!(v["target"]["id"], base["argmax"], "target: clean greedy");
    assert_eq!(v["complete"], true);
    let mut run = 0;
    for li in 0..N_LAYER {
        for pi in 0..positions {
            // The last layer keeps the last position's row only.
            if li == N_LAYER - 1 && pi + 1 < positions {
                assert!(cell(&v, "prob", li, pi).is_null(), "no row at {li},{pi}");
                continue;
            }
            run += 1;
            assert_eq!(*cell(&v, "logprob", li, pi), base["logprob"], "{li},{pi}");
            assert_eq!(*cell(&v, "prob", li, pi), base["prob"], "{li},{pi}");
            assert_eq!(*cell(&v, "argmax", li, pi), base["argmax"], "{li},{pi}");
        }
    }
    assert_eq!(v["cells"]["run"], run);
    assert_eq!(v["cells"]["no_row"], positions - 1);
}

/// The log-prob of `target` at the first generated token of a capture run.
fn first_logprob(dir: &Path, target: i64) -> f64 {
    let toks = common::tokens(dir);
    let first = toks.iter().find(|t| t["prompt"] == false).unwrap();
    first["top"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[0].as_i64() == Some(target))
        .unwrap_or_else(|| panic!("{target} not in the top list"))[1]
        .as_f64()
        .unwrap()
}

fn capture(m: &Path, prompt: &str, args: &[&str], out: &Path) -> Output {
    let k = N_VOCAB.to_string();
    common::bin()
        .args(["capture", "-q", "-t", "1", "-n", "1", "--top-k", &k, "-m"])
        .arg(m)
        .args(["-p", prompt, "--tensors", "l_out-*"])
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn a_cell_equals_a_capture_patched_there_and_the_last_layer_is_exact() {
    let d = tempfile::tempdir().unwrap();
    let m = common::synth_layers(d.path(), N_LAYER);
    let out = d.path().join("sweep");
    ok(sweep(&m, CLEAN, CORRUPT, &[], &out));
    let v = json(&out);
    let target = v["target"]["id"].as_i64().unwrap();
    let clean_run = d.path().join("clean");
    ok(capture(&m, CLEAN, &[], &clean_run));
    // The target is the clean run's greedy next token, and the baselines are
    // the unpatched runs' log-probs.
    let first = common::tokens(&clean_run)
        .into_iter()
        .find(|t| t["prompt"] == false)
        .unwrap();
    assert_eq!(first["token"].as_i64(), Some(target));
    let close = |a: f64, b: f64, what: &str| assert!((a - b).abs() < 1e-6, "{what}: {a} vs {b}");
    close(
        v["baselines"]["clean"]["logprob"].as_f64().unwrap(),
        first_logprob(&clean_run, target),
        "clean baseline",
    );
    let corrupt_run = d.path().join("corrupt");
    ok(capture(&m, CORRUPT, &[], &corrupt_run));
    close(
        v["baselines"]["corrupt"]["logprob"].as_f64().unwrap(),
        first_logprob(&corrupt_run, target),
        "corrupt baseline",
    );
    let from = clean_run.to_str().unwrap();
    for (l, p) in [(0usize, 1usize), (1, 3), (2, 9), (3, 5)] {
        let dir = d.path().join(format!("p{l}-{p}"));
        let patch = format!("l_out-{l}:{p}");
        ok(capture(
            &m,
            CORRUPT,
            &["--patch", &patch, "--patch-from", from],
            &dir,
        ));
        let want = first_logprob(&dir, target);
        close(cell(&v, "logprob", l, p).as_f64().unwrap(), want, &patch);
        let argmax = common::tokens(&dir)
            .into_iter()
            .find(|t| t["prompt"] == false)
            .unwrap()["token"]
            .clone();
        assert_eq!(*cell(&v, "argmax", l, p), argmax, "{patch}");
    }
    // The last layer: its last row is the clean run's, so is the distribution;
    // its other rows are not computed (no cell).
    let last = N_LAYER - 1;
    let clean = &v["baselines"]["clean"];
    assert_eq!(*cell(&v, "logprob", last, 9), clean["logprob"]);
    assert_eq!(*cell(&v, "argmax", last, 9), clean["argmax"]);
    assert_eq!(cell(&v, "restored", last, 9).as_f64(), Some(1.0));
    for p in 0..9 {
        assert!(cell(&v, "prob", last, p).is_null());
    }
    // Every run cell's probability is exp(log-prob).
    for li in 0..N_LAYER {
        for pi in 0..10 {
            if let Some(lp) = cell(&v, "logprob", li, pi).as_f64() {
                close(cell(&v, "prob", li, pi).as_f64().unwrap(), lp.exp(), "prob");
            }
        }
    }
}

#[test]
fn the_picture_is_a_png_of_the_grid_size() {
    let d = tempfile::tempdir().unwrap();
    let m = common::synth_layers(d.path(), N_LAYER);
    let out = d.path().join("pic");
    let o = ok(sweep(
        &m,
        CLEAN,
        CORRUPT,
        &["--layers", "1..=3", "--positions", "2..8", "--target", " "],
        &out,
    ));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().filter(|l| l.starts_with('L')).count(), 3);
    let v = json(&out);
    assert_eq!(v["layers"], serde_json::json!([1, 2, 3]));
    assert_eq!(v["positions"], serde_json::json!([2, 3, 4, 5, 6, 7]));
    assert_eq!(v["target"]["piece"], " ");
    assert_eq!(v["target"]["from"], "--target");
    let dec = png::Decoder::new(std::fs::File::open(out.join("sweep.png")).unwrap());
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(
        (info.width as usize, info.height as usize),
        latent_tap::view::heatmap_size(3, 6)
    );
    // 60 px of layer labels, 60 per column, 12 right (at least 420); title,
    // label line, 18 per layer, 72 below.
    assert_eq!((info.width, info.height), (432, 26 + 14 + 3 * 18 + 72));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    // A second sweep into the same directory is refused, and leaves it as it was.
    let before = std::fs::read(out.join("sweep.json")).unwrap();
    let o = sweep(&m, CLEAN, CORRUPT, &[], &out);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already holds a sweep"), "{err}");
    assert_eq!(std::fs::read(out.join("sweep.json")).unwrap(), before);
}

#[test]
fn bad_input_is_one_error_and_nothing_written() {
    let d = tempfile::tempdir().unwrap();
    let m = common::synth_layers(d.path(), N_LAYER);
    let cases: [(&str, &str, &[&str], &str); 9] = [
        (
            CLEAN,
            "lazy dog",
            &[],
            "--clean is 10 tokens but --corrupt is 9",
        ),
        (
            CLEAN,
            CORRUPT,
            &["--tensor", "nope"],
            "no patchable nope-L node",
        ),
        (CLEAN, CORRUPT, &["--tensor", "l out"], "not a node family"),
        (
            CLEAN,
            CORRUPT,
            &["--layers", "2..=7"],
            "layer 7 does not exist",
        ),
        (CLEAN, CORRUPT, &["--layers", "x"], "--layers"),
        (
            CLEAN,
            CORRUPT,
            &["--positions", "4..11"],
            "outside the prompt",
        ),
        (
            CLEAN,
            CORRUPT,
            &["--positions", "soon"],
            "--positions 'soon'",
        ),
        (
            CLEAN,
            CORRUPT,
            &["--target", "ab"],
            "--target 'ab' is 2 tokens",
        ),
        (
            CLEAN,
            CORRUPT,
            &["--target", "99999"],
            "--target 99999 is out of range",
        ),
    ];
    for (i, (clean, corrupt, args, want)) in cases.iter().enumerate() {
        let out = d.path().join(format!("bad{i}"));
        let o = sweep(&m, clean, corrupt, args, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.matches("error:").count(), 1, "{err}");
        assert!(o.stdout.is_empty(), "{args:?}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
    // The token counts' message names the tokens.
    let o = sweep(&m, CLEAN, "lazy dog", &[], &d.path().join("x"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("\"f\", \"o\", \"x\"]"), "{err}");
}

#[test]
fn real_model_eiffel_trace_restores_paris_early_not_late() {
    let Some(m) = common::real_model() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("eiffel");
    ok(sweep(
        &m,
        "The Eiffel Tower is located in the city of",
        "The Colosseum is located in the city of",
        &["--layers", "1,16", "--positions", "3"],
        &out,
    ));
    let v = json(&out);
    assert_eq!(v["target"]["piece"], " Paris");
    assert_eq!(v["baselines"]["clean"]["argmax_piece"], " Paris");
    assert_eq!(v["baselines"]["corrupt"]["argmax_piece"], " Rome");
    assert_eq!(v["positions"], serde_json::json!([3]));
    assert_eq!(
        *cell(&v, "argmax_piece", 0, 0),
        " Paris",
        "L1 at the subject"
    );
    assert_eq!(
        *cell(&v, "argmax_piece", 1, 0),
        " Rome",
        "L16 at the subject"
    );
    let (p1, p16) = (
        cell(&v, "prob", 0, 0).as_f64().unwrap(),
        cell(&v, "prob", 1, 0).as_f64().unwrap(),
    );
    assert!(p1 > p16, "{p1} vs {p16}");
}
