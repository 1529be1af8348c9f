//! [`BertConfig`]: what the BERT family's models read from transformers' `config.json`, and the
//! options it names ([`BertFamily`], [`HiddenAct`], [`PositionEmbeddingType`]).

use std::str::FromStr;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::models::classification::{ClassifierConfig, ProblemType};

/// Which member of the BERT family a checkpoint is (transformers' `model_type`): the
/// encoder layers are the same; positions, the pooler and the head differ.
///
/// ```
/// use lorakit::models::bert::BertFamily;
/// assert_eq!(BertFamily::from_model_type("xlm-roberta"), Some(BertFamily::XlmRoberta));
/// assert_eq!(BertFamily::XlmRoberta.prefix(), "roberta");
/// assert!(BertFamily::Camembert.numbers_positions_past_padding());
/// assert!(!BertFamily::Bert.numbers_positions_past_padding());
/// assert_eq!(BertFamily::from_model_type("deberta-v2"), None);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BertFamily {
    /// `bert`: positions `0, 1, …`; the head is a pooler (`bert.pooler.dense`, tanh) and a
    /// linear `classifier` on the first token.
    #[default]
    Bert,
    /// `roberta` (transformers' `RobertaForSequenceClassification`): positions numbered
    /// from the ids (`pad_token_id + 1` onwards, padding at `pad_token_id`); no pooler;
    /// the head `classifier` is `dense`, tanh, `out_proj` on the first token.
    Roberta,
    /// `xlm-roberta`: RoBERTa's architecture (XLM-R, multilingual-e5, BGE-M3 encoders).
    XlmRoberta,
    /// `camembert`: RoBERTa's architecture.
    Camembert,
    /// `distilbert` (transformers' `DistilBertForSequenceClassification`): BERT's layers
    /// under other names (`distilbert.transformer.layer.N.attention.q_lin`, …) and config
    /// keys (`dim`, `n_layers`, …), no token types, no dropout after the attention's output
    /// projection; the head is `pre_classifier`, ReLU, `classifier` on the first token.
    DistilBert,
    /// `electra` (transformers' `ElectraForSequenceClassification`, the discriminator):
    /// BERT's layers under `electra.`, embeddings of `embedding_size` projected to
    /// `hidden_size` by `electra.embeddings_project` when the two differ, no pooler; the
    /// head is RoBERTa's with GELU for tanh.
    Electra,
}

