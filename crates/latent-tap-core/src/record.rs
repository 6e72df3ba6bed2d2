//! The wire format of ring records: fixed `#[repr(C)]` headers (also the C ABI's
//! view), followed by variable parts. Every record is 8-byte aligned in the ring,
//! and every header's size is a multiple of 8, so payloads are aligned for f32.

use crate::error::{Error, ErrorKind, Result};

/// Record kind tags (first u32 of every record): the one registry of kinds,
/// for every stream latent-tap writes (the ring, `serve`'s binary stream and
/// subscriptions, the attach wire). A kind means the same thing everywhere;
/// a new record gets the next free number here.
pub mod kind {
    /// A latent frame ([`super::FrameHeader`]).
    pub const FRAME: u32 = 1;
    /// A token event ([`super::TokenHeader`]).
    pub const TOKEN: u32 = 2;
    /// End of stream ([`super::EndRecord`]).
    pub const END: u32 = 3;
    /// A request started or ended on a subscription (`serve` and
    /// `listen --serve`; the scheduler's `RequestRecord`).
    pub const REQUEST: u32 = 4;
    /// A JSON document (`serve`'s binary completions end with one; see
    /// docs/PROTOCOL.md).
    pub const JSON: u32 = 5;
    /// The host removed positions of a sequence (attach wire:
    /// [`crate::attach::wire::SeqRm`]).
    pub const SEQ_RM: u32 = 6;
    /// The logit lens of one step's rows (`serve`'s binary completions with a
    /// `lens` request): the JSON record's layout, the `lens` object as payload
    /// (docs/PROTOCOL.md).
    pub const LENS: u32 = 7;
}

/// Element type of a frame's payload.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE f32.
    F32 = 0,
    /// IEEE half.
    F16 = 1,
    /// bfloat16.
    BF16 = 2,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    /// Parse `f32`, `f16`, `bf16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Dtype::F32),
            "f16" => Ok(Dtype::F16),
            "bf16" => Ok(Dtype::BF16),
            _ => Err(Error::invalid(format!(
                "unknown dtype '{s}': use f32, f16 or bf16"
            ))),
        }
    }

    /// Lowercase name, as requests, settings and hellos spell it.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
        }
    }

    /// Name as used in safetensors headers.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        }
    }

    /// The dtype with wire code `v` (0 F32, 1 F16, 2 BF16).
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Dtype::F32),
            1 => Some(Dtype::F16),
            2 => Some(Dtype::BF16),
            _ => None,
        }
    }
}

/// Row flag: the row's token came from the prompt.
pub const ROW_PROMPT: u32 = 1;

/// Which token a frame row belongs to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RowMeta {
    /// Sequence id.
    pub seq_id: i32,
    /// Position in the sequence.
    pub pos: i32,
    /// Token id at that position.
    pub token: i32,
    /// `LT_ROW_PROMPT` when the token is part of the prompt, else 0.
    pub flags: u32,
}

/// Fixed header of a latent frame. Followed by `n_rows` row descriptors
/// (`lt_row_meta`) and then `n_rows * width` elements of `dtype`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FrameHeader {
    /// Record kind: 1 (`LT_EVENT_FRAME`).
    pub kind: u32,
    /// `sizeof(lt_frame_header)`, so readers can skip fields added later.
    pub header_size: u32,
    /// Frame sequence number, +1 per frame produced; gaps mean drops. Starts at
    /// 0 with each generation of a session (mode 1), or when the tap is created
    /// (mode 2).
    pub seq: u64,
    /// Generation step: 0 for the prompt, k for the k-th generated token's decode.
    pub step: u32,
    /// Graph compute (ubatch) within the step.
    pub ubatch: u32,
    /// Index into the capture's selected-tensor list.
    pub tensor_index: u32,
    /// Layer parsed from the name, or -1.
    pub layer: i32,
    /// Payload element type: `LT_DTYPE_F32`, `LT_DTYPE_F16` or `LT_DTYPE_BF16`.
    pub dtype: u32,
    /// Number of rows (tokens) in this frame.
    pub n_rows: u32,
    /// Elements per row.
    pub width: u64,
    /// Source tensor shape in ggml order (ne0 fastest).
    pub ne: [i64; 4],
    /// Tensor display name, NUL-terminated (at most 63 bytes) and NUL-padded.
    pub name: [u8; 64],
}

