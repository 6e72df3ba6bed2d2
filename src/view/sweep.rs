//! `sweep.png`: the picture of an activation-patching sweep (`latent-tap
//! patch-sweep`): layers × prompt positions (deepest layer at the top), each
//! cell coloured by the probability of the target token after the clean run's
//! row replaced the corrupt run's there, and labelled with the argmax token;
//! the clean tokens above the grid, the corrupt ones below, the baselines in
//! the scale's caption.

use std::path::Path;

use serde_json::Value;

use super::font::printable;
use super::grid::{viridis, Cell, Column, Grid};
use super::heatmap::piece;
use crate::error::{Error, Result};

fn bad(what: &str) -> Error {
    Error::invalid(format!(
        "sweep data for the heatmap: {what} (expected sweep.json of `latent-tap patch-sweep`)"
    ))
}

/// The pieces of `data[side].tokens` by position.
fn pieces(data: &Value, side: &str) -> std::collections::HashMap<i64, String> {
    data.get(side)
        .and_then(|s| s.get("tokens"))
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|t| Some((t.get("pos")?.as_i64()?, piece(t.get("piece")?))))
                .collect()
        })
        .unwrap_or_default()
}

/// Write the heatmap of a sweep (`sweep.json`'s value: `layers`, `positions`,
/// matrices `prob` and `argmax_piece` indexed `[layer index][position index]`,
/// `target`, `baselines`, `clean`/`corrupt` tokens) to `path` as an RGB PNG.
pub fn sweep_png(data: &Value, path: &Path) -> Result<()> {
    let ints = |key: &str| -> Result<Vec<i64>> {
        data.get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| bad(&format!("no \"{key}\" array")))?
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| bad(&format!("a \"{key}\" entry that is not an integer")))
            })
            .collect()
    };
    let layers = ints("layers")?;
    let positions = ints("positions")?;
    if layers.is_empty() || positions.is_empty() {
        return Err(bad("no layers or no positions"));
    }
    let prob = data
        .get("prob")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no \"prob\" matrix"))?;
    let argmax = data.get("argmax_piece").and_then(Value::as_array);
    let (clean, corrupt) = (pieces(data, "clean"), pieces(data, "corrupt"));
    let columns = positions
        .iter()
        .map(|p| Column {
            above: clean.get(p).cloned().unwrap_or_default(),
            below: corrupt.get(p).cloned().unwrap_or_default(),
            pos: *p,
        })
        .collect();
    let cells = (0..layers.len())
        .map(|li| {
            (0..positions.len())
                .map(|ci| {
                    let p = prob.get(li).and_then(|r| r.get(ci)).and_then(Value::as_f64);
                    let top = argmax
                        .and_then(|m| m.get(li))
                        .and_then(|r| r.get(ci))
                        .map(piece)
                        .unwrap_or_default();
                    match p {
                        Some(p) => Cell::Filled(viridis(p), top),
                        None => Cell::NoRow,
                    }
                })
                .collect()
        })
        .collect();
    let target = data
        .get("target")
        .and_then(|t| t.get("piece"))
        .map(piece)
        .unwrap_or_default();
    let base = |side: &str| {
        data.get("baselines")
            .and_then(|b| b.get(side))
            .and_then(|b| b.get("prob"))
            .and_then(Value::as_f64)
            .map_or("?".to_string(), |p| format!("{p:.3}"))
    };
    let tensor = data.get("tensor").and_then(Value::as_str).unwrap_or("?");
    let target = printable(&target, false);
    // An interrupted sweep leaves the cells it did not reach grey too.
    let grey = if data.get("complete").and_then(Value::as_bool) == Some(false) {
        "grey: no row or not run"
    } else {
        "grey: no row"
    };
    Grid {
        title: format!("patch-sweep: P('{target}'), clean {tensor}-L row at pos"),
        above: "clean",
        below: "corrupt",
        layers: &layers,
        columns,
        cells,
        caption: format!(
            "P('{target}'); clean {}, corrupt {}; {grey}",
            base("clean"),
            base("corrupt")
        ),
    }
    .write_png(path)
}

#[cfg(test)]
mod tests {
    use super::super::grid::{heatmap_size, Layout, NO_ROW};
    use super::*;
    use serde_json::json;

    #[test]
    fn sweep_png_colours_cells_by_probability() {
        let data = json!({
            "tensor": "l_out", "layers": [0, 1], "positions": [0, 1, 2],
            "target": {"id": 3, "piece": " Paris"},
            "clean": {"tokens": [{"pos": 0, "piece": "<bos>", "id": 2}]},
            "corrupt": {"tokens": [{"pos": 1, "piece": " Rome", "id": 5}]},
            "baselines": {"clean": {"prob": 0.9}, "corrupt": {"prob": 0.1}},
            "prob": [[1.0, 0.0, null], [0.5, 0.5, 0.5]],
            "argmax_piece": [["a", "b", null], ["c", "d", "e"]],
        });
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sweep.png");
        sweep_png(&data, &p).unwrap();
        let dec = png::Decoder::new(std::fs::File::open(&p).unwrap());
        let mut r = dec.read_info().unwrap();
        let mut px = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut px).unwrap();
        let lay = Layout::new(2, 3);
        assert_eq!(
            (info.width as usize, info.height as usize),
            heatmap_size(2, 3)
        );
        let at = |li: usize, col: usize| {
            let (x, y) = lay.cell(li, col);
            let i = ((y + 1) * lay.width + x + 1) * 3;
            [px[i], px[i + 1], px[i + 2]]
        };
        assert_eq!(at(0, 0), viridis(1.0));
        assert_eq!(at(0, 1), viridis(0.0));
        assert_eq!(at(0, 2), NO_ROW);
        assert_eq!(at(1, 2), viridis(0.5));
        let e = sweep_png(&json!({"layers": [], "positions": [0]}), &p).unwrap_err();
        assert!(e.message().contains("no layers"), "{e}");
    }
}
