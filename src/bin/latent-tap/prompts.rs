//! The prompts of a single capture: `-p TEXT` and `-f FILE`, in command-line
//! order.

use std::io::Read;

use latent_tap::{Error, ErrorKind, Result};

use crate::args::CaptureArgs;

/// Where each prompt came from, in command-line order.
#[derive(Debug, Clone)]
pub enum Source {
    /// The i-th `-p`.
    Arg(usize),
    /// The i-th `-f`.
    File(usize),
}

pub fn prompt_order(m: &clap::ArgMatches) -> Vec<Source> {
    let mut v: Vec<(usize, Source)> = Vec::new();
    if let Some(ix) = m.indices_of("prompt") {
        v.extend(ix.enumerate().map(|(i, at)| (at, Source::Arg(i))));
    }
    if let Some(ix) = m.indices_of("file") {
        v.extend(ix.enumerate().map(|(i, at)| (at, Source::File(i))));
    }
    v.sort_by_key(|(at, _)| *at);
    v.into_iter().map(|(_, s)| s).collect()
}

/// Largest prompt file accepted.
const MAX_PROMPT_FILE: u64 = 64 << 20;

/// Read the prompts in order; name the source of any bad one.
pub fn read_prompts(a: &CaptureArgs, order: &[Source]) -> Result<Vec<(String, String)>> {
    if order.is_empty() {
        return Err(Error::invalid(
            "no prompt: give one or more -p TEXT or -f FILE",
        ));
    }
    let mut stdin_used = false;
    let mut out = Vec::with_capacity(order.len());
    for (seq, src) in order.iter().enumerate() {
        let (text, label) = match *src {
            Source::Arg(i) => (a.prompt[i].clone(), format!("-p #{}", i + 1)),
            Source::File(i) => {
                let path = &a.file[i];
                let label = format!("-f {}", path.display());
                let mut bytes = Vec::new();
                let r = if path.as_os_str() == "-" {
                    if stdin_used {
                        return Err(Error::invalid("-f - (standard input) given twice"));
                    }
                    stdin_used = true;
                    std::io::stdin()
                        .lock()
                        .take(MAX_PROMPT_FILE + 1)
                        .read_to_end(&mut bytes)
                } else {
                    std::fs::File::open(path)
                        .and_then(|f| f.take(MAX_PROMPT_FILE + 1).read_to_end(&mut bytes))
                };
                let what = if path.as_os_str() == "-" {
                    "standard input".to_string()
                } else {
                    format!("prompt file '{}'", path.display())
                };
                r.map_err(|e| Error::new(ErrorKind::Io, format!("cannot read {what}: {e}")))?;
                if bytes.len() as u64 > MAX_PROMPT_FILE {
                    return Err(Error::invalid(format!(
                        "{what} is larger than {} MiB",
                        MAX_PROMPT_FILE >> 20
                    )));
                }
                let mut text = String::from_utf8(bytes).map_err(|e| {
                    Error::invalid(format!(
                        "{what} is not valid UTF-8 (at byte {})",
                        e.utf8_error().valid_up_to()
                    ))
                })?;
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                (text, label)
            }
        };
        if text.is_empty() {
            return Err(Error::invalid(format!(
                "empty prompt for sequence {seq} ({label})"
            )));
        }
        out.push((text, label));
    }
    Ok(out)
}
