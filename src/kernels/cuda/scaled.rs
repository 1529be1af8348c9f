//! VeRA's product on CUDA, `y = x Wᵀ + b + out ⊙ ((mid ⊙ x Aᵀ) Bᵀ)` with `W`, `A`, `B`
//! frozen, from the same pieces as the fused op:
//!
//! ```text
//! forward:  xa = x Aᵀ;  h = mid ⊙ xa;  v = h Bᵀ;  y = out ⊙ v + b (epilogue, v kept);  y += x Wᵀ
//! backward: d_out = Σ_i g_ij v_ij;  gh = (out ⊙ g) B;  d_mid = Σ_i gh_ik xa_ik;
//!           dx = g W + (mid ⊙ gh) A
//! ```
//!
//! No gradient for `W`, `A` or `B`; the vectors' gradients come from the kept `x Aᵀ` and
//! `v` (recomputed when the forward did not keep them).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{CudaStorage, Layout, Shape, Storage, Tensor};

use super::blas::{gemm, Dest, Operand};
use super::dtype::{dispatch_float, CudaFloat};
use super::elementwise::{column_dot, epilogue, scale_columns, Column};
use super::forward::Output;
use super::storage::{grad_tensor, plain_tensor, tensor_view, view};

/// The frozen parts of VeRA's product (all contiguous, of `x`'s dtype, on the GPU).
pub(crate) struct Scaled<'a> {
    /// `W`, `(d_out, d_in)`.
    pub weight: &'a Tensor,
    /// The bias, `(d_out,)`.
    pub bias: Option<&'a Tensor>,
    /// `A`, `(r, d_in)`.
    pub a: &'a Tensor,
    /// `B`, `(d_out, r)`.
    pub b: &'a Tensor,
    /// Whether to keep `x Aᵀ` and `v` for the backward.
    pub keep: bool,
}

/// The forward on the inputs `x`, `mid` (`r`) and `out` (`d_out`).
pub(crate) fn scaled_forward(
    op: &Scaled<'_>,
    x: (&CudaStorage, &Layout),
    mid: (&CudaStorage, &Layout),
    out: (&CudaStorage, &Layout),
) -> candle_core::Result<Output> {
    dispatch_float!(
        x.0.dtype(),
        "scaled low-rank linear",
        forward_t(op, x, mid, out)
    )
}

fn forward_t<T: CudaFloat>(
    op: &Scaled<'_>,
    x: (&CudaStorage, &Layout),
    mid: (&CudaStorage, &Layout),
    out: (&CudaStorage, &Layout),
) -> candle_core::Result<Output> {
    let dev = x.0.device.clone();
    let (d_out, d_in) = op.weight.dims2()?;
    let r = op.a.dims2()?.0;
    let n = x.1.shape().elem_count() / d_in.max(1);
    let xv = view::<T>(x.0, x.1, "x")?;
    let midv = view::<T>(mid.0, mid.1, "mid")?;
    let outv = view::<T>(out.0, out.1, "out")?;
    let x_op = Operand::new(&xv, n, d_in);
    let mut xa = dev.alloc_zeros::<T>(n * r)?;
    tensor_view::<T, _>(op.a, "A", |av| {
        gemm(
            &dev,
            1.0,
            &x_op,
            &Operand::new(av, r, d_in).t(),
            0.0,
            Dest {
                slice: &mut xa,
                ld: r,
            },
        )
    })?;
    let h = scale_columns(
        &dev,
        &xa.slice(..),
        r,
        Column {
            view: &midv,
            stride: 1,
        },
    )?;
    let mut y = dev.alloc_zeros::<T>(n * d_out)?;
    tensor_view::<T, _>(op.b, "B", |bv| {
        let hv = h.slice(..);
        gemm(
            &dev,
            1.0,
            &Operand::new(&hv, n, r),
            &Operand::new(bv, d_out, r).t(),
            0.0,
            Dest {
                slice: &mut y,
                ld: d_out,
            },
        )
    })?;
    drop(h);
    // SAFETY: the epilogue writes every element of `v` before anything reads it.
    let mut v = unsafe { dev.alloc::<T>(n * d_out) }?;
    let scale = Some(Column {
        view: &outv,
        stride: 1,
    });
    match op.bias {
        Some(b) => tensor_view::<T, _>(b, "bias", |bv| {
            epilogue(&dev, &mut y, d_out, Some(&mut v), scale, Some(bv))
        })?,
        None => epilogue(&dev, &mut y, d_out, Some(&mut v), scale, None)?,
    }
    tensor_view::<T, _>(op.weight, "W", |wv| {
        gemm(
            &dev,
            1.0,
            &x_op,
            &Operand::new(wv, d_out, d_in).t(),
            1.0,
            Dest {
                slice: &mut y,
                ld: d_out,
            },
        )
    })?;
    let mut dims = x.1.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = d_out;
    }
    let wrap = |s: CudaSlice<T>| CudaStorage::wrap_cuda_slice(s, dev.clone());
    let saved = if op.keep {
        [
            Some((wrap(xa), Shape::from((n, r)))),
            Some((wrap(v), Shape::from((n, d_out)))),
        ]
    } else {
        [None, None]
    };
    Ok((wrap(y), Shape::from(dims), saved))
}

