//! Control vectors in llama.cpp's GGUF format, and the mean-difference method
//! that makes them from residual-stream rows.
//!
//! The format (what llama.cpp's `cvector-generator` writes and
//! `--control-vector` reads): `general.architecture = "controlvector"`,
//! `controlvector.model_hint` (the model's architecture),
//! `controlvector.layer_count` (i32: how many directions), and one F32 tensor
//! `direction.N` of `n_embd` values per layer `N ≥ 1`. llama.cpp adds
//! `direction.N` (times its strength) to the output of block `N`, the
//! `l_out-N` row; layer 0 is never steered.
//!
//! The `mean` method of `cvector-generator`, reproduced by [`MeanDifference`]:
//! each positive prompt is paired with the negative prompt of the same index,
//! the shorter of the two padded to the same length; per layer, the row
//! differences (positive − negative, position by position; rows that are all
//! zero left out) are averaged and the mean scaled to unit length; the
//! direction made from the rows of `l_out-L` is stored as `direction.(L+1)`
//! (llama.cpp's convention: the last layer's rows make no direction).
//!
//! Applying a vector: [`Steer`] (which layers, scale, [`Positions`], sequences),
//! checked against the model before anything runs; the main crate's eval
//! callback adds it to the `l_out-N` rows.

mod edit;
pub mod request;
mod spec;
pub use edit::{check_node, f32_le, layer_range, Edits, Patch};
pub use spec::{check_family, check_scale, layer_list, Positions, Steer, STEER_TENSOR};

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::gguf::write::{write_f32_gguf, Value, GGML_TYPE_F32};
use crate::gguf::{self, Value as Kv};

/// Per-layer steering directions, keyed by the layer `N` whose output
/// (`l_out-N`) they are added to.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlVector {
    /// Row width.
    pub n_embd: usize,
    /// `controlvector.model_hint`: the architecture it was made for.
    pub model_hint: String,
    /// Layer → direction (`n_embd` values), layers ≥ 1.
    pub directions: BTreeMap<usize, Vec<f32>>,
}

impl ControlVector {
    /// Check the invariants: at least one direction, layers ≥ 1, every
    /// direction `n_embd` wide and finite.
    pub fn validate(&self) -> Result<()> {
        if self.directions.is_empty() {
            return Err(Error::invalid(
                "a control vector needs at least one direction",
            ));
        }
        for (&l, d) in &self.directions {
            if l == 0 {
                return Err(Error::invalid(
                    "direction.0: layer 0 is never steered (llama.cpp refuses it)",
                ));
            }
            if d.len() != self.n_embd {
                return Err(Error::invalid(format!(
                    "direction.{l} has {} values, not n_embd {}",
                    d.len(),
                    self.n_embd
                )));
            }
            if d.iter().any(|x| !x.is_finite()) {
                return Err(Error::invalid(format!(
                    "direction.{l} holds a non-finite value"
                )));
            }
        }
        Ok(())
    }

