//! The `lens` request field (see `docs/PROTOCOL.md`): which `l_out-N` rows
//! the job captures for it, how its frames are told apart from the
//! requester's own `latents`, and the lens of a step's rows, computed on a
//! blocking-pool thread (never the inference or the router thread).

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::capture::Rows;
use crate::convert::convert_from_f32;
use crate::engine::{Model, Token};
use crate::lens::{inputs_from_frames, layer_of_name, Lens, LensInput, LensOptions, LensRows};
use crate::record::{Dtype, ROW_PROMPT};
use crate::sched::{FrameOut, LatentFilter, LatentRequest, Scheduler};
use crate::server::error::ApiError;
use crate::server::App;

/// A checked lens request.
#[derive(Debug)]
pub(crate) struct LensPlan {
    pub(super) opts: LensOptions,
    /// The lens's layers, increasing (each has an `l_out-N` node).
    pub(super) layers: Vec<usize>,
    /// The `l_out-N` tensors the job captures for it: `layers` and the final layer.
    names: HashSet<String>,
}

/// The layers whose `l_out-N` the engine's graph computes.
pub(crate) fn graph_layers(engine: &Scheduler) -> Vec<usize> {
    let mut l: Vec<usize> = engine
        .graph()
        .iter()
        .filter_map(|n| layer_of_name(&n.name))
        .collect();
    l.sort_unstable();
    l.dedup();
    l
}

/// Read the `lens` field of a request; `None` when absent, `null` or `false`.
pub(super) fn plan(
    engine: &Scheduler,
    m: &Map<String, Value>,
) -> Result<Option<LensPlan>, ApiError> {
    let Some(opts) =
        LensOptions::from_json(m.get("lens")).map_err(|e| ApiError::bad(e.message()))?
    else {
        return Ok(None);
    };
    let n_layer = engine.model().n_layer();
    let have = graph_layers(engine);
    let wanted = opts
        .layers
        .resolve(n_layer)
        .map_err(|e| ApiError::bad(e.message()))?;
    let layers: Vec<usize> = match opts.layers {
        crate::lens::LayerSpec::All => wanted.into_iter().filter(|l| have.contains(l)).collect(),
        _ => {
            if let Some(l) = wanted.iter().find(|l| !have.contains(l)) {
                return Err(ApiError::bad(format!(
                    "lens layer {l} has no l_out-{l} row in this model's graph"
                )));
            }
            wanted
        }
    };
    if layers.is_empty() {
        return Err(ApiError::bad(
            "lens: this model's graph has no l_out-N rows",
        ));
    }
    let mut names: HashSet<String> = layers.iter().map(|l| format!("l_out-{l}")).collect();
    if let Some(&last) = have.last().filter(|&&l| l + 1 == n_layer) {
        names.insert(format!("l_out-{last}"));
    }
    Ok(Some(LensPlan {
        opts,
        layers,
        names,
    }))
}

