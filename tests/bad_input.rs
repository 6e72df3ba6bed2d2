//! Hardening (issue #6): every input either works or gets one `error: ...` line
//! naming the bad value, exit status 1, no panic, no abort, nothing half-written.
//! Synthetic models keep these fast; the few checks that need real activations
//! use the real model (fetched in CI).

mod common;
use common::{bin, real_model, synth_model};

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn capture_cmd(model: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["capture", "--quiet", "-m"])
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(extra);
    c
}

fn capture(model: &Path, out: &Path, extra: &[&str]) -> Output {
    capture_cmd(model, out, extra).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "stderr: {}", stderr(o));
    let err = stderr(o);
    assert!(!err.contains("panicked"), "{err}");
}

/// A failed run: exit status 1, exactly one stderr line starting with "error:"
/// that contains `needle`, no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "want exit 1, stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "'{needle}' not in: {err}");
}

fn manifest(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap()
}

fn safetensors_header(out: &Path) -> Value {
    let st = std::fs::read(out.join("latents.safetensors")).unwrap();
    // The reference reader accepts the file.
    safetensors::SafeTensors::deserialize(&st).expect("valid safetensors");
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&st[8..8 + n]).unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Item 1: with one-token ubatches, the last layer's ubatches that hold no
/// output row used to yield frames of width 0 (bad safetensors, then a panic).
#[test]
fn ubatch_of_one_gives_valid_latents() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    for args in [["-b", "1", "--ubatch-size", "1"], ["-b", "4", "--ub", "1"]] {
        let out = dir.path().join(format!("run{}", args[1]));
        let mut extra = vec!["-p", "hi there", "-n", "4"];
        extra.extend(args);
        let o = capture(&m, &out, &extra);
        assert_ok(&o);
        let h = safetensors_header(&out);
        assert_eq!(h["l_out-0"]["shape"], serde_json::json!([12, 64]));
        assert_eq!(
            h["l_out-2"]["shape"],
            serde_json::json!([4, 64]),
            "last layer: one row per sampled token, no empty frames"
        );
        let man = manifest(&out);
        assert_eq!(man["capture"]["n_ubatch"], 1);
        assert_eq!(man["counters"]["unaligned"], 0);
    }
}

/// Item 2 (+ manifest records the threads used).
#[test]
fn threads_are_bounded_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    for t in ["65536", "0", "-5", "100000000"] {
        let o = capture(&m, &out, &["-p", "x", "-t", t]);
        assert_clean_error(&o, &format!("threads {t} is out of range 1..="));
    }
    let o = bin()
        .args(["tensors", "-t", "65536", "-m"])
        .arg(&m)
        .output()
        .unwrap();
    assert_clean_error(&o, "threads 65536");
    assert!(!out.exists());
    assert_ok(&capture(&m, &out, &["-p", "x", "-n", "1", "-t", "1"]));
    assert_eq!(manifest(&out)["capture"]["threads"], 1);
}

/// Item 3.
#[test]
fn block_timeout_is_finite_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    for v in ["inf", "1e300", "NaN", "-1", "86401"] {
        let o = capture(&m, &out, &["-p", "x", "--block-timeout", v]);
        assert_clean_error(&o, "block timeout");
    }
    assert_ok(&capture(
        &m,
        &out,
        &["-p", "x", "-n", "1", "--block-timeout", "0.5"],
    ));
}

/// Item 4: a closed pipe ends quietly; a full device is an error.
#[test]
fn stdout_closed_or_full() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    // The report is written at the very end, long after the reader has gone.
    let mut child = capture_cmd(&m, &out, &["-p", "x", "-n", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_ok(&o);
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    assert!(out.join("manifest.json").exists());
    let mut child = bin()
        .args(["tensors", "-m"])
        .arg(&m)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_ok(&o);
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));

    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let o = capture_cmd(&m, &dir.path().join("o2"), &["-p", "x", "-n", "2"])
        .stdout(full())
        .output()
        .unwrap();
    assert_clean_error(&o, "writing to stdout");
    let o = bin()
        .args(["tensors", "-m"])
        .arg(&m)
        .stdout(full())
        .output()
        .unwrap();
    assert_clean_error(&o, "writing to stdout");
    let o = bin()
        .args(["synth-model"])
        .arg(dir.path().join("s.gguf"))
        .stdout(full())
        .output()
        .unwrap();
    assert_clean_error(&o, "writing to stdout");
}

