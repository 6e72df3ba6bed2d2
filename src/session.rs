//! Drives generation on a tapped context: probe the graph, compile the
//! selection, decode the prompt (chunked by `n_batch`), sample, and emit token
//! events into the same ring as the frames, so one ordered stream results.
//!
//! Why [`Generator`] is not a one-slot use of the scheduler ([`crate::sched`]):
//! a generator runs on the caller's thread and hands the caller the ring's
//! reading end itself (the CLI's collector, the C API's pull functions
//! `lt_session_next`, plugins that read while the host decodes), with the
//! caller's ring size, full-ring policy (`block` or `drop-newest`), dtype and
//! rows, and decodes up to 256 prompts as one batch in lockstep. The
//! scheduler owns two threads, one f32 ring that only its router reads, and
//! admits jobs into slots at any step; its consumers receive frames already
//! cut per job. Routing a generator through it would add a thread hop and a
//! copy per frame and lose `drop-newest` and the caller-owned stream. What the
//! two share is the mechanism below them: tap arming (`capture::arm`),
//! the graph probe (`engine::probe_context`), token statistics
//! ([`crate::tokens`]) and the bounds ([`crate::settings`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::capture::{
    self, Arming, CaptureMode, ModeReport, Policy, Rows, Tap, TapCounters, TapSettings,
};
use crate::engine::{
    Context, ContextOptions, LabelledBatch, Model, Sampler, SamplingOptions, Token,
};
use crate::error::{Error, ErrorKind, Result};
use crate::record::{Dtype, TokenHeader, ROW_PROMPT};
use crate::select::{GraphNode, LayerFilter, SelectedTensor, SkippedTensor};
use crate::settings;
use crate::steer::Edits;
use crate::stream::Stream;
use crate::tokens::token_stats;

/// What to capture and how to transport it.
#[derive(Debug, Clone)]
pub struct CaptureSpec {
    /// Glob patterns over graph node names (comma lists allowed).
    pub patterns: Vec<String>,
    /// Optional layer filter applied after the patterns.
    pub layers: Option<LayerFilter>,
    /// All rows, or only those whose next-token distribution is computed ([`Rows::Last`]).
    pub rows: Rows,
    /// Output element type.
    pub dtype: Dtype,
    /// Ring capacity in bytes.
    pub ring_bytes: usize,
    /// Full-ring policy.
    pub policy: Policy,
    /// How tensors leave the graph.
    pub mode: CaptureMode,
}

impl Default for CaptureSpec {
    fn default() -> Self {
        Self {
            patterns: vec!["l_out-*".into()],
            layers: None,
            rows: Rows::All,
            dtype: Dtype::F32,
            ring_bytes: crate::settings::DEFAULT_RING_BYTES,
            policy: Policy::Block {
                timeout: Duration::from_secs(10),
            },
            mode: CaptureMode::Auto,
        }
    }
}

impl CaptureSpec {
    /// True when no pattern is given (none, or only exactly empty strings): a
    /// tokens-only stream, no eval callback. Blank entries such as `" "` or `","`
    /// are not "nothing" but an error ([`CaptureSpec::validate`]).
    pub fn captures_nothing(&self) -> bool {
        self.patterns.iter().all(|p| p.is_empty())
    }
}

impl CaptureSpec {
    /// Check the spec and describe the tap it asks for, for a context whose
    /// physical batch is `n_ubatch` (see [`crate::capture::arm`]). Shared by
    /// sessions and by C plugin taps.
    pub(crate) fn arming(&self, n_ubatch: usize) -> Result<Arming<'_>> {
        self.validate()?;
        Ok(Arming {
            patterns: if self.captures_nothing() {
                &[]
            } else {
                &self.patterns
            },
            layers: self.layers.as_ref(),
            ring_bytes: self.ring_bytes,
            settings: TapSettings {
                rows: self.rows,
                dtype: self.dtype,
                policy: self.policy,
                n_ubatch,
                mode: self.mode,
            },
        })
    }
}

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens to sample per sequence (at least 1).
    pub n_predict: usize,
    /// Sampler settings.
    pub sampling: SamplingOptions,
    /// Alternatives reported per generated token.
    pub n_probs: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            n_predict: 16,
            sampling: SamplingOptions::default(),
            n_probs: 10,
        }
    }
}

/// Timings and counts of one run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunStats {
    /// Prompt tokens decoded (all sequences).
    pub prompt_tokens: usize,
    /// Tokens sampled (all sequences).
    pub generated_tokens: usize,
    /// Wall time of the prompt decode, ms.
    pub prompt_ms: f64,
    /// Mean wall time per generation decode step, ms.
    pub ms_per_token: f64,
    /// Mean time of `llama_decode` alone per generation step, ms (no sampling or
    /// top-k statistics): the number to compare tap against no tap.
    pub decode_ms_per_token: f64,
    /// Tap counters at the end.
    pub counters: TapCounters,
    /// Capture mode asked for and in effect (`None`: no tensors selected).
    pub capture_mode: Option<ModeReport>,
}

