//! The consuming end: [`Consumer`] and its [`ReadGrant`].

use super::*;

/// The reading half of a ring. Owned by the consumer thread.
///
/// `Send` but neither `Sync` nor `Clone`, mirroring [`Producer`].
pub struct Consumer {
    pub(super) shared: Arc<Shared>,
    /// Local copy of `shared.ctrl().tail` (only this half writes it).
    pub(super) tail: usize,
    /// Last observed `shared.ctrl().head`; reloaded only when it says "empty".
    pub(super) cached_head: usize,
    /// Arena offset of the next header to read, always `< capacity`.
    pub(super) pos: usize,
    /// A shared-memory producer published a record header that does not
    /// describe a record inside the published range; reading stopped.
    pub(super) corrupt: bool,
    pub(super) _not_sync: PhantomData<Cell<()>>,
}

/// A published record located by [`Consumer::peek`].
#[derive(Clone, Copy)]
struct Record {
    /// Arena offset of the data header (0 if padding was skipped).
    rec_off: usize,
    len: usize,
    /// Bytes `tail` advances by on release: skipped padding + record.
    advance: usize,
}

impl Consumer {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            tail: 0,
            cached_head: 0,
            pos: 0,
            corrupt: false,
            _not_sync: PhantomData,
        }
    }

    /// Whether reading stopped at a malformed record header. Only a
    /// shared-memory ring ([`shm`]) can get there (its producer is another
    /// process); an in-process ring panics instead, since that is a bug.
    pub fn is_corrupt(&self) -> bool {
        self.corrupt
    }

    /// Arena size in bytes (after rounding).
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Bytes occupied by published, unreleased records (headers and padding
    /// included). Zero means nothing to read right now.
    pub fn used_bytes(&self) -> usize {
        self.shared
            .ctrl()
            .head
            .load(Ordering::Acquire)
            .wrapping_sub(self.tail)
    }

    /// Whether the [`Producer`] has been dropped. Records it published before
    /// dropping remain readable, so drain with [`Consumer::try_read`] until it
    /// returns `None` *after* this returned `true`.
    pub fn is_abandoned(&self) -> bool {
        self.shared.ctrl().producer_gone.load(Ordering::Acquire)
    }

    /// Counters shared with the producer. Exact once [`Consumer::is_abandoned`]
    /// has returned `true`.
    pub fn stats(&self) -> RingStats {
        self.shared.stats()
    }

    /// Returns the oldest published record, or `None` if there is none.
    ///
    /// The grant derefs to the payload inside the arena (zero-copy, 8-byte
    /// aligned). Its space is handed back to the producer on
    /// [`ReadGrant::release`] or drop.
    #[inline]
    pub fn try_read(&mut self) -> Option<ReadGrant<'_>> {
        let record = self.peek()?;
        Some(ReadGrant {
            consumer: self,
            record,
        })
    }

    /// Locates the next data record, skipping wrap padding.
    #[inline]
    fn peek(&mut self) -> Option<Record> {
        if self.corrupt {
            return None;
        }
        if self.cached_head == self.tail {
            self.cached_head = self.shared.ctrl().head.load(Ordering::Acquire);
            if self.cached_head == self.tail {
                return None;
            }
        }
        let capacity = self.shared.capacity;
        let mut rec_off = self.pos;
        let mut skipped = 0;
        // SAFETY: `pos` is 8-aligned, `< capacity` and `capacity % 8 == 0`; the
        // ring is non-empty, so the producer published a header at `pos`
        // (before its Release store of `head`, which we Acquire-loaded).
        let (mut len, mut tag) = unsafe { self.shared.read_header(rec_off) };
        if tag == TAG_PAD {
            // Padding is only ever published together with the record after it.
            skipped = capacity - rec_off;
            rec_off = 0;
            // SAFETY: as above, for the record the producer placed at offset 0.
            (len, tag) = unsafe { self.shared.read_header(0) };
        }
        let len = len as usize;
        let advance = skipped + HEADER + pad8(len);
        let sound = tag == TAG_DATA
            && rec_off + HEADER + pad8(len) <= capacity
            && advance <= self.cached_head.wrapping_sub(self.tail);
        if !sound {
            // In-process this is a bug; across processes ([`shm`]) the other side
            // may have died mid-write or be a different build: report, never read.
            assert!(
                matches!(self.shared.backing, Backing::Mapped { .. }),
                "ring corrupted: bad record header at offset {rec_off}"
            );
            self.corrupt = true;
            return None;
        }
        Some(Record {
            rec_off,
            len,
            advance,
        })
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.shared
            .ctrl()
            .consumer_gone
            .store(true, Ordering::Release);
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.shared.capacity)
            .field("tail", &self.tail)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

/// Zero-copy view of one published record's payload.
///
/// The record's space returns to the producer on [`ReadGrant::release`] or
/// when the grant is dropped.
pub struct ReadGrant<'a> {
    consumer: &'a mut Consumer,
    record: Record,
}

impl ReadGrant<'_> {
    /// Frees the record's space for the producer (same as dropping the grant).
    #[inline]
    pub fn release(self) {
        // Drop does the work.
    }
}

impl Drop for ReadGrant<'_> {
    #[inline]
    fn drop(&mut self) {
        let c = &mut *self.consumer;
        c.tail = c.tail.wrapping_add(self.record.advance);
        // Release: our reads of the payload happen-before the producer reuses it.
        c.shared.ctrl().tail.store(c.tail, Ordering::Release);
        let end = self.record.rec_off + HEADER + pad8(self.record.len);
        c.pos = if end == c.shared.capacity { 0 } else { end };
    }
}

impl Deref for ReadGrant<'_> {
    type Target = [u8];

    #[inline]
    fn deref(&self) -> &[u8] {
        // SAFETY: `peek` verified the record (header + payload) lies within the
        // published range, which is inside the initialised arena; the producer
        // will not touch it until our release moves `tail` past it.
        unsafe {
            slice::from_raw_parts(
                self.consumer
                    .shared
                    .buf
                    .as_ptr()
                    .add(self.record.rec_off + HEADER),
                self.record.len,
            )
        }
    }
}

impl fmt::Debug for ReadGrant<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadGrant")
            .field("offset", &(self.record.rec_off + HEADER))
            .field("len", &self.record.len)
            .finish()
    }
}
