//! The Llama-family decoder without an output head (transformers' `LlamaModel`, tensors
//! `model.*`): what the causal language model and the sequence classifier share.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::model::{embedding, AdapterPlan, Embedding};
use crate::models::decoder_trunk::{DecoderTrunk, Pass};
use crate::models::kv_buffer::{Appending, LayerKv};
use crate::models::padding::{self, PaddedPositions};

use super::config::{LayerAttention, LlamaConfig, RopeScaling};
use super::family::LlamaFamily;
use super::layers::{DecoderLayer, Masks};
use super::norm::RmsNorm;
use super::rope::RopeTables;

/// The embedding, the decoder layers and the final norm, built through an
/// [`AdapterPlan`] at transformers' paths (`model.embed_tokens`, `model.layers.N.…`,
/// `model.norm`; under `model.language_model` for an image-and-text checkpoint's
/// decoder, [`LlamaConfig::decoder_prefix`]).
#[derive(Clone, Debug)]
pub(crate) struct LlamaTrunk {
    /// Shared, not copied, by the clones of a model.
    pub(super) config: Arc<LlamaConfig>,
    pub(super) embed_tokens: Embedding,
    pub(super) layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    inv_freq: Vec<f32>,
    /// LongRoPE's frequencies past its original context, and that context's length: a
    /// forward whose positions end past it takes them.
    long_inv_freq: Option<(usize, Vec<f32>)>,
    /// The sliding layers' own frequencies (Gemma 3).
    sliding_inv_freq: Option<Vec<f32>>,
    /// The dtype it computes in: its embedding table's.
    pub(super) dtype: DType,
    pub(super) device: Device,
}

impl LlamaTrunk {
    /// Builds the trunk from `vb` (the checkpoint's root) after checking `config`.
    pub(super) fn load(config: &LlamaConfig, vb: &VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        config.validate()?;
        let c = config;
        let root = vb.pp(c.decoder_prefix());
        // Text never reaches an image-and-text model's vision tower: its adapters have
        // nothing to adapt here.
        for prefix in c.modules_not_built() {
            plan.set_aside(prefix);
        }
        let embed_tokens = embedding(c.vocab_size, c.hidden_size, root.pp("embed_tokens"), plan)?;
        let layers = c
            .layer_attention
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let rotates = c.layer_rope.get(i).copied().unwrap_or(true);
                let sparse = c.moe.as_ref().is_some_and(|m| m.is_sparse(i));
                let spec = (kind, rotates, sparse);
                DecoderLayer::load(c, spec, root.pp(format!("layers.{i}")), plan)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(c, c.hidden_size, root.pp("norm"))?;
        let dtype = embed_tokens.base_stored_weight()?.dtype();
        Ok(Self {
            config: Arc::new(config.clone()),
            embed_tokens,
            layers,
            norm,
            inv_freq: config.inv_freq(),
            long_inv_freq: match &config.rope_scaling {
                RopeScaling::LongRope(long) => {
                    let original = long.original_max_position_embeddings;
                    Some((original, config.inv_freq_for(original + 1)))
                }
                _ => None,
            },
            sliding_inv_freq: config.sliding_inv_freq(),
            dtype,
            device: vb.device().clone(),
        })
    }

