//! The [`Adapter`] trait every variant implements, and [`AdaptedBase`], the state they share
//! (the frozen base, merge state, train/eval mode, enable switch).

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;

/// The eight methods lorakit implements.
///
/// A layer's [`Adapter::kind`] is the variant whose layer it is. LoRA+ differs from LoRA only
/// in its optimizer (see [`crate::train::LoraPlus`]), so its layers are LoRA layers and
/// report [`Variant::Lora`]; every other variant has a layer type of its own.
///
/// ```
/// use lorakit::Variant;
/// let v: Variant = "lora-fa".parse()?;
/// assert_eq!(v, Variant::LoraFa);
/// assert_eq!(v.to_string(), "LoRA-FA");
/// assert_eq!(Variant::LoraPlus.layer(), Variant::Lora);
/// assert_eq!(Variant::ALL.len(), 8);
/// # Ok::<(), lorakit::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    /// LoRA: `y = x Wᵀ + s · (x Aᵀ) Bᵀ` with trainable A and B.
    Lora,
    /// LoRA+: LoRA layers, B trained at a larger learning rate.
    LoraPlus,
    /// VeRA: a shared frozen random pair, trainable scaling vectors.
    Vera,
    /// LoRA-FA: LoRA with A frozen at its random init.
    LoraFa,
    /// LoRA-drop: LoRA whose least important layers share one pair after a calibration stage.
    LoraDrop,
    /// AdaLoRA: SVD-form LoRA with rank allocation.
    AdaLora,
    /// DoRA: weight-decomposed LoRA with a trainable magnitude.
    Dora,
    /// Delta-LoRA: LoRA without dropout whose frozen weight follows Δ(BA) after each step.
    DeltaLora,
}

impl Variant {
    /// Every variant, in the README's order.
    pub const ALL: [Variant; 8] = [
        Variant::Lora,
        Variant::LoraPlus,
        Variant::Vera,
        Variant::LoraFa,
        Variant::LoraDrop,
        Variant::AdaLora,
        Variant::Dora,
        Variant::DeltaLora,
    ];