/// The backward: gradients of `x`, `mid`, `out` where `need` says so; `kept`: `x Aᵀ` and
/// `v` from the forward, if it kept them.
pub(crate) fn scaled_backward(
    op: &Scaled<'_>,
    need: [bool; 3],
    [x, mid, out]: [&Tensor; 3],
    grad: &Tensor,
    kept: [Option<&Tensor>; 2],
) -> candle_core::Result<super::backward::Grads> {
    let grad = grad.contiguous()?;
    if kept.iter().any(Option::is_none) {
        // Recompute what the forward did not keep.
        let (x_s, x_l) = x.storage_and_layout();
        let (m_s, m_l) = mid.storage_and_layout();
        let (o_s, o_l) = out.storage_and_layout();
        let (Storage::Cuda(xs), Storage::Cuda(ms), Storage::Cuda(os)) = (&*x_s, &*m_s, &*o_s)
        else {
            candle_core::bail!("scaled low-rank linear (cuda): an input is not on the GPU");
        };
        let fresh = Scaled { keep: true, ..*op };
        let (_, _, [xa, v]) = scaled_forward(&fresh, (xs, x_l), (ms, m_l), (os, o_l))?;
        let tensor = |s: Option<(CudaStorage, Shape)>| s.map(|(s, shape)| plain_tensor(s, shape));
        let (xa, v) = (tensor(xa), tensor(v));
        drop((x_s, m_s, o_s));
        return scaled_backward(op, need, [x, mid, out], &grad, [xa.as_ref(), v.as_ref()]);
    }
    let [Some(xa), Some(v)] = kept else {
        candle_core::bail!("scaled low-rank linear (cuda): missing intermediates");
    };
    dispatch_float!(
        x.dtype(),
        "scaled low-rank linear",
        backward_t(op, need, [x, mid, out], &grad, [xa, v])
    )
}

