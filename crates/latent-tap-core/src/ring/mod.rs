//! Lock-free single-producer/single-consumer ring of variable-size records.
//!
//! Latent frames (KB..MB each) leave llama.cpp's compute thread through this
//! ring. The compute thread must never stall on the consumer's behalf, so the
//! [`Producer`] side never allocates, locks or makes a syscall: the whole arena
//! is allocated once by [`channel`], and [`Producer::try_write`] hands out a
//! zero-copy [`WriteGrant`] directly into it (or fails at once).
//!
//! # Layout
//!
//! The arena is one heap buffer whose size is a multiple of 8. Each record is
//! an 8-byte header (`u32` payload length, `u32` tag) followed by the payload
//! padded to a multiple of 8, so every header and every payload starts 8-byte
//! aligned (payloads may be viewed as `f32`/`u64` slices). A record is always
//! contiguous: when it does not fit before the end of the arena, the producer
//! writes a *padding* header, treats the rest of the arena as used, and places
//! the record at offset 0. The consumer skips padding transparently.
//!
//! # Synchronisation
//!
//! `head` (bytes ever published, producer-written) and `tail` (bytes ever
//! released, consumer-written) are free-running counters on separate cache
//! lines. Each side keeps a cached copy of the other side's counter and only
//! reloads it (Acquire) when the cache claims the ring is full (producer) or
//! empty (consumer); publishing is a single Release store. Only the difference
//! `head - tail` is ever used, so the counters may wrap (relevant on 32-bit
//! targets); each side tracks its own arena offset instead of deriving it from
//! the counter, which keeps this correct for any capacity, not just powers of
//! two.
//!
//! The drop-vs-block policy lives in the caller; this module only offers
//! non-blocking [`Producer::try_write`] and, for lossless mode, the waiting
//! helper [`Producer::write_blocking`].

use std::alloc::{self, Layout};
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::slice;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

/// Size of a record header, and the alignment of every header and payload.
const HEADER: usize = 8;
/// Smallest arena: one zero-length record must fit in half of it
/// (see [`Producer::max_record_len`]).
const MIN_CAPACITY: usize = 2 * HEADER;
/// Arena alignment: a cache line, so the first record shares no line with
/// unrelated heap data.
const ARENA_ALIGN: usize = 64;
/// Largest accepted capacity; keeps all index arithmetic far from overflow.
const MAX_CAPACITY: usize = (isize::MAX as usize) / 2;

/// Header tag of a data record.
const TAG_DATA: u32 = 0xDA7A_0001;
/// Header tag of wrap padding: the rest of the arena is skipped.
const TAG_PAD: u32 = 0xDA7A_0002;

/// Rounds `n` up to a multiple of 8. Callers keep `n` far below `usize::MAX`.
#[inline]
const fn pad8(n: usize) -> usize {
    (n + (HEADER - 1)) & !(HEADER - 1)
}

/// Why [`channel`] could not create a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// A capacity of 0 bytes was requested.
    ZeroCapacity,
    /// The requested capacity exceeds `isize::MAX / 2` bytes.
    CapacityTooLarge {
        /// The capacity that was asked for.
        requested: usize,
    },
    /// The allocator could not provide the arena.
    AllocFailed {
        /// The arena size (after rounding) that failed to allocate.
        bytes: usize,
    },
    /// A shared-memory mapping is too small, misaligned, or does not hold a
    /// ring laid out by this version of [`shm::producer`].
    BadMapping(&'static str),
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroCapacity => f.write_str("ring capacity must be non-zero"),
            Self::CapacityTooLarge { requested } => {
                write!(f, "ring capacity of {requested} bytes is too large")
            }
            Self::AllocFailed { bytes } => {
                write!(f, "could not allocate a {bytes}-byte ring arena")
            }
            Self::BadMapping(why) => write!(f, "not a usable shared-memory ring: {why}"),
        }
    }
}

impl std::error::Error for RingError {}

