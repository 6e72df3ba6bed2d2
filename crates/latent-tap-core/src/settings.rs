//! One source for the bounds of every setting, shared by the CLI, the C API
//! and the HTTP server: the limits as named constants and the checks on plain
//! values, with their messages. Each options type has a `validate()` next to
//! it (`ContextOptions`, `SamplingOptions`, `ModelOptions` in `engine`,
//! `GenerateOptions` and `CaptureSpec` in `session`, `DatasetOptions` in
//! `dataset`) that calls these checks, and the library calls `validate()`
//! itself, so every front end gets the same rules and the same messages.
//! Messages name the *setting* (`threads`, `temperature`…), never a
//! command-line flag; front ends may add their own advice.

use std::time::Duration;

use crate::error::{Error, Result};

/// Hard ceiling on compute threads, whatever the machine.
pub const MAX_THREADS: i32 = 1024;
/// Threads allowed per available core: more only makes llama.cpp's spinning
/// thread pool slower (and tens of thousands abort inside llama.cpp).
pub const THREADS_PER_CORE: i32 = 4;
/// Largest context, in tokens (2^24). Beyond it llama.cpp spends minutes trying
/// to allocate the KV cache instead of failing.
pub const MAX_CTX: u32 = 1 << 24;
/// Most parallel sequences a context holds (llama.cpp's `LLAMA_MAX_SEQ`).
pub const MAX_SEQ: u32 = 256;
/// Largest physical batch (the tap numbers rows of a ubatch in 16 bits).
pub const MAX_UBATCH: u32 = u16::MAX as u32;
/// Longest a blocked producer may wait for ring space.
pub const MAX_BLOCK_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Smallest non-zero sampling temperature; below it logits / T overflow and
/// sampling degenerates. 0 means greedy.
pub const MIN_TEMPERATURE: f32 = 1e-3;
/// Most alternatives reported per generated token (`top_k` of a report).
pub const MAX_REPORT_TOP_K: usize = 1 << 20;
/// Most alternatives the logit lens reports per (layer, row).
pub const MAX_LENS_TOP_K: usize = 20;
/// Alternatives the logit lens reports when none is asked for.
pub const DEFAULT_LENS_TOP_K: usize = 5;

/// Ring capacity of a capture when the caller gives none and nothing sizes it
/// from the selection (64 MiB).
pub const DEFAULT_RING_BYTES: usize = 64 << 20;
/// Frames of the widest selected tensor that a dataset capture's ring holds when
/// no capacity is given: the ring needs 2 for any frame to fit, the rest absorbs
/// the router's jitter.
pub const DATASET_RING_FRAMES: usize = 8;
/// Smallest ring a dataset capture sizes for itself (4 MiB).
pub const MIN_DATASET_RING_BYTES: usize = 4 << 20;

/// How long `serve` waits for a request body to arrive in full, by default.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `serve` may be told to wait for a request body.
pub const MAX_BODY_TIMEOUT: Duration = Duration::from_secs(3600);

/// Latents one `serve` request may hold, by default (MiB; `--max-latents-mb`).
pub const DEFAULT_LATENTS_BUDGET_MB: usize = 256;
/// Largest `--max-latents-mb` (64 GiB).
pub const MAX_LATENTS_BUDGET_MB: usize = 64 << 10;

/// A request's latents budget from MiB (as a user types it): 1..=[`MAX_LATENTS_BUDGET_MB`].
pub fn latents_budget_from_mb(mb: usize) -> Result<usize> {
    if !(1..=MAX_LATENTS_BUDGET_MB).contains(&mb) {
        return Err(Error::invalid(format!(
            "latents budget {mb} MiB is out of range 1..={MAX_LATENTS_BUDGET_MB} MiB"
        )));
    }
    Ok(mb << 20)
}

/// Default size cap of a dataset shard (64 MiB).
pub const DEFAULT_SHARD_BYTES: usize = 64 << 20;
/// Smallest dataset shard cap (4 KiB).
pub const MIN_SHARD_BYTES: usize = 4 << 10;
/// Largest dataset shard cap (64 GiB).
pub const MAX_SHARD_BYTES: usize = 64 << 30;
/// Most blocks a prompt file may be split into across machines.
pub const MAX_SHARD_COUNT: usize = 1 << 20;

/// Threads used when none are given: the cores available to this process.
pub fn default_threads() -> i32 {
    std::thread::available_parallelism().map_or(4, |n| n.get() as i32)
}

