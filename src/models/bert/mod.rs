//! BERT, the RoBERTa family, DistilBERT and ELECTRA for sequence classification:
//! transformers' `BertForSequenceClassification`, `RobertaForSequenceClassification`,
//! `XLMRobertaForSequenceClassification`, `CamembertForSequenceClassification`,
//! `DistilBertForSequenceClassification` and `ElectraForSequenceClassification`
//! ([`BertForSequenceClassification`], the member
//! chosen by the config's `model_type`: [`BertFamily`]) with every module built through
//! the model-level API at transformers' own paths (`bert.embeddings.word_embeddings`,
//! `bert.encoder.layer.N.attention.self.query`, …, `bert.pooler.dense`, `classifier`;
//! `roberta.…`, `classifier.dense`, `classifier.out_proj`;
//! `distilbert.transformer.layer.N.attention.q_lin`, …, `pre_classifier`, `classifier`;
//! `electra.embeddings_project`, `electra.…`, `classifier.dense`, `classifier.out_proj`),
//! so a PEFT adapter's `target_modules`,
//! `modules_to_save: ["classifier"]` and `bias = "all"` (norm biases through
//! [`AdapterPlan::bias`]) apply unchanged; its configuration ([`BertConfig`]) is read from
//! transformers' `config.json`.
//!
//! The forward is transformers' eager one: embeddings (word + token type (none in
//! DistilBERT) + absolute position, then LayerNorm; BERT and DistilBERT number positions
//! `0, 1, …`, the RoBERTa family from
//! `pad_token_id + 1` past the padding tokens), post-norm encoder layers (attention scores
//! scaled by `1/sqrt(head_dim)`, padded keys given no weight, as transformers' additive
//! mask of the dtype's most negative value does;
//! [`crate::models::fused::bidirectional_attention`], one fused op for f32 CPU tensors),
//! then the head on the first token: BERT's pooler (`tanh` of a dense layer) and linear
//! classifier, RoBERTa's `classifier.dense`, `tanh`, `classifier.out_proj` (ELECTRA's
//! with GELU, after its embeddings' projection to the model width), or DistilBERT's
//! `pre_classifier`, ReLU, `classifier`. Dropout runs
//! only in [`BertForSequenceClassification::forward_t`] with `train = true`.

mod config;
mod config_json;
mod distilbert_config;
mod encoder;
mod head;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::AdapterPlan;
use crate::models::base_prefix::with_base_prefix;
use crate::models::classification::classification_loss;
pub use crate::models::classification::ProblemType;
use crate::models::fused;

pub use config::{BertConfig, BertFamily, HiddenAct, PositionEmbeddingType};
use encoder::{layer_path, BertEmbeddings, BertLayer};
use head::ClassificationHead;
pub(crate) use head::POOLER;

/// transformers' RoBERTa-family classifiers (`roberta`, `xlm-roberta`, `camembert`) are
/// [`BertForSequenceClassification`] built from a config of that family: one
/// implementation, the differences switched by [`BertConfig::family`].
pub type RobertaForSequenceClassification = BertForSequenceClassification;

/// transformers' `DistilBertForSequenceClassification` is [`BertForSequenceClassification`]
/// built from a DistilBERT config ([`BertFamily::DistilBert`]).
pub type DistilBertForSequenceClassification = BertForSequenceClassification;

