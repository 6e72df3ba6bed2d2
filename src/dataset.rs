//! Dataset capture: run a file of prompts through a [`crate::sched::Engine`]
//! (continuous batching over its slots) and stream the latents into a run
//! directory of size-capped safetensors shards.
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
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::engine::{SamplingOptions, Token};
use crate::error::{Error, ErrorKind, Result};
use crate::output::{header, EntryMeta};
use crate::record::Dtype;
use crate::sched::{Engine, Job, JobEvent, LatentFilter, StopReason, SubmitError, TokenOut};

/// Manifest `format` value of a dataset run directory.
pub const FORMAT: &str = "latent-tap-dataset/1";

/// Where prompts come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptSource {
    /// A file.
    File(PathBuf),
    /// Standard input.
    Stdin,
}

/// Settings of a dataset capture (bounds: [`DatasetOptions::validate`] in `settings`).
#[derive(Debug, Clone)]
pub struct DatasetOptions {
    /// Run directory.
    pub dir: PathBuf,
    /// Prompt file: plain text (one prompt per line) or JSON Lines (detected
    /// from the first non-blank line being a JSON object).
    pub prompts: PromptSource,
    /// Field holding the text in JSON Lines.
    pub field: String,
    /// Tokens to generate per prompt (0: prompt only).
    pub n_predict: usize,
    /// Keep at most this many prompt tokens (the rest is cut).
    pub max_prompt_tokens: Option<usize>,
    /// Sampling settings.
    pub sampling: SamplingOptions,
    /// Alternatives reported per generated token.
    pub n_probs: usize,
    /// Close a shard before it would exceed this many bytes of latents.
    pub shard_bytes: usize,
    /// This process's share of the prompt file: block `index` of `count`.
    pub shard_index: usize,
    /// Number of blocks the prompt file is split into.
    pub shard_count: usize,
    /// Continue the run already in `dir`.
    pub resume: bool,
    /// Extra settings recorded in the manifest and checked on resume.
    pub settings: Value,
}

/// How a capture ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Every prompt of the share is captured.
    pub complete: bool,
    /// Stopped early because the stop flag was set.
    pub interrupted: bool,
    /// Prompts captured by this process (not counting earlier runs).
    pub prompts: u64,
    /// Tokens captured by this process.
    pub tokens: u64,
    /// Latent bytes written by this process.
    pub bytes: u64,
    /// Shards in the run directory.
    pub shards: usize,
    /// Wall time of the capture, seconds.
    pub seconds: f64,
}

/// Progress callback argument.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Prompts captured (this share, earlier runs included).
    pub done: u64,
    /// Prompts in this share.
    pub total: u64,
}

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
}

impl Manifest {
    fn checkpoint(&self, next_prompt: u64) -> Checkpoint {
        Checkpoint {
            next_prompt,
            prompts_captured: self.prompts_captured,
            prompts_blank: self.prompts_blank,
            tokens: self.tokens,
            tokens_bytes: self.tokens_bytes,
        }
    }

    fn restore(&mut self, c: &Checkpoint) {
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

/// Count the lines of a prompt file (a last line without a newline counts).
pub fn count_lines(path: &Path) -> Result<u64> {
    let mut f = File::open(path).map_err(|e| io_err(path, "reading", e))?;
    let mut buf = vec![0u8; 1 << 16];
    let (mut n, mut last) = (0u64, b'\n');
    loop {
        let k = f.read(&mut buf).map_err(|e| io_err(path, "reading", e))?;
        if k == 0 {
            break;
        }
        n += buf[..k].iter().filter(|&&b| b == b'\n').count() as u64;
        last = buf[k - 1];
    }
    Ok(n + u64::from(last != b'\n'))
}

/// Block `index` of `count` contiguous blocks of `total` prompts: `[lo, hi)`.
pub fn share(total: u64, index: usize, count: usize) -> [u64; 2] {
    let (i, n) = (index as u128, count.max(1) as u128);
    let t = total as u128;
    [(t * i / n) as u64, (t * (i + 1) / n) as u64]
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("{what} {}: {e}", path.display()))
}

/// Reads prompts line by line, keeping each one's line index.
struct PromptReader {
    lines: Box<dyn BufRead>,
    name: String,
    field: String,
    jsonl: Option<bool>,
    next: u64,
    buf: String,
}

impl PromptReader {
    fn open(src: &PromptSource, field: &str) -> Result<Self> {
        let (lines, name): (Box<dyn BufRead>, String) = match src {
            PromptSource::File(p) => (
                Box::new(BufReader::new(
                    File::open(p).map_err(|e| io_err(p, "reading", e))?,
                )),
                p.display().to_string(),
            ),
            PromptSource::Stdin => (
                Box::new(BufReader::new(std::io::stdin())),
                "standard input".into(),
            ),
        };
        Ok(Self {
            lines,
            name,
            field: field.to_string(),
            jsonl: None,
            next: 0,
            buf: String::new(),
        })
    }

