//! Activation patching from the CLI (`capture --patch … --patch-from RUN`):
//! a patched row equals the source row bit for bit, rows the patch cannot
//! reach are untouched, patching every prompt row of a layer makes every later
//! layer equal the source run's, any node computed once with `n_embd`-wide
//! rows can be patched (`attn_out-N`), and bad flags give one clear error each
//! with nothing written.

mod common;

use std::path::Path;

use latent_tap::output::{read_rows, StoredRows};
use latent_tap::synth::{SynthConfig, SynthModel};

// Two prompts of the same token count (the synthetic tokenizer is per byte).
const SOURCE: &str = "the quick brown fox";
const TARGET: &str = "a lazy yellow dogs!";

/// `capture -t 1 -n 3 -m MODEL -p PROMPT --tensors PATTERN ARGS… -o OUT`.
fn capture(
    m: &Path,
    prompt: &str,
    pattern: &str,
    args: &[&str],
    out: &Path,
) -> std::process::Output {
    common::bin()
        .args(["capture", "-q", "-t", "1", "-n", "3", "-m"])
        .arg(m)
        .args(["-p", prompt, "--tensors", pattern])
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap()
}

fn ok(o: std::process::Output) -> std::process::Output {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

const N_LAYER: usize = 5;

fn rows(dir: &Path, tensor: &str) -> StoredRows {
    read_rows(&dir.join("latents.safetensors"), tensor).unwrap()
}

fn at(r: &StoredRows, pos: i32) -> Vec<f32> {
    r.row(0, pos)
        .unwrap_or_else(|| panic!("no row at {pos}"))
        .to_vec()
}

fn token_ids(dir: &Path) -> Vec<i64> {
    common::tokens(dir)
        .iter()
        .map(|t| t["token"].as_i64().unwrap())
        .collect()
}

#[test]
fn patched_rows_equal_the_source_and_nothing_else_moves() {
    let d = tempfile::tempdir().unwrap();
    let m = common::synth_layers(d.path(), N_LAYER);
    let (src, base) = (d.path().join("src"), d.path().join("base"));
    ok(capture(&m, SOURCE, "l_out-*,attn_out-*", &[], &src));
    ok(capture(&m, TARGET, "l_out-*,attn_out-*", &[], &base));
    let n_prompt = common::tokens(&src)
        .iter()
        .filter(|t| t["prompt"] == true)
        .count() as i32;
    assert_eq!(
        n_prompt,
        common::tokens(&base)
            .iter()
            .filter(|t| t["prompt"] == true)
            .count() as i32
    );
    let n_layer = N_LAYER;

    // One row: l_out-1 at position 2.
    let one = d.path().join("one");
    let from = src.to_str().unwrap();
    ok(capture(
        &m,
        TARGET,
        "l_out-*",
        &["--patch", "l_out-1:2", "--patch-from", from],
        &one,
    ));
    assert_eq!(
        at(&rows(&one, "l_out-1"), 2),
        at(&rows(&src, "l_out-1"), 2),
        "the patched row"
    );
    assert_ne!(
        at(&rows(&base, "l_out-1"), 2),
        at(&rows(&src, "l_out-1"), 2)
    );
    for p in (0..n_prompt).filter(|&p| p != 2) {
        assert_eq!(
            at(&rows(&one, "l_out-1"), p),
            at(&rows(&base, "l_out-1"), p),
            "l_out-1 pos {p}"
        );
    }
    for p in 0..n_prompt {
        assert_eq!(
            at(&rows(&one, "l_out-0"), p),
            at(&rows(&base, "l_out-0"), p),
            "l_out-0 pos {p}"
        );
    }
    for p in 0..2 {
        assert_eq!(
            at(&rows(&one, "l_out-2"), p),
            at(&rows(&base, "l_out-2"), p),
            "earlier positions"
        );
    }
    assert_ne!(
        at(&rows(&one, "l_out-2"), 2),
        at(&rows(&base, "l_out-2"), 2)
    );
    assert_ne!(
        at(&rows(&one, "l_out-2"), 3),
        at(&rows(&base, "l_out-2"), 3),
        "later positions attend to it"
    );
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(one.join("manifest.json")).unwrap()).unwrap();
    let p = &man["patch"];
    assert_eq!(p["args"], serde_json::json!(["l_out-1:2"]));
    assert_eq!(p["rows"][0]["tensor"], "l_out-1");
    assert_eq!(p["rows"][0]["pos"], 2);
    assert_eq!(
        p["rows"][0]["source"],
        serde_json::json!({"tensor": "l_out-1", "pos": 2, "seq": 0})
    );
    let norm = at(&rows(&src, "l_out-1"), 2)
        .iter()
        .map(|&x| f64::from(x).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((p["rows"][0]["norm"].as_f64().unwrap() - norm).abs() < 1e-9 * norm);

    // Every prompt row of l_out-1: from then on the run is the source run's
    // (its prompt rows of later layers and its first sampled token).
    let all = d.path().join("all");
    let range = format!("l_out-1:0..{n_prompt}");
    ok(capture(
        &m,
        TARGET,
        "l_out-*",
        &["--patch", &range, "--patch-from", from],
        &all,
    ));
    for l in 1..n_layer - 1 {
        let name = format!("l_out-{l}");
        for p in 0..n_prompt {
            assert_eq!(
                at(&rows(&all, &name), p),
                at(&rows(&src, &name), p),
                "{name} pos {p}"
            );
        }
    }
    let (a, s) = (token_ids(&all), token_ids(&src));
    assert_eq!(
        a[n_prompt as usize], s[n_prompt as usize],
        "the first sampled token"
    );

    // Another position (=SRC_POS) and another tensor (=SRC_TENSOR:SRC_POS),
    // and a node other than l_out (attn_out-1), in one run.
    let mix = d.path().join("mix");
    ok(capture(
        &m,
        TARGET,
        "l_out-*,attn_out-*",
        &[
            "--patch",
            "l_out-1:2=4",
            "--patch",
            "l_out-2:1=l_out-3:0",
            "--patch",
            "attn_out-1:3",
            "--patch-from",
            from,
        ],
        &mix,
    ));
    assert_eq!(at(&rows(&mix, "l_out-1"), 2), at(&rows(&src, "l_out-1"), 4));
    assert_eq!(at(&rows(&mix, "l_out-2"), 1), at(&rows(&src, "l_out-3"), 0));
    assert_eq!(
        at(&rows(&mix, "attn_out-1"), 3),
        at(&rows(&src, "attn_out-1"), 3)
    );
    for p in 0..3 {
        assert_eq!(
            at(&rows(&mix, "attn_out-1"), p),
            at(&rows(&base, "attn_out-1"), p),
            "attn_out-1 pos {p}"
        );
    }
    // attn_out-1 at 3 changed, so l_out-1 at 3 (its residual sum) did too.
    assert_ne!(
        at(&rows(&mix, "l_out-1"), 3),
        at(&rows(&base, "l_out-1"), 3)
    );

    // A patch whose source row is the target's own changes nothing.
    let same = d.path().join("same");
    let bfrom = base.to_str().unwrap();
    ok(capture(
        &m,
        TARGET,
        "l_out-*",
        &["--patch", "l_out-2:0..4", "--patch-from", bfrom],
        &same,
    ));
    assert_eq!(token_ids(&same), token_ids(&base));
    for l in 0..n_layer {
        let name = format!("l_out-{l}");
        assert_eq!(rows(&same, &name).data, rows(&base, &name).data, "{name}");
    }
}

#[test]
fn bad_patch_flags_are_one_clear_error_each() {
    let d = tempfile::tempdir().unwrap();
    let m = common::synth_model(d.path());
    let src = d.path().join("src");
    ok(capture(&m, SOURCE, "l_out-1,l_out-2", &[], &src));
    let other = d.path().join("wide.gguf");
    SynthModel::random(SynthConfig {
        n_embd: 96,
        ..SynthConfig::default()
    })
    .write_gguf(&other)
    .unwrap();
    let wide = d.path().join("wide");
    ok(capture(&other, SOURCE, "l_out-1", &[], &wide));
    let from = src.to_str().unwrap().to_string();
    let file = src
        .join("latents.safetensors")
        .to_str()
        .unwrap()
        .to_string();
    let s = |x: &str| x.to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![s("--patch"), s("l_out-1:2")],
            "--patch needs --patch-from RUN",
        ),
        (
            vec![s("--patch-from"), from.clone()],
            "--patch-from needs at least one --patch",
        ),
        (
            vec![s("--patch"), s("l_out-1"), s("--patch-from"), from.clone()],
            "use TENSOR:POS",
        ),
        (
            vec![
                s("--patch"),
                s("l_out-1:x"),
                s("--patch-from"),
                from.clone(),
            ],
            "'x' is not a position",
        ),
        (
            vec![
                s("--patch"),
                s("l_out-1:0..2=1"),
                s("--patch-from"),
                from.clone(),
            ],
            "needs one position",
        ),
        (
            vec![
                s("--patch"),
                s("l_out-1:2"),
                s("--patch-from"),
                s("/nonexistent/run"),
            ],
            "no such file or directory",
        ),
        (
            vec![
                s("--patch"),
                s("l_out-1:2"),
                s("--patch-from"),
                d.path().to_str().unwrap().into(),
            ],
            "no latents.safetensors there",
        ),
        (
            vec![
                s("--patch"),
                s("l_out-0:2"),
                s("--patch-from"),
                from.clone(),
            ],
            "has no tensor 'l_out-0' (it has: l_out-1, l_out-2)",
        ),
        (
            vec![
                s("--patch"),
                s("l_out-1:2=l_out-9:0"),
                s("--patch-from"),
                file.clone(),
            ],
            "has no tensor 'l_out-9'",
        ),
        (
            vec![
                s("--patch"),
                s("l_out-1:60"),
                s("--patch-from"),
                from.clone(),
            ],
            "no l_out-1 row at position 60 in sequence 0",
        ),
        (
            vec![
                s("--patch"),
                s("l_out-1:2"),
                s("--patch-from"),
                wide.to_str().unwrap().into(),
            ],
            "are 96 wide but the model's n_embd is 64",
        ),
        (
            vec![
                s("--patch"),
                s("nope-1:2=l_out-1:2"),
                s("--patch-from"),
                from.clone(),
            ],
            "has no node 'nope-1'",
        ),
        (
            vec![
                s("--patch"),
                s("norm-1:2=l_out-1:2"),
                s("--patch-from"),
                from.clone(),
            ],
            "'norm-1' names more than one node",
        ),
        (
            vec![
                s("--patch"),
                s("ffn_up-1:2=l_out-1:2"),
                s("--patch-from"),
                from.clone(),
            ],
            "only F32 nodes with one row of n_embd = 64",
        ),
        (
            vec![
                s("--patch"),
                s("l_out-1:9000=2"),
                s("--patch-from"),
                from.clone(),
            ],
            "pos 9000 is outside",
        ),
    ];
    for (args, want) in &cases {
        let out = d.path().join("out");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = capture(&m, TARGET, "l_out-*", &args, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want '{want}' in: {err}");
        assert_eq!(err.matches("error:").count(), 1, "{err}");
        assert!(
            !out.join("manifest.json").exists(),
            "{args:?}: nothing written"
        );
    }
}