    /// Write it as llama.cpp's control-vector GGUF.
    pub fn write(&self, path: &Path) -> Result<()> {
        self.validate()?;
        let io = |e: std::io::Error| {
            Error::new(ErrorKind::Io, format!("writing {}: {e}", path.display()))
        };
        let count = i32::try_from(self.directions.len())
            .map_err(|_| Error::invalid("too many directions"))?;
        let kvs = [
            ("general.architecture", Value::Str("controlvector")),
            ("controlvector.model_hint", Value::Str(&self.model_hint)),
            ("controlvector.layer_count", Value::I32(count)),
        ];
        let tensors: Vec<(String, Vec<usize>, &[f32])> = self
            .directions
            .iter()
            .map(|(l, d)| (format!("direction.{l}"), vec![self.n_embd], d.as_slice()))
            .collect();
        // Whole or not at all: a temporary file beside it, renamed into place.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        let written = File::create(&tmp).and_then(|f| {
            let mut w = BufWriter::new(f);
            write_f32_gguf(&mut w, &kvs, &tensors)?;
            w.into_inner()?.sync_all()
        });
        match written.and_then(|()| std::fs::rename(&tmp, path)) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(io(e))
            }
        }
    }

    /// Read a control-vector GGUF (as llama.cpp does: `direction.N` F32
    /// tensors, N ≥ 1, all of one width). Anything else is refused with the
    /// file and the reason.
    pub fn read(path: &Path) -> Result<Self> {
        let bad = |why: String| {
            Error::invalid(format!(
                "{} is not a usable control vector: {why}",
                path.display()
            ))
        };
        let mut f = File::open(path).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("cannot open control vector {}: {e}", path.display()),
            )
        })?;
        let len = f
            .metadata()
            .map_err(|e| Error::new(ErrorKind::Io, format!("{}: {e}", path.display())))?
            .len();
        let g = gguf::parse(&mut f, len).map_err(|r| bad(r.0))?;
        let model_hint = match g.get("controlvector.model_hint") {
            Some(Kv::Str(Some(s))) => s.clone(),
            _ => String::new(),
        };
        let mut directions = BTreeMap::new();
        let mut n_embd = None;
        for t in &g.tensors {
            let layer = t
                .name
                .strip_prefix("direction.")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| bad(format!("tensor '{}' is not direction.N", t.name)))?;
            if t.ty != GGML_TYPE_F32 {
                return Err(bad(format!("{} is of ggml type {}, not F32", t.name, t.ty)));
            }
            let n: u64 = t.ne.iter().product();
            let n = usize::try_from(n).map_err(|_| bad(format!("{} is too large", t.name)))?;
            if *n_embd.get_or_insert(n) != n {
                return Err(bad(format!(
                    "{} has {n} values, the directions before it {}",
                    t.name,
                    n_embd.unwrap_or(0)
                )));
            }
            let at = g.data_start.saturating_add(t.offset);
            if at.saturating_add(4 * n as u64) > len {
                return Err(bad(format!("{} lies past the end of the file", t.name)));
            }
            let mut bytes = vec![0u8; 4 * n];
            f.seek(SeekFrom::Start(at))
                .and_then(|_| f.read_exact(&mut bytes))
                .map_err(|e| bad(format!("reading {}: {e}", t.name)))?;
            let d: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if directions.insert(layer, d).is_some() {
                return Err(bad(format!("{} appears twice", t.name)));
            }
        }
        let v = Self {
            n_embd: n_embd.unwrap_or(0),
            model_hint,
            directions,
        };
        v.validate().map_err(|e| bad(e.message().to_string()))?;
        Ok(v)
    }
}

/// Sums of per-layer row differences, for the `mean` method.
#[derive(Debug, Clone)]
pub struct MeanDifference {
    n_embd: usize,
    /// Source layer (`l_out-L`) → (Σ difference rows, how many rows).
    sums: BTreeMap<usize, (Vec<f64>, u64)>,
}

impl MeanDifference {
    /// Nothing added yet; rows are `n_embd` wide.
    pub fn new(n_embd: usize) -> Self {
        Self {
            n_embd,
            sums: BTreeMap::new(),
        }
    }

    /// Add the difference `positive − negative` of one pair's rows of
    /// `l_out-layer`, position by position (both `[rows, n_embd]` row-major and
    /// of equal length: the pair was padded to one length). All-zero
    /// difference rows are left out, as in `cvector-generator`.
    pub fn add(&mut self, layer: usize, positive: &[f32], negative: &[f32]) -> Result<()> {
        if self.n_embd == 0 {
            return Err(Error::invalid("rows of width 0 make no direction"));
        }
        if positive.len() != negative.len() || positive.len() % self.n_embd != 0 {
            return Err(Error::invalid(format!(
                "l_out-{layer}: {} positive and {} negative values, not equal multiples of n_embd {}",
                positive.len(),
                negative.len(),
                self.n_embd
            )));
        }
        let e = self.n_embd;
        let (sum, n) = self.sums.entry(layer).or_insert_with(|| (vec![0.0; e], 0));
        for (p, q) in positive.chunks_exact(e).zip(negative.chunks_exact(e)) {
            // The same test as cvector-generator's: every |difference| below 1e-6.
            if p.iter().zip(q).all(|(a, b)| (a - b).abs() < 1e-6) {
                continue;
            }
            for ((s, a), b) in sum.iter_mut().zip(p).zip(q) {
                *s += f64::from(a - b);
            }
            *n += 1;
        }
        Ok(())
    }

