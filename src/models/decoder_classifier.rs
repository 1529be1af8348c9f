//! What the decoders' sequence classifiers ([`crate::models::llama::LlamaForSequenceClassification`],
//! [`crate::models::gpt2::Gpt2ForSequenceClassification`]) share: a decoder trunk (its
//! [`DecoderTrunk`]), then [`LastTokenHead`]; loading from a folder, the forward, and
//! through [`AsDecoderParts`] the [`SequenceClassifier`](super::SequenceClassifier) impl.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::model::quantize::checkpoint_and_plan;
use crate::model::AdapterPlan;
use crate::models::classification::{ClassifierConfig, LastTokenHead};
use crate::models::decoder_trunk::DecoderTrunk;
use crate::models::padding::PaddedPositions;

/// A decoder trunk and a [`LastTokenHead`], and the folder they came from.
#[derive(Clone, Debug)]
pub(crate) struct DecoderParts<T> {
    pub(crate) trunk: T,
    pub(crate) head: LastTokenHead,
    pub(crate) name_or_path: Option<String>,
}

impl<T: DecoderTrunk> DecoderParts<T> {
    /// The trunk from `vb` through `plan`, then the head (`score`, or a new one).
    pub(crate) fn load(
        config: &T::Config,
        labels: &ClassifierConfig,
        vb: VarBuilder,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let (trunk, root) = T::load_trunk(config, vb, plan)?;
        let head = LastTokenHead::load(trunk.hidden_size(), labels, &root, plan)?;
        Ok(Self {
            trunk,
            head,
            name_or_path: None,
        })
    }

    /// The model folder `dir`: its `config.json` (the classification fields from it too
    /// unless `labels` are given) and its checkpoint in `dtype` on `device`.
    pub(crate) fn from_folder(
        dir: &Path,
        labels: Option<&ClassifierConfig>,
        dtype: DType,
        device: &Device,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let config_file = dir.join("config.json");
        let config = T::read_config(&config_file)?;
        let labels = match labels {
            Some(labels) => labels.clone(),
            None => ClassifierConfig::from_file(&config_file)?,
        };
        let (vb, plan) = checkpoint_and_plan(dir, dtype, device, plan)?;
        let mut parts = Self::load(&config, &labels, vb, &plan)?;
        parts.name_or_path = Some(dir.display().to_string());
        Ok(parts)
    }

    /// Logits `(batch, num_labels)`: each row at its last token that is not padding, left
    /// padding (from `attention_mask`) masked, positions from each row's first slot;
    /// `train`: the trunk's own dropouts apply ([`DecoderTrunk::hidden`]).
    pub(crate) fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let dims = self.trunk.check_ids(input_ids)?;
        let pads = self.head.padding(attention_mask, dims)?;
        let numbering = PaddedPositions::FromFirstSlot;
        let hidden = self
            .trunk
            .hidden(input_ids, pads.as_deref(), numbering, train)?;
        self.head.logits(&hidden, input_ids)
    }
}

/// A public decoder classifier's parts: every such model is a
/// [`SequenceClassifier`](super::SequenceClassifier) through them.
pub(crate) trait AsDecoderParts {
    /// Its trunk.
    type Trunk: DecoderTrunk;
    /// Its parts.
    fn parts(&self) -> &DecoderParts<Self::Trunk>;
}
