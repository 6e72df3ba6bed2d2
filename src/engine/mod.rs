//! Safe RAII wrappers over the raw llama.cpp pointers.

pub mod backend;
pub use backend::{build_info, BuildInfo};
mod batch;
mod chat;
mod context;
mod model;
mod probe;
pub mod rpc;
mod sampler;

pub use batch::Batch;
pub(crate) use batch::LabelledBatch;
pub use chat::{apply_chat_template, builtin_chat_templates, chat_template_supported};
pub use context::{default_threads, Context, ContextOptions};
pub use model::{Model, ModelOptions, Token};
pub(crate) use probe::probe_context;
pub use sampler::{Sampler, SamplingOptions};
