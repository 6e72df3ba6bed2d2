//! `capture` with `-p` / `-f`: generate and write latents, tokens and a
//! manifest to --out.

use std::io::{IsTerminal, Write};
use std::path::Path;

use serde_json::json;

use latent_tap::capture::{ModeReport, Policy, TapCounters};
use latent_tap::engine::{ContextOptions, SamplingOptions};
use latent_tap::lens::layer_of_name;
use latent_tap::output::{collect, write_safetensors, Collected};
use latent_tap::record::Dtype;
use latent_tap::select::LayerFilter;
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator, Progress};
use latent_tap::settings;
use latent_tap::steer::Edits;
use latent_tap::{Error, ErrorKind, Result};

use crate::args::{capture_mode, fit_ubatch, load, rows_arg, CaptureArgs};
use crate::cmd::lens::{write_lens_data, LensPlan, LENS_OUTPUTS};
use crate::cmd::patch_flags::PatchFlags;
use crate::cmd::steer_flags::SteerFlags;
use crate::outdir::{OutDir, OUTPUTS};
use crate::prompts::{read_prompts, Source};
use crate::stdout::to_stdout;

/// Generate from the prompts in `order`, then write tokens, latents and the
/// manifest to `--out` (all three or none) and print a summary.
pub fn capture(a: CaptureArgs, order: &[Source]) -> Result<()> {
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
    let lens_spec = match &a.lens {
        Some(layers) => Some(LensPlan::check(
            layers,
            a.lens_top_k.unwrap_or(settings::DEFAULT_LENS_TOP_K),
            ["--lens", "--lens-top-k"],
        )?),
        None => {
            let needs_lens = [
                ("--lens-top-k", a.lens_top_k.is_some()),
                ("--lens-target", a.lens_target.is_some()),
                ("--translators", a.translators.is_some()),
            ];
            if let Some((flag, _)) = needs_lens.iter().find(|(_, set)| *set) {
                return Err(Error::invalid(format!("{flag} needs --lens")));
            }
            None
        }
    };
    let steer_flags = SteerFlags::check(&a)?;
    let patch_flags = PatchFlags::check(&a)?;
    let prompts_text = read_prompts(&a, order)?;
    if a.n_predict == 0 {
        return Err(Error::invalid(
            "--n-predict must be at least 1 (0, a prompt-only pass, needs --prompts FILE)",
        ));
    }
    a.model.options()?;
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
        ring_bytes: crate::args::mib("--ring-mb", ring_mb)?,
        policy,
        mode: capture_mode(&a.capture_mode)?,
    };
    spec.validate()?;
    latent_tap::ring::check_memory(spec.ring_bytes)?;
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
        n_probs: a.top_k,
    };
    gen_opts.validate()?;
    let mut ctx_opts = ContextOptions {
        n_ctx: a.ctx_size,
        n_batch: a.batch_size,
        n_ubatch: a.ubatch_size.unwrap_or(ContextOptions::default().n_ubatch),
        n_seq_max: u32::try_from(prompts_text.len()).unwrap_or(u32::MAX),
        n_threads: Some(a.model.threads.unwrap_or_else(settings::spare_core_threads)),
        poll: Some(settings::check_poll(a.poll)?),
        ..ContextOptions::default()
    };
    ctx_opts.validate()?;
    let mut out_dir = OutDir::prepare(&a.out)?;

    let model = load(&a.model)?;
    let steer = steer_flags
        .as_ref()
        .map(|f| f.steer(&model, ctx_opts.n_ctx as usize))
        .transpose()?;
    fit_ubatch(&a, &model, &mut ctx_opts, spec.layers.as_ref(), spec.dtype)?;
    let prompts = prompts_text
        .iter()
        .map(|(p, _)| model.tokenize(p, true))
        .collect::<Result<Vec<_>>>()?;
    let edits = Edits {
        steers: steer.iter().cloned().collect(),
        patches: patch_flags
            .as_ref()
            .map(|f| f.patches(&model, ctx_opts.n_ctx as usize))
            .transpose()?
            .unwrap_or_default(),
    };
    let (mut gen, stream) = Generator::new_edited(model.clone(), &ctx_opts, &spec, &edits)?;
    let selection = gen.selection().to_vec();
    let skipped = gen.skipped().to_vec();
    let lens = match &lens_spec {
        Some(layers) => {
            if !selection.iter().any(|t| layer_of_name(&t.name).is_some()) {
                return Err(Error::invalid(format!(
                    "--lens reads the residual stream (l_out-N), but --tensors '{}' captures none of it: add l_out-*",
                    a.tensors
                )));
            }
            Some(LensPlan::new(
                &model,
                layers,
                a.lens_top_k.unwrap_or(settings::DEFAULT_LENS_TOP_K),
                (a.lens_target.as_deref().unwrap_or("next"), "--lens-target"),
                a.translators.as_deref(),
                ctx_opts.threads().max(1) as usize,
            )?)
        }
        None => None,
    };
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
    let lens_rows = lens.as_ref().map(|l| l.compute(&collected)).transpose()?;

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
        "build": latent_tap::engine::build_info().to_json(),
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
        "steer": steer_flags.as_ref().zip(steer.as_ref()).map(|(f, s)| f.manifest(s)),
        "patch": patch_flags.as_ref().map(|f| f.manifest(&edits.patches)),
        "lens": lens.as_ref().zip(lens_rows.as_ref()).map(|(l, rows)| json!({
            "layers": l.layers(), "top_k": l.top_k(), "target": a.lens_target.as_deref().unwrap_or("next"),
            "translated_layers": l.translated_layers(), "rows": rows.len(),
            "files": ["lens.jsonl", "lens.safetensors"],
        })),
        "counters": {"frames": stats.counters.frames, "bytes": stats.counters.bytes, "drops": stats.counters.drops, "unaligned": stats.counters.unaligned, "deferred": stats.counters.deferred, "seq_gaps": collected.seq_gaps},
        "timings": {"prompt_ms": stats.prompt_ms, "ms_per_token": stats.ms_per_token, "decode_ms_per_token": stats.decode_ms_per_token, "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens},
    });
    if let (Some(l), Some(rows)) = (&lens, &lens_rows) {
        let piece = |id: i32| model.token_piece(id);
        write_lens_data(&mut out_dir, l, rows, &piece, &model)?;
    }
    let tmp = out_dir.temp(OUTPUTS[2]);
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("manifest: {e}")))?;
    std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&json)?;
            f.sync_all()
        })
        .map_err(|e| Error::new(ErrorKind::Io, format!("writing {}: {e}", tmp.display())))?;
    // The lens files first, the manifest last: a manifest means a whole run.
    let names: Vec<&str> = match lens {
        Some(_) => OUTPUTS[..2]
            .iter()
            .chain(&LENS_OUTPUTS[..2])
            .chain(&OUTPUTS[2..])
            .copied()
            .collect(),
        None => OUTPUTS.to_vec(),
    };
    out_dir.commit_names(&names)?;
    if n_ctx != ctx_opts.n_ctx {
        eprintln!(
            "warning: context size {} is {} in effect (llama.cpp rounds it)",
            ctx_opts.n_ctx, n_ctx
        );
    }

    to_stdout(|out| report(out, &collected, prompts.len(), &stats, &a.out))
}

pub fn report(
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

/// The manifest's `capture.mode`: asked for, in effect, why not deferred, and
/// how many frames each path delivered.
pub fn capture_mode_json(mode: Option<ModeReport>, c: &TapCounters) -> serde_json::Value {
    match mode {
        None => serde_json::Value::Null,
        Some(m) => json!({
            "requested": m.requested, "used": m.used, "note": m.note,
            "frames_deferred": c.deferred, "frames_callback": c.frames - c.deferred,
        }),
    }
}
