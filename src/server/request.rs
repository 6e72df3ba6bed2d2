//! Request bodies: typed reads from JSON with llama-server's defaults, every
//! wrong type or out-of-range value answered with a 400 naming the field.

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::capture::Rows;
use crate::engine::{SamplingOptions, Token};
use crate::record::Dtype;
use crate::sched::{LatentRequest, Scheduler};
use crate::select::LayerFilter;

/// Most alternatives a request may ask for per token.
pub const MAX_N_PROBS: usize = 100;

/// The body as a JSON object.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad(format!("request body is not valid UTF-8: {e}")))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("request body must be a JSON object")),
        Err(e) => Err(ApiError::bad(format!("invalid JSON in request body: {e}"))),
    }
}

fn num(m: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("'{key}' must be a finite number"))),
        Some(_) => Err(ApiError::bad(format!("'{key}' must be a number"))),
    }
}

/// An integer field (JSON numbers with a fraction are refused).
pub fn int(m: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| {
            ApiError::bad(format!("'{key}' must be an integer in the 64-bit range"))
        }),
        Some(_) => Err(ApiError::bad(format!("'{key}' must be an integer"))),
    }
}

/// A boolean field.
pub fn boolean(m: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::bad(format!("'{key}' must be a boolean"))),
    }
}

/// A string field.
pub fn string<'a>(m: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad(format!("'{key}' must be a string"))),
    }
}

/// Generation settings of one request.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// Tokens to generate; `None`: until end of generation or the slot is full.
    pub n_predict: Option<usize>,
    /// Sampler.
    pub sampling: SamplingOptions,
    /// The seed as requested (-1: random).
    pub seed_requested: i64,
    /// Top alternatives per token.
    pub n_probs: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Generate past end-of-generation tokens.
    pub ignore_eos: bool,
    /// SSE streaming.
    pub stream: bool,
    /// Latents to deliver.
    pub latents: Option<LatentRequest>,
}

/// Read the fields shared by `/completion` and the OpenAI endpoints.
/// `n_predict_keys` lists the accepted spellings of the token limit.
pub fn gen_params(
    m: &Map<String, Value>,
    n_predict_keys: &[&str],
    default_n_predict: i64,
) -> Result<GenParams, ApiError> {
    let mut n_predict = default_n_predict;
    for k in n_predict_keys {
        if let Some(v) = int(m, k)? {
            n_predict = v;
        }
    }
    let n_predict = match n_predict {
        -1 => None,
        n if n >= 0 => {
            Some(usize::try_from(n).map_err(|_| ApiError::bad("'n_predict' is too large"))?)
        }
        n => {
            return Err(ApiError::bad(format!(
                "'{}' must be -1 (no limit) or a non-negative integer, not {n}",
                n_predict_keys[0]
            )))
        }
    };
    let temperature = num(m, "temperature")?.unwrap_or(0.8) as f32;
    let top_k = int(m, "top_k")?.unwrap_or(40);
    if !(-1..=i32::MAX as i64).contains(&top_k) {
        return Err(ApiError::bad(format!(
            "'top_k' must be between 0 and {}, not {top_k}",
            i32::MAX
        )));
    }
    let top_p = num(m, "top_p")?.unwrap_or(0.95) as f32;
    let min_p = num(m, "min_p")?.unwrap_or(0.05) as f32;
    let seed = int(m, "seed")?.unwrap_or(-1);
    if !(-1..=u32::MAX as i64).contains(&seed) {
        return Err(ApiError::bad(format!(
            "'seed' must be -1 or between 0 and {}, not {seed}",
            u32::MAX
        )));
    }
    let seed_u32 = if seed < 0 {
        // llama-server: LLAMA_DEFAULT_SEED draws a random seed.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0);
        h.finish() as u32
    } else {
        seed as u32
    };
    let n_probs = int(m, "n_probs")?.unwrap_or(0);
    if !(0..=MAX_N_PROBS as i64).contains(&n_probs) {
        return Err(ApiError::bad(format!(
            "'n_probs' must be between 0 and {MAX_N_PROBS}, not {n_probs}"
        )));
    }
    let stop = match m.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad("'stop' must be a string or an array of strings"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(ApiError::bad(
                "'stop' must be a string or an array of strings",
            ))
        }
    };
    let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let sampling = SamplingOptions {
        temperature,
        top_k: top_k.max(0) as i32,
        top_p,
        min_p,
        seed: seed_u32,
    };
    // `cache_prompt` is type-checked and otherwise ignored: no prefix is ever
    // reused, so every prompt row (and its latents) is computed.
    boolean(m, "cache_prompt")?;
    // The library's one set of sampling bounds (shared with the CLI and C API).
    sampling
        .validate()
        .map_err(|e| ApiError::bad(e.message()))?;
    Ok(GenParams {
        n_predict,
        sampling,
        seed_requested: seed,
        n_probs: n_probs as usize,
        stop,
        ignore_eos: boolean(m, "ignore_eos")?.unwrap_or(false),
        stream: boolean(m, "stream")?.unwrap_or(false),
        latents: latents(m.get("latents"))?,
    })
}

