//! The adaptation methods compared: full fine-tuning and the lorakit variants. Each builds
//! the model for task B from the pretrained tensors and a `Trainer` with its training rule.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::model::{linear, AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
use lorakit::train::{
    orthogonality_penalty, train_step, DeltaLoraHook, DeltaLoraUpdate, LoraDrop, LoraDropConfig,
    LoraFaProjection, LoraPlus, RankAllocator, RankAllocatorConfig, StepHook,
};
use lorakit::variants::AdapterLayer;
use lorakit::{
    AdaLoraConfig, AdaLoraLinear, Adapter, DeltaLoraLinear, DoraLinear, LoraConfig, LoraDropLinear,
    LoraFaLinear, LoraLinear, Shared, Variant, VeraConfig, VeraLinear, VeraShared,
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

/// One way to adapt the pretrained model: full fine-tuning, or one of lorakit's variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Full,
    Adapter(Variant),
}

impl Method {
    /// Every method, in the report's order: full fine-tuning, then every variant in
    /// [`Variant::ALL`]'s (the README's) order.
    pub const ALL: [Method; 1 + Variant::ALL.len()] = {
        let mut all = [Method::Full; 1 + Variant::ALL.len()];
        let mut i = 0;
        while i < Variant::ALL.len() {
            all[i + 1] = Method::Adapter(Variant::ALL[i]);
            i += 1;
        }
        all
    };

    /// The methods of the DoRA weight-decomposition analysis.
    pub const DORA_ANALYSIS: [Method; 3] = [
        Method::Full,
        Method::Adapter(Variant::Lora),
        Method::Adapter(Variant::Dora),
    ];

