//! [`Task`]: what a [`Trainer`](super::Trainer) trains a model for — the data it reads,
//! how it batches them and the loss it sums — and [`LanguageModeling`], next-token
//! prediction on a [`CausalLm`] (sequence classification is
//! [`super::classification::SequenceClassification`]).

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::batching::{Batch, BatchOptions};
use super::data::Dataset;
use crate::error::{Error, Result, Scope};
use crate::models::CausalLm;

/// A dataset a [`Task`] trains on: [`LoRA-drop`](crate::train::LoraDrop)'s first stage
/// trains on a sample of its examples.
pub trait TaskData: Sized {
    /// The number of examples.
    fn len(&self) -> usize;
    /// Whether there is no example.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The examples at `indices`, in that order. Errors: an index out of range.
    fn subset(&self, indices: &[usize]) -> Result<Self>;
}

impl TaskData for Dataset {
    fn len(&self) -> usize {
        Dataset::len(self)
    }

    fn subset(&self, indices: &[usize]) -> Result<Self> {
        Dataset::subset(self, indices)
    }
}

/// What a [`Trainer`](super::Trainer) trains a model for: how a dataset becomes batches,
/// and each batch's loss summed over its *units* (target tokens for language modeling,
/// examples for classification). An optimizer step's loss is the sum over its batches
/// divided by their units, as transformers' `Trainer` averages over a step's accumulated
/// micro-batches.
///
/// lorakit implements it for causal language models ([`LanguageModeling`], what
/// [`Trainer::new`](super::Trainer::new) builds) and sequence classifiers
/// ([`super::classification::SequenceClassification`],
/// [`Trainer::for_classifier`](super::Trainer::for_classifier)); implement it for another
/// objective and build the trainer with [`Trainer::with_task`](super::Trainer::with_task).
///
/// `Sync`, with `Sync` data and `Send + Sync` batches: the trainer runs its steps on one of
/// rayon's worker threads ([`crate::threads::on_worker`]).
pub trait Task: Sync {
    /// The training and evaluation data.
    type Data: TaskData + Sync;
    /// One batch of it (cloning it must be cheap: candle tensors share their storage).
    type Batch: Clone + Send + Sync;

    /// The device the model (and so every batch) lives on.
    fn device(&self) -> &Device;

    /// The longest sequence the model can take, when it has a hard limit: a `seq_len`
    /// beyond it is refused when the trainer is built.
    fn max_positions(&self) -> Option<usize>;

    /// Errors unless `data` (the `what` set, "training" or "eval") can be trained on or
    /// evaluated with `options`: ids outside the model's vocabulary, labels outside its
    /// classes, no unit to average over, options the task cannot batch with.
    fn check(&self, data: &Self::Data, options: &BatchOptions, what: &str) -> Result<()>;

    /// One epoch's batches, in an order shuffled by `(seed, epoch)`.
    fn batches(
        &self,
        data: &Self::Data,
        options: &BatchOptions,
        epoch: usize,
        seed: u64,
    ) -> Result<Vec<Self::Batch>>;

    /// The units `batch`'s loss sums over (at least 1 for a batch worth a step).
    fn units(&self, batch: &Self::Batch) -> usize;

    /// `batch`'s loss summed over its units: a scalar f32 tensor that gradients flow from.
    /// `train`: the model's training mode (dropout), as transformers' `model.train()`.
    fn loss_sum(&self, batch: &Self::Batch, train: bool) -> Result<Tensor>;

    /// In evaluation mode, `batch`'s summed loss and, for tasks that predict one class per
    /// example, how many predictions were right (`None` otherwise).
    fn evaluate(&self, batch: &Self::Batch) -> Result<(f64, Option<usize>)> {
        let sum = self.loss_sum(batch, false)?.to_scalar::<f32>()?;
        Ok((f64::from(sum), None))
    }

