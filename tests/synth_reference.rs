//! Proves that the synthetic GGUF writer and the ndarray reference forward pass
//! agree with what llama.cpp actually computes, so other tests can trust both.
//!
//! Set `LATENT_TAP_LOG=1` to see llama.cpp's own logging.

mod common;

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::sync::Once;

use common::reference::{self, Reference};
use latent_tap::synth::{expected_tokens, SynthConfig, SynthModel, TOKEN_BOS, TOKEN_SPACE};
use llama_cpp_sys_2 as sys;
use ndarray::{Array2, ArrayView2};

/// Max abs error allowed against the f64 reference. llama.cpp runs in f32 with
/// an F32 KV cache, so observed errors are ~1e-6; 1e-4 leaves margin while
/// still catching any semantic mismatch (those show up at ~1e-1).
const TOL: f32 = 1e-4;

unsafe extern "C" fn quiet_log(_: sys::ggml_log_level, _: *const c_char, _: *mut c_void) {}

fn init_backend() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if std::env::var_os("LATENT_TAP_LOG").is_none() {
            // SAFETY: the callback is a valid `extern "C"` fn that ignores its
            // arguments and needs no user data.
            unsafe { sys::llama_log_set(Some(quiet_log), std::ptr::null_mut()) };
        }
        // SAFETY: called exactly once per process, before any other llama call.
        unsafe { sys::llama_backend_init() };
    });
}

/// Owns a loaded `llama_model`.
struct Model(*mut sys::llama_model);

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: pointer came from `llama_model_load_from_file`, freed once,
        // after every `Ctx` borrowing it has been dropped.
        unsafe { sys::llama_model_free(self.0) };
    }
}

/// Owns a `llama_context`; borrows the model it was created from.
struct Ctx<'m>(*mut sys::llama_context, std::marker::PhantomData<&'m Model>);

impl Drop for Ctx<'_> {
    fn drop(&mut self) {
        // SAFETY: pointer came from `llama_init_from_model` and is freed once.
        unsafe { sys::llama_free(self.0) };
    }
}

fn load(path: &Path) -> Model {
    init_backend();
    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: default params are plain data; `c_path` is a valid C string that
    // outlives the call.
    let ptr = unsafe {
        sys::llama_model_load_from_file(c_path.as_ptr(), sys::llama_model_default_params())
    };
    assert!(
        !ptr.is_null(),
        "llama.cpp failed to load {}",
        path.display()
    );
    Model(ptr)
}

fn write_and_load(synth: &SynthModel) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synth.gguf");
    synth.write_gguf(&path).unwrap();
    let model = load(&path);
    (dir, model)
}

fn vocab(model: &Model) -> *const sys::llama_vocab {
    // SAFETY: `model.0` is a live model; the vocab lives as long as it does.
    unsafe { sys::llama_model_get_vocab(model.0) }
}

fn tokenize(model: &Model, text: &str) -> Vec<i32> {
    let mut out = vec![0i32; text.len() + 8];
    // SAFETY: `text` is valid for `text.len()` bytes (no NUL needed since the
    // length is passed); `out` has room for `out.len()` tokens.
    let n = unsafe {
        sys::llama_tokenize(
            vocab(model),
            text.as_ptr().cast(),
            i32::try_from(text.len()).unwrap(),
            out.as_mut_ptr(),
            i32::try_from(out.len()).unwrap(),
            true,
            false,
        )
    };
    assert!(n >= 0, "llama_tokenize needs {} slots", -n);
    out.truncate(n as usize);
    out
}

fn new_ctx(model: &Model, n_ubatch: u32, embeddings: bool) -> Ctx<'_> {
    new_ctx_with(model, n_ubatch, embeddings, None)
}

/// Named graph outputs collected by [`capture_cb`]: rows (one per token) in
/// the order llama.cpp computed them, concatenated across ubatches.
#[derive(Default)]
struct Captured(HashMap<String, Vec<f32>>);

