//! Per-request steering and patching in `latent-tap serve` (the `steer` and
//! `patch` request fields): scale 0 changes nothing; the first steered layer's
//! rows gain exactly `scale × v` and earlier layers are untouched; in a batch
//! of four, only the steered request changes; a `--steer-dir` file equals the
//! same vector sent inline; a patched row equals the data sent; bad input is a
//! 400 naming the field, and the server keeps serving.

mod common;
use common::bin;
use common::http::{json_of, post, sse_events, Server};

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde_json::{json, Value};

use latent_tap::steer::ControlVector;

const N_LAYER: usize = 6;
const N_EMBD: usize = 64;

/// A deterministic unit-length row.
fn direction(seed: u32) -> Vec<f32> {
    let mut x = 0x2545_f491_u32 ^ seed.wrapping_mul(0x9e37_79b9);
    common::unit_direction(&mut x, N_EMBD)
}

fn b64(v: &[f32]) -> String {
    let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn floats(s: &str) -> Vec<f32> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Position → row.
type PosRows = BTreeMap<i32, Vec<f32>>;
/// Per tensor: position → row.
type Rows = BTreeMap<String, PosRows>;

struct Answer {
    tokens: Vec<i64>,
    rows: Rows,
    v: Value,
}

fn rows_of(lat: &Value) -> Rows {
    let mut out = Rows::new();
    for (name, t) in lat.as_object().unwrap() {
        let width = t["shape"][1].as_u64().unwrap() as usize;
        assert_eq!(t["dtype"], "f32");
        let data = floats(t["data"].as_str().unwrap());
        let e = out.entry(name.clone()).or_default();
        for (i, p) in t["pos"].as_array().unwrap().iter().enumerate() {
            e.insert(
                p.as_i64().unwrap() as i32,
                data[i * width..(i + 1) * width].to_vec(),
            );
        }
    }
    out
}

fn complete(s: &Server, mut body: Value) -> Answer {
    body["temperature"] = json!(0);
    body["ignore_eos"] = json!(true);
    body["return_tokens"] = json!(true);
    let (st, b) = post(&s.url("/completion"), &body, &[]);
    let v = json_of(&b);
    assert_eq!(st, 200, "{v}");
    let tokens = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    let rows = v.get("latents").map(rows_of).unwrap_or_default();
    Answer { tokens, rows, v }
}

const PROMPT: &str = "the quick brown fox jumps";

fn req(steer: Value) -> Value {
    let mut r = json!({"prompt": PROMPT, "n_predict": 6, "latents": {"tensors": "l_out-*"}});
    if !steer.is_null() {
        r["steer"] = steer;
    }
    r
}

#[test]
fn scale_zero_is_identity_and_the_first_steered_layer_gains_scale_v() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_layers(dir.path(), N_LAYER);
    let s = Server::start(&m, &["-np", "1"]);
    let v = direction(1);
    let base = complete(&s, req(Value::Null));
    assert!(base.v.get("steer").is_none(), "no steer, no summary");
    let n_prompt = base.v["tokens_evaluated"].as_u64().unwrap() as i32;

    // Scale 0: tokens and every latent bit for bit.
    let zero = complete(
        &s,
        req(json!([{"layers": "3..5", "vector": b64(&v), "scale": 0.0}])),
    );
    assert_eq!(zero.tokens, base.tokens);
    assert_eq!(zero.rows, base.rows);

    // Scale 4 at layers 3 and 4, prompt rows.
    let scale = 4.0f32;
    let st = complete(
        &s,
        req(json!([{"layers": "3..5", "vector": b64(&v), "scale": scale, "positions": "prompt"}])),
    );
    let applied = &st.v["steer"][0];
    assert_eq!(applied["layers"], json!([3, 4]));
    assert_eq!(applied["positions"], "prompt");
    assert_eq!(applied["scale"], 4.0);
    assert_eq!(applied["source"], "vector");
    for n in applied["vector_norm"].as_array().unwrap() {
        assert!((n.as_f64().unwrap() - 1.0).abs() < 1e-6, "{applied}");
    }
    for p in 0..n_prompt {
        for l in 0..3 {
            let t = format!("l_out-{l}");
            assert_eq!(st.rows[&t][&p], base.rows[&t][&p], "{t} pos {p} unchanged");
        }
        let (got, was) = (&st.rows["l_out-3"][&p], &base.rows["l_out-3"][&p]);
        for j in 0..N_EMBD {
            // The add is x + (scale × v) in f32: exactly what is computed here.
            assert_eq!(got[j], was[j] + v[j] * scale, "l_out-3 pos {p} [{j}]");
        }
    }
    // Steering changed what followed (layer 4's rows got the vector on top of
    // a changed input).
    assert_ne!(st.rows["l_out-4"][&0], base.rows["l_out-4"][&0]);

    // SSE: the final event says what was applied too.
    let mut sse = req(json!([{"layers": 3, "vector": b64(&v), "scale": 2.5}]));
    sse["stream"] = json!(true);
    sse["temperature"] = json!(0);
    let ev = sse_events(&post(&s.url("/completion"), &sse, &[]).1);
    let last = ev
        .iter()
        .map(|e| json_of(e.as_bytes()))
        .find(|e| e["stop"] == true)
        .expect("a final event");
    assert_eq!(last["steer"][0]["layers"], json!([3]));
    assert_eq!(last["steer"][0]["scale"], 2.5);

    // The binary record stream: its closing JSON record (kind 5) says it too.
    let mut bin_req = req(json!([{"layers": "2..=3", "vector": b64(&v), "scale": 1.5}]));
    bin_req["temperature"] = json!(0);
    let (code, raw) = post(
        &s.url("/completion"),
        &bin_req,
        &[("Accept", "application/vnd.latent-tap.frames")],
    );
    assert_eq!(code, 200);
    let summary = common::http::records(&raw)
        .into_iter()
        .rev()
        .find(|(kind, _)| *kind == 5)
        .map(|(_, r)| json_of(&r[16..]))
        .expect("a JSON record");
    assert_eq!(summary["steer"][0]["layers"], json!([2, 3]), "{summary}");
    assert_eq!(summary["steer"][0]["scale"], 1.5);

    // The other completion endpoints take the field too.
    for path in ["/completions", "/v1/completions", "/v1/chat/completions"] {
        let mut b = json!({"max_tokens": 2, "steer": [{"vector": b64(&v), "scale": 1.0}]});
        if path.contains("chat") {
            b["messages"] = json!([{"role": "user", "content": "hi"}]);
        } else {
            b["prompt"] = json!("hi");
        }
        let (code, body) = post(&s.url(path), &b, &[]);
        let o = json_of(&body);
        assert_eq!(code, 200, "{path}: {o}");
        assert_eq!(o["steer"][0]["layers"], json!([1, 2, 3, 4, 5]), "{path}");
    }
}

