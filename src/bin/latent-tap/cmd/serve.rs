//! `serve`: a llama-server-compatible HTTP API that streams latents with the
//! tokens.

use std::path::PathBuf;

use clap::Args;

use latent_tap::engine::ContextOptions;
use latent_tap::{Error, Result};

use crate::args::capture_mode;

/// `serve` options: llama-server's spellings and meanings for this subset.
/// (Multi-letter short forms such as `-np` are rewritten to their long form
/// before parsing; see [`crate::compat::llama_server_args`].)
#[derive(Args)]
pub struct ServeArgs {
    /// GGUF model file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Address to listen on (a non-loopback address needs --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at startup).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Context size in tokens, shared by all slots.
    #[arg(long, short = 'c', default_value_t = 4096)]
    ctx_size: u32,
    /// Parallel slots (-np). Default: 4 slots sharing the whole context (llama-server's
    /// "auto"); an explicit N gives each slot ctx-size/N positions.
    #[arg(long)]
    parallel: Option<u32>,
    /// Compute threads (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<i32>,
    /// Logical batch size per llama_decode.
    #[arg(long, short = 'b', default_value_t = 2048)]
    batch_size: u32,
    /// Physical batch size per graph compute (-ub).
    #[arg(long, default_value_t = 512)]
    ubatch_size: u32,
    /// Layers to offload to the GPU (-ngl; -1: all).
    #[arg(long, alias = "gpu-layers", default_value_t = -1, allow_hyphen_values = true)]
    n_gpu_layers: i32,
    /// llama.cpp RPC workers that take offloaded layers: HOST:PORT[,HOST:PORT...]
    /// (llama-server's --rpc).
    #[arg(long, value_name = "HOST:PORT,...")]
    rpc: Option<String>,
    /// Default token limit per request (-1: until end of generation or the slot is full).
    #[arg(long, short = 'n', alias = "predict", default_value_t = -1, allow_hyphen_values = true)]
    n_predict: i64,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long)]
    api_key: Option<String>,
    /// Model name reported to clients.
    #[arg(long, short = 'a')]
    alias: Option<String>,
    /// Serve Prometheus metrics at /metrics.
    #[arg(long)]
    metrics: bool,
    /// Header read / idle timeout in seconds (-to).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Thread polling level 0..=100 while waiting for work (llama-server's --poll).
    /// The server keeps one persistent CPU thread pool either way; measured on 2
    /// cores, 50 decodes ~10% faster when idle and 0 is no faster when another
    /// process keeps a core busy (scripts/bench-serve --busy-core).
    #[arg(long, default_value_t = 50)]
    poll: u32,
    /// Largest request body in KiB (a larger Content-Length is refused before the body is read).
    #[arg(long, default_value_t = 8192)]
    max_body_kb: usize,
    /// Seconds a request body may take to arrive in full (fractions allowed; more
    /// than 0, at most 3600): a slower one gets 408 and the connection is closed.
    #[arg(long, default_value_t = latent_tap::settings::DEFAULT_BODY_TIMEOUT.as_secs_f64(), allow_hyphen_values = true)]
    body_timeout: f64,
    /// Requests that may wait for a slot before new ones get 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Ring capacity in MiB between the inference thread and the router.
    #[arg(long, default_value_t = 256)]
    ring_mb: usize,
    /// How tensors leave the graph: auto, callback or deferred.
    #[arg(long, default_value = "auto")]
    capture_mode: String,
    /// Frame bytes (MiB) a subscriber may have queued before its frames are dropped.
    #[arg(long, default_value_t = 64)]
    subscriber_queue_mb: usize,
    /// Chat template for /v1/chat/completions, by name: one of llama.cpp's built-in
    /// templates (chatml, gemma, llama3, mistral-v7, phi4, …; an unknown name lists
    /// them). Default: the model's own, else chatml (warned at start-up). Models
    /// without a template (e.g. the Gemma 3 GGUFs) need it to stop at the end of
    /// their turn: --chat-template gemma.
    #[arg(long, value_name = "NAME")]
    chat_template: Option<String>,
    /// Chat template from a file. latent-tap serve cannot run Jinja: the file must
    /// be a template llama.cpp's built-in engine recognises by its content (e.g. a
    /// known model family's Jinja template, such as Gemma's or Llama 3's); others
    /// are refused at start-up.
    #[arg(long, value_name = "FILE")]
    chat_template_file: Option<PathBuf>,
    /// Seconds in-flight requests may run after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
    /// Latents one request may hold in MiB (rows × widths × dtype size): a JSON
    /// answer's whole selection, an SSE chunk's step, a slow reader's backlog. A
    /// request that would need more is refused with 400 before it runs, or
    /// stopped when it gets there (1..=65536).
    #[arg(long, default_value_t = latent_tap::settings::DEFAULT_LATENTS_BUDGET_MB)]
    max_latents_mb: usize,
    /// Directory of control-vector GGUFs a request may name in
    /// `"steer": [{"file": "NAME.gguf", …}]` (plain names inside it only).
    #[arg(long, value_name = "DIR")]
    steer_dir: Option<PathBuf>,
    /// llama.cpp control-vector GGUF added (scale 1) to every request's
    /// residual stream, as llama-server's flag: repeatable, or a comma list.
    /// Several vectors are summed.
    #[arg(long, value_name = "FILE")]
    control_vector: Vec<String>,
    /// A control vector with its scale, FILE:SCALE (repeatable, or a comma list).
    #[arg(long, value_name = "FILE:SCALE")]
    control_vector_scaled: Vec<String>,
    /// Layers the control vectors are applied to, START and END inclusive (≤ 0:
    /// the first and last layer).
    #[arg(long, num_args = 2, value_names = ["START", "END"], allow_negative_numbers = true)]
    control_vector_layer_range: Option<Vec<i32>>,
}