/// Why a write could not be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteError {
    /// The payload exceeds [`Producer::max_record_len`]; it can never be written,
    /// no matter how long the caller waits.
    TooLarge {
        /// Requested payload length.
        len: usize,
        /// The ring's [`Producer::max_record_len`].
        max: usize,
    },
    /// Not enough free space right now; retry later or drop the record.
    Full,
    /// [`Producer::write_blocking`] reached its deadline without space.
    Timeout,
    /// [`Producer::write_blocking`] found the ring full and the consumer gone,
    /// so waiting could never succeed.
    Abandoned,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { len, max } => write!(
                f,
                "record of {len} bytes exceeds the ring's maximum record size of {max} bytes"
            ),
            Self::Full => f.write_str("ring is full"),
            Self::Timeout => f.write_str("timed out waiting for ring space"),
            Self::Abandoned => f.write_str("ring is full and its consumer is gone"),
        }
    }
}

impl std::error::Error for WriteError {}

/// Snapshot of a ring's producer-side counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Records committed by the producer.
    pub records: u64,
    /// Payload bytes committed (headers and padding excluded).
    pub bytes: u64,
    /// Records the caller reported as dropped via [`Producer::note_drop`].
    pub drops: u64,
}

/// Producer-written counters. Single writer, so plain load+store suffices
/// (no locked read-modify-write on the hot path).
#[repr(C)]
#[derive(Default)]
struct Counters {
    records: AtomicU64,
    bytes: AtomicU64,
    drops: AtomicU64,
}

impl Counters {
    /// Single-writer increment: only the producer calls this.
    #[inline]
    fn bump(counter: &AtomicU64, by: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(by),
            Ordering::Relaxed,
        );
    }
}

/// The synchronisation state both halves touch. `repr(C)` because a
/// shared-memory ring ([`shm`]) keeps it at the start of a mapping that two
/// processes built from the same source read.
#[repr(C)]
#[derive(Default)]
struct Control {
    /// Bytes ever published by the producer (wrapping).
    head: CachePadded<AtomicUsize>,
    /// Bytes ever released by the consumer (wrapping).
    tail: CachePadded<AtomicUsize>,
    counters: CachePadded<Counters>,
    /// Set (Release) when the respective half is dropped. A dedicated flag
    /// rather than `Arc::strong_count`, whose Relaxed load would not order the
    /// final `head` store before the consumer's "producer is gone" check.
    producer_gone: AtomicBool,
    consumer_gone: AtomicBool,
}

/// Who owns the memory behind a ring, and how it is given back.
enum Backing {
    /// [`channel`]: a boxed [`Control`] and a heap arena (`layout`, starting at
    /// most `ARENA_ALIGN - 8` bytes before `buf`).
    Heap { alloc: NonNull<u8>, layout: Layout },
    /// [`shm`]: one mapping holding both; `release(base, len)` unmaps it.
    Mapped {
        base: NonNull<u8>,
        len: usize,
        release: unsafe fn(*mut u8, usize),
    },
}

/// State shared by both halves; freed (with the arena) when the last half drops.
struct Shared {
    ctrl: NonNull<Control>,
    /// Start of the arena: `capacity` bytes, zero-initialised, `ARENA_ALIGN`-aligned.
    buf: NonNull<u8>,
    capacity: usize,
    backing: Backing,
}

// SAFETY: `buf` and `ctrl` point into memory this value owns (see `Backing`).
// The arena's bytes are accessed through raw pointers by the two halves only in
// disjoint regions whose ownership is handed over via Release/Acquire on
// `head`/`tail`; `Control` is all atomics.
unsafe impl Send for Shared {}
// SAFETY: see `Send` above; `&Shared` exposes only atomics and the (immutable)
// pointers and capacity.
unsafe impl Sync for Shared {}

