//! `lt_session_set_steer`, `lt_session_add_patch`: a steered (patched) C
//! session generates what a steered (patched)
//! `Generator` does (tokens-only sessions too), NULL stops steering, and bad
//! arguments return a status and a message while the session keeps steering
//! as before. Calls the exported `extern "C"` functions directly.

mod common;

use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::ptr::{null, null_mut};
use std::sync::Arc;

use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::ffi::*;
use latent_tap::output::collect;
use latent_tap::session::{CaptureSpec, GenerateOptions, Generator};
use latent_tap::steer::{ControlVector, Edits, Patch, Positions, Steer};
use latent_tap::synth::{SynthConfig, SynthModel};

use common::capi::{last_error, sized};

fn cpath(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

/// Generated (token, logprob) pairs of one generation.
type Toks = Vec<(i32, f32)>;

unsafe extern "C" fn record(user: *mut std::ffi::c_void, ev: *const lt_event) -> i32 {
    // SAFETY: user points to the test's Toks; ev is valid during the call.
    let (r, ev) = unsafe { (&mut *(user as *mut Toks), &*ev) };
    // SAFETY: a non-NULL token header is valid while the event is.
    if let Some(t) = unsafe { ev.token.as_ref() } {
        if t.flags & LT_ROW_PROMPT == 0 {
            r.push((t.token, t.logprob));
        }
    }
    1
}

fn generate(s: *mut lt_session, sp: &lt_sampling_params) -> Toks {
    let mut r = Toks::new();
    let st = lt_session_generate(
        s,
        c"the quick brown fox".as_ptr(),
        sp,
        Some(record),
        &mut r as *mut Toks as *mut _,
    );
    assert_eq!(st, lt_status::LT_OK, "{}", last_error());
    r
}

fn vector(layers: std::ops::Range<usize>, n_embd: usize) -> ControlVector {
    ControlVector {
        n_embd,
        model_hint: "llama".into(),
        directions: layers
            .map(|l| {
                let d = (0..n_embd)
                    .map(|i| ((i * 7 + l * 3) % 11) as f32 / 11.0 - 0.45)
                    .collect();
                (l, d)
            })
            .collect(),
    }
}

/// The same generation through the library: greedy, 4 tokens.
fn library(model: &Arc<Model>, cp: &lt_context_params, edits: &Edits) -> Toks {
    let ctx = ContextOptions {
        n_ctx: cp.n_ctx,
        n_batch: cp.n_batch,
        n_ubatch: cp.n_ubatch,
        n_threads: (cp.n_threads > 0).then_some(cp.n_threads),
        f32_kv: cp.f32_kv != 0,
        ..ContextOptions::default()
    };
    let spec = CaptureSpec {
        patterns: vec![String::new()],
        ..CaptureSpec::default()
    };
    let (mut gen, stream) = Generator::new_edited(model.clone(), &ctx, &spec, edits).unwrap();
    let consumer = std::thread::spawn(move || collect(stream, &[], spec.dtype));
    let opts = GenerateOptions {
        n_predict: 4,
        ..GenerateOptions::default()
    };
    let toks = model.tokenize("the quick brown fox", true).unwrap();
    gen.run(&[toks], &opts, &mut |_| {}).unwrap();
    drop(gen);
    let c = consumer.join().unwrap().unwrap();
    c.tokens
        .iter()
        .filter(|t| !t.prompt)
        .map(|t| (t.token, t.logprob.unwrap()))
        .collect()
}

/// The C model of `m`, default context parameters on one thread, and greedy
/// sampling of 4 tokens.
fn c_model(m: &Path) -> (*mut lt_model, lt_context_params, lt_sampling_params) {
    let mut model = null_mut();
    assert_eq!(
        lt_model_new(cpath(m).as_ptr(), null(), &mut model),
        lt_status::LT_OK
    );
    let (mut cp, mut sp) = (sized::<lt_context_params>(), sized::<lt_sampling_params>());
    assert_eq!(lt_context_params_default(&mut cp), lt_status::LT_OK);
    assert_eq!(lt_sampling_params_default(&mut sp), lt_status::LT_OK);
    cp.n_threads = 1;
    sp.n_predict = 4;
    sp.temperature = 0.0;
    (model, cp, sp)
}

#[test]
fn c_sessions_steer_like_the_library_and_refuse_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.gguf");
    SynthModel::random(SynthConfig {
        n_layer: 6,
        ..SynthConfig::default()
    })
    .write_gguf(&m)
    .unwrap();
    let v = vector(1..6, 64);
    let file = dir.path().join("v.gguf");
    v.write(&file).unwrap();
    let wide = dir.path().join("wide.gguf");
    vector(1..6, 65).write(&wide).unwrap();
    let (fc, wc) = (cpath(&file), cpath(&wide));

    let (model, cp, sp) = c_model(&m);
    let lib = Model::load(&m, &ModelOptions::default()).unwrap();
    let steer = Steer::new(&v, 3.0, None, Positions::All, 6, 64).unwrap();
    let (want_plain, want_steered) = (
        library(&lib, &cp, &Edits::default()),
        library(&lib, &cp, &edits(Some(&steer))),
    );
    assert_ne!(want_plain, want_steered, "the vector changes the run");

    // A tokens-only session (probed on its first steer) and one capturing l_out-*.
    for patterns in [c"", c"l_out-*"] {
        let mut cap = sized::<lt_capture_params>();
        assert_eq!(lt_capture_params_default(&mut cap), lt_status::LT_OK);
        cap.patterns = patterns.as_ptr();
        let mut s = null_mut();
        assert_eq!(
            lt_session_new(model, &cp, &cap, &mut s),
            lt_status::LT_OK,
            "{}",
            last_error()
        );
        assert_eq!(generate(s, &sp), want_plain, "{patterns:?} unsteered");
        let st = lt_session_set_steer(s, fc.as_ptr(), 3.0, null(), null());
        assert_eq!(st, lt_status::LT_OK, "{}", last_error());
        assert_eq!(generate(s, &sp), want_steered, "{patterns:?} steered");

        // Bad arguments: a status and a message each; the steer in place stays.
        let bad: [(*const c_char, f32, &CStr, &CStr, lt_status, &str); 6] = [
            (
                wc.as_ptr(),
                1.0,
                c"all",
                c"all",
                lt_status::LT_INVALID_ARGUMENT,
                "65 wide but the model's n_embd is 64",
            ),
            (
                fc.as_ptr(),
                f32::NAN,
                c"all",
                c"all",
                lt_status::LT_INVALID_ARGUMENT,
                "scale NaN is not a finite number",
            ),
            (
                fc.as_ptr(),
                1.0,
                c"0",
                c"all",
                lt_status::LT_INVALID_ARGUMENT,
                "layer 0 cannot be steered",
            ),
            (
                fc.as_ptr(),
                1.0,
                c"2..=9",
                c"all",
                lt_status::LT_INVALID_ARGUMENT,
                "layer 9 cannot be steered",
            ),
            (
                fc.as_ptr(),
                1.0,
                c"all",
                c"9..2",
                lt_status::LT_INVALID_ARGUMENT,
                "positions '9..2'",
            ),
            (
                c"/no/such/v.gguf".as_ptr(),
                1.0,
                c"all",
                c"all",
                lt_status::LT_IO,
                "cannot open control vector /no/such/v.gguf",
            ),
        ];
        for (path, scale, layers, positions, status, needle) in bad {
            let layers = if layers == c"all" {
                null()
            } else {
                layers.as_ptr()
            };
            let st = lt_session_set_steer(s, path, scale, layers, positions.as_ptr());
            let e = last_error();
            assert_eq!(st, status, "{needle}: {e}");
            assert!(e.contains(needle), "{needle}: {e}");
        }
        assert_eq!(
            generate(s, &sp),
            want_steered,
            "{patterns:?} after refusals"
        );
        assert_eq!(
            lt_session_set_steer(null_mut(), fc.as_ptr(), 1.0, null(), null()),
            lt_status::LT_NULL_POINTER
        );

        // NULL path: steering stops.
        let st = lt_session_set_steer(s, null(), 0.0, null(), null());
        assert_eq!(st, lt_status::LT_OK, "{}", last_error());
        assert_eq!(generate(s, &sp), want_plain, "{patterns:?} unsteered again");
        lt_session_free(s);
    }
    lt_model_free(model);
}

