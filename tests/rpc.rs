//! llama.cpp RPC: a model split over two local `latent-tap rpc-server` workers
//! gives the same tokens and latents as a local run (capture and serve), and
//! unreachable, busy or foreign workers and bad endpoints are one clear error
//! each, fast, instead of ggml's abort or hang.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use safetensors::SafeTensors;

/// A `latent-tap rpc-server` on a free loopback port, stopped when dropped.
struct Worker {
    child: Child,
    endpoint: String,
}

impl Worker {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = common::bin()
            .args(["rpc-server", "-t", "1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let endpoint = format!("127.0.0.1:{port}");
        let t0 = Instant::now();
        while TcpStream::connect(&endpoint).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "worker {endpoint} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // That connection was a client too: let the worker finish with it.
        std::thread::sleep(Duration::from_millis(200));
        Self { child, endpoint }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn capture(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    common::bin()
        .args([
            "capture",
            "-t",
            "1",
            "-n",
            "8",
            "--tensors",
            "l_out-*,attn_norm-*",
            "-q",
        ])
        .args(["-p", "The quick brown fox", "-p", "jumps over"])
        .arg("-m")
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_model_split_over_two_workers_equals_a_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_model(dir.path());
    let (w1, w2) = (Worker::start(), Worker::start());
    let rpc = format!("{},{}", w1.endpoint, w2.endpoint);
    let local = dir.path().join("local");
    let remote = dir.path().join("rpc");
    let o = capture(&model, &local, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = capture(&model, &remote, &["--rpc", &rpc]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(common::tokens(&local), common::tokens(&remote));
    let a = std::fs::read(local.join("latents.safetensors")).unwrap();
    let b = std::fs::read(remote.join("latents.safetensors")).unwrap();
    let (a, b) = (
        SafeTensors::deserialize(&a).unwrap(),
        SafeTensors::deserialize(&b).unwrap(),
    );
    let mut names: Vec<_> = a.names().into_iter().cloned().collect();
    names.sort();
    let mut names_b: Vec<_> = b.names().into_iter().cloned().collect();
    names_b.sort();
    assert_eq!(names, names_b);
    assert!(names.iter().any(|n| n == "l_out-2") && names.iter().any(|n| n == "attn_norm-0"));
    for n in &names {
        // Byte for byte: the workers run ggml's CPU backend, the same kernels.
        assert_eq!(
            a.tensor(n).unwrap().data(),
            b.tensor(n).unwrap().data(),
            "{n}"
        );
    }
    // The workers took the layers: the manifest's model loaded with --rpc, and
    // both workers are still alive and serve the next client.
    for w in [&w1, &w2] {
        latent_tap::rpc::probe(&w.endpoint, Duration::from_secs(5)).unwrap();
    }
}

#[test]
fn serve_over_rpc_answers_like_a_local_serve() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_model(dir.path());
    let (w1, w2) = (Worker::start(), Worker::start());
    let rpc = format!("{},{}", w1.endpoint, w2.endpoint);
    let body = serde_json::json!({"prompt": "hello there", "n_predict": 6, "temperature": 0,
        "latents": {"tensors": "l_out-*"}});
    let mut answers = Vec::new();
    for extra in [vec![], vec!["--rpc", rpc.as_str()]] {
        let srv = common::http::Server::start(&model, &extra);
        let (status, b) = common::http::post(&srv.url("/completion"), &body, &[]);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
        let v = common::http::json_of(&b);
        answers.push((
            v["content"].clone(),
            v["tokens"].clone(),
            v["latents"].clone(),
        ));
    }
    assert_eq!(answers[0], answers[1]);
    assert!(answers[0].2["l_out-1"]["data"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
}

fn fails_fast(args: &[&str], want: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_model(dir.path());
    let out = dir.path().join("out");
    let t0 = Instant::now();
    let o = capture(&model, &out, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: ") && err.contains(want), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    assert!(!out.exists(), "nothing is written");
}

#[test]
fn bad_endpoints_and_unreachable_workers_are_one_clear_error() {
    fails_fast(&["--rpc", "localhost"], "has no port");
    fails_fast(&["--rpc", "[::1]:50052"], "IPv6");
    fails_fast(&["--rpc", "a:1,a:1"], "twice");
    fails_fast(&["--rpc", ""], "HOST:PORT");
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    fails_fast(&["--rpc", &format!("127.0.0.1:{closed}")], "cannot connect");
}

#[test]
fn a_busy_worker_and_a_foreign_protocol_are_refused_not_waited_for() {
    // A worker serves one client at a time: hold one connection open.
    let w = Worker::start();
    let mut held = TcpStream::connect(&w.endpoint).unwrap();
    let mut hello = vec![14u8];
    hello.extend_from_slice(&24u64.to_le_bytes());
    hello.extend_from_slice(&[0; 24]);
    held.write_all(&hello).unwrap();
    let mut rsp = [0u8; 36];
    held.read_exact(&mut rsp).unwrap();
    assert_eq!(
        rsp[8],
        latent_tap::rpc::PROTO_MAJOR,
        "the real worker's version"
    );
    fails_fast(&["--rpc", &w.endpoint], "no handshake answer within 5 s");
    drop(held);
    // A worker of another protocol version.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut req = [0u8; 33];
        s.read_exact(&mut req).unwrap();
        let mut a = 28u64.to_le_bytes().to_vec();
        a.extend_from_slice(&[6, 1, 0, 0]);
        a.extend_from_slice(&[0; 24]);
        s.write_all(&a).unwrap();
    });
    fails_fast(&["--rpc", &ep], "speaks RPC protocol 6.1.0");
}

#[test]
fn rpc_server_listens_on_loopback_unless_told_otherwise() {
    let o = common::bin()
        .args(["rpc-server", "--host", "0.0.0.0", "--port", "50999"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not a loopback address") && err.contains("--allow-remote"),
        "{err}"
    );
    // A port in use is named, not ggml's "Failed to create server socket".
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_latent-tap"))
        .args(["rpc-server", "--port", &port])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn the_c_api_takes_rpc_servers() {
    use latent_tap::ffi::{
        lt_context_params, lt_context_params_default, lt_model, lt_model_free, lt_model_new,
        lt_status,
    };
    let dir = tempfile::tempdir().unwrap();
    let model = common::synth_model(dir.path());
    let path = std::ffi::CString::new(model.to_str().unwrap()).unwrap();
    let load = |rpc: &std::ffi::CStr| {
        let mut p: lt_context_params = common::capi::sized();
        assert_eq!(lt_context_params_default(&mut p), lt_status::LT_OK);
        assert!(p.rpc_servers.is_null(), "the default is no workers");
        p.rpc_servers = rpc.as_ptr();
        let mut m: *mut lt_model = std::ptr::null_mut();
        let st = lt_model_new(path.as_ptr(), &p, &mut m);
        let err = common::capi::last_error();
        lt_model_free(m);
        (st, err)
    };
    let (st, err) = load(c"nohost");
    assert_eq!(st, lt_status::LT_INVALID_ARGUMENT, "{err}");
    assert!(err.contains("has no port"), "{err}");
    let w = Worker::start();
    let ep = std::ffi::CString::new(w.endpoint.clone()).unwrap();
    let (st, err) = load(&ep);
    assert_eq!(st, lt_status::LT_OK, "{err}");
}
