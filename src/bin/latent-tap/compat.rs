//! llama-server command-line compatibility for `serve`: its multi-letter short
//! flags are rewritten to long ones, and the flags `serve` lacks are refused by
//! name.

/// llama-server flags that `serve` does not implement: named in the error.
const UNSUPPORTED_LLAMA_SERVER_FLAGS: &[&str] = &[
    "--jinja",
    "--no-jinja",
    "--lora",
    "--lora-scaled",
    "--mmproj",
    "--embedding",
    "--embeddings",
    "--reranking",
    "--rerank",
    "--grammar",
    "--json-schema",
    "-fa",
    "--flash-attn",
    "--slot-save-path",
    "--cache-reuse",
    "--context-shift",
    "--spm-infill",
    "-md",
    "--model-draft",
    "-hf",
    "--hf-repo",
    "-mu",
    "--model-url",
    "--api-key-file",
    "--ssl-key-file",
    "--ssl-cert-file",
    "--props",
    "--no-slots",
    "-cb",
    "--cont-batching",
    "-nocb",
    "--no-cont-batching",
    "-kvu",
    "--kv-unified",
    "-sp",
    "--special",
    "--threads-http",
    "-tb",
    "--threads-batch",
    "--path",
    "--no-webui",
    "--webui",
    "-s",
    "--seed",
    "--temp",
    "--top-k",
    "--top-p",
    "--min-p",
    "-r",
    "--reverse-prompt",
    "--cache-prompt",
    "--no-cache-prompt",
    "-ctk",
    "--cache-type-k",
    "-ctv",
    "--cache-type-v",
    "--mlock",
    "--no-mmap",
    "-ts",
    "--tensor-split",
    "-sm",
    "--split-mode",
    "-mg",
    "--main-gpu",
    "--rope-scaling",
    "--rope-freq-base",
    "--yarn-orig-ctx",
    "-dt",
    "--defrag-thold",
    "--n-cpu-moe",
    "-cmoe",
];

/// Rewrite llama-server's multi-letter short flags to long ones and reject the
/// llama-server flags `serve` does not support, naming them.
pub fn llama_server_args(args: Vec<String>) -> std::result::Result<Vec<String>, String> {
    let is_serve = args.get(1).map(String::as_str) == Some("serve");
    if !is_serve {
        return Ok(args);
    }
    let mut out = Vec::with_capacity(args.len());
    for a in args {
        let (flag, value) = match a.split_once('=') {
            Some((f, v)) if f.starts_with('-') => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let long = match flag.as_str() {
            "-np" => "--parallel",
            "-ub" => "--ubatch-size",
            "-ngl" => "--n-gpu-layers",
            "-to" => "--timeout",
            "--ctx-size" | "--parallel" | "--threads" | "--batch-size" | "--ubatch-size" => flag.as_str(),
            f if UNSUPPORTED_LLAMA_SERVER_FLAGS.contains(&f) => {
                return Err(format!(
                    "llama-server option '{f}' is not supported by latent-tap serve (see latent-tap serve --help)"
                ))
            }
            _ => {
                out.push(a);
                continue;
            }
        };
        match value {
            Some(v) => out.push(format!("{long}={v}")),
            None => out.push(long.to_string()),
        }
    }
    Ok(out)
}
