//! The llama-free half of attaching to a running llama.cpp program: the wire
//! between the `LD_PRELOAD` tap and `latent-tap listen`, and the pairing of
//! the rows it sends with their tokens.

pub mod pair;
pub mod wire;
