//! Dataset capture: run a file of prompts through a [`crate::sched::Scheduler`]
//! (continuous batching over its slots) and stream the latents into a run
//! directory of size-capped safetensors shards.
//!
//! Layout of a run directory:
//! - `latents-00000.safetensors`, ...: complete safetensors files, each holding
//!   for every selected tensor `NAME` (`[rows, width]`), `NAME.pos` (I32),
//!   `NAME.seq` (I32, the slot that decoded the row) and `NAME.prompt` (I64, the
//!   prompt's index in the prompt file). Rows are ordered by prompt index, then
//!   by position.
//! - `tokens.jsonl`: one line per token with its `prompt_index`.
//! - `manifest.json`: settings, the shards with their row and prompt ranges, and
//!   how far the run got (`next_prompt`, `complete`, `stopped`). Rewritten
//!   atomically each time a shard closes.
//!
//! A prompt's rows are buffered until the prompt is complete and are written in
//! prompt order, so a shard never holds part of a prompt. A run that stops
//! (signal, write error) with a shard open still writes it, as a complete file
//! marked `partial` in the manifest, whose `resume_from` holds the run's counters
//! before that shard. A resumed run drops the partial shard and captures again
//! from its first prompt, so its shards close at the same rows as an
//! uninterrupted run's and its manifest ends identical to one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::engine::{SamplingOptions, Token};
use crate::error::{Error, ErrorKind, Result};
use crate::record::{frame_len, Dtype};
use crate::sched::{
    Job, JobEvent, LatentFilter, LatentRequest, Scheduler, StopReason, SubmitError, TokenOut,
};
use crate::select::{GraphNode, Selection};
use crate::settings;
use crate::steer::Edits;

mod prompts;
use prompts::PromptReader;
pub use prompts::{count_lines, share, PromptSource};
// The run-directory format is the core crate's (`latent-tap listen` writes it too);
// its items keep their paths here.
pub use crate::run::{
    holds_run, read_manifest, shard_name, write_atomic, Checkpoint, Manifest, ShardInfo,
    TensorInfo, FORMAT,
};
use crate::run::{PromptRows, Writer};

/// Settings of a dataset capture (bounds: [`DatasetOptions::validate`] in `settings`).
#[derive(Debug, Clone)]
pub struct DatasetOptions {
    /// Run directory.
    pub dir: PathBuf,
    /// Prompt file: plain text (one prompt per line) or JSON Lines (detected
    /// from the first non-blank line being a JSON object).
    pub prompts: PromptSource,
    /// Field holding the text in JSON Lines.
    pub field: String,
    /// Tokens to generate per prompt (0: prompt only).
    pub n_predict: usize,
    /// Keep at most this many prompt tokens (the rest is cut).
    pub max_prompt_tokens: Option<usize>,
    /// Sampling settings.
    pub sampling: SamplingOptions,
    /// Alternatives reported per generated token.
    pub n_probs: usize,
    /// Close a shard before it would exceed this many bytes of latents.
    pub shard_bytes: usize,
    /// This process's share of the prompt file: block `index` of `count`.
    pub shard_index: usize,
    /// Number of blocks the prompt file is split into.
    pub shard_count: usize,
    /// Continue the run already in `dir`.
    pub resume: bool,
    /// Extra settings recorded in the manifest and checked on resume (a run
    /// with edits should record them here, so a resume cannot change them).
    pub settings: Value,
    /// Steering and patching of every prompt (`None`: none), checked against
    /// the engine's model, graph and slot context before the first prompt.
    pub edits: Option<Arc<Edits>>,
}

/// How a capture ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Every prompt of the share is captured.
    pub complete: bool,
    /// Stopped early because the stop flag was set.
    pub interrupted: bool,
    /// Prompts captured by this process (not counting earlier runs).
    pub prompts: u64,
    /// Tokens captured by this process.
    pub tokens: u64,
    /// Latent bytes written by this process.
    pub bytes: u64,
    /// Shards in the run directory.
    pub shards: usize,
    /// Wall time of the capture, seconds.
    pub seconds: f64,
}

