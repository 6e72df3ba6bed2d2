//! `latent-tap listen` against fake hosts: each test host lays out a
//! shared-memory ring in a memfd (as the preload library does), sends the
//! hello with the memfd over the sink socket, writes frames and sequence
//! removals, and disconnects. No llama-server needed.

mod common;

use common::tokens;

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use latent_tap::attach::wire::{Hello, SeqRm, PROTOCOL, ROW_OUTPUT};
use latent_tap::record::{self, Dtype, FrameHeader, RowMeta};
use latent_tap::ring::{shm, Producer, WriteError};
use safetensors::SafeTensors;
use serde_json::Value;

const O: u32 = ROW_OUTPUT;
const WIDTH: usize = 4;

unsafe fn unmap(base: *mut u8, len: usize) {
    // SAFETY: (caller) a mapping made by `FakeHost::ring`, released once.
    unsafe {
        libc::munmap(base.cast(), len);
    }
}

/// A tapped host as the preload library behaves: a ring in a memfd, handed over once.
struct FakeHost {
    /// Dropped first: the host closes the socket before its ring goes, like
    /// a process that exits.
    stream: Option<UnixStream>,
    prod: Producer,
    fd: Option<OwnedFd>,
    len: usize,
    seq: u64,
}

/// The row values a frame carries: derived from tensor, token and column.
fn value(layer: i32, token: i32, j: usize) -> f32 {
    layer as f32 * 1000.0 + token as f32 + j as f32 * 0.25
}

impl FakeHost {
    /// A ring with an arena of `capacity` bytes, not yet connected.
    fn ring(capacity: usize) -> Self {
        let len = shm::mapping_len(capacity).unwrap();
        // SAFETY: plain libc calls on a fresh memfd; the mapping is handed to the producer.
        unsafe {
            let fd = libc::memfd_create(c"latent-tap-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            let fd = OwnedFd::from_raw_fd(fd);
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t), 0);
            let base = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(base, libc::MAP_FAILED);
            let prod = shm::producer(base.cast(), len, unmap).unwrap();
            Self {
                prod,
                fd: Some(fd),
                len,
                stream: None,
                seq: 0,
            }
        }
    }

    fn hello(&self, pid: u32, connection: u32) -> Hello {
        Hello {
            format: PROTOCOL.into(),
            pid,
            exe: "/usr/bin/fake-llama-server".into(),
            map_bytes: self.len as u64,
            tensors: "l_out-*".into(),
            layers: "all".into(),
            rows: "all".into(),
            dtype: "f32".into(),
            connection,
        }
    }

    /// Connect and send the hello with the memfd.
    fn connect(&mut self, sock: &Path, pid: u32, connection: u32) {
        let s = UnixStream::connect(sock).unwrap();
        let body = serde_json::to_vec(&self.hello(pid, connection)).unwrap();
        send_with_fd(&s, &body, self.fd.as_ref().map(|f| f.as_raw_fd()));
        self.fd = None;
        self.stream = Some(s);
    }

    /// A frame of tensor `l_out-LAYER`; false if the ring was full (a drop).
    fn frame(&mut self, layer: i32, step: u32, rows: &[(i32, i32, i32, u32)]) -> bool {
        let len = record::frame_len(rows.len(), WIDTH, Dtype::F32);
        let seq = self.seq;
        self.seq += 1;
        let mut g = match self.prod.try_write(len) {
            Ok(g) => g,
            Err(WriteError::Full) => {
                self.prod.note_drop();
                return false;
            }
            Err(e) => panic!("{e}"),
        };
        let name = format!("l_out-{layer}");
        let mut h = FrameHeader {
            kind: record::kind::FRAME,
            header_size: std::mem::size_of::<FrameHeader>() as u32,
            seq,
            step,
            ubatch: 0,
            tensor_index: 0,
            layer,
            dtype: Dtype::F32 as u32,
            n_rows: rows.len() as u32,
            width: WIDTH as u64,
            ne: [WIDTH as i64, rows.len() as i64, 1, 1],
            name: [0; 64],
        };
        h.name[..name.len()].copy_from_slice(name.as_bytes());
        let mut buf = vec![0u8; len];
        put(&mut buf, 0, &h);
        let mut off = std::mem::size_of::<FrameHeader>();
        for &(seq_id, pos, token, flags) in rows {
            put(
                &mut buf,
                off,
                &RowMeta {
                    seq_id,
                    pos,
                    token,
                    flags,
                },
            );
            off += 16;
        }
        for &(_, _, token, _) in rows {
            for j in 0..WIDTH {
                buf[off..off + 4].copy_from_slice(&value(layer, token, j).to_le_bytes());
                off += 4;
            }
        }
        g.copy_from_slice(&buf);
        g.commit();
        true
    }

    /// Both tensors of one graph compute: `l_out-0` every row, `l_out-1` the output rows only.
    fn step(&mut self, step: u32, rows: &[(i32, i32, i32, u32)]) {
        assert!(self.frame(0, step, rows));
        let out: Vec<_> = rows.iter().copied().filter(|r| r.3 & O != 0).collect();
        if !out.is_empty() {
            assert!(self.frame(1, step, &out));
        }
    }

    fn seq_rm(&mut self, seq: i32, p0: i32, step: u32) {
        let r = SeqRm::new(seq, p0, -1, step).to_bytes();
        let mut g = self.prod.try_write(r.len()).unwrap();
        g.copy_from_slice(&r);
        g.commit();
    }
}

