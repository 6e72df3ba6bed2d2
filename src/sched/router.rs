//! The router thread: owns the ring's consumer and turns the ordered stream
//! into per-job events (frames cut down to the job's own rows and tensors,
//! tokens, the end) and into subscriber records. Free of llama.cpp: it only
//! reads records and the engine's control messages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use super::{
    Ctrl, FrameOut, JobDone, JobEvent, JobSink, LatentFilter, Offer, RequestRecord, Shared,
    StopReason, SubscriberSink, SubscriberStats, TokenOut, CTRL_FLAG, KIND_REQUEST,
};
use crate::capture::Rows;
use crate::error::{Error, ErrorKind};
use crate::record::{self, Dtype, FrameHeader, Record, ROW_PROMPT};
use crate::stream::Stream;

struct Route {
    id: u64,
    n_prompt: usize,
    filter: Option<LatentFilter>,
    sink: JobSink,
    cancel: Arc<AtomicBool>,
    frames: u64,
    alive: bool,
}

struct Sub {
    filter: LatentFilter,
    sink: Box<dyn SubscriberSink>,
    stats: Arc<SubscriberStats>,
    frames: u64,
    alive: bool,
}

pub(super) struct Router {
    shared: Arc<Shared>,
    ctrl: Receiver<Ctrl>,
    routes: Vec<Option<Route>>,
    subs: Vec<Sub>,
}

impl Router {
    pub(super) fn new(shared: Arc<Shared>, ctrl: Receiver<Ctrl>) -> Self {
        let n = shared.slots.lock().map(|s| s.len()).unwrap_or(0);
        Self {
            shared,
            ctrl,
            routes: (0..n).map(|_| None).collect(),
            subs: Vec::new(),
        }
    }

    pub(super) fn run(mut self, mut stream: Stream) {
        loop {
            if stream.is_finished() {
                break;
            }
            let Ok(Some(item)) = stream.next(Duration::from_millis(20)) else {
                continue;
            };
            let Ok(rec) = item.record() else { continue };
            match rec {
                Record::Frame(f) => self.on_frame(&f),
                Record::Token(t) if t.header.flags & CTRL_FLAG != 0 => {
                    drop(item);
                    match self.ctrl.recv() {
                        Ok(c) => self.on_ctrl(c),
                        Err(_) => break,
                    }
                    continue;
                }
                Record::Token(t) => {
                    let out = TokenOut {
                        step: t.header.step,
                        slot: t.header.seq_id,
                        pos: t.header.pos,
                        token: t.header.token,
                        prompt: t.is_prompt(),
                        logprob: t.header.logprob,
                        entropy: t.header.entropy,
                        top: t.top.to_vec(),
                        piece: t.piece.to_vec(),
                    };
                    self.on_token(out);
                }
                Record::End(_) => {}
            }
            self.prune();
        }
        // The engine is gone: anything still routed ends now.
        for r in self.routes.iter_mut().filter_map(Option::take) {
            let mut sink = r.sink;
            sink(JobEvent::Done(JobDone {
                reason: StopReason::Error,
                error: Some(Error::new(ErrorKind::Internal, "the engine stopped")),
                n_prompt: r.n_prompt,
                n_generated: 0,
                prompt_ms: 0.0,
                gen_ms: 0.0,
                frames: r.frames,
            }));
        }
    }

    fn prune(&mut self) {
        let before = self.subs.len();
        self.subs.retain(|s| s.alive);
        if self.subs.len() != before {
            let live: Vec<u64> = self.subs.iter().map(|s| s.stats.id).collect();
            if let Ok(mut v) = self.shared.subscribers.lock() {
                v.retain(|s| live.contains(&s.id));
            }
            self.shared.union_dirty.store(true, Ordering::Relaxed);
        }
    }

    fn on_ctrl(&mut self, c: Ctrl) {
        match c {
            Ctrl::Assign {
                slot,
                id,
                n_prompt,
                filter,
                mut sink,
                cancel,
            } => {
                let alive = sink(JobEvent::Started { slot });
                if !alive {
                    cancel.store(true, Ordering::Relaxed);
                }
                self.notify_subs(id, slot, 1, n_prompt as u64);
                self.routes[slot] = Some(Route {
                    id,
                    n_prompt,
                    filter,
                    sink,
                    cancel,
                    frames: 0,
                    alive,
                });
            }
            Ctrl::Subscribe(s) => self.subs.push(Sub {
                filter: s.filter,
                sink: s.sink,
                stats: s.stats,
                frames: 0,
                alive: true,
            }),
            Ctrl::Finish { slot, mut done } => {
                if let Some(mut r) = self.routes[slot].take() {
                    done.frames = r.frames;
                    self.notify_subs(r.id, slot, 2, done.n_generated as u64);
                    if r.alive {
                        (r.sink)(JobEvent::Done(done));
                    }
                }
            }
        }
    }

    fn notify_subs(&mut self, id: u64, slot: usize, event: u32, n_tokens: u64) {
        for s in &mut self.subs {
            let rec = RequestRecord {
                kind: KIND_REQUEST,
                header_size: std::mem::size_of::<RequestRecord>() as u32,
                request_id: id,
                seq_id: slot as i32,
                event,
                dropped: s.stats.drops.load(Ordering::Relaxed),
                n_tokens,
            };
            deliver(s, rec.to_record(), false);
        }
    }

