//! What every sequence classifier shares: the problem type ([`ProblemType`]) and labels of
//! its config ([`ClassifierConfig`]), transformers' loss for the problem type
//! ([`classification_loss`]), a head the checkpoint lacks, and a decoder's pooling (the
//! last token of each row that is not padding).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::frozen::BaseKind;
use crate::init::SeededRng;
use crate::model::{linear_b, AdapterPlan, Linear};
use candle_core::Module;

/// The loss a classifier trains with (transformers' `problem_type`); see
/// [`classification_loss`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemType {
    /// `"regression"`: mean squared error.
    Regression,
    /// `"single_label_classification"`: cross-entropy over integer labels.
    SingleLabelClassification,
    /// `"multi_label_classification"`: binary cross-entropy on the logits, float targets.
    MultiLabelClassification,
}

impl ProblemType {
    /// transformers' name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemType::Regression => "regression",
            ProblemType::SingleLabelClassification => "single_label_classification",
            ProblemType::MultiLabelClassification => "multi_label_classification",
        }
    }
}

impl FromStr for ProblemType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "regression" => Ok(ProblemType::Regression),
            "single_label_classification" => Ok(ProblemType::SingleLabelClassification),
            "multi_label_classification" => Ok(ProblemType::MultiLabelClassification),
            other => Err(Error::Unsupported {
                what: "problem_type",
                got: other.to_string(),
                supported: "regression, single_label_classification, multi_label_classification"
                    .to_string(),
            }),
        }
    }
}

/// The classification fields of transformers' `config.json` (`PretrainedConfig`'s, shared
/// by every architecture): what a decoder's `…ForSequenceClassification` adds to its
/// model's config.
///
/// ```
/// use lorakit::models::classification::{ClassifierConfig, ProblemType};
/// # fn main() -> lorakit::Result<()> {
/// let text = r#"{"model_type": "llama", "id2label": {"0": "neg", "1": "pos"},
///               "pad_token_id": 0, "problem_type": "single_label_classification"}"#;
/// let config = ClassifierConfig::from_json_str(text, "config.json")?;
/// assert_eq!((config.num_labels, config.pad_token_id), (2, Some(0)));
/// assert_eq!(config.id2label, ["neg", "pos"]);
/// assert_eq!(config.problem_type, Some(ProblemType::SingleLabelClassification));
/// // Without id2label or num_labels, transformers' default of 2 classes.
/// assert_eq!(ClassifierConfig::from_json_str("{}", "config.json")?.num_labels, 2);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierConfig {
    /// Outputs of the head (`id2label`'s length when the file has one, as transformers
    /// counts them; `num_labels` otherwise, default 2).
    pub num_labels: usize,
    /// The classes' names in index order (`id2label`; empty when the config names none).
    pub id2label: Vec<String>,
    /// The loss [`classification_loss`] computes; `None`: chosen from `num_labels` and the
    /// labels' dtype, as transformers does.
    pub problem_type: Option<ProblemType>,
    /// The padding token: a decoder classifier reads each row at its last token that is
    /// not this one (read from `text_config` when the config nests one, Gemma 3 4B+'s, as
    /// transformers' `get_text_config()` does). `None`: only batches of one row
    /// (transformers refuses more).
    pub pad_token_id: Option<u32>,
    /// The standard deviation of transformers' normal initialisation: a head the
    /// checkpoint lacks is initialised with it.
    pub initializer_range: f64,
    /// transformers' `from_pretrained(…, ignore_mismatched_sizes=True)` (a loading option,
    /// not read from `config.json`): a checkpoint head of another number of classes is
    /// replaced by a new one (when the plan trains the head), instead of an error.
    pub ignore_mismatched_sizes: bool,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            num_labels: 2,
            id2label: Vec::new(),
            problem_type: None,
            pad_token_id: None,
            initializer_range: 0.02,
            ignore_mismatched_sizes: false,
        }
    }
}

/// The classification fields of a `config.json` as written.
#[derive(Deserialize)]
struct RawClassifierConfig {
    num_labels: Option<usize>,
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
    problem_type: Option<String>,
    pad_token_id: Option<serde_json::Value>,
    initializer_range: Option<f64>,
    /// An image-and-text model's text decoder config, whose `pad_token_id` transformers'
    /// classifiers read (`config.get_text_config()`).
    text_config: Option<TextPadId>,
}

