//! `/tokenize` and `/detokenize`.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::error::ApiError;
use super::request;
use super::{json_response, read_body, AppState};
use crate::engine::{Model, Token};

pub(crate) async fn tokenize(State(app): AppState, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        let model = app.model()?.clone();
        let add_special = request::boolean(&m, "add_special")?.unwrap_or(false);
        let parse_special = request::boolean(&m, "parse_special")?.unwrap_or(true);
        let with_pieces = request::boolean(&m, "with_pieces")?.unwrap_or(false);
        let toks = match request::string(&m, "content")? {
            None => Vec::new(),
            Some(s) => model.tokenize_ext(s, add_special, parse_special)?,
        };
        let tokens: Vec<Value> = if with_pieces {
            toks.iter()
                .map(|&t| {
                    let b = model.token_bytes_special(t);
                    let piece = match String::from_utf8(b) {
                        Ok(s) => json!(s),
                        Err(e) => json!(e.into_bytes()),
                    };
                    json!({"id": t, "piece": piece})
                })
                .collect()
        } else {
            toks.iter().map(|&t| json!(t)).collect()
        };
        Ok::<_, ApiError>(json_response(StatusCode::OK, &json!({"tokens": tokens})))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) async fn detokenize(State(app): AppState, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&app, body).await?;
        let m = request::object(&bytes)?;
        let model = app.model()?.clone();
        let n_vocab = model.n_vocab() as i64;
        let toks: Vec<Token> = match m.get("tokens") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v.as_i64() {
                    Some(t) if (0..n_vocab).contains(&t) => Ok(t as Token),
                    _ => Err(ApiError::bad(format!(
                        "'tokens' must be token ids in 0..{n_vocab}"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(ApiError::bad("'tokens' must be an array of token ids")),
        };
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &json!({"content": detok_special(&model, &toks)}),
        ))
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub(crate) fn detok_special(model: &Model, toks: &[Token]) -> String {
    let bytes: Vec<u8> = toks
        .iter()
        .flat_map(|&t| model.token_bytes_special(t))
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
