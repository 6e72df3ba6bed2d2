//! What a tapped host writes into its shared ring, as `latent-tap listen`
//! parses and pairs it: frames with arbitrary row labels (sequences, positions
//! going back and forth, output flags, widths changing), sequence removals and
//! raw garbage records. Pairing must never panic, and every request it ends
//! holds its rows in strictly increasing positions, one sequence per request.
#![no_main]

use latent_tap_fuzz::attach::pair::{Event, Pairer};
use latent_tap_fuzz::attach::wire::{SeqRm, KIND_SEQ_RM};
use latent_tap_fuzz::record::{frame_len, kind, Dtype, FrameHeader, Record, RowMeta};
use libfuzzer_sys::fuzz_target;

/// Bytes of the input, read in order (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn small(&mut self, n: u8) -> i32 {
        i32::from(self.byte() % n)
    }
}

/// An 8-byte aligned copy of `bytes`, as records sit in the ring.
fn aligned(bytes: &[u8]) -> Vec<u64> {
    let mut w = vec![0u64; bytes.len().div_ceil(8).max(1)];
    // SAFETY: `w` owns at least `bytes.len()` bytes.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut u8, bytes.len()) }
        .copy_from_slice(bytes);
    w
}

/// Copy a `repr(C)` header into `buf` at `off`.
fn put<T: Copy>(buf: &mut [u8], off: usize, v: &T) {
    let n = std::mem::size_of::<T>();
    // SAFETY: `T` is a plain `repr(C)` record header, viewed as its bytes.
    let src = unsafe { std::slice::from_raw_parts(v as *const T as *const u8, n) };
    buf[off..off + n].copy_from_slice(src);
}

fn check(ev: Event<'_>) {
    if let Event::End(req) = ev {
        assert!(
            req.tokens.windows(2).all(|w| w[0].pos < w[1].pos),
            "{req:?}"
        );
    }
}

fn dispatch(buf: &[u8], p: &mut Pairer) {
    match buf
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    {
        Some(kind::FRAME) => {
            if let Ok(Record::Frame(f)) = Record::parse(buf) {
                p.frame(&f, &mut check);
            }
        }
        Some(KIND_SEQ_RM) => {
            if let Some(r) = SeqRm::parse(buf) {
                p.seq_rm(&r, &mut check);
            }
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mut next = 0u64;
    let mut p = Pairer::new(Box::new(move || {
        next += 1;
        next
    }));
    let names = ["l_out-0", "l_out-1", "attn_out-0"];
    let mut step = 0u32;
    while !inp.0.is_empty() {
        match inp.byte() % 4 {
            0 => {
                let r = SeqRm::new(inp.small(4) - 1, inp.small(40) - 1, inp.small(40) - 1, step);
                let w = aligned(&r.to_bytes());
                // SAFETY: viewing initialised words as bytes.
                dispatch(
                    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, 24) },
                    &mut p,
                );
            }
            1 | 2 => {
                step += inp.small(2) as u32;
                let n_rows = inp.small(6) as usize;
                let width = 1 + inp.small(3) as usize;
                let len = frame_len(n_rows, width, Dtype::F32);
                let mut bytes = vec![0u8; len];
                let mut name = [0u8; 64];
                let nm = names[inp.small(3) as usize].as_bytes();
                name[..nm.len()].copy_from_slice(nm);
                let h = FrameHeader {
                    kind: kind::FRAME,
                    header_size: std::mem::size_of::<FrameHeader>() as u32,
                    seq: u64::from(step),
                    step,
                    ubatch: 0,
                    tensor_index: 0,
                    layer: 0,
                    dtype: Dtype::F32 as u32,
                    n_rows: n_rows as u32,
                    width: width as u64,
                    ne: [width as i64, n_rows as i64, 1, 1],
                    name,
                };
                put(&mut bytes, 0, &h);
                for r in 0..n_rows {
                    let m = RowMeta {
                        seq_id: inp.small(3),
                        pos: inp.small(48) - 2,
                        token: inp.small(100),
                        flags: u32::from(inp.byte() % 4),
                    };
                    put(&mut bytes, std::mem::size_of::<FrameHeader>() + r * 16, &m);
                }
                let w = aligned(&bytes);
                // SAFETY: viewing initialised words as bytes.
                dispatch(
                    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, len) },
                    &mut p,
                );
            }
            _ => {
                let n = inp.small(200) as usize;
                let raw: Vec<u8> = (0..n).map(|_| inp.byte()).collect();
                let w = aligned(&raw);
                // SAFETY: viewing initialised words as bytes.
                dispatch(
                    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, n) },
                    &mut p,
                );
            }
        }
    }
    p.finish(&mut check);
});
