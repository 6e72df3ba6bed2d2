//! Process-wide llama.cpp set-up: backend initialisation (once) and logging.
//!
//! llama.cpp logs a lot to stderr; we keep it quiet unless `LATENT_TAP_LOG=1`,
//! but remember the last error line so our own errors can quote it.

use std::ffi::{c_char, c_void, CStr};
use std::sync::{Mutex, Once};

use llama_cpp_sys_2 as sys;

static INIT: Once = Once::new();
// The last few error lines (llama.cpp often logs the cause, then a generic
// "failed to ..." line): quoting them all keeps the cause.
static LAST_LLAMA_ERROR: Mutex<Vec<String>> = Mutex::new(Vec::new());
const KEPT_ERROR_LINES: usize = 3;

/// Initialise llama.cpp's backends once per process (idempotent, thread-safe).
pub fn init() {
    INIT.call_once(|| {
        let verbose = std::env::var_os("LATENT_TAP_LOG").is_some_and(|v| v != "0");
        // SAFETY: `log_callback` is a valid `extern "C"` fn for the process lifetime and
        // ignores its user-data pointer; llama_backend_init has no preconditions.
        unsafe {
            let data = if verbose {
                1usize as *mut c_void
            } else {
                std::ptr::null_mut()
            };
            sys::llama_log_set(Some(log_callback), data);
            sys::llama_backend_init();
        }
        load_backends_from_env();
    });
}

/// `LATENT_TAP_BACKEND_DIR=DIR`: for `dynamic-backends` builds run on another
/// machine than they were built on (the build's backend folder is not there):
/// load every backend in DIR when none is registered, else only DIR's CUDA
/// module (loading the CPU backend twice gives two CPU devices).
fn load_backends_from_env() {
    let Some(dir) = std::env::var_os("LATENT_TAP_BACKEND_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let cstr = |p: &std::path::Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok();
    // SAFETY: registry calls with NUL-terminated paths that live through the call.
    unsafe {
        if sys::ggml_backend_dev_count() == 0 {
            if let Some(d) = cstr(&dir) {
                sys::ggml_backend_load_all_from_path(d.as_ptr());
            }
        } else if let Some(cuda) = cstr(&dir.join("libggml-cuda.so")) {
            if dir.join("libggml-cuda.so").is_file() {
                sys::ggml_backend_load(cuda.as_ptr());
            }
        }
    }
}

/// Take (and clear) the last error-level lines llama.cpp logged (up to three,
/// joined by "; "), if any.
pub fn take_last_llama_error() -> Option<String> {
    let mut g = LAST_LLAMA_ERROR.lock().unwrap_or_else(|e| e.into_inner());
    let s = std::mem::take(&mut *g).join("; ");
    (!s.is_empty()).then_some(s)
}

unsafe extern "C" fn log_callback(
    level: sys::ggml_log_level,
    text: *const c_char,
    data: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for this call.
    let line = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    if level == sys::GGML_LOG_LEVEL_ERROR {
        let _ = std::panic::catch_unwind(|| {
            let mut g = LAST_LLAMA_ERROR.lock().unwrap_or_else(|e| e.into_inner());
            if g.len() == KEPT_ERROR_LINES {
                g.remove(0);
            }
            g.push(line.trim_end().to_string());
        });
    }
    if !data.is_null() {
        eprint!("{line}");
    }
}

/// What this build of llama.cpp runs with: the `-C target-cpu` it was compiled
/// for (`native` is the default source build, see README "Build for this
/// machine"; `generic` is the portable one) and the CPU features ggml's CPU
/// backend uses (`llama_print_system_info`'s entries that are on: `AVX2`,
/// `AVX512`, `AVX512_VNNI`, …). Shown by `latent-tap --version`, run
/// manifests and `serve`'s `/props`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    /// `-C target-cpu=` of this build (`native`, `x86-64-v3`, …) or `generic`.
    pub target_cpu: &'static str,
    /// CPU features the CPU backend was built with and uses.
    pub cpu_features: Vec<String>,
}

impl BuildInfo {
    /// `{"version", "target_cpu", "cpu_features"}` as in manifests and `/props`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "target_cpu": self.target_cpu,
            "cpu_features": self.cpu_features,
        })
    }

    /// One line: `target-cpu native; CPU features: SSE3 AVX2 …`.
    pub fn line(&self) -> String {
        format!(
            "target-cpu {}; CPU features: {}",
            self.target_cpu,
            self.cpu_features.join(" ")
        )
    }
}

/// This build's [`BuildInfo`] (initialises the backends on first use).
pub fn build_info() -> BuildInfo {
    init();
    // SAFETY: llama_print_system_info returns a pointer to a static buffer of
    // llama.cpp's (NUL-terminated) or null; we copy it out at once.
    let text = unsafe {
        let p = sys::llama_print_system_info();
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    BuildInfo {
        target_cpu: env!("LATENT_TAP_TARGET_CPU"),
        cpu_features: features_on(&text),
    }
}

/// The `NAME = 1` entries of a `llama_print_system_info` text, in order, once
/// each (`CPU : SSE3 = 1 | AVX = 1 | … | LLAMAFILE = 1 |`).
fn features_on(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in text.split('|') {
        let part = part.rsplit(':').next().unwrap_or(part);
        if let Some((name, value)) = part.split_once('=') {
            let name = name.trim();
            if value.trim() == "1" && !name.is_empty() && !out.iter().any(|n| n == name) {
                out.push(name.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_on_keeps_the_enabled_entries_in_order() {
        let t = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 0 | AVX2 = 1 | AVX512 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ";
        assert_eq!(
            features_on(t),
            [
                "SSE3",
                "SSSE3",
                "AVX",
                "AVX2",
                "AVX512",
                "LLAMAFILE",
                "OPENMP",
                "REPACK"
            ]
        );
        assert!(features_on("").is_empty());
    }

    #[test]
    fn build_info_reports_the_running_cpu_backend() {
        let b = build_info();
        assert!(!b.target_cpu.is_empty());
        // Every x86-64 build of ggml has at least SSE3; other targets report theirs.
        #[cfg(target_arch = "x86_64")]
        assert!(
            b.cpu_features.iter().any(|f| f == "SSE3"),
            "{:?}",
            b.cpu_features
        );
    }
}
