//! `NativeRun`: one generation. The library's [`Generator`] decodes on a worker
//! thread; the Python thread reads the ring (with the GIL released) and either
//! folds every record into an `output::Collector` (`collect`, for
//! `Model.generate`) or cuts the records into one event per sampled token
//! (`next_event`, for `Model.stream`). Between reads the Python thread checks
//! for signals: Ctrl-C cancels the decode, drains the stream, joins the worker
//! and raises `KeyboardInterrupt`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use numpy::PyArray1;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use latent_tap::capture::{CaptureMode, Policy, Rows};
use latent_tap::engine::{ContextOptions, SamplingOptions};
use latent_tap::output::Collector;
use latent_tap::record::{Dtype, Record};
use latent_tap::select::{LayerFilter, SelectedTensor};
use latent_tap::session::{probe_graph, CaptureSpec, GenerateOptions, Generator, RunStats};
use latent_tap::settings;
use latent_tap::stream::Stream;

use crate::edits::{self, PatchArg, SteerArg};
use crate::model::NativeModel;
use crate::{py_err, LatentTapError};

/// How long the Python thread waits for records before it looks for signals.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);
/// How long one `next` on the ring waits.
const POLL: Duration = Duration::from_millis(10);

/// One generation in flight (use `latent_tap.Model.generate` / `stream`).
#[pyclass(module = "latent_tap._native", frozen)]
#[derive(Debug)]
pub struct NativeRun {
    state: Mutex<State>,
    selection: Vec<SelectedTensor>,
    skipped: Vec<(String, String)>,
    dtype: Dtype,
    /// For token bytes: the records carry them whole, but `Collector` keeps
    /// text (lossy where a token holds part of a UTF-8 character).
    model: Arc<latent_tap::engine::Model>,
    /// What the run's steers and patches apply (JSON), `None` when unedited.
    edits: Option<String>,
}

#[derive(Debug)]
struct State {
    stream: Stream,
    worker: Option<JoinHandle<latent_tap::Result<RunStats>>>,
    cancel: Arc<AtomicBool>,
    /// The worker's result once joined.
    outcome: Option<latent_tap::Result<RunStats>>,
    collector: Option<Collector>,
    split: Split,
}

/// The generation settings a run takes (keyword arguments of `Model.generate`).
#[derive(Debug, FromPyObject)]
pub struct Settings {
    n_predict: usize,
    tensors: String,
    layers: Option<String>,
    rows: String,
    dtype: String,
    top_k: usize,
    temperature: f32,
    sample_top_k: i32,
    top_p: f32,
    min_p: f32,
    seed: u32,
    n_ctx: u32,
    n_batch: u32,
    n_ubatch: Option<u32>,
    threads: Option<i32>,
    capture_mode: String,
    ring_mb: Option<usize>,
    block_timeout: f64,
}

