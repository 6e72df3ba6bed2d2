//! `patch-sweep`: causal tracing. Run a clean and a corrupt prompt of the same
//! token count, then, one (layer, position) cell at a time, replace the corrupt
//! run's row of `TENSOR-L` at position `p` by the clean run's and read the
//! probability of a target token at the next-token distribution after the
//! prompt. One model, one [`Generator`]: the clean rows are captured once, and
//! each cell is a [`Generator::set_edits`] and a prompt-only pass. Writes
//! `sweep.json` and `sweep.png` to --out (both or neither) and prints the best
//! cell per layer.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use latent_tap::engine::{ContextOptions, Model, SamplingOptions};
use latent_tap::lens::LayerSpec;
use latent_tap::logits::top_k;
use latent_tap::output::{Collected, Collector};
use latent_tap::record::{Dtype, Record};
use latent_tap::select::SelectedTensor;
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator};
use latent_tap::steer::{check_family, check_node, Edits, Patch, Positions};
use latent_tap::stream::Stream;
use latent_tap::tokens::token_stats;
use latent_tap::{settings, Error, ErrorKind, Result};

use crate::args::{load, ModelArgs};
use crate::cmd::lens::{cell_text, target_token};
use crate::outdir::OutDir;
use crate::signals::{on_signals, SIGNAL, STOP};
use crate::stdout::to_stdout;

/// What `patch-sweep` writes, in commit order.
pub const SWEEP_OUTPUTS: [&str; 2] = ["sweep.png", "sweep.json"];

#[derive(Args)]
pub struct PatchSweepArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The clean prompt: its rows are patched in.
    #[arg(long)]
    pub clean: String,
    /// The corrupt prompt (the same number of tokens): the run patched.
    #[arg(long)]
    pub corrupt: String,
    /// The token measured: text that is one token (e.g. " Paris") or a token
    /// id; default: the clean run's greedy next token.
    #[arg(long)]
    pub target: Option<String>,
    /// The node family patched: TENSOR-L for each layer L (any node computed
    /// once with one n_embd-wide row per token, e.g. l_out, attn_out).
    #[arg(long, default_value = "l_out")]
    pub tensor: String,
    /// Layers: all (every layer whose node can be patched), or a filter
    /// (4..12 half-open, 4..=12, 7, 0,3,5..8).
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Prompt positions: all, A..B (half-open), A..=B or one position.
    #[arg(long, default_value = "all")]
    pub positions: String,
    /// No progress on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Output directory (must not hold a sweep already).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
}

/// The next-token distribution after the prompt, as the sweep records it.
#[derive(Debug, Clone, Copy)]
struct Measure {
    logprob: f32,
    argmax: i32,
}

impl Measure {
    fn of(logits: &[f32], target: i32) -> Self {
        Self {
            logprob: token_stats(logits, target, 0).logprob,
            argmax: top_k(logits, 1).first().map_or(-1, |t| t.0),
        }
    }

    fn prob(&self) -> f64 {
        f64::from(self.logprob).exp()
    }
}

/// `--positions` against a prompt of `n` tokens: the positions, increasing.
fn positions(s: &str, n: usize) -> Result<Vec<i32>> {
    let n = n as i32;
    let (start, end) = match s.trim().parse::<i32>() {
        Ok(p) => (p, p.saturating_add(1)),
        Err(_) => match Positions::parse(s) {
            Ok(Positions::All | Positions::Prompt) => (0, n),
            Ok(Positions::Range { start, end }) => (start, end),
            _ => {
                return Err(Error::invalid(format!(
                    "--positions '{s}': use all, A..B (half-open), A..=B or one position"
                )))
            }
        },
    };
    if start < 0 || end > n || start >= end {
        return Err(Error::invalid(format!(
            "--positions '{s}' is outside the prompt: its {n} tokens are positions 0..{n}"
        )));
    }
    Ok((start..end).collect())
}

