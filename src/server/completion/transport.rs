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
use super::format::{add_latents_skipped, native_final, oai_final};
use super::prepare::{CancelGuard, Flavor, Prepared};
use crate::record::RequestRecord;
use crate::sched::JobEvent;
use crate::server::wire::{self, FRAMES_MEDIA_TYPE};
use crate::server::{fingerprint, unix_now, App};

fn stream_body(rx: mpsc::Receiver<Bytes>) -> Body {
    let s = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Body::from_stream(s)
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        serde_json::to_string(v).unwrap_or_default()
    ))
}

pub(super) fn sse_response(
    app: Arc<App>,
    p: Prepared,
    guard: CancelGuard,
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
) -> Response {
    let (out, body_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let Ok(mut acc) = Acc::new(&app, &p) else {
            return;
        };
        let created = unix_now();
        let chunk_base = |choices: Value| {
            json!({
                "choices": choices,
                "created": created,
                "id": p.id,
                "model": app.model_name,
                "system_fingerprint": fingerprint(),
                "object": if p.flavor == Flavor::OaiChat { "chat.completion.chunk" } else { "text_completion" },
            })
        };
        let mut sent_role = false;
        while let Some(ev) = rx.recv().await {
            let done = matches!(ev, JobEvent::Done(_));
            let step = acc.on(ev, &guard);
            if let Some(s) = step {
                let latents = (!s.frames.is_empty()).then(|| wire::latents_json(&s.frames));
                let mut chunks = Vec::new();
                match p.flavor {
                    Flavor::Native => {
                        let mut c = json!({
                            "index": 0,
                            "content": s.delta,
                            "tokens": [s.token],
                            "stop": false,
                            "id_slot": -1,
                            "tokens_predicted": acc.n_gen(),
                            "tokens_evaluated": acc.n_prompt,
                        });
                        if let Some(pr) = &s.prob {
                            c["completion_probabilities"] = json!([pr]);
                        }
                        chunks.push(c);
                    }
                    Flavor::OaiCmpl => {
                        let lp = s.prob.as_ref().map(|pr| json!({"content": [pr]}));
                        chunks.push(chunk_base(json!([{"text": s.delta, "index": 0, "logprobs": lp, "finish_reason": null}])));
                    }
                    Flavor::OaiChat => {
                        if !sent_role {
                            sent_role = true;
                            chunks.push(chunk_base(json!([{"finish_reason": null, "index": 0, "delta": {"role": "assistant", "content": null}}])));
                        }
                        if !s.delta.is_empty() || latents.is_some() {
                            let mut c = chunk_base(
                                json!([{"finish_reason": null, "index": 0, "delta": {"content": s.delta}}]),
                            );
                            if let Some(pr) = &s.prob {
                                c["choices"][0]["logprobs"] = json!({"content": [pr]});
                            }
                            chunks.push(c);
                        }
                    }
                }
                if let (Some(l), Some(last)) = (latents, chunks.last_mut()) {
                    last["latents"] = l;
                }
                for c in &chunks {
                    if out.send(sse(c)).await.is_err() {
                        return; // client gone: the guard cancels the job
                    }
                }
            }
            if done {
                break;
            }
        }
        if let Some(e) = acc.error() {
            let _ = out.send(sse(&e.body())).await;
            return;
        }
        let tail = acc.text.finish();
        let leftover = std::mem::take(&mut acc.pending);
        let latents = (!leftover.is_empty()).then(|| wire::latents_json(&leftover));
        let mut finals = Vec::new();
        match p.flavor {
            Flavor::Native => {
                let mut v = native_final(&app, &p, &acc, &tail, false);
                if let Some(l) = latents {
                    v["latents"] = l;
                }
                finals.push(v);
            }
            Flavor::OaiCmpl => {
                let mut v = oai_final(&app, &p, &acc, &tail);
                v["choices"][0]["logprobs"] = Value::Null;
                if let Some(l) = latents {
                    v["latents"] = l;
                }
                finals.push(v);
            }
            Flavor::OaiChat => {
                if !tail.is_empty() {
                    finals.push(chunk_base(
                        json!([{"finish_reason": null, "index": 0, "delta": {"content": tail}}]),
                    ));
                }
                let mut v = chunk_base(
                    json!([{"finish_reason": acc.finish_reason(), "index": 0, "delta": {}}]),
                );
                if let Some(l) = latents {
                    v["latents"] = l;
                }
                add_latents_skipped(&p, &mut v);
                finals.push(v);
                if p.include_usage {
                    let mut u = chunk_base(json!([]));
                    u["usage"] = acc.usage();
                    finals.push(u);
                }
                if let Some(last) = finals.last_mut() {
                    last["timings"] = acc.timings();
                }
            }
        }
        for v in &finals {
            if out.send(sse(v)).await.is_err() {
                return;
            }
        }
        if p.flavor != Flavor::Native {
            let _ = out.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        }
        drop(guard);
    });
    let mut r = Response::new(stream_body(body_rx));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

fn request_record(id: u64, slot: i64, event: u32, n_tokens: u64) -> Vec<u8> {
    RequestRecord::notice(id, slot as i32, event, n_tokens, 0)
}

pub(super) fn binary_response(
    app: Arc<App>,
    p: Prepared,
    guard: CancelGuard,
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
) -> Response {
    let (out, body_rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(async move {
        let Ok(mut acc) = Acc::new(&app, &p) else {
            return;
        };
        let id = guard.0.id;
        let mut frames = 0u64;
        while let Some(ev) = rx.recv().await {
            let rec = match &ev {
                JobEvent::Started { slot } => {
                    Some(request_record(id, *slot as i64, 1, p.tokens.len() as u64))
                }
                // After a stop string, later steps are not part of the answer (as in JSON/SSE).
                JobEvent::Frame(f) if acc.text.stopped.is_none() => {
                    frames += 1;
                    Some(f.to_record())
                }
                JobEvent::Frame(_) => None,
                JobEvent::Token(t) if acc.text.stopped.is_none() => Some(t.to_record()),
                JobEvent::Token(_) => None,
                JobEvent::Done(_) => None,
            };
            let done = matches!(ev, JobEvent::Done(_));
            acc.on(ev, &guard);
            if let Some(r) = rec {
                if out.send(Bytes::from(wire::framed(&r))).await.is_err() {
                    return;
                }
            }
            if done {
                break;
            }
        }
        let _ = acc.text.finish();
        let content = acc.text.content().to_string();
        let mut summary = match p.flavor {
            Flavor::Native => native_final(&app, &p, &acc, &content, true),
            _ => oai_final(&app, &p, &acc, &content),
        };
        if let Some(e) = acc.error() {
            summary = e.body();
        }
        let tail = [
            request_record(id, acc.slot, 2, acc.n_gen() as u64),
            wire::end_record(frames, 0),
            wire::json_record(&summary),
        ];
        for r in tail {
            if out.send(Bytes::from(wire::framed(&r))).await.is_err() {
                return;
            }
        }
        drop(guard);
    });
    let mut r = Response::new(stream_body(body_rx));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(FRAMES_MEDIA_TYPE),
    );
    r
}