/// Tensors whose names the reference also produces.
fn wanted(name: &str) -> bool {
    name == "result_norm"
        || ["attn_out-", "ffn_out-", "l_out-"].iter().any(|p| {
            name.strip_prefix(p)
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
}

unsafe extern "C" fn capture_cb(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    // SAFETY: the scheduler passes a live tensor; `name` is NUL-terminated.
    let t = unsafe { &*t };
    // SAFETY: as above.
    let name = unsafe { CStr::from_ptr(t.name.as_ptr()) }.to_string_lossy();
    if !wanted(&name) {
        return !ask;
    }
    if ask {
        return true;
    }
    assert_eq!(t.type_, sys::GGML_TYPE_F32, "{name} is not F32");
    // SAFETY: `t` is live and computed (ask == false).
    let contiguous = unsafe { sys::ggml_is_contiguous(t) };
    assert!(contiguous, "{name} not contiguous");
    let n = (t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]) as usize;
    let mut buf = vec![0f32; n];
    // SAFETY: `buf` holds exactly the tensor's `n` contiguous f32 values.
    unsafe { sys::ggml_backend_tensor_get(t, buf.as_mut_ptr().cast(), 0, n * 4) };
    // SAFETY: `user` is the `&mut Captured` passed in `new_ctx_with`, alive for
    // the decode and only touched from this (single) callback thread.
    let captured = unsafe { &mut *user.cast::<Captured>() };
    captured.0.entry(name.into_owned()).or_default().extend(buf);
    true
}

fn new_ctx_with<'m>(
    model: &'m Model,
    n_ubatch: u32,
    embeddings: bool,
    capture: Option<&mut Captured>,
) -> Ctx<'m> {
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()) as i32;
    // SAFETY: returns plain data.
    let mut p = unsafe { sys::llama_context_default_params() };
    p.n_ctx = 256;
    p.n_batch = 64;
    p.n_ubatch = n_ubatch;
    p.n_seq_max = 1;
    p.n_threads = threads;
    p.n_threads_batch = threads;
    // An F16 KV cache alone would add ~1e-3 error; F32 keeps llama.cpp exact-ish.
    p.type_k = sys::GGML_TYPE_F32;
    p.type_v = sys::GGML_TYPE_F32;
    p.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED;
    p.pooling_type = sys::LLAMA_POOLING_TYPE_NONE;
    p.embeddings = embeddings;
    if let Some(c) = capture {
        p.cb_eval = Some(capture_cb);
        p.cb_eval_user_data = (c as *mut Captured).cast();
    }
    // SAFETY: `model.0` is live and outlives the returned `Ctx` (lifetime 'm).
    let ptr = unsafe { sys::llama_init_from_model(model.0, p) };
    assert!(!ptr.is_null(), "llama_init_from_model failed");
    Ctx(ptr, std::marker::PhantomData)
}

/// Decodes `tokens` as one sequence at positions `0..n`, every token an output.
fn decode_all(ctx: &Ctx<'_>, tokens: &[i32]) {
    let n = i32::try_from(tokens.len()).unwrap();
    // SAFETY: allocates a batch for `n` tokens, 1 seq id each; freed below.
    let batch = unsafe { sys::llama_batch_init(n, 0, 1) };
    for (i, &tok) in tokens.iter().enumerate() {
        // SAFETY: `i < n`, and `llama_batch_init` allocated every per-token
        // array (and each `seq_id[i]` with room for one id) for `n` tokens.
        unsafe {
            *batch.token.add(i) = tok;
            *batch.pos.add(i) = i as i32;
            *batch.n_seq_id.add(i) = 1;
            **batch.seq_id.add(i) = 0;
            *batch.logits.add(i) = 1;
        }
    }
    let batch = sys::llama_batch {
        n_tokens: n,
        ..batch
    };
    // SAFETY: `ctx.0` is live; `batch` is fully initialised for `n` tokens.
    let rc = unsafe { sys::llama_decode(ctx.0, batch) };
    // SAFETY: `batch` came from `llama_batch_init` and is freed once.
    unsafe { sys::llama_batch_free(batch) };
    assert_eq!(rc, 0, "llama_decode failed");
}

/// Copies row `i` of every output from a `llama_get_*_ith` getter.
fn read_rows(
    ctx: &Ctx<'_>,
    n_rows: usize,
    width: usize,
    get: unsafe extern "C" fn(*mut sys::llama_context, i32) -> *mut f32,
) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((n_rows, width));
    for (i, mut row) in out.rows_mut().into_iter().enumerate() {
        // SAFETY: `ctx.0` is live and decoded `n_rows` outputs; the getter
        // returns null or `width` floats valid until the next decode.
        let ptr = unsafe { get(ctx.0, i as i32) };
        assert!(!ptr.is_null(), "no output for row {i}");
        // SAFETY: see above; copied out immediately.
        let src = unsafe { std::slice::from_raw_parts(ptr, width) };
        row.assign(&ArrayView2::from_shape((1, width), src).unwrap().row(0));
    }
    out
}

