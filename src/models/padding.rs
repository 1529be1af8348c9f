//! Left padding for batched generation: row `r` of a batch holds `pads[r]` padding slots,
//! then its tokens. Every row's tokens take positions `0, 1, …` (transformers' position ids
//! from the attention mask) and attend only to their own row's tokens, so a row gives what
//! it gives alone.

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

/// Whether the query in slot `q` of a row with `pad` padding slots sees the key in slot
/// `j` (causally, padding masked). A padding query sees only itself, so its softmax stays
/// finite (its output is never used).
pub(crate) fn sees(q: usize, j: usize, pad: usize) -> bool {
    if q < pad {
        j == q
    } else {
        j >= pad && j <= q
    }
}

/// The position of slot `slot` in a row with `pad` padding slots (0 on the padding).
pub(crate) fn position(slot: usize, pad: usize) -> usize {
    slot.saturating_sub(pad)
}

/// The additive mask values (0 where seen, −∞ elsewhere) of queries in slots
/// `offset..offset + q_len` over keys in slots `0..kv_len`, row after row
/// (`(rows, q_len, kv_len)` flattened; one row of no padding without `pads`), with `also`
/// as a further condition on `(q, j)` (a sliding window).
pub(crate) fn mask_values(
    pads: Option<&[usize]>,
    q_len: usize,
    kv_len: usize,
    offset: usize,
    also: impl Fn(usize, usize) -> bool,
) -> Vec<f32> {
    let rows = pads.unwrap_or(&[0]);
    rows.iter()
        .flat_map(|&pad| {
            let also = &also;
            (0..q_len).flat_map(move |i| {
                let q = offset + i;
                (0..kv_len).map(move |j| {
                    if sees(q, j, pad) && also(q, j) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
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
        let m = mask_values(Some(&[0, 2]), 3, 3, 0, |_, _| true);
        let seen: Vec<u8> = m.iter().map(|v| u8::from(*v == 0.0)).collect();
        #[rustfmt::skip]
        let want = [1, 0, 0,  1, 1, 0,  1, 1, 1, // no padding: causal
                    1, 0, 0,  0, 1, 0,  0, 0, 1]; // two padding slots
        assert_eq!(seen, want);
        assert_eq!((position(4, 2), position(1, 2)), (2, 0));
    }
}
