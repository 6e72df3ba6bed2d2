//! The `steer` and `patch` request fields (every completion endpoint): one
//! request's changes to its own sequence's residual stream, checked against
//! the model before the job is queued (a 400 naming the field otherwise:
//! nothing is applied half-way), and the `steer`/`patch` summary its final
//! object carries.
//!
//! ```json
//! "steer": [{"layers": "6..10", "vector": "<base64 f32 LE>", "scale": 4.0, "positions": "generated"}],
//! "patch": [{"tensor": "l_out-6", "pos": 3, "data": "<base64 f32 LE [n_embd]>"}]
//! ```
//!
//! A patch may name any node the graph computes once, with one F32 row of
//! n_embd values per token (`l_out-N`, `attn_out-N`, …; see `check_node`).
//!
//! A steer entry gives `vector` (n_embd values for every layer, or n_layer ×
//! n_embd) or `file` (a control-vector GGUF inside `serve --steer-dir`). The
//! layers, positions and scale go through the CLI's checks (`Steer::new`,
//! `Positions::parse`, `check_scale`).

use std::path::{Component, Path};
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use crate::engine::Model;
use crate::select::GraphNode;
use crate::steer::request::{self, SteerRequest};
use crate::steer::{check_scale, f32_le, ControlVector, Edits, Patch, Steer};
use crate::Error;

/// What a request changes, and what its final object says of it.
#[derive(Debug, Clone)]
pub(crate) struct RequestEdits {
    /// Handed to the job.
    pub(crate) edits: Arc<Edits>,
    /// `"steer": [{layers, positions, scale, vector_norm, source}]` (`None`
    /// without the field).
    pub(crate) steer: Option<Value>,
    /// `"patch": [{tensor, pos, norm}]` (`None` without the field).
    pub(crate) patch: Option<Value>,
}

/// What the checks need of the model and the request.
pub(crate) struct Limits<'a> {
    pub(crate) n_layer: usize,
    pub(crate) n_embd: usize,
    /// Positions a slot holds.
    pub(crate) n_ctx_slot: usize,
    /// One past the last position the request can reach (prompt + n_predict,
    /// at most `n_ctx_slot`).
    pub(crate) end: usize,
    /// `serve --steer-dir`.
    pub(crate) steer_dir: Option<&'a Path>,
    /// The model's graph (which nodes a patch may name).
    pub(crate) graph: &'a [GraphNode],
}

fn bad(field: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::bad(format!("{field}: {e}"))
}

fn entries<'a>(m: &'a Map<String, Value>, key: &str) -> Result<&'a [Value], ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(ApiError::bad(format!(
            "'{key}' must be an array of objects"
        ))),
    }
}

fn object<'a>(
    v: &'a Value,
    field: &str,
    keys: &[&str],
) -> Result<&'a Map<String, Value>, ApiError> {
    let o = v
        .as_object()
        .ok_or_else(|| bad(field, "must be an object"))?;
    if let Some(k) = o.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(bad(
            field,
            format!("unknown key '{k}' (known: {})", keys.join(", ")),
        ));
    }
    Ok(o)
}

fn string<'a>(o: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    let key = field.rsplit('.').next().unwrap_or(field);
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(field, "must be a string")),
    }
}

/// Base64 of little-endian f32 values.
fn values(o: &Map<String, Value>, field: &str) -> Result<Option<Vec<f32>>, ApiError> {
    let Some(text) = string(o, field)? else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| bad(field, format!("not base64 ({e})")))?;
    f32_le(&bytes).map(Some).map_err(|e| bad(field, e))
}

/// A control-vector file named by a request: a plain name inside `dir`.
fn steer_file(dir: Option<&Path>, name: &str, field: &str) -> Result<ControlVector, ApiError> {
    let dir = dir.ok_or_else(|| {
        bad(
            field,
            format!("'{name}': files are only read from serve --steer-dir DIR, and this server has none"),
        )
    })?;
    let p = Path::new(name);
    let plain = !name.is_empty()
        && !name.contains(['/', '\\'])
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(bad(
            field,
            format!("'{name}' must be a file name inside the steer directory (no '/', '..' or absolute paths)"),
        ));
    }
    let path = dir.join(p);
    if !path.is_file() {
        return Err(bad(
            field,
            format!("'{name}': no such file in the steer directory"),
        ));
    }
    ControlVector::read(&path).map_err(|e| bad(field, format!("'{name}': {}", e.message())))
}

fn scale(o: &Map<String, Value>, field: &str) -> Result<f32, ApiError> {
    match o.get("scale") {
        None | Some(Value::Null) => Ok(1.0),
        Some(Value::Number(n)) => Ok(n.as_f64().unwrap_or(f64::NAN) as f32),
        Some(_) => Err(bad(field, "must be a number")),
    }
}

/// `layers`: a layer list string (`"6..10"`, `"3,5"`) or one layer number.
fn layers(o: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match o.get("layers") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) if n.is_i64() => Ok(Some(n.to_string())),
        Some(_) => Err(bad(
            field,
            "must be a layer list like \"6..10\" or a number",
        )),
    }
}

impl Limits<'_> {
    fn core(&self) -> request::Limits<'_> {
        request::Limits {
            n_layer: self.n_layer,
            n_embd: self.n_embd,
            n_ctx: self.n_ctx_slot,
            end: self.end,
            graph: self.graph,
        }
    }
}

