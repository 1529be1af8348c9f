//! Left padding for batched generation: row `r` of a batch holds `pads[r]` padding slots,
//! then its tokens. Every row's tokens take positions `0, 1, …` (transformers' position ids
//! from the attention mask) and attend only to their own row's tokens, so a row gives what
//! it gives alone.

use std::ops::Range;

/// How the tokens of a left-padded row are numbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PaddedPositions {
    /// From 0 at the row's first token (transformers' `generate`, which derives position
    /// ids from the attention mask).
    AfterPadding,
    /// From 0 at the row's first slot, padding included (transformers' forward without
    /// `position_ids`, as a sequence classifier runs).
    FromFirstSlot,
}

/// The key slots the query in slot `q` of a row with `pad` padding slots sees: its row's
/// tokens at or before it (causally, the padding masked), and with `window` only those
/// fewer than `window` slots back (a sliding window; a row's slots and positions differ by
/// the same `pad`, so slots measure it as positions do). A padding query sees only itself,
/// so its softmax stays finite (its output is never used). Nonempty: it holds `q`. Over a
/// row's queries in order, the first key never decreases (a padding query's `q` is below
/// every real query's `pad`). The one rule behind the fused attention op's spans and the
/// composed path's masks ([`mask_values`]).
pub(crate) fn seen_keys(q: usize, pad: usize, window: Option<usize>) -> Range<usize> {
    let first = if q < pad {
        q
    } else {
        pad.max(window.map_or(0, |w| (q + 1).saturating_sub(w)))
    };
    first..q + 1
}

/// The position of slot `slot` in a row with `pad` padding slots (0 on the padding).
pub(crate) fn position(slot: usize, pad: usize) -> usize {
    slot.saturating_sub(pad)
}

/// The additive mask values (0 where seen, −∞ elsewhere) of queries in slots
/// `offset..offset + q_len` over keys in slots `0..kv_len`, row after row
/// (`(rows, q_len, kv_len)` flattened; one row of no padding without `pads`): the keys
/// [`seen_keys`] gives each query, with `window`.
pub(crate) fn mask_values(
    pads: Option<&[usize]>,
    q_len: usize,
    kv_len: usize,
    offset: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let rows = pads.unwrap_or(&[0]);
    rows.iter()
        .flat_map(|&pad| {
            (offset..offset + q_len).flat_map(move |q| {
                let seen = seen_keys(q, pad, window);
                (0..kv_len).map(move |j| match seen.contains(&j) {
                    true => 0.0,
                    false => f32::NEG_INFINITY,
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_padded_row_sees_only_its_tokens_and_padding_sees_itself() {
        let m = mask_values(Some(&[0, 2]), 3, 3, 0, None);
        let seen: Vec<u8> = m.iter().map(|v| u8::from(*v == 0.0)).collect();
        #[rustfmt::skip]
        let want = [1, 0, 0,  1, 1, 0,  1, 1, 1, // no padding: causal
                    1, 0, 0,  0, 1, 0,  0, 0, 1]; // two padding slots
        assert_eq!(seen, want);
        assert_eq!((position(4, 2), position(1, 2)), (2, 0));
    }

    /// The key spans and the mask values follow the rule stated by hand here (a token sees
    /// its row's tokens at or before it, fewer than `window` back; a padding query only
    /// itself), windowed or not, for padding queries and real ones, for a whole row and for
    /// queries after cached keys (`offset`); the spans' first key never decreases.
    #[test]
    fn seen_keys_and_mask_values_follow_the_rule() {
        let rule = |q: usize, j: usize, pad: usize, window: Option<usize>| match q < pad {
            true => j == q,
            false => j >= pad && j <= q && window.is_none_or(|w| q - j < w),
        };
        for (pad, window) in [
            (0, None),
            (3, None),
            (0, Some(2)),
            (2, Some(3)),
            (5, Some(1)),
        ] {
            let kv = 9;
            let mut last_first = 0;
            for q in 0..kv {
                let span = seen_keys(q, pad, window);
                for j in 0..kv {
                    let case = format!("pad {pad}, window {window:?}, q {q}, j {j}");
                    assert_eq!(span.contains(&j), rule(q, j, pad, window), "{case}");
                }
                assert!(
                    span.start >= last_first,
                    "pad {pad}, window {window:?}, q {q}"
                );
                last_first = span.start;
            }
            for offset in [0, 5] {
                let q_len = kv - offset;
                let m = mask_values(Some(&[pad]), q_len, kv, offset, window);
                for (i, j) in (0..q_len).flat_map(|i| (0..kv).map(move |j| (i, j))) {
                    let shown = m[i * kv + j] == 0.0;
                    let case = format!("pad {pad}, window {window:?}, offset {offset}, q {i}");
                    assert_eq!(shown, rule(offset + i, j, pad, window), "{case}, j {j}");
                }
            }
        }
    }
}
