//! `capture --prompts`: dataset mode end to end on a synthetic model (streamed
//! shards, tokens.jsonl, manifest, interruption and resume, splitting a prompt
//! file across machines).

mod common;
use common::{bin, synth_model, tokens};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn capture(model: &Path, out: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["capture", "--quiet", "-t", "1", "-m"])
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "status {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Deterministic prompts of varied length (bytes 'a'..'z' and spaces).
fn prompts(n: usize, seed: u64) -> Vec<String> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 3 + (x >> 33) as usize % 20;
            (0..len)
                .map(|j| {
                    let c = ((x >> (j % 50)) as u8 % 27) + b'a';
                    if c > b'z' {
                        ' '
                    } else {
                        c as char
                    }
                })
                .collect::<String>()
                .trim()
                .to_string()
                + "x"
        })
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// One tensor of a run, concatenated over its shards in manifest order.
#[derive(Debug, Default, Clone, PartialEq)]
struct Tensor {
    width: usize,
    data: Vec<u8>,
    pos: Vec<i32>,
    seq: Vec<i32>,
    prompt: Vec<i64>,
}

impl Tensor {
    fn row(&self, i: usize) -> Vec<f32> {
        self.data[i * self.width * 4..(i + 1) * self.width * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Every tensor of the runs in `dirs` (several runs: one dataset).
fn load(dirs: &[&Path]) -> BTreeMap<String, Tensor> {
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    for dir in dirs {
        let m = manifest(dir);
        // Row ranges count from 0 in each run directory.
        let base: BTreeMap<String, u64> = out
            .iter()
            .map(|(k, t)| (k.clone(), t.pos.len() as u64))
            .collect();
        for s in m["shards"].as_array().unwrap() {
            let bytes = std::fs::read(dir.join(s["file"].as_str().unwrap())).unwrap();
            // The reference parser checks the header and that the data fills the file.
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let latent_bytes: usize = m["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| st.tensor(t["name"].as_str().unwrap()).unwrap().data().len())
                .sum();
            assert_eq!(latent_bytes as u64, s["bytes"].as_u64().unwrap(), "{s}");
            for t in m["tensors"].as_array().unwrap() {
                let name = t["name"].as_str().unwrap();
                let e = out.entry(name.to_string()).or_default();
                let v = st.tensor(name).unwrap();
                let [start, end] = [0, 1].map(|k| s["rows"][name][k].as_u64().unwrap());
                assert_eq!(v.shape()[0] as u64, end - start, "{name} rows in {s}");
                assert_eq!(
                    e.pos.len() as u64,
                    base.get(name).copied().unwrap_or(0) + start
                );
                e.width = v.shape()[1];
                e.data.extend_from_slice(v.data());
                let ints = |n: &str| st.tensor(&format!("{name}.{n}")).unwrap().data().to_vec();
                e.pos.extend(
                    ints("pos")
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap())),
                );
                e.seq.extend(
                    ints("seq")
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap())),
                );
                e.prompt.extend(
                    ints("prompt")
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap())),
                );
            }
        }
    }
    out
}

