//! One decoder layer's cached keys and values ([`super::llama::KvCache`] holds one per
//! layer): buffers `(batch, kv_heads, capacity, head_dim)` whose first `len` positions
//! (the cache's length) hold values. A step writes its new positions after them in place,
//! and the capacity doubles when they do not fit (bounded by the model's position limit),
//! so appending costs the new positions, not a copy of everything cached as
//! `Tensor::cat` of the old and new keys does every step (quadratic in the length over a
//! generation). Attention reads the first `len + new` positions as views of the buffers
//! (`models::attention_op` in place, candle's matmul by strides).
//!
//! The buffers are shared by clones of the cache (an `Arc`): a step writes in place only
//! when no clone holds them, and copies into new buffers otherwise, so a cloned cache
//! never sees another's positions. Positions a failed step wrote past `len` are unused:
//! the cache's length did not move.
//!
//! Stored values carry no autograd history. Attention reads the buffers directly unless
//! the new keys or values carry a gradient that should flow ([`Appending::values_only`]
//! off): then it reads the cached positions and the new tensors themselves, joined.

use std::sync::Arc;

use candle_core::{Tensor, D};

use crate::error::{Error, Result, Scope};

/// The position axis of the buffers.
const POSITIONS: usize = 2;

/// One layer's key and value buffers, `(batch, kv_heads, capacity, head_dim)` each.
#[derive(Clone, Debug)]
pub(crate) struct LayerKv {
    buffers: Arc<(Tensor, Tensor)>,
}

/// Where and how a step appends to a layer's cache.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Appending {
    /// The positions already cached (where the new ones go).
    pub len: usize,
    /// The most positions the model takes: the buffers never grow beyond it.
    pub limit: usize,
    /// Attention reads the new keys and values as stored values (no gradient reaches
    /// the key and value projections through them), straight from the buffers.
    pub values_only: bool,
}

/// What attention reads after an append, and the layer's entry for the cache.
pub(crate) struct Appended {
    /// Keys of every position, `(batch, kv_heads, len + new, head_dim)`.
    pub keys: Tensor,
    /// Values of every position, the same shape.
    pub values: Tensor,
    /// The grown cache entry.
    pub entry: LayerKv,
}

impl LayerKv {
    /// Positions the buffers hold room for.
    fn capacity(&self) -> Result<usize> {
        Ok(self.buffers.0.dim(POSITIONS)?)
    }

    /// The first `len` positions of the keys and values.
    fn first(&self, len: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = &*self.buffers;
        Ok((k.narrow(POSITIONS, 0, len)?, v.narrow(POSITIONS, 0, len)?))
    }

    /// Appends the new keys `k` and values `v` `(batch, kv_heads, new, head_dim)` after
    /// `how.len` positions of `past` (`None`: the sequence starts here). Without a past the
    /// entry is `k` and `v` themselves, detached: no copy (a full forward that does not
    /// keep its cache pays nothing).
    pub(crate) fn append(
        past: Option<&LayerKv>,
        k: &Tensor,
        v: &Tensor,
        how: Appending,
    ) -> Result<Appended> {
        let total = how.len.saturating_add(k.dim(POSITIONS)?);
        let (k_new, v_new) = (k.detach(), v.detach());
        let Some(past) = past else {
            // Never written in place (its capacity is its length): stored as it stands.
            let (keys, values) = match how.values_only {
                true => (k_new.clone(), v_new.clone()),
                false => (k.clone(), v.clone()),
            };
            let entry = LayerKv {
                buffers: Arc::new((k_new, v_new)),
            };
            return Ok(Appended {
                keys,
                values,
                entry,
            });
        };
        check_matches(past, &k_new, how.len)?;
        let entry = if past.writable(total)? {
            let (kb, vb) = &*past.buffers;
            kb.slice_set(&k_new.contiguous()?, POSITIONS, how.len)?;
            vb.slice_set(&v_new.contiguous()?, POSITIONS, how.len)?;
            past.clone()
        } else {
            past.grown(&k_new, &v_new, how)?
        };
        let (keys, values) = if how.values_only || !(k.track_op() || v.track_op()) {
            entry.first(total)?
        } else {
            let (pk, pv) = past.first(how.len)?;
            (
                Tensor::cat(&[&pk, k], POSITIONS)?,
                Tensor::cat(&[&pv, v], POSITIONS)?,
            )
        };
        Ok(Appended {
            keys,
            values,
            entry,
        })
    }

    /// New buffers holding only the batch rows `rows` of these (indices into the batch, in
    /// the order given): a batch that lets finished sequences go.
    pub(crate) fn keep_rows(&self, rows: &[u32]) -> Result<LayerKv> {
        let (k, v) = &*self.buffers;
        let index = Tensor::from_slice(rows, rows.len(), k.device())?;
        Ok(LayerKv {
            buffers: Arc::new((k.index_select(&index, 0)?, v.index_select(&index, 0)?)),
        })
    }

    /// Whether `total` positions fit the buffers and no clone of the cache shares them.
    fn writable(&self, total: usize) -> Result<bool> {
        Ok(Arc::strong_count(&self.buffers) == 1 && self.capacity()? >= total)
    }

    /// New buffers holding the first `how.len` positions and then `k`, `v`, with room for
    /// twice the old capacity (at least the positions held, at most `how.limit`).
    fn grown(&self, k: &Tensor, v: &Tensor, how: Appending) -> Result<LayerKv> {
        let total = how.len + k.dim(POSITIONS)?;
        let capacity = self.capacity()?.saturating_mul(2).min(how.limit).max(total);
        let (pk, pv) = self.first(how.len)?;
        let grow = |old: &Tensor, new: &Tensor| -> Result<Tensor> {
            let (b, heads, _, d) = new.dims4()?;
            let room = Tensor::zeros((b, heads, capacity - total, d), new.dtype(), new.device())?;
            Ok(Tensor::cat(&[old, new, &room], POSITIONS)?)
        };
        Ok(LayerKv {
            buffers: Arc::new((grow(&pk, k)?, grow(&pv, v)?)),
        })
    }
}

/// The new keys must continue the cached ones: the same batch, heads, head size, dtype and
/// device (a model always gives them; this guards the buffers' writes).
fn check_matches(past: &LayerKv, k: &Tensor, len: usize) -> Result<()> {
    let held = &past.buffers.0;
    let same_rows = held.dims().get(..POSITIONS) == k.dims().get(..POSITIONS)
        && held.dim(D::Minus1)? == k.dim(D::Minus1)?;
    let same_kind = held.dtype() == k.dtype() && held.device().same_device(k.device());
    if same_rows && same_kind && len <= held.dim(POSITIONS)? {
        return Ok(());
    }
    Err(Error::usage(
        Scope::Settings("KV cache".to_string()),
        format!(
            "new keys {:?} ({:?}) do not continue the cached {:?} ({:?}) at position {len}",
            k.dims(),
            k.dtype(),
            held.dims(),
            held.dtype()
        ),
    ))
}
