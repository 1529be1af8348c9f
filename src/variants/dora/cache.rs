//! The evaluation cache of DoRA's row norms, keyed on the values of `A` and `B`.
//!
//! Optimizers and `Var::set` overwrite a variable's storage in place, so neither the tensor
//! id nor the storage address changes when A or B train. The cache therefore keeps copies
//! of A and B from when the norms were computed and compares values on each lookup: an
//! `O(r·(d_in + d_out))` check, against the `O(d_out·d_in·r)` recompute it avoids.

use candle_core::{DType, Storage, Tensor};

use crate::error::Result;

/// Row norms computed from `a`, `b` (the copies taken when they were computed).
#[derive(Debug)]
pub(crate) struct NormCache {
    a: Tensor,
    b: Tensor,
    norms: Tensor,
}

impl NormCache {
    /// Stores `norms` computed from the current values of `a` and `b` (copied).
    pub(crate) fn new(a: &Tensor, b: &Tensor, norms: Tensor) -> Result<Self> {
        Ok(Self {
            a: a.detach().copy()?,
            b: b.detach().copy()?,
            norms,
        })
    }

    /// The cached norms if `a` and `b` still hold the values they were computed from.
    pub(crate) fn get(&self, a: &Tensor, b: &Tensor) -> Result<Option<&Tensor>> {
        if same_values(a, &self.a)? && same_values(b, &self.b)? {
            Ok(Some(&self.norms))
        } else {
            Ok(None)
        }
    }
}

/// Whether two tensors of one shape hold the same values (NaN never matches: a NaN
/// parameter always recomputes). Reads CPU f32/f64 buffers in place; other dtypes and
/// devices compare with tensor ops.
pub(crate) fn same_values(x: &Tensor, y: &Tensor) -> Result<bool> {
    if x.shape() != y.shape() || x.dtype() != y.dtype() {
        return Ok(false);
    }
    if let Some(eq) = cpu_same_values(x, y)? {
        return Ok(eq);
    }
    let differ = x
        .ne(y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(differ == 0.0)
}

/// The CPU fast path: `None` when it does not apply (device, dtype, layout).
fn cpu_same_values(x: &Tensor, y: &Tensor) -> Result<Option<bool>> {
    let (sx, lx) = x.storage_and_layout();
    let (sy, ly) = y.storage_and_layout();
    let (Storage::Cpu(cx), Storage::Cpu(cy)) = (&*sx, &*sy) else {
        return Ok(None);
    };
    let (Some((x0, x1)), Some((y0, y1))) = (lx.contiguous_offsets(), ly.contiguous_offsets())
    else {
        return Ok(None);
    };
    let eq = match x.dtype() {
        DType::F32 => slices_eq(
            cx.as_slice::<f32>()?.get(x0..x1),
            cy.as_slice()?.get(y0..y1),
        ),
        DType::F64 => slices_eq(
            cx.as_slice::<f64>()?.get(x0..x1),
            cy.as_slice()?.get(y0..y1),
        ),
        _ => return Ok(None),
    };
    Ok(Some(eq))
}

fn slices_eq<T: PartialEq>(x: Option<&[T]>, y: Option<&[T]>) -> bool {
    matches!((x, y), (Some(x), Some(y)) if x == y)
}
