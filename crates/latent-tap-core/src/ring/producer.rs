//! The producing end: [`Producer`] and its [`WriteGrant`].

use super::*;

/// A reserved, not yet published record: where it goes and what it costs.
#[derive(Clone, Copy)]
struct Slot {
    /// Arena offset of the record header (0 if the record wraps).
    rec_off: usize,
    /// Payload length.
    len: usize,
    /// Bytes `head` advances by on commit: padding (if wrapping) + header +
    /// padded payload.
    advance: usize,
}

/// The writing half of a ring. Owned by the compute thread.
///
/// `Send` but neither `Sync` nor `Clone`: exactly one thread produces, and
/// keeping it `!Sync` leaves `&self` methods free to touch its unsynchronised
/// caches in the future.
pub struct Producer {
    pub(super) shared: Arc<Shared>,
    /// Local copy of `shared.ctrl().head` (only this half writes it).
    pub(super) head: usize,
    /// Last observed `shared.ctrl().tail`; reloaded only when it says "full".
    pub(super) cached_tail: usize,
    /// Arena offset of the next record header, always `< capacity`.
    pub(super) pos: usize,
    pub(super) max_record_len: usize,
    pub(super) _not_sync: PhantomData<Cell<()>>,
}

impl Producer {
    pub(super) fn new(shared: Arc<Shared>, capacity: usize) -> Self {
        Self {
            shared,
            head: 0,
            cached_tail: 0,
            pos: 0,
            max_record_len: max_record_len(capacity),
            _not_sync: PhantomData,
        }
    }

    /// Arena size in bytes (after rounding).
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Largest payload [`Producer::try_write`] accepts:
    /// `floor8(capacity / 2) - 8` (and at most `u32::MAX`).
    ///
    /// Why half: a record must be contiguous, and in the worst case the write
    /// position sits just before the end of the arena, so the record needs the
    /// leftover tail *plus* its own size. A record no larger than half the
    /// arena (header included) therefore always fits once the consumer has
    /// drained the ring; anything larger could wait forever and is rejected
    /// with [`WriteError::TooLarge`] instead. Size the ring at least
    /// `2 * (largest frame + 8)` bytes, more to absorb consumer jitter.
    pub fn max_record_len(&self) -> usize {
        self.max_record_len
    }

    /// Bytes not currently occupied by unreleased records (headers and
    /// padding count as occupied). Because records must be contiguous, a
    /// record of this size is not guaranteed to fit.
    pub fn free_bytes(&self) -> usize {
        let tail = self.shared.ctrl().tail.load(Ordering::Acquire);
        self.shared.capacity - self.head.wrapping_sub(tail)
    }

    /// Whether the [`Consumer`] has been dropped; nothing written will be read.
    pub fn is_abandoned(&self) -> bool {
        self.shared.ctrl().consumer_gone.load(Ordering::Acquire)
    }

    /// Counters shared with the consumer.
    pub fn stats(&self) -> RingStats {
        self.shared.stats()
    }

    /// Records that the caller's policy dropped a record (e.g. drop-newest on
    /// [`WriteError::Full`]), so consumers can see losses in [`RingStats::drops`].
    pub fn note_drop(&mut self) {
        Counters::bump(&self.shared.ctrl().counters.drops, 1);
    }

