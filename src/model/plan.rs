//! [`AdapterPlan`]: which linear layers of a model get which adapter, and the drop-in
//! [`linear`] constructor that model code calls instead of `candle_nn::linear`.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::adapter::Adapter;
use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::model::adapted_set::AdaptedSet;
use crate::model::target::{ModuleSettings, RankAlpha, TargetSpec};
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
    adapter_vb: VarBuilder<'static>,
    factory: Arc<dyn AdapterFactory>,
    set: AdaptedSet,
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
            adapter_vb,
            factory: Arc::new(factory),
            set: AdaptedSet::new(),
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
            Ok(Shared::new(L::build(base, &config, vb)?).erase())
        };
        Self::new(targets, ranks, adapter_vb, factory)
    }

    /// [`AdapterPlan::of`] with [`LoraLinear`] (also the layer LoRA+ trains).
    pub fn lora(
        targets: TargetSpec,
        ranks: RankAlpha,
        config: LoraConfig,
        adapter_vb: VarBuilder<'static>,
    ) -> Self {
        Self::of::<LoraLinear>(targets, ranks, config, adapter_vb)
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

    /// Whether the module at `path` gets an adapter.
    pub fn is_target(&self, path: &str) -> bool {
        self.targets.is_target(path) && self.factory.covers(path)
    }

    /// Wraps `base` (the module at `path`): adapted if targeted, frozen otherwise. Adapted
    /// layers are registered in the plan's set; a path adapted twice is an error.
    pub fn adapt(&self, path: &str, base: FrozenLinear) -> Result<Linear> {
        if !self.is_target(path) {
            self.set.record_frozen(base.num_params());
            return Ok(Linear::Frozen(base));
        }
        let layer = self.build(path, base)?;
        self.set.insert(path, layer.clone())?;
        Ok(Linear::Adapted(layer))
    }

    /// Builds the adapter for the targeted module `path` around `base`, unregistered.
    fn build(&self, path: &str, base: FrozenLinear) -> Result<Shared<dyn Adapter>> {
        let settings = self.ranks.for_module(path);
        self.factory
            .build(path, base, self.adapter_vb.pp(path), settings)
    }

    /// The weight `weight` of the module at `path` with the plan's adapter merged in, as
    /// PEFT's `merge_and_unload()` computes it, in f32 (cast it to the dtype you store), or
    /// `None` when `path` is not a target. The layer is built, merged and dropped: it is not
    /// added to the plan's set, so a caller merging a model one weight at a time (a streaming
    /// merge, a lazily merging `VarBuilder`) holds one layer at a time. The factory still
    /// records what it used, for [`AdapterPlan::finish`].
    pub fn merged_weight(&self, path: &str, weight: &Tensor) -> Result<Option<Tensor>> {
        if !self.is_target(path) {
            return Ok(None);
        }
        let frozen = FrozenLinear::new(weight.to_dtype(DType::F32)?, None)?;
        let layer = self.build(path, frozen)?;
        let mut layer = layer.write();
        layer.merge(true)?;
        Ok(Some(layer.base().weight().clone()))
    }

    /// The set of layers adapted so far (shares the plan's registry).
    pub fn adapted(&self) -> AdaptedSet {
        self.set.clone()
    }

    /// Ends model building: runs the factory's final checks (for a loaded adapter, that
    /// every tensor in its file was used) and returns the adapted set.
    pub fn finish(&self) -> Result<AdaptedSet> {
        self.factory.finish()?;
        Ok(self.set.clone())
    }
}

/// A linear layer of a model built with a plan: frozen, or adapted.
#[derive(Clone, Debug)]
pub enum Linear {
    /// Not targeted: the frozen base.
    Frozen(FrozenLinear),
    /// Targeted: the adapted layer, shared with the plan's [`AdaptedSet`].
    Adapted(Shared<dyn Adapter>),
}

impl Linear {
    /// The adapted layer, if any.
    pub fn adapter(&self) -> Option<&Shared<dyn Adapter>> {
        match self {
            Linear::Adapted(a) => Some(a),
            Linear::Frozen(_) => None,
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Frozen(f) => f.forward(x),
            Linear::Adapted(a) => a.forward(x),
        }
    }
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
    let base = FrozenLinear::from_var_builder(d_in, d_out, bias, vb)?;
    plan.adapt(&path, base)
}
