//! *What* to capture: patterns over ggml node names, compiled once against the
//! model's actual graph into a lookup the eval callback can answer without
//! allocating.

use std::collections::HashMap;

use crate::error::{Error, ErrorKind, Result};

/// One node of the model's compute graph, as seen by a probe decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphNode {
    /// Display name: the ggml name, plus `#2`, `#3`… when the graph reuses a name
    /// within one compute (llama's `ffn_out-N` names two nodes).
    pub name: String,
    /// The raw ggml node name.
    pub ggml_name: String,
    /// Which occurrence of `ggml_name` within one graph compute (0-based).
    pub occurrence: u16,
    /// Layer index parsed from a `-N` suffix, if any.
    pub layer: Option<i32>,
    /// ggml type id.
    pub ggml_type: u32,
    /// Shape seen in the probe (one token).
    pub ne: [i64; 4],
    /// Elements per token row, when the node has a stable per-token row (its
    /// outermost axis grows with the tokens and the rest stays the same); `None`
    /// for nodes such as KV-cache views or attention scores, which are skipped.
    pub row_width: Option<usize>,
}

impl GraphNode {
    /// Classify each node's per-token row from a second probe that decoded two
    /// tokens (`two`, raw as in [`GraphNode::list_from_raw`]), matching nodes by
    /// name and occurrence. Without a second probe every node keeps the one-token
    /// width, and frames whose width differs are skipped at run time.
    pub fn classify_rows(nodes: &mut [GraphNode], two: &[(String, u32, [i64; 4])]) {
        let two = GraphNode::list_from_raw(two);
        for n in nodes.iter_mut() {
            let Some(m) = two.iter().find(|m| m.name == n.name) else {
                n.row_width = None;
                continue;
            };
            let (a, b) = (n.ne, m.ne);
            n.row_width = (1..4usize)
                .find(|&ax| {
                    b[ax] == 2
                        && b[ax + 1..].iter().all(|&x| x == 1)
                        && a[ax..].iter().all(|&x| x == 1)
                        && a[..ax] == b[..ax]
                })
                .and_then(|ax| row_elems(&a[..ax]));
        }
    }

    /// Build the node list from raw `(ggml name, type, shape)` in graph order,
    /// disambiguating repeated names.
    pub fn list_from_raw(raw: &[(String, u32, [i64; 4])]) -> Vec<GraphNode> {
        let mut seen: HashMap<&str, u16> = HashMap::new();
        // With embeddings on (pooling none) llama.cpp renames the `result_norm` tensor
        // to `result_embd_pooled`; keep the name users know.
        let has_norm = raw.iter().any(|(n, _, _)| n == "result_norm");
        raw.iter()
            .filter(|(name, _, _)| !name.is_empty())
            .map(|(name, ty, ne)| {
                let occ = seen.entry(name.as_str()).or_insert(0);
                let occurrence = *occ;
                *occ += 1;
                let display = if occurrence == 0 && name == "result_embd_pooled" && !has_norm {
                    "result_norm".to_string()
                } else if occurrence == 0 {
                    name.clone()
                } else {
                    format!("{name}#{}", occurrence + 1)
                };
                GraphNode {
                    layer: layer_of(name),
                    name: display,
                    ggml_name: name.clone(),
                    occurrence,
                    ggml_type: *ty,
                    ne: *ne,
                    row_width: row_elems(ne),
                }
            })
            .collect()
    }
}

/// Product of positive axis sizes, `None` if one is not positive or it overflows.
fn row_elems(ne: &[i64]) -> Option<usize> {
    ne.iter().try_fold(1usize, |acc, &n| {
        usize::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .and_then(|n| acc.checked_mul(n))
    })
}

