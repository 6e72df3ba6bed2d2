//! `latent-tap serve` where llama-server's own behaviour is the reference:
//! streamed chunks that concatenate to the non-streamed answer (no token or
//! text twice), a wrong method on a known path (404 in the JSON error shape),
//! clients that half-close their connection, and chat templates
//! (`--chat-template`, `--chat-template-file`).

mod common;
use common::http::{call, get, json_of, post, sse_events, Server};
use common::{bin, real_model, synth_model};

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One answer's (text, tokens, probabilities) as llama-server shapes it, from a
/// non-streamed object or one SSE event of any completion endpoint.
fn parts(v: &Value) -> (String, Vec<Value>, Vec<Value>) {
    let arr = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let choice = &v["choices"][0];
    if v.get("choices").is_none() {
        // /completion
        return (
            v["content"].as_str().unwrap().to_string(),
            arr(&v["tokens"]),
            arr(&v["completion_probabilities"]),
        );
    }
    let text = [
        &choice["text"],
        &choice["message"]["content"],
        &choice["delta"]["content"],
    ]
    .iter()
    .find_map(|t| t.as_str())
    .unwrap_or("")
    .to_string();
    (text, Vec::new(), arr(&choice["logprobs"]["content"]))
}

/// A stop string that begins with the answer's last character and never
/// completes: the end of the text is held back until generation ends.
fn held_back_stop(text: &str) -> String {
    let c = text.chars().last().expect("the answer has text");
    format!("{c}\u{1}\u{2}never")
}

#[test]
fn streamed_chunks_concatenate_to_the_non_streamed_answer() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &[]);
    let common = json!({"max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let requests = [
        (
            "/completion",
            json!({"prompt": "abc", "return_tokens": true, "n_probs": 2}),
        ),
        ("/v1/completions", json!({"prompt": "abc", "logprobs": 2})),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 2}),
        ),
    ];
    for (path, req) in requests {
        let mut req = req;
        for (k, v) in common.as_object().unwrap() {
            req[k] = v.clone();
        }
        let plain = json_of(&post(&s.url(path), &req, &[]).1);
        let stop = held_back_stop(&parts(&plain).0);
        for stop in [Value::Null, json!(stop)] {
            let mut req = req.clone();
            req["stop"] = stop.clone();
            let (st, b) = post(&s.url(path), &req, &[]);
            assert_eq!(st, 200, "{path}: {}", String::from_utf8_lossy(&b));
            let whole = json_of(&b);
            let (text, tokens, probs) = parts(&whole);
            assert_eq!(
                text,
                parts(&plain).0,
                "{path}: the stop string never matches"
            );
            assert_eq!(probs.len(), 12, "{path}: one probability entry per token");
            if path == "/completion" {
                assert_eq!(tokens.len(), 12);
            }
            req["stream"] = json!(true);
            let (st, b) = post(&s.url(path), &req, &[]);
            assert_eq!(st, 200);
            let mut ev = sse_events(&b);
            if path != "/completion" {
                assert_eq!(ev.pop().as_deref(), Some("[DONE]"));
            }
            let events: Vec<Value> = ev.iter().map(|e| json_of(e.as_bytes())).collect();
            let (mut stext, mut stokens, mut sprobs) = (String::new(), Vec::new(), Vec::new());
            for e in &events {
                let (t, k, p) = parts(e);
                stext.push_str(&t);
                stokens.extend(k);
                sprobs.extend(p);
            }
            assert_eq!(stext, text, "{path} stop={stop}: streamed text");
            assert_eq!(stokens, tokens, "{path} stop={stop}: streamed tokens");
            assert_eq!(sprobs, probs, "{path} stop={stop}: streamed probabilities");
            // The final event carries no text and no token of its own.
            let (last, finish) = match path {
                "/completion" => {
                    let last = events.last().unwrap();
                    assert_eq!(last["stop"], true);
                    assert_eq!(last["content"], "");
                    assert_eq!(last["tokens"], json!([]));
                    assert!(last.get("completion_probabilities").is_none());
                    (last, None)
                }
                "/v1/completions" => {
                    let last = events.last().unwrap();
                    assert_eq!(last["choices"][0]["text"], "");
                    assert_eq!(last["choices"][0]["logprobs"], Value::Null);
                    (last, Some(&last["choices"][0]["finish_reason"]))
                }
                _ => {
                    let last = events
                        .iter()
                        .rfind(|e| !e["choices"][0]["finish_reason"].is_null())
                        .unwrap();
                    assert_eq!(last["choices"][0]["delta"], json!({}));
                    (last, Some(&last["choices"][0]["finish_reason"]))
                }
            };
            if let Some(f) = finish {
                assert_eq!(f, "length", "{path}: {last}");
            }
            if !stop.is_null() {
                // The held-back end comes in a chunk of its own, before the final one.
                let i = events.iter().position(|e| std::ptr::eq(e, last)).unwrap();
                let (t, k, _) = parts(&events[i - 1]);
                assert!(!t.is_empty() && text.ends_with(&t), "{path}: tail {t:?}");
                assert!(k.is_empty(), "{path}: the tail chunk has no token");
            }
        }
    }
}