#[test]
fn prompt_file_streams_into_shards() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let mut ps = prompts(40, 1);
    ps[7] = String::new(); // a blank line keeps its index and holds nothing
    let file = dir.path().join("prompts.txt");
    write_lines(&file, &ps);
    let out = dir.path().join("run");
    let o = capture(
        &m,
        &out,
        &[
            "--prompts",
            file.to_str().unwrap(),
            "-n",
            "0",
            "--parallel",
            "1",
            "--shard-mb",
            "0.02",
        ],
    );
    ok(&o);
    let man = manifest(&out);
    assert_eq!(man["complete"], true);
    assert_eq!(man["build"]["target_cpu"], env!("LATENT_TAP_TARGET_CPU"));
    assert_eq!(man["prompt_range"], serde_json::json!([0, 40]));
    assert_eq!(man["next_prompt"], 40);
    assert_eq!(man["prompts_captured"], 39);
    assert_eq!(man["prompts_blank"], 1);
    let shards = man["shards"].as_array().unwrap();
    assert!(shards.len() >= 3, "small shards: {}", shards.len());
    // Shards are contiguous in prompts and rows and at most the cap (unless one prompt is larger).
    let mut next = 0;
    for s in shards {
        assert_eq!(s["prompts"][0], next);
        next = s["prompts"][1].as_u64().unwrap();
        let bytes = s["bytes"].as_u64().unwrap();
        assert!(bytes <= (0.02 * 1048576.0) as u64, "{s}");
    }
    assert_eq!(next, 40);
    let run = load(&[&out]);
    let toks = tokens(&out);
    let l0 = &run["l_out-0"];
    let total: usize = ps
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| p.len() + 1)
        .sum();
    assert_eq!(l0.pos.len(), total, "one row per token, BOS included");
    assert_eq!(toks.len(), total);
    assert_eq!(man["tokens"], total);
    // Rows by prompt index, then position; tokens.jsonl in the same order.
    let mut i = 0;
    for (k, p) in ps.iter().enumerate() {
        if p.is_empty() {
            assert!(!l0.prompt.contains(&(k as i64)));
            continue;
        }
        for pos in 0..=p.len() {
            assert_eq!((l0.prompt[i], l0.pos[i]), (k as i64, pos as i32));
            assert_eq!(toks[i]["prompt_index"], k);
            assert_eq!(
                toks[i]["index"], i,
                "index: the line number, as in capture -p"
            );
            assert_eq!(toks[i]["pos"], pos);
            i += 1;
        }
    }
    // The last layer is pruned by llama.cpp to output rows: one per prompt.
    let last = &run["l_out-2"];
    assert_eq!(last.pos.len(), 39);
    assert_eq!(man["rows"]["l_out-2"], 39);
    // Values equal a plain `-p` capture of the same prompt, byte for byte.
    let single = dir.path().join("single");
    ok(&capture(&m, &single, &["-p", &ps[3], "-n", "1"]));
    let bytes = std::fs::read(single.join("latents.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want = st.tensor("l_out-1").unwrap();
    let l1 = &run["l_out-1"];
    let rows: Vec<usize> = (0..l1.pos.len()).filter(|&r| l1.prompt[r] == 3).collect();
    assert_eq!(rows.len(), ps[3].len() + 1);
    let got: Vec<u8> = rows
        .iter()
        .flat_map(|&r| l1.data[r * l1.width * 4..(r + 1) * l1.width * 4].to_vec())
        .collect();
    assert_eq!(got, want.data(), "dataset rows equal the -p capture's");
    assert!(l1.row(0).iter().any(|v| *v != 0.0));
}

#[test]
fn jsonl_field_truncation_and_generation() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let ps = prompts(6, 2);
    let lines: Vec<String> = ps
        .iter()
        .map(|p| serde_json::json!({"id": 1, "body": p}).to_string())
        .collect();
    let file = dir.path().join("p.jsonl");
    write_lines(&file, &lines);
    let out = dir.path().join("run");
    let o = capture(
        &m,
        &out,
        &[
            "--prompts",
            file.to_str().unwrap(),
            "--prompt-field",
            "body",
            "--max-prompt-tokens",
            "5",
            "-n",
            "2",
            "--parallel",
            "3",
        ],
    );
    ok(&o);
    let man = manifest(&out);
    assert_eq!(man["complete"], true);
    assert_eq!(
        man["shards"].as_array().unwrap().len(),
        1,
        "a small run is one shard"
    );
    let truncated: Vec<Value> = man["shards"][0]["truncated"].as_array().unwrap().clone();
    let want: Vec<Value> = ps
        .iter()
        .enumerate()
        .filter(|(_, p)| p.len() + 1 > 5)
        .map(|(i, p)| serde_json::json!([i, p.len() + 1]))
        .collect();
    assert_eq!(truncated, want);
    let toks = tokens(&out);
    for (k, p) in ps.iter().enumerate() {
        let mine: Vec<&Value> = toks.iter().filter(|t| t["prompt_index"] == k).collect();
        let n_prompt = mine.iter().filter(|t| t["prompt"] == true).count();
        assert_eq!(n_prompt, 5.min(p.len() + 1));
        let gen: Vec<&&Value> = mine.iter().filter(|t| t["prompt"] == false).collect();
        assert!(!gen.is_empty() && gen.len() <= 2);
        assert!(gen[0]["logprob"].as_f64().unwrap() <= 0.0);
    }
    let run = load(&[&out]);
    let l0 = &run["l_out-0"];
    // Prompt rows plus one row per decoded generated token (the last sampled one is never decoded).
    for k in 0..6i64 {
        let n_gen = toks
            .iter()
            .filter(|t| t["prompt_index"] == k && t["prompt"] == false)
            .count();
        let rows = l0.prompt.iter().filter(|&&p| p == k).count();
        assert_eq!(rows, 5.min(ps[k as usize].len() + 1) + n_gen - 1);
    }
    // A file without the field names the line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"a\"}\n{\"other\": 1}\n").unwrap();
    let o = capture(
        &m,
        &dir.path().join("bad"),
        &["--prompts", bad.to_str().unwrap()],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 2") && err.contains("'text'"), "{err}");
}

/// Relative L2 distance of two rows.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

/// Same rows in the same order (prompt, pos); values byte-equal or within `tol`.
fn assert_same_rows(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, tol: Option<f64>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.prompt, y.prompt, "{name}: prompt order");
        assert_eq!(x.pos, y.pos, "{name}: positions");
        match tol {
            None => assert!(x.data == y.data, "{name}: bytes differ"),
            Some(tol) => {
                // Different batch compositions change llama.cpp's accumulation order
                // (and the f16 KV cache's neighbours). On the random-weight synthetic
                // model, interrupted 4 times at --parallel 3 (5 runs, docs/dataset.md):
                // p99 <= 6.8e-4, at most 6 of 34,775 rows (0.02%) above 1e-3, max 1.21e-3.
                let d: Vec<f64> = (0..x.pos.len())
                    .map(|r| rel_l2(&x.row(r), &y.row(r)))
                    .collect();
                let over = d.iter().filter(|&&v| v > tol).count();
                let max = d.iter().copied().fold(0.0, f64::max);
                let mut sorted = d.clone();
                sorted.sort_by(f64::total_cmp);
                let q = |f: f64| sorted[((sorted.len() - 1) as f64 * f) as usize];
                eprintln!(
                    "{name}: relative L2 p50 {:.2e} p99 {:.2e} p99.9 {:.2e} max {max:.2e}, {over} of {} rows above {tol:e}",
                    q(0.5),
                    q(0.99),
                    q(0.999),
                    d.len()
                );
                assert!(
                    over * 100 <= d.len(),
                    "{name}: {over} of {} rows above {tol}",
                    d.len()
                );
                assert!(max <= 10.0 * tol, "{name}: max relative L2 {max}");
            }
        }
    }
}

