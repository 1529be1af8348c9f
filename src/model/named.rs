//! [`NamedAdapters`]: several adapters loaded onto one model under names, one active at a
//! time (PEFT's `load_adapter` / `set_adapter` / `disable_adapter` / `delete_adapter`).

use std::sync::{Arc, RwLock};

use crate::adapter::Adapter;
use crate::error::{Error, Result, Scope};
use crate::frozen::FrozenLinear;
use crate::model::adapted_set::AdaptedSet;
use crate::model::plan::{AdapterPlan, Linear, SlotRegistry};
use crate::model::slot::AdapterSlot;
use crate::shared::Shared;

#[derive(Debug, Default)]
struct State {
    /// Every module of the model, by path, in build order.
    slots: Vec<(String, Shared<AdapterSlot>)>,
    /// The loaded adapters, in load order, with their layers.
    adapters: Vec<(String, AdaptedSet)>,
    active: Option<String>,
    /// Module prefixes the model does not have ([`AdapterPlan::set_aside`] while it was
    /// built): each adapter's modules there are set aside too.
    aside: Vec<String>,
}

/// Several adapters on one model, each under a name, one active (PEFT's multi-adapter
/// `PeftModel`). Cloning shares the registry.
///
/// Build the model once with [`NamedAdapters::plan`]: every linear, Conv1D and embedding
/// becomes a slot over its frozen base. Then load adapters by name
/// ([`NamedAdapters::load_peft`] for a PEFT folder, [`NamedAdapters::add`] for any plan):
/// each keeps its own variant (a LoRA and a DoRA adapter side by side), builds its layers
/// over the model's shared base tensors (nothing copied), and may target other modules
/// than the rest; a module the active adapter does not target runs its base.
///
/// As in PEFT: the first adapter loaded becomes active; [`NamedAdapters::set_active`]
/// switches (unmerging first if merged); [`NamedAdapters::set_enabled`]`(false)` is
/// `disable_adapter()`; [`NamedAdapters::delete`] refuses a merged adapter and, when the
/// active one goes, activates the first remaining one.
///
/// Partial: norms' biases the model builds itself (PEFT's `bias = "all"` on a LayerNorm)
/// are read once when the model is built; an adapter loaded later that stores them is
/// refused (its unused tensors are reported by name).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lorakit::model::NamedAdapters;
/// use lorakit::models::llama::LlamaForCausalLM;
/// # fn main() -> lorakit::Result<()> {
/// let dir = "tests/fixtures/models/llama/qwen2";
/// let adapters = NamedAdapters::new();
/// let plan = adapters.plan();
/// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &Device::Cpu, &plan)?;
/// plan.finish()?;
/// adapters.load_peft("lora", format!("{dir}/lora"), &Device::Cpu)?;
/// adapters.load_peft("dora", format!("{dir}/dora"), &Device::Cpu)?;
/// assert_eq!(adapters.names(), ["lora", "dora"]);
/// assert_eq!(adapters.active().as_deref(), Some("lora"));
///
/// let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
/// let with_lora = model.forward(&ids)?;
/// adapters.set_active("dora")?;
/// let with_dora = model.forward(&ids)?;
/// adapters.set_enabled(false); // the base model
/// let base = model.forward(&ids)?;
/// adapters.set_enabled(true);
/// adapters.delete("dora")?;
/// assert_eq!(adapters.active().as_deref(), Some("lora"));
/// assert!(adapters.set_active("dora").is_err());
/// # let _ = (with_lora, with_dora, base);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct NamedAdapters(Arc<RwLock<State>>);

pub(crate) fn named_error(name: &str, reason: impl Into<String>) -> Error {
    Error::Usage {
        scope: Scope::Settings(format!("adapter `{name}`")),
        reason: reason.into(),
    }
}

impl NamedAdapters {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The plan to build the model with: every module becomes a slot registered here
    /// (no adapter yet: the model runs its base until one is loaded).
    pub fn plan(&self) -> AdapterPlan {
        AdapterPlan::none().with_slots(Arc::new(self.clone()))
    }

    /// The module paths of the model (every slot), in build order.
    pub fn paths(&self) -> Vec<String> {
        self.read().slots.iter().map(|(p, _)| p.clone()).collect()
    }