/// Fixed header of a token event. Followed by `n_top` alternatives
/// (`lt_top_entry`) and then `piece_len` bytes of the token's text.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TokenHeader {
    /// Record kind: 2 (`LT_EVENT_TOKEN`).
    pub kind: u32,
    /// `sizeof(lt_token_header)`, so readers can skip fields added later.
    pub header_size: u32,
    /// Generation step that sampled it (prompt tokens: 0).
    pub step: u32,
    /// Sequence id.
    pub seq_id: i32,
    /// Position the token takes in its sequence.
    pub pos: i32,
    /// Token id.
    pub token: i32,
    /// `LT_ROW_PROMPT` for prompt tokens, else 0.
    pub flags: u32,
    /// Number of top-k entries that follow.
    pub n_top: u32,
    /// Log-probability of this token under the full softmax (NaN for prompt tokens).
    pub logprob: f32,
    /// Entropy (nats) of the distribution it was drawn from (NaN for prompt tokens).
    pub entropy: f32,
    /// Length of the UTF-8 (possibly partial) text piece that follows.
    pub piece_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

impl TokenHeader {
    /// A token event header; `kind`, sizes and counts are filled in when it is written.
    pub fn event(
        step: u32,
        seq_id: i32,
        pos: i32,
        token: i32,
        flags: u32,
        logprob: f32,
        entropy: f32,
    ) -> Self {
        Self {
            kind: kind::TOKEN,
            header_size: std::mem::size_of::<Self>() as u32,
            step,
            seq_id,
            pos,
            token,
            flags,
            n_top: 0,
            logprob,
            entropy,
            piece_len: 0,
            reserved: 0,
        }
    }
}

/// One `(token id, logprob)` of a top-k list.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopEntry {
    /// Token id.
    pub id: i32,
    /// Its log-probability.
    pub logprob: f32,
}

/// Last record of a stream.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EndRecord {
    /// [`kind::END`].
    pub kind: u32,
    /// `size_of::<EndRecord>()`.
    pub header_size: u32,
    /// Frames produced (including dropped ones).
    pub frames: u64,
    /// Frames dropped by a `drop-newest` ring.
    pub drops: u64,
}

const _: () = assert!(std::mem::size_of::<FrameHeader>() % 8 == 0);
const _: () = assert!(std::mem::size_of::<TokenHeader>() % 8 == 0);
const _: () = assert!(std::mem::size_of::<EndRecord>() % 8 == 0);

/// Bytes a frame record needs.
pub fn frame_len(n_rows: usize, width: usize, dtype: Dtype) -> usize {
    // Saturating: a size that does not fit in usize is refused by the ring anyway.
    std::mem::size_of::<FrameHeader>()
        .saturating_add(n_rows.saturating_mul(std::mem::size_of::<RowMeta>()))
        .saturating_add(n_rows.saturating_mul(width).saturating_mul(dtype.size()))
}

/// Bytes a token record needs.
pub fn token_len(n_top: usize, piece_len: usize) -> usize {
    std::mem::size_of::<TokenHeader>()
        .saturating_add(n_top.saturating_mul(std::mem::size_of::<TopEntry>()))
        .saturating_add(piece_len)
}

/// Copy a plain-old-data value into `buf` at `off`.
pub fn put<T: Copy>(buf: &mut [u8], off: usize, v: &T) {
    let n = std::mem::size_of::<T>();
    // SAFETY: T is a repr(C) POD type without padding-sensitive invariants; we view it
    // as n initialized bytes for the duration of the copy.
    let src = unsafe { std::slice::from_raw_parts(v as *const T as *const u8, n) };
    buf[off..off + n].copy_from_slice(src);
}

/// A parsed record borrowing the ring's bytes (zero-copy).
#[derive(Debug)]
pub enum Record<'a> {
    /// A latent frame.
    Frame(FrameView<'a>),
    /// A token event.
    Token(TokenView<'a>),
    /// End of stream.
    End(EndRecord),
}

/// A latent frame viewed in place.
#[derive(Debug, Clone, Copy)]
pub struct FrameView<'a> {
    /// The header.
    pub header: &'a FrameHeader,
    /// One entry per row.
    pub rows: &'a [RowMeta],
    /// Raw payload bytes, `n_rows * width * dtype.size()`.
    pub data: &'a [u8],
}

