//! `GET /`: the lens page ([`crate::view`]), an example client of the public API.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

/// The page, its assets inline. The server does not cache it for clients
/// beyond revalidation (`no-cache`): the page changes with the binary. It may
/// load nothing from elsewhere (the CSP) and talks only to this server.
pub(crate) async fn index() -> Response {
    static PAGE: OnceLock<String> = OnceLock::new();
    let body = PAGE.get_or_init(crate::view::page).clone();
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'",
        ),
    );
    r
}
