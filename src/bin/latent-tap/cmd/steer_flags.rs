//! `capture --steer FILE[:SCALE] [--steer-layers LIST] [--steer-positions WHICH]
//! [--steer-tensor TENSOR]`:
//! the flags checked (each error names its flag and value), the vector read,
//! and what the manifest records of it.

use std::path::PathBuf;

use serde_json::json;

use latent_tap::engine::Model;
use latent_tap::select::LayerFilter;
use latent_tap::steer::{check_scale, ControlVector, Positions, Steer};
use latent_tap::{Error, Result};

use crate::args::CaptureArgs;

/// The steering flags, checked as far as they can be without the model.
pub struct SteerFlags {
    arg: String,
    path: PathBuf,
    vector: ControlVector,
    scale: f32,
    layers: Option<LayerFilter>,
    layers_text: String,
    positions: Positions,
    tensor: Option<String>,
}

/// `e` with `prefix: ` before its message, its kind and cause kept.
fn flagged(prefix: &str, e: Error) -> Error {
    Error::with_source(e.kind(), format!("{prefix}: {}", e.message()), e)
}

/// `FILE[:SCALE]` given to `flag` (`--steer`, serve's `--control-vector-scaled`):
/// a path that exists is a file name whole (it may hold a colon; no scale);
/// otherwise the text after the last colon is the scale, a finite number.
pub fn file_and_scale(flag: &str, arg: &str) -> Result<(PathBuf, Option<f32>)> {
    let whole = PathBuf::from(arg);
    let Some((file, scale)) = arg.rsplit_once(':').filter(|_| !whole.exists()) else {
        return Ok((whole, None));
    };
    let s: f32 = scale.trim().parse().map_err(|_| {
        Error::invalid(format!(
            "{flag} {arg}: the scale '{scale}' is not a number (use FILE or FILE:SCALE)"
        ))
    })?;
    check_scale(s).map_err(|e| flagged(&format!("{flag} {arg}"), e))?;
    Ok((PathBuf::from(file), Some(s)))
}

impl SteerFlags {
    /// `None` without `--steer`; the other steering flags need it.
    pub fn check(a: &CaptureArgs) -> Result<Option<Self>> {
        let Some(arg) = &a.steer else {
            for (flag, set) in [
                ("--steer-layers", a.steer_layers.is_some()),
                ("--steer-positions", a.steer_positions.is_some()),
                ("--steer-tensor", a.steer_tensor.is_some()),
            ] {
                if set {
                    return Err(Error::invalid(format!("{flag} needs --steer FILE[:SCALE]")));
                }
            }
            return Ok(None);
        };
        let (path, scale) = file_and_scale("--steer", arg)?;
        let scale = scale.unwrap_or(1.0);
        let layers = a
            .steer_layers
            .as_deref()
            .map(|l| LayerFilter::parse(l).map_err(|e| flagged(&format!("--steer-layers {l}"), e)))
            .transpose()?;
        let positions = match a.steer_positions.as_deref() {
            None => Positions::All,
            Some(p) => {
                Positions::parse(p).map_err(|e| flagged(&format!("--steer-positions {p}"), e))?
            }
        };
        let vector = ControlVector::read(&path).map_err(|e| flagged("--steer", e))?;
        Ok(Some(Self {
            arg: arg.clone(),
            path,
            vector,
            scale,
            layers,
            layers_text: a.steer_layers.clone().unwrap_or_else(|| "all".into()),
            positions,
            tensor: a.steer_tensor.clone(),
        }))
    }

    /// The steer for `model` with a context of `n_ctx` positions: a vector of
    /// another model, layers it or the model lacks, positions outside the
    /// context are refused here.
    pub fn steer(&self, model: &Model, n_ctx: usize) -> Result<Steer> {
        let (n_layer, n_embd) = (model.n_layer(), model.n_embd());
        self.vector
            .check_model(n_layer, n_embd)
            .map_err(|e| flagged(&format!("--steer {}", self.path.display()), e))?;
        let s = Steer::new(
            &self.vector,
            self.scale,
            self.layers.as_ref(),
            self.positions,
            n_layer,
            n_embd,
        )
        .map_err(|e| flagged(&format!("--steer-layers {}", self.layers_text), e))?;
        s.positions
            .check(n_ctx)
            .map_err(|e| flagged(&format!("--steer-positions {}", self.positions), e))?;
        match &self.tensor {
            None => Ok(s),
            Some(t) => s.on(t).map_err(|e| flagged("--steer-tensor", e)),
        }
    }

    /// The manifest's `steer`: what was applied.
    pub fn manifest(&self, s: &Steer) -> serde_json::Value {
        let norms: serde_json::Map<String, serde_json::Value> = s
            .norms()
            .into_iter()
            .map(|(l, n)| (l.to_string(), json!(n)))
            .collect();
        json!({
            "file": self.path,
            "arg": self.arg,
            "model_hint": self.vector.model_hint,
            "scale": s.scale,
            "layers": s.layers(),
            "positions": s.positions.to_string(),
            "sequences": "all",
            "tensors": s.layers().iter().map(|&l| s.node(l)).collect::<Vec<_>>(),
            "vector_norm": norms,
        })
    }
}
