//! One source for the bounds of every setting, shared by the CLI, the C API and
//! the HTTP server: each options struct has a `validate()` that the library
//! calls itself ([`crate::engine::Model::load`], context creation,
//! [`crate::session::Generator::run`], tap arming), so every front end gets the
//! same rules and the same messages. Messages name the *setting* (`threads`,
//! `temperature`…), never a command-line flag; front ends may add their own advice.

use std::time::Duration;

use crate::capture::Policy;
use crate::dataset::{DatasetOptions, PromptSource};
use crate::engine::{ContextOptions, ModelOptions, SamplingOptions};
use crate::error::{Error, Result};
use crate::record::{frame_len, Dtype};
use crate::sched::LatentRequest;
use crate::select::{GraphNode, Selection};
use crate::session::{CaptureSpec, GenerateOptions};

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
pub const MAX_UBATCH: u32 = 65_535;
/// Longest a blocked producer may wait for ring space.
pub const MAX_BLOCK_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Smallest non-zero sampling temperature; below it logits / T overflow and
/// sampling degenerates. 0 means greedy.
pub const MIN_TEMPERATURE: f32 = 1e-3;
/// Most alternatives reported per generated token.
pub const MAX_REPORT_TOP_K: usize = 1 << 20;

/// Ring capacity of a capture when the caller gives none and nothing sizes it
/// from the selection (64 MiB).
pub const DEFAULT_RING_BYTES: usize = 64 << 20;
/// Frames of the widest selected tensor that a dataset capture's ring holds when
/// no capacity is given: the ring needs 2 for any frame to fit, the rest absorbs
/// the router's jitter.
pub const DATASET_RING_FRAMES: usize = 8;
/// Smallest ring a dataset capture sizes for itself (4 MiB).
pub const MIN_DATASET_RING_BYTES: usize = 4 << 20;

/// Ring capacity of a dataset capture when none is given, for the engine's
/// `graph` and physical batch `n_ubatch`: [`DATASET_RING_FRAMES`] frames of the
/// widest tensor `request` selects (the engine's ring carries every row of a
/// ubatch in f32), at least [`MIN_DATASET_RING_BYTES`]. A ring's pages are
/// touched as it wraps, so peak memory grows by its capacity over the first
/// wrap and then stays flat; this keeps that step small without ever refusing
/// a frame. `None`: tokens only.
pub fn dataset_ring_bytes(
    graph: &[GraphNode],
    request: Option<&LatentRequest>,
    n_ubatch: usize,
) -> Result<usize> {
    let widest = match request {
        Some(r) => Selection::compile(&r.patterns, r.layers.as_ref(), graph)?
            .tensors()
            .iter()
            .map(|t| t.row_width)
            .max()
            .unwrap_or(0),
        None => 0,
    };
    // The ring's own 8-byte record header per frame (see `ring::Producer::max_record_len`).
    let frame = frame_len(n_ubatch, widest, Dtype::F32).saturating_add(8);
    Ok(frame
        .saturating_mul(DATASET_RING_FRAMES)
        .max(MIN_DATASET_RING_BYTES))
}

/// Default size cap of a dataset shard (64 MiB).
pub const DEFAULT_SHARD_BYTES: usize = 64 << 20;
/// Smallest dataset shard cap (4 KiB).
pub const MIN_SHARD_BYTES: usize = 4 << 10;
/// Largest dataset shard cap (64 GiB).
pub const MAX_SHARD_BYTES: usize = 64 << 30;
/// Most blocks a prompt file may be split into across machines.
pub const MAX_SHARD_COUNT: usize = 1 << 20;

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

impl DatasetOptions {
    /// Check the bounds: shard cap in [`MIN_SHARD_BYTES`]..=[`MAX_SHARD_BYTES`],
    /// `shard_index < shard_count <= MAX_SHARD_COUNT` (a split needs a file, not
    /// standard input), a positive prompt cut, a non-blank field name, the
    /// sampling and the report top-k.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_SHARD_BYTES..=MAX_SHARD_BYTES).contains(&self.shard_bytes) {
            return Err(Error::invalid(format!(
                "shard size {} bytes is out of range {MIN_SHARD_BYTES}..={MAX_SHARD_BYTES}",
                self.shard_bytes
            )));
        }
        if self.shard_count == 0 || self.shard_count > MAX_SHARD_COUNT {
            return Err(Error::invalid(format!(
                "shard count {} is out of range 1..={MAX_SHARD_COUNT}",
                self.shard_count
            )));
        }
        if self.shard_index >= self.shard_count {
            return Err(Error::invalid(format!(
                "shard index {} is out of range 0..{}",
                self.shard_index, self.shard_count
            )));
        }
        if self.shard_count > 1 && self.prompts == PromptSource::Stdin {
            return Err(Error::invalid(
                "splitting the prompts into shards needs a prompt file, not standard input",
            ));
        }
        if self.max_prompt_tokens == Some(0) {
            return Err(Error::invalid("the prompt token limit must be at least 1"));
        }
        if self.field.trim().is_empty() {
            return Err(Error::invalid("the prompt field name is empty"));
        }
        if self.n_probs > MAX_REPORT_TOP_K {
            return Err(Error::invalid(format!(
                "report top-k {} is out of range 0..={MAX_REPORT_TOP_K}",
                self.n_probs
            )));
        }
        self.sampling.validate()
    }
}