    /// The unit-length mean difference of every source layer `L` with rows,
    /// as `direction.(L+1)`; `keep(N)` chooses the directions written.
    pub fn finish(self, model_hint: &str, keep: impl Fn(usize) -> bool) -> Result<ControlVector> {
        let mut directions = BTreeMap::new();
        for (layer, (sum, n)) in self.sums {
            let target = layer + 1;
            if !keep(target) {
                continue;
            }
            if n == 0 {
                return Err(Error::invalid(format!(
                    "l_out-{layer}: the positive and negative prompts give identical rows: no direction"
                )));
            }
            let mean: Vec<f64> = sum.iter().map(|s| s / n as f64).collect();
            let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
            directions.insert(target, mean.iter().map(|x| (x / norm) as f32).collect());
        }
        let v = ControlVector {
            n_embd: self.n_embd,
            model_hint: model_hint.to_string(),
            directions,
        };
        v.validate()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_difference_is_unit_mean_and_shifted_one_layer() {
        let mut m = MeanDifference::new(2);
        // Two rows of l_out-0: differences (3, 4) and (1, 0); a zero row left out.
        m.add(
            0,
            &[4.0, 4.0, 1.0, 1.0, 5.0, 5.0],
            &[1.0, 0.0, 0.0, 1.0, 5.0, 5.0],
        )
        .unwrap();
        m.add(3, &[0.0, 2.0], &[0.0, 0.0]).unwrap();
        let v = m.finish("llama", |_| true).unwrap();
        assert_eq!(v.directions.keys().copied().collect::<Vec<_>>(), [1, 4]);
        // mean (2, 2) → (1/√2, 1/√2)
        let d = &v.directions[&1];
        assert!((d[0] - 0.5f32.sqrt()).abs() < 1e-6 && (d[1] - 0.5f32.sqrt()).abs() < 1e-6);
        assert_eq!(v.directions[&4], vec![0.0, 1.0]);
        // Identical prompts: no direction, a clear error.
        let mut same = MeanDifference::new(2);
        same.add(2, &[1.0, 2.0], &[1.0, 2.0]).unwrap();
        let e = same.finish("llama", |_| true).unwrap_err();
        assert!(e.message().contains("identical rows"), "{e}");
        assert!(MeanDifference::new(2).add(0, &[1.0], &[1.0, 2.0]).is_err());
        assert!(MeanDifference::new(0).add(0, &[], &[]).is_err());
    }

    #[test]
    fn write_read_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.gguf");
        let v = ControlVector {
            n_embd: 3,
            model_hint: "gemma3".into(),
            directions: [(1, vec![1.0, 2.0, 3.0]), (7, vec![-1.0, 0.5, 0.25])]
                .into_iter()
                .collect(),
        };
        v.write(&p).unwrap();
        assert_eq!(ControlVector::read(&p).unwrap(), v);
        let parsed = gguf::parse(
            File::open(&p).unwrap(),
            std::fs::metadata(&p).unwrap().len(),
        )
        .unwrap();
        assert_eq!(parsed.get("controlvector.layer_count"), Some(&Kv::Int(2)));
        // Refused: layer 0, a wrong width, a non-finite value, not GGUF.
        for (dirs, needle) in [
            (vec![(0, vec![1.0, 2.0, 3.0])], "layer 0 is never steered"),
            (vec![(2, vec![1.0, 2.0])], "has 2 values, not n_embd 3"),
            (vec![(2, vec![1.0, f32::NAN, 3.0])], "non-finite"),
        ] {
            let bad = ControlVector {
                directions: dirs.into_iter().collect(),
                ..v.clone()
            };
            let e = bad.write(&dir.path().join("bad.gguf")).unwrap_err();
            assert!(e.message().contains(needle), "{e}");
        }
        std::fs::write(dir.path().join("not.gguf"), b"hello").unwrap();
        let e = ControlVector::read(&dir.path().join("not.gguf")).unwrap_err();
        assert!(
            e.message().contains("is not a usable control vector"),
            "{e}"
        );
    }
}
