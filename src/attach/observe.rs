//! `latent-tap listen --serve`: HTTP for observers (tokio + axum, like
//! `latent-tap serve`): `GET /latents/subscribe` streams every tapped host's
//! records ([`super::hub`]), `GET /health` answers with the listener's state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use super::hub::{Hub, SubFilter};
use crate::error::{Error, ErrorKind, Result};
use crate::record::Dtype;
use crate::select::LayerFilter;
use crate::server::ApiError;

/// What the HTTP side shares with the listener.
#[derive(Debug)]
pub struct Observe {
    /// The subscribers.
    pub hub: Arc<Hub>,
    /// Hosts attached now.
    pub hosts: Arc<AtomicUsize>,
    /// Default subscriber queue, bytes.
    pub queue: usize,
}

/// Serve on `host:port` until `shutdown` resolves; `on_listen` gets the bound
/// address first. Runs its own tokio runtime on the calling thread.
pub fn serve(
    host: &str,
    port: u16,
    st: Arc<Observe>,
    on_listen: &mut dyn FnMut(Result<SocketAddr>),
    shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("latent-tap-listen-http")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            on_listen(Err(Error::new(
                ErrorKind::Internal,
                format!("tokio runtime: {e}"),
            )));
            return;
        }
    };
    rt.block_on(async move {
        let addr = format!("{host}:{port}");
        let listener = match tokio::net::TcpListener::bind(&addr).await {
            Ok(l) => l,
            Err(e) => {
                on_listen(Err(Error::new(
                    ErrorKind::Io,
                    format!("cannot listen on {addr}: {e}"),
                )));
                return;
            }
        };
        match listener.local_addr() {
            Ok(a) => on_listen(Ok(a)),
            Err(e) => {
                on_listen(Err(Error::new(ErrorKind::Io, format!("{addr}: {e}"))));
                return;
            }
        }
        let app = Router::new()
            .route("/health", get(health))
            .route("/latents/subscribe", get(subscribe))
            .with_state(st);
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.await;
            })
            .await;
    });
}

async fn health(State(st): State<Arc<Observe>>) -> Response {
    let body = json!({
        "status": "ok",
        "hosts": st.hosts.load(Ordering::Relaxed),
        "subscribers": st.hub.len(),
    });
    let mut r = (StatusCode::OK, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

async fn subscribe(
    State(st): State<Arc<Observe>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let r = (|| {
        for k in q.keys() {
            if !matches!(
                k.as_str(),
                "tensors" | "layers" | "rows" | "dtype" | "queue_mb"
            ) {
                return Err(ApiError::bad(format!("unknown subscribe parameter '{k}'")));
            }
        }
        let mut f = SubFilter::default();
        if let Some(t) = q.get("tensors") {
            f.patterns = t
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(l) = q.get("layers") {
            f.layers =
                Some(LayerFilter::parse(l).map_err(|e| ApiError::bad(format!("'layers': {e}")))?);
        }
        match q.get("rows").map(String::as_str) {
            None | Some("all") => {}
            Some("last") => f.last = true,
            Some(o) => {
                return Err(ApiError::bad(format!(
                    "'rows' must be all or last, not '{o}'"
                )))
            }
        }
        if let Some(d) = q.get("dtype") {
            f.dtype = Some(Dtype::parse(d).map_err(|e| ApiError::bad(format!("'dtype': {e}")))?);
        }
        let budget = match q.get("queue_mb") {
            None => st.queue,
            Some(s) => match s.parse::<usize>() {
                Ok(mb) if (1..=4096).contains(&mb) => mb << 20,
                _ => {
                    return Err(ApiError::bad(format!(
                        "'queue_mb' must be an integer in 1..=4096, not '{s}'"
                    )))
                }
            },
        };
        let (sink, resp) = crate::server::subscriber_channel(budget);
        st.hub.subscribe(f, sink);
        Ok::<_, ApiError>(resp)
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}