/// The pieces of `tokens`, for messages.
fn piece_list(model: &Model, tokens: &[i32]) -> String {
    let p: Vec<String> = tokens
        .iter()
        .map(|&t| format!("{:?}", model.token_piece(t)))
        .collect();
    format!("[{}]", p.join(", "))
}

/// Read `stream` run by run (each run ends with an end record), sending each
/// run's rows and tokens; stop when `done` is set and nothing is left.
fn consume(
    mut stream: Stream,
    sel: &[SelectedTensor],
    tx: &mpsc::Sender<Result<Collected>>,
    done: &AtomicBool,
) {
    loop {
        let mut c = Collector::new(sel, Dtype::F32);
        let run: Result<()> = loop {
            let item = match stream.next(Duration::from_millis(20)) {
                Ok(Some(item)) => item,
                Ok(None) if done.load(Ordering::SeqCst) => return,
                Ok(None) => continue,
                Err(e) => break Err(e),
            };
            let pushed = item.record().and_then(|rec| {
                let end = matches!(rec, Record::End(_));
                c.push(&rec).map(|()| end)
            });
            match pushed {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        };
        let failed = run.is_err();
        if tx.send(run.map(|()| c.finish())).is_err() || failed {
            return;
        }
    }
}

/// Runs of the corrupt or clean prompt on one generator, each a prompt-only
/// pass measured at the last position.
struct Runner {
    gen: Generator,
    rx: mpsc::Receiver<Result<Collected>>,
    opts: GenerateOptions,
}

impl Runner {
    /// Run `prompt` with `edits`; the run's rows and tokens, and the logits after it.
    fn run(&mut self, prompt: &[i32], edits: &Edits) -> Result<(Collected, Vec<f32>)> {
        self.gen.set_edits(edits)?;
        // On an error the sweep stops (and its reader with it): no waiting for the run's rows.
        self.gen.run(&[prompt.to_vec()], &self.opts, &mut |_| {})?;
        let collected = self
            .rx
            .recv()
            .map_err(|_| Error::new(ErrorKind::Internal, "the stream reader stopped early"))??;
        let logits = self.gen.context_mut().logits_ith(-1)?.to_vec();
        Ok((collected, logits))
    }
}

pub fn patch_sweep(a: PatchSweepArgs) -> Result<u8> {
    let t_start = Instant::now();
    let layer_spec = LayerSpec::parse(&a.layers)
        .map_err(|e| Error::invalid(format!("--layers: {}", e.message())))?;
    let tensor = a.tensor.trim().to_string();
    check_family(&tensor).map_err(|e| Error::invalid(format!("--tensor: {}", e.message())))?;
    if a.clean.is_empty() || a.corrupt.is_empty() {
        return Err(Error::invalid("--clean and --corrupt must not be empty"));
    }
    a.model.options()?;
    for name in SWEEP_OUTPUTS {
        let p = a.out.join(name);
        if p.exists() {
            return Err(Error::invalid(format!(
                "'{}' already holds a sweep ({name}); use a new directory",
                a.out.display()
            )));
        }
    }
    let out_dir = OutDir::prepare(&a.out)?;
    on_signals()?;
    let model = load(&a.model)?;
    let load_ms = t_start.elapsed().as_secs_f64() * 1e3;
    let clean = model.tokenize(&a.clean, true)?;
    let corrupt = model.tokenize(&a.corrupt, true)?;
    if clean.len() != corrupt.len() {
        return Err(Error::invalid(format!(
            "--clean is {} tokens but --corrupt is {}: they must be the same length (clean: {}; corrupt: {})",
            clean.len(),
            corrupt.len(),
            piece_list(&model, &clean),
            piece_list(&model, &corrupt)
        )));
    }
    let n = clean.len();
    let positions = positions(&a.positions, n)?;
    let given_target = match a.target.as_deref() {
        None => None,
        Some(t) => target_token(&model, t, "--target")?,
    };
    let ctx_opts = ContextOptions {
        n_ctx: (n as u32 + 1).max(256),
        n_threads: Some(a.model.threads.unwrap_or_else(settings::spare_core_threads)),
        ..ContextOptions::default()
    };
    ctx_opts.validate()?;
    let layer_list = layer_spec
        .resolve(model.n_layer())
        .map_err(|e| Error::invalid(format!("--layers: {}", e.message().replace("lens ", ""))))?;
    let spec = CaptureSpec {
        patterns: vec![format!("{tensor}-*")],
        ..CaptureSpec::default()
    };
    let no_node = || {
        Error::invalid(format!(
            "--tensor {tensor}: the model's graph has no patchable {tensor}-L node (`latent-tap tensors -m MODEL` lists them)"
        ))
    };
    let (gen, stream) = match Generator::new(model.clone(), &ctx_opts, &spec) {
        Ok(g) => g,
        Err(e) if e.kind() == ErrorKind::NoMatch => return Err(no_node()),
        Err(e) => return Err(e),
    };
    let n_embd = model.n_embd();
    let layers: Vec<usize> = match layer_spec {
        LayerSpec::All => layer_list
            .into_iter()
            .filter(|l| check_node(gen.graph(), &format!("{tensor}-{l}"), n_embd).is_ok())
            .collect(),
        LayerSpec::Filter(_) => {
            for l in &layer_list {
                check_node(gen.graph(), &format!("{tensor}-{l}"), n_embd)
                    .map_err(|e| Error::invalid(format!("--layers: {}", e.message())))?;
            }
            layer_list
        }
    };
    if layers.is_empty() {
        return Err(no_node());
    }

    // The reader of the stream, run by run.
    let sel = gen.selection().to_vec();
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn({
        let done = done.clone();
        move || consume(stream, &sel, &tx, &done)
    });
    let mut runner = Runner {
        gen,
        rx,
        opts: GenerateOptions {
            n_predict: 1,
            sampling: SamplingOptions::default(),
            n_probs: 0,
        },
    };
    runner.opts.sampling.temperature = 0.0;
    let result = sweep(
        &mut runner,
        &a,
        &model,
        &clean,
        &corrupt,
        &layers,
        &positions,
        given_target,
        n,
    );
    drop(runner);
    done.store(true, Ordering::SeqCst);
    let _ = reader.join();
    let mut s = result?;
    s.timings.load_ms = load_ms;
    s.timings.total_ms = t_start.elapsed().as_secs_f64() * 1e3;

    let data = s.json(&a, &model, &tensor, &clean, &corrupt, &layers, &positions);
    let mut out_dir = out_dir;
    let tmp = out_dir.temp(SWEEP_OUTPUTS[0]);
    latent_tap::view::sweep_png(&data, &tmp)?;
    let tmp = out_dir.temp(SWEEP_OUTPUTS[1]);
    let bytes = serde_json::to_vec_pretty(&data)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("sweep.json: {e}")))?;
    std::fs::write(&tmp, bytes)
        .map_err(|e| Error::new(ErrorKind::Io, format!("writing {}: {e}", tmp.display())))?;
    out_dir.commit_names(&SWEEP_OUTPUTS)?;
    to_stdout(|w| s.table(w, &model, &corrupt, &layers, &positions, &a.out))?;
    let sig = SIGNAL.load(Ordering::SeqCst);
    Ok(if s.interrupted && sig > 0 {
        128 + sig as u8
    } else {
        0
    })
}

