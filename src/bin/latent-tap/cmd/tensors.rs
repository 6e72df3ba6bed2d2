//! `tensors`: list every capturable graph tensor, grouped by layer.

use std::io::Write;

use latent_tap::engine::ContextOptions;
use latent_tap::session::probe_graph;
use latent_tap::Result;

use crate::args::{load, ModelArgs};
use crate::stdout::to_stdout;

/// Probe the graph once and print every node, grouped by layer.
pub fn tensors(a: ModelArgs) -> Result<()> {
    let opts = ContextOptions {
        n_ctx: 256,
        n_threads: a.threads,
        ..ContextOptions::default()
    };
    opts.validate()?;
    let model = load(&a)?;
    let nodes = probe_graph(&model, &opts)?;
    let shape = |ne: &[i64; 4]| {
        ne.iter()
            .take_while(|&&n| n > 0)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("x")
    };
    let mut layers: Vec<i32> = nodes.iter().filter_map(|n| n.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    to_stdout(|out| {
        writeln!(
            out,
            "# {} ({}, {} layers, n_embd {}); shapes for one token; '-' marks nodes without a per-token row (not captured)",
            model.path().display(),
            model.arch(),
            model.n_layer(),
            model.n_embd()
        )?;
        let line = |out: &mut dyn Write, n: &latent_tap::select::GraphNode| {
            let mark = if n.row_width.is_some() { "" } else { "  -" };
            writeln!(out, "  {:<28} {}{mark}", n.name, shape(&n.ne))
        };
        writeln!(out, "global:")?;
        for n in nodes.iter().filter(|n| n.layer.is_none()) {
            line(&mut *out, n)?;
        }
        for l in layers {
            writeln!(out, "layer {l}:")?;
            for n in nodes.iter().filter(|n| n.layer == Some(l)) {
                line(&mut *out, n)?;
            }
        }
        Ok(())
    })
}