/// Item 6: sizes are added and multiplied with overflow checks.
#[test]
fn huge_n_predict_is_refused_not_overflowed() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    for n in ["18446744073709551615", "9223372036854775809"] {
        let o = capture(&m, &out, &["-p", "x", "-p", "y", "-n", n]);
        assert_clean_error(&o, "but the context holds");
    }
    let o = capture(&m, &out, &["-p", "x", "--top-k", "18446744073709551615"]);
    assert_clean_error(&o, "report top-k 18446744073709551615 is out of range");
    assert!(!out.exists());
}

/// Item 7: outputs are written under temporary names and renamed at the end; a
/// failure while writing (here: the file size limit, `ulimit -f`) leaves the
/// directory as it was, and a rerun removes stale temporary files.
#[test]
fn failed_write_leaves_earlier_outputs_intact() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("tokens.jsonl"), "OLD tokens\n").unwrap();
    std::fs::write(out.join("manifest.json"), "OLD manifest\n").unwrap();
    // A temp file of a dead run, which the next run cleans up.
    std::fs::write(out.join(".latents.safetensors.tmp-999999999"), "stale").unwrap();
    // tokens.jsonl (~3 KB) fits under the limit (8 KB in 512-byte blocks, 16 KB
    // in bash's 1024-byte ones), latents (3 layers × ~33 rows × 256 B) do not.
    // SIGXFSZ is ignored so the write fails with EFBIG instead of killing us.
    let prompt = "a prompt long enough to make the latents file large";
    let o = Command::new("sh")
        .arg("-c")
        .arg(r#"trap '' XFSZ; ulimit -f 16 && exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_latent-tap"))
        .args(["capture", "--quiet", "--top-k", "0", "-n", "2", "-m"])
        .arg(&m)
        .arg("-o")
        .arg(&out)
        .args(["-p", prompt])
        .output()
        .unwrap();
    assert_clean_error(&o, "latents.safetensors");
    assert_eq!(
        entries(&out),
        ["manifest.json", "tokens.jsonl"],
        "no temp file left, nothing new"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("tokens.jsonl")).unwrap(),
        "OLD tokens\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("manifest.json")).unwrap(),
        "OLD manifest\n"
    );
    std::fs::write(out.join(".tokens.jsonl.tmp-999999999"), "stale").unwrap();
    std::fs::write(out.join("unrelated.tmp-1"), "keep").unwrap();
    assert_ok(&capture(&m, &out, &["-p", prompt, "-n", "2"]));
    assert_eq!(
        entries(&out),
        [
            "latents.safetensors",
            "manifest.json",
            "tokens.jsonl",
            "unrelated.tmp-1"
        ]
    );
    assert_eq!(manifest(&out)["timings"]["generated_tokens"], 2);
}

/// Item 8: a bad --out is found before the model is loaded (the model path here
/// does not even exist) and the message names the path.
#[test]
fn bad_out_dir_is_found_first_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let nomodel = dir.path().join("no-model.gguf");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let o = capture(&nomodel, &file, &["-p", "x"]);
    assert_clean_error(
        &o,
        &format!("'{}' exists and is not a directory", file.display()),
    );
    let sub = file.join("sub");
    let o = capture(&nomodel, &sub, &["-p", "x"]);
    assert_clean_error(
        &o,
        &format!("cannot create output directory '{}'", sub.display()),
    );
    let o = capture(&nomodel, Path::new("/proc/latent-tap-x"), &["-p", "x"]);
    assert_clean_error(&o, "output directory '/proc/latent-tap-x'");
    // A directory where an output file goes.
    let out = dir.path().join("o");
    std::fs::create_dir_all(out.join("manifest.json")).unwrap();
    let o = capture(&nomodel, &out, &["-p", "x"]);
    assert_clean_error(&o, "manifest.json' is a directory");
    // A run that fails later removes the directories it created.
    let m = synth_model(dir.path());
    let deep = dir.path().join("a/b/c");
    let o = capture(&m, &deep, &["-p", "x", "--tensors", "nope"]);
    assert_clean_error(&o, "matches no tensor");
    assert!(!dir.path().join("a").exists());
}