/// The edits of one optional steer.
fn edits(steer: Option<&Steer>) -> Edits {
    Edits {
        steers: steer.into_iter().cloned().collect(),
        patches: Vec::new(),
    }
}

#[test]
fn c_sessions_patch_like_the_library_and_refuse_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.gguf");
    SynthModel::random(SynthConfig {
        n_layer: 4,
        ..SynthConfig::default()
    })
    .write_gguf(&m)
    .unwrap();
    let row: Vec<f32> = (0..64).map(|i| (i % 9) as f32 - 4.0).collect();
    let (model, cp, sp) = c_model(&m);
    let lib = Model::load(&m, &ModelOptions::default()).unwrap();
    let n_ctx = cp.n_ctx as usize;
    let patched = Edits {
        steers: vec![],
        patches: vec![
            Patch::new("l_out-1", 3, row.clone(), 64, n_ctx).unwrap(),
            Patch::new("attn_out-2", 5, row.clone(), 64, n_ctx).unwrap(),
        ],
    };
    let want_plain = library(&lib, &cp, &Edits::default());
    let want_patched = library(&lib, &cp, &patched);
    assert_ne!(want_plain, want_patched, "the patches change the run");
    // Patch and steer together, as one set of edits.
    let v = vector(1..4, 64);
    let steer = Steer::new(&v, 2.0, None, Positions::Generated, 4, 64).unwrap();
    let mut both = patched.clone();
    both.steers.push(steer);
    let want_both = library(&lib, &cp, &both);
    assert_ne!(want_both, want_patched);
    let file = dir.path().join("v.gguf");
    v.write(&file).unwrap();

    for patterns in [c"", c"l_out-*"] {
        let mut cap = sized::<lt_capture_params>();
        assert_eq!(lt_capture_params_default(&mut cap), lt_status::LT_OK);
        cap.patterns = patterns.as_ptr();
        let mut s = null_mut();
        assert_eq!(
            lt_session_new(model, &cp, &cap, &mut s),
            lt_status::LT_OK,
            "{}",
            last_error()
        );
        assert_eq!(generate(s, &sp), want_plain, "{patterns:?} unpatched");
        for (t, pos) in [(c"l_out-1", 3), (c"attn_out-2", 5)] {
            let st = lt_session_add_patch(s, t.as_ptr(), pos, row.as_ptr(), row.len());
            assert_eq!(st, lt_status::LT_OK, "{}", last_error());
        }
        assert_eq!(generate(s, &sp), want_patched, "{patterns:?} patched");
        let st = lt_session_set_steer(s, cpath(&file).as_ptr(), 2.0, null(), c"generated".as_ptr());
        assert_eq!(st, lt_status::LT_OK, "{}", last_error());
        assert_eq!(
            generate(s, &sp),
            want_both,
            "{patterns:?} patched and steered"
        );
        assert_eq!(
            lt_session_set_steer(s, null(), 0.0, null(), null()),
            lt_status::LT_OK
        );
        assert_eq!(
            generate(s, &sp),
            want_patched,
            "{patterns:?} the steer gone, the patches kept"
        );

        // Bad rows: a status and a message each; the patches in place stay.
        let nan: Vec<f32> = row
            .iter()
            .enumerate()
            .map(|(i, &x)| if i == 7 { f32::NAN } else { x })
            .collect();
        let bad: [(&CStr, i32, &[f32], lt_status, &str); 7] = [
            (
                c"l_out-1",
                3,
                &row[..63],
                lt_status::LT_INVALID_ARGUMENT,
                "data has 63 values, not n_embd 64",
            ),
            (
                c"l_out-1",
                3,
                &nan,
                lt_status::LT_INVALID_ARGUMENT,
                "data value 7 is NaN",
            ),
            (
                c"l_out-1",
                -1,
                &row,
                lt_status::LT_INVALID_ARGUMENT,
                "pos -1 is outside",
            ),
            (
                c"l_out-1",
                cp.n_ctx as i32,
                &row,
                lt_status::LT_INVALID_ARGUMENT,
                "is outside",
            ),
            (
                c"l_out-9",
                0,
                &row,
                lt_status::LT_INVALID_ARGUMENT,
                "has no node 'l_out-9'",
            ),
            (
                c"norm-1",
                0,
                &row,
                lt_status::LT_INVALID_ARGUMENT,
                "names more than one node",
            ),
            (
                c"ffn_up-1",
                0,
                &row,
                lt_status::LT_INVALID_ARGUMENT,
                "only F32 nodes with one row of n_embd = 64",
            ),
        ];
        for (t, pos, data, status, needle) in bad {
            let st = lt_session_add_patch(s, t.as_ptr(), pos, data.as_ptr(), data.len());
            let e = last_error();
            assert_eq!(st, status, "{needle}: {e}");
            assert!(e.contains(needle), "{needle}: {e}");
        }
        assert_eq!(
            lt_session_add_patch(s, null(), 0, row.as_ptr(), row.len()),
            lt_status::LT_NULL_POINTER
        );
        assert_eq!(
            lt_session_add_patch(s, c"l_out-1".as_ptr(), 0, null(), 64),
            lt_status::LT_NULL_POINTER
        );
        // A width no row has is refused before the floats are read.
        let st = lt_session_add_patch(s, c"l_out-1".as_ptr(), 0, row.as_ptr(), 1 << 25);
        assert_eq!(st, lt_status::LT_INVALID_ARGUMENT);
        assert!(
            last_error().contains("is not a row width"),
            "{}",
            last_error()
        );
        assert_eq!(
            generate(s, &sp),
            want_patched,
            "{patterns:?} after refusals"
        );
        assert_eq!(lt_session_clear_patches(s), lt_status::LT_OK);
        assert_eq!(generate(s, &sp), want_plain, "{patterns:?} unpatched again");
        assert_eq!(
            lt_session_clear_patches(null_mut()),
            lt_status::LT_NULL_POINTER
        );
        lt_session_free(s);
    }
    lt_model_free(model);
}
