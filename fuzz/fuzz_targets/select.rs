//! Capture patterns, layer filters and selection compiling: never panic, and
//! `glob_match` agrees with a plain backtracking matcher on short inputs.
#![no_main]

use latent_tap_fuzz::select::{glob_match, GraphNode, LayerFilter, Selection};
use libfuzzer_sys::fuzz_target;

/// The reference: `*` is any run without `#`, `?` one byte (exponential, so
/// only run on short inputs).
fn reference(p: &[u8], n: &[u8]) -> bool {
    match p.split_first() {
        None => n.is_empty(),
        Some((b'*', rest)) => {
            for i in 0..=n.len() {
                if reference(rest, &n[i..]) {
                    return true;
                }
                if i < n.len() && n[i] == b'#' {
                    break;
                }
            }
            false
        }
        Some((b'?', rest)) => !n.is_empty() && reference(rest, &n[1..]),
        Some((c, rest)) => n.first() == Some(c) && reference(rest, &n[1..]),
    }
}

/// A llama-like graph: per layer a few nodes, `ffn_out-N` twice.
fn graph() -> Vec<GraphNode> {
    let mut raw = vec![("inp_embd".to_string(), 0u32, [64i64, 1, 1, 1])];
    for l in 0..4 {
        for base in ["attn_norm", "Qcur", "kq", "ffn_out", "ffn_out", "l_out"] {
            raw.push((
                format!("{base}-{l}"),
                if base == "kq" { 1 } else { 0 },
                [64, 1, 1, 1],
            ));
        }
    }
    raw.push(("result_norm".into(), 0, [64, 1, 1, 1]));
    raw.push(("result_output".into(), 12, [260, 1, 1, 1]));
    GraphNode::list_from_raw(&raw)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (pattern, layers, name) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let filter = LayerFilter::parse(layers).ok();
    if let Some(f) = &filter {
        let _ = f.contains(0);
    }
    let got = glob_match(pattern, name);
    if pattern.len() <= 12 && name.len() <= 24 {
        assert_eq!(
            got,
            reference(pattern.as_bytes(), name.as_bytes()),
            "{pattern:?} ~ {name:?}"
        );
    }
    let nodes = graph();
    if let Ok(sel) = Selection::compile(&[pattern.to_string()], filter.as_ref(), &nodes) {
        assert!(!sel.tensors().is_empty());
        for n in &nodes {
            if let Some(slot) = sel.slot(n.ggml_name.as_bytes()) {
                let _ = sel.tensor_at(slot, n.occurrence as usize);
            }
        }
    }
});