    fn on_token(&mut self, t: TokenOut) {
        let slot = t.slot as usize;
        if !self.subs.is_empty() {
            let rec = t.to_record();
            for s in &mut self.subs {
                deliver(s, rec.clone(), false);
            }
        }
        if let Some(r) = self.routes.get_mut(slot).and_then(Option::as_mut) {
            if r.alive && !(r.sink)(JobEvent::Token(t)) {
                r.alive = false;
                r.cancel.store(true, Ordering::Relaxed);
            }
        }
    }

    fn on_frame(&mut self, f: &record::FrameView<'_>) {
        let name = f.name();
        let stats = &self.shared.stats;
        // Rows of one slot are contiguous in a frame (the batch lists each slot's rows together).
        let mut i = 0;
        while i < f.rows.len() {
            let slot = f.rows[i].seq_id;
            let mut j = i;
            while j < f.rows.len() && f.rows[j].seq_id == slot {
                j += 1;
            }
            let (lo, hi) = (i, j);
            i = j;
            let Some(route) = usize::try_from(slot)
                .ok()
                .and_then(|s| self.routes.get_mut(s))
                .and_then(Option::as_mut)
            else {
                continue;
            };
            let want_job = if route.alive {
                route
                    .filter
                    .as_ref()
                    .and_then(|flt| flt.index_of(name).map(|ix| (ix, flt.rows, flt.dtype)))
            } else {
                None
            };
            let n_prompt = route.n_prompt;
            if let Some((ix, rows, dtype)) = want_job {
                if let Some(out) = cut(f, lo, hi, n_prompt, ix, rows, dtype, route.frames) {
                    route.frames += 1;
                    stats
                        .frame_bytes_out
                        .fetch_add(out.data.len() as u64, Ordering::Relaxed);
                    if !(route.sink)(JobEvent::Frame(out)) {
                        route.alive = false;
                        route.cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
            for s in &mut self.subs {
                let Some(ix) = s.filter.index_of(name) else {
                    continue;
                };
                // Behind already: count the drop without copying the rows.
                let most = record::frame_len(hi - lo, f.header.width as usize, s.filter.dtype);
                if s.alive && !s.sink.has_room(most) {
                    s.frames += 1;
                    s.stats.drops.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some(out) = cut(
                    f,
                    lo,
                    hi,
                    n_prompt,
                    ix,
                    s.filter.rows,
                    s.filter.dtype,
                    s.frames,
                ) {
                    s.frames += 1;
                    let n = out.data.len() as u64;
                    if deliver(s, out.to_record(), true) {
                        stats.frame_bytes_out.fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

fn deliver(s: &mut Sub, rec: Vec<u8>, droppable: bool) -> bool {
    if !s.alive {
        return false;
    }
    match s.sink.offer(rec, droppable) {
        Offer::Taken => {
            s.stats.delivered.fetch_add(1, Ordering::Relaxed);
            true
        }
        Offer::Full => {
            s.stats.drops.fetch_add(1, Ordering::Relaxed);
            false
        }
        Offer::Closed => {
            s.alive = false;
            false
        }
    }
}

/// Rows `lo..hi` of `f` (one slot's) as a frame of their own, with the job's step,
/// the consumer's tensor index and dtype; `None` when `rows` keeps none of them.
#[allow(clippy::too_many_arguments)]
fn cut(
    f: &record::FrameView<'_>,
    lo: usize,
    hi: usize,
    n_prompt: usize,
    tensor_index: u32,
    rows: Rows,
    dtype: Dtype,
    seq: u64,
) -> Option<FrameOut> {
    let keep: Vec<usize> = (lo..hi)
        .filter(|&r| {
            rows == Rows::All
                || f.rows[r].flags & ROW_PROMPT == 0
                || f.rows[r].pos as usize + 1 == n_prompt
        })
        .collect();
    if keep.is_empty() || f.header.width == 0 {
        return None;
    }
    let width = f.header.width as usize;
    let src_dt = f.dtype();
    let mut data = vec![0u8; keep.len() * width * dtype.size()];
    let mut f32buf = Vec::new();
    for (k, &r) in keep.iter().enumerate() {
        let src = f.row_bytes(r);
        let dst = &mut data[k * width * dtype.size()..(k + 1) * width * dtype.size()];
        if src_dt == dtype {
            dst.copy_from_slice(src);
        } else {
            f32buf.resize(width * 4, 0);
            crate::capture::convert_to_f32(src, src_dt, &mut f32buf);
            crate::capture::convert_from_f32(&f32buf, dtype, dst);
        }
    }
    let first = &f.rows[keep[0]];
    // Job step: 0 for prompt rows (and the decode that samples the first token),
    // k for the decode of the k-th generated token.
    let step = if first.flags & ROW_PROMPT != 0 {
        0
    } else {
        (first.pos as i64 - n_prompt as i64 + 1).max(0) as u32
    };
    let header = FrameHeader {
        seq,
        step,
        tensor_index,
        dtype: dtype as u32,
        n_rows: keep.len() as u32,
        ..*f.header
    };
    Some(FrameOut {
        header,
        rows: keep.iter().map(|&r| f.rows[r]).collect(),
        data,
    })
}
