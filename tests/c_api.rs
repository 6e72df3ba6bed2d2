//! Bad input through the C API: every case returns a status and a message;
//! nothing aborts. Calls the exported `extern "C"` functions directly.

mod common;

use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::ptr::{null, null_mut};

use latent_tap::ffi::*;
use latent_tap::synth::{SynthConfig, SynthModel};

use common::capi::{last_error, sized};

fn defaults() -> (lt_context_params, lt_capture_params, lt_sampling_params) {
    let (mut c, mut k, mut s) = (
        sized::<lt_context_params>(),
        sized::<lt_capture_params>(),
        sized::<lt_sampling_params>(),
    );
    assert_eq!(lt_context_params_default(&mut c), lt_status::LT_OK);
    assert_eq!(lt_capture_params_default(&mut k), lt_status::LT_OK);
    assert_eq!(lt_sampling_params_default(&mut s), lt_status::LT_OK);
    (c, k, s)
}

fn cpath(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

fn synth(dir: &Path) -> CString {
    let p = dir.join("m.gguf");
    SynthModel::random(SynthConfig::default())
        .write_gguf(&p)
        .unwrap();
    cpath(&p)
}

fn load(path: &CString) -> *mut lt_model {
    let mut m = null_mut();
    assert_eq!(
        lt_model_new(path.as_ptr(), null(), &mut m),
        lt_status::LT_OK,
        "{}",
        last_error()
    );
    m
}

fn session(
    model: *mut lt_model,
    cp: &lt_context_params,
    cap: &lt_capture_params,
) -> *mut lt_session {
    let mut s = null_mut();
    assert_eq!(
        lt_session_new(model, cp, cap, &mut s),
        lt_status::LT_OK,
        "{}",
        last_error()
    );
    s
}

#[test]
fn null_pointers_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path());
    let (cp, cap, sp) = defaults();
    assert_eq!(
        lt_capture_params_default(null_mut()),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(
        lt_context_params_default(null_mut()),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(
        lt_sampling_params_default(null_mut()),
        lt_status::LT_NULL_POINTER
    );
    let mut m = null_mut();
    assert_eq!(
        lt_model_new(null(), null(), &mut m),
        lt_status::LT_NULL_POINTER
    );
    assert!(last_error().contains("path"), "{}", last_error());
    assert_eq!(
        lt_model_new(path.as_ptr(), null(), null_mut()),
        lt_status::LT_NULL_POINTER
    );
    assert!(m.is_null(), "out-param untouched on failure");
    let model = load(&path);
    assert_eq!(
        lt_model_dims(null(), null_mut(), null_mut(), null_mut()),
        lt_status::LT_NULL_POINTER
    );
    let mut s = null_mut();
    assert_eq!(
        lt_session_new(null(), &cp, &cap, &mut s),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(
        lt_session_new(model, &cp, &cap, null_mut()),
        lt_status::LT_NULL_POINTER
    );
    assert!(s.is_null());
    assert_eq!(
        lt_session_new(model, &cp, &cap, &mut s),
        lt_status::LT_OK,
        "{}",
        last_error()
    );
    assert_eq!(
        lt_session_submit(null_mut(), c"x".as_ptr(), &sp),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(
        lt_session_submit(s, null(), &sp),
        lt_status::LT_NULL_POINTER
    );
    let mut ev = std::mem::MaybeUninit::new(sized::<lt_event>());
    assert_eq!(
        lt_session_next(null_mut(), 0, ev.as_mut_ptr()),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(
        lt_session_next(s, 0, null_mut()),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(lt_session_release(null_mut()), lt_status::LT_NULL_POINTER);
    assert_eq!(lt_session_cancel(null_mut()), lt_status::LT_NULL_POINTER);
    assert_eq!(
        lt_session_generate(s, c"x".as_ptr(), &sp, None, null_mut()),
        lt_status::LT_NULL_POINTER
    );
    let mut t = null_mut();
    assert_eq!(
        lt_tap_new(null(), &cap, 8, &mut t),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(
        lt_tap_attach(null_mut(), null_mut()),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(
        lt_tap_begin_batch(null_mut(), null(), null(), 0),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(
        lt_tap_push_token(null_mut(), null_mut(), 0, 0, 0, 0, 0, 0),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(
        lt_tap_next(null_mut(), 0, ev.as_mut_ptr()),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(lt_tap_release(null_mut()), lt_status::LT_NULL_POINTER);
    assert_eq!(
        lt_tap_counters(null(), null_mut(), null_mut()),
        lt_status::LT_NULL_POINTER
    );
    // free(NULL) is a no-op.
    lt_session_free(null_mut());
    lt_model_free(null_mut());
    lt_tap_free(null_mut());
    lt_session_free(s);
    lt_model_free(model);
    // Every status has a message.
    let name = |v: i32| {
        // SAFETY: lt_status_str returns a static C string for any value.
        unsafe { CStr::from_ptr(lt_status_str(v)) }
            .to_str()
            .unwrap()
            .to_string()
    };
    let names: Vec<String> = (0..=15).map(name).collect();
    assert!(
        names.iter().all(|n| !n.is_empty() && n != "unknown status"),
        "{names:?}"
    );
    assert_eq!(name(lt_status::LT_BUSY as i32), "handle busy");
    assert_eq!(name(99), "unknown status");
    assert_eq!(name(-1), "unknown status");
    assert_eq!(
        lt_version(),
        (LT_VERSION_MAJOR << 16) | (LT_VERSION_MINOR << 8) | LT_VERSION_PATCH
    );
}

#[test]
fn bad_model_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = null_mut();
    let missing = cpath(&dir.path().join("missing.gguf"));
    assert_eq!(
        lt_model_new(missing.as_ptr(), null(), &mut m),
        lt_status::LT_MODEL_LOAD
    );
    assert!(last_error().contains("missing.gguf"), "{}", last_error());
    let foreign = dir.path().join("f.gguf");
    std::fs::write(&foreign, b"not a model at all").unwrap();
    assert_eq!(
        lt_model_new(cpath(&foreign).as_ptr(), null(), &mut m),
        lt_status::LT_MODEL_LOAD
    );
    assert!(last_error().contains("not a GGUF"), "{}", last_error());
    let good = std::fs::read(synth(dir.path()).to_str().unwrap()).unwrap();
    let trunc = dir.path().join("t.gguf");
    std::fs::write(&trunc, &good[..good.len() / 3]).unwrap();
    assert_eq!(
        lt_model_new(cpath(&trunc).as_ptr(), null(), &mut m),
        lt_status::LT_MODEL_LOAD
    );
    assert!(m.is_null());
    // A directory, and a file llama.cpp would abort on (block_count 513).
    assert_eq!(
        lt_model_new(cpath(dir.path()).as_ptr(), null(), &mut m),
        lt_status::LT_MODEL_LOAD
    );
    assert!(last_error().contains("directory"), "{}", last_error());
    let mut deep = good.clone();
    let key = b"llama.block_count";
    let at = deep.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    deep[at..at + 4].copy_from_slice(&513u32.to_le_bytes());
    let deep_path = dir.path().join("deep.gguf");
    std::fs::write(&deep_path, &deep).unwrap();
    assert_eq!(
        lt_model_new(cpath(&deep_path).as_ptr(), null(), &mut m),
        lt_status::LT_MODEL_LOAD
    );
    assert!(
        last_error().contains("block_count is 513"),
        "{}",
        last_error()
    );
    let bad_utf8 = [0x66u8, 0xff, 0xfe, 0x00];
    assert_eq!(
        lt_model_new(bad_utf8.as_ptr() as *const c_char, null(), &mut m),
        lt_status::LT_INVALID_UTF8
    );
}

#[test]
fn bad_capture_specs() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synth(dir.path()));
    let (cp, cap, _) = defaults();
    let mut s = null_mut();
    let try_spec =
        |c: &lt_capture_params, s: &mut *mut lt_session| lt_session_new(model, &cp, c, s);
    let mut c = cap;
    c.patterns = c"l_outt-*".as_ptr();
    assert_eq!(try_spec(&c, &mut s), lt_status::LT_NO_MATCH);
    assert!(
        last_error().contains("l_out-"),
        "close names listed: {}",
        last_error()
    );
    let bad = [b'l', 0xc3, 0x28, 0];
    c.patterns = bad.as_ptr() as *const c_char;
    assert_eq!(try_spec(&c, &mut s), lt_status::LT_INVALID_UTF8);
    let mut c = cap;
    c.ring_bytes = 0;
    assert_eq!(try_spec(&c, &mut s), lt_status::LT_INVALID_ARGUMENT);
    c.ring_bytes = u64::MAX;
    assert_eq!(try_spec(&c, &mut s), lt_status::LT_INVALID_ARGUMENT);
    c.ring_bytes = 1 << 50;
    assert_eq!(
        try_spec(&c, &mut s),
        lt_status::LT_INVALID_ARGUMENT,
        "{}",
        last_error()
    );
    c.ring_bytes = 256; // smaller than one frame
    assert_eq!(try_spec(&c, &mut s), lt_status::LT_FRAME_TOO_LARGE);
    let mut c = cap;
    c.dtype = 9;
    assert_eq!(try_spec(&c, &mut s), lt_status::LT_INVALID_ARGUMENT);
    let mut c = cap;
    c.capture_mode = 3;
    assert_eq!(try_spec(&c, &mut s), lt_status::LT_INVALID_ARGUMENT);
    assert!(last_error().contains("capture_mode"), "{}", last_error());
    let mut c = cap;
    c.struct_size = 4;
    assert_eq!(try_spec(&c, &mut s), lt_status::LT_INVALID_ARGUMENT);
    assert!(last_error().contains("struct_size"));
    // A struct whose caller did not set struct_size is refused, and nothing is written.
    let mut unset: lt_capture_params = sized();
    unset.struct_size = 0;
    assert_eq!(
        lt_capture_params_default(&mut unset),
        lt_status::LT_INVALID_ARGUMENT
    );
    assert!(unset.patterns.is_null());
    assert!(s.is_null(), "out-param untouched on failure");
    lt_model_free(model);
}

#[test]
fn bad_prompts_and_threads() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synth(dir.path()));
    let (mut cp, cap, mut sp) = defaults();
    cp.n_ctx = 64;
    let s = session(model, &cp, &cap);
    let bad = [b'h', 0xff, 0];
    assert_eq!(
        lt_session_submit(s, bad.as_ptr() as *const c_char, &sp),
        lt_status::LT_INVALID_UTF8
    );
    assert_eq!(
        lt_session_submit(s, c"".as_ptr(), &sp),
        lt_status::LT_INVALID_ARGUMENT
    );
    sp.n_predict = 0;
    assert_eq!(
        lt_session_submit(s, c"x".as_ptr(), &sp),
        lt_status::LT_INVALID_ARGUMENT
    );
    sp.n_predict = 4;
    // Too long for n_ctx 64: the generation fails; its END event carries the status.
    let long = CString::new("z".repeat(2000)).unwrap(); // llama.cpp pads n_ctx up, so go far past it
    assert_eq!(lt_session_submit(s, long.as_ptr(), &sp), lt_status::LT_OK);
    let mut ev = std::mem::MaybeUninit::new(sized::<lt_event>());
    let end = loop {
        match lt_session_next(s, 5000, ev.as_mut_ptr()) {
            lt_status::LT_OK => {
                // SAFETY: written on LT_OK.
                let e = unsafe { ev.assume_init() };
                if e.kind == LT_EVENT_END {
                    break e;
                }
            }
            other => panic!("unexpected {other:?}: {}", last_error()),
        }
    };
    assert_eq!(end.end_status, lt_status::LT_PROMPT_TOO_LONG);
    // SAFETY: END events carry a NUL-terminated message valid until the next call.
    let msg = unsafe { CStr::from_ptr(end.end_message) }
        .to_string_lossy()
        .into_owned();
    assert!(msg.contains("context"), "{msg}");
    let t0 = std::time::Instant::now();
    assert_eq!(
        lt_session_next(s, 10_000, ev.as_mut_ptr()),
        lt_status::LT_END
    );
    assert!(
        t0.elapsed().as_secs() < 5,
        "LT_END comes at once, not after the timeout"
    );

    lt_session_free(s);

    // A generation that cannot finish: its small lossless ring fills and nobody reads.
    let (mut cp, mut cap, mut sp) = defaults();
    cp.n_ctx = 512;
    cp.n_batch = 64;
    cp.n_ubatch = 64;
    cap.ring_bytes = 64 << 10;
    sp.n_predict = 200;
    let s = session(model, &cp, &cap);
    assert_eq!(
        lt_session_submit(s, c"busy busy".as_ptr(), &sp),
        lt_status::LT_OK
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        lt_session_submit(s, c"again".as_ptr(), &sp),
        lt_status::LT_BUSY,
        "a second submit while one runs"
    );
    // Two threads reading one session: one of them is refused with LT_BUSY
    // (the rule is one thread at a time) rather than corrupting the reader.
    let addr = s as usize;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let seen = std::sync::atomic::AtomicBool::new(false);
    let read_until_busy = || {
        while !seen.load(std::sync::atomic::Ordering::Relaxed)
            && std::time::Instant::now() < deadline
        {
            let mut ev = std::mem::MaybeUninit::new(sized::<lt_event>());
            if lt_session_next(addr as *mut lt_session, 1, ev.as_mut_ptr()) == lt_status::LT_BUSY {
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    std::thread::scope(|scope| {
        scope.spawn(read_until_busy);
        read_until_busy();
    });
    let busy_seen = seen.load(std::sync::atomic::Ordering::Relaxed);
    assert!(busy_seen, "two threads on one session must see LT_BUSY");
    lt_session_free(s); // cancels and joins the running generation
    lt_model_free(model);
}

/// What a callback saw, for tests that check the stream's shape.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Seen {
    kind: u32,
    step: u32,
    seq: u64,
    flags: u32,
    logprob: f32,
    end_frames: u64,
    end_drops: u64,
    end_status: lt_status,
}

/// Copy the fields of `ev` a test checks.
fn seen(ev: &lt_event) -> Seen {
    let mut s = Seen {
        kind: ev.kind,
        step: 0,
        seq: 0,
        flags: 0,
        logprob: 0.0,
        end_frames: ev.end_frames,
        end_drops: ev.end_drops,
        end_status: ev.end_status,
    };
    // SAFETY: non-NULL header pointers are valid while the event is.
    unsafe {
        if let Some(f) = ev.frame.as_ref() {
            (s.step, s.seq) = (f.step, f.seq);
        }
        if let Some(t) = ev.token.as_ref() {
            (s.step, s.flags, s.logprob) = (t.step, t.flags, t.logprob);
        }
    }
    s
}

/// Records every event; returns 0 (stop) once `stop_at` events were seen.
struct Recorder {
    events: Vec<Seen>,
    stop_at: usize,
}

unsafe extern "C" fn record(user: *mut std::ffi::c_void, ev: *const lt_event) -> i32 {
    // SAFETY: user points to the test's Recorder; ev is valid during the call.
    let (r, ev) = unsafe { (&mut *(user as *mut Recorder), &*ev) };
    r.events.push(seen(ev));
    i32::from(r.events.len() < r.stop_at)
}

fn generate(
    s: *mut lt_session,
    prompt: &std::ffi::CStr,
    sp: &lt_sampling_params,
    stop_at: usize,
) -> (lt_status, Vec<Seen>) {
    let mut r = Recorder {
        events: Vec::new(),
        stop_at,
    };
    let st = lt_session_generate(
        s,
        prompt.as_ptr(),
        sp,
        Some(record),
        &mut r as *mut Recorder as *mut _,
    );
    (st, r.events)
}

#[test]
fn callback_api_runs_and_stops_early() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synth(dir.path()));
    let (cp, cap, mut sp) = defaults();
    let s = session(model, &cp, &cap);
    sp.n_predict = 50;
    let (st, ev) = generate(s, c"stop me", &sp, 3);
    assert_eq!(st, lt_status::LT_CANCELLED);
    // Three events, then (after the stop) the END event only, which reports the stop.
    assert_eq!(ev.len(), 4, "{ev:?}");
    assert!(ev[..3].iter().all(|e| e.kind != LT_EVENT_END), "{ev:?}");
    assert_eq!(ev[3].kind, LT_EVENT_END);
    assert_eq!(ev[3].end_status, lt_status::LT_CANCELLED);
    // The session is usable again and a full run ends with LT_OK.
    sp.n_predict = 2;
    let (st, ev) = generate(s, c"ab", &sp, usize::MAX);
    assert_eq!(st, lt_status::LT_OK, "{}", last_error());
    // 3 prompt tokens + 2 generated, frames: 3 layers x 2 steps, and the END event.
    assert_eq!(ev.len(), 3 + 2 + 6 + 1);
    lt_session_free(s);
    lt_model_free(model);
}

#[test]
fn stream_order_and_counters_are_per_generation() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synth(dir.path()));
    let (mut cp, cap, mut sp) = defaults();
    cp.n_ctx = 128;
    sp.n_predict = 3;
    let s = session(model, &cp, &cap);
    let runs: Vec<Vec<Seen>> = (0..2)
        .map(|_| {
            let (st, ev) = generate(s, c"ab", &sp, usize::MAX);
            assert_eq!(st, lt_status::LT_OK, "{}", last_error());
            ev
        })
        .collect();
    for ev in &runs {
        // Prompt tokens (BOS, 'a', 'b') first: step 0, prompt flag, NaN logprob...
        for e in &ev[..3] {
            assert_eq!(
                (e.kind, e.step, e.flags),
                (LT_EVENT_TOKEN, 0, LT_ROW_PROMPT),
                "{ev:?}"
            );
            assert!(e.logprob.is_nan());
        }
        // ...then step 0's frames (3 layers) and its sampled token, then each step's
        // frames and token, then END.
        let kinds: Vec<(u32, u32)> = ev[3..].iter().map(|e| (e.kind, e.step)).collect();
        let (f, t) = (LT_EVENT_FRAME, LT_EVENT_TOKEN);
        assert_eq!(
            kinds,
            [
                (f, 0),
                (f, 0),
                (f, 0),
                (t, 0),
                (f, 1),
                (f, 1),
                (f, 1),
                (t, 1)
            ]
            .into_iter()
            .chain([(f, 2), (f, 2), (f, 2), (t, 2), (LT_EVENT_END, 0)])
            .collect::<Vec<_>>()
        );
        assert!(ev[3..12]
            .iter()
            .filter(|e| e.kind == t)
            .all(|e| e.logprob <= 0.0));
        // Frame seq numbers and END counters count this generation only.
        let seqs: Vec<u64> = ev.iter().filter(|e| e.kind == f).map(|e| e.seq).collect();
        assert_eq!(seqs, (0..9).collect::<Vec<u64>>());
        let end = ev.last().unwrap();
        assert_eq!((end.end_frames, end.end_drops), (9, 0));
    }
    // (Debug text: NaN logprobs compare unequal.)
    assert_eq!(
        format!("{:?}", runs[0]),
        format!("{:?}", runs[1]),
        "the second generation looks like the first"
    );
    lt_session_free(s);
    lt_model_free(model);
}

/// Mode 2 with a context this test creates through llama.cpp, as an app does.
#[test]
fn plugin_batch_index_and_polling() {
    use llama_cpp_sys_2 as sys;
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path());
    latent_tap::engine::backend::init();
    // SAFETY: plain llama.cpp calls on valid arguments; every pointer is checked and freed.
    unsafe {
        let model =
            sys::llama_model_load_from_file(path.as_ptr(), sys::llama_model_default_params());
        assert!(!model.is_null());
        let (_, cap, _) = defaults();
        let mut tap = null_mut();
        assert_eq!(
            lt_tap_new(model, &cap, 32, &mut tap),
            lt_status::LT_OK,
            "{}",
            last_error()
        );
        let mut mode = 0;
        assert_eq!(lt_tap_capture_mode(tap, &mut mode), lt_status::LT_OK);
        assert_eq!(mode, 2, "the test binary links the scheduler wrappers");
        let mut p = sys::llama_context_default_params();
        (
            p.n_ctx,
            p.n_batch,
            p.n_ubatch,
            p.n_threads,
            p.n_threads_batch,
        ) = (64, 32, 32, 2, 2);
        assert_eq!(lt_tap_attach(tap, &mut p), lt_status::LT_OK);
        let ctx = sys::llama_init_from_model(model, p);
        assert!(!ctx.is_null());
        // A 4-token prompt with logits on its last token only.
        let n = 4;
        let mut batch = sys::llama_batch_init(n, 0, 1);
        batch.n_tokens = n;
        for i in 0..n as usize {
            *batch.token.add(i) = [1, 70, 71, 72][i];
            *batch.pos.add(i) = i as i32;
            *batch.n_seq_id.add(i) = 1;
            **batch.seq_id.add(i) = 0;
            *batch.logits.add(i) = i8::from(i + 1 == n as usize);
        }
        // Before any batch: no index is valid.
        assert_eq!(
            lt_tap_push_token(tap, ctx, 3, 5, 0, 4, 0, 3),
            lt_status::LT_INVALID_ARGUMENT
        );
        assert!(
            last_error().contains("lt_tap_begin_batch"),
            "{}",
            last_error()
        );
        assert_eq!(lt_tap_begin_batch(tap, ctx, &batch, 0), lt_status::LT_OK);
        assert_eq!(sys::llama_decode(ctx, batch), 0);
        // After llama_decode returns, its frames are all readable: poll with timeout 0.
        let mut ev = std::mem::MaybeUninit::new(sized::<lt_event>());
        let mut frames = Vec::new();
        loop {
            match lt_tap_next(tap, 0, ev.as_mut_ptr()) {
                lt_status::LT_OK => frames.push(seen(&*ev.as_ptr())),
                lt_status::LT_TIMEOUT => break,
                other => panic!("{other:?}: {}", last_error()),
            }
        }
        assert_eq!(frames.len(), 3, "one frame per layer, no END: {frames:?}");
        assert!(frames.iter().all(|f| f.kind == LT_EVENT_FRAME));
        // Index 0 of a prompt batch has no logits: a status and a message, not a crash.
        assert_eq!(
            lt_tap_push_token(tap, ctx, 0, 5, 0, 4, 0, 3),
            lt_status::LT_INVALID_ARGUMENT
        );
        assert!(
            last_error().contains("logits at index 3"),
            "{}",
            last_error()
        );
        assert_eq!(
            lt_tap_push_token(tap, ctx, 4, 5, 0, 4, 0, 3),
            lt_status::LT_INVALID_ARGUMENT
        );
        assert_eq!(
            lt_tap_push_token(tap, ctx, -2, 5, 0, 4, 0, 3),
            lt_status::LT_INVALID_ARGUMENT
        );
        // The batch index of the token with logits, or -1, works.
        assert_eq!(
            lt_tap_push_token(tap, ctx, n - 1, 5, 0, 4, 0, 3),
            lt_status::LT_OK,
            "{}",
            last_error()
        );
        assert_eq!(
            lt_tap_push_token(tap, ctx, -1, 5, 0, 4, 0, 3),
            lt_status::LT_OK
        );
        for _ in 0..2 {
            assert_eq!(lt_tap_next(tap, 0, ev.as_mut_ptr()), lt_status::LT_OK);
            let e = &*ev.as_ptr();
            assert_eq!(e.kind, LT_EVENT_TOKEN);
            let t = &*e.token;
            assert_eq!((t.token, t.n_top), (5, 3));
            assert!(t.logprob < 0.0 && t.logprob.is_finite());
        }
        assert_eq!(lt_tap_next(tap, 0, ev.as_mut_ptr()), lt_status::LT_TIMEOUT);
        sys::llama_batch_free(batch);
        sys::llama_free(ctx);
        lt_tap_free(tap);
        sys::llama_model_free(model);
    }
}

#[test]
fn capture_mode_is_chosen_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synth(dir.path()));
    let (cp, cap, _) = defaults();
    // 0 = auto (the default): deferred in this build (test binaries link the
    // scheduler wrappers, no GPU backend); 1 = callback as asked; 2 = deferred.
    for (asked, used) in [(0u32, 2u32), (1, 1), (2, 2)] {
        let mut c = cap;
        c.capture_mode = asked;
        let s = session(model, &cp, &c);
        let mut mode = 99;
        assert_eq!(lt_session_capture_mode(s, &mut mode), lt_status::LT_OK);
        assert_eq!(mode, used, "asked {asked}");
        assert_eq!(
            lt_session_capture_mode(s, null_mut()),
            lt_status::LT_NULL_POINTER
        );
        lt_session_free(s);
    }
    // Tokens only: nothing is captured.
    let mut c = cap;
    c.patterns = c"".as_ptr();
    let s = session(model, &cp, &c);
    let mut mode = 99;
    assert_eq!(lt_session_capture_mode(s, &mut mode), lt_status::LT_OK);
    assert_eq!(mode, 0);
    lt_session_free(s);
    let mut mode = 99;
    assert_eq!(
        lt_session_capture_mode(null(), &mut mode),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(
        lt_tap_capture_mode(null(), &mut mode),
        lt_status::LT_NULL_POINTER
    );
    assert_eq!(mode, 99, "out-param untouched on failure");
    lt_model_free(model);
}
