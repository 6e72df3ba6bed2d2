//! `latent-tap serve` over real HTTP on a free loopback port: llama-server's
//! endpoints and shapes, latents via JSON / SSE / binary equal to the CLI's
//! capture bit for bit, continuous batching, disconnects, subscribers, bad
//! input, API keys and graceful shutdown.

mod common;
use common::http::{get, json_of, post, post_raw, records, sse_events, Server};
use common::{bin, synth_model};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const FRAMES: &str = "application/vnd.latent-tap.frames";

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// Per tensor: (pos, bytes) rows in order.
type Rows = BTreeMap<String, Vec<(i32, Vec<u8>)>>;

fn rows_from_json(lat: &Value, into: &mut Rows) {
    for (name, t) in lat.as_object().unwrap() {
        let width = t["shape"][1].as_u64().unwrap() as usize;
        let es = match t["dtype"].as_str().unwrap() {
            "f32" => 4,
            _ => 2,
        };
        let data = b64(t["data"].as_str().unwrap());
        let pos: Vec<i32> = t["pos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_i64().unwrap() as i32)
            .collect();
        assert_eq!(data.len(), pos.len() * width * es, "{name}");
        let v = into.entry(name.clone()).or_default();
        for (i, p) in pos.iter().enumerate() {
            v.push((*p, data[i * width * es..(i + 1) * width * es].to_vec()));
        }
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn i32_at(b: &[u8], o: usize) -> i32 {
    i32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// FRAME record → (name, rows as (seq, pos, bytes)). Offsets from src/record.rs.
fn parse_frame(r: &[u8]) -> (String, Vec<(i32, i32, Vec<u8>)>) {
    let header_size = u32_at(r, 4) as usize;
    let dtype = u32_at(r, 32);
    let n_rows = u32_at(r, 36) as usize;
    let width = u64_at(r, 40) as usize;
    let name_bytes = &r[80..144];
    let end = name_bytes.iter().position(|&c| c == 0).unwrap();
    let name = String::from_utf8(name_bytes[..end].to_vec()).unwrap();
    let es = if dtype == 0 { 4 } else { 2 };
    let data0 = header_size + n_rows * 16;
    let rows = (0..n_rows)
        .map(|i| {
            let m = header_size + i * 16;
            let d = data0 + i * width * es;
            (
                i32_at(r, m),
                i32_at(r, m + 4),
                r[d..d + width * es].to_vec(),
            )
        })
        .collect();
    (name, rows)
}

/// The CLI's capture of the same run, per tensor.
fn cli_capture(
    model: &Path,
    dir: &Path,
    prompt: &str,
    n: usize,
    extra: &[&str],
) -> (Rows, Vec<Value>) {
    let out = dir.join(format!("cli-{}", prompt.len()));
    let o = bin()
        .args(["capture", "--quiet", "-t", "2", "-m"])
        .arg(model)
        .args(["-p", prompt, "-n", &n.to_string(), "-o"])
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = std::fs::read(out.join("latents.safetensors")).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&st).unwrap();
    let mut rows = Rows::new();
    for (name, t) in parsed.tensors() {
        if name.ends_with(".pos") || name.ends_with(".seq") {
            continue;
        }
        let pos = parsed.tensor(&format!("{name}.pos")).unwrap();
        let pos: Vec<i32> = pos
            .data()
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let w = t.data().len() / pos.len();
        rows.insert(
            name.clone(),
            pos.iter()
                .enumerate()
                .map(|(i, &p)| (p, t.data()[i * w..(i + 1) * w].to_vec()))
                .collect(),
        );
    }
    let tokens: Vec<Value> = std::fs::read_to_string(out.join("tokens.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (rows, tokens)
}

#[test]
fn endpoints_have_llama_server_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &["--metrics", "--alias", "synth"]);
    let (st, b) = get(&s.url("/health"), &[]);
    assert_eq!((st, json_of(&b)), (200, json!({"status": "ok"})));
    let props = json_of(&get(&s.url("/props"), &[]).1);
    assert_eq!(props["total_slots"], 4);
    assert_eq!(props["model_alias"], "synth");
    // Deferred capture (no graph split) is what runs in this build; the server says so.
    assert_eq!(props["latents"]["capture_mode"]["requested"], "auto");
    assert_eq!(props["latents"]["capture_mode"]["used"], "deferred");
    assert_eq!(
        props["latents"]["build"]["target_cpu"],
        env!("LATENT_TAP_TARGET_CPU")
    );
    assert_eq!(props["default_generation_settings"]["n_ctx"], 4096);
    assert!(
        props["default_generation_settings"]["params"]["temperature"]
            .as_f64()
            .unwrap()
            > 0.79
    );
    let models = json_of(&get(&s.url("/v1/models"), &[]).1);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "synth");
    assert_eq!(models["data"][0]["owned_by"], "llamacpp");
    assert_eq!(models["models"][0]["name"], "synth");
    assert_eq!(json_of(&get(&s.url("/models"), &[]).1), {
        let mut v = models.clone();
        v["data"][0]["created"] =
            json_of(&get(&s.url("/models"), &[]).1)["data"][0]["created"].clone();
        v
    });
    let slots = json_of(&get(&s.url("/slots"), &[]).1);
    assert_eq!(slots.as_array().unwrap().len(), 4);
    assert_eq!(slots[0]["is_processing"], false);
    // The synthetic vocab is byte-level: one token per byte, plus BOS when asked.
    let t = json_of(&post(&s.url("/tokenize"), &json!({"content": "hi"}), &[]).1);
    assert_eq!(t["tokens"].as_array().unwrap().len(), 2);
    let t2 = json_of(
        &post(
            &s.url("/tokenize"),
            &json!({"content": "hi", "add_special": true, "with_pieces": true}),
            &[],
        )
        .1,
    );
    let toks = t2["tokens"].as_array().unwrap();
    assert_eq!(toks.len(), 3);
    assert_eq!(toks[1]["piece"], "h");
    assert_eq!(toks[2]["id"], t["tokens"][1]);
    let d = json_of(&post(&s.url("/detokenize"), &json!({"tokens": t["tokens"]}), &[]).1);
    assert_eq!(d["content"], "hi");
    let lt = json_of(&get(&s.url("/latents/tensors"), &[]).1);
    assert_eq!(lt["n_layer"], 3);
    assert!(lt["layers"]["2"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "l_out-2" && e["shape"] == json!([64])));
    let (st, b) = get(&s.url("/nope"), &[]);
    assert_eq!(st, 404);
    assert_eq!(json_of(&b)["error"]["type"], "not_found_error");
    let (st, b) = post(&s.url("/v1/embeddings"), &json!({"input": "x"}), &[]);
    assert_eq!(st, 501);
    assert_eq!(json_of(&b)["error"]["code"], 501);
    // One completion, then the metrics count it.
    let (st, b) = post(
        &s.url("/completion"),
        &json!({"prompt": "hello", "n_predict": 3, "temperature": 0, "ignore_eos": true}),
        &[],
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let c = json_of(&b);
    for k in [
        "index",
        "content",
        "tokens",
        "id_slot",
        "stop",
        "model",
        "tokens_predicted",
        "tokens_evaluated",
        "generation_settings",
        "prompt",
        "has_new_line",
        "truncated",
        "stop_type",
        "stopping_word",
        "tokens_cached",
        "timings",
    ] {
        assert!(c.get(k).is_some(), "missing {k}");
    }
    assert_eq!(c["tokens_evaluated"], 6);
    assert_eq!(c["tokens_predicted"], 3);
    assert_eq!(c["stop_type"], "limit");
    assert_eq!(c["model"], "synth");
    assert_eq!(c["timings"]["predicted_n"], 3);
    assert!(c.get("completion_probabilities").is_none());
    let metrics = String::from_utf8(get(&s.url("/metrics"), &[]).1).unwrap();
    assert!(
        metrics.contains(
            "# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 3\n"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("llamacpp:prompt_tokens_total 6\n"));
    assert!(metrics.contains("latent_tap:frames_total"));
}

#[test]
fn latents_json_sse_binary_equal_cli_capture_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let prompt = "the quick brown fox";
    let n = 6;
    let (cli, cli_tokens) = cli_capture(
        &m,
        dir.path(),
        prompt,
        n,
        &["--tensors", "l_out-*,attn_out-1", "--top-k", "3"],
    );
    let s = Server::start(&m, &["-b", "512"]);
    let req = json!({"prompt": prompt, "n_predict": n, "temperature": 0, "n_probs": 3, "return_tokens": true,
                     "latents": {"tensors": "l_out-*,attn_out-1"}});
    // JSON
    let (st, b) = post(&s.url("/completion"), &req, &[]);
    assert_eq!(st, 200);
    let c = json_of(&b);
    let mut js = Rows::new();
    rows_from_json(&c["latents"], &mut js);
    assert_eq!(js, cli, "JSON latents differ from the CLI capture");
    // Tokens and n_probs equal the CLI's tokens and top-k.
    let cli_gen: Vec<&Value> = cli_tokens.iter().filter(|t| t["prompt"] == false).collect();
    let toks: Vec<i64> = c["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    assert_eq!(
        toks,
        cli_gen
            .iter()
            .map(|t| t["token"].as_i64().unwrap())
            .collect::<Vec<_>>()
    );
    let probs = c["completion_probabilities"].as_array().unwrap();
    assert_eq!(probs.len(), n);
    for (p, t) in probs.iter().zip(&cli_gen) {
        assert_eq!(p["id"], t["token"]);
        assert_eq!(
            p["logprob"].as_f64().unwrap() as f32,
            t["logprob"].as_f64().unwrap() as f32
        );
        let top: Vec<(i64, f32)> = p["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["id"].as_i64().unwrap(),
                    e["logprob"].as_f64().unwrap() as f32,
                )
            })
            .collect();
        let cli_top: Vec<(i64, f32)> = t["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_i64().unwrap(), e[1].as_f64().unwrap() as f32))
            .collect();
        assert_eq!(top, cli_top);
    }
    // SSE: same tokens; each chunk carries its step's frames.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let (st, b) = post(&s.url("/completion"), &sreq, &[]);
    assert_eq!(st, 200);
    let events = sse_events(&b);
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "/completion has no [DONE]"
    );
    let mut ss = Rows::new();
    let mut stoks = Vec::new();
    let mut content = String::new();
    for e in &events {
        let v = json_of(e.as_bytes());
        if let Some(l) = v.get("latents") {
            rows_from_json(l, &mut ss);
        }
        content.push_str(v["content"].as_str().unwrap());
        let chunk_tokens = v["tokens"].as_array().unwrap();
        stoks.extend(chunk_tokens.iter().map(|t| t.as_i64().unwrap()));
        if v["stop"] == false && !chunk_tokens.is_empty() {
            let steps: Vec<i64> = v["latents"]["l_out-0"]["step"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            let k = stoks.len() as i64 - 1;
            assert!(
                steps.iter().all(|&x| x == k),
                "chunk {k} carries frames of step {k} only: {steps:?}"
            );
        }
    }
    assert_eq!(stoks, toks, "streamed and non-streamed tokens differ");
    assert_eq!(content, c["content"].as_str().unwrap());
    assert_eq!(ss, cli, "SSE latents differ from the CLI capture");
    let last = json_of(events.last().unwrap().as_bytes());
    assert_eq!(last["stop"], true);
    assert_eq!(last["content"], "");
    assert_eq!(
        last["tokens"],
        json!([]),
        "the final event repeats no token"
    );
    // Binary records.
    let (st, b) = post(&s.url("/completion"), &req, &[("Accept", FRAMES)]);
    assert_eq!(st, 200);
    let recs = records(&b);
    let kinds: Vec<u32> = recs.iter().map(|r| r.0).collect();
    assert_eq!(kinds[0], 4, "REQUEST begin first");
    assert_eq!(
        &kinds[kinds.len() - 3..],
        &[4, 3, 5],
        "REQUEST end, END, JSON last"
    );
    let mut bs = Rows::new();
    let mut frames = 0;
    for (k, r) in &recs {
        if *k == 1 {
            frames += 1;
            let (name, rows) = parse_frame(r);
            for (_, p, d) in rows {
                bs.entry(name.clone()).or_default().push((p, d));
            }
        }
    }
    assert_eq!(bs, cli, "binary latents differ from the CLI capture");
    let end = &recs[recs.len() - 2].1;
    assert_eq!(u64_at(end, 8), frames, "END counts the frames delivered");
    let summary = &recs.last().unwrap().1;
    let sj = json_of(&summary[16..]);
    assert_eq!(sj["tokens_predicted"], n);
}

#[test]
fn openai_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &[]);
    let (st, b) = post(
        &s.url("/v1/completions"),
        &json!({"prompt": "abc", "max_tokens": 4, "temperature": 0, "logprobs": 2, "ignore_eos": true}),
        &[],
    );
    assert_eq!(st, 200);
    let c = json_of(&b);
    assert_eq!(c["object"], "text_completion");
    assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(c["usage"]["completion_tokens"], 4);
    assert_eq!(c["usage"]["prompt_tokens"], 4);
    assert_eq!(c["usage"]["total_tokens"], 8);
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    assert_eq!(
        c["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    // Streamed: deltas concatenate to the same text, then [DONE].
    let (st, b) = post(
        &s.url("/v1/completions"),
        &json!({"prompt": "abc", "max_tokens": 4, "temperature": 0, "stream": true, "ignore_eos": true}),
        &[],
    );
    assert_eq!(st, 200);
    let ev = sse_events(&b);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let text: String = ev[..ev.len() - 1]
        .iter()
        .map(|e| {
            json_of(e.as_bytes())["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, c["choices"][0]["text"].as_str().unwrap());
    // Chat: no template in the synthetic GGUF → ChatML, like llama-server.
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0, "ignore_eos": true});
    let rendered = json_of(&post(&s.url("/apply-template"), &chat, &[]).1);
    assert_eq!(
        rendered["prompt"],
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let n_prompt = json_of(
        &post(
            &s.url("/tokenize"),
            &json!({"content": rendered["prompt"], "add_special": true}),
            &[],
        )
        .1,
    )["tokens"]
        .as_array()
        .unwrap()
        .len();
    let (st, b) = post(&s.url("/v1/chat/completions"), &chat, &[]);
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let c = json_of(&b);
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    assert_eq!(c["usage"]["prompt_tokens"], n_prompt);
    let mut sreq = chat.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    sreq["latents"] = json!("l_out-2");
    let ev = sse_events(&post(&s.url("/v1/chat/completions"), &sreq, &[]).1);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let first = json_of(ev[0].as_bytes());
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage = json_of(ev[ev.len() - 2].as_bytes());
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    let text: String = ev[1..ev.len() - 1]
        .iter()
        .filter_map(|e| {
            json_of(e.as_bytes())["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        text,
        c["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let mut lat = Rows::new();
    for e in &ev[..ev.len() - 1] {
        if let Some(l) = json_of(e.as_bytes()).get("latents") {
            rows_from_json(l, &mut lat);
        }
    }
    let pos: Vec<i32> = lat["l_out-2"].iter().map(|r| r.0).collect();
    assert_eq!(
        pos,
        vec![n_prompt as i32 - 1, n_prompt as i32, n_prompt as i32 + 1],
        "last layer: one row per sampled token"
    );
}

fn l2(a: &[u8]) -> Vec<f32> {
    a.chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn sixteen_streams_on_four_slots_match_solo_runs() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &["-np", "4"]);
    let prompts: Vec<String> = (0..16)
        .map(|i| format!("prompt number {i} {}", "x".repeat(i)))
        .collect();
    let req = |p: &str| json!({"prompt": p, "n_predict": 8, "temperature": 0, "stream": true, "ignore_eos": true, "latents": {"tensors": "l_out-1"}});
    let run = |url: String, body: Value| {
        let ev = sse_events(&post(&url, &body, &[]).1);
        let mut toks = Vec::new();
        let mut rows = Rows::new();
        for e in &ev {
            let v = json_of(e.as_bytes());
            toks.extend(
                v["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_i64().unwrap()),
            );
            if let Some(l) = v.get("latents") {
                rows_from_json(l, &mut rows);
            }
        }
        (toks, rows)
    };
    // Solo runs, one at a time.
    let solo: Vec<_> = prompts
        .iter()
        .map(|p| run(s.url("/completion"), req(p)))
        .collect();
    // All 16 at once.
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, body) = (s.url("/completion"), req(p));
            std::thread::spawn(move || run(url, body))
        })
        .collect();
    let together: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, ((ts, rs), (tt, rt))) in solo.iter().zip(&together).enumerate() {
        assert_eq!(tt.len(), 8, "client {i} completed");
        assert_eq!(ts, tt, "client {i}: tokens differ from its solo run");
        let (a, b) = (&rs["l_out-1"], &rt["l_out-1"]);
        assert_eq!(a.len(), b.len());
        let n_prompt = prompts[i].len() + 1;
        assert_eq!(
            b.iter().map(|r| r.0).collect::<Vec<_>>(),
            (0..(n_prompt + 7) as i32).collect::<Vec<_>>(),
            "client {i}: its own positions"
        );
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (l2(&x.1), l2(&y.1));
            let num: f32 = x
                .iter()
                .zip(&y)
                .map(|(p, q)| (p - q) * (p - q))
                .sum::<f32>()
                .sqrt();
            let den: f32 = x.iter().map(|p| p * p).sum::<f32>().sqrt();
            assert!(
                num <= 1e-3 * den,
                "client {i}: row differs by {} relative",
                num / den
            );
        }
    }
}

#[test]
fn disconnect_frees_the_slot_and_subscribers_get_everything() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &["-np", "1", "--metrics"]);
    // A subscriber that reads (in a thread, until the server closes its stream).
    let sub = ureq::get(&s.url("/latents/subscribe?tensors=l_out-0"))
        .call()
        .unwrap();
    assert_eq!(sub.header("content-type"), Some(FRAMES));
    let mut sub_reader = sub.into_reader();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = sub_reader.read_to_end(&mut buf);
        buf
    });
    // A subscriber that never reads, with a tiny queue.
    let stuck =
        ureq::get(&s.url("/latents/subscribe?tensors=l_out-*,attn_out-*,ffn_out-*&queue_mb=1"))
            .call()
            .unwrap();
    // A client that reads 3 chunks of a long generation, then goes away.
    let resp = ureq::post(&s.url("/completion"))
        .send_json(json!({"prompt": "a long one", "n_predict": 100000, "temperature": 0, "stream": true, "ignore_eos": true}))
        .unwrap();
    let mut r = BufReader::new(resp.into_reader());
    let mut got = 0;
    let mut line = String::new();
    while got < 3 {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("data: ") {
            got += 1;
        }
    }
    drop(r);
    // With one slot, the next request can only run once the first was cancelled.
    let t0 = Instant::now();
    let (st, b) = post(
        &s.url("/completion"),
        &json!({"prompt": "next", "n_predict": 2, "temperature": 0}),
        &[],
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json_of(&b)["tokens_predicted"], 2);
    assert!(t0.elapsed() < Duration::from_secs(60));
    let slots = json_of(&get(&s.url("/slots"), &[]).1);
    assert_eq!(slots[0]["is_processing"], false);
    // Big frames for the stuck subscriber: all l_out rows of a long prompt, repeatedly.
    for _ in 0..4 {
        let (st, _) = post(
            &s.url("/completion"),
            &json!({"prompt": "z".repeat(2000), "n_predict": 1}),
            &[],
        );
        assert_eq!(st, 200);
    }
    assert!(
        metric(&s, "latent_tap:subscriber_drops_total{") > 0,
        "the stuck subscriber's drops are counted"
    );
    drop(stuck);
    // Graceful stop closes subscriber streams; the reading one saw every request
    // begin and end, with frames in between.
    let mut s = s;
    let pid = s.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(s.child.wait().unwrap().success());
    let buf = reader.join().unwrap();
    let recs = records(&buf[..complete_prefix(&buf)]);
    let begins = recs
        .iter()
        .filter(|(k, r)| *k == 4 && u32_at(r, 20) == 1)
        .count();
    let ends = recs
        .iter()
        .filter(|(k, r)| *k == 4 && u32_at(r, 20) == 2)
        .count();
    assert_eq!((begins, ends), (6, 6), "6 requests seen by the subscriber");
    assert!(recs.iter().any(|(k, _)| *k == 1), "frames delivered");
    assert!(
        recs.iter()
            .all(|(k, r)| *k != 1 || parse_frame(r).0 == "l_out-0"),
        "only its tensors"
    );
}

