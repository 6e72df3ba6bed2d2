//! Getting a capturing [`Tap`] onto a context, in one place for every front
//! end (sessions, the serving engine, C plugin taps): once the graph a context
//! computes is probed (`engine::probe_context`), arm a tap on a new ring with a
//! selection compiled against that graph.

use super::{check_fits, Tap, TapSettings};
use crate::error::{Error, ErrorKind, Result};
use crate::record::Dtype;
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
        let (n_ubatch, dtype) = (a.settings.n_ubatch, a.settings.dtype);
        let max = producer.max_record_len();
        fitting_selection(
            a.patterns,
            a.layers,
            graph.unwrap_or(&[]),
            n_ubatch,
            dtype,
            max,
        )?
    };
    let tap = Tap::armed(sentinel, sel, producer, a.settings)?;
    Ok((tap, Stream::new(consumer)))
}

/// The one rule for what a tap on a ring whose largest record is `max_record`
/// can capture (arming a tap here, and the serving engine's per-request
/// selections): `patterns` compiled against `graph`, skipping (and listing in
/// [`Selection::skipped`]) the nodes a glob matched whose frame of `n_ubatch`
/// rows of `dtype` does not fit; a node named exactly whose frame does not fit
/// is an [`ErrorKind::FrameTooLarge`] error giving the sizes, as is a selection
/// where no matched node fits.
pub(crate) fn fitting_selection(
    patterns: &[String],
    layers: Option<&LayerFilter>,
    graph: &[GraphNode],
    n_ubatch: usize,
    dtype: Dtype,
    max_record: usize,
) -> Result<Selection> {
    let fits = |n: &GraphNode| {
        crate::record::frame_len(n_ubatch, n.row_width.unwrap_or(0), dtype) <= max_record
    };
    let sel = Selection::compile_fitting(patterns, layers, graph, &fits)?;
    check_fits(&sel, n_ubatch, dtype, max_record)?;
    Ok(sel)
}

/// The physical batch, at most `n_ubatch`, at which the selection `patterns`
/// fits a ring of `ring_bytes`: `n_ubatch` when `fitting_selection` (crate-private) accepts
/// it, otherwise as many rows as one frame of the widest matched tensor that
/// fits at all can carry (so a 1 MiB ring captures 640-wide f32 rows with a
/// 204-row ubatch instead of failing). Errors as `fitting_selection` does
/// when not even one row fits, or when the patterns fail for another reason.
pub fn ubatch_for_ring(
    patterns: &[String],
    layers: Option<&LayerFilter>,
    graph: &[GraphNode],
    n_ubatch: usize,
    dtype: Dtype,
    ring_bytes: usize,
) -> Result<usize> {
    let max = crate::ring::max_record_for(ring_bytes);
    let err = match fitting_selection(patterns, layers, graph, n_ubatch, dtype, max) {
        Ok(_) => return Ok(n_ubatch),
        Err(e) if e.kind() == ErrorKind::FrameTooLarge => e,
        Err(e) => return Err(e),
    };
    // Nothing matched fits at n_ubatch: size the batch for the widest matched
    // row of which one fits, so every node that can fit at all is captured.
    let all = Selection::compile(patterns, layers, graph)?;
    let head = crate::record::frame_len(0, 0, dtype);
    let rows_for = |w: usize| {
        let per_row = crate::record::frame_len(1, w, dtype) - head;
        max.saturating_sub(head) / per_row.max(1)
    };
    let rows = all
        .tensors()
        .iter()
        .map(|t| rows_for(t.row_width.max(1)))
        .filter(|&r| r > 0)
        .min()
        .unwrap_or(0)
        .min(n_ubatch);
    if rows == 0 {
        return Err(err);
    }
    fitting_selection(patterns, layers, graph, rows, dtype, max).map(|_| rows)
}
