//! What a tap is asked to do: rows, full-ring policy, settings, and its counters.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::record::Dtype;

/// Which rows of each selected tensor to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rows {
    /// Every row (token) the graph computes.
    All,
    /// Only each sequence's last row of a batch (cheaper for generation).
    Last,
}

impl Rows {
    /// `all` or `last` (the spelling shared by the CLI, the server and the docs).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Rows::All),
            "last" => Ok(Rows::Last),
            r => Err(Error::invalid(format!(
                "rows must be all or last, not '{r}'"
            ))),
        }
    }
}

/// What the producer does when the ring is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Lossless: wait for space; give up (cancelling the decode) after `timeout`.
    Block {
        /// How long to wait before failing the decode.
        timeout: Duration,
    },
    /// Never wait: drop the new frame and count it; sequence numbers show the gap.
    DropNewest,
}

/// How a capturing tap cuts and ships frames.
#[derive(Debug, Clone, Copy)]
pub struct TapSettings {
    /// Rows to keep.
    pub rows: Rows,
    /// Output element type.
    pub dtype: Dtype,
    /// Full-ring policy.
    pub policy: Policy,
    /// The context's physical batch size (rows per graph compute).
    pub n_ubatch: usize,
}

/// Counters the tap keeps beside the ring's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TapCounters {
    /// Frames produced (sequence numbers handed out, dropped ones included).
    pub frames: u64,
    /// Frames dropped because the ring was full (`drop-newest`).
    pub drops: u64,
    /// Payload bytes written into the ring.
    pub bytes: u64,
    /// Selected nodes whose shape had no per-token axis matching the ubatch; skipped.
    pub unaligned: u64,
}
