//! The adaptation methods compared: full fine-tuning and the lorakit variants. Each builds
//! the model for task B from the pretrained tensors and a `Trainer` with its training rule.

use std::cell::RefCell;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraLinear, Shared};

use crate::core::{Pretrained, Settings};
use crate::model::{linear_paths, ModelConfig, Transformer};
use crate::tasks::Batch;

/// Rank used by the LoRA-family adapters.
pub const RANK: usize = 8;
/// Learning rate of the adapter runs.
pub const ADAPTER_LR: f64 = 1e-2;
/// Learning rate of full fine-tuning.
pub const FULL_LR: f64 = 1e-3;

/// One way to adapt the pretrained model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Full,
    Lora,
}

impl Method {
    /// Every method, in the report's order.
    pub const ALL: [Method; 2] = [Method::Full, Method::Lora];

    /// The methods of the DoRA weight-decomposition analysis.
    pub const DORA_ANALYSIS: [Method; 2] = [Method::Full, Method::Lora];

    /// Display name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Full => "full fine-tuning",
            Method::Lora => "LoRA",
        }
    }

    /// Builds the model and trainer.
    pub fn prepare(&self, s: &Settings, pre: &Pretrained) -> lorakit::Result<Prepared> {
        match self {
            Method::Full => prepare_full(s, pre),
            Method::Lora => {
                let config = LoraConfig::new(RANK, 2.0 * RANK as f64);
                prepare_adapters(s, pre, &|base, vb| {
                    Ok(Shared::new(LoraLinear::new(base, &config, vb)?).erase())
                })
            }
        }
    }

    /// The trainable-parameter count from the method's closed form.
    pub fn closed_form_params(&self, cfg: &ModelConfig, _prepared: &Prepared) -> usize {
        let layers = linear_paths(cfg);
        match self {
            Method::Full => full_param_count(cfg),
            Method::Lora => layers.iter().map(|(_, i, o)| RANK * (i + o)).sum(),
        }
    }
}

/// Adapted layers with their module paths.
pub type NamedAdapters = Vec<(String, Shared<dyn Adapter>)>;

/// What `adapt` trains.
pub struct Prepared {
    pub model: Transformer,
    pub trainer: Box<dyn Trainer>,
    /// The adapted layers by path (empty for full fine-tuning).
    pub adapters: NamedAdapters,
    /// Full fine-tuning's variables (None for adapter methods).
    pub full_vars: Option<VarMap>,
}

impl Prepared {
    /// The weight the linear at `path` effectively applies now: the trained weight under
    /// full fine-tuning; the merged weight (merge, read, unmerge) under an adapter.
    pub fn effective_weight(&self, path: &str) -> lorakit::Result<Tensor> {
        if let Some(vars) = &self.full_vars {
            let key = format!("{path}.weight");
            let data = vars
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?;
            let var = data.get(&key).ok_or_else(|| lorakit::Error::MissingKey {
                key: key.clone(),
                file: "full fine-tuning variables".into(),
            })?;
            return Ok(var.as_tensor().detach().copy()?);
        }
        let layer = self
            .adapters
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, l)| l)
            .ok_or_else(|| lorakit::Error::MissingKey {
                key: path.to_string(),
                file: "adapted layers".into(),
            })?;
        let mut layer = layer.write();
        layer.merge(false)?;
        let w = layer.base().weight().copy();
        layer.unmerge()?;
        Ok(w?)
    }
}

/// A method's training rule.
pub trait Trainer {
    /// One optimizer step from `loss` (hooks, extra losses, schedules included).
    fn step(
        &mut self,
        model: &Transformer,
        loss: &Tensor,
        step: usize,
        batch: &Batch,
    ) -> lorakit::Result<()>;
    /// Called once after the last step.
    fn finish(&mut self, _model: &Transformer) -> lorakit::Result<()> {
        Ok(())
    }
    /// Number of trainable scalars.
    fn trainable_params(&self) -> usize;
}

