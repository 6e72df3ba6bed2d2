//! `latent-tap listen`: the sidecar of tapped hosts. Accepts hosts on the
//! sink socket ([`super::sink`]), reads each one's ring on a thread of its
//! own, pairs rows into requests ([`super::pair`]), writes committed requests
//! into a run directory (the layout of `capture --prompts`, through
//! [`crate::dataset`]'s writer) and passes everything to observers
//! ([`super::hub`]).
//!
//! Request numbers: `prompt_index` in the run directory (and `NAME.prompt` in
//! the shards) counts requests in the order they were *committed* (ended), so
//! shards hold whole requests in index order; `request_id` (in `tokens.jsonl`
//! and the subscribe stream's REQUEST notices) counts them in the order they
//! *began*.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use super::hub::Hub;
use super::pair::{Event, Pairer, Request};
use super::sink::{self, Attached, Sink};
use super::wire::{SeqRm, KIND_SEQ_RM};
use crate::error::{Error, ErrorKind, Result};
use crate::record::{self, Record};
use crate::run::{Manifest, PromptRows, Writer, FORMAT};

/// Where observers connect (`--serve`).
#[derive(Debug, Clone)]
pub struct ServeAt {
    /// Address to bind.
    pub host: String,
    /// Port (0: any free one).
    pub port: u16,
}

/// Settings of a listener.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// The sink socket's path.
    pub sink: PathBuf,
    /// Run directory for committed requests (none: nothing is written). It
    /// must exist and hold no run.
    pub out: Option<PathBuf>,
    /// Close a shard before it would exceed this many bytes of latents.
    pub shard_bytes: usize,
    /// Offer `GET /latents/subscribe` here.
    pub serve: Option<ServeAt>,
    /// Bytes of records a subscriber may have queued before its frames are dropped.
    pub subscriber_queue: usize,
    /// A progress line this often (none: no progress lines).
    pub progress: Option<Duration>,
    /// Log attach / detach lines (refusals and errors are always logged).
    pub verbose: bool,
    /// How long a host may take to send its hello.
    pub hello_timeout: Duration,
    /// Users besides this listener's own whose hosts are accepted
    /// (`SO_PEERCRED`). Empty: the socket is 0600; otherwise 0666, and the
    /// peer check is what keeps other users out.
    pub allow_uids: Vec<u32>,
}

/// Receives the listener's log lines (any thread).
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// One host connection, as the manifest reports it.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    /// Process id.
    pub pid: u32,
    /// Executable.
    pub exe: String,
    /// Connection number within the host.
    pub connection: u32,
    /// Its tensor patterns, layers, rows and dtype settings.
    pub tensors: String,
    /// `LATENT_TAP_LAYERS`.
    pub layers: String,
    /// `LATENT_TAP_ROWS`.
    pub rows: String,
    /// `LATENT_TAP_DTYPE`.
    pub dtype: String,
    /// Frames read.
    pub frames: u64,
    /// Rows of the token stream.
    pub token_rows: u64,
    /// Requests it began.
    pub requests: u64,
    /// Frames the host dropped because its ring was full.
    pub drops: u64,
    /// Records that were neither a frame nor a sequence removal, or malformed.
    pub bad_records: u64,
    /// Still connected.
    pub attached: bool,
    /// Why the connection ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

/// The listener's counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ListenStats {
    /// Every host connection that said hello, in order.
    pub hosts: Vec<HostInfo>,
    /// Connections refused (bad hello).
    pub refused: u64,
    /// Requests written to the run directory.
    pub committed: u64,
    /// Rows skipped because their tensor's width differed from the one seen first.
    pub unaligned: u64,
}

impl ListenStats {
    /// Hosts connected now.
    pub fn attached(&self) -> usize {
        self.hosts.iter().filter(|h| h.attached).count()
    }
    /// Frames read, all hosts.
    pub fn frames(&self) -> u64 {
        self.hosts.iter().map(|h| h.frames).sum()
    }
    /// Token rows, all hosts.
    pub fn rows(&self) -> u64 {
        self.hosts.iter().map(|h| h.token_rows).sum()
    }
    /// Frames dropped by the hosts, all hosts.
    pub fn drops(&self) -> u64 {
        self.hosts.iter().map(|h| h.drops).sum()
    }
    /// Requests begun, all hosts.
    pub fn requests(&self) -> u64 {
        self.hosts.iter().map(|h| h.requests).sum()
    }

