//! Decisive A/B throughput of `latent_tap::ring` versus `crossbeam_channel`.
//!
//! Criterion (`benches/ring.rs`) measures one side after the other; on a
//! shared machine the load changes between the two, so its intervals overlap
//! and a rerun can flip the verdict. This bench runs the sides *alternately in
//! one process*: for every frame size, `ROUNDS` rounds, each round runs every
//! side once (the order rotates from round to round) and moves the same fixed
//! number of payload bytes. It prints, per side, the median, min and max GiB/s
//! over the rounds, and per channel side the per-round ratio ring/channel (the
//! runs of one round follow each other closely, so they share the machine's
//! load): its median with a distribution-free 95% confidence interval and its
//! range, then the ratio of the two medians. The CI assumes independent rounds,
//! which a drifting load breaks: a CI that excludes 1.00 in repeated runs
//! decides.
//!
//! Same work on every side: the producer copies each frame's payload from a
//! source buffer into the transport's memory, the consumer reads every byte of
//! it (a word checksum, verified at the end) and then releases it. Sides:
//!
//! - `ring`: copy into a ring grant, commit; read the grant, release it.
//! - `channel`: `src.to_vec()` (allocate + copy) per frame, send the `Vec`;
//!   the consumer drops it (as code sending owned buffers over a channel would).
//! - `channel_pool`: like `channel`, but the consumer sends each `Vec` back on a
//!   second channel and the producer reuses it: no allocation, the channel's
//!   best case.
//!
//! Both transports buffer the same bytes: `max(1 MiB, 4 * (frame + 8))` (the ring
//! needs at least `2 * (frame + 8)`), i.e. that many bytes / frame channel slots.
//! Threads are not pinned unless `RING_AB_PIN=1` (Linux: producer on the first
//! allowed CPU, consumer on the second). Every side waits the same way by
//! default: spin, then yield (`crossbeam_utils::Backoff`), the ring with
//! `try_write`/`try_read`, the channels with `try_send`/`try_recv`, so only the
//! transport differs; with `RING_AB_CHANNEL_WAIT=block` the channels use their
//! blocking send/recv (spin, then park) instead.
//!
//! Environment: `RING_AB_ROUNDS` (default 61), `RING_AB_MIB` (payload MiB per
//! side per round, default 128), `RING_AB_SIZES` (comma-separated frame bytes,
//! default `256,2560,16384,65536,1048576`), `RING_AB_CONSUMER=touch` (read only
//! the first and last byte of each frame, as `benches/ring.rs` once did,
//! instead of all of it), `RING_AB_BUFFER` (minimum buffering in bytes, default
//! 1 MiB), `RING_AB_CHANNEL_WAIT=block`, `RING_AB_PIN=1` (see above). Without
//! `--bench` (as under `cargo test --benches`) it runs one tiny round per size
//! as a smoke test.
//!
//! `cargo bench --bench ring_ab`

use std::hint::black_box;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_utils::Backoff;
use latent_tap::ring;

const DEFAULT_SIZES: [usize; 5] = [256, 2560, 16 << 10, 64 << 10, 1 << 20];
const MIN_BUFFER: usize = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Ring,
    Channel,
    ChannelPool,
}

impl Side {
    const ALL: [Side; 3] = [Side::Ring, Side::Channel, Side::ChannelPool];

    fn name(self) -> &'static str {
        match self {
            Side::Ring => "ring",
            Side::Channel => "channel",
            Side::ChannelPool => "channel_pool",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Checksum every byte of the frame.
    All,
    /// Read only the first and last byte.
    Touch,
}

/// What the consumer does with a frame; returns its contribution to the
/// run's checksum.
#[inline]
fn consume(frame: &[u8], read: Read) -> u64 {
    match read {
        Read::Touch => {
            u64::from(black_box(frame[0])) + u64::from(black_box(frame[frame.len() - 1]))
        }
        Read::All => {
            // Four lanes so the sum vectorises and runs at memory speed.
            let mut lanes = [0u64; 4];
            let mut chunks = frame.chunks_exact(32);
            for chunk in &mut chunks {
                for (lane, word) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
                    *lane = lane.wrapping_add(u64::from_le_bytes(word.try_into().unwrap()));
                }
            }
            let tail = chunks
                .remainder()
                .iter()
                .fold(0u64, |h, &b| h.wrapping_add(u64::from(b)));
            lanes.iter().fold(tail, |h, &lane| h.wrapping_add(lane))
        }
    }
}

