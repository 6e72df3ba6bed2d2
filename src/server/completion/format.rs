//! llama-server's response objects, field for field: the final `/completion` and
//! OpenAI objects and `generation_settings`.

use serde_json::{json, Value};

use super::acc::Acc;
use super::prepare::{Flavor, Prepared};
use crate::server::request::GenParams;
use crate::server::tokenize::detok_special;
use crate::server::{fingerprint, unix_now, App};

/// llama-server's `generation_settings`, key for key (floats printed as the double
/// of the f32 value, as llama-server does). `samplers` lists the stages this
/// server really applies (llama-server's penalties, DRY, typical-p and XTC are
/// no-ops at their defaults and not supported here).
pub(crate) fn generation_settings(p: &GenParams) -> Value {
    let n_predict = p.n_predict.map_or(-1, |n| n as i64);
    let f = |x: f32| x as f64;
    json!({
        "seed": if p.seed_requested < 0 { 4294967295i64 } else { p.seed_requested },
        "temperature": f(p.sampling.temperature),
        "dynatemp_range": 0.0,
        "dynatemp_exponent": 1.0,
        "top_k": p.sampling.top_k,
        "top_p": f(p.sampling.top_p),
        "min_p": f(p.sampling.min_p),
        "top_n_sigma": -1.0,
        "xtc_probability": 0.0,
        "xtc_threshold": f(0.1),
        "typical_p": 1.0,
        "repeat_last_n": 64,
        "repeat_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "dry_multiplier": 0.0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_penalty_last_n": 64,
        "dry_sequence_breakers": ["\n", ":", "\"", "*"],
        "mirostat": 0,
        "mirostat_tau": 5.0,
        "mirostat_eta": f(0.1),
        "adaptive_target": -1.0,
        "adaptive_decay": f(0.9),
        "stop": p.stop,
        "max_tokens": n_predict,
        "n_predict": n_predict,
        "n_keep": 0,
        "n_discard": 0,
        "ignore_eos": p.ignore_eos,
        "stream": p.stream,
        "logit_bias": [],
        "n_probs": p.n_probs,
        "min_keep": 0,
        "grammar": "",
        "grammar_lazy": false,
        "grammar_triggers": [],
        "preserved_tokens": [],
        "chat_format": "Content-only",
        "reasoning_format": "deepseek",
        "reasoning_in_content": false,
        "generation_prompt": "",
        "samplers": ["top_k", "top_p", "min_p", "temperature"],
        "speculative.types": "none",
        "timings_per_token": false,
        "post_sampling_probs": false,
        "backend_sampling": false,
        "lora": [],
    })
}

/// The final `/completion` object. As llama-server's, a stream's final event
/// (`stream`) carries no `content`, `tokens` or `completion_probabilities`: the
/// chunks before it had them.
pub(super) fn native_final(app: &App, p: &Prepared, acc: &Acc, stream: bool) -> Value {
    let content = if stream { "" } else { acc.text.content() };
    let tokens = if p.return_tokens && !stream {
        acc.tokens.clone()
    } else {
        Vec::new()
    };
    let mut v = json!({
        "index": 0,
        "content": content,
        "tokens": tokens,
        "id_slot": acc.slot,
        "stop": true,
        "model": app.model_name,
        "tokens_predicted": acc.n_gen(),
        "tokens_evaluated": acc.n_prompt,
        "generation_settings": generation_settings(&p.params),
        "prompt": detok_special(&acc.model, &p.tokens),
        "has_new_line": acc.has_new_line,
        "truncated": false,
        "stop_type": acc.stop_type(),
        "stopping_word": acc.text.stopped.clone().unwrap_or_default(),
        "tokens_cached": (acc.n_prompt + acc.n_gen()).saturating_sub(1),
        "timings": acc.timings(),
    });
    if !stream && p.params.n_probs > 0 {
        v["completion_probabilities"] = Value::Array(acc.probs.clone());
    }
    add_latents_skipped(p, &mut v);
    v
}

/// With `latents` asked for, the final object says which matched nodes were
/// left out and why: `"latents_skipped": [{"name", "reason"}]` (empty when none).
/// With `steer` or `patch` asked for, it also says what was applied.
pub(super) fn add_latents_skipped(p: &Prepared, v: &mut Value) {
    if let Some(f) = &p.filter {
        v["latents_skipped"] = json!(f.skipped);
    }
    if let Some(e) = &p.edits {
        if let Some(s) = &e.steer {
            v["steer"] = s.clone();
        }
        if let Some(s) = &e.patch {
            v["patch"] = s.clone();
        }
    }
}

/// The whole answer of a request that is not streamed as SSE (JSON, or the
/// summary that closes a binary stream).
pub(super) fn final_object(app: &App, p: &Prepared, acc: &Acc) -> Value {
    match p.flavor {
        Flavor::Native => native_final(app, p, acc, false),
        _ => oai_final(app, p, acc, false),
    }
}

/// The final OpenAI object. As llama-server's, a stream's final `/v1/completions`
/// event (`stream`) has `"text": ""` and no `logprobs`: the chunks before it had them.
pub(super) fn oai_final(app: &App, p: &Prepared, acc: &Acc, stream: bool) -> Value {
    let created = unix_now();
    let content = if stream { "" } else { acc.text.content() };
    let logprobs = (!stream && p.params.n_probs > 0).then(|| json!({"content": acc.probs}));
    let mut v = if p.flavor == Flavor::OaiChat {
        let mut choice = json!({
            "finish_reason": acc.finish_reason(),
            "index": 0,
            "message": {"role": "assistant", "content": content},
        });
        if let Some(lp) = logprobs {
            choice["logprobs"] = lp;
        }
        json!({
            "choices": [choice],
            "created": created,
            "model": app.model_name,
            "system_fingerprint": fingerprint(),
            "object": "chat.completion",
            "usage": acc.usage(),
            "id": p.id,
            "timings": acc.timings(),
        })
    } else {
        json!({
            "choices": [{"text": content, "index": 0, "logprobs": logprobs, "finish_reason": acc.finish_reason()}],
            "created": created,
            "model": app.model_name,
            "system_fingerprint": fingerprint(),
            "object": "text_completion",
            "usage": acc.usage(),
            "id": p.id,
            "timings": acc.timings(),
        })
    };
    add_latents_skipped(p, &mut v);
    v
}
