//! Passes over a row of logits (a vocabulary wide: 262,144 on Gemma 3) that
//! the compiler vectorises: maximum, log-sum-exp moments, top-k, counts, dot
//! products. `f32` lanes are summed into `f64` per block, so results agree with
//! direct `f64` formulas to about 1e-6 relative. Used for every sampled token's
//! statistics ([`crate::tokens`]) and every lens cell ([`crate::lens`]).

/// Lanes of the vectorisable loops (LLVM maps them onto the machine's vectors).
pub(crate) const LANES: usize = 16;
/// Elements summed in `f32` lanes before the lanes are added into `f64`: the
/// rounding error of one block stays near 1e-6 relative.
pub(crate) const BLOCK: usize = 1024;

/// `exp(x)` in `f32` without a library call, so loops over it vectorise:
/// Cody–Waite reduction by ln 2 and a degree-6 polynomial (relative error,
/// rounding included, below 4e-7 (a few ulp); inputs below -87 give exp(-87)).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest by the 1.5·2^23 trick (no libm call, vectorises).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n is in -126..=127 after the clamp: a normal power of two.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// max, Σ exp(z − max) and Σ exp(z − max)·(z − max) of a row (sums in `f64`).
#[derive(Debug, Clone, Copy)]
pub struct Moments {
    /// Largest logit.
    pub max: f64,
    /// Σ exp(z − max).
    pub sum: f64,
    /// Σ exp(z − max)·(z − max).
    pub sum_ed: f64,
}

/// The largest of `logits` (−∞ for none).
pub fn max_of(logits: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &z) in m.iter_mut().zip(c) {
            *m = if z > *m { z } else { *m };
        }
    }
    rest.iter()
        .chain(&m)
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// The [`Moments`] of a row of logits.
pub fn moments(logits: &[f32]) -> Moments {
    let max = max_of(logits);
    let (mut sum, mut sum_ed) = (0f64, 0f64);
    for block in logits.chunks(BLOCK) {
        let (mut s, mut sd) = ([0f32; LANES], [0f32; LANES]);
        let chunks = block.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for k in 0..LANES {
                let d = c[k] - max;
                let e = exp(d);
                s[k] += e;
                sd[k] += e * d;
            }
        }
        for &z in rest {
            let d = z - max;
            let e = exp(d);
            sum += f64::from(e);
            sum_ed += f64::from(e * d);
        }
        sum += s.iter().map(|&v| f64::from(v)).sum::<f64>();
        sum_ed += sd.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    Moments {
        max: f64::from(max),
        sum,
        sum_ed,
    }
}

/// Σ p·(z − shift) in `f64`, blocked like [`moments`].
pub fn dot_shifted(p: &[f32], z: &[f32], shift: f32) -> f64 {
    let mut total = 0f64;
    for (pb, zb) in p.chunks(BLOCK).zip(z.chunks(BLOCK)) {
        let mut acc = [0f32; LANES];
        let (pc, zc) = (pb.chunks_exact(LANES), zb.chunks_exact(LANES));
        let (pr, zr) = (pc.remainder(), zc.remainder());
        for (p, z) in pc.zip(zc) {
            for k in 0..LANES {
                acc[k] += p[k] * (z[k] - shift);
            }
        }
        for (&p, &z) in pr.iter().zip(zr) {
            total += f64::from(p) * f64::from(z - shift);
        }
        total += acc.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    total
}

/// How many logits are strictly greater than `t`.
pub fn count_above(logits: &[f32], t: f32) -> u32 {
    let mut n = [0u32; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            n[k] += u32::from(c[k] > t);
        }
    }
    n.iter().sum::<u32>() + rest.iter().filter(|&&z| z > t).count() as u32
}

/// The `k` largest logits as `(id, logit)`, largest first, ties to the lower id.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(i32, f32)> {
    let mut top: Vec<(i32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return top;
    }
    let insert = |top: &mut Vec<(i32, f32)>, i: usize, z: f32| {
        if top.len() == k && z <= top[k - 1].1 {
            return;
        }
        let at = top.partition_point(|&(_, t)| t >= z);
        top.insert(at, (i as i32, z));
        top.truncate(k);
    };
    // Whole chunks below the current k-th largest are skipped on their max.
    let mut base = 0;
    for c in logits.chunks(LANES) {
        let full = top.len() == k;
        if !full || max_of(c) > top[k - 1].1 {
            for (j, &z) in c.iter().enumerate() {
                insert(&mut top, base + j, z);
            }
        }
        base += c.len();
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_4e_7_relative() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max((got - want).abs() / want);
            x += 0.001_3;
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1e30) > 0.0 && exp(-1e30) < 1e-37);
    }

    #[test]
    fn top_k_orders_by_logit_then_id_across_chunks() {
        let mut z = vec![0.0f32; 100];
        z[3] = 2.0;
        z[70] = 2.0;
        z[99] = 5.0;
        z[40] = 1.0;
        assert_eq!(
            top_k(&z, 4),
            vec![(99, 5.0), (3, 2.0), (70, 2.0), (40, 1.0)]
        );
        assert_eq!(top_k(&z, 0), vec![]);
        assert_eq!(count_above(&z, 1.0), 3);
        assert_eq!(max_of(&z), 5.0);
    }
}
