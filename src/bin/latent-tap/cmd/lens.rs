//! `lens`: generate from a prompt, read every layer's residual rows through
//! the model's own final norm and unembedding (the logit lens) and write
//! `lens.jsonl`, `lens.safetensors`, `lens.html` and `lens.png` to --out; print
//! each position's top-1 per layer.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};

use latent_tap::engine::{ContextOptions, Model, SamplingOptions};
use latent_tap::lens::{
    inputs_from_collected, jsonl_lines, write_dense, LayerSpec, Lens, LensInput, LensRow,
    OwnedInput,
};
use latent_tap::output::{collect, Collected};
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator};
use latent_tap::{settings, Error, ErrorKind, Result};

use crate::args::{load, rows_arg, ModelArgs};
use crate::outdir::OutDir;
use crate::stdout::to_stdout;

/// What `lens` writes, in commit order.
pub const LENS_OUTPUTS: [&str; 4] = ["lens.jsonl", "lens.safetensors", "lens.html", "lens.png"];

#[derive(Args)]
pub struct LensArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Tokens to generate (at least 1).
    #[arg(long, short = 'n', default_value_t = 8)]
    pub n_predict: usize,
    /// Layers read: all, or a filter (4..12 half-open, 4..=12, 7, 0,3,5..8).
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Alternatives per (layer, position), 1 to 20.
    #[arg(long, default_value_t = settings::DEFAULT_LENS_TOP_K)]
    pub top_k: usize,
    /// Rows read: all, or last (the prompt's last token and every generated one).
    #[arg(long, default_value = "all")]
    pub rows: String,
    /// What each row is scored against: next (the token that came next), a
    /// token id, or text that is one token (e.g. " Paris").
    #[arg(long, default_value = "next")]
    pub target: String,
    /// Tuned-lens translators (safetensors: layers.N.weight [n_embd, n_embd],
    /// layers.N.bias [n_embd]; applied as h + A·h + b).
    #[arg(long, value_name = "FILE")]
    pub translators: Option<PathBuf>,
    /// Sampling temperature: 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temp: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,
    /// Context size in tokens.
    #[arg(long, short = 'c', default_value_t = 4096)]
    pub ctx_size: u32,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// A lens target (`flag`: the option that gave it) against the model's vocabulary.
pub fn target_token(model: &Model, s: &str, flag: &str) -> Result<Option<i32>> {
    if s == "next" {
        return Ok(None);
    }
    if let Ok(id) = s.parse::<i64>() {
        if id < 0 || id >= model.n_vocab() as i64 {
            return Err(Error::invalid(format!(
                "{flag} {id} is out of range 0..{}",
                model.n_vocab()
            )));
        }
        return Ok(Some(id as i32));
    }
    match model.tokenize(s, false)?.as_slice() {
        [one] => Ok(Some(*one)),
        many => Err(Error::invalid(format!(
            "{flag} '{s}' is {} tokens; give text that is one token, a token id, or next",
            many.len()
        ))),
    }
}

/// A piece for a table cell: control characters shown, at most 10 characters.
pub fn cell_text(s: &str) -> String {
    let t: String = s.escape_debug().collect();
    if t.chars().count() > 10 {
        format!("{}…", t.chars().take(9).collect::<String>())
    } else {
        t
    }
}

/// The lens of a run, prepared before it generates (so a bad setting or a
/// model the lens cannot read costs no generation): `lens` and `capture --lens`.
pub struct LensPlan {
    lens: Lens,
    layers: Vec<usize>,
    top_k: usize,
    target: Option<i32>,
}

impl LensPlan {
    /// Settings checked without the model; errors name the options
    /// (`flags`: the layers option, the top-k option).
    pub fn check(layers: &str, top_k: usize, flags: [&str; 2]) -> Result<LayerSpec> {
        settings::check_lens_top_k(top_k)
            .map_err(|e| Error::invalid(format!("{}: {}", flags[1], e.message())))?;
        LayerSpec::parse(layers)
            .map_err(|e| Error::invalid(format!("{}: {}", flags[0], e.message())))
    }

