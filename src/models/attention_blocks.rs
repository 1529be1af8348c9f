//! The training attention's products, computed only where the mask lets a query see keys.
//!
//! The query rows of each head are taken in blocks of [`BLOCK_ROWS`]. Under a causal mask
//! a block's queries see the keys from its first query's window start (or its row's first
//! token, in a left-padded batch) to its last query's position; under a key mask
//! ([`Seen::Keys`]) every query of a batch element sees keys up to that element's last
//! unmasked one (a right-padded batch skips its padding). Every
//! product of a block runs over that key span only: `q kᵀ` and `P v` in the forward,
//! `Pᵀ dO`, `dO vᵀ`, `dS k` and `dSᵀ q` in the backward. Masked entries the span still
//! holds are zero in `P` and so in `dS`. At sequence 256 this does 62.5% of the full
//! products' work (full causal mask), and less with a sliding window.
//!
//! With dropout on the probabilities the forward's product reads the dropped
//! probabilities `P̃ = P ⊙ keep / (1 − p)`, and the backward is `dV = P̃ᵀ dO`,
//! `dS = scale · (P̃ ⊙ dP̃ − P ⊙ c)` with `dP̃ = dO vᵀ` and `c = rowsum(dO ⊙ O)` (still
//! `rowsum(P ⊙ dP)`, since `O = P̃ v`).
//!
//! Layouts, as [`super::attention_op`] keeps them: queries `(b, heads, t, d)`, keys and
//! values `(b, kv_heads, kv, d)`, probabilities `(b, heads, t, kv)`; query head `i` of
//! `b · heads` uses key/value head `i / (heads / kv_heads)`. Work is split over the query
//! heads (forward) or the key/value heads (backward, whose `dK`, `dV` sum over their query
//! heads); when there are fewer of those than threads, each product is threaded instead.

use candle_core::Result;
use rayon::prelude::*;

use super::padding::seen_keys;
use crate::kernels::{gemm_with, Accum, MatRef};

/// Query rows per block: large enough that a block's products fill the GEMM kernel's
/// register tiles at any vector width (they are at most a few dozen rows tall), small
/// enough that the skipped work is near half of the full products at training lengths.
pub(super) const BLOCK_ROWS: usize = 64;

/// Which keys a query sees.
#[derive(Clone, Copy, Debug)]
pub(super) enum Seen<'a> {
    /// The keys at or before the query's position and, with a window, fewer than
    /// `window` positions back; in a left-padded batch (`pads`: each batch element's
    /// padding slots, or empty for none) not the padding (`models::padding::seen_keys`).
    Causal {
        window: Option<usize>,
        pads: &'a [usize],
    },
    /// Every query of batch element `i` sees some of the keys `j < ends[i]` (`ends[i]`:
    /// one past the element's last visible key, at least 1; the softmax masks the others).
    Keys { ends: &'a [usize] },
}

/// The sizes of one call.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape<'a> {
    /// Batch size.
    pub batch: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Query heads per key/value head.
    pub group: usize,
    /// Queries per head.
    pub t: usize,
    /// Keys per head; the queries are the last `t` positions of `0..kv`.
    pub kv: usize,
    /// Rows from one key/value head to the next in `k` and `v` (at least `kv`: a KV
    /// cache's buffers hold room past the cached positions).
    pub kv_stride: usize,
    /// Head dimension.
    pub d: usize,
    /// The keys each query sees.
    pub seen: Seen<'a>,
}

/// One block of query rows and the keys it sees.
#[derive(Clone, Copy, Debug)]
struct Block {
    /// First query row (within the head).
    row: usize,
    rows: usize,
    /// First key seen by any row of the block.
    key: usize,
    keys: usize,
}

impl<'a> Shape<'a> {
    /// Key/value heads over the batch.
    fn bg(self) -> usize {
        self.batch * self.kv_heads
    }

    /// Query heads per batch element.
    fn heads(self) -> usize {
        self.kv_heads * self.group
    }

    /// The blocks of one head's queries in batch element `batch`, in order.
    fn blocks(self, batch: usize) -> impl Iterator<Item = Block> + 'a {
        let offset = self.kv - self.t;
        (0..self.t).step_by(BLOCK_ROWS).map(move |row| {
            let rows = BLOCK_ROWS.min(self.t - row);
            let (key, end) = match self.seen {
                // The first query's first key is the block's lowest (`seen_keys`).
                Seen::Causal { window, pads } => (
                    seen_keys(offset + row, pads.get(batch).copied().unwrap_or(0), window).start,
                    offset + row + rows,
                ),
                Seen::Keys { ends, .. } => (0, ends.get(batch).map_or(self.kv, |&e| e)),
            };
            Block {
                row,
                rows,
                key,
                keys: end.saturating_sub(key),
            }
        })
    }

    /// Per-product threading: only when the tasks are fewer than the threads.
    fn parallelism(self, tasks: usize) -> gemm::Parallelism {
        let threads = rayon::current_num_threads();
        if tasks >= threads || threads < 2 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        }
    }
}

