//! The engine thread: admits jobs into free slots, builds one batch per step
//! from every active slot, decodes, samples, and writes token events (and the
//! in-band control markers) into the ring right after the step's frames.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    Ctrl, Job, JobDone, JobEvent, LatentFilter, Msg, Queued, Shared, SlotInfo, StopReason,
    SubscriberStats, CTRL_FLAG,
};
use crate::capture::Tap;
use crate::engine::{Context, LabelledBatch, Sampler, Token};
use crate::error::{Error, ErrorKind, Result};
use crate::record::{TokenHeader, TopEntry, ROW_PROMPT};
use crate::select::{GraphNode, Selection};
use crate::tokens::token_stats;

struct Active {
    job: Job,
    cancel: Arc<AtomicBool>,
    sampler: Sampler,
    /// Prompt tokens already in a batch.
    fed: usize,
    /// Next token to decode (after the prompt).
    next: Option<Token>,
    /// Next position.
    pos: i32,
    generated: usize,
    started: Instant,
    first_token: Option<Instant>,
    /// Batch index of this slot's output row in the current decode.
    out_index: Option<i32>,
    /// The row decoded this step was the prompt's last.
    step: u32,
}

pub(super) struct Worker {
    ctx: Context,
    graph: Vec<GraphNode>,
    shared: Arc<Shared>,
    ctrl: Sender<Ctrl>,
    slots: Vec<Option<Active>>,
    pending: VecDeque<Box<Queued>>,
    sub_filters: Vec<(Arc<SubscriberStats>, LatentFilter)>,
    lb: LabelledBatch,
    n_ctx_slot: u32,
    decodes: u32,
    union: Vec<String>,
    /// Per entry of `sub_filters`: behind (not captured for) when the current
    /// selection was made; read once per decode, so a flag that flips during
    /// the decode cannot make its missed frames go uncounted.
    paused: Vec<bool>,
    stopping: bool,
}

impl Worker {
    pub(super) fn new(
        ctx: Context,
        graph: Vec<GraphNode>,
        shared: Arc<Shared>,
        ctrl: Sender<Ctrl>,
        n_parallel: usize,
        n_ctx_slot: u32,
    ) -> Self {
        let n_batch = ctx.n_batch() as usize;
        Self {
            ctx,
            graph,
            shared,
            ctrl,
            slots: (0..n_parallel).map(|_| None).collect(),
            pending: VecDeque::new(),
            sub_filters: Vec::new(),
            lb: LabelledBatch::new(n_batch),
            n_ctx_slot,
            decodes: 0,
            union: Vec::new(),
            paused: Vec::new(),
            stopping: false,
        }
    }