/// The rows of prompt `index` of `tensor` in a dataset run's one shard, by position.
fn dataset_rows(dir: &Path, tensor: &str, index: i64) -> Vec<(i32, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("latents-00000.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ints = |n: &str, w: usize| -> Vec<i64> {
        st.tensor(n)
            .unwrap()
            .data()
            .chunks_exact(w)
            .map(|c| {
                if w == 4 {
                    i32::from_le_bytes(c.try_into().unwrap()) as i64
                } else {
                    i64::from_le_bytes(c.try_into().unwrap())
                }
            })
            .collect()
    };
    let (pos, prompt) = (
        ints(&format!("{tensor}.pos"), 4),
        ints(&format!("{tensor}.prompt"), 8),
    );
    let data: Vec<f32> = st
        .tensor(tensor)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let w = data.len() / pos.len();
    let mut out: Vec<(i32, Vec<f32>)> = (0..pos.len())
        .filter(|&i| prompt[i] == index)
        .map(|i| (pos[i] as i32, data[i * w..(i + 1) * w].to_vec()))
        .collect();
    out.sort_by_key(|r| r.0);
    out
}

/// `capture -q -t 1 -n 2 --parallel 1 --tensors l_out-* -m MODEL --prompts FILE ARGS… -o OUT`.
fn dataset(m: &Path, prompts: &Path, args: &[&str], out: &Path) -> std::process::Output {
    common::bin()
        .args([
            "capture",
            "-q",
            "-t",
            "1",
            "-n",
            "2",
            "--parallel",
            "1",
            "--tensors",
            "l_out-*",
            "-m",
        ])
        .arg(m)
        .arg("--prompts")
        .arg(prompts)
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn dataset_capture_steers_and_patches_every_prompt_like_capture() {
    let d = tempfile::tempdir().unwrap();
    let m = common::synth_layers(d.path(), N_LAYER);
    let src = d.path().join("src");
    ok(capture(&m, SOURCE, "l_out-*", &[], &src));
    let v = d.path().join("v.gguf");
    let cv = latent_tap::steer::ControlVector::from_values(
        &(0..64)
            .map(|i| ((i % 5) as f32 - 2.0) * 0.1)
            .collect::<Vec<_>>(),
        N_LAYER,
        64,
    )
    .unwrap();
    cv.write(&v).unwrap();
    let prompts = ["hello there", "a lazy yellow dogs!", "one two three four"];
    let pf = d.path().join("prompts.txt");
    std::fs::write(&pf, prompts.join("\n") + "\n").unwrap();
    let vs = format!("{}:3", v.display());
    let edits = [
        "--steer",
        vs.as_str(),
        "--steer-layers",
        "2",
        "--patch",
        "l_out-1:1",
        "--patch-from",
        src.to_str().unwrap(),
    ];
    let run = d.path().join("run");
    ok(dataset(&m, &pf, &edits, &run));
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    let text = man.to_string();
    assert!(
        text.contains("\"steer\"") && text.contains("\"patch\""),
        "{text}"
    );
    for (i, p) in prompts.iter().enumerate() {
        let one = d.path().join(format!("one{i}"));
        let o = common::bin()
            .args([
                "capture",
                "-q",
                "-t",
                "1",
                "-n",
                "2",
                "--tensors",
                "l_out-*",
                "-m",
            ])
            .arg(&m)
            .args(["-p", p])
            .args(edits)
            .arg("-o")
            .arg(&one)
            .output()
            .unwrap();
        ok(o);
        for l in 0..N_LAYER - 1 {
            let name = format!("l_out-{l}");
            let want = rows(&one, &name);
            let got = dataset_rows(&run, &name, i as i64);
            assert!(!got.is_empty(), "{name} prompt {i}");
            for (pos, row) in &got {
                assert_eq!(
                    row.as_slice(),
                    want.row(0, *pos).unwrap(),
                    "{name} prompt {i} pos {pos}"
                );
            }
        }
        // The patch is there: l_out-1 at 1 is the source's.
        let got = dataset_rows(&run, "l_out-1", i as i64);
        assert_eq!(got[1].1, at(&rows(&src, "l_out-1"), 1), "prompt {i}");
    }
    // A resume with other edits is refused.
    let steer4 = format!("{}:4", v.display());
    let o = dataset(&m, &pf, &["--resume", "--steer", &steer4], &run);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("other settings (settings.patch, settings.steer)"),
        "{err}"
    );
}
