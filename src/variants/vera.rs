//! VeRA (Kopiczko et al. 2023, arXiv 2310.11454): one frozen random pair shared by every
//! adapted layer of a model, and per-layer trainable scaling vectors.
//!
//! ```text
//! y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (drop(x) A_sᵀ)) B_sᵀ)
//! ```
//!
//! with `A_s = A[:, :d_in]` and `B_s = B[:d_out, :]` sliced from the shared pair
//! (`A`: `r × max d_in`, `B`: `max d_out × r`), no alpha scaling, as PEFT 0.21 computes it.
//! The forward is one [`ScaledLowRankLinear`]: a fused op whose backward gives `λ_d` and
//! `λ_b` their gradients from saved intermediates and never forms one for `A_s` or `B_s`
//! (three GEMMs, not four). With training-time dropout the branch runs on the dropped input
//! with `B_eff = diag(λ_b) B_s diag(λ_d)`.
//!
//! The pair lives once, in a [`VeraShared`] (an `Arc`); layers hold clones of that handle.
//! [`VeraBuilder`] collects every adapted layer's shape first, then creates the pair large
//! enough for all of them, then the layers.

use std::any::Any;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapter::{AdaptedBase, Adapter, AdapterKind, NamedVar, ParamRole};
use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::init::SeededRng;
use crate::kernels::{compute_dtype, LowRankTerm, ScaledLowRankLinear};
use crate::low_rank::trainable_var;
use crate::validate;
use crate::variants::branch::low_rank_forward;

/// PEFT's names of the per-layer vectors.
pub const LAMBDA_B_NAME: &str = "vera_lambda_b";
/// PEFT's names of the per-layer vectors.
pub const LAMBDA_D_NAME: &str = "vera_lambda_d";

/// VeRA hyper-parameters; defaults match PEFT's `VeraConfig` (r = 256, d_initial = 0.1,
/// dropout 0, projection_prng_key 0).
#[derive(Clone, Debug, PartialEq)]
pub struct VeraConfig {
    /// Rank of the shared pair (≥ 1).
    pub r: usize,
    /// Initial value of every `λ_d` entry.
    pub d_initial: f64,
    /// Dropout on the adapter input, in `[0, 1)`, applied only in training.
    pub dropout: f64,
    /// Seed of the shared pair's init.
    pub projection_prng_key: u64,
}

impl Default for VeraConfig {
    fn default() -> Self {
        Self {
            r: 256,
            d_initial: 0.1,
            dropout: 0.0,
            projection_prng_key: 0,
        }
    }
}

impl VeraConfig {
    /// Checks rank, `d_initial` and dropout, naming `layer` in the error.
    pub fn validate(&self, layer: &str) -> Result<()> {
        validate::rank(layer, self.r)?;
        validate::dropout(layer, self.dropout)?;
        if !self.d_initial.is_finite() {
            return Err(Error::InvalidConfig {
                layer: layer.to_string(),
                field: "d_initial",
                reason: format!("must be finite, got {}", self.d_initial),
            });
        }
        Ok(())
    }
}

#[derive(Debug)]
struct VeraPair {
    a: Tensor,
    b: Tensor,
}

/// The frozen pair shared by all VeRA layers of a model: `A` (`r × max d_in`) and `B`
/// (`max d_out × r`). Cloning shares it (one allocation, reference-counted).
#[derive(Clone, Debug)]
pub struct VeraShared(Arc<VeraPair>);

impl VeraShared {
    /// A pair initialized as PEFT does: Kaiming-uniform with gain √2 (`U(±√(6 / fan_in))`,
    /// fan_in the number of columns), `A` then `B` from one stream seeded with `seed`.
    /// Torch's stream is not reproduced: store the pair with the adapter.
    pub fn new(
        r: usize,
        max_d_in: usize,
        max_d_out: usize,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        validate::rank("vera", r)?;
        validate::alloc_size("vera", "r", "vera_A", &[r, max_d_in])?;
        validate::alloc_size("vera", "r", "vera_B", &[max_d_out, r])?;
        let mut rng = SeededRng::new(seed);
        let bound_a = (6.0 / max_d_in.max(1) as f64).sqrt();
        let a = rng.uniform((r, max_d_in), -bound_a, bound_a, dtype, device)?;
        let bound_b = (6.0 / r as f64).sqrt();
        let b = rng.uniform((max_d_out, r), -bound_b, bound_b, dtype, device)?;
        Self::from_tensors(a, b)
    }