/// The `latents` request field: `{"tensors", "layers", "rows", "dtype"}`, or a
/// bare pattern string.
pub fn latents(v: Option<&Value>) -> Result<Option<LatentRequest>, ApiError> {
    let m =
        match v {
            None | Some(Value::Null) | Some(Value::Bool(false)) => return Ok(None),
            Some(Value::String(s)) => {
                let mut m = Map::new();
                m.insert("tensors".into(), Value::String(s.clone()));
                m
            }
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(ApiError::bad(
                "'latents' must be an object like {\"tensors\": \"l_out-*\"} or a pattern string",
            )),
        };
    latent_request(
        string(&m, "tensors")?,
        string(&m, "layers")?,
        string(&m, "rows")?,
        string(&m, "dtype")?,
    )
    .map(Some)
}

/// Build a latent request from its four textual settings (JSON or query string),
/// unset ones at the `latents` object's defaults.
pub fn latent_request(
    tensors: Option<&str>,
    layers: Option<&str>,
    rows: Option<&str>,
    dtype: Option<&str>,
) -> Result<LatentRequest, ApiError> {
    LatentFields::parse(tensors, layers, rows, dtype).map(LatentFields::request)
}

/// The four textual latent settings, checked; unset ones stay `None` (each
/// endpoint has its defaults; [`LatentFields::request`] applies the `latents`
/// object's).
#[derive(Debug, Default)]
pub struct LatentFields {
    /// Comma-separated globs (none empty).
    pub tensors: Option<String>,
    /// Layer filter.
    pub layers: Option<LayerFilter>,
    /// All rows or the last ones.
    pub rows: Option<Rows>,
    /// Element type delivered.
    pub dtype: Option<Dtype>,
}

impl LatentFields {
    /// Check `tensors`, `layers`, `rows` and `dtype`; a wrong one is a 400 naming it.
    pub fn parse(
        tensors: Option<&str>,
        layers: Option<&str>,
        rows: Option<&str>,
        dtype: Option<&str>,
    ) -> Result<Self, ApiError> {
        if let Some(t) = tensors {
            if t.split(',').any(|p| p.trim().is_empty()) {
                return Err(ApiError::bad(format!(
                    "latents 'tensors' has an empty pattern: '{t}'"
                )));
            }
        }
        let layers = layers
            .map(LayerFilter::parse)
            .transpose()
            .map_err(|e| ApiError::bad(format!("latents 'layers': {e}")))?;
        let rows = rows
            .map(|r| {
                Rows::parse(r).map_err(|_| {
                    ApiError::bad(format!(
                        "latents 'rows' must be \"all\" or \"last\", not '{r}'"
                    ))
                })
            })
            .transpose()?;
        let dtype = dtype
            .map(Dtype::parse)
            .transpose()
            .map_err(|e| ApiError::bad(format!("latents 'dtype': {e}")))?;
        Ok(Self {
            tensors: tensors.map(str::to_string),
            layers,
            rows,
            dtype,
        })
    }

