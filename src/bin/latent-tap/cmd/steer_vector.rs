//! `steer-vector`: a control vector from two prompt sets, by the mean of their
//! residual-stream differences (the `mean` method of llama.cpp's
//! `cvector-generator`), written in llama.cpp's control-vector GGUF format.

use std::path::{Path, PathBuf};

use clap::Args;

use latent_tap::engine::{ContextOptions, Model};
use latent_tap::lens::layer_of_name;
use latent_tap::output::collect;
use latent_tap::select::LayerFilter;
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator};
use latent_tap::steer::MeanDifference;
use latent_tap::{Error, ErrorKind, Result};

use crate::args::{load, ModelArgs};

#[derive(Args)]
pub struct SteerVectorArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Positive prompts, one per line (blank lines skipped; `\n` and llama.cpp's
    /// other escapes are processed, as cvector-generator does).
    #[arg(long, value_name = "FILE")]
    pub positive: PathBuf,
    /// Negative prompts, one per line, paired with the positive ones by order.
    #[arg(long, value_name = "FILE")]
    pub negative: PathBuf,
    /// Control vector to write (GGUF; `serve --control-vector`, llama.cpp's
    /// `--control-vector` read it).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Directions written, by the layer they steer (direction.N is added to
    /// l_out-N): all, or a filter (4..12 half-open, 4..=12, 7, 0,3,5..8).
    #[arg(long)]
    pub layers: Option<String>,
    /// Context size in tokens.
    #[arg(long, short = 'c', default_value_t = 4096)]
    pub ctx_size: u32,
}

/// A prompt line with llama.cpp's escapes processed (`\n`, `\r`, `\t`, `\'`,
/// `\"`, `\\`, `\xHH`), as `cvector-generator` reads its files.
fn unescape(line: &str) -> String {
    let mut out = Vec::with_capacity(line.len());
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            let c = b[i + 1];
            let hex = (c == b'x' && i + 3 < b.len())
                .then(|| std::str::from_utf8(&b[i + 2..i + 4]).ok())
                .flatten()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            let (byte, used) = match c {
                b'n' => (Some(b'\n'), 2),
                b'r' => (Some(b'\r'), 2),
                b't' => (Some(b'\t'), 2),
                b'\'' | b'"' | b'\\' => (Some(c), 2),
                b'x' if hex.is_some() => (hex, 4),
                _ => (None, 0),
            };
            if let Some(x) = byte {
                out.push(x);
                i += used;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The non-blank lines of `path`, escapes processed.
fn prompts(path: &Path, flag: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("{flag} {}: cannot read it: {e}", path.display()),
        )
    })?;
    let v: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(unescape)
        .collect();
    if v.is_empty() {
        return Err(Error::invalid(format!(
            "{flag} {}: no prompts (one per line)",
            path.display()
        )));
    }
    Ok(v)
}

/// Every `l_out-N` row of one prompt alone: layer → rows `[n_tokens, n_embd]`.
fn residual_rows(
    model: &std::sync::Arc<Model>,
    ctx: &ContextOptions,
    tokens: &[i32],
) -> Result<Vec<(usize, Vec<f32>)>> {
    let spec = CaptureSpec {
        patterns: vec!["l_out-*".into()],
        ..CaptureSpec::default()
    };
    let (mut gen, stream) = Generator::new(model.clone(), ctx, &spec)?;
    let selection = gen.selection().to_vec();
    let consumer = std::thread::spawn(move || collect(stream, &selection, spec.dtype));
    // One token generated: the prompt is decoded once, nothing after it.
    let opts = GenerateOptions {
        n_predict: 1,
        ..GenerateOptions::default()
    };
    let run = gen.run(&[tokens.to_vec()], &opts, &mut |_| {});
    drop(gen);
    let collected = consumer
        .join()
        .map_err(|_| Error::new(ErrorKind::Internal, "consumer thread panicked"))??;
    run?;
    let mut out = Vec::new();
    for t in &collected.tensors {
        let Some(layer) = layer_of_name(&t.name) else {
            continue;
        };
        // Position order; only the rows of every position count (the last
        // layer keeps the output row alone and makes no direction).
        if t.n_rows() != tokens.len() {
            continue;
        }
        let mut order: Vec<usize> = (0..t.n_rows()).collect();
        order.sort_by_key(|&i| t.pos[i]);
        out.push((layer, order.iter().flat_map(|&i| t.row_f32(i)).collect()));
    }
    Ok(out)
}

