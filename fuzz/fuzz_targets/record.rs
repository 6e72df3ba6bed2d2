//! The ring record parser consumers use, on arbitrary (8-byte aligned) bytes:
//! never panics, and every view it returns lies inside the buffer.
#![no_main]

use latent_tap_fuzz::record::Record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Records sit 8-byte aligned in the ring.
    let mut words = vec![0u64; data.len().div_ceil(8)];
    // SAFETY: words owns at least data.len() writable bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, data.len()) };
    buf.copy_from_slice(data);
    let range = buf.as_ptr_range();
    match Record::parse(buf) {
        Ok(Record::Frame(f)) => {
            let _ = (f.name(), f.dtype(), f.as_f32());
            for i in 0..f.rows.len() {
                let r = f.row_bytes(i);
                assert!(range.start <= r.as_ptr() && r.as_ptr_range().end <= range.end);
            }
        }
        Ok(Record::Token(t)) => {
            let _ = t.is_prompt();
            assert!(t.piece.as_ptr_range().end <= range.end);
        }
        Ok(Record::End(_)) | Err(_) => {}
    }
});
