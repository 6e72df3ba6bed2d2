//! Threaded stress test of `latent_tap_core::ring`: a million randomly sized
//! records, each carrying its sequence number and a checksum of its contents,
//! under both caller policies (block for lossless, drop-newest for lossy).
//!
//! Record layout: `[seq: u64 LE][checksum: u64 LE][payload]`, total length
//! drawn from a fixed-seed RNG so both threads know every record's size.
//!
//! Run in release mode for the full count (`cargo test --release --test
//! ring_stress`); unoptimised builds use a tenth of it to stay quick.
//! `RING_STRESS_RECORDS` overrides the count.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use latent_tap_core::ring::{self, Consumer, WriteError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEED: u64 = 0x1A7E_57A9;
const PREFIX: usize = 16;
const MIN_LEN: usize = PREFIX;
const MAX_LEN: usize = 4096;
const RING_BYTES: usize = 256 * 1024;
/// In drop-newest mode the consumer stalls after this many records.
const STALL_EVERY: u64 = 2000;

fn record_count() -> usize {
    if let Ok(n) = std::env::var("RING_STRESS_RECORDS") {
        return n.parse().expect("RING_STRESS_RECORDS must be a number");
    }
    if cfg!(debug_assertions) {
        100_000
    } else {
        1_000_000
    }
}

/// Every record's total length, indexed by sequence number.
fn sizes(n: usize) -> Arc<[u16]> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    (0..n)
        .map(|_| rng.gen_range(MIN_LEN..=MAX_LEN) as u16)
        .collect()
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Word-wise hash of the payload; any flipped, shifted or stale byte changes
/// it. Four independent lanes keep it from bottlenecking the test.
fn checksum(payload: &[u8]) -> u64 {
    const K: u64 = 0x0000_0100_0000_01B3;
    let mix = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(K);
    let mut lanes = [0xCBF2_9CE4_8422_2325u64 ^ payload.len() as u64; 4];
    let mut blocks = payload.chunks_exact(32);
    for block in &mut blocks {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            *lane = mix(*lane, u64::from_le_bytes(word.try_into().unwrap()));
        }
    }
    let mut h = lanes.iter().fold(0, |h, &lane| mix(h, lane));
    for &b in blocks.remainder() {
        h = mix(h, u64::from(b));
    }
    h
}

