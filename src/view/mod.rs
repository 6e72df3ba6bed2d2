//! What people see of the logit lens: the web page that `latent-tap serve`
//! answers at `GET /` (live, over the public `lens` request field), the same page
//! with the data inline (`lens.html`, no server needed) and a heatmap image
//! (`lens.png`); also the picture of an activation-patching sweep
//! (`sweep.png`, [`sweep_png`]), drawn by the same grid code.
//!
//! The page is three embedded assets (`assets/index.html`, `view.css`,
//! `view.js`: plain HTML, CSS and JavaScript, no build step, nothing fetched
//! from elsewhere) put together into one HTML document.
//!
//! The data of [`static_html`] and [`heatmap_png`] is
//! `{"prompt": "...", "tokens": [{"id", "piece", "pos"}], "lens": {...}}`, the
//! `lens` object being the one `serve` answers (docs/PROTOCOL.md).

mod font;
mod grid;
mod heatmap;
mod sweep;

use serde_json::Value;

pub use grid::heatmap_size;
pub use heatmap::heatmap_png;
pub use sweep::sweep_png;

const TEMPLATE: &str = include_str!("assets/index.html");
const CSS: &str = include_str!("assets/view.css");
const JS: &str = include_str!("assets/view.js");
const CSS_MARK: &str = "/*VIEW_CSS*/";
const JS_MARK: &str = "/*VIEW_JS*/";
const DATA_MARK: &str = "<!--LENS_DATA-->";

/// The page with `data` (an HTML fragment) where the template has its data mark.
fn assemble(data: &str) -> String {
    let mut out = String::with_capacity(TEMPLATE.len() + CSS.len() + JS.len() + data.len());
    let mut rest = TEMPLATE;
    for (mark, with) in [(CSS_MARK, CSS), (DATA_MARK, data), (JS_MARK, JS)] {
        // The marks are in the template in this order (a unit test checks).
        let (before, after) = rest.split_once(mark).unwrap_or((rest, ""));
        out.push_str(before);
        out.push_str(with);
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The live page `serve` answers at `GET /`: it asks the server for everything
/// (`/props`, `/tokenize`, `/completion` with `"lens"`).
pub fn page() -> String {
    assemble("")
}

/// The page with `data` inline in `<script type="application/json"
/// id="lens-data">`: a self-contained file that renders without a server (and
/// never calls one). `data` is `{"prompt", "tokens", "lens"}` (module docs).
pub fn static_html(data: &Value) -> String {
    let json = script_safe_json(data);
    assemble(&format!(
        "<script type=\"application/json\" id=\"lens-data\">{json}</script>"
    ))
}

/// `v` as JSON that cannot end or confuse the `<script>` element it sits in:
/// `<`, `>`, `&` and U+2028/U+2029 become `\uXXXX` escapes (they only occur
/// inside JSON strings, where those escapes mean the same characters).
fn script_safe_json(v: &Value) -> String {
    let s = serde_json::to_string(v).unwrap_or_else(|_| "null".into());
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn marks_in_order_and_assets_inline() {
        let a = TEMPLATE.find(CSS_MARK).unwrap();
        let b = TEMPLATE.find(DATA_MARK).unwrap();
        let c = TEMPLATE.find(JS_MARK).unwrap();
        assert!(a < b && b < c);
        let p = page();
        assert!(p.contains("function selectColumn"));
        assert!(p.contains("#grid thead th"));
        assert!(!p.contains(CSS_MARK) && !p.contains(JS_MARK) && !p.contains(DATA_MARK));
        assert!(!p.contains("id=\"lens-data\""));
        // The inline assets cannot end their own elements, and nothing is fetched
        // from elsewhere.
        assert!(!CSS.contains("</style"));
        assert!(!JS.to_ascii_lowercase().contains("</script"));
        assert!(!JS.contains("<!--"));
        for s in [TEMPLATE, CSS, JS] {
            assert!(!s.contains("http://") && !s.contains("https://"));
        }
    }

    #[test]
    fn static_html_escapes_hostile_pieces() {
        let evil = "</script><img src=x onerror=alert(1)>&\u{2028}";
        let data = json!({
            "prompt": evil,
            "tokens": [{"id": 1, "piece": evil, "pos": 0}],
            "lens": {"layers": [0], "n_vocab": 4, "rows": [{"pos": 0, "step": 0, "seq": 0,
                "target": 2, "target_piece": evil,
                "cells": [{"top": [{"id": 2, "piece": evil, "logprob": -0.5}],
                           "entropy": 1.0, "target_logprob": -0.5, "target_rank": 0, "kl": null}]}]}
        });
        let html = static_html(&data);
        let start = html.find("id=\"lens-data\">").unwrap() + "id=\"lens-data\">".len();
        let end = start + html[start..].find("</script>").unwrap();
        let inline = &html[start..end];
        // The data element ends exactly where the data does …
        assert!(!inline.contains('<') && !inline.contains('>') && !inline.contains('&'));
        assert!(!inline.contains('\u{2028}'));
        assert!(inline.contains(
            "\\u003c/script\\u003e\\u003cimg src=x onerror=alert(1)\\u003e\\u0026\\u2028"
        ));
        // … and reads back as the same value.
        let back: Value = serde_json::from_str(inline).unwrap();
        assert_eq!(back, data);
        // No hostile markup anywhere in the file.
        assert!(!html.contains("<img"));
        // One data element, then the page's own script.
        assert_eq!(html.matches("id=\"lens-data\"").count(), 1);
        assert!(html.find("id=\"lens-data\"").unwrap() < html.rfind("<script>").unwrap());
    }
}