/// Default compute threads of `capture` (with and without `--prompts`): every
/// core but one, at least 1. llama.cpp's threads meet at a spinning barrier
/// after each op, so one thread that loses its core to another process stalls
/// all of them: on 2 cores with one busy, 2 threads decoded 10 to 20 times
/// slower than 1 (README, "Threads on a busy machine").
pub fn spare_core_threads() -> i32 {
    (default_threads() - 1).max(1)
}

/// Largest thread count accepted on this machine: `THREADS_PER_CORE` × cores,
/// at most [`MAX_THREADS`].
pub fn max_threads() -> i32 {
    default_threads()
        .saturating_mul(THREADS_PER_CORE)
        .clamp(1, MAX_THREADS)
}

/// Threads: `1..=max_threads()`.
pub fn check_threads(t: i32) -> Result<()> {
    let max = max_threads();
    if !(1..=max).contains(&t) {
        return Err(Error::invalid(format!(
            "threads {t} is out of range 1..={max} ({THREADS_PER_CORE} per core, at most {MAX_THREADS})"
        )));
    }
    Ok(())
}

/// CPU thread-pool polling level used unless one is given (llama.cpp's `--poll`
/// default): the CLI's `--poll` and the Python package's runs.
pub const DEFAULT_POLL: u32 = 50;

/// Largest CPU thread-pool polling level (llama.cpp's `--poll`).
pub const MAX_POLL: u32 = 100;

/// CPU thread-pool polling level: `0..=MAX_POLL`. Returns it.
pub fn check_poll(poll: u32) -> Result<u32> {
    if poll > MAX_POLL {
        return Err(Error::invalid(format!(
            "--poll must be between 0 and {MAX_POLL}, not {poll}"
        )));
    }
    Ok(poll)
}

/// Layers offloaded to a GPU: -1 (all) or at least 0.
pub fn check_gpu_layers(n: i32) -> Result<()> {
    if n < -1 {
        return Err(Error::invalid(format!(
            "gpu layers {n} is out of range: -1 (all) or 0 and up"
        )));
    }
    Ok(())
}

/// Context sizes: all positive, `n_ctx <= MAX_CTX`, `n_ubatch <= n_batch`,
/// `n_ubatch <= MAX_UBATCH`, `n_seq_max <= MAX_SEQ`.
pub fn check_context(n_ctx: u32, n_batch: u32, n_ubatch: u32, n_seq_max: u32) -> Result<()> {
    for (name, v) in [
        ("context size", n_ctx),
        ("batch size", n_batch),
        ("ubatch size", n_ubatch),
        ("sequence count", n_seq_max),
    ] {
        if v == 0 {
            return Err(Error::invalid(format!("{name} must be at least 1")));
        }
    }
    if n_ctx > MAX_CTX {
        return Err(Error::invalid(format!(
            "context size {n_ctx} is out of range 1..={MAX_CTX}"
        )));
    }
    if n_ubatch > n_batch {
        return Err(Error::invalid(format!(
            "ubatch size {n_ubatch} must not exceed batch size {n_batch}"
        )));
    }
    if n_ubatch > MAX_UBATCH {
        return Err(Error::invalid(format!(
            "ubatch size {n_ubatch} is out of range 1..={MAX_UBATCH}"
        )));
    }
    check_seq_count(n_seq_max as usize)
}

/// Sequences decoded together (prompts of one batch, slots of a server):
/// `1..=MAX_SEQ`.
pub fn check_seq_count(n: usize) -> Result<()> {
    if n > MAX_SEQ as usize {
        return Err(Error::invalid(format!(
            "{n} sequences is more than a context holds ({MAX_SEQ})"
        )));
    }
    Ok(())
}

/// Sampling: temperature finite and 0 (greedy) or at least
/// [`MIN_TEMPERATURE`]; top-p and min-p in `0..=1`; sampling top-k at least 0.
pub fn check_sampling(temperature: f32, top_p: f32, top_k: i32, min_p: f32) -> Result<()> {
    let t = temperature;
    if !t.is_finite() || t < 0.0 || (t > 0.0 && t < MIN_TEMPERATURE) {
        return Err(Error::invalid(format!(
            "temperature {t} is out of range: 0 (greedy) or a finite value from {MIN_TEMPERATURE}"
        )));
    }
    if !(0.0..=1.0).contains(&top_p) {
        return Err(Error::invalid(format!(
            "top-p {top_p} is out of range 0..=1"
        )));
    }
    if top_k < 0 {
        return Err(Error::invalid(format!(
            "sampling top-k {top_k} is negative (0: off)"
        )));
    }
    if !(0.0..=1.0).contains(&min_p) {
        return Err(Error::invalid(format!(
            "min-p {min_p} is out of range 0..=1"
        )));
    }
    Ok(())
}