/// A gauge of `/metrics`.
fn gauge(s: &Server, name: &str) -> u64 {
    let m = String::from_utf8(common::http::get(&s.url("/metrics"), &[]).1).unwrap();
    m.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse::<f64>().unwrap() as u64)
        .unwrap_or_else(|| panic!("{name} not in {m}"))
}

/// Wait until `gauge(name) == want` (at most 20 s).
fn wait_gauge(s: &Server, name: &str, want: u64) {
    let t0 = std::time::Instant::now();
    while gauge(s, name) != want {
        assert!(t0.elapsed().as_secs() < 20, "{name} never reached {want}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Four requests decoded together by a four-slot server, the first steered
/// when `steer`; returns each one's (tokens, l_out-2 rows). The four are
/// queued, in order, while a long prompt-only request holds the engine in one
/// decode; it ends there, and the next engine step admits all four at once into
/// slots 0..4: every run has the same batches (llama.cpp's kernels are not
/// batch-invariant, so only batches of the same composition compare exactly).
fn batch_of_four(s: &Server, steer: bool) -> Vec<(Vec<i64>, PosRows)> {
    let v = direction(7);
    let url = s.url("/completion");
    let blocker = {
        let url = url.clone();
        // One decode (n_batch 4096) of about a second on 2 cores.
        let body = json!({"prompt": vec![5; 4000], "n_predict": 0});
        std::thread::spawn(move || assert_eq!(post(&url, &body, &[]).0, 200))
    };
    wait_gauge(s, "llamacpp:requests_processing", 1);
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let url = url.clone();
            let mut body = json!({
                "prompt": format!("prompt number {i} {}", "y".repeat(i)),
                "n_predict": 8, "temperature": 0, "ignore_eos": true, "return_tokens": true,
                "latents": {"tensors": "l_out-2"},
            });
            if steer && i == 0 {
                body["steer"] = json!([{"layers": "1..=2", "vector": b64(&v), "scale": 8.0}]);
            }
            let h = std::thread::spawn(move || {
                let (st, b) = post(&url, &body, &[]);
                let v = json_of(&b);
                assert_eq!(st, 200, "{v}");
                assert_eq!(v["id_slot"], i, "request {i} in slot {i}");
                let toks = v["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_i64().unwrap())
                    .collect();
                (toks, rows_of(&v["latents"]).remove("l_out-2").unwrap())
            });
            // In order: request i is queued i-th, behind the blocker.
            wait_gauge(s, "llamacpp:requests_deferred", i as u64 + 1);
            h
        })
        .collect();
    blocker.join().unwrap();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a
        .iter()
        .zip(b)
        .map(|(p, q)| (p - q) * (p - q))
        .sum::<f32>()
        .sqrt();
    let den: f32 = a.iter().map(|p| p * p).sum::<f32>().sqrt();
    num / den
}

#[test]
fn one_steered_request_leaves_the_other_three_of_its_batch_alone() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_layers(dir.path(), N_LAYER);
    let s = Server::start(
        &m,
        &[
            "-np",
            "4",
            "-c",
            "16384",
            "-b",
            "4096",
            "-ub",
            "4096",
            "--metrics",
        ],
    );
    let plain = batch_of_four(&s, false);
    let steered = batch_of_four(&s, true);
    // A slot reused after a steered request is not steered any more.
    let again = batch_of_four(&s, false);
    for i in 1..4 {
        assert_eq!(steered[i].0, plain[i].0, "request {i}: tokens");
        assert_eq!(
            steered[i].1, plain[i].1,
            "request {i}: l_out-2 rows, bit for bit"
        );
    }
    for i in 0..4 {
        assert_eq!(
            again[i].0, plain[i].0,
            "request {i} after the steered batch"
        );
        assert_eq!(
            again[i].1, plain[i].1,
            "request {i} after the steered batch: rows"
        );
    }
    // The steered one did change: its l_out-2 rows moved by far more.
    let moved = plain[0]
        .1
        .iter()
        .map(|(p, r)| rel_diff(r, &steered[0].1[p]))
        .fold(0f32, f32::max);
    assert!(moved > 0.1, "steered request moved only {moved}");
}

#[test]
fn steer_dir_file_equals_the_inline_vector_and_patches_replace_rows() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_layers(dir.path(), N_LAYER);
    let vecs = dir.path().join("vectors");
    std::fs::create_dir(&vecs).unwrap();
    let cv = ControlVector {
        n_embd: N_EMBD,
        model_hint: "llama".into(),
        directions: (1..N_LAYER).map(|l| (l, direction(l as u32))).collect(),
    };
    cv.write(&vecs.join("fr.gguf")).unwrap();
    std::fs::write(dir.path().join("outside.gguf"), b"x").unwrap();
    let s = Server::start(&m, &["-np", "2", "--steer-dir", vecs.to_str().unwrap()]);

    let by_file = complete(
        &s,
        req(json!([{"file": "fr.gguf", "scale": 3.0, "layers": "2..=4"}])),
    );
    // The same directions inline: n_layer × n_embd values, row 0 unused.
    let mut flat = vec![0f32; N_EMBD];
    for l in 1..N_LAYER {
        flat.extend(direction(l as u32));
    }
    let inline = complete(
        &s,
        req(json!([{"vector": b64(&flat), "scale": 3.0, "layers": "2..=4"}])),
    );
    assert_eq!(by_file.tokens, inline.tokens);
    assert_eq!(by_file.rows, inline.rows);
    assert_eq!(by_file.v["steer"][0]["source"], json!({"file": "fr.gguf"}));
    assert_eq!(by_file.v["steer"][0]["layers"], json!([2, 3, 4]));
    let base = complete(&s, req(Value::Null));
    // Another node family: attn_out-3 is steered, l_out-0..2 are untouched.
    let attn = complete(
        &s,
        req(json!([{"file": "fr.gguf", "scale": 3.0, "layers": "3", "tensor": "attn_out"}])),
    );
    assert_eq!(attn.v["steer"][0]["tensors"], json!(["attn_out-3"]));
    let n_prompt = base.v["tokens_evaluated"].as_u64().unwrap() as i32;
    for l in 0..3 {
        let name = format!("l_out-{l}");
        for p in 0..n_prompt {
            assert!(
                attn.rows[&name][&p] == base.rows[&name][&p],
                "{name} pos {p}"
            );
        }
    }
    assert!(attn.rows["l_out-3"][&0] != base.rows["l_out-3"][&0]);
    assert_ne!(by_file.rows["l_out-2"], base.rows["l_out-2"]);

    for (file, want) in [
        (
            "../outside.gguf",
            "must be a file name inside the steer directory",
        ),
        (
            "/etc/passwd",
            "must be a file name inside the steer directory",
        ),
        (
            "sub/fr.gguf",
            "must be a file name inside the steer directory",
        ),
        (
            "missing.gguf",
            "'missing.gguf': no such file in the steer directory",
        ),
    ] {
        let (st, b) = post(&s.url("/completion"), &req(json!([{"file": file}])), &[]);
        let e = json_of(&b);
        assert_eq!(st, 400, "{file}: {e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with("steer[0].file: ") && msg.contains(want),
            "{msg}"
        );
    }

    // Patch: l_out-2 at position 3 becomes the data sent.
    let d: Vec<f32> = direction(99).iter().map(|x| x * 10.0).collect();
    let mut body = req(Value::Null);
    body["patch"] = json!([{"tensor": "l_out-2", "pos": 3, "data": b64(&d)}]);
    let pa = complete(&s, body);
    assert_eq!(pa.rows["l_out-2"][&3], d, "the patched row is the data");
    assert_eq!(pa.v["patch"][0]["tensor"], "l_out-2");
    assert_eq!(pa.v["patch"][0]["pos"], 3);
    let n_prompt = base.v["tokens_evaluated"].as_u64().unwrap() as i32;
    for p in (0..n_prompt).filter(|&p| p != 3) {
        // Other positions of the patched layer read only earlier layers.
        assert_eq!(pa.rows["l_out-2"][&p], base.rows["l_out-2"][&p], "pos {p}");
    }
    for p in 0..3 {
        assert_eq!(pa.rows["l_out-3"][&p], base.rows["l_out-3"][&p], "pos {p}");
    }
    assert_ne!(pa.rows["l_out-3"][&3], base.rows["l_out-3"][&3]);
    assert_ne!(
        pa.rows["l_out-3"][&4], base.rows["l_out-3"][&4],
        "later positions see it"
    );
}

