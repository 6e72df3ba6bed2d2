//! `latent-tap`: capture per-layer latents of a GGUF model next to its tokens.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use latent_tap::capture::{Policy, Rows};
use latent_tap::engine::{default_threads, ContextOptions, Model, ModelOptions, SamplingOptions};
use latent_tap::output::{collect, write_safetensors};
use latent_tap::record::Dtype;
use latent_tap::select::LayerFilter;
use latent_tap::session::{probe_graph, CaptureSpec, GenerateOptions, Generator, Progress};
use latent_tap::{Error, Result};

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
struct ModelArgs {
    /// GGUF model file.
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Compute threads (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<i32>,
    /// Layers to offload to the GPU (-1: all).
    #[arg(long, default_value_t = -1)]
    gpu_layers: i32,
}

#[derive(Args)]
struct CaptureArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text; repeat for several sequences decoded in one batch.
    #[arg(long, short = 'p', required = true)]
    prompt: Vec<String>,
    /// Tokens to generate per sequence.
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
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temp: f32,
    /// Top-k sampling cut (0: off).
    #[arg(long, default_value_t = 0)]
    sample_top_k: i32,
    /// Top-p sampling cut (1: off).
    #[arg(long, default_value_t = 1.0)]
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
    /// Physical batch size per graph compute.
    #[arg(long, default_value_t = 512)]
    ubatch_size: u32,
    /// Ring capacity in MiB.
    #[arg(long, default_value_t = 64)]
    ring_mb: usize,
    /// Full-ring policy: block (lossless) or drop-newest.
    #[arg(long, default_value = "block")]
    policy: String,
    /// Seconds a blocked producer waits before the decode is cancelled.
    #[arg(long, default_value_t = 10.0)]
    block_timeout: f64,
    /// Output directory.
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Capture(a) => capture(*a),
        Cmd::Tensors(a) => tensors(a),
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
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(a: &ModelArgs) -> Result<std::sync::Arc<Model>> {
    Model::load(
        &a.model,
        &ModelOptions {
            n_gpu_layers: a.gpu_layers,
        },
    )
}

fn tensors(a: ModelArgs) -> Result<()> {
    let model = load(&a)?;
    let opts = ContextOptions {
        n_ctx: 256,
        n_threads: a.threads,
        ..ContextOptions::default()
    };
    let nodes = probe_graph(&model, &opts)?;
    let mut out = std::io::stdout().lock();
    let shape = |ne: &[i64; 4]| {
        ne.iter()
            .take_while(|&&n| n > 0)
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("x")
    };
    let _ = writeln!(
        out,
        "# {} ({}, {} layers, n_embd {}); shapes for one token",
        model.path().display(),
        model.arch(),
        model.n_layer(),
        model.n_embd()
    );
    let mut layers: Vec<i32> = nodes.iter().filter_map(|n| n.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    let _ = writeln!(out, "global:");
    for n in nodes.iter().filter(|n| n.layer.is_none()) {
        let _ = writeln!(out, "  {:<28} {}", n.name, shape(&n.ne));
    }
    for l in layers {
        let _ = writeln!(out, "layer {l}:");
        for n in nodes.iter().filter(|n| n.layer == Some(l)) {
            let _ = writeln!(out, "  {:<28} {}", n.name, shape(&n.ne));
        }
    }
    Ok(())
}

fn synth(out: &Path, layers: usize, embd: usize, seed: u64) -> Result<()> {
    if layers == 0 || embd == 0 || embd % 8 != 0 {
        return Err(Error::invalid(
            "--layers must be positive and --embd a positive multiple of 8",
        ));
    }
    let cfg = latent_tap::synth::SynthConfig {
        n_layer: layers,
        n_embd: embd,
        n_ff: embd.saturating_mul(2),
        seed,
        ..Default::default()
    };
    cfg.validate()?;
    latent_tap::synth::SynthModel::random(cfg).write_gguf(out)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn capture(a: CaptureArgs) -> Result<()> {
    if a.prompt.iter().any(|p| p.is_empty()) {
        return Err(Error::invalid("empty prompt"));
    }
    if a.n_predict == 0 {
        return Err(Error::invalid("--n-predict must be at least 1"));
    }
    let rows = match a.rows.as_str() {
        "all" => Rows::All,
        "last" => Rows::Last,
        r => {
            return Err(Error::invalid(format!(
                "--rows must be all or last, not '{r}'"
            )))
        }
    };
    let policy = match a.policy.as_str() {
        "block" => Policy::Block {
            timeout: Duration::from_secs_f64(a.block_timeout.max(0.0)),
        },
        "drop-newest" => Policy::DropNewest,
        p => {
            return Err(Error::invalid(format!(
                "--policy must be block or drop-newest, not '{p}'"
            )))
        }
    };
    let spec = CaptureSpec {
        patterns: vec![a.tensors.clone()],
        layers: a.layers.as_deref().map(LayerFilter::parse).transpose()?,
        rows,
        dtype: Dtype::parse(&a.dtype)?,
        ring_bytes: a
            .ring_mb
            .checked_mul(1 << 20)
            .ok_or_else(|| Error::invalid("--ring-mb is too large"))?,
        policy,
    };
    let sampling = SamplingOptions {
        temperature: a.temp,
        top_k: a.sample_top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let gen_opts = GenerateOptions {
        n_predict: a.n_predict,
        sampling: sampling.clone(),
        top_k: a.top_k,
    };
    let ctx_opts = ContextOptions {
        n_ctx: a.ctx_size,
        n_batch: a.batch_size,
        n_ubatch: a.ubatch_size,
        n_seq_max: a.prompt.len() as u32,
        n_threads: a.model.threads,
        ..ContextOptions::default()
    };
    let model = load(&a.model)?;
    let prompts = a
        .prompt
        .iter()
        .map(|p| model.tokenize(p, true))
        .collect::<Result<Vec<_>>>()?;
    let (mut gen, stream) = Generator::new(model.clone(), &ctx_opts, &spec)?;
    let selection = gen.selection().to_vec();
    let dtype = spec.dtype;
    let consumer = std::thread::spawn({
        let selection = selection.clone();
        move || collect(stream, &selection, dtype)
    });
    let show = !a.quiet && std::io::stderr().is_terminal();
    let mut bar = |p: Progress| {
        if show {
            let w = 30 * p.done / p.total.max(1);
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
        .map_err(|_| Error::new(latent_tap::ErrorKind::Internal, "consumer thread panicked"))??;
    let stats = run?;

    std::fs::create_dir_all(&a.out)?;
    collected.write_tokens_jsonl(&a.out.join("tokens.jsonl"))?;
    write_safetensors(
        &a.out.join("latents.safetensors"),
        &collected.tensors,
        &[("model", model.path().display().to_string())],
    )?;
    let tensors: Vec<_> = collected
        .tensors
        .iter()
        .map(|t| json!({"name": t.name, "rows": t.n_rows(), "width": t.width, "dtype": t.dtype, "frames": t.frames}))
        .collect();
    let manifest = json!({
        "model": {"path": model.path(), "arch": model.arch(), "n_layer": model.n_layer(), "n_embd": model.n_embd(), "n_vocab": model.n_vocab()},
        "prompt": a.prompt,
        "prompt_tokens": prompts.iter().map(Vec::len).collect::<Vec<_>>(),
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p, "seed": sampling.seed, "n_predict": a.n_predict, "report_top_k": a.top_k},
        "capture": {"tensors": a.tensors, "layers": a.layers, "rows": rows, "dtype": dtype, "ring_bytes": spec.ring_bytes, "policy": a.policy,
                    "n_ctx": ctx_opts.n_ctx, "n_batch": ctx_opts.n_batch, "n_ubatch": ctx_opts.n_ubatch, "threads": ctx_opts.n_threads.unwrap_or_else(default_threads)},
        "tensors": tensors,
        "counters": {"frames": stats.counters.frames, "bytes": stats.counters.bytes, "drops": stats.counters.drops, "unaligned": stats.counters.unaligned, "seq_gaps": collected.seq_gaps},
        "timings": {"prompt_ms": stats.prompt_ms, "ms_per_token": stats.ms_per_token, "decode_ms_per_token": stats.decode_ms_per_token, "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens},
    });
    std::fs::write(
        a.out.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).expect("json"),
    )?;

    let text: String = collected
        .tokens
        .iter()
        .filter(|t| !t.prompt)
        .map(|t| t.piece.as_str())
        .collect();
    println!("generated: {text:?}");
    println!(
        "{:<16} {:>6} {:>6} {:>12}",
        "tensor", "rows", "width", "mean L2"
    );
    for t in &collected.tensors {
        let n = t.n_rows();
        let mean = (0..n)
            .map(|i| t.row_f32(i).iter().map(|v| v * v).sum::<f32>().sqrt())
            .sum::<f32>()
            / n.max(1) as f32;
        println!("{:<16} {:>6} {:>6} {:>12.3}", t.name, n, t.width, mean);
    }
    println!(
        "frames {} bytes {} drops {} | prompt {:.1} ms, {:.2} ms/token ({:.2} in llama_decode) | wrote {}",
        stats.counters.frames,
        stats.counters.bytes,
        stats.counters.drops,
        stats.prompt_ms,
        stats.ms_per_token,
        stats.decode_ms_per_token,
        a.out.display()
    );
    Ok(())
}
