//! [`AdaptedSet`]: every adapted layer of a model, by path, with model-wide operations.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::adapter::{Adapter, NamedVar};
use crate::error::{Error, Result};
use crate::model::stacked_lora::StackedLora;
use crate::model::trainable_base::TrainableBase;
use crate::shared::Shared;

#[derive(Debug, Default)]
struct Inner {
    layers: RwLock<Vec<(String, Shared<dyn Adapter>)>>,
    trainable_bases: RwLock<Vec<(String, Arc<TrainableBase>)>>,
    trainable_tensors: RwLock<Vec<ModelVar>>,
    stacked: RwLock<Vec<Arc<StackedLora>>>,
    converted_parameters: AtomicBool,
    frozen_params: AtomicUsize,
}

/// The adapted layers of one model, in the order they were built. Cloning shares the set.
///
/// Built by an [`AdapterPlan`](crate::model::AdapterPlan) as the model code creates its
/// layers; also usable on its own with [`AdaptedSet::insert`].
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::model::AdaptedSet;
/// use lorakit::{FrozenLinear, LoraConfig, LoraLinear, Shared};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let set = AdaptedSet::new();
/// for name in ["a", "b"] {
///     let base = FrozenLinear::new(Tensor::zeros((8, 8), DType::F32, &dev)?, None)?;
///     let layer = LoraLinear::new(base, &LoraConfig::new(2, 2.0), vb.pp(name))?;
///     set.insert(name, Shared::new(layer).erase())?;
/// }
/// let counts = set.param_counts();
/// assert_eq!((counts.trainable, counts.total), (2 * 32, 2 * 32 + 2 * 64));
/// set.merge_all(true)?;
/// set.unmerge_all()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct AdaptedSet(Arc<Inner>);

/// Parameter counts of a model's linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCounts {
    /// Trainable scalars (shared variables counted once).
    pub trainable: usize,
    /// All scalars: frozen bases (adapted or not) plus trainable ones.
    pub total: usize,
}

impl ParamCounts {
    /// `100 · trainable / total` (0 for an empty model).
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        }
    }

    /// Adds parameters the plan never saw (embeddings, norms) to the total.
    pub fn with_other_params(self, other: usize) -> Self {
        Self {
            total: self.total + other,
            ..self
        }
    }
}

impl std::fmt::Display for ParamCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            self.trainable,
            self.total,
            self.percent()
        )
    }
}

/// A trainable variable with its full name (`<layer path>.<name>`) and role.
#[derive(Clone, Debug)]
pub struct ModelVar {
    /// The layer's path.
    pub layer: String,
    /// The variable, named relative to its layer.
    pub var: NamedVar,
}

impl ModelVar {
    /// `<layer path>.<name>`.
    pub fn full_name(&self) -> String {
        format!("{}.{}", self.layer, self.var.name)
    }
}