/// A [`request::FieldError`] of entry `entry` (`steer[0]`) as a 400.
fn field_error(entry: &str, e: request::FieldError) -> ApiError {
    bad(&format!("{entry}.{}", e.field), e.error.message())
}

fn steer_entry(v: &Value, i: usize, lim: &Limits<'_>) -> Result<(Steer, Value), ApiError> {
    let f = |k: &str| format!("steer[{i}].{k}");
    let o = object(
        v,
        &format!("steer[{i}]"),
        &["layers", "vector", "file", "scale", "positions", "tensor"],
    )?;
    let (vector, source) = match (values(o, &f("vector"))?, string(o, &f("file"))?) {
        (Some(_), Some(_)) => {
            return Err(bad(
                &format!("steer[{i}]"),
                "give 'vector' or 'file', not both",
            ))
        }
        (None, None) => {
            return Err(bad(
                &format!("steer[{i}]"),
                "needs 'vector' (base64 f32) or 'file' (a name in serve --steer-dir)",
            ))
        }
        (Some(x), None) => (
            ControlVector::from_values(&x, lim.n_layer, lim.n_embd)
                .map_err(|e| bad(&f("vector"), e.message()))?,
            json!("vector"),
        ),
        (None, Some(name)) => {
            let cv = steer_file(lim.steer_dir, name, &f("file"))?;
            cv.check_model(lim.n_layer, lim.n_embd)
                .map_err(|e| bad(&f("file"), format!("'{name}': {}", e.message())))?;
            (cv, json!({ "file": name }))
        }
    };
    let layers = layers(o, &f("layers"))?;
    let req = SteerRequest {
        vector: &vector,
        layers: layers.as_deref(),
        scale: scale(o, &f("scale"))?,
        positions: string(o, &f("positions"))?,
        tensor: string(o, &f("tensor"))?,
    };
    req.build(source, &lim.core())
        .map_err(|e| field_error(&format!("steer[{i}]"), e))
}

fn patch_entry(v: &Value, i: usize, lim: &Limits<'_>) -> Result<Patch, ApiError> {
    let f = |k: &str| format!("patch[{i}].{k}");
    let o = object(v, &format!("patch[{i}]"), &["tensor", "pos", "data"])?;
    let tensor = string(o, &f("tensor"))?.ok_or_else(|| bad(&f("tensor"), "is required"))?;
    let pos = match o.get("pos") {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| bad(&f("pos"), "must be an integer"))?,
        _ => return Err(bad(&f("pos"), "is required: an integer position")),
    };
    let data = values(o, &f("data"))?.ok_or_else(|| bad(&f("data"), "is required"))?;
    request::patch(tensor, pos, data, &lim.core())
        .map_err(|e| field_error(&format!("patch[{i}]"), e))
}

/// Read `steer` and `patch` (`None` when neither is given or both are empty).
pub(crate) fn edits(
    m: &Map<String, Value>,
    lim: &Limits<'_>,
) -> Result<Option<RequestEdits>, ApiError> {
    let (st, pa) = (entries(m, "steer")?, entries(m, "patch")?);
    if st.is_empty() && pa.is_empty() {
        return Ok(None);
    }
    let mut edits = Edits::default();
    let mut steer = Vec::new();
    for (i, v) in st.iter().enumerate() {
        let (s, applied) = steer_entry(v, i, lim)?;
        edits.steers.push(s);
        steer.push(applied);
    }
    let mut patch = Vec::new();
    for (i, v) in pa.iter().enumerate() {
        let p = patch_entry(v, i, lim)?;
        patch.push(p.summary());
        edits.patches.push(p);
    }
    Ok(Some(RequestEdits {
        edits: Arc::new(edits),
        steer: (!st.is_empty()).then_some(Value::Array(steer)),
        patch: (!pa.is_empty()).then_some(Value::Array(patch)),
    }))
}

/// serve's `--control-vector`/`--control-vector-scaled` files, each read and
/// checked against `model` (errors name the file), summed as llama-server
/// sums them, with the `--control-vector-layer-range` resolved.
pub(crate) fn control_vector(
    cfg: &super::ServeConfig,
    model: &Model,
) -> crate::Result<Option<crate::sched::ContextVector>> {
    if cfg.control_vectors.is_empty() {
        if cfg.control_vector_layers.is_some() {
            return Err(Error::invalid(
                "--control-vector-layer-range needs --control-vector or --control-vector-scaled",
            ));
        }
        return Ok(None);
    }
    let (n_layer, n_embd) = (model.n_layer(), model.n_embd());
    let mut read = Vec::new();
    for (path, scale) in &cfg.control_vectors {
        let named = |e: Error| {
            Error::with_source(
                e.kind(),
                format!("--control-vector {}: {}", path.display(), e.message()),
                e,
            )
        };
        let v = ControlVector::read(path).map_err(named)?;
        v.check_model(n_layer, n_embd).map_err(named)?;
        check_scale(*scale).map_err(named)?;
        read.push((v, *scale));
    }
    let parts: Vec<(&ControlVector, f32)> = read.iter().map(|(v, s)| (v, *s)).collect();
    let sum = ControlVector::sum(&parts)?;
    let layers = cfg
        .control_vector_layers
        .map(|(a, b)| crate::steer::layer_range(a, b, n_layer))
        .transpose()
        .map_err(|e| Error::invalid(format!("--control-vector-layer-range: {}", e.message())))?;
    Ok(Some((sum, layers)))
}
