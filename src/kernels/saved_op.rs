//! The candle `CustomOp3` plumbing the fused ops share ([`super::fused_op`],
//! [`super::scaled_op`]).
//!
//! An op is a [`SavingKernel`] (its CPU forward and backward, generic over the element
//! type) wrapped in a [`SavedOp`], which is the `CustomOp3`: it runs the CPU forward in f32
//! or f64, keeps the intermediates that forward hands back (`x Aᵀ`, ...) in the forward's
//! own buffers (no copy), and gives them to the CPU backward, so the backward does not
//! compute them again. The op lives in its output's autograd graph (only when an input
//! tracks a gradient), so the intermediates live as long as that graph; then their
//! buffers go back to the kernels' pool for the next step's forward. A CUDA forward keeps
//! its intermediates too (as GPU tensors, in their own slots) for the CUDA backward.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

use super::cpu::{slice_of, with_slice, Pooled, Scratch};

/// How many intermediates a forward may save.
pub(crate) const SLOTS: usize = 2;

/// One CPU input: its buffer and the layout over it.
pub(crate) type Input<'a, T> = (&'a [T], &'a Layout);

/// The gradients of an op's three inputs.
pub(crate) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// What a CPU forward returns.
pub(crate) struct CpuOutput<T: WithDType> {
    /// The output, contiguous.
    pub y: Vec<T>,
    /// Its shape.
    pub shape: Shape,
    /// Contiguous intermediates for the backward (`None`: nothing in that slot), pooled
    /// buffers.
    pub saved: [Option<Scratch<T>>; SLOTS],
}