    fn manifest_json(&self, sink: &Path, complete: bool) -> Value {
        json!({
            "sink": sink.display().to_string(),
            "hosts": self.hosts,
            "frames": self.frames(),
            "token_rows": self.rows(),
            "requests": self.requests(),
            "committed": self.committed,
            "drops": self.drops(),
            "refused": self.refused,
            "unaligned": self.unaligned,
            "complete": complete,
        })
    }
}

/// How a listener ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Its counters at the end.
    pub stats: ListenStats,
    /// Shards in the run directory.
    pub shards: usize,
}

type Shared = Arc<Mutex<ListenStats>>;

struct Commit {
    req: Request,
    host: usize,
}

/// Run a listener until `stop` is set; then every request in flight is
/// committed, the open shard closed and the manifest written
/// (`complete: true` unless writing failed). `on_serve` gets the observers'
/// address once bound.
pub fn run(
    opts: &ListenOptions,
    stop: &AtomicBool,
    log: Log,
    on_serve: &mut dyn FnMut(SocketAddr),
) -> Result<Outcome> {
    let stats: Shared = Arc::new(Mutex::new(ListenStats::default()));
    // Socket and HTTP port first: a listener that cannot start leaves no run behind.
    let mode = if opts.allow_uids.is_empty() {
        0o600
    } else {
        0o666
    };
    let sink = Sink::bind(&opts.sink, mode)?;
    // SAFETY: plain getter.
    let me = unsafe { libc::geteuid() };
    let hub = Arc::new(Hub::default());
    let attached = Arc::new(AtomicUsize::new(0));
    let next_id = Arc::new(AtomicU64::new(0));
    let result = std::thread::scope(|s| -> Result<Outcome> {
        // Observers.
        #[cfg(feature = "serve")]
        let mut http = None;
        #[cfg(feature = "serve")]
        if let Some(at) = &opts.serve {
            let st = Arc::new(super::observe::Observe {
                hub: hub.clone(),
                hosts: attached.clone(),
                queue: opts.subscriber_queue,
            });
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let (down_tx, down_rx) = tokio::sync::oneshot::channel::<()>();
            let h = s.spawn(move || {
                super::observe::serve(
                    &at.host,
                    at.port,
                    st,
                    &mut |a| {
                        let _ = addr_tx.send(a);
                    },
                    down_rx,
                )
            });
            match addr_rx.recv() {
                Ok(Ok(a)) => on_serve(a),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::new(ErrorKind::Internal, "the HTTP server stopped")),
            }
            http = Some((h, down_tx));
        }
        #[cfg(not(feature = "serve"))]
        if opts.serve.is_some() {
            return Err(Error::invalid(
                "serving observers needs a build with the serve feature",
            ));
        }
        let _ = on_serve;
        let writer = match opts
            .out
            .as_deref()
            .map(|d| new_writer(d, opts, &stats))
            .transpose()
        {
            Ok(w) => w,
            Err(e) => {
                #[cfg(feature = "serve")]
                if let Some((h, down)) = http.take() {
                    let _ = down.send(());
                    let _ = h.join();
                }
                return Err(e);
            }
        };
        // The writer.
        let (tx, rx) = sync_channel::<Commit>(64);
        let out_dir = opts.out.clone();
        let writer_thread = writer.map(|w| {
            let stats = stats.clone();
            let log = log.clone();
            let sink_path = opts.sink.clone();
            s.spawn(move || write_loop(w, rx, &stats, &sink_path, &log))
        });
        let tx = out_dir.as_ref().map(|_| tx);
        if opts.verbose {
            log(&format!(
                "latent-tap listen: waiting for hosts on {}",
                sink.path().display()
            ));
        }
        let mut conns = Vec::new();
        let mut last_progress = Instant::now();
        let mut accept_err = None;
        let spawn_host = |stream: std::os::unix::net::UnixStream| {
            let (stats, hub, log, tx, next_id, attached) = (
                stats.clone(),
                hub.clone(),
                log.clone(),
                tx.clone(),
                next_id.clone(),
                attached.clone(),
            );
            s.spawn(move || {
                let refuse = |why: String| {
                    if let Ok(mut st) = stats.lock() {
                        st.refused += 1;
                    }
                    log(&format!("latent-tap listen: refused a host: {why}"));
                };
                match sink::peer_cred(&stream) {
                    Ok((_, uid)) if uid == me || opts.allow_uids.contains(&uid) => {}
                    Ok((pid, uid)) => {
                        return refuse(format!(
                            "pid {pid} runs as uid {uid}, this listener as uid {me} \
                             (--allow-uid {uid} admits it)"
                        ))
                    }
                    Err(e) => return refuse(e.to_string()),
                }
                let a = match sink::handshake(stream, opts.hello_timeout) {
                    Ok(a) => a,
                    Err(e) => {
                        if let Ok(mut st) = stats.lock() {
                            st.refused += 1;
                        }
                        log(&format!("latent-tap listen: refused a host: {e}"));
                        return;
                    }
                };
                attached.fetch_add(1, Ordering::Relaxed);
                serve_host(a, opts, stop, &stats, &hub, tx, next_id, &log);
                attached.fetch_sub(1, Ordering::Relaxed);
            })
        };
        while !stop.load(Ordering::Relaxed) {
            match sink.accept() {
                Ok(Some(stream)) => conns.push(spawn_host(stream)),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    accept_err = Some(e);
                    break;
                }
            }
            conns.retain(|h| !h.is_finished());
            if let Some(every) = opts.progress {
                if last_progress.elapsed() >= every {
                    last_progress = Instant::now();
                    if let Ok(st) = stats.lock() {
                        log(&progress_line(&st, hub.len()));
                    }
                }
            }
        }
        // Stop: hosts that connected before the stop (still in the socket's
        // backlog, e.g. one that wrote its frames and exited just now) are
        // served too; then no new hosts, and every connection drains its ring
        // and commits.
        while let Ok(Some(stream)) = sink.accept() {
            conns.push(spawn_host(stream));
        }
        drop(sink);
        stop.store(true, Ordering::Relaxed);
        for h in conns {
            let _ = h.join();
        }
        drop(tx);
        let mut result = match writer_thread {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(Error::new(ErrorKind::Internal, "the writer panicked"))),
            None => Ok(0),
        };
        if let Some(e) = accept_err {
            result = result.and(Err(e));
        }
        hub.close();
        #[cfg(feature = "serve")]
        if let Some((h, down)) = http {
            let _ = down.send(());
            let _ = h.join();
        }
        let stats = stats.lock().map(|s| s.clone()).unwrap_or_default();
        result.map(|shards| Outcome { stats, shards })
    });
    result
}

