//! [`SequenceClassification`]: the [`Task`] of fine-tuning a sequence classifier (BERT's
//! `SEQ_CLS`) on [`LabeledDataset`]s — transformers' loss for the model's problem type
//! (cross-entropy, binary cross-entropy with logits, mean squared error), averaged over the
//! examples of an optimizer step, and the accuracy of single-label classification.
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use lorakit::finetune::labeled::LabeledDataset;
//! use lorakit::finetune::{AdapterRecipe, TrainConfig, Trainer};
//! use lorakit::models::bert::{BertConfig, BertForSequenceClassification};
//! use lorakit::tokenizer::TextTokenizer;
//! use lorakit::Variant;
//! # fn main() -> lorakit::Result<()> {
//! let dir = "tests/fixtures/finetune/classify"; // a tiny BERT encoder without a head
//! let dev = Device::Cpu;
//! let mut config = BertConfig::from_file(format!("{dir}/encoder/config.json"))?;
//! config.num_labels = 2; // transformers' `num_labels=2`
//! // No dropout: candle draws its masks unseeded, and on 24 sentences a run could then
//! // stall at chance (this example once did, 1 run in many).
//! (config.hidden_dropout_prob, config.attention_probs_dropout_prob) = (0.0, 0.0);
//! let mut recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["query", "value"]);
//! recipe.modules_to_save = vec!["classifier".into()]; // a new head trains, as in PEFT
//! let vars = VarMap::new();
//! let plan = recipe.plan(VarBuilder::from_varmap(&vars, DType::F32, &dev), &[], DType::F32, &dev)?;
//! let model = BertForSequenceClassification::from_pretrained_with(
//!     format!("{dir}/encoder"), &config, DType::F32, &dev, &plan)?;
//!
//! let tok = TextTokenizer::from_dir(format!("{dir}/tokenizer"))?;
//! let data = LabeledDataset::from_jsonl(format!("{dir}/train.jsonl"), &tok, 16)?;
//! let mut settings = TrainConfig::new(40);
//! (settings.lr, settings.batch.seq_len) = (2e-2, 16);
//! let mut trainer = Trainer::for_classifier(&model, plan.finish()?, recipe, settings)?;
//! let before = trainer.evaluation(&data)?;
//! trainer.train(&data, None, |_| {})?;
//! let after = trainer.evaluation(&data)?;
//! assert!(after.loss < before.loss, "{before:?} -> {after:?}");
//! assert!(after.accuracy.unwrap() >= before.accuracy.unwrap());
//! # Ok(()) }
//! ```

use candle_core::{Device, Tensor, D};
use serde_json::Value;

use super::batching::BatchOptions;
use super::labeled::{check_options, inferred_problem, LabelSpace, LabeledBatch, LabeledDataset};
use super::task::{peft_settings, Task, TaskData};
use crate::error::Result;
use crate::models::SequenceClassifier;

impl TaskData for LabeledDataset {
    fn len(&self) -> usize {
        LabeledDataset::len(self)
    }

    fn subset(&self, indices: &[usize]) -> Result<Self> {
        LabeledDataset::subset(self, indices)
    }
}

/// Sequence classification: [`LabeledDataset`]s, each batch's loss the model's
/// ([`SequenceClassifier::loss`], transformers' for the problem type) times its examples,
/// so a step's loss is the mean over its examples. The problem type is the model config's,
/// or, when it names none, transformers' choice for the labels (regression for one
/// output, single-label classification for class indices, multi-label otherwise). The
/// saved adapter records `task_type` `SEQ_CLS`.
#[derive(Clone, Copy)]
pub struct SequenceClassification<'m> {
    model: &'m dyn SequenceClassifier,
}

impl<'m> SequenceClassification<'m> {
    /// The task for `model`.
    pub fn new(model: &'m dyn SequenceClassifier) -> Self {
        Self { model }
    }

