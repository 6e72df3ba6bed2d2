//! A pure-Rust pre-check of GGUF files, run before llama.cpp sees them.
//!
//! llama.cpp's loader reports most malformed files as errors, but some
//! hyperparameters reach a `GGML_ASSERT` (which aborts the process) instead:
//! a `block_count` of 0 or over 512 (`LLAMA_MAX_LAYERS`), expert counts that
//! break its invariants, an unknown RoPE scaling type, a NaN or negative norm
//! epsilon (asserted when the graph runs), head counts whose grouped-query
//! ratio is not whole, an odd or oversized RoPE dimension. [`check_file`]
//! rejects those with an [`ErrorKind::ModelLoad`] error naming the file and key.
//!
//! The parser reads only the header, the metadata and the tensor infos. It is
//! bounded by the file's length: no length field read from the file can make
//! it allocate more than the file holds (long values are skipped, not stored),
//! and it never panics, whatever the bytes.

pub mod write;

use std::io::{self, Read};
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// llama.cpp's `LLAMA_MAX_LAYERS`.
pub const MAX_LAYERS: u64 = 512;
/// llama.cpp's `LLAMA_MAX_EXPERTS`.
pub const MAX_EXPERTS: u64 = 1024;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// ggml's `GGML_MAX_NAME` (names hold at most this many bytes minus the NUL).
const MAX_NAME: u64 = 64;
/// ggml's `GGML_TYPE_COUNT` in the vendored llama.cpp.
const TYPE_COUNT: u32 = 43;
/// Strings longer than this are skipped rather than stored (none that the
/// checks read is anywhere near it).
const MAX_STORED_STR: u64 = 4096;
/// Integer arrays longer than this are skipped rather than stored (per-layer
/// arrays hold at most [`MAX_LAYERS`] entries).
const MAX_STORED_ARR: u64 = MAX_LAYERS;
/// Keys longer than this are refused: no real model has one.
const MAX_KEY: u64 = 1024;

// GGUF value type tags.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// One metadata value, as far as the checks need it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any integer type, widened.
    Int(i128),
    /// `f32` or `f64`, widened.
    Float(f64),
    /// A bool.
    Bool(bool),
    /// A string (lossy UTF-8); `None` when it was too long to store.
    Str(Option<String>),
    /// An array: element type tag, length, and the elements when they are
    /// integers and the array is short (per-layer hyperparameters).
    Array {
        /// GGUF type tag of the elements.
        elem: u32,
        /// Number of elements.
        len: u64,
        /// The elements, for short integer arrays.
        ints: Option<Vec<i128>>,
    },
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(Some(s)) => write!(f, "'{}'", s.escape_debug()),
            Value::Str(None) => f.write_str("a long string"),
            Value::Array { len, .. } => write!(f, "an array of {len}"),
        }
    }
}

/// One tensor info record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Shape in ggml order, `n_dims` entries.
    pub ne: Vec<u64>,
    /// ggml type id.
    pub ty: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

/// What the pre-check read from a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub kv: Vec<(String, Value)>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// File offset of the data section (tensor offsets count from here).
    pub data_start: u64,
}

impl Gguf {
    /// The value of `key`, if present (the first one).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn str_of(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(Some(s))) => Some(s),
            _ => None,
        }
    }
}

/// A reason the file is refused (no path yet; [`check_file`] adds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject(pub String);

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn reject<T>(msg: impl Into<String>) -> std::result::Result<T, Reject> {
    Err(Reject(msg.into()))
}

/// Reads with a known number of bytes left, so hostile lengths are caught
/// before anything is allocated or skipped.
struct Src<R> {
    r: R,
    left: u64,
}

impl<R: Read> Src<R> {
    fn need(&self, n: u64, what: &str) -> std::result::Result<(), Reject> {
        if n > self.left {
            return reject(format!(
                "truncated: {what} needs {n} bytes but only {} remain",
                self.left
            ));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], Reject> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| Reject(format!("cannot read {what}: {e}")))?;
        self.left -= N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, Reject> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, Reject> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    fn skip(&mut self, n: u64, what: &str) -> std::result::Result<(), Reject> {
        self.need(n, what)?;
        let got = io::copy(&mut (&mut self.r).take(n), &mut io::sink())
            .map_err(|e| Reject(format!("cannot read {what}: {e}")))?;
        if got != n {
            return reject(format!("truncated: {what}"));
        }
        self.left -= n;
        Ok(())
    }

