//! `latent-tap`: capture per-layer latents of a GGUF model next to its tokens.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::json;

use latent_tap::capture::{CaptureMode, ModeReport, Policy, Rows, TapCounters};
use latent_tap::engine::{ContextOptions, Model, ModelOptions, SamplingOptions};
use latent_tap::output::{collect, write_safetensors, Collected};
use latent_tap::record::Dtype;
use latent_tap::select::LayerFilter;
use latent_tap::session::{probe_graph, CaptureSpec, GenerateOptions, Generator, Progress};
use latent_tap::settings;
use latent_tap::{Error, ErrorKind, Result};

#[derive(Parser)]
#[command(
    name = "latent-tap",
    version,
    about = "Tap per-layer latents of a llama.cpp model, aligned with sampled tokens"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate from a prompt and write latents, tokens and a manifest to --out.
    Capture(Box<CaptureArgs>),
    /// List every capturable graph tensor, grouped by layer.
    Tensors(ModelArgs),
    /// Serve a llama-server-compatible HTTP API that streams latents with the tokens.
    #[cfg(feature = "serve")]
    Serve(Box<ServeArgs>),
    /// Receive the latents of programs tapped with the LD_PRELOAD library
    /// (liblatent_tap_preload.so): write them to --out and/or serve them (--serve).
    Listen(Box<ListenArgs>),
    /// Write a tiny random-weight llama GGUF (for tests and benchmarks).
    SynthModel {
        /// Output path.
        out: PathBuf,
        /// Transformer layers.
        #[arg(long, default_value_t = 3)]
        layers: usize,
        /// Residual width.
        #[arg(long, default_value_t = 64)]
        embd: usize,
        /// Weight seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Args)]
struct ListenArgs {
    /// Unix socket the tapped hosts connect to (their LATENT_TAP_SINK).
    #[arg(long, default_value = "/tmp/latent-tap.sock")]
    sink: PathBuf,
    /// Write every request into this run directory (the layout of `capture --prompts`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Close a shard of --out at this many MB of latents (default 64).
    #[arg(long)]
    shard_mb: Option<f64>,
    /// Offer GET /latents/subscribe and GET /health to observers over HTTP.
    #[arg(long)]
    serve: bool,
    /// Port of --serve (0: any free port; the chosen one is printed).
    #[arg(long)]
    port: Option<u16>,
    /// Address of --serve (loopback only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// MB of records an observer may have queued before its frames are dropped.
    #[arg(long, default_value_t = 64)]
    subscriber_queue_mb: usize,
    /// Seconds between progress lines on stderr.
    #[arg(long, default_value_t = 5.0)]
    progress_secs: f64,
    /// No progress or attach lines (refusals and errors are still printed).
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Args)]
struct ModelArgs {
    /// GGUF model file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Compute threads, 1 to 4 × the number of cores (at most 1024); default: all cores.
    #[arg(long, short = 't', allow_negative_numbers = true)]
    threads: Option<i32>,
    /// Layers to offload to the GPU (-1: all).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    gpu_layers: i32,
}