fn max_abs_err(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn max_abs(a: &Array2<f32>) -> f32 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Runs `text` through llama.cpp (logits context and embeddings context) and
/// the reference, asserting agreement within [`TOL`].
fn check_against_reference(text: &str, n_ubatch: u32, expect_n_tokens: usize) {
    let synth = SynthModel::random(SynthConfig::default());
    let (_dir, model) = write_and_load(&synth);
    let tokens = tokenize(&model, text);
    assert_eq!(tokens, expected_tokens(text));
    assert_eq!(tokens.len(), expect_n_tokens);

    let want: Reference = reference::forward(&synth, &tokens);
    let n = tokens.len();
    // Guard against a vacuous pass: outputs must be O(1), far above TOL.
    assert!(max_abs(&want.logits) > 0.5, "reference logits degenerate");
    assert!(
        max_abs(&want.result_norm) > 0.5,
        "reference result_norm degenerate"
    );

    let ctx = new_ctx(&model, n_ubatch, false);
    decode_all(&ctx, &tokens);
    let logits = read_rows(&ctx, n, synth.n_vocab(), sys::llama_get_logits_ith);
    let err = max_abs_err(&logits, &want.logits);
    eprintln!(
        "{text:?} ubatch {n_ubatch}: logits max |err| {err:.3e} (max |logit| {:.3})",
        max_abs(&want.logits)
    );
    assert!(err < TOL, "logits differ from reference by {err}");
    drop(ctx);

    let ctx = new_ctx(&model, n_ubatch, true);
    decode_all(&ctx, &tokens);
    let embd = read_rows(&ctx, n, synth.cfg.n_embd, sys::llama_get_embeddings_ith);
    let err = max_abs_err(&embd, &want.result_norm);
    eprintln!(
        "{text:?} ubatch {n_ubatch}: result_norm max |err| {err:.3e} (max |x| {:.3})",
        max_abs(&want.result_norm)
    );
    assert!(err < TOL, "embeddings differ from reference by {err}");
    let logits = read_rows(&ctx, n, synth.n_vocab(), sys::llama_get_logits_ith);
    let err = max_abs_err(&logits, &want.logits);
    assert!(err < TOL, "embeddings-context logits differ by {err}");
}

#[test]
fn logits_and_embeddings_match_reference() {
    let text = "Hello, latent world!";
    check_against_reference(text, 64, 1 + text.len());
}

#[test]
fn multi_ubatch_37_tokens_match_reference() {
    // 36 UTF-8 bytes (ü, ß, é and an em dash are multi-byte) plus BOS.
    let text = "Grüße — tap on é latent stream!";
    assert_eq!(text.len(), 36);
    check_against_reference(text, 8, 37);
}

/// The reference's per-layer intermediates match llama.cpp's named graph
/// tensors (`attn_out-N`, `ffn_out-N`, `l_out-N`, `result_norm`), read through
/// the scheduler eval callback across several ubatches.
#[test]
fn intermediates_match_reference() {
    let synth = SynthModel::random(SynthConfig::default());
    let (_dir, model) = write_and_load(&synth);
    let text = "Grüße — tap on é latent stream!";
    let tokens = tokenize(&model, text);
    let want = reference::forward(&synth, &tokens);
    let (n, e) = (tokens.len(), synth.cfg.n_embd);

    let mut captured = Captured::default();
    let ctx = new_ctx_with(&model, 8, false, Some(&mut captured));
    decode_all(&ctx, &tokens);
    drop(ctx);

    let got = |name: &str| -> Array2<f32> {
        let v = captured
            .0
            .get(name)
            .unwrap_or_else(|| panic!("{name} not captured"));
        Array2::from_shape_vec((n, e), v.clone()).unwrap()
    };
    let mut worst = 0f32;
    for il in 0..synth.cfg.n_layer {
        for (name, r) in [
            ("attn_out", &want.attn_out[il]),
            ("ffn_out", &want.ffn_out[il]),
            ("l_out", &want.l_out[il]),
        ] {
            let err = max_abs_err(&got(&format!("{name}-{il}")), r);
            assert!(max_abs(r) > 0.1, "{name}-{il} reference degenerate");
            assert!(err < TOL, "{name}-{il} differs from reference by {err}");
            worst = worst.max(err);
        }
    }
    let err = max_abs_err(&got("result_norm"), &want.result_norm);
    assert!(err < TOL, "result_norm differs by {err}");
    eprintln!("intermediates: max |err| {:.3e}", worst.max(err));
    assert_eq!(captured.0.len(), 3 * synth.cfg.n_layer + 1);
}

#[test]
fn tokenizes_to_bos_plus_bytes() {
    let synth = SynthModel::random(SynthConfig::default());
    let (_dir, model) = write_and_load(&synth);
    // SAFETY: the vocab pointer is live while `model` is.
    let n_vocab = unsafe { sys::llama_vocab_n_tokens(vocab(&model)) };
    assert_eq!(n_vocab as usize, synth.n_vocab());

    let text = "Hello, latent world!";
    let tokens = tokenize(&model, text);
    #[rustfmt::skip]
    let want = vec![
        TOKEN_BOS,
        3 + 0x48, 3 + 0x65, 3 + 0x6C, 3 + 0x6C, 3 + 0x6F, 3 + 0x2C, TOKEN_SPACE,
        3 + 0x6C, 3 + 0x61, 3 + 0x74, 3 + 0x65, 3 + 0x6E, 3 + 0x74, TOKEN_SPACE,
        3 + 0x77, 3 + 0x6F, 3 + 0x72, 3 + 0x6C, 3 + 0x64, 3 + 0x21,
    ];
    assert_eq!(tokens, want);
    assert_eq!(tokens.len(), 1 + text.len());

    // Multi-byte UTF-8 falls back to one byte token per byte.
    let tokens = tokenize(&model, "é✓");
    assert_eq!(
        tokens,
        vec![TOKEN_BOS, 3 + 0xC3, 3 + 0xA9, 3 + 0xE2, 3 + 0x9C, 3 + 0x93]
    );
    assert_eq!(tokenize(&model, ""), vec![TOKEN_BOS]);
}
