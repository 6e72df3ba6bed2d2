//! `GET /latents/subscribe`: every request's records, cut to the subscriber's
//! selection, through a bounded queue (also `latent-tap listen --serve`'s).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::request;
use super::wire::{self, FRAMES_MEDIA_TYPE};
use super::AppState;
use crate::sched::{Offer, SubscriberSink};

/// A subscriber's queue (`serve` and `listen --serve`): records wait here,
/// length-prefixed, until the response streams them. Droppable records (frames)
/// are refused beyond `budget` queued bytes, prefixes included (and counted as
/// drops by the caller); a consumer more than 4 × `budget` behind is cut off.
struct SubscriberQueue {
    tx: mpsc::UnboundedSender<Bytes>,
    /// Bytes sent and not yet streamed, prefixes included.
    queued: Arc<AtomicUsize>,
    budget: usize,
}

impl SubscriberQueue {
    /// A queue of `budget` bytes, the receiving end and its byte count.
    fn new(budget: usize) -> (Self, mpsc::UnboundedReceiver<Bytes>, Arc<AtomicUsize>) {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = Self {
            tx,
            queued: queued.clone(),
            budget,
        };
        (q, rx, queued)
    }

    /// Whether a record of `len` bytes fits now: it takes `len` plus its prefix.
    /// [`SubscriberSink::has_room`] and [`SubscriberSink::offer`] both ask this.
    fn fits(&self, len: usize) -> bool {
        self.queued.load(Ordering::Relaxed) + wire::LEN_PREFIX + len <= self.budget
    }
}

impl SubscriberSink for SubscriberQueue {
    fn has_room(&self, len: usize) -> bool {
        self.fits(len)
    }

    fn drained(&self) -> bool {
        self.queued.load(Ordering::Relaxed) <= self.budget / 2
    }