impl<'a> FrameView<'a> {
    /// Tensor name.
    pub fn name(&self) -> &'a str {
        let n = &self.header.name;
        let end = n.iter().position(|&b| b == 0).unwrap_or(n.len());
        std::str::from_utf8(&n[..end]).unwrap_or("")
    }

    /// Payload element type.
    pub fn dtype(&self) -> Dtype {
        Dtype::from_u32(self.header.dtype).unwrap_or(Dtype::F32)
    }

    /// Payload as f32, when the dtype is f32.
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        if self.dtype() != Dtype::F32 {
            return None;
        }
        // SAFETY: any bit pattern is a valid f32; align_to only yields the aligned middle.
        let (pre, mid, post) = unsafe { self.data.align_to::<f32>() };
        (pre.is_empty() && post.is_empty()).then_some(mid)
    }

    /// Row `i`'s payload bytes.
    pub fn row_bytes(&self, i: usize) -> &'a [u8] {
        let w = self.header.width as usize * self.dtype().size();
        &self.data[i * w..(i + 1) * w]
    }
}

/// A token event viewed in place.
#[derive(Debug, Clone, Copy)]
pub struct TokenView<'a> {
    /// The header.
    pub header: &'a TokenHeader,
    /// Top-k alternatives, most likely first.
    pub top: &'a [TopEntry],
    /// Raw text bytes of the token.
    pub piece: &'a [u8],
}

impl TokenView<'_> {
    /// True for prompt tokens.
    pub fn is_prompt(&self) -> bool {
        self.header.flags & ROW_PROMPT != 0
    }
}

fn corrupt(what: &str) -> Error {
    Error::new(ErrorKind::Internal, format!("corrupt ring record: {what}"))
}

/// View `n` values of `T` at `off` in `buf`, checking bounds and alignment.
fn view<T>(buf: &[u8], off: usize, n: usize) -> Result<&[T]> {
    let len = n
        .checked_mul(std::mem::size_of::<T>())
        .ok_or_else(|| corrupt("length overflow"))?;
    let bytes = buf
        .get(
            off..off
                .checked_add(len)
                .ok_or_else(|| corrupt("offset overflow"))?,
        )
        .ok_or_else(|| corrupt("truncated"))?;
    if (bytes.as_ptr() as usize) % std::mem::align_of::<T>() != 0 {
        return Err(corrupt("misaligned"));
    }
    // SAFETY: bounds and alignment checked above; T is only instantiated with repr(C)
    // POD types for which every bit pattern is valid.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) })
}

impl<'a> Record<'a> {
    /// Parse one record from its bytes.
    pub fn parse(buf: &'a [u8]) -> Result<Self> {
        let k = view::<u32>(buf, 0, 1)?[0];
        match k {
            kind::FRAME => {
                let header = &view::<FrameHeader>(buf, 0, 1)?[0];
                let off = header.header_size as usize;
                if off < std::mem::size_of::<FrameHeader>() {
                    return Err(corrupt("header size"));
                }
                let n = header.n_rows as usize;
                let rows = view::<RowMeta>(buf, off, n)?;
                let dt = Dtype::from_u32(header.dtype).ok_or_else(|| corrupt("dtype"))?;
                let start = off + std::mem::size_of_val(rows);
                let len = usize::try_from(header.width)
                    .ok()
                    .and_then(|w| w.checked_mul(n)?.checked_mul(dt.size()))
                    .ok_or_else(|| corrupt("payload length overflow"))?;
                let data = start
                    .checked_add(len)
                    .and_then(|end| buf.get(start..end))
                    .ok_or_else(|| corrupt("payload"))?;
                Ok(Record::Frame(FrameView { header, rows, data }))
            }
            kind::TOKEN => {
                let header = &view::<TokenHeader>(buf, 0, 1)?[0];
                let off = header.header_size as usize;
                if off < std::mem::size_of::<TokenHeader>() {
                    return Err(corrupt("header size"));
                }
                let top = view::<TopEntry>(buf, off, header.n_top as usize)?;
                let start = off + std::mem::size_of_val(top);
                let piece = start
                    .checked_add(header.piece_len as usize)
                    .and_then(|end| buf.get(start..end))
                    .ok_or_else(|| corrupt("piece"))?;
                Ok(Record::Token(TokenView { header, top, piece }))
            }
            kind::END => Ok(Record::End(view::<EndRecord>(buf, 0, 1)?[0])),
            _ => Err(corrupt("unknown kind")),
        }
    }
}

