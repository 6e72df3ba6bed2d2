//! Frame throughput of `latent_tap::ring` versus `crossbeam_channel::bounded`.
//!
//! Both move the same frames from a producer thread to a consumer thread with
//! the same buffering (1 MiB). The ring copies each frame straight into its
//! arena; the channel user allocates a `Vec<u8>` per frame, as code sending
//! owned buffers over a channel would. Both consumers read every byte of every
//! frame (a word sum) and then release/drop it. (Reading only the first and
//! last byte, as this bench once did, leaves the producer's copy as nearly all
//! the work, and a copy into the just-freed, cache-hot block malloc hands back
//! is cheaper than one into the ring's next slot, which has lapped through the
//! 1 MiB arena: not the work a capture consumer does.) All sides wait the same
//! way, with `crossbeam_utils::Backoff` (spin, then yield): the ring through
//! `try_write`/`try_read`, the channel through `try_send`/`try_recv`, so only
//! the transport differs.
//!
//! Criterion measures one side after the other, so on a shared machine a load
//! change between them can flip the verdict; `benches/ring_ab.rs` runs them
//! alternately in one process and reports the spread: use that to decide.

use std::hint::black_box;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_utils::Backoff;
use latent_tap::ring;

/// Buffering for both transports.
const BUFFER_BYTES: usize = 1 << 20;
/// One hidden state of a 640-wide f32 model, and a 4096-wide one.
const FRAME_SIZES: [usize; 2] = [2560, 16 * 1024];

/// Reads every byte of `frame` (a four-lane word sum, so it vectorises).
fn touch(frame: &[u8]) {
    let mut lanes = [0u64; 4];
    let mut chunks = frame.chunks_exact(32);
    for chunk in &mut chunks {
        for (lane, word) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            *lane = lane.wrapping_add(u64::from_le_bytes(word.try_into().unwrap()));
        }
    }
    black_box(lanes);
    black_box(chunks.remainder());
}

/// Moves `iters` frames through the ring; returns the wall time until the
/// consumer has released the last one.
fn run_ring(frame_len: usize, iters: u64) -> Duration {
    let (mut producer, mut consumer) = ring::channel(BUFFER_BYTES).unwrap();
    let src = vec![0xA5u8; frame_len];
    let start = Instant::now();
    thread::scope(|s| {
        s.spawn(move || {
            let backoff = Backoff::new();
            let mut received = 0;
            while received < iters {
                match consumer.try_read() {
                    Some(frame) => {
                        touch(&frame);
                        received += 1;
                        backoff.reset();
                    }
                    None => backoff.snooze(),
                }
            }
        });
        let backoff = Backoff::new();
        for _ in 0..iters {
            loop {
                match producer.try_write(frame_len) {
                    Ok(mut grant) => {
                        grant.copy_from_slice(&src);
                        grant.commit();
                        backoff.reset();
                        break;
                    }
                    Err(_) => backoff.snooze(),
                }
            }
        }
    });
    start.elapsed()
}

/// Same as [`run_ring`] through a bounded crossbeam channel of owned frames.
fn run_channel(frame_len: usize, iters: u64) -> Duration {
    let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(BUFFER_BYTES / frame_len);
    let src = vec![0xA5u8; frame_len];
    let start = Instant::now();
    thread::scope(|s| {
        s.spawn(move || {
            let backoff = Backoff::new();
            loop {
                match rx.try_recv() {
                    Ok(frame) => {
                        touch(&frame);
                        backoff.reset();
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => backoff.snooze(),
                    Err(crossbeam_channel::TryRecvError::Disconnected) => break,
                }
            }
        });
        let backoff = Backoff::new();
        for _ in 0..iters {
            let mut frame = src.to_vec();
            loop {
                match tx.try_send(frame) {
                    Ok(()) => {
                        backoff.reset();
                        break;
                    }
                    Err(crossbeam_channel::TrySendError::Full(back)) => {
                        frame = back;
                        backoff.snooze();
                    }
                    Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                        unreachable!("the consumer outlives the producer")
                    }
                }
            }
        }
        drop(tx);
    });
    start.elapsed()
}

fn throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("spsc_frames");
    for frame_len in FRAME_SIZES {
        group.throughput(Throughput::Bytes(frame_len as u64));
        group.bench_with_input(
            BenchmarkId::new("ring", frame_len),
            &frame_len,
            |b, &len| b.iter_custom(|iters| run_ring(len, iters)),
        );
        group.bench_with_input(
            BenchmarkId::new("crossbeam_channel", frame_len),
            &frame_len,
            |b, &len| b.iter_custom(|iters| run_channel(len, iters)),
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = throughput
}
criterion_main!(benches);
