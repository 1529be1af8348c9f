//! Typed views of candle's CUDA buffers for the kernels (contiguous inputs only).

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::CudaDevice;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, Layout, Shape, Storage, Tensor};

use super::dtype::CudaFloat;

/// A contiguous input's view from its start offset.
pub(super) fn view<'a, T: CudaFloat>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    if !l.is_contiguous() {
        candle_core::bail!("fused linear (cuda): {what} must be contiguous");
    }
    let slice: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
    let start = l.start_offset();
    match slice.try_slice(start..start + l.shape().elem_count()) {
        Some(v) => Ok(v),
        None => candle_core::bail!("fused linear (cuda): {what} overruns its buffer"),
    }
}

/// Runs `f` with the view of a contiguous tensor held on the GPU (an error names `what`
/// when it is elsewhere, of another dtype or not contiguous).
pub(super) fn tensor_view<T: CudaFloat, R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&CudaView<'_, T>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (guard, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*guard else {
        candle_core::bail!("fused linear (cuda): {what} is not on the GPU");
    };
    f(&view::<T>(s, layout, what)?)
}

/// A kernel's result as a gradient tensor of `like`'s shape (no autograd history).
pub(super) fn grad_tensor<T: CudaFloat>(
    slice: Option<CudaSlice<T>>,
    dev: &CudaDevice,
    like: &Tensor,
) -> Option<Tensor> {
    slice.map(|s| {
        plain_tensor(
            CudaStorage::wrap_cuda_slice(s, dev.clone()),
            like.shape().clone(),
        )
    })
}

/// A tensor over a CUDA buffer, with no autograd history.
pub(crate) fn plain_tensor(storage: CudaStorage, shape: Shape) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}
