//! What one row of logits says: top-k with log-probabilities, entropy, the
//! target's log-probability and rank, and the KL divergence from a reference
//! (the final layer's) distribution. Sums run in `f64` (over `f32` blocks; see
//! [`crate::logits`]).

pub use crate::logits::top_k;
use crate::logits::{count_above, dot_shifted, exp, moments};

/// The statistics of one (layer, row) cell.
#[derive(Debug, Clone, PartialEq)]
pub struct CellStats {
    /// `(token id, log-probability)`, most likely first (ties: lower id first).
    pub top: Vec<(i32, f32)>,
    /// Entropy in nats.
    pub entropy: f32,
    /// log p(target), when a target was given.
    pub target_logprob: Option<f32>,
    /// How many tokens are strictly more likely than the target (0 = top-1).
    pub target_rank: Option<u32>,
    /// KL(reference ‖ this) in nats, when a reference was given.
    pub kl: Option<f32>,
}

/// A reference distribution (the final layer's) kept for KL divergences.
#[derive(Debug, Clone)]
pub struct Reference {
    probs: Vec<f32>,
    // Σ p·(z − max) − ln Σ exp(z − max) = −entropy of the reference.
    neg_entropy: f64,
}

impl Reference {
    /// The distribution of `logits`.
    pub fn new(logits: &[f32]) -> Self {
        let m = moments(logits);
        let lse = m.max + m.sum.ln();
        let shift = lse as f32;
        let probs = logits.iter().map(|&z| exp(z - shift)).collect();
        Self {
            probs,
            neg_entropy: m.sum_ed / m.sum - m.sum.ln(),
        }
    }

    /// Vocabulary size.
    pub fn len(&self) -> usize {
        self.probs.len()
    }

    /// True for an empty vocabulary.
    pub fn is_empty(&self) -> bool {
        self.probs.is_empty()
    }
}

/// A log-probability as a finite `f32` (`-inf` becomes `f32::MIN`).
pub fn finite(x: f64) -> f32 {
    let v = x as f32;
    if v.is_finite() {
        v
    } else if v > 0.0 {
        f32::MAX
    } else {
        f32::MIN
    }
}

/// The statistics of one row of finite `logits`. `target` outside the
/// vocabulary gives no target fields; `reference` must have the same length.
pub fn summarize(
    logits: &[f32],
    k: usize,
    target: Option<i32>,
    reference: Option<&Reference>,
) -> CellStats {
    let m = moments(logits);
    let ln_sum = m.sum.ln();
    let lse = m.max + ln_sum;
    let top = top_k(logits, k)
        .into_iter()
        .map(|(id, z)| (id, finite(f64::from(z) - lse)))
        .collect();
    let entropy = (ln_sum - m.sum_ed / m.sum).max(0.0) as f32;
    let target = target.and_then(|t| logits.get(usize::try_from(t).ok()?).map(|&z| (t, z)));
    let (target_logprob, target_rank) = match target {
        Some((_, zt)) => (
            Some(finite(f64::from(zt) - lse)),
            Some(count_above(logits, zt)),
        ),
        None => (None, None),
    };
    // KL(p ‖ q) = Σ p ln p − Σ p ln q = −H(p) − Σ p (z − max) + ln Σ exp(z − max).
    let kl = reference.filter(|r| r.len() == logits.len()).map(|r| {
        let dot = dot_shifted(&r.probs, logits, m.max as f32);
        (r.neg_entropy - dot + ln_sum).max(0.0) as f32
    });
    CellStats {
        top,
        entropy,
        target_logprob,
        target_rank,
        kl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_softmax(z: &[f32]) -> Vec<f64> {
        let m = z.iter().copied().fold(f32::MIN, f32::max) as f64;
        let s: f64 = z.iter().map(|&x| (x as f64 - m).exp()).sum();
        z.iter().map(|&x| x as f64 - m - s.ln()).collect()
    }

    #[test]
    fn stats_match_direct_formulas() {
        let z = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let q = [0.0f32, 1.0, 2.0, -1.0, 0.0];
        let lp = log_softmax(&z);
        let lq = log_softmax(&q);
        let r = Reference::new(&q);
        let s = summarize(&z, 3, Some(4), Some(&r));
        assert_eq!(s.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 0]);
        assert!((s.top[0].1 as f64 - lp[1]).abs() < 1e-6);
        let h: f64 = -lp.iter().map(|&l| l.exp() * l).sum::<f64>();
        assert!((s.entropy as f64 - h).abs() < 1e-6, "{} vs {h}", s.entropy);
        assert!((s.target_logprob.unwrap() as f64 - lp[4]).abs() < 1e-6);
        assert_eq!(s.target_rank, Some(3));
        let kl: f64 = lq.iter().zip(&lp).map(|(&a, &b)| a.exp() * (a - b)).sum();
        assert!(
            (s.kl.unwrap() as f64 - kl).abs() < 1e-6,
            "{:?} vs {kl}",
            s.kl
        );
        // KL of a distribution with itself is 0; no target outside the vocabulary.
        let own = summarize(&q, 1, Some(99), Some(&r));
        assert!(own.kl.unwrap().abs() < 1e-6);
        assert_eq!((own.target_logprob, own.target_rank), (None, None));
    }

    #[test]
    fn top_k_larger_than_vocab_and_finite_clamp() {
        assert_eq!(top_k(&[0.5, 2.0], 5), vec![(1, 2.0), (0, 0.5)]);
        assert_eq!(finite(f64::NEG_INFINITY), f32::MIN);
        let s = summarize(&[0.0, -1e30], 2, Some(1), None);
        assert!(s.top.iter().all(|t| t.1.is_finite()));
        assert!(s.target_logprob.unwrap().is_finite());
    }

    /// A long row (every code path: blocks, lanes, remainders) against direct
    /// f64 formulas.
    #[test]
    fn long_rows_match_direct_formulas() {
        let n = 262_144 + 37;
        // Deterministic pseudo-random logits in about -20..20, a few peaks.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut z: Vec<f32> = (0..n).map(|_| next() * 40.0 - 20.0).collect();
        let mut q: Vec<f32> = (0..n).map(|_| next() * 30.0 - 15.0).collect();
        z[5] = 31.0;
        z[n - 1] = 30.5;
        q[7] = 25.0;
        let lp = log_softmax(&z);
        let lq = log_softmax(&q);
        let r = Reference::new(&q);
        let s = summarize(&z, 5, Some(1234), Some(&r));
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| z[b].partial_cmp(&z[a]).unwrap().then(a.cmp(&b)));
        assert_eq!(
            s.top.iter().map(|t| t.0 as usize).collect::<Vec<_>>(),
            order[..5].to_vec()
        );
        for (id, l) in &s.top {
            assert!((f64::from(*l) - lp[*id as usize]).abs() < 1e-5);
        }
        let h: f64 = -lp.iter().map(|&l| l.exp() * l).sum::<f64>();
        assert!(
            (f64::from(s.entropy) - h).abs() < 1e-4,
            "{} vs {h}",
            s.entropy
        );
        assert!((f64::from(s.target_logprob.unwrap()) - lp[1234]).abs() < 1e-5);
        let rank = z.iter().filter(|&&v| v > z[1234]).count() as u32;
        assert_eq!(s.target_rank, Some(rank));
        let kl: f64 = lq.iter().zip(&lp).map(|(&a, &b)| a.exp() * (a - b)).sum();
        assert!(
            (f64::from(s.kl.unwrap()) - kl).abs() < 1e-4,
            "{:?} vs {kl}",
            s.kl
        );
    }
}