#[test]
fn bad_steer_and_patch_input_is_a_400_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_layers(dir.path(), N_LAYER);
    let s = Server::start(&m, &["-np", "1"]);
    let v = b64(&direction(3));
    let row = b64(&[0.5f32; N_EMBD]);
    let huge: Value = serde_json::from_str("1e300").unwrap();
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"steer": [{"vector": b64(&[1.0; 10])}]}),
            "steer[0].vector: ",
            "10 values: give n_embd = 64",
        ),
        (
            json!({"steer": [{"vector": "not base64!"}]}),
            "steer[0].vector: ",
            "not base64",
        ),
        (
            json!({"steer": [{"vector": "AAAA AA"}]}),
            "steer[0].vector: ",
            "not base64",
        ),
        (
            json!({"steer": [{"vector": b64(&[f32::NAN; N_EMBD])}]}),
            "steer[0].vector: ",
            "value 0 is NaN",
        ),
        (
            json!({"steer": [{"vector": b64(&[f32::INFINITY; N_EMBD])}]}),
            "steer[0].vector: ",
            "value 0 is inf",
        ),
        (
            json!({"steer": [{"vector": v, "layers": "4..9"}]}),
            "steer[0].layers: ",
            "layer 8 cannot be steered",
        ),
        (
            json!({"steer": [{"vector": v, "layers": "0"}]}),
            "steer[0].layers: ",
            "layer 0 cannot be steered",
        ),
        (
            json!({"steer": [{"vector": v, "layers": "a..b"}]}),
            "steer[0].layers: ",
            "bad layer filter 'a..b'",
        ),
        (
            json!({"steer": [{"vector": v, "scale": "NaN"}]}),
            "steer[0].scale: ",
            "must be a number",
        ),
        (
            json!({"steer": [{"vector": v, "scale": huge}]}),
            "steer[0].scale: ",
            "is not a finite number",
        ),
        (
            json!({"steer": [{"vector": v, "positions": "5..2"}]}),
            "steer[0].positions: ",
            "positions '5..2'",
        ),
        (
            json!({"steer": [{"vector": v, "positions": "9000..9001"}]}),
            "steer[0].positions: ",
            "start outside the context",
        ),
        (
            json!({"steer": [{"vector": v, "tensor": "nope"}]}),
            "steer[0].tensor: ",
            "has no node 'nope-1'",
        ),
        (
            json!({"steer": [{"vector": v, "tensor": "l_out-*"}]}),
            "steer[0].tensor: ",
            "is not a node family",
        ),
        (
            json!({"steer": [{"vector": v, "sclae": 2}]}),
            "steer[0]: ",
            "unknown key 'sclae'",
        ),
        (
            json!({"steer": [{"scale": 2}]}),
            "steer[0]: ",
            "needs 'vector'",
        ),
        (
            json!({"steer": [{"file": "fr.gguf"}]}),
            "steer[0].file: ",
            "serve --steer-dir",
        ),
        (
            json!({"steer": {"vector": v}}),
            "'steer' must be an array",
            "",
        ),
        (
            json!({"patch": [{"tensor": "l_out-2", "pos": 1, "data": b64(&[1.0; 3])}]}),
            "patch[0].data: ",
            "data has 3 values, not n_embd 64",
        ),
        (
            json!({"patch": [{"tensor": "norm-2", "pos": 1, "data": row}]}),
            "patch[0].tensor: ",
            "'norm-2' names more than one node",
        ),
        (
            json!({"patch": [{"tensor": "l_out-6", "pos": 1, "data": row}]}),
            "patch[0].tensor: ",
            "has no node 'l_out-6'",
        ),
        (
            json!({"patch": [{"tensor": "ffn_up-2", "pos": 1, "data": row}]}),
            "patch[0].tensor: ",
            "only F32 nodes with one row of n_embd = 64",
        ),
        (
            json!({"patch": [{"tensor": "l_out-2", "pos": 40, "data": row}]}),
            "patch[0].pos: ",
            "pos 40 is outside",
        ),
        (
            json!({"patch": [{"tensor": "l_out-2", "data": row}]}),
            "patch[0].pos: ",
            "is required",
        ),
    ];
    for (extra, field, want) in &cases {
        let mut body = json!({"prompt": PROMPT, "n_predict": 4});
        for (k, x) in extra.as_object().unwrap() {
            body[k] = x.clone();
        }
        let (st, b) = post(&s.url("/completion"), &body, &[]);
        let e = json_of(&b);
        assert_eq!(st, 400, "{extra}: {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with(field) && msg.contains(want),
            "{extra}: {msg}"
        );
    }
    // Nothing was applied: the server still answers an unsteered request as before.
    let a = complete(
        &s,
        json!({"prompt": PROMPT, "n_predict": 4, "latents": "l_out-*"}),
    );
    let b = complete(
        &s,
        json!({"prompt": PROMPT, "n_predict": 4, "latents": "l_out-*"}),
    );
    assert_eq!(a.tokens.len(), 4);
    assert_eq!((a.tokens, a.rows), (b.tokens, b.rows));
    // And a start-up with a --steer-dir that is no directory is refused.
    let out = bin()
        .args(["serve", "--port", "0", "-m"])
        .arg(&m)
        .args(["--steer-dir", "/no/such/dir"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--steer-dir /no/such/dir: not a directory"),
        "{err}"
    );
}

