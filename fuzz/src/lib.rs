//! The parsers of latent-tap that read untrusted input, compiled alone from
//! the main crate's sources so the fuzz targets need no llama.cpp build.
#![deny(unsafe_op_in_unsafe_fn)]
#![allow(dead_code)]

#[path = "../../src/error.rs"]
pub mod error;
#[path = "../../src/gguf.rs"]
pub mod gguf;
#[path = "../../src/record.rs"]
pub mod record;
#[path = "../../src/select.rs"]
pub mod select;

/// `latent-tap listen`'s wire and pairing (input from another process).
pub mod attach;

pub use error::{Error, ErrorKind, Result};
