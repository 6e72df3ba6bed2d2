//! What one row of logits says: top-k with log-probabilities, entropy, the
//! target's log-probability and rank, and the KL divergence from a reference
//! (the final layer's) distribution. Sums run in `f64`.

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
    // Σ p·z − lse = −entropy of the reference.
    neg_entropy: f64,
}

impl Reference {
    /// The distribution of `logits`.
    pub fn new(logits: &[f32]) -> Self {
        let (max, sum, sum_ez) = moments(logits);
        let lse = max + sum.ln();
        let probs = logits
            .iter()
            .map(|&z| ((f64::from(z) - lse).exp()) as f32)
            .collect();
        Self {
            probs,
            neg_entropy: sum_ez / sum - lse,
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

/// max, Σ exp(z − max) and Σ exp(z − max)·z, the last two in f64.
fn moments(logits: &[f32]) -> (f64, f64, f64) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (mut sum, mut sum_ez) = (0f64, 0f64);
    for &z in logits {
        let e = f64::from((z - max).exp());
        sum += e;
        sum_ez += e * f64::from(z);
    }
    (f64::from(max), sum, sum_ez)
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

/// The `k` largest logits as `(id, logit)`, largest first, ties to the lower id.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(i32, f32)> {
    let mut top: Vec<(i32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return top;
    }
    for (i, &z) in logits.iter().enumerate() {
        if top.len() == k && z <= top[k - 1].1 {
            continue;
        }
        let at = top.partition_point(|&(_, t)| t >= z);
        top.insert(at, (i as i32, z));
        top.truncate(k);
    }
    top
}

/// The statistics of one row of finite `logits`. `target` outside the
/// vocabulary gives no target fields; `reference` must have the same length.
pub fn summarize(
    logits: &[f32],
    k: usize,
    target: Option<i32>,
    reference: Option<&Reference>,
) -> CellStats {
    let (max, sum, sum_ez) = moments(logits);
    let lse = max + sum.ln();
    let top = top_k(logits, k)
        .into_iter()
        .map(|(id, z)| (id, finite(f64::from(z) - lse)))
        .collect();
    let entropy = (lse - sum_ez / sum).max(0.0) as f32;
    let target = target.and_then(|t| logits.get(usize::try_from(t).ok()?).map(|&z| (t, z)));
    let (target_logprob, target_rank) = match target {
        Some((_, zt)) => (
            Some(finite(f64::from(zt) - lse)),
            Some(logits.iter().filter(|&&z| z > zt).count() as u32),
        ),
        None => (None, None),
    };
    let kl = reference.filter(|r| r.len() == logits.len()).map(|r| {
        let dot: f64 = r
            .probs
            .iter()
            .zip(logits)
            .map(|(&p, &z)| f64::from(p) * f64::from(z))
            .sum();
        (r.neg_entropy - dot + lse).max(0.0) as f32
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
}