    /// A string: stored when at most `max` bytes, else skipped (`None`).
    fn string(&mut self, max: u64, what: &str) -> std::result::Result<Option<String>, Reject> {
        let n = self.u64(what)?;
        self.need(n, what)?;
        if n > max {
            self.skip(n, what)?;
            return Ok(None);
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|e| Reject(format!("cannot read {what}: {e}")))?;
        self.left -= n;
        Ok(Some(String::from_utf8_lossy(&b).into_owned()))
    }

    fn scalar(&mut self, ty: u32, what: &str) -> std::result::Result<Value, Reject> {
        Ok(match ty {
            T_U8 => Value::Int(self.bytes::<1>(what)?[0].into()),
            T_I8 => Value::Int((self.bytes::<1>(what)?[0] as i8).into()),
            T_U16 => Value::Int(u16::from_le_bytes(self.bytes(what)?).into()),
            T_I16 => Value::Int(i16::from_le_bytes(self.bytes(what)?).into()),
            T_U32 => Value::Int(u32::from_le_bytes(self.bytes(what)?).into()),
            T_I32 => Value::Int(i32::from_le_bytes(self.bytes(what)?).into()),
            T_U64 => Value::Int(u64::from_le_bytes(self.bytes(what)?).into()),
            T_I64 => Value::Int(i64::from_le_bytes(self.bytes(what)?).into()),
            T_F32 => Value::Float(f32::from_le_bytes(self.bytes(what)?).into()),
            T_F64 => Value::Float(f64::from_le_bytes(self.bytes(what)?)),
            T_BOOL => match self.bytes::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return reject(format!("{what}: bool byte {b} is neither 0 nor 1")),
            },
            T_STRING => Value::Str(self.string(MAX_STORED_STR, what)?),
            t => return reject(format!("{what}: unknown value type {t}")),
        })
    }

    fn value(&mut self, ty: u32, what: &str) -> std::result::Result<Value, Reject> {
        if ty != T_ARRAY {
            return self.scalar(ty, what);
        }
        let elem = self.u32(what)?;
        let len = self.u64(what)?;
        let size = match elem {
            T_U8 | T_I8 | T_BOOL => 1,
            T_U16 | T_I16 => 2,
            T_U32 | T_I32 | T_F32 => 4,
            T_U64 | T_I64 | T_F64 => 8,
            T_STRING => {
                // Each string has at least its 8-byte length.
                self.need(len.saturating_mul(8), what)?;
                for _ in 0..len {
                    let n = self.u64(what)?;
                    self.skip(n, what)?;
                }
                return Ok(Value::Array {
                    elem,
                    len,
                    ints: None,
                });
            }
            T_ARRAY => return reject(format!("{what}: nested arrays are not GGUF")),
            t => return reject(format!("{what}: unknown array element type {t}")),
        };
        self.need(len.saturating_mul(size), what)?;
        let is_int = !matches!(elem, T_F32 | T_F64 | T_BOOL);
        if !is_int || len > MAX_STORED_ARR {
            self.skip(len * size, what)?;
            return Ok(Value::Array {
                elem,
                len,
                ints: None,
            });
        }
        let mut ints = Vec::with_capacity(len as usize);
        for _ in 0..len {
            match self.scalar(elem, what)? {
                Value::Int(i) => ints.push(i),
                _ => return reject(format!("{what}: bad array element")),
            }
        }
        Ok(Value::Array {
            elem,
            len,
            ints: Some(ints),
        })
    }
}

