//! `lens.png`: the layers × positions heatmap as an image (deepest layer at
//! the top, as in the page), each cell coloured by the probability of the token
//! that came next (viridis, as the page) and labelled with the layer's top-1
//! token; layer numbers on the left, the input tokens below, the next tokens
//! above, a colour scale at the bottom.

use std::path::Path;

use serde_json::Value;

use super::font::printable;
use super::grid::{viridis, Cell, Column, Grid, NO_TARGET};
use crate::error::{Error, Result};

fn bad(what: &str) -> Error {
    Error::invalid(format!(
        "lens data for the heatmap: {what} (expected {{\"prompt\", \"tokens\", \"lens\": {{\"layers\", \"rows\"}}}})"
    ))
}

/// A token piece as JSON gives it: a string, or bytes (not UTF-8) as numbers.
pub(crate) fn piece(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|b| format!("\\x{:02x}", b.as_u64().unwrap_or(0) & 0xff))
            .collect(),
        _ => String::new(),
    }
}

/// Write the heatmap of `data` (`{"prompt", "tokens", "lens"}`, see the module
/// docs of [`crate::view`]) to `path` as an RGB PNG.
pub fn heatmap_png(data: &Value, path: &Path) -> Result<()> {
    let lens = data.get("lens").ok_or_else(|| bad("no \"lens\""))?;
    let layers: Vec<i64> = lens
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no \"lens.layers\" array"))?
        .iter()
        .map(|l| {
            l.as_i64()
                .ok_or_else(|| bad("a layer that is not an integer"))
        })
        .collect::<Result<_>>()?;
    let rows = lens
        .get("rows")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no \"lens.rows\" array"))?;
    if layers.is_empty() {
        return Err(bad("\"lens.layers\" is empty"));
    }
    let inputs: std::collections::HashMap<i64, String> = data
        .get("tokens")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|t| Some((t.get("pos")?.as_i64()?, piece(t.get("piece")?))))
                .collect()
        })
        .unwrap_or_default();
    let prompt = data.get("prompt").and_then(Value::as_str).unwrap_or("");
    let mut columns = Vec::with_capacity(rows.len());
    let mut cells = vec![Vec::with_capacity(rows.len()); layers.len()];
    for row in rows {
        let pos = row.get("pos").and_then(Value::as_i64).unwrap_or(-1);
        columns.push(Column {
            above: row.get("target_piece").map(piece).unwrap_or_default(),
            below: inputs.get(&pos).cloned().unwrap_or_default(),
            pos,
        });
        let row_cells = row.get("cells").and_then(Value::as_array);
        for (li, out) in cells.iter_mut().enumerate() {
            let cell = row_cells.and_then(|c| c.get(li)).filter(|c| c.is_object());
            out.push(match cell {
                None => Cell::NoRow,
                Some(cell) => {
                    let color = match cell.get("target_logprob").and_then(Value::as_f64) {
                        Some(lp) => viridis(lp.exp()),
                        None => NO_TARGET,
                    };
                    let top1 = cell
                        .get("top")
                        .and_then(|t| t.get(0))
                        .and_then(|t| t.get("piece"))
                        .map(piece)
                        .unwrap_or_default();
                    Cell::Filled(color, top1)
                }
            });
        }
    }
    Grid {
        title: format!("logit lens: p(next token) | {}", printable(prompt, false)),
        above: "next",
        below: "in",
        layers: &layers,
        columns,
        cells,
        caption: "p(next token); grey: no row".into(),
    }
    .write_png(path)
}

#[cfg(test)]
mod tests {
    use super::super::grid::{
        Layout, Rgb, CELL_H, CELL_W, INK, LEFT, MIN_W, NEXT_H, NO_ROW, RIGHT, TITLE_H,
    };
    use super::*;
    use serde_json::json;

    fn cell(lp: Option<f64>) -> Value {
        json!({"top": [{"id": 7, "piece": "</script><img onerror=x>", "logprob": -0.1}],
               "entropy": 1.0, "target_logprob": lp, "target_rank": 0, "kl": 0.5})
    }

    fn decode(path: &Path) -> (png::OutputInfo, Vec<u8>) {
        let dec = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    #[test]
    fn heatmap_has_the_layout_and_colours() {
        // 3 layers × 4 positions: p = 1, p ≈ 0, no target, no row.
        let rows: Vec<Value> = (0..4)
            .map(|c| {
                let cells: Vec<Value> = (0..3)
                    .map(|li| match (c, li) {
                        (0, _) => cell(Some(0.0)),
                        (1, _) => cell(Some(-50.0)),
                        (2, _) => cell(None),
                        (_, 2) => Value::Null,
                        _ => cell(Some((0.5f64).ln())),
                    })
                    .collect();
                json!({"pos": c, "step": 0, "seq": 0, "target": 1, "target_piece": " Paris\u{e9}\n", "cells": cells})
            })
            .collect();
        let data = json!({"prompt": "The capital of France is",
            "tokens": [{"id": 1, "piece": "中", "pos": 0}],
            "lens": {"layers": [0, 5, 9], "n_vocab": 16, "rows": rows}});
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lens.png");
        heatmap_png(&data, &p).unwrap();
        let (info, px) = decode(&p);
        let lay = Layout::new(3, 4);
        assert_eq!(
            (info.width as usize, info.height as usize),
            (lay.width, lay.height)
        );
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(lay.width, (LEFT + 4 * CELL_W + RIGHT).max(MIN_W));
        let at = |x: usize, y: usize| -> Rgb {
            let i = (y * lay.width + x) * 3;
            [px[i], px[i + 1], px[i + 2]]
        };
        for li in 0..3 {
            // The top-left pixels of a cell are never inked by its label.
            let c = |col| {
                let (x, y) = lay.cell(li, col);
                at(x + 1, y + 1)
            };
            assert_eq!(c(0), [253, 231, 37], "p = 1, layer {li}");
            assert_eq!(c(1), [68, 1, 84], "p ≈ 0, layer {li}");
            assert_eq!(c(2), NO_TARGET);
            assert_eq!(c(3), if li == 2 { NO_ROW } else { viridis(0.5) });
        }
        assert_eq!(viridis(0.5), [33, 145, 140]);
        // Deepest layer on top.
        assert!(lay.cell(2, 0).1 < lay.cell(0, 0).1);
        // Labels: some ink in the layer-label margin and in the token rows.
        let inked = |x0: usize, y0: usize, w: usize, h: usize| {
            (y0..y0 + h).any(|y| (x0..x0 + w).any(|x| at(x, y) == INK))
        };
        let (_, y) = lay.cell(1, 0);
        assert!(inked(0, y, LEFT, CELL_H), "layer label");
        let (x, _) = lay.cell(0, 0);
        assert!(inked(x, TITLE_H, CELL_W, NEXT_H), "next-token label");
        assert!(inked(x, lay.grid_bottom(), CELL_W, 12), "input-token label");
    }

    #[test]
    fn heatmap_refuses_bad_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.png");
        let e = heatmap_png(&json!({"prompt": "x"}), &p).unwrap_err();
        assert!(e.message().contains("no \"lens\""), "{e}");
        let e = heatmap_png(&json!({"lens": {"layers": [], "rows": []}}), &p).unwrap_err();
        assert!(e.message().contains("empty"), "{e}");
        let e = heatmap_png(&json!({"lens": {"layers": ["a"], "rows": []}}), &p).unwrap_err();
        assert!(e.message().contains("not an integer"), "{e}");
        assert!(!p.exists());
    }
}