    fn offer(&mut self, rec: Vec<u8>, droppable: bool) -> Offer {
        if self.tx.is_closed() {
            return Offer::Closed;
        }
        if droppable && !self.fits(rec.len()) {
            return Offer::Full;
        }
        if self.queued.load(Ordering::Relaxed) > self.budget.saturating_mul(4) {
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

/// A `GET /latents/subscribe` query, checked (`latent-tap serve` and
/// `latent-tap listen --serve` alike): the selection as in the `latents` object,
/// unset fields left to the endpoint's defaults, and the queue size.
#[derive(Debug)]
pub(crate) struct SubscribeQuery {
    /// `tensors`, `layers`, `rows`, `dtype`.
    pub(crate) latents: request::LatentFields,
    /// Queue budget in bytes (`queue_mb`, or the server's default).
    pub(crate) queue: usize,
}

/// The subscribe query as axum extracts it; a rejection is answered by
/// [`SubscribeQuery::extract`] in the JSON error shape, not axum's plain text.
pub(crate) type RawQuery = Result<Query<HashMap<String, String>>, QueryRejection>;

impl SubscribeQuery {
    /// [`SubscribeQuery::parse`] on an extracted query string; a query axum
    /// cannot read is a 400 like any other bad parameter.
    pub(crate) fn extract(q: RawQuery, default_queue: usize) -> Result<Self, ApiError> {
        let Query(q) =
            q.map_err(|e| ApiError::bad(format!("bad query string: {}", e.body_text())))?;
        Self::parse(&q, default_queue)
    }

    /// Parse the query string's parameters; `default_queue` (bytes) when
    /// `queue_mb` is absent. Unknown parameters and bad values are 400s.
    pub(crate) fn parse(
        q: &HashMap<String, String>,
        default_queue: usize,
    ) -> Result<Self, ApiError> {
        for k in q.keys() {
            if !matches!(
                k.as_str(),
                "tensors" | "layers" | "rows" | "dtype" | "queue_mb"
            ) {
                return Err(ApiError::bad(format!("unknown subscribe parameter '{k}'")));
            }
        }
        let get = |k: &str| q.get(k).map(String::as_str);
        let latents =
            request::LatentFields::parse(get("tensors"), get("layers"), get("rows"), get("dtype"))?;
        let queue = match get("queue_mb") {
            None => default_queue,
            Some(s) => match s.parse::<usize>() {
                Ok(mb) if (1..=4096).contains(&mb) => mb << 20,
                _ => {
                    return Err(ApiError::bad(format!(
                        "'queue_mb' must be an integer in 1..=4096, not '{s}'"
                    )))
                }
            },
        };
        Ok(Self { latents, queue })
    }
}

pub(crate) async fn subscribe(State(app): AppState, q: RawQuery) -> Response {
    let r = (|| {
        let engine = app.engine()?;
        let q = SubscribeQuery::extract(q, app.cfg.subscriber_queue)?;
        let filter = engine
            .compile(&q.latents.request())
            .map_err(ApiError::latents)?;
        let (sink, resp) = subscriber_channel(q.queue);
        engine.subscribe(filter, sink)?;
        Ok::<_, ApiError>(resp)
    })();
    r.unwrap_or_else(IntoResponse::into_response)
}

/// A subscriber's sink (queue of `budget` bytes) and the response that streams
/// what it takes (also `latent-tap listen`'s subscribe endpoint).
pub(crate) fn subscriber_channel(budget: usize) -> (Box<dyn SubscriberSink>, Response) {
    let (q, rx, queued) = SubscriberQueue::new(budget);
    let sink = Box::new(q);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Rows;
    use crate::record::Dtype;

    fn parse(pairs: &[(&str, &str)]) -> Result<SubscribeQuery, ApiError> {
        let q = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SubscribeQuery::parse(&q, 7)
    }

    /// Regression: `has_room` counted a record without its length prefix while
    /// `offer` queued it with one, so a frame `has_room` accepted could take the
    /// queue past its budget. Both now ask the same question, at the byte.
    #[test]
    fn has_room_and_offer_agree_at_the_budget() {
        let budget = 100;
        let (mut q, mut rx, queued) = SubscriberQueue::new(budget);
        let fit = budget - wire::LEN_PREFIX;
        assert!(q.has_room(fit));
        assert!(!q.has_room(fit + 1));
        assert_eq!(q.offer(vec![0; fit + 1], true), Offer::Full);
        assert_eq!(queued.load(Ordering::Relaxed), 0);
        assert_eq!(q.offer(vec![0; fit], true), Offer::Taken);
        assert_eq!(queued.load(Ordering::Relaxed), budget, "full, not past it");
        assert!(!q.has_room(0));
        assert_eq!(q.offer(vec![], true), Offer::Full);
        // Notices and tokens are never dropped.
        assert_eq!(q.offer(vec![1; 8], false), Offer::Taken);
        assert_eq!(rx.try_recv().unwrap().len(), budget);
        assert_eq!(
            rx.try_recv().unwrap()[..],
            [8, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
        );

        // Part-full: the boundary moves by what is queued.
        let (mut q, _rx, queued) = SubscriberQueue::new(budget);
        assert_eq!(q.offer(vec![0; 10], true), Offer::Taken);
        let left = budget - queued.load(Ordering::Relaxed) - wire::LEN_PREFIX;
        assert!(q.has_room(left) && !q.has_room(left + 1));
        assert_eq!(q.offer(vec![0; left + 1], true), Offer::Full);
        assert_eq!(q.offer(vec![0; left], true), Offer::Taken);
        assert_eq!(queued.load(Ordering::Relaxed), budget);
    }

    #[test]
    fn subscriber_queue_closes() {
        // 4 × budget behind: cut off.
        let (mut q, _rx, queued) = SubscriberQueue::new(10);
        queued.store(41, Ordering::Relaxed);
        assert_eq!(q.offer(vec![0], false), Offer::Closed);
        // The response (receiver) is gone.
        let (mut q, rx, _) = SubscriberQueue::new(10);
        drop(rx);
        assert_eq!(q.offer(vec![0], false), Offer::Closed);
    }

    #[test]
    fn subscribe_query_defaults_and_values() {
        let q = parse(&[]).unwrap();
        assert_eq!(q.queue, 7);
        assert!(q.latents.tensors.is_none() && q.latents.layers.is_none());
        assert!(q.latents.rows.is_none() && q.latents.dtype.is_none());
        assert!(q.latents.patterns().is_empty());
        // serve's defaults are the `latents` object's.
        let r = q.latents.request();
        assert_eq!(r.patterns, ["l_out-*"]);
        assert_eq!((r.rows, r.dtype), (Rows::All, Dtype::F32));

        let q = parse(&[
            ("tensors", "l_out-*, attn_out-3"),
            ("layers", "0..2"),
            ("rows", "last"),
            ("dtype", "f16"),
            ("queue_mb", "2"),
        ])
        .unwrap();
        assert_eq!(q.queue, 2 << 20);
        assert_eq!(q.latents.patterns(), ["l_out-*", "attn_out-3"]);
        let layers = q.latents.layers.as_ref().unwrap();
        assert!(layers.contains(1) && !layers.contains(2));
        assert_eq!(q.latents.rows, Some(Rows::Last));
        assert_eq!(q.latents.dtype, Some(Dtype::F16));
        assert_eq!(parse(&[("queue_mb", "4096")]).unwrap().queue, 4096 << 20);
    }

    #[test]
    fn subscribe_query_refusals() {
        for (k, v, says) in [
            ("bogus", "1", "unknown subscribe parameter 'bogus'"),
            ("queue_mb", "0", "'queue_mb'"),
            ("queue_mb", "4097", "'queue_mb'"),
            ("queue_mb", "x", "'queue_mb'"),
            ("rows", "first", "'rows'"),
            ("dtype", "f64", "'dtype'"),
            ("layers", "x", "'layers'"),
            ("tensors", "a,,b", "empty pattern"),
            ("tensors", "", "empty pattern"),
        ] {
            let e = parse(&[(k, v)]).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{k}={v}");
            assert!(e.message.contains(says), "{k}={v}: {}", e.message);
        }
    }
}
