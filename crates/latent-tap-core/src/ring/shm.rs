//! Rings in memory shared between processes (e.g. a `memfd` mapped by both).
//!
//! The mapping holds a small preamble (magic, version, layout sizes), the
//! `Control` block and then the arena. The producing process lays it out
//! with [`producer`]; the consuming process validates it with
//! [`consumer`]. Both must be built from this source (the preamble's
//! layout check refuses anything else). The protocol is the in-process one:
//! each side's counter lives on its own cache line and is published with a
//! Release store.

use super::*;

/// Magic at offset 0 of a mapping: `"LTRING01"` little-endian.
const MAGIC: u64 = u64::from_le_bytes(*b"LTRING01");
/// Offset of the control block (its alignment is at most 128).
const CTRL_OFF: usize = 128;
/// Offset of the arena: after the control block, on a 128-byte boundary.
const ARENA_OFF: usize = CTRL_OFF + std::mem::size_of::<Control>().div_ceil(128) * 128;
const _: () = assert!(std::mem::align_of::<Control>() <= CTRL_OFF);

#[repr(C)]
struct Preamble {
    magic: u64,
    /// `size_of::<Control>()`, so differently built peers refuse each other.
    control_size: u64,
    /// [`ARENA_OFF`].
    arena_off: u64,
    /// Arena bytes.
    capacity: u64,
}

/// Bytes a mapping needs for an arena of `capacity_bytes` (rounded up to
/// a multiple of 8, at least 16), or `None` if that is too large.
pub fn mapping_len(capacity_bytes: usize) -> Option<usize> {
    if capacity_bytes > MAX_CAPACITY {
        return None;
    }
    ARENA_OFF.checked_add(pad8(capacity_bytes.max(MIN_CAPACITY)))
}

fn check(base: *mut u8, len: usize) -> Result<(), RingError> {
    if base.is_null() || (base as usize) % CTRL_OFF != 0 {
        return Err(RingError::BadMapping("mapping is not 128-byte aligned"));
    }
    if len < ARENA_OFF + MIN_CAPACITY {
        return Err(RingError::BadMapping("mapping is too small"));
    }
    Ok(())
}

/// Lays out a ring in `base..base + len` and returns its producing half.
/// The arena is everything after the preamble and control block
/// (`len - ARENA_OFF`, rounded down to a multiple of 8).
///
/// # Safety
///
/// `base..base + len` must be readable and writable, zero-filled, and not
/// accessed by anyone else in this process while the producer lives; the
/// consuming side may only access it through [`consumer`]. `release(base,
/// len)` must be sound to call once, when the producer is dropped (e.g.
/// `munmap`).
pub unsafe fn producer(
    base: *mut u8,
    len: usize,
    release: unsafe fn(*mut u8, usize),
) -> Result<Producer, RingError> {
    check(base, len)?;
    let capacity = ((len - ARENA_OFF) / HEADER * HEADER).min(MAX_CAPACITY);
    // SAFETY: `check` established alignment and that the preamble, control
    // block and a minimal arena lie inside the caller's writable mapping.
    unsafe {
        base.cast::<Preamble>().write(Preamble {
            magic: MAGIC,
            control_size: std::mem::size_of::<Control>() as u64,
            arena_off: ARENA_OFF as u64,
            capacity: capacity as u64,
        });
        base.add(CTRL_OFF)
            .cast::<Control>()
            .write(Control::default());
    }
    Ok(Producer::new(
        shared(base, len, capacity, release)?,
        capacity,
    ))
}

/// The consuming half of a ring that [`producer`] laid out in a mapping of
/// the same memory (usually in another process).
///
/// # Safety
///
/// `base..base + len` must be a readable and writable mapping of memory
/// that a [`producer`] laid out, accessed in this process only through the
/// returned consumer; `release(base, len)` must be sound to call once, when
/// the consumer is dropped.
pub unsafe fn consumer(
    base: *mut u8,
    len: usize,
    release: unsafe fn(*mut u8, usize),
) -> Result<Consumer, RingError> {
    check(base, len)?;
    // SAFETY: aligned and in bounds (`check`); any bit pattern is a valid
    // `Preamble` (plain integers).
    let pre = unsafe { base.cast::<Preamble>().read_volatile() };
    if pre.magic != MAGIC {
        return Err(RingError::BadMapping("no ring magic at the start"));
    }
    if pre.control_size != std::mem::size_of::<Control>() as u64
        || pre.arena_off != ARENA_OFF as u64
    {
        return Err(RingError::BadMapping(
            "ring laid out by a different build (control block layout differs)",
        ));
    }
    let capacity = usize::try_from(pre.capacity)
        .ok()
        .filter(|&c| c % HEADER == 0 && c >= MIN_CAPACITY && c <= len - ARENA_OFF)
        .ok_or(RingError::BadMapping("arena size does not fit the mapping"))?;
    Ok(Consumer::new(shared(base, len, capacity, release)?))
}

/// The state both halves share, over a mapping `check` accepted.
fn shared(
    base: *mut u8,
    len: usize,
    capacity: usize,
    release: unsafe fn(*mut u8, usize),
) -> Result<Arc<Shared>, RingError> {
    let base = NonNull::new(base).ok_or(RingError::BadMapping("null mapping"))?;
    // SAFETY: both offsets lie inside the mapping (`check`), and `base` is
    // non-null, so neither pointer is null.
    let (ctrl, buf) = unsafe {
        (
            NonNull::new_unchecked(base.as_ptr().add(CTRL_OFF).cast::<Control>()),
            NonNull::new_unchecked(base.as_ptr().add(ARENA_OFF)),
        )
    };
    Ok(Arc::new(Shared {
        ctrl,
        buf,
        capacity,
        backing: Backing::Mapped { base, len, release },
    }))
}
