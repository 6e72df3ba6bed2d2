//! Argument structs shared by several subcommands, and the parsers of flag
//! values whose errors name the flag.

use std::path::PathBuf;

use clap::Args;

use latent_tap::capture::{CaptureMode, Rows};
use latent_tap::engine::{Model, ModelOptions};
use latent_tap::{Error, Result};

#[derive(Args)]
pub struct ModelArgs {
    /// GGUF model file.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Compute threads, 1 to 4 × the number of cores (at most 1024); default for
    /// capture: all cores but one (at least 1), which degrades gracefully when
    /// another process holds a core; for tensors: all cores.
    #[arg(long, short = 't', allow_negative_numbers = true)]
    pub threads: Option<i32>,
    /// Layers to offload to the GPU or the RPC workers (-1: all).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub gpu_layers: i32,
    /// llama.cpp RPC workers that take offloaded layers: HOST:PORT[,HOST:PORT...]
    /// (`latent-tap rpc-server` or llama.cpp's rpc-server of the same version).
    #[arg(long, value_name = "HOST:PORT,...")]
    pub rpc: Option<String>,
}

impl ModelArgs {
    /// How to load the model: `--gpu-layers` and `--rpc`, checked.
    pub fn options(&self) -> Result<ModelOptions> {
        model_options(self.gpu_layers, self.rpc.as_deref())
    }
}

/// `ModelOptions` from `--gpu-layers`/`-ngl` and `--rpc` (capture, serve, …), checked.
pub fn model_options(gpu_layers: i32, rpc: Option<&str>) -> Result<ModelOptions> {
    let opts = ModelOptions {
        n_gpu_layers: gpu_layers,
        rpc_servers: rpc
            .map(latent_tap::rpc::parse_servers)
            .transpose()?
            .unwrap_or_default(),
    };
    opts.validate()?;
    Ok(opts)
}

#[derive(Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text; repeat for several sequences decoded in one batch.
    #[arg(long, short = 'p', conflicts_with = "prompts")]
    pub prompt: Vec<String>,
    /// Read a prompt from FILE ('-': standard input), one prompt per -f; may be
    /// repeated and mixed with -p (sequences follow the command-line order). One
    /// trailing newline is dropped.
    #[arg(long, short = 'f', value_name = "FILE", conflicts_with = "prompts")]
    pub file: Vec<PathBuf>,
    /// Dataset mode: prompts from FILE ('-': standard input), one per line, plain
    /// text or JSON Lines (see --prompt-field). Latents stream into size-capped
    /// shards latents-NNNNN.safetensors (see README, "Capture a dataset").
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// JSON Lines field holding the prompt text (--prompts).
    #[arg(long, value_name = "NAME")]
    pub prompt_field: Option<String>,
    /// Cut each prompt to at most N tokens (--prompts; recorded per prompt in the manifest).
    #[arg(long, value_name = "N")]
    pub max_prompt_tokens: Option<usize>,
    /// Sequences decoded together (--prompts; default 4): a finished one's slot takes the next prompt.
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// Largest shard in MiB (--prompts; default 64; fractions allowed).
    #[arg(long, value_name = "MB")]
    pub shard_mb: Option<f64>,
    /// Continue the stopped run in --out (--prompts): same settings, new shards appended.
    #[arg(long)]
    pub resume: bool,
    /// This machine's block of the prompt file, 0-based (--prompts, with --shard-count).
    #[arg(long, value_name = "I")]
    pub shard_index: Option<usize>,
    /// Number of contiguous blocks the prompt file is split into (--prompts).
    #[arg(long, value_name = "N")]
    pub shard_count: Option<usize>,
    /// Tokens to generate per sequence (0, with --prompts: the prompt only).
    #[arg(long, short = 'n', default_value_t = 16)]
    pub n_predict: usize,
    /// Tensor name patterns (globs, comma-separated), e.g. 'l_out-*,ffn_out-3'.
    /// Node names depend on the architecture: `latent-tap tensors -m MODEL` lists them.
    #[arg(long, default_value = "l_out-*")]
    pub tensors: String,
    /// Layer filter: 4..12 (half-open), 4..=12, 7, or a comma list.
    #[arg(long)]
    pub layers: Option<String>,
    /// Rows to keep: all, or last (each sequence's last token per batch).
    #[arg(long, default_value = "all")]
    pub rows: String,
    /// Output element type: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Alternatives reported per generated token.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Sampling temperature: 0 is greedy, otherwise at least 0.001 (finite).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temp: f32,
    /// Top-k sampling cut (0: off).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub sample_top_k: i32,
    /// Top-p sampling cut, 0 to 1 (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,
    /// Context size in tokens.
    #[arg(long, short = 'c', default_value_t = 4096)]
    pub ctx_size: u32,
    /// Logical batch size per llama_decode.
    #[arg(long, short = 'b', default_value_t = 512)]
    pub batch_size: u32,
    /// Physical batch size per graph compute (at most --batch-size) [default: 512;
    /// lowered to what a --ring-mb ring can carry when that is less].
    #[arg(long, visible_alias = "ub")]
    pub ubatch_size: Option<u32>,
    /// Ring capacity in MiB, at least 1 [default: 64; with --prompts: 8 frames of
    /// the widest selected tensor, at least 4].
    #[arg(long)]
    pub ring_mb: Option<usize>,
    /// Full-ring policy: block (lossless) or drop-newest.
    #[arg(long, default_value = "block")]
    pub policy: String,
    /// Seconds a blocked producer waits before the decode is cancelled (0 to 86400).
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    pub block_timeout: f64,
    /// How tensors leave the graph: auto, callback or deferred (see
    /// docs/capture-modes.md); auto picks deferred where this build supports it.
    #[arg(long, default_value = "auto")]
    pub capture_mode: String,
    /// Thread polling level 0..=100 of the persistent CPU thread pool while it
    /// waits for work (as serve's --poll; see README, "Threads on a busy machine").
    #[arg(long, default_value_t = DEFAULT_POLL)]
    pub poll: u32,
    /// Add the logit lens of the captured residual rows (l_out-N) to --out
    /// (lens.jsonl, lens.safetensors; see docs/lens.md); optionally the lens's
    /// layers: all, or a filter (4..12 half-open, 4..=12, 7, 0,3,5..8).
    #[arg(long, value_name = "LAYERS", num_args = 0..=1, default_missing_value = "all")]
    pub lens: Option<String>,
    /// Alternatives per lens cell, 1 to 20 (with --lens) [default: 5].
    #[arg(long, value_name = "K")]
    pub lens_top_k: Option<usize>,
    /// What each lens row is scored against (with --lens): next (the token that
    /// came next in its sequence), a token id, or text that is one token [default: next].
    #[arg(long, value_name = "TARGET")]
    pub lens_target: Option<String>,
    /// Tuned-lens translators for --lens (safetensors, as `lens --translators`).
    #[arg(long, value_name = "FILE")]
    pub translators: Option<PathBuf>,
    /// Steer the model: add a control vector (llama.cpp's GGUF format, e.g.
    /// from `steer-vector`) times SCALE (default 1) to the residual stream,
    /// direction.N to the rows of l_out-N (see docs/steer.md).
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub steer: Option<String>,
    /// Layers steered (with --steer): a filter (4..12 half-open, 4..=12, 7,
    /// 1,3,5..8) of layers the vector has [default: all of them].
    #[arg(long, value_name = "LIST")]
    pub steer_layers: Option<String>,
    /// Rows steered (with --steer): all, prompt, generated, or positions A..B
    /// (half-open) or A..=B [default: all].
    #[arg(long, value_name = "WHICH")]
    pub steer_positions: Option<String>,
    /// The node family steered (with --steer): direction.N goes to TENSOR-N,
    /// e.g. attn_out; every TENSOR-N must have one n_embd-wide row per token
    /// [default: l_out, where llama.cpp adds control vectors].
    #[arg(long, value_name = "TENSOR")]
    pub steer_tensor: Option<String>,
    /// Patch a row (activation patching; repeatable): the row of graph node
    /// TENSOR (l_out-N, attn_out-N, ...) at POS, or at every position of A..B,
    /// becomes the row of --patch-from's run at the same place, or at SRC_POS
    /// (=SRC_POS), or of another tensor (=SRC_TENSOR:SRC_POS). See docs/steer.md.
    #[arg(long, value_name = "TENSOR:POS[=[SRC_TENSOR:]SRC_POS]")]
    pub patch: Vec<String>,
    /// The run --patch takes its rows from: a `capture --out` directory or a
    /// safetensors file in its layout (rows of its first prompt, seq 0).
    #[arg(long, value_name = "RUN")]
    pub patch_from: Option<PathBuf>,
    /// Output directory.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