#[derive(Args)]
struct CaptureArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text; repeat for several sequences decoded in one batch.
    #[arg(long, short = 'p', conflicts_with = "prompts")]
    prompt: Vec<String>,
    /// Read a prompt from FILE ('-': standard input), one prompt per -f; may be
    /// repeated and mixed with -p (sequences follow the command-line order). One
    /// trailing newline is dropped.
    #[arg(long, short = 'f', value_name = "FILE", conflicts_with = "prompts")]
    file: Vec<PathBuf>,
    /// Dataset mode: prompts from FILE ('-': standard input), one per line, plain
    /// text or JSON Lines (see --prompt-field). Latents stream into size-capped
    /// shards latents-NNNNN.safetensors (see README, "Capture a dataset").
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// JSON Lines field holding the prompt text (--prompts).
    #[arg(long, value_name = "NAME")]
    prompt_field: Option<String>,
    /// Cut each prompt to at most N tokens (--prompts; recorded per prompt in the manifest).
    #[arg(long, value_name = "N")]
    max_prompt_tokens: Option<usize>,
    /// Sequences decoded together (--prompts; default 4): a finished one's slot takes the next prompt.
    #[arg(long, value_name = "N")]
    parallel: Option<usize>,
    /// Largest shard in MiB (--prompts; default 64; fractions allowed).
    #[arg(long, value_name = "MB")]
    shard_mb: Option<f64>,
    /// Continue the stopped run in --out (--prompts): same settings, new shards appended.
    #[arg(long)]
    resume: bool,
    /// This machine's block of the prompt file, 0-based (--prompts, with --shard-count).
    #[arg(long, value_name = "I")]
    shard_index: Option<usize>,
    /// Number of contiguous blocks the prompt file is split into (--prompts).
    #[arg(long, value_name = "N")]
    shard_count: Option<usize>,
    /// Tokens to generate per sequence (0, with --prompts: the prompt only).
    #[arg(long, short = 'n', default_value_t = 16)]
    n_predict: usize,
    /// Tensor name patterns (globs, comma-separated), e.g. 'l_out-*,attn_out-3'.
    #[arg(long, default_value = "l_out-*")]
    tensors: String,
    /// Layer filter: 4..12 (half-open), 4..=12, 7, or a comma list.
    #[arg(long)]
    layers: Option<String>,
    /// Rows to keep: all, or last (each sequence's last token per batch).
    #[arg(long, default_value = "all")]
    rows: String,
    /// Output element type: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Alternatives reported per generated token.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Sampling temperature: 0 is greedy, otherwise at least 0.001 (finite).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temp: f32,
    /// Top-k sampling cut (0: off).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    sample_top_k: i32,
    /// Top-p sampling cut, 0 to 1 (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u32,
    /// Context size in tokens.
    #[arg(long, short = 'c', default_value_t = 4096)]
    ctx_size: u32,
    /// Logical batch size per llama_decode.
    #[arg(long, short = 'b', default_value_t = 512)]
    batch_size: u32,
    /// Physical batch size per graph compute (at most --batch-size).
    #[arg(long, visible_alias = "ub", default_value_t = 512)]
    ubatch_size: u32,
    /// Ring capacity in MiB [default: 64; with --prompts: 8 frames of the widest
    /// selected tensor, at least 4].
    #[arg(long)]
    ring_mb: Option<usize>,
    /// Full-ring policy: block (lossless) or drop-newest.
    #[arg(long, default_value = "block")]
    policy: String,
    /// Seconds a blocked producer waits before the decode is cancelled (0 to 86400).
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    block_timeout: f64,
    /// How tensors leave the graph: auto, callback or deferred (see the README's
    /// "Capture modes"); auto picks deferred where this build supports it.
    #[arg(long, default_value = "auto")]
    capture_mode: String,
    /// Output directory.
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// `serve` options: llama-server's spellings and meanings for this subset.
/// (Multi-letter short forms such as `-np` are rewritten to their long form
/// before parsing; see [`llama_server_args`].)
#[cfg(feature = "serve")]
#[derive(Args)]
struct ServeArgs {
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
    /// Largest request body in KiB.
    #[arg(long, default_value_t = 8192)]
    max_body_kb: usize,
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
    /// Seconds in-flight requests may run after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
}

/// llama-server flags that `serve` does not implement: named in the error.
#[cfg(feature = "serve")]
const UNSUPPORTED_LLAMA_SERVER_FLAGS: &[&str] = &[
    "--jinja",
    "--no-jinja",
    "--chat-template",
    "--chat-template-file",
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
#[cfg(feature = "serve")]
fn llama_server_args(args: Vec<String>) -> std::result::Result<Vec<String>, String> {
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // llama-server's multi-letter short flags (-np, -ub, ...) for `serve`.
    #[cfg(feature = "serve")]
    let args = match llama_server_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let parsed = Cli::command()
        .try_get_matches_from(&args)
        .and_then(|m| Cli::from_arg_matches(&m).map(|c| (m, c)));
    let (matches, cli) = match parsed {
        Ok(v) => v,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, exit status 1, like every other error.
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("error: bad arguments");
            eprintln!("{}", line.trim_end());
            return ExitCode::FAILURE;
        }
    };
    let r = match cli.cmd {
        #[cfg(feature = "serve")]
        Cmd::Serve(a) => serve(*a),
        Cmd::Capture(a) if a.prompts.is_some() => match capture_dataset(*a) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Cmd::Capture(a) => {
            let order = matches
                .subcommand_matches("capture")
                .map(prompt_order)
                .unwrap_or_default();
            capture(*a, &order)
        }
        Cmd::Tensors(a) => tensors(a),
        Cmd::Listen(a) => listen(*a),
        Cmd::SynthModel {
            out,
            layers,
            embd,
            seed,
        } => synth(&out, layers, embd, seed),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}{}", advice(&e));
            ExitCode::FAILURE
        }
    }
}

/// `--rows`, parsed by the library's one spelling; the message names the flag.
fn rows_arg(s: &str) -> Result<Rows> {
    Rows::parse(s).map_err(|_| Error::invalid(format!("--rows must be all or last, not '{s}'")))
}

/// What the command line can do about a library error (library messages name
/// settings, never flags).
fn advice(e: &Error) -> &'static str {
    match e.kind() {
        ErrorKind::NoMatch => " (`latent-tap tensors -m MODEL` lists every name)",
        ErrorKind::PromptTooLong => " (--ctx-size sets the context)",
        ErrorKind::FrameTooLarge => {
            " (--ring-mb sets the ring capacity, --ubatch-size the rows per frame)"
        }
        _ => "",
    }
}