/// Length of the longest prefix of whole records (a killed server may cut one).
/// One counter of `/metrics` (the largest value among its label sets).
fn metric(s: &Server, name: &str) -> u64 {
    let m = String::from_utf8(get(&s.url("/metrics"), &[]).1).unwrap();
    m.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .max()
        .unwrap_or_else(|| panic!("{name} not in {m}"))
}

/// A subscriber whose queue is full costs the engine nothing: while it is
/// behind, tensors only it wants are not captured at all (the tap's frame
/// counter stands still), the frames it misses are counted as its drops (3
/// tensors per decode here), and once it has read its queue it gets frames
/// again.
#[test]
fn a_subscriber_that_is_behind_is_not_captured_for() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &["-np", "1", "--metrics"]);
    let stuck = ureq::get(&s.url("/latents/subscribe?tensors=l_out-*&queue_mb=1"))
        .call()
        .unwrap();
    let long = |n_predict: u32| {
        let (st, b) = post(
            &s.url("/completion"),
            &json!({"prompt": "z".repeat(2000), "n_predict": n_predict, "temperature": 0}),
            &[],
        );
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    };
    // Fill its queue (and whatever the sockets buffer) until frames are dropped.
    let drops = "latent_tap:subscriber_drops_total{";
    for _ in 0..40 {
        long(1);
        if metric(&s, drops) > 0 {
            break;
        }
    }
    assert!(metric(&s, drops) > 0, "the subscriber never fell behind");
    let (frames0, drops0) = (metric(&s, "latent_tap:frames_total"), metric(&s, drops));
    let decodes0 = metric(&s, "llamacpp:n_decode_total");
    for _ in 0..3 {
        long(4);
    }
    let decodes = metric(&s, "llamacpp:n_decode_total") - decodes0;
    assert!(decodes >= 3 * 4, "{decodes} decodes");
    assert_eq!(
        metric(&s, "latent_tap:frames_total"),
        frames0,
        "nothing is captured for a subscriber that is behind"
    );
    assert_eq!(
        metric(&s, drops) - drops0,
        3 * decodes,
        "each decode's 3 l_out frames count as dropped"
    );
    // It reads everything queued: captured for again.
    let mut r = stuck.into_reader();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let t0 = Instant::now();
    while metric(&s, "latent_tap:frames_total") == frames0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never captured again"
        );
        std::thread::sleep(Duration::from_millis(100));
        long(1);
    }
    drop(s);
    assert!(reader.join().unwrap() > 0);
}

