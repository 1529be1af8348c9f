//! BERT for sequence classification: transformers' `BertForSequenceClassification`
//! ([`BertForSequenceClassification`]) with every module built through the model-level API
//! at transformers' own paths (`bert.embeddings.word_embeddings`,
//! `bert.encoder.layer.N.attention.self.query`, …, `bert.pooler.dense`, `classifier`), so a
//! PEFT adapter's `target_modules`, `modules_to_save: ["classifier"]` and `bias = "all"`
//! (norm biases through [`AdapterPlan::bias`]) apply unchanged; its configuration
//! ([`BertConfig`]) is read from transformers' `config.json`.
//!
//! The forward is transformers' eager one: embeddings (word + token type + absolute
//! position, then LayerNorm), post-norm encoder layers (attention scores scaled by
//! `1/sqrt(head_dim)`, padded keys given no weight, as transformers' additive mask of the
//! dtype's most negative value does; [`crate::models::fused::bidirectional_attention`],
//! one fused op for f32 CPU tensors), the pooler
//! (`tanh` of a dense layer on the first token) and the classifier. Dropout runs only in
//! [`BertForSequenceClassification::forward_t`] with `train = true`.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::frozen::BaseKind;
use crate::model::{embedding, linear, AdapterPlan, Embedding, Linear};
use crate::models::base_prefix::with_base_prefix;
pub use crate::models::classification::ProblemType;
use crate::models::classification::{
    classification_loss, head_or_new, new_linear, ClassifierConfig,
};
use crate::models::fused;
use crate::models::ops::{dropout_t, LayerNorm};

/// The activation of BERT's feed-forward block (transformers' `hidden_act`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HiddenAct {
    /// `"gelu"`: the exact GELU, `x Φ(x)` with the error function.
    #[default]
    Gelu,
    /// `"gelu_new"`: the tanh approximation of GELU (GPT-2's).
    GeluNew,
    /// `"relu"`.
    Relu,
}

impl HiddenAct {
    /// transformers' name.
    pub fn as_str(self) -> &'static str {
        match self {
            HiddenAct::Gelu => "gelu",
            HiddenAct::GeluNew => "gelu_new",
            HiddenAct::Relu => "relu",
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            HiddenAct::Gelu => crate::models::gelu::gelu_erf(x)?,
            HiddenAct::GeluNew => crate::models::gelu::gelu_tanh(x)?,
            HiddenAct::Relu => x.relu()?,
        })
    }
}

impl FromStr for HiddenAct {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gelu" => Ok(HiddenAct::Gelu),
            "gelu_new" => Ok(HiddenAct::GeluNew),
            "relu" => Ok(HiddenAct::Relu),
            other => Err(Error::Unsupported {
                what: "hidden_act",
                got: other.to_string(),
                supported: "gelu, gelu_new, relu".to_string(),
            }),
        }
    }
}

/// How positions are encoded (transformers' `position_embedding_type`; transformers 5 no
/// longer writes it and always uses absolute position embeddings).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PositionEmbeddingType {
    /// `"absolute"`: a learned table `bert.embeddings.position_embeddings`, row `i` added at
    /// position `i`.
    #[default]
    Absolute,
}

impl PositionEmbeddingType {
    /// transformers' name.
    pub fn as_str(self) -> &'static str {
        match self {
            PositionEmbeddingType::Absolute => "absolute",
        }
    }
}

impl FromStr for PositionEmbeddingType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "absolute" => Ok(PositionEmbeddingType::Absolute),
            other => Err(Error::Unsupported {
                what: "position_embedding_type",
                got: other.to_string(),
                supported: "absolute".to_string(),
            }),
        }
    }
}

