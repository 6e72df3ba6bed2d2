//! The run-directory format: size-capped safetensors shards, `tokens.jsonl`
//! and a manifest, written by dataset capture (`latent-tap capture --prompts`)
//! and by `latent-tap listen --out`.
//!
//! Layout of a run directory:
//! - `latents-00000.safetensors`, ...: complete safetensors files, each holding
//!   for every selected tensor `NAME` (`[rows, width]`), `NAME.pos` (I32),
//!   `NAME.seq` (I32, the slot that decoded the row) and `NAME.prompt` (I64, the
//!   prompt's index in the prompt file). Rows are ordered by prompt index, then
//!   by position.
//! - `tokens.jsonl`: one line per token with its `prompt_index`.
//! - `manifest.json`: settings, the shards with their row and prompt ranges, and
//!   how far the run got (`next_prompt`, `complete`, `stopped`). Rewritten
//!   atomically each time a shard closes.
//!
//! A prompt's rows are buffered until the prompt is complete and are written in
//! prompt order, so a shard never holds part of a prompt. A run that stops
//! (signal, write error) with a shard open still writes it, as a complete file
//! marked `partial` in the manifest, whose `resume_from` holds the run's counters
//! before that shard. A resumed run drops the partial shard and captures again
//! from its first prompt, so its shards close at the same rows as an
//! uninterrupted run's and its manifest ends identical to one.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

mod writer;
pub use writer::{PromptRows, Writer};

/// Manifest `format` value of a dataset run directory.
pub const FORMAT: &str = "latent-tap-dataset/1";

/// One shard of the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    /// File name in the run directory.
    pub file: String,
    /// Prompt indices `[first, end)` whose rows it holds.
    pub prompts: [u64; 2],
    /// Per tensor, the run's row range `[start, end)` it holds.
    pub rows: BTreeMap<String, [u64; 2]>,
    /// Prompts cut to `max_prompt_tokens`: `[index, original token count]`.
    #[serde(default)]
    pub truncated: Vec<[u64; 2]>,
    /// Bytes of latents.
    pub bytes: u64,
    /// Written when the run stopped with this shard open: a valid file, but it
    /// closed before its size cap, and a resumed run replaces it (only ever the
    /// last shard; see [`Manifest::resume_from`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// The run's counters at a prompt boundary.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every prompt before this index is captured.
    pub next_prompt: u64,
    /// Prompts captured.
    pub prompts_captured: u64,
    /// Blank prompts skipped.
    pub prompts_blank: u64,
    /// Token lines in `tokens.jsonl`.
    pub tokens: u64,
    /// Bytes of `tokens.jsonl`.
    pub tokens_bytes: u64,
}

/// The manifest of a dataset run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// Every prompt of the share is captured.
    pub complete: bool,
    /// Why the run stopped early (absent when complete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// Settings that must match on resume.
    pub config: Value,
    /// Prompt indices `[first, end)` of this share.
    pub prompt_range: [u64; 2],
    /// Lines of the prompt file.
    pub prompt_lines: u64,
    /// Every prompt before this index (in the share) is captured.
    pub next_prompt: u64,
    /// Prompts captured (empty lines are skipped and not counted).
    pub prompts_captured: u64,
    /// Blank prompts skipped.
    pub prompts_blank: u64,
    /// Bytes of `tokens.jsonl` that belong to captured prompts.
    pub tokens_bytes: u64,
    /// Token lines in `tokens.jsonl`.
    pub tokens: u64,
    /// The selected tensors: name, width, dtype.
    pub tensors: Vec<TensorInfo>,
    /// Rows per tensor over all shards.
    pub rows: BTreeMap<String, u64>,
    /// The shards, in order.
    pub shards: Vec<ShardInfo>,
    /// Present when the last shard is [`ShardInfo::partial`]: the counters
    /// before it. A resumed run restores them, drops that shard (and its lines
    /// of `tokens.jsonl`) and captures again from `next_prompt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_from: Option<Checkpoint>,
    /// Runs written by `latent-tap listen`: the hosts it served and its
    /// counters (absent for `capture --prompts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<Value>,
    /// The build that last wrote the run: `{"version", "target_cpu",
    /// "cpu_features"}` (not compared on resume: a run may be continued by
    /// another build; absent in runs of older versions and of `listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Value>,
}

impl Manifest {
    pub(crate) fn checkpoint(&self, next_prompt: u64) -> Checkpoint {
        Checkpoint {
            next_prompt,
            prompts_captured: self.prompts_captured,
            prompts_blank: self.prompts_blank,
            tokens: self.tokens,
            tokens_bytes: self.tokens_bytes,
        }
    }

