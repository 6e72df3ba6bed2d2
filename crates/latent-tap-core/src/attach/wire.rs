//! What a tapped host (the `LD_PRELOAD` library, `crates/latent-tap-preload`)
//! and `latent-tap listen` say to each other. llama-free: the preload library
//! compiles this file by path, beside `ring.rs`, `record.rs` and `select.rs`.
//!
//! # Transport
//!
//! The listener binds a Unix stream socket (the *sink*). A host connects when
//! it computes a graph and no listener is attached (at most every
//! [`CONNECT_INTERVAL_MS`]), creates a `memfd`, lays out a shared-memory ring in
//! it ([`crate::ring::shm`]) and sends one message: a [`Hello`] as JSON
//! (at most [`MAX_HELLO`] bytes) with the memfd attached (`SCM_RIGHTS`). From
//! then on the host writes records into the ring and never touches the socket
//! again except to notice, at most every [`LIVENESS_INTERVAL_MS`], that the
//! listener hung up. The listener never writes to the socket.
//!
//! # Records in the ring
//!
//! Each ring record is one of:
//! - a latent frame exactly as in the library's own rings
//!   ([`crate::record::FrameHeader`], kind 1, followed by `n_rows`
//!   [`crate::record::RowMeta`] and the payload). `RowMeta::flags` carries
//!   [`ROW_OUTPUT`]; `FrameHeader::step` counts the host's graph computes,
//!   `FrameHeader::ubatch` is 0 and `FrameHeader::tensor_index` is the index of
//!   the tensor pattern that matched;
//! - a [`SeqRm`] (kind [`KIND_SEQ_RM`]): the host removed positions
//!   `[p0, p1)` of a sequence from its memory (`p1 < 0`: to the end;
//!   `seq_id < 0`: every sequence). llama-server does this before it evaluates
//!   a new prompt in a slot, so it marks request boundaries.

use serde::{Deserialize, Serialize};

/// [`Hello::format`] of this protocol.
pub const PROTOCOL: &str = "latent-tap-attach/2";
/// Largest hello message, in bytes.
pub const MAX_HELLO: usize = 4096;
/// How often an unattached host tries to connect, at most.
pub const CONNECT_INTERVAL_MS: u64 = 250;
/// How often an attached host checks that the listener is still there.
pub const LIVENESS_INTERVAL_MS: u64 = 100;

/// Row flag: llama.cpp computed the next-token distribution (logits) for this
/// row. The token sampled from it is the input token of the next row of the
/// same sequence, when there is one.
pub const ROW_OUTPUT: u32 = 2;

/// Record kind of a [`SeqRm`] ([`crate::record::kind::SEQ_RM`]).
pub const KIND_SEQ_RM: u32 = crate::record::kind::SEQ_RM;

/// The host removed positions of a sequence from its memory.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRm {
    /// [`KIND_SEQ_RM`].
    pub kind: u32,
    /// `size_of::<SeqRm>()`.
    pub header_size: u32,
    /// Sequence id, or -1 for all sequences.
    pub seq_id: i32,
    /// First removed position (negative: from 0).
    pub p0: i32,
    /// End of the removed range (negative: to the end).
    pub p1: i32,
    /// Graph computes of the host before this call ([`crate::record::FrameHeader::step`]).
    pub step: u32,
}

const _: () = assert!(std::mem::size_of::<SeqRm>() % 8 == 0);

impl SeqRm {
    /// A record for `seq_rm(seq_id, p0, p1)` after `step` graph computes.
    pub fn new(seq_id: i32, p0: i32, p1: i32, step: u32) -> Self {
        Self {
            kind: KIND_SEQ_RM,
            header_size: std::mem::size_of::<Self>() as u32,
            seq_id,
            p0,
            p1,
            step,
        }
    }

    /// Parse one from a ring record's bytes (`None` if it is not one).
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let n = std::mem::size_of::<Self>();
        if buf.len() < n {
            return None;
        }
        let word = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&buf[i * 4..i * 4 + 4]);
            b
        };
        let r = Self {
            kind: u32::from_le_bytes(word(0)),
            header_size: u32::from_le_bytes(word(1)),
            seq_id: i32::from_le_bytes(word(2)),
            p0: i32::from_le_bytes(word(3)),
            p1: i32::from_le_bytes(word(4)),
            step: u32::from_le_bytes(word(5)),
        };
        (r.kind == KIND_SEQ_RM && r.header_size as usize >= n).then_some(r)
    }

    /// The record's bytes.
    pub fn to_bytes(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        for (i, v) in [
            self.kind,
            self.header_size,
            self.seq_id as u32,
            self.p0 as u32,
            self.p1 as u32,
            self.step,
        ]
        .into_iter()
        .enumerate()
        {
            out[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// First message of a host, sent with the ring's memfd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL`].
    pub format: String,
    /// The host's process id.
    pub pid: u32,
    /// The host's executable (`/proc/self/exe`), for logs.
    pub exe: String,
    /// Bytes of the memfd (preamble, control block and arena).
    pub map_bytes: u64,
    /// `LATENT_TAP_TENSORS` as the host read it.
    pub tensors: String,
    /// `LATENT_TAP_LAYERS` (`all` when unset).
    pub layers: String,
    /// `LATENT_TAP_ROWS`: `all` or `last` (rows with [`ROW_OUTPUT`] only).
    pub rows: String,
    /// `LATENT_TAP_DTYPE`: `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// Connection number within the host (1 for its first listener).
    pub connection: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_rm_round_trips_and_refuses_other_kinds() {
        let r = SeqRm::new(3, 17, -1, 42);
        assert_eq!(SeqRm::parse(&r.to_bytes()), Some(r));
        let mut b = r.to_bytes();
        b[0] = 1;
        assert_eq!(SeqRm::parse(&b), None);
        assert_eq!(SeqRm::parse(&b[..20]), None);
    }
}
