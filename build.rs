//! Builds `cbits/sched_hooks.c` (the deferred capture mode's link-time hooks)
//! and wraps the three ggml scheduler calls they intercept in everything this
//! package links: the binary, tests, benches, examples and the shared library.
//! A program that links the static library (or a crate that depends on this
//! one) without these flags gets the callback mode; see docs/capture-modes.md.

const WRAPPED: [&str; 3] = [
    "ggml_backend_sched_set_eval_callback",
    "ggml_backend_sched_alloc_graph",
    "ggml_backend_sched_graph_compute_async",
];

fn main() {
    println!("cargo:rerun-if-changed=cbits/sched_hooks.c");
    // Which CPU this build targets (`-C target-cpu=…`, set by .cargo/config.toml
    // for a native build, or by RUSTFLAGS): reported by `--version`, manifests
    // and `/props` as `engine::build_info()`. llama-cpp-sys-2 turns
    // `target-cpu=native` into GGML_NATIVE=ON for llama.cpp.
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let cpu = flags
        .split('\x1f')
        .filter_map(|f| f.split("target-cpu=").nth(1))
        .next_back()
        .unwrap_or("generic")
        .to_string();
    println!("cargo:rustc-env=LATENT_TAP_TARGET_CPU={cpu}");
    // Shared llama.cpp libraries: interpose the symbols instead of wrapping them.
    let shared = std::env::var_os("CARGO_FEATURE_DYNAMIC_LINK").is_some()
        || std::env::var_os("CARGO_FEATURE_DYNAMIC_BACKENDS").is_some();
    let mut cc = cc::Build::new();
    cc.file("cbits/sched_hooks.c")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true);
    if shared {
        cc.define("LT_INTERPOSE", None);
    }
    cc.compile("latent_tap_sched_hooks");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    // GNU ld, gold and lld (Linux, the BSDs) know --wrap; Apple's ld64 does not.
    if target_os != "macos" && target_os != "ios" && target_os != "windows" {
        // Crates that link this one into their own binaries (the Python
        // extension) read the list as DEP_LATENT_TAP_WRAP and pass the same flags.
        if !shared {
            println!("cargo:wrap={}", WRAPPED.join(","));
        }
        for f in WRAPPED {
            if shared {
                println!("cargo:rustc-link-arg=-Wl,--export-dynamic-symbol={f}");
            } else {
                println!("cargo:rustc-link-arg=-Wl,--wrap={f}");
            }
        }
        if shared {
            println!("cargo:rustc-link-lib=dl");
        }
    }
}
