//! Taps of programs latent-tap does not run: the wire between the `LD_PRELOAD`
//! library (`crates/latent-tap-preload`) and `latent-tap listen`.

pub mod wire;
