//! The LD_PRELOAD tap (`crates/latent-tap-preload`) on a fake shared-library
//! llama.cpp program (`tests/attach/`: libllama / libggml-base stand-ins
//! compiled against the vendored headers), so these run in CI in seconds.
//! `scripts/test-attach` does the same against a real llama-server.

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use common::bin;

/// The preload library this build produced: `cargo test` leaves it in
/// `target/<profile>/deps/`, `cargo build` beside the binary; the newer wins.
fn preload() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_latent-tap"));
    let name = "liblatent_tap_preload.so";
    let candidates = [
        bin.with_file_name("deps").join(name),
        bin.with_file_name(name),
    ];
    let newest = candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p.clone());
    newest.unwrap_or_else(|| {
        panic!(
            "{name} is missing next to {}: `cargo test --release` at the workspace root builds it \
             (or `cargo build --release -p latent-tap-preload`)",
            bin.display()
        )
    })
}

/// The vendored llama.cpp headers (llama.h, ggml.h, ggml-backend.h).
fn include_dirs() -> Vec<PathBuf> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pkg = v["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "llama-cpp-sys-2")
        .expect("llama-cpp-sys-2 in the dependency graph");
    let dir = Path::new(pkg["manifest_path"].as_str().unwrap())
        .parent()
        .unwrap()
        .join("llama.cpp");
    vec![dir.join("include"), dir.join("ggml/include")]
}

fn cc(args: &[&str], dir: &Path) {
    let mut c = Command::new("cc");
    c.args(["-O1", "-Wall", "-Wextra", "-Werror"]);
    for d in include_dirs() {
        c.arg(format!("-I{}", d.display()));
    }
    let st = c.args(args).current_dir(dir).status().unwrap();
    assert!(st.success(), "cc {args:?} failed");
}

/// Builds the fake host once: `DIR/fake_host` (and, with `broken`, a
/// libggml-base without `ggml_graph_node`).
fn fake(broken: bool) -> PathBuf {
    static DIRS: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    DIRS[broken as usize]
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!(
                "latent-tap-fake-host-{}-{}",
                std::process::id(),
                broken as u8
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/attach");
            let s = |f: &str| src.join(f).display().to_string();
            let rpath = format!("-Wl,-rpath,{}", dir.display());
            let mut ggml = vec!["-shared", "-fPIC", "-o", "libggml-base.so"];
            let g = s("fake_ggml.c");
            ggml.push(&g);
            if broken {
                ggml.push("-DOMIT_GRAPH_NODE");
            }
            cc(&ggml, &dir);
            let l = s("fake_llama.c");
            cc(
                &[
                    "-shared",
                    "-fPIC",
                    "-o",
                    "libllama.so",
                    &l,
                    "-L.",
                    "-lggml-base",
                    &rpath,
                ],
                &dir,
            );
            let h = s("fake_host.c");
            cc(
                &[
                    "-o",
                    "fake_host",
                    &h,
                    "-L.",
                    "-lllama",
                    "-lggml-base",
                    &rpath,
                ],
                &dir,
            );
            if !broken {
                // The same program loading libllama with dlopen after start-up.
                let lib = format!("-DFAKE_DLOPEN=\"{}\"", dir.join("libllama.so").display());
                cc(&["-o", "fake_host_dl", &h, &lib, "-ldl"], &dir);
            }
            dir.join("fake_host")
        })
        .clone()
}

/// The fake host that `dlopen`s libllama (`RTLD_NOW | RTLD_LOCAL`) after start.
fn fake_dl() -> PathBuf {
    fake(false).with_file_name("fake_host_dl")
}

/// Runs the fake host for `steps` decode steps.
fn host(broken: bool, steps: u32, sleep_ms: u32, env: &[(&str, &str)], tap: bool) -> Output {
    run_host(&fake(broken), steps, sleep_ms, env, tap)
}

/// Runs the fake host program `exe`.
fn run_host(exe: &Path, steps: u32, sleep_ms: u32, env: &[(&str, &str)], tap: bool) -> Output {
    run_host_as(None, exe, steps, sleep_ms, env, tap)
}

