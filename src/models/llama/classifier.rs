//! [`LlamaForSequenceClassification`]: transformers' `LlamaForSequenceClassification` (and
//! the other Llama families' classifiers, `Gemma3ForSequenceClassification` among them) —
//! the decoder, then `score`, a linear layer without bias, on each row's last token that is
//! not padding.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::model::{AdapterPlan, Linear};
use crate::models::classification::ClassifierConfig;
use crate::models::decoder_classifier::{AsDecoderParts, DecoderParts};

use super::config::LlamaConfig;
use super::trunk::LlamaTrunk;

/// A Llama-family decoder with a classification head (transformers'
/// `LlamaForSequenceClassification`, `MistralForSequenceClassification`,
/// `Qwen2ForSequenceClassification`, `Qwen3ForSequenceClassification`): reward models and
/// classifiers fine-tuned from a causal language model.
///
/// Every module comes from an [`AdapterPlan`] at transformers' paths (`model.…`, `score`),
/// so a PEFT `SEQ_CLS` adapter — LoRA or any variant on the decoder, `score` in
/// `modules_to_save` — loads unchanged, and a fresh plan of any variant trains.
///
/// [`forward`](Self::forward) runs the decoder over `(batch, seq)` token ids and reads each
/// row at its last token that is not the config's `pad_token_id` (transformers' rule,
/// which takes padding on either side); with an attention mask, left padding is masked
/// out of attention and positions count from the row's first slot, as transformers'
/// forward does. The labels, problem type and pad id come from the same `config.json`
/// ([`ClassifierConfig`]).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lorakit::models::llama::LlamaForSequenceClassification;
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// // A tiny Qwen2 classifier saved by transformers, a PEFT SEQ_CLS LoRA
/// // (scripts/make_decoder_cls_fixtures.py).
/// let dir = "tests/fixtures/decoder_cls/qwen2";
/// let dev = Device::Cpu;
/// let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
/// let model = LlamaForSequenceClassification::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
/// plan.finish()?; // every tensor of the adapter file was used, `score` included
/// let pad = model.labels().pad_token_id.unwrap();
/// let ids = Tensor::new(&[[5u32, 9, 2, 7], [11, 3, pad, pad]], &dev)?;
/// let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 0, 0]], &dev)?;
/// let logits = model.forward(&ids, Some(&mask))?;
/// assert_eq!(logits.dims(), [2, model.labels().num_labels]);
/// // The second row is read at its last real token: it gives what it gives alone.
/// let alone = model.forward(&Tensor::new(&[[11u32, 3]], &dev)?, None)?;
/// let diff = (logits.get(1)? - alone.get(0)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LlamaForSequenceClassification(DecoderParts<LlamaTrunk>);

impl LlamaForSequenceClassification {
    /// Builds the model from `vb` (transformers' tensor names: `model.…`, `score.weight`)
    /// with every module made by `plan`; call [`AdapterPlan::finish`] afterwards.
    ///
    /// A checkpoint without `score.weight` (a causal language model, not yet fine-tuned
    /// for classification) gets a new head as transformers initialises it —
    /// `N(0, initializer_range²)` from a fixed seed — when `plan` trains or replaces
    /// `score` (`modules_to_save`, as PEFT's `SEQ_CLS` task sets); otherwise the missing
    /// tensor is an error.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::checkpoint::Checkpoint;
    /// use lorakit::finetune::AdapterRecipe;
    /// use lorakit::models::classification::ClassifierConfig;
    /// use lorakit::models::llama::{LlamaConfig, LlamaForSequenceClassification};
    /// use lorakit::Variant;
    /// # fn main() -> lorakit::Result<()> {
    /// // A causal LM (no `score`), to fine-tune into a 3-class classifier with DoRA.
    /// let dir = "tests/fixtures/models/llama/mistral/base";
    /// let dev = Device::Cpu;
    /// let config = LlamaConfig::from_file(dir)?;
    /// let labels = ClassifierConfig { num_labels: 3, pad_token_id: Some(0), ..ClassifierConfig::default() };
    /// let mut recipe = AdapterRecipe::new(Variant::Dora, 4, 8.0, &["q_proj", "v_proj"]);
    /// recipe.modules_to_save = vec!["score".into()]; // the new head trains in full
    /// let vars = VarMap::new();
    /// let plan = recipe.plan(VarBuilder::from_varmap(&vars, DType::F32, &dev), &[], DType::F32, &dev)?;
    /// let vb = Checkpoint::open(dir)?.var_builder(DType::F32, &dev);
    /// let model = LlamaForSequenceClassification::load(&config, &labels, vb, &plan)?;
    /// let logits = model.forward(&Tensor::new(&[[3u32, 1, 4]], &dev)?, None)?;
    /// assert_eq!(logits.dims(), [1, 3]);
    /// // Without a plan for `score`, the missing head is an error naming it.
    /// let vb = Checkpoint::open(dir)?.var_builder(DType::F32, &dev);
    /// let none = lorakit::model::AdapterPlan::none();
    /// let err = LlamaForSequenceClassification::load(&config, &labels, vb, &none).unwrap_err();
    /// assert!(err.to_string().contains("score"));
    /// # Ok(()) }
    /// ```
    pub fn load(
        config: &LlamaConfig,
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
    /// classification fields of the folder's `config.json`: transformers'
    /// `from_pretrained(dir, num_labels=…, pad_token_id=…)` on a causal language model.
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        labels: &ClassifierConfig,
        dtype: DType,
        device: &Device,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        DecoderParts::from_folder(dir.as_ref(), Some(labels), dtype, device, plan).map(Self)
    }

    /// Logits `(batch, num_labels)` for token ids `(batch, seq)` (u8, u32 or i64, below
    /// `vocab_size`), each row read at its last token that is not `pad_token_id` (the
    /// last slot when the config has no pad id: then only one row). `attention_mask`
    /// `(batch, seq)`, non-zero for tokens, may pad rows on the left (masked from
    /// attention) or on the right (which causal attention never lets a real token see);
    /// a row with padding on both sides or in the middle is an error. Evaluation mode; in
    /// training mode (the config's `attention_dropout`):
    /// [`SequenceClassifier::classify`](crate::models::SequenceClassifier::classify) with
    /// `train = true`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.0.forward(input_ids, attention_mask, false)
    }

    /// The training loss of `logits` against `labels` for the config's problem type
    /// ([`classification_loss`](crate::models::classification::classification_loss)).
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        self.0.head.loss(logits, labels)
    }

    /// The decoder's configuration.
    pub fn config(&self) -> &LlamaConfig {
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

    /// The model folder [`from_pretrained`](Self::from_pretrained) read, as given; `None`
    /// for a model built with [`load`](Self::load).
    pub fn name_or_path(&self) -> Option<&str> {
        self.0.name_or_path.as_deref()
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.0.trunk.device
    }
}

impl AsDecoderParts for LlamaForSequenceClassification {
    type Trunk = LlamaTrunk;

    fn parts(&self) -> &DecoderParts<LlamaTrunk> {
        &self.0
    }
}
