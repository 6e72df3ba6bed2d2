//! Steering and patching given as raw values (a server request's `vector` and
//! `patch` rows) rather than a control-vector file: the values checked and
//! turned into a [`ControlVector`] or a [`Patch`], with errors that say what
//! is wrong with them. The request's other parts (layers, positions, scale)
//! go through the same checks as the CLI's flags ([`super::Steer::new`],
//! [`super::Positions::parse`]).

use std::collections::BTreeMap;

use super::{ControlVector, Steer};
use crate::error::{Error, Result};
use crate::select::GraphNode;

/// Little-endian f32 values from `bytes` (a whole number of 4-byte values).
pub fn f32_le(bytes: &[u8]) -> Result<Vec<f32>> {
    if bytes.len() % 4 != 0 {
        return Err(Error::invalid(format!(
            "{} bytes is not a whole number of little-endian f32 values (4 bytes each)",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The first non-finite value of `v`, as `(index, value)`.
fn non_finite(v: &[f32]) -> Option<(usize, f32)> {
    v.iter().copied().enumerate().find(|(_, x)| !x.is_finite())
}

impl ControlVector {
    /// A vector of raw values for a model of `n_layer` layers of width
    /// `n_embd`: `n_embd` values (one direction for every layer `1..n_layer`)
    /// or `n_layer × n_embd` (row `N` for layer `N`; row 0 is not used, since
    /// layer 0 is never steered). Any other length, or a non-finite value, is
    /// refused.
    pub fn from_values(values: &[f32], n_layer: usize, n_embd: usize) -> Result<Self> {
        if n_layer < 2 || n_embd == 0 {
            return Err(Error::invalid(format!(
                "a model of {n_layer} layers of width {n_embd} has no steerable layer"
            )));
        }
        if let Some((i, x)) = non_finite(values) {
            return Err(Error::invalid(format!(
                "value {i} is {x}: every value must be a finite number"
            )));
        }
        let mut directions = BTreeMap::new();
        if values.len() == n_embd {
            for l in 1..n_layer {
                directions.insert(l, values.to_vec());
            }
        } else if values.len() == n_layer * n_embd {
            for l in 1..n_layer {
                directions.insert(l, values[l * n_embd..(l + 1) * n_embd].to_vec());
            }
        } else {
            return Err(Error::invalid(format!(
                "{} values: give n_embd = {n_embd} (one direction for every layer) or n_layer × n_embd = {n_layer} × {n_embd} = {} (one per layer)",
                values.len(),
                n_layer * n_embd
            )));
        }
        let v = Self {
            n_embd,
            model_hint: String::new(),
            directions,
        };
        v.validate()?;
        Ok(v)
    }
}

impl ControlVector {
    /// `Σ scaleᵢ × vᵢ`, layer by layer, as llama.cpp's
    /// `common_control_vector_load` sums several `--control-vector(-scaled)`
    /// files (f32 accumulation, in the order given; a layer only some files
    /// have gets theirs). All must be of one width; none: an error.
    pub fn sum(parts: &[(&ControlVector, f32)]) -> Result<Self> {
        let Some((first, _)) = parts.first() else {
            return Err(Error::invalid("no control vector to sum"));
        };
        let mut directions: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
        for (v, scale) in parts {
            super::check_scale(*scale)?;
            if v.n_embd != first.n_embd {
                return Err(Error::invalid(format!(
                    "control vectors of different widths ({} and {}) cannot be summed",
                    first.n_embd, v.n_embd
                )));
            }
            for (&l, d) in &v.directions {
                let acc = directions
                    .entry(l)
                    .or_insert_with(|| vec![0.0; first.n_embd]);
                for (a, &x) in acc.iter_mut().zip(d) {
                    *a += x * scale;
                }
            }
        }
        let v = Self {
            n_embd: first.n_embd,
            model_hint: first.model_hint.clone(),
            directions,
        };
        v.validate()?;
        Ok(v)
    }
}

/// llama-server's `--control-vector-layer-range START END` (inclusive; a
/// bound ≤ 0 means 1 and `n_layer`, as llama.cpp reads it), checked against a
/// model of `n_layer` layers.
pub fn layer_range(start: i32, end: i32, n_layer: usize) -> Result<(i32, i32)> {
    let s = if start <= 0 { 1 } else { start };
    let e = if end <= 0 { n_layer as i32 } else { end };
    if s > e || s as usize >= n_layer.max(1) {
        return Err(Error::invalid(format!(
            "layer range {start} {end}: the model's steerable layers are 1..={} (START <= END)",
            n_layer.saturating_sub(1)
        )));
    }
    Ok((s, e))
}

/// One row replaced while the graph runs: the row of node `tensor` (e.g.
/// `l_out-N`, `attn_out-N`: any node computed once per graph whose rows are
/// `n_embd` wide, see [`check_node`]) of the patched sequence at position
/// `pos` becomes `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    /// The ggml name of the node patched.
    pub tensor: String,
    /// The position whose row is replaced.
    pub pos: i32,
    /// The new row (`n_embd` values).
    pub data: Vec<f32>,
}

impl Patch {
    /// A patch of node `tensor` at `pos` (below `end`: the last position the
    /// sequence can reach, plus one) with `data` (`n_embd` finite values).
    /// Whether the model's graph has such a node is [`check_node`]'s (or
    /// [`Edits::check`]'s) to say. Errors name the value at fault.
    pub fn new(tensor: &str, pos: i64, data: Vec<f32>, n_embd: usize, end: usize) -> Result<Self> {
        // ggml names are at most GGML_MAX_NAME - 1 = 63 bytes.
        if tensor.is_empty()
            || tensor.len() > 63
            || tensor.contains('#')
            || tensor.contains(char::is_whitespace)
        {
            return Err(Error::invalid(format!(
                "tensor '{tensor}' cannot be patched: give a node name such as l_out-6 (see `latent-tap tensors`)"
            )));
        }
        if pos < 0 || pos as u64 >= end as u64 {
            return Err(Error::invalid(format!(
                "pos {pos} is outside the positions this run reaches (0..{end})"
            )));
        }
        if data.len() != n_embd {
            return Err(Error::invalid(format!(
                "data has {} values, not n_embd {n_embd}",
                data.len()
            )));
        }
        if let Some((i, x)) = non_finite(&data) {
            return Err(Error::invalid(format!(
                "data value {i} is {x}: every value must be a finite number"
            )));
        }
        Ok(Self {
            tensor: tensor.to_string(),
            pos: pos as i32,
            data,
        })
    }

    /// What a front end reports of this patch: tensor, position and the
    /// row's norm.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({"tensor": self.tensor, "pos": self.pos, "norm": self.norm()})
    }

    /// The Euclidean norm of the row written.
    pub fn norm(&self) -> f64 {
        self.data
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt()
    }
}

/// Refuse an edit of node `tensor` unless `graph` computes it exactly once per
/// graph compute (a name the graph reuses, such as llama's two `ffn_out-N`,
/// would be ambiguous) with one F32 row of `n_embd` values per token.
pub fn check_node(graph: &[GraphNode], tensor: &str, n_embd: usize) -> Result<()> {
    let mut found = graph.iter().filter(|n| n.ggml_name == tensor);
    let Some(node) = found.next() else {
        return Err(Error::invalid(format!(
            "the model's graph has no node '{tensor}' to edit (`latent-tap tensors` lists them)"
        )));
    };
    if found.next().is_some() {
        return Err(Error::invalid(format!(
            "'{tensor}' names more than one node of the graph, so an edit of it would be ambiguous"
        )));
    }
    // One token's row is the whole node: [n_embd, 1, 1, 1] (not, e.g., the
    // [16, 4] of a per-head view, though its row also holds n_embd values).
    let one_row = node.ne == [n_embd as i64, 1, 1, 1];
    if node.ggml_type != crate::convert::GGML_F32 || node.row_width != Some(n_embd) || !one_row {
        return Err(Error::invalid(format!(
            "'{tensor}' cannot be edited: only F32 nodes with one row of n_embd = {n_embd} values per token can (it has {})",
            match node.row_width {
                Some(w) if one_row || w != n_embd => format!("rows of {w} values, ggml type {}", node.ggml_type),
                Some(_) => format!("shape {:?} per token", node.ne),
                None => "no per-token row".to_string(),
            }
        )));
    }
    Ok(())
}

/// What a run changes in the residual stream while the graph runs: vectors
/// added ([`Steer`]) and rows replaced ([`Patch`]). Empty: nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Edits {
    /// Vectors added to `l_out-N` (or `TENSOR-N`) rows.
    pub steers: Vec<Steer>,
    /// Rows replaced.
    pub patches: Vec<Patch>,
}

impl Edits {
    /// No steer and no patch.
    pub fn is_empty(&self) -> bool {
        self.steers.is_empty() && self.patches.is_empty()
    }

    /// Check every edit against a model of `n_layer` layers of width `n_embd`,
    /// a context of `n_ctx` positions and the model's `graph`: each steer's
    /// width, layers, scale and positions, each patch's width and position,
    /// and every edited node (see [`check_node`]). Nothing runs half-edited.
    pub fn check(
        &self,
        n_layer: usize,
        n_embd: usize,
        n_ctx: usize,
        graph: &[GraphNode],
    ) -> Result<()> {
        for s in &self.steers {
            s.check(n_layer, n_embd, n_ctx)?;
            for l in s.layers() {
                check_node(graph, &s.node(l), n_embd)?;
            }
        }
        for p in &self.patches {
            if p.data.len() != n_embd {
                return Err(Error::invalid(format!(
                    "the patch of {} has {} values, not n_embd {n_embd}",
                    p.tensor,
                    p.data.len()
                )));
            }
            if p.pos < 0 || p.pos as usize >= n_ctx {
                return Err(Error::invalid(format!(
                    "the patch of {} at pos {} is outside the context of {n_ctx} positions",
                    p.tensor, p.pos
                )));
            }
            check_node(graph, &p.tensor, n_embd)
                .map_err(|e| Error::invalid(format!("patch: {}", e.message())))?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn values_make_vectors_and_refuse_bad_ones() {
        let b: Vec<u8> = [1.0f32, -2.5]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(f32_le(&b).unwrap(), [1.0, -2.5]);
        let e = f32_le(&b[..5]).unwrap_err();
        assert!(e.message().contains("5 bytes is not a whole number"), "{e}");

        let v = ControlVector::from_values(&[1.0, 2.0], 3, 2).unwrap();
        assert_eq!(v.directions.keys().copied().collect::<Vec<_>>(), [1, 2]);
        assert_eq!(v.directions[&2], [1.0, 2.0]);
        let v = ControlVector::from_values(&[0.0, 0.0, 1.0, 2.0, 3.0, 4.0], 3, 2).unwrap();
        assert_eq!(v.directions[&1], [1.0, 2.0]);
        assert_eq!(v.directions[&2], [3.0, 4.0]);
        let e = ControlVector::from_values(&[1.0; 3], 3, 2).unwrap_err();
        assert!(
            e.message()
                .contains("3 values: give n_embd = 2 (one direction for every layer) or n_layer × n_embd = 3 × 2 = 6"),
            "{e}"
        );
        let e = ControlVector::from_values(&[1.0, f32::NAN], 3, 2).unwrap_err();
        assert!(e.message().contains("value 1 is NaN"), "{e}");
    }

    #[test]
    fn sums_and_layer_ranges_follow_llama_cpp() {
        let a = ControlVector::from_values(&[1.0, 2.0], 3, 2).unwrap();
        let mut b = a.clone();
        b.directions.remove(&1);
        let s = ControlVector::sum(&[(&a, 2.0), (&b, -0.5)]).unwrap();
        assert_eq!(s.directions[&1], [2.0, 4.0]);
        assert_eq!(s.directions[&2], [1.5, 3.0]);
        let c = ControlVector::from_values(&[1.0; 3], 3, 3).unwrap();
        let e = ControlVector::sum(&[(&a, 1.0), (&c, 1.0)]).unwrap_err();
        assert!(e.message().contains("different widths (2 and 3)"), "{e}");
        assert!(ControlVector::sum(&[(&a, f32::NAN)]).is_err());
        assert_eq!(layer_range(-1, -1, 6).unwrap(), (1, 6));
        assert_eq!(layer_range(2, 4, 6).unwrap(), (2, 4));
        let e = layer_range(4, 2, 6).unwrap_err();
        assert!(
            e.message().contains("layer range 4 2") && e.message().contains("1..=5"),
            "{e}"
        );
        assert!(layer_range(6, 8, 6).is_err());
    }

    /// An F32 node of one-token shape `[2, 1, 1, 1]` and row width `width`.
    pub(crate) fn node(name: &str, width: Option<usize>) -> GraphNode {
        GraphNode {
            name: name.into(),
            ggml_name: name.into(),
            occurrence: 0,
            layer: None,
            ggml_type: crate::convert::GGML_F32,
            ne: [2, 1, 1, 1],
            row_width: width,
        }
    }

    #[test]
    fn patches_are_checked() {
        let p = Patch::new("l_out-2", 3, vec![3.0, 4.0], 2, 10).unwrap();
        assert_eq!((p.tensor.as_str(), p.pos, p.norm()), ("l_out-2", 3, 5.0));
        let err = |t: &str, pos: i64, d: Vec<f32>| {
            Patch::new(t, pos, d, 2, 10)
                .unwrap_err()
                .message()
                .to_string()
        };
        assert!(err("", 0, vec![0.0; 2]).contains("tensor '' cannot be patched"));
        assert!(err("ffn_out-1#2", 0, vec![0.0; 2]).contains("'ffn_out-1#2'"));
        let e = err("l_out-1", 10, vec![0.0; 2]);
        assert!(
            e.contains("pos 10 is outside") && e.contains("0..10"),
            "{e}"
        );
        assert!(err("l_out-1", -1, vec![0.0; 2]).contains("pos -1"));
        assert!(err("l_out-1", 0, vec![0.0; 3]).contains("data has 3 values, not n_embd 2"));
        assert!(err("l_out-1", 0, vec![0.0, f32::INFINITY]).contains("data value 1 is inf"));

        // Against a graph: present once, F32, n_embd-wide rows.
        let mut g = vec![
            node("l_out-1", Some(2)),
            node("attn_out-1", Some(2)),
            node("ffn_out-1", Some(2)),
        ];
        g.push(node("ffn_out-1", Some(2)));
        g.push(node("kq-1", Some(7)));
        g.push(node("cache_k", None));
        let mut half = node("h16", Some(2));
        half.ggml_type = 1;
        g.push(half);
        let mut heads = node("node_24", Some(2));
        heads.ne = [1, 2, 1, 1];
        g.push(heads);
        assert!(check_node(&g, "l_out-1", 2).is_ok() && check_node(&g, "attn_out-1", 2).is_ok());
        let e = |t: &str| check_node(&g, t, 2).unwrap_err().message().to_string();
        assert!(e("l_out-9").contains("has no node 'l_out-9'"));
        assert!(e("ffn_out-1").contains("more than one node"));
        assert!(e("kq-1").contains("rows of 7 values"));
        assert!(e("cache_k").contains("no per-token row"));
        assert!(e("h16").contains("ggml type 1"));
        assert!(
            e("node_24").contains("shape [1, 2, 1, 1] per token"),
            "{}",
            e("node_24")
        );

        let edits = Edits {
            steers: vec![],
            patches: vec![Patch::new("l_out-1", 3, vec![1.0, 2.0], 2, 10).unwrap()],
        };
        assert!(!edits.is_empty() && Edits::default().is_empty());
        assert!(edits.check(4, 2, 8, &g).is_ok());
        let m = edits.check(4, 2, 3, &g).unwrap_err().message().to_string();
        assert!(m.contains("pos 3 is outside the context of 3"), "{m}");
        let m = edits.check(4, 3, 8, &g).unwrap_err().message().to_string();
        assert!(m.contains("2 values, not n_embd 3"), "{m}");
        let mut far = edits.clone();
        far.patches[0].tensor = "l_out-7".into();
        let m = far.check(4, 2, 8, &g).unwrap_err().message().to_string();
        assert!(
            m.starts_with("patch: the model's graph has no node 'l_out-7'"),
            "{m}"
        );
    }
}