/// Largest thread count accepted on this machine: `THREADS_PER_CORE` × cores,
/// at most [`MAX_THREADS`].
pub fn max_threads() -> i32 {
    crate::engine::default_threads()
        .saturating_mul(THREADS_PER_CORE)
        .clamp(1, MAX_THREADS)
}

impl ModelOptions {
    /// Check the bounds: `n_gpu_layers` is -1 (all) or at least 0.
    pub fn validate(&self) -> Result<()> {
        if self.n_gpu_layers < -1 {
            return Err(Error::invalid(format!(
                "gpu layers {} is out of range: -1 (all) or 0 and up",
                self.n_gpu_layers
            )));
        }
        Ok(())
    }
}

impl ContextOptions {
    /// Check the bounds: positive sizes, `n_ctx <= MAX_CTX`, `n_ubatch <= n_batch`,
    /// `n_ubatch <= MAX_UBATCH`, `n_seq_max <= MAX_SEQ`, threads `1..=max_threads()`.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("context size", self.n_ctx),
            ("batch size", self.n_batch),
            ("ubatch size", self.n_ubatch),
            ("sequence count", self.n_seq_max),
        ] {
            if v == 0 {
                return Err(Error::invalid(format!("{name} must be at least 1")));
            }
        }
        if self.n_ctx > MAX_CTX {
            return Err(Error::invalid(format!(
                "context size {} is out of range 1..={MAX_CTX}",
                self.n_ctx
            )));
        }
        if self.n_ubatch > self.n_batch {
            return Err(Error::invalid(format!(
                "ubatch size {} must not exceed batch size {}",
                self.n_ubatch, self.n_batch
            )));
        }
        if self.n_ubatch > MAX_UBATCH {
            return Err(Error::invalid(format!(
                "ubatch size {} is out of range 1..={MAX_UBATCH}",
                self.n_ubatch
            )));
        }
        if self.n_seq_max > MAX_SEQ {
            return Err(Error::invalid(format!(
                "{} sequences is more than a context holds ({MAX_SEQ})",
                self.n_seq_max
            )));
        }
        if let Some(t) = self.n_threads {
            let max = max_threads();
            if !(1..=max).contains(&t) {
                return Err(Error::invalid(format!(
                    "threads {t} is out of range 1..={max} ({THREADS_PER_CORE} per core, at most {MAX_THREADS})"
                )));
            }
        }
        Ok(())
    }

    /// The thread count a context built from these options uses.
    pub fn threads(&self) -> i32 {
        self.n_threads
            .unwrap_or_else(crate::engine::default_threads)
            .max(1)
    }
}

impl SamplingOptions {
    /// Check the bounds: temperature finite and 0 (greedy) or at least
    /// [`MIN_TEMPERATURE`]; top-p and min-p in `0..=1`; top-k at least 0.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 || (t > 0.0 && t < MIN_TEMPERATURE) {
            return Err(Error::invalid(format!(
                "temperature {t} is out of range: 0 (greedy) or a finite value from {MIN_TEMPERATURE}"
            )));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(Error::invalid(format!(
                "top-p {} is out of range 0..=1",
                self.top_p
            )));
        }
        if self.top_k < 0 {
            return Err(Error::invalid(format!(
                "sampling top-k {} is negative (0: off)",
                self.top_k
            )));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::invalid(format!(
                "min-p {} is out of range 0..=1",
                self.min_p
            )));
        }
        Ok(())
    }
}

impl GenerateOptions {
    /// Check the bounds: `n_predict >= 1`, `top_k <= MAX_REPORT_TOP_K`, and the sampling.
    pub fn validate(&self) -> Result<()> {
        if self.n_predict == 0 {
            return Err(Error::invalid("n_predict must be at least 1"));
        }
        if self.top_k > MAX_REPORT_TOP_K {
            return Err(Error::invalid(format!(
                "report top-k {} is out of range 0..={MAX_REPORT_TOP_K}",
                self.top_k
            )));
        }
        self.sampling.validate()
    }
}