fn complete_prefix(b: &[u8]) -> usize {
    let mut off = 0;
    while off + 4 <= b.len() {
        let n = u32::from_le_bytes(b[off..off + 4].try_into().unwrap()) as usize;
        if off + 4 + n > b.len() {
            break;
        }
        off += 4 + n;
    }
    off
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn bad_requests_get_json_errors_and_leave_the_server_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &["-c", "256", "-np", "1", "--max-body-kb", "64"]);
    let url = s.url("/completion");
    let check = |(st, b): (u16, Vec<u8>), want: u16, needle: &str| {
        assert_eq!(st, want, "{}", String::from_utf8_lossy(&b));
        let v = json_of(&b);
        assert_eq!(v["error"]["code"], want);
        assert!(v["error"]["type"].is_string());
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "'{needle}' not in '{msg}'");
    };
    check(post_raw(&url, b"{bad", &[]), 400, "invalid JSON");
    check(post_raw(&url, b"[1,2]", &[]), 400, "JSON object");
    check(
        post_raw(&url, b"{\"prompt\": \"\xff\xfe\"}", &[]),
        400,
        "UTF-8",
    );
    check(post(&url, &json!({"prompt": 5.5}), &[]), 400, "prompt");
    check(
        post(&url, &json!({"prompt": "x", "n_predict": "ten"}), &[]),
        400,
        "n_predict",
    );
    check(
        post(&url, &json!({"prompt": "x", "n_predict": -5}), &[]),
        400,
        "n_predict",
    );
    check(
        post(&url, &json!({"prompt": "x", "n_predict": 1e300}), &[]),
        400,
        "n_predict",
    );
    check(
        post(&url, &json!({"prompt": "x", "temperature": "hot"}), &[]),
        400,
        "temperature",
    );
    check(
        post(&url, &json!({"prompt": "x", "top_p": 2}), &[]),
        400,
        "top-p",
    );
    check(
        post(&url, &json!({"prompt": "x", "n_probs": 100000}), &[]),
        400,
        "n_probs",
    );
    check(
        post(&url, &json!({"prompt": [1, 99999999]}), &[]),
        400,
        "out of range",
    );
    check(
        post(&url, &json!({"prompt": "y".repeat(400)}), &[]),
        400,
        "exceeds the available context size",
    );
    check(
        post(
            &url,
            &json!({"prompt": "x", "latents": {"tensors": "l_outt-*"}}),
            &[],
        ),
        400,
        "close names: l_out-",
    );
    check(
        post(
            &url,
            &json!({"prompt": "x", "latents": {"tensors": "l_out-*", "dtype": "f8"}}),
            &[],
        ),
        400,
        "dtype",
    );
    check(
        post(
            &url,
            &json!({"prompt": "x", "latents": {"tensors": "l_out-*", "layers": "9..2"}}),
            &[],
        ),
        400,
        "layers",
    );
    check(
        post(
            &url,
            &json!({"prompt": "x", "grammar": "root ::= \"a\""}),
            &[],
        ),
        501,
        "grammar",
    );
    check(
        post(&url, &json!({"prompt": ["a", "b"]}), &[]),
        501,
        "several prompts",
    );
    check(post(&url, &json!({}), &[]), 400, "prompt");
    check(
        post_raw(&url, &vec![b' '; 65 * 1024], &[]),
        413,
        "larger than",
    );
    check(
        post(
            &s.url("/v1/chat/completions"),
            &json!({"messages": "hi"}),
            &[],
        ),
        400,
        "messages",
    );
    check(
        get(&s.url("/latents/subscribe?tensors=nope-*"), &[]),
        400,
        "matches no tensor",
    );
    let before = rss_kb(s.pid());
    let bodies: Vec<Vec<u8>> = vec![
        b"{bad".to_vec(),
        br#"{"prompt": 1.5}"#.to_vec(),
        br#"{"prompt": "x", "n_predict": -9}"#.to_vec(),
        br#"{"prompt": "x", "latents": {"tensors": "zz"}}"#.to_vec(),
        vec![0xff; 100],
    ];
    for i in 0..1000 {
        let (st, _) = post_raw(&url, &bodies[i % bodies.len()], &[]);
        assert!((400..500).contains(&st));
    }
    let after = rss_kb(s.pid());
    eprintln!("RSS before/after 1000 bad requests: {before} kB / {after} kB");
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} kB to {after} kB"
    );
    let (st, b) = post(
        &url,
        &json!({"prompt": "ok", "n_predict": 2, "temperature": 0}),
        &[],
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
}

