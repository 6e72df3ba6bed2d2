//! [`Writer`]: appends whole prompts to a run directory, spilling the open
//! shard's latents to one file per tensor until the shard closes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{remove_stale_temps, shard_name, write_atomic};
use super::{Checkpoint, Manifest, ShardInfo, TensorInfo, FORMAT};
use crate::error::{Error, ErrorKind, Result};
use crate::output::{header, EntryMeta};
use crate::record::Dtype;

/// One tensor's rows of one prompt (or of the open shard): latents in the
/// writer's dtype and, per row, its position and sequence.
#[derive(Debug, Default)]
pub struct PromptRows {
    /// Latents, rows back to back.
    pub data: Vec<u8>,
    /// Position of each row.
    pub pos: Vec<i32>,
    /// Sequence of each row.
    pub seq: Vec<i32>,
    prompt: Vec<i64>,
}

impl PromptRows {
    /// Bytes it adds to a shard (latents and index columns).
    pub fn bytes(&self) -> usize {
        self.data.len() + self.pos.len() * 16
    }
    fn clear(&mut self) {
        self.data.clear();
        self.pos.clear();
        self.seq.clear();
        self.prompt.clear();
    }
}

/// The run directory being written (by dataset capture and `latent-tap listen`).
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
    dtype: Dtype,
    shard_limit: usize,
    /// The open shard's index columns (its latents are in `cols`).
    open: Vec<PromptRows>,
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
    /// The run's manifest as it stands.
    pub m: Manifest,
    /// Latent bytes written by this writer.
    pub bytes: u64,
}

/// A tensor's latents of the open shard, on disk until the shard closes.
#[derive(Debug)]
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
            .map_err(|e| Error::io(&path, "creating", e))?;
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
    pub fn create(dir: &Path, dtype: Dtype, shard_limit: usize, m: Manifest) -> Result<Self> {
        remove_stale_temps(dir);
        let tokens_path = dir.join("tokens.jsonl");
        let tokens = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&tokens_path)
            .map_err(|e| Error::io(&tokens_path, "opening", e))?;
        Ok(Writer {
            dir: dir.to_path_buf(),
            dtype,
            shard_limit,
            open: m.tensors.iter().map(|_| PromptRows::default()).collect(),
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
    pub fn add_tensor(&mut self, name: &str, width: usize) -> Result<usize> {
        let i = self.m.tensors.len();
        self.cols.push(Col::new(&self.dir, i)?);
        self.open.push(PromptRows::default());
        self.m.tensors.push(TensorInfo {
            name: name.to_string(),
            width,
            dtype: self.dtype.safetensors_name().to_string(),
        });
        self.m.rows.entry(name.to_string()).or_insert(0);
        Ok(i)
    }

    /// The element type of the latents it writes.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Set the element type; only before the first tensor is added.
    pub fn set_dtype(&mut self, dtype: Dtype) {
        if self.m.tensors.is_empty() {
            self.dtype = dtype;
        }
    }

    fn manifest_path(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    /// A blank prompt: nothing to write.
    pub fn skip_blank(&mut self, index: u64) {
        self.m.prompts_blank += 1;
        self.committed = index + 1;
    }

    /// Append a finished prompt given as its rows per tensor (in the order of
    /// the manifest's tensors; missing trailing tensors hold no row) and its
    /// `tokens.jsonl` lines; close the open shard first if it would overflow.
    pub fn commit_lines(
        &mut self,
        index: u64,
        tensors: Vec<PromptRows>,
        lines: &[u8],
        n_lines: u64,
        truncated: Option<usize>,
    ) -> Result<()> {
        let add: usize = tensors.iter().map(PromptRows::bytes).sum();
        if self.open_bytes > 0 && self.open_bytes + add > self.shard_limit {
            self.close_shard(false)?;
        }
        // tokens.jsonl first, in one write: if it fails, the open shard is intact
        // (and what the write left past `tokens_bytes` is cut when the run stops).
        self.tokens
            .write_all(lines)
            .map_err(|e| Error::io(&self.tokens_path, "writing", e))?;
        if self.open_prompts.is_none() {
            self.open_start = Some(self.m.checkpoint(self.committed));
        }
        for ((dst, col), src) in self.open.iter_mut().zip(&mut self.cols).zip(tensors) {
            if let Err(e) = col.file.write_all(&src.data) {
                self.poisoned = true;
                return Err(Error::io(&col.path, "writing", e));
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
    pub fn rollback(&mut self) {
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
    pub fn close_shard(&mut self, partial: bool) -> Result<()> {
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
        .map_err(|e| Error::io(&path, "writing", e))
        .and_then(|()| {
            std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, "moving into place", e))
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
                .map_err(|e| Error::io(&c.path, "truncating", e))?;
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
            .map_err(|e| Error::io(&self.tokens_path, "writing", e))?;
        self.write_manifest()
    }

    /// Write the manifest (temp + rename).
    pub fn write_manifest(&self) -> Result<()> {
        write_atomic(
            &self.manifest_path(),
            &serde_json::to_vec_pretty(&self.m)
                .map_err(|e| Error::new(ErrorKind::Internal, format!("manifest: {e}")))?,
        )
    }

    /// Every prompt before this index is committed (to the open shard, a
    /// closed one, or skipped as blank).
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Lines of `tokens.jsonl` committed so far (earlier runs of a resumed one
    /// included): the `index` the next line gets.
    pub fn token_lines(&self) -> u64 {
        self.m.tokens
    }

    /// A commit failed half-way: the open shard's spill files cannot be
    /// trusted (only [`Writer::rollback`] is right then).
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// Cut `tokens.jsonl` to the lines the manifest counts (what a failed
    /// write left past them); best effort.
    pub fn cut_tokens(&mut self) {
        let _ = self.tokens.set_len(self.m.tokens_bytes);
    }
}