/// The `pad_token_id` of a `text_config`.
#[derive(Deserialize)]
struct TextPadId {
    pad_token_id: Option<serde_json::Value>,
}

impl ClassifierConfig {
    /// Reads the classification fields of transformers' `config.json` at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::error::read_text(path)?;
        Self::from_json_str(&text, path)
    }

    /// Parses them from the text of a `config.json`; `path` names it in errors.
    pub fn from_json_str(text: &str, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let raw: RawClassifierConfig = crate::error::parse_json(text, path.clone())?;
        let d = Self::default();
        // transformers: with an `id2label` the labels are its entries (a `num_labels` that
        // disagrees is overridden, with a warning); without one, `num_labels` or 2.
        let num_labels = match &raw.id2label {
            Some(map) => map.len(),
            None => raw.num_labels.unwrap_or(d.num_labels),
        };
        // One token id, or null for none; the text decoder's when the config nests one
        // (`get_text_config()`), as transformers' classifiers read it.
        let (pad_key, pad_value) = match raw.text_config {
            Some(text) => ("text_config.pad_token_id", text.pad_token_id),
            None => ("pad_token_id", raw.pad_token_id),
        };
        let pad_token_id = match pad_value {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| {
                        Error::file_config(
                            path.clone(),
                            pad_key,
                            format!("must be a token id (an integer ≥ 0), got {v}"),
                        )
                    })?,
            ),
        };
        let config = Self {
            num_labels,
            id2label: raw.id2label.as_ref().map(label_names).unwrap_or_default(),
            problem_type: raw
                .problem_type
                .as_deref()
                .map(ProblemType::from_str)
                .transpose()?,
            pad_token_id,
            initializer_range: raw.initializer_range.unwrap_or(d.initializer_range),
            ignore_mismatched_sizes: false,
        };
        config.check(|field, reason| Error::file_config(path.clone(), field, reason))?;
        Ok(config)
    }

    /// Checks at least one label (two for `single_label_classification`, as transformers
    /// requires) and a finite `initializer_range ≥ 0`.
    pub fn validate(&self) -> Result<()> {
        self.check(|field, reason| Error::settings("classifier config", field, reason))
    }

    pub(crate) fn check(&self, err: impl Fn(&'static str, String) -> Error) -> Result<()> {
        if self.num_labels == 0 {
            return Err(err("num_labels", "must be at least 1, got 0".to_string()));
        }
        if !self.initializer_range.is_finite() || self.initializer_range < 0.0 {
            return Err(err(
                "initializer_range",
                format!("must be finite and >= 0, got {}", self.initializer_range),
            ));
        }
        if self.problem_type == Some(ProblemType::SingleLabelClassification) && self.num_labels < 2
        {
            return Err(err(
                "problem_type",
                "single_label_classification needs num_labels > 1 (use regression for a single \
                 output)"
                    .to_string(),
            ));
        }
        Ok(())
    }

    /// The classes' names while there are `num_labels` of them, else none.
    pub(crate) fn names(&self) -> Vec<String> {
        match self.id2label.len() == self.num_labels {
            true => self.id2label.clone(),
            false => Vec::new(),
        }
    }
}

