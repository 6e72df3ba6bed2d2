//! The `steer` and `patch` arguments of `Model.generate`/`stream`: the
//! Python `Steer`/`Patch` objects (handed over as tuples by
//! `latent_tap/_model.py`) turned into the library's [`Edits`], every value
//! checked by the library's own checks (`ControlVector::from_values`/`read`,
//! `check_scale`, `LayerFilter::parse`, `Positions::parse`, `Steer::new`,
//! `Patch::new`, `check_node`) with errors naming the argument
//! (`steer[0].vector: …`, `patch[1].pos: …`), as `serve` names its request
//! fields (src/server/edits.rs). Also the summary of what was applied, in
//! serve's words.

use std::path::PathBuf;

use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use serde_json::{json, Value};

use latent_tap::engine::Model;
use latent_tap::select::{GraphNode, LayerFilter};
use latent_tap::steer::{check_node, check_scale, ControlVector, Edits, Patch, Positions, Steer};

/// One `latent_tap.Steer`: `(vector, file, layers, scale, positions)`.
pub type SteerArg<'py> = (
    Option<PyReadonlyArrayDyn<'py, f32>>,
    Option<PathBuf>,
    Option<String>,
    f64,
    String,
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
}

fn bad(field: &str, msg: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{field}: {msg}"))
}

/// The values of `a` (C order).
fn values(a: &PyReadonlyArrayDyn<'_, f32>) -> Vec<f32> {
    a.as_slice()
        .map(<[f32]>::to_vec)
        .unwrap_or_else(|_| a.as_array().iter().copied().collect())
}

fn steer_entry(i: usize, arg: &SteerArg<'_>, lim: &Limits<'_>) -> PyResult<(Steer, Value)> {
    let f = |k: &str| format!("steer[{i}].{k}");
    let (vector, file, layers, scale, positions) = arg;
    let (n_layer, n_embd) = (lim.model.n_layer(), lim.model.n_embd());
    let (cv, source) = match (vector, file) {
        (Some(_), Some(_)) => {
            return Err(bad(&format!("steer[{i}]"), "give vector or file, not both"))
        }
        (None, None) => return Err(bad(&format!("steer[{i}]"), "needs vector or file")),
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
    let scale = *scale as f32;
    check_scale(scale).map_err(|e| bad(&f("scale"), e.message()))?;
    let filter = layers
        .as_deref()
        .map(LayerFilter::parse)
        .transpose()
        .map_err(|e| bad(&f("layers"), e.message()))?;
    let positions = Positions::parse(positions).map_err(|e| bad(&f("positions"), e.message()))?;
    positions
        .check(lim.n_ctx)
        .map_err(|e| bad(&f("positions"), e.message()))?;
    let s = Steer::new(&cv, scale, filter.as_ref(), positions, n_layer, n_embd)
        .map_err(|e| bad(&f("layers"), e.message()))?;
    let applied = json!({
        "layers": s.layers(),
        "positions": s.positions.to_string(),
        "scale": s.scale,
        "vector_norm": s.norms().into_values().collect::<Vec<_>>(),
        "tensors": s.layers().iter().map(|l| format!("l_out-{l}")).collect::<Vec<_>>(),
        "source": source,
    });
    Ok((s, applied))
}

fn patch_entry(i: usize, arg: &PatchArg<'_>, lim: &Limits<'_>) -> PyResult<Patch> {
    let f = |k: &str| format!("patch[{i}].{k}");
    let (tensor, pos, data) = arg;
    let n_embd = lim.model.n_embd();
    let data = values(data);
    // The library names the value at fault in its message; the field is ours.
    let field = if data.len() != n_embd || data.iter().any(|x| !x.is_finite()) {
        f("data")
    } else if *pos < 0 || *pos as u64 >= lim.end as u64 {
        f("pos")
    } else {
        f("tensor")
    };
    Patch::new(tensor, *pos, data, n_embd, lim.end).map_err(|e| bad(&field, e.message()))
}

/// The run's edits from the Python arguments, every value checked (the graph
/// nodes patched are [`check_nodes`]'s, once the graph is known).
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
        for (i, a) in patch.iter().enumerate() {
            let p = patch_entry(i, a, lim)?;
            applied.push(json!({"tensor": p.tensor, "pos": p.pos, "norm": p.norm()}));
            out.edits.patches.push(p);
        }
        summary.insert("patch".into(), Value::Array(applied));
    }
    out.summary = Some(Value::Object(summary));
    Ok(out)
}

/// Every patched node is one the model's `graph` lets an edit touch
/// (`check_node`), the error naming the patch.
pub fn check_nodes(edits: &Edits, graph: &[GraphNode], n_embd: usize) -> PyResult<()> {
    for (i, p) in edits.patches.iter().enumerate() {
        check_node(graph, &p.tensor, n_embd)
            .map_err(|e| bad(&format!("patch[{i}].tensor"), e.message()))?;
    }
    Ok(())
}