/// The fields of transformers' `BertConfig` that the forward depends on. The defaults are
/// transformers' (bert-base: 12 layers of 768, 2 labels).
///
/// Read from a `config.json` with [`BertConfig::from_file`]; options this implementation
/// does not run (another `hidden_act`, relative position embeddings, `is_decoder`, another
/// `model_type`) are errors naming the option.
///
/// ```
/// use lorakit::models::bert::{BertConfig, HiddenAct};
/// # fn main() -> lorakit::Result<()> {
/// let config = BertConfig::from_file("tests/fixtures/peft_options/bert_cls/base/config.json")?;
/// assert_eq!((config.hidden_size, config.num_hidden_layers), (16, 2));
/// assert_eq!(config.num_labels, 3); // from id2label, as transformers counts them
/// assert_eq!(config.id2label, ["LABEL_0", "LABEL_1", "LABEL_2"]);
/// assert_eq!(config.hidden_act, HiddenAct::Gelu);
/// let text = r#"{"hidden_act": "swish"}"#;
/// let err = BertConfig::from_json_str(text, "config.json").unwrap_err();
/// assert!(err.to_string().contains("hidden_act"));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    /// Rows of `bert.embeddings.word_embeddings`.
    pub vocab_size: usize,
    /// The model width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads (dividing `hidden_size`).
    pub num_attention_heads: usize,
    /// The feed-forward block's inner width.
    pub intermediate_size: usize,
    /// The feed-forward activation.
    pub hidden_act: HiddenAct,
    /// Dropout after the embeddings and each sublayer (training only).
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities (training only).
    pub attention_probs_dropout_prob: f64,
    /// Dropout before the classifier (training only); `None`: `hidden_dropout_prob`.
    pub classifier_dropout: Option<f64>,
    /// Rows of `bert.embeddings.position_embeddings`: the longest input.
    pub max_position_embeddings: usize,
    /// Rows of `bert.embeddings.token_type_embeddings`.
    pub type_vocab_size: usize,
    /// The LayerNorms' epsilon.
    pub layer_norm_eps: f64,
    /// How positions are encoded.
    pub position_embedding_type: PositionEmbeddingType,
    /// Outputs of the classifier (`id2label`'s length when the file has one, as transformers
    /// counts them; `num_labels` otherwise, default 2).
    pub num_labels: usize,
    /// The loss [`BertForSequenceClassification::loss`] computes; `None`: chosen from
    /// `num_labels` and the labels' dtype, as transformers does.
    pub problem_type: Option<ProblemType>,
    /// The classes' names in index order (`id2label`; empty when the config names none).
    /// Labeled data may give a class by name ([`crate::finetune::labeled::Label::Name`]);
    /// names apply only while there are `num_labels` of them.
    pub id2label: Vec<String>,
    /// The standard deviation of transformers' normal initialisation
    /// (`initializer_range`): a classifier head the checkpoint lacks is initialised with it.
    pub initializer_range: f64,
    /// transformers' `ignore_mismatched_sizes` loading option (not read from the file):
    /// see [`ClassifierConfig::ignore_mismatched_sizes`].
    pub ignore_mismatched_sizes: bool,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: HiddenAct::Gelu,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            classifier_dropout: None,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: PositionEmbeddingType::Absolute,
            num_labels: 2,
            problem_type: None,
            id2label: Vec::new(),
            initializer_range: 0.02,
            ignore_mismatched_sizes: false,
        }
    }
}

/// `config.json` as written: every field optional (transformers' defaults fill the gaps).
#[derive(Deserialize)]
struct RawBertConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    hidden_act: Option<String>,
    hidden_dropout_prob: Option<f64>,
    attention_probs_dropout_prob: Option<f64>,
    classifier_dropout: Option<f64>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    position_embedding_type: Option<String>,
    is_decoder: Option<bool>,
}

