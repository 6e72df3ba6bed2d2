//! `steer-vector`: the control vector equals an independent computation of
//! cvector-generator's `mean` method from the same rows (synthetic model), is
//! written in llama.cpp's control-vector GGUF format, and bad input gives one
//! clear error each.

mod common;

use std::path::Path;
use std::sync::Arc;

use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::session::{CaptureSpec, GenerateOptions};
use latent_tap::steer::ControlVector;

/// Every `l_out-N` row of `tokens` (one prompt alone), by layer, in position order.
fn rows(model: &Arc<Model>, tokens: &[i32]) -> Vec<Vec<Vec<f32>>> {
    let spec = CaptureSpec {
        patterns: vec!["l_out-*".into()],
        ..Default::default()
    };
    let ctx = ContextOptions {
        n_ctx: 4096,
        n_threads: Some(1),
        ..Default::default()
    };
    let opts = GenerateOptions {
        n_predict: 1,
        ..Default::default()
    };
    let c = common::capture_run(model, &spec, &ctx, &[tokens.to_vec()], &opts);
    let mut by_layer = vec![Vec::new(); model.n_layer()];
    for t in &c.tensors {
        let l: usize = t.name.strip_prefix("l_out-").unwrap().parse().unwrap();
        let mut order: Vec<usize> = (0..t.n_rows()).collect();
        order.sort_by_key(|&i| t.pos[i]);
        by_layer[l] = order.iter().map(|&i| t.row_f32(i)).collect();
    }
    by_layer
}

/// `latent-tap steer-vector -t 1 -m MODEL --positive P --negative N ARGS… --out OUT`.
fn steer_vector(
    m: &Path,
    pos: &Path,
    neg: &Path,
    args: &[&str],
    out: &Path,
) -> std::process::Output {
    common::bin()
        .args(["steer-vector", "-t", "1", "-m"])
        .arg(m)
        .arg("--positive")
        .arg(pos)
        .arg("--negative")
        .arg(neg)
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn steer_vector_is_the_unit_mean_difference_in_llama_cpp_format() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_model(dir.path());
    let pos = dir.path().join("pos.txt");
    let neg = dir.path().join("neg.txt");
    // The second negative prompt is longer: its partner is padded. A blank line
    // is skipped; `\x41` is an escape for "A".
    std::fs::write(&pos, "good day\n\nvery nice\\x41\n").unwrap();
    std::fs::write(&neg, "bad day\nnot nice at all\n").unwrap();
    let out = dir.path().join("v.gguf");
    let o = steer_vector(&m, &pos, &neg, &[], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = ControlVector::read(&out).unwrap();

    // Independently: pad each pair with the token of " ", take the per-position
    // differences of l_out-L, drop all-zero rows, average, scale to unit
    // length; the direction from l_out-L is direction.(L+1).
    let model = Model::load(&m, &ModelOptions::default()).unwrap();
    let pad = *model.tokenize(" ", false).unwrap().last().unwrap();
    let n_layer = model.n_layer();
    let (e, mut sums, mut counts) = (
        model.n_embd(),
        vec![vec![0f64; model.n_embd()]; n_layer],
        vec![0u32; n_layer],
    );
    for (p, n) in [("good day", "bad day"), ("very niceA", "not nice at all")] {
        let (mut tp, mut tn) = (
            model.tokenize(p, true).unwrap(),
            model.tokenize(n, true).unwrap(),
        );
        let len = tp.len().max(tn.len());
        tp.resize(len, pad);
        tn.resize(len, pad);
        let (rp, rn) = (rows(&model, &tp), rows(&model, &tn));
        for l in 0..n_layer {
            if rp[l].len() != len {
                continue; // the last layer keeps the output row only
            }
            for (a, b) in rp[l].iter().zip(&rn[l]) {
                if a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6) {
                    continue;
                }
                for k in 0..e {
                    sums[l][k] += f64::from(a[k] - b[k]);
                }
                counts[l] += 1;
            }
        }
    }
    let expect: Vec<(usize, Vec<f64>)> = (0..n_layer)
        .filter(|&l| counts[l] > 0)
        .map(|l| {
            let mean: Vec<f64> = sums[l].iter().map(|s| s / f64::from(counts[l])).collect();
            let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
            (l + 1, mean.iter().map(|x| x / norm).collect())
        })
        .collect();
    assert_eq!(
        v.directions.keys().copied().collect::<Vec<_>>(),
        expect.iter().map(|(l, _)| *l).collect::<Vec<_>>()
    );
    assert_eq!(
        v.directions.len(),
        n_layer - 1,
        "every layer but the last makes one"
    );
    for (l, want) in &expect {
        let got = &v.directions[l];
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (f64::from(*g) - w).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "direction.{l} differs by {worst}");
    }
    assert_eq!((v.n_embd, v.model_hint.as_str()), (e, "llama"));
    let g = latent_tap::gguf::parse(
        std::fs::File::open(&out).unwrap(),
        std::fs::metadata(&out).unwrap().len(),
    )
    .unwrap();
    assert_eq!(
        g.get("general.architecture"),
        Some(&latent_tap::gguf::Value::Str(Some("controlvector".into())))
    );
    assert_eq!(
        g.get("controlvector.layer_count"),
        Some(&latent_tap::gguf::Value::Int((n_layer - 1) as i128))
    );

    // --layers keeps the directions of the layers it names.
    let some = dir.path().join("some.gguf");
    let o = steer_vector(&m, &pos, &neg, &["--layers", "2"], &some);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = ControlVector::read(&some).unwrap();
    assert_eq!(s.directions.keys().copied().collect::<Vec<_>>(), vec![2]);
    assert_eq!(s.directions[&2], v.directions[&2]);

    // Bad input: one clear error each, no file written.
    let one = dir.path().join("one.txt");
    std::fs::write(&one, "only one\n").unwrap();
    let blank = dir.path().join("blank.txt");
    std::fs::write(&blank, "\n \n").unwrap();
    let missing = dir.path().join("missing.txt");
    for (p, n, extra, needle) in [
        (
            &pos,
            &one,
            vec![],
            "--positive has 2 prompts and --negative 1",
        ),
        (&blank, &neg, vec![], "no prompts (one per line)"),
        (&missing, &neg, vec![], "cannot read it"),
        (
            &pos,
            &neg,
            vec!["--layers", "0"],
            "keeps none of the layers a direction can steer",
        ),
        (&one, &one, vec![], "identical rows: no direction"),
    ] {
        let bad = dir.path().join("bad.gguf");
        let o = steer_vector(&m, p, n, &extra, &bad);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{needle}: {err}"
        );
        assert!(!bad.exists(), "{needle}: a file was written");
    }
    let o = steer_vector(&m, &pos, &neg, &[], &dir.path().join("no/such/v.gguf"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("its folder does not exist"),
        "{err}"
    );
}