impl Shared {
    /// The allocation's layout: `ARENA_ALIGN` bytes of slack, so the arena can be
    /// aligned inside it, with an alignment the system allocator serves through
    /// `calloc`. (Asking for 64-byte alignment made `alloc_zeroed` allocate and
    /// then memset the whole arena: 20 GB committed and written up front. Fresh
    /// `calloc` memory is mapped lazily, so unused ring pages cost nothing.)
    #[inline]
    fn layout(capacity: usize) -> Result<Layout, RingError> {
        capacity
            .checked_add(ARENA_ALIGN)
            .and_then(|size| Layout::from_size_align(size, HEADER).ok())
            .ok_or(RingError::CapacityTooLarge {
                requested: capacity,
            })
    }

    /// The counters and flags.
    #[inline]
    fn ctrl(&self) -> &Control {
        // SAFETY: `ctrl` points to an initialised `Control` that lives as long
        // as `self` (boxed, or inside the mapping `self` unmaps on drop); it is
        // only ever accessed through shared references (all fields atomic).
        unsafe { self.ctrl.as_ref() }
    }

    fn stats(&self) -> RingStats {
        let c = &self.ctrl().counters;
        RingStats {
            records: c.records.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            drops: c.drops.load(Ordering::Relaxed),
        }
    }

    /// Writes a record header at arena offset `off`.
    ///
    /// # Safety
    ///
    /// `off` must be a multiple of 8 with `off + 8 <= capacity`, and the caller
    /// must own those bytes (producer, unpublished space).
    #[inline]
    unsafe fn write_header(&self, off: usize, len: u32, tag: u32) {
        let word = u64::from(len) | (u64::from(tag) << 32);
        // SAFETY: in bounds, 8-aligned (arena is 64-aligned, `off % 8 == 0`)
        // and exclusively owned by the caller, per this function's contract.
        unsafe { self.buf.as_ptr().add(off).cast::<u64>().write(word) }
    }

    /// Reads the record header at arena offset `off` as `(len, tag)`.
    ///
    /// # Safety
    ///
    /// `off` must be a multiple of 8 with `off + 8 <= capacity`, and the header
    /// must have been published to the caller (consumer, below an
    /// Acquire-loaded `head`).
    #[inline]
    unsafe fn read_header(&self, off: usize) -> (u32, u32) {
        // SAFETY: in bounds, 8-aligned, initialised (zeroed arena) and not
        // concurrently written, per this function's contract.
        let word = unsafe { self.buf.as_ptr().add(off).cast::<u64>().read() };
        (word as u32, (word >> 32) as u32)
    }

    /// Both halves over one `Shared`.
    fn halves(self) -> (Producer, Consumer) {
        let capacity = self.capacity;
        let shared = Arc::new(self);
        (
            Producer::new(Arc::clone(&shared), capacity),
            Consumer::new(shared),
        )
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        match self.backing {
            Backing::Heap { alloc, layout } => {
                // SAFETY: `alloc` came from `alloc_zeroed` with exactly this
                // layout and `ctrl` from `Box::into_raw`; both are freed only
                // here, once, when the last half is gone.
                unsafe {
                    alloc::dealloc(alloc.as_ptr(), layout);
                    drop(Box::from_raw(self.ctrl.as_ptr()));
                }
            }
            Backing::Mapped { base, len, release } => {
                // SAFETY: the creator of this ring handed over `base..base+len`
                // together with the function that gives it back; nothing
                // points into it once the last half is gone.
                unsafe { release(base.as_ptr(), len) }
            }
        }
    }
}