/// `setpriv` (util-linux) running a command as the unprivileged uid/gid 65534.
const OTHER_UID: u32 = 65534;
fn as_other_user() -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    c
}

/// Whether the tests can run programs as another user (root with setpriv).
fn other_user_available() -> bool {
    // SAFETY: plain getter.
    let root = unsafe { libc::geteuid() } == 0;
    root && as_other_user()
        .arg("true")
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the fake host program `exe`, as `OTHER_UID` with `other`.
fn run_host_as(
    other: Option<()>,
    exe: &Path,
    steps: u32,
    sleep_ms: u32,
    env: &[(&str, &str)],
    tap: bool,
) -> Output {
    let mut c = match other {
        Some(()) => {
            let mut c = as_other_user();
            c.arg(exe);
            c
        }
        None => Command::new(exe),
    };
    c.args([steps.to_string(), sleep_ms.to_string()])
        .env("FAKE_HOST_CB", "1")
        .env_remove("LD_PRELOAD");
    if tap {
        c.env("LD_PRELOAD", preload());
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "fake host failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tmp_sock(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("lt-attach-{}-{tag}.sock", std::process::id()))
}

#[test]
fn without_a_listener_the_host_runs_untouched() {
    let sock = tmp_sock("none");
    let plain = host(false, 5, 0, &[], false);
    let tapped = host(
        false,
        5,
        0,
        &[("LATENT_TAP_SINK", sock.to_str().unwrap())],
        true,
    );
    // The host's own eval callback saw the same calls and the same values.
    assert_eq!(plain.stdout, tapped.stdout);
    assert!(String::from_utf8_lossy(&plain.stdout).contains("callback calls 9,"));
    let log = stderr(&tapped);
    assert!(log.contains("latent-tap: loaded: tensors l_out-*"), "{log}");
    assert!(!log.contains("attached"), "{log}");
}

#[test]
fn a_host_missing_a_symbol_is_a_logged_no_op() {
    let plain = host(true, 3, 0, &[], false);
    let tapped = host(true, 3, 0, &[], true);
    assert_eq!(plain.stdout, tapped.stdout);
    let log = stderr(&tapped);
    assert!(
        log.contains("latent-tap: ggml_graph_node is not in this process")
            && log.contains("the tap is off"),
        "{log}"
    );
}

#[test]
fn a_program_without_shared_llama_cpp_runs_untouched() {
    // latent-tap itself links llama.cpp statically: nothing to interpose
    // (and nothing looked up: the host's functions are found when first
    // called, which never happens here).
    let plain = bin().arg("--help").output().unwrap();
    let out = bin()
        .arg("--help")
        .env("LD_PRELOAD", preload())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(plain.stdout, out.stdout);
    let log = stderr(&out);
    assert!(log.contains("latent-tap: loaded"), "{log}");
    assert!(!log.contains("the tap is off"), "{log}");
}

/// A host that loads llama.cpp after start-up (`dlopen(RTLD_NOW |
/// RTLD_LOCAL)` and `dlsym`, as ctypes does for llama-cpp-python): the
/// preload's functions find the host's when first called; without a listener
/// the output is the plain run's, with one the rows arrive labelled and exact.
#[test]
fn a_host_that_dlopens_llama_cpp_late_is_served() {
    let sock = tmp_sock("dl");
    let _ = std::fs::remove_file(&sock);
    let env = [("LATENT_TAP_SINK", sock.to_str().unwrap())];
    let plain = run_host(&fake_dl(), 3, 0, &[], false);
    assert_eq!(plain.stdout, host(false, 3, 0, &[], false).stdout);
    let untapped = run_host(&fake_dl(), 3, 0, &env, true);
    assert_eq!(plain.stdout, untapped.stdout);
    let log = stderr(&untapped);
    assert!(!log.contains("not in this process"), "{log}");
    assert!(!log.contains("attached"), "{log}");

    let out = std::env::temp_dir().join(format!("lt-attach-dl-{}", std::process::id()));
    let l = Listen::start(&sock, &out);
    let tapped = run_host(&fake_dl(), 3, 0, &env, true);
    let run = l.stop();
    assert_eq!(plain.stdout, tapped.stdout);
    let log = stderr(&tapped);
    assert!(log.contains("listener 1 attached"), "{log}");
    assert_eq!(run.rows["l_out-0"].len(), 19, "{log}");
    assert_eq!(run.rows["l_out-2"].len(), 8);
    assert_eq!(assert_exact(&run), 46);
    assert_eq!(run.tokens.len(), 19);
    assert_eq!(run.manifest["attach"]["requests"], 2);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_settings_turn_the_tap_off_with_the_variable_named() {
    let plain = host(false, 2, 0, &[], false);
    for (k, v) in [("LATENT_TAP_DTYPE", "f64"), ("LATENT_TAP_RING_MB", "0")] {
        let tapped = host(false, 2, 0, &[(k, v)], true);
        assert_eq!(plain.stdout, tapped.stdout);
        let log = stderr(&tapped);
        assert!(log.contains(k) && log.contains("the tap is off"), "{log}");
    }
}

/// A listener that accepts and never reads: the ring fills, frames are
/// dropped and counted, the host never waits.
#[test]
fn a_listener_that_never_reads_costs_the_host_nothing_but_drops() {
    let sock = tmp_sock("stuck");
    let _ = std::fs::remove_file(&sock);
    let l = UnixListener::bind(&sock).unwrap();
    let plain = host(false, 3000, 0, &[], false); // (also compiles the fake host)
    let path = sock.clone();
    let child = std::thread::spawn(move || {
        host(
            false,
            3000,
            1,
            &[
                ("LATENT_TAP_SINK", path.to_str().unwrap()),
                ("LATENT_TAP_RING_MB", "1"),
                ("LATENT_TAP_TENSORS", "l_out-*,inp_embd"),
            ],
            true,
        )
    });
    let (conn, _) = l.accept().unwrap();
    // Hold the connection (and with it the host's ring) for a while, then leave.
    std::thread::sleep(Duration::from_millis(2000));
    drop(conn);
    let tapped = child.join().unwrap();
    assert_eq!(plain.stdout, tapped.stdout);
    let log = stderr(&tapped);
    let left = log
        .lines()
        .find(|l| l.contains("listener 1 left after"))
        .unwrap_or_else(|| panic!("{log}"));
    // "listener 1 left after N frames (M dropped)"
    let nums: Vec<u64> = left
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    let (frames, dropped) = (nums[1], nums[2]);
    assert!(dropped > 0 && frames > dropped, "{left}");
    let _ = std::fs::remove_file(&sock);
}

/// llama.cpp's split_equal (several KV streams) may reorder a batch's rows;
/// rows that then match several sequences (same token, same position) are
/// not labelled: those graphs are skipped, never mislabelled.
#[test]
fn reordered_rows_that_match_several_sequences_are_skipped() {
    let sock = tmp_sock("reorder");
    let _ = std::fs::remove_file(&sock);
    let l = UnixListener::bind(&sock).unwrap();
    l.set_nonblocking(true).unwrap();
    let env = [("FAKE_REORDER", "1"), ("FAKE_SAME", "1")];
    let plain = host(false, 3, 0, &env, false);
    let mut tapped_env = env.to_vec();
    tapped_env.push(("LATENT_TAP_SINK", sock.to_str().unwrap()));
    let tapped = host(false, 3, 0, &tapped_env, true);
    assert_eq!(plain.stdout, tapped.stdout);
    let log = stderr(&tapped);
    assert!(
        log.contains("a graph was not tapped: llama.cpp reordered the batch")
            && log.contains("same token and position in several sequences"),
        "{log}"
    );
    let _ = std::fs::remove_file(&sock);
}

/// The preload reads `struct ggml_tensor` and `struct llama_batch` through its
/// own mirrors (it links no llama.cpp): they match the vendored headers.
#[test]
fn the_preloads_struct_mirrors_match_the_vendored_headers() {
    use llama_cpp_sys_2 as sys;
    assert_eq!(std::mem::size_of::<sys::ggml_tensor>(), 336);
    assert_eq!(std::mem::offset_of!(sys::ggml_tensor, name), 256);
    assert_eq!(std::mem::offset_of!(sys::ggml_tensor, data), 248);
    assert_eq!(std::mem::offset_of!(sys::ggml_tensor, src), 152);
    assert_eq!(std::mem::offset_of!(sys::ggml_tensor, ne), 16);
    assert_eq!(std::mem::offset_of!(sys::ggml_tensor, nb), 48);
    assert_eq!(std::mem::size_of::<sys::llama_batch>(), 56);
    assert_eq!(std::mem::offset_of!(sys::llama_batch, logits), 48);
    // ggml_tensor_overhead() = sizeof(ggml_object) + sizeof(ggml_tensor).
    // SAFETY: a pure query.
    assert_eq!(unsafe { sys::ggml_tensor_overhead() }, 336 + 32);
}

// ---------------------------------------------------------------------------
// End to end: fake host under the preload → `latent-tap listen --out`.

/// A running `latent-tap listen --out`.
struct Listen {
    child: std::process::Child,
    out: PathBuf,
}

/// How a test listener runs.
#[derive(Default)]
struct ListenHow<'a> {
    args: &'a [&'a str],
    /// As `OTHER_UID` (its --out directory is made theirs).
    other_user: bool,
    /// Under umask 000.
    umask0: bool,
    /// Its stderr goes here.
    stderr: Option<std::fs::File>,
}

impl Listen {
    fn start(sock: &Path, out: &Path) -> Self {
        Self::start_how(sock, out, ListenHow::default())
    }

    fn start_how(sock: &Path, out: &Path, how: ListenHow) -> Self {
        use std::os::unix::process::CommandExt;
        let _ = std::fs::remove_dir_all(out);
        let mut c = if how.other_user {
            std::fs::create_dir_all(out).unwrap();
            std::os::unix::fs::chown(out, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
            let mut c = as_other_user();
            c.arg(env!("CARGO_BIN_EXE_latent-tap"));
            c
        } else {
            bin()
        };
        c.args(["listen", "-q", "--sink"])
            .arg(sock)
            .arg("--out")
            .arg(out)
            .args(how.args)
            .stdout(std::process::Stdio::null());
        if let Some(f) = how.stderr {
            c.stderr(f);
        }
        if how.umask0 {
            // SAFETY: umask is async-signal-safe; nothing else runs in the child.
            unsafe {
                c.pre_exec(|| {
                    libc::umask(0);
                    Ok(())
                });
            }
        }
        let child = c.spawn().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !out.join("manifest.json").exists() || !sock.exists() {
            assert!(std::time::Instant::now() < deadline, "listen did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            out: out.to_path_buf(),
        }
    }

    /// SIGINT; the run directory's token lines and tensors.
    fn stop(mut self) -> Run {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        assert!(self.child.wait().unwrap().success());
        Run::read(&self.out)
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// What a listen run holds: token lines and, per tensor, (seq, pos, row values).
struct Run {
    manifest: serde_json::Value,
    tokens: Vec<serde_json::Value>,
    rows: std::collections::BTreeMap<String, Vec<(i32, i32, Vec<f32>)>>,
}

impl Run {
    fn read(dir: &Path) -> Self {
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let tokens = common::tokens(dir);
        let mut rows = std::collections::BTreeMap::<String, Vec<_>>::new();
        for s in manifest["shards"].as_array().unwrap() {
            let bytes = std::fs::read(dir.join(s["file"].as_str().unwrap())).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for t in manifest["tensors"].as_array().unwrap() {
                let name = t["name"].as_str().unwrap();
                let Ok(x) = st.tensor(name) else { continue };
                let i32s = |n: &str| -> Vec<i32> {
                    st.tensor(n)
                        .unwrap()
                        .data()
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                };
                let (pos, seq) = (i32s(&format!("{name}.pos")), i32s(&format!("{name}.seq")));
                let w = x.shape()[1];
                let vals: Vec<f32> = x
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let e = rows.entry(name.to_string()).or_default();
                for (i, (&p, &q)) in pos.iter().zip(&seq).enumerate() {
                    e.push((q, p, vals[i * w..(i + 1) * w].to_vec()));
                }
            }
        }
        Self {
            manifest,
            tokens,
            rows,
        }
    }
}

/// The fake host's token at (seq, pos): prompts 10.. / 50.. (6 and 7 tokens),
/// then +1 per step from 20 / 60.
fn fake_token(seq: i32, pos: i32) -> i32 {
    match seq {
        0 if pos < 6 => 10 + pos,
        0 => 20 + (pos - 5),
        _ if pos < 7 => 50 + pos,
        _ => 60 + (pos - 6),
    }
}

/// Every row the listener wrote carries the token, position and values the
/// fake host computed for it (`fake_value` in tests/attach/fake_llama.c).
fn assert_exact(run: &Run) -> usize {
    let mut n = 0;
    for (name, rows) in &run.rows {
        let layer: i32 = name.rsplit('-').next().unwrap().parse().unwrap();
        for (seq, pos, v) in rows {
            let tok = fake_token(*seq, *pos);
            for (j, x) in v.iter().enumerate() {
                let want = (layer * 10000 + tok * 100 + pos) as f32 + 0.125 * j as f32;
                assert_eq!(*x, want, "{name} seq {seq} pos {pos} element {j}");
            }
            n += 1;
        }
    }
    for t in &run.tokens {
        let (seq, pos) = (
            t["seq"].as_i64().unwrap() as i32,
            t["pos"].as_i64().unwrap() as i32,
        );
        assert_eq!(
            t["token"].as_i64().unwrap() as i32,
            fake_token(seq, pos),
            "{t}"
        );
    }
    n
}

#[test]
fn rows_reach_listen_labelled_exact_and_paired() {
    // offload: the graph as ggml's scheduler leaves it when layers run on RPC
    // workers or a GPU (nodes read stale copies of the inputs; see fake_llama.c).
    for (reorder, offload) in [(false, false), (true, false), (false, true)] {
        let sock = tmp_sock(match (reorder, offload) {
            (true, _) => "e2e-r",
            (_, true) => "e2e-o",
            _ => "e2e",
        });
        let out = std::env::temp_dir().join(format!(
            "lt-attach-e2e-{}-{reorder}-{offload}",
            std::process::id()
        ));
        let l = Listen::start(&sock, &out);
        let mut env = vec![("LATENT_TAP_SINK", sock.to_str().unwrap())];
        if reorder {
            env.push(("FAKE_REORDER", "1"));
        }
        if offload {
            env.push(("FAKE_OFFLOAD", "1"));
        }
        let tapped = host(false, 3, 0, &env, true);
        assert_eq!(tapped.stdout, host(false, 3, 0, &env, false).stdout);
        let run = l.stop();
        assert!(run.rows.contains_key("l_out-0"), "{}", stderr(&tapped));
        // 13 prompt rows + 3 steps x 2 sequences; the last layer only has
        // the output rows (last prompt token of each sequence and every step).
        assert_eq!(run.rows["l_out-0"].len(), 19, "reorder {reorder}");
        assert_eq!(run.rows["l_out-1"].len(), 19);
        assert_eq!(
            run.rows["l_out-2"].len(),
            8,
            "reorder {reorder} offload {offload}"
        );
        assert_eq!(assert_exact(&run), 46);
        assert_eq!(run.tokens.len(), 19);
        // Pairing: prompt rows, then sampled ones; sampled_next is the next
        // row's token after an output row, and null for the last one.
        for t in &run.tokens {
            let (seq, pos) = (
                t["seq"].as_i64().unwrap() as i32,
                t["pos"].as_i64().unwrap() as i32,
            );
            let n_prompt = if seq == 0 { 6 } else { 7 };
            let last = n_prompt + 2;
            assert_eq!(t["prompt"], pos < n_prompt, "{t}");
            assert_eq!(t["output"], pos >= n_prompt - 1, "{t}");
            let next = if pos >= n_prompt - 1 && pos < last {
                serde_json::json!(fake_token(seq, pos + 1))
            } else {
                serde_json::Value::Null
            };
            assert_eq!(t["sampled_next"], next, "{t}");
        }
        assert_eq!(run.manifest["attach"]["drops"], 0);
        assert_eq!(run.manifest["attach"]["requests"], 2);
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn a_listener_started_late_gets_the_rows_from_the_next_graph_on() {
    let sock = tmp_sock("late");
    let _ = std::fs::remove_file(&sock);
    let out = std::env::temp_dir().join(format!("lt-attach-late-{}", std::process::id()));
    fake(false); // compiled before the clock starts
    let s = sock.clone();
    let h = std::thread::spawn(move || {
        host(
            false,
            40,
            40,
            &[("LATENT_TAP_SINK", s.to_str().unwrap())],
            true,
        )
    });
    std::thread::sleep(Duration::from_millis(700));
    let l = Listen::start(&sock, &out);
    let tapped = h.join().unwrap();
    let run = l.stop();
    assert!(stderr(&tapped).contains("listener 1 attached"));
    assert_eq!(tapped.stdout, host(false, 40, 0, &[], false).stdout);
    // No prompt rows (computed before the listener), then every later step.
    let first = run.rows["l_out-0"].iter().map(|r| r.1).min().unwrap();
    assert!(first > 7, "first position {first}");
    assert!(
        run.rows["l_out-0"].len() >= 20,
        "{}",
        run.rows["l_out-0"].len()
    );
    assert_exact(&run);
    for seq in [0, 1] {
        let mut pos: Vec<i32> = run.rows["l_out-0"]
            .iter()
            .filter(|r| r.0 == seq)
            .map(|r| r.1)
            .collect();
        pos.sort();
        assert!(
            pos.windows(2).all(|w| w[1] == w[0] + 1),
            "seq {seq}: {pos:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_listener_killed_mid_stream_leaves_the_host_serving_and_the_next_one_attaches() {
    let sock = tmp_sock("killed");
    let out1 = std::env::temp_dir().join(format!("lt-attach-k1-{}", std::process::id()));
    let out2 = std::env::temp_dir().join(format!("lt-attach-k2-{}", std::process::id()));
    fake(false); // compiled before the clock starts
    let l1 = Listen::start(&sock, &out1);
    let s = sock.clone();
    let h = std::thread::spawn(move || {
        host(
            false,
            60,
            40,
            &[("LATENT_TAP_SINK", s.to_str().unwrap())],
            true,
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    l1.kill();
    std::thread::sleep(Duration::from_millis(300));
    let l2 = Listen::start(&sock, &out2);
    let tapped = h.join().unwrap();
    let run = l2.stop();
    assert_eq!(tapped.stdout, host(false, 60, 0, &[], false).stdout);
    let log = stderr(&tapped);
    assert!(log.contains("listener 1 left after"), "{log}");
    assert!(log.contains("listener 2 attached"), "{log}");
    assert!(
        run.rows["l_out-0"].len() >= 20,
        "{}",
        run.rows["l_out-0"].len()
    );
    assert_exact(&run);
    let _ = std::fs::remove_dir_all(&out1);
    let _ = std::fs::remove_dir_all(&out2);
}

// ---------------------------------------------------------------------------
// Who may talk to whom.

#[test]
fn the_listeners_socket_is_its_users_only_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let sock = tmp_sock("umask");
    let out = std::env::temp_dir().join(format!("lt-attach-umask-{}", std::process::id()));
    let l = Listen::start_how(
        &sock,
        &out,
        ListenHow {
            umask0: true,
            ..Default::default()
        },
    );
    let mode = std::fs::symlink_metadata(&sock)
        .unwrap()
        .permissions()
        .mode();
    let pid = l.child.id();
    l.kill();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // The private directory it was bound in is gone.
    let prefix = format!(".lt{pid}.");
    assert!(!std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with(&prefix)));
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_file(&sock);
}

/// A host running as another user than the listener's socket: the preload
/// sends nothing, says so once, and the host runs untouched.
#[test]
fn the_preload_refuses_a_socket_of_another_user() {
    if !other_user_available() {
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    let sock = tmp_sock("other-sock");
    let out = std::env::temp_dir().join(format!("lt-attach-os-{}", std::process::id()));
    let l = Listen::start(&sock, &out);
    let env = [("LATENT_TAP_SINK", sock.to_str().unwrap())];
    let plain = run_host_as(Some(()), &fake(false), 3, 0, &env, false);
    let tapped = run_host_as(Some(()), &fake(false), 3, 0, &env, true);
    let run = l.stop();
    assert_eq!(plain.stdout, tapped.stdout);
    let log = stderr(&tapped);
    assert!(
        log.contains("belongs to uid 0, not to this program's uid 65534")
            && log.contains("the tap is off"),
        "{log}"
    );
    assert_eq!(log.matches("belongs to uid").count(), 1, "{log}");
    assert!(run.rows.is_empty());
    let _ = std::fs::remove_dir_all(&out);
}

/// A listener running as another user: the preload refuses it unless
/// LATENT_TAP_ALLOW_UID names that user; then the listener refuses the host
/// (another uid than its own, no --allow-uid) and logs its uid and pid.
#[test]
fn another_users_listener_is_refused_and_refuses() {
    if !other_user_available() {
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    let dir = std::env::temp_dir().join(format!("lt-attach-ol-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    let sock = dir.join("s.sock");
    let out = dir.join("out");
    let err_path = std::env::temp_dir().join(format!("lt-attach-ol-{}.err", std::process::id()));
    let l = Listen::start_how(
        &sock,
        &out,
        ListenHow {
            other_user: true,
            stderr: Some(std::fs::File::create(&err_path).unwrap()),
            ..Default::default()
        },
    );
    let env = [("LATENT_TAP_SINK", sock.to_str().unwrap())];
    let plain = host(false, 3, 0, &env, false);
    let refused = host(false, 3, 0, &env, true);
    assert_eq!(plain.stdout, refused.stdout);
    let log = stderr(&refused);
    assert!(
        log.contains("belongs to uid 65534, not to this program's uid 0")
            && log.contains("the tap is off"),
        "{log}"
    );
    let allowed_env = [
        ("LATENT_TAP_SINK", sock.to_str().unwrap()),
        ("LATENT_TAP_ALLOW_UID", "65534"),
    ];
    let tapped = host(false, 3, 0, &allowed_env, true);
    assert_eq!(plain.stdout, tapped.stdout);
    let run = l.stop();
    assert!(run.rows.is_empty());
    let lerr = std::fs::read_to_string(&err_path).unwrap();
    assert!(
        lerr.contains("refused a host: pid ")
            && lerr.contains("runs as uid 0, this listener as uid 65534"),
        "{lerr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&err_path);
}

/// `listen --allow-uid` admits another user's host (which names the
/// listener's user in LATENT_TAP_ALLOW_UID): tapped, exact.
#[test]
fn listen_allow_uid_admits_another_users_host() {
    if !other_user_available() {
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    let sock = tmp_sock("allow");
    let out = std::env::temp_dir().join(format!("lt-attach-allow-{}", std::process::id()));
    let l = Listen::start_how(
        &sock,
        &out,
        ListenHow {
            args: &["--allow-uid", "65534"],
            ..Default::default()
        },
    );
    let env = [
        ("LATENT_TAP_SINK", sock.to_str().unwrap()),
        ("LATENT_TAP_ALLOW_UID", "0"),
    ];
    let tapped = run_host_as(Some(()), &fake(false), 3, 0, &env, true);
    let run = l.stop();
    assert_eq!(tapped.stdout, host(false, 3, 0, &[], false).stdout);
    assert!(
        stderr(&tapped).contains("listener 1 attached"),
        "{}",
        stderr(&tapped)
    );
    assert_eq!(assert_exact(&run), 46);
    let _ = std::fs::remove_dir_all(&out);
}
