//! [`TrainableBase`]: a base module whose own tensors train: PEFT's `modules_to_save` (a
//! fully trainable copy of the module) and `bias = "all"` (a module's bias trains while its
//! weight stays frozen). [`BiasMode`] says which biases train.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Module, Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapter::{NamedVar, ParamRole};
use crate::error::{Error, Result};
use crate::frozen::{plain_forward, BaseKind, FrozenLinear};
use crate::low_rank::trainable_var;

/// Which base biases train, as PEFT's `bias` setting says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BiasMode {
    /// `"none"`: every bias stays frozen.
    #[default]
    None,
    /// `"lora_only"`: the biases of adapted layers train (saved as `<path>.base_layer.bias`).
    LoraOnly,
    /// `"all"`: every bias of a layer built through the plan trains (adapted layers' as
    /// `<path>.base_layer.bias`, the others' as `<path>.bias`), and those of modules the
    /// model code builds itself (norms) when it asks [`crate::model::AdapterPlan::bias`].
    All,
}

impl BiasMode {
    /// PEFT's name (`"none"`, `"lora_only"`, `"all"`).
    pub fn as_str(self) -> &'static str {
        match self {
            BiasMode::None => "none",
            BiasMode::LoraOnly => "lora_only",
            BiasMode::All => "all",
        }
    }
}

impl FromStr for BiasMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(BiasMode::None),
            "lora_only" => Ok(BiasMode::LoraOnly),
            "all" => Ok(BiasMode::All),
            other => Err(Error::Unsupported {
                what: "bias",
                got: other.to_string(),
                supported: "none, lora_only, all".to_string(),
            }),
        }
    }
}

/// A module of the base model whose own tensors train: a full copy (PEFT's
/// `modules_to_save`: weight and bias train, saved as `<path>.weight` / `<path>.bias`) or
/// a trainable bias alone (`bias = "all"` on a module without an adapter, saved as
/// `<path>.bias`). The original stays untouched: with the adapter disabled a copy computes
/// with it, as PEFT's `ModulesToSaveWrapper` does (a trained bias stays, as PEFT trains it
/// in place).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::model::TrainableBase;
/// use lorakit::FrozenLinear;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let base = FrozenLinear::new(Tensor::ones((3, 2), DType::F32, &dev)?, Some(Tensor::zeros(3, DType::F32, &dev)?))?;
/// let varmap = VarMap::new();
/// let head = TrainableBase::copy("classifier", base, VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("classifier"))?;
/// assert_eq!(varmap.all_vars().len(), 2); // weight and bias train
/// let names: Vec<_> = head.tensors_to_save().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["weight", "bias"]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TrainableBase {
    name: String,
    original: FrozenLinear,
    weight: Option<Var>,
    bias: Option<Var>,
    /// A `modules_to_save` copy (`true`) or a trained bias alone.
    full_copy: bool,
    enabled: AtomicBool,
}

impl TrainableBase {
    /// A fully trainable copy of `original` (weight, and bias if it has one), its variables
    /// created through `vb` as `weight` and `bias` and set to the original's values.
    pub fn copy(name: impl Into<String>, original: FrozenLinear, vb: VarBuilder) -> Result<Self> {
        let weight = trainable_var(&vb, "weight", &original.stored_weight()?.contiguous()?)?;
        let bias = match original.bias() {
            Some(b) => Some(trainable_var(&vb, "bias", b)?),
            None => None,
        };
        Self::from_parts(name, original, Some(weight), bias)
    }

    /// `original` with only its bias trainable (created through `vb` as `bias`); an
    /// original without a bias is an error.
    pub fn bias_only(
        name: impl Into<String>,
        original: FrozenLinear,
        vb: VarBuilder,
    ) -> Result<Self> {
        let name = name.into();
        let Some(b) = original.bias() else {
            return Err(Error::layer_config(
                name,
                "bias",
                "the module has no bias to train",
            ));
        };
        let bias = trainable_var(&vb, "bias", b)?;
        Self::with_bias(name, original, bias)
    }

    /// `original` with `bias` (`(d_out,)`) trained in place of its own: PEFT's
    /// `bias = "all"` on a module without an adapter.
    pub fn with_bias(name: impl Into<String>, original: FrozenLinear, bias: Var) -> Result<Self> {
        Ok(Self {
            full_copy: false,
            ..Self::from_parts(name, original, None, Some(bias))?
        })
    }