    /// The usual written name (`"LoRA+"`, `"Delta-LoRA"`, …).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Lora => "LoRA",
            Variant::LoraPlus => "LoRA+",
            Variant::Vera => "VeRA",
            Variant::LoraFa => "LoRA-FA",
            Variant::LoraDrop => "LoRA-drop",
            Variant::AdaLora => "AdaLoRA",
            Variant::Dora => "DoRA",
            Variant::DeltaLora => "Delta-LoRA",
        }
    }

    /// A lower-case identifier for command lines and file names (`"lora-plus"`,
    /// `"delta-lora"`, …).
    pub fn id(self) -> &'static str {
        match self {
            Variant::Lora => "lora",
            Variant::LoraPlus => "lora-plus",
            Variant::Vera => "vera",
            Variant::LoraFa => "lora-fa",
            Variant::LoraDrop => "lora-drop",
            Variant::AdaLora => "adalora",
            Variant::Dora => "dora",
            Variant::DeltaLora => "delta-lora",
        }
    }

    /// The variant whose layer this one trains: LoRA for LoRA+, itself otherwise.
    pub fn layer(self) -> Variant {
        match self {
            Variant::LoraPlus => Variant::Lora,
            v => v,
        }
    }

    /// The variant a PEFT adapter file stores this one's layers as: itself for LoRA, DoRA,
    /// VeRA and AdaLoRA; LoRA for the variants PEFT has no format for (LoRA+, LoRA-FA,
    /// LoRA-drop, Delta-LoRA), whose files hold LoRA's tensors.
    pub fn saved_as(self) -> Variant {
        match self {
            Variant::Dora | Variant::Vera | Variant::AdaLora => self,
            _ => Variant::Lora,
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Variant {
    type Err = Error;

    /// Parses an [`Variant::id`] or a [`Variant::name`], ignoring case.
    fn from_str(s: &str) -> Result<Self> {
        Variant::ALL
            .into_iter()
            .find(|v| v.id().eq_ignore_ascii_case(s) || v.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::Unsupported {
                what: "variant",
                got: s.to_string(),
                supported: Variant::ALL.map(Variant::id).join(", "),
            })
    }
}

/// What a trainable tensor is, so optimizers can group parameters (LoRA+).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamRole {
    /// The down projection `A` (`r × d_in`) or its equivalent.
    LowRankA,
    /// The up projection `B` (`d_out × r`) or its equivalent.
    LowRankB,
    /// A 1-D trainable: DoRA magnitude, VeRA λ vectors, AdaLoRA's E, biases.
    Vector,
    /// An embedding adapter's matrices (LoRA+ gives them a fixed small learning rate).
    Embedding,
    /// Anything else.
    Other,
}

/// A trainable variable with its name (relative to the layer, PEFT's naming) and role.
#[derive(Clone, Debug)]
pub struct NamedVar {
    /// Name relative to the layer, e.g. `lora_A`.
    pub name: String,
    /// Role for parameter grouping.
    pub role: ParamRole,
    /// The variable itself (cloning a `Var` shares its storage).
    pub var: Var,
}

/// One adapted linear layer.
///
/// Object-safe: models hold `Box<dyn Adapter>` or a concrete type. Layers also implement
/// candle's `Module`, which runs in the mode set by [`Adapter::set_training`] (evaluation by
/// default, like PyTorch's `model.eval()`), so they replace `candle_nn::Linear` in model code
/// unchanged. [`Adapter::forward_t`] takes the mode explicitly.
///
/// **`apply_t` does not set the mode.** candle implements `ModuleT` for every `Module`, and
/// that blanket `ModuleT::forward_t(x, train)` ignores `train`: `x.apply_t(&layer, true)`
/// runs in the layer's stored mode (evaluation unless [`Adapter::set_training`] was
/// called). Call [`Adapter::forward_t`] (or `set_training(true)` then `forward`) for a
/// training forward with dropout.
///
/// Implementors provide the adapted forward, ΔW, and their tensors; the trait's provided
/// methods handle validation, merged/disabled layers and additive merging from
/// [`AdaptedBase`].
pub trait Adapter: Send + Sync + std::fmt::Debug {
    /// The shared layer state.
    fn core(&self) -> &AdaptedBase;
    /// The shared layer state, mutably.
    fn core_mut(&mut self) -> &mut AdaptedBase;
    /// Which variant's layer this is (never [`Variant::LoraPlus`], whose layers are LoRA's).
    fn kind(&self) -> Variant;
    /// The adapted forward for an unmerged, enabled layer; `x` has already been validated.
    fn forward_adapted(&self, x: &Tensor, train: bool) -> Result<Tensor>;
    /// ΔW in the base layout `(d_out, d_in)` and dtype: what merging adds to `W`.
    fn delta_weight(&self) -> Result<Tensor>;
    /// The adapter's own trainable variables, named relative to the layer, with roles (a
    /// trainable base bias is added by [`Adapter::trainable_vars`]).
    fn own_vars(&self) -> Vec<NamedVar>;
    /// The adapter's own tensors to save, named relative to the layer with PEFT's suffixes
    /// (e.g. `lora_A.weight`; a trainable base bias is added by [`Adapter::tensors_to_save`]).
    fn own_tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// The rank and scale an adapter config must give this layer's module to describe it
    /// (checked before saving: a config that disagrees would load something else).
    fn rank_and_scale(&self) -> (usize, f64);
    /// Downcasting, for training rules that need a concrete variant.
    fn as_any(&self) -> &dyn Any;
    /// Mutable downcasting.
    fn as_any_mut(&mut self) -> &mut dyn Any;

    /// What merging adds to the base bias, `(d_out,)`: `s · lora_B.bias` for a LoRA layer
    /// with `lora_bias`; `None` for every other layer.
    fn delta_bias(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Every trainable variable: [`Adapter::own_vars`], plus the base bias as
    /// `base_layer.bias` when it was made trainable (PEFT's `bias = "lora_only"` / `"all"`).
    fn trainable_vars(&self) -> Vec<NamedVar> {
        let mut vars = self.own_vars();
        if let Some(var) = self.base().trainable_bias() {
            vars.push(NamedVar {
                name: BASE_BIAS.to_string(),
                role: ParamRole::Vector,
                var,
            });
        }
        vars
    }

    /// Every tensor to save under PEFT's suffixes: [`Adapter::own_tensors`], plus a
    /// trainable base bias as `base_layer.bias`.
    fn tensors_to_save(&self) -> Result<Vec<(String, Tensor)>> {
        let mut tensors = self.own_tensors()?;
        if let Some(var) = self.base().trainable_bias() {
            tensors.push((BASE_BIAS.to_string(), var.as_tensor().clone()));
        }
        Ok(tensors)
    }

    /// Tensors the layer uses that belong to the whole model rather than to it, named
    /// relative to the model (VeRA's shared pair: `vera_A`, `vera_B`). Layers that share
    /// such a tensor return the same tensor under the same name; a saved file holds it once.
    fn model_tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// What this layer adds to its adapter's `adapter_config.json` on save, beyond the
    /// settings its config already has (AdaLoRA's kept ranks in `rank_pattern`).
    fn config_entries(&self) -> Vec<ConfigEntry> {
        Vec::new()
    }

    /// The layer's name (its module path).
    fn name(&self) -> &str {
        self.core().name()
    }

    /// The frozen base layer (with ΔW folded in while merged).
    fn base(&self) -> &FrozenLinear {
        self.core().base()
    }

    /// Forward in training (`train = true`: dropout active) or evaluation mode.
    ///
    /// While merged, or while the adapter is disabled, this is the base layer's forward.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let core = self.core();
        core.check_input(x)?;
        if core.is_merged() {
            if !core.is_enabled() {
                return Err(Error::MergedState {
                    layer: core.name().to_string(),
                    operation: "forward with the adapter disabled".to_string(),
                });
            }
            return core.base().forward_checked(core.name(), x);
        }
        if !core.is_enabled() {
            return core.base().forward_checked(core.name(), x);
        }
        self.forward_adapted(x, train)
    }

    /// Whether ΔW is currently folded into the base weight.
    fn is_merged(&self) -> bool {
        self.core().is_merged()
    }

    /// Folds ΔW into the base weight. With `safe`, a non-finite merged weight is an error
    /// and leaves the weight untouched.
    fn merge(&mut self, safe: bool) -> Result<()> {
        self.core().ensure_unmerged()?;
        let delta_bias = self.delta_bias()?;
        if delta_bias.is_some() && self.base().bias().is_none() {
            // Checked before the weight changes, so a failed merge changes nothing.
            return Err(crate::frozen::no_bias_to_merge(self.name()));
        }
        let delta = self.delta_weight()?;
        self.core_mut().add_delta(&delta, safe)?;
        if let Some(db) = delta_bias {
            self.core_mut().add_bias_delta(&db)?;
        }
        self.core_mut().set_merged(true);
        Ok(())
    }

    /// Removes ΔW (and the bias delta) from the base.
    fn unmerge(&mut self) -> Result<()> {
        self.core().ensure_merged()?;
        let delta = self.delta_weight()?;
        self.core_mut().add_delta(&delta.neg()?, false)?;
        if let Some(db) = self.delta_bias()? {
            self.core_mut().add_bias_delta(&db.neg()?)?;
        }
        self.core_mut().set_merged(false);
        Ok(())
    }

    /// Number of trainable scalars of this layer. A variable shared with other layers
    /// (LoRA-drop's shared pairs) counts in each of them; [`crate::model::AdaptedSet`]'s
    /// counts and [`crate::train::LoraDrop`] count it once.
    fn num_trainable_params(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|v| v.var.as_tensor().elem_count())
            .sum()
    }

    /// Number of scalars in the frozen base (weight and bias).
    fn num_base_params(&self) -> usize {
        self.base().num_params()
    }

    /// Sets the mode `Module::forward` runs in (dropout only in training).
    fn set_training(&self, train: bool) {
        self.core().set_training(train)
    }

    /// Enables or disables the adapter; disabled layers output the base alone.
    fn set_enabled(&self, enabled: bool) {
        self.core().set_enabled(enabled)
    }
}

