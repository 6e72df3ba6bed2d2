//! `src/attach`'s llama-free parts: the wire and the pairing of rows.

#[path = "../../src/attach/pair.rs"]
pub mod pair;
#[path = "../../src/attach/wire.rs"]
pub mod wire;
