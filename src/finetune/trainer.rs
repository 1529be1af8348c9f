//! [`Trainer`]: the fine-tuning loop.

use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::classification::SequenceClassification;
use super::config::TrainConfig;
use super::cursor::Cursor;
use super::grads::GradAccumulator;
use super::recipe::AdapterRecipe;
use super::rule::Rule;
use super::schedule::LrSchedule;
use super::task::{LanguageModeling, Task, TaskData};
use crate::adapter::{Adapter, Variant};
use crate::error::{Error, Result};
use crate::frozen::BaseKind;
use crate::kernels::{add_to_total, host_scalar, reduction_dtype};
use crate::model::AdaptedSet;
use crate::models::{CausalLm, SequenceClassifier};
use crate::peft::{save_adapter, PeftConfig};
use crate::shared::Shared;
use crate::train::lora_drop::sample_indices;
use crate::train::{LayerImportance, LoraDrop};

/// One optimizer step's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// The step, from 1.
    pub step: usize,
    /// Mean loss per target (token, or example for classification) over the step's
    /// batches; `None` when they held no target token (every row's targets cut off by
    /// `seq_len`): such a step is skipped, the adapters and the optimizer's state
    /// unchanged.
    pub loss: Option<f64>,
    /// The peak learning rate times the schedule's factor (LoRA+: A's rate).
    pub lr: f64,
    /// The gradients' global norm before clipping.
    pub grad_norm: f64,
    /// Targets the loss counted: tokens for language modeling, examples for
    /// classification (checkpoints written before the rename call it `target_tokens`).
    #[serde(alias = "target_tokens")]
    pub targets: usize,
    /// Wall time of the step, seconds.
    pub seconds: f64,
}

/// One evaluation's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalLog {
    /// The step after which it ran.
    pub step: usize,
    /// Mean loss per target (token, or example for classification) over the eval set.
    pub loss: f64,
    /// The share of examples whose predicted class is their label, for single-label
    /// classification.
    #[serde(default)]
    pub accuracy: Option<f64>,
}

/// One pass over an eval set ([`Trainer::evaluation`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Mean loss per target (token, or example for classification).
    pub loss: f64,
    /// The share of examples whose predicted class is their label, for single-label
    /// classification; `None` for other tasks.
    pub accuracy: Option<f64>,
}