    /// Wraps loaded tensors (`base_model.vera_A`, `base_model.vera_B`). They are detached.
    pub fn from_tensors(a: Tensor, b: Tensor) -> Result<Self> {
        let (ad, bd) = (a.dims(), b.dims());
        let (&[r, _], &[_, r_b]) = (ad, bd) else {
            return Err(Error::ShapeMismatch {
                layer: "vera".to_string(),
                what: "shared pair vera_A, vera_B".to_string(),
                expected: "[r, max_d_in] and [max_d_out, r]".to_string(),
                got: format!("{ad:?} and {bd:?}"),
            });
        };
        if r != r_b {
            return Err(Error::ShapeMismatch {
                layer: "vera".to_string(),
                what: "shared pair vera_A, vera_B".to_string(),
                expected: "[r, max_d_in] and [max_d_out, r]".to_string(),
                got: format!("{ad:?} and {bd:?}"),
            });
        }
        validate::rank("vera", r)?;
        validate::dtype_device("vera", "vera_B", &b, a.dtype(), a.device())?;
        Ok(Self(Arc::new(VeraPair {
            a: a.detach(),
            b: b.detach(),
        })))
    }

    /// `A`, `(r, max d_in)`.
    pub fn a(&self) -> &Tensor {
        &self.0.a
    }

    /// `B`, `(max d_out, r)`.
    pub fn b(&self) -> &Tensor {
        &self.0.b
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        // The pair is 2-D by construction (`from_tensors`).
        self.0.a.dims().first().copied().unwrap_or(0)
    }

    /// The largest input size the pair serves.
    pub fn max_d_in(&self) -> usize {
        self.0.a.dims().get(1).copied().unwrap_or(0)
    }

    /// The largest output size the pair serves.
    pub fn max_d_out(&self) -> usize {
        self.0.b.dims().first().copied().unwrap_or(0)
    }

    /// Whether two handles share one pair.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The shared tensors to save, under PEFT's model-level names.
    pub fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        vec![
            ("base_model.vera_A".into(), self.0.a.clone()),
            ("base_model.vera_B".into(), self.0.b.clone()),
        ]
    }
}

/// Collects the shapes of all layers to adapt, then creates the shared pair (sized for the
/// largest) and the layers.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{Adapter, FrozenLinear, VeraBuilder, VeraConfig};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let q = FrozenLinear::new(Tensor::randn(0f32, 1., (16, 32), &dev)?, None)?;
/// let up = FrozenLinear::new(Tensor::randn(0f32, 1., (64, 16), &dev)?, None)?;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let mut builder = VeraBuilder::new(VeraConfig { r: 8, ..Default::default() });
/// builder.reserve_for(&q)?.reserve_for(&up)?;
/// let q = builder.build(q, vb.pp("q"))?;
/// let up = builder.build(up, vb.pp("up"))?;
/// assert!(q.shared().ptr_eq(up.shared()));
/// assert_eq!(q.num_trainable_params() + up.num_trainable_params(), (16 + 8) + (64 + 8));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct VeraBuilder {
    config: VeraConfig,
    max_d_in: usize,
    max_d_out: usize,
    shared: Option<VeraShared>,
}

impl VeraBuilder {
    /// A builder with no shapes yet.
    pub fn new(config: VeraConfig) -> Self {
        Self {
            config,
            max_d_in: 0,
            max_d_out: 0,
            shared: None,
        }
    }

    /// A builder around an existing (e.g. loaded) pair: layers are built against it.
    pub fn with_shared(config: VeraConfig, shared: VeraShared) -> Self {
        Self {
            config,
            max_d_in: shared.max_d_in(),
            max_d_out: shared.max_d_out(),
            shared: Some(shared),
        }
    }

    /// Grows the pair to serve a `d_in → d_out` layer. Errors once the pair exists.
    pub fn reserve(&mut self, d_in: usize, d_out: usize) -> Result<&mut Self> {
        if let Some(shared) = &self.shared {
            if d_in > shared.max_d_in() || d_out > shared.max_d_out() {
                return Err(Error::InvalidConfig {
                    layer: "vera".to_string(),
                    field: "layer shapes",
                    reason: format!(
                        "cannot grow the shared pair ({} → {}) for a {d_in} → {d_out} layer after \
                         it was created; reserve every shape before building layers",
                        shared.max_d_in(),
                        shared.max_d_out()
                    ),
                });
            }
            return Ok(self);
        }
        self.max_d_in = self.max_d_in.max(d_in);
        self.max_d_out = self.max_d_out.max(d_out);
        Ok(self)
    }