impl BertConfig {
    /// Reads transformers' `config.json` at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `config.json`; `path` names it in errors.
    pub fn from_json_str(text: &str, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let raw: RawBertConfig = crate::error::parse_json(text, path.clone())?;
        if let Some(model_type) = raw.model_type.filter(|t| t != "bert") {
            return Err(Error::Unsupported {
                what: "model_type",
                got: model_type,
                supported: "bert".to_string(),
            });
        }
        if raw.is_decoder == Some(true) {
            return Err(Error::Unsupported {
                what: "is_decoder",
                got: "true".to_string(),
                supported: "false (BERT as a bidirectional encoder)".to_string(),
            });
        }
        let d = Self::default();
        // The classification fields, parsed and checked as every classifier's.
        let labels = ClassifierConfig::from_json_str(text, path.clone())?;
        let config = Self {
            vocab_size: raw.vocab_size.unwrap_or(d.vocab_size),
            hidden_size: raw.hidden_size.unwrap_or(d.hidden_size),
            num_hidden_layers: raw.num_hidden_layers.unwrap_or(d.num_hidden_layers),
            num_attention_heads: raw.num_attention_heads.unwrap_or(d.num_attention_heads),
            intermediate_size: raw.intermediate_size.unwrap_or(d.intermediate_size),
            hidden_act: raw
                .hidden_act
                .as_deref()
                .map(HiddenAct::from_str)
                .transpose()?
                .unwrap_or(d.hidden_act),
            hidden_dropout_prob: raw.hidden_dropout_prob.unwrap_or(d.hidden_dropout_prob),
            attention_probs_dropout_prob: raw
                .attention_probs_dropout_prob
                .unwrap_or(d.attention_probs_dropout_prob),
            classifier_dropout: raw.classifier_dropout,
            max_position_embeddings: raw
                .max_position_embeddings
                .unwrap_or(d.max_position_embeddings),
            type_vocab_size: raw.type_vocab_size.unwrap_or(d.type_vocab_size),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(d.layer_norm_eps),
            position_embedding_type: raw
                .position_embedding_type
                .as_deref()
                .map(PositionEmbeddingType::from_str)
                .transpose()?
                .unwrap_or(d.position_embedding_type),
            num_labels: labels.num_labels,
            problem_type: labels.problem_type,
            initializer_range: labels.initializer_range,
            id2label: labels.id2label,
            ignore_mismatched_sizes: false,
        };
        config.check(|field, reason| Error::file_config(path.clone(), field, reason))?;
        Ok(config)
    }

    /// Checks the values [`BertForSequenceClassification::load`] relies on: non-zero sizes,
    /// `hidden_size` a multiple of `num_attention_heads`, dropouts in `[0, 1)`, a finite
    /// `layer_norm_eps >= 0`, and at least 2 labels for `single_label_classification` (as
    /// transformers requires).
    pub fn validate(&self) -> Result<()> {
        self.check(|field, reason| Error::settings("BERT config", field, reason))
    }