#[test]
fn wrong_method_on_a_known_path_is_404_json() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &[]);
    let want =
        json!({"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}});
    let (st, b) = get(&s.url("/nope"), &[]);
    assert_eq!((st, json_of(&b)), (404, want.clone()));
    for (method, path) in [
        ("GET", "/completion"),
        ("DELETE", "/v1/chat/completions"),
        ("GET", "/v1/completions"),
        ("PUT", "/tokenize"),
        ("POST", "/health"),
        ("POST", "/props"),
        ("PATCH", "/slots"),
        ("GET", "/slots/0"),
        ("POST", "/latents/subscribe"),
        ("DELETE", "/nope"),
    ] {
        let (st, b) = call(method, &s.url(path), &[]);
        assert_eq!(st, 404, "{method} {path}: {}", String::from_utf8_lossy(&b));
        assert_eq!(json_of(&b), want, "{method} {path}");
    }
    // The routes themselves still answer.
    assert_eq!(get(&s.url("/health"), &[]).0, 200);
    let (st, _) = post(
        &s.url("/completion"),
        &json!({"prompt": "a", "n_predict": 1}),
        &[],
    );
    assert_eq!(st, 200);
}

/// Send one raw request to `/completion`, shut down the write side (as `nc -N`
/// does) and read the whole answer.
fn half_closed(addr: &str, body: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        c,
        "POST /completion HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn half_closed_requests_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &[]);
    let addr = s.url.strip_prefix("http://").unwrap().to_string();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let a = half_closed(&addr, "{bad json");
        statuses.push(a.lines().next().unwrap_or("").to_string());
        let body = a.split("\r\n\r\n").nth(1).unwrap_or("");
        if a.starts_with("HTTP/1.1 400") {
            let v = json_of(body.as_bytes());
            assert_eq!(v["error"]["code"], 400);
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("invalid JSON"));
        }
    }
    let bad = statuses
        .iter()
        .filter(|l| !l.starts_with("HTTP/1.1 400"))
        .count();
    assert_eq!(
        bad, 0,
        "every half-closed request answered 400: {statuses:?}"
    );
    let a = half_closed(
        &addr,
        r#"{"prompt": "hi", "n_predict": 3, "temperature": 0, "ignore_eos": true}"#,
    );
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    let v = json_of(a.split("\r\n\r\n").nth(1).unwrap().as_bytes());
    assert_eq!(v["tokens_predicted"], 3);
    // Streamed: every chunk arrives, through the final one.
    let a = half_closed(
        &addr,
        r#"{"prompt": "hi", "n_predict": 3, "temperature": 0, "ignore_eos": true, "stream": true}"#,
    );
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert_eq!(a.matches("data: ").count(), 4, "{a}");
    assert!(a.contains(r#""stop":true"#), "{a}");
}

/// Start `serve` expecting it to refuse: its one-line error.
fn refused(model: &std::path::Path, extra: &[&str]) -> String {
    let o = bin()
        .args(["serve", "--port", "0", "-m"])
        .arg(model)
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{extra:?} was accepted: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

/// stderr once it contains `needle` (the reader thread may lag a little).
fn stderr_with(s: &Server, needle: &str) -> String {
    let t0 = Instant::now();
    loop {
        let e = s.stderr();
        if e.contains(needle) || t0.elapsed() > Duration::from_secs(10) {
            return e;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Gemma's Jinja chat template, as Gemma 3 GGUFs that have one carry it (short).
const GEMMA_JINJA: &str = "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

#[test]
fn chat_template_flags() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    // Bad values: one clear line at start-up, naming the flag.
    let e = refused(&m, &["--chat-template", "nope"]);
    assert!(
        e.contains("--chat-template 'nope'") && e.contains("gemma") && e.contains("chatml"),
        "{e}"
    );
    let missing = dir.path().join("missing.jinja");
    let e = refused(&m, &["--chat-template-file", missing.to_str().unwrap()]);
    assert!(
        e.contains("--chat-template-file") && e.contains("cannot read"),
        "{e}"
    );
    let other = dir.path().join("other.jinja");
    std::fs::write(&other, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    let e = refused(&m, &["--chat-template-file", other.to_str().unwrap()]);
    assert!(
        e.contains("--chat-template-file")
            && e.contains("Jinja")
            && e.contains("--chat-template NAME"),
        "{e}"
    );
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}]});
    let gemma_prompt = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n";
    // No template in the model and none given: chatml, and one warning naming the flags.
    let s = Server::start(&m, &[]);
    let err = stderr_with(&s, "warning");
    assert_eq!(err.matches("warning").count(), 1, "{err}");
    assert!(
        err.contains("no chat template") && err.contains("--chat-template NAME"),
        "{err}"
    );
    assert_eq!(
        json_of(&get(&s.url("/props"), &[]).1)["chat_template"],
        "chatml"
    );
    drop(s);
    // By name.
    let s = Server::start(&m, &["--chat-template", "gemma"]);
    let props = json_of(&get(&s.url("/props"), &[]).1);
    assert_eq!(props["chat_template"], "gemma");
    let r = json_of(&post(&s.url("/apply-template"), &chat, &[]).1);
    assert_eq!(r["prompt"], gemma_prompt);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!s.stderr().contains("warning"), "{}", s.stderr());
    drop(s);
    // From a file llama.cpp recognises by its content.
    let file = dir.path().join("gemma.jinja");
    std::fs::write(&file, GEMMA_JINJA).unwrap();
    let s = Server::start(&m, &["--chat-template-file", file.to_str().unwrap()]);
    let props = json_of(&get(&s.url("/props"), &[]).1);
    assert_eq!(props["chat_template"], GEMMA_JINJA);
    let r = json_of(&post(&s.url("/apply-template"), &chat, &[]).1);
    assert_eq!(r["prompt"], gemma_prompt);
}

