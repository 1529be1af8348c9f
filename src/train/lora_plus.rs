//! LoRA+ (Hayou et al. 2024, arXiv 2402.12354): the same layers as LoRA, trained with a
//! larger learning rate for `B` than for `A`.
//!
//! [`LoraPlus`] sorts the adapters' trainable variables into [`GroupedAdamW`] groups by their
//! [`ParamRole`], following PEFT's `create_loraplus_optimizer`:
//!
//! | group | members | learning rate | weight decay |
//! |---|---|---|---|
//! | [`GROUP_A`] | `LowRankA`, and `Other` matrices (2-D or more) | `lr` | `weight_decay` |
//! | [`GROUP_EMBEDDING`] | `Embedding` | `embedding_lr` (PEFT: 1e-6) | `weight_decay` |
//! | [`GROUP_B`] | `LowRankB`, `Vector` (DoRA magnitudes, VeRA λ, AdaLoRA E), 1-D `Other` | `lr × ratio` | `weight_decay` |
//! | [`GROUP_B_NO_DECAY`] | as `GROUP_B`, for names containing `bias` | `lr × ratio` | 0 |
//!
//! The ratio defaults to 16 (= 2⁴, the paper's recommendation). Empty groups are left out.
//! Roles decide, not shapes: AdaLoRA's `E` (stored `(r, 1)`, so 2-D for PEFT, which puts it
//! in the `lr` group) has the `Vector` role here and trains at `lr × ratio`.

use std::collections::HashSet;

use crate::adapter::{Adapter, NamedVar, ParamRole};
use crate::error::{Error, Result};
use crate::shared::Shared;
use crate::train::adamw::{GroupedAdamW, ParamGroup, ParamsAdamW};

/// Name of the group trained at the base learning rate.
pub const GROUP_A: &str = "lora_A";
/// Name of the embedding adapters' group.
pub const GROUP_EMBEDDING: &str = "embedding";
/// Name of the group trained at `lr × ratio` with weight decay.
pub const GROUP_B: &str = "lora_B";
/// Name of the group trained at `lr × ratio` without weight decay (biases).
pub const GROUP_B_NO_DECAY: &str = "lora_B_no_decay";

/// The LoRA+ optimizer recipe.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::train::{LoraPlus, GROUP_B};
/// use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraLinear};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let base = FrozenLinear::new(Tensor::zeros((8, 8), DType::F32, &dev)?, None)?;
/// let layer = LoraLinear::new(base, &LoraConfig::new(2, 4.0), vb.pp("q_proj"))?;
/// let opt = LoraPlus::new(1e-4).build_from_adapters([&layer as &dyn Adapter])?;
/// let b = opt.group_index(GROUP_B).unwrap();
/// assert_eq!(opt.group_lr(b), Some(1e-4 * 16.0));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LoraPlus {
    /// The base learning rate (of `A`), β₁, β₂, ε and weight decay. Defaults are candle's
    /// AdamW defaults (weight decay 0.01; PEFT's `loraplus_weight_decay` defaults to 0).
    pub adamw: ParamsAdamW,
    /// `lr_B / lr_A` (default 16, the paper's 2⁴; PEFT makes it a required argument).
    pub ratio: f64,
    /// Learning rate of embedding adapters (PEFT's `loraplus_lr_embedding`, default 1e-6).
    pub embedding_lr: f64,
}

impl Default for LoraPlus {
    fn default() -> Self {
        Self {
            adamw: ParamsAdamW::default(),
            ratio: 16.0,
            embedding_lr: 1e-6,
        }
    }
}

impl LoraPlus {
    /// The recipe at base learning rate `lr`, other settings default.
    pub fn new(lr: f64) -> Self {
        let mut recipe = Self::default();
        recipe.adamw.lr = lr;
        recipe
    }