impl CaptureSpec {
    /// Check the spec: patterns are either exactly empty (tokens only) or hold
    /// no blank entry; the ring is not empty; a blocking
    /// timeout is at most [`MAX_BLOCK_TIMEOUT`]. (Whether the ring fits in
    /// memory is [`check_ring_memory`], done when the ring is made.)
    pub fn validate(&self) -> Result<()> {
        if !self.captures_nothing() {
            for p in &self.patterns {
                if p.split(',').any(|q| q.trim().is_empty()) {
                    return Err(Error::invalid(format!(
                        "tensor patterns '{p}' hold a blank entry (use an empty string to capture tokens only)"
                    )));
                }
            }
        }
        if self.ring_bytes == 0 {
            return Err(Error::invalid("ring capacity must be at least 1 byte"));
        }
        if let Policy::Block { timeout } = self.policy {
            if timeout > MAX_BLOCK_TIMEOUT {
                return Err(Error::invalid(format!(
                    "block timeout {} s is above the maximum of {} s",
                    timeout.as_secs_f64(),
                    MAX_BLOCK_TIMEOUT.as_secs()
                )));
            }
        }
        Ok(())
    }
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

/// Bytes of memory this process may still use: the smaller of `MemAvailable`
/// and the cgroup's `memory.max - memory.current`. `None` when neither is known.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    let read = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(read("/sys/fs/cgroup/memory.current").unwrap_or(0)));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Refuse a ring of `bytes` that the machine (or the cgroup) cannot hold.
pub fn check_ring_memory(bytes: usize) -> Result<()> {
    if let Some(avail) = available_memory() {
        if bytes as u64 > avail {
            return Err(Error::invalid(format!(
                "ring capacity {bytes} bytes exceeds the memory available ({avail} bytes)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_ring_holds_a_few_frames_of_the_widest_selected_tensor() {
        let node = |name: &str, layer: i32, width: usize| GraphNode {
            name: name.into(),
            ggml_name: name.into(),
            occurrence: 0,
            layer: Some(layer),
            ggml_type: 0,
            ne: [width as i64, 1, 1, 1],
            row_width: Some(width),
        };
        let graph: Vec<GraphNode> = (0..4)
            .flat_map(|l| {
                [
                    node(&format!("l_out-{l}"), l, 2048),
                    node(&format!("ffn_up-{l}"), l, 8192),
                ]
            })
            .collect();
        let req = |p: &str| LatentRequest {
            patterns: vec![p.into()],
            layers: None,
            rows: crate::capture::Rows::All,
            dtype: Dtype::F16,
        };
        let frame = |w: usize| frame_len(512, w, Dtype::F32) + 8;
        // f32 frames whatever the requested dtype; the widest selected tensor counts.
        let b = dataset_ring_bytes(&graph, Some(&req("l_out-*")), 512).unwrap();
        assert_eq!(b, DATASET_RING_FRAMES * frame(2048));
        let rows = 8 * 512 * (2048 * 4 + 16);
        assert!((rows..rows + 8 * 256).contains(&b), "{b}: about 33.6 MB");
        let b = dataset_ring_bytes(&graph, Some(&req("l_out-1,ffn_up-2")), 512).unwrap();
        assert_eq!(b, DATASET_RING_FRAMES * frame(8192));
        // Small selections and tokens-only runs get the floor; a frame always fits twice.
        for (r, n_ubatch) in [(Some(req("l_out-0")), 32), (None, 512)] {
            let b = dataset_ring_bytes(&graph, r.as_ref(), n_ubatch).unwrap();
            assert_eq!(b, MIN_DATASET_RING_BYTES);
        }
        for w in [1, 64, 256, 2048, 8192] {
            assert!(2 * frame(w) <= DATASET_RING_FRAMES * frame(w));
        }
        assert!(dataset_ring_bytes(&graph, Some(&req("nope-*")), 512).is_err());
    }

    #[test]
    fn bounds() {
        let c = ContextOptions {
            n_threads: Some(65536),
            ..ContextOptions::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .message()
            .contains("threads 65536"));
        for t in [0, -5] {
            let c = ContextOptions {
                n_threads: Some(t),
                ..ContextOptions::default()
            };
            assert!(c.validate().is_err(), "{t}");
        }
        assert!(ContextOptions::default().validate().is_ok());
        for (t, ok) in [
            (0.0, true),
            (0.8, true),
            (f32::NAN, false),
            (f32::INFINITY, false),
            (1e-38, false),
            (-1.0, false),
        ] {
            let s = SamplingOptions {
                temperature: t,
                ..SamplingOptions::default()
            };
            assert_eq!(s.validate().is_ok(), ok, "temperature {t}");
        }
        for (p, ok) in [(1.0, true), (0.0, true), (2.0, false), (-1.0, false)] {
            let s = SamplingOptions {
                top_p: p,
                ..SamplingOptions::default()
            };
            assert_eq!(s.validate().is_ok(), ok, "top_p {p}");
        }
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
            let s = CaptureSpec {
                patterns: vec![p.into()],
                ..CaptureSpec::default()
            };
            assert_eq!(s.validate().is_ok(), ok, "patterns {p:?}");
        }
        assert!(check_ring_memory(usize::MAX / 4).is_err());
        assert!(check_ring_memory(1 << 20).is_ok());
    }
}