    pub(crate) fn restore(&mut self, c: &Checkpoint) {
        self.next_prompt = c.next_prompt;
        self.prompts_captured = c.prompts_captured;
        self.prompts_blank = c.prompts_blank;
        self.tokens = c.tokens;
        self.tokens_bytes = c.tokens_bytes;
    }
}

/// A selected tensor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorInfo {
    /// Name.
    pub name: String,
    /// Row width (0 when no row was seen yet).
    pub width: usize,
    /// Element type (safetensors name).
    pub dtype: String,
}

/// Shard file name.
pub fn shard_name(i: usize) -> String {
    format!("latents-{i:05}.safetensors")
}

/// Write `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let r = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| Error::io(&tmp, "writing", e))
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|e| Error::io(path, "moving into place", e))
        });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Remove the temporary files (`.latents*.tmp-PID`, `.manifest.json.tmp-PID`) of
/// runs that died.
pub(crate) fn remove_stale_temps(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((base, pid)) = name.rsplit_once(".tmp-") else {
            continue;
        };
        let ours = base.starts_with(".latents") || base == ".manifest.json";
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| p == std::process::id() || Path::new(&format!("/proc/{p}")).exists());
        if ours && !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Read the manifest of a run directory.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let p = dir.join("manifest.json");
    let s = std::fs::read(&p).map_err(|e| Error::io(&p, "reading", e))?;
    let m: Manifest = serde_json::from_slice(&s)
        .map_err(|e| Error::invalid(format!("{} is not a dataset manifest: {e}", p.display())))?;
    if m.format != FORMAT {
        return Err(Error::invalid(format!(
            "{} has format '{}', not '{FORMAT}'",
            p.display(),
            m.format
        )));
    }
    Ok(m)
}

/// Open the run in `dir` to continue it: its manifest, checked to be made
/// with `config`, with a partial last shard dropped (its prompts are captured
/// again, so shards close where an uninterrupted run's do) and what the
/// stopped run wrote past its manifest (lines of `tokens.jsonl`, shards)
/// removed.
pub fn resume(dir: &Path, config: &Value) -> Result<Manifest> {
    let tokens_path = dir.join("tokens.jsonl");
    let m = read_manifest(dir)?;
    if m.config != *config {
        let differs = differing_keys(&m.config, config, "");
        return Err(Error::invalid(format!(
            "the run in {} was made with other settings ({}); resume with the same ones or use a new directory",
            dir.display(),
            differs.join(", ")
        )));
    }
    let mut m = m;
    // A partial last shard is captured again, so that shards close where an
    // uninterrupted run's do.
    if let Some(c) = m.resume_from.take() {
        let Some(last) = m.shards.pop().filter(|s| s.partial) else {
            return Err(Error::invalid(format!(
                "{} has resume_from but no partial last shard",
                dir.join("manifest.json").display()
            )));
        };
        m.restore(&c);
        for (name, r) in &last.rows {
            m.rows.insert(name.clone(), r[0]);
        }
    }
    // Drop what the stopped run wrote past its manifest.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&tokens_path)
        .map_err(|e| Error::io(&tokens_path, "opening", e))?;
    f.set_len(m.tokens_bytes)
        .map_err(|e| Error::io(&tokens_path, "truncating", e))?;
    for i in m.shards.len().. {
        let p = dir.join(shard_name(i));
        if !p.exists() {
            break;
        }
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, "removing", e))?;
    }
    Ok(m)
}

/// The keys whose values differ between `a` and `b` (both objects; a key
/// only one has counts), one level into objects both hold (`settings.steer`).
fn differing_keys(a: &Value, b: &Value, prefix: &str) -> Vec<String> {
    let (Some(x), Some(y)) = (a.as_object(), b.as_object()) else {
        return vec![prefix.trim_end_matches('.').to_string()];
    };
    let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        match (x.get(k.as_str()), y.get(k.as_str())) {
            (Some(p), Some(q)) if p == q => {}
            (Some(p @ Value::Object(_)), Some(q @ Value::Object(_))) if prefix.is_empty() => {
                out.extend(differing_keys(p, q, &format!("{k}.")));
            }
            _ => out.push(format!("{prefix}{k}")),
        }
    }
    out
}

/// Does `dir` already hold dataset output (a manifest, shards or tokens)?
pub fn holds_run(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        n == "manifest.json"
            || n == "tokens.jsonl"
            || (n.starts_with("latents") && n.ends_with(".safetensors"))
    })
}