fn backward_t<T: CudaFloat>(
    op: &Scaled<'_>,
    [need_x, need_mid, need_out]: [bool; 3],
    [x, mid, out]: [&Tensor; 3],
    grad: &Tensor,
    [xa, v]: [&Tensor; 2],
) -> candle_core::Result<super::backward::Grads> {
    let candle_core::Device::Cuda(dev) = x.device() else {
        candle_core::bail!("scaled low-rank linear (cuda): x is not on the GPU");
    };
    let (d_out, d_in) = op.weight.dims2()?;
    let r = op.a.dims2()?.0;
    let n = x.elem_count() / d_in.max(1);
    let need = [need_x, need_mid, need_out];
    let [dx, dmid, dout] = tensor_view::<T, _>(mid, "mid", |mid| {
        tensor_view::<T, _>(out, "out", |out| {
            tensor_view::<T, _>(grad, "the gradient", |g| {
                tensor_view::<T, _>(xa, "x Aᵀ", |xa| {
                    tensor_view::<T, _>(v, "v", |v| {
                        tensor_view::<T, _>(op.weight, "W", |w| {
                            tensor_view::<T, _>(op.a, "A", |a| {
                                tensor_view::<T, _>(op.b, "B", |b| {
                                    let views = Views {
                                        mid,
                                        out,
                                        g,
                                        xa,
                                        v,
                                        w,
                                        a,
                                        b,
                                    };
                                    gradients(dev, &views, (n, d_in, d_out, r), need)
                                })
                            })
                        })
                    })
                })
            })
        })
    })?;
    Ok((
        grad_tensor(dx, dev, x),
        grad_tensor(dmid, dev, mid),
        grad_tensor(dout, dev, out),
    ))
}

/// The backward's GPU views.
struct Views<'v, 'a, T> {
    mid: &'v CudaView<'a, T>,
    out: &'v CudaView<'a, T>,
    g: &'v CudaView<'a, T>,
    xa: &'v CudaView<'a, T>,
    v: &'v CudaView<'a, T>,
    w: &'v CudaView<'a, T>,
    a: &'v CudaView<'a, T>,
    b: &'v CudaView<'a, T>,
}

/// `dx`, `d_mid`, `d_out`, each where needed.
fn gradients<T: CudaFloat>(
    dev: &CudaDevice,
    t: &Views<'_, '_, T>,
    (n, d_in, d_out, r): (usize, usize, usize, usize),
    [need_x, need_mid, need_out]: [bool; 3],
) -> candle_core::Result<[Option<CudaSlice<T>>; 3]> {
    let mut d_out_grad = None;
    if need_out {
        let mut o = dev.alloc_zeros::<T>(d_out)?;
        column_dot(dev, t.g, t.v, (n, d_out), &mut o, (0, 1))?;
        d_out_grad = Some(o);
    }
    let (mut dx, mut d_mid) = (None, None);
    if need_x || need_mid {
        let gs = scale_columns(
            dev,
            t.g,
            d_out,
            Column {
                view: t.out,
                stride: 1,
            },
        )?;
        let gsv = gs.slice(..);
        let mut gh = dev.alloc_zeros::<T>(n * r)?;
        let b = Operand::new(t.b, d_out, r);
        gemm(
            dev,
            1.0,
            &Operand::new(&gsv, n, d_out),
            &b,
            0.0,
            Dest {
                slice: &mut gh,
                ld: r,
            },
        )?;
        let ghv = gh.slice(..);
        if need_mid {
            let mut m = dev.alloc_zeros::<T>(r)?;
            column_dot(dev, &ghv, t.xa, (n, r), &mut m, (0, 1))?;
            d_mid = Some(m);
        }
        if need_x {
            let gm = scale_columns(
                dev,
                &ghv,
                r,
                Column {
                    view: t.mid,
                    stride: 1,
                },
            )?;
            let gmv = gm.slice(..);
            let mut out = dev.alloc_zeros::<T>(n * d_in)?;
            let g = Operand::new(t.g, n, d_out);
            gemm(
                dev,
                1.0,
                &g,
                &Operand::new(t.w, d_out, d_in),
                0.0,
                Dest {
                    slice: &mut out,
                    ld: d_in,
                },
            )?;
            gemm(
                dev,
                1.0,
                &Operand::new(&gmv, n, r),
                &Operand::new(t.a, r, d_in),
                1.0,
                Dest {
                    slice: &mut out,
                    ld: d_in,
                },
            )?;
            dx = Some(out);
        }
    }
    Ok([dx, d_mid, d_out_grad])
}
