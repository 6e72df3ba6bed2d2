//! The graph a context computes, learned by decoding with a probing tap: the
//! first step of arming a capture ([`crate::capture::arm`]).

use std::sync::Arc;

use super::{Batch, Context, ContextOptions, Model};
use crate::capture::Tap;
use crate::error::Result;
use crate::select::GraphNode;

/// A context on `model` created with a probing tap, and every node its graph
/// computes (see [`probe_graph_on`]). Swap in the armed tap with
/// `Context::replace_tap`, or drop the context once the graph is known.
pub(crate) fn probe_context(
    model: Arc<Model>,
    opts: &ContextOptions,
) -> Result<(Context, Vec<GraphNode>)> {
    let mut ctx = Context::new(model, opts, Some(Box::new(Tap::probe())))?;
    let graph = probe_graph_on(&mut ctx)?;
    Ok((ctx, graph))
}

/// List the nodes the graph of `ctx` (created with [`Tap::probe`]) computes,
/// with a one-token decode; the KV cache is cleared again afterwards.
fn probe_graph_on(ctx: &mut Context) -> Result<Vec<GraphNode>> {
    let bos = ctx
        .model()
        .tokenize("", true)?
        .first()
        .copied()
        .unwrap_or(0);
    let mut batch = Batch::new(2);
    batch.push(bos, 0, 0, true);
    ctx.decode(&batch)?;
    let mut nodes = GraphNode::list_from_raw(ctx.tap().map(Tap::probed_nodes).unwrap_or(&[]));
    ctx.clear();
    // A second probe of two tokens in one ubatch tells which nodes have a stable
    // per-token row (their token axis grows, the rest stays). With 1-token ubatches
    // it is impossible; the tap then checks widths at run time.
    if ctx.n_ubatch() >= 2 {
        ctx.replace_tap(Tap::probe())?;
        batch.clear();
        batch.push(bos, 0, 0, true);
        batch.push(bos, 1, 0, true);
        ctx.decode(&batch)?;
        let two = ctx.tap().map(Tap::probed_nodes).unwrap_or(&[]);
        GraphNode::classify_rows(&mut nodes, two);
        ctx.clear();
    }
    Ok(nodes)
}
