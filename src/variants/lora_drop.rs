//! LoRA-drop (Zhou et al. 2024, arXiv 2402.07721): LoRA layers whose output importance,
//! measured after a short training stage on a data sample, decides which layers keep their
//! own pair; the others share one pair per shape.
//!
//! [`LoraDropLinear`] is the layer: a [`LoraLinear`] with a calibration probe that records
//! `‖ΔW x‖²` of its inputs while calibration runs. The two-stage procedure (the sample,
//! training stage 1, calibration, the switch to shared pairs) is a training rule,
//! [`crate::train::LoraDrop`]. A shared pair is one pair of `Var`s cloned into several
//! layers (cloning a `Var` shares its storage), so one optimizer update moves every layer
//! of the group. Files use PEFT's LoRA names; each layer saves its (possibly shared) pair.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::adapter::{Adapter, NamedVar, Variant};
use crate::error::Result;
use crate::frozen::FrozenLinear;
use crate::kernels::{add_to_total, host_scalar, low_rank_only, sum_of_squares};
use crate::low_rank::LowRankPair;
use crate::variants::lora::{delegate_to_lora, lora_config_layer, LoraConfig, LoraLinear};

/// The config of a LoRA-drop layer: LoRA's. The procedure's settings are
/// [`crate::train::LoraDropConfig`].
pub type LoraDropLayerConfig = LoraConfig;

/// A LoRA layer that can record its adapter output's squared norm during calibration.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraDropLinear, Variant};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let base = FrozenLinear::new(Tensor::randn(0f32, 1., (8, 4), &dev)?, None)?;
/// let layer = LoraDropLinear::new(base, &LoraConfig::new(2, 2.0), vb.pp("fc"))?;
/// assert_eq!(layer.kind(), Variant::LoraDrop);
/// let _y = layer.forward(&Tensor::ones((3, 4), DType::F32, &dev)?)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LoraDropLinear {
    lora: LoraLinear,
    recording: AtomicBool,
    /// `Σ ‖s · (x Aᵀ) Bᵀ‖²` over the forwards since recording started, on the layer's
    /// device (read once, when recording stops); `None` before the first.
    sum: Mutex<Option<Tensor>>,
}

impl LoraDropLinear {
    /// Builds a LoRA-drop layer over `base`: a LoRA layer made by [`LoraLinear::new`].
    pub fn new(base: FrozenLinear, config: &LoraDropLayerConfig, vb: VarBuilder) -> Result<Self> {
        config.check_wrapper(&vb.prefix(), &base, Variant::LoraDrop)?;
        Ok(Self::from_lora(LoraLinear::new(base, config, vb)?))
    }

    /// Builds the layer `name` from an existing pair, as [`LoraLinear::from_weights`].
    pub fn from_weights(
        name: impl Into<String>,
        base: FrozenLinear,
        config: &LoraDropLayerConfig,
        pair: LowRankPair,
    ) -> Result<Self> {
        let name = name.into();
        config.check_wrapper(&name, &base, Variant::LoraDrop)?;
        Ok(Self::from_lora(LoraLinear::from_weights(
            name, base, config, pair,
        )?))
    }

    fn from_lora(lora: LoraLinear) -> Self {
        Self {
            lora,
            recording: AtomicBool::new(false),
            sum: Mutex::new(None),
        }
    }

    /// The LoRA layer inside (pair, scale, dropout).
    pub fn lora(&self) -> &LoraLinear {
        &self.lora
    }

    /// Moves the layer onto `pair` (LoRA-drop's sharing); see [`LoraLinear::set_pair`].
    pub fn set_pair(&mut self, pair: LowRankPair) -> Result<()> {
        self.lora.set_pair(pair)
    }

    /// Starts recording from zero.
    pub(crate) fn start_recording(&self) {
        *self.lock_sum() = None;
        self.recording.store(true, Ordering::Relaxed);
    }

    /// Stops recording and returns `Σ ‖ΔW x‖²` over the forwards since the start (0
    /// without any).
    pub(crate) fn stop_recording(&self) -> Result<f64> {
        self.recording.store(false, Ordering::Relaxed);
        let sum = self.lock_sum().take();
        Ok(sum.as_ref().map(host_scalar).transpose()?.unwrap_or(0.0))
    }

    fn lock_sum(&self) -> std::sync::MutexGuard<'_, Option<Tensor>> {
        self.sum.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Adapter for LoraDropLinear {
    delegate_to_lora!(lora);

    fn kind(&self) -> Variant {
        Variant::LoraDrop
    }

    /// LoRA's forward; while recording, also adds `‖s · (x Aᵀ) Bᵀ‖²` (no dropout, no
    /// gradient) to the layer's score.
    fn forward_adapted(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.lora.forward_adapted(x, train)?;
        if self.recording.load(Ordering::Relaxed) {
            let low = low_rank_only(&x.detach(), &self.lora.term())?;
            add_to_total(&mut self.lock_sum(), sum_of_squares(&low)?)?;
        }
        Ok(y)
    }

    fn own_vars(&self) -> Vec<NamedVar> {
        self.lora.own_vars()
    }

    fn own_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.lora.own_tensors()
    }
}

crate::impl_module_for_adapter!(LoraDropLinear);

lora_config_layer!(LoraDropLinear, Variant::LoraDrop);