    fn check(&self, err: impl Fn(&'static str, String) -> Error) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return Err(err(field, "must be at least 1, got 0".to_string()));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(err(
                "hidden_size",
                format!(
                    "{} is not a multiple of num_attention_heads ({})",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        let dropouts = [
            ("hidden_dropout_prob", Some(self.hidden_dropout_prob)),
            (
                "attention_probs_dropout_prob",
                Some(self.attention_probs_dropout_prob),
            ),
            ("classifier_dropout", self.classifier_dropout),
        ];
        if let Some((field, reason)) = crate::validate::config_dropouts(dropouts) {
            return Err(err(field, reason));
        }
        if !self.layer_norm_eps.is_finite() || self.layer_norm_eps < 0.0 {
            return Err(err(
                "layer_norm_eps",
                format!("must be finite and >= 0, got {}", self.layer_norm_eps),
            ));
        }
        self.labels().check(err)
    }

    /// The classification fields (labels, problem type, the head's initialisation) as
    /// every classifier has them; BERT reads the first token, so no pad id.
    pub fn labels(&self) -> ClassifierConfig {
        ClassifierConfig {
            num_labels: self.num_labels,
            id2label: self.id2label.clone(),
            problem_type: self.problem_type,
            pad_token_id: None,
            initializer_range: self.initializer_range,
            ignore_mismatched_sizes: self.ignore_mismatched_sizes,
        }
    }

    /// The `(in, out)` shapes of the model's linear layers, each once: what VeRA's shared
    /// projections must cover ([`crate::finetune::AdapterRecipe::plan`]).
    ///
    /// ```
    /// use lorakit::models::bert::BertConfig;
    /// let config = BertConfig { hidden_size: 8, intermediate_size: 32, num_labels: 3, ..BertConfig::default() };
    /// assert_eq!(config.linear_shapes(), [(8, 8), (8, 32), (32, 8), (8, 3)]);
    /// ```
    pub fn linear_shapes(&self) -> Vec<(usize, usize)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        vec![(h, h), (h, i), (i, h), (h, self.num_labels)]
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The classifier at `classifier.…` in `vb`, or a new one when the checkpoint lacks it and
/// `plan` trains it (see [`BertForSequenceClassification::load`]).
fn classifier_head(config: &BertConfig, vb: &VarBuilder, plan: &AdapterPlan) -> Result<Linear> {
    head_or_new(
        "classifier",
        config.hidden_size,
        true,
        &config.labels(),
        vb,
        plan,
    )
}

/// The pooler's path, as transformers names it.
pub(crate) const POOLER: &str = "bert.pooler.dense";

/// The pooler of a checkpoint that has none (saved from `BertForMaskedLM`, or as a
/// `BertModel` without its pooling layer): a new one, as transformers initialises it,
/// when `plan` trains it (`pooler` in `modules_to_save`; a loaded adapter's trained copy
/// replaces it); otherwise whatever `vb` makes of it (a `VarMap` creates it), or an error
/// where it has none. transformers would go on with a random pooler, which a
/// PEFT adapter does not save unless it trains it, so every load would classify
/// differently.
fn new_pooler(config: &BertConfig, vb: &VarBuilder, plan: &AdapterPlan) -> Result<Linear> {
    let h = config.hidden_size;
    if !plan.touches(POOLER, BaseKind::Linear) {
        // A builder that makes what it is asked for (a `VarMap`'s: a model built from
        // scratch) gives it; a checkpoint's has none.
        let missing = match linear(h, h, vb.pp(POOLER), plan) {
            Ok(pooler) => return Ok(pooler),
            Err(e) => e,
        };
        return Err(Error::layer_config(
            POOLER,
            "modules_to_save",
            format!(
                "the checkpoint has no pooler ({missing}; a BertForMaskedLM save, or a \
                 BertModel without its pooling layer): transformers would classify through a \
                 random pooler that a PEFT adapter does not save, so no two loads would \
                 agree. Train it with the head: modules_to_save [\"classifier\", \"pooler\"] \
                 (AutoSequenceClassifier::modules_to_save lists what a checkpoint needs)"
            ),
        ));
    }
    new_linear(POOLER, (h, h, true), config.initializer_range, vb, plan)
}

#[derive(Clone, Debug)]
struct BertEmbeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    dropout: f64,
}

impl BertEmbeddings {
    fn load(c: &BertConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        Ok(Self {
            word: embedding(c.vocab_size, c.hidden_size, vb.pp("word_embeddings"), plan)?,
            position: embedding(
                c.max_position_embeddings,
                c.hidden_size,
                vb.pp("position_embeddings"),
                plan,
            )?,
            token_type: embedding(
                c.type_vocab_size,
                c.hidden_size,
                vb.pp("token_type_embeddings"),
                plan,
            )?,
            norm: LayerNorm::load(c.hidden_size, c.layer_norm_eps, vb.pp("LayerNorm"), plan)?,
            dropout: c.hidden_dropout_prob,
        })
    }

    /// `ids` and `token_types` `(batch, seq)`, checked: `(batch, seq, hidden)`.
    fn forward(&self, ids: &Tensor, token_types: &Tensor, train: bool) -> Result<Tensor> {
        let seq = ids.dim(1)?;
        let x = (self.word.forward(ids)? + self.token_type.forward(token_types)?)?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let x = x.broadcast_add(&self.position.forward(&positions)?)?;
        dropout_t(self.norm.forward(&x)?, self.dropout, train)
    }
}

#[derive(Clone, Debug)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
    act: HiddenAct,
    hidden_dropout: f64,
    attention_dropout: f64,
}

impl BertLayer {
    fn load(c: &BertConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let h = c.hidden_size;
        let attn = vb.pp("attention");
        let this = attn.pp("self");
        let attn_out = attn.pp("output");
        let eps = c.layer_norm_eps;
        Ok(Self {
            query: linear(h, h, this.pp("query"), plan)?,
            key: linear(h, h, this.pp("key"), plan)?,
            value: linear(h, h, this.pp("value"), plan)?,
            attention_output: linear(h, h, attn_out.pp("dense"), plan)?,
            attention_norm: LayerNorm::load(h, eps, attn_out.pp("LayerNorm"), plan)?,
            intermediate: linear(h, c.intermediate_size, vb.pp("intermediate.dense"), plan)?,
            output: linear(c.intermediate_size, h, vb.pp("output.dense"), plan)?,
            output_norm: LayerNorm::load(h, eps, vb.pp("output.LayerNorm"), plan)?,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            act: c.hidden_act,
            hidden_dropout: c.hidden_dropout_prob,
            attention_dropout: c.attention_probs_dropout_prob,
        })
    }