fn buffer_bytes(frame_len: usize) -> usize {
    let min = match std::env::var("RING_AB_BUFFER") {
        Ok(v) => v.parse().expect("RING_AB_BUFFER: bytes"),
        Err(_) => MIN_BUFFER,
    };
    min.max(4 * (frame_len + 8))
}

/// Which CPUs the producer and consumer threads are pinned to (`RING_AB_PIN=1`):
/// the first two CPUs this process may run on. `None`: not pinned.
#[derive(Clone, Copy)]
struct Pin(Option<(usize, usize)>);

#[cfg(target_os = "linux")]
mod affinity {
    /// `cpu_set_t`: 1024 bits.
    pub type CpuSet = [u64; 16];

    extern "C" {
        fn sched_setaffinity(pid: i32, size: usize, mask: *const CpuSet) -> i32;
        fn sched_getaffinity(pid: i32, size: usize, mask: *mut CpuSet) -> i32;
    }

    /// CPUs the calling thread may run on.
    pub fn allowed() -> Vec<usize> {
        let mut set: CpuSet = [0; 16];
        // SAFETY: `set` is a writable, properly sized `cpu_set_t`; pid 0 is the
        // calling thread.
        let rc = unsafe { sched_getaffinity(0, std::mem::size_of::<CpuSet>(), &mut set) };
        assert_eq!(rc, 0, "sched_getaffinity failed");
        (0..1024)
            .filter(|&cpu| set[cpu / 64] & (1 << (cpu % 64)) != 0)
            .collect()
    }

    /// Restricts the calling thread to `cpu`.
    pub fn pin(cpu: usize) {
        let mut set: CpuSet = [0; 16];
        set[cpu / 64] |= 1 << (cpu % 64);
        // SAFETY: `set` is a valid, properly sized `cpu_set_t`; pid 0 is the
        // calling thread.
        let rc = unsafe { sched_setaffinity(0, std::mem::size_of::<CpuSet>(), &set) };
        assert_eq!(rc, 0, "sched_setaffinity({cpu}) failed");
    }
}

impl Pin {
    fn from_env() -> Self {
        if std::env::var("RING_AB_PIN").as_deref() != Ok("1") {
            return Pin(None);
        }
        #[cfg(target_os = "linux")]
        {
            let cpus = affinity::allowed();
            assert!(cpus.len() >= 2, "RING_AB_PIN=1 needs two CPUs");
            Pin(Some((cpus[0], cpus[1])))
        }
        #[cfg(not(target_os = "linux"))]
        panic!("RING_AB_PIN=1 is implemented for Linux only")
    }

    /// Pins the calling thread (the main thread, which produces in every run).
    fn producer(self) {
        #[cfg(target_os = "linux")]
        if let Some((cpu, _)) = self.0 {
            affinity::pin(cpu);
        }
    }

    fn consumer(self) {
        #[cfg(target_os = "linux")]
        if let Some((_, cpu)) = self.0 {
            affinity::pin(cpu);
        }
    }
}

/// Moves `frames` frames of `src` through the ring; returns the wall time until
/// the consumer released the last one, and the consumer's checksum.
fn run_ring(src: &[u8], frames: u64, read: Read, pin: Pin) -> (Duration, u64) {
    let (mut producer, mut consumer) = ring::channel(buffer_bytes(src.len())).unwrap();
    let start = Instant::now();
    let sum = thread::scope(|s| {
        let reader = s.spawn(move || {
            pin.consumer();
            let backoff = Backoff::new();
            let mut sum = 0u64;
            let mut received = 0;
            while received < frames {
                match consumer.try_read() {
                    Some(frame) => {
                        sum = sum.wrapping_add(consume(&frame, read));
                        frame.release();
                        received += 1;
                        backoff.reset();
                    }
                    None => backoff.snooze(),
                }
            }
            sum
        });
        let backoff = Backoff::new();
        for _ in 0..frames {
            loop {
                match producer.try_write(src.len()) {
                    Ok(mut grant) => {
                        grant.copy_from_slice(src);
                        grant.commit();
                        backoff.reset();
                        break;
                    }
                    Err(_) => backoff.snooze(),
                }
            }
        }
        reader.join().unwrap()
    });
    (start.elapsed(), sum)
}

/// How the channel sides wait when their channel is full or empty.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// `try_send`/`try_recv` with `Backoff` (spin, then yield), exactly like the
    /// ring's sides: only the transport differs.
    Backoff,
    /// The channel's own blocking `send`/`recv` (spin, then park on a futex).
    Block,
}