#[derive(Debug, Default)]
struct Timings {
    load_ms: f64,
    clean_ms: f64,
    corrupt_ms: f64,
    cells_ms: f64,
    total_ms: f64,
}

/// A sweep's results: `cells[li][pi]` (None: no clean row there, or not run).
struct Sweep {
    target: i32,
    target_given: bool,
    clean: Measure,
    corrupt: Measure,
    cells: Vec<Vec<Option<Measure>>>,
    /// Cells the clean run has no row for (the model does not compute them).
    no_row: usize,
    done: usize,
    interrupted: bool,
    timings: Timings,
}

#[allow(clippy::too_many_arguments)]
fn sweep(
    r: &mut Runner,
    a: &PatchSweepArgs,
    model: &Model,
    clean: &[i32],
    corrupt: &[i32],
    layers: &[usize],
    positions: &[i32],
    given_target: Option<i32>,
    n: usize,
) -> Result<Sweep> {
    let stopped = || STOP.load(Ordering::SeqCst);
    let none = Edits::default();
    let t = Instant::now();
    let (rows, clean_logits) = r.run(clean, &none)?;
    let clean_ms = t.elapsed().as_secs_f64() * 1e3;
    let target = match given_target {
        Some(t) => t,
        None => top_k(&clean_logits, 1)
            .first()
            .map(|t| t.0)
            .ok_or_else(|| Error::new(ErrorKind::Internal, "no logits"))?,
    };
    let t = Instant::now();
    let (_, corrupt_logits) = r.run(corrupt, &none)?;
    let corrupt_ms = t.elapsed().as_secs_f64() * 1e3;
    if stopped() {
        return Err(Error::invalid(
            "interrupted before the sweep began; nothing written",
        ));
    }
    // The clean rows: one per cell, or none where the model does not compute it
    // (e.g. the last layer keeps the last position's row only).
    let mut todo = Vec::new();
    for (li, l) in layers.iter().enumerate() {
        let name = format!("{}-{l}", a.tensor.trim());
        let t = rows.tensor(&name);
        for (pi, &p) in positions.iter().enumerate() {
            if let Some(i) = t.and_then(|t| t.find(0, p)) {
                let row = t.map(|t| t.row_f32(i)).unwrap_or_default();
                todo.push((
                    li,
                    pi,
                    Patch::new(&name, i64::from(p), row, model.n_embd(), n)?,
                ));
            }
        }
    }
    let total = layers.len() * positions.len();
    let mut s = Sweep {
        target,
        target_given: given_target.is_some(),
        clean: Measure::of(&clean_logits, target),
        corrupt: Measure::of(&corrupt_logits, target),
        cells: vec![vec![None; positions.len()]; layers.len()],
        no_row: total - todo.len(),
        done: 0,
        interrupted: false,
        timings: Timings {
            clean_ms,
            corrupt_ms,
            ..Timings::default()
        },
    };
    let show = !a.quiet && std::io::stderr().is_terminal();
    let t = Instant::now();
    let n_cells = todo.len();
    for (li, pi, patch) in todo {
        if stopped() {
            s.interrupted = true;
            break;
        }
        let edits = Edits {
            steers: Vec::new(),
            patches: vec![patch],
        };
        let (_, logits) = r.run(corrupt, &edits)?;
        s.cells[li][pi] = Some(Measure::of(&logits, target));
        s.done += 1;
        if show {
            eprint!("\r{}/{} cells", s.done, n_cells);
        }
    }
    if show {
        eprintln!();
    }
    s.timings.cells_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(s)
}