/// List every node the model's graph computes (one-token probe).
pub fn probe_graph(model: &Arc<Model>, opts: &ContextOptions) -> Result<Vec<GraphNode>> {
    crate::engine::probe_context(model.clone(), opts).map(|(_, graph)| graph)
}

/// A tapped context ready to generate; frames and tokens arrive on the
/// [`Stream`] returned by [`Generator::new`].
#[derive(Debug)]
pub struct Generator {
    ctx: Context,
    selection: Vec<SelectedTensor>,
    skipped: Vec<SkippedTensor>,
    graph: Vec<GraphNode>,
    lb: LabelledBatch,
    cancel: Arc<AtomicBool>,
    // What the context was made of (a steer set later may need a probed one).
    opts: ContextOptions,
}

/// Progress of a run, reported after every sampled token.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Tokens sampled so far (all sequences).
    pub done: usize,
    /// Upper bound on tokens to sample.
    pub total: usize,
}

impl Generator {
    /// Probe the graph, compile `spec` against it and arm the tap.
    pub fn new(
        model: Arc<Model>,
        opts: &ContextOptions,
        spec: &CaptureSpec,
    ) -> Result<(Self, Stream)> {
        Self::new_edited(model, opts, spec, &Edits::default())
    }

    /// [`Generator::new`], also editing every run by `edits` (see
    /// [`crate::steer::Edits`]: vectors added to `l_out-N` rows and rows
    /// replaced while the graph runs, before they are captured). The edits are
    /// checked against the model and its graph first: nothing runs half-edited.
    pub fn new_edited(
        model: Arc<Model>,
        opts: &ContextOptions,
        spec: &CaptureSpec,
        edits: &Edits,
    ) -> Result<(Self, Stream)> {
        let (ctx, stream, graph) = if spec.captures_nothing() && edits.is_empty() {
            // Nothing to capture: no eval callback, so the graph runs untouched.
            let n_ubatch = opts.n_ubatch.min(opts.n_batch) as usize;
            let (tap, stream) = capture::arm(None, spec.arming(n_ubatch)?)?;
            (
                Context::new(model, opts, Some(Box::new(tap)))?,
                stream,
                Vec::new(),
            )
        } else {
            let (mut ctx, graph) = crate::engine::probe_context(model, opts)?;
            check_edits(edits, &ctx, &graph)?;
            let (mut tap, stream) =
                capture::arm(Some(&graph), spec.arming(ctx.n_ubatch() as usize)?)?;
            tap.set_edits(edits)?;
            ctx.replace_tap(tap)?;
            (ctx, stream, graph)
        };
        let selection = ctx
            .tap()
            .map(|t| t.selection().to_vec())
            .unwrap_or_default();
        let skipped = ctx.tap().map(|t| t.skipped().to_vec()).unwrap_or_default();
        let n_batch = ctx.n_batch() as usize;
        Ok((
            Self {
                ctx,
                selection,
                skipped,
                graph,
                lb: LabelledBatch::new(n_batch),
                cancel: Arc::new(AtomicBool::new(false)),
                opts: opts.clone(),
            },
            stream,
        ))
    }