impl Settings {
    /// The library's types for these settings, checked by the library's
    /// validators (the CLI's bounds), errors naming the keyword.
    fn resolve(
        &self,
        n_prompts: usize,
    ) -> latent_tap::Result<(CaptureSpec, GenerateOptions, ContextOptions)> {
        use latent_tap::Error;
        let rows = Rows::parse(&self.rows).map_err(|_| {
            Error::invalid(format!("rows must be 'all' or 'last', not '{}'", self.rows))
        })?;
        let mode = CaptureMode::parse(&self.capture_mode)
            .map_err(|e| Error::invalid(format!("capture_mode: {e}")))?;
        let dtype = Dtype::parse(&self.dtype).map_err(|e| Error::invalid(format!("dtype: {e}")))?;
        let layers = self
            .layers
            .as_deref()
            .map(LayerFilter::parse)
            .transpose()
            .map_err(|e| Error::invalid(format!("layers: {e}")))?;
        let ring_mb = self.ring_mb.unwrap_or(settings::DEFAULT_RING_BYTES >> 20);
        if ring_mb == 0 {
            return Err(Error::invalid("ring_mb must be at least 1"));
        }
        let ring_bytes = ring_mb
            .checked_mul(1 << 20)
            .ok_or_else(|| Error::invalid(format!("ring_mb {ring_mb} is too large")))?;
        let spec = CaptureSpec {
            patterns: vec![self.tensors.clone()],
            layers,
            rows,
            dtype,
            ring_bytes,
            policy: Policy::Block {
                timeout: settings::block_timeout_from_secs(self.block_timeout)
                    .map_err(|e| Error::invalid(format!("block_timeout: {e}")))?,
            },
            mode,
        };
        spec.validate()?;
        latent_tap::ring::check_memory(spec.ring_bytes)?;
        let gen = GenerateOptions {
            n_predict: self.n_predict,
            sampling: SamplingOptions {
                temperature: self.temperature,
                top_k: self.sample_top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                seed: self.seed,
            },
            n_probs: self.top_k,
        };
        gen.validate()?;
        let ctx = ContextOptions {
            n_ctx: self.n_ctx,
            n_batch: self.n_batch,
            n_ubatch: self.n_ubatch.unwrap_or(ContextOptions::default().n_ubatch),
            n_seq_max: u32::try_from(n_prompts).unwrap_or(u32::MAX),
            n_threads: Some(self.threads.unwrap_or_else(settings::spare_core_threads)),
            poll: Some(settings::check_poll(settings::DEFAULT_POLL)?),
            ..ContextOptions::default()
        };
        ctx.validate()?;
        Ok((spec, gen, ctx))
    }
}

