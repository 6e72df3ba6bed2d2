//! latent-tap: stream per-layer latent tensors out of a running llama.cpp model,
//! aligned with the tokens it samples and the distributions they came from.
//!
//! Data flows through the modules in this order:
//! [`select`] (which graph nodes) → [`capture`] (how bytes leave the graph) →
//! [`ring`] (lock-free transport off the compute thread) → [`stream`] / [`output`]
//! (consumers). [`engine`] wraps llama.cpp; [`session`] drives generation.
#![recursion_limit = "256"]
#![warn(missing_docs)]

// The llama-free modules live in the core crate (`crates/latent-tap-core`);
// they keep their paths here (`latent_tap::ring`, …) for users and for the
// modules of this crate.
pub use latent_tap_core::{
    convert, error, gguf, logits, output, record, ring, rpc, run, select, settings, steer, stream,
    synth, tokens,
};

pub mod attach;
pub mod capture;
pub mod dataset;
pub mod engine;
pub mod ffi;
pub mod lens;
pub mod sched;
#[cfg(feature = "serve")]
pub mod server;
pub mod session;
#[cfg(feature = "view")]
pub mod view;

pub use error::{Error, ErrorKind, Result};