fn put<T: Copy>(buf: &mut [u8], off: usize, v: &T) {
    let n = std::mem::size_of::<T>();
    // SAFETY: T is a plain repr(C) record header.
    let src = unsafe { std::slice::from_raw_parts(v as *const T as *const u8, n) };
    buf[off..off + n].copy_from_slice(src);
}

/// One sendmsg of `body`, with `fd` attached as SCM_RIGHTS when given.
fn send_with_fd(s: &UnixStream, body: &[u8], fd: Option<i32>) {
    // SAFETY: msghdr and its buffers live across the call; CMSG macros stay
    // within the control buffer sized by CMSG_SPACE.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: body.as_ptr() as *mut _,
            iov_len: body.len(),
        };
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
            libc::CMSG_DATA(c).cast::<libc::c_int>().write_unaligned(fd);
        }
        let n = libc::sendmsg(s.as_raw_fd(), &msg, 0);
        assert_eq!(n, body.len() as isize);
    }
}

/// A running `latent-tap listen` with its stderr lines collected.
struct Listener {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    sock: PathBuf,
}

impl Listener {
    fn start(sock: &Path, extra: &[&str]) -> Self {
        let mut child = common::bin()
            .arg("listen")
            .arg("--sink")
            .arg(sock)
            .args(["--progress-secs", "0.2"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                l.lock().unwrap().push(line);
            }
        });
        let me = Self {
            child,
            lines,
            sock: sock.to_path_buf(),
        };
        me.wait_for("waiting for hosts");
        me
    }

    /// Wait until a stderr line contains `what` (the `n`-th such line).
    fn wait_for_n(&self, what: &str, n: usize) {
        let t0 = Instant::now();
        loop {
            if self.count(what) >= n {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no line '{what}' (×{n}) in: {:#?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_for(&self, what: &str) {
        self.wait_for_n(what, 1)
    }

    fn count(&self, what: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(what))
            .count()
    }

    /// SIGINT, and the exit status must be 0.
    fn stop(mut self) -> String {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "listen exited with {st}: {:#?}",
                    self.lines.lock().unwrap()
                );
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "listen did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!self.sock.exists(), "the socket file stays after exit");
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            o.read_to_string(&mut out).unwrap();
        }
        out
    }
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Per tensor: (rows values, pos, seq, prompt) over all shards.
fn shard_column(dir: &Path, name: &str) -> (Vec<f32>, Vec<i32>, Vec<i32>, Vec<i64>) {
    let m = manifest(dir);
    let (mut x, mut pos, mut seq, mut prompt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for s in m["shards"].as_array().unwrap() {
        let bytes = std::fs::read(dir.join(s["file"].as_str().unwrap())).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.shape()[1], WIDTH);
        x.extend(
            t.data()
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        );
        let i32s = |n: &str| -> Vec<i32> {
            st.tensor(n)
                .unwrap()
                .data()
                .chunks(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        pos.extend(i32s(&format!("{name}.pos")));
        seq.extend(i32s(&format!("{name}.seq")));
        prompt.extend(
            st.tensor(&format!("{name}.prompt"))
                .unwrap()
                .data()
                .chunks(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap())),
        );
    }
    (x, pos, seq, prompt)
}

/// (prompt_index, request_id, seq, pos, token, prompt, output, sampled_next)
type Line = (u64, u64, i64, i64, i64, bool, bool, Option<i64>);

fn line_tuple(v: &Value) -> Line {
    assert!(
        v.get("sampled_next").is_some(),
        "sampled_next is always written: {v}"
    );
    (
        v["prompt_index"].as_u64().unwrap(),
        v["request_id"].as_u64().unwrap(),
        v["seq"].as_i64().unwrap(),
        v["pos"].as_i64().unwrap(),
        v["token"].as_i64().unwrap(),
        v["prompt"].as_bool().unwrap(),
        v["output"].as_bool().unwrap(),
        v["sampled_next"].as_i64(),
    )
}

#[test]
fn two_interleaved_sequences_pair_into_requests() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("lt.sock");
    let out = dir.path().join("run");
    let l = Listener::start(&sock, &["--out", out.to_str().unwrap()]);
    let mut h = FakeHost::ring(1 << 20);
    h.connect(&sock, 4242, 1);
    // Prompts: seq 0 = 100 101 102, seq 1 = 200 201 (last rows output).
    h.step(
        0,
        &[
            (0, 0, 100, 0),
            (0, 1, 101, 0),
            (0, 2, 102, O),
            (1, 0, 200, 0),
            (1, 1, 201, O),
        ],
    );
    h.step(1, &[(0, 3, 103, O), (1, 2, 202, O)]);
    h.step(2, &[(0, 4, 104, O), (1, 3, 203, O)]);
    // Slot 1 takes a new request.
    h.seq_rm(1, 0, 3);
    h.step(3, &[(0, 5, 105, O), (1, 0, 300, 0), (1, 1, 301, O)]);
    h.step(4, &[(1, 2, 302, O)]);
    h.seq_rm(0, 0, 5);
    // The host exits with seq 1's request in flight.
    drop(h);
    l.wait_for("detached (host exited)");
    let summary = l.stop();
    assert!(summary.contains("3 requests (3 written"), "{summary}");

    let lines: Vec<Line> = tokens(&out).iter().map(line_tuple).collect();
    let (s, p) = (true, false); // prompt / sampled
    #[rustfmt::skip]
    let want: Vec<Line> = vec![
        // Ended first (SeqRm of seq 1): prompt_index 0, begun second: request_id 1.
        (0, 1, 1, 0, 200, s, false, None),
        (0, 1, 1, 1, 201, s, true, Some(202)),
        (0, 1, 1, 2, 202, p, true, Some(203)),
        (0, 1, 1, 3, 203, p, true, None),
        (1, 0, 0, 0, 100, s, false, None),
        (1, 0, 0, 1, 101, s, false, None),
        (1, 0, 0, 2, 102, s, true, Some(103)),
        (1, 0, 0, 3, 103, p, true, Some(104)),
        (1, 0, 0, 4, 104, p, true, Some(105)),
        (1, 0, 0, 5, 105, p, true, None),
        // Committed when the host left.
        (2, 2, 1, 0, 300, s, false, None),
        (2, 2, 1, 1, 301, s, true, Some(302)),
        (2, 2, 1, 2, 302, p, true, None),
    ];
    assert_eq!(lines, want);
    let steps: Vec<u64> = tokens(&out)
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 0, 1, 2, 0, 0, 0, 1, 2, 3, 3, 3, 4]);

    // Every row of l_out-0, in the same order; l_out-1 holds the output rows.
    let (x, pos, seq, prompt) = shard_column(&out, "l_out-0");
    let toks: Vec<i64> = want.iter().map(|w| w.4).collect();
    assert_eq!(pos, want.iter().map(|w| w.3 as i32).collect::<Vec<_>>());
    assert_eq!(seq, want.iter().map(|w| w.2 as i32).collect::<Vec<_>>());
    assert_eq!(prompt, want.iter().map(|w| w.0 as i64).collect::<Vec<_>>());
    let want_x: Vec<f32> = toks
        .iter()
        .flat_map(|&t| (0..WIDTH).map(move |j| value(0, t as i32, j)))
        .collect();
    assert_eq!(x, want_x);
    let outs: Vec<&Line> = want.iter().filter(|w| w.6).collect();
    let (x1, pos1, _, prompt1) = shard_column(&out, "l_out-1");
    assert_eq!(pos1, outs.iter().map(|w| w.3 as i32).collect::<Vec<_>>());
    assert_eq!(prompt1, outs.iter().map(|w| w.0 as i64).collect::<Vec<_>>());
    assert_eq!(
        x1[..WIDTH],
        (0..WIDTH).map(|j| value(1, 201, j)).collect::<Vec<_>>()[..]
    );

    // examples/python/read_run.py reads the run (needs numpy, as tests/dataset.rs).
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/read_run.py");
    let o = std::process::Command::new(std::env::var_os("PYTHON").unwrap_or("python3".into()))
        .arg(&examples)
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "read_run.py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("l_out-0 rows 13 prompts 3"), "{text}");
    assert!(text.contains("l_out-1 rows 9 prompts 3"), "{text}");
    assert!(!text.contains("incomplete"), "{text}");

    let m = manifest(&out);
    assert_eq!(m["format"], "latent-tap-dataset/1");
    assert_eq!(m["complete"], true);
    assert_eq!(m["tokens"], 13);
    assert_eq!(m["rows"]["l_out-0"], 13);
    assert_eq!(m["rows"]["l_out-1"], 9);
    let names: Vec<&str> = m["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["width"], WIDTH);
            assert_eq!(t["dtype"], "F32");
            t["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(names, ["l_out-0", "l_out-1"]);
    let a = &m["attach"];
    assert_eq!(a["complete"], true);
    assert_eq!(a["frames"], 10);
    assert_eq!(a["drops"], 0);
    assert_eq!(a["committed"], 3);
    assert_eq!(a["hosts"][0]["pid"], 4242);
    assert_eq!(a["hosts"][0]["exe"], "/usr/bin/fake-llama-server");
    assert_eq!(a["hosts"][0]["connection"], 1);
    assert_eq!(a["hosts"][0]["ended"], "host exited");
}

#[test]
fn bad_hellos_are_refused_and_hosts_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("lt.sock");
    let out = dir.path().join("run");
    // A stale socket file from a listener that died is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let l = Listener::start(
        &sock,
        &["--out", out.to_str().unwrap(), "--shard-mb", "0.004"],
    );

    // Not JSON.
    let s = UnixStream::connect(&sock).unwrap();
    send_with_fd(&s, b"hello?", None);
    drop(s);
    l.wait_for("refused a host");
    // JSON, but no memfd.
    let h = FakeHost::ring(4096);
    let s = UnixStream::connect(&sock).unwrap();
    send_with_fd(&s, &serde_json::to_vec(&h.hello(1, 1)).unwrap(), None);
    l.wait_for_n("refused a host", 2);
    assert!(
        l.count("not the ring's one") == 1,
        "{:#?}",
        l.lines.lock().unwrap()
    );
    drop(s);
    // Another protocol version.
    let mut bad = h.hello(1, 1);
    bad.format = "latent-tap-attach/999".into();
    let s = UnixStream::connect(&sock).unwrap();
    send_with_fd(
        &s,
        &serde_json::to_vec(&bad).unwrap(),
        h.fd.as_ref().map(|f| f.as_raw_fd()),
    );
    l.wait_for_n("refused a host", 3);
    assert_eq!(l.count("speaks 'latent-tap-attach/999'"), 1);
    drop(s);

    // A host whose ring filled before the listener read it: drops, counted.
    let mut a = FakeHost::ring(1024);
    let mut written = 0;
    let mut dropped = 0;
    for pos in 0..40 {
        let flags = if pos == 39 { O } else { 0 };
        if a.frame(0, pos as u32, &[(0, pos, 1000 + pos, flags)]) {
            written += 1;
        } else {
            dropped += 1;
        }
    }
    assert!(written > 0 && dropped > 0);
    a.connect(&sock, 7, 1);
    // It leaves mid-request (no SeqRm): the request is committed, the
    // listener keeps going.
    drop(a);
    l.wait_for("detached (host exited)");
    // The same host again (its next connection) and another one.
    let mut b = FakeHost::ring(1 << 16);
    b.connect(&sock, 7, 2);
    let mut c = FakeHost::ring(1 << 16);
    c.connect(&sock, 8, 1);
    b.step(0, &[(0, 0, 1, 0), (0, 1, 2, O)]);
    // A long prompt: shards close at their 4 KiB cap.
    let long: Vec<_> = (0..150)
        .map(|p| (0, p, 3000 + p, if p == 149 { O } else { 0 }))
        .collect();
    c.step(0, &long);
    b.step(1, &[(0, 2, 4, O)]);
    c.step(1, &[(0, 150, 5, O)]);
    drop(b);
    drop(c);
    l.wait_for_n("detached (host exited)", 3);
    l.wait_for("drops"); // progress lines
                         // Still attached when the listener stops: its request is committed.
    let mut d = FakeHost::ring(1 << 16);
    d.connect(&sock, 9, 1);
    l.wait_for("host 9 ");
    d.step(0, &[(3, 7, 70, O)]);
    let summary = l.stop();
    drop(d);
    assert!(summary.contains("3 refused"), "{summary}");

    let m = manifest(&out);
    let a = &m["attach"];
    assert_eq!(a["refused"], 3);
    assert_eq!(a["drops"], dropped);
    assert_eq!(a["hosts"][0]["drops"], dropped);
    assert_eq!(a["hosts"][0]["frames"], written);
    let hosts: Vec<(u64, u64)> = a["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["pid"].as_u64().unwrap(),
                h["connection"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(hosts[0], (7, 1));
    let mut rest = hosts[1..3].to_vec();
    rest.sort();
    rest.push(hosts[3]);
    assert_eq!(rest[..2], [(7, 2), (8, 1)]);
    assert_eq!(rest[2], (9, 1));
    let last = &a["hosts"][3];
    assert_eq!(last["ended"], "listener stopped");
    assert_eq!(m["complete"], true);
    // Tiny shards: several closed, each naming its requests in order.
    let shards = m["shards"].as_array().unwrap();
    assert!(shards.len() >= 2, "{m:#}");
    let lines = tokens(&out);
    assert_eq!(lines.len() as i64, written + 3 + 151 + 1);
    let d_line = lines.last().unwrap();
    assert_eq!(
        (
            &d_line["seq"],
            &d_line["pos"],
            &d_line["token"],
            &d_line["sampled_next"]
        ),
        (
            &Value::from(3),
            &Value::from(7),
            &Value::from(70),
            &Value::Null
        )
    );
    // The first host's request: the rows that fit, positions 0.., its last
    // row unpaired (no successor arrived).
    let first: Vec<&Value> = lines
        .iter()
        .filter(|v| v["host_pid"] == 7 && v["connection"] == 1)
        .collect();
    assert_eq!(first.len() as i64, written);
    for (i, v) in first.iter().enumerate() {
        assert_eq!(v["pos"], i as i64);
        assert_eq!(v["token"], 1000 + i as i64);
        assert_eq!(v["prompt"], true);
        assert_eq!(v["sampled_next"], Value::Null);
    }
    let b_lines: Vec<Line> = lines
        .iter()
        .filter(|v| v["host_pid"] == 7 && v["connection"] == 2)
        .map(line_tuple)
        .collect();
    let got: Vec<_> = b_lines.iter().map(|l| (l.3, l.4, l.5, l.6, l.7)).collect();
    assert_eq!(
        got,
        vec![
            (0, 1, true, false, None),
            (1, 2, true, true, Some(4)),
            (2, 4, false, true, None)
        ]
    );
    let (_, _, _, prompt) = shard_column(&out, "l_out-0");
    assert!(prompt.windows(2).all(|w| w[0] <= w[1]), "{prompt:?}");
}

#[test]
fn a_path_that_is_not_a_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("file");
    std::fs::write(&p, b"keep me").unwrap();
    let o = common::bin()
        .args(["listen", "--sink"])
        .arg(&p)
        .arg("--out")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
}

