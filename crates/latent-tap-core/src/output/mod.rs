//! Consumers that turn a stream into files: an in-memory [`Collector`] and the
//! writers for a capture directory (`tokens.jsonl`, `latents.safetensors`).

mod collect;
mod read;
mod safetensors;

pub use collect::{collect, count_nonfinite, Collected, Collector, TensorRows, TokenEvent};
pub use read::{read_rows, stored_tensors, StoredRows};
pub use safetensors::{header, write_entries, write_safetensors, Entry, EntryMeta};
