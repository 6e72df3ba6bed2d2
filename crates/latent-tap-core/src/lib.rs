//! The llama-free core of latent-tap: everything that neither links nor calls
//! llama.cpp, shared by the main crate (`latent-tap`: CLI, C ABI, `serve`),
//! the `LD_PRELOAD` tap (`latent-tap-preload`), the fuzz targets and the
//! Miri/ThreadSanitizer harnesses as an ordinary dependency.
//!
//! - [`error`]: the one error type (kinds map one-to-one onto the C `lt_status`);
//! - [`record`]: the binary record formats and the one registry of record
//!   kinds ([`record::kind`]);
//! - [`convert`]: row copies and dtype conversion (F32/F16/BF16, any to any);
//! - [`ring`]: the lock-free SPSC ring, in-process or in shared memory ([`ring::shm`]);
//! - [`select`]: which graph nodes to capture (globs, layers); [`settings`]:
//!   the bounds of every setting and their checks;
//! - [`stream`]: the reader side of a ring; [`tokens`]: token statistics;
//! - [`output`]: collectors and safetensors writing; [`run`]: the run-directory
//!   format that dataset capture and `latent-tap listen` write;
//! - [`lens`]: the llama-free half of the logit lens (options, statistics,
//!   translators, JSON);
//! - [`gguf`]: the GGUF pre-check; [`synth`]: synthetic GGUF models for tests;
//! - [`attach`]: the attach wire and the pairing of rows with tokens.
#![warn(missing_docs)]

pub mod attach;
pub mod convert;
pub mod error;
pub mod gguf;
pub mod lens;
pub mod logits;
pub mod output;
pub mod record;
pub mod ring;
pub mod rpc;
pub mod run;
pub mod select;
pub mod settings;
pub mod steer;
pub mod stream;
pub mod synth;
pub mod tokens;

pub use error::{Error, ErrorKind, Result};
