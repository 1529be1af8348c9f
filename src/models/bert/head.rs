//! [`ClassificationHead`]: what turns the encoder's first token into logits — BERT's
//! pooler and linear classifier, the RoBERTa family's and ELECTRA's two-layer
//! `classifier`, or DistilBERT's `pre_classifier` and `classifier`.

use candle_core::{IndexOp, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::frozen::BaseKind;
use crate::model::{linear, AdapterPlan, Linear};
use crate::models::classification::{head_or_new, new_linear};
use crate::models::ops::dropout_t;

use super::config::{BertConfig, BertFamily};

/// The pooler's path, as transformers names it.
pub(crate) const POOLER: &str = "bert.pooler.dense";

/// The classification head, at transformers' paths.
#[derive(Clone, Debug)]
pub(super) enum ClassificationHead {
    /// BERT: `classifier(dropout(tanh(pooler(first token))))`, the pooler at
    /// `bert.pooler.dense`.
    Pooled { pooler: Linear, classifier: Linear },
    /// The RoBERTa family (`RobertaClassificationHead`):
    /// `classifier.out_proj(dropout(tanh(classifier.dense(dropout(first token)))))`;
    /// ELECTRA's (`ElectraClassificationHead`) with the exact GELU for tanh (`gelu`).
    TwoLayer {
        dense: Linear,
        out_proj: Linear,
        gelu: bool,
    },
    /// DistilBERT: `classifier(dropout(relu(pre_classifier(first token))))`.
    PreClassifier {
        pre_classifier: Linear,
        classifier: Linear,
    },
}

impl ClassificationHead {
    /// The head in `vb` (the model's root: `bert.…` / `classifier.…`), a missing layer
    /// made new when `plan` trains it (see
    /// [`BertForSequenceClassification::load`](super::BertForSequenceClassification::load)).
    pub(super) fn load(config: &BertConfig, vb: &VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let h = config.hidden_size;
        let labels = config.labels();
        Ok(match config.family {
            BertFamily::Bert => Self::Pooled {
                pooler: square_or_new(POOLER, config, vb, plan, no_pooler)?,
                classifier: head_or_new("classifier", h, true, &labels, vb, plan)?,
            },
            BertFamily::DistilBert => Self::PreClassifier {
                pre_classifier: square_or_new("pre_classifier", config, vb, plan, |e| {
                    untrained_head_layer("pre_classifier", e)
                })?,
                classifier: head_or_new("classifier", h, true, &labels, vb, plan)?,
            },
            BertFamily::Roberta
            | BertFamily::XlmRoberta
            | BertFamily::Camembert
            | BertFamily::Electra => Self::TwoLayer {
                dense: square_or_new("classifier.dense", config, vb, plan, |e| {
                    untrained_head_layer("classifier.dense", e)
                })?,
                out_proj: head_or_new("classifier.out_proj", h, true, &labels, vb, plan)?,
                gelu: config.family == BertFamily::Electra,
            },
        })
    }

    /// The logits `(batch, num_labels)` of the encoder's output `hidden`
    /// `(batch, seq, hidden)`, dropout `p` in training.
    pub(super) fn forward(&self, hidden: &Tensor, p: f64, train: bool) -> Result<Tensor> {
        let first = hidden.i((.., 0))?.contiguous()?;
        Ok(match self {
            Self::Pooled { pooler, classifier } => {
                let pooled = pooler.forward(&first)?.tanh()?;
                classifier.forward(&dropout_t(pooled, p, train)?)?
            }
            Self::TwoLayer {
                dense,
                out_proj,
                gelu,
            } => {
                let x = dense.forward(&dropout_t(first, p, train)?)?;
                let x = match gelu {
                    true => crate::models::gelu::gelu_erf(&x)?,
                    false => x.tanh()?,
                };
                out_proj.forward(&dropout_t(x, p, train)?)?
            }
            Self::PreClassifier {
                pre_classifier,
                classifier,
            } => {
                let x = pre_classifier.forward(&first)?.relu()?;
                classifier.forward(&dropout_t(x, p, train)?)?
            }
        })
    }
}

/// The square layer `path` of the head (`hidden` to `hidden`, with a bias): the
/// checkpoint's; a new one, as transformers initialises it, when the checkpoint lacks it
/// and `plan` trains it (`modules_to_save`; a loaded adapter's trained copy replaces it);
/// otherwise whatever `vb` makes of it (a `VarMap` creates it), or `missing` of the
/// missing-tensor error. transformers would go on with a random layer, which a PEFT
/// adapter does not save unless it trains it, so every load would classify differently.
fn square_or_new(
    path: &str,
    config: &BertConfig,
    vb: &VarBuilder,
    plan: &AdapterPlan,
    missing: impl FnOnce(Error) -> Error,
) -> Result<Linear> {
    let h = config.hidden_size;
    let stored = vb.contains_tensor(&format!("{path}.weight"));
    if !stored && plan.touches(path, BaseKind::Linear) {
        return new_linear(path, (h, h, true), config.initializer_range, vb, plan);
    }
    linear(h, h, vb.pp(path), plan).map_err(|e| match stored {
        true => e,
        false => missing(e),
    })
}

/// A BERT checkpoint without a pooler (saved from `BertForMaskedLM`, or as a `BertModel`
/// without its pooling layer), whose pooler the plan does not train.
fn no_pooler(missing: Error) -> Error {
    Error::layer_config(
        POOLER,
        "modules_to_save",
        format!(
            "the checkpoint has no pooler ({missing}; a BertForMaskedLM save, or a \
             BertModel without its pooling layer): transformers would classify through a \
             random pooler that a PEFT adapter does not save, so no two loads would \
             agree. Train it with the head: modules_to_save [\"classifier\", \"pooler\"] \
             (AutoSequenceClassifier::modules_to_save lists what a checkpoint needs)"
        ),
    )
}

/// A head layer `path` the checkpoint lacks (a masked-LM save) and the plan does not train.
fn untrained_head_layer(path: &str, missing: Error) -> Error {
    Error::layer_config(
        path,
        "modules_to_save",
        format!(
            "the checkpoint has no `{path}` ({missing}; a masked-LM save has no \
             classification head): train the head, modules_to_save [\"classifier\"] \
             (PEFT's SEQ_CLS task), or load an adapter that did"
        ),
    )
}
