//! [`DecoderTrunk`]: a decoder without its output head, as the causal LMs and the
//! sequence classifiers built on it run it.

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::model::AdapterPlan;
use crate::models::padding::PaddedPositions;

/// How a trunk runs new positions, besides the ids and the cached keys and values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pass<'a> {
    /// The first new position (the cached length).
    pub offset: usize,
    /// A left-padded batch's padding per row (`models::padding`).
    pub pads: Option<&'a [usize]>,
    /// How a padded row's tokens are numbered.
    pub numbering: PaddedPositions,
    /// Attention reads the new keys and values as stored values
    /// (`KvCache::for_inference`).
    pub values_only: bool,
    /// The model's own dropouts apply (transformers' training mode).
    pub train: bool,
}

impl<'a> Pass<'a> {
    /// Decoding: new positions from `offset` after a cache, numbered after each row's
    /// padding (transformers' `generate`), in evaluation mode.
    pub(crate) fn decoding(offset: usize, pads: Option<&'a [usize]>, values_only: bool) -> Self {
        Self {
            offset,
            pads,
            numbering: PaddedPositions::AfterPadding,
            values_only,
            train: false,
        }
    }

    /// A whole sequence from position 0, no cache.
    pub(crate) fn whole(
        pads: Option<&'a [usize]>,
        numbering: PaddedPositions,
        train: bool,
    ) -> Self {
        Self {
            offset: 0,
            pads,
            numbering,
            values_only: false,
            train,
        }
    }
}

/// A decoder without its output head (Llama's `model.*`, GPT-2's `transformer.*`): what its
/// causal LM and its sequence classifier run.
pub(crate) trait DecoderTrunk: Sized {
    /// The model's configuration.
    type Config;
    /// Reads the configuration from a `config.json`.
    fn read_config(path: &Path) -> Result<Self::Config>;
    /// Checks `config` and builds the trunk from the checkpoint's root `vb`; returns it
    /// and the `VarBuilder` the head's tensors are under.
    fn load_trunk<'a>(
        config: &Self::Config,
        vb: VarBuilder<'a>,
        plan: &AdapterPlan,
    ) -> Result<(Self, VarBuilder<'a>)>;
    /// The hidden size (the head's input).
    fn hidden_size(&self) -> usize;
    /// `(batch, seq)` of valid token ids, or an error naming what is wrong.
    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)>;
    /// The hidden states after the final norm, a left-padded batch's padding `pads`;
    /// `train`: the model's own dropouts apply (transformers' training mode).
    fn hidden(
        &self,
        ids: &Tensor,
        pads: Option<&[usize]>,
        numbering: PaddedPositions,
        train: bool,
    ) -> Result<Tensor>;
    /// The vocabulary size.
    fn vocab_size(&self) -> usize;
    /// The longest sequence.
    fn max_positions(&self) -> usize;
    /// The device it lives on.
    fn device(&self) -> &Device;
    /// The module prefixes its checkpoint has but it does not build (see
    /// [`CausalLm::modules_not_built`](crate::models::CausalLm::modules_not_built)).
    fn modules_not_built(&self) -> &'static [&'static str] {
        &[]
    }

    /// The hidden states of whole sequences `input_ids` for a loss, the ids checked;
    /// detached without `gradient` (evaluation: nothing before the head is differentiated);
    /// `train` as [`DecoderTrunk::hidden`]'s.
    fn loss_hidden(&self, input_ids: &Tensor, gradient: bool, train: bool) -> Result<Tensor> {
        self.check_ids(input_ids)?;
        let hidden = self.hidden(input_ids, None, PaddedPositions::AfterPadding, train)?;
        Ok(if gradient { hidden } else { hidden.detach() })
    }
}