/// Item 9: f16 overflow fails with advice; non-finite counts are in the manifest.
#[test]
fn f16_overflow_fails_and_nonfinite_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    assert_ok(&capture(
        &m,
        &out,
        &["-p", "x", "-n", "2", "--dtype", "f16"],
    ));
    for t in manifest(&out)["tensors"].as_array().unwrap() {
        assert_eq!(t["nonfinite"], 0, "{t}");
    }
    let Some(real) = real_model() else { return };
    let out = dir.path().join("real");
    let args = ["-p", "The capital of France is", "-n", "1", "-t", "2"];
    let mut f16 = args.to_vec();
    f16.extend(["--dtype", "f16"]);
    let o = capture(&real, &out, &f16);
    assert_clean_error(&o, "beyond f16's range");
    assert!(stderr(&o).contains("bf16"));
    assert!(!out.exists());
    let mut bf16 = args.to_vec();
    bf16.extend(["--dtype", "bf16"]);
    assert_ok(&capture(&real, &out, &bf16));
    let man = manifest(&out);
    for t in man["tensors"].as_array().unwrap() {
        assert_eq!(t["nonfinite"], 0, "{t}");
        assert_eq!(t["dtype"], "bf16");
    }
}

/// Item 10: sampling values are checked.
#[test]
fn sampling_values_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    for (flag, v, needle) in [
        ("--temp", "NaN", "temperature NaN"),
        ("--temp", "inf", "temperature inf"),
        (
            "--temp",
            "1e-38",
            "temperature 0.00000000000000000000000000000000000001",
        ),
        ("--temp", "-1", "temperature -1"),
        ("--top-p", "2", "top-p 2"),
        ("--top-p", "-1", "top-p -1"),
        ("--top-p", "NaN", "top-p NaN"),
        ("--sample-top-k", "-5", "sampling top-k -5"),
        ("--gpu-layers", "-7", "gpu layers -7"),
    ] {
        let o = capture(&m, &out, &["-p", "x", flag, v]);
        assert_clean_error(&o, needle);
    }
    assert!(!out.exists());
    assert_ok(&capture(
        &m,
        &out,
        &[
            "-p",
            "x",
            "-n",
            "2",
            "--temp",
            "0.7",
            "--top-p",
            "0.9",
            "--sample-top-k",
            "5",
        ],
    ));
}

/// Item 11: the manifest records the context size in effect, with a warning.
#[test]
fn context_size_in_effect_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    let o = capture(&m, &out, &["-p", "x", "-n", "2", "-c", "8"]);
    assert_ok(&o);
    let n_ctx = manifest(&out)["capture"]["n_ctx"].as_u64().unwrap();
    assert!(n_ctx > 8, "llama.cpp rounds 8 up; manifest says {n_ctx}");
    assert!(
        stderr(&o).contains(&format!("warning: context size 8 is {n_ctx} in effect")),
        "{}",
        stderr(&o)
    );
    let o = capture(&m, &out, &["-p", "x", "-n", "2", "-c", "512"]);
    assert_ok(&o);
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    assert_eq!(manifest(&out)["capture"]["n_ctx"], 512);
}

/// Item 12: only the exact empty string means tokens only.
#[test]
fn blank_tensor_patterns_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    for p in [" ", ",", ",,,", "l_out-*,"] {
        let o = capture(&m, &out, &["-p", "x", "--tensors", p]);
        assert_clean_error(&o, &format!("tensor patterns '{p}' hold a blank entry"));
    }
    assert_ok(&capture(&m, &out, &["-p", "x", "-n", "2", "--tensors", ""]));
    assert_eq!(manifest(&out)["tensors"], serde_json::json!([]));
}

