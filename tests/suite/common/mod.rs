//! Independent references for the variant tests: plain f64 math on `Vec`s, seeded random
//! tensors, and central finite differences.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use lorakit::init::SeededRng;

/// A dense matrix, row-major.
pub type M = Vec<Vec<f64>>;

pub fn rng(seed: u64) -> SeededRng {
    SeededRng::new(seed)
}

/// `U(-1, 1)` tensor.
pub fn rand(rng: &mut SeededRng, shape: &[usize], dtype: DType) -> Tensor {
    rng.uniform(shape.to_vec(), -1.0, 1.0, dtype, &Device::Cpu)
        .expect("rand")
}

pub fn mat(t: &Tensor) -> M {
    t.to_dtype(DType::F64)
        .and_then(|t| t.to_vec2::<f64>())
        .expect("to_vec2")
}

pub fn vec1(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.to_vec1::<f64>())
        .expect("to_vec1")
}

pub fn tensor(m: &M, dtype: DType) -> Tensor {
    let (r, c) = (m.len(), m[0].len());
    let flat: Vec<f64> = m.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (r, c), &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor")
}

/// `x Wᵀ` for `x` `(n, k)`, `w` `(m, k)`.
pub fn linear(x: &M, w: &M) -> M {
    x.iter()
        .map(|xi| {
            w.iter()
                .map(|wj| xi.iter().zip(wj).map(|(a, b)| a * b).sum())
                .collect()
        })
        .collect()
}

/// `a b` for `a` `(n, k)`, `b` `(k, m)`.
pub fn matmul(a: &M, b: &M) -> M {
    let bt: M = (0..b[0].len())
        .map(|j| b.iter().map(|row| row[j]).collect())
        .collect();
    linear(a, &bt)
}

pub fn add(a: &M, b: &M) -> M {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p + q).collect())
        .collect()
}

pub fn scale(a: &M, s: f64) -> M {
    a.iter()
        .map(|r| r.iter().map(|v| v * s).collect())
        .collect()
}

/// Scales column `j` by `v[j]` (a per-output scale on `(n, d_out)`).
pub fn scale_cols(a: &M, v: &[f64]) -> M {
    a.iter()
        .map(|r| r.iter().zip(v).map(|(x, s)| x * s).collect())
        .collect()
}

/// Scales row `i` by `v[i]`.
pub fn scale_rows(a: &M, v: &[f64]) -> M {
    a.iter()
        .zip(v)
        .map(|(r, s)| r.iter().map(|x| x * s).collect())
        .collect()
}

pub fn add_bias(a: &M, bias: Option<&[f64]>) -> M {
    match bias {
        None => a.clone(),
        Some(b) => a
            .iter()
            .map(|r| r.iter().zip(b).map(|(x, y)| x + y).collect())
            .collect(),
    }
}

pub fn row_norms(a: &M) -> Vec<f64> {
    a.iter()
        .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect()
}

/// `Σ a ⊙ r`.
pub fn dot(a: &M, r: &M) -> f64 {
    a.iter()
        .zip(r)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>())
        .sum()
}

/// Largest `|a − b|` over the largest `|b|` (both flattened, any rank).
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len());
    max_rel_vec(&a, &b)
}

pub fn max_rel_diff_m(a: &M, b: &M) -> f64 {
    max_rel_diff(&tensor(a, DType::F64), &tensor(b, DType::F64))
}

/// Bitwise equality of two tensors' values.
pub fn bit_identical(a: &Tensor, b: &Tensor) -> bool {
    let (a, b) = (flat(a), flat(b));
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Central finite differences of `loss` over every element of `values` (a flat f64 copy
/// of one parameter), with step `h`.
pub fn fd_grad(values: &[f64], h: f64, mut loss: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut v = values.to_vec();
    (0..v.len())
        .map(|i| {
            let orig = v[i];
            v[i] = orig + h;
            let up = loss(&v);
            v[i] = orig - h;
            let down = loss(&v);
            v[i] = orig;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Finite differences over a `Var` of the layer itself: sets perturbed values, calls
/// `loss`, restores the original.
pub fn fd_grad_var(var: &Var, h: f64, mut loss: impl FnMut() -> f64) -> Vec<f64> {
    let orig = var.as_tensor().copy().unwrap();
    let shape = orig.shape().clone();
    let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
    let g = fd_grad(&flat, h, |v| {
        var.set(&Tensor::from_vec(v.to_vec(), shape.clone(), &Device::Cpu).unwrap())
            .unwrap();
        loss()
    });
    var.set(&orig).unwrap();
    g
}

/// `‖a − b‖ / ‖b‖` of two flat vectors.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-300);
    num / den
}

pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `N(0, 1)` tensor.
pub fn randn(rng: &mut SeededRng, shape: &[usize], dtype: DType) -> Tensor {
    rng.normal(shape.to_vec(), 0.0, 1.0, dtype, &Device::Cpu)
        .expect("randn")
}

/// Largest `|a − b|` over the largest `|b|` of two flat vectors.
pub fn max_rel_vec(a: &[f64], b: &[f64]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-300);
    diff / scale
}

/// A LoRA config of rank `r` whose scale `alpha / r` is `s` (dropout 0, default init): how
/// the tests build layers from given factors with a given scale.
pub fn lora_config_with_scale(r: usize, s: f64) -> lorakit::LoraConfig {
    lorakit::LoraConfig {
        alpha: s * r as f64,
        ..lorakit::LoraConfig::new(r, 1.0)
    }
}
