//! The evaluation cache of DoRA's row norms, keyed on the values of `A` and `B`.
//!
//! Optimizers and `Var::set` overwrite a variable's storage in place, so neither the tensor
//! id nor the storage address changes when A or B train. The cache therefore keeps copies
//! of A and B from when the norms were computed and compares values on each lookup: an
//! `O(r·(d_in + d_out))` check, against the `O(d_out·d_in·r)` recompute it avoids.

use candle_core::{DType, Storage, Tensor};

use crate::error::Result;
use crate::kernels::add_to_total;

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
        Ok(same_values(&[(a, &self.a), (b, &self.b)])?.then_some(&self.norms))
    }
}

/// Whether the two tensors of each pair have one shape and hold the same values (NaN
/// never matches: a NaN parameter always recomputes). Reads CPU f32/f64 buffers in place;
/// other dtypes and devices compare with tensor ops, whose counts of differing entries
/// add up on the device and are read once for all the pairs (on a GPU a read waits for
/// the device, and this runs on every evaluation forward).
pub(crate) fn same_values(pairs: &[(&Tensor, &Tensor)]) -> Result<bool> {
    let mut differ: Option<Tensor> = None;
    for &(x, y) in pairs {
        if x.shape() != y.shape() || x.dtype() != y.dtype() {
            return Ok(false);
        }
        match cpu_same_values(x, y)? {
            Some(true) => {}
            Some(false) => return Ok(false),
            None => add_to_total(&mut differ, x.ne(y)?.to_dtype(DType::F32)?.sum_all()?)?,
        }
    }
    Ok(match differ {
        // A sum of non-negative counts is 0 only when each is, in any rounding.
        Some(total) => total.to_scalar::<f32>()? == 0.0,
        None => true,
    })
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::same_values;

    /// Pairs compared in place (f32) and with tensor ops (bf16, and a transposed f32 view),
    /// together: equal when every pair is, unequal when any one differs in one entry or in
    /// shape, and a NaN never equal to itself.
    #[test]
    fn every_pair_must_match() {
        let dev = Device::Cpu;
        let t = |v: &[f32], dt| Tensor::new(v, &dev).unwrap().to_dtype(dt).unwrap();
        let (x, x2) = (
            t(&[1.0, 2.0, 3.0, 4.0], DType::F32),
            t(&[1.0, 2.0, 3.0, 4.0], DType::F32),
        );
        let (h, h2) = (t(&[0.5, -1.0], DType::BF16), t(&[0.5, -1.0], DType::BF16));
        let h_other = t(&[0.5, -1.5], DType::BF16);
        let m = x.reshape((2, 2)).unwrap().t().unwrap();
        let m2 = x2.reshape((2, 2)).unwrap().t().unwrap();
        let m_other = t(&[1.0, 2.0, 3.0, 5.0], DType::F32)
            .reshape((2, 2))
            .unwrap()
            .t()
            .unwrap();

        assert!(same_values(&[(&x, &x2), (&h, &h2), (&m, &m2)]).unwrap());
        assert!(!same_values(&[(&x, &x2), (&h, &h_other), (&m, &m2)]).unwrap());
        assert!(!same_values(&[(&h, &h2), (&m, &m_other)]).unwrap());
        assert!(!same_values(&[(&h, &h2), (&x, &t(&[1.0, 2.0, 3.0, 4.5], DType::F32))]).unwrap());
        assert!(!same_values(&[(&h, &h2), (&x, &x.reshape((2, 2)).unwrap())]).unwrap());
        let nan = t(&[f32::NAN, 1.0], DType::BF16);
        assert!(!same_values(&[(&nan, &nan.copy().unwrap())]).unwrap());
        assert!(same_values(&[]).unwrap());
    }
}
