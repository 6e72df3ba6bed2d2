//! Checks against llama.cpp's own outputs on the real Gemma 3 270M model.
//! Skipped (with a printed reason) when `scripts/fetch-model` has not run;
//! `.ci/run` fetches it, so CI runs these.

use std::path::PathBuf;
use std::sync::Arc;

use latent_tap::capture::Rows;
use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::output::{collect, Collected};
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator};

fn model() -> Option<Arc<Model>> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    if !p.exists() {
        eprintln!(
            "SKIPPED: {} is missing; run scripts/fetch-model",
            p.display()
        );
        return None;
    }
    Some(Model::load(&p, &ModelOptions::default()).expect("load model"))
}

fn run(
    model: &Arc<Model>,
    ctx: &ContextOptions,
    spec: &CaptureSpec,
    prompt: &str,
    n_predict: usize,
) -> (Generator, Collected) {
    let (mut gen, stream) = Generator::new(model.clone(), ctx, spec).expect("generator");
    let sel = gen.selection().to_vec();
    let dtype = spec.dtype;
    let consumer = std::thread::spawn(move || collect(stream, &sel, dtype));
    let toks = model.tokenize(prompt, true).unwrap();
    let opts = GenerateOptions {
        n_predict,
        n_probs: 5,
        ..Default::default()
    };
    gen.run(&[toks], &opts, &mut |_| {}).expect("run");
    let c = consumer.join().unwrap().expect("collect");
    (gen, c)
}

#[test]
fn result_tensors_equal_llama_outputs_exactly() {
    let Some(model) = model() else { return };
    let ctx = ContextOptions {
        n_ctx: 256,
        n_batch: 16,
        n_ubatch: 16,
        embeddings: true,
        ..Default::default()
    };
    let spec = CaptureSpec {
        patterns: vec!["result_norm,result_output".into()],
        ..Default::default()
    };
    let prompt = "The capital of France is";
    let n_prompt = model.tokenize(prompt, true).unwrap().len();
    // n_predict 1: the context's last decode is the prompt, whose outputs we compare.
    let (mut gen, c) = run(&model, &ctx, &spec, prompt, 1);
    let norm = c.tensor("result_norm").unwrap();
    let out = c.tensor("result_output").unwrap();
    assert_eq!(
        norm.n_rows(),
        n_prompt,
        "embeddings on: every prompt row is output"
    );
    assert_eq!(out.n_rows(), n_prompt);
    assert_eq!(norm.width, model.n_embd());
    assert_eq!(out.width, model.n_vocab());
    let ctx = gen.context_mut();
    for i in 0..n_prompt {
        assert_eq!(norm.pos[i], i as i32);
        let emb = ctx.embeddings_ith(i as i32).unwrap().to_vec();
        assert_eq!(
            norm.row_f32(i),
            emb,
            "result_norm row {i} differs from llama_get_embeddings_ith"
        );
        let logits = ctx.logits_ith(i as i32).unwrap().to_vec();
        assert!(
            out.row_f32(i) == logits,
            "result_output row {i} differs from llama_get_logits_ith"
        );
    }
    // The sampled token's logprob is log-softmax of llama.cpp's logits.
    let logits = ctx.logits_ith(n_prompt as i32 - 1).unwrap();
    let gen_tok = c.tokens.iter().find(|t| !t.prompt).unwrap();
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let want = logits[gen_tok.token as usize] as f64 - lse;
    let got = gen_tok.logprob.unwrap() as f64;
    assert!(
        (got - want).abs() <= 1e-5,
        "logprob {got} vs log-softmax {want}"
    );
    // Greedy: the sampled token is the argmax and heads the top-k list.
    let top = gen_tok.top.as_ref().unwrap();
    assert_eq!(top[0].0, gen_tok.token);
    assert_eq!(top.len(), 5);
}

