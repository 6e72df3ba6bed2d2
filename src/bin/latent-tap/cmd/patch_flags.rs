//! `capture --patch TENSOR:POS[=[SRC_TENSOR:]SRC_POS] --patch-from RUN`:
//! activation patching from the CLI. Each `--patch` names a row to replace (a
//! graph node computed once with `n_embd`-wide rows, at a position, or every
//! position of a range `A..B` / `A..=B`) and where its new values come from:
//! the row of the same tensor at the same position of the run `RUN` (a
//! `capture --out` directory or a safetensors file in its layout), or another
//! position (`=7`), or another tensor and position (`=l_out-10:3`, e.g. for
//! Patchscopes). Rows come from the source's first sequence (`seq` 0: its
//! first prompt). The flags are checked as far as they can be without the
//! model; [`PatchFlags::patches`] checks them against it.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use latent_tap::engine::Model;
use latent_tap::output::{read_rows, StoredRows};
use latent_tap::steer::{Patch, Positions};
use latent_tap::{Error, Result};

use crate::args::CaptureArgs;

/// Where a patched row's values come from.
#[derive(Debug, Clone, PartialEq)]
struct Source {
    tensor: String,
    /// `None`: the patched row's own position.
    pos: Option<i32>,
}

/// One `--patch` flag.
#[derive(Debug, Clone, PartialEq)]
struct Spec {
    arg: String,
    tensor: String,
    /// One position (`start + 1 == end`) or a range.
    start: i32,
    end: i32,
    source: Source,
}

/// The patching flags, parsed.
#[derive(Debug)]
pub struct PatchFlags {
    from: PathBuf,
    specs: Vec<Spec>,
}

fn pos_of(text: &str, arg: &str) -> Result<i32> {
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|&p| p >= 0)
        .ok_or_else(|| {
            Error::invalid(format!(
                "--patch {arg}: '{text}' is not a position (a whole number from 0)"
            ))
        })
}

impl Spec {
    fn parse(arg: &str) -> Result<Self> {
        let usage = || {
            Error::invalid(format!(
                "--patch {arg}: use TENSOR:POS, TENSOR:A..B, TENSOR:POS=SRC_POS or TENSOR:POS=SRC_TENSOR:SRC_POS (e.g. l_out-6:3)"
            ))
        };
        // The source follows the first '=' that is not the one of a range's `..=`.
        let sep = arg
            .char_indices()
            .find(|&(i, c)| c == '=' && !arg[..i].ends_with(".."))
            .map(|(i, _)| i);
        let (dest, src) = match sep {
            Some(i) => (&arg[..i], Some(&arg[i + 1..])),
            None => (arg, None),
        };
        let (tensor, pos) = dest.rsplit_once(':').ok_or_else(usage)?;
        if tensor.is_empty() || pos.is_empty() {
            return Err(usage());
        }
        let (start, end) = if pos.contains("..") {
            match Positions::parse(pos) {
                Ok(Positions::Range { start, end }) => (start, end),
                _ => return Err(usage()),
            }
        } else {
            let p = pos_of(pos, arg)?;
            (p, p + 1)
        };
        let source = match src {
            None => Source {
                tensor: tensor.to_string(),
                pos: None,
            },
            Some(_) if end - start != 1 => {
                return Err(Error::invalid(format!(
                    "--patch {arg}: a range takes its rows from the same positions; a source (=...) needs one position"
                )))
            }
            Some(s) => match s.rsplit_once(':') {
                Some((t, p)) if !t.is_empty() => Source {
                    tensor: t.to_string(),
                    pos: Some(pos_of(p, arg)?),
                },
                Some(_) => return Err(usage()),
                None => Source {
                    tensor: tensor.to_string(),
                    pos: Some(pos_of(s, arg)?),
                },
            },
        };
        Ok(Self {
            arg: arg.to_string(),
            tensor: tensor.to_string(),
            start,
            end,
            source,
        })
    }
}

/// The safetensors file of a run: `RUN/latents.safetensors` for a directory.
fn source_file(from: &Path) -> Result<PathBuf> {
    if from.is_dir() {
        let f = from.join("latents.safetensors");
        if !f.is_file() {
            return Err(Error::invalid(format!(
                "--patch-from {}: no latents.safetensors there (give a `capture --out` directory or a .safetensors file)",
                from.display()
            )));
        }
        return Ok(f);
    }
    if !from.is_file() {
        return Err(Error::invalid(format!(
            "--patch-from {}: no such file or directory",
            from.display()
        )));
    }
    Ok(from.to_path_buf())
}