/// Alternatives reported per generated token: `0..=MAX_REPORT_TOP_K`.
pub fn check_report_top_k(k: usize) -> Result<()> {
    if k > MAX_REPORT_TOP_K {
        return Err(Error::invalid(format!(
            "report top-k {k} is out of range 0..={MAX_REPORT_TOP_K}"
        )));
    }
    Ok(())
}

/// Alternatives the logit lens reports per cell: `1..=MAX_LENS_TOP_K`.
pub fn check_lens_top_k(k: usize) -> Result<()> {
    if !(1..=MAX_LENS_TOP_K).contains(&k) {
        return Err(Error::invalid(format!(
            "lens top_k {k} is out of range 1..={MAX_LENS_TOP_K}"
        )));
    }
    Ok(())
}

/// Tensor patterns: exactly empty (tokens only) or no blank entry.
pub fn check_patterns(patterns: &[String]) -> Result<()> {
    let tokens_only = patterns.iter().all(|p| p.is_empty());
    if !tokens_only {
        for p in patterns {
            if p.split(',').any(|q| q.trim().is_empty()) {
                return Err(Error::invalid(format!(
                    "tensor patterns '{p}' hold a blank entry (use an empty string to capture tokens only)"
                )));
            }
        }
    }
    Ok(())
}

/// A ring of at least one byte.
pub fn check_ring_bytes(bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Err(Error::invalid("ring capacity must be at least 1 byte"));
    }
    Ok(())
}

/// A blocking timeout of at most [`MAX_BLOCK_TIMEOUT`].
pub fn check_block_timeout(timeout: Duration) -> Result<()> {
    if timeout > MAX_BLOCK_TIMEOUT {
        return Err(Error::invalid(format!(
            "block timeout {} s is above the maximum of {} s",
            timeout.as_secs_f64(),
            MAX_BLOCK_TIMEOUT.as_secs()
        )));
    }
    Ok(())
}

