//! Helpers shared by the integration tests: seeded random tensors, relative errors, and
//! central finite differences computed independently of candle's autograd.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use lorakit::init::SeededRng;

pub fn randn(rng: &mut SeededRng, dims: &[usize], dtype: DType) -> Tensor {
    rng.normal(dims.to_vec(), 0.0, 1.0, dtype, &Device::Cpu)
        .expect("random tensor")
}

pub fn to_vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("to_vec")
}

/// max |a − b| / max(max |b|, tiny): a relative error over the whole tensor.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (to_vec_f64(a), to_vec_f64(b));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-30);
    diff / scale
}

/// Central finite-difference gradient of `loss(values)` with respect to every entry of
/// `values`, where `set` writes the perturbed values into the model.
pub fn finite_diff(values: &[f64], eps: f64, mut loss_at: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut v = values.to_vec();
    (0..values.len())
        .map(|i| {
            let orig = v[i];
            v[i] = orig + eps;
            let up = loss_at(&v);
            v[i] = orig - eps;
            let down = loss_at(&v);
            v[i] = orig;
            (up - down) / (2.0 * eps)
        })
        .collect()
}

pub fn max_rel_vec(a: &[f64], b: &[f64]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-30);
    diff / scale
}