/// What [`Trainer::train`] reports as it goes.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    /// LoRA-drop's stage 1 ended; the text says what it selected.
    Stage1(&'a str),
    /// An optimizer step ended.
    Step(&'a StepLog),
    /// An evaluation ended.
    Eval(&'a EvalLog),
    /// A checkpoint was written.
    Checkpoint(&'a Path),
}

/// Progress that a checkpoint records and a resumed run continues from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Progress {
    pub step: usize,
    pub epoch: usize,
    pub batch_index: usize,
    /// LoRA-drop's stage-1 importances (`name`, raw, normalized), once stage 1 ran.
    pub lora_drop: Option<Vec<(String, f64, f64)>>,
    pub lora_drop_note: Option<String>,
    pub history: Vec<StepLog>,
    pub evals: Vec<EvalLog>,
}

/// The fine-tuning loop over a model whose adapters were built from an [`AdapterRecipe`]'s
/// plan, for a [`Task`]: a causal language model ([`Trainer::new`]) or a sequence
/// classifier ([`Trainer::for_classifier`]).
///
/// Each optimizer step takes `grad_accum` batches from the training set (epoch after
/// epoch, each shuffled by `(seed, epoch)`), sums the task's loss over their targets (the
/// causal-LM loss over target tokens, [`super::loss::causal_lm_loss_sum`]; the classifier's
/// loss over examples) and divides by the step's target count, adds
/// AdaLoRA's orthogonality penalty, accumulates the trainable variables' gradients, clips
/// their global norm, then runs the variant's rule around AdamW: LoRA+'s parameter groups,
/// LoRA-FA's projection of B's gradient, Delta-LoRA's update of W, AdaLoRA's rank
/// allocation; LoRA-drop first runs its stage 1 (training on a sample, calibrating, sharing
/// the pairs of unimportant layers). The learning rate follows the warmup + decay schedule.
///
/// Checkpoints (`output_dir/checkpoint-<step>/`) hold the adapter as a PEFT directory
/// (loadable by PEFT and [`crate::peft::PeftAdapter`]) and what resuming needs:
/// `trainer_state.json` (step, data position, logs), `trainable.safetensors` (every
/// trainable variable by its full name), `optimizer.safetensors` (AdamW's moments) and,
/// for AdaLoRA, `allocator.safetensors`, for Delta-LoRA, `delta_lora_base.safetensors`
/// (each adapted layer's base weight as the rule moved it). [`Trainer::resume`] continues
/// a run so that it ends where the uninterrupted run would have (with dropout 0).
///
/// On the CPU, a training program should call [`crate::memory::retain_freed_buffers`] and
/// [`crate::threads::park_idle_elementwise_workers`] first thing in `main`: process-wide
/// settings the library does not make by itself (freed step buffers stay resident; candle's
/// element-wise workers stop spinning through the GEMMs: 4–10% of a Llama training step on
/// a 2-core AMD EPYC).
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::finetune::{AdapterRecipe, Dataset, Example, TrainConfig, Trainer};
/// use lorakit::models::llama::{LlamaConfig, LlamaForCausalLM};
/// use lorakit::Variant;
/// # fn main() -> lorakit::Result<()> {
/// let dir = "tests/fixtures/models/llama/qwen2/base"; // a tiny Qwen2, vocab 64
/// let dev = Device::Cpu;
/// let config = LlamaConfig::from_file(format!("{dir}/config.json"))?;
/// let recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["all-linear"]);
/// let vars = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
/// let plan = recipe.plan(vb, &config.linear_shapes(), DType::F32, &dev)?;
/// let model = LlamaForCausalLM::from_pretrained(dir, DType::F32, &dev, &plan)?;
///
/// // One sequence to learn by heart (ids below 64; a real run reads JSONL through a tokenizer).
/// let ids: Vec<u32> = (0..24).map(|i| (i * 7 % 60) as u32 + 3).collect();
/// let data = Dataset::from_examples(vec![Example::new(ids.clone(), vec![true; ids.len()])?]);
/// let mut settings = TrainConfig::new(30);
/// settings.lr = 3e-2;
/// let mut trainer = Trainer::new(&model, plan.finish()?, recipe, settings)?;
/// let before = trainer.evaluate(&data)?;
/// let report = trainer.train(&data, None, |_| {})?;
/// assert_eq!(report.history.len(), 30);
/// let after = trainer.evaluate(&data)?;
/// assert!(after < 0.7 * before, "{before} -> {after}");
/// # Ok(()) }
/// ```
pub struct Trainer<'m, T: Task = LanguageModeling<'m>> {
    pub(super) task: T,
    pub(super) adapters: AdaptedSet,
    pub(super) recipe: AdapterRecipe,
    pub(super) config: TrainConfig,
    schedule: LrSchedule,
    pub(super) rule: Rule,
    /// LoRA-drop's shared pairs live here.
    shared_vars: VarMap,
    pub(super) progress: Progress,
    /// The model the task borrows.
    lifetime: PhantomData<&'m ()>,
}

/// What a finished [`Trainer::train`] call did.
#[derive(Clone, Debug, Default)]
pub struct TrainReport {
    /// Every step's record since the run began (a resumed run's earlier steps included).
    pub history: Vec<StepLog>,
    /// Every evaluation.
    pub evals: Vec<EvalLog>,
    /// Checkpoints written by this call.
    pub checkpoints: Vec<PathBuf>,
    /// LoRA-drop's selection, in words.
    pub note: Option<String>,
}

impl<'m> Trainer<'m> {
    /// A trainer for the causal language model `model` ([`LanguageModeling`]), whose
    /// adapted layers are `adapters` (the `finish()` of the plan `recipe` built). Errors:
    /// those of [`Trainer::with_task`].
    pub fn new(
        model: &'m dyn CausalLm,
        adapters: AdaptedSet,
        recipe: AdapterRecipe,
        config: TrainConfig,
    ) -> Result<Self> {
        Self::with_task(LanguageModeling::new(model), adapters, recipe, config)
    }
}

impl<'m> Trainer<'m, SequenceClassification<'m>> {
    /// A trainer for the sequence classifier `model` ([`SequenceClassification`]), whose
    /// adapted layers are `adapters` (the `finish()` of the plan `recipe` built; give the
    /// recipe `modules_to_save: ["classifier"]` to train a new head, as PEFT does for
    /// `task_type` `SEQ_CLS`). Errors: those of [`Trainer::with_task`].
    pub fn for_classifier(
        model: &'m dyn SequenceClassifier,
        adapters: AdaptedSet,
        recipe: AdapterRecipe,
        config: TrainConfig,
    ) -> Result<Self> {
        Self::with_task(SequenceClassification::new(model), adapters, recipe, config)
    }
}

impl<'m, T: Task> Trainer<'m, T> {
    /// A trainer for `task`, whose model's adapted layers are `adapters` (the `finish()` of
    /// the plan `recipe` built). Errors: bad settings ([`TrainConfig::validate`]), a
    /// `seq_len` longer than the model can take ([`Task::max_positions`]), no adapted
    /// layer, or a layer of another variant than the recipe's.
    pub fn with_task(
        task: T,
        adapters: AdaptedSet,
        recipe: AdapterRecipe,
        config: TrainConfig,
    ) -> Result<Self> {
        config.validate()?;
        if let Some(limit) = task.max_positions() {
            if config.batch.seq_len > limit {
                return Err(Error::settings(
                    "training config",
                    "seq_len",
                    format!(
                        "{} is longer than the {limit} positions the model can take; set \
                         seq_len to at most {limit}",
                        config.batch.seq_len
                    ),
                ));
            }
        }
        let schedule = config.schedule()?;
        let rule = Rule::new(&recipe, &adapters, &config)?;
        Ok(Self {
            task,
            adapters,
            recipe,
            config,
            schedule,
            rule,
            shared_vars: VarMap::new(),
            progress: Progress::default(),
            lifetime: PhantomData,
        })
    }

    /// The task the trainer trains for (and through it the model).
    pub fn task(&self) -> &T {
        &self.task
    }

    /// Trains until `max_steps` (from where a [`resume`](Self::resume) left off), calling
    /// `on_event` after every step, evaluation and checkpoint. `eval` is evaluated every
    /// `eval_every` steps and after the last one.
    ///
    /// Errors: data the task refuses ([`Task::check`], checked first: a token the model's
    /// vocabulary lacks, a label outside its classes, a training or eval set none of whose
    /// examples keeps a target token within `seq_len`), an empty dataset, a non-finite
    /// loss or a loss that reaches no trainable variable (e.g. an inactive adapter of a
    /// [`crate::model::NamedAdapters`] model; the step is not applied), or a failed
    /// checkpoint write.
    pub fn train(
        &mut self,
        train: &T::Data,
        eval: Option<&T::Data>,
        mut on_event: impl FnMut(&TrainEvent),
    ) -> Result<TrainReport> {
        self.task.check(train, &self.config.batch, "training")?;
        if let Some(eval) = eval {
            self.task.check(eval, &self.config.batch, "eval")?;
        }
        let mut report = TrainReport::default();
        if self.recipe.variant == Variant::LoraDrop && self.progress.lora_drop.is_none() {
            let note = self.lora_drop_stage1(train)?;
            on_event(&TrainEvent::Stage1(&note));
        }
        let mut cursor = Cursor::new(
            &self.task,
            train,
            self.config.batch.clone(),
            self.config.seed,
            self.progress.epoch,
            self.progress.batch_index,
        );
        self.adapters.set_training(true);
        while self.progress.step < self.config.max_steps {
            // On a rayon worker, so the step's products do not each wake the pool and
            // wait for it (`threads::on_worker`).
            let done = self.progress.step;
            let (task, rule, schedule, config) =
                (&self.task, &mut self.rule, &self.schedule, &self.config);
            let log = crate::threads::on_worker(|| {
                step(task, rule, schedule, config, done, &mut cursor)
            })?;
            self.progress.step = log.step;
            self.progress.epoch = cursor.epoch;
            self.progress.batch_index = cursor.index;
            self.progress.history.push(log.clone());
            on_event(&TrainEvent::Step(&log));
            let step = log.step;
            let last = step == self.config.max_steps;
            if let Some(eval) = eval {
                if is_due(self.config.eval_every, step, last)
                    || (last && self.config.eval_every.is_none())
                {
                    let result = self.evaluation(eval)?;
                    let entry = EvalLog {
                        step,
                        loss: result.loss,
                        accuracy: result.accuracy,
                    };
                    self.adapters.set_training(true);
                    self.progress.evals.push(entry.clone());
                    on_event(&TrainEvent::Eval(&entry));
                }
            }
            if let (Some(dir), true) = (
                &self.config.output_dir,
                is_due(self.config.save_every, step, last),
            ) {
                let path = dir.join(format!("checkpoint-{step}"));
                self.save_checkpoint(&path)?;
                on_event(&TrainEvent::Checkpoint(&path));
                report.checkpoints.push(path);
            }
        }
        self.adapters.set_training(false);
        report.history = self.progress.history.clone();
        report.evals = self.progress.evals.clone();
        report.note = self.progress.lora_drop_note.clone();
        Ok(report)
    }

    /// The mean loss per target (token, or example for classification) over `data`: every
    /// example once, in batches of the training settings. Leaves the adapters in
    /// evaluation mode (no dropout; `train` switches them back).
    ///
    /// Errors: data the task refuses ([`Task::check`]: a token the model's vocabulary
    /// lacks, a label outside its classes, no target token within `seq_len` in any
    /// example).
    pub fn evaluate(&self, data: &T::Data) -> Result<f64> {
        Ok(self.evaluation(data)?.loss)
    }

    /// [`Trainer::evaluate`]'s pass, with the accuracy for single-label classification.
    pub fn evaluation(&self, data: &T::Data) -> Result<Evaluation> {
        self.task.check(data, &self.config.batch, "eval")?;
        self.adapters.set_training(false);
        let batches = self
            .task
            .batches(data, &self.config.batch, 0, self.config.seed)?;
        let task = &self.task;
        let (sum, units, correct) = crate::threads::on_worker(|| {
            let (mut sum, mut units, mut correct) = (0f64, 0usize, Some(0usize));
            for batch in &batches {
                let (loss, right) = task.evaluate(batch)?;
                sum += loss;
                units += task.units(batch);
                correct = correct.zip(right).map(|(a, b)| a + b);
            }
            Ok::<_, Error>((sum, units, correct))
        })?;
        if units == 0 {
            return Err(Error::settings(
                "eval",
                "dataset",
                "has no target to average the loss over",
            ));
        }
        Ok(Evaluation {
            loss: sum / units as f64,
            accuracy: correct.map(|c| c as f64 / TaskData::len(data) as f64),
        })
    }

    /// The adapted layers.
    pub fn adapters(&self) -> &AdaptedSet {
        &self.adapters
    }

    /// Optimizer steps taken (a resumed run counts the steps before its checkpoint).
    pub fn steps_done(&self) -> usize {
        self.progress.step
    }

    /// The PEFT config the adapter is saved with: the recipe's
    /// ([`AdapterRecipe::peft_config`]), with what PEFT records of the task and model
    /// ([`Task::peft_settings`]): `task_type` (`CAUSAL_LM`, `SEQ_CLS`),
    /// `base_model_name_or_path` (the folder the model was loaded from, when known; PEFT's
    /// `AutoPeftModelFor…` classes read the base model from it), and `fan_in_fan_out` when
    /// the adapted layers are Conv1D (GPT-2), whose weights are stored `(in, out)`. On a
    /// model where PEFT converts `target_modules` into LoRAs on parameters (a mixture of
    /// experts' experts and router), the config says what was trained as PEFT saves it:
    /// the adapted modules' names in place of `all-linear`, and the LoRAs on parameters
    /// ([`PeftConfig::with_parameter_loras`]).
    pub fn peft_config(&self) -> Result<PeftConfig> {
        let mut config = self.recipe.peft_config(self.config.max_steps)?;
        for (key, value) in self.task.peft_settings() {
            config = config.with_setting(key, value)?;
        }
        // PEFT reads `all-linear` on such a model as the experts too (a variant other than
        // LoRA has none): name the modules.
        let all_linear = config.raw.get("target_modules") == Some(&json!("all-linear"));
        if all_linear && self.adapters.peft_converts_module_targets() {
            let names: BTreeSet<String> = self
                .adapters
                .paths()
                .iter()
                .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
                .collect();
            config = config.with_setting("target_modules", json!(names))?;
        }
        config = config.with_parameter_loras(&self.adapters)?;
        let conv1d = self
            .adapters
            .layers()
            .iter()
            .any(|(_, layer)| layer.read().base().kind() == BaseKind::Conv1D);
        if conv1d {
            config = config.with_setting("fan_in_fan_out", json!(true))?;
        }
        Ok(config)
    }

    /// Writes the adapter as a PEFT directory (`adapter_config.json` +
    /// `adapter_model.safetensors`), which PEFT's `PeftModel.from_pretrained` and
    /// [`crate::peft::PeftAdapter::load`] read.
    pub fn save_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
        save_adapter(dir, &self.peft_config()?, &self.adapters)
    }

    /// LoRA-drop's stage 1: `stage1_steps` steps at the peak learning rate on a sample of
    /// the training examples, calibration on the sample, then the unimportant layers moved
    /// onto shared pairs and the rule rebuilt over the new variables.
    fn lora_drop_stage1(&mut self, train: &T::Data) -> Result<String> {
        let layers: Vec<Shared<dyn Adapter>> =
            self.adapters.layers().into_iter().map(|(_, l)| l).collect();
        let drop = LoraDrop::new(&layers, self.recipe.lora_drop.clone())?;
        let (task, adapters) = (&self.task, &self.adapters);
        let options = self.config.batch.clone();
        let settings = &self.recipe.lora_drop;
        let sample = sample_indices(train.len(), settings.sample, settings.seed)?;
        let sample_data = train.subset(&sample)?;
        let mut cursor = Cursor::new(task, &sample_data, options.clone(), self.config.seed, 0, 0);
        let rule = &mut self.rule;
        adapters.set_training(true);
        let stage1 = drop.stage1(
            train.len(),
            |step, _sample| {
                let batch = cursor.next_batch()?;
                let units = task.units(&batch);
                if units == 0 {
                    return Ok(()); // nothing to learn from, as in `step`
                }
                let (_, grads) = backward_batch(task, &batch, units, None)?;
                let mut acc = GradAccumulator::new(rule.vars.clone());
                acc.add(&grads)?;
                apply_step(rule, step, &mut acc)
            },
            |_sample| {
                adapters.set_training(false);
                for batch in task.batches(&sample_data, &options, 0, 0)? {
                    task.loss_sum(&batch, false)?;
                }
                Ok(())
            },
        )?;
        self.share_lora_drop(&drop, &stage1.importance)?;
        let note = self.progress.lora_drop_note.clone().unwrap_or_default();
        Ok(note)
    }

    /// Moves LoRA-drop's unselected layers onto shared pairs by `importance` and rebuilds
    /// the rule (a fresh optimizer over the new variables).
    pub(super) fn share_lora_drop(
        &mut self,
        drop: &LoraDrop,
        importance: &[LayerImportance],
    ) -> Result<()> {
        let vb = VarBuilder::from_varmap(&self.shared_vars, self.rule_dtype(), self.task.device());
        let report = drop.share_unselected(importance, vb.pp("shared"))?;
        self.rule = Rule::new(&self.recipe, &self.adapters, &self.config)?;
        self.progress.lora_drop = Some(
            importance
                .iter()
                .map(|i| (i.name.clone(), i.raw, i.importance))
                .collect(),
        );
        self.progress.lora_drop_note = Some(format!(
            "LoRA-drop kept {} of {} layers ({}), shared {} pair(s): {} -> {} trainable parameters",
            report.selected.len(),
            report.selected.len() + report.shared.len(),
            report.selected.join(", "),
            report.shared_pairs,
            report.params_before,
            report.params_after,
        ));
        Ok(())
    }

    /// The dtype of the trainable variables (that of new shared pairs).
    fn rule_dtype(&self) -> candle_core::DType {
        self.rule
            .vars
            .first()
            .map(|v| v.dtype())
            .unwrap_or(candle_core::DType::F32)
    }
}