/// Parse the header, metadata and tensor infos from `r`, which holds `len`
/// bytes. Never panics; allocates at most about `len` bytes.
pub fn parse(r: impl Read, len: u64) -> std::result::Result<Gguf, Reject> {
    let mut s = Src { r, left: len };
    if len < 4 {
        return reject("file is too short to be GGUF");
    }
    if &s.bytes::<4>("magic")? != b"GGUF" {
        return reject("not a GGUF file (bad magic)");
    }
    let version = s.u32("version")?;
    if !(2..=3).contains(&version) {
        return reject(format!("GGUF version {version} is not supported (2 or 3)"));
    }
    let n_tensors = s.u64("tensor count")?;
    let n_kv = s.u64("metadata count")?;
    // Smallest records: a KV is key length + type + a 1-byte value; a tensor info
    // is name length + n_dims + one dim + type + offset.
    if n_kv > s.left / 13 {
        return reject(format!("metadata count {n_kv} does not fit in the file"));
    }
    if n_tensors > s.left / 32 {
        return reject(format!("tensor count {n_tensors} does not fit in the file"));
    }
    let mut kv: Vec<(String, Value)> = Vec::new();
    for i in 0..n_kv {
        let key = s
            .string(MAX_KEY, &format!("metadata key #{i}"))?
            .ok_or_else(|| Reject(format!("metadata key #{i} is longer than {MAX_KEY} bytes")))?;
        if kv.iter().any(|(k, _)| *k == key) {
            return reject(format!("duplicate metadata key '{key}'"));
        }
        let ty = s.u32(&format!("type of '{key}'"))?;
        let v = s.value(ty, &format!("value of '{key}'"))?;
        kv.push((key, v));
    }
    let alignment = match kv.iter().find(|(k, _)| k == "general.alignment") {
        None => 32,
        Some((_, Value::Int(a))) if *a > 0 && (*a as u128).is_power_of_two() && *a <= 1 << 30 => {
            *a as u64
        }
        Some((_, v)) => {
            return reject(format!("general.alignment must be a power of two, not {v}"))
        }
    };
    let mut tensors: Vec<TensorInfo> = Vec::new();
    for i in 0..n_tensors {
        let what = format!("tensor info #{i}");
        let name = s.string(MAX_NAME - 1, &what)?.ok_or_else(|| {
            Reject(format!(
                "{what}: name is longer than {} bytes",
                MAX_NAME - 1
            ))
        })?;
        let n_dims = s.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return reject(format!(
                "tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            ));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        let mut elems: u64 = 1;
        for _ in 0..n_dims {
            let d = s.u64(&what)?;
            elems = match elems.checked_mul(d) {
                Some(e) if e <= i64::MAX as u64 && d <= i64::MAX as u64 => e,
                _ => {
                    return reject(format!(
                        "tensor '{name}' has a shape whose element count overflows"
                    ))
                }
            };
            ne.push(d);
        }
        let ty = s.u32(&what)?;
        if ty >= TYPE_COUNT {
            return reject(format!("tensor '{name}' has unknown ggml type {ty}"));
        }
        let offset = s.u64(&what)?;
        if offset % alignment != 0 {
            return reject(format!(
                "tensor '{name}' data offset {offset} is not aligned to {alignment}"
            ));
        }
        if tensors.iter().any(|t| t.name == name) {
            return reject(format!("duplicate tensor '{name}'"));
        }
        tensors.push(TensorInfo {
            name,
            ne,
            ty,
            offset,
        });
    }
    // Every tensor's data starts inside the file (llama.cpp checks the ends).
    let info_end = len - s.left;
    let data_start = info_end.div_ceil(alignment).saturating_mul(alignment);
    for t in &tensors {
        if data_start.saturating_add(t.offset) > len {
            return reject(format!(
                "tensor '{}' data offset {} lies past the end of the file",
                t.name, t.offset
            ));
        }
    }
    Ok(Gguf {
        version,
        kv,
        tensors,
        data_start,
    })
}

/// An integer hyperparameter: absent, one value for every layer, or per layer.
enum Per {
    Absent,
    All(i128),
    Layers(Vec<i128>),
}

impl Per {
    fn at(&self, il: usize) -> Option<i128> {
        match self {
            Per::Absent => None,
            Per::All(v) => Some(*v),
            Per::Layers(v) => v.get(il).copied(),
        }
    }
}

fn int_of(g: &Gguf, key: &str) -> std::result::Result<Option<i128>, Reject> {
    match g.get(key) {
        None => Ok(None),
        Some(Value::Int(i)) => Ok(Some(*i)),
        Some(v) => reject(format!("{key} must be an integer, not {v}")),
    }
}

fn per_layer(g: &Gguf, key: &str, n_layer: u64) -> std::result::Result<Per, Reject> {
    match g.get(key) {
        None => Ok(Per::Absent),
        Some(Value::Int(i)) => Ok(Per::All(*i)),
        Some(Value::Array { ints: Some(v), .. }) if v.len() as u64 == n_layer => {
            Ok(Per::Layers(v.clone()))
        }
        Some(Value::Array { len, ints, .. }) => reject(format!(
            "{key} is an array of {len}{} where {n_layer} integers (one per layer) are expected",
            if ints.is_none() { " non-integers" } else { "" }
        )),
        Some(v) => reject(format!("{key} must be an integer, not {v}")),
    }
}

/// Check the hyperparameters llama.cpp asserts on (rather than reporting),
/// for the file's architecture.
pub fn check_hparams(g: &Gguf) -> std::result::Result<(), Reject> {
    let Some(arch) = g.str_of("general.architecture") else {
        // llama.cpp reports a missing architecture itself.
        return Ok(());
    };
    let k = |s: &str| format!("{arch}.{s}");
    let n_layer = match int_of(g, &k("block_count"))? {
        // llama.cpp reports a missing block_count itself.
        None => return Ok(()),
        Some(n) if n < 1 || n > MAX_LAYERS as i128 => {
            return reject(format!(
                "{} is {n}; llama.cpp supports 1 to {MAX_LAYERS} layers",
                k("block_count")
            ))
        }
        Some(n) => n as u64,
    };
    if let Some(n) = int_of(g, &k("nextn_predict_layers"))? {
        if n < 0 || n > n_layer as i128 {
            return reject(format!(
                "{} is {n}, more than block_count {n_layer}",
                k("nextn_predict_layers")
            ));
        }
    }
    // Experts (llama_model_base::load_hparams).
    let n_expert = int_of(g, &k("expert_count"))?.unwrap_or(0);
    if !(0..=MAX_EXPERTS as i128).contains(&n_expert) {
        return reject(format!(
            "{} is {n_expert}; llama.cpp supports 0 to {MAX_EXPERTS}",
            k("expert_count")
        ));
    }
    let used = per_layer(g, &k("expert_used_count"), n_layer)?;
    let used_max = (0..n_layer as usize)
        .filter_map(|il| used.at(il))
        .max()
        .unwrap_or(0);
    let groups = int_of(g, &k("expert_group_count"))?.unwrap_or(0);
    let group_used = int_of(g, &k("expert_group_used_count"))?.unwrap_or(0);
    if used_max < 0 || used_max > n_expert {
        return reject(format!(
            "{} is {used_max}, more than expert_count {n_expert}",
            k("expert_used_count")
        ));
    }
    if n_expert > 0 {
        if used_max == 0 {
            return reject(format!(
                "{} is 0 with {n_expert} experts",
                k("expert_used_count")
            ));
        }
        if groups < 0 || groups >= n_expert {
            return reject(format!(
                "{} is {groups}; it must be below expert_count {n_expert}",
                k("expert_group_count")
            ));
        }
        if groups > 1 && (n_expert % groups != 0 || group_used <= 0 || group_used >= groups) {
            return reject(format!(
                "{} {groups} and {} {group_used} do not fit {n_expert} experts",
                k("expert_group_count"),
                k("expert_group_used_count")
            ));
        }
    } else if groups != 0 {
        return reject(format!(
            "{} is {groups} but the model has no experts",
            k("expert_group_count")
        ));
    }
    // RoPE scaling type: an unknown name is asserted on.
    if let Some(v) = g.get(&k("rope.scaling.type")) {
        match v {
            Value::Str(Some(s)) if ["none", "linear", "yarn", "longrope"].contains(&s.as_str()) => {
            }
            v => {
                return reject(format!(
                    "{} is {v}; llama.cpp knows none, linear, yarn and longrope",
                    k("rope.scaling.type")
                ))
            }
        }
    }
    // Norm epsilons: ggml asserts eps >= 0 when the graph runs (NaN fails that too).
    for key in [
        k("attention.layer_norm_rms_epsilon"),
        k("attention.layer_norm_epsilon"),
    ] {
        match g.get(&key) {
            None => {}
            Some(Value::Float(e)) if e.is_finite() && *e >= 0.0 => {}
            Some(v) => return reject(format!("{key} is {v}; it must be a finite number >= 0")),
        }
    }
    // Heads: grouped-query attention needs whole groups (ggml asserts on the
    // broadcast), and RoPE rotates pairs within a head.
    let n_embd = int_of(g, &k("embedding_length"))?;
    if let Some(e) = n_embd {
        if e < 1 || e > u32::MAX as i128 {
            return reject(format!(
                "{} is {e}; it must be positive",
                k("embedding_length")
            ));
        }
    }
    let heads = per_layer(g, &k("attention.head_count"), n_layer)?;
    let heads_kv = per_layer(g, &k("attention.head_count_kv"), n_layer)?;
    for il in 0..n_layer as usize {
        let h = heads.at(il).unwrap_or(0);
        let kv = heads_kv.at(il).unwrap_or(h);
        if h < 0 || kv < 0 || h > u32::MAX as i128 || kv > u32::MAX as i128 {
            return reject(format!(
                "{} / {} of layer {il} is out of range ({h} / {kv})",
                k("attention.head_count"),
                k("attention.head_count_kv")
            ));
        }
        if kv > 0 && h % kv != 0 {
            return reject(format!(
                "{} {kv} does not divide {} {h} (layer {il})",
                k("attention.head_count_kv"),
                k("attention.head_count")
            ));
        }
        if kv == 0 && h > 0 && matches!(heads_kv, Per::All(_)) {
            return reject(format!(
                "{} is 0 with {h} attention heads",
                k("attention.head_count_kv")
            ));
        }
    }
    if arch == "llama" {
        // Its graph divides by the head count and asserts that key and value
        // heads have one size (llama-arch models without attention do not exist).
        if let Some(il) = (0..n_layer as usize).find(|&il| heads.at(il).unwrap_or(0) == 0) {
            return reject(format!(
                "{} is 0 or missing for layer {il}",
                k("attention.head_count")
            ));
        }
        let kl = int_of(g, &k("attention.key_length"))?;
        let vl = int_of(g, &k("attention.value_length"))?;
        if kl.is_some() && vl.is_some() && kl != vl {
            return reject(format!(
                "{} {} differs from {} {}; llama needs one head size",
                k("attention.key_length"),
                kl.unwrap_or(0),
                k("attention.value_length"),
                vl.unwrap_or(0)
            ));
        }
    }
    let n_head = heads.at(0).unwrap_or(0);
    if n_head > 0 {
        let head_k = match int_of(g, &k("attention.key_length"))? {
            Some(v) => v,
            None => n_embd.unwrap_or(0) / n_head,
        };
        if let Some(rot) = int_of(g, &k("rope.dimension_count"))? {
            if rot < 0 || rot % 2 != 0 || rot > head_k {
                return reject(format!(
                    "{} is {rot}; it must be even and at most the head size {head_k}",
                    k("rope.dimension_count")
                ));
            }
        }
    }
    Ok(())
}

/// Pre-check the file at `path` before llama.cpp loads it: a readable regular
/// file, well-formed GGUF header, metadata and tensor infos, and none of the
/// hyperparameters llama.cpp aborts on. Errors are [`ErrorKind::ModelLoad`],
/// one line, naming the file.
pub fn check_file(path: &Path) -> Result<Gguf> {
    let fail = |why: String| {
        Error::new(
            ErrorKind::ModelLoad,
            format!("cannot load model {}: {why}", path.display()),
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if meta.is_dir() {
        return Err(fail("it is a directory, not a GGUF file".into()));
    }
    let f = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let g = parse(io::BufReader::new(f), meta.len()).map_err(|r| fail(r.0))?;
    check_hparams(&g).map_err(|r| fail(r.0))?;
    Ok(g)
}

/// Parse and check a whole GGUF file held in memory (for fuzzing and tests).
pub fn check_bytes(bytes: &[u8]) -> std::result::Result<Gguf, Reject> {
    let g = parse(bytes, bytes.len() as u64)?;
    check_hparams(&g)?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{SynthConfig, SynthModel};

    fn synth_bytes() -> Vec<u8> {
        let mut v = Vec::new();
        SynthModel::random(SynthConfig::default())
            .write_gguf_to(&mut v)
            .unwrap();
        v
    }

    /// Replace the value of the u32/f32 metadata `key` in a synthetic file.
    fn patch(bytes: &mut [u8], key: &str, value: [u8; 4]) {
        let mut needle = (key.len() as u64).to_le_bytes().to_vec();
        needle.extend_from_slice(key.as_bytes());
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap_or_else(|| panic!("{key} not in the file"));
        let v = at + needle.len() + 4;
        bytes[v..v + 4].copy_from_slice(&value);
    }

    #[test]
    fn synthetic_model_passes() {
        let g = check_bytes(&synth_bytes()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.tensors.len(), 3 + 9 * 3);
        assert_eq!(g.get("llama.block_count"), Some(&Value::Int(3)));
        assert_eq!(g.tensors[0].name, "token_embd.weight");
        assert_eq!(g.tensors[0].ne, vec![64, 260]);
    }

    #[test]
    fn asserted_hparams_are_rejected() {
        let cases: [(&str, [u8; 4], &str); 9] = [
            ("llama.block_count", 0u32.to_le_bytes(), "1 to 512"),
            ("llama.block_count", 513u32.to_le_bytes(), "1 to 512"),
            (
                "llama.attention.layer_norm_rms_epsilon",
                f32::NAN.to_le_bytes(),
                "finite",
            ),
            (
                "llama.attention.layer_norm_rms_epsilon",
                (-1.0f32).to_le_bytes(),
                "finite",
            ),
            (
                "llama.attention.head_count_kv",
                3u32.to_le_bytes(),
                "divide",
            ),
            ("llama.attention.head_count_kv", 0u32.to_le_bytes(), "is 0"),
            ("llama.rope.dimension_count", 15u32.to_le_bytes(), "even"),
            ("llama.embedding_length", 0u32.to_le_bytes(), "positive"),
            ("llama.attention.head_count", 0u32.to_le_bytes(), "is 0"),
        ];
        for (key, value, want) in cases {
            let mut b = synth_bytes();
            patch(&mut b, key, value);
            let err = check_bytes(&b).unwrap_err().0;
            assert!(err.contains(key) && err.contains(want), "{key}: {err}");
        }
    }

    #[test]
    fn llama_head_sizes_must_agree() {
        let mut g = check_bytes(&synth_bytes()).unwrap();
        g.kv.push(("llama.attention.key_length".into(), Value::Int(16)));
        assert!(check_hparams(&g).is_ok());
        g.kv.push(("llama.attention.value_length".into(), Value::Int(8)));
        let e = check_hparams(&g).unwrap_err().0;
        assert!(e.contains("llama.attention.value_length 8"), "{e}");
    }

    #[test]
    fn hostile_lengths_are_bounded() {
        let good = synth_bytes();
        // Every truncation of the metadata fails cleanly (no panic, no huge
        // allocation; the metadata alone is over 4000 bytes).
        for cut in (0..4000).step_by(7) {
            assert!(check_bytes(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A tensor count of 2^63 is refused before anything is read.
        let mut b = good.clone();
        b[8..16].copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(check_bytes(&b).unwrap_err().0.contains("tensor count"));
        // The first key's length claims 2^62 bytes.
        let mut b = good.clone();
        b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(check_bytes(&b).unwrap_err().0.contains("truncated"));
        assert_eq!(
            check_bytes(b"GGU").unwrap_err().0,
            "file is too short to be GGUF"
        );
        assert!(check_bytes(b"GGML\0\0\0\0")
            .unwrap_err()
            .0
            .contains("magic"));
    }
}
