//! Where a dataset capture's prompts come from: a file or standard input,
//! plain text (one prompt per line) or JSON Lines; and this process's share.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};

/// Where prompts come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptSource {
    /// A file.
    File(PathBuf),
    /// Standard input.
    Stdin,
}

/// Count the lines of a prompt file (a last line without a newline counts).
pub fn count_lines(path: &Path) -> Result<u64> {
    let mut f = File::open(path).map_err(|e| Error::io(path, "reading", e))?;
    let mut buf = vec![0u8; 1 << 16];
    let (mut n, mut last) = (0u64, b'\n');
    loop {
        let k = f
            .read(&mut buf)
            .map_err(|e| Error::io(path, "reading", e))?;
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

/// Reads prompts line by line, keeping each one's line index.
pub(crate) struct PromptReader {
    lines: Box<dyn BufRead>,
    name: String,
    field: String,
    jsonl: Option<bool>,
    next: u64,
    buf: String,
}

impl PromptReader {
    pub(crate) fn open(src: &PromptSource, field: &str) -> Result<Self> {
        let (lines, name): (Box<dyn BufRead>, String) = match src {
            PromptSource::File(p) => (
                Box::new(BufReader::new(
                    File::open(p).map_err(|e| Error::io(p, "reading", e))?,
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

    /// Lines read so far.
    pub(crate) fn lines_read(&self) -> u64 {
        self.next
    }

    /// The next line: its index and text (`None` for a blank line).
    pub(crate) fn next_prompt(&mut self) -> Result<Option<(u64, Option<String>)>> {
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