#[test]
fn parallel_refill_gives_the_rows_of_a_sequential_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let file = dir.path().join("p.txt");
    write_lines(&file, &prompts(30, 3));
    let f = file.to_str().unwrap();
    let (one, four) = (dir.path().join("one"), dir.path().join("four"));
    ok(&capture(
        &m,
        &one,
        &["--prompts", f, "-n", "0", "--parallel", "1"],
    ));
    ok(&capture(
        &m,
        &four,
        &["--prompts", f, "-n", "0", "--parallel", "4"],
    ));
    let (a, b) = (load(&[&one]), load(&[&four]));
    assert_same_rows(&a, &b, Some(1e-3));
    // Four slots were really used.
    let seqs: std::collections::BTreeSet<i32> = b["l_out-0"].seq.iter().copied().collect();
    assert_eq!(seqs.len(), 4, "{seqs:?}");
}

#[test]
fn dataset_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let file = dir.path().join("p.txt");
    write_lines(&file, &prompts(3, 4));
    let f = file.to_str().unwrap();
    let err = |o: &Output, needle: &str| {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{e}");
        assert!(!e.contains("panicked"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains(needle), "'{needle}' not in {e}");
    };
    let out = dir.path().join("r");
    err(
        &capture(&m, &out, &["-p", "x", "--parallel", "2"]),
        "--prompts",
    );
    err(&capture(&m, &out, &["-p", "x", "-n", "0"]), "n-predict");
    err(
        &capture(&m, &out, &["--prompts", f, "-p", "x"]),
        "cannot be used",
    );
    err(
        &capture(
            &m,
            &out,
            &["--prompts", f, "--shard-count", "3", "--shard-index", "3"],
        ),
        "shard index 3",
    );
    err(
        &capture(&m, &out, &["--prompts", f, "--shard-mb", "0"]),
        "--shard-mb",
    );
    err(
        &capture(&m, &out, &["--prompts", f, "--parallel", "0"]),
        "--parallel",
    );
    err(
        &capture(&m, &out, &["--prompts", f, "--max-prompt-tokens", "0"]),
        "at least 1",
    );
    err(
        &capture(&m, &out, &["--prompts", f, "--resume"]),
        "--resume",
    );
    assert!(!out.join("manifest.json").exists());
    ok(&capture(&m, &out, &["--prompts", f, "-n", "0"]));
    err(&capture(&m, &out, &["--prompts", f, "-n", "0"]), "--resume");
    // Resuming a complete run changes nothing; other settings are refused.
    let before = manifest(&out);
    ok(&capture(&m, &out, &["--prompts", f, "-n", "0", "--resume"]));
    assert_eq!(manifest(&out), before);
    err(
        &capture(&m, &out, &["--prompts", f, "-n", "1", "--resume"]),
        "n_predict",
    );
    // A prompt longer than a slot's context.
    let long = dir.path().join("long.txt");
    std::fs::write(&long, "a".repeat(300) + "\n").unwrap();
    err(
        &capture(
            &m,
            &dir.path().join("l"),
            &["--prompts", long.to_str().unwrap(), "-c", "256", "-n", "0"],
        ),
        "prompt 0 has 301 tokens",
    );
}

