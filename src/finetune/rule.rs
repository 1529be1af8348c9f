//! Each variant's training rule, assembled from `lorakit::train`'s pieces: the optimizer
//! (LoRA+'s groups or one AdamW group), the step hooks (LoRA-FA's projection, Delta-LoRA's
//! weight update, AdaLoRA's allocator) and AdaLoRA's orthogonality penalty.

use candle_core::{Tensor, Var};

use super::config::TrainConfig;
use super::recipe::AdapterRecipe;
use crate::adapter::{Adapter, Variant};
use crate::error::{Error, Result};
use crate::model::AdaptedSet;
use crate::shared::Shared;
use crate::train::{
    orthogonality_penalty, DeltaLoraHook, GroupedAdamW, LoraFaProjection, LoraPlus, ParamGroup,
    ParamsAdamW, RankAllocator, StepHook,
};

/// The optimizer and hooks of one variant over one set of adapted layers.
pub(crate) struct Rule {
    pub optimizer: GroupedAdamW,
    /// The trainable variables, in the set's order (what gradients are kept for).
    pub vars: Vec<Var>,
    /// LoRA-FA's projection or Delta-LoRA's update.
    pub hooks: Vec<Box<dyn StepHook + Send>>,
    /// AdaLoRA's allocator (kept apart: its state is saved in checkpoints).
    pub allocator: Option<RankAllocator>,
    /// AdaLoRA's layers and γ for the orthogonality penalty.
    penalty: Option<(Vec<Shared<dyn Adapter>>, f64)>,
}

impl Rule {
    /// The rule of `recipe.variant` over `set`: every layer of the set must be of that
    /// variant (LoRA+ trains LoRA layers).
    pub fn new(recipe: &AdapterRecipe, set: &AdaptedSet, config: &TrainConfig) -> Result<Self> {
        let layers: Vec<Shared<dyn Adapter>> = set.layers().into_iter().map(|(_, l)| l).collect();
        check_layers(recipe.variant, set)?;
        let optimizer = optimizer(recipe, set, config)?;
        let mut hooks: Vec<Box<dyn StepHook + Send>> = Vec::new();
        let mut allocator = None;
        let mut penalty = None;
        match recipe.variant {
            Variant::LoraFa if recipe.lora_fa_projection => {
                hooks.push(Box::new(LoraFaProjection::new(&layers)?));
            }
            Variant::DeltaLora => {
                hooks.push(Box::new(DeltaLoraHook::new(&layers, recipe.delta_lora)?));
            }
            Variant::AdaLora => {
                let a = RankAllocator::new(&layers, recipe.allocator(config.max_steps))?;
                penalty = Some((layers.clone(), a.config().orth_reg_weight));
                allocator = Some(a);
            }
            _ => {}
        }
        Ok(Self {
            optimizer,
            vars: set.vars(),
            hooks,
            allocator,
            penalty,
        })
    }

    /// AdaLoRA's `γ · R(A, B)` to add to the loss, if this rule has one.
    pub fn extra_loss(&self) -> Result<Option<Tensor>> {
        match &self.penalty {
            Some((layers, gamma)) => Ok(Some((orthogonality_penalty(layers)? * *gamma)?)),
            None => Ok(None),
        }
    }

    /// Every hook, the allocator last (it reads the updated weights after the step).
    pub fn hooks_mut(&mut self) -> Vec<&mut dyn StepHook> {
        let mut out: Vec<&mut dyn StepHook> = self
            .hooks
            .iter_mut()
            .map(|h| h.as_mut() as &mut dyn StepHook)
            .collect();
        if let Some(a) = self.allocator.as_mut() {
            out.push(a);
        }
        out
    }
}

/// AdamW over every trainable variable of `set`: LoRA+'s groups for LoRA+, one group
/// otherwise.
pub(crate) fn optimizer(
    recipe: &AdapterRecipe,
    set: &AdaptedSet,
    config: &TrainConfig,
) -> Result<GroupedAdamW> {
    let params = ParamsAdamW {
        lr: config.lr,
        weight_decay: config.weight_decay,
        ..ParamsAdamW::default()
    };
    if recipe.variant == Variant::LoraPlus {
        let vars = set.trainable_vars().into_iter().map(|v| (v.layer, v.var));
        return LoraPlus::new(config.lr)
            .with_ratio(recipe.lora_plus_ratio)
            .with_weight_decay(config.weight_decay)
            .build(vars);
    }
    GroupedAdamW::new(vec![ParamGroup::new("default", set.vars())], params)
}

/// Every adapted layer is of the recipe's variant (LoRA+ trains LoRA layers), so a model
/// built with another plan is caught before training.
fn check_layers(variant: Variant, set: &AdaptedSet) -> Result<()> {
    let layers = set.layers();
    if layers.is_empty() && set.stacked_loras().is_empty() {
        return Err(Error::settings(
            "training",
            "adapters",
            "the model has no adapted layer: did the recipe's target_modules match none of its modules?",
        ));
    }
    let expected = match variant {
        Variant::LoraPlus => Variant::Lora,
        v => v,
    };
    for (path, layer) in &layers {
        let kind = layer.read().kind();
        if kind != expected {
            return Err(Error::settings(
                "training",
                "adapters",
                format!("layer `{path}` is a {kind} layer but the recipe trains {variant}: build the model with the recipe's plan"),
            ));
        }
    }
    Ok(())
}
