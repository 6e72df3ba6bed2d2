//! `latent-tap serve`'s per-request latents budget (`--max-latents-mb`): refused
//! before the work when the request says how much it needs, stopped when it gets
//! there, a slow reader of a stream cut off instead of buffered without bound, and
//! the memory a large request took bounded by its budget and given back. Also the
//! shutdown: 503 during the grace period, cut streams end with an error.

mod common;
use common::http::{get, json_of, post, records, sse_events, Server};
use common::synth_model;

use std::error::Error as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use latent_tap::synth::{SynthConfig, SynthModel};
use serde_json::{json, Value};

const FRAMES: &str = "application/vnd.latent-tap.frames";

/// Status, `error.type` and `error.message` of an error answer.
fn error_of((status, body): (u16, Vec<u8>)) -> (u16, String, String) {
    let v = json_of(&body);
    assert_eq!(v["error"]["code"], status, "{v}");
    let s = |k: &str| v["error"][k].as_str().unwrap_or_default().to_string();
    (status, s("type"), s("message"))
}

/// Bytes one token position adds to a selection: the answer's widths in f32.
fn row_bytes(latents: &Value) -> usize {
    latents
        .as_object()
        .unwrap()
        .values()
        .map(|t| t["shape"][1].as_u64().unwrap() as usize * 4)
        .sum()
}