    /// The adapter names, in load order.
    pub fn names(&self) -> Vec<String> {
        self.read()
            .adapters
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The active adapter's name (`None` before the first load or after the last delete).
    pub fn active(&self) -> Option<String> {
        self.read().active.clone()
    }

    /// The layers of adapter `name` (to train, save or inspect it on its own).
    pub fn adapter(&self, name: &str) -> Option<AdaptedSet> {
        self.read()
            .adapters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
    }

    /// Adds the adapter `plan` describes (a loaded file's plan, or a fresh one to train)
    /// under `name`: each module it touches gets what the plan makes of it over the shared
    /// base; then [`AdapterPlan::finish`] checks it (for a file: every tensor used).
    /// Nothing changes on an error, which names the adapter (and the module, where one is
    /// at fault). The first adapter added becomes active.
    pub fn add(&self, name: &str, plan: &AdapterPlan) -> Result<AdaptedSet> {
        if name.is_empty() {
            return Err(named_error(name, "an adapter name must not be empty"));
        }
        let slots = {
            let state = self.read();
            if state.adapters.iter().any(|(n, _)| n == name) {
                return Err(named_error(
                    name,
                    "an adapter of this name is loaded already",
                ));
            }
            state.slots.clone()
        };
        if slots.is_empty() {
            return Err(named_error(
                name,
                "the model has no modules here: build it with NamedAdapters::plan()",
            ));
        }
        let aside = self.read().aside.clone();
        for prefix in &aside {
            plan.set_aside(prefix);
        }
        let mut built = Vec::new();
        for (path, slot) in &slots {
            let base = slot.read().original().clone();
            if !plan.touches(path, base.kind()) {
                continue;
            }
            let module = plan
                .adapt(path, base)
                .map_err(|e| named_error(name, e.to_string()))?;
            built.push((slot.clone(), module));
        }
        let set = plan
            .finish()
            .map_err(|e| named_error(name, e.to_string()))?;
        if built.is_empty() {
            return Err(named_error(
                name,
                "the adapter targets no module of the model",
            ));
        }
        let mut state = self.write();
        let first = state.adapters.is_empty();
        for (slot, module) in built {
            let mut slot = slot.write();
            slot.insert(name, module);
            if first {
                slot.set_active(Some(name));
            }
        }
        if first {
            state.active = Some(name.to_string());
        }
        state.adapters.push((name.to_string(), set.clone()));
        Ok(set)
    }

    /// Makes `name` the active adapter on every module (PEFT's `set_adapter`). A merged
    /// model is unmerged first, as PEFT does (PEFT also warns).
    pub fn set_active(&self, name: &str) -> Result<()> {
        let mut state = self.write();
        if !state.adapters.iter().any(|(n, _)| n == name) {
            let known = state
                .adapters
                .iter()
                .map(|(n, _)| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(named_error(
                name,
                format!("no adapter of this name is loaded (loaded: {known})"),
            ));
        }
        unmerge_slots(&state.slots)?;
        for (_, slot) in &state.slots {
            slot.write().set_active(Some(name));
        }
        state.active = Some(name.to_string());
        Ok(())
    }

    /// Removes adapter `name` and its layers (PEFT's `delete_adapter`). Refused while it is
    /// merged. If it was active, the first remaining adapter becomes active (none if it was
    /// the last), as in PEFT.
    pub fn delete(&self, name: &str) -> Result<()> {
        let mut state = self.write();
        let Some(index) = state.adapters.iter().position(|(n, _)| n == name) else {
            return Err(named_error(name, "no adapter of this name is loaded"));
        };
        let was_active = state.active.as_deref() == Some(name);
        if was_active && self_is_merged(&state.slots) {
            return Err(named_error(
                name,
                "cannot delete an adapter while it is merged; unmerge first",
            ));
        }
        state.adapters.remove(index);
        let next = if was_active {
            state.adapters.first().map(|(n, _)| n.clone())
        } else {
            state.active.clone()
        };
        for (_, slot) in &state.slots {
            let mut slot = slot.write();
            slot.remove(name);
            slot.set_active(next.as_deref());
        }
        state.active = next;
        Ok(())
    }

    /// Turns every adapter off (`false`: the base model, PEFT's `disable_adapter()`) or on.
    pub fn set_enabled(&self, enabled: bool) {
        for (_, slot) in &self.read().slots {
            slot.read().set_enabled(enabled);
        }
    }

    /// Sets training or evaluation mode on every module and adapter.
    pub fn set_training(&self, train: bool) {
        for (_, slot) in &self.read().slots {
            slot.read().set_training(train);
        }
    }

    /// Whether the active adapter is merged into the model.
    pub fn is_merged(&self) -> bool {
        self_is_merged(&self.read().slots)
    }

    /// Merges the active adapter into the model (PEFT's `merge_adapter()`); the other
    /// adapters keep the original base. On an error, what this call merged is unmerged.
    pub fn merge(&self, safe: bool) -> Result<()> {
        let state = self.read();
        let mut done: Vec<Shared<AdapterSlot>> = Vec::new();
        for (_, slot) in &state.slots {
            if slot.read().is_merged() {
                continue;
            }
            if let Err(e) = slot.write().merge(safe) {
                for s in done.iter().rev() {
                    s.write().unmerge()?;
                }
                return Err(e);
            }
            done.push(slot.clone());
        }
        Ok(())
    }

    /// Unmerges the active adapter.
    pub fn unmerge(&self) -> Result<()> {
        unmerge_slots(&self.read().slots)
    }
}

impl SlotRegistry for NamedAdapters {
    fn add_slot(&self, path: &str, base: FrozenLinear) -> Result<Linear> {
        let mut state = self.write();
        if state.slots.iter().any(|(p, _)| p == path) {
            return Err(Error::layer_config(
                path,
                "path",
                "this module was built twice",
            ));
        }
        let slot = Shared::new(AdapterSlot::new(path, base));
        state.slots.push((path.to_string(), slot.clone()));
        Ok(Linear::Adapted(slot.erase()))
    }

    fn set_aside(&self, prefix: &str) {
        let mut state = self.write();
        if !state.aside.iter().any(|p| p == prefix) {
            state.aside.push(prefix.to_string());
        }
    }
}

fn self_is_merged(slots: &[(String, Shared<AdapterSlot>)]) -> bool {
    slots.iter().any(|(_, s)| s.read().is_merged())
}

fn unmerge_slots(slots: &[(String, Shared<AdapterSlot>)]) -> Result<()> {
    for (_, slot) in slots {
        if slot.read().is_merged() {
            slot.write().unmerge()?;
        }
    }
    Ok(())
}