#[test]
fn api_key_cli_errors_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    // Non-loopback without a key: refused with one line.
    let o = bin()
        .args(["serve", "--host", "0.0.0.0", "-m"])
        .arg(&m)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--api-key"), "{err}");
    // An unsupported llama-server flag is named.
    let o = bin()
        .args(["serve", "--jinja", "-m"])
        .arg(&m)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("'--jinja'") && err.lines().count() == 1,
        "{err}"
    );
    let o = bin()
        .args(["serve", "--frobnicate", "-m"])
        .arg(&m)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.lines().count() == 1 && err.contains("--frobnicate"),
        "{err}"
    );
    // With a key: /health is open, everything else needs it.
    let mut s = Server::start(&m, &["--api-key", "s3cret", "-np", "1"]);
    assert_eq!(get(&s.url("/health"), &[]).0, 200);
    let (st, b) = get(&s.url("/props"), &[]);
    assert_eq!(st, 401);
    assert_eq!(json_of(&b)["error"]["type"], "authentication_error");
    assert_eq!(
        get(&s.url("/props"), &[("Authorization", "Bearer wrong")]).0,
        401
    );
    assert_eq!(
        post(&s.url("/completion"), &json!({"prompt": "x"}), &[]).0,
        401
    );
    assert_eq!(
        get(&s.url("/props"), &[("Authorization", "Bearer s3cret")]).0,
        200
    );
    // SIGTERM during a streamed request: the request finishes, the process exits 0.
    let url = s.url("/completion");
    let h = std::thread::spawn(move || {
        let ev = sse_events(&post(&url, &json!({"prompt": "go", "n_predict": 40, "temperature": 0, "stream": true, "ignore_eos": true}), &[("Authorization", "Bearer s3cret")]).1);
        ev.len()
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = s.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = s.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert_eq!(h.join().unwrap(), 41, "40 token chunks and the final one");
}

#[test]
fn real_model_latents_equal_cli_capture() {
    let m = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(m.exists(), "run scripts/fetch-model first");
    let dir = tempfile::tempdir().unwrap();
    let prompt = "The capital of France is";
    let (cli, cli_tokens) = cli_capture(
        &m,
        dir.path(),
        prompt,
        4,
        &["--tensors", "l_out-*", "--top-k", "2"],
    );
    let s = Server::start(&m, &["-b", "512"]);
    let (st, b) = post(
        &s.url("/completion"),
        &json!({"prompt": prompt, "n_predict": 4, "temperature": 0, "n_probs": 2, "latents": "l_out-*"}),
        &[],
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let c = json_of(&b);
    let mut js = Rows::new();
    rows_from_json(&c["latents"], &mut js);
    assert_eq!(js.len(), 18);
    assert_eq!(js, cli, "latents differ from the CLI capture");
    let gen: Vec<i64> = cli_tokens
        .iter()
        .filter(|t| t["prompt"] == false)
        .map(|t| t["token"].as_i64().unwrap())
        .collect();
    let ids: Vec<i64> = c["completion_probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, gen);
    assert_eq!(c["prompt"], "<bos>The capital of France is");
    // No template in this GGUF: ChatML, as llama-server falls back to.
    let props = json_of(&get(&s.url("/props"), &[]).1);
    assert_eq!(props["chat_template"], "chatml");
    assert_eq!(props["bos_token"], "<bos>");
}

#[test]
fn python_example_client_selftest() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth_model(dir.path());
    let s = Server::start(&m, &["--api-key", "k"]);
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/client.py");
    let o = Command::new("python3")
        .arg(&client)
        .args(["selftest", "--url", &s.url, "--api-key", "k", "--out"])
        .arg(dir.path().join("recorded"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "client.py selftest failed (needs numpy):\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
