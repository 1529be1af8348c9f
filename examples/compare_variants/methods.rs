//! The adaptation methods compared: full fine-tuning and the lorakit variants. Each builds
//! the model for task B from the pretrained tensors and a `Trainer` with its training rule.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::model::{
    linear, AdapterFactory, AdapterPlan, ModuleSelector, ModuleSettings, RankAlpha, TargetSpec,
};
use lorakit::train::{
    orthogonality_penalty, train_step, LoraDropConfig, LoraFaProjection, LoraPlus, RankAllocator,
    RankAllocatorConfig, StepHook,
};
use lorakit::variants::delta_lora::{delta_lora_linear, DeltaLoraHook, DeltaLoraUpdate};
use lorakit::{lora_fa, DoraLinear, VeraBuilder, VeraConfig};
use lorakit::{
    AdaLoraConfig, AdaLoraLinear, Adapter, FrozenLinear, LoraConfig, LoraDrop, LoraLinear, Shared,
};

use crate::core::{varmap_data, Pretrained, Settings};
use crate::model::{linear_paths, ModelConfig, Transformer};
use crate::tasks::{batch, Batch, Task};

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
/// VeRA's rank (its shared pair is frozen, so a large rank costs no trainable parameters;
/// PEFT's default is 256).
pub const VERA_RANK: usize = 256;
/// VeRA's learning rate (its λ vectors need a larger one than LoRA's factors).
pub const VERA_LR: f64 = 2e-2;
/// Size of LoRA-drop's fixed pool of task-B examples (stage 1 samples 10% of it).
pub const LORA_DROP_POOL: usize = 2048;
/// Learning rate of full fine-tuning.
pub const FULL_LR: f64 = 1e-3;

/// One way to adapt the pretrained model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Full,
    Lora,
    LoraPlus,
    Vera,
    LoraFa,
    LoraDrop,
    AdaLora,
    Dora,
    DeltaLora,
}

impl Method {
    /// Every method, in the report's order.
    pub const ALL: [Method; 9] = [
        Method::Full,
        Method::Lora,
        Method::LoraPlus,
        Method::Vera,
        Method::LoraFa,
        Method::LoraDrop,
        Method::AdaLora,
        Method::Dora,
        Method::DeltaLora,
    ];

    /// The methods of the DoRA weight-decomposition analysis.
    pub const DORA_ANALYSIS: [Method; 3] = [Method::Full, Method::Lora, Method::Dora];