pub fn steer_vector(a: SteerVectorArgs) -> Result<()> {
    let keep = a
        .layers
        .as_deref()
        .map(LayerFilter::parse)
        .transpose()
        .map_err(|e| Error::invalid(format!("--layers: {}", e.message())))?;
    // The output's folder must exist before any work is done.
    let folder = a.out.parent().filter(|p| !p.as_os_str().is_empty());
    if folder.is_some_and(|d| !d.is_dir()) {
        return Err(Error::invalid(format!(
            "--out {}: its folder does not exist",
            a.out.display()
        )));
    }
    let pos = prompts(&a.positive, "--positive")?;
    let neg = prompts(&a.negative, "--negative")?;
    if pos.len() != neg.len() {
        return Err(Error::invalid(format!(
            "--positive has {} prompts and --negative {}: they are paired by line, so give as many of each",
            pos.len(),
            neg.len()
        )));
    }
    a.model.options()?;
    let ctx = ContextOptions {
        n_ctx: a.ctx_size,
        n_threads: a.model.threads,
        ..ContextOptions::default()
    };
    ctx.validate()?;
    let model = load(&a.model)?;
    let steerable = 1..model.n_layer();
    if let Some(f) = &keep {
        if !steerable.clone().any(|n| f.contains(n as i32)) {
            return Err(Error::invalid(format!(
                "--layers {} keeps none of the layers a direction can steer: 1..={}",
                a.layers.as_deref().unwrap_or(""),
                model.n_layer() - 1
            )));
        }
    }
    // cvector-generator pads the shorter prompt of a pair with the last token of " ".
    let pad = *model
        .tokenize(" ", false)?
        .last()
        .ok_or_else(|| Error::new(ErrorKind::Internal, "' ' tokenizes to nothing"))?;
    let mut acc = MeanDifference::new(model.n_embd());
    for (i, (p, n)) in pos.iter().zip(&neg).enumerate() {
        let (mut tp, mut tn) = (model.tokenize(p, true)?, model.tokenize(n, true)?);
        let len = tp.len().max(tn.len());
        tp.resize(len, pad);
        tn.resize(len, pad);
        let (rp, rn) = (
            residual_rows(&model, &ctx, &tp)?,
            residual_rows(&model, &ctx, &tn)?,
        );
        for ((lp, xp), (ln, xn)) in rp.iter().zip(&rn) {
            if lp != ln {
                return Err(Error::new(ErrorKind::Internal, "layers out of step"));
            }
            acc.add(*lp, xp, xn)?;
        }
        eprintln!("pair {}/{}: {len} tokens", i + 1, pos.len());
    }
    let v = acc.finish(&model.arch(), |n| {
        keep.as_ref().map_or(true, |f| f.contains(n as i32))
    })?;
    v.write(&a.out)?;
    let layers: Vec<String> = v.directions.keys().map(ToString::to_string).collect();
    println!(
        "wrote {}: {} directions (layers {}), n_embd {}, from {} pairs",
        a.out.display(),
        v.directions.len(),
        layers.join(","),
        v.n_embd,
        pos.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::unescape;

    #[test]
    fn escapes_as_llama_cpp_processes_them() {
        assert_eq!(unescape(r"a\nb\tc"), "a\nb\tc");
        assert_eq!(unescape(r#"q\"d\'s\\x"#), "q\"d's\\x");
        assert_eq!(unescape(r"\x41\x4a!"), "AJ!");
        assert_eq!(unescape(r"\q \x4 end\"), r"\q \x4 end\");
    }
}
