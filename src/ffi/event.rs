//! One event of the ordered stream, viewed zero-copy, and the reader that hands
//! events out to C until they are released.

use std::ffi::{c_char, c_void};
use std::time::Duration;

use super::{lt_status, FfiError};
use crate::record::{FrameHeader, Record, RowMeta, TokenHeader, TopEntry};
use crate::stream::Stream;

/// `lt_event.kind`: a latent frame.
pub const LT_EVENT_FRAME: u32 = 1;
/// `lt_event.kind`: a token event.
pub const LT_EVENT_TOKEN: u32 = 2;
/// `lt_event.kind`: the end of one generation (mode 1 only; a tap has no END).
pub const LT_EVENT_END: u32 = 3;

/// One record of the stream. Pointers point into the ring (zero-copy) and stay
/// valid until the event is released (`lt_*_release`) or the next `lt_*_next`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct lt_event {
    /// Set by the caller to `sizeof(lt_event)` before the first `lt_*_next`.
    /// The library writes at most that many bytes and stores the number written
    /// here (the same value for a caller built against this header), so one
    /// `lt_event` variable can be reused without setting it again.
    pub struct_size: u32,
    /// `LT_EVENT_FRAME`, `LT_EVENT_TOKEN` or `LT_EVENT_END`.
    pub kind: u32,
    /// Frame header (frames only, else NULL).
    pub frame: *const FrameHeader,
    /// `frame->n_rows` row descriptors (frames only).
    pub rows: *const RowMeta,
    /// Payload: `n_rows * width` elements of `frame->dtype`, 8-byte aligned (frames only).
    pub data: *const c_void,
    /// Payload size in bytes.
    pub data_len: usize,
    /// Token header (tokens only, else NULL).
    pub token: *const TokenHeader,
    /// `token->n_top` alternatives, most likely first (tokens only).
    pub top: *const TopEntry,
    /// The token's text, `token->piece_len` bytes, not NUL-terminated (tokens only).
    pub piece: *const c_char,
    /// End events: frames produced by this generation (dropped ones included).
    pub end_frames: u64,
    /// End events: frames of this generation dropped by a drop-newest ring.
    pub end_drops: u64,
    /// End events: how the generation ended (`LT_OK`, `LT_CANCELLED` or its error).
    pub end_status: lt_status,
    /// Reserved, zero.
    pub reserved: u32,
    /// End events: NUL-terminated detail of `end_status` ("" when OK), valid like
    /// the other pointers. Else NULL.
    pub end_message: *const c_char,
}

/// Smallest `struct_size` accepted for `lt_event`: its size in version 0.1.
pub(crate) const EVENT_MIN: usize = 96;
const _: () = assert!(std::mem::size_of::<lt_event>() == EVENT_MIN);

impl lt_event {
    fn empty(kind: u32) -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            kind,
            frame: std::ptr::null(),
            rows: std::ptr::null(),
            data: std::ptr::null(),
            data_len: 0,
            token: std::ptr::null(),
            top: std::ptr::null(),
            piece: std::ptr::null(),
            end_frames: 0,
            end_drops: 0,
            end_status: lt_status::LT_OK,
            reserved: 0,
            end_message: std::ptr::null(),
        }
    }
}

/// Reads a stream for C: keeps the current record in the ring until released.
pub(crate) struct Reader {
    stream: Stream,
    held: bool,
}

/// What the reader found.
pub(crate) enum Next {
    /// An event (END events still need their status filled in by the owner).
    Event(lt_event),
    /// Nothing within the timeout.
    Timeout,
}

impl Reader {
    pub(crate) fn new(stream: Stream) -> Self {
        Self {
            stream,
            held: false,
        }
    }

    /// Release the held record, if any.
    pub(crate) fn release(&mut self) {
        if self.held {
            self.held = false;
            // The held record is still at the ring's read position: take it and drop it.
            drop(self.stream.next(Duration::ZERO));
        }
    }

    /// Release the previous record, then wait up to `timeout` for the next one
    /// and keep it in the ring until [`Reader::release`].
    pub(crate) fn next(&mut self, timeout: Duration) -> Result<Next, FfiError> {
        self.release();
        let Some(item) = self.stream.next(timeout)? else {
            return Ok(Next::Timeout);
        };
        let ev = match item.record()? {
            Record::Frame(f) => lt_event {
                frame: f.header as *const FrameHeader,
                rows: f.rows.as_ptr(),
                data: f.data.as_ptr() as *const c_void,
                data_len: f.data.len(),
                ..lt_event::empty(LT_EVENT_FRAME)
            },
            Record::Token(t) => lt_event {
                token: t.header as *const TokenHeader,
                top: t.top.as_ptr(),
                piece: t.piece.as_ptr() as *const c_char,
                ..lt_event::empty(LT_EVENT_TOKEN)
            },
            Record::End(e) => lt_event {
                end_frames: e.frames,
                end_drops: e.drops,
                end_message: c"".as_ptr(),
                ..lt_event::empty(LT_EVENT_END)
            },
        };
        // Keep the bytes in the ring: the event's pointers refer to them.
        std::mem::forget(item);
        self.held = true;
        Ok(Next::Event(ev))
    }

    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }
}