    /// Sets the ratio `lr_B / lr_A`.
    pub fn with_ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// Sets the weight decay (all groups but the biases').
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.adamw.weight_decay = weight_decay;
        self
    }

    /// Sets the embedding adapters' learning rate.
    pub fn with_embedding_lr(mut self, lr: f64) -> Self {
        self.embedding_lr = lr;
        self
    }

    /// The group a variable goes to.
    pub fn group_for(var: &NamedVar) -> &'static str {
        let is_vector = var.var.rank() <= 1;
        match var.role {
            ParamRole::Embedding => GROUP_EMBEDDING,
            ParamRole::LowRankA => GROUP_A,
            ParamRole::Other if !is_vector => GROUP_A,
            ParamRole::LowRankB | ParamRole::Vector | ParamRole::Other => {
                if var.name.contains("bias") {
                    GROUP_B_NO_DECAY
                } else {
                    GROUP_B
                }
            }
        }
    }

    /// The parameter groups for `(layer path, variable)` pairs. A variable reached through
    /// several layers (a shared pair) is listed once.
    pub fn groups<I>(&self, vars: I) -> Result<Vec<ParamGroup>>
    where
        I: IntoIterator<Item = (String, NamedVar)>,
    {
        if !self.ratio.is_finite() || self.ratio <= 0.0 {
            return Err(Error::settings(
                "LoRA+ optimizer",
                "ratio",
                format!("must be finite and > 0, got {}", self.ratio),
            ));
        }
        let embedding_lr = self.embedding_lr;
        if !embedding_lr.is_finite() || embedding_lr < 0.0 {
            // Checked even when no embedding is trained, so a bad recipe never passes.
            return Err(Error::settings(
                "LoRA+ optimizer",
                "embedding_lr",
                format!("must be finite and >= 0, got {embedding_lr}"),
            ));
        }
        let (lr, wd) = (self.adamw.lr, self.adamw.weight_decay);
        let group = |name: &str, lr: f64, wd: f64| {
            ParamGroup::new(name, vec![])
                .with_lr(lr)
                .with_weight_decay(wd)
        };
        let mut groups = [
            group(GROUP_A, lr, wd),
            group(GROUP_EMBEDDING, self.embedding_lr, wd),
            group(GROUP_B, lr * self.ratio, wd),
            group(GROUP_B_NO_DECAY, lr * self.ratio, 0.0),
        ];
        let mut seen = HashSet::new();
        for (_layer, var) in vars {
            if !seen.insert(var.var.as_tensor().id()) {
                continue;
            }
            let target = Self::group_for(&var);
            if let Some(g) = groups.iter_mut().find(|g| g.name == target) {
                g.vars.push(var.var);
            }
        }
        Ok(groups.into_iter().filter(|g| !g.vars.is_empty()).collect())
    }

    /// The optimizer for `(layer path, variable)` pairs.
    pub fn build<I>(&self, vars: I) -> Result<GroupedAdamW>
    where
        I: IntoIterator<Item = (String, NamedVar)>,
    {
        GroupedAdamW::new(self.groups(vars)?, self.adamw.clone())
    }

    /// The optimizer for the trainable variables of `adapters`.
    pub fn build_from_adapters<'a, I>(&self, adapters: I) -> Result<GroupedAdamW>
    where
        I: IntoIterator<Item = &'a dyn Adapter>,
    {
        let vars: Vec<(String, NamedVar)> = adapters
            .into_iter()
            .flat_map(|a| {
                let name = a.name().to_string();
                a.trainable_vars()
                    .into_iter()
                    .map(move |v| (name.clone(), v))
            })
            .collect();
        self.build(vars)
    }

    /// The optimizer for the trainable variables of shared layers (a model's registry).
    pub fn build_from_shared(&self, adapters: &[Shared<dyn Adapter>]) -> Result<GroupedAdamW> {
        let mut vars = Vec::new();
        for layer in adapters {
            let guard = layer.read();
            let name = guard.name().to_string();
            vars.extend(
                guard
                    .trainable_vars()
                    .into_iter()
                    .map(|v| (name.clone(), v)),
            );
        }
        self.build(vars)
    }
}