/// Per generated token: (id, top-10 as (id, logprob)).
type Tops = Vec<(i64, Vec<(i64, f64)>)>;

fn serve_tops(s: &Server) -> Tops {
    let body = json!({"prompt": "the quick brown fox", "n_predict": 4, "n_probs": 10,
        "temperature": 0, "ignore_eos": true});
    let (st, b) = post(&s.url("/completion"), &body, &[]);
    let v = json_of(&b);
    assert_eq!(st, 200, "{v}");
    v["completion_probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let top = p["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["id"].as_i64().unwrap(), e["logprob"].as_f64().unwrap()))
                .collect();
            (p["id"].as_i64().unwrap(), top)
        })
        .collect()
}

fn capture_tops(m: &Path, out: &Path, steer: &str) -> Tops {
    let o = bin()
        .args([
            "capture", "-q", "-t", "2", "-n", "4", "-c", "256", "--top-k", "10",
        ])
        .args([
            "-p",
            "the quick brown fox",
            "--tensors",
            "",
            "--steer",
            steer,
            "-m",
        ])
        .arg(m)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    common::tokens(out)
        .iter()
        .filter(|t| t["prompt"] == false)
        .map(|t| {
            let top = t["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e[0].as_i64().unwrap(), e[1].as_f64().unwrap()))
                .collect();
            (t["token"].as_i64().unwrap(), top)
        })
        .collect()
}

#[test]
fn server_wide_control_vectors_equal_capture_steer() {
    let dir = tempfile::tempdir().unwrap();
    let m = common::synth_layers(dir.path(), N_LAYER);
    let f = dir.path().join("v.gguf");
    let cv = ControlVector {
        n_embd: N_EMBD,
        model_hint: "llama".into(),
        directions: (1..N_LAYER)
            .map(|l| (l, direction(10 + l as u32)))
            .collect(),
    };
    cv.write(&f).unwrap();
    let fs = f.to_str().unwrap();
    let plain = serve_tops(&Server::start(&m, &["-np", "1"]));
    let scaled = format!("{fs}:6");
    let steered = serve_tops(&Server::start(
        &m,
        &["-np", "1", "--control-vector-scaled", &scaled],
    ));
    let cli = capture_tops(&m, &dir.path().join("cap"), &scaled);
    assert_eq!(steered.len(), 4);
    assert_ne!(steered, plain, "the control vector changes the output");
    let mut worst = 0f64;
    for (a, b) in steered.iter().zip(&cli) {
        assert_eq!(a.0, b.0, "generated tokens");
        let ids = |t: &[(i64, f64)]| t.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(ids(&a.1), ids(&b.1), "top-10 ids");
        for (x, y) in a.1.iter().zip(&b.1) {
            worst = worst.max((x.1 - y.1).abs());
        }
    }
    assert!(worst < 1e-4, "logprobs differ by {worst}");
    // Two files sum, as llama-server sums them: v at 2 + v at 4 = v at 6.
    let (two, four) = (format!("{fs}:2"), format!("{fs}:4"));
    let summed = serve_tops(&Server::start(
        &m,
        &[
            "-np",
            "1",
            "--control-vector-scaled",
            &two,
            "--control-vector-scaled",
            &four,
        ],
    ));
    assert_eq!(
        summed.iter().map(|t| t.0).collect::<Vec<_>>(),
        steered.iter().map(|t| t.0).collect::<Vec<_>>()
    );
    // A layer range leaves the other layers alone: only layer 5 steered differs
    // from all of them.
    let ranged = serve_tops(&Server::start(
        &m,
        &[
            "-np",
            "1",
            "--control-vector-scaled",
            &scaled,
            "--control-vector-layer-range",
            "5",
            "5",
        ],
    ));
    assert_ne!(ranged, steered);
    // A vector of another model, and a bad range, stop the start-up with the file named.
    let wide = dir.path().join("wide.gguf");
    ControlVector {
        n_embd: N_EMBD + 1,
        model_hint: "llama".into(),
        directions: (1..N_LAYER).map(|l| (l, vec![0.5; N_EMBD + 1])).collect(),
    }
    .write(&wide)
    .unwrap();
    for (args, want) in [
        (
            vec!["--control-vector", wide.to_str().unwrap()],
            format!(
                "--control-vector {}: its directions are 65 wide",
                wide.display()
            ),
        ),
        (
            vec![
                "--control-vector",
                fs,
                "--control-vector-layer-range",
                "4",
                "2",
            ],
            "--control-vector-layer-range: layer range 4 2".to_string(),
        ),
        (
            vec!["--control-vector-scaled", fs],
            format!("--control-vector-scaled {fs}: use FILE:SCALE"),
        ),
    ] {
        let out = bin()
            .args(["serve", "--port", "0", "-m"])
            .arg(&m)
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&want), "{args:?}: {err}");
    }
}