/// transformers' `BertForSequenceClassification` (BERT, its pooler and a linear
/// classifier), the RoBERTa family's and ELECTRA's classifiers (no pooler, a two-layer
/// head) and DistilBERT's (`pre_classifier` and `classifier`; see [`BertFamily`]), every
/// module built through [`crate::model::linear`] / [`crate::model::embedding`] at
/// transformers' paths, so the plan's adapters, `modules_to_save` copies and trained
/// biases (LayerNorms' included, through [`AdapterPlan::bias`]) apply as PEFT applies them.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lorakit::checkpoint::Checkpoint;
/// use lorakit::models::bert::{BertConfig, BertForSequenceClassification};
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// let dir = std::path::Path::new("tests/fixtures/peft_options/bert_cls");
/// let dev = Device::Cpu;
/// let config = BertConfig::from_file(dir.join("base/config.json"))?;
/// let vb = Checkpoint::open(dir.join("base"))?.var_builder(DType::F32, &dev);
/// // PEFT's LoRA on query/value, bias = "all", the classifier in modules_to_save.
/// let plan = PeftAdapter::load(dir.join("adapter"), &dev)?.plan()?;
/// let model = BertForSequenceClassification::load(&config, vb, &plan)?;
/// let set = plan.finish()?; // every tensor of the adapter file was used
/// assert_eq!(set.paths().len(), 4); // query and value of both layers
/// let ids = Tensor::new(&[[14u32, 25, 8, 27, 13], [12, 49, 20, 13, 60]], &dev)?;
/// let mask = Tensor::new(&[[1u32, 1, 1, 0, 0], [1, 1, 1, 1, 1]], &dev)?;
/// let logits = model.forward(&ids, None, Some(&mask))?;
/// assert_eq!(logits.dims(), [2, 3]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct BertForSequenceClassification {
    config: BertConfig,
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    head: ClassificationHead,
    device: Device,
    name_or_path: Option<String>,
}

