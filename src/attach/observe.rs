//! `latent-tap listen --serve`: HTTP for observers (tokio + axum, like
//! `latent-tap serve`): `GET /latents/subscribe` streams every tapped host's
//! records ([`super::hub`]), `GET /health` answers with the listener's state.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use super::hub::{Hub, SubFilter};
use crate::capture::Rows;
use crate::error::{Error, ErrorKind, Result};
use crate::server::{json_response, not_found, subscriber_channel, RawQuery, SubscribeQuery};

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
            .fallback(not_found)
            .method_not_allowed_fallback(not_found)
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
    json_response(StatusCode::OK, &body)
}

async fn subscribe(State(st): State<Arc<Observe>>, q: RawQuery) -> Response {
    let q = match SubscribeQuery::extract(q, st.queue) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    // As the host sent them unless asked: every tensor, every row, its dtype.
    let f = SubFilter {
        patterns: q.latents.patterns(),
        last: q.latents.rows == Some(Rows::Last),
        layers: q.latents.layers,
        dtype: q.latents.dtype,
    };
    let (sink, resp) = subscriber_channel(q.queue);
    st.hub.subscribe(f, sink);
    resp
}
