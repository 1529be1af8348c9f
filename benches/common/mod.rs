//! The benchmark cases shared by `fused.rs` (criterion) and `compare_json.rs` (JSON for
//! `peft_compare.py`): a `d × d` linear layer with bias, LoRA rank `r`, `n` input rows.
//!
//! Training-style forwards take `x` as a `Var`; the small-batch evaluation forwards
//! ([`Setup::eval`], what decoding does) take a plain tensor, and their fused path is the
//! layer a user calls, `LoraLinear::forward_t(x, false)`.

// clippy.toml keeps the library on `crate::matmul`; code outside it may call candle's own.
#![allow(clippy::disallowed_methods)]

use candle_core::{DType, Device, Tensor, Var};
use lorakit::init::SeededRng;
use lorakit::kernels::{FusedLinear, LowRankTerm};
use lorakit::low_rank::{Factor, LowRankPair};
use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraLinear};

/// One shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub n: usize,
    pub d: usize,
    pub r: usize,
}

/// The shapes of the issue: n = 512 with d = 1024, 2048, and n = 1 with d = 2048; r = 16;
/// plus a small batch, n = 16 with d = 2048.
pub const SHAPES: [Shape; 4] = [
    Shape {
        n: 512,
        d: 1024,
        r: 16,
    },
    Shape {
        n: 512,
        d: 2048,
        r: 16,
    },
    Shape {
        n: 16,
        d: 2048,
        r: 16,
    },
    Shape {
        n: 1,
        d: 2048,
        r: 16,
    },
];

/// Which product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// `x Wᵀ + b` through candle's matmul (what `candle_nn::Linear` does).
    Base,
    /// LoRA composed from candle ops (`FusedLinear::forward_composed`).
    Composed,
    /// LoRA through the fused op (`FusedLinear::forward`).
    Fused,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Base, Path::Composed, Path::Fused];

    pub fn name(self) -> &'static str {
        match self {
            Path::Base => "base_linear",
            Path::Composed => "lora_composed",
            Path::Fused => "lora_fused",
        }
    }
}

/// The tensors of one case: `x` is a `Var` (its gradient is needed, as inside a model).
pub struct Setup {
    pub x: Var,
    pub w: Tensor,
    pub b: Tensor,
    pub la: Var,
    pub lb: Var,
    pub scale: f64,
    /// `x` without gradient tracking, for [`Setup::eval`].
    pub x_eval: Tensor,
    /// The same layer as a `LoraLinear` over the same tensors.
    pub lora: LoraLinear,
}

/// Row counts up to this are timed as evaluation ([`Setup::eval`]) in the forward rows.
pub const EVAL_MAX_ROWS: usize = 16;

impl Setup {
    pub fn new(s: Shape) -> Self {
        let dev = Device::Cpu;
        let mut rng = SeededRng::new(0);
        let mut u = |shape: &[usize], a: f64| rng.uniform(shape, -a, a, DType::F32, &dev).unwrap();
        let x = Var::from_tensor(&u(&[s.n, s.d], 1.0)).unwrap();
        let k = 1.0 / (s.d as f64).sqrt();
        let w = u(&[s.d, s.d], k);
        let b = u(&[s.d], k);
        let la = Var::from_tensor(&u(&[s.r, s.d], k)).unwrap();
        let lb = Var::from_tensor(&u(&[s.d, s.r], 0.1)).unwrap();
        let pair = LowRankPair {
            a: Factor::Trainable(la.clone()),
            b: Factor::Trainable(lb.clone()),
        };
        let base = FrozenLinear::new(w.clone(), Some(b.clone())).unwrap();
        let config = LoraConfig::new(s.r, 2.0 * s.r as f64);
        let lora = LoraLinear::from_weights("lin", base, &config, pair).unwrap();
        Self {
            x_eval: x.as_tensor().detach(),
            x,
            w,
            b,
            la,
            lb,
            scale: 2.0,
            lora,
        }
    }

    /// The forward of the "fwd" rows: [`Setup::eval`] for up to [`EVAL_MAX_ROWS`] rows,
    /// else [`Setup::forward`].
    pub fn fwd_row(&self, path: Path) -> Tensor {
        match self.x_eval.dim(0).unwrap() <= EVAL_MAX_ROWS {
            true => self.eval(path),
            false => self.forward(path),
        }
    }

    /// The forward on `path` as evaluation: `x` without gradient tracking; the fused path
    /// through `LoraLinear::forward_t(x, false)`.
    pub fn eval(&self, path: Path) -> Tensor {
        let x = &self.x_eval;
        match path {
            Path::Base => self.base(x),
            Path::Composed => self.layer(path).forward_composed(x).unwrap(),
            Path::Fused => self.lora.forward_t(x, false).unwrap(),
        }
    }

    /// The base linear alone, `x Wᵀ + b`, by candle's ops.
    fn base(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.w.t().unwrap())
            .unwrap()
            .broadcast_add(&self.b)
            .unwrap()
    }

    fn layer(&self, path: Path) -> FusedLinear<'_> {
        FusedLinear {
            weight: &self.w,
            bias: Some(&self.b),
            low_rank: (path != Path::Base).then(|| LowRankTerm {
                a: self.la.as_tensor(),
                b: self.lb.as_tensor(),
                scale: self.scale,
            }),
            row_scale: None,
        }
    }

    /// The forward on `path`.
    pub fn forward(&self, path: Path) -> Tensor {
        let x = self.x.as_tensor();
        match path {
            Path::Base => self.base(x),
            Path::Composed => self.layer(path).forward_composed(x).unwrap(),
            Path::Fused => self.layer(path).forward(x).unwrap(),
        }
    }

    /// Forward, `sum`, backward (gradients of x, and of A and B for LoRA).
    pub fn forward_backward(&self, path: Path) -> usize {
        let y = self.forward(path);
        let grads = y.sum_all().unwrap().backward().unwrap();
        grads.get_ids().count()
    }
}