/// One line of progress.
pub fn progress_line(st: &ListenStats, subscribers: usize) -> String {
    format!(
        "latent-tap listen: hosts {} attached ({} seen, {} refused) | frames {} rows {} requests {} (written {}) | drops {} | subscribers {}",
        st.attached(),
        st.hosts.len(),
        st.refused,
        st.frames(),
        st.rows(),
        st.requests(),
        st.committed,
        st.drops(),
        subscribers
    )
}

fn new_writer(dir: &Path, opts: &ListenOptions, stats: &Shared) -> Result<Writer> {
    let m = Manifest {
        format: FORMAT.into(),
        complete: false,
        stopped: Some("running".into()),
        config: json!({
            "source": "latent-tap listen",
            "sink": opts.sink.display().to_string(),
            "shard_bytes": opts.shard_bytes,
        }),
        prompt_range: [0, 0],
        prompt_lines: 0,
        next_prompt: 0,
        prompts_captured: 0,
        prompts_blank: 0,
        tokens_bytes: 0,
        tokens: 0,
        tensors: Vec::new(),
        rows: Default::default(),
        shards: Vec::new(),
        resume_from: None,
        attach: Some(
            stats
                .lock()
                .map(|s| s.manifest_json(&opts.sink, false))
                .unwrap_or(Value::Null),
        ),
        // The latents come from the host's llama.cpp, not from this build.
        build: None,
    };
    let w = Writer::create(dir, crate::record::Dtype::F32, opts.shard_bytes, m)?;
    w.write_manifest()?;
    Ok(w)
}

#[derive(Serialize)]
struct HostTokenLine<'a> {
    prompt_index: u64,
    request_id: u64,
    host_pid: u32,
    connection: u32,
    seq: i32,
    pos: i32,
    token: i32,
    prompt: bool,
    output: bool,
    /// Always written: `null` when nothing was sampled from the row or its
    /// successor never arrived.
    sampled_next: Option<i32>,
    step: u32,
    #[serde(skip)]
    _p: std::marker::PhantomData<&'a ()>,
}

