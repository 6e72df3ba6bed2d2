//! `NativeModel`: a loaded GGUF model (`engine::Model`), shared by the runs
//! started from it; `close()` drops this handle's reference (runs in flight
//! keep theirs until they end).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};

use latent_tap::engine::{ContextOptions, Model, ModelOptions};
use latent_tap::lens::Lens;
use latent_tap::session::probe_graph;
use latent_tap::settings;

use crate::py_err;

/// A GGUF model loaded by llama.cpp (use `latent_tap.Model`).
#[pyclass(module = "latent_tap._native", frozen)]
#[derive(Debug)]
pub struct NativeModel {
    inner: Mutex<Option<Arc<Model>>>,
    path: PathBuf,
    /// The logit lens (final norm + unembedding), read on first use.
    lens: Mutex<Option<Arc<Lens>>>,
}

impl NativeModel {
    /// The model, or `ValueError` once closed.
    pub(crate) fn get(&self) -> PyResult<Arc<Model>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                PyValueError::new_err(format!("the model {} is closed", self.path.display()))
            })
    }
}

#[pymethods]
impl NativeModel {
    /// Load `path` (GGUF). `gpu_layers`: layers to offload (-1: all the build's
    /// devices take, 0: none), as the CLI's `--gpu-layers`; `rpc`: llama.cpp
    /// RPC workers `"HOST:PORT,..."` that take them, as the CLI's `--rpc`.
    #[new]
    #[pyo3(signature = (path, gpu_layers = -1, rpc = None))]
    fn new(py: Python<'_>, path: PathBuf, gpu_layers: i32, rpc: Option<String>) -> PyResult<Self> {
        if !path.exists() {
            return Err(PyFileNotFoundError::new_err(format!(
                "cannot load model {}: no such file",
                path.display()
            )));
        }
        let opts = ModelOptions {
            n_gpu_layers: gpu_layers,
            rpc_servers: rpc
                .as_deref()
                .map(latent_tap::rpc::parse_servers)
                .transpose()
                .map_err(py_err)?
                .unwrap_or_default(),
        };
        let p = path.clone();
        let model = py.detach(move || Model::load(&p, &opts)).map_err(py_err)?;
        Ok(Self {
            inner: Mutex::new(Some(model)),
            path,
            lens: Mutex::new(None),
        })
    }

    /// Path the model was loaded from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// True once `close()` ran.
    #[getter]
    fn closed(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// Architecture name from the GGUF (e.g. `gemma3`).
    #[getter]
    fn arch(&self) -> PyResult<String> {
        Ok(self.get()?.arch())
    }

    /// Number of layers.
    #[getter]
    fn n_layer(&self) -> PyResult<usize> {
        Ok(self.get()?.n_layer())
    }

    /// Width of the residual stream.
    #[getter]
    fn n_embd(&self) -> PyResult<usize> {
        Ok(self.get()?.n_embd())
    }

    /// Vocabulary size.
    #[getter]
    fn n_vocab(&self) -> PyResult<usize> {
        Ok(self.get()?.n_vocab())
    }

    /// Token ids of `text` (`add_special`: the BOS the model wants, as generation does).
    #[pyo3(signature = (text, add_special = true))]
    fn tokenize(&self, text: &str, add_special: bool) -> PyResult<Vec<i32>> {
        self.get()?.tokenize(text, add_special).map_err(py_err)
    }

    /// The bytes of token `id` (may be part of a UTF-8 character).
    fn token_bytes<'py>(&self, py: Python<'py>, id: i32) -> PyResult<Bound<'py, PyBytes>> {
        let m = self.get()?;
        check_token(&m, id)?;
        Ok(PyBytes::new(py, &m.token_bytes(id)))
    }

    /// True for end-of-generation tokens.
    fn is_eog(&self, id: i32) -> PyResult<bool> {
        let m = self.get()?;
        check_token(&m, id)?;
        Ok(m.is_eog(id))
    }

    /// Every node of the graph, from a one-token probe: tuples
    /// `(name, layer or None, shape for one token, row width or None)`; nodes
    /// without a row width have no per-token row and are never captured.
    #[pyo3(signature = (threads = None))]
    #[allow(clippy::type_complexity)]
    fn graph(
        &self,
        py: Python<'_>,
        threads: Option<i32>,
    ) -> PyResult<Vec<(String, Option<i32>, Vec<i64>, Option<usize>)>> {
        let m = self.get()?;
        let opts = ContextOptions {
            n_ctx: 256,
            n_threads: threads,
            ..ContextOptions::default()
        };
        opts.validate().map_err(py_err)?;
        let nodes = py.detach(|| probe_graph(&m, &opts)).map_err(py_err)?;
        Ok(nodes
            .into_iter()
            .map(|n| {
                let shape = n.ne.iter().copied().take_while(|&d| d > 0).collect();
                (n.name, n.layer, shape, n.row_width)
            })
            .collect())
    }

    /// Logit lens: the model's final norm and unembedding applied to the rows
    /// of `x` (float32 `[rows, n_embd]`, residual-stream rows such as
    /// `l_out-N`), giving float32 logits `[rows, n_vocab]` (after the
    /// soft-cap where the model has one). The GIL is released meanwhile.
    #[pyo3(signature = (x, threads = None))]
    fn lens_logits<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let m = self.get()?;
        let (rows, width) = (x.shape()[0], x.shape()[1]);
        if width != m.n_embd() {
            return Err(PyValueError::new_err(format!(
                "lens rows have width {width}, not n_embd {}: only residual-stream rows (l_out-N) can be read",
                m.n_embd()
            )));
        }
        let data = x
            .as_slice()
            .map(<[f32]>::to_vec)
            .unwrap_or_else(|_| x.as_array().iter().copied().collect());
        if data.iter().any(|v| !v.is_finite()) {
            return Err(PyValueError::new_err("lens rows hold a non-finite value"));
        }
        let threads = threads.unwrap_or_else(|| settings::spare_core_threads().max(1) as usize);
        let lens = {
            let mut g = self.lens.lock().unwrap_or_else(|e| e.into_inner());
            match &*g {
                Some(l) if l.threads() == threads.max(1) => l.clone(),
                _ => {
                    let l = Arc::new(py.detach(|| Lens::for_model(&m, threads)).map_err(py_err)?);
                    *g = Some(l.clone());
                    l
                }
            }
        };
        let logits = py.detach(|| lens.logits(&data)).map_err(py_err)?;
        PyArray1::from_vec(py, logits).reshape([rows, m.n_vocab()])
    }

    /// Drop this handle's model (runs in flight finish first); later calls raise `ValueError`.
    fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.lens.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn check_token(m: &Model, id: i32) -> PyResult<()> {
    if id < 0 || id as usize >= m.n_vocab() {
        return Err(PyValueError::new_err(format!(
            "token id {id} is out of range 0..{}",
            m.n_vocab()
        )));
    }
    Ok(())
}
