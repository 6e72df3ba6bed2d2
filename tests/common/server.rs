//! A `latent-tap serve` process on a free loopback port, and plain HTTP
//! calls that return any status with its body (`tests/serve.rs`,
//! `tests/serve_limits.rs`).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::bin;

/// A running server, killed when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Server {
    /// Start `serve` on `model` with `extra` flags; returns once `/health` answers 200.
    pub fn start(model: &Path, extra: &[&str]) -> Self {
        let mut child = bin()
            .args(["serve", "--port", "0", "-t", "2", "-m"])
            .arg(model)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let s = Self {
            child,
            url: format!("http://{addr}"),
        };
        let t0 = Instant::now();
        loop {
            match ureq::get(&s.url("/health")).call() {
                Ok(r) if r.status() == 200 => break,
                _ if t0.elapsed() > Duration::from_secs(120) => panic!("server never became ready"),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        s
    }

    /// The address of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POST JSON; returns (status, body bytes) for any status.
pub fn post(url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    post_raw(url, &serde_json::to_vec(body).unwrap(), headers)
}

/// POST raw bytes as JSON; returns (status, body bytes) for any status.
pub fn post_raw(url: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    let mut req = ureq::post(url).set("Content-Type", "application/json");
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.send_bytes(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let status = resp.status();
    let mut buf = Vec::new();
    resp.into_reader().read_to_end(&mut buf).unwrap();
    (status, buf)
}

/// GET; returns (status, body bytes) for any status.
pub fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    let mut req = ureq::get(url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let status = resp.status();
    let mut buf = Vec::new();
    resp.into_reader().read_to_end(&mut buf).unwrap();
    (status, buf)
}

/// Parse a JSON body, showing it on failure.
pub fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}
