//! A `latent-tap serve` child process on a free loopback port, and plain HTTP
//! calls to it (any status returned, never an error).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::bin;

/// A running `latent-tap serve` (killed on drop).
pub struct Server {
    pub child: Child,
    pub url: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
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
        // And stderr, kept for [`Server::stderr`].
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let kept = stderr.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while err.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                kept.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let s = Self {
            child,
            url: format!("http://{addr}"),
            stderr,
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

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
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

pub fn get(url: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    call("GET", url, headers)
}

/// Any method without a body; returns (status, body bytes) for any status.
pub fn call(method: &str, url: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    let mut req = ureq::request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let mut buf = Vec::new();
    resp.into_reader().read_to_end(&mut buf).unwrap();
    (status, buf)
}

/// The records of a binary record stream (`application/x-latent-tap-frames`):
/// (kind, record bytes), each as framed by its `u32` length; trailing bytes fail.
pub fn records(b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= b.len() {
        let n = u32::from_le_bytes(b[off..off + 4].try_into().unwrap()) as usize;
        let rec = b[off + 4..off + 4 + n].to_vec();
        off += 4 + n;
        out.push((u32::from_le_bytes(rec[..4].try_into().unwrap()), rec));
    }
    assert_eq!(off, b.len(), "trailing bytes in the binary stream");
    out
}

pub fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

pub fn sse_events(b: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(b)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}
