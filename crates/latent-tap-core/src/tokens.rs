//! Token statistics from the full next-token distribution: log-probability of
//! the sampled token, top-k alternatives and entropy, all from one pass over
//! the raw logits (log-sum-exp in f64).

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

/// Compute stats of `token` under softmax(`logits`), keeping the top `k`.
pub fn token_stats(logits: &[f32], token: i32, k: usize) -> TokenStats {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut sum = 0f64;
    let mut sum_xe = 0f64;
    for &l in logits {
        let x = l as f64 - max;
        let e = x.exp();
        sum += e;
        sum_xe += x * e;
    }
    let lse = max + sum.ln();
    // H = -Σ p log p = log Z - Σ p x  (with x shifted by max; Z shifted alike)
    let entropy = (sum.ln() - sum_xe / sum) as f32;
    let logprob = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| (l as f64 - lse) as f32);
    let k = k.min(logits.len());
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let top = if k == 0 {
        Vec::new()
    } else {
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        idx.select_nth_unstable_by(k - 1, by_logit);
        idx.truncate(k);
        idx.sort_unstable_by(by_logit);
        idx.iter()
            .map(|&i| TopEntry {
                id: i as i32,
                logprob: (logits[i as usize] as f64 - lse) as f32,
            })
            .collect()
    };
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
}
