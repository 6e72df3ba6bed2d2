//! The C, C++ and Python examples (built by `scripts/test-examples` into
//! `target/examples/`) against the Rust API on a synthetic model: the same
//! frames (step, layer name, seq, pos) with the same L2 norms, the same tokens
//! and logprobs, and the same output as `examples/c/generate.c` line for line.
//!
//! Without the binaries the tests print `SKIPPED: run scripts/test-examples`
//! and pass, unless `LT_EXAMPLES_REQUIRED` is set (the script sets it).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use latent_tap::capture::Rows;
use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::output::collect;
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator};
use latent_tap::synth::{SynthConfig, SynthModel};

const PROMPT: &str = "hello world";
const N_PREDICT: usize = 5;
const L2_REL_TOL: f64 = 1e-4;
const LOGPROB_TOL: f64 = 1e-5;
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// One parsed output line.
#[derive(Debug, Clone, PartialEq)]
enum Line {
    Frame {
        name: String,
        step: u32,
        seq: i32,
        pos: i32,
        l2: f64,
    },
    Token {
        step: u32,
        seq: i32,
        pos: i32,
        id: i32,
        logprob: f64,
    },
    End {
        frames: u64,
        drops: u64,
    },
}

/// Parse `kind k1=v1 k2=v2 ...`, requiring exactly `keys` in that order.
fn fields<'a>(rest: &'a str, keys: &[&str], line: &str) -> Vec<&'a str> {
    let parts: Vec<&str> = rest.split(' ').collect();
    assert_eq!(parts.len(), keys.len(), "wrong field count in {line:?}");
    parts
        .iter()
        .zip(keys)
        .map(|(p, k)| {
            let (key, val) = p
                .split_once('=')
                .unwrap_or_else(|| panic!("no '=' in {p:?} of {line:?}"));
            assert_eq!(key, *k, "field order in {line:?}");
            val
        })
        .collect()
}

fn num<T: std::str::FromStr>(s: &str, line: &str) -> T {
    s.parse()
        .unwrap_or_else(|_| panic!("bad number {s:?} in {line:?}"))
}

/// Parse every line of an example's stdout; any other line fails.
fn parse(stdout: &str) -> Vec<Line> {
    stdout
        .lines()
        .map(|line| {
            let (kind, rest) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("unexpected output line {line:?}"));
            match kind {
                "frame" => {
                    let f = fields(rest, &["name", "step", "seq", "pos", "l2"], line);
                    Line::Frame {
                        name: f[0].to_string(),
                        step: num(f[1], line),
                        seq: num(f[2], line),
                        pos: num(f[3], line),
                        l2: num(f[4], line),
                    }
                }
                "token" => {
                    let f = fields(rest, &["step", "seq", "pos", "id", "logprob"], line);
                    Line::Token {
                        step: num(f[0], line),
                        seq: num(f[1], line),
                        pos: num(f[2], line),
                        id: num(f[3], line),
                        logprob: num(f[4], line),
                    }
                }
                "end" => {
                    let f = fields(rest, &["frames", "drops"], line);
                    Line::End {
                        frames: num(f[0], line),
                        drops: num(f[1], line),
                    }
                }
                _ => panic!("unexpected output line {line:?}"),
            }
        })
        .collect()
}

fn close_rel(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-3)
}

/// Same line, integers equal, floats within the tolerances.
fn same_line(a: &Line, b: &Line) -> bool {
    match (a, b) {
        (
            Line::Frame {
                name: n1,
                step: s1,
                seq: q1,
                pos: p1,
                l2: x1,
            },
            Line::Frame {
                name: n2,
                step: s2,
                seq: q2,
                pos: p2,
                l2: x2,
            },
        ) => n1 == n2 && s1 == s2 && q1 == q2 && p1 == p2 && close_rel(*x1, *x2, L2_REL_TOL),
        (
            Line::Token {
                step: s1,
                seq: q1,
                pos: p1,
                id: i1,
                logprob: l1,
            },
            Line::Token {
                step: s2,
                seq: q2,
                pos: p2,
                id: i2,
                logprob: l2,
            },
        ) => s1 == s2 && q1 == q2 && p1 == p2 && i1 == i2 && (l1 - l2).abs() <= LOGPROB_TOL,
        (a, b) => a == b,
    }
}

