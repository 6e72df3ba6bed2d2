//! Copy rows out of a ggml tensor (any strides; F32/F16/BF16) into a frame
//! payload, converting to the requested dtype. No allocation.

use half::{bf16, f16};

use crate::record::Dtype;

/// ggml type id of `GGML_TYPE_F32` (the types this module reads).
pub const GGML_F32: u32 = 0;
/// ggml type id of `GGML_TYPE_F16`.
pub const GGML_F16: u32 = 1;
/// ggml type id of `GGML_TYPE_BF16`.
pub const GGML_BF16: u32 = 30;

/// Bytes per element of a supported ggml type.
pub fn ggml_type_size(ty: u32) -> Option<usize> {
    match ty {
        GGML_F32 => Some(4),
        GGML_F16 | GGML_BF16 => Some(2),
        _ => None,
    }
}

/// A host-readable view of a tensor's bytes.
#[derive(Debug, Clone, Copy)]
pub struct SrcTensor {
    /// First byte of the tensor's data (host memory).
    pub base: *const u8,
    /// ggml type id ([`GGML_F32`], [`GGML_F16`] or [`GGML_BF16`]).
    pub ty: u32,
    /// Elements per axis, ggml order (`ne[0]` innermost).
    pub ne: [i64; 4],
    /// Byte strides per axis.
    pub nb: [usize; 4],
}

impl SrcTensor {
    /// Copy row `row` along `axis` (all elements of the axes below it, in ggml
    /// order) into `dst`, which holds exactly `width * out.size()` bytes.
    /// Returns how many finite values overflowed `out` (became infinite).
    ///
    /// # Safety
    /// `base` must point to host memory covering every element addressed by
    /// `ne`/`nb`, readable for the duration of the call; `row < ne[axis]`.
    pub unsafe fn copy_row(&self, axis: usize, row: usize, out: Dtype, dst: &mut [u8]) -> usize {
        let ts = ggml_type_size(self.ty).unwrap_or(4);
        let width: usize = self.ne[..axis].iter().product::<i64>() as usize;
        let contiguous = self.nb[0] == ts
            && (1..axis).all(|k| self.nb[k] == self.nb[k - 1] * self.ne[k - 1] as usize);
        let row_base = row * self.nb[axis];
        if contiguous {
            // SAFETY: the caller guarantees the row's `width` contiguous elements are readable.
            let src = unsafe { std::slice::from_raw_parts(self.base.add(row_base), width * ts) };
            return convert_run(src, self.ty, dst, out);
        }
        // Strided: walk the inner axes element by element.
        let os = out.size();
        let mut idx = [0usize; 3];
        let mut overflow = 0;
        for e in 0..width {
            let mut off = row_base;
            for (k, &i) in idx.iter().enumerate().take(axis) {
                off += i * self.nb[k];
            }
            // SAFETY: (idx, row) is within ne, so the element at `off` is readable.
            let src = unsafe { std::slice::from_raw_parts(self.base.add(off), ts) };
            overflow += convert_run(src, self.ty, &mut dst[e * os..(e + 1) * os], out);
            for (k, i) in idx.iter_mut().enumerate().take(axis) {
                *i += 1;
                if *i < self.ne[k] as usize {
                    break;
                }
                *i = 0;
            }
        }
        overflow
    }
}

/// Convert a contiguous run of `src_ty` elements into `out` elements. Returns
/// how many finite values overflowed to infinity (only f16 can: |x| > 65504).
pub fn convert_run(src: &[u8], src_ty: u32, dst: &mut [u8], out: Dtype) -> usize {
    let same = matches!(
        (src_ty, out),
        (GGML_F32, Dtype::F32) | (GGML_F16, Dtype::F16) | (GGML_BF16, Dtype::BF16)
    );
    if same {
        dst.copy_from_slice(src);
        return 0;
    }
    let ts = ggml_type_size(src_ty).unwrap_or(4);
    let os = out.size();
    let mut overflow = 0;
    for (s, d) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(os)) {
        let v = match src_ty {
            GGML_F16 => f16::from_bits(u16::from_ne_bytes([s[0], s[1]])).to_f32(),
            GGML_BF16 => bf16::from_bits(u16::from_ne_bytes([s[0], s[1]])).to_f32(),
            _ => f32::from_ne_bytes([s[0], s[1], s[2], s[3]]),
        };
        match out {
            Dtype::F32 => d.copy_from_slice(&v.to_ne_bytes()),
            Dtype::F16 => {
                let h = f16::from_f32(v);
                overflow += usize::from(h.is_infinite() && v.is_finite());
                d.copy_from_slice(&h.to_bits().to_ne_bytes())
            }
            Dtype::BF16 => d.copy_from_slice(&bf16::from_f32(v).to_bits().to_ne_bytes()),
        }
    }
    overflow
}