/// Runs `product` on each block of every query head, with that head's rows of `out`
/// (`t × width`); the heads are split over the threads.
fn per_head_blocks(
    s: Shape,
    out: &mut [f32],
    width: usize,
    product: impl Fn(usize, Block, &mut [f32], gemm::Parallelism) -> Result<()> + Sync,
) -> Result<()> {
    let par = s.parallelism(s.bg() * s.group);
    out.par_chunks_mut(s.t * width)
        .enumerate()
        .try_for_each(|(head, dst)| {
            s.blocks(head / s.heads())
                .try_for_each(|b| product(head, b, dst, par))
        })
}

/// Writes `q kᵀ` into each block's key span of `scores` `(b · heads, t, kv)`; entries
/// outside the spans are left as they are (the softmax zeroes them).
pub(super) fn scores(q: &[f32], k: &[f32], s: Shape, out: &mut [f32]) -> Result<()> {
    let (t, kv, d) = (s.t, s.kv, s.d);
    per_head_blocks(s, out, kv, |head, b, dst, par| {
        let lhs = MatRef::contiguous(rows(q, head * t + b.row, b.rows, d)?, b.rows, d)?;
        let keys = rows(k, head / s.group * s.kv_stride + b.key, b.keys, d)?;
        let rhs = MatRef::contiguous(keys, b.keys, d)?.t();
        let dst = sub_mut(dst, b.row * kv + b.key)?;
        gemm_with(dst, kv, lhs, rhs, Accum::Replace, par)
    })
}

/// `P v` per block over its key span: the heads' outputs `(b · heads, t, d)`.
pub(super) fn weighted_values(probs: &[f32], v: &[f32], s: Shape, out: &mut [f32]) -> Result<()> {
    let (t, kv, d) = (s.t, s.kv, s.d);
    per_head_blocks(s, out, d, |head, b, dst, par| {
        let p = rows(probs, head * t + b.row, b.rows, kv)?;
        let lhs = MatRef::new(sub(p, b.key)?, b.rows, b.keys, kv, 1)?;
        let values = rows(v, head / s.group * s.kv_stride + b.key, b.keys, d)?;
        let rhs = MatRef::contiguous(values, b.keys, d)?;
        gemm_with(sub_mut(dst, b.row * d)?, d, lhs, rhs, Accum::Replace, par)
    })
}

/// The inputs of the backward, as the forward saw them, and the output's gradient.
pub(super) struct BackwardInputs<'a> {
    pub q: &'a [f32],
    /// Keys and values: each key/value head's `kv` rows, heads `kv_stride` rows apart.
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// The forward's probabilities `(b · heads, t, kv)`.
    pub probs: &'a [f32],
    /// The forward's probabilities after dropout, laid out as `probs`; `None` without
    /// dropout.
    pub dropped: Option<&'a [f32]>,
    /// The forward's output `O`, `(b, t, heads · d)`.
    pub out: &'a [f32],
    /// The output's gradient `dO`, `(b, t, heads · d)`: read in place, each head's rows at
    /// stride `heads · d`.
    pub d_out: &'a [f32],
    /// The scores' scale.
    pub scale: f32,
    /// A soft-cap's slopes `1 − tanh²`, laid out as `probs`; `None` without a soft-cap.
    pub cap_slopes: Option<&'a [f32]>,
}

