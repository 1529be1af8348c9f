//! GPT-2 without an output head (transformers' `GPT2Model`, tensors `transformer.*`):
//! what the language model and the sequence classifier share.

use std::path::Path;

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result, Scope};
use crate::model::{embedding, AdapterPlan, Embedding};
use crate::models::base_prefix::with_base_prefix;
use crate::models::decoder_trunk::{DecoderTrunk, Pass};
use crate::models::kv_buffer::{Appending, LayerKv};
use crate::models::ops::{dropout_t, LayerNorm};
use crate::models::padding::{position, PaddedPositions};

use super::block::Block;
use super::causal_mask;
use super::config::Gpt2Config;

/// The token and position tables, the blocks and the final norm, built through an
/// [`AdapterPlan`] at transformers' paths.
#[derive(Clone, Debug)]
pub(crate) struct Gpt2Trunk {
    pub(super) config: Gpt2Config,
    pub(super) wte: Embedding,
    wpe: Embedding,
    pub(super) blocks: Vec<Block>,
    ln_f: LayerNorm,
    pub(super) device: Device,
}

impl Gpt2Trunk {
    /// Builds the trunk under `vb`'s `transformer.` (the caller has checked `config` and
    /// given a `vb` with that prefix).
    pub(super) fn load(config: &Gpt2Config, vb: &VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let d = config.n_embd;
        let t = vb.pp("transformer");
        let wte = embedding(config.vocab_size, d, t.pp("wte"), plan)?;
        let wpe = embedding(config.n_positions, d, t.pp("wpe"), plan)?;
        let blocks = (0..config.n_layer)
            .map(|i| Block::load(config, i, t.pp("h").pp(i), plan))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(d, config.layer_norm_epsilon, t.pp("ln_f"), plan)?;
        let device = wte.base_stored_weight()?.device().clone();
        Ok(Self {
            config: config.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            device,
        })
    }

    /// The hidden states after the final layer norm for `input_ids` at positions
    /// `pass.offset..` after each block's cached keys and values `past` (in block order),
    /// and every block's grown cache entry, run as `pass` says (with `train`, the config's
    /// dropouts). The ids are checked by the caller, and `offset + seq ≤ n_positions`.
    pub(super) fn run_hidden<'a>(
        &self,
        input_ids: &Tensor,
        past: impl Iterator<Item = &'a Option<LayerKv>>,
        pass: Pass,
    ) -> Result<(Tensor, Vec<LayerKv>)> {
        let Pass {
            offset,
            pads,
            numbering,
            values_only,
            train,
        } = pass;
        let (_, seq) = input_ids.dims2()?;
        let end = offset.saturating_add(seq);
        let (start, end) = match (u32::try_from(offset), u32::try_from(end)) {
            (Ok(start), Ok(end)) => (start, end),
            _ => {
                return Err(Error::usage(
                    Scope::Layer("transformer.wpe".to_string()),
                    format!("positions {offset}..{end} do not fit in u32"),
                ))
            }
        };
        let shifted = pads.filter(|_| numbering == PaddedPositions::AfterPadding);
        let positions = match shifted {
            // Each row's tokens at positions 0.. after its padding (`models::padding`).
            Some(pads) => {
                let ids: Vec<u32> = pads
                    .iter()
                    .flat_map(|&pad| (offset..offset + seq).map(move |s| position(s, pad)))
                    .map(|p| u32::try_from(p).unwrap_or(u32::MAX))
                    .collect();
                Tensor::from_vec(ids, (pads.len(), seq), &self.device)?
            }
            None => Tensor::arange(start, end, &self.device)?,
        };
        let embedded = self
            .wte
            .forward(input_ids)?
            .broadcast_add(&self.wpe.forward(&positions)?)?;
        let mut x = dropout_t(embedded, self.config.embd_pdrop, train)?;
        let mask = causal_mask(seq, offset, pads, &self.device);
        let how = Appending {
            len: offset,
            limit: self.config.n_positions,
            values_only,
        };
        let mut grown = Vec::with_capacity(self.blocks.len());
        for (block, past) in self.blocks.iter().zip(past) {
            let (out, kv) = block.forward(&x, &mask, past.as_ref(), how, train)?;
            x = out;
            grown.push(kv);
        }
        Ok((self.ln_f.forward(&x)?, grown))
    }

    /// [`Gpt2Trunk::run_hidden`] over a whole sequence, no cache.
    pub(super) fn hidden(
        &self,
        input_ids: &Tensor,
        pads: Option<&[usize]>,
        numbering: PaddedPositions,
        train: bool,
    ) -> Result<Tensor> {
        let no_past = std::iter::repeat_n(&None, self.blocks.len());
        let pass = Pass::whole(pads, numbering, train);
        Ok(self.run_hidden(input_ids, no_past, pass)?.0)
    }

    /// `(batch, seq)` of valid token ids: rank 2, `batch ≥ 1`, `1 ≤ seq ≤ n_positions`,
    /// ids below `vocab_size` on the model's device.
    pub(super) fn check_ids(&self, input_ids: &Tensor) -> Result<(usize, usize)> {
        let layer = "transformer.wte";
        let bad_shape = |expected: String| Error::ShapeMismatch {
            layer: layer.to_string(),
            what: "input_ids".to_string(),
            expected,
            got: format!("{:?}", input_ids.dims()),
        };
        let &[batch, seq] = input_ids.dims() else {
            return Err(bad_shape("(batch, seq)".to_string()));
        };
        if batch == 0 || seq == 0 || seq > self.config.n_positions {
            return Err(bad_shape(format!(
                "(batch ≥ 1, 1 ≤ seq ≤ n_positions = {})",
                self.config.n_positions
            )));
        }
        crate::validate::token_ids(layer, input_ids, self.config.vocab_size, &self.device)?;
        Ok((batch, seq))
    }
}

impl DecoderTrunk for Gpt2Trunk {
    type Config = Gpt2Config;

    fn read_config(path: &Path) -> Result<Gpt2Config> {
        Gpt2Config::from_file(path)
    }

    fn load_trunk<'a>(
        config: &Gpt2Config,
        vb: VarBuilder<'a>,
        plan: &AdapterPlan,
    ) -> Result<(Self, VarBuilder<'a>)> {
        config.validate()?;
        let vb = with_base_prefix(vb, "transformer", "wte.weight");
        Ok((Self::load(config, &vb, plan)?, vb))
    }

    fn hidden_size(&self) -> usize {
        self.config.n_embd
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        Gpt2Trunk::check_ids(self, ids)
    }

    fn hidden(
        &self,
        ids: &Tensor,
        pads: Option<&[usize]>,
        numbering: PaddedPositions,
        train: bool,
    ) -> Result<Tensor> {
        Gpt2Trunk::hidden(self, ids, pads, numbering, train)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.config.n_positions
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