/// Item 13 (CLI side): the real layer range; which prompt is empty.
#[test]
fn messages_name_the_range_and_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    let o = capture(&m, &out, &["-p", "x", "--layers", "7..9"]);
    assert_clean_error(&o, "this model has layers 0..3");
    let o = capture(&m, &out, &["-p", "x", "-p", ""]);
    assert_clean_error(&o, "empty prompt for sequence 1 (-p #2)");
    let o = capture(&m, &out, &["-p", "", "-p", "x"]);
    assert_clean_error(&o, "empty prompt for sequence 0 (-p #1)");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    let o = capture(&m, &out, &["-p", "x", "-f", empty.to_str().unwrap()]);
    assert_clean_error(
        &o,
        &format!("empty prompt for sequence 1 (-f {})", empty.display()),
    );
}

/// Item 14: `--tensors '*'` captures what has a per-token row and lists the rest.
#[test]
fn star_captures_every_row_aligned_node() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    assert_ok(&capture(
        &m,
        &out,
        &["-p", "hi there", "-n", "3", "--tensors", "*"],
    ));
    let man = manifest(&out);
    let names: Vec<&str> = man["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"l_out-0") && names.contains(&"result_output"),
        "{names:?}"
    );
    let skipped = man["skipped"].as_array().unwrap();
    assert!(
        !skipped.is_empty(),
        "KV views and integer inputs are skipped"
    );
    assert_eq!(man["counters"]["unaligned"], 0);
    let h = safetensors_header(&out);
    assert_eq!(h["l_out-0"]["shape"], serde_json::json!([11, 64]));
    // A node named exactly that has no per-token row is refused, by name.
    let s = skipped
        .iter()
        .find(|s| s["reason"] == "no per-token row")
        .expect("a node without a per-token row");
    let name = s["name"].as_str().unwrap();
    let o = capture(&m, &dir.path().join("o2"), &["-p", "x", "--tensors", name]);
    assert_clean_error(&o, &format!("tensor '{name}'"));
    // `tensors` marks such nodes with '-'.
    let o = bin().args(["tensors", "-m"]).arg(&m).output().unwrap();
    assert_ok(&o);
    let list = String::from_utf8_lossy(&o.stdout);
    assert!(
        list.lines()
            .any(|l| l.trim_start().starts_with(name) && l.ends_with("  -")),
        "{list}"
    );
    assert!(list
        .lines()
        .any(|l| l.trim_start().starts_with("l_out-0 ") && !l.ends_with("-")));

    let Some(real) = real_model() else { return };
    let out = dir.path().join("real");
    let o = capture(
        &real,
        &out,
        &[
            "-p",
            "The capital of France is",
            "-n",
            "2",
            "-t",
            "2",
            "--tensors",
            "*",
        ],
    );
    assert_ok(&o);
    let man = manifest(&out);
    assert!(man["tensors"].as_array().unwrap().len() > 100);
    assert!(!man["skipped"].as_array().unwrap().is_empty());
    for t in man["tensors"].as_array().unwrap() {
        assert!(t["width"].as_u64().unwrap() > 0, "{t}");
    }
    safetensors_header(&out);
}

/// Item 15: a ring larger than the memory available is refused up front.
#[test]
fn ring_larger_than_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    let o = capture(&m, &out, &["-p", "x", "--ring-mb", "100000000"]);
    assert_clean_error(&o, "exceeds the memory available");
    let o = capture(&m, &out, &["-p", "x", "--ring-mb", "0"]);
    assert_clean_error(&o, "--ring-mb must be at least 1");
    let o = capture(&m, &out, &["-p", "x", "--ring-mb", "18446744073709551615"]);
    assert_clean_error(&o, "--ring-mb 18446744073709551615 is too large");
    assert!(!out.exists());
}

/// Item 16: one `generated` line per sequence.
#[test]
fn one_generated_line_per_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    let o = capture(&m, &out, &["-p", "ab", "-p", "cd", "-n", "3"]);
    assert_ok(&o);
    let s = String::from_utf8_lossy(&o.stdout);
    let tokens = std::fs::read_to_string(out.join("tokens.jsonl")).unwrap();
    for seq in 0..2 {
        let text: String = tokens
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|t| t["seq"] == seq && t["prompt"] == false)
            .map(|t| t["piece"].as_str().unwrap().to_string())
            .collect();
        let line = format!("generated[{seq}]: {text:?}");
        assert!(s.lines().any(|l| l == line), "no '{line}' in:\n{s}");
    }
    assert!(!s.contains("generated:"));
}

