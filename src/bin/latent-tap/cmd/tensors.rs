//! `tensors`: list every capturable graph tensor, grouped by layer.

use std::io::Write;

use clap::Args;

use latent_tap::engine::ContextOptions;
use latent_tap::select::glob_match;
use latent_tap::session::probe_graph;
use latent_tap::{Error, ErrorKind, Result};

use crate::args::{load, ModelArgs};
use crate::stdout::to_stdout;

#[derive(Args)]
pub struct TensorsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// List only the nodes these patterns match (globs, comma-separated, as for
    /// capture --tensors), e.g. 'l_out-*' or '*-3'.
    #[arg(value_name = "PATTERNS")]
    pub patterns: Option<String>,
}

/// Probe the graph once and print every node (or those `a.patterns` match),
/// grouped by layer.
pub fn tensors(a: TensorsArgs) -> Result<()> {
    let pats: Vec<&str> = a
        .patterns
        .as_deref()
        .map(|p| {
            p.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if a.patterns.is_some() && pats.is_empty() {
        return Err(Error::invalid(
            "the tensors pattern is blank: give globs such as 'l_out-*', or none to list every node",
        ));
    }
    let a = a.model;
    let opts = ContextOptions {
        n_ctx: 256,
        n_threads: a.threads,
        ..ContextOptions::default()
    };
    opts.validate()?;
    let model = load(&a)?;
    let mut nodes = probe_graph(&model, &opts)?;
    if !pats.is_empty() {
        nodes.retain(|n| pats.iter().any(|p| glob_match(p, &n.name)));
        if nodes.is_empty() {
            return Err(Error::new(
                ErrorKind::NoMatch,
                format!("'{}' matches no node of this model's graph", pats.join(",")),
            ));
        }
    }
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
            "# {} ({}, {} layers, n_embd {}); shapes for one token; '-' marks nodes without a per-token row (not captured); node names depend on the architecture",
            model.path().display(),
            model.arch(),
            model.n_layer(),
            model.n_embd()
        )?;
        let line = |out: &mut dyn Write, n: &latent_tap::select::GraphNode| {
            let mark = if n.row_width.is_some() { "" } else { "  -" };
            writeln!(out, "  {:<28} {}{mark}", n.name, shape(&n.ne))
        };
        if nodes.iter().any(|n| n.layer.is_none()) {
            writeln!(out, "global:")?;
        }
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
