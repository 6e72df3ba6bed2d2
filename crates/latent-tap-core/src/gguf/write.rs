//! A small GGUF writer: metadata of a few value types and F32 tensors, in the
//! layout llama.cpp's loader expects (version 3, 32-byte alignment). Used for
//! synthetic models ([`crate::synth`]) and control vectors ([`crate::steer`]).

use std::io::{self, Write};

/// Alignment of the tensor data (llama.cpp's default, `general.alignment`).
pub const ALIGNMENT: usize = 32;

/// Write a GGUF file of `kvs` (metadata, in order) and `tensors` (name, shape in
/// ggml order, data row-major) to `w`. A shape that does not match its data is
/// an `InvalidInput` error.
pub fn write_f32_gguf(
    w: &mut impl Write,
    kvs: &[(&str, Value<'_>)],
    tensors: &[(String, Vec<usize>, &[f32])],
) -> io::Result<()> {
    w.write_all(b"GGUF")?;
    w.write_all(&3u32.to_le_bytes())?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())?;
    w.write_all(&(kvs.len() as u64).to_le_bytes())?;
    let mut pos = 4 + 4 + 8 + 8;
    for (key, value) in kvs {
        pos += write_str(w, key)?;
        pos += value.write(w)?;
    }
    let mut offset = 0usize;
    for (name, dims, data) in tensors {
        if dims.iter().product::<usize>() != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{name}: shape {dims:?} does not match {} values",
                    data.len()
                ),
            ));
        }
        pos += write_str(w, name)?;
        w.write_all(&(dims.len() as u32).to_le_bytes())?;
        for &d in dims {
            w.write_all(&(d as u64).to_le_bytes())?;
        }
        w.write_all(&GGML_TYPE_F32.to_le_bytes())?;
        w.write_all(&(offset as u64).to_le_bytes())?;
        pos += 4 + 8 * dims.len() + 4 + 8;
        offset += padded(data.len() * 4);
    }
    write_zeros(w, padded(pos) - pos)?;
    for (_, _, data) in tensors {
        for x in data.iter() {
            w.write_all(&x.to_le_bytes())?;
        }
        write_zeros(w, padded(data.len() * 4) - data.len() * 4)?;
    }
    Ok(())
}

/// ggml's type id of F32.
pub const GGML_TYPE_F32: u32 = 0;

// GGUF value type tags.
const GGUF_U32: u32 = 4;
const GGUF_I32: u32 = 5;
const GGUF_F32: u32 = 6;
const GGUF_BOOL: u32 = 7;
const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;

/// `n` rounded up to [`ALIGNMENT`].
pub(crate) fn padded(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn write_zeros(w: &mut impl Write, n: usize) -> io::Result<()> {
    w.write_all(&[0u8; ALIGNMENT][..n])
}

/// Writes a GGUF string (u64 length + bytes); returns bytes written.
fn write_str(w: &mut impl Write, s: &str) -> io::Result<usize> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())?;
    Ok(8 + s.len())
}

/// The GGUF metadata value types this writer knows.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// A string.
    Str(&'a str),
    /// An array of strings.
    StrArr(&'a [String]),
    /// An array of `f32`.
    F32Arr(&'a [f32]),
    /// An array of `i32`.
    I32Arr(&'a [i32]),
}

impl Value<'_> {
    /// Writes type tag and payload; returns bytes written.
    fn write(&self, w: &mut impl Write) -> io::Result<usize> {
        let tag = |w: &mut dyn Write, t: u32| w.write_all(&t.to_le_bytes());
        let arr_head = |w: &mut dyn Write, t: u32, n: usize| -> io::Result<()> {
            w.write_all(&GGUF_ARRAY.to_le_bytes())?;
            w.write_all(&t.to_le_bytes())?;
            w.write_all(&(n as u64).to_le_bytes())
        };
        Ok(match self {
            Value::U32(x) => {
                tag(w, GGUF_U32)?;
                w.write_all(&x.to_le_bytes())?;
                8
            }
            Value::I32(x) => {
                tag(w, GGUF_I32)?;
                w.write_all(&x.to_le_bytes())?;
                8
            }
            Value::F32(x) => {
                tag(w, GGUF_F32)?;
                w.write_all(&x.to_le_bytes())?;
                8
            }
            Value::Bool(b) => {
                tag(w, GGUF_BOOL)?;
                w.write_all(&[u8::from(*b)])?;
                5
            }
            Value::Str(s) => {
                tag(w, GGUF_STRING)?;
                4 + write_str(w, s)?
            }
            Value::StrArr(v) => {
                arr_head(w, GGUF_STRING, v.len())?;
                let mut n = 16;
                for s in v.iter() {
                    n += write_str(w, s)?;
                }
                n
            }
            Value::F32Arr(v) => {
                arr_head(w, GGUF_F32, v.len())?;
                for x in v.iter() {
                    w.write_all(&x.to_le_bytes())?;
                }
                16 + 4 * v.len()
            }
            Value::I32Arr(v) => {
                arr_head(w, GGUF_I32, v.len())?;
                for x in v.iter() {
                    w.write_all(&x.to_le_bytes())?;
                }
                16 + 4 * v.len()
            }
        })
    }
}