/// Creates a ring with an arena of `capacity_bytes`, rounded up to a multiple
/// of 8 (and to at least 16).
///
/// This is the only allocation the ring ever makes. Allocation failure is
/// reported, never aborts, so a caller can fall back to a smaller ring.
///
/// # Errors
///
/// [`RingError::ZeroCapacity`] for 0, [`RingError::CapacityTooLarge`] above
/// `isize::MAX / 2`, [`RingError::AllocFailed`] if the allocator refuses.
pub fn channel(capacity_bytes: usize) -> Result<(Producer, Consumer), RingError> {
    if capacity_bytes == 0 {
        return Err(RingError::ZeroCapacity);
    }
    if capacity_bytes > MAX_CAPACITY {
        return Err(RingError::CapacityTooLarge {
            requested: capacity_bytes,
        });
    }
    // No overflow: `capacity_bytes <= isize::MAX / 2`.
    let capacity = pad8(capacity_bytes.max(MIN_CAPACITY));
    let layout = Shared::layout(capacity).map_err(|_| RingError::CapacityTooLarge {
        requested: capacity_bytes,
    })?;
    // Zeroed, not merely allocated: grants hand out `&mut [u8]`/`&[u8]`, which
    // must never point at uninitialised memory. For large arenas the zero pages
    // come lazily from the OS (see `Shared::layout`).
    // SAFETY: `layout` has non-zero size (`capacity >= 16`).
    let ptr = unsafe { alloc::alloc_zeroed(layout) };
    let alloc = NonNull::new(ptr).ok_or(RingError::AllocFailed { bytes: capacity })?;
    // `ptr` is 8-aligned, so the offset is a multiple of 8 below ARENA_ALIGN.
    let skew = (ARENA_ALIGN - (ptr as usize) % ARENA_ALIGN) % ARENA_ALIGN;
    // SAFETY: `skew + capacity <= ARENA_ALIGN + capacity`, the allocation's size,
    // so the arena lies inside the allocation; the result is non-null.
    let buf = unsafe { NonNull::new_unchecked(ptr.add(skew)) };

    let ctrl = NonNull::from(Box::leak(Box::<Control>::default()));
    Ok(Shared {
        ctrl,
        buf,
        capacity,
        backing: Backing::Heap { alloc, layout },
    }
    .halves())
}

/// Largest payload a ring made by [`channel`]`(capacity_bytes)` takes (what its
/// [`Producer::max_record_len`] will say), known before the ring is allocated.
pub fn max_record_for(capacity_bytes: usize) -> usize {
    max_record_len(pad8(capacity_bytes.max(MIN_CAPACITY)))
}

/// Largest payload of a ring of `capacity` bytes (see [`Producer::max_record_len`]).
#[inline]
const fn max_record_len(capacity: usize) -> usize {
    let m = capacity / 2 / HEADER * HEADER - HEADER;
    if m > u32::MAX as usize {
        u32::MAX as usize
    } else {
        m
    }
}

mod consumer;
mod producer;
pub use consumer::{Consumer, ReadGrant};
pub use producer::{Producer, WriteGrant};

/// Bytes of memory this process may still use: the smaller of `MemAvailable`
/// and the cgroup's `memory.max - memory.current`. `None` when neither is known.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    let read = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(read("/sys/fs/cgroup/memory.current").unwrap_or(0)));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Refuse a ring of `bytes` that the machine (or the cgroup) cannot hold
/// (a ring's pages are touched as it fills, so this is checked up front).
pub fn check_memory(bytes: usize) -> crate::Result<()> {
    if let Some(avail) = available_memory() {
        if bytes as u64 > avail {
            return Err(crate::Error::invalid(format!(
                "ring capacity {bytes} bytes exceeds the memory available ({avail} bytes)"
            )));
        }
    }
    Ok(())
}