    /// The lens of `model` at `layers`, with `translators` and `target`
    /// (`(value, option name)`).
    pub fn new(
        model: &Model,
        layers: &LayerSpec,
        top_k: usize,
        target: (&str, &str),
        translators: Option<&std::path::Path>,
        threads: usize,
    ) -> Result<Self> {
        let layers = layers.resolve(model.n_layer())?;
        let mut lens = Lens::for_model(model, threads)?;
        if let Some(t) = translators {
            lens.load_translators(t)?;
        }
        Ok(Self {
            lens,
            layers,
            top_k,
            target: target_token(model, target.0, target.1)?,
        })
    }

    /// The lens's layers, in cell order.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Alternatives per cell.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Layers that have a translator.
    pub fn translated_layers(&self) -> Vec<usize> {
        self.lens.translated_layers()
    }

    /// The lens of the `l_out-N` rows of `collected`: each row scored against
    /// the fixed target, else the token that came next in its own sequence.
    pub fn compute(&self, collected: &Collected) -> Result<Vec<LensRow>> {
        let next: HashMap<(i32, i32), i32> = collected
            .tokens
            .iter()
            .map(|t| ((t.seq, t.pos), t.token))
            .collect();
        let inputs = inputs_from_collected(collected, self.lens.n_embd())?;
        let borrowed: Vec<LensInput> = inputs.iter().map(OwnedInput::as_input).collect();
        let fixed = self.target;
        let target = |seq: i32, pos: i32| fixed.or_else(|| next.get(&(seq, pos + 1)).copied());
        self.lens
            .compute(&borrowed, &self.layers, self.top_k, &target)
    }

    /// Vocabulary size of the lens's distributions.
    pub fn n_vocab(&self) -> usize {
        self.lens.n_vocab()
    }
}

/// Write `lens.jsonl` and `lens.safetensors` of `rows` as temporary files of `out_dir`.
pub fn write_lens_data(
    out_dir: &mut OutDir,
    plan: &LensPlan,
    rows: &[LensRow],
    piece: &dyn Fn(i32) -> String,
    model: &Model,
) -> Result<()> {
    let io = |p: &std::path::Path, e: std::io::Error| {
        Error::new(ErrorKind::Io, format!("writing {}: {e}", p.display()))
    };
    let tmp = out_dir.temp(LENS_OUTPUTS[0]);
    let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?);
    for line in jsonl_lines(plan.layers(), rows, piece) {
        serde_json::to_writer(&mut w, &line).map_err(|e| io(&tmp, e.into()))?;
        w.write_all(b"\n").map_err(|e| io(&tmp, e))?;
    }
    w.flush().map_err(|e| io(&tmp, e))?;
    let tmp = out_dir.temp(LENS_OUTPUTS[1]);
    write_dense(
        &tmp,
        plan.layers(),
        rows,
        plan.top_k(),
        &[("model", model.path().display().to_string())],
    )
}