    /// `x` `(batch, seq, hidden)`; `visible`: the `(batch, seq)` keys to attend to, row after
    /// row ([`fused::key_flags`]).
    fn forward(&self, x: &Tensor, visible: &[bool], train: bool) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, s, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = heads(self.query.forward(x)?)?;
        let k = heads(self.key.forward(x)?)?;
        let v = heads(self.value.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let p = if train { self.attention_dropout } else { 0.0 };
        let context = fused::attention_over_keys(&q, &k, &v, scale, visible, p)?;
        let attn = self.attention_output.forward(&context)?;
        let attn = dropout_t(attn, self.hidden_dropout, train)?;
        let attn = self.attention_norm.forward(&(attn + x)?)?;
        let inner = self.act.apply(&self.intermediate.forward(&attn)?)?;
        let out = dropout_t(self.output.forward(&inner)?, self.hidden_dropout, train)?;
        self.output_norm.forward(&(out + attn)?)
    }
}

/// transformers' `BertForSequenceClassification`: BERT, its pooler and a linear classifier,
/// every module built through [`crate::model::linear`] / [`crate::model::embedding`] at
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
    pooler: Linear,
    classifier: Linear,
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

    /// Builds the model from `vb` (transformers' tensor names: `bert.…`, `classifier.…`),
    /// every module through `plan`. Call [`AdapterPlan::finish`] afterwards: for a loaded
    /// adapter it checks that every tensor of its file was used.
    ///
    /// A checkpoint without `classifier.weight` (a pretrained encoder, not yet fine-tuned
    /// for classification) gets a new head as transformers gives it — weights from
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
        let vb = with_base_prefix(vb, "bert", "embeddings.word_embeddings.weight");
        let bert = vb.pp("bert");
        let embeddings = BertEmbeddings::load(config, bert.pp("embeddings"), plan)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::load(config, bert.pp(format!("encoder.layer.{i}")), plan))
            .collect::<Result<Vec<_>>>()?;
        let h = config.hidden_size;
        let pooler = match bert.contains_tensor("pooler.dense.weight") {
            true => linear(h, h, bert.pp("pooler.dense"), plan)?,
            false => new_pooler(config, &vb, plan)?,
        };
        let classifier = classifier_head(config, &vb, plan)?;
        Ok(Self {
            config: config.clone(),
            embeddings,
            layers,
            pooler,
            classifier,
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
    /// max_position_embeddings`; `token_type_ids`: the same shape, `None` for all zeros;
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
        let pooled = self.pooler.forward(&x.i((.., 0))?.contiguous()?)?.tanh()?;
        let dropout_p = self
            .config
            .classifier_dropout
            .unwrap_or(self.config.hidden_dropout_prob);
        let pooled = dropout_t(pooled, dropout_p, train)?;
        Ok(self.classifier.forward(&pooled)?)
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
        let shape_error = |what: &str, expected: String, got: &Tensor| Error::ShapeMismatch {
            layer: "bert.embeddings".to_string(),
            what: what.to_string(),
            expected,
            got: format!("{:?}", got.dims()),
        };
        let (b, s) = ids
            .dims2()
            .map_err(|_| shape_error("input_ids", "(batch, seq)".to_string(), ids))?;
        let max = self.config.max_position_embeddings;
        if s == 0 || s > max {
            return Err(shape_error(
                "input_ids",
                format!("(batch, seq) with 1 <= seq <= max_position_embeddings ({max})"),
                ids,
            ));
        }
        let vocab = self.config.vocab_size;
        crate::validate::token_ids("bert.embeddings.word_embeddings", ids, vocab, &self.device)?;
        let token_types = match token_types {
            Some(t) => {
                if t.dims() != [b, s] {
                    return Err(shape_error("token_type_ids", format!("({b}, {s})"), t));
                }
                crate::validate::token_ids(
                    "bert.embeddings.token_type_embeddings",
                    t,
                    self.config.type_vocab_size,
                    &self.device,
                )?;
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
                layer: "bert".to_string(),
                what: "attention_mask".to_string(),
                expected: format!("{dims:?} (as input_ids)"),
                got: format!("{:?}", mask.dims()),
            });
        }
        Ok(())
    }
}
