//! `latent-tap serve` against requests that ask for too much or announce what
//! they never send: latent selections the ring cannot carry, bodies over the
//! limit or that never arrive, malformed chat content parts, prompts far longer
//! than the context. Each gets a JSON error of the right status (or, for a
//! glob, an answer listing what was skipped), quickly, and the server stays up.

mod common;
use common::server::{json_of, post, Server};
use common::synth_model;

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