/// Start a capture, signal it `delay_ms` after start, wait. Returns the exit code.
fn interrupted(model: &Path, out: &Path, extra: &[&str], signal: &str, delay_ms: u64) -> i32 {
    let child = bin()
        .args(["capture", "--quiet", "-t", "1", "-m"])
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The handler is installed before the model loads, right after argument checks.
    std::thread::sleep(std::time::Duration::from_millis(delay_ms));
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    o.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {:?} {err}", o.status))
}

/// After an interruption every file present loads and agrees with the manifest;
/// only the last shard may be partial, and then `resume_from` says where it
/// starts. Returns whether the last shard is partial.
fn check_partial(out: &Path) -> bool {
    let man = manifest(out);
    let shards = man["shards"].as_array().unwrap();
    let mut files = Vec::new();
    for e in std::fs::read_dir(out).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        let known = n == "manifest.json"
            || n == "tokens.jsonl"
            || (n.starts_with("latents-") && n.ends_with(".safetensors"));
        assert!(known, "left behind: {n}");
        if n.starts_with("latents-") {
            files.push(n);
        }
    }
    files.sort();
    let listed: Vec<&str> = shards.iter().map(|s| s["file"].as_str().unwrap()).collect();
    assert_eq!(files, listed, "shard files present = shards listed");
    let partial = shards.last().is_some_and(|s| s["partial"] == true);
    for s in &shards[..shards.len().saturating_sub(1)] {
        assert!(
            s.get("partial").is_none(),
            "only the last shard may be partial: {s}"
        );
    }
    if partial {
        let last = shards.last().unwrap();
        assert_eq!(man["resume_from"]["next_prompt"], last["prompts"][0]);
        assert!(man["next_prompt"].as_u64() >= last["prompts"][1].as_u64());
    } else {
        assert!(man.get("resume_from").is_none(), "{man}");
        if let Some(last) = shards.last() {
            assert!(man["next_prompt"].as_u64() >= last["prompts"][1].as_u64());
        }
    }
    let run = load(&[out]);
    let toks = tokens(out);
    assert_eq!(toks.len() as u64, man["tokens"].as_u64().unwrap());
    let next = man["next_prompt"].as_i64().unwrap();
    for (name, t) in &run {
        assert_eq!(t.pos.len() as u64, man["rows"][name].as_u64().unwrap());
        assert!(
            t.prompt.iter().all(|&p| p < next),
            "{name}: rows past next_prompt"
        );
    }
    if let Some(t) = toks.last() {
        assert!(t["prompt_index"].as_i64().unwrap() < next);
    }
    partial
}

