//! Frame throughput of `latent_tap::ring` versus `crossbeam_channel::bounded`.
//!
//! Both move the same frames from a producer thread to a consumer thread with
//! the same buffering (1 MiB). The ring copies each frame straight into its
//! arena; the channel user allocates a `Vec<u8>` per frame, as code sending
//! owned buffers over a channel would. Both consumers touch the first and last
//! byte of every frame and then release/drop it. The ring's sides wait with
//! `crossbeam_utils::Backoff` (spin, then yield), so the numbers stay sane on
//! an oversubscribed machine, where pure spinning would measure the scheduler.

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

fn touch(frame: &[u8]) {
    black_box(frame[0]);
    black_box(frame[frame.len() - 1]);
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
            for frame in rx.iter() {
                touch(&frame);
            }
        });
        for _ in 0..iters {
            tx.send(src.to_vec()).unwrap();
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