/// What the Rust API produces for the run the examples make.
struct Expected {
    /// (step, name, seq, pos) -> L2 norm of the row.
    frames: BTreeMap<(u32, String, i32, i32), f64>,
    /// Generated tokens in order: (step, seq, pos, id, logprob).
    tokens: Vec<(u32, i32, i32, i32, f64)>,
    end_frames: u64,
    end_drops: u64,
}

struct Fixture {
    _dir: tempfile::TempDir,
    model_path: PathBuf,
    expected: Expected,
    /// generate.c's parsed output, the reference for the other examples.
    generate: Vec<Line>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn examples_dir() -> PathBuf {
    std::env::var_os("LT_EXAMPLES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target").join("examples"))
}

fn required() -> bool {
    std::env::var_os("LT_EXAMPLES_REQUIRED").is_some_and(|v| !v.is_empty() && v != "0")
}

/// The binary `name` in the examples dir, or None (after printing SKIPPED)
/// when it is missing and not required.
fn binary(name: &str) -> Option<PathBuf> {
    let p = examples_dir().join(name);
    if p.is_file() {
        return Some(p);
    }
    assert!(
        !required(),
        "{} is missing: scripts/test-examples did not build it",
        p.display()
    );
    println!(
        "SKIPPED: run scripts/test-examples ({} is missing)",
        p.display()
    );
    None
}

fn expected_from_rust(model_path: &Path) -> Expected {
    let model = Model::load(model_path, &ModelOptions::default()).unwrap();
    let ctx = ContextOptions {
        n_ctx: 512,
        ..Default::default()
    };
    let spec = CaptureSpec {
        patterns: vec!["l_out-*".into()],
        rows: Rows::Last,
        ..Default::default()
    };
    let (mut gen, stream) = Generator::new(model.clone(), &ctx, &spec).unwrap();
    let sel = gen.selection().to_vec();
    let dtype = spec.dtype;
    let consumer = std::thread::spawn(move || collect(stream, &sel, dtype));
    let tokens = vec![model.tokenize(PROMPT, true).unwrap()];
    let opts = GenerateOptions {
        n_predict: N_PREDICT,
        n_probs: 3,
        ..Default::default()
    };
    gen.run(&tokens, &opts, &mut |_| {}).unwrap();
    let c = consumer.join().unwrap().unwrap();

    let mut frames = BTreeMap::new();
    for t in &c.tensors {
        for i in 0..t.n_rows() {
            let l2 = t
                .row_f32(i)
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt();
            let key = (t.step[i], t.name.clone(), t.seq[i], t.pos[i]);
            assert!(frames.insert(key, l2).is_none(), "duplicate row");
        }
    }
    let tokens: Vec<_> = c
        .tokens
        .iter()
        .filter(|t| !t.prompt)
        .map(|t| (t.step, t.seq, t.pos, t.token, f64::from(t.logprob.unwrap())))
        .collect();
    let end = c.end.expect("the Rust stream has an end record");
    // Not vacuous: one last row per layer per decode (3 layers, N_PREDICT decodes
    // including the prompt's), and N_PREDICT generated tokens.
    assert_eq!(c.tensors.len(), 3, "l_out-* of the 3-layer synthetic model");
    assert_eq!(frames.len(), 3 * N_PREDICT);
    assert_eq!(tokens.len(), N_PREDICT);
    Expected {
        frames,
        tokens,
        end_frames: end.frames,
        end_drops: end.drops,
    }
}

/// Run `cmd`, failing on a non-zero exit or after RUN_TIMEOUT; returns stdout.
fn run(mut cmd: Command) -> String {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).map(|_| s)
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).map(|_| s)
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} ran past {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_t.join().unwrap().expect("stdout is UTF-8");
    let stderr = err_t.join().unwrap().unwrap_or_default();
    assert!(
        status.success(),
        "{desc} failed ({status})\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    stdout
}

fn example_cmd(bin: &Path, model: &Path) -> Command {
    let mut c = Command::new(bin);
    c.arg(model).arg(PROMPT).arg(N_PREDICT.to_string());
    c.current_dir(root());
    c
}

/// Fixture shared by the tests: None when the examples were not built.
fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    let f = F.get_or_init(|| {
        let generate = binary("generate")?;
        let dir = tempfile::tempdir().unwrap();
        let model_path = dir.path().join("synth.gguf");
        SynthModel::random(SynthConfig::default())
            .write_gguf(&model_path)
            .unwrap();
        let expected = expected_from_rust(&model_path);
        let out = parse(&run(example_cmd(&generate, &model_path)));
        Some(Fixture {
            _dir: dir,
            model_path,
            expected,
            generate: out,
        })
    });
    if f.is_none() {
        println!("SKIPPED: run scripts/test-examples");
    }
    f.as_ref()
}