/// Two runs of the same prompts with the same settings ended the same way:
/// identical manifests, and with `bytes` byte-identical shards and tokens.jsonl.
/// The manifest records no timing, no process id and not the run directory (the
/// model and prompt file paths in `config` are the same for both runs), so
/// nothing is left out, except without `bytes` (batches composed differently)
/// `tokens_bytes`: the length of tokens.jsonl, whose logprob / entropy decimals
/// and slot numbers (`seq`) then differ.
fn assert_same_run(straight: &Path, other: &Path, bytes: bool) {
    let (mut x, mut y) = (manifest(straight), manifest(other));
    assert_eq!(y["complete"], true);
    if !bytes {
        for m in [&mut x, &mut y] {
            m.as_object_mut().unwrap().remove("tokens_bytes");
        }
    }
    // Name the first difference (the whole manifest is too long to read).
    for (k, v) in x.as_object().unwrap() {
        if k == "shards" {
            let (a, b) = (v.as_array().unwrap(), y[k].as_array().unwrap());
            for (i, (s, t)) in a.iter().zip(b).enumerate() {
                assert_eq!(s, t, "shard {i}");
            }
            assert_eq!(a.len(), b.len(), "shards");
        } else {
            assert_eq!(v, &y[k], "manifest {k}");
        }
    }
    assert_eq!(x, y, "manifests differ");
    if bytes {
        for s in x["shards"].as_array().unwrap() {
            let f = s["file"].as_str().unwrap();
            let (a, b) = (
                std::fs::read(straight.join(f)).unwrap(),
                std::fs::read(other.join(f)).unwrap(),
            );
            assert!(a == b, "{f} differs");
        }
        assert!(
            std::fs::read(straight.join("tokens.jsonl")).unwrap()
                == std::fs::read(other.join("tokens.jsonl")).unwrap(),
            "tokens.jsonl differs"
        );
    }
}

fn interrupt_and_resume(parallel: &str, tol: Option<f64>, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let file = dir.path().join("p.txt");
    // Enough work that a run lasts well past process start-up, so the signals
    // below land mid-run even on a busy machine.
    write_lines(&file, &prompts(2400, 7));
    let f = file.to_str().unwrap();
    let args = [
        "--prompts",
        f,
        "-n",
        "1",
        "--parallel",
        parallel,
        "--shard-mb",
        "0.1",
    ];
    let straight = dir.path().join("straight");
    let t = std::time::Instant::now();
    ok(&capture(&m, &straight, &args));
    // Interruption points are drawn within the time a straight run takes here.
    let full_ms = t.elapsed().as_millis() as u64;
    let out = dir.path().join("resumed");
    let mut rng = seed;
    let (mut stops, mut partials) = (0, 0);
    for round in 0..4 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = 60 + (rng >> 33) % (full_ms / 8).max(1);
        let mut a = args.to_vec();
        if round > 0 {
            a.push("--resume");
        }
        let (sig, code) = if round % 2 == 0 {
            ("-INT", 130)
        } else {
            ("-TERM", 143)
        };
        let t = std::time::Instant::now();
        let rc = interrupted(&m, &out, &a, sig, delay);
        eprintln!(
            "round {round}: {sig} after {delay} ms: exit {rc} in {:?}",
            t.elapsed()
        );
        assert!(rc == code || rc == 0, "round {round}: exit {rc}");
        let man = manifest(&out);
        assert_eq!(man["complete"], rc == 0, "round {round}");
        if rc != 0 {
            stops += 1;
            assert_eq!(man["stopped"], "interrupted");
        }
        partials += usize::from(check_partial(&out));
        if rc == 0 {
            break;
        }
    }
    assert!(stops >= 1, "no run was interrupted");
    // A shard is open almost all the time, so stops leave partial shards.
    assert!(partials >= 1, "no run stopped with a shard open");
    let mut a = args.to_vec();
    a.push("--resume");
    ok(&capture(&m, &out, &a));
    // Same manifest (shard boundaries included); at --parallel 1 the same bytes.
    assert_same_run(&straight, &out, tol.is_none());
    assert_same_rows(&load(&[&straight]), &load(&[&out]), tol);
    let strip = |v: Vec<Value>| -> Vec<(Value, Value, Value)> {
        v.into_iter()
            .map(|t| {
                (
                    t["prompt_index"].clone(),
                    t["pos"].clone(),
                    t["token"].clone(),
                )
            })
            .collect()
    };
    let (tx, ty) = (tokens(&straight), tokens(&out));
    // A resumed run numbers its lines on from what it kept.
    for (i, t) in ty.iter().enumerate() {
        assert_eq!(t["index"], i, "resumed tokens.jsonl line {i}");
    }
    if tol.is_none() {
        assert_eq!(tx, ty, "tokens.jsonl");
    } else {
        assert_eq!(strip(tx), strip(ty), "tokens.jsonl");
    }
}

