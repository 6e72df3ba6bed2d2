//! What the server says about itself: `/health`, `/props`, `/models`, `/slots`,
//! `/latents/tensors`, and the answer to unsupported llama-server features.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::completion::generation_settings;
use super::error::ApiError;
use super::request;
use super::wire::FRAMES_MEDIA_TYPE;
use super::{fingerprint, json_response, unix_now, AppState};
use crate::engine::Token;

pub(crate) async fn health(State(app): AppState) -> Response {
    match app.engine() {
        Ok(_) => json_response(StatusCode::OK, &json!({"status": "ok"})),
        Err(e) => json_response(
            e.status,
            &json!({"error": {"message": e.message, "type": e.kind, "code": e.status.as_u16()}}),
        ),
    }
}

pub(crate) async fn out_of_scope() -> Response {
    ApiError::unsupported(
        "this llama-server feature (embeddings, reranking, infill, LoRA, slot save/restore) is not supported by latent-tap serve",
    )
    .into_response()
}

pub(crate) async fn props(State(app): AppState) -> Response {
    let r = (|| {
        let engine = app.engine()?;
        let model = engine.model();
        let defaults = request::gen_params(&Map::new(), &["n_predict"], -1)?;
        let tok_text = |t: Option<Token>| {
            t.map(|t| String::from_utf8_lossy(&model.token_bytes_special(t)).into_owned())
                .unwrap_or_default()
        };
        let bos = model.tokenize_ext("", true, false)?.first().copied();
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({
                "default_generation_settings": {"params": generation_settings(&defaults), "n_ctx": engine.n_ctx_slot()},
                "total_slots": engine.n_parallel(),
                "model_alias": app.model_name,
                "model_path": app.cfg.model.display().to_string(),
                "modalities": {"vision": false, "video": false, "audio": false},
                "endpoint_slots": true,
                "endpoint_props": false,
                "endpoint_metrics": app.cfg.metrics,
                "chat_template": app.chat_template(model),
                "bos_token": tok_text(bos),
                "build_info": fingerprint(),
                "is_sleeping": false,
                "latents": {
                    "n_layer": model.n_layer(),
                    "n_embd": model.n_embd(),
                    "capturable": engine.graph().len(),
                    "binary_media_type": FRAMES_MEDIA_TYPE,
                    "capture_mode": engine.capture_mode(),
                    "build": crate::engine::build_info().to_json(),
                },
                "lens": crate::server::completion::lens_props(&app, engine),
            }),
        ))
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn models(State(app): AppState) -> Response {
    let r = (|| {
        let engine = app.engine()?;
        let model = engine.model();
        let name = &app.model_name;
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({
                "models": [{
                    "name": name, "model": name, "modified_at": "", "size": "", "digest": "",
                    "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
                    "parameters": "",
                    "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""], "parameter_size": "", "quantization_level": ""},
                }],
                "object": "list",
                "data": [{
                    "id": name, "aliases": app.cfg.alias.iter().collect::<Vec<_>>(), "tags": [], "object": "model",
                    "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                    "created": unix_now(), "owned_by": "llamacpp",
                    "meta": {"n_vocab": model.n_vocab(), "n_ctx": engine.n_ctx_slot(), "n_embd": model.n_embd(), "n_layer": model.n_layer()},
                }],
            }),
        ))
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn slots(State(app): AppState) -> Response {
    let r = (|| {
        let engine = app.engine()?;
        let v: Vec<Value> = engine
            .slots()
            .iter()
            .map(|s| {
                let mut v = json!({
                    "id": s.id,
                    "n_ctx": engine.n_ctx_slot(),
                    "speculative": false,
                    "is_processing": s.job.is_some(),
                });
                // Like llama-server, task fields appear only while (or once) a slot works.
                if let Some(job) = s.job {
                    v["id_task"] = json!(job);
                    v["n_prompt_tokens"] = json!(s.n_prompt);
                    v["next_token"] = json!([{"has_next_token": true, "n_remain": s.n_predict.saturating_sub(s.n_generated), "n_decoded": s.n_generated}]);
                }
                v
            })
            .collect();
        Ok::<_, ApiError>(json_response(StatusCode::OK, &Value::Array(v)))
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn latent_tensors(State(app): AppState) -> Response {
    let r = (|| {
        let engine = app.engine()?;
        let mut global = Vec::new();
        let mut layers: std::collections::BTreeMap<i32, Vec<Value>> = Default::default();
        for n in engine.graph() {
            // One token's shape, trailing unit axes dropped ([640, 1, 1, 1] → [640]).
            let mut ne: Vec<i64> = n.ne.iter().copied().take_while(|&d| d > 0).collect();
            while ne.len() > 1 && ne.last() == Some(&1) {
                ne.pop();
            }
            let e = json!({"name": n.name, "shape": ne, "ggml_type": n.ggml_type});
            match n.layer {
                Some(l) => layers.entry(l).or_default().push(e),
                None => global.push(e),
            }
        }
        let layers: Map<String, Value> = layers
            .into_iter()
            .map(|(l, v)| (l.to_string(), Value::Array(v)))
            .collect();
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({"model": app.model_name, "n_layer": engine.model().n_layer(), "global": global, "layers": layers}),
        ))
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}
