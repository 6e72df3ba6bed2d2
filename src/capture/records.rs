//! Token and end records: written by the thread driving generation, outside
//! the graph compute, into the same ring as the frames.

use std::time::Duration;

use super::{ring_error, Mode, Policy, Tap};
use crate::error::{Error, ErrorKind, Result};
use crate::record::{self, EndRecord, TokenHeader, TopEntry};
use crate::ring::WriteGrant;

impl Tap {
    /// Wait for ring space (token and end records are never dropped).
    fn write_record(&mut self, len: usize) -> Result<WriteGrant<'_>> {
        let Mode::Capture(a) = &mut self.mode else {
            return Err(Error::new(ErrorKind::Internal, "tap is not armed"));
        };
        let timeout = match a.policy {
            Policy::Block { timeout } => timeout,
            Policy::DropNewest => Duration::from_secs(30),
        };
        a.producer.write_blocking(len, timeout).map_err(ring_error)
    }

    /// Append a token event to the stream.
    pub(crate) fn push_token(
        &mut self,
        h: TokenHeader,
        top: &[TopEntry],
        piece: &[u8],
    ) -> Result<()> {
        let len = record::token_len(top.len(), piece.len());
        let mut g = self.write_record(len)?;
        let h = TokenHeader {
            kind: record::kind::TOKEN,
            header_size: std::mem::size_of::<TokenHeader>() as u32,
            n_top: top.len() as u32,
            piece_len: piece.len() as u32,
            ..h
        };
        record::put(&mut g, 0, &h);
        let mut off = std::mem::size_of::<TokenHeader>();
        for t in top {
            record::put(&mut g, off, t);
            off += std::mem::size_of::<TopEntry>();
        }
        g[off..off + piece.len()].copy_from_slice(piece);
        g.commit();
        Ok(())
    }

    /// Close the stream with totals.
    pub(crate) fn push_end(&mut self) -> Result<()> {
        let end = EndRecord {
            kind: record::kind::END,
            header_size: std::mem::size_of::<EndRecord>() as u32,
            frames: self.counters.frames,
            drops: self.counters.drops,
        };
        let mut g = self.write_record(std::mem::size_of::<EndRecord>())?;
        record::put(&mut g, 0, &end);
        g.commit();
        Ok(())
    }
}