/// The writer thread: commits requests as they end; at the end closes the
/// open shard and writes the final manifest. Returns the shard count.
fn write_loop(
    mut w: Writer,
    rx: Receiver<Commit>,
    stats: &Shared,
    sink: &Path,
    log: &Log,
) -> Result<usize> {
    let mut failed: Option<Error> = None;
    for c in rx {
        if failed.is_some() {
            continue; // keep draining so hosts are not held up
        }
        if let Err(e) = commit(&mut w, c, stats, sink) {
            log(&format!(
                "latent-tap listen: writing the run failed, no more requests are written: {e}"
            ));
            failed = Some(e);
        }
    }
    let st = stats.lock().map(|s| s.clone()).unwrap_or_default();
    let r = match failed {
        Some(e) => Err(e),
        None => w.close_shard(false),
    };
    w.m.complete = r.is_ok();
    w.m.stopped = match &r {
        Ok(()) => None,
        Err(e) => Some(format!("error: {e}")),
    };
    w.m.attach = Some(st.manifest_json(sink, r.is_ok()));
    let written = w.write_manifest();
    r.and(written).map(|()| w.m.shards.len())
}

fn commit(w: &mut Writer, c: Commit, stats: &Shared, sink: &Path) -> Result<()> {
    let Commit { req, host } = c;
    let index = w.m.prompts_captured;
    let (pid, connection) = stats
        .lock()
        .ok()
        .and_then(|s| s.hosts.get(host).map(|h| (h.pid, h.connection)))
        .unwrap_or((0, 0));
    if let Some((_, t)) = req.tensors.first() {
        w.set_dtype(t.dtype);
    }
    let mut rows: Vec<PromptRows> = w.m.tensors.iter().map(|_| PromptRows::default()).collect();
    let mut unaligned = 0u64;
    for (name, t) in req.tensors {
        let i = match w.m.tensors.iter().position(|x| x.name == name) {
            Some(i) => i,
            None => {
                rows.push(PromptRows::default());
                w.add_tensor(&name, t.width)?
            }
        };
        if w.m.tensors[i].width != t.width {
            unaligned += t.pos.len() as u64;
            continue;
        }
        let out = w.dtype();
        let data = if t.dtype == out {
            t.data
        } else {
            let mut d = vec![0u8; t.pos.len() * t.width * out.size()];
            crate::convert::convert(&t.data, t.dtype, &mut d, out);
            d
        };
        rows[i].data = data;
        rows[i].seq = vec![req.seq; t.pos.len()];
        rows[i].pos = t.pos;
    }
    let mut lines = Vec::new();
    for t in &req.tokens {
        let line = HostTokenLine {
            prompt_index: index,
            request_id: req.id,
            host_pid: pid,
            connection,
            seq: req.seq,
            pos: t.pos,
            token: t.token,
            prompt: t.prompt,
            output: t.output,
            sampled_next: t.sampled_next,
            step: t.step,
            _p: std::marker::PhantomData,
        };
        serde_json::to_writer(&mut lines, &line)
            .map_err(|e| Error::new(ErrorKind::Internal, format!("token line: {e}")))?;
        lines.push(b'\n');
    }
    let st = {
        let mut s = stats
            .lock()
            .map_err(|_| Error::new(ErrorKind::Internal, "listener state poisoned"))?;
        s.committed += 1;
        s.unaligned += unaligned;
        s.clone()
    };
    w.m.prompt_range = [0, index + 1];
    w.m.prompt_lines = index + 1;
    w.m.attach = Some(st.manifest_json(sink, false));
    w.commit_lines(index, rows, &lines, req.tokens.len() as u64, None)
}

