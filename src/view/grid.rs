//! The drawing shared by the heatmap images (`lens.png`, `sweep.png`): a grid
//! of layers × columns (deepest layer at the top), each cell a colour and a
//! short label; layer numbers on the left, a title, one label line above the
//! grid, two below (a label and a position), and a colour scale with a caption.
//! The callers turn their data into a [`Grid`]; this module lays it out and
//! writes the PNG.

use std::io::BufWriter;
use std::path::Path;

use super::font::{self, glyph, printable};
use crate::error::{Error, ErrorKind, Result};

pub(crate) type Rgb = [u8; 3];

/// Cell size in pixels.
pub(crate) const CELL_W: usize = 60;
pub(crate) const CELL_H: usize = 18;
pub(crate) const LEFT: usize = 60;
pub(crate) const RIGHT: usize = 12;
/// Title line (scale 2) and the label line above the grid.
pub(crate) const TITLE_H: usize = 26;
pub(crate) const NEXT_H: usize = 14;
/// Below the grid: the labels, positions, then the colour scale.
const BELOW_H: usize = 14 + 12 + 16 + 12 + 18;
pub(crate) const MIN_W: usize = 420;
/// Largest image written (pixels).
const MAX_PIXELS: usize = 64 << 20;

pub(crate) const BG: Rgb = [255, 255, 255];
pub(crate) const NO_ROW: Rgb = [226, 226, 232];
pub(crate) const NO_TARGET: Rgb = [180, 180, 190];
pub(crate) const INK: Rgb = [30, 30, 36];
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

/// Where things are, for a grid of `n_layers` layers and `n_cols` columns.
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

    /// Top-left pixel of the cell of layer index `li` (in the grid's layer
    /// list) and column `col`.
    pub(crate) fn cell(&self, li: usize, col: usize) -> (usize, usize) {
        let row = self.n_layers - 1 - li;
        (LEFT + col * CELL_W, TITLE_H + NEXT_H + row * CELL_H)
    }

    pub(crate) fn grid_bottom(&self) -> usize {
        TITLE_H + NEXT_H + self.n_layers * CELL_H
    }
}

/// Pixel size (width, height) of a heatmap of `n_layers` layers and `n_cols`
/// columns (`lens.png`, `sweep.png`).
pub fn heatmap_size(n_layers: usize, n_cols: usize) -> (usize, usize) {
    let l = Layout::new(n_layers, n_cols);
    (l.width, l.height)
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

    fn write_png(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path).map_err(|e| Error::io(path, "creating", e))?;
        let mut enc = png::Encoder::new(BufWriter::new(file), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // Flat colours and text: the strongest compression keeps the files small.
        enc.set_compression(png::Compression::Best);
        enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
        let png_err = |e: png::EncodingError| {
            Error::with_source(ErrorKind::Io, format!("writing {}: {e}", path.display()), e)
        };
        let mut w = enc.write_header().map_err(png_err)?;
        w.write_image_data(&self.px).map_err(png_err)?;
        w.finish().map_err(png_err)
    }
}

/// One cell: a fill and a label (a token piece, shown printable).
#[derive(Debug, Clone)]
pub(crate) enum Cell {
    /// No data (e.g. a row the model does not compute).
    NoRow,
    /// A fill colour and a label.
    Filled(Rgb, String),
}

/// One column: its label above the grid, below it, and its position.
#[derive(Debug, Clone, Default)]
pub(crate) struct Column {
    pub(crate) above: String,
    pub(crate) below: String,
    pub(crate) pos: i64,
}

/// A heatmap to draw: `cells[li][col]` for layer index `li` of `layers`.
pub(crate) struct Grid<'a> {
    /// The title (shown printable, spaces as spaces).
    pub(crate) title: String,
    /// Captions of the label lines above and below the grid (e.g. "next", "in").
    pub(crate) above: &'a str,
    pub(crate) below: &'a str,
    pub(crate) layers: &'a [i64],
    pub(crate) columns: Vec<Column>,
    pub(crate) cells: Vec<Vec<Cell>>,
    /// Right of the colour scale.
    pub(crate) caption: String,
}

impl Grid<'_> {
    /// Draw the grid and write it to `path` as an RGB PNG.
    pub(crate) fn write_png(&self, path: &Path) -> Result<()> {
        let n_cols = self.columns.len();
        let lay = Layout::new(self.layers.len(), n_cols);
        if lay.width.saturating_mul(lay.height) > MAX_PIXELS {
            return Err(Error::invalid(format!(
                "a heatmap of {n_cols} positions × {} layers would be {}×{} pixels, more than {MAX_PIXELS}; ask for fewer layers or positions",
                self.layers.len(),
                lay.width,
                lay.height
            )));
        }
        let mut cv = Canvas::new(lay.width, lay.height);
        cv.text(6, 6, &self.title, 2, lay.width - 12, INK);
        cv.text(6, TITLE_H + 3, self.above, 1, LEFT - 8, MUTED);
        for (li, l) in self.layers.iter().enumerate() {
            let (_, y) = lay.cell(li, 0);
            cv.text(6, y + 2, &format!("L{l}"), 2, LEFT - 8, INK);
        }
        let below = lay.grid_bottom();
        cv.text(6, below + 3, self.below, 1, LEFT - 8, MUTED);
        cv.text(6, below + 17, "pos", 1, LEFT - 8, MUTED);
        for (col, c) in self.columns.iter().enumerate() {
            let (x, _) = lay.cell(0, col);
            let label = |s: &str| printable(s, true);
            cv.text(x + 2, TITLE_H + 3, &label(&c.above), 1, CELL_W - 4, INK);
            cv.text(x + 2, below + 3, &label(&c.below), 1, CELL_W - 4, INK);
            cv.text(x + 2, below + 17, &c.pos.to_string(), 1, CELL_W - 4, MUTED);
            for li in 0..self.layers.len() {
                let (x, y) = lay.cell(li, col);
                match self.cells.get(li).and_then(|r| r.get(col)) {
                    Some(Cell::Filled(color, text)) => {
                        cv.rect(x, y, CELL_W - 1, CELL_H - 1, *color);
                        let lum = 0.299 * color[0] as f64
                            + 0.587 * color[1] as f64
                            + 0.114 * color[2] as f64;
                        let ink = if lum > 140.0 { INK } else { BG };
                        cv.text(x + 3, y + 5, &label(text), 1, CELL_W - 6, ink);
                    }
                    _ => cv.rect(x, y, CELL_W - 1, CELL_H - 1, NO_ROW),
                }
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
            &self.caption,
            1,
            lay.width.saturating_sub(sx + sw + 12),
            MUTED,
        );
        cv.write_png(path)
    }
}