/// Check an example's lines against the Rust API. `needs_end`: the output
/// must end with an `end` line (generate.c's format); otherwise it may.
fn check_against_rust(what: &str, lines: &[Line], exp: &Expected, needs_end: bool) {
    let mut frames = BTreeMap::new();
    let mut tokens = Vec::new();
    let mut ends = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        match l {
            Line::Frame {
                name,
                step,
                seq,
                pos,
                l2,
            } => {
                let key = (*step, name.clone(), *seq, *pos);
                assert!(
                    frames.insert(key.clone(), *l2).is_none(),
                    "{what}: frame {key:?} printed twice"
                );
            }
            Line::Token {
                step,
                seq,
                pos,
                id,
                logprob,
            } => tokens.push((*step, *seq, *pos, *id, *logprob)),
            Line::End { frames, drops } => {
                assert_eq!(i, lines.len() - 1, "{what}: `end` is not the last line");
                ends.push((*frames, *drops));
            }
        }
    }
    let got_keys: Vec<_> = frames.keys().collect();
    let want_keys: Vec<_> = exp.frames.keys().collect();
    assert_eq!(
        got_keys, want_keys,
        "{what}: set of (step, name, seq, pos) frames"
    );
    for (k, &want) in &exp.frames {
        let got = frames[k];
        assert!(
            close_rel(got, want, L2_REL_TOL),
            "{what}: frame {k:?}: l2 {got} vs Rust {want}"
        );
    }
    assert_eq!(tokens.len(), exp.tokens.len(), "{what}: number of tokens");
    for (k, (g, w)) in tokens.iter().zip(&exp.tokens).enumerate() {
        assert_eq!(
            (g.0, g.1, g.2, g.3),
            (w.0, w.1, w.2, w.3),
            "{what}: token {k} (step, seq, pos, id)"
        );
        assert!(
            (g.4 - w.4).abs() <= LOGPROB_TOL,
            "{what}: token {k}: logprob {} vs Rust {}",
            g.4,
            w.4
        );
    }
    if needs_end {
        assert_eq!(ends.len(), 1, "{what}: no `end` line");
    }
    for &(frames, drops) in &ends {
        assert_eq!(
            (frames, drops),
            (exp.end_frames, exp.end_drops),
            "{what}: end frames/drops"
        );
    }
}

/// Line for line equal to generate.c's output, up to float last digits.
/// `needs_end` false lets the example leave out generate.c's final `end` line.
fn check_against_generate(what: &str, lines: &[Line], generate: &[Line], needs_end: bool) {
    let reference = match (needs_end, lines.last(), generate.split_last()) {
        (false, Some(l), Some((Line::End { .. }, head))) if !matches!(l, Line::End { .. }) => head,
        _ => generate,
    };
    assert_eq!(
        lines.len(),
        reference.len(),
        "{what}: {} lines vs generate.c's {}",
        lines.len(),
        reference.len()
    );
    for (i, (a, b)) in lines.iter().zip(reference).enumerate() {
        assert!(
            same_line(a, b),
            "{what}: line {}: {a:?}\n  generate.c: {b:?}",
            i + 1
        );
    }
}

fn check_example(what: &str, cmd: impl FnOnce(&Path) -> Command, needs_end: bool) {
    let Some(f) = fixture() else { return };
    let lines = parse(&run(cmd(&f.model_path)));
    check_against_rust(what, &lines, &f.expected, needs_end);
    check_against_generate(what, &lines, &f.generate, needs_end);
    println!("{what}: {} lines match", lines.len());
}

fn check_binary(name: &str, needs_end: bool) {
    if fixture().is_none() {
        return;
    }
    let Some(bin) = binary(name) else { return };
    check_example(name, |m| example_cmd(&bin, m), needs_end);
}

/// The plugin example exists once examples/c/plugin.c does.
fn check_plugin(name: &str) {
    if !root().join("examples/c/plugin.c").is_file() {
        println!("SKIPPED: examples/c/plugin.c does not exist");
        return;
    }
    check_binary(name, false);
}

#[test]
fn generate_c_matches_rust_api() {
    let Some(f) = fixture() else { return };
    check_against_rust("generate", &f.generate, &f.expected, true);
}