/// A host's connection: read its ring until it exits (or its ring is
/// corrupt, or the listener stops), then commit what is in flight.
#[allow(clippy::too_many_arguments)]
fn serve_host(
    a: Attached,
    opts: &ListenOptions,
    stop: &AtomicBool,
    stats: &Shared,
    hub: &Hub,
    tx: Option<SyncSender<Commit>>,
    next_id: Arc<AtomicU64>,
    log: &Log,
) {
    let Attached {
        hello,
        mut consumer,
        stream,
    } = a;
    // The observers' host number, held while attached (ids of sequences of
    // hosts attached at the same time must differ; see `hub`).
    let Some(host_slot) = hub.attach_host() else {
        log(&format!(
            "latent-tap listen: refused host {} connection {}: {} host connections are attached already",
            hello.pid,
            hello.connection,
            super::hub::MAX_HOSTS
        ));
        return;
    };
    let hn = host_slot.number();
    let ix = match stats.lock() {
        Ok(mut s) => {
            s.hosts.push(HostInfo {
                pid: hello.pid,
                exe: hello.exe.clone(),
                connection: hello.connection,
                tensors: hello.tensors.clone(),
                layers: hello.layers.clone(),
                rows: hello.rows.clone(),
                dtype: hello.dtype.clone(),
                frames: 0,
                token_rows: 0,
                requests: 0,
                drops: 0,
                bad_records: 0,
                attached: true,
                ended: None,
            });
            s.hosts.len() - 1
        }
        Err(_) => return,
    };
    if opts.verbose {
        log(&format!(
            "latent-tap listen: host {} ({}) attached, connection {}, ring {} bytes, tensors '{}', dtype {}",
            hello.pid,
            hello.exe,
            hello.connection,
            hello.map_bytes,
            hello.tensors,
            hello.dtype
        ));
    }
    let mut pairer = Pairer::new(Box::new(move || next_id.fetch_add(1, Ordering::Relaxed)));
    let (mut frames, mut bad) = (0u64, 0u64);
    let (rows, requests) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    let mut emit = |ev: Event<'_>| {
        hub.publish(hn, &ev);
        match ev {
            Event::Begin { .. } => requests.set(requests.get() + 1),
            Event::Token { .. } => rows.set(rows.get() + 1),
            Event::End(req) => {
                if let Some(tx) = &tx {
                    // Blocks while the writer is behind: the host's ring fills
                    // and the host drops (counted) instead of this growing.
                    let _ = tx.send(Commit { req, host: ix });
                }
            }
            Event::Frame { .. } => {}
        }
    };
    let mut last_check = Instant::now();
    let mut last_stats = Instant::now();
    let reason = loop {
        let mut n = 0;
        while let Some(g) = consumer.try_read() {
            handle(&g, &mut pairer, &mut emit, &mut frames, &mut bad);
            drop(g);
            n += 1;
            if n >= 4096 {
                break;
            }
        }
        if consumer.is_corrupt() {
            log(&format!(
                "latent-tap listen: host {} connection {}: its ring is corrupt; dropping the connection",
                hello.pid, hello.connection
            ));
            break "ring corrupt";
        }
        // The host dropped its ring (it stopped tapping) and all of it was read.
        if n == 0 && consumer.is_abandoned() && consumer.used_bytes() == 0 {
            break if sink::hung_up(&stream) {
                "host exited"
            } else {
                "host dropped its ring"
            };
        }
        let stopping = stop.load(Ordering::Relaxed);
        let mut gone = false;
        if n == 0 || stopping || last_check.elapsed() >= Duration::from_millis(100) {
            if !stopping && last_check.elapsed() >= Duration::from_millis(100) {
                gone = sink::hung_up(&stream);
                last_check = Instant::now();
            }
            if stopping || gone {
                // Drain what the host wrote before it left.
                while let Some(g) = consumer.try_read() {
                    handle(&g, &mut pairer, &mut emit, &mut frames, &mut bad);
                }
                break if gone {
                    "host exited"
                } else {
                    "listener stopped"
                };
            }
        }
        if last_stats.elapsed() >= Duration::from_millis(200) {
            last_stats = Instant::now();
            if let Ok(mut s) = stats.lock() {
                let h = &mut s.hosts[ix];
                (h.frames, h.token_rows, h.requests, h.bad_records) =
                    (frames, rows.get(), requests.get(), bad);
                h.drops = consumer.stats().drops;
            }
        }
        if n == 0 {
            std::thread::sleep(Duration::from_micros(500));
        }
    };
    pairer.finish(&mut emit);
    let unaligned = pairer.unaligned;
    if let Ok(mut s) = stats.lock() {
        s.unaligned += unaligned;
        let drops = consumer.stats().drops;
        let h = &mut s.hosts[ix];
        (h.frames, h.token_rows, h.requests, h.bad_records) =
            (frames, rows.get(), requests.get(), bad);
        h.drops = drops;
        h.attached = false;
        h.ended = Some(reason.into());
    }
    if opts.verbose {
        log(&format!(
            "latent-tap listen: host {} connection {} detached ({reason}): {frames} frames, {} rows, {} requests, {} drops",
            hello.pid,
            hello.connection,
            rows.get(),
            requests.get(),
            consumer.stats().drops
        ));
    }
    let _ = std::io::stderr().flush();
}

fn handle(
    buf: &[u8],
    pairer: &mut Pairer,
    emit: &mut dyn FnMut(Event<'_>),
    frames: &mut u64,
    bad: &mut u64,
) {
    let kind = buf
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    match kind {
        Some(record::kind::FRAME) => match Record::parse(buf) {
            Ok(Record::Frame(f)) => {
                *frames += 1;
                pairer.frame(&f, emit);
            }
            _ => *bad += 1,
        },
        Some(KIND_SEQ_RM) => match SeqRm::parse(buf) {
            Some(r) => pairer.seq_rm(&r, emit),
            None => *bad += 1,
        },
        _ => *bad += 1,
    }
}