/// Fills a record for `seq` with pseudo-random bytes plus its prefix.
fn fill_record(buf: &mut [u8], seq: u64) {
    let (prefix, payload) = buf.split_at_mut(PREFIX);
    let mut state = seq ^ SEED;
    for chunk in payload.chunks_mut(8) {
        let w = splitmix(&mut state).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
    prefix[..8].copy_from_slice(&seq.to_le_bytes());
    prefix[8..].copy_from_slice(&checksum(payload).to_le_bytes());
}

/// Checks one record against its expected size and checksum; returns its seq.
fn verify_record(buf: &[u8], sizes: &[u16]) -> u64 {
    let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
    let sum = u64::from_le_bytes(buf[8..16].try_into().unwrap());
    assert!((seq as usize) < sizes.len(), "bogus sequence number {seq}");
    assert_eq!(
        buf.len(),
        sizes[seq as usize] as usize,
        "record {seq} length"
    );
    assert_eq!(checksum(&buf[PREFIX..]), sum, "record {seq} checksum");
    seq
}

/// Drains `c` until the producer is gone, calling `on_record` on each record.
fn consume(mut c: Consumer, mut on_record: impl FnMut(&[u8])) -> Consumer {
    loop {
        // Sample before reading: if the producer was already gone, an empty
        // read below means everything it published has been seen.
        let abandoned = c.is_abandoned();
        let got = match c.try_read() {
            Some(grant) => {
                on_record(&grant);
                true
            }
            None => false,
        };
        if !got {
            if abandoned {
                return c;
            }
            thread::yield_now();
        }
    }
}

#[test]
fn block() {
    let n = record_count();
    let sizes = sizes(n);
    let (mut p, c) = ring::channel(RING_BYTES).unwrap();
    let start = Instant::now();

    let producer_sizes = Arc::clone(&sizes);
    let producer = thread::spawn(move || {
        for (seq, &len) in producer_sizes.iter().enumerate() {
            let mut grant = p
                .write_blocking(len as usize, Duration::from_secs(30))
                .expect("lossless write");
            fill_record(&mut grant, seq as u64);
            grant.commit();
        }
        p.stats()
    });

    let mut expected = 0u64;
    let mut bytes = 0u64;
    let c = consume(c, |rec| {
        let seq = verify_record(rec, &sizes);
        assert_eq!(seq, expected, "lost or reordered record");
        expected += 1;
        bytes += rec.len() as u64;
    });
    let stats = producer.join().unwrap();

    assert_eq!(expected, n as u64, "records lost");
    assert_eq!(stats, c.stats());
    assert_eq!(stats.records, n as u64);
    assert_eq!(stats.bytes, bytes);
    assert_eq!(stats.drops, 0);
    eprintln!(
        "block: {n} records, {:.1} MB in {:?}",
        bytes as f64 / 1e6,
        start.elapsed()
    );
}

#[test]
fn drop_newest() {
    let n = record_count();
    let sizes = sizes(n);
    let (mut p, mut c) = ring::channel(RING_BYTES).unwrap();
    let start = Instant::now();

    let producer_sizes = Arc::clone(&sizes);
    let producer = thread::spawn(move || {
        let mut dropped = 0u64;
        // A compute thread produces each frame whether or not it is kept, so
        // the producer does the same work for dropped records, into scratch.
        let mut scratch = vec![0u8; MAX_LEN];
        for (seq, &len) in producer_sizes.iter().enumerate() {
            match p.try_write(len as usize) {
                Ok(mut grant) => {
                    fill_record(&mut grant, seq as u64);
                    grant.commit();
                }
                Err(WriteError::Full) => {
                    fill_record(&mut scratch[..len as usize], seq as u64);
                    p.note_drop();
                    dropped += 1;
                }
                Err(e) => panic!("record {seq}: {e}"),
            }
        }
        (dropped, p.stats())
    });

    let mut next = 0u64; // first sequence number not yet accounted for
    let mut seen = 0u64;
    let mut gaps = 0u64;
    let mut bytes = 0u64;
    let mut until_stall = STALL_EVERY;
    loop {
        let abandoned = c.is_abandoned();
        let got = match c.try_read() {
            Some(rec) => {
                let seq = verify_record(&rec, &sizes);
                assert!(seq >= next, "record {seq} reordered or duplicated");
                gaps += seq - next;
                next = seq + 1;
                seen += 1;
                bytes += rec.len() as u64;
                true
            }
            None => false,
        };
        if !got {
            if abandoned {
                break;
            }
            thread::yield_now();
        } else {
            until_stall -= 1;
            if until_stall > 0 {
                continue;
            }
            until_stall = STALL_EVERY;
            // Stall until the producer has demonstrably dropped something, so
            // drops happen on any machine speed, not just a fast producer.
            let before = c.stats().drops;
            while c.stats().drops == before && !c.is_abandoned() {
                thread::sleep(Duration::from_micros(50));
            }
        }
    }
    gaps += n as u64 - next; // records dropped after the last one seen
    let (dropped, stats) = producer.join().unwrap();

    assert_eq!(stats, c.stats());
    assert_eq!(stats.drops, dropped);
    assert_eq!(seen + stats.drops, n as u64);
    assert_eq!(gaps, stats.drops, "sequence gaps must match reported drops");
    assert_eq!(stats.records, seen);
    assert_eq!(stats.bytes, bytes);
    assert!(stats.drops > 0, "slowed consumer should have forced drops");
    assert!(seen > 0);
    eprintln!(
        "drop-newest: {n} records, {seen} delivered, {} dropped, in {:?}",
        stats.drops,
        start.elapsed()
    );
}
