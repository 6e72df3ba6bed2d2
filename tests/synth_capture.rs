//! Captured latents of a synthetic model against an independent ndarray forward
//! pass over the same weights: every row of every layer within 1e-4.

mod common;

use std::sync::Arc;

use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::output::{collect, Collected};
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator};
use latent_tap::synth::{SynthConfig, SynthModel};

use common::reference::{forward, Reference};

struct Fixture {
    synth: SynthModel,
    model: Arc<Model>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let synth = SynthModel::random(SynthConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synth.gguf");
    synth.write_gguf(&path).unwrap();
    let model = Model::load(&path, &ModelOptions::default()).unwrap();
    Fixture {
        synth,
        model,
        _dir: dir,
    }
}

fn exact_ctx(n_ubatch: u32, n_batch: u32, n_seq: u32) -> ContextOptions {
    ContextOptions {
        n_ctx: 256,
        n_batch,
        n_ubatch,
        n_seq_max: n_seq,
        f32_kv: true,
        flash_attn: Some(false),
        ..Default::default()
    }
}

fn capture(f: &Fixture, ctx: &ContextOptions, prompts: &[&str], n_predict: usize) -> Collected {
    let spec = CaptureSpec {
        patterns: vec!["l_out-*,attn_out-*,ffn_out-*".into()],
        ..Default::default()
    };
    let (mut gen, stream) = Generator::new(f.model.clone(), ctx, &spec).unwrap();
    let sel = gen.selection().to_vec();
    let consumer = std::thread::spawn(move || collect(stream, &sel, spec.dtype));
    let toks: Vec<Vec<i32>> = prompts
        .iter()
        .map(|p| f.model.tokenize(p, true).unwrap())
        .collect();
    let opts = GenerateOptions {
        n_predict,
        ..Default::default()
    };
    gen.run(&toks, &opts, &mut |_| {}).unwrap();
    consumer.join().unwrap().unwrap()
}

/// Token ids of sequence `seq` in position order, from the token events.
fn sequence(c: &Collected, seq: i32) -> Vec<i32> {
    let mut t: Vec<_> = c.tokens.iter().filter(|t| t.seq == seq).collect();
    t.sort_by_key(|t| t.pos);
    t.iter().map(|t| t.token).collect()
}

/// Compare every captured row against the reference; returns rows checked.
fn check(f: &Fixture, c: &Collected, n_seq: i32) -> usize {
    let refs: Vec<Reference> = (0..n_seq)
        .map(|s| forward(&f.synth, &sequence(c, s)))
        .collect();
    let mut checked = 0;
    for t in &c.tensors {
        let (base, layer) = t.name.rsplit_once('-').unwrap();
        let layer: usize = layer.parse().unwrap();
        assert!(t.n_rows() > 0, "{} has no rows", t.name);
        assert_eq!(t.width, f.synth.cfg.n_embd);
        for i in 0..t.n_rows() {
            let r = &refs[t.seq[i] as usize];
            let want = match base {
                "l_out" => &r.l_out[layer],
                "attn_out" => &r.attn_out[layer],
                "ffn_out" => &r.ffn_out[layer],
                _ => unreachable!(),
            };
            let want = want.row(t.pos[i] as usize);
            let got = t.row_f32(i);
            let err = got
                .iter()
                .zip(want.iter())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err <= 1e-4,
                "{} row {i} (seq {}, pos {}): max abs err {err}",
                t.name,
                t.seq[i],
                t.pos[i]
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn every_layer_matches_reference() {
    let f = fixture();
    let prompt = "Hello, latent world!";
    let c = capture(&f, &exact_ctx(512, 512, 1), &[prompt], 5);
    let n_prompt = prompt.len() + 1;
    let l0 = c.tensor("l_out-0").unwrap();
    // Prompt rows, then one row per decoded generated token (n_predict - 1 decodes).
    assert_eq!(l0.pos, (0..(n_prompt + 4) as i32).collect::<Vec<_>>());
    let last = c.tensor("l_out-2").unwrap();
    assert_eq!(
        last.pos,
        ((n_prompt - 1) as i32..(n_prompt + 4) as i32).collect::<Vec<_>>()
    );
    let checked = check(&f, &c, 1);
    // attn_out-2 precedes llama.cpp's pruning to output rows; ffn_out-2 and l_out-2 follow it.
    assert_eq!(checked, 7 * (n_prompt + 4) + 2 * 5);
    // Greedy decoding picks the reference's argmax.
    let seq = sequence(&c, 0);
    let r = forward(&f.synth, &seq);
    for (k, t) in c.tokens.iter().filter(|t| !t.prompt).enumerate() {
        let row = r.logits.row(n_prompt - 1 + k);
        let argmax = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(t.token as usize, argmax, "generated token {k}");
    }
}

#[test]
fn long_prompt_over_several_ubatches_and_batches() {
    let f = fixture();
    let prompt = "a prompt of thirty-six bytes, yes!!"; // BOS + 35 byte tokens
    let n_prompt = f.model.tokenize(prompt, true).unwrap().len();
    assert!(
        n_prompt > 32,
        "needs several ubatches of 8 and batches of 16"
    );
    let c = capture(&f, &exact_ctx(8, 16, 1), &[prompt], 3);
    let l1 = c.tensor("l_out-1").unwrap();
    assert_eq!(l1.pos, (0..(n_prompt + 2) as i32).collect::<Vec<_>>());
    // 5 ubatches of 8 cover the 37-ish prompt rows; each frame holds at most 8 rows.
    assert!(l1.frames as usize >= n_prompt.div_ceil(8) + 2);
    check(&f, &c, 1);
}

#[test]
fn two_sequences_in_one_batch() {
    let f = fixture();
    let prompts = ["first sequence", "the second one is longer"];
    let c = capture(&f, &exact_ctx(8, 64, 2), &prompts, 4);
    for (s, p) in prompts.iter().enumerate() {
        let n = p.len() + 1;
        let t = c.tensor("l_out-0").unwrap();
        let pos: Vec<i32> = (0..t.n_rows())
            .filter(|&i| t.seq[i] == s as i32)
            .map(|i| t.pos[i])
            .collect();
        assert_eq!(pos, (0..(n + 3) as i32).collect::<Vec<_>>(), "seq {s}");
        let last = c.tensor("l_out-2").unwrap();
        let pos: Vec<i32> = (0..last.n_rows())
            .filter(|&i| last.seq[i] == s as i32)
            .map(|i| last.pos[i])
            .collect();
        assert_eq!(
            pos,
            ((n - 1) as i32..(n + 3) as i32).collect::<Vec<_>>(),
            "seq {s} last layer"
        );
    }
    check(&f, &c, 2);
}

#[test]
fn tokens_only_stream_has_no_frames() {
    let f = fixture();
    let spec = CaptureSpec {
        patterns: vec![],
        ..Default::default()
    };
    let (mut gen, stream) = Generator::new(f.model.clone(), &exact_ctx(64, 64, 1), &spec).unwrap();
    assert!(gen.selection().is_empty());
    let toks = vec![f.model.tokenize("abc", true).unwrap()];
    let opts = GenerateOptions {
        n_predict: 3,
        ..Default::default()
    };
    let stats = gen.run(&toks, &opts, &mut |_| {}).unwrap();
    let c = collect(stream, &[], spec.dtype).unwrap();
    assert_eq!(stats.counters.frames, 0);
    assert_eq!(c.tokens.len(), 4 + 3);
    assert_eq!(c.end.unwrap().frames, 0);
}

#[test]
fn drop_newest_counts_what_it_drops() {
    use latent_tap::capture::Policy;
    let f = fixture();
    // A ring that holds a few frames; nobody reads until the run is over.
    let spec = CaptureSpec {
        patterns: vec!["l_out-*".into()],
        ring_bytes: 16 << 10,
        policy: Policy::DropNewest,
        ..Default::default()
    };
    let (mut gen, stream) = Generator::new(f.model.clone(), &exact_ctx(8, 8, 1), &spec).unwrap();
    let sel = gen.selection().to_vec();
    let toks = vec![f.model.tokenize("drop some frames please", true).unwrap()];
    let opts = GenerateOptions {
        n_predict: 30,
        n_probs: 0,
        ..Default::default()
    };
    let consumer = std::thread::spawn(move || {
        // Start reading only once the producer has had to drop (it then waits to
        // write the next token event, which is never dropped).
        let t0 = std::time::Instant::now();
        while stream.ring_stats().drops == 0 && t0.elapsed().as_secs() < 20 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        collect(stream, &sel, latent_tap::record::Dtype::F32)
    });
    let stats = gen.run(&toks, &opts, &mut |_| {}).unwrap();
    let c = consumer.join().unwrap().unwrap();
    let got: u64 = c.tensors.iter().map(|t| t.frames).sum();
    assert!(
        stats.counters.drops > 0,
        "the small ring must have dropped frames: {stats:?}"
    );
    assert_eq!(got + stats.counters.drops, stats.counters.frames);
    assert_eq!(
        c.seq_gaps, stats.counters.drops,
        "sequence gaps show exactly the drops"
    );
    assert_eq!(
        c.tokens.iter().filter(|t| !t.prompt).count(),
        30,
        "token events are never dropped"
    );
}

#[test]
fn blocked_ring_cancels_decode_with_clear_error() {
    use latent_tap::capture::Policy;
    let f = fixture();
    let spec = CaptureSpec {
        patterns: vec!["l_out-*".into()],
        ring_bytes: 32 << 10,
        policy: Policy::Block {
            timeout: std::time::Duration::from_millis(100),
        },
        ..Default::default()
    };
    let (mut gen, _stream) = Generator::new(f.model.clone(), &exact_ctx(8, 8, 1), &spec).unwrap();
    let toks = vec![f
        .model
        .tokenize("nobody reads this stream at all", true)
        .unwrap()];
    let e = gen
        .run(&toks, &GenerateOptions::default(), &mut |_| {})
        .unwrap_err();
    assert_eq!(e.kind(), latent_tap::ErrorKind::RingTimeout, "{e}");
    assert!(e.message().contains("consumer is too slow"), "{e}");
}
