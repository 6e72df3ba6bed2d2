//! Observers of `latent-tap listen`: every subscriber gets the records of
//! every tapped host, in the stream format of `GET /latents/subscribe`
//! (`docs/PROTOCOL.md`): REQUEST begin/end notices, a TOKEN per row (its input
//! token), FRAMEs cut to one request and to the subscriber's selection.
//!
//! Sequence ids: each attached host connection holds a host number `h`
//! ([`Hub::attach_host`]: the smallest number no attached connection holds,
//! below [`MAX_HOSTS`]) and has its sequence `s` reported as `h << 16 | s`,
//! so requests of hosts attached at the same time never share a `seq_id`, ids
//! stay non-negative however many hosts came and went, and a lone host's ids
//! are its own sequence ids.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::pair::{Event, TokenRow};
use crate::convert::convert;
use crate::record::RequestRecord;
use crate::record::{self, Dtype, FrameHeader, RowMeta, TokenHeader, ROW_PROMPT};
use crate::sched::{Subscriber, SubscriberSink, SubscriberStats};
use crate::select::{glob_match, layer_of, LayerFilter};

/// Which frames a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct SubFilter {
    /// Name globs (empty: every tensor).
    pub patterns: Vec<String>,
    /// Layers (none: every layer).
    pub layers: Option<LayerFilter>,
    /// Only output rows ([`super::wire::ROW_OUTPUT`]).
    pub last: bool,
    /// Convert payloads to this type (none: as sent).
    pub dtype: Option<Dtype>,
}

impl SubFilter {
    fn wants(&self, name: &str) -> bool {
        (self.patterns.is_empty() || self.patterns.iter().any(|p| glob_match(p, name)))
            && self
                .layers
                .as_ref()
                .map_or(true, |l| layer_of(name).is_some_and(|x| l.contains(x)))
    }
}

struct Sub {
    filter: SubFilter,
    sub: Subscriber,
}

/// Host connections attached at the same time, at most: host numbers fill
/// the 15 bits above a sequence id's 16 (see the module docs).
pub const MAX_HOSTS: usize = 1 << 15;

/// The subscribers, shared by the host connections, and the host numbers in use.
#[derive(Default)]
pub struct Hub {
    subs: Mutex<Vec<Sub>>,
    next_sub: AtomicU64,
    hosts: Mutex<BTreeSet<u16>>,
}

/// A host number held by an attached connection; given back when dropped.
#[derive(Debug)]
pub struct HostSlot<'a> {
    hub: &'a Hub,
    n: u16,
}

impl HostSlot<'_> {
    /// The number (`0..MAX_HOSTS`).
    pub fn number(&self) -> u16 {
        self.n
    }
}

impl Drop for HostSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut h) = self.hub.hosts.lock() {
            h.remove(&self.n);
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("subscribers", &self.len())
            .finish()
    }
}

impl Hub {
    /// Add a subscriber; it sees everything from now on. Returns its counters.
    pub fn subscribe(
        &self,
        filter: SubFilter,
        sink: Box<dyn SubscriberSink>,
    ) -> Arc<SubscriberStats> {
        let stats = Arc::new(SubscriberStats {
            id: self.next_sub.fetch_add(1, Ordering::Relaxed),
            ..SubscriberStats::default()
        });
        if let Ok(mut v) = self.subs.lock() {
            v.push(Sub {
                filter,
                sub: Subscriber::new(sink, stats.clone()),
            });
        }
        stats
    }

    /// Subscribers connected.
    pub fn len(&self) -> usize {
        self.subs.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// No subscriber.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Disconnect everyone (their streams end).
    pub fn close(&self) {
        if let Ok(mut v) = self.subs.lock() {
            v.clear();
        }
    }

    /// A host number for a connection that attached: the smallest one free,
    /// or `None` when [`MAX_HOSTS`] connections are attached.
    pub fn attach_host(&self) -> Option<HostSlot<'_>> {
        let mut used = self.hosts.lock().ok()?;
        let n = (0..MAX_HOSTS as u16).find(|n| !used.contains(n))?;
        used.insert(n);
        Some(HostSlot { hub: self, n })
    }