#[test]
fn interrupted_and_resumed_equals_straight_run_sequential() {
    interrupt_and_resume("1", None, 11);
}

#[test]
fn interrupted_and_resumed_equals_straight_run_parallel() {
    interrupt_and_resume("3", Some(1e-3), 12);
}

#[test]
fn three_machines_give_the_rows_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let file = dir.path().join("p.txt");
    let mut ps = prompts(50, 9);
    ps[49] = String::new(); // a blank last line still belongs to the last block
    write_lines(&file, &ps);
    let f = file.to_str().unwrap();
    let base = [
        "--prompts",
        f,
        "-n",
        "0",
        "--parallel",
        "1",
        "--shard-mb",
        "0.05",
    ];
    let one = dir.path().join("one");
    ok(&capture(&m, &one, &base));
    let mut parts = Vec::new();
    for i in 0..3 {
        let out = dir.path().join(format!("part{i}"));
        let mut a = base.to_vec();
        let idx = i.to_string();
        a.extend(["--shard-index", idx.as_str(), "--shard-count", "3"]);
        ok(&capture(&m, &out, &a));
        let man = manifest(&out);
        let want = [50 * i / 3, 50 * (i + 1) / 3];
        assert_eq!(man["prompt_range"], serde_json::json!(want), "block {i}");
        assert_eq!(man["complete"], true);
        let run = load(&[&out]);
        assert!(run["l_out-0"]
            .prompt
            .iter()
            .all(|&p| (want[0] as i64..want[1] as i64).contains(&p)));
        parts.push(out);
    }
    let parts: Vec<&Path> = parts.iter().map(PathBuf::as_path).collect();
    assert_same_rows(&load(&[&one]), &load(&parts), None);
    // Lines match but for `index`, each file's own line number.
    let mut joined = Vec::new();
    for p in &parts {
        for (i, mut t) in tokens(p).into_iter().enumerate() {
            assert_eq!(t["index"], i, "{}", p.display());
            t.as_object_mut().unwrap().remove("index");
            joined.push(t);
        }
    }
    let mut whole = tokens(&one);
    for t in &mut whole {
        t.as_object_mut().unwrap().remove("index");
    }
    assert_eq!(whole, joined);

    // The Python reader (numpy, memory-mapped) reads the three directories as one dataset.
    let script = r#"
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from read_run import Run
one, parts = Run(sys.argv[2]), Run(sys.argv[3:])
for name in one.tensors:
    assert np.array_equal(one.array(name), parts.array(name)), name
