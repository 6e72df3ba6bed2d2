//! `latent-tap serve` against requests that ask for too much or announce what
//! they never send: latent selections the ring cannot carry, bodies over the
//! limit or that never arrive, malformed chat content parts, prompts far longer
//! than the context. Each gets a JSON error of the right status (or, for a
//! glob, an answer listing what was skipped), quickly, and the server stays up.

mod common;
use common::http::{json_of, post, Server};
use common::synth_model;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Status, `error.type` and `error.message` of an error answer.
fn error_of((status, body): (u16, Vec<u8>)) -> (u16, String, String) {
    let v = json_of(&body);
    assert_eq!(v["error"]["code"], status, "{v}");
    let s = |k: &str| v["error"][k].as_str().unwrap_or_default().to_string();
    (status, s("type"), s("message"))
}

fn ok_json((status, body): (u16, Vec<u8>)) -> Value {
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    json_of(&body)
}

/// The synthetic model's `result_output` frame (512 rows × 260 logits in f32,
/// 144 bytes of header, 16 per row) does not fit a 1 MiB ring, whose largest
/// record is 524280 bytes; every other node's does.
#[test]
fn latents_a_glob_skips_what_cannot_be_delivered_and_an_exact_name_is_a_400() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &["-c", "512", "-np", "1", "--ring-mb", "1"]);
    let url = s.url("/completion");
    let too_large = json!({"name": "result_output", "reason": "frame too large"});
    for latents in [json!("*"), json!({"tensors": "result_*"})] {
        let v = ok_json(post(
            &url,
            &json!({"prompt": "Hi", "n_predict": 1, "temperature": 0, "latents": latents}),
            &[],
        ));
        let skipped = v["latents_skipped"].as_array().unwrap();
        assert!(skipped.contains(&too_large), "{latents}: {skipped:?}");
        let lat = v["latents"].as_object().unwrap();
        assert!(!lat.contains_key("result_output"), "{latents}");
        assert!(lat.contains_key("result_norm"), "{latents}");
        // "Hi" is BOS + 2 tokens; result_norm has the output row only.
        assert_eq!(v["latents"]["result_norm"]["shape"], json!([1, 64]));
        if latents == "*" {
            assert_eq!(v["latents"]["l_out-0"]["shape"], json!([3, 64]));
            // KV-cache views a glob matched are listed with their reason too.
            assert!(skipped.iter().any(|t| t["reason"] == "no per-token row"));
        } else {
            assert_eq!(skipped, &vec![too_large.clone()]);
        }
    }
    // Named exactly, it is the client's error, with the sizes.
    let (st, kind, msg) = error_of(post(
        &url,
        &json!({"prompt": "Hi", "n_predict": 1, "latents": "result_output"}),
        &[],
    ));
    assert_eq!((st, kind.as_str()), (400, "invalid_request_error"), "{msg}");
    assert!(
        msg.contains(
            "a frame of 'result_output' can take 540816 bytes (512 rows), \
             more than the ring's largest record (524280 bytes)"
        ),
        "{msg}"
    );
    // Nothing skipped: an empty list, in every transport's final object.
    let v = ok_json(post(
        &url,
        &json!({"prompt": "Hi", "n_predict": 1, "latents": "l_out-*"}),
        &[],
    ));
    assert_eq!(v["latents_skipped"], json!([]));
    let (st, b) = post(
        &s.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                "stream": true, "latents": "result_*"}),
        &[],
    );
    assert_eq!(st, 200);
    let text = String::from_utf8_lossy(&b);
    let last: Value = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .last()
        .unwrap();
    assert_eq!(last["latents_skipped"], json!([too_large]), "{text}");
    // Without latents the answer has no such field (llama-server's shape).
    let v = ok_json(post(&url, &json!({"prompt": "Hi", "n_predict": 1}), &[]));
    assert!(v.get("latents_skipped").is_none());
}