    /// The hidden states after the final norm for `input_ids` at positions `pass.offset..`
    /// after each layer's cached keys and values `past` (in layer order), and every
    /// layer's grown cache entry, run as `pass` says (with `train`, the config's attention
    /// dropout). The ids are checked by the caller. Granite's embedding multiplier (Gemma's
    /// embedding scale) applies to the embeddings, and the hidden states come back divided
    /// by Granite's `logits_scaling` (the output head's input: see [`super::Multipliers`]).
    pub(super) fn run_hidden<'a>(
        &self,
        input_ids: &Tensor,
        past: impl Iterator<Item = &'a Option<LayerKv>>,
        pass: Pass,
    ) -> Result<(Tensor, Vec<LayerKv>)> {
        let Pass {
            offset,
            pads,
            numbering: positions,
            values_only,
            train,
        } = pass;
        let seq = input_ids.dim(1)?;
        let ids = input_ids.to_dtype(DType::U32)?;
        let rope_pads = match positions {
            PaddedPositions::AfterPadding => pads,
            PaddedPositions::FromFirstSlot => None,
        };
        // LongRoPE picks its frequencies by where this forward's positions end.
        let inv_freq = match &self.long_inv_freq {
            Some((original, long)) => {
                let end = match rope_pads {
                    Some(pads) => pads
                        .iter()
                        .map(|&pad| padding::position(offset + seq - 1, pad) + 1)
                        .max()
                        .unwrap_or(0),
                    None => offset + seq,
                };
                if end > *original {
                    long
                } else {
                    &self.inv_freq
                }
            }
            None => &self.inv_freq,
        };
        let tables = |inv_freq: &[f32], attention_factor: f32| {
            let (dtype, device) = (self.dtype, &self.device);
            RopeTables::new(
                inv_freq,
                attention_factor,
                offset,
                seq,
                rope_pads,
                dtype,
                device,
            )
        };
        let rope = tables(inv_freq, self.config.rope_attention_factor())?;
        let sliding_rope = match &self.sliding_inv_freq {
            Some(inv_freq) => Some(tables(inv_freq, 1.0)?),
            None => None,
        };
        let masks = Masks::new(
            &self.config.layer_attention,
            seq,
            offset.saturating_add(seq),
            offset,
            pads,
            &self.device,
        );
        let how = Appending {
            len: offset,
            limit: self.config.max_position_embeddings,
            values_only,
        };
        let mut x = self.embed_tokens.forward(&ids)?;
        let scales = self.config.multipliers;
        if scales.embedding_multiplier != 1.0 {
            x = (x * scales.embedding_multiplier)?;
        }
        let mut grown = Vec::with_capacity(self.layers.len());
        for (layer, past) in self.layers.iter().zip(past) {
            let rope = match (layer.kind(), &sliding_rope) {
                (LayerAttention::Sliding { .. }, Some(sliding)) => sliding,
                _ => &rope,
            };
            let (out, kv) = layer.forward_cached(&x, rope, &masks, past.as_ref(), how, train)?;
            x = out;
            grown.push(kv);
        }
        // Granite divides the logits by `logits_scaling`; the head is linear without a
        // bias, so its input divided gives the same (and one place serves the logits,
        // generation and the fused head + loss).
        let mut hidden = self.norm.forward(&x)?;
        if scales.logits_scaling != 1.0 {
            hidden = (hidden / scales.logits_scaling)?;
        }
        Ok((hidden, grown))
    }

    /// [`LlamaTrunk::run_hidden`] over a whole sequence, no cache.
    pub(super) fn hidden(
        &self,
        input_ids: &Tensor,
        pads: Option<&[usize]>,
        positions: PaddedPositions,
        train: bool,
    ) -> Result<Tensor> {
        let no_past = std::iter::repeat_n(&None, self.layers.len());
        let pass = Pass::whole(pads, positions, train);
        Ok(self.run_hidden(input_ids, no_past, pass)?.0)
    }

    /// `(batch, seq)` of valid token ids: rank 2, `batch, seq ≥ 1`, ids below `vocab_size`
    /// on the model's device (the check every embedding makes).
    pub(super) fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let layer = &format!("{}.embed_tokens", self.config.decoder_prefix());
        let (batch, seq) = match ids.dims() {
            &[batch, seq] if batch > 0 && seq > 0 => (batch, seq),
            _ => {
                return Err(Error::ShapeMismatch {
                    layer: layer.to_string(),
                    what: "input_ids".to_string(),
                    expected: "(batch, seq) with batch, seq ≥ 1".to_string(),
                    got: format!("{:?}", ids.dims()),
                })
            }
        };
        crate::validate::named_token_ids(
            layer,
            "input_ids",
            ids,
            self.config.vocab_size,
            &self.device,
        )?;
        Ok((batch, seq))
    }
}

impl DecoderTrunk for LlamaTrunk {
    type Config = LlamaConfig;

    fn read_config(path: &Path) -> Result<LlamaConfig> {
        LlamaConfig::from_file(path)
    }

    fn load_trunk<'a>(
        config: &LlamaConfig,
        vb: VarBuilder<'a>,
        plan: &AdapterPlan,
    ) -> Result<(Self, VarBuilder<'a>)> {
        check_classifiable(config)?;
        let vb = super::multimodal::decoder_view(config.decoder_prefix(), vb);
        Ok((Self::load(config, &vb, plan)?, vb))
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn modules_not_built(&self) -> &'static [&'static str] {
        self.config.modules_not_built()
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        LlamaTrunk::check_ids(self, ids)
    }

    fn hidden(
        &self,
        ids: &Tensor,
        pads: Option<&[usize]>,
        numbering: PaddedPositions,
        train: bool,
    ) -> Result<Tensor> {
        LlamaTrunk::hidden(self, ids, pads, numbering, train)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// Refuses the configurations transformers has no sequence classifier for (the trunk's
/// [`DecoderTrunk::load_trunk`] builds one for a classifier): Granite, OLMoE.
fn check_classifiable(config: &LlamaConfig) -> Result<()> {
    let unsupported = |got: String| Error::Unsupported {
        what: "sequence classification for model_type",
        got,
        supported: LlamaFamily::model_types(|f| {
            !matches!(f, LlamaFamily::Granite | LlamaFamily::Olmoe)
        }),
    };
    match config.family {
        LlamaFamily::Granite => Err(unsupported(
            "granite (transformers has no GraniteForSequenceClassification)".to_string(),
        )),
        LlamaFamily::Olmoe => Err(unsupported(
            "olmoe (transformers has no OlmoeForSequenceClassification)".to_string(),
        )),
        _ => Ok(()),
    }
}