impl BertFamily {
    /// Every member, in the order above.
    pub const ALL: [BertFamily; 6] = [
        BertFamily::Bert,
        BertFamily::Roberta,
        BertFamily::XlmRoberta,
        BertFamily::Camembert,
        BertFamily::DistilBert,
        BertFamily::Electra,
    ];

    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            BertFamily::Bert => "bert",
            BertFamily::Roberta => "roberta",
            BertFamily::XlmRoberta => "xlm-roberta",
            BertFamily::Camembert => "camembert",
            BertFamily::DistilBert => "distilbert",
            BertFamily::Electra => "electra",
        }
    }

    /// The member whose `model_type` is `model_type`, if any.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == model_type)
    }

    /// The encoder's module prefix in transformers' checkpoints (`base_model_prefix`):
    /// `bert`, `roberta` for the whole RoBERTa family, `distilbert`, `electra`.
    pub fn prefix(self) -> &'static str {
        match self {
            BertFamily::Bert => "bert",
            BertFamily::DistilBert => "distilbert",
            BertFamily::Electra => "electra",
            BertFamily::Roberta | BertFamily::XlmRoberta | BertFamily::Camembert => "roberta",
        }
    }

    /// The attention's query and value projections, the usual LoRA targets: PEFT's
    /// defaults for BERT, RoBERTa, XLM-R and ELECTRA (its
    /// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`); PEFT 0.21 has none for
    /// CamemBERT and DistilBERT (it asks for `target_modules`), where these are the same
    /// layers under the family's names.
    ///
    /// ```
    /// use lorakit::models::bert::BertFamily;
    /// assert_eq!(BertFamily::Roberta.default_targets(), ["query", "value"]);
    /// assert_eq!(BertFamily::DistilBert.default_targets(), ["q_lin", "v_lin"]);
    /// ```
    pub fn default_targets(self) -> [&'static str; 2] {
        match self {
            BertFamily::DistilBert => ["q_lin", "v_lin"],
            _ => ["query", "value"],
        }
    }

    /// Whether positions are numbered from the ids, past the padding (RoBERTa's rule):
    /// a token that is not `pad_token_id` at column `j` of its row gets position
    /// `pad_token_id + (tokens up to j that are not padding)`, padding gets `pad_token_id`.
    /// BERT numbers the columns `0, 1, …`.
    pub fn numbers_positions_past_padding(self) -> bool {
        matches!(
            self,
            BertFamily::Roberta | BertFamily::XlmRoberta | BertFamily::Camembert
        )
    }

    /// Whether the embeddings add a token type's (`token_type_embeddings`); DistilBERT has
    /// none, so its only token type is 0.
    pub fn has_token_types(self) -> bool {
        self != BertFamily::DistilBert
    }

    /// Whether the classifier reads a pooler's output (`tanh` of `<prefix>.pooler.dense`)
    /// rather than the first token's state through a two-layer head (RoBERTa's and
    /// ELECTRA's `classifier.dense` / `classifier.out_proj`, DistilBERT's
    /// `pre_classifier` / `classifier`).
    pub fn has_pooler(self) -> bool {
        self == BertFamily::Bert
    }

    /// The path of the head's last layer, whose rows are the classes: `classifier`, or
    /// the RoBERTa family's `classifier.out_proj`.
    pub fn label_layer(self) -> &'static str {
        match self {
            BertFamily::Bert | BertFamily::DistilBert => "classifier",
            BertFamily::Roberta
            | BertFamily::XlmRoberta
            | BertFamily::Camembert
            | BertFamily::Electra => "classifier.out_proj",
        }
    }

    /// transformers' default `vocab_size` for the family's config class.
    pub(super) fn default_vocab_size(self) -> usize {
        match self {
            BertFamily::Roberta => 50265,
            _ => 30522,
        }
    }

    /// transformers' default `pad_token_id` for the family's config class.
    pub(super) fn default_pad_token_id(self) -> u32 {
        match self.numbers_positions_past_padding() {
            true => 1,
            false => 0,
        }
    }
}

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

    pub(super) fn apply(self, x: &Tensor) -> Result<Tensor> {
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

/// The fields of transformers' `BertConfig` (and `RobertaConfig`, `XLMRobertaConfig`,
/// `CamembertConfig`: [`BertFamily`]) that the forward depends on. The defaults are
/// transformers' `BertConfig`'s (bert-base: 12 layers of 768, 2 labels); a file of another
/// family takes that family's defaults for what it leaves out (`vocab_size`,
/// `pad_token_id`).
///
/// Read from a `config.json` with [`BertConfig::from_file`]; options this implementation
/// does not run (another `hidden_act`, relative position embeddings, `is_decoder`, another
/// `model_type`) are errors naming the option.
///
/// ```
/// use lorakit::models::bert::{BertConfig, BertFamily, HiddenAct};
/// # fn main() -> lorakit::Result<()> {
/// let config = BertConfig::from_file("tests/fixtures/peft_options/bert_cls/base/config.json")?;
/// assert_eq!((config.hidden_size, config.num_hidden_layers), (16, 2));
/// assert_eq!(config.num_labels, 3); // from id2label, as transformers counts them
/// assert_eq!(config.id2label, ["LABEL_0", "LABEL_1", "LABEL_2"]);
/// assert_eq!(config.hidden_act, HiddenAct::Gelu);
/// let roberta = BertConfig::from_file("tests/fixtures/roberta_cls/roberta/base/config.json")?;
/// assert_eq!((roberta.family, roberta.pad_token_id), (BertFamily::Roberta, 1));
/// // Positions start past the padding id: 12 learned positions take 10 tokens.
/// assert_eq!((roberta.max_position_embeddings, roberta.max_tokens()), (12, 10));
/// let text = r#"{"hidden_act": "swish"}"#;
/// let err = BertConfig::from_json_str(text, "config.json").unwrap_err();
/// assert!(err.to_string().contains("hidden_act"));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    /// The family member (`model_type`): how positions are numbered and which head
    /// classifies.
    pub family: BertFamily,
    /// Rows of `bert.embeddings.word_embeddings`.
    pub vocab_size: usize,
    /// The model width.
    pub hidden_size: usize,
    /// ELECTRA's embedding width (`embedding_size`), projected to `hidden_size` by
    /// `electra.embeddings_project` when the two differ; the other families' embeddings
    /// are `hidden_size` wide whatever this says ([`BertConfig::embedding_width`]).
    pub embedding_size: usize,
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
    /// Dropout in the classification head (training only); `None`: `hidden_dropout_prob`.
    /// DistilBERT's is `seq_classif_dropout` (0.2 unless its file says otherwise;
    /// [`BertConfig::from_file`] sets it, a config built by hand must too).
    pub classifier_dropout: Option<f64>,
    /// Rows of `bert.embeddings.position_embeddings`: the longest input.
    pub max_position_embeddings: usize,
    /// Rows of `bert.embeddings.token_type_embeddings`.
    pub type_vocab_size: usize,
    /// The LayerNorms' epsilon.
    pub layer_norm_eps: f64,
    /// The padding token. The RoBERTa family numbers positions past it (see
    /// [`BertFamily::numbers_positions_past_padding`]) and batches should pad with it;
    /// BERT does not read it.
    pub pad_token_id: u32,
    /// How positions are encoded.
    pub position_embedding_type: PositionEmbeddingType,
    /// Outputs of the classifier (`id2label`'s length when the file has one, as transformers
    /// counts them; `num_labels` otherwise, default 2).
    pub num_labels: usize,
    /// The loss [`BertForSequenceClassification::loss`](super::BertForSequenceClassification::loss) computes; `None`: chosen from
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
            family: BertFamily::Bert,
            vocab_size: 30522,
            hidden_size: 768,
            embedding_size: 768,
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
            pad_token_id: 0,
            position_embedding_type: PositionEmbeddingType::Absolute,
            num_labels: 2,
            problem_type: None,
            id2label: Vec::new(),
            initializer_range: 0.02,
            ignore_mismatched_sizes: false,
        }
    }
}