type Tx = crossbeam_channel::Sender<Vec<u8>>;
type Rx = crossbeam_channel::Receiver<Vec<u8>>;

/// Sends `v`; `false` if the receiver is gone.
#[inline]
fn send(tx: &Tx, mut v: Vec<u8>, wait: Wait) -> bool {
    if wait == Wait::Block {
        return tx.send(v).is_ok();
    }
    let backoff = Backoff::new();
    loop {
        match tx.try_send(v) {
            Ok(()) => return true,
            Err(crossbeam_channel::TrySendError::Full(back)) => {
                v = back;
                backoff.snooze();
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => return false,
        }
    }
}

/// Receives a buffer; `None` once the channel is empty and disconnected.
#[inline]
fn recv(rx: &Rx, wait: Wait) -> Option<Vec<u8>> {
    if wait == Wait::Block {
        return rx.recv().ok();
    }
    let backoff = Backoff::new();
    loop {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(crossbeam_channel::TryRecvError::Empty) => backoff.snooze(),
            Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
        }
    }
}

/// Same through a bounded channel of owned frames, one allocation per frame.
fn run_channel(src: &[u8], frames: u64, read: Read, pin: Pin, wait: Wait) -> (Duration, u64) {
    let slots = buffer_bytes(src.len()) / src.len();
    let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(slots);
    let start = Instant::now();
    let sum = thread::scope(|s| {
        let reader = s.spawn(move || {
            pin.consumer();
            let mut sum = 0u64;
            while let Some(frame) = recv(&rx, wait) {
                sum = sum.wrapping_add(consume(&frame, read));
            }
            sum
        });
        for _ in 0..frames {
            assert!(send(&tx, src.to_vec(), wait));
        }
        drop(tx);
        reader.join().unwrap()
    });
    (start.elapsed(), sum)
}

/// Same, with the consumer returning every buffer for reuse (no allocation
/// after the pool is filled, outside the timed region).
fn run_channel_pool(src: &[u8], frames: u64, read: Read, pin: Pin, wait: Wait) -> (Duration, u64) {
    let slots = buffer_bytes(src.len()) / src.len();
    let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(slots);
    // The return channel never fills: it can hold every buffer in the pool.
    let (back_tx, back_rx) = crossbeam_channel::bounded::<Vec<u8>>(slots + 1);
    for _ in 0..=slots {
        back_tx.send(vec![0u8; src.len()]).unwrap();
    }
    let start = Instant::now();
    let sum = thread::scope(|s| {
        let reader = s.spawn(move || {
            pin.consumer();
            let mut sum = 0u64;
            while let Some(frame) = recv(&rx, wait) {
                sum = sum.wrapping_add(consume(&frame, read));
                // The producer may be gone after its last frame.
                send(&back_tx, frame, wait);
            }
            sum
        });
        for _ in 0..frames {
            let mut buf = recv(&back_rx, wait).unwrap();
            buf.copy_from_slice(src);
            assert!(send(&tx, buf, wait));
        }
        drop(tx);
        reader.join().unwrap()
    });
    (start.elapsed(), sum)
}