#[pymethods]
impl NativeRun {
    /// Start generating from `prompts` (one sequence each) on `model`,
    /// steered by `steer` (tuples `(vector, file, layers, scale, positions, tensor)`)
    /// and patched by `patch` (tuples `(tensor, pos, data)`): the generator is
    /// this run's own, so the edits end with it.
    #[staticmethod]
    #[pyo3(signature = (model, prompts, settings, steer = Vec::new(), patch = Vec::new()))]
    fn start<'py>(
        py: Python<'py>,
        model: &NativeModel,
        prompts: Vec<String>,
        settings: Settings,
        steer: Vec<SteerArg<'py>>,
        patch: Vec<PatchArg<'py>>,
    ) -> PyResult<Self> {
        if prompts.is_empty() {
            return Err(PyValueError::new_err("no prompt given"));
        }
        // As the CLI: an empty text is refused (it would generate from BOS alone).
        if let Some(i) = prompts.iter().position(String::is_empty) {
            return Err(PyValueError::new_err(format!("prompt {i} is empty")));
        }
        let model = model.get()?;
        let (spec, gen_opts, ctx_opts) = settings.resolve(prompts.len()).map_err(py_err)?;
        let tokens = prompts
            .iter()
            .map(|p| model.tokenize(p, true))
            .collect::<latent_tap::Result<Vec<_>>>()
            .map_err(py_err)?;
        if let Some(i) = tokens.iter().position(Vec::is_empty) {
            return Err(PyValueError::new_err(format!(
                "prompt {i} is empty (it has no tokens)"
            )));
        }
        let longest = tokens.iter().map(Vec::len).max().unwrap_or(0);
        let n_ctx = ctx_opts.n_ctx as usize;
        let (mut gen, stream) = py
            .detach(|| Generator::new(model.clone(), &ctx_opts, &spec))
            .map_err(py_err)?;
        let run_edits = if steer.is_empty() && patch.is_empty() {
            edits::RunEdits::default()
        } else {
            // A tokens-only generator has not probed the graph yet.
            let probed;
            let graph = if gen.graph().is_empty() {
                probed = py
                    .detach(|| probe_graph(&model, &ctx_opts))
                    .map_err(py_err)?;
                &probed[..]
            } else {
                gen.graph()
            };
            let lim = edits::Limits {
                model: &model,
                n_ctx,
                end: longest.saturating_add(gen_opts.n_predict).min(n_ctx),
                graph,
            };
            edits::build(&steer, &patch, &lim)?
        };
        if !run_edits.edits.is_empty() {
            py.detach(|| gen.set_edits(&run_edits.edits))
                .map_err(py_err)?;
        }
        let selection = gen.selection().to_vec();
        let skipped = gen
            .skipped()
            .iter()
            .map(|s| (s.name.clone(), s.reason.to_string()))
            .collect();
        let cancel = gen.cancel_flag();
        let worker = std::thread::Builder::new()
            .name("latent-tap-generate".into())
            .spawn(move || {
                let mut gen = gen;
                gen.run(&tokens, &gen_opts, &mut |_| {})
            })
            .map_err(|e| LatentTapError::new_err(format!("cannot start the decode thread: {e}")))?;
        Ok(Self {
            state: Mutex::new(State {
                stream,
                worker: Some(worker),
                cancel,
                outcome: None,
                collector: None,
                split: Split::new(&selection, spec.dtype),
            }),
            selection,
            skipped,
            dtype: spec.dtype,
            model,
            edits: run_edits.summary.map(|v| v.to_string()),
        })
    }

    /// Names and row widths of the captured tensors, in graph order.
    #[getter]
    fn selection(&self) -> Vec<(String, usize)> {
        self.selection
            .iter()
            .map(|t| (t.name.clone(), t.row_width))
            .collect()
    }

    /// Tensors the pattern matched that are not captured, with the reason.
    #[getter]
    fn skipped(&self) -> Vec<(String, String)> {
        self.skipped.clone()
    }

    /// Element type of the rows: `f32`, `f16` or `bf16`.
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.dtype)
    }

    /// What the run's steers and patches apply (JSON: serve's `steer` and
    /// `patch` summaries), `None` when unedited.
    #[getter]
    fn edits(&self) -> Option<String> {
        self.edits.clone()
    }

    /// Stop after the decode in flight (the stream still ends normally).
    fn cancel(&self) {
        if let Ok(s) = self.state.try_lock() {
            s.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// Read the whole run: `(tokens, tensors, seq_gaps)` where tokens are tuples
    /// `(seq, pos, id, piece, prompt, step, logprob, entropy, top)` and tensors
    /// `(name, dtype, width, data: uint8 array, pos, seq, step)`; the row data is
    /// handed to numpy without a copy. Raises the run's error, if any.
    fn collect<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let mut guard = self.lock()?;
        let st: &mut State = &mut guard;
        if st.collector.is_none() {
            st.collector = Some(Collector::new(&self.selection, self.dtype));
        }
        while !st.done() {
            st.read(py, false)?;
        }
        st.join(py)?;
        let c = st.collector.take().expect("collector set above").finish();
        let tokens = PyList::empty(py);
        for t in &c.tokens {
            let top = t.top.as_ref().map(|v| v.to_vec());
            tokens.append((
                t.seq,
                t.pos,
                t.token,
                PyBytes::new(py, &self.model.token_bytes(t.token)),
                t.prompt,
                t.step,
                t.logprob,
                t.entropy,
                top,
            ))?;
        }
        let tensors = PyList::empty(py);
        for t in c.tensors {
            tensors.append((
                t.name,
                dtype_name(t.dtype),
                t.width,
                PyArray1::from_vec(py, t.data),
                PyArray1::from_vec(py, t.pos),
                PyArray1::from_vec(py, t.seq),
                PyArray1::from_vec(py, t.step),
            ))?;
        }
        PyTuple::new(
            py,
            [
                tokens.into_any(),
                tensors.into_any(),
                c.seq_gaps.into_pyobject(py)?.into_any(),
            ],
        )
    }

    /// The next sampled token with the rows of its sequence computed for it:
    /// `(seq, pos, step, id, piece, logprob, entropy, top, prompt, parts)` where
    /// `prompt` holds the sequence's prompt tokens `(id, piece)` on its first
    /// event and `parts` is `(name, data: uint8 array, pos)` per captured tensor.
    /// `None` at the end. Raises the run's error, if any.
    fn next_event<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let mut guard = self.lock()?;
        let st: &mut State = &mut guard;
        loop {
            if let Some(ev) = st.split.ready.pop_front() {
                return ev.into_py(py, &self.selection).map(Some);
            }
            if st.done() {
                st.join(py)?;
                return Ok(None);
            }
            st.read(py, true)?;
        }
    }

    /// Timings and counts of the finished run (JSON), `None` before it ends.
    fn stats(&self) -> PyResult<Option<String>> {
        let st = self.lock()?;
        Ok(match &st.outcome {
            Some(Ok(s)) => Some(serde_json::to_string(s).unwrap_or_default()),
            _ => None,
        })
    }
}