rows = [(n, p) for n, x, p, pos in parts.rows(layers=[1], prompts=range(10, 20))]
assert [n for n, _ in rows] and all(n == "l_out-1" for n, _ in rows), rows
got = sorted(set(np.concatenate([p for _, p in rows]).tolist()))
assert got == list(range(10, 20)), got
print("reader ok", len(one.array("l_out-0")))
"#;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python");
    let o = Command::new(std::env::var_os("PYTHON").unwrap_or("python3".into()))
        .arg("-c")
        .arg(script)
        .arg(&examples)
        .arg(&one)
        .args(&parts)
        .output()
        .unwrap();
    let n_rows = load(&[&one])["l_out-0"].pos.len();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("reader ok {n_rows}"),
        "read_run.py (needs numpy): {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn tokens_only_run() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let file = dir.path().join("p.txt");
    let ps = prompts(5, 5);
    write_lines(&file, &ps);
    let out = dir.path().join("run");
    ok(&capture(
        &m,
        &out,
        &[
            "--prompts",
            file.to_str().unwrap(),
            "--tensors",
            "",
            "-n",
            "2",
        ],
    ));
    let man = manifest(&out);
    assert_eq!(man["complete"], true);
    assert_eq!(man["tensors"], serde_json::json!([]));
    assert!(load(&[&out]).is_empty());
    let toks = tokens(&out);
    let n_prompt: usize = ps.iter().map(|p| p.len() + 1).sum();
    assert_eq!(
        toks.iter().filter(|t| t["prompt"] == true).count(),
        n_prompt
    );
    assert!(toks
        .iter()
        .any(|t| t["prompt"] == false && t["prompt_index"] == 4));
}

/// A capture under a file size limit (RLIMIT_FSIZE, `ulimit -f` in 512-byte
/// blocks; SIGXFSZ ignored so that write(2) fails with EFBIG, as on a full disk).
fn capture_limited(model: &Path, out: &Path, extra: &[&str], blocks: u32) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            r#"trap '' XFSZ; ulimit -f {blocks} && exec "$0" "$@""#
        ))
        .arg(env!("CARGO_BIN_EXE_latent-tap"))
        .args(["capture", "--quiet", "-t", "1", "-m"])
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// The one-line error of a failed write, which names `path`.
fn write_error(o: &Output, path: &Path) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    let want = format!("writing {}: ", path.display());
    assert!(lines[0].contains(&want), "'{want}' not in {err}");
    err
}

#[test]
fn write_error_stops_with_valid_shards_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let file = dir.path().join("p.txt");
    let mut ps = prompts(200, 21);
    // One prompt far larger than the shard cap: its shard alone is ~1.1 MB.
    let long: String = (0..2030)
        .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
        .collect();
    ps[180] = long;
    write_lines(&file, &ps);
    let f = file.to_str().unwrap();
    let args = [
        "--prompts",
        f,
        "-n",
        "0",
        "--parallel",
        "1",
        "--shard-mb",
        "0.05",
    ];
    let straight = dir.path().join("straight");
    ok(&capture(&m, &straight, &args));
    let shards_of = |d: &Path| manifest(d)["shards"].as_array().unwrap().clone();
    let all = shards_of(&straight);
    let out = dir.path().join("run");

    // 1. tokens.jsonl (~97 bytes a token) outgrows a 68 KiB limit after about 720
    //    tokens, while shards (50 KiB) still fit: the write of tokens.jsonl fails
    //    mid-run with closed shards behind it and (here) one open.
    let o = capture_limited(&m, &out, &args, 136);
    let err = write_error(&o, &out.join("tokens.jsonl"));
    let man = manifest(&out);
    assert_eq!(man["complete"], false);
    assert_eq!(man["stopped"].as_str().unwrap(), err.trim());
    let partial = check_partial(&out);
    let got = shards_of(&out);
    assert!(got.len() >= 3, "{} shards", got.len());
    let next = man["next_prompt"].as_u64().unwrap();
    assert!((20..180).contains(&next), "stopped at prompt {next}");
    // The prompt whose tokens failed to be written is `next`: the shard open
    // then (if it held a prompt) is written, as partial.
    let open = all
        .iter()
        .find(|s| s["prompts"][1].as_u64() > Some(next))
        .unwrap();
    assert_eq!(partial, open["prompts"][0].as_u64() < Some(next));
    assert!(partial, "with these sizes the failure comes mid-shard");
    // The shards closed before the failure are those of the straight run, byte for byte.
    for (s, want) in got[..got.len() - 1].iter().zip(&all) {
        assert_eq!(s, want);
        let f = s["file"].as_str().unwrap();
        assert!(std::fs::read(out.join(f)).unwrap() == std::fs::read(straight.join(f)).unwrap());
    }
    let last = got.last().unwrap();
    assert_eq!(last["prompts"][0], all[got.len() - 1]["prompts"][0]);
    assert!(last["bytes"].as_u64() < all[got.len() - 1]["bytes"].as_u64());
    // Every prompt before next_prompt has its tokens, none after.
    let toks = tokens(&out);
    let expect: usize = ps[..next as usize]
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| p.len() + 1)
        .sum();
    assert_eq!(toks.len(), expect);

    // 2. Resumed under a 512 KiB limit: the long prompt's spill file (2031 rows ×
    //    256 B) fits, its shard does not. The shard's write fails; the manifest
    //    ends at the shard before, and the failed one is not left behind.
    let mut a = args.to_vec();
    a.push("--resume");
    let o = capture_limited(&m, &out, &a, 1024);
    let k = shards_of(&out).len();
    let err = write_error(&o, &out.join(format!("latents-{k:05}.safetensors")));
    let man = manifest(&out);
    assert_eq!(man["complete"], false);
    assert_eq!(man["stopped"].as_str().unwrap(), err.trim());
    assert!(!check_partial(&out), "nothing of the failed shard is kept");
    assert_eq!(man["next_prompt"], 180, "stopped before the long prompt");
    assert_eq!(shards_of(&out)[..], all[..k]);
    assert_eq!(all[k]["prompts"], serde_json::json!([180, 181]));

    // 3. Resumed without a limit: the same run as the straight one, byte for byte.
    ok(&capture(&m, &out, &a));
    assert_same_run(&straight, &out, true);
}

