//! [`ClassificationHead`]: what turns the encoder's first token into logits — BERT's
//! pooler and linear classifier, or the RoBERTa family's two-layer `classifier`.

use candle_core::{IndexOp, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::frozen::BaseKind;
use crate::model::{linear, AdapterPlan, Linear};
use crate::models::classification::{head_or_new, new_linear};
use crate::models::ops::dropout_t;

use super::config::BertConfig;

/// The pooler's path, as transformers names it.
pub(crate) const POOLER: &str = "bert.pooler.dense";

/// The classification head, at transformers' paths.
#[derive(Clone, Debug)]
pub(super) enum ClassificationHead {
    /// BERT: `classifier(dropout(tanh(pooler(first token))))`, the pooler at
    /// `bert.pooler.dense`.
    Pooled { pooler: Linear, classifier: Linear },
    /// The RoBERTa family (`RobertaClassificationHead`):
    /// `classifier.out_proj(dropout(tanh(classifier.dense(dropout(first token)))))`.
    TwoLayer { dense: Linear, out_proj: Linear },
}

impl ClassificationHead {
    /// The head in `vb` (the model's root: `bert.…` / `classifier.…`), a missing layer
    /// made new when `plan` trains it (see
    /// [`BertForSequenceClassification::load`](super::BertForSequenceClassification::load)).
    pub(super) fn load(config: &BertConfig, vb: &VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let h = config.hidden_size;
        let labels = config.labels();
        if !config.family.has_pooler() {
            let dense = "classifier.dense";
            let dense = match vb.contains_tensor(&format!("{dense}.weight"))
                || !plan.touches(dense, BaseKind::Linear)
            {
                // The checkpoint's, or a missing-tensor error naming it (a `VarMap`
                // creates it).
                true => linear(h, h, vb.pp(dense), plan)?,
                false => new_linear(dense, (h, h, true), config.initializer_range, vb, plan)?,
            };
            let out_proj = head_or_new("classifier.out_proj", h, true, &labels, vb, plan)?;
            return Ok(Self::TwoLayer { dense, out_proj });
        }
        let pooler = match vb.contains_tensor(&format!("{POOLER}.weight")) {
            true => linear(h, h, vb.pp(POOLER), plan)?,
            false => new_pooler(config, vb, plan)?,
        };
        let classifier = head_or_new("classifier", h, true, &labels, vb, plan)?;
        Ok(Self::Pooled { pooler, classifier })
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
            Self::TwoLayer { dense, out_proj } => {
                let x = dense.forward(&dropout_t(first, p, train)?)?.tanh()?;
                out_proj.forward(&dropout_t(x, p, train)?)?
            }
        })
    }
}

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