/// A fused three-input op's kernels; [`SavedOp`] makes it a `CustomOp3`.
pub(crate) trait SavingKernel: Send + Sync + 'static {
    /// The `CustomOp3`'s name.
    const OP_NAME: &'static str;

    /// The op's name in errors.
    const NAME: &'static str;

    /// The CPU forward for inputs of element type `T`: the output and the intermediates to
    /// keep for the backward.
    fn cpu_forward<T: WithDType>(
        &self,
        inputs: [Input<'_, T>; 3],
    ) -> candle_core::Result<CpuOutput<T>>;

    /// The CPU backward: the gradients of the inputs for the incoming gradient `grad`, each
    /// only where `tracks` says its input tracks one. `saved`: the forward's intermediates,
    /// `None` where there is none of dtype `T` (the kernel computes it then).
    fn cpu_backward<T: WithDType>(
        &self,
        inputs: [Input<'_, T>; 3],
        grad: Input<'_, T>,
        saved: [Option<&[T]>; SLOTS],
        tracks: [bool; 3],
    ) -> candle_core::Result<[Option<Vec<T>>; 3]>;

    /// The backward where the CPU one does not run (another device or dtype).
    fn other_backward(&self, inputs: [&Tensor; 3], grad: &Tensor) -> candle_core::Result<Grads3>;

    /// The CUDA forward, for ops that have one: the output and the intermediates to keep
    /// for [`SavingKernel::cuda_backward`].
    #[cfg(feature = "cuda")]
    fn cuda_forward(
        &self,
        _inputs: [(&candle_core::CudaStorage, &Layout); 3],
    ) -> candle_core::Result<CudaForward> {
        candle_core::bail!("{}: no CUDA kernel", Self::NAME)
    }

    /// The CUDA backward, for ops that have one (`None`: use [`SavingKernel::other_backward`]).
    /// `saved`: what [`SavingKernel::cuda_forward`] kept.
    #[cfg(feature = "cuda")]
    fn cuda_backward(
        &self,
        _inputs: [&Tensor; 3],
        _grad: &Tensor,
        _saved: [Option<&Tensor>; SLOTS],
    ) -> candle_core::Result<Option<Grads3>> {
        Ok(None)
    }
}

/// What a CUDA forward returns: the output, its shape, and the intermediates to keep.
#[cfg(feature = "cuda")]
pub(crate) type CudaForward = (
    candle_core::CudaStorage,
    Shape,
    [Option<(candle_core::CudaStorage, Shape)>; SLOTS],
);

/// A [`SavingKernel`] as a candle `CustomOp3`, with the slots its CPU forward saves into.
#[derive(Debug)]
pub(crate) struct SavedOp<K> {
    kernel: K,
    saved: Mutex<[Option<Arc<Pooled>>; SLOTS]>,
    /// What the CUDA forward kept, as GPU tensors.
    #[cfg(feature = "cuda")]
    cuda_saved: Mutex<[Option<Tensor>; SLOTS]>,
}

impl<K: SavingKernel> SavedOp<K> {
    /// The op, nothing saved yet.
    pub(crate) fn new(kernel: K) -> Self {
        Self {
            kernel,
            saved: Mutex::default(),
            #[cfg(feature = "cuda")]
            cuda_saved: Mutex::default(),
        }
    }

    /// The kernel's forward, its intermediates moved into the slots.
    fn cpu_forward<T: WithDType>(
        &self,
        inputs: [Input<'_, T>; 3],
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let out = self.kernel.cpu_forward(inputs)?;
        let saved = out.saved.map(|s| s.map(|s| Arc::new(Pooled::new(s))));
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        Ok((out.y, out.shape))
    }

    /// The kernel's backward on the CPU buffers of the inputs, the gradient and the saved
    /// intermediates of dtype `T` (shared handles: a graph may run backward more than once).
    fn cpu_backward<T: WithDType>(
        &self,
        inputs: [&Tensor; 3],
        grad: &Tensor,
    ) -> candle_core::Result<Grads3> {
        let [s0, s1] = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (s0, s1) = (saved_slice::<T>(&s0), saved_slice::<T>(&s1));
        let tracks = inputs.map(Tensor::track_op);
        let [x, a, b] = inputs;
        let [dx, da, db] = with_slice::<T, _>(x, |xd, xl| {
            with_slice::<T, _>(a, |ad, al| {
                with_slice::<T, _>(b, |bd, bl| {
                    with_slice::<T, _>(grad, |gd, gl| {
                        self.kernel.cpu_backward(
                            [(xd, xl), (ad, al), (bd, bl)],
                            (gd, gl),
                            [s0, s1],
                            tracks,
                        )
                    })
                })
            })
        })?;
        let to_tensor = |v: Option<Vec<T>>, like: &Tensor| {
            v.map(|v| Tensor::from_vec(v, like.shape(), like.device()))
                .transpose()
        };
        Ok((to_tensor(dx, x)?, to_tensor(da, a)?, to_tensor(db, b)?))
    }
}

/// A saved intermediate's buffer, when there is one of dtype `T`.
fn saved_slice<T: WithDType>(saved: &Option<Arc<Pooled>>) -> Option<&[T]> {
    saved.as_deref().and_then(Pooled::slice)
}

impl<K: SavingKernel> CustomOp3 for SavedOp<K> {
    fn name(&self) -> &'static str {
        K::OP_NAME
    }

    /// Dispatches on the first input's dtype (the others must match).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(x) => {
                let inputs = [(x.as_slice(), l1), (slice_of(s2)?, l2), (slice_of(s3)?, l3)];
                let (y, shape) = self.cpu_forward(inputs)?;
                Ok((CpuStorage::F32(y), shape))
            }
            CpuStorage::F64(x) => {
                let inputs = [(x.as_slice(), l1), (slice_of(s2)?, l2), (slice_of(s3)?, l3)];
                let (y, shape) = self.cpu_forward(inputs)?;
                Ok((CpuStorage::F64(y), shape))
            }
            _ => candle_core::bail!("{}: the CPU kernel takes f32 or f64", K::NAME),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (y, shape, kept) = self.kernel.cuda_forward([(s1, l1), (s2, l2), (s3, l3)])?;
        let kept =
            kept.map(|k| k.map(|(storage, shape)| super::cuda::plain_tensor(storage, shape)));
        *self.cuda_saved.lock().unwrap_or_else(|e| e.into_inner()) = kept;
        Ok((y, shape))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        arg3: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Grads3> {
        let inputs = [arg1, arg2, arg3];
        #[cfg(feature = "cuda")]
        if arg1.device().is_cuda() {
            let saved = self
                .cuda_saved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let [s0, s1] = &saved;
            if let Some(grads) =
                self.kernel
                    .cuda_backward(inputs, grad, [s0.as_ref(), s1.as_ref()])?
            {
                return Ok(grads);
            }
        }
        if arg1.device().is_cpu() {
            match arg1.dtype() {
                DType::F32 => return self.cpu_backward::<f32>(inputs, grad),
                DType::F64 => return self.cpu_backward::<f64>(inputs, grad),
                _ => {}
            }
        }
        self.kernel.other_backward(inputs, grad)
    }
}