    /// The next line: its index and text (`None` for a blank line).
    fn next_prompt(&mut self) -> Result<Option<(u64, Option<String>)>> {
        self.buf.clear();
        let n = self.lines.read_line(&mut self.buf).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("reading prompts from {}: {e}", self.name),
            )
        })?;
        if n == 0 {
            return Ok(None);
        }
        let index = self.next;
        self.next += 1;
        let line = self.buf.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            return Ok(Some((index, None)));
        }
        let jsonl = *self
            .jsonl
            .get_or_insert_with(|| line.trim_start().starts_with('{'));
        if !jsonl {
            return Ok(Some((index, Some(line.to_string()))));
        }
        let v: Value = serde_json::from_str(line).map_err(|e| {
            Error::invalid(format!(
                "{} line {}: not a JSON object ({e})",
                self.name,
                index + 1
            ))
        })?;
        match v.get(&self.field) {
            Some(Value::String(s)) if s.trim().is_empty() => Ok(Some((index, None))),
            Some(Value::String(s)) => Ok(Some((index, Some(s.clone())))),
            _ => Err(Error::invalid(format!(
                "{} line {}: no string field '{}'",
                self.name,
                index + 1,
                self.field
            ))),
        }
    }
}

/// One tensor's rows of one prompt (or of the open shard).
#[derive(Default)]
pub(crate) struct Rows {
    pub(crate) data: Vec<u8>,
    pub(crate) pos: Vec<i32>,
    pub(crate) seq: Vec<i32>,
    prompt: Vec<i64>,
}

impl Rows {
    pub(crate) fn bytes(&self) -> usize {
        self.data.len() + self.pos.len() * 16
    }
    fn clear(&mut self) {
        self.data.clear();
        self.pos.clear();
        self.seq.clear();
        self.prompt.clear();
    }
}

/// A prompt in flight.
struct Pending {
    blank: bool,
    tensors: Vec<Rows>,
    tokens: Vec<TokenOut>,
    truncated: Option<usize>,
    done: Option<StopReason>,
    error: Option<Error>,
}

#[derive(Serialize)]
struct TokenLine<'a> {
    prompt_index: u64,
    seq: i32,
    pos: i32,
    token: Token,
    piece: String,
    prompt: bool,
    step: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprob: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entropy: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top: Option<Vec<(i32, f32)>>,
    #[serde(skip)]
    _p: std::marker::PhantomData<&'a ()>,
}

/// The run directory being written (also by `latent-tap listen`).
pub(crate) struct Writer {
    dir: PathBuf,
    dtype: Dtype,
    shard_limit: usize,
    /// The open shard's index columns (its latents are in `cols`).
    open: Vec<Rows>,
    /// The open shard's latents, one spill file per tensor, so memory does not
    /// grow with the shard.
    cols: Vec<Col>,
    open_bytes: usize,
    open_prompts: Option<[u64; 2]>,
    open_truncated: Vec<[u64; 2]>,
    /// The counters before the open shard's first prompt.
    open_start: Option<Checkpoint>,
    /// Every prompt before this index is committed (to the open shard, a closed
    /// one, or skipped as blank).
    committed: u64,
    /// A commit failed half-way: the open shard's spill files cannot be trusted.
    poisoned: bool,
    /// `tokens.jsonl`, appended one whole prompt per write.
    tokens: File,
    tokens_path: PathBuf,
    pub(crate) m: Manifest,
    pub(crate) bytes: u64,
}

