//! Output directories: made and probed before any model loads (capture,
//! dataset, listen), and the atomic commit of a single capture's files.

use std::path::{Path, PathBuf};

use latent_tap::{Error, ErrorKind, Result};

/// The output files, in the order they are committed (manifest last).
pub const OUTPUTS: [&str; 3] = ["tokens.jsonl", "latents.safetensors", "manifest.json"];

/// The output directory of one run. Made and probed before the model loads;
/// files are written to `.NAME.tmp-PID` and renamed into place at the end, so a
/// failed run leaves earlier outputs as they were. Until [`OutDir::commit`],
/// dropping it removes our temporary files and the directories it created.
pub struct OutDir {
    dir: PathBuf,
    created: Vec<PathBuf>,
    temps: Vec<PathBuf>,
    committed: bool,
}

impl OutDir {
    /// Make `dir` writable (noting the directories created), refuse output names taken
    /// by directories, and remove stale temporary files of dead runs.
    pub fn prepare(dir: &Path) -> Result<Self> {
        let mut created = Vec::new();
        let mut p = Some(dir);
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            created.push(d.to_path_buf());
            p = d.parent();
        }
        created.reverse();
        let mut me = Self {
            dir: dir.to_path_buf(),
            created,
            temps: Vec::new(),
            committed: false,
        };
        make_out_dir(dir)?;
        for name in OUTPUTS {
            let p = dir.join(name);
            if p.is_dir() {
                return Err(Error::invalid(format!(
                    "'{}' is a directory; cannot write the output file there",
                    p.display()
                )));
            }
        }
        me.clean_stale();
        Ok(me)
    }

    /// Remove temporary files left by earlier runs that are no longer alive.
    fn clean_stale(&mut self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((base, pid)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-"))
            else {
                continue;
            };
            let ours = OUTPUTS.contains(&base)
                || crate::cmd::patch_sweep::SWEEP_OUTPUTS.contains(&base)
                || base == "latent-tap-probe";
            let alive = pid.parse::<u32>().is_ok_and(|pid| {
                pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists()
            });
            if ours && !alive {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// A temporary path for output `name`.
    pub fn temp(&mut self, name: &str) -> PathBuf {
        let p = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        self.temps.push(p.clone());
        p
    }

    /// Rename the temporary files of `names` into place, in that order.
    pub fn commit_names(mut self, names: &[&str]) -> Result<()> {
        for &name in names {
            let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
            let dst = self.dir.join(name);
            std::fs::rename(&tmp, &dst).map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    format!("cannot move {} into place: {e}", dst.display()),
                )
            })?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for t in &self.temps {
            let _ = std::fs::remove_file(t);
        }
        // Only directories this run made, deepest first, and only if still empty.
        for d in self.created.iter().rev() {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
        }
    }
}
/// Create the output directory `dir` (refusing a file of that name) and check
/// that it is writable, before any model loads (capture, dataset, listen).
pub fn make_out_dir(dir: &Path) -> Result<()> {
    let show = dir.display();
    if dir.exists() && !dir.is_dir() {
        return Err(Error::invalid(format!(
            "output directory '{show}' exists and is not a directory"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("cannot create output directory '{show}': {e}"),
        )
    })?;
    probe_writable(dir)
}

/// Write and remove a small file in `dir`, so an unwritable output directory is
/// found before the model loads.
fn probe_writable(dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".latent-tap-probe.tmp-{}", std::process::id()));
    std::fs::write(&probe, b"probe").map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("cannot write in output directory '{}': {e}", dir.display()),
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}