    /// Pass one pairing event of the host connection holding number `host` on.
    pub fn publish(&self, host: u16, ev: &Event<'_>) {
        let Ok(mut subs) = self.subs.lock() else {
            return;
        };
        if subs.is_empty() {
            return;
        }
        match ev {
            Event::Begin { id, seq } => {
                for s in subs.iter_mut() {
                    let rec = RequestRecord::notice(*id, slot(host, *seq), 1, 0, s.sub.drops());
                    s.sub.deliver(rec, false);
                }
            }
            Event::End(r) => {
                let generated = r.tokens.iter().filter(|t| !t.prompt).count() as u64;
                for s in subs.iter_mut() {
                    let rec =
                        RequestRecord::notice(r.id, slot(host, r.seq), 2, generated, s.sub.drops());
                    s.sub.deliver(rec, false);
                }
            }
            Event::Token { seq, row, .. } => {
                let rec = token(slot(host, *seq), row);
                for s in subs.iter_mut() {
                    s.sub.deliver(rec.clone(), false);
                }
            }
            Event::Frame {
                frame,
                lo,
                hi,
                rows,
                ..
            } => {
                let name = frame.name();
                for s in subs.iter_mut() {
                    if !s.sub.alive || !s.filter.wants(name) {
                        continue;
                    }
                    let keep: Vec<usize> = (0..hi - lo)
                        .filter(|&k| !s.filter.last || rows[k].flags & super::wire::ROW_OUTPUT != 0)
                        .collect();
                    if keep.is_empty() {
                        continue;
                    }
                    let dtype = s.filter.dtype.unwrap_or(frame.dtype());
                    let width = frame.header.width as usize;
                    let len = record::frame_len(keep.len(), width, dtype);
                    if !s.sub.take_or_drop(len) {
                        continue;
                    }
                    let mut buf = vec![0u8; len];
                    let header = FrameHeader {
                        n_rows: keep.len() as u32,
                        dtype: dtype as u32,
                        ..*frame.header
                    };
                    record::put(&mut buf, 0, &header);
                    let mut off = std::mem::size_of::<FrameHeader>();
                    for &k in &keep {
                        let r = RowMeta {
                            seq_id: slot(host, rows[k].seq_id),
                            ..rows[k]
                        };
                        record::put(&mut buf, off, &r);
                        off += std::mem::size_of::<RowMeta>();
                    }
                    let rb = width * dtype.size();
                    for &k in &keep {
                        let dst = &mut buf[off..off + rb];
                        convert(frame.row_bytes(lo + k), frame.dtype(), dst, dtype);
                        off += rb;
                    }
                    s.sub.deliver(buf, true);
                }
            }
        }
        subs.retain(|s| s.sub.alive);
    }
}

/// The `seq_id` observers see for sequence `seq` of the host connection
/// holding number `host` (below [`MAX_HOSTS`], so the id is not negative).
pub fn slot(host: u16, seq: i32) -> i32 {
    ((u32::from(host & 0x7fff) << 16) | (seq as u32 & 0xffff)) as i32
}

fn token(seq: i32, row: &TokenRow) -> Vec<u8> {
    let flags = if row.prompt { ROW_PROMPT } else { 0 };
    let h = TokenHeader::event(row.step, seq, row.pos, row.token, flags, f32::NAN, f32::NAN);
    let mut b = vec![0u8; std::mem::size_of::<TokenHeader>()];
    record::put(&mut b, 0, &h);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_numbers_are_reused_and_ids_stay_distinct_and_positive() {
        let hub = Hub::default();
        // Hosts that come and go one at a time keep number 0, however many.
        for _ in 0..70_000 {
            let h = hub.attach_host().unwrap();
            assert_eq!(h.number(), 0);
            assert_eq!(slot(h.number(), 3), 3);
        }
        // Attached at the same time: distinct numbers, the smallest free first.
        let a = hub.attach_host().unwrap();
        let b = hub.attach_host().unwrap();
        let c = hub.attach_host().unwrap();
        assert_eq!([a.number(), b.number(), c.number()], [0, 1, 2]);
        drop(b);
        let d = hub.attach_host().unwrap();
        assert_eq!(d.number(), 1);
        assert_ne!(slot(a.number(), 5), slot(d.number(), 5));
        drop((a, c, d));
        // The last number gives a positive id; beyond it hosts are refused.
        let all: Vec<_> = (0..MAX_HOSTS).map(|_| hub.attach_host().unwrap()).collect();
        assert_eq!(all.last().unwrap().number() as usize, MAX_HOSTS - 1);
        assert!(hub.attach_host().is_none());
        let top = slot(all.last().unwrap().number(), 0xffff);
        assert!(top > 0 && top == i32::MAX, "{top}");
        drop(all);
        assert_eq!(hub.attach_host().unwrap().number(), 0);
    }
}