    /// Edit the runs from now on by `edits` (empty: no more edits), checked
    /// first (on error the generator is as it was). A generator made
    /// tokens-only and unedited has a context without the eval callback: its
    /// tap (and so its stream) moves to a new, probed context, made of the
    /// same options.
    pub fn set_edits(&mut self, edits: &Edits) -> Result<()> {
        if edits.is_empty() {
            return self.tap()?.set_edits(edits);
        }
        if !self.graph.is_empty() {
            check_edits(edits, &self.ctx, &self.graph)?;
            return self.tap()?.set_edits(edits);
        }
        let (mut ctx, graph) = crate::engine::probe_context(self.ctx.model().clone(), &self.opts)?;
        check_edits(edits, &ctx, &graph)?;
        let sentinel = graph
            .first()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "the probe saw no named graph node"))?
            .ggml_name
            .clone();
        let mut tap = self.ctx.take_tap()?;
        tap.set_sentinel(&sentinel);
        tap.set_edits(edits)?;
        ctx.replace_tap(tap)?;
        self.ctx = ctx;
        self.graph = graph;
        Ok(())
    }

    /// True when runs are edited (steered or patched).
    pub fn editing(&self) -> bool {
        self.ctx.tap().is_some_and(Tap::editing)
    }

    /// The tensors being captured, in graph order.
    pub fn selection(&self) -> &[SelectedTensor] {
        &self.selection
    }

    /// Tensors the patterns matched that are not captured (no per-token row,
    /// unsupported type, or a frame too large for the ring), with the reason.
    pub fn skipped(&self) -> &[SkippedTensor] {
        &self.skipped
    }

    /// The underlying context (read back the sizes in effect: llama.cpp may round
    /// `n_ctx` up, and clamps `n_batch` to `n_ctx`).
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Every node of the graph (from the probe).
    pub fn graph(&self) -> &[GraphNode] {
        &self.graph
    }

    /// The underlying context (e.g. to read logits after a run).
    pub fn context_mut(&mut self) -> &mut Context {
        &mut self.ctx
    }

    /// A flag that, once set, stops a running [`Generator::run`] after its current
    /// step (the stream still gets its end record). Cleared when a run starts.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Tap counters so far.
    pub fn counters(&self) -> TapCounters {
        self.ctx.tap().map(Tap::counters).unwrap_or_default()
    }

    /// The capture mode asked for and in effect (`None`: no tensors selected).
    pub fn capture_mode(&self) -> Option<ModeReport> {
        self.ctx.tap().filter(|t| t.wants_eval()).map(Tap::mode)
    }

    fn tap(&mut self) -> Result<&mut Tap> {
        self.ctx
            .tap_mut()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "context has no tap"))
    }

    /// Generate from one or more tokenized prompts (one sequence each), then
    /// close the stream with an end record. Each prompt must be non-empty.
    pub fn run(
        &mut self,
        prompts: &[Vec<Token>],
        opts: &GenerateOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<RunStats> {
        let result = self.run_inner(prompts, opts, progress);
        // Always close the stream so a consumer never waits forever.
        let end = self.tap().and_then(|t| t.push_end());
        let stats = result?;
        end?;
        Ok(RunStats {
            counters: self.counters(),
            capture_mode: self.capture_mode(),
            ..stats
        })
    }

    fn run_inner(
        &mut self,
        prompts: &[Vec<Token>],
        opts: &GenerateOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<RunStats> {
        if prompts.is_empty() {
            return Err(Error::invalid("no prompt given"));
        }
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(Error::invalid(format!("prompt {i} is empty")));
        }
        opts.validate()?;
        let n_seq = prompts.len();
        let n_seq_max = self.ctx.n_seq_max() as usize;
        if n_seq > n_seq_max {
            return Err(Error::invalid(format!(
                "{n_seq} prompts but the context was made for {n_seq_max} sequences"
            )));
        }
        let n_prompt: usize = prompts.iter().map(Vec::len).sum();
        let n_ctx = self.ctx.n_ctx() as usize;
        // Checked: n_predict may be anything up to usize::MAX.
        let need = n_seq
            .checked_mul(opts.n_predict - 1)
            .and_then(|g| g.checked_add(n_prompt));
        if need.map_or(true, |need| need > n_ctx) {
            let need = need.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string());
            return Err(Error::new(
                ErrorKind::PromptTooLong,
                format!("prompt ({n_prompt} tokens) plus generation needs {need} positions but the context holds {n_ctx}: raise the context size, lower n_predict or shorten the prompt"),
            ));
        }
        self.ctx.clear();
        self.cancel.store(false, Ordering::Relaxed);
        let model = self.ctx.model().clone();
        let total = n_seq.saturating_mul(opts.n_predict);
        let mut samplers: Vec<Sampler> = (0..n_seq).map(|_| Sampler::new(&opts.sampling)).collect();
        let nan = f32::NAN;
        for (s, p) in prompts.iter().enumerate() {
            for (i, &tok) in p.iter().enumerate() {
                let h = TokenHeader::event(0, s as i32, i as i32, tok, ROW_PROMPT, nan, nan);
                let piece = model.token_bytes(tok);
                self.tap()?.push_token(h, &[], &piece)?;
            }
        }
        let mut stats = RunStats {
            prompt_tokens: n_prompt,
            ..RunStats::default()
        };
        // Prompt: all sequences, chunked by n_batch; sample each sequence right after
        // the chunk holding its last token (a later decode overwrites the logits).
        let t0 = Instant::now();
        let flat: Vec<(usize, usize, Token)> = prompts
            .iter()
            .enumerate()
            .flat_map(|(s, p)| p.iter().enumerate().map(move |(i, &t)| (s, i, t)))
            .collect();
        let mut next: Vec<Option<Token>> = vec![None; n_seq];
        let mut ubatch_base = 0;
        let mut done = 0usize;
        for chunk in flat.chunks(self.ctx.n_batch() as usize) {
            self.lb.clear();
            for &(s, i, t) in chunk {
                let last = i + 1 == prompts[s].len();
                self.lb.push(t, i as i32, s as i32, last, ROW_PROMPT);
            }
            ubatch_base += self.decode(0, ubatch_base)?;
            for (bi, &(s, i, _)) in chunk.iter().enumerate() {
                if i + 1 == prompts[s].len() {
                    next[s] = Some(self.sample(
                        &mut samplers[s],
                        bi as i32,
                        0,
                        s,
                        i as i32 + 1,
                        opts.n_probs,
                    )?);
                    done += 1;
                    progress(Progress { done, total });
                }
            }
        }
        stats.prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
        // Generation: one token per live sequence per step.
        let t1 = Instant::now();
        let mut steps = 0usize;
        let mut decode_s = 0f64;
        let mut pos: Vec<i32> = prompts.iter().map(|p| p.len() as i32).collect();
        let mut produced = vec![1usize; n_seq];
        for step in 1..opts.n_predict as u32 {
            self.lb.clear();
            let mut live = Vec::new();
            for s in 0..n_seq {
                let Some(tok) = next[s] else { continue };
                if model.is_eog(tok) || produced[s] >= opts.n_predict {
                    next[s] = None;
                    continue;
                }
                self.lb.push(tok, pos[s], s as i32, true, 0);
                live.push(s);
            }
            if live.is_empty() || self.cancel.load(Ordering::Relaxed) {
                break;
            }
            let td = Instant::now();
            self.decode(step, 0)?;
            decode_s += td.elapsed().as_secs_f64();
            steps += 1;
            for (bi, &s) in live.iter().enumerate() {
                pos[s] += 1;
                next[s] = Some(self.sample(
                    &mut samplers[s],
                    bi as i32,
                    step,
                    s,
                    pos[s],
                    opts.n_probs,
                )?);
                produced[s] += 1;
                done += 1;
                progress(Progress { done, total });
            }
        }
        stats.generated_tokens = done;
        stats.decode_ms_per_token = if steps > 0 {
            decode_s * 1e3 / steps as f64
        } else {
            0.0
        };
        stats.ms_per_token = if steps > 0 {
            t1.elapsed().as_secs_f64() * 1e3 / steps as f64
        } else {
            0.0
        };
        Ok(stats)
    }

    /// Decode the current batch; returns the number of ubatches computed.
    fn decode(&mut self, step: u32, ubatch_base: u32) -> Result<u32> {
        self.ctx.decode_labelled(&self.lb, step, ubatch_base)
    }

    /// Sample from output row `i`, emit the token event, return the token.
    fn sample(
        &mut self,
        sampler: &mut Sampler,
        i: i32,
        step: u32,
        seq: usize,
        pos: i32,
        top_k: usize,
    ) -> Result<Token> {
        let tok = self.ctx.sample(sampler, i);
        let st = token_stats(self.ctx.logits_ith(i)?, tok, top_k);
        let piece = self.ctx.model().token_bytes(tok);
        let h = TokenHeader::event(step, seq as i32, pos, tok, 0, st.logprob, st.entropy);
        self.tap()?.push_token(h, &st.top, &piece)?;
        Ok(tok)
    }
}