    /// Reserves room for a record with a `len`-byte payload, without blocking.
    ///
    /// The grant derefs to exactly `len` writable bytes inside the arena
    /// (8-byte aligned, contents unspecified); [`WriteGrant::commit`] publishes
    /// it, dropping the grant discards it. Never allocates, locks or makes a
    /// syscall.
    ///
    /// # Errors
    ///
    /// [`WriteError::TooLarge`] if `len > max_record_len()` (permanent),
    /// [`WriteError::Full`] if there is no room right now.
    #[inline]
    pub fn try_write(&mut self, len: usize) -> Result<WriteGrant<'_>, WriteError> {
        let slot = self.reserve(len)?;
        Ok(self.grant(slot))
    }

    /// Like [`Producer::try_write`], but waits up to `timeout` for space:
    /// spinning briefly, then yielding, then sleeping in short steps. For
    /// lossless mode only, where stalling the producer is acceptable.
    ///
    /// # Errors
    ///
    /// [`WriteError::TooLarge`] at once if the record can never fit,
    /// [`WriteError::Abandoned`] if the ring is full and the consumer is gone,
    /// [`WriteError::Timeout`] if no space appeared before the deadline.
    pub fn write_blocking(
        &mut self,
        len: usize,
        timeout: Duration,
    ) -> Result<WriteGrant<'_>, WriteError> {
        const SPINS: u32 = 64;
        const YIELDS: u32 = 16;
        const MAX_SLEEP: Duration = Duration::from_millis(1);

        // Reserve first and build the grant afterwards: returning a borrow
        // from inside the retry loop is rejected by the borrow checker.
        let mut deadline = None;
        let mut attempt: u32 = 0;
        let mut sleep = Duration::from_micros(10);
        let slot = loop {
            match self.reserve(len) {
                Ok(slot) => break slot,
                Err(WriteError::Full) => {}
                Err(e) => return Err(e),
            }
            if self.is_abandoned() {
                return Err(WriteError::Abandoned);
            }
            // Only read the clock once the fast path has failed.
            let until = *deadline.get_or_insert_with(|| Instant::now().checked_add(timeout));
            if attempt >= SPINS && until.is_some_and(|d| Instant::now() >= d) {
                return Err(WriteError::Timeout);
            }
            if attempt < SPINS {
                std::hint::spin_loop();
            } else if attempt < SPINS + YIELDS {
                thread::yield_now();
            } else {
                let left = until.map_or(sleep, |d| d.saturating_duration_since(Instant::now()));
                thread::sleep(sleep.min(left));
                sleep = (sleep * 2).min(MAX_SLEEP);
            }
            attempt = attempt.saturating_add(1);
        };
        Ok(self.grant(slot))
    }

    /// Finds room for a `len`-byte payload; touches nothing but the tail cache.
    #[inline]
    fn reserve(&mut self, len: usize) -> Result<Slot, WriteError> {
        if len > self.max_record_len {
            return Err(WriteError::TooLarge {
                len,
                max: self.max_record_len,
            });
        }
        let capacity = self.shared.capacity;
        let need = HEADER + pad8(len);
        let to_end = capacity - self.pos;
        let (rec_off, advance) = if need <= to_end {
            (self.pos, need)
        } else {
            // Pad out the arena's end and start over at 0. `to_end >= 8`
            // always, so the padding header itself fits.
            (0, to_end + need)
        };
        if capacity - self.head.wrapping_sub(self.cached_tail) < advance {
            self.cached_tail = self.shared.ctrl().tail.load(Ordering::Acquire);
            if capacity - self.head.wrapping_sub(self.cached_tail) < advance {
                return Err(WriteError::Full);
            }
        }
        Ok(Slot {
            rec_off,
            len,
            advance,
        })
    }

    /// Writes the headers for a reserved slot and wraps it in a grant.
    #[inline]
    fn grant(&mut self, slot: Slot) -> WriteGrant<'_> {
        // The header `len` fits in u32: `len <= max_record_len <= u32::MAX`.
        if slot.rec_off != self.pos {
            // SAFETY: `pos` is 8-aligned with at least 8 bytes to the end, and
            // `reserve` established that `[pos, capacity)` is free (unpublished)
            // space owned by this producer.
            unsafe { self.shared.write_header(self.pos, 0, TAG_PAD) };
        }
        // SAFETY: `reserve` established that `[rec_off, rec_off + need)` lies
        // inside the arena, is 8-aligned and is free space owned by this producer.
        unsafe {
            self.shared
                .write_header(slot.rec_off, slot.len as u32, TAG_DATA)
        };
        WriteGrant {
            producer: self,
            slot,
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // Release: everything this half published happens-before a consumer
        // that observes the flag, so "abandoned and empty" really means done.
        self.shared
            .ctrl()
            .producer_gone
            .store(true, Ordering::Release);
    }
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.shared.capacity)
            .field("head", &self.head)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

/// Exclusive, zero-copy access to an unpublished record's payload.
///
/// Derefs to exactly the requested number of bytes. Call
/// [`WriteGrant::commit`] to publish; dropping the grant discards the record.
#[must_use = "dropping a WriteGrant discards the record; call commit() to publish it"]
pub struct WriteGrant<'a> {
    producer: &'a mut Producer,
    slot: Slot,
}

impl WriteGrant<'_> {
    /// Publishes the record to the consumer (one Release store).
    #[inline]
    pub fn commit(self) {
        let p = self.producer;
        let counters = &p.shared.ctrl().counters;
        // Counters first, so a consumer that sees the record also sees it counted.
        Counters::bump(&counters.records, 1);
        Counters::bump(&counters.bytes, self.slot.len as u64);
        p.head = p.head.wrapping_add(self.slot.advance);
        p.shared.ctrl().head.store(p.head, Ordering::Release);
        let end = self.slot.rec_off + HEADER + pad8(self.slot.len);
        p.pos = if end == p.shared.capacity { 0 } else { end };
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.slot.len
    }

    /// Whether the payload is empty (zero-length records are allowed).
    pub fn is_empty(&self) -> bool {
        self.slot.len == 0
    }
}

impl Deref for WriteGrant<'_> {
    type Target = [u8];

    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: the payload range is inside the (zero-initialised) arena and
        // owned by the producer until commit; `&self` borrows the producer, so
        // no other access to it can happen meanwhile.
        unsafe {
            slice::from_raw_parts(
                self.producer
                    .shared
                    .buf
                    .as_ptr()
                    .add(self.slot.rec_off + HEADER),
                self.slot.len,
            )
        }
    }
}

impl DerefMut for WriteGrant<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only live view of
        // the range, and the consumer never reads unpublished space.
        unsafe {
            slice::from_raw_parts_mut(
                self.producer
                    .shared
                    .buf
                    .as_ptr()
                    .add(self.slot.rec_off + HEADER),
                self.slot.len,
            )
        }
    }
}

impl fmt::Debug for WriteGrant<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteGrant")
            .field("offset", &(self.slot.rec_off + HEADER))
            .field("len", &self.slot.len)
            .finish()
    }
}