/// Parse the layer index from a `base-N` node name. ggml's derived names count
/// too: `Kcur-0 (view)`, `Kcur-0 (view) (permuted)` (suffixes ggml appends to a
/// view, permute, reshape, transpose or copy of `Kcur-0`), and llama.cpp's
/// KV-cache tensors `cache_k_l0` / `cache_v_l0`.
pub fn layer_of(name: &str) -> Option<i32> {
    let mut base = name;
    while let Some(b) = base.strip_suffix(')').and_then(|b| b.rsplit_once(" (")) {
        base = b.0;
    }
    if let Some((_, n)) = base.rsplit_once('-') {
        return n.parse().ok();
    }
    let n = base
        .strip_prefix("cache_k_l")
        .or_else(|| base.strip_prefix("cache_v_l"))?;
    n.parse().ok()
}

/// Which layers to keep: a union of half-open or inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LayerFilter {
    ranges: Vec<(i32, i32)>, // inclusive bounds
}

impl LayerFilter {
    /// Parse `4..12` (half-open, like Rust and Python), `4..=12`, `7`, or a comma list.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(format!(
                "bad layer filter '{s}': use e.g. 4..12, 4..=12, 7 or 0,3,5..8"
            ))
        };
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let r = if let Some((a, b)) = part.split_once("..=") {
                (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                )
            } else if let Some((a, b)) = part.split_once("..") {
                let end: i32 = b.trim().parse().map_err(|_| bad())?;
                (
                    a.trim().parse().map_err(|_| bad())?,
                    end.checked_sub(1).ok_or_else(bad)?,
                )
            } else {
                let n = part.parse().map_err(|_| bad())?;
                (n, n)
            };
            if r.0 > r.1 {
                return Err(bad());
            }
            ranges.push(r);
        }
        if ranges.is_empty() {
            return Err(bad());
        }
        Ok(Self { ranges })
    }

    /// True when `layer` is in one of the ranges.
    pub fn contains(&self, layer: i32) -> bool {
        self.ranges.iter().any(|&(a, b)| (a..=b).contains(&layer))
    }

    /// The smallest and the largest layer named (inclusive).
    pub fn bounds(&self) -> (i32, i32) {
        let lo = self.ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = self.ranges.iter().map(|r| r.1).max().unwrap_or(-1);
        (lo, hi)
    }
}

/// `*` matches any run of characters except `#`; `?` matches one character.
///
/// Runs in O(pattern × name) time: patterns may come from untrusted input
/// (`*a*a*a…b` made a backtracking matcher exponential).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let n = name.as_bytes();
    // reach[i]: the pattern so far can match exactly n[..i].
    let mut reach = vec![false; n.len() + 1];
    let mut next = vec![false; n.len() + 1];
    reach[0] = true;
    for &c in pattern.as_bytes() {
        match c {
            b'*' => {
                let mut on = false;
                for i in 0..=n.len() {
                    on = reach[i] || (on && n[i - 1] != b'#');
                    next[i] = on;
                }
            }
            _ => {
                next[0] = false;
                for i in 0..n.len() {
                    next[i + 1] = reach[i] && (c == b'?' || n[i] == c);
                }
            }
        }
        std::mem::swap(&mut reach, &mut next);
        if !reach.contains(&true) {
            return false;
        }
    }
    reach[n.len()]
}

/// FNV-1a: node names are short, and SipHash's DoS resistance buys nothing for
/// names that come from the model's own graph; this keeps the ask phase cheap.
#[derive(Default, Clone, Copy, Debug)]
pub struct NameHasher(u64);

impl std::hash::Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type NameMap = HashMap<Box<[u8]>, usize, std::hash::BuildHasherDefault<NameHasher>>;

/// A tensor chosen for capture.
#[derive(Debug, Clone)]
pub struct SelectedTensor {
    /// Display name (also the key in output files).
    pub name: String,
    /// Layer, if the name carries one.
    pub layer: Option<i32>,
    /// ggml type id seen in the probe.
    pub ggml_type: u32,
    /// Probe shape (one token).
    pub ne: [i64; 4],
    /// Elements per row ([`GraphNode::row_width`]); frames of another width are
    /// skipped and counted as unaligned.
    pub row_width: usize,
}

