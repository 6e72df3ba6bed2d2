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
