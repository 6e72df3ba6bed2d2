//! Tuned-lens translators: per-layer affine maps `h ↦ h + A·h + b` read from a
//! safetensors file.
//!
//! Tensor names: `layers.N.weight` (`A`, shape `[n_embd, n_embd]`, row-major,
//! `(A·h)[i] = Σ_j A[i][j]·h[j]`, i.e. torch's `nn.Linear` weight) and
//! `layers.N.bias` (`b`, shape `[n_embd]`); tuned-lens's own
//! `layer_translators.N.weight` / `.bias` are read too. A layer needs both;
//! dtypes F32, F16 or BF16. Every value must be finite.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// One layer's map.
#[derive(Debug, Clone)]
struct Affine {
    a: Vec<f32>,
    b: Vec<f32>,
}

/// The translators of a model, by layer.
#[derive(Debug, Clone, Default)]
pub struct Translators {
    n_embd: usize,
    by_layer: BTreeMap<usize, Affine>,
}

fn refuse(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!("translators {}: {why}", path.display()))
}

/// A layer's weight and bias as read so far.
type Parts = (Option<Vec<f32>>, Option<Vec<f32>>);

/// `(name, dtype, shape, data)` of every tensor of a safetensors file.
type Raw<'a> = Vec<(String, String, Vec<usize>, &'a [u8])>;

fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<Raw<'a>> {
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .ok_or_else(|| refuse(path, "not a safetensors file (shorter than 8 bytes)"))?;
    let end = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| refuse(path, "not a safetensors file (header runs past the end)"))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..end])
        .map_err(|e| refuse(path, format!("bad safetensors header: {e}")))?;
    let data = &bytes[end..];
    let mut out = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |why: &str| refuse(path, format!("tensor '{name}': {why}"));
        let dtype = v["dtype"]
            .as_str()
            .ok_or_else(|| bad("no dtype"))?
            .to_string();
        let shape: Option<Vec<usize>> = v["shape"].as_array().and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect()
        });
        let shape = shape.ok_or_else(|| bad("no shape"))?;
        let off: Option<Vec<usize>> = v["data_offsets"].as_array().and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect()
        });
        let (s, e) = match off.as_deref() {
            Some(&[s, e]) if s <= e && e <= data.len() => (s, e),
            _ => return Err(bad("data_offsets outside the file")),
        };
        out.push((name, dtype, shape, &data[s..e]));
    }
    Ok(out)
}

fn to_f32(path: &Path, name: &str, dtype: &str, data: &[u8]) -> Result<Vec<f32>> {
    let v: Vec<f32> = match dtype {
        "F32" => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        "F16" => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        "BF16" => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        d => {
            return Err(refuse(
                path,
                format!("tensor '{name}' has dtype {d}; use F32, F16 or BF16"),
            ))
        }
    };
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(refuse(
            path,
            format!(
                "tensor '{name}' has a non-finite value ({}) at element {i}",
                v[i]
            ),
        ));
    }
    Ok(v)
}

/// `layers.N.weight` → `(N, true)`, `layer_translators.N.bias` → `(N, false)`.
fn layer_of(name: &str) -> Option<(usize, bool)> {
    let rest = name
        .strip_prefix("layers.")
        .or_else(|| name.strip_prefix("layer_translators."))?;
    let (n, what) = rest.split_once('.')?;
    let is_weight = match what {
        "weight" => true,
        "bias" => false,
        _ => return None,
    };
    Some((n.parse().ok()?, is_weight))
}