/// The name a trainable base bias has in PEFT's files and among a layer's variables.
pub const BASE_BIAS: &str = "base_layer.bias";

/// A per-layer entry of an adapter config: `config[field][key] = value` (e.g. AdaLoRA's
/// `rank_pattern["<path>.lora_E"] = [true, false, …]`), or with `key: None` a top-level
/// `config[field] = value` (VeRA's `save_projection`).
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigEntry {
    /// The top-level config key.
    pub field: &'static str,
    /// The key inside that object, or `None` for a top-level value.
    pub key: Option<String>,
    /// The value.
    pub value: serde_json::Value,
}

/// State every adapted layer has: its name, the frozen base, whether ΔW is merged, the
/// mode `Module::forward` runs in, and whether the adapter is enabled.
#[derive(Debug)]
pub struct AdaptedBase {
    name: String,
    base: FrozenLinear,
    merged: bool,
    training: AtomicBool,
    enabled: AtomicBool,
}

impl AdaptedBase {
    /// A fresh, unmerged, enabled layer state in evaluation mode.
    pub fn new(name: impl Into<String>, base: FrozenLinear) -> Self {
        Self {
            name: name.into(),
            base,
            merged: false,
            training: AtomicBool::new(false),
            enabled: AtomicBool::new(true),
        }
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The frozen base.
    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }

