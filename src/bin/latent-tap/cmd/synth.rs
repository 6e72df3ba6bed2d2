//! `synth-model`: write a tiny random-weight llama GGUF.

use std::path::Path;

use latent_tap::{Error, ErrorKind, Result};

use crate::stdout::to_stdout;

/// Write a random-weight model to `out` and name it on stdout.
pub fn synth(out: &Path, layers: usize, embd: usize, seed: u64) -> Result<()> {
    // Bounds live in SynthConfig::validate (one place for the library and the CLI).
    let cfg = latent_tap::synth::SynthConfig {
        n_layer: layers,
        n_embd: embd,
        n_ff: embd.saturating_mul(2),
        seed,
        ..Default::default()
    };
    cfg.validate()?;
    latent_tap::synth::SynthModel::random(cfg)
        .write_gguf(out)
        .map_err(|e| Error::new(ErrorKind::Io, format!("writing {}: {e}", out.display())))?;
    to_stdout(|w| writeln!(w, "wrote {}", out.display()))
}