impl Sweep {
    /// The fraction of the clean run's probability restored by a cell.
    fn restored(&self, m: &Measure) -> Option<f64> {
        let (c, k) = (self.clean.prob(), self.corrupt.prob());
        ((c - k).abs() > 0.0).then(|| (m.prob() - k) / (c - k))
    }

    #[allow(clippy::too_many_arguments)]
    fn json(
        &self,
        a: &PatchSweepArgs,
        model: &Model,
        tensor: &str,
        clean: &[i32],
        corrupt: &[i32],
        layers: &[usize],
        positions: &[i32],
    ) -> Value {
        let toks = |t: &[i32]| -> Vec<Value> {
            t.iter()
                .enumerate()
                .map(|(i, &id)| json!({"pos": i, "id": id, "piece": model.token_piece(id)}))
                .collect()
        };
        let base = |m: &Measure| json!({"prob": m.prob(), "logprob": m.logprob, "argmax": m.argmax, "argmax_piece": model.token_piece(m.argmax)});
        let matrix = |f: &dyn Fn(&Measure) -> Value| -> Value {
            self.cells
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|c| c.as_ref().map_or(Value::Null, f))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
                .into()
        };
        let n_cells = self.cells.len() * positions.len();
        json!({
            "model": {"path": model.path(), "arch": model.arch(), "n_layer": model.n_layer(), "n_embd": model.n_embd(), "n_vocab": model.n_vocab()},
            "tensor": tensor,
            "clean": {"prompt": a.clean, "tokens": toks(clean)},
            "corrupt": {"prompt": a.corrupt, "tokens": toks(corrupt)},
            "target": {"id": self.target, "piece": model.token_piece(self.target),
                       "from": if self.target_given { "--target" } else { "clean greedy next token" }},
            "layers": layers,
            "positions": positions,
            "baselines": {"clean": base(&self.clean), "corrupt": base(&self.corrupt)},
            "prob": matrix(&|m| json!(m.prob())),
            "logprob": matrix(&|m| json!(m.logprob)),
            "argmax": matrix(&|m| json!(m.argmax)),
            "argmax_piece": matrix(&|m| json!(model.token_piece(m.argmax))),
            "restored": matrix(&|m| json!(self.restored(m))),
            "cells": {"total": n_cells, "run": self.done, "no_row": self.no_row},
            "complete": !self.interrupted,
            "threads": a.model.threads.unwrap_or_else(settings::spare_core_threads),
            "timings": {"load_ms": self.timings.load_ms, "clean_ms": self.timings.clean_ms,
                        "corrupt_ms": self.timings.corrupt_ms, "cells_ms": self.timings.cells_ms,
                        "ms_per_cell": self.timings.cells_ms / self.done.max(1) as f64,
                        "total_ms": self.timings.total_ms},
        })
    }

    /// The baselines, then per layer the cell with the highest P(target).
    fn table(
        &self,
        w: &mut dyn Write,
        model: &Model,
        corrupt: &[i32],
        layers: &[usize],
        positions: &[i32],
        dir: &Path,
    ) -> std::io::Result<()> {
        let piece = |id: i32| cell_text(&model.token_piece(id));
        writeln!(
            w,
            "target {:?} (id {}): clean P={:.4} argmax {:?} | corrupt P={:.4} argmax {:?}",
            model.token_piece(self.target),
            self.target,
            self.clean.prob(),
            model.token_piece(self.clean.argmax),
            self.corrupt.prob(),
            model.token_piece(self.corrupt.argmax),
        )?;
        writeln!(
            w,
            "{:<6} {:>4} {:<12} {:>9} {:>9} {:<12}",
            "layer", "pos", "token", "P(target)", "restored", "argmax"
        )?;
        for (li, l) in layers.iter().enumerate() {
            let best = self.cells[li]
                .iter()
                .enumerate()
                .filter_map(|(pi, c)| c.map(|c| (pi, c)))
                .max_by(|x, y| x.1.logprob.total_cmp(&y.1.logprob));
            match best {
                Some((pi, m)) => {
                    let p = positions[pi];
                    let restored = self
                        .restored(&m)
                        .map_or("-".to_string(), |r| format!("{r:.3}"));
                    writeln!(
                        w,
                        "{:<6} {:>4} {:<12} {:>9.4} {:>9} {:<12}",
                        format!("L{l}"),
                        p,
                        piece(corrupt[p as usize]),
                        m.prob(),
                        restored,
                        piece(m.argmax)
                    )?;
                }
                None => writeln!(w, "{:<6} {:>4}", format!("L{l}"), "-")?,
            }
        }
        let n_cells = self.cells.len() * positions.len();
        writeln!(
            w,
            "{} of {n_cells} cells ({} without a row) in {:.2} s ({:.1} ms/cell){} | wrote {} (sweep.json, sweep.png)",
            self.done,
            self.no_row,
            self.timings.cells_ms / 1e3,
            self.timings.cells_ms / self.done.max(1) as f64,
            if self.interrupted { ", interrupted" } else { "" },
            dir.display()
        )
    }
}