    /// The model.
    pub fn model(&self) -> &'m dyn SequenceClassifier {
        self.model
    }

    /// The labels the model takes for `data`: its problem type (the config's, or inferred
    /// from the labels), outputs and class names.
    fn label_space(&self, data: &LabeledDataset) -> Result<LabelSpace> {
        let n = self.model.num_labels();
        let problem = match self.model.problem_type() {
            Some(problem) => problem,
            None => inferred_problem(data, n)?,
        };
        Ok(LabelSpace::new(problem, n).with_names(self.model.label_names()))
    }

    fn logits(&self, batch: &LabeledBatch, train: bool) -> Result<Tensor> {
        // A model without token types (DistilBERT) is given none, as transformers'
        // tokenizer for it gives none whatever the tokenizer file's template says.
        let types = self
            .model
            .reads_token_types()
            .then_some(&batch.token_type_ids);
        self.model
            .classify(&batch.input_ids, types, Some(&batch.attention_mask), train)
    }

    fn summed_loss(&self, logits: &Tensor, batch: &LabeledBatch) -> Result<Tensor> {
        let mean = self.model.loss(logits, &batch.labels)?;
        Ok((mean.to_dtype(candle_core::DType::F32)? * batch.rows() as f64)?)
    }
}

/// A decoder classifier reads each row at its last token that is not its `pad_token_id`:
/// the batches must pad with that id, and without one hold a single row.
fn check_last_token_padding(model: &dyn SequenceClassifier, options: &BatchOptions) -> Result<()> {
    if !model.reads_last_token() {
        return Ok(());
    }
    let reason = match model.pad_token_id() {
        Some(pad) if pad != options.pad_id => format!(
            "the model reads each row at its last token that is not its pad_token_id {pad}, \
             but the batches pad with {}: set the batch options' pad_id to {pad}",
            options.pad_id
        ),
        None if options.batch_size > 1 => format!(
            "the model's config has no pad_token_id, so it cannot find each row's last token \
             in a padded batch of {}: set one in its config (the tokenizer's padding token)",
            options.batch_size
        ),
        _ => return Ok(()),
    };
    Err(crate::error::Error::settings("batch", "pad_id", reason))
}

impl Task for SequenceClassification<'_> {
    type Data = LabeledDataset;
    type Batch = LabeledBatch;

    fn device(&self) -> &Device {
        self.model.device()
    }

    fn max_positions(&self) -> Option<usize> {
        self.model.max_positions()
    }

    /// Errors: an id outside the vocabulary or the token types, an example longer than
    /// `seq_len`, a label the problem type does not take (a class index past
    /// `num_labels`, values of another count), or [`Packing::Pack`](super::Packing::Pack).
    fn check(&self, data: &LabeledDataset, options: &BatchOptions, _what: &str) -> Result<()> {
        check_options(options)?;
        check_last_token_padding(self.model, options)?;
        data.check(
            self.model.vocab_size(),
            match self.model.reads_token_types() {
                true => self.model.type_vocab_size(),
                false => usize::MAX,
            },
            options.seq_len,
            &self.label_space(data)?,
        )
    }

    fn batches(
        &self,
        data: &LabeledDataset,
        options: &BatchOptions,
        epoch: usize,
        seed: u64,
    ) -> Result<Vec<LabeledBatch>> {
        let space = self.label_space(data)?;
        data.batches(options, epoch, seed, &space, self.model.device())
    }

    fn units(&self, batch: &LabeledBatch) -> usize {
        batch.rows()
    }

    fn loss_sum(&self, batch: &LabeledBatch, train: bool) -> Result<Tensor> {
        let logits = self.logits(batch, train)?;
        self.summed_loss(&logits, batch)
    }

    /// The summed loss and, for class-index labels, the examples whose highest logit is
    /// their class.
    fn evaluate(&self, batch: &LabeledBatch) -> Result<(f64, Option<usize>)> {
        let logits = self.logits(batch, false)?;
        let sum = self.summed_loss(&logits, batch)?.to_scalar::<f32>()?;
        let correct = match batch.labels.dtype() {
            candle_core::DType::U32 => {
                let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
                let labels = batch.labels.to_vec1::<u32>()?;
                Some(
                    predicted
                        .iter()
                        .zip(&labels)
                        .filter(|(p, l)| p == l)
                        .count(),
                )
            }
            _ => None,
        };
        Ok((f64::from(sum), correct))
    }

    fn peft_settings(&self) -> Vec<(&'static str, Value)> {
        let model = self.model;
        peft_settings("SEQ_CLS", model.name_or_path(), model.modules_not_built())
    }
}
