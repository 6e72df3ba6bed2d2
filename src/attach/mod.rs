//! Taps of programs latent-tap does not run: the wire between the `LD_PRELOAD`
//! library (`crates/latent-tap-preload`) and `latent-tap listen`, and the
//! listener itself.

pub mod hub;
pub mod listen;
#[cfg(feature = "serve")]
pub mod observe;
pub mod sink;
pub use latent_tap_core::attach::{pair, wire};