/// With `--chat-template gemma` the real Gemma 3 GGUF (which carries no
/// template) gets Gemma's turns, whose end-of-turn token ends generation. The
/// model file is the *base* 270M model: it gives `<end_of_turn>` no weight
/// (not in its top 100 after a short answer), so whether an answer stops
/// before `max_tokens` is not asserted; that the token would stop it is.
#[test]
fn real_model_chat_renders_the_gemma_template() {
    let Some(m) = real_model() else { return };
    let s = Server::start(&m, &["--chat-template", "gemma"]);
    assert!(!s.stderr().contains("warning"), "{}", s.stderr());
    let props = json_of(&get(&s.url("/props"), &[]).1);
    assert_eq!(props["chat_template"], "gemma");
    let chat = json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8, "temperature": 0,
    });
    let rendered = json_of(&post(&s.url("/apply-template"), &chat, &[]).1)["prompt"].clone();
    assert_eq!(
        rendered,
        "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    );
    // The turn markers are Gemma's special tokens, not text.
    let t = json_of(
        &post(
            &s.url("/tokenize"),
            &json!({"content": rendered, "add_special": true, "with_pieces": true}),
            &[],
        )
        .1,
    );
    let pieces: Vec<&str> = t["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["piece"].as_str().unwrap())
        .collect();
    assert_eq!(pieces[..4], ["<bos>", "<start_of_turn>", "user", "\n"]);
    assert_eq!(pieces.iter().filter(|p| **p == "<end_of_turn>").count(), 1);
    let (st, b) = post(&s.url("/v1/chat/completions"), &chat, &[]);
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let c = json_of(&b);
    assert_eq!(
        c["usage"]["prompt_tokens"],
        pieces.len(),
        "the rendered prompt was sent"
    );
    let content = c["choices"][0]["message"]["content"].as_str().unwrap();
    eprintln!("answer: {content:?} ({})", c["choices"][0]["finish_reason"]);
    assert!(!content.is_empty() && !content.contains("<end_of_turn>"));
    // The end-of-turn token ends generation (EOS as well).
    let model = latent_tap::engine::Model::load(&m, &Default::default()).unwrap();
    for text in ["<end_of_turn>", "<eos>"] {
        let ids = model.tokenize_ext(text, false, true).unwrap();
        assert_eq!(ids.len(), 1, "{text}");
        assert!(model.is_eog(ids[0]), "{text} ends generation");
    }
}