/// `--control-vector` and `--control-vector-scaled` as (file, scale), in order.
fn control_vectors(plain: &[String], scaled: &[String]) -> Result<Vec<(PathBuf, f32)>> {
    let mut out = Vec::new();
    for item in plain.iter().flat_map(|v| v.split(',')) {
        out.push((PathBuf::from(item), 1.0));
    }
    for item in scaled.iter().flat_map(|v| v.split(',')) {
        // The CLI's one FILE:SCALE reader (`capture --steer`), the scale required.
        let flag = "--control-vector-scaled";
        match super::steer_flags::file_and_scale(flag, item)? {
            (file, Some(s)) => out.push((file, s)),
            (_, None) => return Err(Error::invalid(format!("{flag} {item}: use FILE:SCALE"))),
        }
    }
    Ok(out)
}

/// Check the flags, then run the HTTP server until SIGINT/SIGTERM.
pub fn serve(a: ServeArgs) -> Result<()> {
    use latent_tap::sched::SchedulerOptions;
    let n_parallel = a.parallel.unwrap_or(4);
    if n_parallel == 0 {
        return Err(Error::invalid("--parallel must be at least 1"));
    }
    latent_tap::settings::check_poll(a.poll)?;
    if a.max_body_kb == 0 || a.ring_mb == 0 || a.subscriber_queue_mb == 0 || a.timeout == 0 {
        return Err(Error::invalid(
            "--max-body-kb, --ring-mb, --subscriber-queue-mb and --timeout must be positive",
        ));
    }
    let cfg = latent_tap::server::ServeConfig {
        model: a.model,
        host: a.host,
        port: a.port,
        engine: SchedulerOptions {
            ctx: ContextOptions {
                n_ctx: a.ctx_size,
                n_batch: a.batch_size,
                n_ubatch: a.ubatch_size,
                n_threads: a.threads,
                poll: Some(a.poll),
                ..ContextOptions::default()
            },
            n_parallel: n_parallel as usize,
            queue: a.queue,
            ring_bytes: crate::args::mib("--ring-mb", a.ring_mb)?,
            slot_ctx: a.parallel.map(|n| a.ctx_size / n),
            capture_mode: capture_mode(&a.capture_mode)?,
            // Read and checked against the model when it is loaded.
            control_vector: None,
        },
        model_options: crate::args::model_options(a.n_gpu_layers, a.rpc.as_deref())?,
        n_predict: a.n_predict,
        api_key: a.api_key,
        alias: a.alias,
        metrics: a.metrics,
        timeout: std::time::Duration::from_secs(a.timeout),
        body_timeout: latent_tap::settings::body_timeout_from_secs(a.body_timeout)?,
        max_body: a
            .max_body_kb
            .checked_mul(1024)
            .ok_or_else(|| Error::invalid("--max-body-kb is too large"))?,
        shutdown_grace: std::time::Duration::from_secs(a.shutdown_grace),
        max_latents: latent_tap::settings::latents_budget_from_mb(a.max_latents_mb)
            .map_err(|e| Error::invalid(format!("--max-latents-mb: {}", e.message())))?,
        subscriber_queue: crate::args::mib("--subscriber-queue-mb", a.subscriber_queue_mb)?,
        chat_template: latent_tap::server::chat_template_option(
            a.chat_template.as_deref(),
            a.chat_template_file.as_deref(),
        )?,
        steer_dir: a.steer_dir,
        control_vectors: control_vectors(&a.control_vector, &a.control_vector_scaled)?,
        control_vector_layers: a
            .control_vector_layer_range
            .as_deref()
            .map(|r| (r[0], r[1])),
        on_listen: None,
    };
    if let Some(d) = &cfg.steer_dir {
        if !d.is_dir() {
            return Err(Error::invalid(format!(
                "--steer-dir {}: not a directory",
                d.display()
            )));
        }
    }
    if a.n_predict < -1 {
        return Err(Error::invalid(
            "--n-predict must be -1 (no limit) or a non-negative number",
        ));
    }
    latent_tap::server::check_exposure(&cfg.host, cfg.api_key.as_deref()).map_err(|e| {
        Error::invalid(format!(
            "{}: pass --api-key KEY, or bind 127.0.0.1",
            e.message()
        ))
    })?;
    latent_tap::server::run(cfg)
}