impl AdaptedSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `layer` at `path`. A path registered twice is an error.
    pub fn insert(&self, path: &str, layer: Shared<dyn Adapter>) -> Result<()> {
        let mut layers = self.0.layers.write().unwrap_or_else(|e| e.into_inner());
        if layers.iter().any(|(p, _)| p == path) {
            return Err(Error::layer_config(
                path.to_string(),
                "path",
                "this module was adapted twice".to_string(),
            ));
        }
        layers.push((path.to_string(), layer));
        Ok(())
    }

    /// Registers a base module whose own tensors train (a `modules_to_save` copy, a
    /// `bias = "all"` bias) at `path`. A path registered twice is an error.
    pub fn insert_trainable_base(&self, path: &str, module: Arc<TrainableBase>) -> Result<()> {
        let mut modules = self
            .0
            .trainable_bases
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if modules.iter().any(|(p, _)| p == path) || self.get(path).is_some() {
            return Err(Error::layer_config(
                path.to_string(),
                "path",
                "this module was built twice".to_string(),
            ));
        }
        modules.push((path.to_string(), module));
        Ok(())
    }

    /// Registers a trainable tensor of a module the model builds itself (a norm's bias
    /// under `bias = "all"`), saved as `<layer>.<name>`.
    pub fn insert_trainable_tensor(&self, var: ModelVar) -> Result<()> {
        let mut tensors = self
            .0
            .trainable_tensors
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if tensors.iter().any(|v| v.full_name() == var.full_name()) {
            return Err(Error::layer_config(
                var.layer.clone(),
                "path",
                format!("`{}` was registered twice", var.full_name()),
            ));
        }
        tensors.push(var);
        Ok(())
    }

    /// Registers a LoRA on a stacked parameter (a mixture of experts' experts or router);
    /// a parameter registered twice is an error.
    pub fn insert_stacked(&self, lora: Arc<StackedLora>) -> Result<()> {
        let mut stacked = self.0.stacked.write().unwrap_or_else(|e| e.into_inner());
        if stacked.iter().any(|l| l.key() == lora.key()) {
            return Err(Error::layer_config(
                lora.key().to_string(),
                "target_parameters",
                "this parameter was adapted twice".to_string(),
            ));
        }
        stacked.push(lora);
        Ok(())
    }

    /// The LoRAs on stacked parameters, in build order (they are not among
    /// [`AdaptedSet::layers`], which are the adapted modules).
    pub fn stacked_loras(&self) -> Vec<Arc<StackedLora>> {
        self.0
            .stacked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records that the model has parameters PEFT's conversion of `target_modules`
    /// reaches (a mixture of experts' experts and router on Mixtral, Qwen3-MoE, OLMoE).
    pub(crate) fn record_converted_parameters(&self) {
        self.0.converted_parameters.store(true, Ordering::Relaxed);
    }

    /// Whether the model has parameters that PEFT 0.21's conversion of `target_modules`
    /// reaches (the experts and router of Mixtral, Qwen3-MoE and OLMoE): PEFT reads
    /// `all-linear` on it as LoRA on those too, so an adapter saved with `all-linear` must
    /// name its modules instead when it does not adapt them.
    pub fn peft_converts_module_targets(&self) -> bool {
        self.0.converted_parameters.load(Ordering::Relaxed)
    }

    /// Every adapter layer: the adapted modules, then the experts' layers of the LoRAs on
    /// stacked parameters.
    fn every_layer(&self) -> Vec<Shared<dyn Adapter>> {
        let modules = self.layers().into_iter().map(|(_, l)| l);
        modules
            .chain(self.stacked_loras().iter().flat_map(|s| s.layers()))
            .collect()
    }

    /// The trainable tensors of modules the model builds itself, in build order.
    pub fn trainable_tensors(&self) -> Vec<ModelVar> {
        self.0
            .trainable_tensors
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The trainable base modules with their paths, in build order.
    pub fn trainable_bases(&self) -> Vec<(String, Arc<TrainableBase>)> {
        self.0
            .trainable_bases
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn record_frozen(&self, params: usize) {
        self.0.frozen_params.fetch_add(params, Ordering::Relaxed);
    }

    /// The layers with their paths, in build order.
    pub fn layers(&self) -> Vec<(String, Shared<dyn Adapter>)> {
        self.0
            .layers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The adapted paths, in build order.
    pub fn paths(&self) -> Vec<String> {
        self.layers().into_iter().map(|(p, _)| p).collect()
    }

    /// The layer at `path`.
    pub fn get(&self, path: &str) -> Option<Shared<dyn Adapter>> {
        self.layers()
            .into_iter()
            .find(|(p, _)| p == path)
            .map(|(_, l)| l)
    }

    /// Number of adapted modules (the LoRAs on stacked parameters are
    /// [`AdaptedSet::stacked_loras`]).
    pub fn len(&self) -> usize {
        self.0
            .layers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether no module is adapted (see [`AdaptedSet::len`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Merges every layer that is not merged yet (the experts' layers of LoRAs on stacked
    /// parameters too). On an error, the layers merged by this call are unmerged again
    /// before the error is returned.
    pub fn merge_all(&self, safe: bool) -> Result<()> {
        let mut done: Vec<Shared<dyn Adapter>> = Vec::new();
        for layer in self.every_layer() {
            if layer.read().is_merged() {
                continue;
            }
            let res = layer.write().merge(safe);
            if let Err(e) = res {
                for l in done.iter().rev() {
                    l.write().unmerge()?;
                }
                return Err(e);
            }
            done.push(layer);
        }
        Ok(())
    }

    /// Unmerges every merged layer.
    pub fn unmerge_all(&self) -> Result<()> {
        for layer in self.every_layer() {
            if layer.read().is_merged() {
                layer.write().unmerge()?;
            }
        }
        Ok(())
    }

    /// Enables or disables every adapter (disabled layers output the base alone).
    pub fn set_enabled(&self, enabled: bool) {
        for layer in self.every_layer() {
            layer.read().set_enabled(enabled);
        }
        for (_, module) in self.trainable_bases() {
            module.set_enabled(enabled);
        }
    }

    /// Sets the mode `Module::forward` runs in for every layer.
    pub fn set_training(&self, train: bool) {
        for layer in self.every_layer() {
            layer.read().set_training(train);
        }
    }

    /// Every trainable variable with its layer path and role (the adapted layers', the
    /// trainable base modules', the model's own trainable tensors, then the LoRAs on
    /// stacked parameters', under their PEFT module paths); a variable shared by several
    /// layers is listed once (under the first).
    pub fn trainable_vars(&self) -> Vec<ModelVar> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let adapted = self
            .layers()
            .into_iter()
            .map(|(path, layer)| (path, layer.read().trainable_vars()));
        let bases = self
            .trainable_bases()
            .into_iter()
            .map(|(path, module)| (path, module.trainable_vars()));
        let tensors = self
            .trainable_tensors()
            .into_iter()
            .map(|v| (v.layer, vec![v.var]));
        let stacked = self
            .stacked_loras()
            .into_iter()
            .map(|s| (s.wrapper_path().to_string(), s.named_vars()));
        for (path, vars) in adapted.chain(bases).chain(tensors).chain(stacked) {
            for var in vars {
                if seen.insert(var.var.as_tensor().id()) {
                    out.push(ModelVar {
                        layer: path.clone(),
                        var,
                    });
                }
            }
        }
        out
    }

    /// The trainable variables alone (for an optimizer).
    pub fn vars(&self) -> Vec<candle_core::Var> {
        self.trainable_vars()
            .into_iter()
            .map(|v| v.var.var)
            .collect()
    }

    /// Trainable and total parameter counts over the linear layers the plan built.
    pub fn param_counts(&self) -> ParamCounts {
        let trainable: usize = self
            .trainable_vars()
            .iter()
            .map(|v| v.var.var.as_tensor().elem_count())
            .sum();
        let bases: usize = self
            .layers()
            .iter()
            .map(|(_, l)| l.read().num_base_params())
            .chain(
                self.trainable_bases()
                    .iter()
                    .map(|(_, m)| m.original().num_params()),
            )
            .chain(self.stacked_loras().iter().map(|s| s.num_base_params()))
            .sum();
        ParamCounts {
            trainable,
            total: trainable + bases + self.0.frozen_params.load(Ordering::Relaxed),
        }
    }
}