/// Plain AdamW over a set of variables.
pub struct AdamWTrainer {
    opt: candle_nn::AdamW,
    vars: Vec<Var>,
}

impl AdamWTrainer {
    pub fn new(vars: Vec<Var>, lr: f64) -> lorakit::Result<Self> {
        Ok(Self {
            opt: candle_nn::AdamW::new_lr(vars.clone(), lr)?,
            vars,
        })
    }
}

impl Trainer for AdamWTrainer {
    fn step(&mut self, _: &Transformer, loss: &Tensor, _: usize, _: &Batch) -> lorakit::Result<()> {
        Ok(self.opt.backward_step(loss)?)
    }

    fn trainable_params(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }
}

fn full_param_count(cfg: &ModelConfig) -> usize {
    let d = cfg.d_model;
    let v = crate::tasks::VOCAB;
    let linears: usize = linear_paths(cfg).iter().map(|(_, i, o)| i * o + o).sum();
    let norms = (2 * cfg.layers + 1) * 2 * d;
    linears + norms + v * d + crate::tasks::SEQ * d + d * v + v
}

fn prepare_full(s: &Settings, pre: &Pretrained) -> lorakit::Result<Prepared> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let plain = |_: &str, i: usize, o: usize, vb: VarBuilder| -> lorakit::Result<Box<dyn Module>> {
        Ok(Box::new(candle_nn::linear(i, o, vb)?))
    };
    let model = Transformer::new(&s.model, vb, &plain)?;
    for (name, var) in varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("varmap lock poisoned".into()))?
        .iter()
    {
        let value = pre
            .tensors
            .get(name)
            .ok_or_else(|| lorakit::Error::MissingKey {
                key: name.clone(),
                file: "pretrained tensors".into(),
            })?;
        var.set(value)?;
    }
    let trainer = AdamWTrainer::new(varmap.all_vars(), FULL_LR)?;
    Ok(Prepared {
        model,
        trainer: Box::new(trainer),
        adapters: Vec::new(),
        full_vars: Some(varmap),
    })
}

/// Builds one adapted layer from its frozen base and a VarBuilder for its trainables.
pub type AdapterBuilder<'a> =
    dyn Fn(FrozenLinear, VarBuilder) -> lorakit::Result<Shared<dyn Adapter>> + 'a;

/// The model with every linear of `linear_paths` adapted by `build`, trained by AdamW over
/// the adapters' variables.
fn prepare_adapters(
    s: &Settings,
    pre: &Pretrained,
    build: &AdapterBuilder,
) -> lorakit::Result<Prepared> {
    let (model, adapters, varmap) = build_adapted(s, pre, build)?;
    let trainer = AdamWTrainer::new(varmap.all_vars(), ADAPTER_LR)?;
    Ok(Prepared {
        model,
        trainer: Box::new(trainer),
        adapters,
        full_vars: None,
    })
}

/// The adapted model, its layers by path, and the VarMap holding the adapters' variables.
pub fn build_adapted(
    s: &Settings,
    pre: &Pretrained,
    build: &AdapterBuilder,
) -> lorakit::Result<(Transformer, NamedAdapters, VarMap)> {
    let dev = Device::Cpu;
    let frozen = VarBuilder::from_tensors(pre.tensors.clone(), DType::F32, &dev);
    let varmap = VarMap::new();
    let trainable = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let adapters = RefCell::new(Vec::new());
    let make =
        |path: &str, i: usize, o: usize, vb: VarBuilder| -> lorakit::Result<Box<dyn Module>> {
            let base = FrozenLinear::from_var_builder(i, o, true, vb)?;
            let layer = build(base, trainable.pp(path))?;
            adapters
                .borrow_mut()
                .push((path.to_string(), layer.clone()));
            Ok(Box::new(layer))
        };
    let model = Transformer::new(&s.model, frozen, &make)?;
    Ok((model, adapters.into_inner(), varmap))
}
