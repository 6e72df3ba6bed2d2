//! The parsers of latent-tap that read untrusted input, from the llama-free
//! core crate, so the fuzz targets need no llama.cpp build.

pub use latent_tap_core::{attach, error, gguf, record, select};
pub use latent_tap_core::{Error, ErrorKind, Result};