/// PromptProgress callback argument.
#[derive(Debug, Clone, Copy)]
pub struct PromptProgress {
    /// Prompts captured (this share, earlier runs included).
    pub done: u64,
    /// Prompts in this share.
    pub total: u64,
}

/// A prompt in flight.
struct Pending {
    blank: bool,
    tensors: Vec<PromptRows>,
    tokens: Vec<TokenOut>,
    truncated: Option<usize>,
    done: Option<StopReason>,
    error: Option<Error>,
}

#[derive(Serialize)]
struct TokenLine<'a> {
    /// The line's number in `tokens.jsonl` (from 0), as `index` in `capture -p`.
    index: u64,
    prompt_index: u64,
    seq: i32,
    pos: i32,
    token: Token,
    piece: String,
    prompt: bool,
    step: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprob: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entropy: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top: Option<Vec<(i32, f32)>>,
    #[serde(skip)]
    _p: std::marker::PhantomData<&'a ()>,
}

/// Append a finished prompt; close the open shard first if it would overflow.
fn commit(w: &mut Writer, index: u64, p: Pending) -> Result<()> {
    let mut lines = Vec::new();
    let first = w.token_lines();
    for (i, t) in p.tokens.iter().enumerate() {
        let top = (!t.prompt).then(|| t.top.iter().map(|e| (e.id, e.logprob)).collect());
        let line = TokenLine {
            index: first + i as u64,
            prompt_index: index,
            seq: t.slot,
            pos: t.pos,
            token: t.token,
            piece: String::from_utf8_lossy(&t.piece).into_owned(),
            prompt: t.prompt,
            step: t.step,
            logprob: (!t.prompt).then_some(t.logprob),
            entropy: (!t.prompt).then_some(t.entropy),
            top,
            _p: std::marker::PhantomData,
        };
        serde_json::to_writer(&mut lines, &line)
            .map_err(|e| Error::new(ErrorKind::Internal, format!("token line: {e}")))?;
        lines.push(b'\n');
    }
    let n_lines = p.tokens.len() as u64;
    w.commit_lines(index, p.tensors, &lines, n_lines, p.truncated)
}