/// A blocking timeout from seconds (as a user types it): finite, `>= 0`, at most
/// [`MAX_BLOCK_TIMEOUT`].
pub fn block_timeout_from_secs(secs: f64) -> Result<Duration> {
    if !secs.is_finite() || secs < 0.0 || secs > MAX_BLOCK_TIMEOUT.as_secs_f64() {
        return Err(Error::invalid(format!(
            "block timeout {secs} s is out of range 0..={} s",
            MAX_BLOCK_TIMEOUT.as_secs()
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The time a request body may take to arrive in full: more than 0, at most
/// [`MAX_BODY_TIMEOUT`].
pub fn check_body_timeout(timeout: Duration) -> Result<()> {
    if timeout.is_zero() || timeout > MAX_BODY_TIMEOUT {
        return Err(body_timeout_range(timeout.as_secs_f64()));
    }
    Ok(())
}

/// A body timeout from seconds (as a user types it, fractions allowed), checked
/// as in [`check_body_timeout`].
pub fn body_timeout_from_secs(secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs > 0.0 && secs <= MAX_BODY_TIMEOUT.as_secs_f64()) {
        return Err(body_timeout_range(secs));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn body_timeout_range(secs: f64) -> Error {
    Error::invalid(format!(
        "body timeout {secs} s is out of range: more than 0, at most {} s",
        MAX_BODY_TIMEOUT.as_secs()
    ))
}

/// A shard cap from MiB (as a user types it, fractions allowed).
pub fn shard_bytes_from_mb(mb: f64) -> Result<usize> {
    let bytes = mb * (1u64 << 20) as f64;
    if !bytes.is_finite() || bytes < MIN_SHARD_BYTES as f64 || bytes > MAX_SHARD_BYTES as f64 {
        return Err(Error::invalid(format!(
            "shard size {mb} MiB is out of range {}..={} MiB",
            MIN_SHARD_BYTES as f64 / (1u64 << 20) as f64,
            MAX_SHARD_BYTES >> 20
        )));
    }
    Ok(bytes as usize)
}

/// Shards of a dataset run: the cap in [`MIN_SHARD_BYTES`]..=[`MAX_SHARD_BYTES`],
/// `shard_index < shard_count <= MAX_SHARD_COUNT`; a split needs a prompt
/// file, not standard input.
pub fn check_shards(
    shard_bytes: usize,
    shard_index: usize,
    shard_count: usize,
    from_stdin: bool,
) -> Result<()> {
    if !(MIN_SHARD_BYTES..=MAX_SHARD_BYTES).contains(&shard_bytes) {
        return Err(Error::invalid(format!(
            "shard size {shard_bytes} bytes is out of range {MIN_SHARD_BYTES}..={MAX_SHARD_BYTES}"
        )));
    }
    if shard_count == 0 || shard_count > MAX_SHARD_COUNT {
        return Err(Error::invalid(format!(
            "shard count {shard_count} is out of range 1..={MAX_SHARD_COUNT}"
        )));
    }
    if shard_index >= shard_count {
        return Err(Error::invalid(format!(
            "shard index {shard_index} is out of range 0..{shard_count}"
        )));
    }
    if shard_count > 1 && from_stdin {
        return Err(Error::invalid(
            "splitting the prompts into shards needs a prompt file, not standard input",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        assert!(check_threads(65536)
            .unwrap_err()
            .message()
            .contains("threads 65536"));
        for t in [0, -5] {
            assert!(check_threads(t).is_err(), "{t}");
        }
        assert!(check_threads(1).is_ok());
        for (t, ok) in [
            (0.0, true),
            (0.8, true),
            (f32::NAN, false),
            (f32::INFINITY, false),
            (1e-38, false),
            (-1.0, false),
        ] {
            assert_eq!(
                check_sampling(t, 1.0, 0, 0.0).is_ok(),
                ok,
                "temperature {t}"
            );
        }
        for (p, ok) in [(1.0, true), (0.0, true), (2.0, false), (-1.0, false)] {
            assert_eq!(check_sampling(0.0, p, 0, 0.0).is_ok(), ok, "top_p {p}");
        }
        assert!(latents_budget_from_mb(0)
            .unwrap_err()
            .message()
            .contains("0 MiB"));
        assert!(latents_budget_from_mb(MAX_LATENTS_BUDGET_MB + 1).is_err());
        assert_eq!(latents_budget_from_mb(256).unwrap(), 256 << 20);
        assert!(block_timeout_from_secs(f64::INFINITY).is_err());
        assert!(block_timeout_from_secs(1e300).is_err());
        assert!(block_timeout_from_secs(f64::NAN).is_err());
        assert!(block_timeout_from_secs(-1.0).is_err());
        assert_eq!(
            block_timeout_from_secs(2.5).unwrap(),
            Duration::from_millis(2500)
        );
        for (p, ok) in [
            ("", true),
            ("l_out-*", true),
            (" ", false),
            (",", false),
            (",,,", false),
            ("l_out-*,", false),
        ] {
            assert_eq!(check_patterns(&[p.into()]).is_ok(), ok, "patterns {p:?}");
        }
        assert!(check_context(256, 512, 512, 256).is_ok());
        assert!(check_context(256, 512, 512, 257).is_err());
        assert!(check_context(256, 512, 1024, 1).is_err());
        assert!(check_context(256, 1 << 17, 1 << 17, 1).is_err());
        for secs in [0.0, -1.0, 3600.5, f64::NAN, f64::INFINITY] {
            assert!(body_timeout_from_secs(secs).is_err(), "{secs}");
        }
        assert_eq!(
            body_timeout_from_secs(0.25).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(body_timeout_from_secs(3600.0).unwrap(), MAX_BODY_TIMEOUT);
        assert!(check_body_timeout(DEFAULT_BODY_TIMEOUT).is_ok());
        assert!(check_body_timeout(Duration::ZERO).is_err());
        assert!(check_body_timeout(MAX_BODY_TIMEOUT + Duration::from_millis(1)).is_err());
        assert!(check_shards(MIN_SHARD_BYTES, 0, 2, true).is_err());
        assert!(check_shards(MIN_SHARD_BYTES, 1, 2, false).is_ok());
        assert!(check_shards(MIN_SHARD_BYTES, 2, 2, false).is_err());
    }
}
