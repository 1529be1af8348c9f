//! `W += U V` written into `W`'s own CPU storage (candle's `InplaceOp3`): a rank-`k`
//! update of a frozen weight without a `d_out × d_in` temporary (Delta-LoRA's step).

use candle_core::{CpuStorage, InplaceOp3, Layout, WithDType};

use super::{gemm_into, mat_of_layout, slice_of, Accum};

/// Adds `U V` (`(d_out, k) · (k, d_in)`) to a contiguous `(d_out, d_in)` target.
pub(crate) struct AddProduct;

fn add_product_t<T: WithDType>(
    w: &mut [T],
    lw: &Layout,
    u: (&[T], &Layout),
    v: (&[T], &Layout),
) -> candle_core::Result<()> {
    let (d_out, d_in) = lw.shape().dims2()?;
    let (u, v) = (mat_of_layout(u.0, u.1)?, mat_of_layout(v.0, v.1)?);
    if !lw.is_contiguous() || u.rows() != d_out || v.cols != d_in {
        candle_core::bail!(
            "in-place product update: W {:?} (contiguous: {}), U {}x{}, V {}x{}",
            lw.dims(),
            lw.is_contiguous(),
            u.rows(),
            u.cols,
            v.rows(),
            v.cols
        );
    }
    let Some(dst) = w.get_mut(lw.start_offset()..) else {
        candle_core::bail!("in-place product update: W's layout overruns its buffer");
    };
    gemm_into(dst, d_in, u, v, Accum::Add, T::from_f64(1.0))
}

impl InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "lorakit-add-product-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        match s1 {
            CpuStorage::F32(w) => add_product_t(w, l1, (slice_of(s2)?, l2), (slice_of(s3)?, l3)),
            CpuStorage::F64(w) => add_product_t(w, l1, (slice_of(s2)?, l2), (slice_of(s3)?, l3)),
            _ => candle_core::bail!("in-place product update: W must be f32 or f64"),
        }
    }
}