#[test]
fn stream_cpp_matches() {
    check_binary("stream", true);
}

#[test]
fn plugin_c_matches() {
    check_plugin("plugin");
}

#[test]
fn generate_c_under_sanitizers_matches() {
    check_binary("generate-asan", true);
}

#[test]
fn stream_cpp_under_sanitizers_matches() {
    check_binary("stream-asan", true);
}

#[test]
fn plugin_c_under_sanitizers_matches() {
    check_plugin("plugin-asan");
}

/// The capture mode a plugin binary reports on stderr.
fn plugin_mode(name: &str) -> Option<String> {
    let f = fixture()?;
    let bin = binary(name)?;
    let o = example_cmd(&bin, &f.model_path).output().unwrap();
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let line = err.lines().find(|l| l.starts_with("capture mode: "));
    Some(line.unwrap_or_else(|| panic!("{name}: no capture mode line in {err}"))[14..].to_string())
}

#[test]
fn plugin_linked_with_the_wrap_flags_defers() {
    if let Some(m) = plugin_mode("plugin") {
        assert_eq!(m, "deferred");
    }
}

#[test]
fn plugin_without_the_wrap_flags_falls_back_to_callback_and_matches() {
    if !root().join("examples/c/plugin.c").is_file() {
        return;
    }
    if let Some(m) = plugin_mode("plugin-nowrap") {
        assert_eq!(m, "callback");
        check_binary("plugin-nowrap", false);
    }
}

#[test]
fn python_ctypes_matches() {
    if fixture().is_none() {
        return;
    }
    check_example(
        "ctypes_stream.py",
        |m| {
            let mut c = Command::new(std::env::var_os("PYTHON").unwrap_or("python3".into()));
            c.arg(root().join("examples/python/ctypes_stream.py"))
                .arg(m)
                .arg(PROMPT)
                .arg(N_PREDICT.to_string())
                .current_dir(root());
            c
        },
        true,
    );
}

fn python() -> Command {
    Command::new(std::env::var_os("PYTHON").unwrap_or("python3".into()))
}

/// `read_run.py --help` is help, not a traceback; a directory that is not a
/// run is one `error:` line; a `capture -p` directory reads like a one-shard
/// dataset whose prompt is the sequence (needs numpy, as the reader does).
#[test]
fn read_run_py_help_and_capture_p_dir() {
    let script = root().join("examples/python/read_run.py");
    let o = python().arg(&script).arg("--help").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.starts_with("usage: read_run.py"), "{out}");
    assert!(
        out.contains("--layer") && out.contains("--prompts A:B"),
        "{out}"
    );

    let dir = std::env::temp_dir().join(format!("lt-read-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let o = python()
        .arg(&script)
        .arg(dir.join("nothing"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("no manifest.json"),
        "{err}"
    );

    let model = dir.join("synth.gguf");
    SynthModel::random(SynthConfig::default())
        .write_gguf(&model)
        .unwrap();
    let run = dir.join("paris");
    let o = Command::new(env!("CARGO_BIN_EXE_latent-tap"))
        .args(["capture", "-q", "-m"])
        .arg(&model)
        .args(["-p", "hello world", "-p", "a second prompt", "-n", "3"])
        .args(["--tensors", "l_out-*", "-o"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // What the file holds, read here in Rust: rows and sequences of l_out-1.
    let bytes = std::fs::read(run.join("latents.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let seq: Vec<i32> = st
        .tensor("l_out-1.seq")
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let n0 = seq.iter().filter(|&&s| s == 0).count();
    assert!(n0 > 0 && n0 < seq.len(), "two sequences: {seq:?}");

    let check = r#"
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from read_run import Run
run = Run([sys.argv[2]])
x = run.array("l_out-1")
rows = list(run.rows(tensors="l_out-1", prompts=[0]))
print(len(x), x.shape[1], sum(len(p) for _, _, p, _ in rows), sorted({int(v) for _, _, p, _ in rows for v in p}))
"#;
    let o = python()
        .arg("-c")
        .arg(check)
        .arg(root().join("examples/python"))
        .arg(&run)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("{} 64 {n0} [0]", seq.len()),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = python()
        .arg(&script)
        .arg(&run)
        .arg("--layer")
        .arg("1")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.starts_with(&format!("l_out-1 rows {} prompts 2 mean_l2 ", seq.len())),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
