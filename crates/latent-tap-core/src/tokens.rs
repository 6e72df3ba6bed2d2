//! Token statistics from the full next-token distribution: log-probability of
//! the sampled token, top-k alternatives and entropy, all from one pass over
//! the raw logits (log-sum-exp in f64 over vectorised f32 blocks, see
//! [`crate::logits`]).

use crate::logits::{moments, top_k};
use crate::record::TopEntry;

/// What one distribution says about one sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStats {
    /// log p(sampled token).
    pub logprob: f32,
    /// Entropy in nats.
    pub entropy: f32,
    /// The `k` most likely tokens, most likely first.
    pub top: Vec<TopEntry>,
}

/// Compute stats of `token` under softmax(`logits`), keeping the top `k`
/// (ties: the lower id first).
pub fn token_stats(logits: &[f32], token: i32, k: usize) -> TokenStats {
    let m = moments(logits);
    let ln_sum = m.sum.ln();
    let lse = m.max + ln_sum;
    // H = -Σ p log p = log Z - Σ p x  (with x shifted by max; Z shifted alike)
    let entropy = (ln_sum - m.sum_ed / m.sum) as f32;
    let logprob = usize::try_from(token)
        .ok()
        .and_then(|t| logits.get(t))
        .map_or(f32::NEG_INFINITY, |&l| (f64::from(l) - lse) as f32);
    let top = top_k(logits, k)
        .into_iter()
        .map(|(id, z)| TopEntry {
            id,
            logprob: (f64::from(z) - lse) as f32,
        })
        .collect();
    TokenStats {
        logprob,
        entropy,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_distribution() {
        let s = token_stats(&[0.0; 4], 2, 2);
        assert!((s.logprob - (0.25f32).ln()).abs() < 1e-6);
        assert!((s.entropy - (4f32).ln()).abs() < 1e-6);
        assert_eq!(s.top.iter().map(|t| t.id).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn peaked_distribution_orders_top_k() {
        let logits = [1.0, 5.0, -2.0, 3.0];
        let s = token_stats(&logits, 3, 3);
        let z: f64 = logits.iter().map(|&l: &f32| (l as f64).exp()).sum();
        assert!((s.logprob as f64 - (3f64 - z.ln())).abs() < 1e-6);
        assert_eq!(s.top.iter().map(|t| t.id).collect::<Vec<_>>(), [1, 3, 0]);
        let h: f64 = logits
            .iter()
            .map(|&l| {
                let p = (l as f64).exp() / z;
                -p * p.ln()
            })
            .sum();
        assert!((s.entropy as f64 - h).abs() < 1e-6);
    }

    /// A vocabulary-sized row against direct f64 formulas (every lane, block
    /// and remainder path of the vectorised passes).
    #[test]
    fn a_262k_row_matches_f64_formulas() {
        let n = 262_144 + 5;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let logits: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 30.0 - 15.0
            })
            .collect();
        let s = token_stats(&logits, 777, 10);
        let max = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
        let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
        let lse = max + z.ln();
        assert!((s.logprob as f64 - (logits[777] as f64 - lse)).abs() < 1e-5);
        let h: f64 = logits
            .iter()
            .map(|&l| {
                let lp = l as f64 - lse;
                -lp.exp() * lp
            })
            .sum();
        assert!((s.entropy as f64 - h).abs() < 1e-4, "{} vs {h}", s.entropy);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        assert_eq!(
            s.top.iter().map(|t| t.id as usize).collect::<Vec<_>>(),
            order[..10].to_vec()
        );
        for t in &s.top {
            assert!((t.logprob as f64 - (logits[t.id as usize] as f64 - lse)).abs() < 1e-5);
        }
        // Out-of-range token ids have no probability.
        assert_eq!(token_stats(&logits, -1, 0).logprob, f32::NEG_INFINITY);
        assert_eq!(token_stats(&logits, n as i32, 0).logprob, f32::NEG_INFINITY);
    }
}
