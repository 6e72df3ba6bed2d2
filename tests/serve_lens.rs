//! `serve`'s `lens` request field on the synthetic model: the JSON answer
//! equals the Rust API's lens of the same rows, SSE chunks and binary lens
//! records concatenate to it, `latents` beside a lens are unchanged, the
//! OpenAI endpoints carry it, `/props` describes it, bad values are 400s.

mod common;

use common::http::{json_of, post, records, sse_events, Server};
use common::synth_model;
use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::lens::{inputs_from_collected, lens_json, Lens, LensInput, OwnedInput};
use latent_tap::session::{CaptureSpec, GenerateOptions};
use serde_json::{json, Value};

/// ids, pieces, layers and nulls exactly; floats within 1e-5.
fn same(a: &Value, b: &Value, at: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{at}: {x} vs {y}");
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: lengths");
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                same(p, q, &format!("{at}[{i}]"));
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>(),
                "{at}: keys"
            );
            for (k, p) in x {
                same(p, &y[k], &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

/// The Rust API's lens of a CLI-equivalent generation (greedy, as the server's).
fn rust_lens(model_path: &std::path::Path, prompt: &str, n: usize, top_k: usize) -> Value {
    let model = Model::load(model_path, &ModelOptions::default()).unwrap();
    let spec = CaptureSpec::default();
    let ctx = ContextOptions {
        n_ctx: 256,
        n_threads: Some(2),
        ..Default::default()
    };
    let opts = GenerateOptions {
        n_predict: n,
        sampling: latent_tap::engine::SamplingOptions {
            temperature: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let prompts = [model.tokenize(prompt, true).unwrap()];
    let c = common::capture_run(&model, &spec, &ctx, &prompts, &opts);
    let lens = Lens::for_model(&model, 2).unwrap();
    let inputs = inputs_from_collected(&c, lens.n_embd()).unwrap();
    let borrowed: Vec<LensInput> = inputs.iter().map(OwnedInput::as_input).collect();
    let mut toks: Vec<_> = c.tokens.iter().collect();
    toks.sort_by_key(|t| t.pos);
    let toks: Vec<i32> = toks.iter().map(|t| t.token).collect();
    let layers: Vec<usize> = (0..lens.n_layer()).collect();
    let rows = lens
        .compute(&borrowed, &layers, top_k, &|_, pos| {
            toks.get(pos as usize + 1).copied()
        })
        .unwrap();
    lens_json(&layers, lens.n_vocab(), &rows, &|id| model.token_piece(id))
}

#[test]
fn json_sse_and_binary_lens_equal_the_rust_api() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let (prompt, n) = ("hello lens", 4);
    let want = rust_lens(&m, prompt, n, 3);
    let s = Server::start(&m, &[]);
    let req = json!({"prompt": prompt, "n_predict": n, "temperature": 0, "lens": {"top_k": 3}});
    // JSON
    let (st, b) = post(&s.url("/completion"), &req, &[]);
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let c = json_of(&b);
    let lens = &c["lens"];
    assert_eq!(lens["layers"], json!([0, 1, 2]));
    assert_eq!(lens["n_vocab"], 260);
    // BOS + 10 bytes of prompt: 11 prompt rows, then one per decoded token.
    let rows = lens["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 11 + n - 1);
    assert!(
        c.get("latents").is_none(),
        "no latents without a latents request"
    );
    same(lens, &want, "lens");
    // The last layer exists at rows with an output only: the last prompt row and after.
    for r in rows {
        let pos = r["pos"].as_i64().unwrap();
        assert_eq!(r["cells"][2].is_null(), pos < 10, "pos {pos}");
        assert_eq!(r["cells"][0]["kl"].is_null(), pos < 10, "pos {pos}");
        assert_eq!(r["cells"][0]["top"].as_array().unwrap().len(), 3);
    }
    // SSE: every token chunk carries its step's rows; together they are the JSON's.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (st, b) = post(&s.url("/completion"), &sreq, &[]);
    assert_eq!(st, 200);
    let mut got = Vec::new();
    let mut chunks_with_lens = 0;
    for e in sse_events(&b) {
        let v: Value = serde_json::from_str(&e).unwrap();
        if let Some(l) = v.get("lens") {
            chunks_with_lens += 1;
            assert_eq!(l["layers"], json!([0, 1, 2]));
            got.extend(l["rows"].as_array().unwrap().iter().cloned());
        }
    }
    assert_eq!(chunks_with_lens, n, "one lens per token chunk");
    same(&Value::Array(got), &lens["rows"], "sse rows");
    // Binary: one lens record (kind 7, JSON payload) per step.
    let (st, b) = post(
        &s.url("/completion"),
        &req,
        &[("Accept", "application/vnd.latent-tap.frames")],
    );
    assert_eq!(st, 200);
    let mut got = Vec::new();
    for (kind, rec) in records(&b) {
        assert_ne!(kind, 1, "a lens alone sends no frames");
        if kind == 7 {
            let len = u64::from_le_bytes(rec[8..16].try_into().unwrap()) as usize;
            let v: Value = serde_json::from_slice(&rec[16..16 + len]).unwrap();
            got.extend(v["rows"].as_array().unwrap().iter().cloned());
        }
    }
    same(&Value::Array(got), &lens["rows"], "binary rows");
}

#[test]
fn latents_beside_a_lens_are_unchanged_and_openai_endpoints_carry_it() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &[]);
    let lat = json!({"tensors": "l_out-1,attn_out-0", "rows": "last", "dtype": "f16"});
    let base = json!({"prompt": "abc", "n_predict": 3, "temperature": 0, "latents": lat});
    let (_, b) = post(&s.url("/completion"), &base, &[]);
    let alone = json_of(&b);
    let mut with = base.clone();
    with["lens"] = json!({"layers": "0,2", "rows": "all"});
    let (st, b) = post(&s.url("/completion"), &with, &[]);
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let both = json_of(&b);
    assert_eq!(
        both["latents"], alone["latents"],
        "latents unchanged by a lens"
    );
    assert_eq!(both["lens"]["layers"], json!([0, 2]));
    assert_eq!(both["lens"]["rows"].as_array().unwrap().len(), 4 + 2);
    // rows: last keeps the rows with an output only; the final layer is there.
    let mut last = base.clone();
    last["lens"] = json!({"rows": "last", "layers": [2]});
    let (_, b) = post(&s.url("/completion"), &last, &[]);
    let rows = json_of(&b)["lens"]["rows"].as_array().unwrap().clone();
    assert_eq!(
        rows.iter()
            .map(|r| r["pos"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert!(rows
        .iter()
        .all(|r| r["cells"][0]["kl"].as_f64().unwrap().abs() < 1e-6));
    for (path, body) in [
        (
            "/v1/completions",
            json!({"prompt": "abc", "max_tokens": 2, "temperature": 0, "lens": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, "lens": true}),
        ),
    ] {
        let (st, b) = post(&s.url(path), &body, &[]);
        assert_eq!(st, 200, "{path}: {}", String::from_utf8_lossy(&b));
        let v = json_of(&b);
        let rows = v["lens"]["rows"].as_array().unwrap();
        assert!(!rows.is_empty(), "{path}");
        assert_eq!(
            rows[0]["cells"][0]["top"].as_array().unwrap().len(),
            5,
            "{path}: default top_k"
        );
        let mut sb = body.clone();
        sb["stream"] = json!(true);
        let (_, b) = post(&s.url(path), &sb, &[]);
        let n: usize = sse_events(&b)
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|v| v.get("lens").map(|l| l["rows"].as_array().unwrap().len()))
            .sum();
        assert_eq!(n, rows.len(), "{path}: SSE rows");
    }
    // /props describes the lens.
    let (_, b) = common::http::get(&s.url("/props"), &[]);
    let p = json_of(&b);
    assert_eq!(p["lens"]["available"], true);
    assert_eq!(p["lens"]["n_layer"], 3);
    assert_eq!(p["lens"]["layers"], json!([0, 1, 2]));
}

#[test]
fn bad_lens_values_are_400s_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &[]);
    for (lens, needle) in [
        (json!({"top_k": 0}), "lens top_k 0 is out of range 1..=20"),
        (json!({"top_k": 21}), "lens top_k 21 is out of range 1..=20"),
        (json!({"top_k": "x"}), "lens 'top_k'"),
        (json!({"layers": [7]}), "lens layer 7 does not exist"),
        (json!({"layers": "1..x"}), "lens 'layers'"),
        (json!({"rows": "some"}), "lens 'rows'"),
        (json!({"colour": 1}), "lens has no field 'colour'"),
        (json!(3), "'lens' must be"),
    ] {
        let req = json!({"prompt": "a", "n_predict": 1, "lens": lens});
        let (st, b) = post(&s.url("/completion"), &req, &[]);
        assert_eq!(st, 400, "{lens}");
        let v = json_of(&b);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{lens}: {msg}");
    }
    let (st, _) = post(
        &s.url("/completion"),
        &json!({"prompt": "a", "n_predict": 1, "lens": false}),
        &[],
    );
    assert_eq!(st, 200);
}