#[test]
fn chat_content_parts_of_a_wrong_type_are_400s_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &["-np", "1"]);
    let url = s.url("/v1/chat/completions");
    let chat = |content: Value| {
        error_of(post(
            &url,
            &json!({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": content}], "max_tokens": 1}),
            &[],
        ))
    };
    let cases = [
        (
            json!([{"type": "text", "text": 100}]),
            400,
            "messages[1].content[0].text must be a string",
        ),
        (
            json!([{"type": "text", "text": "a"}, {"type": "text"}]),
            400,
            "messages[1].content[1].text must be a string",
        ),
        (
            json!([{"text": "a"}]),
            400,
            "messages[1].content[0].type must be a string",
        ),
        (
            json!([{"type": 7, "text": "a"}]),
            400,
            "messages[1].content[0].type must be a string",
        ),
        (
            json!(["a"]),
            400,
            "messages[1].content[0] must be an object",
        ),
        (
            json!([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]),
            501,
            "message content part of type image_url is not supported",
        ),
    ];
    for (content, status, needle) in cases {
        let (st, kind, msg) = chat(content.clone());
        assert_eq!(st, status, "{content}: {msg}");
        let want = if status == 400 {
            "invalid_request_error"
        } else {
            "not_supported_error"
        };
        assert_eq!(kind, want, "{content}");
        assert!(msg.contains(needle), "{content}: '{needle}' not in '{msg}'");
    }
    // The same on /apply-template; and well-formed text parts still work.
    let (st, _, msg) = error_of(post(
        &s.url("/apply-template"),
        &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}),
        &[],
    ));
    assert_eq!(st, 400, "{msg}");
    assert!(msg.contains("messages[0].content[0].text must be a string"));
    let v = ok_json(post(
        &url,
        &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                "max_tokens": 1}),
        &[],
    ));
    assert_eq!(v["choices"][0]["index"], 0);
}

/// One raw HTTP/1.1 exchange: send `head` (and `body` in `pieces` separated by
/// `pause`), then read until the server closes the connection or `wait` passes.
/// Returns the status, the lowercased head, the body and whether the server
/// closed the connection, with the times from the last byte sent to the
/// answer's first byte and to the close.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
    closed: bool,
    first: Duration,
    took: Duration,
}

fn raw(url: &str, head: &str, pieces: &[&[u8]], pause: Duration, wait: Duration) -> Raw {
    let addr = url.trim_start_matches("http://");
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(wait)).unwrap();
    c.write_all(head.as_bytes()).unwrap();
    for p in pieces {
        std::thread::sleep(pause);
        // The server may already have answered and closed.
        if c.write_all(p).is_err() {
            break;
        }
    }
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut first = None;
    let closed = loop {
        match c.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => {
                first.get_or_insert_with(|| t0.elapsed());
                got.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false, // read timeout: still open
        }
    };
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&got).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Raw {
        status,
        head: head.to_ascii_lowercase(),
        body: body.as_bytes().to_vec(),
        closed,
        first: first.unwrap_or(took),
        took,
    }
}

fn post_head(path: &str, content_length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {content_length}\r\n\r\n"
    )
}

