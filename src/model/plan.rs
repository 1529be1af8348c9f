//! [`AdapterPlan`]: which linear layers of a model get which adapter, and the drop-in
//! [`linear`] constructor that model code calls instead of `candle_nn::linear`.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::quantize::Quantize;
use crate::adapter::{Adapter, BASE_BIAS};
use crate::error::{Error, Result};
use crate::frozen::{BaseKind, FrozenLinear};
use crate::low_rank::trainable_var;
use crate::model::adapted_set::AdaptedSet;
use crate::model::parameter_targets::ParameterTargets;
use crate::model::stacked_lora::{StackedLora, StackedParameter};
use crate::model::target::{ModuleSettings, RankAlpha, TargetSpec};
use crate::model::trainable_base::{BiasMode, TrainableBase};
use crate::model::ParameterLora;
use crate::shared::Shared;
use crate::variants::{
    AdaLoraConfig, AdaLoraLinear, AdapterLayer, DeltaLoraConfig, DeltaLoraLinear, DoraConfig,
    DoraLinear, LoraConfig, LoraDropLayerConfig, LoraDropLinear, LoraFaConfig, LoraFaLinear,
    LoraLinear, VeraConfig, VeraLinear,
};

/// Builds the adapted layer for one targeted module: any variant plugs in here.
///
/// Implemented for closures `Fn(path, base, vb, settings)`. `vb` is the plan's adapter
/// VarBuilder at `path` (create trainable variables through it); `settings` is the
/// module's rank and alpha after PEFT's `rank_pattern` / `alpha_pattern`.
pub trait AdapterFactory: Send + Sync {
    /// The adapted layer at `path` over `base`.
    fn build(
        &self,
        path: &str,
        base: FrozenLinear,
        vb: VarBuilder<'static>,
        settings: ModuleSettings,
    ) -> Result<Shared<dyn Adapter>>;

    /// Whether the factory has an adapter for `path` at all (a loaded adapter file may not
    /// cover every module the rules select, e.g. under `all-linear`). Default: yes.
    fn covers(&self, _path: &str) -> bool {
        true
    }

    /// Called by [`AdapterPlan::finish`] once the model is built (a loaded adapter checks
    /// that every tensor of its file was used).
    fn finish(&self) -> Result<()> {
        Ok(())
    }

    /// Sets aside the adapter's modules under the module path `prefix`, which the model
    /// being built does not have (see [`AdapterPlan::set_aside`]): their tensors count as
    /// used and are not applied. Returns their module paths (default: none, as a fresh
    /// adapter stores nothing).
    fn set_aside(&self, _prefix: &str) -> Vec<String> {
        Vec::new()
    }

    /// A tensor the adapter stores for the base module at `path` (`<path>.<name>` in PEFT's
    /// file: a `modules_to_save` copy's `weight` / `bias`, a trained `base_layer.bias` or
    /// `bias`, the `base_layer.weight` copy PEFT saves for targeted embeddings), marked as
    /// used; `None` when there is none. Fresh adapters store nothing (the default).
    fn stored_tensor(&self, _path: &str, _name: &str) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether the adapter stores any tensor for the module at `path` (default: no).
    fn stores_for(&self, _path: &str) -> bool {
        false
    }

    /// The LoRA on each of the parameters `registered` of the module at `path` (named in
    /// the order the module registers them, which sets PEFT's nesting of their wrappers),
    /// for a loaded adapter with `target_parameters`; its tensors are marked used. Default:
    /// none (fresh adapters adapt modules only).
    fn parameter_lora(
        &self,
        _path: &str,
        registered: &[&str],
    ) -> Result<Vec<Option<ParameterLora>>> {
        Ok(vec![None; registered.len()])
    }
}

impl<F> AdapterFactory for F
where
    F: Fn(&str, FrozenLinear, VarBuilder<'static>, ModuleSettings) -> Result<Shared<dyn Adapter>>
        + Send
        + Sync,
{
    fn build(
        &self,
        path: &str,
        base: FrozenLinear,
        vb: VarBuilder<'static>,
        settings: ModuleSettings,
    ) -> Result<Shared<dyn Adapter>> {
        self(path, base, vb, settings)
    }
}

/// A plan for adapting a model: target rules, per-module rank/alpha, the factory that builds
/// each adapted layer, and the [`AdaptedSet`] where built layers are registered by path.
///
/// Cloning shares the factory and the set.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::model::{linear, AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
/// use lorakit::LoraConfig;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// // The base model's weights (normally from safetensors) and the adapter's variables.
/// let base_map = VarMap::new();
/// let base_vb = VarBuilder::from_varmap(&base_map, DType::F32, &dev);
/// let adapter_map = VarMap::new();
/// let plan = AdapterPlan::lora(
///     TargetSpec::new(ModuleSelector::list(["q_proj"])),
///     RankAlpha::new(4, 8.0),
///     LoraConfig::default(),
///     VarBuilder::from_varmap(&adapter_map, DType::F32, &dev),
/// );
/// let q = linear(16, 16, base_vb.pp("attn.q_proj"), &plan)?;
/// let o = linear(16, 16, base_vb.pp("attn.o_proj"), &plan)?;
/// assert!(q.adapter().is_some() && o.adapter().is_none());
/// let set = plan.finish()?;
/// assert_eq!(set.paths(), ["attn.q_proj"]);
/// let _y = o.forward(&q.forward(&Tensor::ones((2, 16), DType::F32, &dev)?)?)?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AdapterPlan {
    targets: TargetSpec,
    ranks: RankAlpha,
    bias: BiasMode,
    adapter_vb: VarBuilder<'static>,
    factory: Arc<dyn AdapterFactory>,
    set: AdaptedSet,
    /// Set by [`NamedAdapters::plan`](crate::model::NamedAdapters::plan): every module
    /// becomes a slot registered there.
    slots: Option<Arc<dyn SlotRegistry>>,
    quantize: Option<Quantize>,
    /// The stacked parameters fresh LoRAs adapt ([`AdapterPlan::with_parameter_targets`]).
    parameters: Option<ParameterTargets>,
    /// The adapter's modules under prefixes the model does not have
    /// ([`AdapterPlan::set_aside`]).
    aside: Arc<Mutex<Vec<String>>>,
}

