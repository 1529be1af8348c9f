//! [`AutoSequenceClassifier`]: a sequence classifier chosen by the `model_type` of a model
//! folder's `config.json`, as transformers' `AutoModelForSequenceClassification` does.

use std::path::Path;

use candle_core::{DType, Device};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::AdapterPlan;

use super::auto::AutoCausalLm;
use super::bert::{BertConfig, BertFamily, BertForSequenceClassification, POOLER};
use super::classification::ClassifierConfig;
use super::gpt2::Gpt2ForSequenceClassification;
use super::llama::{LlamaFamily, LlamaForSequenceClassification};
use super::sequence_classifier::SequenceClassifier;

/// One of the sequence classifiers of [`crate::models`], chosen by `model_type`: `bert`,
/// `roberta`, `xlm-roberta`, `camembert`, `distilbert`, `electra`
/// ([`BertForSequenceClassification`],
/// head `classifier` on the first token), `llama`,
/// `mistral`, `qwen2`, `qwen3` ([`LlamaForSequenceClassification`]) or `gpt2`
/// ([`Gpt2ForSequenceClassification`]), whose head `score` reads each row's last token.
/// [`AutoSequenceClassifier::as_classifier`] gives the [`SequenceClassifier`] the training
/// loop takes.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lorakit::models::AutoSequenceClassifier;
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// for (dir, head) in [("tests/fixtures/decoder_cls/qwen2", "score"), ("tests/fixtures/decoder_cls/gpt2", "score")] {
///     assert_eq!(AutoSequenceClassifier::head_name(format!("{dir}/base"))?, head);
///     let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)?.plan()?;
///     let model = AutoSequenceClassifier::from_pretrained(format!("{dir}/base"), None, DType::F32, &dev, &plan)?;
///     let ids = Tensor::new(&[[5u32, 9, 2, 7]], &dev)?;
///     let logits = model.as_classifier().classify(&ids, None, None, false)?;
///     assert_eq!(logits.dims(), [1, 3]);
/// }
/// // A causal LM has no `score`: without a plan that trains a new one, an error naming it.
/// let none = lorakit::model::AdapterPlan::none();
/// let dir = "tests/fixtures/models/llama/mistral/base";
/// let err = AutoSequenceClassifier::from_pretrained(dir, None, DType::F32, &dev, &none).unwrap_err();
/// assert!(err.to_string().contains("score"), "{err}");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub enum AutoSequenceClassifier {
    /// `model_type` `bert`, `roberta`, `xlm-roberta`, `camembert`, `distilbert` or
    /// `electra`.
    Bert(BertForSequenceClassification),
    /// The Llama family.
    Llama(LlamaForSequenceClassification),
    /// `model_type` `gpt2`.
    Gpt2(Gpt2ForSequenceClassification),
}

/// The `model_type`s [`AutoSequenceClassifier::from_pretrained`] loads.
///
/// ```
/// use lorakit::models::CLASSIFIER_MODEL_TYPES;
/// use lorakit::models::bert::BertFamily;
/// use lorakit::models::llama::LlamaFamily;
/// // Every Llama family but Granite and OLMoE (transformers has no classifier for them), Gemma 3's
/// // image-and-text checkpoints (Gemma3ForSequenceClassification), the BERT family, GPT-2.
/// for family in LlamaFamily::ALL {
///     let listed = CLASSIFIER_MODEL_TYPES.contains(&family.model_type());
///     let none = [LlamaFamily::Granite, LlamaFamily::Olmoe];
///     assert_eq!(listed, !none.contains(&family), "{family:?}");
/// }
/// for family in BertFamily::ALL {
///     assert!(CLASSIFIER_MODEL_TYPES.contains(&family.model_type()), "{family:?}");
/// }
/// // The Llama families, Gemma 3's image-and-text `gemma3`, the BERT family, GPT-2.
/// let expected = (LlamaFamily::ALL.len() - 2) + 1 + BertFamily::ALL.len() + 1;
/// assert_eq!(CLASSIFIER_MODEL_TYPES.len(), expected);
/// ```
pub const CLASSIFIER_MODEL_TYPES: [&str; 23] = [
    "bert",
    "roberta",
    "xlm-roberta",
    "camembert",
    "distilbert",
    "electra",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "smollm3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "olmo2",
    "olmo3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gpt_oss",
    "gpt2",
];

/// Which implementation a folder's `model_type` is built with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bert,
    Llama,
    Gpt2,
}

impl Kind {
    fn of(dir: &Path) -> Result<Self> {
        let model_type = AutoCausalLm::model_type(dir)?;
        match model_type.as_str() {
            t if BertFamily::from_model_type(t).is_some() => Ok(Self::Bert),
            "gpt2" => Ok(Self::Gpt2),
            // Granite is a Llama family member without a classifier in transformers.
            t if CLASSIFIER_MODEL_TYPES.contains(&t)
                && LlamaFamily::from_model_type(t).is_some() =>
            {
                Ok(Self::Llama)
            }
            _ => Err(Error::Unsupported {
                what: "model_type",
                got: model_type.clone(),
                supported: CLASSIFIER_MODEL_TYPES.join(", "),
            }),
        }
    }
}