pub use latent_tap::settings::DEFAULT_POLL;

/// `--ubatch-size` when given, else the default lowered, when `--ring-mb` is
/// given and too small for a frame of it, to what the ring can carry (a note
/// on stderr says so). Probes the graph only in that case.
pub fn fit_ubatch(
    a: &CaptureArgs,
    model: &std::sync::Arc<Model>,
    ctx: &mut latent_tap::engine::ContextOptions,
    layers: Option<&latent_tap::select::LayerFilter>,
    dtype: latent_tap::record::Dtype,
) -> Result<()> {
    let (Some(ring_mb), None) = (a.ring_mb, a.ubatch_size) else {
        return Ok(());
    };
    if a.tensors.is_empty() {
        return Ok(());
    }
    let graph = latent_tap::session::probe_graph(model, ctx)?;
    let want = ctx.n_ubatch.min(ctx.n_batch) as usize;
    let n = latent_tap::capture::ubatch_for_ring(
        std::slice::from_ref(&a.tensors),
        layers,
        &graph,
        want,
        dtype,
        mib("--ring-mb", ring_mb)?,
    )?;
    if n < want {
        eprintln!(
            "note: --ubatch-size {n} (not {want}): one frame of {want} rows does not fit the {ring_mb} MiB ring (--ring-mb)"
        );
        ctx.n_ubatch = n as u32;
    }
    Ok(())
}

/// Load the GGUF model of `--model`, offloading `--gpu-layers` layers.
pub fn load(a: &ModelArgs) -> Result<std::sync::Arc<Model>> {
    Model::load(&a.model, &a.options()?)
}

/// `--rows`, parsed by the library's one spelling; the message names the flag.
pub fn rows_arg(s: &str) -> Result<Rows> {
    Rows::parse(s).map_err(|_| Error::invalid(format!("--rows must be all or last, not '{s}'")))
}

/// `--capture-mode`, with the flag named in the error.
pub fn capture_mode(s: &str) -> Result<CaptureMode> {
    CaptureMode::parse(s).map_err(|e| Error::invalid(format!("--capture-mode: {e}")))
}

/// Bytes of `mb` MiB given to `flag`; one error for a value that overflows.
pub fn mib(flag: &str, mb: usize) -> Result<usize> {
    mb.checked_mul(1 << 20)
        .ok_or_else(|| Error::invalid(format!("{flag} {mb} is too large")))
}