    pub(super) fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            let idle = self.slots.iter().all(Option::is_none) && self.pending.is_empty();
            if idle && self.stopping {
                break;
            }
            // Block only when there is nothing to decode.
            let first = if idle {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.stopping = true;
                        None
                    }
                }
            } else {
                None
            };
            for m in first
                .into_iter()
                .chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                self.on_msg(m);
            }
            self.prune_subscribers();
            self.admit();
            self.reap_cancelled();
            if self.slots.iter().all(Option::is_none) {
                continue;
            }
            if let Err(e) = self.sync_selection() {
                self.fail_all(e);
                continue;
            }
            self.step();
        }
        // Closing the ring (dropping the context and its tap) ends the router.
    }

    fn on_msg(&mut self, m: Msg) {
        // A job that never got a slot because the engine is stopping.
        let refuse_shutting_down = |q: Box<Queued>| {
            let mut sink = q.sink;
            sink(JobEvent::Done(JobDone {
                reason: StopReason::Cancelled,
                error: Some(Error::new(
                    ErrorKind::Internal,
                    "the server is shutting down",
                )),
                n_prompt: 0,
                n_generated: 0,
                prompt_ms: 0.0,
                gen_ms: 0.0,
                frames: 0,
            }));
        };
        match m {
            Msg::Job(q) => {
                if self.stopping {
                    self.shared.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    refuse_shutting_down(q);
                } else {
                    self.pending.push_back(q);
                }
            }
            Msg::Subscribe(s) => {
                if let Ok(mut v) = self.shared.subscribers.lock() {
                    v.push(s.stats.clone());
                }
                self.sub_filters.push((s.stats.clone(), s.filter.clone()));
                let _ = self.announce(Ctrl::Subscribe(s), 0);
            }
            Msg::Shutdown { cancel } => {
                self.stopping = true;
                let queued: Vec<_> = self.pending.drain(..).collect();
                for q in queued {
                    self.shared.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    refuse_shutting_down(q);
                }
                if cancel {
                    for a in self.slots.iter().flatten() {
                        a.cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    fn prune_subscribers(&mut self) {
        if self.shared.union_dirty.swap(false, Ordering::Relaxed) {
            let live: Vec<u64> = self
                .shared
                .subscribers
                .lock()
                .map(|v| v.iter().map(|s| s.id).collect())
                .unwrap_or_default();
            self.sub_filters.retain(|(s, _)| live.contains(&s.id));
        }
    }

    /// Put waiting jobs into free slots: announce each, then its prompt tokens.
    fn admit(&mut self) {
        while let Some(free) = self.slots.iter().position(Option::is_none) {
            let Some(q) = self.pending.pop_front() else {
                break;
            };
            let Queued {
                id,
                job,
                sink,
                cancel,
            } = *q;
            self.shared.stats.queued.fetch_sub(1, Ordering::Relaxed);
            self.shared.stats.active.fetch_add(1, Ordering::Relaxed);
            self.ctx.seq_rm(free as i32);
            let ctrl = Ctrl::Assign {
                slot: free,
                id,
                n_prompt: job.prompt.len(),
                filter: job.latents.clone(),
                sink,
                cancel: cancel.clone(),
            };
            if let Ok(mut s) = self.shared.slots.lock() {
                s[free] = SlotInfo {
                    id: free,
                    job: Some(id),
                    n_prompt: job.prompt.len(),
                    n_generated: 0,
                    n_predict: job.n_predict,
                };
            }
            // A reused slot starts unedited; a job with edits installs its own.
            let edited = match &job.edits {
                Some(e) => self.tap().and_then(|t| t.set_seq_edits(free as i32, e)),
                None => Ok(()),
            };
            let sampler = Sampler::new(&job.sampling);
            let mut a = Active {
                job,
                cancel,
                sampler,
                fed: 0,
                next: None,
                pos: 0,
                generated: 0,
                started: Instant::now(),
                first_token: None,
                out_index: None,
                step: 0,
            };
            if let Err(e) = edited.and_then(|()| self.announce(ctrl, free)) {
                self.slots[free] = Some(a);
                self.finish(free, StopReason::Error, Some(e));
                continue;
            }
            let model = self.ctx.model().clone();
            let mut err = None;
            for (i, &t) in a.job.prompt.iter().enumerate() {
                let h =
                    TokenHeader::event(0, free as i32, i as i32, t, ROW_PROMPT, f32::NAN, f32::NAN);
                if let Err(e) = self.push_token(h, &[], &model.token_bytes(t)) {
                    err = Some(e);
                    break;
                }
            }
            a.started = Instant::now();
            self.slots[free] = Some(a);
            if let Some(e) = err {
                self.finish(free, StopReason::Error, Some(e));
            }
        }
    }

    fn reap_cancelled(&mut self) {
        for s in 0..self.slots.len() {
            if self.slots[s]
                .as_ref()
                .is_some_and(|a| a.cancel.load(Ordering::Relaxed))
            {
                // While stopping, say so: a job cut by a shutdown is told from
                // one its caller cancelled (a stop string, a client that left).
                let why = self
                    .stopping
                    .then(|| Error::new(ErrorKind::Internal, "the engine is stopping"));
                self.finish(s, StopReason::Cancelled, why);
            }
        }
    }

    /// Keep the tap's selection equal to the union of what active jobs and
    /// subscribers want (nothing wanted: the graph is not split at all).
    fn sync_selection(&mut self) -> Result<()> {
        let mut want: HashSet<&str> = HashSet::new();
        for a in self.slots.iter().flatten() {
            if let Some(f) = &a.job.latents {
                want.extend(f.names.iter().map(String::as_str));
            }
        }
        // A subscriber that is behind (its queue full) is not captured for:
        // its frames would only be dropped. `count_paused` counts them.
        self.paused.clear();
        for (s, f) in &self.sub_filters {
            let behind = s.behind.load(Ordering::Relaxed);
            self.paused.push(behind);
            if !behind {
                want.extend(f.names.iter().map(String::as_str));
            }
        }
        let union: Vec<String> = self
            .graph
            .iter()
            .filter(|n| want.contains(n.name.as_str()))
            .map(|n| n.name.clone())
            .collect();
        if union == self.union {
            return Ok(());
        }
        let sel = if union.is_empty() {
            Selection::empty()
        } else {
            // Display names contain no glob characters, so each matches only itself.
            Selection::compile(&union, None, &self.graph)?
        };
        self.tap()?.reselect(sel)?;
        self.union = union;
        Ok(())
    }

    /// Count, as drops of each subscriber that is behind, the frames of this
    /// decode it would have been offered and that nobody captured: one per
    /// tensor of its own that is not in the union and per sequence whose rows
    /// it keeps (every sequence in the batch; with `rows: last`, those with an
    /// output row).
    fn count_paused(&self) {
        let seqs = |outputs_only: bool| {
            let mut v: Vec<i32> = self
                .lb
                .rows
                .iter()
                .zip(&self.lb.outputs)
                .filter(|(_, &out)| out || !outputs_only)
                .map(|(r, _)| r.seq_id)
                .collect();
            v.sort_unstable();
            v.dedup();
            v.len()
        };
        for ((s, f), _) in self
            .sub_filters
            .iter()
            .zip(&self.paused)
            .filter(|(_, &paused)| paused)
        {
            let missed = f.names.iter().filter(|n| !self.union.contains(n)).count();
            let n = missed * seqs(f.rows != crate::capture::Rows::All);
            s.drops.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn tap(&mut self) -> Result<&mut Tap> {
        self.ctx
            .tap_mut()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "context has no tap"))
    }

    fn push_token(&mut self, h: TokenHeader, top: &[TopEntry], piece: &[u8]) -> Result<()> {
        self.tap()?.push_token(h, top, piece)
    }

    /// Send a control message and its in-band marker (message first: the
    /// router reads it only after it sees the marker).
    fn announce(&mut self, c: Ctrl, slot: usize) -> Result<()> {
        self.ctrl
            .send(c)
            .map_err(|_| Error::new(ErrorKind::Internal, "router stopped"))?;
        let h = TokenHeader::event(0, slot as i32, -1, -1, CTRL_FLAG, f32::NAN, f32::NAN);
        self.push_token(h, &[], &[])
    }

    fn finish(&mut self, slot: usize, reason: StopReason, error: Option<Error>) {
        let Some(a) = self.slots[slot].take() else {
            return;
        };
        let now = Instant::now();
        let prompt_ms = a
            .first_token
            .map_or(now - a.started, |t| t - a.started)
            .as_secs_f64()
            * 1e3;
        let gen_ms = a.first_token.map_or(0.0, |t| (now - t).as_secs_f64() * 1e3);
        let st = &self.shared.stats;
        st.active.fetch_sub(1, Ordering::Relaxed);
        st.jobs_done.fetch_add(1, Ordering::Relaxed);
        st.prompt_tokens.fetch_add(a.fed as u64, Ordering::Relaxed);
        st.generated_tokens
            .fetch_add(a.generated as u64, Ordering::Relaxed);
        st.prompt_us
            .fetch_add((prompt_ms * 1e3) as u64, Ordering::Relaxed);
        st.gen_us
            .fetch_add((gen_ms * 1e3) as u64, Ordering::Relaxed);
        self.ctx.seq_rm(slot as i32);
        if a.job.edits.is_some() {
            // Cannot fail: clearing needs nothing of the tap but its arming.
            if let Some(t) = self.ctx.tap_mut() {
                let _ = t.set_seq_edits(slot as i32, &crate::steer::Edits::default());
            }
        }
        if let Ok(mut s) = self.shared.slots.lock() {
            s[slot] = SlotInfo {
                id: slot,
                ..SlotInfo::default()
            };
        }
        let done = JobDone {
            reason,
            error,
            n_prompt: a.job.prompt.len(),
            n_generated: a.generated,
            prompt_ms,
            gen_ms,
            frames: 0,
        };
        // If the ring is gone there is nobody to tell.
        let _ = self.announce(Ctrl::Finish { slot, done }, slot);
    }

    fn fail_all(&mut self, e: Error) {
        for s in 0..self.slots.len() {
            if self.slots[s].is_some() {
                self.finish(s, StopReason::Error, Some(e.clone()));
            }
        }
    }

    /// One decode over every active slot.
    fn step(&mut self) {
        let n_batch = self.ctx.n_batch() as usize;
        self.lb.clear();
        // Generating slots first (one token each), then prompt chunks.
        for (s, slot) in self.slots.iter_mut().enumerate() {
            let Some(a) = slot else { continue };
            a.out_index = None;
            if let Some(tok) = a.next {
                if self.lb.len() >= n_batch {
                    continue;
                }
                a.out_index = Some(self.lb.len() as i32);
                self.lb.push(tok, a.pos, s as i32, true, 0);
            }
        }
        for (s, slot) in self.slots.iter_mut().enumerate() {
            let Some(a) = slot else { continue };
            if a.next.is_some() || a.fed >= a.job.prompt.len() {
                continue;
            }
            while a.fed < a.job.prompt.len() && self.lb.len() < n_batch {
                let i = a.fed;
                let last = i + 1 == a.job.prompt.len();
                let t = a.job.prompt[i];
                if last {
                    a.out_index = Some(self.lb.len() as i32);
                }
                self.lb.push(t, i as i32, s as i32, last, ROW_PROMPT);
                a.fed += 1;
            }
        }
        if self.lb.is_empty() {
            return;
        }
        let step = self.decodes;
        self.decodes = self.decodes.wrapping_add(1);
        let r = self.ctx.decode_labelled(&self.lb, step, 0).map(|_| ());
        self.shared.stats.decodes.fetch_add(1, Ordering::Relaxed);
        self.count_paused();
        if let Some(t) = self.ctx.tap() {
            let c = t.counters();
            self.shared.stats.frames.store(c.frames, Ordering::Relaxed);
            self.shared
                .stats
                .tap_drops
                .store(c.drops, Ordering::Relaxed);
        }
        if let Err(e) = r {
            // Every job in this batch failed; their KV cells are freed by finish.
            let in_batch: Vec<usize> = self.lb.rows.iter().map(|r| r.seq_id as usize).collect();
            for s in 0..self.slots.len() {
                if in_batch.contains(&s) {
                    self.finish(s, StopReason::Error, Some(e.clone()));
                }
            }
            return;
        }
        let model = self.ctx.model().clone();
        let mut kv = 0u64;
        for s in 0..self.slots.len() {
            let Some(i) = self.slots[s].as_ref().and_then(|a| a.out_index) else {
                if let Some(a) = &self.slots[s] {
                    kv += a.fed as u64;
                }
                continue;
            };
            let a = self.slots[s].as_mut().expect("slot checked above");
            if a.next.is_some() {
                a.pos += 1;
            } else {
                a.pos = a.job.prompt.len() as i32;
            }
            kv += a.pos as u64;
            if a.job.n_predict == 0 {
                self.finish(s, StopReason::Limit, None);
                continue;
            }
            let tok = self.ctx.sample(&mut a.sampler, i);
            let Ok(logits) = self.ctx.logits_ith(i) else {
                self.finish(
                    s,
                    StopReason::Error,
                    Some(Error::new(
                        ErrorKind::Internal,
                        "no logits for an output row",
                    )),
                );
                continue;
            };
            let want_stats = a.job.n_probs > 0 || a.job.token_stats || !self.sub_filters.is_empty();
            let st = if want_stats {
                token_stats(logits, tok, a.job.n_probs)
            } else {
                crate::tokens::TokenStats {
                    logprob: f32::NAN,
                    entropy: f32::NAN,
                    top: Vec::new(),
                }
            };
            let a = self.slots[s].as_mut().expect("slot checked above");
            if a.first_token.is_none() {
                a.first_token = Some(Instant::now());
            }
            let step = a.step;
            a.step += 1;
            a.generated += 1;
            a.next = Some(tok);
            let pos = a.pos;
            let eog = model.is_eog(tok) && !a.job.ignore_eos;
            let limit = a.generated >= a.job.n_predict || a.pos as u32 + 1 >= self.n_ctx_slot;
            let n_generated = a.generated;
            let h = TokenHeader::event(step, s as i32, pos, tok, 0, st.logprob, st.entropy);
            if let Ok(mut si) = self.shared.slots.lock() {
                si[s].n_generated = n_generated;
            }
            if let Err(e) = self.push_token(h, &st.top, &model.token_bytes(tok)) {
                self.finish(s, StopReason::Error, Some(e));
                continue;
            }
            if eog {
                self.finish(s, StopReason::Eos, None);
            } else if limit {
                self.finish(s, StopReason::Limit, None);
            }
        }
        self.shared.stats.kv_tokens.store(kv, Ordering::Relaxed);
    }
}