    /// A `modules_to_save` copy from existing tensors (a loaded adapter): `weight` in the
    /// original's stored layout, `bias` `(d_out,)`; a `None` keeps the original's tensor,
    /// frozen.
    pub fn from_parts(
        name: impl Into<String>,
        original: FrozenLinear,
        weight: Option<Var>,
        bias: Option<Var>,
    ) -> Result<Self> {
        let name = name.into();
        if let Some(w) = &weight {
            let stored = original.stored_weight()?;
            crate::validate::shape(&name, "weight", w.as_tensor(), stored.dims())?;
            crate::validate::dtype_device(
                &name,
                "weight",
                w.as_tensor(),
                stored.dtype(),
                stored.device(),
            )?;
        }
        if let Some(b) = &bias {
            crate::validate::shape(&name, "bias", b.as_tensor(), &[original.d_out()])?;
            crate::validate::dtype_device(
                &name,
                "bias",
                b.as_tensor(),
                original.dtype(),
                original.device(),
            )?;
        }
        Ok(Self {
            name,
            original,
            weight,
            bias,
            full_copy: true,
            enabled: AtomicBool::new(true),
        })
    }

    /// The module's path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The original, frozen module.
    pub fn original(&self) -> &FrozenLinear {
        &self.original
    }

    /// Whether this is a `modules_to_save` copy (`false`: a trained bias alone).
    pub fn is_full_copy(&self) -> bool {
        self.full_copy
    }

    /// The trainable variables (`weight`, `bias`), with roles.
    pub fn trainable_vars(&self) -> Vec<NamedVar> {
        let weight = self.weight.iter().map(|v| ("weight", ParamRole::Other, v));
        let bias = self.bias.iter().map(|v| ("bias", ParamRole::Vector, v));
        weight
            .chain(bias)
            .map(|(name, role, var)| NamedVar {
                name: name.to_string(),
                role,
                var: var.clone(),
            })
            .collect()
    }

    /// The trained tensors under their names in the module (`weight` in the stored layout,
    /// `bias`): PEFT saves them as `base_model.model.<path>.<name>`.
    pub fn tensors_to_save(&self) -> Vec<(String, Tensor)> {
        self.trainable_vars()
            .into_iter()
            .map(|v| (v.name, v.var.as_tensor().clone()))
            .collect()
    }

    /// The weight the module computes with, in the original's stored layout: the trained
    /// copy's, or the original's when only the bias trains.
    pub fn current_stored_weight(&self) -> Result<Tensor> {
        match &self.weight {
            Some(w) => Ok(w.as_tensor().clone()),
            None => self.original.stored_weight(),
        }
    }

    /// The bias the module computes with: the trained one, else the original's.
    pub fn current_bias(&self) -> Option<&Tensor> {
        self.bias
            .as_ref()
            .map(|b| b.as_tensor())
            .or(self.original.bias())
    }

    /// Number of trainable scalars.
    pub fn num_trainable_params(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|v| v.var.elem_count())
            .sum()
    }

    /// Uses the trained tensors (`true`, the default) or the original (`false`).
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed)
    }

    /// The forward with its input checked against the original.
    pub fn forward_checked(&self, x: &Tensor) -> Result<Tensor> {
        self.original.check_input(&self.name, x)?;
        Ok(self.forward(x)?)
    }
}

impl Module for TrainableBase {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // A disabled copy computes with the original, as PEFT's `ModulesToSaveWrapper`
        // does; a trained bias is the base's own (PEFT trains it in place), so it stays.
        if self.full_copy && !self.enabled.load(Ordering::Relaxed) {
            return self.original.forward(x);
        }
        let kind = self.original.kind();
        let weight = match &self.weight {
            Some(w) if kind.stores_in_out() => w.as_tensor().t()?,
            Some(w) => w.as_tensor().clone(),
            None if self.original.is_quantized() => {
                let product = crate::kernels::Product {
                    weight: self.original.weight_ref(),
                    bias: self.current_bias(),
                    low_rank: None,
                    row_scale: None,
                };
                return product.forward(x).map_err(candle_core::Error::wrap);
            }
            None => self.original.weight().clone(),
        };
        let bias = self.current_bias();
        let bias = if kind == BaseKind::Embedding {
            None
        } else {
            bias
        };
        plain_forward(kind, &weight, bias, x)
    }
}
