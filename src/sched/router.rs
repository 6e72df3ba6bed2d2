//! The router thread: owns the ring's consumer and turns the ordered stream
//! into per-job events (frames cut down to the job's own rows and tensors,
//! tokens, the end) and into subscriber records. Free of llama.cpp: it only
//! reads records and the engine's control messages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use super::{
    Ctrl, FrameOut, JobDone, JobEvent, JobSink, LatentFilter, RequestRecord, Shared, StopReason,
    Subscriber, TokenOut, CTRL_FLAG,
};
use crate::capture::Rows;
use crate::convert::convert;
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
    sub: Subscriber,
    frames: u64,
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
                // Idle: a subscriber that read its queue meanwhile gets its
                // tensors captured again from the next decode on.
                for s in &self.subs {
                    s.sub.catch_up();
                }
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
        self.subs.retain(|s| s.sub.alive);
        if self.subs.len() != before {
            let live: Vec<u64> = self.subs.iter().map(|s| s.sub.stats.id).collect();
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
                sub: Subscriber::new(s.sink, s.stats),
                frames: 0,
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
            let rec = RequestRecord::notice(id, slot as i32, event, n_tokens, s.sub.drops());
            s.sub.deliver(rec, false);
            s.sub.catch_up();
        }
    }

    fn on_token(&mut self, t: TokenOut) {
        let slot = t.slot as usize;
        if !self.subs.is_empty() {
            let rec = t.to_record();
            for s in &mut self.subs {
                s.sub.deliver(rec.clone(), false);
                s.sub.catch_up();
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
                if !s.sub.take_or_drop(most) {
                    s.frames += 1;
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
                    if s.sub.deliver(out.to_record(), true) {
                        stats.frame_bytes_out.fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
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
    for (k, &r) in keep.iter().enumerate() {
        let dst = &mut data[k * width * dtype.size()..(k + 1) * width * dtype.size()];
        convert(f.row_bytes(r), src_dt, dst, dtype);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;
    use std::sync::Mutex;

    use super::super::{Offer, SubEntry, SubscriberSink, SubscriberStats};
    use super::*;
    use crate::record::{kind, RowMeta, TokenHeader};
    use crate::ring::Producer;

    /// Elements per row of every test tensor.
    const W: usize = 4;

    /// What a test frame holds at `col` of the row at (`slot`, `pos`): distinct
    /// per frame, row and column, and exact in f16.
    fn value(frame_seq: u64, slot: i32, pos: i32, col: usize) -> f32 {
        (frame_seq as usize * 100 + slot as usize * 40 + pos as usize * 4 + col) as f32
    }

    fn prompt_row(slot: i32, pos: i32) -> RowMeta {
        RowMeta {
            seq_id: slot,
            pos,
            token: 500 + pos,
            flags: ROW_PROMPT,
        }
    }

    fn gen_row(slot: i32, pos: i32) -> RowMeta {
        RowMeta {
            seq_id: slot,
            pos,
            token: 600 + pos,
            flags: 0,
        }
    }

    /// A frame record of `name` as the engine's tap writes it: f32, every row
    /// of the batch (any slot), the engine's own seq, step and tensor index.
    fn frame(name: &str, seq: u64, rows: &[RowMeta]) -> Vec<u8> {
        let n = rows.len();
        let mut buf = vec![0u8; record::frame_len(n, W, Dtype::F32)];
        let mut header = FrameHeader {
            kind: kind::FRAME,
            header_size: std::mem::size_of::<FrameHeader>() as u32,
            seq,
            step: 77,
            ubatch: 0,
            tensor_index: 99,
            layer: 0,
            dtype: Dtype::F32 as u32,
            n_rows: n as u32,
            width: W as u64,
            ne: [W as i64, n as i64, 1, 1],
            name: [0; 64],
        };
        header.name[..name.len()].copy_from_slice(name.as_bytes());
        record::put(&mut buf, 0, &header);
        let mut off = std::mem::size_of::<FrameHeader>();
        for r in rows {
            record::put(&mut buf, off, r);
            off += std::mem::size_of::<RowMeta>();
        }
        for r in rows {
            for c in 0..W {
                record::put(&mut buf, off, &value(seq, r.seq_id, r.pos, c));
                off += 4;
            }
        }
        assert_eq!(off, buf.len());
        buf
    }

    fn token(slot: i32, pos: i32, tok: i32) -> Vec<u8> {
        let mut h = TokenHeader::event(0, slot, pos, tok, 0, -0.5, 1.25);
        h.piece_len = 1;
        let mut buf = vec![0u8; record::token_len(0, 1)];
        record::put(&mut buf, 0, &h);
        buf[std::mem::size_of::<TokenHeader>()] = b'x';
        buf
    }

    /// What the engine sends: a ring record, or a control message (its marker
    /// goes into the ring, the message down the side channel).
    enum In {
        Rec(Vec<u8>),
        Ctrl(Ctrl),
    }

    type Events = Arc<Mutex<Vec<JobEvent>>>;

    fn assign(slot: usize, id: u64, n_prompt: usize, filter: Option<LatentFilter>) -> (In, Events) {
        let events: Events = Arc::default();
        let e = events.clone();
        let sink: JobSink = Box::new(move |ev| {
            e.lock().unwrap().push(ev);
            true
        });
        let c = Ctrl::Assign {
            slot,
            id,
            n_prompt,
            filter,
            sink,
            cancel: Arc::new(AtomicBool::new(false)),
        };
        (In::Ctrl(c), events)
    }

    fn finish(slot: usize, n_generated: usize) -> In {
        In::Ctrl(Ctrl::Finish {
            slot,
            done: JobDone {
                reason: StopReason::Limit,
                error: None,
                n_prompt: 0,
                n_generated,
                prompt_ms: 0.0,
                gen_ms: 0.0,
                frames: 0,
            },
        })
    }

    /// A subscriber sink keeping every record; `room: false` is one whose queue
    /// is full for frames.
    #[derive(Clone)]
    struct Collect {
        recs: Recs,
        room: bool,
    }

    impl SubscriberSink for Collect {
        fn offer(&mut self, rec: Vec<u8>, _droppable: bool) -> Offer {
            self.recs.lock().unwrap().push(rec);
            Offer::Taken
        }

        fn has_room(&self, _len: usize) -> bool {
            self.room
        }
    }

    /// Records a subscriber was given.
    type Recs = Arc<Mutex<Vec<Vec<u8>>>>;

    fn subscribe(id: u64, filter: LatentFilter, room: bool) -> (In, Recs, Arc<SubscriberStats>) {
        let recs: Recs = Arc::default();
        let stats = Arc::new(SubscriberStats {
            id,
            ..SubscriberStats::default()
        });
        let entry = SubEntry {
            filter,
            sink: Box::new(Collect {
                recs: recs.clone(),
                room,
            }),
            stats: stats.clone(),
        };
        (In::Ctrl(Ctrl::Subscribe(Box::new(entry))), recs, stats)
    }

    fn filter(names: &[&str], rows: Rows, dtype: Dtype) -> LatentFilter {
        LatentFilter::new(names.iter().map(|s| s.to_string()).collect(), rows, dtype)
    }

    fn write(p: &mut Producer, rec: &[u8]) {
        let mut g = p.try_write(rec.len()).expect("the test ring has room");
        g.copy_from_slice(rec);
        g.commit();
    }

    /// Feed `input` to a router with `n_slots` slots the way the engine does,
    /// close the ring and run the router to its end.
    fn route(n_slots: usize, input: Vec<In>) -> Arc<Shared> {
        let shared = Arc::new(Shared::new(n_slots));
        let (mut producer, consumer) = crate::ring::channel(1 << 16).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in input {
            match i {
                In::Rec(r) => write(&mut producer, &r),
                In::Ctrl(c) => {
                    tx.send(c).unwrap();
                    let h = TokenHeader::event(0, 0, -1, -1, CTRL_FLAG, f32::NAN, f32::NAN);
                    let mut marker = vec![0u8; record::token_len(0, 0)];
                    record::put(&mut marker, 0, &h);
                    write(&mut producer, &marker);
                }
            }
        }
        drop((producer, tx));
        Router::new(shared.clone(), rx).run(Stream::new(consumer));
        shared
    }

    /// The payload as f32, whatever its dtype.
    fn values(data: &[u8], dtype: Dtype) -> Vec<f32> {
        match dtype {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32())
                .collect(),
        }
    }

    /// The values `rows` of engine frame `frame_seq` hold.
    fn expected(frame_seq: u64, rows: &[RowMeta]) -> Vec<f32> {
        rows.iter()
            .flat_map(|r| (0..W).map(move |c| value(frame_seq, r.seq_id, r.pos, c)))
            .collect()
    }

    /// What a consumer should get from one frame: (tensor name, its index in the
    /// consumer's list, the consumer's frame count, job step, dtype, rows, and
    /// the engine frame the values come from).
    struct Want<'a> {
        name: &'a str,
        index: u32,
        seq: u64,
        step: u32,
        dtype: Dtype,
        rows: Vec<RowMeta>,
        from: u64,
    }

    fn check(f: &FrameOut, w: &Want<'_>) {
        assert_eq!(f.name(), w.name);
        assert_eq!(f.header.tensor_index, w.index, "{}", w.name);
        assert_eq!(f.header.seq, w.seq, "{}", w.name);
        assert_eq!(f.header.step, w.step, "{}", w.name);
        assert_eq!(f.dtype(), w.dtype);
        assert_eq!(f.header.n_rows as usize, w.rows.len());
        assert_eq!(f.header.width, W as u64);
        assert_eq!(f.rows, w.rows);
        assert_eq!(f.data.len(), w.rows.len() * W * w.dtype.size());
        assert_eq!(values(&f.data, w.dtype), expected(w.from, &w.rows));
    }

    /// A job's events, asserted in order.
    fn check_job(events: &Events, slot: usize, frames: &[Want<'_>], tokens: &[i32]) {
        let ev = events.lock().unwrap();
        assert!(
            matches!(ev.first(), Some(JobEvent::Started { slot: s }) if *s == slot),
            "{ev:?}"
        );
        let got_frames: Vec<&FrameOut> = ev
            .iter()
            .filter_map(|e| match e {
                JobEvent::Frame(f) => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(got_frames.len(), frames.len(), "{ev:?}");
        for (f, w) in got_frames.iter().zip(frames) {
            check(f, w);
        }
        let got_tokens: Vec<i32> = ev
            .iter()
            .filter_map(|e| match e {
                JobEvent::Token(t) => {
                    assert_eq!(t.slot as usize, slot);
                    Some(t.token)
                }
                _ => None,
            })
            .collect();
        assert_eq!(got_tokens, tokens);
        let n_done = ev.iter().filter(|e| matches!(e, JobEvent::Done(_))).count();
        assert_eq!(n_done, 1, "{ev:?}");
        match ev.last() {
            Some(JobEvent::Done(d)) => {
                assert_eq!(d.reason, StopReason::Limit);
                assert_eq!(d.frames, frames.len() as u64);
            }
            other => panic!("the last event is {other:?}"),
        }
    }

    #[test]
    fn a_frame_of_two_slots_is_cut_into_each_jobs_rows_and_tensors() {
        // Slot 0: job 7, 3 prompt tokens, two tensors, all rows, f32.
        // Slot 1: job 8, 2 prompt tokens, one tensor, sampled rows only, f16.
        let (a, a_ev) = assign(
            0,
            7,
            3,
            Some(filter(&["l_out-0", "l_out-1"], Rows::All, Dtype::F32)),
        );
        let (b, b_ev) = assign(1, 8, 2, Some(filter(&["l_out-1"], Rows::Last, Dtype::F16)));
        let prompt = vec![
            prompt_row(0, 0),
            prompt_row(0, 1),
            prompt_row(0, 2),
            prompt_row(1, 0),
            prompt_row(1, 1),
        ];
        let decode = vec![gen_row(0, 3), gen_row(1, 2)];
        let shared = route(
            2,
            vec![
                a,
                b,
                In::Rec(frame("l_out-0", 0, &prompt)),
                In::Rec(frame("l_out-1", 1, &prompt)),
                In::Rec(frame("attn_norm-0", 2, &prompt)),
                In::Rec(token(0, 3, 42)),
                In::Rec(token(1, 2, 43)),
                In::Rec(frame("l_out-0", 3, &decode)),
                In::Rec(frame("l_out-1", 4, &decode)),
                finish(0, 1),
                finish(1, 1),
            ],
        );
        let want = |name, index, seq, step, dtype, rows: &[RowMeta], from| Want {
            name,
            index,
            seq,
            step,
            dtype,
            rows: rows.to_vec(),
            from,
        };
        check_job(
            &a_ev,
            0,
            &[
                want("l_out-0", 0, 0, 0, Dtype::F32, &prompt[..3], 0),
                want("l_out-1", 1, 1, 0, Dtype::F32, &prompt[..3], 1),
                want("l_out-0", 0, 2, 1, Dtype::F32, &decode[..1], 3),
                want("l_out-1", 1, 3, 1, Dtype::F32, &decode[..1], 4),
            ],
            &[42],
        );
        // Rows::Last keeps the prompt's last row (the one that sampled) and every decode row.
        check_job(
            &b_ev,
            1,
            &[
                want("l_out-1", 0, 0, 0, Dtype::F16, &prompt[4..5], 1),
                want("l_out-1", 0, 1, 1, Dtype::F16, &decode[1..2], 4),
            ],
            &[43],
        );
        let bytes = (3 + 3 + 1 + 1) * W * 4 + (1 + 1) * W * 2;
        let out = shared.stats.frame_bytes_out.load(Ordering::Relaxed);
        assert_eq!(out, bytes as u64);
    }

    /// A subscriber record, decoded.
    #[derive(Debug, PartialEq)]
    enum Got {
        /// (request id, slot, event, dropped so far, tokens)
        Request(u64, i32, u32, u64, u64),
        /// (name, tensor index, seq, dtype, rows, values)
        Frame(String, u32, u64, Dtype, Vec<RowMeta>, Vec<f32>),
        /// (slot, pos, token)
        Token(i32, i32, i32),
    }

    fn decode(rec: &[u8]) -> Got {
        // Record::parse wants the ring's 8-byte alignment.
        let mut words = vec![0u64; rec.len().div_ceil(8)];
        // SAFETY: the Vec owns words.len() * 8 writable bytes.
        let aligned = unsafe {
            std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8)
        };
        aligned[..rec.len()].copy_from_slice(rec);
        let aligned = &aligned[..rec.len()];
        if u32::from_le_bytes(rec[..4].try_into().unwrap()) == crate::record::kind::REQUEST {
            assert_eq!(rec.len(), std::mem::size_of::<RequestRecord>());
            // SAFETY: 40 bytes, 8-byte aligned, and RequestRecord is plain data.
            let r = unsafe { *(aligned.as_ptr() as *const RequestRecord) };
            assert_eq!(r.header_size, 40);
            return Got::Request(r.request_id, r.seq_id, r.event, r.dropped, r.n_tokens);
        }
        match Record::parse(aligned).unwrap() {
            Record::Frame(f) => Got::Frame(
                f.name().to_string(),
                f.header.tensor_index,
                f.header.seq,
                f.dtype(),
                f.rows.to_vec(),
                values(f.data, f.dtype()),
            ),
            Record::Token(t) => Got::Token(t.header.seq_id, t.header.pos, t.header.token),
            Record::End(_) => panic!("a subscriber never gets an end record"),
        }
    }

    fn got(recs: &Mutex<Vec<Vec<u8>>>) -> Vec<Got> {
        recs.lock().unwrap().iter().map(|r| decode(r)).collect()
    }

    #[test]
    fn each_subscriber_gets_every_jobs_rows_cut_by_its_own_filter() {
        let (s1, s1_recs, s1_stats) =
            subscribe(1, filter(&["l_out-1"], Rows::All, Dtype::F32), true);
        let (s2, s2_recs, s2_stats) = subscribe(
            2,
            filter(&["attn_norm-0", "l_out-0"], Rows::Last, Dtype::F16),
            true,
        );
        // Behind: its frames are counted as dropped, its notices and tokens still arrive.
        let (s3, s3_recs, s3_stats) = subscribe(
            3,
            filter(&["l_out-0", "l_out-1"], Rows::All, Dtype::F32),
            false,
        );
        // Jobs that want tokens only.
        let (a, a_ev) = assign(0, 7, 3, None);
        let (b, b_ev) = assign(1, 8, 2, None);
        let rows = vec![
            prompt_row(0, 0),
            prompt_row(0, 1),
            prompt_row(0, 2),
            prompt_row(1, 0),
            prompt_row(1, 1),
        ];
        let shared = route(
            2,
            vec![
                s1,
                s2,
                s3,
                a,
                b,
                In::Rec(frame("l_out-0", 0, &rows)),
                In::Rec(frame("l_out-1", 1, &rows)),
                In::Rec(token(0, 3, 42)),
                finish(0, 1),
                finish(1, 0),
            ],
        );
        check_job(&a_ev, 0, &[], &[42]);
        check_job(&b_ev, 1, &[], &[]);
        let f32s = |seq: u64, rows: &[RowMeta], from: u64, name: &str| {
            Got::Frame(
                name.into(),
                0,
                seq,
                Dtype::F32,
                rows.to_vec(),
                expected(from, rows),
            )
        };
        assert_eq!(
            got(&s1_recs),
            vec![
                Got::Request(7, 0, 1, 0, 3),
                Got::Request(8, 1, 1, 0, 2),
                f32s(0, &rows[..3], 1, "l_out-1"),
                f32s(1, &rows[3..], 1, "l_out-1"),
                Got::Token(0, 3, 42),
                Got::Request(7, 0, 2, 0, 1),
                Got::Request(8, 1, 2, 0, 0),
            ]
        );
        // l_out-0 is second in this subscriber's list; only each prompt's last row.
        let f16 = |seq: u64, row: RowMeta| {
            Got::Frame(
                "l_out-0".into(),
                1,
                seq,
                Dtype::F16,
                vec![row],
                expected(0, &[row]),
            )
        };
        assert_eq!(
            got(&s2_recs),
            vec![
                Got::Request(7, 0, 1, 0, 3),
                Got::Request(8, 1, 1, 0, 2),
                f16(0, rows[2]),
                f16(1, rows[4]),
                Got::Token(0, 3, 42),
                Got::Request(7, 0, 2, 0, 1),
                Got::Request(8, 1, 2, 0, 0),
            ]
        );
        // Two tensors × two slots dropped; the end notices say so.
        assert_eq!(
            got(&s3_recs),
            vec![
                Got::Request(7, 0, 1, 0, 3),
                Got::Request(8, 1, 1, 0, 2),
                Got::Token(0, 3, 42),
                Got::Request(7, 0, 2, 4, 1),
                Got::Request(8, 1, 2, 4, 0),
            ]
        );
        for (stats, delivered, drops) in [(s1_stats, 7, 0), (s2_stats, 7, 0), (s3_stats, 5, 4)] {
            assert_eq!(stats.delivered.load(Ordering::Relaxed), delivered);
            assert_eq!(stats.drops.load(Ordering::Relaxed), drops);
        }
        let bytes = 5 * W * 4 + 2 * W * 2;
        let out = shared.stats.frame_bytes_out.load(Ordering::Relaxed);
        assert_eq!(out, bytes as u64);
    }

    #[test]
    fn slot_reuse_switches_jobs_exactly_between_frames() {
        let l_out = || filter(&["l_out-0"], Rows::All, Dtype::F32);
        let (s, s_recs, _) = subscribe(1, l_out(), true);
        let (a, a_ev) = assign(0, 1, 2, Some(l_out()));
        let (b, b_ev) = assign(0, 2, 3, Some(l_out()));
        let first = vec![prompt_row(0, 0), prompt_row(0, 1)];
        let second = vec![prompt_row(0, 0), prompt_row(0, 1), prompt_row(0, 2)];
        route(
            1,
            vec![
                s,
                a,
                In::Rec(frame("l_out-0", 0, &first)),
                In::Rec(token(0, 2, 42)),
                // Job 1 ends and job 2 takes slot 0 between two frames of that slot.
                finish(0, 1),
                b,
                In::Rec(frame("l_out-0", 1, &second)),
                finish(0, 0),
            ],
        );
        let want = |rows: &[RowMeta], from| Want {
            name: "l_out-0",
            index: 0,
            seq: 0,
            step: 0,
            dtype: Dtype::F32,
            rows: rows.to_vec(),
            from,
        };
        check_job(&a_ev, 0, &[want(&first, 0)], &[42]);
        check_job(&b_ev, 0, &[want(&second, 1)], &[]);
        let frame_of = |seq, rows: &[RowMeta], from| {
            Got::Frame(
                "l_out-0".into(),
                0,
                seq,
                Dtype::F32,
                rows.to_vec(),
                expected(from, rows),
            )
        };
        assert_eq!(
            got(&s_recs),
            vec![
                Got::Request(1, 0, 1, 0, 2),
                frame_of(0, &first, 0),
                Got::Token(0, 2, 42),
                Got::Request(1, 0, 2, 0, 1),
                Got::Request(2, 0, 1, 0, 3),
                frame_of(1, &second, 1),
                Got::Request(2, 0, 2, 0, 0),
            ]
        );
    }
}