/// The ggml type id of a frame dtype.
pub fn ggml_type_of(dtype: Dtype) -> u32 {
    match dtype {
        Dtype::F32 => GGML_F32,
        Dtype::F16 => GGML_F16,
        Dtype::BF16 => GGML_BF16,
    }
}

/// Convert `src` elements of `from` into `dst` elements of `to` (a copy when
/// they are the same), directly, without an intermediate buffer. Returns how
/// many finite values overflowed to infinity.
pub fn convert(src: &[u8], from: Dtype, dst: &mut [u8], to: Dtype) -> usize {
    convert_run(src, ggml_type_of(from), dst, to)
}

/// Convert `src` elements of `dtype` to f32 bytes in `dst` (4 bytes per element).
pub fn convert_to_f32(src: &[u8], dtype: Dtype, dst: &mut [u8]) {
    convert(src, dtype, dst, Dtype::F32);
}

/// Convert f32 bytes in `src` to `dtype` elements in `dst` (`dtype.size()` bytes each).
pub fn convert_from_f32(src: &[u8], dtype: Dtype, dst: &mut [u8]) {
    convert(src, Dtype::F32, dst, dtype);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_dtype_converts_to_any_directly() {
        let vals = [1.5f32, -2.25, 0.0, 1e-3];
        let all = [Dtype::F32, Dtype::F16, Dtype::BF16];
        for from in all {
            let mut src = vec![0u8; vals.len() * from.size()];
            let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_ne_bytes()).collect();
            convert_from_f32(&f32b, from, &mut src);
            for to in all {
                // Direct, and through f32 (what callers did before): the same bytes.
                let mut direct = vec![0u8; vals.len() * to.size()];
                assert_eq!(convert(&src, from, &mut direct, to), 0);
                let mut via = vec![0u8; vals.len() * 4];
                convert_to_f32(&src, from, &mut via);
                let mut expect = vec![0u8; vals.len() * to.size()];
                convert_from_f32(&via, to, &mut expect);
                assert_eq!(direct, expect, "{from:?} -> {to:?}");
            }
        }
        let mut h = [0u8; 2];
        assert_eq!(
            convert(&1e6f32.to_ne_bytes(), Dtype::F32, &mut h, Dtype::F16),
            1
        );
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn contiguous_and_strided_rows_match() {
        // A [3, 2] f32 tensor stored transposed (column-major): element (i0, i1) at i0*8 + i1*4.
        let vals: [f32; 6] = [0.0, 3.0, 1.0, 4.0, 2.0, 5.0];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let t = SrcTensor {
            base: bytes.as_ptr(),
            ty: GGML_F32,
            ne: [3, 2, 1, 1],
            nb: [8, 4, 24, 24],
        };
        let mut dst = [0u8; 12];
        // SAFETY: the strides stay within `bytes`.
        unsafe { t.copy_row(1, 1, Dtype::F32, &mut dst) };
        assert_eq!(f32s(&dst), [3.0, 4.0, 5.0]);
        let c = SrcTensor {
            base: bytes.as_ptr(),
            ty: GGML_F32,
            ne: [2, 3, 1, 1],
            nb: [4, 8, 24, 24],
        };
        let mut dst = [0u8; 8];
        // SAFETY: within `bytes`.
        unsafe { c.copy_row(1, 2, Dtype::F32, &mut dst) };
        assert_eq!(f32s(&dst), [2.0, 5.0]);
    }

    #[test]
    fn converts_between_float_types() {
        let src: Vec<u8> = [1.5f32, -2.25]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let mut h = [0u8; 4];
        convert_run(&src, GGML_F32, &mut h, Dtype::F16);
        let mut back = [0u8; 8];
        convert_run(&h, GGML_F16, &mut back, Dtype::F32);
        assert_eq!(f32s(&back), [1.5, -2.25]);
        let mut b = [0u8; 4];
        convert_run(&src, GGML_F32, &mut b, Dtype::BF16);
        convert_run(&b, GGML_BF16, &mut back, Dtype::F32);
        assert_eq!(f32s(&back), [1.5, -2.25]);
    }

    #[test]
    fn f16_overflow_is_counted() {
        let src: Vec<u8> = [1e5f32, -7e4, 65504.0, f32::INFINITY]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let mut h = [0u8; 8];
        assert_eq!(convert_run(&src, GGML_F32, &mut h, Dtype::F16), 2);
        let mut b = [0u8; 8];
        assert_eq!(convert_run(&src, GGML_F32, &mut b, Dtype::BF16), 0);
    }
}
