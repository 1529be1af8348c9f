//! [`Routing`]: which experts each token goes to, chosen on the host from the router's
//! probabilities, and the token order in which the experts run.

use std::cmp::Ordering;

/// The `k` chosen experts of each of `n` tokens and the rows each expert runs.
#[derive(Debug, PartialEq)]
pub(crate) struct Routing {
    /// `n × k`, row-major: token `t`'s experts, most probable first.
    pub(crate) chosen: Vec<u32>,
    /// The rows the experts run, grouped by expert (ascending); within an expert ordered by
    /// the slot the expert has in the tokens' choices, then by token, as transformers'
    /// `torch.where` over its expert mask orders them: each row's token.
    pub(crate) tokens: Vec<u32>,
    /// Each row's place in `chosen` (`t · k + slot`): where its weight is.
    pub(crate) slots: Vec<u32>,
    /// Rows per expert (`num_experts` entries, summing to `n · k`).
    pub(crate) counts: Vec<usize>,
}

impl Routing {
    /// Routes the `n = probs.len() / num_experts` tokens whose expert probabilities are the
    /// rows of `probs` (row-major) to their `k` most probable experts (ties: the lower
    /// expert index first; a NaN ranks last).
    pub(crate) fn top_k(probs: &[f32], num_experts: usize, k: usize) -> Self {
        let n = probs.len().checked_div(num_experts).unwrap_or(0);
        let mut chosen = Vec::with_capacity(n * k);
        let mut ranked: Vec<u32> = Vec::with_capacity(num_experts);
        for row in probs.chunks_exact(num_experts.max(1)) {
            ranked.clear();
            ranked.extend(0..num_experts as u32);
            let p = |e: u32| row.get(e as usize).copied().unwrap_or(f32::NAN);
            // Descending probability; NaN last; stable, so ties keep index order.
            ranked.sort_by(|&a, &b| match (p(a).is_nan(), p(b).is_nan()) {
                (false, false) => p(b).partial_cmp(&p(a)).unwrap_or(Ordering::Equal),
                (x, y) => x.cmp(&y),
            });
            chosen.extend(ranked.iter().take(k));
        }
        let mut counts = vec![0usize; num_experts];
        for &e in &chosen {
            if let Some(c) = counts.get_mut(e as usize) {
                *c += 1;
            }
        }
        // Expert, then slot, then token: a counting sort over (slot, token) order.
        let mut starts: Vec<usize> = counts
            .iter()
            .scan(0, |acc, &c| {
                let start = *acc;
                *acc += c;
                Some(start)
            })
            .collect();
        let mut tokens = vec![0u32; chosen.len()];
        let mut slots = vec![0u32; chosen.len()];
        for slot in 0..k {
            for t in 0..n {
                let flat = t * k + slot;
                let Some(&e) = chosen.get(flat) else { continue };
                let Some(start) = starts.get_mut(e as usize) else {
                    continue;
                };
                if let (Some(tok), Some(s)) = (tokens.get_mut(*start), slots.get_mut(*start)) {
                    *tok = t as u32;
                    *s = flat as u32;
                }
                *start += 1;
            }
        }
        Self {
            chosen,
            tokens,
            slots,
            counts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Routing;

    #[test]
    fn tokens_go_to_their_most_probable_experts_grouped_by_expert() {
        // 3 tokens, 4 experts, k = 2.
        let probs = [
            0.1, 0.5, 0.3, 0.1, // token 0: experts 1, 2
            0.4, 0.1, 0.1, 0.4, // token 1: a tie, experts 0, 3
            0.2, 0.1, 0.6, 0.1, // token 2: experts 2, 0
        ];
        let r = Routing::top_k(&probs, 4, 2);
        assert_eq!(r.chosen, [1, 2, 0, 3, 2, 0]);
        assert_eq!(r.counts, [2, 1, 2, 1]);
        // Expert 0: token 1 (slot 0), then token 2 (slot 1); expert 1: token 0; expert 2:
        // token 2 (slot 0) before token 0 (slot 1); expert 3: token 1.
        assert_eq!(r.tokens, [1, 2, 0, 2, 0, 1]);
        assert_eq!(r.slots, [2, 5, 0, 4, 1, 3]);
    }

    #[test]
    fn a_nan_probability_ranks_last() {
        let r = Routing::top_k(&[f32::NAN, 0.2, 0.1], 3, 1);
        assert_eq!(r.chosen, [1]);
    }
}
