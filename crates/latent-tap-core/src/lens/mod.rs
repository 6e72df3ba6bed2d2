//! The llama-free half of the logit lens (see `docs/lens.md`): what a lens
//! request asks for ([`options`]), the statistics of one row of logits
//! ([`stats`]: top-k, entropy, target log-probability and rank, KL to the
//! final layer), tuned-lens translators ([`translators`]) and the JSON shape
//! every front end answers with ([`json`]). The projection itself (final norm
//! and unembedding through ggml) is `latent_tap::lens`.

pub mod dense;
pub mod json;
pub mod options;
pub mod stats;
pub mod translators;

pub use json::{lens_json, LensRow};
pub use options::{LayerSpec, LensOptions, LensRows, Target};
pub use stats::{summarize, CellStats, Reference};
pub use translators::Translators;