#[cfg(feature = "serve")]
fn serve(a: ServeArgs) -> Result<()> {
    use latent_tap::sched::EngineOptions;
    let n_parallel = a.parallel.unwrap_or(4);
    if n_parallel == 0 {
        return Err(Error::invalid("--parallel must be at least 1"));
    }
    if a.poll > 100 {
        return Err(Error::invalid(format!(
            "--poll must be between 0 and 100, not {}",
            a.poll
        )));
    }
    if a.max_body_kb == 0 || a.ring_mb == 0 || a.subscriber_queue_mb == 0 || a.timeout == 0 {
        return Err(Error::invalid(
            "--max-body-kb, --ring-mb, --subscriber-queue-mb and --timeout must be positive",
        ));
    }
    let mb = |v: usize, flag: &str| {
        v.checked_mul(1 << 20)
            .ok_or_else(|| Error::invalid(format!("{flag} is too large")))
    };
    let cfg = latent_tap::server::ServeConfig {
        model: a.model,
        host: a.host,
        port: a.port,
        engine: EngineOptions {
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
            ring_bytes: mb(a.ring_mb, "--ring-mb")?,
            slot_ctx: a.parallel.map(|n| a.ctx_size / n),
            capture_mode: capture_mode(&a.capture_mode)?,
        },
        n_gpu_layers: a.n_gpu_layers,
        n_predict: a.n_predict,
        api_key: a.api_key,
        alias: a.alias,
        metrics: a.metrics,
        timeout: std::time::Duration::from_secs(a.timeout),
        max_body: a
            .max_body_kb
            .checked_mul(1024)
            .ok_or_else(|| Error::invalid("--max-body-kb is too large"))?,
        shutdown_grace: std::time::Duration::from_secs(a.shutdown_grace),
        subscriber_queue: mb(a.subscriber_queue_mb, "--subscriber-queue-mb")?,
        on_listen: None,
    };
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

/// Where each prompt came from, in command-line order.
#[derive(Debug, Clone)]
enum Source {
    /// The i-th `-p`.
    Arg(usize),
    /// The i-th `-f`.
    File(usize),
}

fn prompt_order(m: &clap::ArgMatches) -> Vec<Source> {
    let mut v: Vec<(usize, Source)> = Vec::new();
    if let Some(ix) = m.indices_of("prompt") {
        v.extend(ix.enumerate().map(|(i, at)| (at, Source::Arg(i))));
    }
    if let Some(ix) = m.indices_of("file") {
        v.extend(ix.enumerate().map(|(i, at)| (at, Source::File(i))));
    }
    v.sort_by_key(|(at, _)| *at);
    v.into_iter().map(|(_, s)| s).collect()
}

/// Largest prompt file accepted.
const MAX_PROMPT_FILE: u64 = 64 << 20;

/// Read the prompts in order; name the source of any bad one.
fn read_prompts(a: &CaptureArgs, order: &[Source]) -> Result<Vec<(String, String)>> {
    if order.is_empty() {
        return Err(Error::invalid(
            "no prompt: give one or more -p TEXT or -f FILE",
        ));
    }
    let mut stdin_used = false;
    let mut out = Vec::with_capacity(order.len());
    for (seq, src) in order.iter().enumerate() {
        let (text, label) = match *src {
            Source::Arg(i) => (a.prompt[i].clone(), format!("-p #{}", i + 1)),
            Source::File(i) => {
                let path = &a.file[i];
                let label = format!("-f {}", path.display());
                let mut bytes = Vec::new();
                let r = if path.as_os_str() == "-" {
                    if stdin_used {
                        return Err(Error::invalid("-f - (standard input) given twice"));
                    }
                    stdin_used = true;
                    std::io::stdin()
                        .lock()
                        .take(MAX_PROMPT_FILE + 1)
                        .read_to_end(&mut bytes)
                } else {
                    std::fs::File::open(path)
                        .and_then(|f| f.take(MAX_PROMPT_FILE + 1).read_to_end(&mut bytes))
                };
                let what = if path.as_os_str() == "-" {
                    "standard input".to_string()
                } else {
                    format!("prompt file '{}'", path.display())
                };
                r.map_err(|e| Error::new(ErrorKind::Io, format!("cannot read {what}: {e}")))?;
                if bytes.len() as u64 > MAX_PROMPT_FILE {
                    return Err(Error::invalid(format!(
                        "{what} is larger than {} MiB",
                        MAX_PROMPT_FILE >> 20
                    )));
                }
                let mut text = String::from_utf8(bytes).map_err(|e| {
                    Error::invalid(format!(
                        "{what} is not valid UTF-8 (at byte {})",
                        e.utf8_error().valid_up_to()
                    ))
                })?;
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                (text, label)
            }
        };
        if text.is_empty() {
            return Err(Error::invalid(format!(
                "empty prompt for sequence {seq} ({label})"
            )));
        }
        out.push((text, label));
    }
    Ok(out)
}

fn load(a: &ModelArgs) -> Result<std::sync::Arc<Model>> {
    Model::load(
        &a.model,
        &ModelOptions {
            n_gpu_layers: a.gpu_layers,
        },
    )
}

/// Run `f` on a locked stdout and flush. A closed pipe (`| head`) ends the
/// output quietly; any other failure (a full disk) is an error.
fn to_stdout(f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match f(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::new(ErrorKind::Io, format!("writing to stdout: {e}"))),
    }
}