/// `edits` fit the context's model, its positions and the model's graph.
fn check_edits(edits: &Edits, ctx: &Context, graph: &[GraphNode]) -> Result<()> {
    let m = ctx.model();
    edits.check(m.n_layer(), m.n_embd(), ctx.n_ctx() as usize, graph)
}

impl GenerateOptions {
    /// Check the bounds: `n_predict >= 1`, `n_probs <= MAX_REPORT_TOP_K`, and the sampling.
    pub fn validate(&self) -> Result<()> {
        if self.n_predict == 0 {
            return Err(Error::invalid("n_predict must be at least 1"));
        }
        settings::check_report_top_k(self.n_probs)?;
        self.sampling.validate()
    }
}

impl CaptureSpec {
    /// Check the spec: patterns are either exactly empty (tokens only) or hold
    /// no blank entry; the ring is not empty; a blocking timeout is at most
    /// [`settings::MAX_BLOCK_TIMEOUT`]. (Whether the ring fits in memory is
    /// [`crate::ring::check_memory`], done when the ring is made.)
    pub fn validate(&self) -> Result<()> {
        settings::check_patterns(&self.patterns)?;
        settings::check_ring_bytes(self.ring_bytes)?;
        match self.policy {
            Policy::Block { timeout } => settings::check_block_timeout(timeout),
            Policy::DropNewest => Ok(()),
        }
    }
}
