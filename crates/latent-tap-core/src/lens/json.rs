//! The lens's JSON shape (the `lens` answer field of `serve`, `lens.jsonl`
//! and the data of `lens.html`), built from computed rows.

use serde_json::{json, Value};

use super::stats::CellStats;

/// One row (token position) of a lens: a cell per lens layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LensRow {
    /// Position in the sequence.
    pub pos: i32,
    /// The job step the row was computed in (0: the prompt).
    pub step: u32,
    /// Sequence id.
    pub seq: i32,
    /// The token the row is scored against (the token that came next), if any.
    pub target: Option<i32>,
    /// One per lens layer, in the lens's layer order; `None` where that layer
    /// has no row at this position.
    pub cells: Vec<Option<CellStats>>,
}

/// One cell as JSON: `{"top": [{"id", "piece", "logprob"}], "entropy",
/// "target_logprob", "target_rank", "kl"}`.
pub fn cell_json(c: &CellStats, piece: &dyn Fn(i32) -> String) -> Value {
    let top: Vec<Value> = c
        .top
        .iter()
        .map(|&(id, lp)| json!({"id": id, "piece": piece(id), "logprob": lp}))
        .collect();
    json!({
        "top": top,
        "entropy": c.entropy,
        "target_logprob": c.target_logprob,
        "target_rank": c.target_rank,
        "kl": c.kl,
    })
}

/// One row as JSON: `{"pos", "step", "seq", "target", "target_piece", "cells"}`.
pub fn row_json(r: &LensRow, piece: &dyn Fn(i32) -> String) -> Value {
    let cells: Vec<Value> = r
        .cells
        .iter()
        .map(|c| c.as_ref().map_or(Value::Null, |c| cell_json(c, piece)))
        .collect();
    json!({
        "pos": r.pos,
        "step": r.step,
        "seq": r.seq,
        "target": r.target,
        "target_piece": r.target.map(piece),
        "cells": cells,
    })
}

/// The `lens` object: `{"layers", "n_vocab", "rows"}`, rows in the given order.
pub fn lens_json(
    layers: &[usize],
    n_vocab: usize,
    rows: &[LensRow],
    piece: &dyn Fn(i32) -> String,
) -> Value {
    json!({
        "layers": layers,
        "n_vocab": n_vocab,
        "rows": rows.iter().map(|r| row_json(r, piece)).collect::<Vec<_>>(),
    })
}

/// One `lens.jsonl` line per (row, layer) cell that exists:
/// `{"pos", "step", "seq", "layer", "target", "target_piece", ...cell}`.
pub fn jsonl_lines(
    layers: &[usize],
    rows: &[LensRow],
    piece: &dyn Fn(i32) -> String,
) -> Vec<Value> {
    let mut out = Vec::new();
    for r in rows {
        for (layer, c) in layers.iter().zip(&r.cells) {
            let Some(c) = c else { continue };
            let mut v = json!({
                "pos": r.pos, "step": r.step, "seq": r.seq, "layer": layer,
                "target": r.target, "target_piece": r.target.map(piece),
            });
            if let (Value::Object(o), Value::Object(cell)) = (&mut v, cell_json(c, piece)) {
                o.extend(cell);
            }
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_as_in_the_contract() {
        let c = CellStats {
            top: vec![(7, -0.5)],
            entropy: 1.5,
            target_logprob: Some(-0.5),
            target_rank: Some(0),
            kl: None,
        };
        let rows = [LensRow {
            pos: 3,
            step: 0,
            seq: 0,
            target: Some(7),
            cells: vec![Some(c), None],
        }];
        let piece = |id: i32| format!("t{id}");
        let v = lens_json(&[0, 2], 10, &rows, &piece);
        assert_eq!(v["layers"], json!([0, 2]));
        assert_eq!(v["n_vocab"], 10);
        let r = &v["rows"][0];
        assert_eq!(r["target_piece"], "t7");
        assert_eq!(
            r["cells"][0]["top"][0],
            json!({"id": 7, "piece": "t7", "logprob": -0.5})
        );
        assert_eq!(r["cells"][0]["kl"], Value::Null);
        assert_eq!(r["cells"][1], Value::Null);
        let lines = jsonl_lines(&[0, 2], &rows, &piece);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["layer"], 0);
        assert_eq!(lines[0]["entropy"], 1.5);
    }
}
