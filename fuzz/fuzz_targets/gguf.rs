//! The GGUF pre-check on arbitrary bytes: never panics, never allocates more
//! than the input holds (libFuzzer's -rss_limit_mb catches that).
#![no_main]

use latent_tap_fuzz::gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = gguf::check_bytes(data) {
        // Whatever passed is internally consistent.
        assert!(g.kv.len() as u64 <= data.len() as u64 / 13);
        assert!(g.tensors.iter().all(|t| (1..=4).contains(&t.ne.len())));
    }
});