    /// Display name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Full => "full fine-tuning",
            Method::Lora => "LoRA",
            Method::LoraPlus => "LoRA+",
            Method::Vera => "VeRA",
            Method::LoraFa => "LoRA-FA",
            Method::LoraDrop => "LoRA-drop",
            Method::Dora => "DoRA",
            Method::AdaLora => "AdaLoRA",
            Method::DeltaLora => "Delta-LoRA",
        }
    }

    /// Builds the model and trainer.
    pub fn prepare(&self, s: &Settings, pre: &Pretrained) -> lorakit::Result<Prepared> {
        let lora = LoraConfig::new(RANK, 2.0 * RANK as f64);
        let plain_lora = lora_factory(lora.clone(), LoraLinear::new);
        match self {
            Method::Full => prepare_full(s, pre),
            Method::Lora => {
                let (model, adapters, varmap) = build_adapted(s, pre, plain_lora)?;
                let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), ADAPTER_LR)?;
                Ok(Prepared::adapted(model, adapters, opt, Vec::new()))
            }
            Method::LoraPlus => {
                let (model, adapters, _) = build_adapted(s, pre, plain_lora)?;
                let layers: Vec<_> = adapters.iter().map(|(_, l)| l.clone()).collect();
                let opt = LoraPlus::new(LORA_PLUS_LR).build_from_shared(&layers)?;
                Ok(Prepared::adapted(model, adapters, opt, Vec::new()))
            }
            Method::Vera => {
                let mut vera = VeraBuilder::new(VeraConfig {
                    r: VERA_RANK,
                    ..VeraConfig::default()
                });
                for (_, d_in, d_out) in linear_paths(&s.model) {
                    vera.reserve(d_in, d_out)?;
                }
                let vera = Mutex::new(vera);
                let factory = move |_: &str, base, vb, _: ModuleSettings| {
                    let mut vera = vera.lock().map_err(|_| poisoned())?;
                    Ok(Shared::new(vera.build(base, vb)?).erase())
                };
                let (model, adapters, varmap) = build_adapted(s, pre, factory)?;
                let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), VERA_LR)?;
                Ok(Prepared::adapted(model, adapters, opt, Vec::new()))
            }
            Method::LoraFa => {
                let factory = lora_factory(lora.clone(), lora_fa::new);
                let (model, adapters, varmap) = build_adapted(s, pre, factory)?;
                let layers: Vec<_> = adapters.iter().map(|(_, l)| l.clone()).collect();
                let projection = LoraFaProjection::new(layers)?;
                let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), ADAPTER_LR)?;
                Ok(Prepared::adapted(
                    model,
                    adapters,
                    opt,
                    vec![Box::new(projection)],
                ))
            }
            Method::Dora => {
                let factory = lora_factory(lora.clone(), DoraLinear::new);
                let (model, adapters, varmap) = build_adapted(s, pre, factory)?;
                let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), ADAPTER_LR)?;
                Ok(Prepared::adapted(model, adapters, opt, Vec::new()))
            }
            Method::LoraDrop => prepare_lora_drop(s, pre, &lora),
            Method::AdaLora => prepare_adalora(s, pre),
            Method::DeltaLora => {
                let factory = lora_factory(lora.clone(), delta_lora_linear);
                let (model, adapters, varmap) = build_adapted(s, pre, factory)?;
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
    pub fn closed_form_params(&self, cfg: &ModelConfig, prepared: &Prepared) -> usize {
        let layers = linear_paths(cfg);
        match self {
            // Selected layers keep their own pair; the others share one pair per shape.
            Method::LoraDrop => {
                let mut shared_shapes = std::collections::BTreeSet::new();
                layers
                    .iter()
                    .map(|(path, i, o)| {
                        let own = prepared.selected.iter().any(|p| p == path);
                        if own || shared_shapes.insert((*i, *o)) {
                            RANK * (i + o)
                        } else {
                            0
                        }
                    })
                    .sum()
            }
            Method::AdaLora => layers.iter().map(|(_, i, o)| RANK * (i + o + 1)).sum(),
            Method::Vera => layers.iter().map(|(_, _, o)| o + VERA_RANK).sum(),
            Method::LoraFa => layers.iter().map(|(_, _, o)| RANK * o).sum(),
            Method::Dora => layers.iter().map(|(_, i, o)| RANK * (i + o) + o).sum(),
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
    /// LoRA-drop: the layers that kept their own pair (empty for other methods).
    pub selected: Vec<String>,
    /// A line about the method's own decisions (LoRA-drop's selection, AdaLoRA's ranks).
    pub note: Option<String>,
}

impl Prepared {
    /// Adds a regularizer to the loss of every step (adapter methods only).
    pub fn set_extra_loss(&mut self, extra: ExtraLoss) {
        self.trainer.set_extra_loss(extra);
    }

    /// An adapter method: the model, its layers, an optimizer over the adapters' variables,
    /// and the method's step hooks.
    pub fn adapted<O: Optimizer + 'static>(
        model: Transformer,
        adapters: NamedAdapters,
        optimizer: O,
        hooks: Vec<Box<dyn StepHook>>,
    ) -> Self {
        // Count each variable once: LoRA-drop's shared pairs sit in several layers.
        let mut seen = std::collections::HashSet::new();
        let params = adapters
            .iter()
            .flat_map(|(_, l)| l.read().trainable_vars())
            .filter(|v| seen.insert(v.var.as_tensor().id()))
            .map(|v| v.var.elem_count())
            .sum();
        Self {
            model,
            trainer: Box::new(AdapterTrainer {
                optimizer,
                hooks,
                params,
                extra_loss: None,
            }),
            adapters,
            full_vars: None,
            selected: Vec::new(),
            note: None,
        }
    }

    /// The weight the linear at `path` effectively applies now: the trained weight under
    /// full fine-tuning; the merged weight (merge, read, unmerge) under an adapter.
    pub fn effective_weight(&self, path: &str) -> lorakit::Result<Tensor> {
        if let Some(vars) = &self.full_vars {
            let key = format!("{path}.weight");
            let data = varmap_data(vars);
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
    /// Adds a regularizer to the loss (ignored by trainers without one).
    fn set_extra_loss(&mut self, _extra: ExtraLoss) {}
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
    /// A regularizer added to the task loss (AdaLoRA's orthogonality penalty).
    extra_loss: Option<ExtraLoss>,
}

/// A loss term computed from the model's parameters.
pub type ExtraLoss = Box<dyn Fn() -> lorakit::Result<Tensor>>;

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

    fn set_extra_loss(&mut self, extra: ExtraLoss) {
        self.extra_loss = Some(extra);
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
    for (name, var) in varmap_data(&varmap).iter() {
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
        selected: Vec::new(),
        note: None,
    })
}

/// The modules every adapter method targets: all linears of the blocks (PEFT-style names);
/// the output head is built through the same drop-in `linear` but not targeted.
pub const TARGETS: [&str; 6] = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"];

fn poisoned() -> lorakit::Error {
    candle_core::Error::Msg("lock poisoned".into()).into()
}

/// A plan factory for a LoRA-family layer constructor `(base, config, vb)`, with the
/// module's rank and alpha from the plan.
fn lora_factory<L: Adapter + 'static>(
    config: LoraConfig,
    new: fn(FrozenLinear, &LoraConfig, VarBuilder) -> lorakit::Result<L>,
) -> impl AdapterFactory + 'static {
    move |_: &str, base, vb, m: ModuleSettings| -> lorakit::Result<Shared<dyn Adapter>> {
        let c = LoraConfig {
            r: m.r,
            alpha: m.alpha,
            ..config.clone()
        };
        Ok(Shared::new(new(base, &c, vb)?).erase())
    }
}