    /// The glob patterns one by one (none given: empty).
    pub fn patterns(&self) -> Vec<String> {
        self.tensors.as_deref().map_or_else(Vec::new, |t| {
            t.split(',').map(|p| p.trim().to_string()).collect()
        })
    }

    /// A latent request with the `latents` object's defaults: `l_out-*`, all rows, f32.
    pub fn request(self) -> LatentRequest {
        LatentRequest {
            patterns: vec![self.tensors.unwrap_or_else(|| "l_out-*".into())],
            layers: self.layers,
            rows: self.rows.unwrap_or(Rows::All),
            dtype: self.dtype.unwrap_or(Dtype::F32),
        }
    }
}

/// Refuse, before tokenizing, a prompt of `text_bytes` bytes of text and
/// `n_ids` token ids that could not fit a slot even if every token stood for
/// the vocabulary's longest text ([`Scheduler::fewest_tokens`]): the usual
/// `exceed_context_size_error`, with the bound as "at least N tokens".
pub fn fits_before_tokenizing(
    engine: &Scheduler,
    text_bytes: usize,
    n_ids: usize,
) -> Result<(), ApiError> {
    let fewest = engine.fewest_tokens(text_bytes).saturating_add(n_ids);
    if engine.prompt_fits(fewest) {
        return Ok(());
    }
    Err(ApiError::exceeds_context(fewest, true, engine.n_ctx_slot()))
}

/// A prompt: text (tokenized with BOS and special tokens), token ids, or a
/// mix of both in one array. One far longer than a slot is refused before it
/// is tokenized ([`fits_before_tokenizing`]).
pub fn prompt(engine: &Scheduler, v: Option<&Value>) -> Result<Vec<Token>, ApiError> {
    let model = engine.model();
    let n_vocab = model.n_vocab() as i64;
    let id = |v: &Value| -> Result<Token, ApiError> {
        let t = v
            .as_i64()
            .ok_or_else(|| ApiError::bad("'prompt' entries must be strings or token ids"))?;
        if !(0..n_vocab).contains(&t) {
            return Err(ApiError::bad(format!(
                "token id {t} in 'prompt' is out of range 0..{n_vocab}"
            )));
        }
        Ok(t as Token)
    };
    let (text_bytes, n_ids) = match v {
        Some(Value::String(s)) => (s.len(), 0),
        Some(Value::Array(a)) => a.iter().fold((0, 0), |(b, n), v| match v {
            Value::String(s) => (b + s.len(), n),
            _ => (b, n + 1),
        }),
        _ => (0, 0),
    };
    fits_before_tokenizing(engine, text_bytes, n_ids)?;
    let toks = match v {
        None | Some(Value::Null) => return Err(ApiError::bad("'prompt' is required")),
        Some(Value::String(s)) => model.tokenize_ext(s, true, true)?,
        Some(Value::Array(a)) => {
            let strings = a.iter().filter(|v| v.is_string()).count();
            if a.iter().any(|v| v.is_array() || v.is_object())
                || (strings > 1 && strings == a.len())
            {
                return Err(ApiError::unsupported(
                    "several prompts in one request are not supported; send one request per prompt",
                ));
            }
            let mut out = Vec::new();
            for (i, v) in a.iter().enumerate() {
                match v {
                    Value::String(s) => out.extend(model.tokenize_ext(s, i == 0, true)?),
                    v => out.push(id(v)?),
                }
            }
            out
        }
        Some(Value::Number(_)) => vec![id(v.expect("matched"))?],
        Some(_) => {
            return Err(ApiError::bad(
                "'prompt' must be a string or an array of token ids",
            ))
        }
    };
    if toks.is_empty() {
        return Err(ApiError::bad("the prompt is empty"));
    }
    Ok(toks)
}