impl BertForSequenceClassification {
    /// Reads `config.json` and the checkpoint (one file or shards) in the folder `dir` and
    /// builds the model in `dtype` on `device` with [`load`](Self::load).
    ///
    /// A Hub encoder (`bert-base-uncased`) has no classifier, and its config no labels: set
    /// the number of classes with [`from_pretrained_with`](Self::from_pretrained_with).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::bert::BertForSequenceClassification;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/bert_cls/base";
    /// let model = BertForSequenceClassification::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// assert_eq!((model.config().num_labels, model.name_or_path()), (3, Some(dir)));
    /// # Ok(()) }
    /// ```
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let config = BertConfig::from_file(dir.join("config.json"))?;
        Self::from_pretrained_with(dir, &config, dtype, device, plan)
    }

    /// [`from_pretrained`](Self::from_pretrained) with `config` in place of the folder's
    /// `config.json`: transformers' `from_pretrained(dir, num_labels=…)`.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
    /// use lorakit::models::bert::{BertConfig, BertForSequenceClassification};
    /// use lorakit::LoraConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = std::path::Path::new("tests/fixtures/peft_options/bert_cls/base");
    /// let mut config = BertConfig::from_file(dir.join("config.json"))?;
    /// config.num_labels = 5; // the checkpoint's classifier has 3 outputs
    /// let dev = Device::Cpu;
    /// let none = AdapterPlan::none();
    /// let err = BertForSequenceClassification::from_pretrained_with(dir, &config, DType::F32, &dev, &none);
    /// assert!(err.unwrap_err().to_string().contains("classifier"));
    /// # Ok(()) }
    /// ```
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        config: &BertConfig,
        dtype: DType,
        device: &Device,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let vb = Checkpoint::open(dir)?.var_builder(dtype, device);
        let mut model = Self::load(config, vb, plan)?;
        model.name_or_path = Some(dir.display().to_string());
        Ok(model)
    }

    /// The model folder [`from_pretrained`](Self::from_pretrained) read, as given; `None`
    /// for a model built with [`load`](Self::load). The training loop saves it as PEFT's
    /// `base_model_name_or_path`.
    pub fn name_or_path(&self) -> Option<&str> {
        self.name_or_path.as_deref()
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Builds the model from `vb` (transformers' tensor names: `bert.…` / `roberta.…` /
    /// `distilbert.…`, `classifier.…`), every module through `plan`. Call
    /// [`AdapterPlan::finish`] afterwards: for a loaded adapter it checks that every
    /// tensor of its file was used.
    ///
    /// A checkpoint without its head (a pretrained encoder, not yet fine-tuned for
    /// classification: `classifier`, RoBERTa's `classifier.dense` / `classifier.out_proj`,
    /// DistilBERT's `pre_classifier` / `classifier`) gets a new head as transformers gives it — weights from
    /// `N(0, initializer_range²)`, bias 0, drawn from a fixed seed — when `plan` trains or
    /// replaces the head (`classifier` in `modules_to_save`, as PEFT's `SEQ_CLS` task
    /// sets); otherwise the missing tensor is an error, where transformers would go on with
    /// a random head and a warning. A checkpoint without a pooler (`bert.pooler.dense`:
    /// saved from `BertForMaskedLM`) gets a new pooler the same way when `plan` trains it
    /// (`pooler` in `modules_to_save`; [`AutoSequenceClassifier::modules_to_save`] lists
    /// what a checkpoint needs), and is an error naming it otherwise: PEFT saves the
    /// random pooler transformers draws only when it trains it, so an adapter that did not
    /// would classify differently on every load.
    ///
    /// [`AutoSequenceClassifier::modules_to_save`]: crate::models::AutoSequenceClassifier::modules_to_save
    pub fn load(config: &BertConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        config.validate()?;
        let device = vb.device().clone();
        let prefix = config.family.prefix();
        let vb = with_base_prefix(vb, prefix, "embeddings.word_embeddings.weight");
        let encoder = vb.pp(prefix);
        let embeddings = BertEmbeddings::load(config, encoder.clone(), plan)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::load(config, encoder.pp(layer_path(config.family, i)), plan))
            .collect::<Result<Vec<_>>>()?;
        let head = ClassificationHead::load(config, &vb, plan)?;
        Ok(Self {
            config: config.clone(),
            embeddings,
            layers,
            head,
            device,
            name_or_path: None,
        })
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The logits `(batch, num_labels)` in evaluation mode (no dropout; gradients flow to
    /// the adapters, see [`crate::models`]'s note on fused ops; for transformers'
    /// training-mode dropout use [`BertForSequenceClassification::forward_t`]).
    ///
    /// `input_ids`: token ids `(batch, seq)` (u8, u32 or i64), `1 <= seq <=
    /// max_position_embeddings` (RoBERTa: [`BertConfig::max_tokens`]); `token_type_ids`: the same shape, `None` for all zeros;
    /// `attention_mask`: the same shape, non-zero for tokens to attend to, `None` for all
    /// of them (padded keys get the dtype's most negative value added to their scores, as
    /// transformers does).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_t(input_ids, token_type_ids, attention_mask, false)
    }

    /// [`BertForSequenceClassification::forward`], with `train = true` in training mode
    /// (transformers' `model.train()`): dropout at the config's probabilities (set them to 0
    /// for none; the attention probabilities' dropout draws inside the fused attention op,
    /// see [`crate::models::fused::bidirectional_attention`]). The
    /// adapters' own dropout follows their training flag
    /// ([`crate::model::AdaptedSet::set_training`]).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (ids, token_types) = self.check_ids(input_ids, token_type_ids)?;
        if let Some(mask) = attention_mask {
            self.check_mask(mask, ids.dims())?;
        }
        // Read to the host once for every layer.
        let visible = fused::key_flags(attention_mask, ids.elem_count())?;
        let mut x = self.embeddings.forward(&ids, &token_types, train)?;
        for layer in &self.layers {
            x = layer.forward(&x, &visible, train)?;
        }
        let dropout_p = self
            .config
            .classifier_dropout
            .unwrap_or(self.config.hidden_dropout_prob);
        self.head.forward(&x, dropout_p, train)
    }

    /// The training loss of `logits` (`(batch, num_labels)`) against `labels`, as
    /// transformers' `BertForSequenceClassification` computes it for the config's
    /// `problem_type` (when `None`: regression for one label, single-label classification
    /// for integer labels, multi-label otherwise):
    ///
    /// - regression: mean squared error (`labels` `(batch,)` or `(batch, 1)` for one
    ///   label, `(batch, num_labels)` otherwise);
    /// - single-label: cross-entropy, `labels` integer `(batch,)` in `0..num_labels`
    ///   (PyTorch's `ignore_index = -100` is refused as out of range);
    /// - multi-label: binary cross-entropy with logits, mean over all entries, `labels`
    ///   float `(batch, num_labels)`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
    /// use lorakit::models::bert::{BertConfig, BertForSequenceClassification};
    /// use lorakit::LoraConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let dev = Device::Cpu;
    /// let config = BertConfig {
    ///     vocab_size: 32, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2,
    ///     intermediate_size: 16, max_position_embeddings: 8, num_labels: 3,
    ///     ..BertConfig::default()
    /// };
    /// // A randomly initialised base (normally from a checkpoint), LoRA on query and value.
    /// let (base, adapter) = (VarMap::new(), VarMap::new());
    /// let plan = AdapterPlan::lora(
    ///     TargetSpec::new(ModuleSelector::list(["query", "value"])),
    ///     RankAlpha::new(2, 4.0),
    ///     LoraConfig::default(),
    ///     VarBuilder::from_varmap(&adapter, candle_core::DType::F32, &dev),
    /// );
    /// let vb = VarBuilder::from_varmap(&base, candle_core::DType::F32, &dev);
    /// let model = BertForSequenceClassification::load(&config, vb, &plan)?;
    /// let ids = Tensor::new(&[[1u32, 5, 7], [2, 3, 4]], &dev)?;
    /// let logits = model.forward_t(&ids, None, None, true)?;
    /// let loss = model.loss(&logits, &Tensor::new(&[0u32, 2], &dev)?)?;
    /// assert_eq!(loss.dims(), [] as [usize; 0]);
    /// assert!(model.loss(&logits, &Tensor::new(&[0u32, 3], &dev)?).is_err());
    /// # Ok(()) }
    /// ```
    pub fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        classification_loss(logits, labels, c.num_labels, c.problem_type, "classifier")
    }

    /// Checks `input_ids` and `token_type_ids` (shape, dtype, device, range); returns the
    /// ids and the token types (zeros when `None`).
    fn check_ids(&self, ids: &Tensor, token_types: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let prefix = self.config.family.prefix();
        let shape_error = |what: &str, expected: String, got: &Tensor| Error::ShapeMismatch {
            layer: format!("{prefix}.embeddings"),
            what: what.to_string(),
            expected,
            got: format!("{:?}", got.dims()),
        };
        let (b, s) = ids
            .dims2()
            .map_err(|_| shape_error("input_ids", "(batch, seq)".to_string(), ids))?;
        let max = self.config.max_tokens();
        if s == 0 || s > max {
            let limit = match self.config.family.numbers_positions_past_padding() {
                true => format!(
                    "max_position_embeddings ({}) - pad_token_id ({}) - 1 = {max}",
                    self.config.max_position_embeddings, self.config.pad_token_id
                ),
                false => format!("max_position_embeddings ({max})"),
            };
            return Err(shape_error(
                "input_ids",
                format!("(batch, seq) with 1 <= seq <= {limit}"),
                ids,
            ));
        }
        let vocab = self.config.vocab_size;
        let words = format!("{prefix}.embeddings.word_embeddings");
        crate::validate::token_ids(&words, ids, vocab, &self.device)?;
        let token_types = match token_types {
            Some(t) => {
                if t.dims() != [b, s] {
                    return Err(shape_error("token_type_ids", format!("({b}, {s})"), t));
                }
                let (table, types) = match self.config.family.has_token_types() {
                    true => (
                        format!("{prefix}.embeddings.token_type_embeddings"),
                        self.config.type_vocab_size,
                    ),
                    false => (
                        format!("{prefix}.embeddings (no token types: only type 0)"),
                        1,
                    ),
                };
                crate::validate::token_ids(&table, t, types, &self.device)?;
                t.clone()
            }
            None => Tensor::zeros((b, s), DType::U32, &self.device)?,
        };
        Ok((ids.clone(), token_types))
    }

    /// Checks that `mask` is `(batch, seq)` as `dims`.
    fn check_mask(&self, mask: &Tensor, dims: &[usize]) -> Result<()> {
        if mask.dims() != dims {
            return Err(Error::ShapeMismatch {
                layer: self.config.family.prefix().to_string(),
                what: "attention_mask".to_string(),
                expected: format!("{dims:?} (as input_ids)"),
                got: format!("{:?}", mask.dims()),
            });
        }
        Ok(())
    }
}
