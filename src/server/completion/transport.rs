//! The streaming answers of a completion: SSE chunks (`stream: true`) and the
//! binary record stream (`Accept: application/vnd.latent-tap.frames`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::acc::Acc;
use super::budget::{Events, Window};
use super::format::{add_latents_skipped, final_object, native_final, oai_final};
use super::lens::lens_json;
use super::prepare::{CancelGuard, Flavor, Prepared};
use crate::engine::Token;
use crate::lens::Lens;
use crate::record::RequestRecord;
use crate::sched::FrameOut;
use crate::sched::JobEvent;
use crate::server::mem;
use crate::server::wire::{self, FRAMES_MEDIA_TYPE};
use crate::server::{fingerprint, unix_now, App};

/// The sending side of a streamed answer: what waits to be written counts in
/// the request's [`Window`] until the body hands it to the connection.
struct Out {
    tx: mpsc::Sender<Bytes>,
    window: Arc<Window>,
}

impl Out {
    async fn send(&self, b: Bytes) -> Result<(), ()> {
        let n = b.len();
        // Counted, not refused: only the router's side cuts a slow reader off.
        let _ = self.window.add(n);
        self.tx.send(b).await.map_err(|_| self.window.sub(n))
    }
}

/// A streamed answer's body and its sender; `depth` chunks may wait.
fn stream_body(depth: usize, window: Arc<Window>) -> (Out, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(depth);
    let w = window.clone();
    let s = futures_util::stream::unfold(rx, move |mut rx| {
        let w = w.clone();
        async move {
            let b = rx.recv().await?;
            w.sub(b.len());
            Some((Ok::<_, Infallible>(b), rx))
        }
    });
    (Out { tx, window }, Body::from_stream(s))
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        serde_json::to_string(v).unwrap_or_default()
    ))
}

/// Builds one request's SSE chunks in llama-server's shapes.
struct Chunks<'a> {
    app: &'a App,
    p: &'a Prepared,
    created: u64,
    sent_role: bool,
}

impl Chunks<'_> {
    /// An OpenAI chunk around `choices`.
    fn base(&self, choices: Value) -> Value {
        let object = if self.p.flavor == Flavor::OaiChat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({
            "choices": choices,
            "created": self.created,
            "id": self.p.id,
            "model": self.app.model_name,
            "system_fingerprint": fingerprint(),
            "object": object,
        })
    }

    /// The chunks that carry `delta` (the text a token released, or text held
    /// back until the end), the token that produced it, its probabilities and
    /// its step's latents. Each token and each piece of text is sent once, so
    /// the chunks concatenate to the non-streamed answer.
    fn partial(
        &mut self,
        acc: &Acc,
        delta: &str,
        token: Option<Token>,
        prob: Option<&Value>,
        latents: Option<Value>,
        lens: Option<Value>,
    ) -> Vec<Value> {
        let mut chunks = Vec::new();
        match self.p.flavor {
            Flavor::Native => {
                let mut c = json!({
                    "index": 0,
                    "content": delta,
                    "tokens": token.into_iter().collect::<Vec<_>>(),
                    "stop": false,
                    "id_slot": acc.slot,
                    "tokens_predicted": acc.n_gen(),
                    "tokens_evaluated": acc.n_prompt,
                });
                if let Some(pr) = prob {
                    c["completion_probabilities"] = json!([pr]);
                }
                chunks.push(c);
            }
            Flavor::OaiCmpl => {
                let lp = prob.map(|pr| json!({"content": [pr]}));
                chunks.push(self.base(
                    json!([{"text": delta, "index": 0, "logprobs": lp, "finish_reason": null}]),
                ));
            }
            Flavor::OaiChat => {
                if !self.sent_role {
                    self.sent_role = true;
                    chunks.push(self.base(json!([{"finish_reason": null, "index": 0, "delta": {"role": "assistant", "content": null}}])));
                }
                // A token whose text is held back still sends its logprobs and latents.
                if !delta.is_empty() || prob.is_some() || latents.is_some() || lens.is_some() {
                    let mut c = self.base(
                        json!([{"finish_reason": null, "index": 0, "delta": {"content": delta}}]),
                    );
                    if let Some(pr) = prob {
                        c["choices"][0]["logprobs"] = json!({"content": [pr]});
                    }
                    chunks.push(c);
                }
            }
        }
        if let (Some(l), Some(last)) = (latents, chunks.last_mut()) {
            last["latents"] = l;
        }
        if let (Some(l), Some(last)) = (lens, chunks.last_mut()) {
            last["lens"] = l;
        }
        chunks
    }

    /// The closing chunks: llama-server's final object (no text or tokens of
    /// its own), with the latents no token carried.
    fn finals(&self, acc: &Acc, latents: Option<Value>, lens: Option<Value>) -> Vec<Value> {
        let mut finals = Vec::new();
        match self.p.flavor {
            Flavor::Native => finals.push(native_final(self.app, self.p, acc, true)),
            Flavor::OaiCmpl => finals.push(oai_final(self.app, self.p, acc, true)),
            Flavor::OaiChat => {
                let mut v = self
                    .base(json!([{"finish_reason": acc.finish_reason(), "index": 0, "delta": {}}]));
                add_latents_skipped(self.p, &mut v);
                finals.push(v);
            }
        }
        if let (Some(l), Some(first)) = (latents, finals.first_mut()) {
            first["latents"] = l;
        }
        if let (Some(l), Some(first)) = (lens, finals.first_mut()) {
            first["lens"] = l;
        }
        if self.p.flavor == Flavor::OaiChat {
            if self.p.include_usage {
                let mut u = self.base(json!([]));
                u["usage"] = acc.usage();
                finals.push(u);
            }
            if let Some(last) = finals.last_mut() {
                last["timings"] = acc.timings();
            }
        }
        finals
    }
}