/// A request notice (kind [`kind::REQUEST`], see docs/PROTOCOL.md): sent to
/// subscribers when a request takes a slot and when it ends.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestRecord {
    /// [`kind::REQUEST`].
    pub kind: u32,
    /// `size_of::<RequestRecord>()` (40).
    pub header_size: u32,
    /// Request id.
    pub request_id: u64,
    /// Slot (the `seq_id` of its rows and tokens).
    pub seq_id: i32,
    /// [`RequestRecord::BEGIN`] or [`RequestRecord::END`].
    pub event: u32,
    /// Frames this subscriber has dropped so far (all requests).
    pub dropped: u64,
    /// Prompt tokens (begin) or tokens generated (end).
    pub n_tokens: u64,
}

const _: () = assert!(std::mem::size_of::<RequestRecord>() == 40);

impl RequestRecord {
    /// [`RequestRecord::event`]: the request took its slot.
    pub const BEGIN: u32 = 1;
    /// [`RequestRecord::event`]: the request ended.
    pub const END: u32 = 2;

    /// The encoded notice that request `request_id` in slot `seq_id` begins or
    /// ends (`event`), with its token count and the subscriber's drops so far.
    pub fn notice(
        request_id: u64,
        seq_id: i32,
        event: u32,
        n_tokens: u64,
        dropped: u64,
    ) -> Vec<u8> {
        let r = RequestRecord {
            kind: kind::REQUEST,
            header_size: std::mem::size_of::<Self>() as u32,
            request_id,
            seq_id,
            event,
            dropped,
            n_tokens,
        };
        let mut b = vec![0u8; std::mem::size_of::<Self>()];
        put(&mut b, 0, &r);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An 8-byte aligned buffer holding `header` followed by `extra` zero bytes.
    fn aligned<T: Copy>(header: &T, extra: usize) -> Vec<u64> {
        let n = std::mem::size_of::<T>() + extra;
        let mut words = vec![0u64; n.div_ceil(8)];
        // SAFETY: the Vec owns words.len() * 8 writable bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8)
        };
        put(bytes, 0, header);
        words
    }

    fn bytes(words: &[u64]) -> &[u8] {
        // SAFETY: viewing initialised u64s as bytes.
        unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 8) }
    }

    fn frame(n_rows: u32, width: u64, header_size: u32) -> FrameHeader {
        FrameHeader {
            kind: kind::FRAME,
            header_size,
            seq: 0,
            step: 0,
            ubatch: 0,
            tensor_index: 0,
            layer: 0,
            dtype: Dtype::F32 as u32,
            n_rows,
            width,
            ne: [width as i64, n_rows as i64, 1, 1],
            name: [0; 64],
        }
    }

    #[test]
    fn a_well_formed_frame_parses() {
        let hs = std::mem::size_of::<FrameHeader>() as u32;
        let w = aligned(&frame(2, 3, hs), 2 * 16 + 2 * 3 * 4);
        let Record::Frame(f) = Record::parse(bytes(&w)).unwrap() else {
            panic!("not a frame")
        };
        assert_eq!((f.rows.len(), f.data.len()), (2, 24));
        assert_eq!(f.as_f32().unwrap().len(), 6);
    }

    // Lengths from a corrupt header fail cleanly: `n_rows * width` used to
    // overflow (a panic in debug builds, a wrong payload length in release).
    // The `record` fuzz target finds that in the old parser within seconds.
    #[test]
    fn corrupt_lengths_fail_without_panicking() {
        let hs = std::mem::size_of::<FrameHeader>() as u32;
        for (n_rows, width, header_size) in [
            (2, u64::MAX, hs),
            (u32::MAX, u64::MAX / 2, hs),
            (1, 1 << 62, hs),
            (0, 0, 0),
            (1, 1, u32::MAX),
        ] {
            let w = aligned(&frame(n_rows, width, header_size), 64);
            assert!(
                Record::parse(bytes(&w)).is_err(),
                "{n_rows} {width} {header_size}"
            );
        }
        let mut t = TokenHeader::event(0, 0, 0, 0, 0, 0.0, 0.0);
        t.piece_len = u32::MAX;
        t.n_top = u32::MAX;
        assert!(Record::parse(bytes(&aligned(&t, 8))).is_err());
        assert!(Record::parse(&[]).is_err());
    }
}
