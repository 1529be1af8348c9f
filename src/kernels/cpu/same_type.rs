//! Views of a generic element type as the concrete one it is (`T` as `f32` when `T` is
//! `f32`), for kernels written for one float type behind the generic `gemm_into`. The
//! check is the type itself (`TypeId`), not the candle dtype a type claims.

use std::any::TypeId;

use candle_core::WithDType;

use super::MatRef;

/// Whether `T` is `U`.
pub(super) fn is<T: 'static, U: 'static>() -> bool {
    TypeId::of::<T>() == TypeId::of::<U>()
}

/// `data` as a slice of `U` when `T` is `U`.
pub(super) fn same_slice<T: WithDType, U: WithDType>(data: &[T]) -> Option<&[U]> {
    // SAFETY: `T` and `U` are the same type, so the slice is reinterpreted as itself.
    is::<T, U>()
        .then(|| unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<U>(), data.len()) })
}

/// `data` as a mutable slice of `U` when `T` is `U`.
pub(super) fn same_slice_mut<T: WithDType, U: WithDType>(data: &mut [T]) -> Option<&mut [U]> {
    // SAFETY: as in `same_slice`.
    is::<T, U>().then(|| unsafe {
        std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<U>(), data.len())
    })
}

/// `view` as a view of `U` when `T` is `U`.
pub(super) fn same<T: WithDType, U: WithDType>(view: MatRef<T>) -> Option<MatRef<U>> {
    Some(MatRef {
        data: same_slice(view.data)?,
        rows: view.rows,
        cols: view.cols,
        rs: view.rs,
        cs: view.cs,
    })
}

/// A product's destination and operands as `U`'s, when `T` is `U`: what the routes
/// written for one float type (`f32`: AMX tiles, the packed products) multiply.
pub(super) fn same_product<'a, T: WithDType, U: WithDType>(
    dst: &'a mut [T],
    lhs: MatRef<'a, T>,
    rhs: MatRef<'a, T>,
) -> Option<(&'a mut [U], MatRef<'a, U>, MatRef<'a, U>)> {
    Some((same_slice_mut(dst)?, same(lhs)?, same(rhs)?))
}

/// `data` as a vector of `U` when `T` is `U` (moved, not copied).
pub(super) fn same_vec<T: 'static, U: 'static>(data: Vec<T>) -> Option<Vec<U>> {
    let data: Box<dyn std::any::Any> = Box::new(data);
    data.downcast::<Vec<U>>().ok().map(|data| *data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_type_itself_is_viewed_as_it() -> candle_core::Result<()> {
        assert!(is::<f32, f32>() && !is::<f64, f32>() && !is::<half::bf16, f32>());
        let doubles = [1.0f64; 4];
        assert!(same::<f64, f32>(MatRef::contiguous(&doubles, 2, 2)?).is_none());
        let mut floats = [1.0f32, 2.0, 3.0, 4.0];
        let view = same::<f32, f32>(MatRef::contiguous(&floats, 2, 2)?);
        assert_eq!(view.map(|v| v.at(1, 0)), Some(3.0));
        assert!(same_slice_mut::<f32, f64>(&mut floats).is_none());
        if let Some(s) = same_slice_mut::<f32, f32>(&mut floats) {
            s[0] = 9.0;
        }
        assert_eq!(floats[0], 9.0);
        assert_eq!(same_vec::<f32, f32>(vec![1.5]), Some(vec![1.5f32]));
        assert!(same_vec::<f32, f64>(vec![1.5]).is_none());
        Ok(())
    }
}