impl NativeRun {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, State>> {
        // try_lock: a second Python thread blocking here with the GIL held would
        // deadlock against the first, which needs the GIL back to return.
        self.state
            .try_lock()
            .map_err(|_| PyRuntimeError::new_err("this run is being read by another thread"))
    }
}

impl Drop for NativeRun {
    fn drop(&mut self) {
        // Left unread (a loop broken out of, an exception): stop the decode,
        // let the worker finish and free its context.
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        st.cancel.store(true, Ordering::Relaxed);
        st.drain();
        if let Some(w) = st.worker.take() {
            let _ = w.join();
        }
    }
}

impl State {
    /// The stream has ended (or the worker is gone and nothing is left to read).
    fn done(&self) -> bool {
        self.stream.is_finished()
            || (self.worker.as_ref().is_none_or(JoinHandle::is_finished) && self.stream.is_empty())
    }

    /// Read records for up to [`SIGNAL_CHECK`]; in event mode, return as soon
    /// as an event is ready.
    fn pump(&mut self, events: bool) -> latent_tap::Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < SIGNAL_CHECK && !self.done() {
            let Some(item) = self.stream.next(POLL)? else {
                continue;
            };
            let rec = item.record()?;
            match self.collector.as_mut() {
                Some(c) => c.push(&rec)?,
                None => self.split.push(&rec),
            }
            if events && !self.split.ready.is_empty() {
                break;
            }
        }
        Ok(())
    }

    /// One read of the stream with the GIL released ([`State::pump`]), then a
    /// look for signals; an error or a signal cancels the run ([`State::abort`]).
    fn read(&mut self, py: Python<'_>, events: bool) -> PyResult<()> {
        let res = py.detach(|| self.pump(events));
        let res = res.map_err(py_err).and_then(|()| py.check_signals());
        if res.is_err() {
            self.abort(py);
        }
        res
    }

    /// Discard what is left in the stream until it ends.
    fn drain(&mut self) {
        while !self.done() {
            if self.stream.next(POLL).is_err() {
                break;
            }
        }
    }

    /// Cancel after an error or a signal: stop the decode, drain, join.
    fn abort(&mut self, py: Python<'_>) {
        self.cancel.store(true, Ordering::Relaxed);
        py.detach(|| {
            self.drain();
            if let Some(w) = self.worker.take() {
                self.outcome = Some(joined(w));
            }
        });
    }

    /// Join the worker and raise its error, if any.
    fn join(&mut self, py: Python<'_>) -> PyResult<()> {
        if let Some(w) = self.worker.take() {
            self.outcome = Some(py.detach(|| joined(w)));
        }
        match &self.outcome {
            Some(Err(e)) => Err(py_err(e.clone())),
            _ => Ok(()),
        }
    }
}

/// The decode thread's result (a panic there is an internal error).
fn joined(w: JoinHandle<latent_tap::Result<RunStats>>) -> latent_tap::Result<RunStats> {
    w.join().unwrap_or_else(|_| {
        Err(latent_tap::Error::new(
            latent_tap::ErrorKind::Internal,
            "the decode thread panicked",
        ))
    })
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::BF16 => "bf16",
    }
}

/// Rows of one tensor held for an event: row bytes and their positions.
type Part = (Vec<u8>, Vec<i32>);

