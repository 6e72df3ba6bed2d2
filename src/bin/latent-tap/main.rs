//! `latent-tap`: capture per-layer latents of a GGUF model next to its tokens.

mod args;
mod cmd;
#[cfg(feature = "serve")]
mod compat;
mod outdir;
mod prompts;
mod signals;
mod stdout;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use latent_tap::{Error, ErrorKind};

use args::CaptureArgs;
use cmd::listen::ListenArgs;
#[cfg(feature = "serve")]
use cmd::serve::ServeArgs;

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
    /// The logit lens: generate, then read every layer through the model's own
    /// final norm and unembedding; write lens.jsonl, lens.safetensors, lens.html
    /// and lens.png to --out and print each position's top-1 per layer.
    Lens(Box<cmd::lens::LensArgs>),
    /// A control vector from positive and negative prompts (mean difference of
    /// their l_out rows, as llama.cpp's cvector-generator), in llama.cpp's GGUF format.
    SteerVector(Box<cmd::steer_vector::SteerVectorArgs>),
    /// Causal tracing: patch the clean prompt's TENSOR-L row at each position
    /// into the corrupt prompt's run, one (layer, position) at a time, and
    /// measure the target token's probability; write sweep.json and sweep.png.
    PatchSweep(Box<cmd::patch_sweep::PatchSweepArgs>),
    /// List every capturable graph tensor (or those PATTERNS match), grouped by layer.
    Tensors(cmd::tensors::TensorsArgs),
    /// Serve a llama-server-compatible HTTP API that streams latents with the tokens.
    #[cfg(feature = "serve")]
    Serve(Box<ServeArgs>),
    /// Receive the latents of programs tapped with the LD_PRELOAD library
    /// (liblatent_tap_preload.so): write them to --out and/or serve them (--serve).
    Listen(Box<ListenArgs>),
    /// Serve this machine's CPU as a llama.cpp RPC worker: other machines'
    /// `--rpc HOST:PORT` put model layers here (loopback unless --allow-remote).
    RpcServer(cmd::rpc_server::RpcServerArgs),
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // llama-server's multi-letter short flags (-np, -ub, ...) for `serve`.
    #[cfg(feature = "serve")]
    let args = match compat::llama_server_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut command = Cli::command();
    if args.iter().any(|a| a == "--version") {
        // `--version`: the version, the target CPU and the CPU features in use
        // (asked of llama.cpp, so only when wanted). Leaked once: clap keeps
        // `&'static str` versions.
        let text = format!(
            "{}\n{}",
            env!("CARGO_PKG_VERSION"),
            latent_tap::engine::build_info().line()
        );
        command = command.long_version(&*Box::leak(text.into_boxed_str()));
    }
    let parsed = command
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
        Cmd::Serve(a) => cmd::serve::serve(*a),
        Cmd::Capture(a) if a.prompts.is_some() => match cmd::dataset::capture_dataset(*a) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Cmd::Capture(a) => {
            let order = matches
                .subcommand_matches("capture")
                .map(prompts::prompt_order)
                .unwrap_or_default();
            cmd::capture::capture(*a, &order)
        }
        Cmd::Tensors(a) => cmd::tensors::tensors(a),
        Cmd::Lens(a) => cmd::lens::lens(*a),
        Cmd::PatchSweep(a) => match cmd::patch_sweep::patch_sweep(*a) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Cmd::SteerVector(a) => cmd::steer_vector::steer_vector(*a),
        Cmd::Listen(a) => cmd::listen::listen(*a),
        Cmd::RpcServer(a) => cmd::rpc_server::rpc_server(a),
        Cmd::SynthModel {
            out,
            layers,
            embd,
            seed,
        } => cmd::synth::synth(&out, layers, embd, seed),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}{}", advice(&e));
            ExitCode::FAILURE
        }
    }
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
