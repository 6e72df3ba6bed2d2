//! llama-server's error shape: `{"error": {"code", "message", "type"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{Error, ErrorKind};

/// An HTTP error answered in llama-server's JSON shape.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// llama-server's `type` string.
    pub kind: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    /// 400 `invalid_request_error`.
    pub fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }

    /// `status` with type `invalid_request_error` (413, 408).
    pub fn with_status(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }

    /// True for the answers after which the request's body is left unread (a
    /// body over the limit, or one that did not arrive in time): the response
    /// says `Connection: close` and the connection ends after it.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
        )
    }

    /// 501 `not_supported_error`.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_IMPLEMENTED,
            kind: "not_supported_error",
            message: message.into(),
        }
    }

    /// 404 `not_found_error`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            message: message.into(),
        }
    }

    /// 503 `unavailable_error`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "unavailable_error",
            message: message.into(),
        }
    }

    /// 401 `authentication_error`.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            message: "Invalid API Key".into(),
        }
    }

    /// 500 `server_error`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: message.into(),
        }
    }

    /// 400 `exceed_context_size_error`: a prompt of `n_tokens` tokens (`at_least`:
    /// a lower bound, found without tokenizing) does not fit a slot of `n_ctx_slot`.
    pub(crate) fn exceeds_context(n_tokens: usize, at_least: bool, n_ctx_slot: u32) -> Self {
        let n = if at_least { "at least " } else { "" };
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "exceed_context_size_error",
            message: format!(
                "request ({n}{n_tokens} tokens) exceeds the available context size ({n_ctx_slot} tokens), try increasing it"
            ),
        }
    }

    /// A latent selection the graph cannot serve: 400, with where to look.
    pub(crate) fn latents(e: Error) -> Self {
        let hint = match e.kind() {
            ErrorKind::NoMatch => " (GET /latents/tensors lists every name)",
            ErrorKind::FrameTooLarge => " (the server's --ring-mb and --ubatch-size)",
            _ => "",
        };
        Self::bad(format!("latents: {}{hint}", e.message()))
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.status.as_u16(), "message": self.message, "type": self.kind}})
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e.kind() {
            ErrorKind::InvalidArgument | ErrorKind::NoMatch | ErrorKind::PromptTooLong => {
                Self::bad(e.message())
            }
            _ => Self::internal(e.message()),
        }
    }
}

/// llama-server's answer to a path it does not serve, and to a method a known
/// path does not take (`GET /completion`): 404 `File Not Found` in the error shape.
/// Both routers (`serve`, `listen --serve`) use it as `fallback` and
/// `method_not_allowed_fallback`.
pub(crate) async fn not_found() -> Response {
    ApiError::not_found("File Not Found").into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.closes_connection() {
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        r
    }
}