impl AutoSequenceClassifier {
    /// The classification head's module path for the folder's architecture: `classifier`
    /// (BERT) or `score` (the decoders) — what PEFT's `SEQ_CLS` puts in
    /// `modules_to_save`, and what a fresh plan should train in full.
    pub fn head_name(dir: impl AsRef<Path>) -> Result<&'static str> {
        Ok(match Kind::of(dir.as_ref())? {
            Kind::Bert => "classifier",
            Kind::Llama | Kind::Gpt2 => "score",
        })
    }

    /// The path of the head's last layer, whose rows are the classes: `classifier` (BERT,
    /// DistilBERT), `classifier.out_proj` (the RoBERTa family's and ELECTRA's two-layer
    /// head) or `score`.
    ///
    /// ```
    /// use lorakit::models::AutoSequenceClassifier;
    /// # fn main() -> lorakit::Result<()> {
    /// let roberta = "tests/fixtures/roberta_cls/roberta/base";
    /// assert_eq!(AutoSequenceClassifier::head_name(roberta)?, "classifier");
    /// assert_eq!(AutoSequenceClassifier::label_layer(roberta)?, "classifier.out_proj");
    /// # Ok(()) }
    /// ```
    pub fn label_layer(dir: impl AsRef<Path>) -> Result<&'static str> {
        let dir = dir.as_ref();
        Ok(match Kind::of(dir)? {
            Kind::Bert => BertConfig::from_file(dir.join("config.json"))?
                .family
                .label_layer(),
            Kind::Llama | Kind::Gpt2 => "score",
        })
    }

    /// The modules a fresh plan should train in full on the folder's checkpoint (PEFT's
    /// `modules_to_save`): the head ([`head_name`](Self::head_name)), and BERT's `pooler`
    /// when the checkpoint has none (a `BertForMaskedLM` save; without it the classifier
    /// is an error naming the pooler, see [`BertForSequenceClassification::load`]).
    ///
    /// ```
    /// use lorakit::models::AutoSequenceClassifier;
    /// # fn main() -> lorakit::Result<()> {
    /// let encoder = "tests/fixtures/peft_options/bert_cls/base";
    /// assert_eq!(AutoSequenceClassifier::modules_to_save(encoder)?, ["classifier"]);
    /// let masked_lm = "tests/fixtures/bert_no_pooler/base";
    /// assert_eq!(AutoSequenceClassifier::modules_to_save(masked_lm)?, ["classifier", "pooler"]);
    /// # Ok(()) }
    /// ```
    pub fn modules_to_save(dir: impl AsRef<Path>) -> Result<Vec<String>> {
        let dir = dir.as_ref();
        let mut modules = vec![Self::head_name(dir)?.to_string()];
        let with_pooler = || -> Result<bool> {
            let config = BertConfig::from_file(dir.join("config.json"))?;
            Ok(config.family.has_pooler())
        };
        if Kind::of(dir)? == Kind::Bert && with_pooler()? {
            let checkpoint = Checkpoint::open(dir)?;
            let has_pooler = [POOLER, "pooler.dense"]
                .iter()
                .any(|path| checkpoint.contains(&format!("{path}.weight")));
            if !has_pooler {
                modules.push("pooler".to_string());
            }
        }
        Ok(modules)
    }

    /// The `(in, out)` shapes of the folder's linear layers (what VeRA's shared projections
    /// must cover, [`crate::finetune::AdapterRecipe::plan`]).
    pub fn linear_shapes(dir: impl AsRef<Path>) -> Result<Vec<(usize, usize)>> {
        let dir = dir.as_ref();
        match Kind::of(dir)? {
            Kind::Bert => Ok(BertConfig::from_file(dir.join("config.json"))?.linear_shapes()),
            Kind::Llama | Kind::Gpt2 => AutoCausalLm::linear_shapes(dir),
        }
    }

    /// Reads the model folder `dir` by its `model_type` and builds the classifier in
    /// `dtype` on `device` through `plan`. `labels` replace the classification fields of
    /// its `config.json` (transformers' `from_pretrained(dir, num_labels=…)`; BERT takes
    /// no pad id); `None` keeps them.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        labels: Option<&ClassifierConfig>,
        dtype: DType,
        device: &Device,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        Ok(match (Kind::of(dir)?, labels) {
            (Kind::Bert, labels) => {
                let mut config = BertConfig::from_file(dir.join("config.json"))?;
                if let Some(l) = labels {
                    config.num_labels = l.num_labels;
                    config.id2label = l.id2label.clone();
                    config.problem_type = l.problem_type;
                    config.initializer_range = l.initializer_range;
                    config.ignore_mismatched_sizes = l.ignore_mismatched_sizes;
                }
                let model = BertForSequenceClassification::from_pretrained_with(
                    dir, &config, dtype, device, plan,
                )?;
                Self::Bert(model)
            }
            (Kind::Llama, Some(l)) => Self::Llama(
                LlamaForSequenceClassification::from_pretrained_with(dir, l, dtype, device, plan)?,
            ),
            (Kind::Llama, None) => Self::Llama(LlamaForSequenceClassification::from_pretrained(
                dir, dtype, device, plan,
            )?),
            (Kind::Gpt2, Some(l)) => Self::Gpt2(
                Gpt2ForSequenceClassification::from_pretrained_with(dir, l, dtype, device, plan)?,
            ),
            (Kind::Gpt2, None) => Self::Gpt2(Gpt2ForSequenceClassification::from_pretrained(
                dir, dtype, device, plan,
            )?),
        })
    }

    /// The model as the training loop takes it.
    pub fn as_classifier(&self) -> &dyn SequenceClassifier {
        match self {
            Self::Bert(m) => m,
            Self::Llama(m) => m,
            Self::Gpt2(m) => m,
        }
    }
}