#[test]
fn observers_are_served_on_loopback_only() {
    let o = common::bin()
        .args(["listen", "--serve", "--port", "0", "--host", "0.0.0.0"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--host: 0.0.0.0 is not a loopback address") && !err.contains("API key"),
        "{err}"
    );
}

/// Length-prefixed records of a subscribe stream.
fn next_record(r: &mut impl Read) -> Option<Vec<u8>> {
    let mut n = [0u8; 4];
    r.read_exact(&mut n).ok()?;
    let mut b = vec![0u8; u32::from_le_bytes(n) as usize];
    r.read_exact(&mut b).ok()?;
    Some(b)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn i32_at(b: &[u8], off: usize) -> i32 {
    i32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

#[test]
fn observers_subscribe_to_every_host() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("lt.sock");
    let mut l = Listener::start(&sock, &["--serve", "--port", "0"]);
    let mut stdout = BufReader::new(l.child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let url = first
        .trim()
        .rsplit_once(' ')
        .map(|(_, u)| u.to_string())
        .unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{first}");
    let health: Value = ureq::get(&format!("{url}/health"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert!(ureq::get(&format!("{url}/latents/subscribe?bogus=1"))
        .call()
        .is_err());
    // Unknown paths and wrong methods: llama-server's 404 in the JSON error shape.
    for (method, path) in [
        ("GET", "/nope"),
        ("POST", "/health"),
        ("DELETE", "/latents/subscribe"),
    ] {
        match ureq::request(method, &format!("{url}{path}")).call() {
            Err(ureq::Error::Status(404, r)) => {
                let v: Value = r.into_json().unwrap();
                assert_eq!(v["error"]["type"], "not_found_error", "{method} {path}");
            }
            other => panic!("{method} {path}: {other:?}"),
        }
    }
    let resp = ureq::get(&format!("{url}/latents/subscribe?tensors=l_out-1"))
        .call()
        .unwrap();
    assert_eq!(resp.content_type(), "application/vnd.latent-tap.frames");
    let mut r = resp.into_reader();
    let t0 = Instant::now();
    loop {
        let h: Value = ureq::get(&format!("{url}/health"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if h["subscribers"] == 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut h = FakeHost::ring(1 << 16);
    h.connect(&sock, 99, 1);
    h.step(0, &[(0, 0, 10, 0), (0, 1, 11, O)]);
    h.step(1, &[(0, 2, 12, O)]);
    drop(h);
    // REQUEST begin, TOKEN 10, TOKEN 11, FRAME (l_out-1: row 1), TOKEN 12, FRAME, REQUEST end.
    let mut kinds = Vec::new();
    let mut frames = Vec::new();
    let mut toks = Vec::new();
    loop {
        let rec = next_record(&mut r).expect("stream ended early");
        let kind = u32_at(&rec, 0);
        kinds.push(kind);
        match kind {
            1 => {
                let hs = u32_at(&rec, 4) as usize;
                let name_end = 80 + rec[80..144].iter().position(|&b| b == 0).unwrap();
                assert_eq!(&rec[80..name_end], b"l_out-1");
                let n_rows = u32_at(&rec, 36) as usize;
                assert_eq!(n_rows, 1);
                let (pos, token, flags) = (
                    i32_at(&rec, hs + 4),
                    i32_at(&rec, hs + 8),
                    u32_at(&rec, hs + 12),
                );
                let x = f32::from_le_bytes(rec[hs + 16..hs + 20].try_into().unwrap());
                frames.push((pos, token, flags, x));
            }
            2 => toks.push((i32_at(&rec, 16), i32_at(&rec, 20), u32_at(&rec, 24))),
            4 => {
                if u32_at(&rec, 20) == 2 {
                    break;
                }
            }
            k => panic!("unexpected record kind {k}"),
        }
    }
    assert_eq!(kinds, vec![4, 2, 2, 1, 2, 1, 4]);
    assert_eq!(toks, vec![(0, 10, 1), (1, 11, 1), (2, 12, 0)]);
    assert_eq!(
        frames,
        vec![(1, 11, O | 1, value(1, 11, 0)), (2, 12, O, value(1, 12, 0))]
    );
    l.wait_for("detached (host exited)");
    // Hosts attached at the same time are told apart: seq_id = h << 16 | seq,
    // where h is the smallest host number no attached host holds (so a host
    // that comes after the first one left is number 0 again, and ids never
    // grow with the number of hosts seen).
    let read_until = |r: &mut _, last: (u32, i32)| {
        let mut seen = Vec::new();
        loop {
            let rec = next_record(r).expect("stream ended early");
            let kind = u32_at(&rec, 0);
            let seq_id = match kind {
                1 => i32_at(&rec, u32_at(&rec, 4) as usize),
                2 => i32_at(&rec, 12),
                4 => i32_at(&rec, 16),
                k => panic!("unexpected record kind {k}"),
            };
            seen.push((kind, seq_id));
            if (kind, seq_id) == last && (kind != 4 || u32_at(&rec, 20) == 2) {
                return seen;
            }
        }
    };
    let mut a = FakeHost::ring(1 << 16);
    a.connect(&sock, 100, 1);
    a.step(0, &[(0, 0, 20, O)]);
    assert_eq!(read_until(&mut r, (1, 0)), vec![(4, 0), (2, 0), (1, 0)]);
    let mut b = FakeHost::ring(1 << 16);
    b.connect(&sock, 101, 1);
    b.step(0, &[(0, 0, 30, O)]);
    drop(b);
    assert_eq!(
        read_until(&mut r, (4, 1 << 16)),
        vec![(4, 1 << 16), (2, 1 << 16), (1, 1 << 16), (4, 1 << 16)]
    );
    drop(a);
    assert_eq!(read_until(&mut r, (4, 0)), vec![(4, 0)]);
    l.wait_for_n("detached (host exited)", 3);
    l.stop();
    let mut summary = String::new();
    stdout.read_to_string(&mut summary).unwrap();
    assert!(summary.contains("3 requests"), "{summary}");
    // The stream ends with the listener.
    assert!(next_record(&mut r).is_none());
}

#[test]
fn a_busy_port_fails_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let sock = dir.path().join("lt.sock");
    let out = dir.path().join("run");
    let o = common::bin()
        .args(["listen", "-q", "--sink"])
        .arg(&sock)
        .arg("--out")
        .arg(&out)
        .args(["--serve", "--port", &port])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot listen on 127.0.0.1"), "{err}");
    assert!(!out.join("manifest.json").exists());
    assert!(!sock.exists());
    // Neither --out nor --serve: nothing to do.
    let o = common::bin()
        .args(["listen", "--sink"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--out DIR and/or --serve"));
}