/// The pretrained model with adapters from `factory`: the model code calls lorakit's
/// drop-in `linear` for every linear layer, and the plan decides which get an adapter.
/// Returns the model, its adapted layers by path, and the VarMap holding their variables.
pub fn build_adapted(
    s: &Settings,
    pre: &Pretrained,
    factory: impl AdapterFactory + 'static,
) -> lorakit::Result<(Transformer, NamedAdapters, VarMap)> {
    let dev = Device::Cpu;
    let frozen = VarBuilder::from_tensors(pre.tensors.clone(), DType::F32, &dev);
    let varmap = VarMap::new();
    let plan = AdapterPlan::new(
        TargetSpec::new(ModuleSelector::list(TARGETS)),
        RankAlpha::new(RANK, 2.0 * RANK as f64),
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        factory,
    );
    let make = |_: &str, i: usize, o: usize, vb: VarBuilder| -> lorakit::Result<Box<dyn Module>> {
        Ok(Box::new(linear(i, o, vb, &plan)?))
    };
    let model = Transformer::new(&s.model, frozen, &make)?;
    let adapters = plan.finish()?.layers();
    Ok((model, adapters, varmap))
}

/// LoRA-drop: stage 1 trains every LoRA layer on a 10% sample of a fixed pool of task-B
/// examples, calibration measures each layer's ‖ΔW x‖² on the sample, the layers that make
/// up 90% of the importance keep their pairs and the rest share one pair per shape; the
/// adaptation steps then train the result (stage 2).
fn prepare_lora_drop(
    s: &Settings,
    pre: &Pretrained,
    lora: &LoraConfig,
) -> lorakit::Result<Prepared> {
    let dev = Device::Cpu;
    // LoRA-drop's calibration needs each layer's input, so the model calls a probing
    // wrapper around each LoRA layer instead of the plan's drop-in linear.
    let frozen = VarBuilder::from_tensors(pre.tensors.clone(), DType::F32, &dev);
    let varmap = VarMap::new();
    let trainable = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let drop = RefCell::new(LoraDrop::new());
    let adapters = RefCell::new(Vec::new());
    let make =
        |path: &str, i: usize, o: usize, vb: VarBuilder| -> lorakit::Result<Box<dyn Module>> {
            let base = FrozenLinear::from_var_builder(i, o, true, vb)?;
            if !TARGETS.iter().any(|t| path.ends_with(t)) {
                return Ok(Box::new(base));
            }
            let layer = Shared::new(LoraLinear::new(base, lora, trainable.pp(path))?);
            adapters
                .borrow_mut()
                .push((path.to_string(), layer.clone().erase()));
            Ok(Box::new(drop.borrow_mut().wrap(layer)))
        };
    let model = Transformer::new(&s.model, frozen, &make)?;
    let adapters = adapters.into_inner();
    let drop = drop.into_inner();
    let pool = batch(
        Task::Reverse,
        LORA_DROP_POOL,
        &mut SeededRng::new(s.seed + 20),
        &dev,
    )?;
    let config = LoraDropConfig {
        stage1_steps: s.adapt_steps / 4,
        ..LoraDropConfig::default()
    };
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), ADAPTER_LR)?;
    let rows = |idx: &[usize]| -> lorakit::Result<Batch> {
        let idx = Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            idx.len(),
            &dev,
        )?;
        Ok(Batch {
            inputs: pool.inputs.index_select(&idx, 0)?,
            targets: pool.targets.index_select(&idx, 0)?,
        })
    };
    let importance = drop.stage1(
        &config,
        LORA_DROP_POOL,
        |step, sample| {
            let start = (step * s.batch) % sample.len();
            let idx: Vec<usize> = (0..s.batch)
                .map(|k| sample[(start + k) % sample.len()])
                .collect();
            let b = rows(&idx)?;
            Ok(opt.backward_step(&model.loss(&b.inputs, &b.targets)?)?)
        },
        |sample| {
            let b = rows(sample)?;
            model.forward(&b.inputs)?;
            Ok(())
        },
    )?;
    let trainable = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let report =
        drop.share_unselected(&importance, config.selection, lora, trainable.pp("shared"))?;
    let opt = candle_nn::AdamW::new_lr(drop.trainable_vars(), ADAPTER_LR)?;
    let mut prepared = Prepared::adapted(model, adapters, opt, Vec::new());
    prepared.note = Some(format!(
        "LoRA-drop (after {} stage-1 steps on a {}-example sample) kept {} of {} layers ({}), \
         shared {} pair(s): {} -> {} trainable parameters ({:.0}% fewer)",
        config.stage1_steps,
        (LORA_DROP_POOL as f64 * 0.1).round() as usize,
        report.selected.len(),
        report.selected.len() + report.shared.len(),
        report.selected.join(", "),
        report.shared_pairs,
        report.params_before,
        report.params_after,
        100.0 * report.reduction()
    ));
    prepared.selected = report.selected;
    Ok(prepared)
}