/// Capture the share of the prompt file given by `opts` on `engine`, with
/// `filter`'s latents, into `opts.dir`. Setting `stop` ends the run after the
/// decode in flight: prompts not finished are dropped, the open shard is
/// closed and the manifest says `"complete": false`.
pub fn capture(
    engine: &Scheduler,
    filter: &LatentFilter,
    opts: &DatasetOptions,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(PromptProgress),
) -> Result<Outcome> {
    opts.validate()?;
    let t0 = Instant::now();
    let model = engine.model().clone();
    if let Some(e) = &opts.edits {
        e.check(
            model.n_layer(),
            model.n_embd(),
            engine.n_ctx_slot() as usize,
            engine.graph(),
        )?;
    }
    // A regular file is counted first; a pipe or standard input is read once,
    // and its length is known at the end.
    let lines = match &opts.prompts {
        PromptSource::File(p) if std::fs::metadata(p).is_ok_and(|m| m.is_file()) => {
            Some(count_lines(p)?)
        }
        PromptSource::File(p) if opts.shard_count > 1 => {
            return Err(Error::invalid(format!(
                "splitting the prompts into shards needs a regular file, and {} is not one",
                p.display()
            )))
        }
        _ => None,
    };
    let streamed = lines.is_none();
    let lines = lines.unwrap_or(u64::MAX);
    let range = if opts.shard_count > 1 {
        share(lines, opts.shard_index, opts.shard_count)
    } else {
        [0, lines]
    };
    let config = json!({
        "model": model.path(),
        "n_embd": model.n_embd(),
        "n_layer": model.n_layer(),
        "prompts": match &opts.prompts { PromptSource::File(p) => p.display().to_string(), PromptSource::Stdin => "-".into() },
        "prompt_field": opts.field,
        "n_predict": opts.n_predict,
        "max_prompt_tokens": opts.max_prompt_tokens,
        "sampling": {"temperature": opts.sampling.temperature, "top_k": opts.sampling.top_k, "top_p": opts.sampling.top_p, "min_p": opts.sampling.min_p, "seed": opts.sampling.seed},
        "report_top_k": opts.n_probs,
        "shard_index": opts.shard_index,
        "shard_count": opts.shard_count,
        "tensors": filter.names,
        "rows": filter.rows,
        "dtype": filter.dtype,
        "settings": opts.settings,
    });
    let tensors: Vec<TensorInfo> = filter
        .names
        .iter()
        .map(|n| TensorInfo {
            name: n.clone(),
            width: 0,
            dtype: filter.dtype.safetensors_name().to_string(),
        })
        .collect();
    let m = if opts.resume {
        crate::run::resume(&opts.dir, &config)?
    } else {
        Manifest {
            format: FORMAT.into(),
            complete: false,
            stopped: None,
            config,
            prompt_range: range,
            prompt_lines: lines,
            next_prompt: range[0],
            prompts_captured: 0,
            prompts_blank: 0,
            tokens_bytes: 0,
            tokens: 0,
            tensors,
            rows: filter.names.iter().map(|n| (n.clone(), 0)).collect(),
            shards: Vec::new(),
            resume_from: None,
            attach: None,
            build: None,
        }
    };
    let mut m = m;
    m.build = Some(crate::engine::build_info().to_json());
    let mut w = Writer::create(&opts.dir, filter.dtype, opts.shard_bytes, m)?;
    let captured_before = w.m.prompts_captured;
    let tokens_before = w.m.tokens;
    w.m.complete = false;
    w.m.stopped = Some("running".into());
    w.write_manifest()?;

    let r = run(engine, filter, opts, stop, progress, &mut w);
    let interrupted = matches!(r, Ok(None));
    let mut err = r.as_ref().err().cloned();
    let end = r.ok().flatten();
    // Whatever happened, write what is complete and say where the run stopped:
    // the open shard in full (partial when the run did not reach its end), or,
    // when that fails, nothing of it.
    if w.poisoned() {
        w.rollback();
    } else if let Err(e) = w.close_shard(end.is_none()) {
        err.get_or_insert(e);
        w.rollback();
    }
    match end {
        Some(end) if err.is_none() => {
            w.m.next_prompt = end;
            if streamed {
                w.m.prompt_range[1] = end;
                w.m.prompt_lines = end;
            }
            w.m.complete = true;
            w.m.stopped = None;
        }
        _ => {
            // Blank prompts after the last shard count too.
            w.m.next_prompt = w.committed();
            w.m.stopped = Some(match &err {
                Some(e) => format!("error: {e}"),
                None => "interrupted".into(),
            });
        }
    }
    // Lines a failed write left past the manifest's count (best effort: a
    // resumed run cuts them too).
    w.cut_tokens();
    let written = w.write_manifest();
    if let Some(e) = err {
        return Err(e);
    }
    written?;
    Ok(Outcome {
        complete: w.m.complete,
        interrupted,
        prompts: w.m.prompts_captured - captured_before,
        tokens: w.m.tokens - tokens_before,
        bytes: w.bytes,
        shards: w.m.shards.len(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

enum Ev {
    Frame(u64, crate::sched::FrameOut),
    Token(u64, TokenOut),
    Done(u64, StopReason, Option<Error>),
}

/// Prompts fed ahead of the next one to commit, for `n_parallel` slots (the
/// engine's queue must hold this many jobs).
pub fn window(n_parallel: usize) -> usize {
    (4 * n_parallel).max(4)
}

/// The feed / collect loop. `Ok(Some(end))`: every prompt before `end` is done
/// (the share's end, or the last line of standard input); `Ok(None)`: stopped.
fn run(
    engine: &Scheduler,
    filter: &LatentFilter,
    opts: &DatasetOptions,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(PromptProgress),
    w: &mut Writer,
) -> Result<Option<u64>> {
    let model = engine.model().clone();
    let range = w.m.prompt_range;
    let start = w.m.next_prompt;
    let total = range[1].saturating_sub(range[0]);
    let mut reader = PromptReader::open(&opts.prompts, &opts.field)?;
    let window = window(engine.n_parallel());
    let (tx, rx) = sync_channel::<Ev>(4096);
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut handles: Vec<(u64, crate::sched::JobHandle)> = Vec::new();
    let n_ctx_slot = engine.n_ctx_slot() as usize;
    let mut end: Option<u64> = None;
    let mut cancelled = false;
    loop {
        if !cancelled && stop.load(Ordering::Relaxed) {
            cancelled = true;
            for (_, h) in &handles {
                h.cancel();
            }
        }
        // Feed: at most `window` prompts between the next to commit and the last read.
        while end.is_none() && !cancelled && pending.len() < window {
            let Some((index, text)) = reader.next_prompt()? else {
                end = Some(reader.lines_read().min(range[1]));
                break;
            };
            if index < start {
                continue;
            }
            if index >= range[1] {
                end = Some(range[1]);
                break;
            }
            let Some(text) = text else {
                // A blank line is complete at once and holds nothing.
                pending.insert(
                    index,
                    Pending {
                        blank: true,
                        tensors: Vec::new(),
                        tokens: Vec::new(),
                        truncated: None,
                        done: Some(StopReason::Eos),
                        error: None,
                    },
                );
                continue;
            };
            let mut prompt = model.tokenize(&text, true)?;
            let mut truncated = None;
            if let Some(max) = opts.max_prompt_tokens {
                if prompt.len() > max {
                    truncated = Some(prompt.len());
                    prompt.truncate(max);
                }
            }
            if !engine.prompt_fits(prompt.len()) {
                return Err(Error::new(
                    ErrorKind::PromptTooLong,
                    format!(
                        "prompt {index} has {} tokens but a slot's context holds {n_ctx_slot}; cut prompts shorter or use a larger context",
                        prompt.len()
                    ),
                ));
            }
            pending.insert(
                index,
                Pending {
                    blank: false,
                    tensors: filter.names.iter().map(|_| PromptRows::default()).collect(),
                    tokens: Vec::new(),
                    truncated,
                    done: None,
                    error: None,
                },
            );
            let job = Job {
                prompt,
                n_predict: opts.n_predict,
                sampling: opts.sampling.clone(),
                n_probs: opts.n_probs,
                ignore_eos: false,
                latents: (!filter.names.is_empty()).then(|| filter.clone()),
                // tokens.jsonl records logprob and entropy of every generated token.
                token_stats: true,
                edits: opts.edits.clone(),
            };
            let tx = tx.clone();
            let sink = Box::new(move |ev: JobEvent| {
                let e = match ev {
                    JobEvent::Started { .. } => return true,
                    JobEvent::Frame(f) => Ev::Frame(index, f),
                    JobEvent::Token(t) => Ev::Token(index, t),
                    JobEvent::Done(d) => Ev::Done(index, d.reason, d.error),
                };
                // Blocking here is the backpressure that keeps the capture lossless.
                tx.send(e).is_ok()
            });
            match engine.submit(job, sink) {
                Ok(h) => handles.push((index, h)),
                Err(SubmitError::Invalid(e)) => {
                    return Err(Error::new(
                        e.kind(),
                        format!("prompt {index}: {}", e.message()),
                    ))
                }
                Err(SubmitError::Busy) | Err(SubmitError::Stopped) => {
                    return Err(Error::new(
                        ErrorKind::Internal,
                        format!("the engine refused prompt {index}"),
                    ))
                }
            }
        }
        // Commit finished prompts in index order.
        while let Some(e) = pending.first_entry() {
            if e.get().done.is_none() {
                break;
            }
            let (index, p) = e.remove_entry();
            match p.done {
                Some(StopReason::Eos | StopReason::Limit) => {
                    if p.blank {
                        w.skip_blank(index);
                    } else {
                        commit(w, index, p)?;
                    }
                    progress(PromptProgress {
                        done: index + 1 - range[0],
                        total,
                    });
                }
                _ if cancelled => return Ok(None),
                _ => {
                    let e = p.error.unwrap_or_else(|| {
                        Error::new(ErrorKind::Internal, "the prompt was cancelled")
                    });
                    return Err(Error::new(
                        e.kind(),
                        format!("prompt {index}: {}", e.message()),
                    ));
                }
            }
        }
        handles.retain(|(i, _)| pending.contains_key(i));
        if pending.is_empty() {
            if cancelled {
                return Ok(None);
            }
            if let Some(end) = end {
                return Ok(Some(end));
            }
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(ev) => on_event(&mut pending, ev, w)?,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::new(ErrorKind::Internal, "the engine stopped"))
            }
        }
        while let Ok(ev) = rx.try_recv() {
            on_event(&mut pending, ev, w)?;
        }
    }
}

fn on_event(pending: &mut BTreeMap<u64, Pending>, ev: Ev, w: &mut Writer) -> Result<()> {
    match ev {
        Ev::Frame(i, f) => {
            let Some(p) = pending.get_mut(&i) else {
                return Ok(());
            };
            let t = f.header.tensor_index as usize;
            let width = f.header.width as usize;
            if let Some(info) = w.m.tensors.get_mut(t) {
                if info.width == 0 {
                    info.width = width;
                } else if info.width != width {
                    return Err(Error::new(
                        ErrorKind::Internal,
                        format!(
                            "tensor {} changed width {} -> {width}",
                            info.name, info.width
                        ),
                    ));
                }
            }
            if let Some(r) = p.tensors.get_mut(t) {
                r.data.extend_from_slice(&f.data);
                r.pos.extend(f.rows.iter().map(|r| r.pos));
                r.seq.extend(f.rows.iter().map(|r| r.seq_id));
            }
        }
        Ev::Token(i, t) => {
            if let Some(p) = pending.get_mut(&i) {
                p.tokens.push(t);
            }
        }
        Ev::Done(i, reason, error) => {
            if let Some(p) = pending.get_mut(&i) {
                p.done = Some(reason);
                p.error = error;
            }
        }
    }
    Ok(())
}

impl DatasetOptions {
    /// Check the bounds: shards ([`settings::check_shards`]), a positive
    /// prompt cut, a non-blank field name, the sampling and the report top-k.
    pub fn validate(&self) -> Result<()> {
        settings::check_shards(
            self.shard_bytes,
            self.shard_index,
            self.shard_count,
            self.prompts == PromptSource::Stdin,
        )?;
        if self.max_prompt_tokens == Some(0) {
            return Err(Error::invalid("the prompt token limit must be at least 1"));
        }
        if self.field.trim().is_empty() {
            return Err(Error::invalid("the prompt field name is empty"));
        }
        settings::check_report_top_k(self.n_probs)?;
        self.sampling.validate()
    }
}

/// Ring capacity of a dataset capture when none is given, for the engine's
/// `graph` and physical batch `n_ubatch`: [`settings::DATASET_RING_FRAMES`]
/// frames of the widest tensor `request` selects (the engine's ring carries
/// every row of a ubatch in f32), at least [`settings::MIN_DATASET_RING_BYTES`].
/// A ring's pages are touched as it wraps, so peak memory grows by its capacity
/// over the first wrap and then stays flat; this keeps that step small without
/// ever refusing a frame. `None`: tokens only.
pub fn ring_bytes(
    graph: &[GraphNode],
    request: Option<&LatentRequest>,
    n_ubatch: usize,
) -> Result<usize> {
    let widest = match request {
        Some(r) => Selection::compile(&r.patterns, r.layers.as_ref(), graph)?
            .tensors()
            .iter()
            .map(|t| t.row_width)
            .max()
            .unwrap_or(0),
        None => 0,
    };
    // The ring's own 8-byte record header per frame (see `ring::Producer::max_record_len`).
    let frame = frame_len(n_ubatch, widest, Dtype::F32).saturating_add(8);
    Ok(frame
        .saturating_mul(settings::DATASET_RING_FRAMES)
        .max(settings::MIN_DATASET_RING_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_ring_holds_a_few_frames_of_the_widest_selected_tensor() {
        let node = |name: &str, layer: i32, width: usize| GraphNode {
            name: name.into(),
            ggml_name: name.into(),
            occurrence: 0,
            layer: Some(layer),
            ggml_type: 0,
            ne: [width as i64, 1, 1, 1],
            row_width: Some(width),
        };
        let graph: Vec<GraphNode> = (0..4)
            .flat_map(|l| {
                [
                    node(&format!("l_out-{l}"), l, 2048),
                    node(&format!("ffn_up-{l}"), l, 8192),
                ]
            })
            .collect();
        let req = |p: &str| LatentRequest {
            patterns: vec![p.into()],
            layers: None,
            rows: crate::capture::Rows::All,
            dtype: Dtype::F16,
        };
        let frame = |w: usize| frame_len(512, w, Dtype::F32) + 8;
        // f32 frames whatever the requested dtype; the widest selected tensor counts.
        let b = ring_bytes(&graph, Some(&req("l_out-*")), 512).unwrap();
        assert_eq!(b, settings::DATASET_RING_FRAMES * frame(2048));
        let rows = 8 * 512 * (2048 * 4 + 16);
        assert!((rows..rows + 8 * 256).contains(&b), "{b}: about 33.6 MB");
        let b = ring_bytes(&graph, Some(&req("l_out-1,ffn_up-2")), 512).unwrap();
        assert_eq!(b, settings::DATASET_RING_FRAMES * frame(8192));
        // Small selections and tokens-only runs get the floor; a frame always fits twice.
        for (r, n_ubatch) in [(Some(req("l_out-0")), 32), (None, 512)] {
            let b = ring_bytes(&graph, r.as_ref(), n_ubatch).unwrap();
            assert_eq!(b, settings::MIN_DATASET_RING_BYTES);
        }
        for w in [1, 64, 256, 2048, 8192] {
            assert!(2 * frame(w) <= settings::DATASET_RING_FRAMES * frame(w));
        }
        assert!(ring_bytes(&graph, Some(&req("nope-*")), 512).is_err());
    }

    #[test]
    fn shares_are_contiguous_and_cover_the_file() {
        for total in [0u64, 1, 2, 50, 1_000_003] {
            for n in 1..=7 {
                let mut next = 0;
                for i in 0..n {
                    let [lo, hi] = share(total, i, n);
                    assert_eq!(lo, next);
                    assert!(hi - lo <= total / n as u64 + 1);
                    next = hi;
                }
                assert_eq!(next, total);
            }
        }
    }

    #[test]
    fn lines_are_counted_with_or_without_a_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.txt");
        for (text, n) in [
            ("", 0),
            ("a", 1),
            ("a\n", 1),
            ("a\n\nb", 3),
            ("a\r\nb\n", 2),
        ] {
            std::fs::write(&p, text).unwrap();
            assert_eq!(count_lines(&p).unwrap(), n, "{text:?}");
        }
    }

    #[test]
    fn prompts_keep_their_line_index() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.jsonl");
        std::fs::write(&p, "{\"t\": \"a\"}\n\n{\"t\": \" \"}\r\n{\"t\": \"b\"}").unwrap();
        let mut r = PromptReader::open(&PromptSource::File(p), "t").unwrap();
        let mut got = Vec::new();
        while let Some(x) = r.next_prompt().unwrap() {
            got.push(x);
        }
        let want = vec![
            (0, Some("a".to_string())),
            (1, None),
            (2, None),
            (3, Some("b".to_string())),
        ];
        assert_eq!(got, want);
    }
}
