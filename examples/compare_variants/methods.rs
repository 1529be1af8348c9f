//! The adaptation methods compared: full fine-tuning and the lorakit variants. Each builds
//! the model for task B from the pretrained tensors and a `Trainer` with its training rule.

use std::cell::RefCell;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::train::{train_step, LoraPlus, StepHook};
use lorakit::variants::delta_lora::{delta_lora_linear, DeltaLoraHook, DeltaLoraUpdate};
use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraLinear, Shared};

use crate::core::{Pretrained, Settings};
use crate::model::{linear_paths, ModelConfig, Transformer};
use crate::tasks::Batch;

/// Rank used by the LoRA-family adapters.
pub const RANK: usize = 8;
/// Learning rate of the adapter runs.
pub const ADAPTER_LR: f64 = 1e-2;
/// LoRA+'s base learning rate: A trains at it, B at 16× it (the default ratio). At
/// `ADAPTER_LR` B's 16× rate diverges on this task.
pub const LORA_PLUS_LR: f64 = 2.5e-3;
/// Delta-LoRA's λ (the paper's setting for RoBERTa/BART-size models); K is a quarter of the
/// adaptation steps.
pub const DELTA_LORA_LAMBDA: f64 = 0.5;
/// Learning rate of full fine-tuning.
pub const FULL_LR: f64 = 1e-3;

/// One way to adapt the pretrained model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Full,
    Lora,
    LoraPlus,
    DeltaLora,
}

impl Method {
    /// Every method, in the report's order.
    pub const ALL: [Method; 4] = [
        Method::Full,
        Method::Lora,
        Method::LoraPlus,
        Method::DeltaLora,
    ];

    /// The methods of the DoRA weight-decomposition analysis.
    pub const DORA_ANALYSIS: [Method; 2] = [Method::Full, Method::Lora];

    /// Display name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Full => "full fine-tuning",
            Method::Lora => "LoRA",
            Method::LoraPlus => "LoRA+",
            Method::DeltaLora => "Delta-LoRA",
        }
    }

    /// Builds the model and trainer.
    pub fn prepare(&self, s: &Settings, pre: &Pretrained) -> lorakit::Result<Prepared> {
        let lora = LoraConfig::new(RANK, 2.0 * RANK as f64);
        let plain_lora =
            |base: FrozenLinear, vb: VarBuilder| -> lorakit::Result<Shared<dyn Adapter>> {
                Ok(Shared::new(LoraLinear::new(base, &lora, vb)?).erase())
            };
        match self {
            Method::Full => prepare_full(s, pre),
            Method::Lora => {
                let (model, adapters, varmap) = build_adapted(s, pre, &plain_lora)?;
                let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), ADAPTER_LR)?;
                Ok(Prepared::adapted(model, adapters, opt, Vec::new()))
            }
            Method::LoraPlus => {
                let (model, adapters, _) = build_adapted(s, pre, &plain_lora)?;
                let layers: Vec<_> = adapters.iter().map(|(_, l)| l.clone()).collect();
                let opt = LoraPlus::new(LORA_PLUS_LR).build_from_shared(&layers)?;
                Ok(Prepared::adapted(model, adapters, opt, Vec::new()))
            }
            Method::DeltaLora => {
                let (model, adapters, varmap) = build_adapted(s, pre, &|base, vb| {
                    Ok(Shared::new(delta_lora_linear(base, &lora, vb)?).erase())
                })?;
                let layers: Vec<_> = adapters.iter().map(|(_, l)| l.clone()).collect();
                let update = DeltaLoraUpdate::new(DELTA_LORA_LAMBDA, s.adapt_steps / 4);
                let hook = DeltaLoraHook::from_adapters(layers, update)?;
                let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), ADAPTER_LR)?;
                Ok(Prepared::adapted(
                    model,
                    adapters,
                    opt,
                    vec![Box::new(hook)],
                ))
            }
        }
    }

    /// The trainable-parameter count from the method's closed form.
    pub fn closed_form_params(&self, cfg: &ModelConfig, _prepared: &Prepared) -> usize {
        let layers = linear_paths(cfg);
        match self {
            Method::Full => full_param_count(cfg),
            Method::Lora | Method::LoraPlus | Method::DeltaLora => {
                layers.iter().map(|(_, i, o)| RANK * (i + o)).sum()
            }
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
    /// An adapter method: the model, its layers, an optimizer over the adapters' variables,
    /// and the method's step hooks.
    pub fn adapted<O: Optimizer + 'static>(
        model: Transformer,
        adapters: NamedAdapters,
        optimizer: O,
        hooks: Vec<Box<dyn StepHook>>,
    ) -> Self {
        let params = adapters
            .iter()
            .map(|(_, l)| l.read().num_trainable_params())
            .sum();
        Self {
            model,
            trainer: Box::new(AdapterTrainer {
                optimizer,
                hooks,
                params,
            }),
            adapters,
            full_vars: None,
        }
    }

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

/// An optimizer and step hooks, run in order by `lorakit::train::train_step`.
pub struct AdapterTrainer<O: Optimizer> {
    optimizer: O,
    hooks: Vec<Box<dyn StepHook>>,
    params: usize,
}

impl<O: Optimizer> Trainer for AdapterTrainer<O> {
    fn step(
        &mut self,
        _: &Transformer,
        loss: &Tensor,
        step: usize,
        _: &Batch,
    ) -> lorakit::Result<()> {
        let mut hooks: Vec<&mut dyn StepHook> = self
            .hooks
            .iter_mut()
            .map(|h| h.as_mut() as &mut dyn StepHook)
            .collect();
        train_step(loss, &mut self.optimizer, &mut hooks, step)
    }

    fn trainable_params(&self) -> usize {
        self.params
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