/// The `lens` object of `frames` (`None` without a lens or rows).
async fn step_lens(
    lens: &Option<Arc<Lens>>,
    p: &Prepared,
    acc: &Acc,
    frames: Vec<FrameOut>,
) -> Result<Option<Value>, crate::server::error::ApiError> {
    match (lens, &p.lens) {
        (Some(l), Some(plan)) if !frames.is_empty() => Ok(Some(
            lens_json(
                l.clone(),
                plan.clone(),
                acc.model.clone(),
                frames,
                acc.all_tokens(),
            )
            .await?,
        )),
        _ => Ok(None),
    }
}

pub(super) fn sse_response(
    app: Arc<App>,
    p: Prepared,
    guard: CancelGuard,
    mut rx: Events,
    lens: Option<Arc<Lens>>,
) -> Response {
    let (out, body) = stream_body(64, rx.window.clone());
    tokio::spawn(async move {
        let Ok(mut acc) = Acc::new(&app, &p) else {
            return;
        };
        let mut chunks = Chunks {
            app: &app,
            p: &p,
            created: unix_now(),
            sent_role: false,
        };
        while let Some(ev) = rx.recv().await {
            let done = matches!(ev, JobEvent::Done(_));
            if let Some(mut s) = acc.on(ev, &guard) {
                let latents = (!s.frames.is_empty()).then(|| wire::latents_json(&s.frames));
                let lens_v =
                    match step_lens(&lens, &p, &acc, std::mem::take(&mut s.lens_frames)).await {
                        Ok(v) => v,
                        Err(e) => {
                            let _ = out.send(sse(&e.body())).await;
                            return;
                        }
                    };
                let cs = chunks.partial(
                    &acc,
                    &s.delta,
                    Some(s.token),
                    s.prob.as_ref(),
                    latents,
                    lens_v,
                );
                for c in &cs {
                    if out.send(sse(c)).await.is_err() {
                        return; // client gone: the guard cancels the job
                    }
                }
            }
            if done {
                break;
            }
        }
        mem::trim_after(acc.seen);
        if let Some(e) = acc.error() {
            let _ = out.send(sse(&e.body())).await;
            return;
        }
        // Text held back (a possible stop string, incomplete UTF-8) is sent in a
        // chunk of its own: the final object has none, as llama-server's.
        let tail = acc.text.finish();
        let mut all = Vec::new();
        if !tail.is_empty() {
            all.extend(chunks.partial(&acc, &tail, None, None, None, None));
        }
        let leftover = std::mem::take(&mut acc.pending);
        let latents = (!leftover.is_empty()).then(|| wire::latents_json(&leftover));
        let lens_left = std::mem::take(&mut acc.lens_pending);
        let lens_v = match step_lens(&lens, &p, &acc, lens_left).await {
            Ok(v) => v,
            Err(e) => {
                let _ = out.send(sse(&e.body())).await;
                return;
            }
        };
        all.extend(chunks.finals(&acc, latents, lens_v));
        for v in &all {
            if out.send(sse(v)).await.is_err() {
                return;
            }
        }
        if p.flavor != Flavor::Native {
            let _ = out.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        }
        drop(guard);
    });
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Bytes of ready records a binary answer gathers into one chunk at most.
const BATCH_BYTES: usize = 1 << 20;

fn request_record(id: u64, slot: i64, event: u32, n_tokens: u64) -> Vec<u8> {
    RequestRecord::notice(id, slot as i32, event, n_tokens, 0)
}

pub(super) fn binary_response(
    app: Arc<App>,
    p: Prepared,
    guard: CancelGuard,
    mut rx: Events,
    lens: Option<Arc<Lens>>,
) -> Response {
    let (out, body) = stream_body(256, rx.window.clone());
    tokio::spawn(async move {
        let Ok(mut acc) = Acc::new(&app, &p) else {
            return;
        };
        let id = guard.0.id;
        let mut frames = 0u64;
        let mut seen = 0usize;
        // Records that are ready go out together: whatever arrived while the
        // last chunk was written is one chunk (one wake-up of the connection,
        // one write), flushed as soon as no event is waiting, or at BATCH_BYTES.
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let ev = match rx.try_recv() {
                Some(ev) => ev,
                None => {
                    if !pending.is_empty()
                        && out
                            .send(Bytes::from(std::mem::take(&mut pending)))
                            .await
                            .is_err()
                    {
                        return;
                    }
                    match rx.recv().await {
                        Some(ev) => ev,
                        None => break,
                    }
                }
            };
            if pending.len() >= BATCH_BYTES
                && out
                    .send(Bytes::from(std::mem::take(&mut pending)))
                    .await
                    .is_err()
            {
                return;
            }
            // The requester's frames go out as they come, never held; only a
            // lens's rows wait in `acc` for their step's token.
            if let JobEvent::Frame(f) = ev {
                seen += f.data.len();
                // After a stop string, later steps are not part of the answer (as in JSON/SSE).
                if acc.text.stopped.is_none() {
                    acc.keep_lens_frame(&f);
                    if let Some(mut rec) = acc.user_record(&f) {
                        // `seq` counts this answer's frames (a gap means drops,
                        // docs/PROTOCOL.md): the job's counter also counts the
                        // rows a lens reads that the requester did not ask for.
                        let at = std::mem::offset_of!(crate::record::FrameHeader, seq);
                        rec[at..at + 8].copy_from_slice(&frames.to_le_bytes());
                        frames += 1;
                        drop(f);
                        wire::push_framed(&mut pending, &rec);
                    }
                }
                continue;
            }
            let rec = match &ev {
                JobEvent::Started { slot } => {
                    Some(request_record(id, *slot as i64, 1, p.tokens.len() as u64))
                }
                JobEvent::Frame(_) => None,
                JobEvent::Token(t) if acc.text.stopped.is_none() => Some(t.to_record()),
                JobEvent::Token(_) => None,
                JobEvent::Done(_) => None,
            };
            let done = matches!(ev, JobEvent::Done(_));
            let step = acc.on(ev, &guard);
            if let Some(r) = rec {
                wire::push_framed(&mut pending, &r);
            }
            let mut lens_frames = step.map(|s| s.lens_frames).unwrap_or_default();
            if done {
                lens_frames.append(&mut acc.lens_pending);
            }
            match step_lens(&lens, &p, &acc, lens_frames).await {
                Ok(Some(v)) => wire::push_framed(&mut pending, &wire::lens_record(&v)),
                Ok(None) => {}
                Err(e) => {
                    wire::push_framed(&mut pending, &wire::json_record(&e.body()));
                    let _ = out.send(Bytes::from(pending)).await;
                    return;
                }
            }
            if done {
                break;
            }
        }
        mem::trim_after(seen);
        let _ = acc.text.finish();
        let mut summary = final_object(&app, &p, &acc);
        if let Some(e) = acc.error() {
            summary = e.body();
        }
        for r in [
            request_record(id, acc.slot, 2, acc.n_gen() as u64),
            wire::end_record(frames, 0),
            wire::json_record(&summary),
        ] {
            wire::push_framed(&mut pending, &r);
        }
        if out.send(Bytes::from(pending)).await.is_err() {
            return;
        }
        drop(guard);
    });
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(FRAMES_MEDIA_TYPE),
    );
    r
}
