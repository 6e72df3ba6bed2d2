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
    /// Only the rows whose next-token distribution the model computes
    /// (llama.cpp's outputs): a prompt's last token and every generated token,
    /// i.e. the rows a sampled token came from. The same meaning in the CLI,
    /// the C API, `serve`, dataset capture and the `LD_PRELOAD` tap; a prompt
    /// decoded in several `n_batch` chunks gives one row, not one per chunk.
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

/// How selected tensors leave the graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// `deferred` where this process supports it, `callback` otherwise.
    #[default]
    Auto,
    /// The scheduler cuts the graph at each selected node and hands it to the eval
    /// callback (works everywhere; costs a thread-pool wake-up per piece).
    Callback,
    /// Selected nodes are kept as graph outputs and copied after the compute: no
    /// graph split. Falls back to `callback` where unsupported (the tap says why).
    Deferred,
}

impl CaptureMode {
    /// `auto`, `callback` or `deferred`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "callback" => Ok(Self::Callback),
            "deferred" => Ok(Self::Deferred),
            m => Err(Error::invalid(format!(
                "capture mode must be auto, callback or deferred, not '{m}'"
            ))),
        }
    }

    /// The spelling `parse` accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Callback => "callback",
            Self::Deferred => "deferred",
        }
    }
}

/// What a tap did about its capture mode: asked for, in effect, and why not deferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ModeReport {
    /// The mode asked for.
    pub requested: CaptureMode,
    /// `deferred` or `callback`: what runs for tensors in host memory.
    pub used: CaptureMode,
    /// Why `deferred` does not run, when it was asked for or left to `auto`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
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
    /// How tensors leave the graph.
    pub mode: CaptureMode,
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
    /// Frames (of `frames`) copied after the graph compute (deferred mode); the
    /// others went through the eval callback.
    pub deferred: u64,
}
