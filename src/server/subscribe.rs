//! `GET /latents/subscribe`: every request's records, cut to the subscriber's
//! selection, through a bounded queue (also `latent-tap listen --serve`'s).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::request;
use super::wire::{self, FRAMES_MEDIA_TYPE};
use super::AppState;
use crate::sched::{Offer, SubscriberSink};

/// A subscriber's queue: frames are refused beyond `budget` queued bytes (and
/// counted as drops); a consumer that falls 4× behind is cut off.
struct ChannelSink {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    budget: usize,
}

impl SubscriberSink for ChannelSink {
    fn has_room(&self, len: usize) -> bool {
        self.queued.load(Ordering::Relaxed) + len <= self.budget
    }

    fn offer(&mut self, rec: Vec<u8>, droppable: bool) -> Offer {
        if self.tx.is_closed() {
            return Offer::Closed;
        }
        let q = self.queued.load(Ordering::Relaxed);
        if droppable && q + rec.len() > self.budget {
            return Offer::Full;
        }
        if q > self.budget.saturating_mul(4) {
            return Offer::Closed;
        }
        let b = Bytes::from(wire::framed(&rec));
        self.queued.fetch_add(b.len(), Ordering::Relaxed);
        if self.tx.send(b).is_err() {
            return Offer::Closed;
        }
        Offer::Taken
    }
}

pub(crate) async fn subscribe(
    State(app): AppState,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let r = (|| {
        let engine = app.engine()?;
        for k in q.keys() {
            if !matches!(
                k.as_str(),
                "tensors" | "layers" | "rows" | "dtype" | "queue_mb"
            ) {
                return Err(ApiError::bad(format!("unknown subscribe parameter '{k}'")));
            }
        }
        let req = request::latent_request(
            q.get("tensors").map(String::as_str),
            q.get("layers").map(String::as_str),
            q.get("rows").map(String::as_str),
            q.get("dtype").map(String::as_str),
        )?;
        let budget = match q.get("queue_mb") {
            None => app.cfg.subscriber_queue,
            Some(s) => match s.parse::<usize>() {
                Ok(mb) if (1..=4096).contains(&mb) => mb << 20,
                _ => {
                    return Err(ApiError::bad(format!(
                        "'queue_mb' must be an integer in 1..=4096, not '{s}'"
                    )))
                }
            },
        };
        let filter = engine.compile(&req).map_err(ApiError::latents)?;
        let (sink, resp) = subscriber_channel(budget);
        engine.subscribe(filter, sink)?;
        Ok::<_, ApiError>(resp)
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

/// A subscriber's sink (queue of `budget` bytes) and the response that streams
/// what it takes (also `latent-tap listen`'s subscribe endpoint).
pub(crate) fn subscriber_channel(budget: usize) -> (Box<dyn SubscriberSink>, Response) {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let queued = Arc::new(AtomicUsize::new(0));
    let sink = Box::new(ChannelSink {
        tx,
        queued: queued.clone(),
        budget,
    });
    let s = futures_util::stream::unfold((rx, queued), |(mut rx, queued)| async move {
        let b = rx.recv().await?;
        queued.fetch_sub(b.len(), Ordering::Relaxed);
        Some((Ok::<_, Infallible>(b), (rx, queued)))
    });
    let mut resp = Response::new(Body::from_stream(s));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(FRAMES_MEDIA_TYPE),
    );
    (sink, resp)
}