impl PatchFlags {
    /// `None` without `--patch`; `--patch` needs `--patch-from` and the other
    /// way round.
    pub fn check(a: &CaptureArgs) -> Result<Option<Self>> {
        match (&a.patch_from, a.patch.is_empty()) {
            (None, true) => return Ok(None),
            (None, false) => {
                return Err(Error::invalid(
                    "--patch needs --patch-from RUN (the capture whose rows are written)",
                ))
            }
            (Some(_), true) => {
                return Err(Error::invalid(
                    "--patch-from needs at least one --patch TENSOR:POS",
                ))
            }
            (Some(_), false) => {}
        }
        let from = source_file(a.patch_from.as_deref().unwrap_or(Path::new("")))?;
        let specs = a
            .patch
            .iter()
            .map(|p| Spec::parse(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self { from, specs }))
    }

    /// The patches for `model` with a context of `n_ctx` positions, each row
    /// read from the source run. Errors name the flag: a tensor or position
    /// the source lacks, a row of another width (another model).
    pub fn patches(&self, model: &Model, n_ctx: usize) -> Result<Vec<Patch>> {
        let n_embd = model.n_embd();
        let mut read: Vec<(String, StoredRows)> = Vec::new();
        let mut out: Vec<Patch> = Vec::new();
        for s in &self.specs {
            let named = |e: Error| {
                Error::with_source(e.kind(), format!("--patch {}: {}", s.arg, e.message()), e)
            };
            if !read.iter().any(|(t, _)| *t == s.source.tensor) {
                let rows = read_rows(&self.from, &s.source.tensor).map_err(named)?;
                read.push((s.source.tensor.clone(), rows));
            }
            let rows = &read.iter().find(|(t, _)| *t == s.source.tensor).unwrap().1;
            if rows.width != n_embd {
                return Err(named(Error::invalid(format!(
                    "{}'s rows in {} are {} wide but the model's n_embd is {n_embd}",
                    s.source.tensor,
                    self.from.display(),
                    rows.width
                ))));
            }
            for pos in s.start..s.end {
                let src = s.source.pos.unwrap_or(pos);
                let row = rows.row(0, src).ok_or_else(|| {
                    let have = rows.positions(0);
                    named(Error::invalid(format!(
                        "{} has no {} row at position {src} in sequence 0 (it has positions {})",
                        self.from.display(),
                        s.source.tensor,
                        latent_tap::steer::layer_list(have.iter().map(|&p| p as usize))
                    )))
                })?;
                let p = Patch::new(&s.tensor, i64::from(pos), row.to_vec(), n_embd, n_ctx)
                    .map_err(named)?;
                out.retain(|q| (q.tensor.as_str(), q.pos) != (s.tensor.as_str(), pos));
                out.push(p);
            }
        }
        Ok(out)
    }

    /// The manifest's `patch`: the source and each row written.
    pub fn manifest(&self, patches: &[Patch]) -> Value {
        json!({
            "from": self.from,
            "args": self.specs.iter().map(|s| s.arg.clone()).collect::<Vec<_>>(),
            "sequences": "all",
            "rows": patches.iter().map(|p| {
                let spec = self.specs.iter().rev().find(|s| s.tensor == p.tensor && (s.start..s.end).contains(&p.pos));
                let src = spec.map(|s| json!({"tensor": s.source.tensor, "pos": s.source.pos.unwrap_or(p.pos), "seq": 0}));
                json!({"tensor": p.tensor, "pos": p.pos, "norm": p.norm(), "source": src})
            }).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(a: &str) -> (String, i32, i32, String, Option<i32>) {
        let s = Spec::parse(a).unwrap();
        (s.tensor, s.start, s.end, s.source.tensor, s.source.pos)
    }

    #[test]
    fn patch_specs_parse_and_refuse() {
        let t = |x: &str| x.to_string();
        assert_eq!(spec("l_out-6:3"), (t("l_out-6"), 3, 4, t("l_out-6"), None));
        assert_eq!(
            spec("l_out-6:0..4"),
            (t("l_out-6"), 0, 4, t("l_out-6"), None)
        );
        assert_eq!(
            spec("l_out-6:0..=4"),
            (t("l_out-6"), 0, 5, t("l_out-6"), None)
        );
        assert_eq!(
            spec("l_out-6:3=7"),
            (t("l_out-6"), 3, 4, t("l_out-6"), Some(7))
        );
        assert_eq!(
            spec("attn_out-2:5=l_out-10:1"),
            (t("attn_out-2"), 5, 6, t("l_out-10"), Some(1))
        );
        let e = |a: &str| Spec::parse(a).unwrap_err().message().to_string();
        assert!(e("l_out-6").contains("use TENSOR:POS"));
        assert!(e("l_out-6:").contains("use TENSOR:POS"));
        assert!(e(":3").contains("use TENSOR:POS"));
        assert!(e("l_out-6:x").contains("'x' is not a position"));
        assert!(e("l_out-6:-1").contains("'-1' is not a position"));
        assert!(e("l_out-6:4..2").contains("use TENSOR:POS"));
        assert!(e("l_out-6:0..4=3").contains("a source (=...) needs one position"));
        assert!(e("l_out-6:3=l_out-2:").contains("'' is not a position"));
        assert!(e("l_out-6:3=:2").contains("use TENSOR:POS"));
    }
}
