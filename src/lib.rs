//! latent-tap: stream per-layer latent tensors out of a running llama.cpp model,
//! aligned with the tokens it samples and the distributions they came from.
//!
//! Data flows through the modules in this order:
//! [`select`] (which graph nodes) → [`capture`] (how bytes leave the graph) →
//! [`ring`] (lock-free transport off the compute thread) → [`stream`] / [`output`]
//! (consumers). [`engine`] wraps llama.cpp; [`session`] drives generation.
#![deny(unsafe_op_in_unsafe_fn)]
#![recursion_limit = "256"]
#![warn(missing_docs)]
#![warn(missing_debug_implementations)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod attach;
pub mod capture;
pub mod dataset;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod gguf;
pub mod output;
pub mod record;
pub mod ring;
pub mod sched;
pub mod select;
#[cfg(feature = "serve")]
pub mod server;
pub mod session;
pub mod settings;
pub mod stream;
pub mod synth;
pub mod tokens;

pub use error::{Error, ErrorKind, Result};