/// A tensor a glob matched but that cannot be captured row by row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SkippedTensor {
    /// Display name.
    pub name: String,
    /// Why: `"type"` (not F32/F16/BF16), `"no per-token row"`, `"frame too large"`.
    pub reason: &'static str,
}

/// Patterns compiled against a graph: the ordered list of selected tensors and
/// a name → slot map the callback consults.
#[derive(Debug, Clone)]
pub struct Selection {
    tensors: Vec<SelectedTensor>,
    skipped: Vec<SkippedTensor>,
    // ggml name -> slot; slot -> tensor index per occurrence (u32::MAX: not selected).
    slots: NameMap,
    by_occurrence: Vec<Vec<u32>>,
}

/// Sentinel in `by_occurrence` for an occurrence that is not captured.
const NOT_SELECTED: u32 = u32::MAX;

impl Selection {
    /// Compile comma-separated `patterns` (and an optional layer filter) against
    /// `nodes`. A pattern that matches nothing is an error listing close names.
    pub fn compile(
        patterns: &[String],
        layers: Option<&LayerFilter>,
        nodes: &[GraphNode],
    ) -> Result<Self> {
        Self::compile_fitting(patterns, layers, nodes, &|_| true)
    }

    /// [`Selection::compile`], skipping (and listing in [`Selection::skipped`]) the
    /// nodes a glob matched that cannot be captured: a type other than F32/F16/BF16,
    /// no stable per-token row, or a frame `fits` refuses. A node named exactly
    /// (no `*`/`?`) that cannot be captured is an error, except for `fits`, which
    /// is left to the tap (it reports the sizes).
    pub fn compile_fitting(
        patterns: &[String],
        layers: Option<&LayerFilter>,
        nodes: &[GraphNode],
        fits: &dyn Fn(&GraphNode) -> bool,
    ) -> Result<Self> {
        let pats: Vec<&str> = patterns
            .iter()
            .flat_map(|p| p.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if pats.is_empty() {
            return Err(Error::invalid("no tensor pattern given (e.g. 'l_out-*')"));
        }
        let mut chosen = vec![false; nodes.len()];
        for pat in &pats {
            let mut hit = false;
            for (i, n) in nodes.iter().enumerate() {
                if glob_match(pat, &n.name) {
                    hit = true;
                    chosen[i] = true;
                }
            }
            if !hit {
                return Err(Error::new(
                    ErrorKind::NoMatch,
                    format!(
                        "pattern '{pat}' matches no tensor in this model's graph; close names: {}",
                        close_names(pat, nodes).join(", ")
                    ),
                ));
            }
        }
        if let Some(f) = layers {
            for (i, n) in nodes.iter().enumerate() {
                if n.layer.is_some_and(|l| !f.contains(l)) {
                    chosen[i] = false;
                }
            }
            if !chosen.iter().any(|&c| c) {
                let n_layer = nodes
                    .iter()
                    .filter_map(|n| n.layer)
                    .max()
                    .map_or(0, |l| l + 1);
                return Err(Error::new(
                    ErrorKind::NoMatch,
                    format!("the layer filter leaves no tensor selected (this model has layers 0..{n_layer})"),
                ));
            }
        }
        let mut sel = Selection::empty();
        for (n, _) in nodes.iter().zip(&chosen).filter(|(_, &c)| c) {
            let exact = pats.iter().any(|p| *p == n.name);
            let reason = if !matches!(n.ggml_type, 0 | 1 | 30) {
                if exact {
                    return Err(Error::invalid(format!(
                        "tensor '{}' has ggml type {}; only F32, F16 and BF16 nodes can be captured",
                        n.name, n.ggml_type
                    )));
                }
                Some("type")
            } else if n.row_width.is_none() {
                if exact {
                    return Err(Error::invalid(format!(
                        "tensor '{}' (shape {:?}) has no stable per-token row (e.g. a KV-cache view or attention scores), so it cannot be captured",
                        n.name, n.ne
                    )));
                }
                Some("no per-token row")
            } else if !exact && !fits(n) {
                Some("frame too large")
            } else {
                None
            };
            if let Some(reason) = reason {
                sel.skipped.push(SkippedTensor {
                    name: n.name.clone(),
                    reason,
                });
                continue;
            }
            let next = sel.slots.len();
            let slot = *sel
                .slots
                .entry(n.ggml_name.as_bytes().into())
                .or_insert(next);
            if slot == sel.by_occurrence.len() {
                sel.by_occurrence.push(Vec::new());
            }
            let occ = &mut sel.by_occurrence[slot];
            let o = n.occurrence as usize;
            if occ.len() <= o {
                occ.resize(o + 1, NOT_SELECTED);
            }
            occ[o] = sel.tensors.len() as u32;
            sel.tensors.push(SelectedTensor {
                name: n.name.clone(),
                layer: n.layer,
                ggml_type: n.ggml_type,
                ne: n.ne,
                row_width: n.row_width.unwrap_or(0),
            });
        }
        if sel.tensors.is_empty() && sel.skipped.iter().any(|s| s.reason == "frame too large") {
            // Nothing fits: keep them all, so the tap reports the sizes involved.
            return Self::compile(patterns, layers, nodes);
        }
        if sel.tensors.is_empty() {
            let names: Vec<String> = sel
                .skipped
                .iter()
                .take(6)
                .map(|s| format!("{} ({})", s.name, s.reason))
                .collect();
            return Err(Error::new(
                ErrorKind::NoMatch,
                format!(
                    "the patterns select only tensors that cannot be captured per token: {}{}",
                    names.join(", "),
                    if sel.skipped.len() > 6 { ", …" } else { "" }
                ),
            ));
        }
        Ok(sel)
    }

    /// A selection of nothing (token events only).
    pub fn empty() -> Self {
        Self {
            tensors: Vec::new(),
            skipped: Vec::new(),
            slots: NameMap::default(),
            by_occurrence: Vec::new(),
        }
    }

    /// Selected tensors, in graph order.
    pub fn tensors(&self) -> &[SelectedTensor] {
        &self.tensors
    }

    /// Nodes the patterns matched that are not captured, with the reason.
    pub fn skipped(&self) -> &[SkippedTensor] {
        &self.skipped
    }

    /// Number of distinct ggml names involved (size of the per-compute counters).
    pub fn n_slots(&self) -> usize {
        self.by_occurrence.len()
    }

    /// Slot of a raw ggml name, if any selected tensor uses it. Allocation-free.
    #[inline]
    pub fn slot(&self, ggml_name: &[u8]) -> Option<usize> {
        self.slots.get(ggml_name).copied()
    }

    /// Tensor index for the `occurrence`-th node named by `slot` in one compute.
    #[inline]
    pub fn tensor_at(&self, slot: usize, occurrence: usize) -> Option<u32> {
        self.by_occurrence[slot]
            .get(occurrence)
            .copied()
            .filter(|&t| t != NOT_SELECTED)
    }
}

/// Up to six node names closest to `pat` by edit distance.
fn close_names(pat: &str, nodes: &[GraphNode]) -> Vec<String> {
    let stem: String = pat.chars().filter(|c| !matches!(c, '*' | '?')).collect();
    let mut scored: Vec<(usize, &str)> = nodes
        .iter()
        .map(|n| (edit_distance(&stem, &n.name), n.name.as_str()))
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored
        .into_iter()
        .take(6)
        .map(|(_, n)| n.to_string())
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_semantics_and_speed() {
        for (p, n, want) in [
            ("l_out-*", "l_out-3", true),
            ("l_out-*", "l_out-", true),
            ("l_out-?", "l_out-12", false),
            ("ffn_out-*", "ffn_out-2#2", false),
            ("ffn_out-*#2", "ffn_out-2#2", true),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("?", "#", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY#c", false),
            ("*-1?", "attn_norm-12", true),
        ] {
            assert_eq!(glob_match(p, n), want, "{p} ~ {n}");
        }
        // A backtracking matcher took ages on this (the `select` fuzz target
        // reports `***************C` as a slow unit against it); the DP answers at once.
        let p = "*a".repeat(40) + "b";
        let n = "a".repeat(200);
        let t0 = std::time::Instant::now();
        assert!(!glob_match(&p, &n));
        assert!(t0.elapsed().as_secs() < 1);
    }

    #[test]
    fn layer_of_reads_derived_and_cache_names() {
        for (name, want) in [
            ("l_out-3", Some(3)),
            ("attn_norm-12", Some(12)),
            ("Kcur-0 (view)", Some(0)),
            ("Kcur-7 (view) (permuted)", Some(7)),
            ("cache_k_l0 (view)", Some(0)),
            ("cache_v_l17 (view) (permuted)", Some(17)),
            ("cache_k_l4", Some(4)),
            ("node_12 (view)", None),
            ("node_12 (view) (permuted)", None),
            ("result_norm", None),
            ("inp_scaled", None),
            ("cache_k_lx", None),
            ("l_out-", None),
            (" (view)", None),
            ("", None),
        ] {
            assert_eq!(layer_of(name), want, "{name}");
        }
    }

    #[test]
    fn layer_filter_bounds_do_not_overflow() {
        // `0..i32::MIN` used to compute `i32::MIN - 1`.
        assert!(LayerFilter::parse("0..-2147483648").is_err());
        assert!(LayerFilter::parse("-5..=-2147483648").is_err());
        let f = LayerFilter::parse("-2147483648..=2147483647").unwrap();
        assert!(f.contains(i32::MIN) && f.contains(i32::MAX));
    }

    fn nodes() -> Vec<GraphNode> {
        let mut raw = Vec::new();
        for l in 0..4 {
            for base in ["attn_norm", "attn_out", "ffn_out", "ffn_out", "l_out"] {
                raw.push((format!("{base}-{l}"), 0u32, [8i64, 1, 1, 1]));
            }
        }
        raw.push(("result_norm".to_string(), 0, [8, 1, 1, 1]));
        raw.push(("result_output".to_string(), 0, [32, 1, 1, 1]));
        GraphNode::list_from_raw(&raw)
    }

    #[test]
    fn glob_and_duplicates() {
        assert!(glob_match("l_out-*", "l_out-12"));
        assert!(!glob_match("ffn_out-*", "ffn_out-3#2"));
        assert!(glob_match("ffn_out-*#*", "ffn_out-3#2"));
        assert!(glob_match("attn_out-?", "attn_out-3"));
        assert!(!glob_match("attn_out-?", "attn_out-13"));
        let n = nodes();
        assert_eq!(n.iter().filter(|n| n.name == "ffn_out-2#2").count(), 1);
    }

    #[test]
    fn compile_selects_in_graph_order_with_layers() {
        let f = LayerFilter::parse("1..3").unwrap();
        let s = Selection::compile(&["l_out-*,result_norm".into()], Some(&f), &nodes()).unwrap();
        let names: Vec<_> = s.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["l_out-1", "l_out-2", "result_norm"]);
        let slot = s.slot(b"l_out-2").unwrap();
        assert_eq!(s.tensor_at(slot, 0), Some(1));
        assert_eq!(s.slot(b"l_out-0"), None);
    }

    #[test]
    fn duplicate_names_map_by_occurrence() {
        let s = Selection::compile(&["ffn_out-1#2".into()], None, &nodes()).unwrap();
        let slot = s.slot(b"ffn_out-1").unwrap();
        assert_eq!(s.tensor_at(slot, 0), None);
        assert_eq!(s.tensor_at(slot, 1), Some(0));
    }

    #[test]
    fn no_match_lists_close_names() {
        let e = Selection::compile(&["l_outt-3".into()], None, &nodes()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoMatch);
        assert!(e.message().contains("l_out-3"), "{}", e.message());
    }

    #[test]
    fn layer_filter_forms() {
        let f = LayerFilter::parse("0,4..6,9..=10").unwrap();
        let got: Vec<i32> = (0..12).filter(|&l| f.contains(l)).collect();
        assert_eq!(got, [0, 4, 5, 9, 10]);
        assert!(LayerFilter::parse("5..2").is_err());
        assert!(LayerFilter::parse("0..-2147483648").is_err());
        assert!(LayerFilter::parse("..").is_err());
        assert!(LayerFilter::parse("x").is_err());
    }

    #[test]
    fn nodes_without_a_token_row_are_skipped_by_globs_and_refused_by_name() {
        // One-token probe, then two tokens: l_out grows along axis 1; the KV view
        // keeps its shape; kq's token axis is not outermost; inp_pos is I32.
        let one: Vec<(String, u32, [i64; 4])> = vec![
            ("inp_pos".into(), 26, [1, 1, 1, 1]),
            ("k-0".into(), 0, [16, 256, 2, 1]),
            ("kq-0".into(), 0, [256, 1, 2, 1]),
            ("l_out-0".into(), 0, [8, 1, 1, 1]),
        ];
        let two: Vec<(String, u32, [i64; 4])> = vec![
            ("inp_pos".into(), 26, [2, 1, 1, 1]),
            ("k-0".into(), 0, [16, 256, 2, 1]),
            ("kq-0".into(), 0, [256, 2, 2, 1]),
            ("l_out-0".into(), 0, [8, 2, 1, 1]),
        ];
        let mut n = GraphNode::list_from_raw(&one);
        GraphNode::classify_rows(&mut n, &two);
        let w: Vec<_> = n.iter().map(|n| n.row_width).collect();
        assert_eq!(w, [None, None, None, Some(8)]);
        let s = Selection::compile(&["*".into()], None, &n).unwrap();
        let names: Vec<_> = s.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["l_out-0"]);
        assert_eq!(s.tensors()[0].row_width, 8);
        let skipped: Vec<_> = s
            .skipped()
            .iter()
            .map(|t| (t.name.as_str(), t.reason))
            .collect();
        assert_eq!(
            skipped,
            [
                ("inp_pos", "type"),
                ("k-0", "no per-token row"),
                ("kq-0", "no per-token row")
            ]
        );
        let e = Selection::compile(&["kq-0".into()], None, &n).unwrap_err();
        assert!(e.message().contains("no stable per-token row"), "{e}");
        let e = Selection::compile(&["k*".into()], None, &n).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoMatch);
        assert!(e.message().contains("k-0 (no per-token row)"), "{e}");
        // A glob skips what does not fit; an exact name is left to the tap's check.
        let s = Selection::compile_fitting(&["l_out-*,inp_pos".into()], None, &n, &|n| {
            n.name != "l_out-0"
        });
        assert!(s.is_err(), "inp_pos named exactly has an unsupported type");
        let s = Selection::compile_fitting(&["l_out-0".into()], None, &n, &|_| false).unwrap();
        assert_eq!(s.tensors().len(), 1);
        // When nothing fits, nothing is skipped: the tap's error names the sizes.
        let s = Selection::compile_fitting(&["l_out-*".into()], None, &n, &|_| false).unwrap();
        assert_eq!(s.tensors().len(), 1);
        assert!(s.skipped().is_empty());
    }

    #[test]
    fn layer_filter_error_names_the_real_range() {
        let f = LayerFilter::parse("7..9").unwrap();
        let e = Selection::compile(&["l_out-*".into()], Some(&f), &nodes()).unwrap_err();
        assert!(e.message().contains("layers 0..4"), "{e}");
    }
}
