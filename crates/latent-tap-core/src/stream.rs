//! Consumer side: an ordered stream of token events and latent frames read
//! zero-copy out of the ring.

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::record::Record;
use crate::ring::{Consumer, ReadGrant, RingStats};

/// The reading end of a capture: records in decode order.
#[derive(Debug)]
pub struct Stream {
    consumer: Consumer,
    ended: bool,
}

/// One record, borrowed from the ring until dropped.
#[derive(Debug)]
pub struct Item<'a> {
    grant: ReadGrant<'a>,
}

impl Item<'_> {
    /// Parse the record (zero-copy; cheap, may be called repeatedly).
    pub fn record(&self) -> Result<Record<'_>> {
        Record::parse(&self.grant)
    }
}

impl Stream {
    /// A stream reading records from `consumer`.
    pub fn new(consumer: Consumer) -> Self {
        Self {
            consumer,
            ended: false,
        }
    }

    /// The ring's producer-side counters (records, bytes, drops) as of now.
    pub fn ring_stats(&self) -> RingStats {
        self.consumer.stats()
    }

    /// True when nothing is waiting to be read right now.
    pub fn is_empty(&self) -> bool {
        self.consumer.used_bytes() == 0
    }

    /// True once the end record was read, or the producer is gone and the ring is empty.
    pub fn is_finished(&self) -> bool {
        self.ended || (self.consumer.is_abandoned() && self.consumer.used_bytes() == 0)
    }

    /// Next record, waiting up to `timeout`. `Ok(None)` on timeout or end of stream
    /// (tell them apart with [`Stream::is_finished`]).
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Item<'_>>> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if self.consumer.used_bytes() > 0 {
                break;
            }
            // An end record does not stop reading: a session may run again on this stream.
            if self.consumer.is_abandoned() || Instant::now() >= deadline {
                return Ok(None);
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 128 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        let Some(grant) = self.consumer.try_read() else {
            return Ok(None);
        };
        let item = Item { grant };
        if matches!(item.record()?, Record::End(_)) {
            self.ended = true;
        }
        Ok(Some(item))
    }
}