pub fn lens(a: LensArgs) -> Result<()> {
    let layer_spec = LensPlan::check(&a.layers, a.top_k, ["--layers", "--top-k"])?;
    let rows = rows_arg(&a.rows)?;
    if a.n_predict == 0 {
        return Err(Error::invalid("--n-predict must be at least 1"));
    }
    a.model.options()?;
    let ctx_opts = ContextOptions {
        n_ctx: a.ctx_size,
        n_threads: a.model.threads,
        ..ContextOptions::default()
    };
    ctx_opts.validate()?;
    let out_dir = OutDir::prepare(&a.out)?;
    let model = load(&a.model)?;
    let threads = ctx_opts.threads().max(1) as usize;
    let plan = LensPlan::new(
        &model,
        &layer_spec,
        a.top_k,
        (&a.target, "--target"),
        a.translators.as_deref(),
        threads,
    )?;
    let prompt = model.tokenize(&a.prompt, true)?;
    let spec = CaptureSpec {
        patterns: vec!["l_out-*".into()],
        rows,
        ..CaptureSpec::default()
    };
    let (mut gen, stream) = Generator::new(model.clone(), &ctx_opts, &spec)?;
    let selection = gen.selection().to_vec();
    let consumer = std::thread::spawn(move || collect(stream, &selection, spec.dtype));
    let opts = GenerateOptions {
        n_predict: a.n_predict,
        sampling: SamplingOptions {
            temperature: a.temp,
            seed: a.seed,
            ..SamplingOptions::default()
        },
        n_probs: 0,
    };
    opts.validate()?;
    let run = gen.run(std::slice::from_ref(&prompt), &opts, &mut |_| {});
    drop(gen);
    let collected = consumer
        .join()
        .map_err(|_| Error::new(ErrorKind::Internal, "consumer thread panicked"))??;
    run?;

    let mut toks: Vec<_> = collected.tokens.iter().collect();
    toks.sort_by_key(|t| t.pos);
    let lens_rows = plan.compute(&collected)?;
    let layers = plan.layers().to_vec();
    let piece = |id: i32| model.token_piece(id);
    let lens_v = latent_tap::lens::lens_json(&layers, plan.n_vocab(), &lens_rows, &piece);
    let data = json!({
        "prompt": a.prompt,
        "tokens": toks.iter().map(|t| json!({"id": t.token, "piece": t.piece, "pos": t.pos})).collect::<Vec<_>>(),
        "lens": lens_v,
    });

    let mut out_dir = out_dir;
    write_lens_data(&mut out_dir, &plan, &lens_rows, &piece, &model)?;
    write_views(&mut out_dir, &data)?;
    out_dir.commit_names(&LENS_OUTPUTS)?;
    to_stdout(|out| table(out, &layers, &lens_rows, &toks, &piece, &a.out))
}

/// `lens.html` and `lens.png` of `data` as temporary files of `out_dir`.
fn write_views(out_dir: &mut OutDir, data: &Value) -> Result<()> {
    let tmp = out_dir.temp(LENS_OUTPUTS[2]);
    std::fs::write(&tmp, latent_tap::view::static_html(data))
        .map_err(|e| Error::new(ErrorKind::Io, format!("writing {}: {e}", tmp.display())))?;
    let tmp = out_dir.temp(LENS_OUTPUTS[3]);
    latent_tap::view::heatmap_png(data, &tmp)
}

/// Per position: the token, what came next, and each layer's top-1.
fn table(
    out: &mut dyn Write,
    layers: &[usize],
    rows: &[LensRow],
    toks: &[&latent_tap::output::TokenEvent],
    piece: &dyn Fn(i32) -> String,
    dir: &std::path::Path,
) -> std::io::Result<()> {
    write!(out, "{:>4} {:<12} {:<12}", "pos", "token", "next")?;
    for l in layers {
        write!(out, " {:<12}", format!("L{l}"))?;
    }
    writeln!(out)?;
    for r in rows {
        let tok = toks
            .iter()
            .find(|t| t.pos == r.pos)
            .map_or(String::new(), |t| cell_text(&t.piece));
        let next = r.target.map_or(String::new(), |t| cell_text(&piece(t)));
        write!(out, "{:>4} {:<12} {:<12}", r.pos, tok, next)?;
        for c in &r.cells {
            let s = c
                .as_ref()
                .and_then(|c| c.top.first())
                .map_or("-".to_string(), |t| cell_text(&piece(t.0)));
            write!(out, " {s:<12}")?;
        }
        writeln!(out)?;
    }
    writeln!(
        out,
        "wrote {} (lens.jsonl, lens.safetensors, lens.html, lens.png)",
        dir.display()
    )
}
