//! Taps of programs latent-tap does not run: the wire between the `LD_PRELOAD`
//! library (`crates/latent-tap-preload`) and `latent-tap listen`, and the
//! listener itself.

pub mod hub;
pub mod listen;
#[cfg(feature = "serve")]
pub mod observe;
pub mod pair;
pub mod sink;
pub mod wire;
