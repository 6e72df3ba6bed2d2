//! Bad input through the C API: every case returns a status and a message;
//! nothing aborts. Calls the exported `extern "C"` functions directly.

use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::ptr::{null, null_mut};

use latent_tap::ffi::*;
use latent_tap::synth::{SynthConfig, SynthModel};

fn last_error() -> String {
    // SAFETY: lt_last_error never returns NULL.
    unsafe { CStr::from_ptr(lt_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A zeroed struct of the API with its `struct_size` set, as a C caller does.
fn sized<T>() -> T {
    // SAFETY: the API's structs are POD; zero is a valid bit pattern for all fields.
    let mut v: T = unsafe { std::mem::zeroed() };
    // SAFETY: every sized struct starts with a u32 struct_size.
    unsafe { (&mut v as *mut T as *mut u32).write(std::mem::size_of::<T>() as u32) };
    v
}

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

unsafe extern "C" fn stop_after_three(user: *mut std::ffi::c_void, ev: *const lt_event) -> i32 {
    // SAFETY: user points to the test's counter; ev is valid during the call.
    let (n, ev) = unsafe { (&mut *(user as *mut u32), &*ev) };
    *n += 1;
    assert!(ev.kind == LT_EVENT_FRAME || ev.kind == LT_EVENT_TOKEN || ev.kind == LT_EVENT_END);
    i32::from(*n < 3)
}

#[test]
fn callback_api_runs_and_stops_early() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&synth(dir.path()));
    let (cp, cap, mut sp) = defaults();
    let s = session(model, &cp, &cap);
    sp.n_predict = 50;
    let mut n = 0u32;
    let st = lt_session_generate(
        s,
        c"stop me".as_ptr(),
        &sp,
        Some(stop_after_three),
        &mut n as *mut u32 as *mut _,
    );
    assert_eq!(st, lt_status::LT_CANCELLED);
    assert_eq!(n, 3, "no callback after it returned 0");
    // The session is usable again and a full run ends with LT_OK.
    sp.n_predict = 2;
    let mut n = 0u32;
    unsafe extern "C" fn count(user: *mut std::ffi::c_void, _: *const lt_event) -> i32 {
        // SAFETY: user points to the counter.
        unsafe { *(user as *mut u32) += 1 };
        1
    }
    let st = lt_session_generate(
        s,
        c"ab".as_ptr(),
        &sp,
        Some(count),
        &mut n as *mut u32 as *mut _,
    );
    assert_eq!(st, lt_status::LT_OK, "{}", last_error());
    // 3 prompt tokens + 2 generated, frames: 3 layers x 2 steps, and the END event.
    assert_eq!(n, 3 + 2 + 6 + 1);
    lt_session_free(s);
    lt_model_free(model);
}
