//! `lens.png`: the layers × positions heatmap as an image (deepest layer at
//! the top, as in the page), each cell coloured by the probability of the token
//! that came next (viridis, as the page) and labelled with the layer's top-1
//! token; layer numbers on the left, the input tokens below, the next tokens
//! above, a colour scale at the bottom.

use std::io::BufWriter;
use std::path::Path;

use serde_json::Value;

use super::font::{self, glyph, printable};
use crate::error::{Error, ErrorKind, Result};

type Rgb = [u8; 3];

/// Cell size in pixels.
pub(crate) const CELL_W: usize = 60;
pub(crate) const CELL_H: usize = 18;
const LEFT: usize = 60;
const RIGHT: usize = 12;
/// Title line (scale 2) and the "next" line above the grid.
const TITLE_H: usize = 26;
const NEXT_H: usize = 14;
/// Below the grid: the input tokens, positions, then the colour scale.
const BELOW_H: usize = 14 + 12 + 16 + 12 + 18;
const MIN_W: usize = 420;
/// Largest image written (pixels).
const MAX_PIXELS: usize = 64 << 20;

pub(crate) const BG: Rgb = [255, 255, 255];
pub(crate) const NO_ROW: Rgb = [226, 226, 232];
pub(crate) const NO_TARGET: Rgb = [180, 180, 190];
const INK: Rgb = [30, 30, 36];
const MUTED: Rgb = [100, 100, 112];
const VIRIDIS: [Rgb; 5] = [
    [68, 1, 84],
    [59, 82, 139],
    [33, 145, 140],
    [94, 201, 98],
    [253, 231, 37],
];

/// The colour of probability `p` (0..=1), as the page's.
pub(crate) fn viridis(p: f64) -> Rgb {
    let t = if p.is_finite() {
        p.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (VIRIDIS.len() - 1) as f64;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f64;
    let mut c = [0u8; 3];
    for k in 0..3 {
        let (a, b) = (VIRIDIS[i][k] as f64, VIRIDIS[i + 1][k] as f64);
        c[k] = (a + (b - a) * f).round() as u8;
    }
    c
}

/// Where things are, for a lens of `n_layers` layers and `n_cols` positions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub(crate) width: usize,
    pub(crate) height: usize,
    n_layers: usize,
}

impl Layout {
    pub(crate) fn new(n_layers: usize, n_cols: usize) -> Self {
        Self {
            width: (LEFT + n_cols * CELL_W + RIGHT).max(MIN_W),
            height: TITLE_H + NEXT_H + n_layers * CELL_H + BELOW_H,
            n_layers,
        }
    }

    /// Top-left pixel of the cell of layer index `li` (in the lens's layer
    /// list) and column `col`.
    pub(crate) fn cell(&self, li: usize, col: usize) -> (usize, usize) {
        let row = self.n_layers - 1 - li;
        (LEFT + col * CELL_W, TITLE_H + NEXT_H + row * CELL_H)
    }

    fn grid_bottom(&self) -> usize {
        TITLE_H + NEXT_H + self.n_layers * CELL_H
    }
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        let mut px = Vec::with_capacity(w * h * 3);
        for _ in 0..w * h {
            px.extend_from_slice(&BG);
        }
        Self { w, h, px }
    }

    fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: Rgb) {
        for yy in y..(y + h).min(self.h) {
            for xx in x..(x + w).min(self.w) {
                let i = (yy * self.w + xx) * 3;
                self.px[i..i + 3].copy_from_slice(&c);
            }
        }
    }

    /// `s` (already printable) at `scale`, clipped to `max_w` pixels (an ellipsis
    /// `..` marks a cut).
    fn text(&mut self, x: usize, y: usize, s: &str, scale: usize, max_w: usize, c: Rgb) {
        let adv = (font::W + 1) * scale;
        let fit = max_w / adv;
        let chars: Vec<char> = s.chars().collect();
        let shown: Vec<char> = if chars.len() > fit {
            let mut v: Vec<char> = chars[..fit.saturating_sub(2)].to_vec();
            v.extend(['.', '.'].iter().take(fit.min(2)));
            v
        } else {
            chars
        };
        for (i, ch) in shown.into_iter().enumerate() {
            let Some(g) = glyph(ch).or_else(|| glyph('?')) else {
                continue;
            };
            for (r, bits) in g.iter().enumerate() {
                for b in 0..font::W {
                    if bits & (1 << (font::W - 1 - b)) != 0 {
                        self.rect(x + i * adv + b * scale, y + r * scale, scale, scale, c);
                    }
                }
            }
        }
    }
}