    /// Display name: the variant's own name ([`Variant::name`]).
    pub fn name(&self) -> &'static str {
        match self {
            Method::Full => "full fine-tuning",
            Method::Adapter(variant) => variant.name(),
        }
    }

    /// Builds the model and trainer.
    pub fn prepare(&self, s: &Settings, pre: &Pretrained) -> lorakit::Result<Prepared> {
        match *self {
            Method::Full => prepare_full(s, pre),
            Method::Adapter(variant) => prepare_adapter(variant, s, pre),
        }
    }

    /// The trainable-parameter count from the method's closed form.
    pub fn closed_form_params(&self, cfg: &ModelConfig, prepared: &Prepared) -> usize {
        let layers = linear_paths(cfg);
        let variant = match self {
            Method::Full => return full_param_count(cfg),
            Method::Adapter(variant) => variant,
        };
        match variant {
            // Selected layers keep their own pair; the others share one pair per shape.
            Variant::LoraDrop => {
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
            Variant::AdaLora => layers.iter().map(|(_, i, o)| RANK * (i + o + 1)).sum(),
            Variant::Vera => layers.iter().map(|(_, _, o)| o + VERA_RANK).sum(),
            Variant::LoraFa => layers.iter().map(|(_, _, o)| RANK * o).sum(),
            Variant::Dora => layers.iter().map(|(_, i, o)| RANK * (i + o) + o).sum(),
            Variant::Lora | Variant::LoraPlus | Variant::DeltaLora => {
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
        // The task loss plus the regularizer, if any: the gradients come from the sum (the
        // caller records the task loss alone).
        let total = match &self.extra_loss {
            Some(extra) => (loss + extra()?)?,
            None => loss.clone(),
        };
        let mut hooks: Vec<&mut dyn StepHook> = self
            .hooks
            .iter_mut()
            .map(|h| h.as_mut() as &mut dyn StepHook)
            .collect();
        train_step(&total, &mut self.optimizer, &mut hooks, step)
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

/// The layers of `adapters`, without their paths (what `lorakit::train`'s rules take).
fn layers(adapters: &NamedAdapters) -> Vec<Shared<dyn Adapter>> {
    adapters.iter().map(|(_, l)| l.clone()).collect()
}

/// An adapter method: the model with `variant`'s layers and its training rule. Every
/// LoRA-family layer has rank `RANK` and alpha `2 · RANK`.
fn prepare_adapter(variant: Variant, s: &Settings, pre: &Pretrained) -> lorakit::Result<Prepared> {
    let lora = LoraConfig::new(RANK, 2.0 * RANK as f64);
    match variant {
        Variant::Lora => {
            let (model, adapters, varmap) = build_adapted::<LoraLinear>(s, pre, lora)?;
            let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), ADAPTER_LR)?;
            Ok(Prepared::adapted(model, adapters, opt, Vec::new()))
        }
        Variant::LoraPlus => {
            let (model, adapters, _) = build_adapted::<LoraLinear>(s, pre, lora)?;
            let opt = LoraPlus::new(LORA_PLUS_LR).build_from_shared(&layers(&adapters))?;
            Ok(Prepared::adapted(model, adapters, opt, Vec::new()))
        }
        Variant::Vera => {
            // One frozen pair for the whole model, sized for its largest targeted layer.
            let shapes = linear_paths(&s.model).into_iter().map(|(_, i, o)| (i, o));
            let shared = VeraShared::covering(VERA_RANK, 0, shapes, DType::F32, &Device::Cpu)?;
            let config = VeraConfig::new(shared);
            let (model, adapters, varmap) = build_adapted::<VeraLinear>(s, pre, config)?;
            let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), VERA_LR)?;
            Ok(Prepared::adapted(model, adapters, opt, Vec::new()))
        }
        Variant::LoraFa => {
            let (model, adapters, varmap) = build_adapted::<LoraFaLinear>(s, pre, lora)?;
            let projection = LoraFaProjection::new(&layers(&adapters))?;
            let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), ADAPTER_LR)?;
            Ok(Prepared::adapted(
                model,
                adapters,
                opt,
                vec![Box::new(projection)],
            ))
        }
        Variant::LoraDrop => prepare_lora_drop(s, pre, lora),
        Variant::AdaLora => prepare_adalora(s, pre),
        Variant::Dora => {
            let (model, adapters, varmap) = build_adapted::<DoraLinear>(s, pre, lora)?;
            let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), ADAPTER_LR)?;
            Ok(Prepared::adapted(model, adapters, opt, Vec::new()))
        }
        Variant::DeltaLora => {
            let (model, adapters, varmap) = build_adapted::<DeltaLoraLinear>(s, pre, lora)?;
            let update = DeltaLoraUpdate::new(DELTA_LORA_LAMBDA, s.adapt_steps / 4);
            let hook = DeltaLoraHook::new(&layers(&adapters), update)?;
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

/// The pretrained model with a fresh `L` layer (built from `config`) on every target: the
/// model code calls lorakit's drop-in `linear` for every linear layer, and the plan
/// (`AdapterPlan::of::<L>`) decides which get an adapter. Returns the model, its adapted
/// layers by path (in build order), and the VarMap holding their variables.
pub fn build_adapted<L: AdapterLayer>(
    s: &Settings,
    pre: &Pretrained,
    config: L::Config,
) -> lorakit::Result<(Transformer, NamedAdapters, VarMap)> {
    let dev = Device::Cpu;
    let frozen = VarBuilder::from_tensors(pre.tensors.clone(), DType::F32, &dev);
    let varmap = VarMap::new();
    let plan = AdapterPlan::of::<L>(
        TargetSpec::new(ModuleSelector::list(TARGETS)),
        RankAlpha::new(RANK, 2.0 * RANK as f64),
        config,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    );
    let make = |_: &str, i: usize, o: usize, vb: VarBuilder| -> lorakit::Result<Box<dyn Module>> {
        Ok(Box::new(linear(i, o, vb, &plan)?))
    };
    let model = Transformer::new(&s.model, frozen, &make)?;
    let adapters = plan.finish()?.layers();
    Ok((model, adapters, varmap))
}

/// LoRA-drop: stage 1 trains every LoRA-drop layer on a 10% sample of a fixed pool of task-B
/// examples, calibration measures each layer's ‖ΔW x‖² on the sample, the layers that make
/// up 90% of the importance keep their pairs and the rest share one pair per shape (freshly
/// initialized as `lora` initializes); the adaptation steps then train the result (stage 2).
fn prepare_lora_drop(
    s: &Settings,
    pre: &Pretrained,
    lora: LoraConfig,
) -> lorakit::Result<Prepared> {
    let dev = Device::Cpu;
    let config = LoraDropConfig {
        stage1_steps: s.adapt_steps / 4,
        shared_init: lora.init,
        shared_seed: lora.seed,
        ..LoraDropConfig::default()
    };
    let (model, adapters, varmap) = build_adapted::<LoraDropLinear>(s, pre, lora)?;
    let drop = LoraDrop::new(&layers(&adapters), config)?;
    let pool = batch(
        Task::Reverse,
        LORA_DROP_POOL,
        &mut SeededRng::new(s.seed + 20),
        &dev,
    )?;
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
    let stage1 = drop.stage1(
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
    let report = drop.share_unselected(&stage1.importance, trainable.pp("shared"))?;
    let opt = candle_nn::AdamW::new_lr(drop.trainable_vars(), ADAPTER_LR)?;
    let mut prepared = Prepared::adapted(model, adapters, opt, Vec::new());
    prepared.note = Some(format!(
        "LoRA-drop (after {} stage-1 steps on a {}-example sample) kept {} of {} layers ({}), \
         shared {} pair(s): {} -> {} trainable parameters ({:.0}% fewer)",
        drop.config().stage1_steps,
        stage1.sample.len(),
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
/// the middle of training; γ times the orthogonality penalty is added to every step's loss.
fn prepare_adalora(s: &Settings, pre: &Pretrained) -> lorakit::Result<Prepared> {
    let config = AdaLoraConfig::new(RANK, 2.0 * RANK as f64);
    let (model, adapters, varmap) = build_adapted::<AdaLoraLinear>(s, pre, config)?;
    let allocator_config = RankAllocatorConfig {
        target_r: RANK / 2,
        tinit: s.adapt_steps / 10,
        tfinal: s.adapt_steps / 5,
        delta_t: 5,
        ..RankAllocatorConfig::new(s.adapt_steps)
    };
    let layers = layers(&adapters);
    let allocator = RankAllocator::new(&layers, allocator_config)?;
    let gamma = allocator.config().orth_reg_weight;
    let opt = candle_nn::AdamW::new_lr(varmap.all_vars(), ADAPTER_LR)?;
    let mut prepared = Prepared::adapted(model, adapters, opt, vec![Box::new(allocator)]);
    prepared.set_extra_loss(Box::new(move || {
        Ok((orthogonality_penalty(&layers)? * gamma)?)
    }));
    Ok(prepared)
}