#[test]
fn ubatch_split_keeps_rows_and_positions() {
    let Some(model) = model() else { return };
    let prompt = "Interpretability researchers read the residual stream of every layer, token by token, to see how a model thinks.";
    let spec = CaptureSpec::default();
    let big = ContextOptions {
        n_ctx: 256,
        ..Default::default()
    };
    let small = ContextOptions {
        n_ubatch: 8,
        n_batch: 16,
        ..big.clone()
    };
    let (_, a) = run(&model, &big, &spec, prompt, 4);
    let (_, b) = run(&model, &small, &spec, prompt, 4);
    let n_prompt = model.tokenize(prompt, true).unwrap().len();
    assert!(
        n_prompt > 16,
        "prompt must span several batches and ubatches"
    );
    let n_layer = model.n_layer();
    assert_eq!(a.tensors.len(), n_layer);
    for (ta, tb) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(ta.name, tb.name);
        assert_eq!(ta.pos, tb.pos, "{}: positions differ", ta.name);
        assert_eq!(ta.seq, tb.seq);
        let mut worst = 0f32;
        for i in 0..ta.n_rows() {
            for (x, y) in ta.row_f32(i).iter().zip(tb.row_f32(i)) {
                worst = worst.max((x - y).abs() / x.abs().max(1.0));
            }
        }
        assert!(worst <= 1e-3, "{}: max rel diff {worst}", ta.name);
    }
    // Every layer but the last has every token: prompt rows 0..n, then one per generated step.
    let first = &a.tensors[0];
    assert_eq!(first.pos, (0..(n_prompt + 3) as i32).collect::<Vec<_>>());
    // The last layer is pruned by llama.cpp to output rows: the last prompt token, then each step.
    let last = &a.tensors[n_layer - 1];
    assert_eq!(
        last.pos,
        ((n_prompt - 1) as i32..(n_prompt + 3) as i32).collect::<Vec<_>>()
    );
    // Its rows equal the matching rows of... the small-ubatch run (already compared above),
    // and stream steps line up with token events: step k frames precede token k.
    assert_eq!(last.step, vec![0, 1, 2, 3]);
    let gen_steps: Vec<u32> = a
        .tokens
        .iter()
        .filter(|t| !t.prompt)
        .map(|t| t.step)
        .collect();
    assert_eq!(gen_steps, vec![0, 1, 2, 3]);
}

#[test]
fn rows_last_keeps_one_row_per_step() {
    let Some(model) = model() else { return };
    let spec = CaptureSpec {
        patterns: vec!["l_out-3".into()],
        rows: Rows::Last,
        ..Default::default()
    };
    let ctx = ContextOptions {
        n_ctx: 128,
        n_ubatch: 4,
        ..Default::default()
    };
    let prompt = "One two three four five six seven";
    let n_prompt = model.tokenize(prompt, true).unwrap().len() as i32;
    let (_, c) = run(&model, &ctx, &spec, prompt, 3);
    let t = c.tensor("l_out-3").unwrap();
    assert_eq!(t.pos, vec![n_prompt - 1, n_prompt, n_prompt + 1]);
}

/// `--rows last` means the rows a sampled token came from, also when the
/// prompt is decoded in several `n_batch` chunks (it once kept each chunk's
/// last row, mid-prompt rows included).
#[test]
fn rows_last_ignores_batch_chunks_of_the_prompt() {
    let Some(model) = model() else { return };
    let spec = CaptureSpec {
        patterns: vec!["l_out-3".into()],
        rows: Rows::Last,
        ..Default::default()
    };
    let ctx = ContextOptions {
        n_ctx: 128,
        n_batch: 3,
        n_ubatch: 3,
        ..Default::default()
    };
    let prompt = "One two three four five six seven eight nine ten";
    let n_prompt = model.tokenize(prompt, true).unwrap().len() as i32;
    assert!(n_prompt > 6, "the prompt spans at least three chunks");
    let (_, c) = run(&model, &ctx, &spec, prompt, 2);
    let t = c.tensor("l_out-3").unwrap();
    assert_eq!(t.pos, vec![n_prompt - 1, n_prompt]);
    // Rows::All over the same chunks: every position, once.
    let all = CaptureSpec {
        rows: Rows::All,
        ..spec
    };
    let (_, c) = run(&model, &ctx, &all, prompt, 2);
    let t = c.tensor("l_out-3").unwrap();
    assert_eq!(t.pos, (0..=n_prompt).collect::<Vec<_>>());
}
