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
}

impl GraphNode {
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
                }
            })
            .collect()
    }
}

/// Parse the layer index from a `base-N` node name.
pub fn layer_of(name: &str) -> Option<i32> {
    let (_, n) = name.rsplit_once('-')?;
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
#[derive(Default, Clone, Copy)]
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
}

/// Patterns compiled against a graph: the ordered list of selected tensors and
/// a name → slot map the callback consults.
#[derive(Debug, Clone)]
pub struct Selection {
    tensors: Vec<SelectedTensor>,
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
        let pats: Vec<&str> = patterns
            .iter()
            .flat_map(|p| p.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if pats.is_empty() {
            return Err(Error::invalid(
                "no tensor pattern given (e.g. --tensors 'l_out-*')",
            ));
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
                        "pattern '{pat}' matches no tensor in this model's graph; close names: {} (run `latent-tap tensors` for the full list)",
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
                return Err(Error::new(
                    ErrorKind::NoMatch,
                    "the layer filter leaves no tensor selected (this model has layers 0..n_layer)",
                ));
            }
        }
        let mut sel = Selection {
            tensors: Vec::new(),
            slots: NameMap::default(),
            by_occurrence: Vec::new(),
        };
        for (n, _) in nodes.iter().zip(&chosen).filter(|(_, &c)| c) {
            if !matches!(n.ggml_type, 0 | 1 | 30) {
                return Err(Error::invalid(format!(
                    "tensor '{}' has ggml type {}; only F32, F16 and BF16 nodes can be captured",
                    n.name, n.ggml_type
                )));
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
            });
        }
        Ok(sel)
    }

    /// A selection of nothing (token events only).
    pub fn empty() -> Self {
        Self {
            tensors: Vec::new(),
            slots: NameMap::default(),
            by_occurrence: Vec::new(),
        }
    }

    /// Selected tensors, in graph order.
    pub fn tensors(&self) -> &[SelectedTensor] {
        &self.tensors
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
        assert!(LayerFilter::parse("x").is_err());
    }
}
