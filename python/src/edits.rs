//! The `steer` and `patch` arguments of `Model.generate`/`stream`: the
//! Python `Steer`/`Patch` objects (handed over as tuples by
//! `latent_tap/_model.py`) turned into the library's [`Edits`] by the checks
//! `serve` uses too (`latent_tap::steer::request`: each value through the
//! library's validator), with errors naming the argument (`steer[0].vector:
//! …`, `patch[1].pos: …`) as `serve` names its request fields, and the
//! summary of what was applied in serve's words.

use std::path::PathBuf;

use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use serde_json::{json, Value};

use latent_tap::engine::Model;
use latent_tap::select::GraphNode;
use latent_tap::steer::request::{self, FieldError, SteerRequest};
use latent_tap::steer::{ControlVector, Edits};

/// One `latent_tap.Steer`: `(vector, file, layers, scale, positions, tensor)`.
pub type SteerArg<'py> = (
    Option<PyReadonlyArrayDyn<'py, f32>>,
    Option<PathBuf>,
    Option<String>,
    f64,
    String,
    Option<String>,
);

/// One `latent_tap.Patch`: `(tensor, pos, data)`.
pub type PatchArg<'py> = (String, i64, PyReadonlyArrayDyn<'py, f32>);

/// The edits of one run, and what its result reports of them.
#[derive(Debug, Default)]
pub struct RunEdits {
    /// Handed to the generator.
    pub edits: Edits,
    /// `{"steer": [...], "patch": [...]}` (only the keys given); `None`: unedited.
    pub summary: Option<Value>,
}

/// What the checks need to know of the run.
pub struct Limits<'a> {
    /// The model the run is on.
    pub model: &'a Model,
    /// Positions of the context.
    pub n_ctx: usize,
    /// One past the last position a sequence of the run can reach.
    pub end: usize,
    /// The model's graph.
    pub graph: &'a [GraphNode],
}

impl Limits<'_> {
    fn core(&self) -> request::Limits<'_> {
        request::Limits {
            n_layer: self.model.n_layer(),
            n_embd: self.model.n_embd(),
            n_ctx: self.n_ctx,
            end: self.end,
            graph: self.graph,
        }
    }
}

fn bad(field: &str, msg: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{field}: {msg}"))
}

fn field_error(entry: &str, e: FieldError) -> PyErr {
    bad(&format!("{entry}.{}", e.field), e.error.message())
}

/// The values of `a` (C order).
fn values(a: &PyReadonlyArrayDyn<'_, f32>) -> Vec<f32> {
    a.as_slice()
        .map(<[f32]>::to_vec)
        .unwrap_or_else(|_| a.as_array().iter().copied().collect())
}

fn steer_entry(
    i: usize,
    arg: &SteerArg<'_>,
    lim: &Limits<'_>,
) -> PyResult<(latent_tap::steer::Steer, Value)> {
    let entry = format!("steer[{i}]");
    let f = |k: &str| format!("{entry}.{k}");
    let (vector, file, layers, scale, positions, tensor) = arg;
    let (n_layer, n_embd) = (lim.model.n_layer(), lim.model.n_embd());
    let (cv, source) = match (vector, file) {
        (Some(_), Some(_)) => return Err(bad(&entry, "give vector or file, not both")),
        (None, None) => return Err(bad(&entry, "needs vector or file")),
        (Some(v), None) => {
            // The library sees a flat list; a 2-D array must be laid out as it reads one.
            let shape = v.shape();
            if shape.len() == 2 && (shape[0], shape[1]) != (n_layer, n_embd) {
                return Err(bad(
                    &f("vector"),
                    format!(
                        "shape ({}, {}): a 2-D vector is n_layer × n_embd = ({n_layer}, {n_embd}), row N for layer N",
                        shape[0], shape[1]
                    ),
                ));
            }
            let cv = ControlVector::from_values(&values(v), n_layer, n_embd)
                .map_err(|e| bad(&f("vector"), e.message()))?;
            (cv, json!("vector"))
        }
        (None, Some(path)) => {
            if !path.is_file() {
                return Err(PyFileNotFoundError::new_err(format!(
                    "{}: {}: no such file",
                    f("file"),
                    path.display()
                )));
            }
            let cv = ControlVector::read(path).map_err(|e| bad(&f("file"), e.message()))?;
            cv.check_model(n_layer, n_embd)
                .map_err(|e| bad(&f("file"), format!("{}: {}", path.display(), e.message())))?;
            (cv, json!({ "file": path }))
        }
    };
    let req = SteerRequest {
        vector: &cv,
        layers: layers.as_deref(),
        scale: *scale as f32,
        positions: Some(positions),
        tensor: tensor.as_deref(),
    };
    req.build(source, &lim.core())
        .map_err(|e| field_error(&entry, e))
}

/// The run's edits from the Python arguments, every value checked against
/// the model, the run and the model's graph.
pub fn build(
    steer: &[SteerArg<'_>],
    patch: &[PatchArg<'_>],
    lim: &Limits<'_>,
) -> PyResult<RunEdits> {
    if steer.is_empty() && patch.is_empty() {
        return Ok(RunEdits::default());
    }
    let mut out = RunEdits::default();
    let mut summary = serde_json::Map::new();
    if !steer.is_empty() {
        let mut applied = Vec::new();
        for (i, a) in steer.iter().enumerate() {
            let (s, v) = steer_entry(i, a, lim)?;
            out.edits.steers.push(s);
            applied.push(v);
        }
        summary.insert("steer".into(), Value::Array(applied));
    }
    if !patch.is_empty() {
        let mut applied = Vec::new();
        for (i, (tensor, pos, data)) in patch.iter().enumerate() {
            let p = request::patch(tensor, *pos, values(data), &lim.core())
                .map_err(|e| field_error(&format!("patch[{i}]"), e))?;
            applied.push(p.summary());
            out.edits.patches.push(p);
        }
        summary.insert("patch".into(), Value::Array(applied));
    }
    out.summary = Some(Value::Object(summary));
    Ok(out)
}