fn tensors(a: ModelArgs) -> Result<()> {
    let opts = ContextOptions {
        n_ctx: 256,
        n_threads: a.threads,
        ..ContextOptions::default()
    };
    opts.validate()?;
    let model = load(&a)?;
    let nodes = probe_graph(&model, &opts)?;
    let shape = |ne: &[i64; 4]| {
        ne.iter()
            .take_while(|&&n| n > 0)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("x")
    };
    let mut layers: Vec<i32> = nodes.iter().filter_map(|n| n.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    to_stdout(|out| {
        writeln!(
            out,
            "# {} ({}, {} layers, n_embd {}); shapes for one token; '-' marks nodes without a per-token row (not captured)",
            model.path().display(),
            model.arch(),
            model.n_layer(),
            model.n_embd()
        )?;
        let line = |out: &mut dyn Write, n: &latent_tap::select::GraphNode| {
            let mark = if n.row_width.is_some() { "" } else { "  -" };
            writeln!(out, "  {:<28} {}{mark}", n.name, shape(&n.ne))
        };
        writeln!(out, "global:")?;
        for n in nodes.iter().filter(|n| n.layer.is_none()) {
            line(&mut *out, n)?;
        }
        for l in layers {
            writeln!(out, "layer {l}:")?;
            for n in nodes.iter().filter(|n| n.layer == Some(l)) {
                line(&mut *out, n)?;
            }
        }
        Ok(())
    })
}

fn synth(out: &Path, layers: usize, embd: usize, seed: u64) -> Result<()> {
    // Bounds live in SynthConfig::validate (one place for the library and the CLI).
    let cfg = latent_tap::synth::SynthConfig {
        n_layer: layers,
        n_embd: embd,
        n_ff: embd.saturating_mul(2),
        seed,
        ..Default::default()
    };
    cfg.validate()?;
    latent_tap::synth::SynthModel::random(cfg)
        .write_gguf(out)
        .map_err(|e| Error::new(ErrorKind::Io, format!("writing {}: {e}", out.display())))?;
    to_stdout(|w| writeln!(w, "wrote {}", out.display()))
}

/// The output files, in the order they are committed (manifest last).
const OUTPUTS: [&str; 3] = ["tokens.jsonl", "latents.safetensors", "manifest.json"];

/// The output directory of one run. Made and probed before the model loads;
/// files are written to `.NAME.tmp-PID` and renamed into place at the end, so a
/// failed run leaves earlier outputs as they were. Until [`OutDir::commit`],
/// dropping it removes our temporary files and the directories it created.
struct OutDir {
    dir: PathBuf,
    created: Vec<PathBuf>,
    temps: Vec<PathBuf>,
    committed: bool,
}

impl OutDir {
    fn prepare(dir: &Path) -> Result<Self> {
        let mut created = Vec::new();
        let mut p = Some(dir);
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            created.push(d.to_path_buf());
            p = d.parent();
        }
        created.reverse();
        let mut me = Self {
            dir: dir.to_path_buf(),
            created,
            temps: Vec::new(),
            committed: false,
        };
        make_out_dir(dir)?;
        for name in OUTPUTS {
            let p = dir.join(name);
            if p.is_dir() {
                return Err(Error::invalid(format!(
                    "'{}' is a directory; cannot write the output file there",
                    p.display()
                )));
            }
        }
        me.clean_stale();
        Ok(me)
    }

    /// Remove temporary files left by earlier runs that are no longer alive.
    fn clean_stale(&mut self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((base, pid)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-"))
            else {
                continue;
            };
            let ours = OUTPUTS.contains(&base) || base == "latent-tap-probe";
            let alive = pid.parse::<u32>().is_ok_and(|pid| {
                pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()
            });
            if ours && !alive {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// A temporary path for output `name`.
    fn temp(&mut self, name: &str) -> PathBuf {
        let p = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        self.temps.push(p.clone());
        p
    }

    /// Rename every temporary file into place, manifest last.
    fn commit(mut self) -> Result<()> {
        for name in OUTPUTS {
            let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
            let dst = self.dir.join(name);
            std::fs::rename(&tmp, &dst).map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    format!("cannot move {} into place: {e}", dst.display()),
                )
            })?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for t in &self.temps {
            let _ = std::fs::remove_file(t);
        }
        // Only directories this run made, deepest first, and only if still empty.
        for d in self.created.iter().rev() {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
        }
    }
}

fn capture(a: CaptureArgs, order: &[Source]) -> Result<()> {
    // Everything that can be checked without the model is checked first, so a
    // bad value costs no model load and leaves no trace.
    let dataset_only = [
        ("--prompt-field", a.prompt_field.is_some()),
        ("--max-prompt-tokens", a.max_prompt_tokens.is_some()),
        ("--parallel", a.parallel.is_some()),
        ("--shard-mb", a.shard_mb.is_some()),
        ("--resume", a.resume),
        ("--shard-index", a.shard_index.is_some()),
        ("--shard-count", a.shard_count.is_some()),
    ];
    if let Some((flag, _)) = dataset_only.iter().find(|(_, set)| *set) {
        return Err(Error::invalid(format!(
            "{flag} applies to dataset capture only: pass --prompts FILE"
        )));
    }
    let prompts_text = read_prompts(&a, order)?;
    if a.n_predict == 0 {
        return Err(Error::invalid(
            "--n-predict must be at least 1 (0, a prompt-only pass, needs --prompts FILE)",
        ));
    }
    ModelOptions {
        n_gpu_layers: a.model.gpu_layers,
    }
    .validate()?;
    let rows = rows_arg(&a.rows)?;
    let policy = match a.policy.as_str() {
        "block" => Policy::Block {
            timeout: settings::block_timeout_from_secs(a.block_timeout)?,
        },
        "drop-newest" => Policy::DropNewest,
        p => {
            return Err(Error::invalid(format!(
                "--policy must be block or drop-newest, not '{p}'"
            )))
        }
    };
    let ring_mb = a.ring_mb.unwrap_or(settings::DEFAULT_RING_BYTES >> 20);
    if ring_mb == 0 {
        return Err(Error::invalid("--ring-mb must be at least 1"));
    }
    let spec = CaptureSpec {
        patterns: vec![a.tensors.clone()],
        layers: a.layers.as_deref().map(LayerFilter::parse).transpose()?,
        rows,
        dtype: Dtype::parse(&a.dtype)?,
        ring_bytes: ring_mb
            .checked_mul(1 << 20)
            .ok_or_else(|| Error::invalid(format!("--ring-mb {ring_mb} is too large")))?,
        policy,
        mode: capture_mode(&a.capture_mode)?,
    };
    spec.validate()?;
    settings::check_ring_memory(spec.ring_bytes)?;
    let sampling = SamplingOptions {
        temperature: a.temp,
        top_k: a.sample_top_k,
        top_p: a.top_p,
        min_p: 0.0,
        seed: a.seed,
    };
    let gen_opts = GenerateOptions {
        n_predict: a.n_predict,
        sampling: sampling.clone(),
        top_k: a.top_k,
    };
    gen_opts.validate()?;
    let ctx_opts = ContextOptions {
        n_ctx: a.ctx_size,
        n_batch: a.batch_size,
        n_ubatch: a.ubatch_size,
        n_seq_max: u32::try_from(prompts_text.len()).unwrap_or(u32::MAX),
        n_threads: a.model.threads,
        ..ContextOptions::default()
    };
    ctx_opts.validate()?;
    let mut out_dir = OutDir::prepare(&a.out)?;

    let model = load(&a.model)?;
    let prompts = prompts_text
        .iter()
        .map(|(p, _)| model.tokenize(p, true))
        .collect::<Result<Vec<_>>>()?;
    let (mut gen, stream) = Generator::new(model.clone(), &ctx_opts, &spec)?;
    let selection = gen.selection().to_vec();
    let skipped = gen.skipped().to_vec();
    let (n_ctx, n_batch, n_ubatch) = {
        let c = gen.context();
        (c.n_ctx(), c.n_batch(), c.n_ubatch())
    };
    let dtype = spec.dtype;
    let consumer = std::thread::spawn({
        let selection = selection.clone();
        move || collect(stream, &selection, dtype)
    });
    let show = !a.quiet && std::io::stderr().is_terminal();
    let mut bar = |p: Progress| {
        if show {
            let w = (30 * p.done / p.total.max(1)).min(30);
            eprint!(
                "\r[{}{}] {}/{} tokens",
                "#".repeat(w),
                " ".repeat(30 - w),
                p.done,
                p.total
            );
        }
    };
    let run = gen.run(&prompts, &gen_opts, &mut bar);
    if show {
        eprintln!();
    }
    drop(gen);
    let collected = consumer
        .join()
        .map_err(|_| Error::new(ErrorKind::Internal, "consumer thread panicked"))??;
    let stats = run?;

    let tmp = out_dir.temp(OUTPUTS[0]);
    collected.write_tokens_jsonl(&tmp)?;
    let tmp = out_dir.temp(OUTPUTS[1]);
    write_safetensors(
        &tmp,
        &collected.tensors,
        &[("model", model.path().display().to_string())],
    )?;
    let tensors: Vec<_> = collected
        .tensors
        .iter()
        .map(|t| json!({"name": t.name, "rows": t.n_rows(), "width": t.width, "dtype": t.dtype, "frames": t.frames, "nonfinite": t.nonfinite}))
        .collect();
    let manifest = json!({
        "model": {"path": model.path(), "arch": model.arch(), "n_layer": model.n_layer(), "n_embd": model.n_embd(), "n_vocab": model.n_vocab()},
        "prompt": prompts_text.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        "prompt_source": prompts_text.iter().map(|(_, s)| s).collect::<Vec<_>>(),
        "prompt_tokens": prompts.iter().map(Vec::len).collect::<Vec<_>>(),
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p, "seed": sampling.seed, "n_predict": a.n_predict, "report_top_k": a.top_k},
        "capture": {"tensors": a.tensors, "layers": a.layers, "rows": rows, "dtype": dtype, "ring_bytes": spec.ring_bytes, "policy": a.policy,
                    "n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch, "threads": ctx_opts.threads(),
                    "mode": capture_mode_json(stats.capture_mode, &stats.counters)},
        "tensors": tensors,
        "skipped": skipped,
        "counters": {"frames": stats.counters.frames, "bytes": stats.counters.bytes, "drops": stats.counters.drops, "unaligned": stats.counters.unaligned, "deferred": stats.counters.deferred, "seq_gaps": collected.seq_gaps},
        "timings": {"prompt_ms": stats.prompt_ms, "ms_per_token": stats.ms_per_token, "decode_ms_per_token": stats.decode_ms_per_token, "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens},
    });
    let tmp = out_dir.temp(OUTPUTS[2]);
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("manifest: {e}")))?;
    std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&json)?;
            f.sync_all()
        })
        .map_err(|e| Error::new(ErrorKind::Io, format!("writing {}: {e}", tmp.display())))?;
    out_dir.commit()?;
    if n_ctx != ctx_opts.n_ctx {
        eprintln!(
            "warning: context size {} is {} in effect (llama.cpp rounds it)",
            ctx_opts.n_ctx, n_ctx
        );
    }

    to_stdout(|out| report(out, &collected, prompts.len(), &stats, &a.out))
}