    /// Whether ΔW is merged into the base weight.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// Whether `Module::forward` runs in training mode.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Whether the adapter contributes to the output.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub(crate) fn set_training(&self, train: bool) {
        self.training.store(train, Ordering::Relaxed)
    }

    pub(crate) fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed)
    }

    pub(crate) fn set_merged(&mut self, merged: bool) {
        self.merged = merged
    }

    /// Checks a forward input against the base: last dim, dtype, device (token ids for an
    /// embedding).
    pub fn check_input(&self, x: &Tensor) -> Result<()> {
        self.base.check_input(&self.name, x)
    }

    /// Error unless unmerged.
    pub fn ensure_unmerged(&self) -> Result<()> {
        if self.merged {
            return Err(Error::AlreadyMerged {
                layer: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Error unless merged.
    pub fn ensure_merged(&self) -> Result<()> {
        if !self.merged {
            return Err(Error::NotMerged {
                layer: self.name.clone(),
            });
        }
        Ok(())
    }

    /// `W ← W + delta`; with `safe`, refuses (leaving W untouched) if the result is not finite.
    /// A quantized `W` is dequantized first: the base becomes a float weight.
    pub(crate) fn add_delta(&mut self, delta: &Tensor, safe: bool) -> Result<()> {
        let w = self.base.dequantized_weight()?;
        let merged = (&w + delta.to_dtype(w.dtype())?)?;
        if safe {
            let count = count_non_finite(&merged)?;
            if count > 0 {
                return Err(Error::NonFiniteMerge {
                    layer: self.name.clone(),
                    count,
                });
            }
        }
        self.replace_weight(merged)
    }

    /// `b ← b + delta` (a merged `lora_B.bias`); an error naming the layer if it has no bias.
    pub(crate) fn add_bias_delta(&mut self, delta: &Tensor) -> Result<()> {
        self.base.add_to_bias(&self.name, delta)
    }

    /// Replaces the base weight (same shape, dtype, device).
    pub(crate) fn replace_weight(&mut self, weight: Tensor) -> Result<()> {
        self.base.replace_weight(&self.name, weight)
    }
}

/// Number of NaN or ±inf entries, on any device: finite values are exactly those with
/// `|x| ≤` the largest finite value of the dtype they are compared in (NaN compares false,
/// ±inf is larger), f64 or, on Metal, f32 ([`crate::kernels::reduction_dtype`]; there the
/// count is exact up to 2²⁴ non-finite entries, and never 0 when there is one).
pub(crate) fn count_non_finite(t: &Tensor) -> Result<usize> {
    if let Some(n) = count_non_finite_cpu(t) {
        return Ok(n);
    }
    count_non_finite_in(t, crate::kernels::reduction_dtype(t.device()))
}

/// [`count_non_finite`] by candle ops, compared and summed in `dtype` (f64, or f32 for a
/// tensor that is not f64).
fn count_non_finite_in(t: &Tensor, dtype: candle_core::DType) -> Result<usize> {
    let largest = match dtype {
        candle_core::DType::F64 => f64::MAX,
        _ => f64::from(f32::MAX),
    };
    let finite = t.to_dtype(dtype)?.abs()?.le(largest)?.to_dtype(dtype)?;
    let non_finite = finite.affine(-1.0, 1.0)?.sum_all()?;
    Ok(crate::kernels::host_scalar(&non_finite)? as usize)
}

/// [`count_non_finite`] on a contiguous CPU float tensor, reading its storage in place (no
/// temporary tensors: a merge checks weights of hundreds of MB); `None` when it does not
/// apply.
fn count_non_finite_cpu(t: &Tensor) -> Option<usize> {
    use candle_core::{CpuStorage, Storage};
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let range = layout.contiguous_offsets().map(|(a, b)| a..b)?;
    let n = match cpu {
        CpuStorage::F32(v) => v.get(range)?.iter().filter(|x| !x.is_finite()).count(),
        CpuStorage::F64(v) => v.get(range)?.iter().filter(|x| !x.is_finite()).count(),
        CpuStorage::F16(v) => v.get(range)?.iter().filter(|x| !x.is_finite()).count(),
        CpuStorage::BF16(v) => v.get(range)?.iter().filter(|x| !x.is_finite()).count(),
        _ => return None,
    };
    Some(n)
}

/// Implements candle's `Module` for an adapter type: `forward` runs in the layer's current
/// mode (see [`Adapter::set_training`]).
#[macro_export]
macro_rules! impl_module_for_adapter {
    ($t:ty) => {
        impl candle_core::Module for $t {
            fn forward(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
                let train = $crate::Adapter::core(self).is_training();
                $crate::Adapter::forward_t(self, x, train).map_err(candle_core::Error::wrap)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::{count_non_finite, count_non_finite_cpu, count_non_finite_in};

    /// The any-device count (a strided view does not take the CPU fast path), in f64 and
    /// (as on Metal) in f32, equals the fast path's count on a contiguous copy, in every
    /// float dtype, with NaN, both infinities and each dtype's largest finite values among
    /// the entries.
    #[test]
    fn the_device_count_equals_the_cpu_count_in_every_float_dtype() {
        let values = [
            1.0,
            f64::NAN,
            -2.5,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            f64::NAN,
            7.0,
            65504.0,             // f16's largest
            f64::from(f32::MAX), // f32's largest (∞ in f16 and bf16)
            -1e300,              // ±∞ below f64
            3.0,
        ];
        for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
            let t = Tensor::new(&values, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .reshape((3, 4))
                .unwrap()
                .t()
                .unwrap();
            assert!(
                count_non_finite_cpu(&t).is_none(),
                "{dtype:?}: a strided view"
            );
            let expected = count_non_finite_cpu(&t.contiguous().unwrap()).unwrap();
            assert_eq!(count_non_finite(&t).unwrap(), expected, "{dtype:?}");
            if dtype != DType::F64 {
                // Metal's way: compared and summed in f32.
                let in_f32 = count_non_finite_in(&t, DType::F32).unwrap();
                assert_eq!(in_f32, expected, "{dtype:?} in f32");
            }
            let by_hand = t
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .filter(|x| !x.is_finite())
                .count();
            assert_eq!(expected, by_hand, "{dtype:?}");
        }
    }
}
