//! Seeded, reproducible initializers.
//!
//! candle's CPU device cannot be seeded, so every random init in lorakit draws from its own
//! ChaCha8 stream: the same seed and layer name give bitwise the same tensor on every run
//! and platform.

use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::error::Result;

/// A reproducible random stream.
pub struct SeededRng(ChaCha8Rng);

impl SeededRng {
    /// A stream from a seed alone.
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    /// A stream for one layer: the seed mixed with the layer's name (FNV-1a), so layers of
    /// one model get independent, reproducible inits.
    pub fn for_layer(seed: u64, layer: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in layer.bytes() {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Self::new(seed ^ h)
    }

    /// `U(lo, hi)` samples as a tensor of `shape` in `dtype` (drawn in f64, then cast).
    /// Errors on non-finite bounds, `lo > hi`, or a shape too large to allocate.
    pub fn uniform(
        &mut self,
        shape: impl Into<Shape>,
        lo: f64,
        hi: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        crate::validate::alloc_size("init", "shape", "random tensor", shape.dims())?;
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(crate::Error::settings(
                "random init",
                "bounds",
                format!("U({lo}, {hi}) needs finite bounds with lo ≤ hi"),
            ));
        }
        let values: Vec<f64> = (0..shape.elem_count())
            .map(|_| lo + (hi - lo) * self.0.random::<f64>())
            .collect();
        to_tensor(values, shape, dtype, device)
    }

    /// `N(mean, std²)` samples as a tensor of `shape` in `dtype`. Errors on a non-finite
    /// mean or std, a negative std, or a shape too large to allocate.
    pub fn normal(
        &mut self,
        shape: impl Into<Shape>,
        mean: f64,
        std: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        crate::validate::alloc_size("init", "shape", "random tensor", shape.dims())?;
        if !(std >= 0.0 && std.is_finite() && mean.is_finite()) {
            return Err(crate::Error::settings(
                "random init",
                "std",
                format!("normal({mean}, {std}) needs a finite mean and std ≥ 0"),
            ));
        }
        let dist = Normal::new(mean, std).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let values: Vec<f64> = (0..shape.elem_count())
            .map(|_| dist.sample(&mut self.0))
            .collect();
        to_tensor(values, shape, dtype, device)
    }

    /// PyTorch's `kaiming_uniform_(a = √5)` for a `(fan_out, fan_in)` matrix, which is
    /// `U(±1/√fan_in)`: nn.Linear's default init and PEFT's LoRA A init.
    pub fn kaiming_uniform_linear(
        &mut self,
        rows: usize,
        fan_in: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        self.uniform((rows, fan_in), -bound, bound, dtype, device)
    }
}

fn to_tensor(values: Vec<f64>, shape: Shape, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
}

/// How A and B start (PEFT's `init_lora_weights`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoraInit {
    /// `A ~ U(±1/√d_in)` (kaiming-uniform, a = √5), `B = 0`: the layer equals the base.
    #[default]
    Default,
    /// `A ~ N(0, (1/r)²)`, `B = 0`.
    Gaussian,
    /// A as `Default`, and `B ~ U(±1/√r)`: a non-zero ΔW, for tests (PEFT's `false`).
    BothRandom,
}