/// `id2label`'s names in index order; empty unless its keys are exactly `0..len` and its
/// values strings.
pub(crate) fn label_names(map: &serde_json::Map<String, serde_json::Value>) -> Vec<String> {
    (0..map.len())
        .map(|i| {
            map.get(&i.to_string())
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .collect::<Option<Vec<_>>>()
        .unwrap_or_default()
}

/// The training loss of `logits` (`(batch, num_labels)`) against `labels`, as transformers'
/// sequence classifiers compute it for `problem_type` (when `None`: regression for one
/// label, single-label classification for integer labels, multi-label otherwise):
///
/// - regression: mean squared error (`labels` `(batch,)` or `(batch, 1)` for one label,
///   `(batch, num_labels)` otherwise);
/// - single-label: cross-entropy, `labels` integer `(batch,)` in `0..num_labels`
///   (PyTorch's `ignore_index = -100` is refused as out of range);
/// - multi-label: binary cross-entropy with logits, mean over all entries, `labels` float
///   `(batch, num_labels)`.
///
/// `head` names the classifier in errors.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::models::classification::{classification_loss, ProblemType};
/// # fn main() -> lorakit::Result<()> {
/// let logits = Tensor::new(&[[2f32, 0.0], [0.0, 2.0]], &Device::Cpu)?;
/// let labels = Tensor::new(&[0u32, 1], &Device::Cpu)?;
/// let loss = classification_loss(&logits, &labels, 2, None, "score")?.to_scalar::<f32>()?;
/// assert!((loss - (1.0 + (-2f32).exp()).ln()).abs() < 1e-6);
/// // A class index past num_labels is an error naming it.
/// let bad = Tensor::new(&[0u32, 2], &Device::Cpu)?;
/// assert!(classification_loss(&logits, &bad, 2, None, "score").is_err());
/// # Ok(()) }
/// ```
pub fn classification_loss(
    logits: &Tensor,
    labels: &Tensor,
    num_labels: usize,
    problem_type: Option<ProblemType>,
    head: &str,
) -> Result<Tensor> {
    let n = num_labels;
    let logits_error = || Error::ShapeMismatch {
        layer: head.to_string(),
        what: "logits".to_string(),
        expected: format!("(batch, {n})"),
        got: format!("{:?}", logits.dims()),
    };
    let (batch, got) = logits.dims2().map_err(|_| logits_error())?;
    if got != n {
        return Err(logits_error());
    }
    let integer = matches!(labels.dtype(), DType::U8 | DType::U32 | DType::I64);
    let problem = problem_type.unwrap_or(if n == 1 {
        ProblemType::Regression
    } else if integer {
        ProblemType::SingleLabelClassification
    } else {
        ProblemType::MultiLabelClassification
    });
    let labels_error = |expected: String| Error::ShapeMismatch {
        layer: head.to_string(),
        what: format!("labels ({})", problem.as_str()),
        expected,
        got: format!("{:?} {:?}", labels.dims(), labels.dtype()),
    };
    match problem {
        ProblemType::Regression => {
            let (logits, labels) = if n == 1 {
                if labels.elem_count() != batch {
                    return Err(labels_error(format!("({batch},) or ({batch}, 1)")));
                }
                (logits.flatten_all()?, labels.flatten_all()?)
            } else {
                if labels.dims() != [batch, n] {
                    return Err(labels_error(format!("({batch}, {n})")));
                }
                (logits.clone(), labels.clone())
            };
            let labels = labels.to_dtype(logits.dtype())?;
            Ok(candle_nn::loss::mse(&logits, &labels)?)
        }
        ProblemType::SingleLabelClassification => {
            if !integer || labels.elem_count() != batch {
                return Err(labels_error(format!("integer ({batch},)")));
            }
            let labels = labels.flatten_all()?.to_dtype(DType::I64)?;
            let bad = labels
                .to_vec1::<i64>()?
                .into_iter()
                .find(|&l| usize::try_from(l).map_or(true, |l| l >= n));
            if let Some(bad) = bad {
                return Err(Error::layer_config(
                    head,
                    "labels",
                    format!("single-label classification takes labels in 0..{n}, got {bad}"),
                ));
            }
            let labels = labels.to_dtype(DType::U32)?;
            Ok(candle_nn::loss::cross_entropy(logits, &labels)?)
        }
        ProblemType::MultiLabelClassification => {
            if labels.dims() != [batch, n] {
                return Err(labels_error(format!("({batch}, {n})")));
            }
            let y = labels.to_dtype(logits.dtype())?;
            // max(x, 0) - x y + log(1 + exp(-|x|)): PyTorch's stable form.
            let x = logits;
            let loss = ((x.relu()? - (x * &y)?)? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
            Ok(loss.mean_all()?)
        }
    }
}

/// The seed of a new classifier head's (or pooler's) initialisation.
const NEW_HEAD_SEED: u64 = 0;

/// The classification head `name` (`hidden → labels.num_labels`, with a bias or not) at
/// `vb`, or a new one when the checkpoint lacks `name.weight` — or holds one of another
/// shape and `labels.ignore_mismatched_sizes` is set — and `plan` trains or replaces it
/// (`name` in `modules_to_save`, as PEFT's `SEQ_CLS` task sets): weights from
/// `N(0, initializer_range²)`, bias 0, drawn from a fixed seed, as transformers
/// initialises a missing head. Without a plan for it, the missing or mismatched tensor is
/// an error naming it (transformers would go on with a random head and a warning).
pub(crate) fn head_or_new(
    name: &str,
    hidden: usize,
    bias: bool,
    labels: &ClassifierConfig,
    vb: &VarBuilder,
    plan: &AdapterPlan,
) -> Result<Linear> {
    let n = labels.num_labels;
    let weight = format!("{name}.weight");
    let trained = plan.touches(name, BaseKind::Linear);
    let replace = match vb.contains_tensor(&weight) {
        false => trained,
        true => match vb.get((n, hidden), &weight) {
            Ok(_) => false,
            Err(_) if labels.ignore_mismatched_sizes && trained => true,
            Err(e) => {
                return Err(Error::layer_config(
                    name,
                    "num_labels",
                    format!(
                        "the checkpoint's head does not take {n} classes ({e}); to replace \
                         it with a new head, set ignore_mismatched_sizes and train `{name}` \
                         (modules_to_save)"
                    ),
                ))
            }
        },
    };
    if !replace {
        return linear_b(hidden, n, bias, vb.pp(name), plan);
    }
    let shape = (hidden, n, bias);
    new_linear(name, shape, labels.initializer_range, vb, plan)
}

/// A linear layer `name` (`(in, out, bias)`) that the checkpoint behind `vb` does not hold,
/// initialised as transformers initialises a missing one — weights from
/// `N(0, initializer_range²)`, bias 0, drawn from a fixed seed per name — and built
/// through `plan` (which trains it, or replaces it with a loaded adapter's copy).
pub(crate) fn new_linear(
    name: &str,
    (inputs, outputs, bias): (usize, usize, bool),
    initializer_range: f64,
    vb: &VarBuilder,
    plan: &AdapterPlan,
) -> Result<Linear> {
    let (dtype, device) = (vb.dtype(), vb.device());
    let mut rng = SeededRng::for_layer(NEW_HEAD_SEED, name);
    let weight = rng.normal((outputs, inputs), 0.0, initializer_range, dtype, device)?;
    let mut tensors = HashMap::from([(format!("{name}.weight"), weight)]);
    if bias {
        tensors.insert(
            format!("{name}.bias"),
            Tensor::zeros(outputs, dtype, device)?,
        );
    }
    let fresh = VarBuilder::from_tensors(tensors, dtype, device);
    linear_b(inputs, outputs, bias, fresh.pp(name), plan)
}

/// For each row of `ids` `(batch, seq)`, the slot of its last token that is not
/// `pad_token_id` (0 for a row of padding only), as transformers' decoder classifiers pick
/// the position they classify; without a pad id, the last slot, and only for one row.
/// `head` names the classifier in errors.
fn last_tokens(ids: &Tensor, pad_token_id: Option<u32>, head: &str) -> Result<Vec<u32>> {
    let (batch, seq) = ids.dims2()?;
    let last = u32::try_from(seq.saturating_sub(1)).unwrap_or(u32::MAX);
    let Some(pad) = pad_token_id else {
        if batch != 1 {
            return Err(Error::layer_config(
                head,
                "pad_token_id",
                format!(
                    "the config has none, so a batch of {batch} rows cannot be read at each \
                     row's last token (transformers refuses it too): set pad_token_id, or \
                     classify one row at a time"
                ),
            ));
        }
        return Ok(vec![last]);
    };
    let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(rows
        .iter()
        .map(|row| {
            let at = row.iter().rposition(|&t| t != pad).unwrap_or(0);
            u32::try_from(at).unwrap_or(u32::MAX)
        })
        .collect())
}

/// The padding an attention mask `(batch, seq)` describes, for a decoder: `None` when no
/// row has padding on the left (all ones, or ones then zeros — right padding, which causal
/// attention never lets a real token see), else each row's leading zeros. A row whose
/// ones are not contiguous, or with padding on both sides, is an error naming it.
fn left_padding(mask: &Tensor, dims: &[usize], head: &str) -> Result<Option<Vec<usize>>> {
    if mask.dims() != dims {
        return Err(Error::ShapeMismatch {
            layer: head.to_string(),
            what: "attention_mask".to_string(),
            expected: format!("{dims:?} (as input_ids)"),
            got: format!("{:?}", mask.dims()),
        });
    }
    let rows = mask.ne(0f64)?.to_dtype(DType::U8)?.to_vec2::<u8>()?;
    let mut pads = Vec::with_capacity(rows.len());
    for (r, row) in rows.iter().enumerate() {
        let first = row.iter().position(|&m| m == 1).unwrap_or(row.len());
        let end = row.iter().rposition(|&m| m == 1).map_or(first, |l| l + 1);
        let contiguous = row
            .get(first..end)
            .is_some_and(|s| s.iter().all(|&m| m == 1));
        if !contiguous || end == first || (first > 0 && end < row.len()) {
            return Err(Error::layer_config(
                head,
                "attention_mask",
                format!(
                    "row {r} is {row:?}: a decoder classifier takes rows padded on one side \
                     (ones then zeros, or zeros then ones) with at least one token"
                ),
            ));
        }
        pads.push(first);
    }
    Ok(pads.iter().any(|&p| p > 0).then_some(pads))
}

/// Row `b` of `hidden` `(batch, seq, d)` at slot `slots[b]`: `(batch, d)`.
fn rows_at(hidden: &Tensor, slots: &[u32]) -> Result<Tensor> {
    let (batch, seq, d) = hidden.dims3()?;
    let flat: Vec<u32> = slots
        .iter()
        .zip(0u32..)
        .map(|(&s, b)| b * u32::try_from(seq).unwrap_or(u32::MAX) + s)
        .collect();
    let index = Tensor::from_vec(flat, batch, hidden.device())?;
    Ok(hidden.reshape((batch * seq, d))?.index_select(&index, 0)?)
}

/// A decoder's classification head: `score` (a linear layer without bias, transformers'
/// name, which PEFT's `SEQ_CLS` task adds to `modules_to_save`) on each row's last token
/// that is not padding, with the labels of the config.
#[derive(Clone, Debug)]
pub(crate) struct LastTokenHead {
    pub(crate) score: Linear,
    pub(crate) labels: ClassifierConfig,
}

impl LastTokenHead {
    /// The head's module path.
    pub(crate) const NAME: &'static str = "score";

    /// `score` (`hidden → num_labels`) from `vb`, or new ([`head_or_new`]).
    pub(crate) fn load(
        hidden: usize,
        labels: &ClassifierConfig,
        vb: &VarBuilder,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        labels.validate()?;
        Ok(Self {
            score: head_or_new(Self::NAME, hidden, false, labels, vb, plan)?,
            labels: labels.clone(),
        })
    }

    /// The left padding `attention_mask` gives `(batch, seq)` ids ([`left_padding`]).
    pub(crate) fn padding(
        &self,
        attention_mask: Option<&Tensor>,
        (batch, seq): (usize, usize),
    ) -> Result<Option<Vec<usize>>> {
        match attention_mask {
            Some(mask) => left_padding(mask, &[batch, seq], Self::NAME),
            None => Ok(None),
        }
    }

    /// The logits `(batch, num_labels)` of the hidden states `(batch, seq, d)` the ids
    /// `(batch, seq)` gave: each row at its last token that is not padding.
    pub(crate) fn logits(&self, hidden: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let slots = last_tokens(input_ids, self.labels.pad_token_id, Self::NAME)?;
        Ok(self.score.forward(&rows_at(hidden, &slots)?)?)
    }

    /// [`classification_loss`] for the labels' problem type.
    pub(crate) fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let c = &self.labels;
        classification_loss(logits, labels, c.num_labels, c.problem_type, Self::NAME)
    }
}