fn run(side: Side, src: &[u8], frames: u64, read: Read, wait: Wait, pin: Pin) -> (Duration, u64) {
    match side {
        Side::Ring => run_ring(src, frames, read, pin),
        Side::Channel => run_channel(src, frames, read, pin, wait),
        Side::ChannelPool => run_channel_pool(src, frames, read, pin, wait),
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Distribution-free 95% confidence interval of the median of `sorted`
/// (order statistics of the binomial sign test; needs no assumption about the
/// shape of the noise, only independent rounds). With fewer than 6 values it
/// is the whole range.
fn median_ci95(sorted: &[f64]) -> (f64, f64) {
    let n = sorted.len();
    // Largest k with P(Binomial(n, 1/2) < k) <= 2.5%: then [x_(k), x_(n+1-k)]
    // (1-based) covers the median with probability >= 95%.
    let mut k = 0;
    let mut cdf = 0.0;
    let mut pmf = 0.5f64.powi(n as i32); // P(X = 0)
    for j in 0..n {
        cdf += pmf; // P(X <= j)
        if cdf > 0.025 {
            break;
        }
        k = j + 1;
        pmf *= (n - j) as f64 / (j + 1) as f64;
    }
    if k == 0 {
        (sorted[0], sorted[n - 1])
    } else {
        (sorted[k - 1], sorted[n - k])
    }
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

fn size_label(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let rounds: usize = if bench {
        env_or("RING_AB_ROUNDS", 61)
    } else {
        1
    };
    let mib: u64 = if bench { env_or("RING_AB_MIB", 128) } else { 4 };
    let sizes: Vec<usize> = match std::env::var("RING_AB_SIZES") {
        Ok(v) => v
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("RING_AB_SIZES: comma-separated byte counts")
            })
            .collect(),
        Err(_) => DEFAULT_SIZES.to_vec(),
    };
    let read = match std::env::var("RING_AB_CONSUMER").as_deref() {
        Ok("touch") => Read::Touch,
        Ok("all") | Err(_) => Read::All,
        Ok(other) => panic!("RING_AB_CONSUMER={other:?}: expected all or touch"),
    };
    let wait = match std::env::var("RING_AB_CHANNEL_WAIT").as_deref() {
        Ok("backoff") | Err(_) => Wait::Backoff,
        Ok("block") => Wait::Block,
        Ok(other) => panic!("RING_AB_CHANNEL_WAIT={other:?}: expected backoff or block"),
    };
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let pin = Pin::from_env();
    pin.producer();
    assert!(rounds > 0 && mib > 0);
    println!(
        "ring vs crossbeam-channel, alternating rounds: {rounds} rounds x {mib} MiB per side, \
         consumer reads {}, channel waits with {}, {}, {} CPUs",
        if read == Read::All {
            "every byte"
        } else {
            "first+last byte"
        },
        if wait == Wait::Backoff {
            "Backoff like the ring"
        } else {
            "blocking send/recv"
        },
        match pin.0 {
            Some((p, c)) => format!("producer pinned to CPU {p}, consumer to CPU {c}"),
            None => "threads not pinned".to_string(),
        },
        cpus,
    );
    println!(
        "{:>8} {:>13} {:>7} {:>7} {:>7}   ring/side per round: median (95% CI) [min, max]; ratio of medians",
        "frame", "side", "median", "min", "max"
    );
    for &frame_len in &sizes {
        assert!(frame_len > 0, "frame size must be positive");
        let src: Vec<u8> = (0..frame_len)
            .map(|i| (i as u8).wrapping_mul(31) ^ 0x5A)
            .collect();
        let frames = (mib << 20).div_ceil(frame_len as u64);
        let expected = consume(&src, read).wrapping_mul(frames);
        let bytes = frames as f64 * frame_len as f64;
        // One unmeasured warm-up run per side (page faults, allocator, caches).
        for side in Side::ALL {
            let warm = frames.min(((64u64 << 20) / frame_len as u64).max(1));
            let (_, sum) = run(side, &src, warm, read, wait, pin);
            assert_eq!(
                sum,
                consume(&src, read).wrapping_mul(warm),
                "{}: checksum",
                side.name()
            );
        }
        let mut gibs = vec![Vec::with_capacity(rounds); Side::ALL.len()];
        for round in 0..rounds {
            for k in 0..Side::ALL.len() {
                let i = (round + k) % Side::ALL.len();
                let (elapsed, sum) = run(Side::ALL[i], &src, frames, read, wait, pin);
                assert_eq!(sum, expected, "{}: checksum mismatch", Side::ALL[i].name());
                gibs[i].push(bytes / GIB / elapsed.as_secs_f64());
            }
        }
        let ring = &gibs[0];
        let ring_median = median(&sorted(ring));
        for (i, side) in Side::ALL.iter().enumerate() {
            let s = sorted(&gibs[i]);
            let mut line = format!(
                "{:>8} {:>13} {:>7.2} {:>7.2} {:>7.2}",
                size_label(frame_len),
                side.name(),
                median(&s),
                s[0],
                s[s.len() - 1]
            );
            if *side != Side::Ring {
                let paired: Vec<f64> = ring.iter().zip(&gibs[i]).map(|(r, c)| r / c).collect();
                let p = sorted(&paired);
                let (lo, hi) = median_ci95(&p);
                line += &format!(
                    "   {:.2}x ({:.2}-{:.2}) [{:.2}, {:.2}]; {:.2}x",
                    median(&p),
                    lo,
                    hi,
                    p[0],
                    p[p.len() - 1],
                    ring_median / median(&s),
                );
            }
            println!("{line}");
        }
    }
    println!("(GiB/s of payload, 1 GiB = 2^30 bytes)");
}