/// A tensor's latents of the open shard, on disk until the shard closes.
struct Col {
    path: PathBuf,
    file: BufWriter<File>,
    len: u64,
}

impl Col {
    fn new(dir: &Path, i: usize) -> Result<Self> {
        let path = dir.join(format!(".latents.col{i}.tmp-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_err(&path, "creating", e))?;
        Ok(Self {
            path,
            file: BufWriter::with_capacity(1 << 20, f),
            len: 0,
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        for c in &self.cols {
            let _ = std::fs::remove_file(&c.path);
        }
    }
}

impl Writer {
    /// A writer of the run in `dir` whose state is `m` (its tensors get one
    /// spill file each), appending to `tokens.jsonl`. Removes the temporary
    /// files of runs that died.
    pub(crate) fn create(
        dir: &Path,
        dtype: Dtype,
        shard_limit: usize,
        m: Manifest,
    ) -> Result<Self> {
        remove_stale_temps(dir);
        let tokens_path = dir.join("tokens.jsonl");
        let tokens = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&tokens_path)
            .map_err(|e| io_err(&tokens_path, "opening", e))?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            dtype,
            shard_limit,
            open: m.tensors.iter().map(|_| Rows::default()).collect(),
            cols: (0..m.tensors.len())
                .map(|i| Col::new(dir, i))
                .collect::<Result<_>>()?,
            open_bytes: 0,
            open_prompts: None,
            open_truncated: Vec::new(),
            open_start: None,
            committed: m.next_prompt,
            poisoned: false,
            tokens,
            tokens_path,
            m,
            bytes: 0,
        })
    }

    /// Add a tensor (rows of `width` elements of the writer's dtype); its
    /// index in [`Manifest::tensors`]. Shards closed before hold none of it.
    pub(crate) fn add_tensor(&mut self, name: &str, width: usize) -> Result<usize> {
        let i = self.m.tensors.len();
        self.cols.push(Col::new(&self.dir, i)?);
        self.open.push(Rows::default());
        self.m.tensors.push(TensorInfo {
            name: name.to_string(),
            width,
            dtype: self.dtype.safetensors_name().to_string(),
        });
        self.m.rows.entry(name.to_string()).or_insert(0);
        Ok(i)
    }

    /// The element type of the latents it writes.
    pub(crate) fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Set the element type; only before the first tensor is added.
    pub(crate) fn set_dtype(&mut self, dtype: Dtype) {
        if self.m.tensors.is_empty() {
            self.dtype = dtype;
        }
    }

    fn manifest_path(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    /// A blank prompt: nothing to write.
    fn skip_blank(&mut self, index: u64) {
        self.m.prompts_blank += 1;
        self.committed = index + 1;
    }

    /// Append a finished prompt; close the open shard first if it would overflow.
    fn commit(&mut self, index: u64, p: Pending) -> Result<()> {
        let mut lines = Vec::new();
        for t in &p.tokens {
            let top = (!t.prompt).then(|| t.top.iter().map(|e| (e.id, e.logprob)).collect());
            let line = TokenLine {
                prompt_index: index,
                seq: t.slot,
                pos: t.pos,
                token: t.token,
                piece: String::from_utf8_lossy(&t.piece).into_owned(),
                prompt: t.prompt,
                step: t.step,
                logprob: (!t.prompt).then_some(t.logprob),
                entropy: (!t.prompt).then_some(t.entropy),
                top,
                _p: std::marker::PhantomData,
            };
            serde_json::to_writer(&mut lines, &line)
                .map_err(|e| Error::new(ErrorKind::Internal, format!("token line: {e}")))?;
            lines.push(b'\n');
        }
        let n_lines = p.tokens.len() as u64;
        self.commit_lines(index, p.tensors, &lines, n_lines, p.truncated)
    }

    /// Append a finished prompt given as its rows per tensor (in the order of
    /// the manifest's tensors; missing trailing tensors hold no row) and its
    /// `tokens.jsonl` lines; close the open shard first if it would overflow.
    pub(crate) fn commit_lines(
        &mut self,
        index: u64,
        tensors: Vec<Rows>,
        lines: &[u8],
        n_lines: u64,
        truncated: Option<usize>,
    ) -> Result<()> {
        let add: usize = tensors.iter().map(Rows::bytes).sum();
        if self.open_bytes > 0 && self.open_bytes + add > self.shard_limit {
            self.close_shard(false)?;
        }
        // tokens.jsonl first, in one write: if it fails, the open shard is intact
        // (and what the write left past `tokens_bytes` is cut when the run stops).
        self.tokens
            .write_all(lines)
            .map_err(|e| io_err(&self.tokens_path, "writing", e))?;
        if self.open_prompts.is_none() {
            self.open_start = Some(self.m.checkpoint(self.committed));
        }
        for ((dst, col), src) in self.open.iter_mut().zip(&mut self.cols).zip(tensors) {
            if let Err(e) = col.file.write_all(&src.data) {
                self.poisoned = true;
                return Err(io_err(&col.path, "writing", e));
            }
            col.len += src.data.len() as u64;
            dst.pos.extend_from_slice(&src.pos);
            dst.seq.extend_from_slice(&src.seq);
            dst.prompt
                .extend(std::iter::repeat(index as i64).take(src.pos.len()));
        }
        self.open_bytes += add;
        let r = self.open_prompts.get_or_insert([index, index + 1]);
        r[1] = index + 1;
        if let Some(n) = truncated {
            self.open_truncated.push([index, n as u64]);
        }
        self.m.tokens_bytes += lines.len() as u64;
        self.m.tokens += n_lines;
        self.m.prompts_captured += 1;
        self.committed = index + 1;
        if self.open_bytes >= self.shard_limit {
            self.close_shard(false)?;
        }
        Ok(())
    }

    /// Forget the open shard: back to the counters before its first prompt.
    fn rollback(&mut self) {
        if let Some(c) = self.open_start.take() {
            self.m.restore(&c);
            self.committed = c.next_prompt;
        }
        for r in &mut self.open {
            r.clear();
        }
        self.open_bytes = 0;
        self.open_prompts = None;
        self.open_truncated.clear();
    }

    /// Write the open shard (temp + rename) and the manifest. A `partial` shard
    /// is written the same way, but recorded with the counters before it so that
    /// a resumed run can replace it.
    pub(crate) fn close_shard(&mut self, partial: bool) -> Result<()> {
        let Some(prompts) = self.open_prompts else {
            return Ok(());
        };
        let file = shard_name(self.m.shards.len());
        let path = self.dir.join(&file);
        let tmp = self.dir.join(format!(".{file}.tmp-{}", std::process::id()));
        let ints32 = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let ints64 = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut names = Vec::new();
        let mut cols = Vec::new();
        for (t, r) in self.m.tensors.iter().zip(&self.open) {
            names.push([
                format!("{}.pos", t.name),
                format!("{}.seq", t.name),
                format!("{}.prompt", t.name),
            ]);
            cols.push([ints32(&r.pos), ints32(&r.seq), ints64(&r.prompt)]);
        }
        let mut metas = Vec::new();
        let shapes: Vec<[usize; 2]> = self
            .m
            .tensors
            .iter()
            .zip(&self.open)
            .map(|(t, r)| [r.pos.len(), t.width])
            .collect();
        for ((((t, n), c), col), shape) in self
            .m
            .tensors
            .iter()
            .zip(&names)
            .zip(&cols)
            .zip(&self.cols)
            .zip(&shapes)
        {
            metas.push(EntryMeta {
                name: &t.name,
                dtype: self.dtype.safetensors_name(),
                shape: &shape[..],
                len: col.len as usize,
            });
            for (k, dt) in ["I32", "I32", "I64"].into_iter().enumerate() {
                metas.push(EntryMeta {
                    name: &n[k],
                    dtype: dt,
                    shape: &shape[..1],
                    len: c[k].len(),
                });
            }
        }
        let head = header(&metas, &[("format", FORMAT.to_string())]);
        let r = (|| -> std::io::Result<()> {
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            w.write_all(&head)?;
            for (col, c) in self.cols.iter_mut().zip(&cols) {
                col.file.flush()?;
                let f = col.file.get_mut();
                f.seek(SeekFrom::Start(0))?;
                let n = std::io::copy(&mut (&*f).take(col.len), &mut w)?;
                if n != col.len {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{} holds {n} of {} bytes", col.path.display(), col.len),
                    ));
                }
                for b in c {
                    w.write_all(b)?;
                }
            }
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        })()
        // Named by the file it becomes, not by its temporary name.
        .map_err(|e| io_err(&path, "writing", e))
        .and_then(|()| {
            std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, "moving into place", e))
        });
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let shard_bytes: u64 = self.cols.iter().map(|c| c.len).sum();
        for c in &mut self.cols {
            c.file
                .get_mut()
                .set_len(0)
                .and_then(|()| c.file.get_mut().seek(SeekFrom::Start(0)).map(|_| ()))
                .map_err(|e| io_err(&c.path, "truncating", e))?;
            c.len = 0;
        }
        let mut rows = BTreeMap::new();
        for (t, r) in self.m.tensors.iter().zip(&self.open) {
            let total = self.m.rows.entry(t.name.clone()).or_insert(0);
            rows.insert(t.name.clone(), [*total, *total + r.pos.len() as u64]);
            *total += r.pos.len() as u64;
        }
        self.bytes += shard_bytes;
        self.m.shards.push(ShardInfo {
            file,
            prompts,
            rows,
            truncated: std::mem::take(&mut self.open_truncated),
            bytes: shard_bytes,
            partial,
        });
        let start = self.open_start.take();
        self.m.resume_from = if partial { start } else { None };
        self.m.next_prompt = self.committed;
        for r in &mut self.open {
            r.clear();
        }
        self.open_bytes = 0;
        self.open_prompts = None;
        self.tokens
            .sync_data()
            .map_err(|e| io_err(&self.tokens_path, "writing", e))?;
        self.write_manifest()
    }

    pub(crate) fn write_manifest(&self) -> Result<()> {
        write_atomic(
            &self.manifest_path(),
            &serde_json::to_vec_pretty(&self.m)
                .map_err(|e| Error::new(ErrorKind::Internal, format!("manifest: {e}")))?,
        )
    }
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
        .map_err(|e| io_err(&tmp, "writing", e))
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|e| io_err(path, "moving into place", e))
        });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Remove the temporary files (`.latents*.tmp-PID`, `.manifest.json.tmp-PID`) of
