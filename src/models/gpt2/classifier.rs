//! [`Gpt2ForSequenceClassification`]: transformers' `GPT2ForSequenceClassification` —
//! GPT-2, then `score`, a linear layer without bias, on each row's last token that is not
//! padding.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::model::{AdapterPlan, Linear};
use crate::models::classification::ClassifierConfig;
use crate::models::decoder_classifier::{AsDecoderParts, DecoderParts};

use super::config::Gpt2Config;
use super::trunk::Gpt2Trunk;

/// GPT-2 with a classification head (transformers' `GPT2ForSequenceClassification`),
/// every module from an [`AdapterPlan`] at transformers' paths (`transformer.…`, `score`):
/// a PEFT `SEQ_CLS` adapter (`score` in `modules_to_save`) loads unchanged, a fresh plan
/// of any variant trains.
///
/// [`forward`](Self::forward) reads each row at its last token that is not the config's
/// `pad_token_id`, as transformers does. With an attention mask, left padding is masked
/// out of attention and, as in transformers' forward without `position_ids`, positions
/// count from the row's first slot — GPT-2's positions are absolute, so a left-padded row
/// does not give what it gives alone (in transformers either).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lorakit::models::gpt2::Gpt2ForSequenceClassification;
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// // A tiny GPT-2 classifier saved by transformers, a PEFT SEQ_CLS LoRA on c_attn, c_fc
/// // (scripts/make_decoder_cls_fixtures.py).
/// let dir = "tests/fixtures/decoder_cls/gpt2";
/// let dev = Device::Cpu;
/// let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
/// let model = Gpt2ForSequenceClassification::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
/// plan.finish()?;
/// let ids = Tensor::new(&[[5u32, 9, 2, 7], [11, 3, 0, 0]], &dev)?; // pad_token_id 0
/// let logits = model.forward(&ids, None)?;
/// assert_eq!(logits.dims(), [2, 3]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Gpt2ForSequenceClassification(DecoderParts<Gpt2Trunk>);

impl Gpt2ForSequenceClassification {
    /// Builds the model from `vb` (transformers' tensor names: `transformer.…`,
    /// `score.weight`), every module made by `plan`; call [`AdapterPlan::finish`]
    /// afterwards. Without `score.weight` in the checkpoint (a language model), a new head
    /// is initialised as transformers does when `plan` trains `score`
    /// (`modules_to_save`); otherwise the missing tensor is an error.
    pub fn load(
        config: &Gpt2Config,
        labels: &ClassifierConfig,
        vb: VarBuilder,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        DecoderParts::load(config, labels, vb, plan).map(Self)
    }

    /// Reads `config.json` (the model's and the classification fields) from the model
    /// folder `dir` and builds the model in `dtype` on `device` with
    /// [`load`](Self::load).
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        DecoderParts::from_folder(dir.as_ref(), None, dtype, device, plan).map(Self)
    }

    /// [`from_pretrained`](Self::from_pretrained) with `labels` in place of the
    /// classification fields of the folder's `config.json`.
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        labels: &ClassifierConfig,
        dtype: DType,
        device: &Device,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        DecoderParts::from_folder(dir.as_ref(), Some(labels), dtype, device, plan).map(Self)
    }

    /// Logits `(batch, num_labels)` for token ids `(batch, seq)`, as
    /// [`LlamaForSequenceClassification::forward`](crate::models::llama::LlamaForSequenceClassification::forward)
    /// (`1 ≤ seq ≤ n_positions`), in evaluation mode; in training mode (the config's
    /// dropouts, as [`Gpt2LmHeadModel::forward_t`](super::Gpt2LmHeadModel::forward_t)):
    /// [`SequenceClassifier::classify`](crate::models::SequenceClassifier::classify) with
    /// `train = true`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.0.forward(input_ids, attention_mask, false)
    }

    /// The training loss of `logits` against `labels` for the config's problem type.
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        self.0.head.loss(logits, labels)
    }

    /// GPT-2's configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.0.trunk.config
    }

    /// The classification fields: labels, problem type, pad id.
    pub fn labels(&self) -> &ClassifierConfig {
        &self.0.head.labels
    }

    /// The classification head (`score`).
    pub fn score(&self) -> &Linear {
        &self.0.head.score
    }

    /// The model folder [`from_pretrained`](Self::from_pretrained) read, as given.
    pub fn name_or_path(&self) -> Option<&str> {
        self.0.name_or_path.as_deref()
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.0.trunk.device
    }
}

impl AsDecoderParts for Gpt2ForSequenceClassification {
    type Trunk = Gpt2Trunk;

    fn parts(&self) -> &DecoderParts<Gpt2Trunk> {
        &self.0
    }
}