/// `(dQ, dK, dV)` in the layouts of `q`, `k`, `v`, with `dS = scale · P ⊙ (dP − c)` and
/// `c = rowsum(dO ⊙ O)` per query row (with dropout, as the module's note says; with a
/// soft-cap, times its slopes).
pub(super) fn backward(x: &BackwardInputs, s: Shape) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (t, kv, d, group) = (s.t, s.kv, s.d, s.group);
    let (heads, row_stride) = (s.heads(), s.heads() * d);
    let mut d_q = vec![0f32; s.bg() * group * t * d];
    let mut d_k = vec![0f32; s.bg() * kv * d];
    let mut d_v = vec![0f32; s.bg() * kv * d];
    let par = s.parallelism(s.bg());
    d_q.par_chunks_mut(group * t * d)
        .zip(d_k.par_chunks_mut(kv * d).zip(d_v.par_chunks_mut(kv * d)))
        .enumerate()
        .try_for_each(|(kv_head, (d_q, (d_k, d_v)))| -> Result<()> {
            let k = rows(x.k, kv_head * s.kv_stride, kv, d)?;
            let v = rows(x.v, kv_head * s.kv_stride, kv, d)?;
            let mut d_s = vec![0f32; BLOCK_ROWS.min(t) * kv];
            let mut row_dot = vec![0f32; BLOCK_ROWS.min(t)];
            for member in 0..group {
                let head = kv_head * group + member;
                let q = rows(x.q, head * t, t, d)?;
                let p = rows(x.probs, head * t, t, kv)?;
                let slopes = match x.cap_slopes {
                    Some(slopes) => Some(rows(slopes, head * t, t, kv)?),
                    None => None,
                };
                // The probabilities the forward's product read.
                let p_used = match x.dropped {
                    Some(dropped) => rows(dropped, head * t, t, kv)?,
                    None => p,
                };
                // Row `r` of this head in `(b, t, heads · d)`.
                let (batch, within) = (head / heads, head % heads);
                let at = |r: usize| ((batch * t + r) * heads + within) * d;
                let d_q = sub_mut(d_q, member * t * d)?;
                for b in s.blocks(kv_head / s.kv_heads) {
                    let p_b = MatRef::new(sub(p_used, b.row * kv + b.key)?, b.rows, b.keys, kv, 1)?;
                    let d_o_b = MatRef::new(sub(x.d_out, at(b.row))?, b.rows, d, row_stride, 1)?;
                    for (r, c) in row_dot.iter_mut().take(b.rows).enumerate() {
                        let o = rows(x.out, at(b.row + r) / d, 1, d)?;
                        let g = rows(x.d_out, at(b.row + r) / d, 1, d)?;
                        *c = crate::kernels::vector_math::dot(o, g);
                    }
                    let q_b = MatRef::contiguous(sub(q, b.row * d)?, b.rows, d)?;
                    let k_b = MatRef::contiguous(sub(k, b.key * d)?, b.keys, d)?;
                    let v_b = MatRef::contiguous(sub(v, b.key * d)?, b.keys, d)?;
                    let d_v_b = sub_mut(d_v, b.key * d)?;
                    gemm_with(d_v_b, d, p_b.t(), d_o_b, Accum::Add, par)?;
                    // dP over the span, then dS in place.
                    gemm_with(&mut d_s, b.keys, d_o_b, v_b.t(), Accum::Replace, par)?;
                    for (r, ds_row) in d_s.chunks_mut(b.keys).take(b.rows).enumerate() {
                        let c = row_dot.get(r).copied().unwrap_or(0.0);
                        let at = (b.row + r) * kv + b.key;
                        let p_row = sub(p, at)?;
                        match x.dropped {
                            None => scores_gradient(ds_row, p_row, c, x.scale),
                            Some(_) => {
                                scores_gradient_dropped(ds_row, p_row, sub(p_used, at)?, c, x.scale)
                            }
                        }
                        // Through the soft-cap: times its slope.
                        if let Some(slopes) = slopes {
                            for (g, slope) in ds_row.iter_mut().zip(sub(slopes, at)?) {
                                *g *= slope;
                            }
                        }
                    }
                    let d_s_b = MatRef::contiguous(&d_s, b.rows, b.keys)?;
                    let d_q_b = sub_mut(d_q, b.row * d)?;
                    gemm_with(d_q_b, d, d_s_b, k_b, Accum::Replace, par)?;
                    gemm_with(sub_mut(d_k, b.key * d)?, d, d_s_b.t(), q_b, Accum::Add, par)?;
                }
            }
            Ok(())
        })?;
    Ok((d_q, d_k, d_v))
}

/// `dS = scale · P ⊙ (dP − c)` in place over `d_p`, one row.
fn scores_gradient(d_p: &mut [f32], p: &[f32], c: f32, scale: f32) {
    crate::kernels::vector_math::on_widest_vectors(
        #[inline(always)]
        || {
            for (g, &pv) in d_p.iter_mut().zip(p) {
                *g = scale * pv * (*g - c);
            }
        },
    );
}

/// `dS = scale · (P̃ ⊙ dP̃ − P ⊙ c)` in place over `d_p` (`dP̃`, the gradient of the
/// dropped probabilities `p_dropped`), one row.
fn scores_gradient_dropped(d_p: &mut [f32], p: &[f32], p_dropped: &[f32], c: f32, scale: f32) {
    crate::kernels::vector_math::on_widest_vectors(
        #[inline(always)]
        || {
            for ((g, &pv), &dv) in d_p.iter_mut().zip(p).zip(p_dropped) {
                *g = scale * (dv * *g - pv * c);
            }
        },
    );
}

/// Rows `first .. first + count` of a row-major matrix with `width` columns.
fn rows(data: &[f32], first: usize, count: usize, width: usize) -> Result<&[f32]> {
    match data.get(first * width..(first + count) * width) {
        Some(rows) => Ok(rows),
        None => candle_core::bail!(
            "attention: rows {first}..{} of width {width} outside a buffer of {}",
            first + count,
            data.len()
        ),
    }
}

/// `data[start..]`, or an error naming the overrun.
fn sub(data: &[f32], start: usize) -> Result<&[f32]> {
    match data.get(start..) {
        Some(rest) => Ok(rest),
        None => candle_core::bail!("attention: offset {start} past a buffer of {}", data.len()),
    }
}

/// `data[start..]`, mutable, or an error naming the overrun.
fn sub_mut(data: &mut [f32], start: usize) -> Result<&mut [f32]> {
    let len = data.len();
    match data.get_mut(start..) {
        Some(rest) => Ok(rest),
        None => candle_core::bail!("attention: offset {start} past a buffer of {len}"),
    }
}