/// A write to a spill file that fails after another tensor's went through (a
/// prompt half appended to the open shard) must not leave a shard whose tensors
/// disagree: the open shard is left out, and the manifest and tokens.jsonl go
/// back to where it started.
#[test]
fn spill_write_error_drops_the_open_shard() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let file = dir.path().join("p.txt");
    let mut ps = prompts(30, 23);
    // Rows of 128 B (Kcur-0) and 512 B (ffn_up-0): prompt 10's 4,501 rows are
    // ~0.6 MB and ~2.3 MB, each in one write (more than a spill file's 1 MiB
    // buffer, so it reaches the file at once); its tokens are ~390 KB.
    ps[10] = (0..4500)
        .map(|i| (b'a' + (i * 5 % 26) as u8) as char)
        .collect();
    write_lines(&file, &ps);
    let f = file.to_str().unwrap();
    let args = [
        "--prompts",
        f,
        "-n",
        "0",
        "--parallel",
        "1",
        "--tensors",
        "Kcur-0,ffn_up-0",
        // One shard holds prompts 0..=10 and more, so prompt 10 joins an open shard.
        "--shard-mb",
        "8",
        "-c",
        "8192",
    ];
    let straight = dir.path().join("straight");
    ok(&capture(&m, &straight, &args));
    let out = dir.path().join("run");
    // 1 MiB (2 MiB where `ulimit -f` counts 1024-byte blocks): Kcur-0's spill file
    // fits, ffn_up-0's does not, tokens.jsonl does.
    let o = capture_limited(&m, &out, &args, 2048);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let want = format!(
        "error: writing {}",
        out.join(".latents.col1.tmp-").display()
    );
    assert!(err.starts_with(&want), "'{want}' not in {err}");
    let man = manifest(&out);
    assert_eq!(man["complete"], false);
    assert_eq!(man["stopped"].as_str().unwrap(), err.trim());
    assert!(!check_partial(&out), "the open shard is left out");
    assert_eq!(man["shards"], serde_json::json!([]));
    assert_eq!(man["next_prompt"], 0);
    assert_eq!(man["tokens"], 0);
    assert_eq!(
        std::fs::metadata(out.join("tokens.jsonl")).unwrap().len(),
        0
    );
    let mut a = args.to_vec();
    a.push("--resume");
    ok(&capture(&m, &out, &a));
    assert_same_run(&straight, &out, true);
}