    /// What PEFT's `adapter_config.json` records of the task and the model: `task_type`
    /// and, when known, `base_model_name_or_path`.
    fn peft_settings(&self) -> Vec<(&'static str, Value)>;
}

/// Next-token prediction on a causal language model: [`Dataset`]s of token ids with the
/// tokens the loss counts, the causal-LM loss ([`CausalLm::loss_sum`]) summed over target
/// tokens. The saved adapter records `task_type` `CAUSAL_LM`.
#[derive(Clone, Copy)]
pub struct LanguageModeling<'m> {
    model: &'m dyn CausalLm,
}

impl<'m> LanguageModeling<'m> {
    /// The task for `model`.
    pub fn new(model: &'m dyn CausalLm) -> Self {
        Self { model }
    }

    /// The model.
    pub fn model(&self) -> &'m dyn CausalLm {
        self.model
    }
}

impl Task for LanguageModeling<'_> {
    type Data = Dataset;
    type Batch = Batch;

    fn device(&self) -> &Device {
        self.model.device()
    }

    fn max_positions(&self) -> Option<usize> {
        self.model.max_positions()
    }

    /// Errors: a token the model's vocabulary lacks, or no example of a non-empty `data`
    /// keeping a target token within `seq_len` ([`Dataset::examples_without_targets`]).
    fn check(&self, data: &Dataset, options: &BatchOptions, what: &str) -> Result<()> {
        data.check_vocab(self.model.vocab_size())?;
        if data.is_empty() || data.examples_without_targets(options) < data.len() {
            return Ok(());
        }
        Err(Error::usage(
            Scope::Settings("dataset".into()),
            format!(
                "none of the {} {what} examples has a target token within seq_len {}: their \
                 prompts fill the rows and cut every completion off; raise seq_len, shorten \
                 the prompts, or pack (Packing::Pack)",
                data.len(),
                options.seq_len
            ),
        ))
    }

    fn batches(
        &self,
        data: &Dataset,
        options: &BatchOptions,
        epoch: usize,
        seed: u64,
    ) -> Result<Vec<Batch>> {
        data.batches(options, epoch, seed, self.model.device())
    }

    fn units(&self, batch: &Batch) -> usize {
        batch.target_tokens
    }

    fn loss_sum(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        self.model
            .loss_sum_t(&batch.input_ids, &batch.loss_mask, train)
    }

    fn evaluate(&self, batch: &Batch) -> Result<(f64, Option<usize>)> {
        let sum = self
            .model
            .eval_loss_sum(&batch.input_ids, &batch.loss_mask)?;
        Ok((f64::from(sum.to_scalar::<f32>()?), None))
    }

    fn peft_settings(&self) -> Vec<(&'static str, Value)> {
        let model = self.model;
        peft_settings("CAUSAL_LM", model.name_or_path(), model.modules_not_built())
    }
}

/// PEFT's `exclude_modules` for the module prefixes `prefixes`: a regex (which PEFT matches
/// against whole module paths) for every module under one of them; `None` for none.
fn exclude_regex(prefixes: &[&str]) -> Option<String> {
    if prefixes.is_empty() {
        return None;
    }
    let alternatives: Vec<String> = prefixes.iter().map(|p| p.replace('.', r"\.")).collect();
    Some(format!(r"({})\..*", alternatives.join("|")))
}

/// PEFT's `task_type`, when known `base_model_name_or_path`, and `exclude_modules` for the
/// module prefixes the model does not build (`not_built`).
pub(crate) fn peft_settings(
    task_type: &str,
    name_or_path: Option<&str>,
    not_built: &[&str],
) -> Vec<(&'static str, Value)> {
    let mut settings = vec![("task_type", json!(task_type))];
    if let Some(name) = name_or_path {
        settings.push(("base_model_name_or_path", json!(name)));
    }
    if let Some(exclude) = exclude_regex(not_built) {
        settings.push(("exclude_modules", json!(exclude)));
    }
    settings
}