fn report(
    out: &mut dyn Write,
    collected: &Collected,
    n_seq: usize,
    stats: &latent_tap::session::RunStats,
    dir: &Path,
) -> std::io::Result<()> {
    for s in 0..n_seq {
        let text: String = collected
            .tokens
            .iter()
            .filter(|t| !t.prompt && t.seq == s as i32)
            .map(|t| t.piece.as_str())
            .collect();
        if n_seq == 1 {
            writeln!(out, "generated: {text:?}")?;
        } else {
            writeln!(out, "generated[{s}]: {text:?}")?;
        }
    }
    writeln!(
        out,
        "{:<16} {:>6} {:>6} {:>12}",
        "tensor", "rows", "width", "mean L2"
    )?;
    for t in &collected.tensors {
        let n = t.n_rows();
        let mean = (0..n)
            .map(|i| t.row_f32(i).iter().map(|v| v * v).sum::<f32>().sqrt())
            .sum::<f32>()
            / n.max(1) as f32;
        writeln!(out, "{:<16} {:>6} {:>6} {:>12.3}", t.name, n, t.width, mean)?;
    }
    writeln!(
        out,
        "frames {} bytes {} drops {} | prompt {:.1} ms, {:.2} ms/token ({:.2} in llama_decode) | wrote {}",
        stats.counters.frames,
        stats.counters.bytes,
        stats.counters.drops,
        stats.prompt_ms,
        stats.ms_per_token,
        stats.decode_ms_per_token,
        dir.display()
    )
}