impl Translators {
    /// Read and check the translators in `path` for a model of `n_layer`
    /// layers of width `n_embd`. Wrong shapes, non-finite values, unknown
    /// tensor names, layers the model does not have and a weight without its
    /// bias (or the reverse) are refused, naming the tensor.
    pub fn load(path: &Path, n_embd: usize, n_layer: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::with_source(
                ErrorKind::Io,
                format!("cannot read translators {}: {e}", path.display()),
                e,
            )
        })?;
        let mut parts: BTreeMap<usize, Parts> = BTreeMap::new();
        for (name, dtype, shape, data) in parse_safetensors(path, &bytes)? {
            let (layer, is_weight) = layer_of(&name).ok_or_else(|| {
                refuse(
                    path,
                    format!("tensor '{name}' is not a translator (names: layers.N.weight, layers.N.bias)"),
                )
            })?;
            if layer >= n_layer {
                return Err(refuse(
                    path,
                    format!(
                        "tensor '{name}' is for layer {layer}; the model has layers 0..={}",
                        n_layer.saturating_sub(1)
                    ),
                ));
            }
            let want: &[usize] = if is_weight {
                &[n_embd, n_embd]
            } else {
                &[n_embd]
            };
            if shape != want {
                return Err(refuse(
                    path,
                    format!("tensor '{name}' has shape {shape:?}; it must be {want:?} (n_embd {n_embd})"),
                ));
            }
            let elem = if dtype == "F32" { 4 } else { 2 };
            if data.len() != want.iter().product::<usize>() * elem {
                return Err(refuse(
                    path,
                    format!(
                        "tensor '{name}' holds {} bytes, not what {dtype} {shape:?} needs",
                        data.len()
                    ),
                ));
            }
            let v = to_f32(path, &name, &dtype, data)?;
            let slot = parts.entry(layer).or_default();
            if is_weight {
                slot.0 = Some(v);
            } else {
                slot.1 = Some(v);
            }
        }
        let mut by_layer = BTreeMap::new();
        for (layer, p) in parts {
            match p {
                (Some(a), Some(b)) => {
                    by_layer.insert(layer, Affine { a, b });
                }
                (Some(_), None) => {
                    return Err(refuse(
                        path,
                        format!("tensor 'layers.{layer}.weight' has no 'layers.{layer}.bias'"),
                    ))
                }
                (None, _) => {
                    return Err(refuse(
                        path,
                        format!("tensor 'layers.{layer}.bias' has no 'layers.{layer}.weight'"),
                    ))
                }
            }
        }
        Ok(Self { n_embd, by_layer })
    }

    /// The layers that have a translator, increasing.
    pub fn layers(&self) -> Vec<usize> {
        self.by_layer.keys().copied().collect()
    }

    /// Apply layer `layer`'s map to `h` (width `n_embd`) in place; a layer
    /// without a translator leaves `h` as it is.
    pub fn apply(&self, layer: usize, h: &mut [f32]) {
        let Some(t) = self.by_layer.get(&layer) else {
            return;
        };
        let n = self.n_embd;
        if h.len() != n {
            return;
        }
        let x = h.to_vec();
        for (i, out) in h.iter_mut().enumerate() {
            let row = &t.a[i * n..(i + 1) * n];
            let dot: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
            *out += dot + t.b[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of F32 tensors.
    pub(crate) fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape, v) in tensors {
            let s = data.len();
            for x in v {
                data.extend_from_slice(&x.to_le_bytes());
            }
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [s, data.len()]}),
            );
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&data);
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn applies_h_plus_ah_plus_b() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        write(
            &p,
            &[
                ("layers.1.weight", vec![2, 2], vec![1.0, 2.0, 0.0, -1.0]),
                ("layers.1.bias", vec![2], vec![0.5, 0.25]),
            ],
        );
        let t = Translators::load(&p, 2, 3).unwrap();
        assert_eq!(t.layers(), vec![1]);
        let mut h = [1.0, 3.0];
        t.apply(1, &mut h);
        // h + A·h + b = [1+7+0.5, 3-3+0.25]
        assert_eq!(h, [8.5, 0.25]);
        let mut h0 = [1.0, 3.0];
        t.apply(0, &mut h0);
        assert_eq!(h0, [1.0, 3.0]);
    }

    #[test]
    fn refuses_bad_tensors_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let err = |tensors: &[(&str, Vec<usize>, Vec<f32>)]| {
            write(&p, tensors);
            Translators::load(&p, 2, 3)
                .unwrap_err()
                .message()
                .to_string()
        };
        let e = err(&[
            ("layers.0.weight", vec![2, 3], vec![0.0; 6]),
            ("layers.0.bias", vec![2], vec![0.0; 2]),
        ]);
        assert!(e.contains("'layers.0.weight' has shape [2, 3]"), "{e}");
        let e = err(&[
            ("layers.0.weight", vec![2, 2], vec![0.0, f32::NAN, 0.0, 0.0]),
            ("layers.0.bias", vec![2], vec![0.0; 2]),
        ]);
        assert!(
            e.contains("'layers.0.weight' has a non-finite value"),
            "{e}"
        );
        let e = err(&[("layers.0.bias", vec![2], vec![0.0, f32::INFINITY])]);
        assert!(e.contains("'layers.0.bias' has a non-finite value"), "{e}");
        let e = err(&[("layers.7.bias", vec![2], vec![0.0; 2])]);
        assert!(e.contains("'layers.7.bias' is for layer 7"), "{e}");
        let e = err(&[("layers.1.weight", vec![2, 2], vec![0.0; 4])]);
        assert!(e.contains("has no 'layers.1.bias'"), "{e}");
        let e = err(&[("norm.weight", vec![2], vec![0.0; 2])]);
        assert!(e.contains("'norm.weight' is not a translator"), "{e}");
        std::fs::write(&p, b"nonsense").unwrap();
        assert!(Translators::load(&p, 2, 3).is_err());
    }
}