    /// [`VeraBuilder::reserve`] with `base`'s shape.
    pub fn reserve_for(&mut self, base: &FrozenLinear) -> Result<&mut Self> {
        self.reserve(base.d_in(), base.d_out())
    }

    /// The shared pair, created on first call (in `dtype`, on `device`) from the shapes
    /// reserved so far; later calls return the same pair.
    pub fn shared(&mut self, dtype: DType, device: &Device) -> Result<VeraShared> {
        if let Some(shared) = &self.shared {
            return Ok(shared.clone());
        }
        self.config.validate("vera")?;
        let shared = VeraShared::new(
            self.config.r,
            self.max_d_in,
            self.max_d_out,
            self.config.projection_prng_key,
            dtype,
            device,
        )?;
        self.shared = Some(shared.clone());
        Ok(shared)
    }

    /// Builds a layer over `base`, creating `vera_lambda_d` (all `d_initial`) and
    /// `vera_lambda_b` (zeros) through `vb`. Creates the pair first if needed (in the
    /// base's dtype and device).
    pub fn build(&mut self, base: FrozenLinear, vb: VarBuilder) -> Result<VeraLinear> {
        let shared = self.shared(base.dtype(), base.device())?;
        VeraLinear::new(base, &shared, &self.config, vb)
    }
}

/// A frozen linear layer with a VeRA adapter.
#[derive(Debug)]
pub struct VeraLinear {
    core: AdaptedBase,
    shared: VeraShared,
    lambda_d: Var,
    lambda_b: Var,
    dropout: f64,
}

impl VeraLinear {
    /// Builds a layer over `base` against `shared`, creating the vectors through `vb`
    /// (`vera_lambda_d` = `d_initial`, `vera_lambda_b` = 0, so the layer equals the base).
    pub fn new(
        base: FrozenLinear,
        shared: &VeraShared,
        config: &VeraConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let name = vb.prefix();
        config.validate(&name)?;
        if config.r != shared.rank() {
            return Err(Error::InvalidConfig {
                layer: name,
                field: "r",
                reason: format!(
                    "config has r = {} but the shared pair has rank {}",
                    config.r,
                    shared.rank()
                ),
            });
        }
        let (dtype, dev) = (base.dtype(), base.device());
        let d_init = (Tensor::ones(config.r, dtype, dev)? * config.d_initial)?;
        let b_init = Tensor::zeros(base.d_out(), dtype, dev)?;
        let lambda_d = trainable_var(&vb, LAMBDA_D_NAME, &d_init)?;
        let lambda_b = trainable_var(&vb, LAMBDA_B_NAME, &b_init)?;
        Self::from_vars(name, base, shared, lambda_d, lambda_b, config.dropout)
    }

    /// Builds from loaded tensors: `lambda_d` (`r`), `lambda_b` (`d_out`); they become
    /// trainable `Var`s (shared if they already are).
    pub fn from_tensors(
        name: impl Into<String>,
        base: FrozenLinear,
        shared: &VeraShared,
        lambda_d: Tensor,
        lambda_b: Tensor,
        dropout: f64,
    ) -> Result<Self> {
        let (d, b) = (Var::from_tensor(&lambda_d)?, Var::from_tensor(&lambda_b)?);
        Self::from_vars(name.into(), base, shared, d, b, dropout)
    }

    fn from_vars(
        name: String,
        base: FrozenLinear,
        shared: &VeraShared,
        lambda_d: Var,
        lambda_b: Var,
        dropout: f64,
    ) -> Result<Self> {
        validate::dropout(&name, dropout)?;
        if base.d_in() > shared.max_d_in() || base.d_out() > shared.max_d_out() {
            return Err(Error::ShapeMismatch {
                layer: name,
                what: "layer vs shared VeRA pair (layer larger than the pair)".to_string(),
                expected: format!(
                    "d_in ≤ {}, d_out ≤ {}",
                    shared.max_d_in(),
                    shared.max_d_out()
                ),
                got: format!("d_in = {}, d_out = {}", base.d_in(), base.d_out()),
            });
        }
        let (dtype, dev) = (base.dtype(), base.device());
        validate::dtype_device(&name, "shared pair", shared.a(), dtype, dev)?;
        validate::shape(&name, LAMBDA_D_NAME, lambda_d.as_tensor(), &[shared.rank()])?;
        validate::shape(&name, LAMBDA_B_NAME, lambda_b.as_tensor(), &[base.d_out()])?;
        validate::dtype_device(&name, LAMBDA_D_NAME, lambda_d.as_tensor(), dtype, dev)?;
        validate::dtype_device(&name, LAMBDA_B_NAME, lambda_b.as_tensor(), dtype, dev)?;
        Ok(Self {
            core: AdaptedBase::new(name, base),
            shared: shared.clone(),
            lambda_d,
            lambda_b,
            dropout,
        })
    }