/// runs that died.
fn remove_stale_temps(dir: &Path) {
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
    let s = std::fs::read(&p).map_err(|e| io_err(&p, "reading", e))?;
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

/// Capture the share of the prompt file given by `opts` on `engine`, with
/// `filter`'s latents, into `opts.dir`. Setting `stop` ends the run after the
/// decode in flight: prompts not finished are dropped, the open shard is
/// closed and the manifest says `"complete": false`.
pub fn capture(
    engine: &Engine,
    filter: &LatentFilter,
    opts: &DatasetOptions,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
) -> Result<Outcome> {
    opts.validate()?;
    let t0 = Instant::now();
    let model = engine.model().clone();
    // A regular file is counted first; a pipe or standard input is read once,
    // and its length is known at the end.
    let lines = match &opts.prompts {
        PromptSource::File(p) if std::fs::metadata(p).is_ok_and(|m| m.is_file()) => {
            Some(count_lines(p)?)
        }
        PromptSource::File(p) if opts.shard_count > 1 => {
            return Err(Error::invalid(format!(
                "splitting the prompts into shards needs a regular file, and {} is not one",
                p.display()
            )))
        }
        _ => None,
    };
    let streamed = lines.is_none();
    let lines = lines.unwrap_or(u64::MAX);
    let range = if opts.shard_count > 1 {
        share(lines, opts.shard_index, opts.shard_count)
    } else {
        [0, lines]
    };
    let config = json!({
        "model": model.path(),
        "n_embd": model.n_embd(),
        "n_layer": model.n_layer(),
        "prompts": match &opts.prompts { PromptSource::File(p) => p.display().to_string(), PromptSource::Stdin => "-".into() },
        "prompt_field": opts.field,
        "n_predict": opts.n_predict,
        "max_prompt_tokens": opts.max_prompt_tokens,
        "sampling": {"temperature": opts.sampling.temperature, "top_k": opts.sampling.top_k, "top_p": opts.sampling.top_p, "min_p": opts.sampling.min_p, "seed": opts.sampling.seed},
        "report_top_k": opts.n_probs,
        "shard_index": opts.shard_index,
        "shard_count": opts.shard_count,
        "tensors": filter.names,
        "rows": filter.rows,
        "dtype": filter.dtype,
        "settings": opts.settings,
    });
    let tensors: Vec<TensorInfo> = filter
        .names
        .iter()
        .map(|n| TensorInfo {
            name: n.clone(),
            width: 0,
            dtype: filter.dtype.safetensors_name().to_string(),
        })
        .collect();
    let tokens_path = opts.dir.join("tokens.jsonl");
    let m = if opts.resume {
        let m = read_manifest(&opts.dir)?;
        if m.config != config {
            let differs: Vec<String> = config
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| m.config.get(k.as_str()) != Some(v))
                .map(|(k, _)| k.clone())
                .collect();
            return Err(Error::invalid(format!(
                "the run in {} was made with other settings ({}); resume with the same ones or use a new directory",
                opts.dir.display(),
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
                    opts.dir.join("manifest.json").display()
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
            .map_err(|e| io_err(&tokens_path, "opening", e))?;
        f.set_len(m.tokens_bytes)
            .map_err(|e| io_err(&tokens_path, "truncating", e))?;
        for i in m.shards.len().. {
            let p = opts.dir.join(shard_name(i));
            if !p.exists() {
                break;
            }
            std::fs::remove_file(&p).map_err(|e| io_err(&p, "removing", e))?;
        }
        m
    } else {
        Manifest {
            format: FORMAT.into(),
            complete: false,
            stopped: None,
            config,
            prompt_range: range,
            prompt_lines: lines,
            next_prompt: range[0],
            prompts_captured: 0,
            prompts_blank: 0,
            tokens_bytes: 0,
            tokens: 0,
            tensors,
            rows: filter.names.iter().map(|n| (n.clone(), 0)).collect(),
            shards: Vec::new(),
            resume_from: None,
            attach: None,
        }
    };
    let mut w = Writer::create(&opts.dir, filter.dtype, opts.shard_bytes, m)?;
    let captured_before = w.m.prompts_captured;
    let tokens_before = w.m.tokens;
    w.m.complete = false;
    w.m.stopped = Some("running".into());
    w.write_manifest()?;

    let r = run(engine, filter, opts, stop, progress, &mut w);
    let interrupted = matches!(r, Ok(None));
    let mut err = r.as_ref().err().cloned();
    let end = r.ok().flatten();
    // Whatever happened, write what is complete and say where the run stopped:
    // the open shard in full (partial when the run did not reach its end), or,
    // when that fails, nothing of it.
    if w.poisoned {
        w.rollback();
    } else if let Err(e) = w.close_shard(end.is_none()) {
        err.get_or_insert(e);
        w.rollback();
    }
    match end {
        Some(end) if err.is_none() => {
            w.m.next_prompt = end;
            if streamed {
                w.m.prompt_range[1] = end;
                w.m.prompt_lines = end;
            }
            w.m.complete = true;
            w.m.stopped = None;
        }
        _ => {
            // Blank prompts after the last shard count too.
            w.m.next_prompt = w.committed;
            w.m.stopped = Some(match &err {
                Some(e) => format!("error: {e}"),
                None => "interrupted".into(),
            });
        }
    }
    // Lines a failed write left past the manifest's count (best effort: a
    // resumed run cuts them too).
    let _ = w.tokens.set_len(w.m.tokens_bytes);
    let written = w.write_manifest();
    if let Some(e) = err {
        return Err(e);
    }
    written?;
    Ok(Outcome {
        complete: w.m.complete,
        interrupted,
        prompts: w.m.prompts_captured - captured_before,
        tokens: w.m.tokens - tokens_before,
        bytes: w.bytes,
        shards: w.m.shards.len(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

enum Ev {
    Frame(u64, crate::sched::FrameOut),
    Token(u64, TokenOut),
    Done(u64, StopReason, Option<Error>),
}

/// Prompts fed ahead of the next one to commit, for `n_parallel` slots (the
/// engine's queue must hold this many jobs).
pub fn window(n_parallel: usize) -> usize {
    (4 * n_parallel).max(4)
}

/// The feed / collect loop. `Ok(Some(end))`: every prompt before `end` is done
/// (the share's end, or the last line of standard input); `Ok(None)`: stopped.
fn run(
    engine: &Engine,
    filter: &LatentFilter,
    opts: &DatasetOptions,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
    w: &mut Writer,
) -> Result<Option<u64>> {
    let model = engine.model().clone();
    let range = w.m.prompt_range;
    let start = w.m.next_prompt;
    let total = range[1].saturating_sub(range[0]);
    let mut reader = PromptReader::open(&opts.prompts, &opts.field)?;
    let window = window(engine.n_parallel());
    let (tx, rx) = sync_channel::<Ev>(4096);
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    let mut handles: Vec<(u64, crate::sched::JobHandle)> = Vec::new();
    let n_ctx_slot = engine.n_ctx_slot() as usize;
    let mut end: Option<u64> = None;
    let mut cancelled = false;
    loop {
        if !cancelled && stop.load(Ordering::Relaxed) {
            cancelled = true;
            for (_, h) in &handles {
                h.cancel();
            }
        }
        // Feed: at most `window` prompts between the next to commit and the last read.
        while end.is_none() && !cancelled && pending.len() < window {
            let Some((index, text)) = reader.next_prompt()? else {
                end = Some(reader.next.min(range[1]));
                break;
            };
            if index < start {
                continue;
            }
            if index >= range[1] {
                end = Some(range[1]);
                break;
            }
            let Some(text) = text else {
                // A blank line is complete at once and holds nothing.
                pending.insert(
                    index,
                    Pending {
                        blank: true,
                        tensors: Vec::new(),
                        tokens: Vec::new(),
                        truncated: None,
                        done: Some(StopReason::Eos),
                        error: None,
                    },
                );
                continue;
            };
            let mut prompt = model.tokenize(&text, true)?;
            let mut truncated = None;
            if let Some(max) = opts.max_prompt_tokens {
                if prompt.len() > max {
                    truncated = Some(prompt.len());
                    prompt.truncate(max);
                }
            }
            if prompt.len() + opts.n_predict.min(1) >= n_ctx_slot {
                return Err(Error::new(
                    ErrorKind::PromptTooLong,
                    format!(
                        "prompt {index} has {} tokens but a slot's context holds {n_ctx_slot}; cut prompts shorter or use a larger context",
                        prompt.len()
                    ),
                ));
            }
            pending.insert(
                index,
                Pending {
                    blank: false,
                    tensors: filter.names.iter().map(|_| Rows::default()).collect(),
                    tokens: Vec::new(),
                    truncated,
                    done: None,
                    error: None,
                },
            );
            let job = Job {
                prompt,
                n_predict: opts.n_predict,
                sampling: opts.sampling.clone(),
                n_probs: opts.n_probs,
                ignore_eos: false,
                latents: (!filter.names.is_empty()).then(|| filter.clone()),
                // tokens.jsonl records logprob and entropy of every generated token.
                token_stats: true,
            };
            let tx = tx.clone();
            let sink = Box::new(move |ev: JobEvent| {
                let e = match ev {
                    JobEvent::Started { .. } => return true,
                    JobEvent::Frame(f) => Ev::Frame(index, f),
                    JobEvent::Token(t) => Ev::Token(index, t),
                    JobEvent::Done(d) => Ev::Done(index, d.reason, d.error),
                };
                // Blocking here is the backpressure that keeps the capture lossless.
                tx.send(e).is_ok()
            });
            match engine.submit(job, sink) {
                Ok(h) => handles.push((index, h)),
                Err(SubmitError::Invalid(e)) => {
                    return Err(Error::new(
                        e.kind(),
                        format!("prompt {index}: {}", e.message()),
                    ))
                }
                Err(SubmitError::Busy) | Err(SubmitError::Stopped) => {
                    return Err(Error::new(
                        ErrorKind::Internal,
                        format!("the engine refused prompt {index}"),
                    ))
                }
            }
        }
        // Commit finished prompts in index order.
        while let Some(e) = pending.first_entry() {
            if e.get().done.is_none() {
                break;
            }
            let (index, p) = e.remove_entry();
            match p.done {
                Some(StopReason::Eos | StopReason::Limit) => {
                    if p.blank {
                        w.skip_blank(index);
                    } else {
                        w.commit(index, p)?;
                    }
                    progress(Progress {
                        done: index + 1 - range[0],
                        total,
                    });
                }
                _ if cancelled => return Ok(None),
                _ => {
                    let e = p.error.unwrap_or_else(|| {
                        Error::new(ErrorKind::Internal, "the prompt was cancelled")
                    });
                    return Err(Error::new(
                        e.kind(),
                        format!("prompt {index}: {}", e.message()),
                    ));
                }
            }
        }
        handles.retain(|(i, _)| pending.contains_key(i));
        if pending.is_empty() {
            if cancelled {
                return Ok(None);
            }
            if let Some(end) = end {
                return Ok(Some(end));
            }
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(ev) => on_event(&mut pending, ev, w)?,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(Error::new(ErrorKind::Internal, "the engine stopped"))
            }
        }
        while let Ok(ev) = rx.try_recv() {
            on_event(&mut pending, ev, w)?;
        }
    }
}

fn on_event(pending: &mut BTreeMap<u64, Pending>, ev: Ev, w: &mut Writer) -> Result<()> {
    match ev {
        Ev::Frame(i, f) => {
            let Some(p) = pending.get_mut(&i) else {
                return Ok(());
            };
            let t = f.header.tensor_index as usize;
            let width = f.header.width as usize;
            if let Some(info) = w.m.tensors.get_mut(t) {
                if info.width == 0 {
                    info.width = width;
                } else if info.width != width {
                    return Err(Error::new(
                        ErrorKind::Internal,
                        format!(
                            "tensor {} changed width {} -> {width}",
                            info.name, info.width
                        ),
                    ));
                }
            }
            if let Some(r) = p.tensors.get_mut(t) {
                r.data.extend_from_slice(&f.data);
                r.pos.extend(f.rows.iter().map(|r| r.pos));
                r.seq.extend(f.rows.iter().map(|r| r.seq_id));
            }
        }
        Ev::Token(i, t) => {
            if let Some(p) = pending.get_mut(&i) {
                p.tokens.push(t);
            }
        }
        Ev::Done(i, reason, error) => {
            if let Some(p) = pending.get_mut(&i) {
                p.done = Some(reason);
                p.error = error;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_contiguous_and_cover_the_file() {
        for total in [0u64, 1, 2, 50, 1_000_003] {
            for n in 1..=7 {
                let mut next = 0;
                for i in 0..n {
                    let [lo, hi] = share(total, i, n);
                    assert_eq!(lo, next);
                    assert!(hi - lo <= total / n as u64 + 1);
                    next = hi;
                }
                assert_eq!(next, total);
            }
        }
    }

    #[test]
    fn lines_are_counted_with_or_without_a_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.txt");
        for (text, n) in [
            ("", 0),
            ("a", 1),
            ("a\n", 1),
            ("a\n\nb", 3),
            ("a\r\nb\n", 2),
        ] {
            std::fs::write(&p, text).unwrap();
            assert_eq!(count_lines(&p).unwrap(), n, "{text:?}");
        }
    }

    #[test]
    fn prompts_keep_their_line_index() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.jsonl");
        std::fs::write(&p, "{\"t\": \"a\"}\n\n{\"t\": \" \"}\r\n{\"t\": \"b\"}").unwrap();
        let mut r = PromptReader::open(&PromptSource::File(p), "t").unwrap();
        let mut got = Vec::new();
        while let Some(x) = r.next_prompt().unwrap() {
            got.push(x);
        }
        let want = vec![
            (0, Some("a".to_string())),
            (1, None),
            (2, None),
            (3, Some("b".to_string())),
        ];
        assert_eq!(got, want);
    }
}
