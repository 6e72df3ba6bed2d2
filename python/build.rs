//! The deferred capture mode intercepts three ggml scheduler calls at link
//! time (see the main crate's build.rs and docs/capture-modes.md). The main
//! crate's build script publishes the list as `DEP_LATENT_TAP_WRAP`; pass the
//! same `--wrap` flags to this extension so it gets `deferred` too.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_LATENT_TAP_WRAP");
    if let Ok(list) = std::env::var("DEP_LATENT_TAP_WRAP") {
        for f in list.split(',').filter(|f| !f.is_empty()) {
            println!("cargo:rustc-link-arg-cdylib=-Wl,--wrap={f}");
        }
    }
}
