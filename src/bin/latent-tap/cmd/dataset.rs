//! `capture --prompts`: a prompt file streamed into size-capped shards.

use std::io::IsTerminal;
use std::path::Path;

use serde_json::json;

use latent_tap::engine::{ContextOptions, SamplingOptions};
use latent_tap::record::Dtype;
use latent_tap::select::LayerFilter;
use latent_tap::settings;
use latent_tap::steer::Edits;
use latent_tap::{Error, Result};

use crate::args::{capture_mode, fit_ubatch, load, rows_arg, CaptureArgs};
use crate::cmd::patch_flags::PatchFlags;
use crate::cmd::steer_flags::SteerFlags;
use crate::outdir::make_out_dir;
use crate::signals::{on_signals, SIGNAL, STOP};
use crate::stdout::to_stdout;

/// `capture --prompts`: stream a prompt file into shards. Returns the exit status
/// (0, or 128 + the signal that stopped the run).
pub fn capture_dataset(a: CaptureArgs) -> Result<u8> {
    use latent_tap::dataset::{self, DatasetOptions, PromptSource};
    use latent_tap::sched::{LatentFilter, LatentRequest, Scheduler, SchedulerOptions};
    let lens_flags = [
        ("--lens", a.lens.is_some()),
        ("--lens-top-k", a.lens_top_k.is_some()),
        ("--lens-target", a.lens_target.is_some()),
        ("--translators", a.translators.is_some()),
    ];
    if let Some((flag, _)) = lens_flags.iter().find(|(_, set)| *set) {
        return Err(Error::invalid(format!(
            "{flag} applies to capture with -p/-f only, not to --prompts (dataset runs store no lens)"
        )));
    }
    let steer_flags = SteerFlags::check(&a)?;
    let patch_flags = PatchFlags::check(&a)?;
    if a.shard_index.is_some() && a.shard_count.is_none() {
        return Err(Error::invalid("--shard-index needs --shard-count"));
    }
    let src = match a.prompts.as_deref() {
        Some(p) if p == Path::new("-") => PromptSource::Stdin,
        Some(p) => PromptSource::File(p.to_path_buf()),
        None => return Err(Error::invalid("--prompts FILE is missing")),
    };
    a.model.options()?;
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
            let b = crate::args::mib("--ring-mb", mb)?;
            latent_tap::ring::check_memory(b)?;
            Some(b)
        }
        None => None,
    };
    let shard_bytes = match a.shard_mb {
        Some(mb) => settings::shard_bytes_from_mb(mb)
            .map_err(|e| Error::invalid(format!("--shard-mb: {}", e.message())))?,
        None => settings::DEFAULT_SHARD_BYTES,
    };
    let mut opts = DatasetOptions {
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
        edits: None,
    };
    opts.validate()?;
    let mut ctx = ContextOptions {
        n_ctx: a.ctx_size,
        n_batch: a.batch_size,
        n_ubatch: a.ubatch_size.unwrap_or(ContextOptions::default().n_ubatch),
        n_seq_max: n_parallel as u32,
        n_threads: Some(a.model.threads.unwrap_or_else(settings::spare_core_threads)),
        poll: Some(settings::check_poll(a.poll)?),
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
    fit_ubatch(&a, &model, &mut ctx, layers.as_ref(), dtype)?;
    // `--tensors ''`: tokens only, no eval callback.
    let request = (!a.tensors.is_empty()).then(|| LatentRequest {
        patterns: vec![a.tensors.clone()],
        layers,
        rows,
        dtype,
    });
    let engine = Scheduler::start_sized(
        model.clone(),
        &SchedulerOptions {
            ctx,
            n_parallel,
            queue: dataset::window(n_parallel),
            ring_bytes: ring_bytes.unwrap_or(settings::DEFAULT_RING_BYTES),
            slot_ctx: Some(a.ctx_size / n_parallel as u32),
            capture_mode: capture_mode(&a.capture_mode)?,
            control_vector: None,
        },
        &|graph, n_ubatch| match ring_bytes {
            Some(b) => Ok(b),
            None => latent_tap::dataset::ring_bytes(graph, request.as_ref(), n_ubatch),
        },
    )?;
    // Steering and patching: every prompt the same, recorded in the settings a
    // resume must match.
    if steer_flags.is_some() || patch_flags.is_some() {
        let n_ctx_slot = engine.n_ctx_slot() as usize;
        let steer = steer_flags
            .as_ref()
            .map(|f| f.steer(&model, n_ctx_slot))
            .transpose()?;
        let patches = patch_flags
            .as_ref()
            .map(|f| f.patches(&model, n_ctx_slot))
            .transpose()?
            .unwrap_or_default();
        opts.settings["steer"] = json!(steer_flags
            .as_ref()
            .zip(steer.as_ref())
            .map(|(f, s)| f.manifest(s)));
        opts.settings["patch"] = json!(patch_flags.as_ref().map(|f| f.manifest(&patches)));
        opts.edits = Some(std::sync::Arc::new(Edits {
            steers: steer.into_iter().collect(),
            patches,
        }));
    }
    let filter = match &request {
        None => LatentFilter::none(rows, dtype),
        Some(r) => engine.compile(r)?,
    };
    let bar = !a.quiet && std::io::stderr().is_terminal();
    let mut progress = |p: dataset::PromptProgress| {
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
            "{} prompts, {} tokens, {} latent bytes in {:.2} s ({:.1} tokens/s, {:.1} MB/s) | {} shard{} | wrote {}{}",
            out.prompts,
            out.tokens,
            out.bytes,
            secs,
            out.tokens as f64 / secs,
            out.bytes as f64 / secs / 1e6,
            out.shards,
            if out.shards == 1 { "" } else { "s" },
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
