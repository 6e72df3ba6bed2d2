//! Steering and patching given as raw values (a server request's `vector` and
//! `patch` rows) rather than a control-vector file: the values checked and
//! turned into a [`ControlVector`] or a [`Patch`], with errors that say what
//! is wrong with them. The request's other parts (layers, positions, scale)
//! go through the same checks as the CLI's flags ([`super::Steer::new`],
//! [`super::Positions::parse`]).

use std::collections::BTreeMap;

use super::ControlVector;
use crate::error::{Error, Result};

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

/// One row replaced while the graph runs: the `l_out-N` row of the patched
/// sequence at position `pos` becomes `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    /// The layer `N` of the `l_out-N` node patched.
    pub layer: usize,
    /// The position whose row is replaced.
    pub pos: i32,
    /// The new row (`n_embd` values).
    pub data: Vec<f32>,
}

impl Patch {
    /// A patch of tensor `tensor` (`l_out-N`, `N < n_layer`) at `pos` (below
    /// `end`: the last position the sequence can reach, plus one) with `data`
    /// (`n_embd` finite values). Errors name the value at fault.
    pub fn new(
        tensor: &str,
        pos: i64,
        data: Vec<f32>,
        n_layer: usize,
        n_embd: usize,
        end: usize,
    ) -> Result<Self> {
        let layer = tensor
            .strip_prefix("l_out-")
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<usize>().ok())
            .filter(|&l| l < n_layer)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "tensor '{tensor}' cannot be patched: the patchable tensors are l_out-0..l_out-{}",
                    n_layer.saturating_sub(1)
                ))
            })?;
        if pos < 0 || pos as u64 >= end as u64 {
            return Err(Error::invalid(format!(
                "pos {pos} is outside the positions this request reaches (0..{end}: prompt and n_predict)"
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
            layer,
            pos: pos as i32,
            data,
        })
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

#[cfg(test)]
mod tests {
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

    #[test]
    fn patches_are_checked() {
        let p = Patch::new("l_out-2", 3, vec![3.0, 4.0], 4, 2, 10).unwrap();
        assert_eq!((p.layer, p.pos, p.norm()), (2, 3, 5.0));
        let err = |t: &str, pos: i64, d: Vec<f32>| {
            Patch::new(t, pos, d, 4, 2, 10)
                .unwrap_err()
                .message()
                .to_string()
        };
        let e = err("l_out-4", 0, vec![0.0; 2]);
        assert!(
            e.contains("tensor 'l_out-4' cannot be patched") && e.contains("l_out-3"),
            "{e}"
        );
        assert!(err("attn_norm-1", 0, vec![0.0; 2]).contains("'attn_norm-1'"));
        assert!(err("l_out-", 0, vec![0.0; 2]).contains("'l_out-'"));
        let e = err("l_out-1", 10, vec![0.0; 2]);
        assert!(
            e.contains("pos 10 is outside") && e.contains("0..10"),
            "{e}"
        );
        assert!(err("l_out-1", -1, vec![0.0; 2]).contains("pos -1"));
        assert!(err("l_out-1", 0, vec![0.0; 3]).contains("data has 3 values, not n_embd 2"));
        assert!(err("l_out-1", 0, vec![0.0, f32::INFINITY]).contains("data value 1 is inf"));
    }
}
