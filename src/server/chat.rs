//! Chat: `/v1/chat/completions` (messages rendered with the model's template,
//! then answered as a completion) and `/apply-template`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::completion::{self, Flavor};
use super::error::ApiError;
use super::request;
use super::{json_response, read_body, App, AppState};
use crate::engine::apply_chat_template;

/// Messages → `(role, text)`; content may be a string or text parts.
fn messages(m: &Map<String, Value>) -> Result<Vec<(String, String)>, ApiError> {
    let arr = match m.get("messages") {
        None | Some(Value::Null) => return Err(ApiError::bad("'messages' is required")),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::bad("Expected 'messages' to be an array")),
    };
    let mut out = Vec::new();
    for (i, msg) in arr.iter().enumerate() {
        let Some(o) = msg.as_object() else {
            return Err(ApiError::bad("each message must be an object"));
        };
        let role = o
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad("each message needs a string 'role'"))?;
        let content = match o.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for (j, part) in parts.iter().enumerate() {
                    s.push_str(text_part(part, i, j)?);
                }
                s
            }
            None | Some(Value::Null) if role == "assistant" => String::new(),
            None | Some(Value::Null) => {
                return Err(ApiError::bad(
                    "All non-assistant messages must contain 'content'",
                ))
            }
            Some(_) => {
                return Err(ApiError::bad(
                    "message 'content' must be a string or an array of parts",
                ))
            }
        };
        out.push((role.to_string(), content));
    }
    if out.is_empty() {
        return Err(ApiError::bad("'messages' must not be empty"));
    }
    Ok(out)
}

/// The text of content part `j` of message `i`, `{"type": "text", "text": "…"}`:
/// a malformed part is a 400 naming the field; a well-formed part of another
/// type (`image_url`…) is a feature this server lacks, 501.
fn text_part(part: &Value, i: usize, j: usize) -> Result<&str, ApiError> {
    let at = || format!("messages[{i}].content[{j}]");
    let Some(o) = part.as_object() else {
        return Err(ApiError::bad(format!("{} must be an object", at())));
    };
    match o.get("type") {
        Some(Value::String(t)) if t == "text" => match o.get("text") {
            Some(Value::String(text)) => Ok(text),
            _ => Err(ApiError::bad(format!("{}.text must be a string", at()))),
        },
        Some(Value::String(t)) => Err(ApiError::unsupported(format!(
            "message content part of type {t} is not supported by latent-tap serve (text only)"
        ))),
        _ => Err(ApiError::bad(format!("{}.type must be a string", at()))),
    }
}

fn render_chat(app: &App, m: &Map<String, Value>) -> Result<String, ApiError> {
    let model = app.model()?;
    let msgs = messages(m)?;
    let add_gen = request::boolean(m, "add_generation_prompt")?.unwrap_or(true)
        && msgs.last().map_or(true, |(r, _)| r != "assistant");
    let tmpl = model
        .chat_template()
        .unwrap_or_else(|| "chatml".to_string());
    let mut text = apply_chat_template(&tmpl, &msgs, add_gen)?;
    // llama-server strips a rendered BOS when the tokenizer adds one itself.
    let bos = model.tokenize_ext("", true, false)?;
    if let Some(&b) = bos.first() {
        let bos_text = String::from_utf8_lossy(&model.token_bytes_special(b)).into_owned();
        if !bos_text.is_empty() && text.starts_with(&bos_text) {
            text.drain(..bos_text.len());
        }
    }
    Ok(text)
}

pub(crate) async fn oai_chat(State(app): AppState, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        let text = render_chat(&app, &m)?;
        request::fits_before_tokenizing(app.engine()?, text.len(), 0)?;
        let model = app.model()?.clone();
        let tokens = model.tokenize_ext(&text, true, true)?;
        if tokens.is_empty() {
            return Err(ApiError::bad("the rendered prompt is empty"));
        }
        let p = completion::prepare(&app, &m, Flavor::OaiChat, tokens, &headers)?;
        completion::run(app.clone(), p).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn apply_template(State(app): AppState, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({"prompt": render_chat(&app, &m)?}),
        ))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}