pub mod shm;

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills `buf` with a pattern derived from `seed`.
    fn fill(buf: &mut [u8], seed: u64) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8;
        }
    }

    fn check(buf: &[u8], seed: u64) {
        for (i, &b) in buf.iter().enumerate() {
            assert_eq!(
                b,
                (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8,
                "byte {i} of record {seed}"
            );
        }
    }

    fn write(p: &mut Producer, len: usize, seed: u64) {
        let mut g = p.try_write(len).expect("room for record");
        assert_eq!(g.len(), len);
        fill(&mut g, seed);
        g.commit();
    }

    fn read(c: &mut Consumer, len: usize, seed: u64) {
        let g = c.try_read().expect("a record");
        assert_eq!(g.len(), len);
        check(&g, seed);
        g.release();
    }

    #[test]
    fn basic_write_read() {
        let (mut p, mut c) = channel(100).unwrap();
        assert_eq!(p.capacity(), 104);
        assert_eq!(c.capacity(), 104);
        assert_eq!(p.max_record_len(), 48 - 8);
        assert!(c.try_read().is_none());

        write(&mut p, 5, 1);
        write(&mut p, 0, 2);
        assert_eq!(c.used_bytes(), 16 + 8);
        assert_eq!(p.free_bytes(), 104 - 24);
        read(&mut c, 5, 1);
        read(&mut c, 0, 2);
        assert!(c.try_read().is_none());
        assert_eq!(p.free_bytes(), 104);
        assert_eq!(
            p.stats(),
            RingStats {
                records: 2,
                bytes: 5,
                drops: 0
            }
        );
        assert_eq!(c.stats(), p.stats());
    }

    #[test]
    fn payload_is_aligned() {
        let (mut p, mut c) = channel(256).unwrap();
        for len in [1, 3, 8, 13] {
            let g = p.try_write(len).unwrap();
            assert_eq!(g.as_ptr() as usize % 8, 0);
            g.commit();
            let g = c.try_read().unwrap();
            assert_eq!(g.as_ptr() as usize % 8, 0);
        }
    }

    #[test]
    fn capacity_validation() {
        assert_eq!(channel(0).unwrap_err(), RingError::ZeroCapacity);
        assert!(matches!(
            channel(usize::MAX).unwrap_err(),
            RingError::CapacityTooLarge { .. }
        ));
        assert!(matches!(
            channel(isize::MAX as usize / 2 + 1).unwrap_err(),
            RingError::CapacityTooLarge { .. }
        ));
        let (p, _c) = channel(1).unwrap();
        assert_eq!(p.capacity(), 16);
        assert_eq!(p.max_record_len(), 0);
        let (p, _c) = channel(17).unwrap();
        assert_eq!(p.capacity(), 24);
        assert_eq!(p.max_record_len(), 0);
        let (p, _c) = channel(32).unwrap();
        assert_eq!(p.max_record_len(), 8);
    }

    #[test]
    #[cfg_attr(miri, ignore = "reads /proc")]
    fn memory_check_refuses_what_the_machine_cannot_hold() {
        assert!(check_memory(usize::MAX / 4).is_err());
        assert!(check_memory(1 << 20).is_ok());
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri aborts instead of failing huge allocations")]
    fn allocation_failure_is_an_error() {
        // Passes the size check but no machine can provide it.
        let bytes = isize::MAX as usize / 2 - 7;
        assert!(matches!(
            channel(bytes).unwrap_err(),
            RingError::AllocFailed { .. }
        ));
    }

    #[test]
    fn zero_capacity_edge_ring_works() {
        // Smallest ring: only zero-length records, repeatedly.
        let (mut p, mut c) = channel(1).unwrap();
        for i in 0..10 {
            write(&mut p, 0, i);
            write(&mut p, 0, i);
            assert_eq!(p.try_write(0).unwrap_err(), WriteError::Full);
            read(&mut c, 0, i);
            read(&mut c, 0, i);
        }
    }

    #[test]
    fn too_large_is_distinct_from_full() {
        let (mut p, mut c) = channel(64).unwrap();
        let max = p.max_record_len();
        assert_eq!(max, 24);
        assert_eq!(
            p.try_write(max + 1).unwrap_err(),
            WriteError::TooLarge { len: 25, max: 24 }
        );
        assert_eq!(
            p.write_blocking(max + 1, Duration::from_secs(10))
                .unwrap_err(),
            WriteError::TooLarge { len: 25, max: 24 }
        );
        write(&mut p, max, 1);
        write(&mut p, max, 2);
        assert_eq!(p.try_write(1).unwrap_err(), WriteError::Full);
        read(&mut c, max, 1);
        read(&mut c, max, 2);
    }

    #[test]
    fn full_and_empty_detection() {
        let (mut p, mut c) = channel(64).unwrap();
        // Four 16-byte records exactly fill the arena.
        for i in 0..4 {
            write(&mut p, 8, i);
        }
        assert_eq!(p.free_bytes(), 0);
        assert_eq!(p.try_write(0).unwrap_err(), WriteError::Full);
        read(&mut c, 8, 0);
        // One slot free again; the cached tail must be refreshed to see it.
        write(&mut p, 1, 10);
        assert_eq!(p.try_write(0).unwrap_err(), WriteError::Full);
        for i in 1..4 {
            read(&mut c, 8, i);
        }
        read(&mut c, 1, 10);
        assert!(c.try_read().is_none());
        assert_eq!(c.used_bytes(), 0);
    }

    #[test]
    fn discarded_grants_publish_nothing() {
        let (mut p, mut c) = channel(64).unwrap();
        write(&mut p, 8, 0);
        {
            let mut g = p.try_write(20).unwrap();
            g.fill(0xFF);
            // Dropped without commit.
        }
        assert_eq!(p.stats().records, 1);
        read(&mut c, 8, 0);
        assert!(c.try_read().is_none());
        // A wrapping record discarded after its padding header was written
        // must not disturb anything either.
        move_to(&mut p, &mut c, 48);
        drop(p.try_write(24).unwrap());
        write(&mut p, 0, 1); // fits at 48, overwriting the stale padding header
        write(&mut p, 16, 2); // wraps for real
        read(&mut c, 0, 1);
        read(&mut c, 16, 2);
        assert!(c.try_read().is_none());
    }

    #[test]
    fn dropping_a_read_grant_releases_it() {
        let (mut p, mut c) = channel(64).unwrap();
        write(&mut p, 3, 0);
        write(&mut p, 4, 1);
        drop(c.try_read().unwrap());
        read(&mut c, 4, 1);
        assert_eq!(p.free_bytes(), 64);
    }

    /// Writes and reads zero-length records until the write position is `off`.
    fn move_to(p: &mut Producer, c: &mut Consumer, off: usize) {
        while p.pos != off {
            write(p, 0, 0);
            read(c, 0, 0);
        }
        assert_eq!(c.pos, off);
    }

    #[test]
    fn wrap_around_with_padding() {
        // Every record size at every starting offset of several arenas: a
        // record that does not fit before the end must reappear intact at 0,
        // followed by further records.
        let caps: &[usize] = if cfg!(miri) {
            &[48, 72]
        } else {
            &[48, 72, 96, 200]
        };
        let mut seed = 0;
        for &cap in caps {
            let (mut p, mut c) = channel(cap).unwrap();
            let max = p.max_record_len();
            for off in (0..cap).step_by(8) {
                for len in 0..=max {
                    move_to(&mut p, &mut c, off);
                    let need = HEADER + pad8(len);
                    write(&mut p, len, seed);
                    let wrapped = need > cap - off;
                    assert_eq!(c.used_bytes(), need + if wrapped { cap - off } else { 0 });
                    write(&mut p, 0, seed + 1);
                    read(&mut c, len, seed);
                    read(&mut c, 0, seed + 1);
                    assert!(c.try_read().is_none());
                    assert_eq!(p.free_bytes(), cap);
                    assert_eq!(p.pos, c.pos);
                    seed += 2;
                }
            }
        }
    }

    #[test]
    fn max_record_always_fits_in_drained_ring() {
        // The documented guarantee: after a drain, a max-size record fits
        // whatever the write offset.
        for cap in [16, 24, 40, 56, 64, 80] {
            let (mut p, mut c) = channel(cap).unwrap();
            let max = p.max_record_len();
            for off in (0..cap).step_by(8) {
                move_to(&mut p, &mut c, off);
                write(&mut p, max, 99);
                read(&mut c, max, 99);
            }
        }
    }

    #[test]
    fn record_ending_exactly_at_arena_end() {
        let (mut p, mut c) = channel(48).unwrap();
        write(&mut p, 16, 0); // [0, 24)
        write(&mut p, 16, 1); // [24, 48) ends at the arena's end
        assert_eq!(p.pos, 0);
        read(&mut c, 16, 0);
        read(&mut c, 16, 1);
        assert_eq!(c.pos, 0);
        write(&mut p, 16, 2);
        read(&mut c, 16, 2);
    }

    #[test]
    fn abandoned_producer_leaves_records_readable() {
        let (mut p, mut c) = channel(128).unwrap();
        write(&mut p, 10, 0);
        write(&mut p, 20, 1);
        p.note_drop();
        assert!(!c.is_abandoned());
        drop(p);
        assert!(c.is_abandoned());
        read(&mut c, 10, 0);
        read(&mut c, 20, 1);
        assert!(c.try_read().is_none());
        assert_eq!(
            c.stats(),
            RingStats {
                records: 2,
                bytes: 30,
                drops: 1
            }
        );
    }

    #[test]
    fn abandoned_consumer() {
        let (mut p, c) = channel(32).unwrap();
        assert!(!p.is_abandoned());
        drop(c);
        assert!(p.is_abandoned());
        // Writes still succeed while there is room; they go nowhere.
        write(&mut p, 8, 0);
        write(&mut p, 8, 1);
        assert_eq!(p.try_write(0).unwrap_err(), WriteError::Full);
        assert_eq!(
            p.write_blocking(0, Duration::from_secs(10)).unwrap_err(),
            WriteError::Abandoned
        );
    }

    #[test]
    fn write_blocking_times_out() {
        let (mut p, _c) = channel(16).unwrap();
        write(&mut p, 0, 0);
        write(&mut p, 0, 0);
        let t = Instant::now();
        assert_eq!(
            p.write_blocking(0, Duration::from_millis(5)).unwrap_err(),
            WriteError::Timeout
        );
        assert!(t.elapsed() >= Duration::from_millis(5));
        assert_eq!(
            p.write_blocking(0, Duration::ZERO).unwrap_err(),
            WriteError::Timeout
        );
    }

    /// A large arena is not written up front: its pages stay unmapped until used.
    #[test]
    #[cfg(all(target_os = "linux", not(miri)))]
    fn large_arena_is_not_committed_up_front() {
        fn rss() -> usize {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            let kb = s
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .unwrap()
                .trim()
                .trim_end_matches("kB")
                .trim();
            kb.parse::<usize>().unwrap() * 1024
        }
        let before = rss();
        let t = Instant::now();
        let (mut p, mut c) = channel(2 << 30).unwrap();
        let grown = rss().saturating_sub(before);
        assert!(
            grown < 256 << 20,
            "a 2 GiB ring made RSS grow by {grown} bytes"
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // And it still works as a ring.
        let mut g = p.try_write(3).unwrap();
        g.copy_from_slice(b"abc");
        g.commit();
        assert_eq!(&*c.try_read().unwrap(), b"abc");
    }

    #[test]
    fn halves_are_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Producer>();
        assert_send::<Consumer>();
    }

    /// Two threads, randomly sized records, every byte checked.
    #[test]
    fn two_threads() {
        let count: u64 = if cfg!(miri) { 200 } else { 100_000 };
        let (mut p, mut c) = channel(if cfg!(miri) { 96 } else { 1024 }).unwrap();
        let max = p.max_record_len() as u64;
        // Deterministic sizes covering 0..=max, wrapping at varied offsets.
        let len_of = move |i: u64| (i.wrapping_mul(0x9E37_79B9) >> 7) % (max + 1);
        let writer = thread::spawn(move || {
            for i in 0..count {
                let len = len_of(i) as usize;
                let mut g = p
                    .write_blocking(len, Duration::from_secs(60))
                    .expect("consumer keeps up eventually");
                fill(&mut g, i);
                g.commit();
            }
        });
        let mut next = 0;
        loop {
            let abandoned = c.is_abandoned();
            match c.try_read() {
                Some(g) => {
                    assert_eq!(g.len() as u64, len_of(next));
                    check(&g, next);
                    next += 1;
                }
                None if abandoned => break,
                None => thread::yield_now(),
            }
        }
        writer.join().unwrap();
        assert_eq!(next, count);
        assert_eq!(c.stats().records, count);
    }

    /// Stands in for a shared mapping: page-aligned, zeroed heap memory that
    /// both halves view (the test frees it after both are gone).
    struct FakeMapping {
        ptr: *mut u8,
        layout: Layout,
    }

    impl FakeMapping {
        fn new(len: usize) -> Self {
            let layout = Layout::from_size_align(len, 4096).unwrap();
            // SAFETY: non-zero size.
            let ptr = unsafe { alloc::alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            Self { ptr, layout }
        }
    }

    impl Drop for FakeMapping {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { alloc::dealloc(self.ptr, self.layout) }
        }
    }

    /// `release` for halves over a [`FakeMapping`]: the mapping frees itself.
    unsafe fn keep(_: *mut u8, _: usize) {}

    #[test]
    fn shm_halves_in_one_mapping_round_trip() {
        let len = shm::mapping_len(1000).unwrap();
        let m = FakeMapping::new(len);
        // SAFETY: zeroed, writable, 4096-aligned; the consumer comes from the
        // same memory after the producer laid it out.
        let mut p = unsafe { shm::producer(m.ptr, len, keep) }.unwrap();
        // SAFETY: as above.
        let mut c = unsafe { shm::consumer(m.ptr, len, keep) }.unwrap();
        assert_eq!(p.capacity(), c.capacity());
        assert!(p.capacity() >= 1000);
        for round in 0..50u64 {
            let n = (round as usize * 37) % 300;
            write(&mut p, n, round);
            let g = c.try_read().expect("record");
            assert_eq!(g.len(), n);
            check(&g, round);
        }
        p.note_drop();
        assert_eq!(c.stats().records, 50);
        assert_eq!(c.stats().drops, 1);
        drop(p);
        assert!(c.is_abandoned());
        assert!(c.try_read().is_none());
        drop(c);
    }

    #[test]
    fn shm_consumer_refuses_what_is_not_a_ring() {
        let len = shm::mapping_len(256).unwrap();
        let m = FakeMapping::new(len);
        // SAFETY: zeroed memory without a preamble: refused, never read past it.
        let e = unsafe { shm::consumer(m.ptr, len, keep) }.unwrap_err();
        assert_eq!(e, RingError::BadMapping("no ring magic at the start"));
        // SAFETY: a mapping too small for the preamble and control block.
        let e = unsafe { shm::producer(m.ptr, 64, keep) }.unwrap_err();
        assert_eq!(e, RingError::BadMapping("mapping is too small"));
        // SAFETY: a producer lays it out; a consumer that maps less than the
        // arena the preamble claims is refused.
        let p = unsafe { shm::producer(m.ptr, len, keep) }.unwrap();
        // SAFETY: as above.
        let e = unsafe { shm::consumer(m.ptr, len - 8, keep) }.unwrap_err();
        assert_eq!(
            e,
            RingError::BadMapping("arena size does not fit the mapping")
        );
        drop(p);
    }

    #[test]
    fn shm_consumer_stops_at_a_corrupt_header_instead_of_reading_it() {
        let len = shm::mapping_len(512).unwrap();
        let m = FakeMapping::new(len);
        // SAFETY: as in the round-trip test.
        let mut p = unsafe { shm::producer(m.ptr, len, keep) }.unwrap();
        // SAFETY: as above.
        let mut c = unsafe { shm::consumer(m.ptr, len, keep) }.unwrap();
        write(&mut p, 16, 1);
        // The other process scribbles a huge length into the published header.
        let arena = len - p.capacity();
        // SAFETY: the first record header sits at the arena's start, in bounds.
        unsafe { m.ptr.add(arena).cast::<u32>().write(1 << 30) };
        assert!(c.try_read().is_none());
        assert!(c.is_corrupt());
        drop((p, c));
    }
}