/// Cuts records into one event per sampled token: the rows a sequence's
/// decode step computed are held until that sequence's token arrives (frames
/// of a step precede the tokens sampled from it).
#[derive(Debug)]
struct Split {
    /// Per sequence, per tensor: row bytes and positions not yet handed out.
    pending: BTreeMap<i32, Vec<Part>>,
    /// Per sequence: prompt tokens not yet handed out.
    prompt: BTreeMap<i32, Vec<(i32, Vec<u8>)>>,
    ready: VecDeque<Event>,
    n_tensors: usize,
    elem: usize,
}

#[derive(Debug)]
struct Event {
    seq: i32,
    pos: i32,
    step: u32,
    token: i32,
    piece: Vec<u8>,
    logprob: f32,
    entropy: f32,
    top: Vec<(i32, f32)>,
    prompt: Vec<(i32, Vec<u8>)>,
    parts: Vec<Part>,
}

impl Split {
    fn new(selection: &[SelectedTensor], dtype: Dtype) -> Self {
        Self {
            pending: BTreeMap::new(),
            prompt: BTreeMap::new(),
            ready: VecDeque::new(),
            n_tensors: selection.len(),
            elem: dtype.size(),
        }
    }

    fn push(&mut self, rec: &Record<'_>) {
        match rec {
            Record::Frame(f) => {
                let t = f.header.tensor_index as usize;
                if t >= self.n_tensors || f.rows.is_empty() {
                    return;
                }
                let row = f.data.len() / f.rows.len();
                for (i, r) in f.rows.iter().enumerate() {
                    let n = self.n_tensors;
                    let parts = self
                        .pending
                        .entry(r.seq_id)
                        .or_insert_with(|| vec![(Vec::new(), Vec::new()); n]);
                    parts[t]
                        .0
                        .extend_from_slice(&f.data[i * row..(i + 1) * row]);
                    parts[t].1.push(r.pos);
                }
                debug_assert_eq!(row % self.elem.max(1), 0);
            }
            Record::Token(tv) => {
                let h = tv.header;
                if tv.is_prompt() {
                    self.prompt
                        .entry(h.seq_id)
                        .or_default()
                        .push((h.token, tv.piece.to_vec()));
                    return;
                }
                let n = self.n_tensors;
                self.ready.push_back(Event {
                    seq: h.seq_id,
                    pos: h.pos,
                    step: h.step,
                    token: h.token,
                    piece: tv.piece.to_vec(),
                    logprob: h.logprob,
                    entropy: h.entropy,
                    top: tv.top.iter().map(|e| (e.id, e.logprob)).collect(),
                    prompt: self.prompt.remove(&h.seq_id).unwrap_or_default(),
                    parts: self
                        .pending
                        .remove(&h.seq_id)
                        .unwrap_or_else(|| vec![(Vec::new(), Vec::new()); n]),
                });
            }
            Record::End(_) => {}
        }
    }
}

impl Event {
    fn into_py<'py>(
        self,
        py: Python<'py>,
        selection: &[SelectedTensor],
    ) -> PyResult<Bound<'py, PyTuple>> {
        let prompt = PyList::empty(py);
        for (id, piece) in &self.prompt {
            prompt.append((*id, PyBytes::new(py, piece)))?;
        }
        let parts = PyList::empty(py);
        for (t, (data, pos)) in selection.iter().zip(self.parts) {
            parts.append((
                t.name.as_str(),
                PyArray1::from_vec(py, data),
                PyArray1::from_vec(py, pos),
            ))?;
        }
        PyTuple::new(
            py,
            [
                self.seq.into_pyobject(py)?.into_any(),
                self.pos.into_pyobject(py)?.into_any(),
                self.step.into_pyobject(py)?.into_any(),
                self.token.into_pyobject(py)?.into_any(),
                PyBytes::new(py, &self.piece).into_any(),
                self.logprob.into_pyobject(py)?.into_any(),
                self.entropy.into_pyobject(py)?.into_any(),
                self.top.into_pyobject(py)?.into_any(),
                prompt.into_any(),
                parts.into_any(),
            ],
        )
    }
}
