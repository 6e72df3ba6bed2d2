//! `liblatent_tap_preload.so`: taps an unmodified llama.cpp program built
//! with shared libraries (llama.cpp's default on Linux), for example
//! `llama-server`, and streams the selected latents to `latent-tap listen`.
//!
//! ```text
//! LD_PRELOAD=target/release/liblatent_tap_preload.so LATENT_TAP_SINK=/tmp/lt.sock \
//!     llama-server -m model.gguf
//! ```
//!
//! How it hooks in (no help from the host): the library defines a few
//! functions the host calls across shared-library boundaries, so the dynamic
//! linker binds the host's calls to these definitions first, and each one
//! calls the host's own definition (found at its first call, however late the
//! host loaded llama.cpp: [`resolve`]) after noting what it needs:
//! - `llama_decode` and the extended batch API (`llama_batch_ext_*`,
//!   `llama_process`): the labels (token, position, sequence, output) of each
//!   batch;
//! - `llama_memory_seq_rm` / `llama_memory_clear`: request boundaries;
//! - `ggml_backend_sched_set_eval_callback`: the host's own callback, kept and
//!   chained;
//! - `ggml_backend_sched_graph_compute(_async)`: per graph, whether a listener
//!   is attached; only then is the tap's eval callback installed for that
//!   graph, so with no listener the host computes exactly as without the tap.
//!
//! Everything the tap does is best-effort and isolated: a panic, a layout it
//! does not recognise or a listener that goes away turns it into a logged
//! no-op; the host's calls always go through. Frames that do not fit in the
//! ring are dropped and counted (drop-newest), never waited for.

// The llama-free parts of latent-tap (selection, ring, records, the attach
// wire, the row copy and dtype conversion of the capture path), from the core
// crate under the names the preload's modules use.
pub use latent_tap_core::attach::wire;
pub use latent_tap_core::{convert, error, record, ring, select};

pub mod config;
pub mod host;
pub mod labels;
pub mod link;
pub mod resolve;
mod tap;

pub use tap::interpose;