/// Where a plan built for several named adapters registers each module (implemented by
/// [`NamedAdapters`](crate::model::NamedAdapters)).
pub(crate) trait SlotRegistry: Send + Sync {
    /// Registers the module at `path` over `base`; the module the model holds.
    fn add_slot(&self, path: &str, base: FrozenLinear) -> Result<Linear>;

    /// Records that the model has no modules under `prefix` ([`AdapterPlan::set_aside`]),
    /// for the adapters added later.
    fn set_aside(&self, prefix: &str);
}

/// Names under which PEFT's `ModulesToSaveWrapper` may save duplicates of a copy's tensors.
pub(crate) const COPY_WRAPPER_NAMES: [&str; 4] = [
    "modules_to_save.weight",
    "modules_to_save.bias",
    "original_module.weight",
    "original_module.bias",
];

/// What the plan makes of one module.
enum Prepared {
    Frozen(FrozenLinear),
    Trainable(TrainableBase),
    Adapted(Shared<dyn Adapter>),
}

/// A module's tensors after a merge, in the stored layout, f32: what a merged checkpoint
/// holds for it ([`AdapterPlan::merged_module`]).
#[derive(Clone, Debug)]
pub struct MergedModule {
    /// The weight (`(d_out, d_in)`, or `(d_in, d_out)` for Conv1D and embeddings).
    pub weight: Tensor,
    /// The bias, if the module has one.
    pub bias: Option<Tensor>,
}

impl std::fmt::Debug for AdapterPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterPlan")
            .field("targets", &self.targets)
            .field("ranks", &self.ranks)
            .field("adapted", &self.set.paths())
            .finish()
    }
}

impl AdapterPlan {
    /// A plan with any factory. Trainable variables are created through `adapter_vb`
    /// (normally over a `VarMap`), at each layer's path.
    pub fn new(
        targets: TargetSpec,
        ranks: RankAlpha,
        adapter_vb: VarBuilder<'static>,
        factory: impl AdapterFactory + 'static,
    ) -> Self {
        Self {
            targets,
            ranks,
            bias: BiasMode::None,
            adapter_vb,
            factory: Arc::new(factory),
            set: AdaptedSet::new(),
            slots: None,
            quantize: None,
            parameters: None,
            aside: Arc::default(),
        }
    }