impl BertConfig {
    /// Checks the values [`BertForSequenceClassification::load`](super::BertForSequenceClassification::load) relies on: non-zero sizes,
    /// `hidden_size` a multiple of `num_attention_heads`, dropouts in `[0, 1)`, a finite
    /// `layer_norm_eps >= 0`, at least 2 labels for `single_label_classification` (as
    /// transformers requires), and for the RoBERTa family a `pad_token_id` in the
    /// vocabulary with room for positions past it.
    pub fn validate(&self) -> Result<()> {
        self.check(|field, reason| Error::settings("BERT config", field, reason))
    }

    pub(super) fn check(&self, err: impl Fn(&'static str, String) -> Error) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("embedding_size", self.embedding_size),
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
        if self.family.numbers_positions_past_padding() {
            let pad = self.pad_token_id as usize;
            if pad >= self.vocab_size {
                return Err(err(
                    "pad_token_id",
                    format!("{pad} is not below vocab_size ({})", self.vocab_size),
                ));
            }
            if self.max_position_embeddings <= pad + 1 {
                return Err(err(
                    "max_position_embeddings",
                    format!(
                        "{} leaves no position for a token: {} numbers positions from \
                         pad_token_id + 1 ({})",
                        self.max_position_embeddings,
                        self.family.model_type(),
                        pad + 1
                    ),
                ));
            }
        }
        self.labels().check(err)
    }

    /// The longest input the position table takes: `max_position_embeddings` for BERT;
    /// `max_position_embeddings - pad_token_id - 1` for the RoBERTa family, whose positions
    /// start at `pad_token_id + 1` (roberta-base: 514 positions, 512 tokens).
    pub fn max_tokens(&self) -> usize {
        match self.family.numbers_positions_past_padding() {
            true => self
                .max_position_embeddings
                .saturating_sub(self.pad_token_id as usize + 1),
            false => self.max_position_embeddings,
        }
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
        let mut shapes = vec![(h, h), (h, i), (i, h), (h, self.num_labels)];
        if self.projects_embeddings() {
            shapes.push((self.embedding_size, h));
        }
        shapes
    }

    /// The width of the embedding tables: ELECTRA's `embedding_size`, every other
    /// family's `hidden_size`.
    pub fn embedding_width(&self) -> usize {
        match self.family {
            BertFamily::Electra => self.embedding_size,
            _ => self.hidden_size,
        }
    }

    /// Whether the embeddings go through `electra.embeddings_project` (ELECTRA with an
    /// `embedding_size` other than `hidden_size`).
    pub fn projects_embeddings(&self) -> bool {
        self.embedding_width() != self.hidden_size
    }

    pub(super) fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}