/// The filter the job runs with: the requester's `latents`, plus (f32, rows
/// as wide as either asks) the lens's `l_out-N` tensors.
pub(super) fn job_filter(
    engine: &Scheduler,
    user: Option<&LatentFilter>,
    plan: Option<&LensPlan>,
) -> Result<Option<LatentFilter>, ApiError> {
    let Some(plan) = plan else {
        return Ok(user.cloned());
    };
    let mut own: Vec<&String> = plan.names.iter().collect();
    own.sort();
    let rows = match plan.opts.rows {
        LensRows::All => Rows::All,
        LensRows::Last => Rows::Last,
    };
    let lf = engine
        .compile(&LatentRequest {
            patterns: vec![own.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")],
            layers: None,
            rows,
            dtype: Dtype::F32,
        })
        .map_err(|e| ApiError::bad(format!("lens: {}", e.message())))?;
    let Some(u) = user else {
        return Ok(Some(lf));
    };
    let mut names = u.names.clone();
    names.extend(lf.names.into_iter().filter(|n| u.index_of(n).is_none()));
    let rows = if u.rows == Rows::All || rows == Rows::All {
        Rows::All
    } else {
        Rows::Last
    };
    let mut f = LatentFilter::new(names, rows, Dtype::F32);
    f.skipped = u.skipped.clone();
    Ok(Some(f))
}

/// `rows: last` applied after the fact: the last prompt row and every generated row.
fn keep_last(f: &mut FrameOut, n_prompt: usize) {
    let width = f.header.width as usize * f.dtype().size();
    let keep: Vec<bool> = f
        .rows
        .iter()
        .map(|r| r.flags & ROW_PROMPT == 0 || r.pos as usize + 1 == n_prompt)
        .collect();
    if keep.iter().all(|&k| k) {
        return;
    }
    let mut data = Vec::with_capacity(f.data.len());
    let mut rows = Vec::new();
    for (k, (r, &ok)) in f.rows.iter().zip(&keep).enumerate() {
        if ok {
            rows.push(*r);
            data.extend_from_slice(&f.data[k * width..(k + 1) * width]);
        }
    }
    f.rows = rows;
    f.data = data;
    f.header.n_rows = f.rows.len() as u32;
}

/// Splits a lens job's frames into the requester's latents and the lens's rows.
#[derive(Debug)]
pub(super) struct Split {
    plan: Arc<LensPlan>,
    n_prompt: usize,
}

impl Split {
    pub(super) fn new(plan: Arc<LensPlan>, n_prompt: usize) -> Self {
        Self { plan, n_prompt }
    }

    /// The frame as the requester's `latents` asked for it (index, rows,
    /// dtype), or `None` when it is only the lens's.
    pub(super) fn user_frame(&self, user: Option<&LatentFilter>, f: &FrameOut) -> Option<FrameOut> {
        let u = user?;
        let index = u.index_of(f.name())?;
        let mut f = f.clone();
        f.header.tensor_index = index;
        if u.rows == Rows::Last {
            keep_last(&mut f, self.n_prompt);
        }
        if f.rows.is_empty() {
            return None;
        }
        if u.dtype != Dtype::F32 {
            let mut out = vec![0u8; f.data.len() / 4 * u.dtype.size()];
            convert_from_f32(&f.data, u.dtype, &mut out);
            f.data = out;
            f.header.dtype = u.dtype as u32;
        }
        Some(f)
    }

    /// The frame's rows the lens reads, or `None`.
    pub(super) fn lens_frame(&self, f: &FrameOut) -> Option<FrameOut> {
        if !self.plan.names.contains(f.name()) {
            return None;
        }
        let mut f = f.clone();
        if self.plan.opts.rows == LensRows::Last {
            keep_last(&mut f, self.n_prompt);
        }
        (!f.rows.is_empty()).then_some(f)
    }
}

/// The lens (loaded once, on the first request that asks for one).
pub(super) async fn lens(app: &Arc<App>) -> Result<Arc<Lens>, ApiError> {
    let model = app.model()?.clone();
    let threads = app.lens_threads();
    app.lens
        .get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || Lens::for_model(&model, threads).map(Arc::new))
                .await
                .map_err(|e| ApiError::internal(format!("lens: {e}")))?
                .map_err(|e| ApiError::internal(e.message()))
        })
        .await
        .cloned()
}

/// The `lens` object of `frames` (one step's, or a whole answer's), computed on
/// a blocking-pool thread. `tokens`: the prompt then every generated token so
/// far (a row at `pos` is scored against `tokens[pos + 1]`).
pub(super) async fn lens_json(
    lens: Arc<Lens>,
    plan: Arc<LensPlan>,
    model: Arc<Model>,
    frames: Vec<FrameOut>,
    tokens: Vec<Token>,
) -> Result<Value, ApiError> {
    tokio::task::spawn_blocking(move || {
        let inputs = inputs_from_frames(&frames, lens.n_embd())?;
        let borrowed: Vec<LensInput> = inputs.iter().map(|i| i.as_input()).collect();
        let target = |_: i32, pos: i32| tokens.get(usize::try_from(pos).ok()? + 1).copied();
        let rows = lens.compute(&borrowed, &plan.layers, plan.opts.top_k, &target)?;
        let piece = |id: Token| model.token_piece(id);
        Ok::<_, crate::Error>(crate::lens::lens_json(
            &plan.layers,
            lens.n_vocab(),
            &rows,
            &piece,
        ))
    })
    .await
    .map_err(|e| ApiError::internal(format!("lens: {e}")))?
    .map_err(ApiError::from)
}

/// `/props`' `lens` object.
pub(crate) fn props(app: &App, engine: &Scheduler) -> Value {
    let layers = graph_layers(engine);
    let file_ok = *app
        .lens_available
        .get_or_init(|| crate::lens::check_model_file(engine.model().path()).is_ok());
    let available = !layers.is_empty() && file_ok;
    serde_json::json!({
        "available": available,
        "n_layer": engine.model().n_layer(),
        "layers": layers,
        "max_top_k": crate::settings::MAX_LENS_TOP_K,
    })
}
