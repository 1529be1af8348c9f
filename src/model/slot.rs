//! [`AdapterSlot`]: one module of a model built for [`NamedAdapters`]: the shared frozen
//! base and, per adapter name, what that adapter makes of the module; one entry active.
//!
//! [`NamedAdapters`]: crate::model::NamedAdapters

use std::any::Any;

use candle_core::Tensor;

use crate::adapter::{AdaptedBase, Adapter, ConfigEntry, NamedVar, Variant};
use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::model::plan::{frozen_forward, Linear};

/// A module with several named adapters over one frozen base (every entry's layer holds a
/// clone of the same base: the tensors are shared, not copied). Runs the active entry, or
/// the base where the active adapter does not touch the module (or none is active).
///
/// As an [`Adapter`] it answers for its active entry (kind, variables, ΔW); with no
/// active entry it reports [`Variant::Lora`] with no variables and a zero ΔW.
#[derive(Debug)]
pub(crate) struct AdapterSlot {
    core: AdaptedBase,
    entries: Vec<(String, Linear)>,
    active: Option<String>,
    /// The active entry's base while merged (ΔW folded in): what [`Adapter::base`] returns.
    merged_base: Option<FrozenLinear>,
}

impl AdapterSlot {
    pub(crate) fn new(path: &str, base: FrozenLinear) -> Self {
        Self {
            core: AdaptedBase::new(path, base),
            entries: Vec::new(),
            active: None,
            merged_base: None,
        }
    }

    /// The shared, unmerged base.
    pub(crate) fn original(&self) -> &FrozenLinear {
        self.core.base()
    }

    pub(crate) fn insert(&mut self, name: &str, module: Linear) {
        module_set_training(&module, self.core.is_training());
        self.entries.push((name.to_string(), module));
    }

    /// Removes `name`'s entry (the caller has checked it is not merged).
    pub(crate) fn remove(&mut self, name: &str) {
        self.entries.retain(|(n, _)| n != name);
    }

    /// Makes `name` active here (`None`: no adapter).
    pub(crate) fn set_active(&mut self, name: Option<&str>) {
        self.active = name.map(str::to_string);
    }

    fn active_entry(&self) -> Option<&Linear> {
        let name = self.active.as_deref()?;
        self.entries.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }

    fn active_layer(&self) -> Option<&crate::shared::Shared<dyn Adapter>> {
        self.active_entry().and_then(Linear::adapter)
    }
}

fn module_set_training(module: &Linear, train: bool) {
    if let Linear::Adapted(layer) = module {
        layer.read().set_training(train);
    }
}

impl Adapter for AdapterSlot {
    fn core(&self) -> &AdaptedBase {
        &self.core
    }

    fn core_mut(&mut self) -> &mut AdaptedBase {
        &mut self.core
    }

    fn kind(&self) -> Variant {
        self.active_layer()
            .map_or(Variant::Lora, |l| l.read().kind())
    }

    fn forward_adapted(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self.active_entry() {
            None => Ok(frozen_forward(self.core.base(), x)?),
            Some(Linear::Adapted(layer)) => layer.read().forward_t(x, train),
            Some(Linear::Trainable(module)) => module.forward_checked(x),
            Some(Linear::Frozen(base)) => base.forward_checked(self.core.name(), x),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.core.check_input(x)?;
        if !self.core.is_enabled() {
            if self.core.is_merged() {
                return Err(Error::MergedState {
                    layer: self.core.name().to_string(),
                    operation: "forward with the adapters disabled".to_string(),
                });
            }
            return Ok(frozen_forward(self.core.base(), x)?);
        }
        self.forward_adapted(x, train)
    }

    fn delta_weight(&self) -> Result<Tensor> {
        match self.active_layer() {
            Some(layer) => layer.read().delta_weight(),
            None => Ok(self.core.base().weight().zeros_like()?),
        }
    }

    fn delta_bias(&self) -> Result<Option<Tensor>> {
        match self.active_layer() {
            Some(layer) => layer.read().delta_bias(),
            None => Ok(None),
        }
    }

    fn own_vars(&self) -> Vec<NamedVar> {
        match self.active_entry() {
            Some(Linear::Adapted(layer)) => layer.read().trainable_vars(),
            Some(Linear::Trainable(module)) => module.trainable_vars(),
            Some(Linear::Frozen(_)) | None => Vec::new(),
        }
    }

    fn own_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        match self.active_layer() {
            Some(layer) => layer.read().tensors_to_save(),
            None => Ok(Vec::new()),
        }
    }

    fn rank_and_scale(&self) -> (usize, f64) {
        self.active_layer()
            .map_or((0, 0.0), |l| l.read().rank_and_scale())
    }

    fn model_tensors(&self) -> Vec<(String, Tensor)> {
        self.active_layer()
            .map_or_else(Vec::new, |l| l.read().model_tensors())
    }

    fn config_entries(&self) -> Vec<ConfigEntry> {
        self.active_layer()
            .map_or_else(Vec::new, |l| l.read().config_entries())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    fn base(&self) -> &FrozenLinear {
        self.merged_base.as_ref().unwrap_or(self.core.base())
    }

    /// Merges the active entry into its own copy of the base (the shared base and the other
    /// adapters' entries keep the original weight). A `modules_to_save` copy or a stored
    /// bias has nothing to fold in: the slot only records that it is merged.
    fn merge(&mut self, safe: bool) -> Result<()> {
        self.core.ensure_unmerged()?;
        if let Some(layer) = self.active_layer().cloned() {
            layer.write().merge(safe)?;
            self.merged_base = Some(layer.read().base().clone());
        }
        self.core.set_merged(true);
        Ok(())
    }

    fn unmerge(&mut self) -> Result<()> {
        self.core.ensure_merged()?;
        if let Some(layer) = self.active_layer().cloned() {
            layer.write().unmerge()?;
        }
        self.merged_base = None;
        self.core.set_merged(false);
        Ok(())
    }

    fn set_training(&self, train: bool) {
        self.core.set_training(train);
        for (_, module) in &self.entries {
            module_set_training(module, train);
        }
    }
}

crate::impl_module_for_adapter!(AdapterSlot);