/// AdaLoRA: initial rank `RANK`, target average rank `RANK / 2`, the budget falling over
/// the middle of training; the orthogonality penalty is added to the loss.
fn prepare_adalora(s: &Settings, pre: &Pretrained) -> lorakit::Result<Prepared> {
    let config = AdaLoraConfig::new(RANK, 2.0 * RANK as f64);
    let layers = Arc::new(Mutex::new(Vec::new()));
    let registry = layers.clone();
    let factory =
        move |_: &str, base, vb, _: ModuleSettings| -> lorakit::Result<Shared<dyn Adapter>> {
            let layer = Shared::new(AdaLoraLinear::new(base, &config, vb)?);
            registry.lock().map_err(|_| poisoned())?.push(layer.clone());
            Ok(layer.erase())
        };
    let (model, adapters, varmap) = build_adapted(s, pre, factory)?;
    let allocator_config = RankAllocatorConfig {
        target_r: RANK / 2,
        tinit: s.adapt_steps / 10,
        tfinal: s.adapt_steps / 5,
        delta_t: 5,
        ..RankAllocatorConfig::new(s.adapt_steps)
    };
    let layers = std::mem::take(&mut *layers.lock().map_err(|_| poisoned())?);
    let allocator = RankAllocator::new(layers.clone(), allocator_config)?;
    let gamma = allocator.config().orth_reg_weight;
    let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), ADAPTER_LR)?;
    let mut prepared = Prepared::adapted(model, adapters, opt, vec![Box::new(allocator)]);
    prepared.set_extra_loss(Box::new(move || {
        Ok((orthogonality_penalty(&layers)? * gamma)?)
    }));
    Ok(prepared)
}