/// Whether a periodic action is due after `step`.
fn is_due(every: Option<usize>, step: usize, last: bool) -> bool {
    match every {
        Some(n) => last || step.is_multiple_of(n),
        None => false,
    }
}

/// One optimizer step over `grad_accum` batches from `cursor`, after `done` steps.
fn step<T: Task>(
    task: &T,
    rule: &mut Rule,
    schedule: &LrSchedule,
    config: &TrainConfig,
    done: usize,
    cursor: &mut Cursor<T>,
) -> Result<StepLog> {
    let start = Instant::now();
    let step = done + 1;
    let factor = schedule.factor(step - 1);
    rule.optimizer.set_lr_factor(factor);
    let batches = (0..config.grad_accum)
        .map(|_| cursor.next_batch())
        .collect::<Result<Vec<_>>>()?;
    let targets: usize = batches.iter().map(|b| task.units(b)).sum();
    let mut log = StepLog {
        step,
        loss: None,
        lr: config.lr * factor,
        grad_norm: 0.0,
        targets,
        seconds: 0.0,
    };
    if targets == 0 {
        // Nothing to learn from: no update, no optimizer state moved.
        log.seconds = start.elapsed().as_secs_f64();
        return Ok(log);
    }
    let mut acc = GradAccumulator::new(rule.vars.clone());
    // The batches' summed losses add up on the device and are read once, after the last.
    let mut loss_sum: Option<Tensor> = None;
    for (i, batch) in batches.iter().enumerate() {
        // The penalty enters once per step, with the first batch.
        let extra = if i == 0 { rule.extra_loss()? } else { None };
        let (sum, grads) = backward_batch(task, batch, targets, extra)?;
        add_to_total(&mut loss_sum, sum.to_dtype(reduction_dtype(sum.device()))?)?;
        acc.add(&grads)?;
    }
    let loss_sum = loss_sum.as_ref().map(host_scalar).transpose()?;
    let loss = loss_sum.unwrap_or(0.0) / targets as f64;
    if !loss.is_finite() {
        return Err(Error::settings(
            "training",
            "loss",
            format!("step {step}: the loss is {loss}; lower the learning rate (the step was not applied)"),
        ));
    }
    let reached = |v: &candle_core::Var| acc.store().get(v.as_tensor()).is_some();
    if !rule.vars.iter().any(reached) {
        return Err(Error::settings(
            "training",
            "adapters",
            format!("step {step}: no trainable variable received a gradient, the loss does not reach the adapters (on a NamedAdapters model, make the adapter being trained the active one)"),
        ));
    }
    log.grad_norm = acc.clip_global_norm(config.max_grad_norm)?;
    apply_step(rule, step, &mut acc)?;
    log.loss = Some(loss);
    log.seconds = start.elapsed().as_secs_f64();
    Ok(log)
}

/// Forward (in training mode) and backward of one batch: returns the batch's summed loss
/// (detached, on the device) and the gradients of `(sum + extra) / targets`-scaled loss
/// (`extra` is added unscaled). Callers skip steps without targets, so `targets` is at
/// least 1.
fn backward_batch<T: Task>(
    task: &T,
    batch: &T::Batch,
    targets: usize,
    extra: Option<Tensor>,
) -> Result<(Tensor, GradStore)> {
    let sum = task.loss_sum(batch, true)?;
    let mut loss = (&sum / targets as f64)?;
    if let Some(extra) = extra {
        let extra = extra.to_dtype(loss.dtype())?;
        loss = (loss + extra)?;
    }
    let grads = loss.backward()?;
    Ok((sum.detach(), grads))
}

/// The variant's hooks around one AdamW step on the accumulated gradients.
fn apply_step(rule: &mut Rule, step: usize, acc: &mut GradAccumulator) -> Result<()> {
    for hook in rule.hooks_mut() {
        hook.before_step(step, acc.store_mut())?;
    }
    rule.optimizer.step(acc.store())?;
    for hook in rule.hooks_mut() {
        hook.after_step(step, acc.store())?;
    }
    Ok(())
}
