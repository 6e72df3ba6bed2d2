//! Completions (`/completion`, `/v1/completions`; `/v1/chat/completions` renders
//! its messages in [`super::chat`] and continues here): a request is prepared
//! ([`prepare`]), submitted, its events accumulated ([`acc`]) into llama-server's
//! response objects ([`format`]) and answered as one JSON object, as SSE or as the
//! binary record stream ([`transport`]).

mod acc;
mod format;
mod lens;
mod prepare;
mod transport;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use self::acc::{latents_computed, Acc};
use self::format::final_object;
use self::prepare::{submit, Prepared};
use self::transport::{binary_response, sse_response};
use super::error::ApiError;
use super::wire;
use super::{json_response, read_body, request, App, AppState};
use crate::sched::JobEvent;

pub(crate) use self::format::generation_settings;
pub(crate) use self::lens::props as lens_props;
pub(crate) use self::prepare::{prepare, Flavor};

/// Submit a prepared request and answer it: one JSON object, SSE or binary records.
pub(super) async fn run(app: Arc<App>, p: Prepared) -> Result<Response, ApiError> {
    // Loaded (once) before the job starts, so a model the lens cannot read is a
    // clear error, not a failed stream.
    let lens = match p.lens {
        Some(_) => Some(self::lens::lens(&app).await?),
        None => None,
    };
    let (guard, rx) = submit(&app, &p)?;
    if p.binary {
        return Ok(binary_response(app, p, guard, rx, lens));
    }
    if p.params.stream {
        return Ok(sse_response(app, p, guard, rx, lens));
    }
    let mut rx = rx;
    let mut acc = Acc::new(&app, &p)?;
    acc.keep_frames = p.filter.is_some() || p.lens.is_some();
    while let Some(ev) = rx.recv().await {
        let done = matches!(ev, JobEvent::Done(_));
        acc.on(ev, &guard);
        if done {
            break;
        }
    }
    if let Some(e) = acc.error() {
        return Err(e);
    }
    acc.text.finish();
    let mut v = final_object(&app, &p, &acc);
    if p.filter.is_some() {
        v["latents"] = wire::latents_json(&acc.all_frames);
        v["latents_computed"] = latents_computed(&acc);
    }
    if let (Some(lens), Some(plan)) = (lens, p.lens.clone()) {
        let frames = std::mem::take(&mut acc.all_lens_frames);
        v["lens"] =
            self::lens::lens_json(lens, plan, acc.model.clone(), frames, acc.all_tokens()).await?;
    }
    Ok(json_response(StatusCode::OK, &v))
}

pub(crate) async fn completion(State(app): AppState, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        let tokens = request::prompt(app.engine()?, m.get("prompt"))?;
        let p = prepare(&app, &m, Flavor::Native, tokens, &headers)?;
        run(app.clone(), p).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn oai_completions(
    State(app): AppState,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        let tokens = request::prompt(app.engine()?, m.get("prompt"))?;
        let p = prepare(&app, &m, Flavor::OaiCmpl, tokens, &headers)?;
        run(app.clone(), p).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}
