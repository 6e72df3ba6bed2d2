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
use crate::engine::{apply_chat_template, builtin_chat_templates, chat_template_supported, Model};
use crate::error::{Error, Result};

/// The chat template `serve` was given: `--chat-template NAME` (one of
/// llama.cpp's built-in templates) or `--chat-template-file FILE` (a template
/// text llama.cpp's built-in engine recognises by its content; Jinja is not
/// run). `None`: neither given. Anything else is a start-up error naming the flag.
pub fn chat_template_option(
    name: Option<&str>,
    file: Option<&std::path::Path>,
) -> Result<Option<String>> {
    match (name, file) {
        (Some(_), Some(_)) => Err(Error::invalid(
            "--chat-template and --chat-template-file are mutually exclusive; pass one",
        )),
        (Some(n), None) => {
            let names = builtin_chat_templates();
            if names.iter().any(|x| x == n) {
                Ok(Some(n.to_string()))
            } else {
                Err(Error::invalid(format!(
                    "--chat-template '{n}' is not one of llama.cpp's built-in templates: {}",
                    names.join(", ")
                )))
            }
        }
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).map_err(|e| {
                Error::invalid(format!(
                    "--chat-template-file {}: cannot read it: {e}",
                    f.display()
                ))
            })?;
            if text.trim().is_empty() {
                return Err(Error::invalid(format!(
                    "--chat-template-file {}: the file is empty",
                    f.display()
                )));
            }
            if !chat_template_supported(&text) {
                return Err(Error::invalid(format!(
                    "--chat-template-file {}: latent-tap serve cannot run Jinja templates, and \
                     llama.cpp's built-in engine does not recognise this one; pass \
                     --chat-template NAME instead (one of: {})",
                    f.display(),
                    builtin_chat_templates().join(", ")
                )));
            }
            Ok(Some(text))
        }
        (None, None) => Ok(None),
    }
}

/// Said once at start-up when chat requests would not render as the model
/// expects: the model has no template (and none was given), or llama.cpp's
/// built-in engine does not recognise the model's.
pub(crate) fn template_warning(given: Option<&str>, model: &Model) -> Option<String> {
    if given.is_some() {
        return None;
    }
    match model.chat_template() {
        None => Some(
            "the model has no chat template: /v1/chat/completions renders messages as chatml; \
             pass --chat-template NAME (e.g. gemma, llama3) or --chat-template-file FILE"
                .into(),
        ),
        Some(t) if !chat_template_supported(&t) => Some(
            "llama.cpp's built-in engine does not recognise the model's chat template \
             (latent-tap serve cannot run Jinja): /v1/chat/completions will answer 400; \
             pass --chat-template NAME or --chat-template-file FILE"
                .into(),
        ),
        Some(_) => None,
    }
}

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
    let mut text = apply_chat_template(&app.chat_template(model), &msgs, add_gen)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_template_flags() {
        assert_eq!(chat_template_option(None, None).unwrap(), None);
        assert_eq!(
            chat_template_option(Some("gemma"), None)
                .unwrap()
                .as_deref(),
            Some("gemma")
        );
        let e = chat_template_option(Some("gemmaa"), None).unwrap_err();
        let m = e.message();
        assert!(
            m.contains("--chat-template 'gemmaa'") && m.contains("gemma, ") && m.contains("llama3"),
            "{m}"
        );
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.jinja");
        let m = chat_template_option(None, Some(&missing))
            .unwrap_err()
            .message()
            .to_string();
        assert!(
            m.starts_with("--chat-template-file ") && m.contains("cannot read"),
            "{m}"
        );
        // Gemma's Jinja template: recognised by content, used as given.
        let gemma = dir.path().join("gemma.jinja");
        let text = "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}";
        std::fs::write(&gemma, text).unwrap();
        assert_eq!(
            chat_template_option(None, Some(&gemma)).unwrap().as_deref(),
            Some(text)
        );
        let other = dir.path().join("other.jinja");
        std::fs::write(&other, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
        let m = chat_template_option(None, Some(&other))
            .unwrap_err()
            .message()
            .to_string();
        assert!(
            m.contains("--chat-template-file")
                && m.contains("Jinja")
                && m.contains("--chat-template NAME"),
            "{m}"
        );
        let empty = dir.path().join("empty.jinja");
        std::fs::write(&empty, "\n").unwrap();
        assert!(chat_template_option(None, Some(&empty)).is_err());
        let both = chat_template_option(Some("gemma"), Some(&gemma)).unwrap_err();
        assert!(both.message().contains("mutually exclusive"));
    }
}