    /// The shared pair this layer slices.
    pub fn shared(&self) -> &VeraShared {
        &self.shared
    }

    /// `λ_d`, `(r,)`.
    pub fn lambda_d(&self) -> &Var {
        &self.lambda_d
    }

    /// `λ_b`, `(d_out,)`.
    pub fn lambda_b(&self) -> &Var {
        &self.lambda_b
    }

    /// `A_s = A[:, :d_in]` (contiguous; a copy only when `d_in < max d_in`).
    pub fn sliced_a(&self) -> Result<Tensor> {
        Ok(self
            .shared
            .a()
            .narrow(1, 0, self.core.base().d_in())?
            .contiguous()?)
    }

    /// `B_s = B[:d_out, :]` (a view).
    pub fn sliced_b(&self) -> Result<Tensor> {
        Ok(self.shared.b().narrow(0, 0, self.core.base().d_out())?)
    }

    /// `B_eff = diag(λ_b) B_s diag(λ_d)`, `(d_out, r)`: carries the gradient to both λ's.
    pub fn effective_b(&self) -> Result<Tensor> {
        let (a, b) = (self.shared.a().clone(), self.sliced_b()?);
        self.product(&a, &b).effective_b()
    }

    /// The layer's product over the frozen `a` and `b` (`A_s`, `B_s`).
    fn product<'a>(&'a self, a: &'a Tensor, b: &'a Tensor) -> ScaledLowRankLinear<'a> {
        let base = self.core.base();
        ScaledLowRankLinear {
            weight: base.weight(),
            bias: base.bias(),
            a,
            b,
            mid: self.lambda_d.as_tensor(),
            out: self.lambda_b.as_tensor(),
        }
    }
}

impl Adapter for VeraLinear {
    fn core(&self) -> &AdaptedBase {
        &self.core
    }

    fn core_mut(&mut self) -> &mut AdaptedBase {
        &mut self.core
    }

    fn kind(&self) -> AdapterKind {
        AdapterKind::Vera
    }

    /// Without dropout: one [`ScaledLowRankLinear`] (fused on the CPU; `A_s` and `B_s`
    /// are views of the shared pair, not copies). With training-time dropout: the base plus
    /// the branch on the dropped input, through `B_eff`.
    fn forward_adapted(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train && self.dropout > 0.0 {
            let (a, b) = (self.sliced_a()?, self.effective_b()?);
            let term = LowRankTerm {
                a: &a,
                b: &b,
                scale: 1.0,
            };
            return low_rank_forward(self.core.base(), term, self.dropout, x, train);
        }
        let d_in = self.core.base().d_in();
        let (a, b) = (self.shared.a().narrow(1, 0, d_in)?, self.sliced_b()?);
        self.product(&a, &b).forward(x)
    }

    /// `(λ_b ⊙ B_s)(λ_d ⊙ A_s)`, computed in f32 for half-precision layers on the CPU.
    fn delta_weight(&self) -> Result<Tensor> {
        let dtype = self.core.base().dtype();
        let compute = compute_dtype(dtype, self.core.base().device());
        let b = self.effective_b()?.to_dtype(compute)?;
        let a = self.sliced_a()?.to_dtype(compute)?;
        Ok(b.matmul(&a)?.to_dtype(dtype)?)
    }

    fn trainable_vars(&self) -> Vec<NamedVar> {
        vec![
            NamedVar {
                name: LAMBDA_B_NAME.into(),
                role: ParamRole::Vector,
                var: self.lambda_b.clone(),
            },
            NamedVar {
                name: LAMBDA_D_NAME.into(),
                role: ParamRole::Vector,
                var: self.lambda_d.clone(),
            },
        ]
    }

    /// `vera_lambda_b`, `vera_lambda_d`; the shared pair is saved once per model
    /// ([`VeraShared::tensors_to_save`]).
    fn tensors_to_save(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            (LAMBDA_B_NAME.into(), self.lambda_b.as_tensor().clone()),
            (LAMBDA_D_NAME.into(), self.lambda_d.as_tensor().clone()),
        ])
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

crate::impl_module_for_adapter!(VeraLinear);