/// The signal that stopped a dataset capture (0: none).
static SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// Set by SIGINT / SIGTERM: the capture stops after the decode in flight.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

#[cfg(unix)]
fn on_signals() -> Result<()> {
    for sig in [SIGINT, SIGTERM] {
        // SAFETY: the action only stores into two atomics, which is
        // async-signal-safe (no allocation, no lock, no I/O).
        unsafe {
            signal_hook_registry::register(sig, move || {
                SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
                STOP.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        }
        .map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("installing a signal handler: {e}"),
            )
        })?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn on_signals() -> Result<()> {
    Ok(())
}

/// `capture --prompts`: stream a prompt file into shards. Returns the exit status
/// (0, or 128 + the signal that stopped the run).
fn capture_dataset(a: CaptureArgs) -> Result<u8> {
    use latent_tap::dataset::{self, DatasetOptions, PromptSource};
    use latent_tap::sched::{Engine, EngineOptions, LatentFilter, LatentRequest};
    if a.shard_index.is_some() && a.shard_count.is_none() {
        return Err(Error::invalid("--shard-index needs --shard-count"));
    }
    let src = match a.prompts.as_deref() {
        Some(p) if p == Path::new("-") => PromptSource::Stdin,
        Some(p) => PromptSource::File(p.to_path_buf()),
        None => return Err(Error::invalid("--prompts FILE is missing")),
    };
    ModelOptions {
        n_gpu_layers: a.model.gpu_layers,
    }
    .validate()?;
    let rows = rows_arg(&a.rows)?;
    if a.policy != "block" {
        return Err(Error::invalid(
            "--prompts captures losslessly: --policy must be block",
        ));
    }
    let dtype = Dtype::parse(&a.dtype)?;
    let layers = a.layers.as_deref().map(LayerFilter::parse).transpose()?;
    if !a.tensors.is_empty() && a.tensors.split(',').any(|q| q.trim().is_empty()) {
        return Err(Error::invalid(format!(
            "--tensors '{}' holds a blank entry (use '' to capture tokens only)",
            a.tensors
        )));
    }
    let n_parallel = a.parallel.unwrap_or(4);
    if n_parallel == 0 || n_parallel > settings::MAX_SEQ as usize {
        return Err(Error::invalid(format!(
            "--parallel must be between 1 and {}, not {n_parallel}",
            settings::MAX_SEQ
        )));
    }
    // No --ring-mb: sized from the selection once the graph is known.
    let ring_bytes = match a.ring_mb {
        Some(0) => return Err(Error::invalid("--ring-mb must be at least 1")),
        Some(mb) => {
            let b = mb
                .checked_mul(1 << 20)
                .ok_or_else(|| Error::invalid(format!("--ring-mb {mb} is too large")))?;
            settings::check_ring_memory(b)?;
            Some(b)
        }
        None => None,
    };
    let shard_bytes = match a.shard_mb {
        Some(mb) => settings::shard_bytes_from_mb(mb)
            .map_err(|e| Error::invalid(format!("--shard-mb: {}", e.message())))?,
        None => settings::DEFAULT_SHARD_BYTES,
    };
    let opts = DatasetOptions {
        dir: a.out.clone(),
        prompts: src,
        field: a.prompt_field.clone().unwrap_or_else(|| "text".into()),
        n_predict: a.n_predict,
        max_prompt_tokens: a.max_prompt_tokens,
        sampling: SamplingOptions {
            temperature: a.temp,
            top_k: a.sample_top_k,
            top_p: a.top_p,
            min_p: 0.0,
            seed: a.seed,
        },
        n_probs: a.top_k,
        shard_bytes,
        shard_index: a.shard_index.unwrap_or(0),
        shard_count: a.shard_count.unwrap_or(1),
        resume: a.resume,
        settings: json!({"tensors": a.tensors, "layers": a.layers}),
    };
    opts.validate()?;
    let ctx = ContextOptions {
        n_ctx: a.ctx_size,
        n_batch: a.batch_size,
        n_ubatch: a.ubatch_size,
        n_seq_max: n_parallel as u32,
        n_threads: a.model.threads,
        ..ContextOptions::default()
    };
    ctx.validate()?;
    // The directory: made and probed before the model loads.
    let show = a.out.display();
    make_out_dir(&a.out)?;
    if a.resume {
        dataset::read_manifest(&a.out)
            .map_err(|e| Error::invalid(format!("--resume: {}", e.message())))?;
    } else if dataset::holds_run(&a.out) {
        return Err(Error::invalid(format!(
            "'{show}' already holds a capture; continue it with --resume or use a new directory"
        )));
    }
    on_signals()?;

    let model = load(&a.model)?;
    // `--tensors ''`: tokens only, no eval callback.
    let request = (!a.tensors.is_empty()).then(|| LatentRequest {
        patterns: vec![a.tensors.clone()],
        layers,
        rows,
        dtype,
    });
    let engine = Engine::start_sized(
        model.clone(),
        &EngineOptions {
            ctx,
            n_parallel,
            queue: dataset::window(n_parallel),
            ring_bytes: ring_bytes.unwrap_or(settings::DEFAULT_RING_BYTES),
            slot_ctx: Some(a.ctx_size / n_parallel as u32),
            capture_mode: capture_mode(&a.capture_mode)?,
        },
        &|graph, n_ubatch| match ring_bytes {
            Some(b) => Ok(b),
            None => settings::dataset_ring_bytes(graph, request.as_ref(), n_ubatch),
        },
    )?;
    let filter = match &request {
        None => LatentFilter::none(rows, dtype),
        Some(r) => engine.compile(r)?,
    };
    let bar = !a.quiet && std::io::stderr().is_terminal();
    let mut progress = |p: dataset::Progress| {
        if bar {
            eprint!("\r{}/{} prompts", p.done, p.total);
        }
    };
    let out = dataset::capture(&engine, &filter, &opts, &STOP, &mut progress);
    if bar {
        eprintln!();
    }
    drop(engine);
    let out = out?;
    let secs = out.seconds.max(1e-9);
    let dir = a.out.clone();
    to_stdout(|w| {
        writeln!(
            w,
            "{} prompts, {} tokens, {} latent bytes in {:.2} s ({:.1} tokens/s, {:.1} MB/s) | {} shards | wrote {}{}",
            out.prompts,
            out.tokens,
            out.bytes,
            secs,
            out.tokens as f64 / secs,
            out.bytes as f64 / secs / 1e6,
            out.shards,
            dir.display(),
            if out.complete { "" } else { " (incomplete: continue with --resume)" }
        )
    })?;
    let sig = SIGNAL.load(std::sync::atomic::Ordering::SeqCst);
    Ok(if out.interrupted && sig > 0 {
        128 + sig as u8
    } else {
        0
    })
}

/// `listen`: receive tapped hosts until SIGINT/SIGTERM, then finish the run.
fn listen(a: ListenArgs) -> Result<()> {
    use latent_tap::attach::listen::{self, ListenOptions, ServeAt};
    if a.out.is_none() && !a.serve {
        return Err(Error::invalid(
            "listen needs somewhere to put what it receives: --out DIR and/or --serve --port P",
        ));
    }
    let serve = match (a.serve, a.port) {
        (true, Some(port)) => {
            #[cfg(feature = "serve")]
            // listen has no API key: loopback only.
            latent_tap::server::check_exposure(&a.host, None).map_err(|_| {
                Error::invalid(format!(
                    "--host: {} is not a loopback address; listen serves observers on \
                     127.0.0.1, ::1 or localhost only",
                    a.host
                ))
            })?;
            Some(ServeAt {
                host: a.host.clone(),
                port,
            })
        }
        (true, None) => return Err(Error::invalid("--serve needs --port (0: any free port)")),
        (false, Some(_)) => return Err(Error::invalid("--port needs --serve")),
        (false, None) => None,
    };
    if a.subscriber_queue_mb == 0 {
        return Err(Error::invalid("--subscriber-queue-mb must be positive"));
    }
    if !(a.progress_secs.is_finite() && a.progress_secs > 0.0 && a.progress_secs <= 86400.0) {
        return Err(Error::invalid(format!(
            "--progress-secs must be between 0 and 86400, not {}",
            a.progress_secs
        )));
    }
    let shard_bytes = match a.shard_mb {
        Some(mb) => settings::shard_bytes_from_mb(mb)
            .map_err(|e| Error::invalid(format!("--shard-mb: {}", e.message())))?,
        None => settings::DEFAULT_SHARD_BYTES,
    };
    if let Some(dir) = &a.out {
        let show = dir.display();
        make_out_dir(dir)?;
        if latent_tap::dataset::holds_run(dir) {
            return Err(Error::invalid(format!(
                "'{show}' already holds a run; use a new directory"
            )));
        }
    }
    on_signals()?;
    let opts = ListenOptions {
        sink: a.sink.clone(),
        out: a.out.clone(),
        shard_bytes,
        serve,
        subscriber_queue: a
            .subscriber_queue_mb
            .checked_mul(1 << 20)
            .ok_or_else(|| Error::invalid("--subscriber-queue-mb is too large"))?,
        progress: (!a.quiet).then(|| std::time::Duration::from_secs_f64(a.progress_secs)),
        verbose: !a.quiet,
        hello_timeout: std::time::Duration::from_secs(5),
    };
    let log: listen::Log = std::sync::Arc::new(|line: &str| eprintln!("{line}"));
    let out = listen::run(&opts, &STOP, log, &mut |addr| {
        let _ = to_stdout(|w| writeln!(w, "latent-tap listen: serving observers on http://{addr}"));
    })?;
    let st = &out.stats;
    to_stdout(|w| {
        writeln!(
            w,
            "latent-tap listen: {} host connections ({} refused), {} frames, {} rows, {} requests ({} written, {} shards), {} drops",
            st.hosts.len(),
            st.refused,
            st.frames(),
            st.rows(),
            st.requests(),
            st.committed,
            out.shards,
            st.drops()
        )
    })
}

/// `--capture-mode`, with the flag named in the error.
fn capture_mode(s: &str) -> Result<CaptureMode> {
    CaptureMode::parse(s).map_err(|e| Error::invalid(format!("--capture-mode: {e}")))
}

/// The manifest's `capture.mode`: asked for, in effect, why not deferred, and
/// how many frames each path delivered.
fn capture_mode_json(mode: Option<ModeReport>, c: &TapCounters) -> serde_json::Value {
    match mode {
        None => serde_json::Value::Null,
        Some(m) => json!({
            "requested": m.requested, "used": m.used, "note": m.note,
            "frames_deferred": c.deferred, "frames_callback": c.frames - c.deferred,
        }),
    }
}

/// Create the output directory `dir` (refusing a file of that name) and check
/// that it is writable, before any model loads (capture, dataset, listen).
fn make_out_dir(dir: &Path) -> Result<()> {
    let show = dir.display();
    if dir.exists() && !dir.is_dir() {
        return Err(Error::invalid(format!(
            "output directory '{show}' exists and is not a directory"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("cannot create output directory '{show}': {e}"),
        )
    })?;
    probe_writable(dir)
}

/// Write and remove a small file in `dir`, so an unwritable output directory is
/// found before the model loads.
fn probe_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".latent-tap-probe.tmp-{}", std::process::id()));
    std::fs::write(&probe, b"probe").map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("cannot write in output directory '{}': {e}", dir.display()),
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}