#[test]
fn bodies_over_the_limit_or_late_are_refused_at_once_and_the_connection_closed() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    // The idle timeout (-to) stays long: only the body timeout may end these.
    let s = Server::start(
        &m,
        &[
            "-np",
            "1",
            "--max-body-kb",
            "64",
            "--body-timeout",
            "1",
            "--timeout",
            "600",
        ],
    );
    let none = Duration::ZERO;
    let wait = Duration::from_secs(10);
    let error = |r: &Raw, status: u16, needle: &str| {
        assert_eq!(r.status, status, "{}", r.head);
        let v = json_of(&r.body);
        assert_eq!(v["error"]["code"], status);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "'{needle}' not in '{msg}'");
        assert!(r.head.contains("connection: close"), "{}", r.head);
        assert!(r.closed, "the server kept the connection open");
    };
    // 9 MiB announced, nothing sent: 413 at once, before the body timeout
    // could fire; the connection closes when the body timeout (1 s) has passed
    // (what a client still sends of a refused body is read and discarded).
    for path in ["/completion", "/v1/chat/completions", "/tokenize"] {
        let r = raw(&s.url, &post_head(path, 9 << 20), &[], none, wait);
        error(&r, 413, "request body is larger than 65536 bytes");
        assert!(
            r.first < Duration::from_millis(900),
            "{path}: {:?}",
            r.first
        );
        assert!(r.took < Duration::from_secs(5), "{path}: {:?}", r.took);
    }
    // A client that writes all of a refused body before reading gets the 413
    // (not a reset connection).
    let body = vec![b' '; 200 << 10];
    let r = raw(
        &s.url,
        &post_head("/completion", body.len()),
        &[&body],
        none,
        wait,
    );
    error(&r, 413, "request body is larger than 65536 bytes");
    // 100 bytes announced, 10 sent: 408 after the body timeout (1 s), not the idle one.
    let r = raw(
        &s.url,
        &post_head("/completion", 100),
        &[b"{\"prompt\":"],
        none,
        wait,
    );
    error(&r, 408, "request body did not arrive within 1 s");
    assert!(r.took >= Duration::from_millis(900), "{:?}", r.took);
    assert!(r.took < Duration::from_secs(5), "{:?}", r.took);
    // A trickle (a byte every 300 ms) is cut off too: the timeout is for the whole body.
    let trickle: Vec<&[u8]> = b"{\"prompt\": \"Hi\", \"n_predict\": 1}"
        .chunks(1)
        .take(6)
        .collect();
    let r = raw(
        &s.url,
        &post_head("/completion", 32),
        &trickle,
        Duration::from_millis(300),
        wait,
    );
    error(&r, 408, "did not arrive within 1 s");
    // Chunked bodies that keep coming stop at the limit.
    let head = "POST /completion HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunk = format!("{:x}\r\n{}\r\n", 40 << 10, " ".repeat(40 << 10));
    let r = raw(
        &s.url,
        head,
        &[chunk.as_bytes(), chunk.as_bytes()],
        none,
        wait,
    );
    error(&r, 413, "larger than 65536 bytes");
    // A body that arrives in time, in pieces, is answered as usual.
    let body = br#"{"prompt": "Hi", "n_predict": 1, "temperature": 0}"#;
    let (a, b) = body.split_at(10);
    let r = raw(
        &s.url,
        &format!(
            "POST /completion HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        ),
        &[a, b],
        Duration::from_millis(300),
        wait,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(json_of(&r.body)["tokens_predicted"], 1);
    // The flag's bounds.
    for bad in ["0", "-1", "3601", "nan"] {
        let o = common::bin()
            .args(["serve", "--port", "0", "-m"])
            .arg(&m)
            .args(["--body-timeout", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{bad}");
        assert!(
            err.contains("body timeout") && err.contains("at most 3600 s"),
            "{bad}: {err}"
        );
    }
}

/// Texts that pack many bytes into few tokens: control-token text, runs of
/// spaces, words, multi-byte characters, and bytes outside any merge.
fn dense_texts() -> Vec<String> {
    vec![
        "<start_of_turn>user\n<end_of_turn><bos><eos></s><s><unk>".repeat(20),
        " ".repeat(4000),
        "\n".repeat(500) + &"\t".repeat(500),
        "the quick brown fox jumps over the lazy dog ".repeat(50),
        "internationalization responsibilities ".repeat(40),
        "日本語のテキスト🙂🙂 Ωμέγα ".repeat(40),
        "=".repeat(3000) + &"-".repeat(3000) + &"*".repeat(3000),
        "<unused0><unused1><start_of_image>".repeat(30),
    ]
}

/// [`Model::max_token_text_bytes`] is a bound the tokenizer never beats: text
/// never becomes fewer tokens than its bytes over the longest token's text.
#[test]
fn the_tokens_a_prompt_needs_are_bounded_below_without_tokenizing() {
    use latent_tap::engine::{Model, ModelOptions};
    let dir = tempfile::tempdir().unwrap();
    let mut models = vec![synth_model(dir.path())];
    models.extend(common::real_model());
    for path in &models {
        let model = Model::load(
            path,
            &ModelOptions {
                n_gpu_layers: 0,
                ..ModelOptions::default()
            },
        )
        .unwrap();
        let t0 = Instant::now();
        let max = model
            .max_token_text_bytes()
            .expect("SentencePiece vocabularies have a bound");
        eprintln!(
            "{}: longest token text {max} bytes (vocabulary scanned in {:?})",
            path.display(),
            t0.elapsed()
        );
        if path.ends_with("synth.gguf") {
            // "<unk>": the byte tokens and "▁" stand for one byte each.
            assert_eq!(max, 5);
        }
        for text in dense_texts() {
            let n = model.tokenize_ext(&text, false, true).unwrap().len();
            assert!(
                n * max >= text.len(),
                "{}: {n} tokens × {max} < {} bytes for {:?}",
                path.display(),
                text.len(),
                &text[..40.min(text.len())]
            );
        }
    }
}

#[test]
fn prompts_far_longer_than_the_context_are_refused_before_tokenizing() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    // Slots of 256 positions; the synthetic vocabulary's longest token text is
    // 5 bytes, so text of 5 × 255 + 1 = 1276 bytes or more cannot fit (a
    // prompt must leave a position free).
    let s = Server::start(&m, &["-c", "256", "-np", "1", "--max-body-kb", "16384"]);
    let refused = |url: &str, body: &Value| {
        let (st, kind, msg) = error_of(post(&s.url(url), body, &[]));
        assert_eq!(
            (st, kind.as_str()),
            (400, "exceed_context_size_error"),
            "{msg}"
        );
        assert!(msg.ends_with("exceeds the available context size (256 tokens), try increasing it"));
        msg
    };
    // 8 MiB: refused from its length alone ("at least"; tokenizing would say
    // 8388609 tokens), in well under the seconds tokenizing it takes.
    let big = "y".repeat(8 << 20);
    let t0 = Instant::now();
    let msg = refused("/completion", &json!({"prompt": big, "n_predict": 1}));
    let took = t0.elapsed();
    eprintln!("8 MiB prompt refused in {took:?}");
    assert!(
        msg.starts_with("request (at least 1677722 tokens)"),
        "{msg}"
    );
    // Text and ids together: 1275 bytes (255 tokens at least) and 5 ids.
    let mixed = json!({"prompt": ["y".repeat(1275), 3, 4, 5, 6, 7], "max_tokens": 1});
    let msg = refused("/v1/completions", &mixed);
    assert!(msg.starts_with("request (at least 260 tokens)"), "{msg}");
    // At the edge the bound refuses 1276 bytes (256 tokens at least) …
    let msg = refused("/completion", &json!({"prompt": "y".repeat(1276)}));
    assert!(msg.starts_with("request (at least 256 tokens)"), "{msg}");
    // … and lets 1275 through to the tokenizer, which counts BOS + 1275.
    let msg = refused("/completion", &json!({"prompt": "y".repeat(1275)}));
    assert!(msg.starts_with("request (1276 tokens)"), "{msg}");
    // Chat: the rendered prompt is bounded the same way.
    let chat = json!({"messages": [{"role": "user", "content": big}], "max_tokens": 1});
    let msg = refused("/v1/chat/completions", &chat);
    assert!(msg.starts_with("request (at least 16777"), "{msg}");
    // What fits is answered: 254 bytes of text + BOS = 255 tokens.
    let v = ok_json(post(
        &s.url("/completion"),
        &json!({"prompt": "y".repeat(254), "n_predict": 1, "temperature": 0}),
        &[],
    ));
    assert_eq!(v["tokens_evaluated"], 255);
}
