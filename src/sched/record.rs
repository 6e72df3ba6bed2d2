//! The subscriber wire record that announces a request taking and leaving a
//! slot (kept apart: it belongs with the other record kinds).

use crate::record;

/// Wire record kind of a subscriber's request notice (see docs/PROTOCOL.md).
pub const KIND_REQUEST: u32 = 4;

/// A request notice: sent to subscribers when a request takes a slot and when it ends.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestRecord {
    /// [`KIND_REQUEST`].
    pub kind: u32,
    /// `size_of::<RequestRecord>()` (40).
    pub header_size: u32,
    /// Request id.
    pub request_id: u64,
    /// Slot (the `seq_id` of its rows and tokens).
    pub seq_id: i32,
    /// 1: begins, 2: ends.
    pub event: u32,
    /// Frames this subscriber has dropped so far (all requests).
    pub dropped: u64,
    /// Prompt tokens (begin) or tokens generated (end).
    pub n_tokens: u64,
}

const _: () = assert!(std::mem::size_of::<RequestRecord>() == 40);

impl RequestRecord {
    /// Encode.
    pub fn to_record(&self) -> Vec<u8> {
        let mut b = vec![0u8; std::mem::size_of::<Self>()];
        record::put(&mut b, 0, self);
        b
    }
}