/// Item 17: -f FILE and -f - (stdin), in command-line order with -p.
#[test]
fn prompt_files() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    let f = dir.path().join("p.txt");
    std::fs::write(&f, "from a file\n").unwrap();
    let fs = f.to_str().unwrap();
    let mut child = capture_cmd(&m, &out, &["-f", fs, "-p", "an arg", "-f", "-", "-n", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_ok(&o);
    let man = manifest(&out);
    assert_eq!(
        man["prompt"],
        serde_json::json!(["from a file", "an arg", "from stdin"])
    );
    assert_eq!(
        man["prompt_source"],
        serde_json::json!([format!("-f {fs}"), "-p #1", "-f -"])
    );

    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"ok\xff\xfe").unwrap();
    let o = capture(&m, &out, &["-f", bad.to_str().unwrap()]);
    assert_clean_error(
        &o,
        &format!(
            "prompt file '{}' is not valid UTF-8 (at byte 2)",
            bad.display()
        ),
    );
    let o = capture(&m, &out, &["-f", "/nonexistent/p.txt"]);
    assert_clean_error(&o, "cannot read prompt file '/nonexistent/p.txt'");
    let o = capture(&m, &out, &["-f", dir.path().to_str().unwrap()]);
    assert_clean_error(&o, "cannot read prompt file");
    let o = capture(&m, &out, &["-n", "1"]);
    assert_clean_error(&o, "no prompt");
}

/// Other flags found the same way.
#[test]
fn other_flags() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let out = dir.path().join("o");
    for (args, needle) in [
        (&["-c", "0"][..], "context size must be at least 1"),
        (
            &["-c", "4000000000"],
            "context size 4000000000 is out of range",
        ),
        // Argument parsing errors are one line and exit 1 too.
        (
            &["--seed", "4294967296"],
            "invalid value '4294967296' for '--seed",
        ),
        (&["-n", "-1"], "'-1'"),
        (&["--bogus"], "unexpected argument '--bogus'"),
        (&["-b", "0"], "batch size must be at least 1"),
        (&["--ubatch-size", "0"], "ubatch size must be at least 1"),
        (
            &["-b", "4", "--ubatch-size", "8"],
            "ubatch size 8 must not exceed batch size 4",
        ),
        (
            &["-b", "100000", "--ubatch-size", "70000"],
            "ubatch size 70000 is out of range",
        ),
        (&["--layers", "garbage"], "bad layer filter 'garbage'"),
        (&["--layers", "0..-2147483648"], "bad layer filter"),
        (
            &["--rows", "some"],
            "--rows must be all or last, not 'some'",
        ),
        (
            &["--policy", "drop"],
            "--policy must be block or drop-newest, not 'drop'",
        ),
        (&["--dtype", "f8"], "unknown dtype 'f8'"),
    ] {
        let mut a = vec!["-p", "x"];
        a.extend_from_slice(args);
        assert_clean_error(&capture(&m, &out, &a), needle);
    }
    let many: Vec<&str> = std::iter::repeat(["-p", "x"]).take(257).flatten().collect();
    assert_clean_error(&capture(&m, &out, &many), "257 sequences");
    assert!(!out.exists());
    for (layers, embd, needle) in [
        ("0", "64", "n_layer is 0"),
        ("3", "100000000", "n_embd is 100000000"),
        ("100000000", "64", "n_layer is 100000000"),
    ] {
        let o = bin()
            .args(["synth-model", "--layers", layers, "--embd", embd])
            .arg(dir.path().join("s.gguf"))
            .output()
            .unwrap();
        assert_clean_error(&o, needle);
    }
    let o = bin()
        .args(["synth-model"])
        .arg(dir.path().join("no/such/dir/s.gguf"))
        .output()
        .unwrap();
    assert_clean_error(&o, "no/such/dir/s.gguf");
}
