//! `scripts/run-readme` on small Markdown files: what runs, what is skipped
//! and why, shown output checked, bounded waits, state carried from block to
//! block, background processes ended, bad markers refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run_readme(files: &[&Path], extra: &[&str]) -> Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Command::new(std::env::var_os("PYTHON").unwrap_or("python3".into()))
        .arg(root.join("scripts/run-readme"))
        .arg("--no-fetch")
        .args(extra)
        .args(files)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const FENCE: &str = "```";

fn doc(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body.replace("FENCE", FENCE)).unwrap();
    p
}

#[test]
fn blocks_run_in_order_with_state_skips_and_shown_output() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    let md = doc(
        dir.path(),
        "ok.md",
        &format!(
            r#"# A doc

<!-- readme-runner: run -->
FENCEsh
X=5; cd scripts
sleep 300 & echo $! > {pid}; sleep 0.5
FENCE

Unmarked, so not claimed runnable (this file is not README.md):

FENCEsh
exit 1
FENCE

<!-- readme-runner: skip (needs a Slurm cluster) -->
FENCEsh
sbatch job.sh
FENCE

<!-- readme-runner: run timeout=60 -->
FENCEsh
echo "x=$X in $(basename "$PWD")"
echo "a line nobody shows"
python3 -c 'print(6 * 7)'
FENCE

FENCEtext
x=5 in scripts
4...
FENCE

<!-- readme-runner: run -->
FENCEpython
import os
print("python in", os.path.basename(os.getcwd()))
FENCE
"#,
            pid = pidfile.display()
        ),
    );
    let o = run_readme(&[&md], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("3 blocks to run, 1 skipped, 1 not claimed runnable"),
        "{out}"
    );
    assert!(
        out.contains("SKIP ") && out.contains("(needs a Slurm cluster)"),
        "{out}"
    );
    assert!(out.contains("output matches"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("PASS ")).count(),
        3,
        "{out}"
    );
    assert!(
        out.contains("== run-readme: PASS: 3 blocks passed, 1 skipped"),
        "{out}"
    );
    // The session's background process was ended with it.
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    // Gone, or a zombie nobody reaped yet (a container's init may not).
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid.trim()).join("stat"));
    let alive = stat.is_ok_and(|s| {
        let state = s.rsplit_once(") ").map(|(_, r)| r.chars().next());
        state != Some(Some('Z'))
    });
    assert!(!alive, "background process {pid} still running");

    let list = run_readme(&[&md], &["--list"]);
    let l = text(&list);
    assert!(list.status.success(), "{l}");
    assert!(
        l.contains("skip") && l.contains("+output") && l.contains("timeout=60"),
        "{l}"
    );
}

#[test]
fn failures_mismatches_and_timeouts_fail() {
    let dir = tempfile::tempdir().unwrap();
    let fail = doc(
        dir.path(),
        "fail.md",
        "<!-- readme-runner: run -->\nFENCEsh\ntrue\nfalse\necho never\nFENCE\n",
    );
    let o = run_readme(&[&fail], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("exit status 1"), "{}", text(&o));

    let differs = doc(
        dir.path(),
        "differs.md",
        "<!-- readme-runner: run -->\nFENCEsh\necho 41\nFENCE\n\nFENCEtext\n42\nFENCE\n",
    );
    let o = run_readme(&[&differs], &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no longer matches; not found (in order): '42'"),
        "{}",
        text(&o)
    );

    let slow = doc(
        dir.path(),
        "slow.md",
        "<!-- readme-runner: run timeout=2 -->\nFENCEsh\nsleep 120\nFENCE\n",
    );
    let t0 = std::time::Instant::now();
    let o = run_readme(&[&slow], &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no end after 2 s (timeout)"),
        "{}",
        text(&o)
    );
    assert!(t0.elapsed().as_secs() < 60, "the wait was not bounded");
}

#[test]
fn bad_markers_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (body, want) in [
        (
            "<!-- readme-runner: skp -->\nFENCEsh\ntrue\nFENCE\n",
            "unknown marker 'skp'",
        ),
        (
            "<!-- readme-runner: skip () -->\nFENCEsh\ntrue\nFENCE\n",
            "skip needs a reason",
        ),
        (
            "<!-- readme-runner: run timeout=x -->\nFENCEsh\ntrue\nFENCE\n",
            "unknown run option 'timeout=x'",
        ),
        (
            "<!-- readme-runner: run -->\nFENCEyaml\na: 1\nFENCE\n",
            "only sh, bash and python blocks run",
        ),
    ] {
        let md = doc(dir.path(), "bad.md", body);
        let o = run_readme(&[&md], &["--list"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains(want), "'{want}' not in {}", text(&o));
    }
}