    /// A plan that adapts nothing: the model-level API builds the plain base model
    /// (every module frozen).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::model::{linear, AdapterPlan, Linear};
    /// # fn main() -> lorakit::Result<()> {
    /// let base = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&base, DType::F32, &Device::Cpu);
    /// let plan = AdapterPlan::none();
    /// assert!(matches!(linear(4, 4, vb.pp("q_proj"), &plan)?, Linear::Frozen(_)));
    /// assert!(plan.finish()?.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn none() -> Self {
        let nothing = |path: &str,
                       _: FrozenLinear,
                       _: VarBuilder<'static>,
                       _: ModuleSettings|
         -> Result<Shared<dyn Adapter>> {
            Err(crate::Error::layer_config(
                path,
                "target_modules",
                "AdapterPlan::none() adapts nothing",
            ))
        };
        Self::new(
            TargetSpec::new(crate::model::ModuleSelector::List(Vec::new())),
            RankAlpha::new(1, 1.0),
            VarBuilder::zeros(DType::F32, &candle_core::Device::Cpu),
            nothing,
        )
    }

    /// This plan with every module built as a slot of `registry` (see
    /// [`NamedAdapters::plan`](crate::model::NamedAdapters::plan)).
    pub(crate) fn with_slots(mut self, registry: Arc<dyn SlotRegistry>) -> Self {
        self.slots = Some(registry);
        self
    }

    /// Which base biases train (PEFT's `bias`; default [`BiasMode::None`]).
    pub fn with_bias_mode(mut self, bias: BiasMode) -> Self {
        self.bias = bias;
        self
    }

    /// Which base biases train.
    pub fn bias_mode(&self) -> BiasMode {
        self.bias
    }

    /// Quantizes the frozen weights of the linear modules the model builds through this
    /// plan as they load (QLoRA-style training over a quantized base; see [`Quantize`] for
    /// which modules). Every model of [`crate::models`] takes it through its plan.
    ///
    /// ```
    /// use candle_core::{quantized::GgmlDType, DType, Device, Module, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::model::{linear_no_bias, AdapterPlan, ModuleSelector, Quantize, RankAlpha, TargetSpec};
    /// use lorakit::LoraConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let dev = Device::Cpu;
    /// let (base_map, adapter_map) = (VarMap::new(), VarMap::new());
    /// let base_vb = VarBuilder::from_varmap(&base_map, DType::F32, &dev);
    /// let plan = AdapterPlan::lora(
    ///     TargetSpec::new(ModuleSelector::list(["q_proj"])),
    ///     RankAlpha::new(4, 8.0),
    ///     LoraConfig::default(),
    ///     VarBuilder::from_varmap(&adapter_map, DType::F32, &dev),
    /// )
    /// .with_quantize(Quantize::new(GgmlDType::Q4K));
    /// let q = linear_no_bias(256, 256, base_vb.pp("layers.0.q_proj"), &plan)?;
    /// let o = linear_no_bias(256, 256, base_vb.pp("layers.0.o_proj"), &plan)?;
    /// let head = linear_no_bias(256, 10, base_vb.pp("lm_head"), &plan)?;
    /// assert!(q.adapter().unwrap().read().base().is_quantized()); // adapted, quantized
    /// assert!(matches!(&o, lorakit::model::Linear::Frozen(b) if b.is_quantized()));
    /// assert!(matches!(&head, lorakit::model::Linear::Frozen(b) if !b.is_quantized()));
    /// let y = o.forward(&q.forward(&Tensor::ones((2, 256), DType::F32, &dev)?)?)?;
    /// assert_eq!(y.dims(), [2, 256]);
    /// # Ok(()) }
    /// ```
    pub fn with_quantize(mut self, quantize: Quantize) -> Self {
        self.quantize = Some(quantize);
        self
    }

    /// The quantize-on-load settings, if any.
    pub fn quantize(&self) -> Option<&Quantize> {
        self.quantize.as_ref()
    }

    /// Trains fresh LoRAs on the stacked parameters `parameters` selects (see
    /// [`ParameterTargets`] and [`AdapterPlan::stacked_loras`]); [`AdapterPlan::lora`] sets
    /// it with no explicit names, and [`PeftConfig::fresh_plan`](crate::peft::PeftConfig::fresh_plan)
    /// with the config's `target_parameters`.
    pub fn with_parameter_targets(mut self, parameters: ParameterTargets) -> Self {
        self.parameters = Some(parameters);
        self
    }

    /// The stacked parameters fresh LoRAs adapt, if any.
    pub fn parameter_targets(&self) -> Option<&ParameterTargets> {
        self.parameters.as_ref()
    }

    /// The trainable LoRAs on the stacked parameters `params` of the module at `module`
    /// (`model.layers.0.mlp.experts`, in the order the module registers them), registered
    /// in the plan's set: fresh ones where the plan's [`ParameterTargets`] select them, or
    /// a loaded adapter's ([`AdapterFactory::parameter_lora`], made
    /// [`StackedLora::from_loaded`]); `None` for the others (and for every one under a
    /// fresh plan built for named adapters). The model builds each expert's layer with
    /// [`StackedLora::expert_layer`] over [`AdapterPlan::quantized_base`]. Parameters that
    /// PEFT's conversion reaches are recorded in the set
    /// ([`AdaptedSet::peft_converts_module_targets`]), adapted or not.
    pub fn stacked_loras(
        &self,
        module: &str,
        params: &[StackedParameter],
    ) -> Result<Vec<Option<Arc<StackedLora>>>> {
        if params.iter().any(|p| !p.converted_from.is_empty()) {
            self.set.record_converted_parameters();
        }
        let loras = match &self.parameters {
            Some(_) if self.slots.is_some() => return Ok(vec![None; params.len()]),
            Some(targets) => {
                targets.build(module, params, &self.targets, &self.ranks, &self.adapter_vb)?
            }
            None => {
                let names: Vec<&str> = params.iter().map(|p| p.name).collect();
                let loaded = self.factory.parameter_lora(module, &names)?;
                loaded
                    .iter()
                    .zip(params)
                    .map(|(lora, param)| match lora {
                        Some(lora) => Ok(Some(Arc::new(StackedLora::from_loaded(lora, param)?))),
                        None => Ok(None),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        for lora in loras.iter().flatten() {
            self.set.insert_stacked(lora.clone())?;
        }
        Ok(loras)
    }

    /// `base`, the module at `path`, quantized when the plan's quantize-on-load settings
    /// apply to it.
    pub fn quantized_base(&self, path: &str, base: FrozenLinear) -> Result<FrozenLinear> {
        match &self.quantize {
            Some(q) => q.apply(path, base),
            None => Ok(base),
        }
    }

    /// A plan that gives every target a fresh layer of type `L` (any variant's layer), built
    /// by `L::new(base, &config, vb)` with the module's rank and alpha applied to `config`
    /// ([`AdapterLayer::config_for_module`]).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::model::{linear, AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
    /// use lorakit::{Adapter, DoraConfig, DoraLinear, Variant};
    /// # fn main() -> lorakit::Result<()> {
    /// let dev = Device::Cpu;
    /// let (base_map, adapter_map) = (VarMap::new(), VarMap::new());
    /// let base_vb = VarBuilder::from_varmap(&base_map, DType::F32, &dev);
    /// let plan = AdapterPlan::of::<DoraLinear>(
    ///     TargetSpec::new(ModuleSelector::list(["q"])),
    ///     RankAlpha::new(4, 8.0),
    ///     DoraConfig::default(),
    ///     VarBuilder::from_varmap(&adapter_map, DType::F32, &dev),
    /// );
    /// let q = linear(8, 8, base_vb.pp("q"), &plan)?;
    /// assert_eq!(q.adapter().unwrap().read().kind(), Variant::Dora);
    /// # Ok(()) }
    /// ```
    pub fn of<L: AdapterLayer>(
        targets: TargetSpec,
        ranks: RankAlpha,
        config: L::Config,
        adapter_vb: VarBuilder<'static>,
    ) -> Self {
        let factory = move |_path: &str,
                            base: FrozenLinear,
                            vb: VarBuilder<'static>,
                            s: ModuleSettings|
              -> Result<Shared<dyn Adapter>> {
            let config = L::config_for_module(&config, s);
            if base.kind() == BaseKind::Embedding {
                return L::build_embedding(base, &config, vb);
            }
            Ok(Shared::new(L::build(base, &config, vb)?).erase())
        };
        Self::new(targets, ranks, adapter_vb, factory)
    }

    /// [`AdapterPlan::of`] with [`LoraLinear`] (also the layer LoRA+ trains), which also
    /// trains LoRAs on the stacked parameters of a mixture of experts where PEFT's LoRA
    /// does ([`ParameterTargets`]: on Mixtral, Qwen3-MoE and OLMoE, `all-linear` or the
    /// experts' and router's former module names adapt the experts and the router).
    pub fn lora(
        targets: TargetSpec,
        ranks: RankAlpha,
        config: LoraConfig,
        adapter_vb: VarBuilder<'static>,
    ) -> Self {
        let parameters = ParameterTargets::new(Vec::new(), config.clone());
        Self::of::<LoraLinear>(targets, ranks, config, adapter_vb)
            .with_parameter_targets(parameters)
    }

    /// [`AdapterPlan::of`] with [`LoraFaLinear`].
    pub fn lora_fa(
        targets: TargetSpec,
        ranks: RankAlpha,
        config: LoraFaConfig,
        adapter_vb: VarBuilder<'static>,
    ) -> Self {
        Self::of::<LoraFaLinear>(targets, ranks, config, adapter_vb)
    }

    /// [`AdapterPlan::of`] with [`LoraDropLinear`].
    pub fn lora_drop(
        targets: TargetSpec,
        ranks: RankAlpha,
        config: LoraDropLayerConfig,
        adapter_vb: VarBuilder<'static>,
    ) -> Self {
        Self::of::<LoraDropLinear>(targets, ranks, config, adapter_vb)
    }

    /// [`AdapterPlan::of`] with [`DeltaLoraLinear`].
    pub fn delta_lora(
        targets: TargetSpec,
        ranks: RankAlpha,
        config: DeltaLoraConfig,
        adapter_vb: VarBuilder<'static>,
    ) -> Self {
        Self::of::<DeltaLoraLinear>(targets, ranks, config, adapter_vb)
    }

    /// [`AdapterPlan::of`] with [`DoraLinear`].
    pub fn dora(
        targets: TargetSpec,
        ranks: RankAlpha,
        config: DoraConfig,
        adapter_vb: VarBuilder<'static>,
    ) -> Self {
        Self::of::<DoraLinear>(targets, ranks, config, adapter_vb)
    }

    /// [`AdapterPlan::of`] with [`AdaLoraLinear`]: every layer has the config's `init_r`;
    /// `ranks` gives per-module alphas.
    pub fn adalora(
        targets: TargetSpec,
        ranks: RankAlpha,
        config: AdaLoraConfig,
        adapter_vb: VarBuilder<'static>,
    ) -> Self {
        Self::of::<AdaLoraLinear>(targets, ranks, config, adapter_vb)
    }

    /// [`AdapterPlan::of`] with [`VeraLinear`]: every layer uses `config.shared`, whose rank
    /// is the plan's (VeRA has no alpha and no per-module rank). Size the pair for every
    /// target with [`crate::VeraShared::covering`].
    pub fn vera(targets: TargetSpec, config: VeraConfig, adapter_vb: VarBuilder<'static>) -> Self {
        let ranks = RankAlpha::new(config.shared.rank(), 1.0);
        Self::of::<VeraLinear>(targets, ranks, config, adapter_vb)
    }

    /// The target rules.
    pub fn targets(&self) -> &TargetSpec {
        &self.targets
    }

    /// The per-module rank and alpha rules.
    pub fn ranks(&self) -> &RankAlpha {
        &self.ranks
    }

    /// Whether the linear layer at `path` gets an adapter.
    pub fn is_target(&self, path: &str) -> bool {
        self.is_target_kind(path, BaseKind::Linear)
    }

    /// Whether the module at `path`, of `kind`, gets an adapter.
    pub fn is_target_kind(&self, path: &str, kind: BaseKind) -> bool {
        self.targets.is_target_kind(path, kind) && self.factory.covers(path)
    }

    /// Wraps `base` (the module at `path`): adapted if targeted; a trainable copy if it is
    /// one of the `modules_to_save`; with a trainable bias under [`BiasMode::All`]; frozen
    /// otherwise. Adapted layers and trainable modules are registered in the plan's set; a
    /// path built twice is an error.
    /// With quantize-on-load settings ([`AdapterPlan::with_quantize`]), the base is
    /// quantized first when they apply to it.
    pub fn adapt(&self, path: &str, base: FrozenLinear) -> Result<Linear> {
        let base = self.quantized_base(path, base)?;
        if let Some(slots) = &self.slots {
            return slots.add_slot(path, base);
        }
        match self.prepare(path, base, &self.adapter_vb.pp(path))? {
            Prepared::Frozen(base) => {
                self.set.record_frozen(base.num_params());
                Ok(Linear::Frozen(base))
            }
            Prepared::Trainable(module) => {
                let module = Arc::new(module);
                self.set.insert_trainable_base(path, module.clone())?;
                Ok(Linear::Trainable(module))
            }
            Prepared::Adapted(layer) => {
                self.set.insert(path, layer.clone())?;
                Ok(Linear::Adapted(layer))
            }
        }
    }

    /// A linear layer at `path` that no module adapter may target: a mixture-of-experts
    /// model's router and experts, which transformers 5 holds as parameters rather than
    /// linear modules, so PEFT's `target_modules` never reaches them (a LoRA on those
    /// parameters comes through [`AdapterPlan::stacked_loras`]). The plan's quantization
    /// applies to it (QLoRA on the experts, most of such a model's weights), and it counts
    /// as frozen; an adapter's tensors for it stay unused, so
    /// [`finish`](Self::finish) names them.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::frozen::FrozenLinear;
    /// use lorakit::model::{AdapterPlan, Linear, ModuleSelector, RankAlpha, TargetSpec};
    /// use lorakit::LoraConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let dev = Device::Cpu;
    /// let plan = AdapterPlan::lora(
    ///     TargetSpec::new(ModuleSelector::AllLinear),
    ///     RankAlpha::new(2, 4.0),
    ///     LoraConfig::default(),
    ///     VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
    /// );
    /// let w = Tensor::zeros((8, 4), DType::F32, &dev)?;
    /// let expert = plan.frozen_linear("mlp.experts.0.up_proj", FrozenLinear::new(w, None)?)?;
    /// assert!(matches!(expert, Linear::Frozen(_)));
    /// assert!(plan.finish()?.paths().is_empty()); // all-linear did not adapt it
    /// # Ok(()) }
    /// ```
    pub fn frozen_linear(&self, path: &str, base: FrozenLinear) -> Result<Linear> {
        let base = self.quantized_base(path, base)?;
        self.set.record_frozen(base.num_params());
        Ok(Linear::Frozen(base))
    }

    /// Decides what `path` becomes, creating trainable variables through `vb`.
    fn prepare(
        &self,
        path: &str,
        base: FrozenLinear,
        vb: &VarBuilder<'static>,
    ) -> Result<Prepared> {
        let base = match self.factory.stored_tensor(path, "base_layer.weight")? {
            Some(w) => base.with_stored_weight(path, &w)?,
            None => base,
        };
        if self.targets.is_module_to_save(path) {
            let own_suffix = self
                .targets
                .modules_to_save
                .iter()
                .any(|m| path.ends_with(m));
            if own_suffix && self.is_target_kind(path, base.kind()) {
                // PEFT matches modules_to_save by a plain suffix (DistilBERT's
                // `pre_classifier` ends with SEQ_CLS's "classifier") but keeps adapters
                // off them by a dotted rule, so both apply and PEFT refuses the model.
                // (A copy through an ancestor, PEFT wraps whole: the adapter inside it
                // is fine there.)
                return Err(Error::layer_config(
                    path,
                    "target_modules",
                    format!(
                        "`{path}` is both a target and, by PEFT's suffix rule, one of \
                         modules_to_save {:?}: PEFT 0.21 refuses such a model \
                         (\"modules_to_save cannot be applied to modules of type \
                         lora.Linear\"), so an adapter saved from it would not load there; \
                         leave it out of the targets (list them instead of all-linear)",
                        self.targets.modules_to_save
                    ),
                ));
            }
            // PEFT also saves the wrapper's own names for a copy's tensors under some
            // settings (`bias = "all"`): duplicates of the copy's and the original's.
            for name in COPY_WRAPPER_NAMES {
                self.factory.stored_tensor(path, name)?;
            }
            let weight = self.factory.stored_tensor(path, "weight")?;
            let bias = self.factory.stored_tensor(path, "bias")?;
            if weight.is_none() && bias.is_none() {
                return Ok(Prepared::Trainable(TrainableBase::copy(
                    path,
                    base,
                    vb.clone(),
                )?));
            }
            let weight = weight.map(|w| var_like(&w, &base)).transpose()?;
            let bias = bias.map(|b| var_like(&b, &base)).transpose()?;
            return Ok(Prepared::Trainable(TrainableBase::from_parts(
                path, base, weight, bias,
            )?));
        }
        if !self.is_target_kind(path, base.kind()) {
            let stored_bias = self.factory.stored_tensor(path, "bias")?;
            return Ok(match (self.bias, base.bias()) {
                (BiasMode::All, Some(b)) => {
                    let var = self.bias_var(stored_bias, b, vb, "bias")?;
                    Prepared::Trainable(TrainableBase::with_bias(path, base, var)?)
                }
                _ => match stored_bias {
                    Some(b) => Prepared::Frozen(base.with_frozen_bias(path, &b)?),
                    None => Prepared::Frozen(base),
                },
            });
        }
        let stored_bias = self.factory.stored_tensor(path, BASE_BIAS)?;
        let base = match (self.bias, base.bias()) {
            (BiasMode::LoraOnly | BiasMode::All, Some(b)) => {
                let var = self.bias_var(stored_bias, b, vb, BASE_BIAS)?;
                crate::validate::shape(path, BASE_BIAS, var.as_tensor(), b.dims())?;
                base.with_trainable_bias(&var)?
            }
            _ => match stored_bias {
                Some(b) => base.with_frozen_bias(path, &b)?,
                None => base,
            },
        };
        let settings = self.ranks.for_module(path);
        let layer = self.factory.build(path, base, vb.clone(), settings)?;
        Ok(Prepared::Adapted(layer))
    }

    /// A trainable bias: the adapter's stored value when it has one, else a variable
    /// `name` created through `vb` from the base's `current` bias.
    fn bias_var(
        &self,
        stored: Option<Tensor>,
        current: &Tensor,
        vb: &VarBuilder<'static>,
        name: &str,
    ) -> Result<Var> {
        match stored {
            Some(t) => {
                let t = t.to_dtype(current.dtype())?.to_device(current.device())?;
                Ok(Var::from_tensor(&t)?)
            }
            None => trainable_var(vb, name, current),
        }
    }

    /// The tensors of the module at `path` (of `kind`, its `weight` in the stored layout,
    /// and its `bias`) after PEFT's `merge_and_unload()`: the adapter merged in (each
    /// variant's own merge, in f32, `lora_B.bias` added to the bias), a `modules_to_save`
    /// copy or a trained bias in place of the original. `None` when the plan leaves the
    /// module as it is. The result is f32.
    ///
    /// Give `weight` in its checkpoint's dtype: the merge runs in f32 either way, but what
    /// PEFT's model loaded in that dtype holds rounded to it before merging is rounded to
    /// `weight`'s dtype first: a base weight the adapter replaces (PiSSA's and OLoRA's
    /// residual, a `base_layer.weight` in the adapter file) and the factors of an AdaLoRA
    /// module with a `rank_pattern` entry (PEFT copies them into tensors of the base's
    /// dtype when it resizes the module). Rounded to bf16, the result of a bf16 `weight`
    /// is then PEFT's bf16 merge (bit for bit on the fixtures of
    /// `tests/suite/checkpoint_merge.rs`, but for PiSSA entries that PEFT's `f32` SVD puts
    /// on the other side of a rounding boundary).
    ///
    /// Nothing is registered: the layer is built, merged and dropped, so a caller merging a
    /// model one module at a time (a streaming merge, a lazily merging `VarBuilder`) holds
    /// one layer at a time. The factory still records what it used, for
    /// [`AdapterPlan::finish`].
    pub fn merged_module(
        &self,
        path: &str,
        kind: BaseKind,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Option<MergedModule>> {
        if !self.touches(path, kind) {
            return Ok(None);
        }
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let base = FrozenLinear::from_stored(kind, f32(weight)?, bias.map(f32).transpose()?)?
            .kept_in(weight.dtype());
        let scratch = VarBuilder::from_varmap(&VarMap::new(), DType::F32, weight.device());
        let (weight, bias) = match self.prepare(path, base, &scratch)? {
            Prepared::Frozen(base) => (base.stored_weight()?, base.bias().cloned()),
            Prepared::Trainable(module) => (
                module.current_stored_weight()?,
                module.current_bias().cloned(),
            ),
            Prepared::Adapted(layer) => {
                let mut layer = layer.write();
                layer.merge(true)?;
                (layer.base().stored_weight()?, layer.base().bias().cloned())
            }
        };
        Ok(Some(MergedModule {
            weight: weight.detach(),
            bias: bias.map(|b| b.detach()),
        }))
    }

    /// The bias of a module the model code builds itself (a norm), given its base value:
    /// under [`BiasMode::All`] a trainable variable registered in the plan's set (saved as
    /// `<path>.bias`, as PEFT's `bias = "all"` trains every bias); the adapter's stored
    /// value when it has one (a loaded adapter); `base` otherwise.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::model::{AdapterPlan, BiasMode, ModuleSelector, RankAlpha, TargetSpec};
    /// use lorakit::LoraConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let dev = Device::Cpu;
    /// let vars = VarMap::new();
    /// let plan = AdapterPlan::lora(
    ///     TargetSpec::new(ModuleSelector::list(["query"])),
    ///     RankAlpha::new(4, 8.0),
    ///     LoraConfig::default(),
    ///     VarBuilder::from_varmap(&vars, DType::F32, &dev),
    /// )
    /// .with_bias_mode(BiasMode::All);
    /// let beta = plan.bias("encoder.LayerNorm", Tensor::zeros(16, DType::F32, &dev)?)?;
    /// let norm = candle_nn::LayerNorm::new(Tensor::ones(16, DType::F32, &dev)?, beta, 1e-12);
    /// assert_eq!(plan.finish()?.trainable_vars()[0].full_name(), "encoder.LayerNorm.bias");
    /// # let _ = norm;
    /// # Ok(()) }
    /// ```
    pub fn bias(&self, path: &str, base: Tensor) -> Result<Tensor> {
        let stored = self.factory.stored_tensor(path, "bias")?;
        if self.bias != BiasMode::All {
            return Ok(stored.unwrap_or(base));
        }
        let var = self.bias_var(stored, &base, &self.adapter_vb.pp(path), "bias")?;
        crate::validate::shape(path, "bias", var.as_tensor(), base.dims())?;
        let tensor = var.as_tensor().clone();
        self.set.insert_trainable_tensor(crate::model::ModelVar {
            layer: path.to_string(),
            var: crate::adapter::NamedVar {
                name: "bias".to_string(),
                role: crate::adapter::ParamRole::Vector,
                var,
            },
        })?;
        Ok(tensor)
    }

    /// A tensor the adapter stores for the base module at `path` (see
    /// [`AdapterFactory::stored_tensor`]), marked as used.
    pub fn stored_tensor(&self, path: &str, name: &str) -> Result<Option<Tensor>> {
        self.factory.stored_tensor(path, name)
    }

    /// The loaded adapter's LoRA on each of the parameters `registered` of the module at
    /// `path` (PEFT's `target_parameters`; see [`AdapterFactory::parameter_lora`]): a
    /// mixture-of-experts model runs them through [`AdapterPlan::stacked_loras`], and
    /// `lorakit merge` adds them to the checkpoint's per-expert tensors.
    pub fn parameter_lora(
        &self,
        path: &str,
        registered: &[&str],
    ) -> Result<Vec<Option<ParameterLora>>> {
        self.factory.parameter_lora(path, registered)
    }

    /// Whether the plan changes the module at `path` in a merge: an adapter targets it, it
    /// is one of the `modules_to_save`, or the adapter stores tensors for it.
    pub fn touches(&self, path: &str, kind: BaseKind) -> bool {
        self.is_target_kind(path, kind)
            || self.targets.is_module_to_save(path)
            || self.factory.stores_for(path)
    }

    /// [`AdapterPlan::merged_module`]'s weight, for a linear layer without a bias (kept for
    /// callers of the first API).
    pub fn merged_weight(&self, path: &str, weight: &Tensor) -> Result<Option<Tensor>> {
        Ok(self
            .merged_module(path, BaseKind::Linear, weight, None)?
            .map(|m| m.weight))
    }

    /// The set of layers adapted so far (shares the plan's registry).
    pub fn adapted(&self) -> AdaptedSet {
        self.set.clone()
    }

    /// Tells the plan that the model being built has no modules under the module path
    /// `prefix`, although its checkpoint does (an image-and-text checkpoint's vision tower
    /// when only the text decoder is built, as
    /// [`LlamaForCausalLM`](crate::models::llama::LlamaForCausalLM) builds Gemma 3's): a
    /// loaded adapter's modules there are neither applied nor counted as unused by
    /// [`finish`](Self::finish), and [`set_aside_modules`](Self::set_aside_modules) lists
    /// them.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::models::llama::LlamaForCausalLM;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// // Gemma 3 with a vision tower, and a PEFT LoRA on every linear layer of both.
    /// let dir = "tests/fixtures/models/llama/gemma3_mm";
    /// let plan = PeftAdapter::load(format!("{dir}/lora"), &Device::Cpu)?.plan()?;
    /// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &Device::Cpu, &plan)?;
    /// let layers = plan.finish()?; // the text decoder's layers; the rest set aside
    /// assert_eq!(layers.paths().len(), 14);
    /// assert!(plan.set_aside_modules().iter().all(|p| p.starts_with("model.vision_tower.")));
    /// assert_eq!(plan.set_aside_modules().len(), 9);
    /// # Ok(()) }
    /// ```
    pub fn set_aside(&self, prefix: &str) {
        if let Some(slots) = &self.slots {
            slots.set_aside(prefix);
        }
        let paths = self.factory.set_aside(prefix);
        self.aside
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(paths);
    }

    /// The adapter's module paths [`set_aside`](Self::set_aside) left out, in the order set
    /// aside.
    pub fn set_aside_modules(&self) -> Vec<String> {
        self.aside.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ends model building: runs the factory's final checks (for a loaded adapter, that
    /// every tensor in its file was used) and returns the adapted set. A fresh plan whose
    /// [`ParameterTargets`] name parameters (PEFT's `target_parameters`) that the model did
    /// not have is an error here, as in PEFT, rather than at save after training.
    pub fn finish(&self) -> Result<AdaptedSet> {
        self.factory.finish()?;
        let named = self.parameters.as_ref().filter(|p| !p.names.is_empty());
        if let Some(parameters) = named {
            if self.slots.is_none() && self.set.stacked_loras().is_empty() {
                return Err(crate::Error::settings(
                    "adapter plan",
                    "target_parameters",
                    format!(
                        "[{}] matched no parameter of the model: LoRA on parameters adapts a \
                         mixture of experts' experts and router (mixtral, qwen2_moe, \
                         qwen3_moe, olmoe, gpt_oss)",
                        parameters.names.join(", ")
                    ),
                ));
            }
        }
        Ok(self.set.clone())
    }
}

/// A module of a model built with a plan (a linear layer, a Conv1D or an embedding):
/// frozen, adapted, or trainable itself.
#[derive(Clone, Debug)]
pub enum Linear {
    /// Not targeted: the frozen base.
    Frozen(FrozenLinear),
    /// Targeted: the adapted layer, shared with the plan's [`AdaptedSet`].
    Adapted(Shared<dyn Adapter>),
    /// A `modules_to_save` copy, or a module whose bias trains (`bias = "all"`), shared with
    /// the plan's [`AdaptedSet`].
    Trainable(Arc<TrainableBase>),
}

/// An embedding built with a plan ([`embedding`]): the same three cases as a linear layer,
/// taking token ids.
pub type Embedding = Linear;

impl Linear {
    /// The adapted layer, if any.
    pub fn adapter(&self) -> Option<&Shared<dyn Adapter>> {
        match self {
            Linear::Adapted(a) => Some(a),
            Linear::Frozen(_) | Linear::Trainable(_) => None,
        }
    }

    /// The trainable module, if any.
    pub fn trainable(&self) -> Option<&TrainableBase> {
        match self {
            Linear::Trainable(m) => Some(m),
            Linear::Frozen(_) | Linear::Adapted(_) => None,
        }
    }

    /// The base module's stored weight as it stands now (an embedding's table `(vocab,
    /// dim)`): the frozen base, an adapter's base (merged into while the adapter is
    /// merged), or the original under a `modules_to_save` copy.
    pub(crate) fn base_stored_weight(&self) -> Result<Tensor> {
        match self {
            Linear::Frozen(base) => base.stored_weight(),
            Linear::Adapted(layer) => layer.read().base().stored_weight(),
            Linear::Trainable(module) => module.original().stored_weight(),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Frozen(f) => frozen_forward(f, x),
            Linear::Adapted(a) => a.forward(x),
            Linear::Trainable(m) => m.forward_checked(x).map_err(candle_core::Error::wrap),
        }
    }
}

/// A frozen layer's `x Wᵀ + b`. When a gradient flows through `x` on the CPU (a frozen
/// layer between adapters, an output head), the fused op runs it: its backward computes
/// `dx` only, where candle's matmul backward would also compute the frozen weight's
/// gradient (as many FLOPs again as the forward).
pub(crate) fn frozen_forward(f: &FrozenLinear, x: &Tensor) -> candle_core::Result<Tensor> {
    let fused = f.kind() != BaseKind::Embedding
        && x.track_op()
        && !f.weight().track_op()
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == f.dtype();
    if !fused {
        return f.forward(x);
    }
    let op = crate::kernels::Product {
        weight: f.weight_ref(),
        bias: f.bias(),
        low_rank: None,
        row_scale: None,
    };
    op.forward(x).map_err(candle_core::Error::wrap)
}

/// Drop-in for `candle_nn::linear`: loads `weight` and `bias` at `vb`'s path and returns
/// the layer the plan gives that path.
pub fn linear(d_in: usize, d_out: usize, vb: VarBuilder, plan: &AdapterPlan) -> Result<Linear> {
    linear_b(d_in, d_out, true, vb, plan)
}

/// Drop-in for `candle_nn::linear_no_bias`.
pub fn linear_no_bias(
    d_in: usize,
    d_out: usize,
    vb: VarBuilder,
    plan: &AdapterPlan,
) -> Result<Linear> {
    linear_b(d_in, d_out, false, vb, plan)
}

/// Drop-in for `candle_nn::linear_b`.
pub fn linear_b(
    d_in: usize,
    d_out: usize,
    bias: bool,
    vb: VarBuilder,
    plan: &AdapterPlan,
) -> Result<Linear> {
    let path = vb.prefix();
    let stored = match &plan.quantize {
        Some(q) => q.stored(&path, d_in, d_out)?,
        None => None,
    };
    let base = match stored {
        // Already quantized (e.g. a GGUF file's blocks): only the bias is read.
        Some(weight) => {
            let bias = bias.then(|| vb.get(d_out, "bias")).transpose()?;
            FrozenLinear::from_quantized(weight, bias, vb.dtype())?
        }
        None => FrozenLinear::from_var_builder(d_in, d_out, bias, vb)?,
    };
    plan.adapt(&path, base)
}

/// GPT-2's `Conv1D` (a linear layer whose `weight` is stored `(d_in, d_out)`, with a bias),
/// loaded at `vb`'s path; adapted as PEFT does with `fan_in_fan_out`, without a transposed
/// copy of the weight.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::model::{conv1d, AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
/// use lorakit::LoraConfig;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let (base_map, adapter_map) = (VarMap::new(), VarMap::new());
/// let base_vb = VarBuilder::from_varmap(&base_map, DType::F32, &dev);
/// let plan = AdapterPlan::lora(
///     TargetSpec::new(ModuleSelector::list(["c_attn"])),
///     RankAlpha::new(4, 8.0),
///     LoraConfig::default(),
///     VarBuilder::from_varmap(&adapter_map, DType::F32, &dev),
/// );
/// let c_attn = conv1d(16, 48, base_vb.pp("h.0.attn.c_attn"), &plan)?;
/// assert_eq!(base_map.data().lock().unwrap()["h.0.attn.c_attn.weight"].dims(), [16, 48]);
/// let y = c_attn.forward(&Tensor::ones((2, 16), DType::F32, &dev)?)?;
/// assert_eq!(y.dims(), [2, 48]);
/// # Ok(()) }
/// ```
pub fn conv1d(d_in: usize, d_out: usize, vb: VarBuilder, plan: &AdapterPlan) -> Result<Linear> {
    let path = vb.prefix();
    let base = FrozenLinear::conv1d_from_var_builder(d_in, d_out, true, vb)?;
    plan.adapt(&path, base)
}

/// Drop-in for `candle_nn::embedding`: loads the table `weight` `(vocab, dim)` at `vb`'s
/// path; the result takes token ids. Targeted embeddings get the plan's variant on
/// embeddings (LoRA: PEFT's `lora_embedding_A` / `lora_embedding_B`); `all-linear` never
/// targets one.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::model::{embedding, AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
/// use lorakit::LoraConfig;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let (base_map, adapter_map) = (VarMap::new(), VarMap::new());
/// let base_vb = VarBuilder::from_varmap(&base_map, DType::F32, &dev);
/// let plan = AdapterPlan::lora(
///     TargetSpec::new(ModuleSelector::list(["embed_tokens"])),
///     RankAlpha::new(4, 8.0),
///     LoraConfig::default(),
///     VarBuilder::from_varmap(&adapter_map, DType::F32, &dev),
/// );
/// let emb = embedding(100, 16, base_vb.pp("model.embed_tokens"), &plan)?;
/// assert!(emb.adapter().is_some());
/// let y = emb.forward(&Tensor::new(&[[1u32, 5, 99]], &dev)?)?;
/// assert_eq!(y.dims(), [1, 3, 16]);
/// # Ok(()) }
/// ```
pub fn embedding(
    vocab: usize,
    dim: usize,
    vb: VarBuilder,
    plan: &AdapterPlan,
) -> Result<Embedding> {
    let path = vb.prefix();
    let base = FrozenLinear::embedding_from_var_builder(vocab, dim, vb)?;
    plan.adapt(&path, base)
}

/// `t` as a trainable variable in `like`'s dtype and device.
fn var_like(t: &Tensor, like: &FrozenLinear) -> Result<Var> {
    Ok(Var::from_tensor(
        &t.to_dtype(like.dtype())?.to_device(like.device())?,
    )?)
}