/// What every budget message says: the budget and what to do instead.
fn assert_advice(msg: &str, budget: &str) {
    for part in [
        budget,
        "--max-latents-mb",
        "fewer tensors or layers",
        "\"rows\": \"last\"",
        "\"dtype\": \"f16\"",
        "the binary stream (Accept: application/vnd.latent-tap.frames)",
        "GET /latents/subscribe",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
}

fn summary_is_ok(recs: &[(u32, Vec<u8>)]) -> bool {
    recs.last()
        .is_some_and(|(k, r)| *k == 5 && json_record(r).get("error").is_none())
}

fn json_record(rec: &[u8]) -> Value {
    let len = u64::from_le_bytes(rec[8..16].try_into().unwrap()) as usize;
    json_of(&rec[16..16 + len])
}

/// A raw HTTP/1.1 POST on its own connection; the caller reads (or does not).
fn raw_post(url: &str, path: &str, body: &Value, accept: &str) -> TcpStream {
    let addr = url.trim_start_matches("http://");
    let mut c = TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    write!(
        c,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: {accept}\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    c
}

/// The body of a chunked HTTP/1.1 response read to its end.
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut b = &raw[head_end..];
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

/// Bytes read from `c` until `done` says the accumulated bytes are enough.
fn read_until(c: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&got) {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn idle(s: &Server) -> bool {
    let v = json_of(&get(&s.url("/slots"), &[]).1);
    v.as_array()
        .unwrap()
        .iter()
        .all(|s| s["is_processing"] == false)
}

#[test]
fn latents_over_the_budget_are_refused_before_the_work_or_stopped_when_reached() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &["-c", "2048", "-np", "1", "--max-latents-mb", "1"]);
    let url = s.url("/completion");
    // The selection's row size, from a small answer that fits.
    let (st, b) = post(
        &url,
        &json!({"prompt": "Hi", "n_predict": 1, "latents": "*"}),
        &[],
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let v = json_of(&b);
    let row = row_bytes(&v["latents"]);
    let n_tensors = v["latents"].as_object().unwrap().len();
    assert!(row > 1000, "{row}");
    // A prompt of token ids (exactly its length) with a token limit: the JSON
    // answer's size is known before it runs, and refused with the estimate.
    let n_prompt = (4 << 20) / row + 10;
    let prompt: Vec<i64> = (0..n_prompt as i64).map(|i| 1 + i % 200).collect();
    let (st, kind, msg) = error_of(post(
        &url,
        &json!({"prompt": prompt, "n_predict": 4, "latents": "*"}),
        &[],
    ));
    assert_eq!((st, kind.as_str()), (400, "invalid_request_error"), "{msg}");
    let rows = n_prompt + 3;
    let est = format!(
        "this request's JSON answer ({rows} rows × {row} bytes: {n_tensors} tensors in f32) would hold {:.1} MiB",
        (rows * row) as f64 / (1u64 << 20) as f64
    );
    assert!(msg.contains(&est), "{est:?} not in {msg}");
    assert_advice(&msg, "budget of 1.0 MiB per request");
    // Without a token limit: what the prompt alone needs, "at least".
    let (st, _, msg) = error_of(post(&url, &json!({"prompt": prompt, "latents": "*"}), &[]));
    assert_eq!(st, 400);
    assert!(
        msg.contains(&format!("(at least {n_prompt} rows × {row} bytes")),
        "{msg}"
    );
    // SSE holds one step per chunk: the prompt's step is the one refused.
    let (st, _, msg) = error_of(post(
        &url,
        &json!({"prompt": prompt, "n_predict": 4, "stream": true, "latents": "*"}),
        &[],
    ));
    assert_eq!(st, 400);
    assert!(
        msg.contains(&format!(
            "the SSE chunk of the prompt's step ({n_prompt} rows"
        )),
        "{msg}"
    );
    // `rows: last` and f16 fit: the advice works.
    let (st, b) = post(
        &url,
        &json!({"prompt": prompt, "n_predict": 4, "latents": {"tensors": "*", "rows": "last", "dtype": "f16"}}),
        &[],
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    // The binary stream is not refused: it streams instead of holding.
    let (st, b) = post(
        &url,
        &json!({"prompt": prompt, "n_predict": 4, "latents": "*"}),
        &[("Accept", FRAMES)],
    );
    assert_eq!(st, 200);
    let recs = records(&b);
    let frame_bytes: usize = recs.iter().filter(|r| r.0 == 1).map(|r| r.1.len()).sum();
    // More than the budget went out (the estimate is an upper bound: the last
    // layer and `result_*` have only the sampled rows).
    assert!(frame_bytes > 3 << 19, "{frame_bytes}");
    assert!(
        summary_is_ok(&recs),
        "{:?}",
        json_record(&recs.last().unwrap().1)
    );
    let summary = json_record(&recs.last().unwrap().1);
    assert_eq!(summary["tokens_predicted"], 4);
    // No token limit and a short prompt: nothing to refuse before; the answer
    // grows a row per token until it passes the budget, and is stopped there.
    let (st, _, msg) = error_of(post(
        &url,
        &json!({"prompt": "Hi", "ignore_eos": true, "latents": "*"}),
        &[],
    ));
    assert_eq!(st, 400, "{msg}");
    assert!(
        msg.contains("this request's JSON answer came to hold more than this server's budget of 1.0 MiB per request (--max-latents-mb), so it was stopped"),
        "{msg}"
    );
    assert_advice(&msg, "1.0 MiB");
    // The slot is free again and the server answers.
    let t0 = Instant::now();
    while !idle(&s) {
        assert!(t0.elapsed() < Duration::from_secs(60), "slot still busy");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (st, _) = post(&url, &json!({"prompt": "Hi", "n_predict": 2}), &[]);
    assert_eq!(st, 200);
}

/// A binary stream whose client never reads: the server does not buffer it
/// without bound. Past the budget of queued frames the request is stopped and,
/// once the client reads, its stream ends with the JSON error record.
#[test]
fn a_stream_that_is_not_read_is_stopped_at_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &["-c", "8192", "-np", "1", "--max-latents-mb", "1"]);
    // Unbounded: up to 8192 rows of every tensor, far more than the budget and
    // the sockets' buffers.
    let mut c = raw_post(
        &s.url(""),
        "/completion",
        &json!({"prompt": "Hi", "ignore_eos": true, "latents": "*"}),
        FRAMES,
    );
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    while !idle(&s) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the unread request kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let recs = records(&dechunk(&raw));
    let (kind, last) = recs.last().unwrap();
    assert_eq!(*kind, 5);
    let e = json_record(last);
    assert_eq!(e["error"]["code"], 400, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("the client read this answer too slowly: more than 1.0 MiB of latents waited to be sent (--max-latents-mb)"),
        "{msg}"
    );
    // It stopped well before the slot was full.
    let tokens = recs.iter().filter(|r| r.0 == 2 && r.1[24] & 1 == 0).count();
    assert!(tokens < 8000, "{tokens}");
}

/// `VmRSS` and `VmHWM` of a process, in bytes.
fn mem_of(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {k} in /proc/{pid}/status"))
            * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

fn wider_model(dir: &Path) -> PathBuf {
    let p = dir.join("wide.gguf");
    SynthModel::random(SynthConfig {
        n_layer: 4,
        n_embd: 256,
        n_ff: 512,
        n_ctx_train: 2048,
        ..SynthConfig::default()
    })
    .write_gguf(&p)
    .unwrap();
    p
}

const MIB: u64 = 1 << 20;

/// The memory a large JSON answer takes: its peak over the idle server stays
/// within its budget (in raw latents) plus the base64 text of the answer (4/3
/// of them) and a margin, and it is given back afterwards. Measured from
/// `/proc/PID/status` of the server (VmHWM reset through `clear_refs`, else
/// polled).
#[test]
#[cfg(target_os = "linux")]
fn a_large_answer_takes_about_its_budget_and_gives_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let m = wider_model(dir.path());
    let budget_mb = 64u64;
    let s = Server::start(
        &m,
        &[
            "-c",
            "2048",
            "-np",
            "1",
            "--ring-mb",
            "16",
            "--max-latents-mb",
            &budget_mb.to_string(),
        ],
    );
    let url = s.url("/completion");
    let (st, b) = post(
        &url,
        &json!({"prompt": "Hi", "n_predict": 1, "latents": "*"}),
        &[],
    );
    assert_eq!(st, 200);
    let row = row_bytes(&json_of(&b)["latents"]) as u64;
    // As many rows as the budget allows (the estimate is rows × row size).
    let n_prompt = (budget_mb * MIB / row) as usize - 2;
    let prompt: Vec<i64> = (0..n_prompt as i64).map(|i| 1 + i % 200).collect();
    let big = json!({"prompt": prompt, "n_predict": 1, "latents": "*"});
    // Warm up with the same prompt and small latents: compute buffers and KV
    // cache are then as large as they will be.
    for _ in 0..2 {
        let small =
            json!({"prompt": prompt, "n_predict": 1, "latents": {"tensors": "*", "rows": "last"}});
        assert_eq!(post(&url, &small, &[]).0, 200);
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = s.pid();
    let (base, _) = mem_of(pid);
    let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    // Poll the peak meanwhile, in case VmHWM could not be reset.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poll = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(mem_of(pid).0);
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    let (st, b) = post(&url, &big, &[]);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let polled = poll.join().unwrap();
    assert_eq!(
        st,
        200,
        "{}",
        String::from_utf8_lossy(&b[..b.len().min(400)])
    );
    let v = json_of(&b);
    let raw: u64 = v["latents"]
        .as_object()
        .unwrap()
        .values()
        .map(|t| t["shape"][0].as_u64().unwrap() * t["shape"][1].as_u64().unwrap() * 4)
        .sum();
    let budget = budget_mb * MIB;
    assert!(raw > budget / 2 && raw <= budget, "{raw}");
    drop((b, v));
    let peak = if reset { mem_of(pid).1 } else { polled };
    let grew = peak.saturating_sub(base);
    eprintln!(
        "latents {} MiB: idle {} MiB, peak +{} MiB (VmHWM reset: {reset}, polled peak {} MiB)",
        raw / MIB,
        base / MIB,
        grew / MIB,
        polled / MIB
    );
    let allowed = budget * 4 / 3 + 48 * MIB;
    assert!(
        grew <= allowed,
        "the answer of {} MiB of latents took {} MiB at its peak (allowed {} MiB; idle {} MiB)",
        raw / MIB,
        grew / MIB,
        allowed / MIB,
        base / MIB
    );
    // Given back: idle RSS returns near where it was.
    let t0 = Instant::now();
    let after = loop {
        let now = mem_of(pid).0;
        if now <= base + 24 * MIB || t0.elapsed() > Duration::from_secs(10) {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("idle after: {} MiB", after / MIB);
    assert!(
        after <= base + 24 * MIB,
        "idle RSS {} MiB after the answer, {} MiB before",
        after / MIB,
        base / MIB
    );
}

/// SIGTERM while streams run: during the grace period the server still
/// listens and answers `/health` and new requests 503; streams still running
/// when it ends get an SSE error event / the binary JSON error record, not an
/// ordinary last chunk; then the process exits 0.
#[test]
fn shutdown_answers_503_in_the_grace_period_and_cut_streams_end_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    // A context so long that generating to its end outlasts the grace period.
    let mut s = Server::start(&m, &["-c", "131072", "-np", "2", "--shutdown-grace", "5"]);
    let long = json!({"prompt": "go", "ignore_eos": true, "stream": true, "n_probs": 5});
    let mut sse = raw_post(&s.url(""), "/completion", &long, "text/event-stream");
    let mut bin = raw_post(&s.url(""), "/completion", &long, FRAMES);
    // Both are running (in a slot, not queued): the SSE stream's first token
    // event and the binary stream's first record (REQUEST begin) arrived.
    let sse_first = read_until(&mut sse, |b| b.windows(6).any(|w| w == b"data: "));
    let bin_first = read_until(&mut bin, |b| {
        b.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .is_some_and(|i| b.len() > i + 4 + 64)
    });
    let pid = s.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // In the grace period: the listener is open and says 503.
    // (200 until the signal is handled; never "connection refused" before 503.)
    let health = loop {
        let (st, b) = match ureq::get(&s.url("/health")).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(st, r)) => (st, r.into_string().unwrap()),
            Err(ureq::Error::Transport(t)) => {
                let refused = t
                    .source()
                    .and_then(|e| e.downcast_ref::<std::io::Error>())
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
                assert!(
                    !refused,
                    "the listener closed before answering 503: {t}; server stderr:\n{}",
                    s.stderr()
                );
                // A connection the server took just before the signal may be
                // closed unanswered (its graceful shutdown): try again.
                (0, String::new())
            }
        };
        if st == 503 {
            break json_of(b.as_bytes());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(health["error"]["type"], "unavailable_error", "{health}");
    assert_eq!(health["error"]["message"], "the server is shutting down");
    let (st, kind, msg) = error_of(post(
        &s.url("/completion"),
        &json!({"prompt": "Hi", "n_predict": 1}),
        &[],
    ));
    assert_eq!((st, kind.as_str()), (503, "unavailable_error"), "{msg}");
    // The streams are cut at the end of the grace period, with an error.
    let mut raw = sse_first;
    sse.read_to_end(&mut raw).unwrap();
    let events = sse_events(&dechunk(&raw));
    let last = json_of(events.last().unwrap().as_bytes());
    assert_eq!(last["error"]["code"], 503, "{last}");
    assert_eq!(
        last["error"]["message"],
        "the server is shutting down: the request was cut short at the end of the shutdown grace period"
    );
    assert!(
        !events.iter().any(|e| e.contains("\"stop\":true")),
        "a cut stream has no ordinary last chunk"
    );
    assert!(events.len() > 2, "{}", events.len());
    let mut raw = bin_first;
    bin.read_to_end(&mut raw).unwrap();
    let recs = records(&dechunk(&raw));
    let (kind, last) = recs.last().unwrap();
    assert_eq!(*kind, 5);
    let e = json_record(last);
    assert_eq!(e["error"]["code"], 503, "{e}");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}