fn bad(what: &str) -> Error {
    Error::invalid(format!(
        "lens data for the heatmap: {what} (expected {{\"prompt\", \"tokens\", \"lens\": {{\"layers\", \"rows\"}}}})"
    ))
}

/// A token piece as JSON gives it: a string, or bytes (not UTF-8) as numbers.
fn piece(v: &Value) -> String {
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
    let lay = Layout::new(layers.len(), rows.len());
    if lay.width.saturating_mul(lay.height) > MAX_PIXELS {
        return Err(Error::invalid(format!(
            "a heatmap of {} positions × {} layers would be {}×{} pixels, more than {MAX_PIXELS}; ask for fewer layers or positions",
            rows.len(),
            layers.len(),
            lay.width,
            lay.height
        )));
    }
    let mut cv = Canvas::new(lay.width, lay.height);
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
    let title = format!("logit lens: p(next token) | {}", printable(prompt, false));
    cv.text(6, 6, &title, 2, lay.width - 12, INK);
    cv.text(6, TITLE_H + 3, "next", 1, LEFT - 8, MUTED);
    for (li, l) in layers.iter().enumerate() {
        let (_, y) = lay.cell(li, 0);
        cv.text(6, y + 2, &format!("L{l}"), 2, LEFT - 8, INK);
    }
    let below = lay.grid_bottom();
    cv.text(6, below + 3, "in", 1, LEFT - 8, MUTED);
    cv.text(6, below + 17, "pos", 1, LEFT - 8, MUTED);
    for (col, row) in rows.iter().enumerate() {
        let pos = row.get("pos").and_then(Value::as_i64).unwrap_or(-1);
        let (x, _) = lay.cell(0, col);
        let target = row.get("target_piece").map(piece).unwrap_or_default();
        cv.text(
            x + 2,
            TITLE_H + 3,
            &printable(&target, true),
            1,
            CELL_W - 4,
            INK,
        );
        let input = inputs.get(&pos).cloned().unwrap_or_default();
        cv.text(
            x + 2,
            below + 3,
            &printable(&input, true),
            1,
            CELL_W - 4,
            INK,
        );
        cv.text(x + 2, below + 17, &pos.to_string(), 1, CELL_W - 4, MUTED);
        let cells = row.get("cells").and_then(Value::as_array);
        for li in 0..layers.len() {
            let (x, y) = lay.cell(li, col);
            let cell = cells.and_then(|c| c.get(li)).filter(|c| c.is_object());
            let Some(cell) = cell else {
                cv.rect(x, y, CELL_W - 1, CELL_H - 1, NO_ROW);
                continue;
            };
            let color = match cell.get("target_logprob").and_then(Value::as_f64) {
                Some(lp) => viridis(lp.exp()),
                None => NO_TARGET,
            };
            cv.rect(x, y, CELL_W - 1, CELL_H - 1, color);
            let lum = 0.299 * color[0] as f64 + 0.587 * color[1] as f64 + 0.114 * color[2] as f64;
            let ink = if lum > 140.0 { INK } else { BG };
            let top1 = cell
                .get("top")
                .and_then(|t| t.get(0))
                .and_then(|t| t.get("piece"))
                .map(piece)
                .unwrap_or_default();
            cv.text(x + 3, y + 5, &printable(&top1, true), 1, CELL_W - 6, ink);
        }
    }
    // The colour scale.
    let (sx, sy, sw) = (LEFT, below + 34, 200);
    for i in 0..sw {
        cv.rect(sx + i, sy, 1, 12, viridis(i as f64 / (sw - 1) as f64));
    }
    cv.text(sx, sy + 15, "0", 1, 20, MUTED);
    cv.text(sx + sw / 2 - 9, sy + 15, "0.5", 1, 30, MUTED);
    cv.text(sx + sw - 6, sy + 15, "1", 1, 20, MUTED);
    cv.text(
        sx + sw + 10,
        sy + 3,
        "p(next token); grey: no row",
        1,
        lay.width.saturating_sub(sx + sw + 12),
        MUTED,
    );

    let file = std::fs::File::create(path).map_err(|e| Error::io(path, "creating", e))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), lay.width as u32, lay.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let png_err = |e: png::EncodingError| {
        Error::with_source(ErrorKind::Io, format!("writing {}: {e}", path.display()), e)
    };
    let mut w = enc.write_header().map_err(png_err)?;
    w.write_image_data(&cv.px).map_err(png_err)?;
    w.finish().map_err(png_err)
}

#[cfg(test)]
mod tests {
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
