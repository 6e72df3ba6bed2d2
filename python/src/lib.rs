//! `latent_tap._native`: the in-process half of the Python package, a thin
//! layer over the `latent-tap` library (PyO3). It owns no mechanism of its
//! own: models load through `engine::Model`, settings are checked by the
//! library's validators (`latent_tap::settings`, `CaptureSpec::validate`, …),
//! generation runs in `session::Generator`, and records are folded by
//! `output::Collector`. The Python classes users see (`latent_tap.Model`,
//! `Result`, `Step`) live in `latent_tap/_model.py` and wrap this module.
//!
//! Errors: invalid arguments and prompts that do not fit raise `ValueError`,
//! a missing model file `FileNotFoundError`, everything else
//! `latent_tap.LatentTapError` (a `RuntimeError`), always with the library's
//! message. No panic crosses into Python (PyO3 turns one into an exception).
#![warn(missing_docs)]

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

mod edits;
mod model;
mod run;

create_exception!(
    latent_tap,
    LatentTapError,
    PyRuntimeError,
    "An error from latent-tap or llama.cpp (the message says which)."
);

/// A library error as the Python exception of its kind.
pub(crate) fn py_err(e: latent_tap::Error) -> PyErr {
    use latent_tap::ErrorKind as K;
    let msg = e.to_string();
    match e.kind() {
        K::InvalidArgument | K::NoMatch | K::PromptTooLong => PyValueError::new_err(msg),
        _ => LatentTapError::new_err(msg),
    }
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("LatentTapError", m.py().get_type::<LatentTapError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_class::<model::NativeModel>()?;
    m.add_class::<run::NativeRun>()?;
    Ok(())
}

/// How the library was built (llama.cpp version, target CPU, backends), as JSON.
#[pyfunction]
fn build_info() -> String {
    latent_tap::engine::build_info().to_json().to_string()
}
