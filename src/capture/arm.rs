//! Getting a capturing [`Tap`] onto a context, in one place for every front
//! end (sessions, the serving engine, C plugin taps): once the graph a context
//! computes is probed (`engine::probe_context`), arm a tap on a new ring with a
//! selection compiled against that graph.

use super::{Tap, TapSettings};
use crate::error::{Error, ErrorKind, Result};
use crate::select::{GraphNode, LayerFilter, Selection};
use crate::stream::Stream;

/// What [`arm`] arms: the selection's patterns, the ring and the tap's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arming<'a> {
    /// Glob patterns over the graph's display names (comma lists allowed),
    /// compiled now; empty: nothing selected (a tokens-only tap, or one whose
    /// selection is set later with `Tap::reselect`).
    pub patterns: &'a [String],
    /// Optional layer filter applied after the patterns.
    pub layers: Option<&'a LayerFilter>,
    /// Ring capacity in bytes.
    pub ring_bytes: usize,
    /// Rows, dtype, full-ring policy, physical batch and capture mode.
    pub settings: TapSettings,
}

/// Arm a tap that writes into a new ring of `a.ring_bytes`, returning it with
/// the ring's reading end. `graph` is the probed graph (`None`: no probe, for a
/// tokens-only tap that never reselects); its first node is the sentinel that
/// marks every graph compute. Patterns select only tensors whose frame of
/// `n_ubatch` rows fits the ring (the rest are reported as skipped).
///
/// The ring's memory is checked first (refuse, rather than be OOM-killed later).
pub(crate) fn arm(graph: Option<&[GraphNode]>, a: Arming<'_>) -> Result<(Tap, Stream)> {
    let sentinel = match graph {
        None => "",
        // The first node of every graph compute marks a new ubatch.
        Some(g) => g
            .first()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "the probe saw no named graph node"))?
            .ggml_name
            .as_str(),
    };
    crate::ring::check_memory(a.ring_bytes)?;
    let (producer, consumer) = crate::ring::channel(a.ring_bytes)
        .map_err(|e| Error::invalid(format!("ring capacity {}: {e}", a.ring_bytes)))?;
    let sel = if a.patterns.is_empty() {
        Selection::empty()
    } else {
        let max = producer.max_record_len();
        let (n_ubatch, dtype) = (a.settings.n_ubatch, a.settings.dtype);
        let fits = |n: &GraphNode| {
            crate::record::frame_len(n_ubatch, n.row_width.unwrap_or(0), dtype) <= max
        };
        Selection::compile_fitting(a.patterns, a.layers, graph.unwrap_or(&[]), &fits)?
    };
    let tap = Tap::armed(sentinel, sel, producer, a.settings)?;
    Ok((tap, Stream::new(consumer)))
}
