//! The encoder: [`BertEmbeddings`] (word, token type and position embeddings, positions
//! numbered as the family numbers them) and the post-norm [`BertLayer`]s, the same for
//! every member of the BERT family.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::model::{embedding, linear, AdapterPlan, Embedding, Linear};
use crate::models::fused;
use crate::models::ops::{dropout_t, LayerNorm};

use super::config::{BertConfig, HiddenAct};

/// Position ids `(batch, seq)` as RoBERTa numbers them from `ids` (`(batch, seq)`, on the
/// host): `pad` for a padding token, else `pad` + the number of tokens up to and including
/// it that are not padding (transformers' `create_position_ids_from_input_ids`).
fn positions_past_padding(ids: &[Vec<u32>], pad: u32) -> Vec<u32> {
    let mut positions = Vec::with_capacity(ids.iter().map(Vec::len).sum());
    for row in ids {
        let mut seen = 0;
        for &id in row {
            match id == pad {
                true => positions.push(pad),
                false => {
                    seen += 1;
                    positions.push(pad + seen);
                }
            }
        }
    }
    positions
}

/// The embeddings: word + token type + position, then LayerNorm and dropout.
#[derive(Clone, Debug)]
pub(super) struct BertEmbeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    dropout: f64,
    /// `Some(pad_token_id)`: positions numbered past the padding (the RoBERTa family).
    positions_past: Option<u32>,
}

impl BertEmbeddings {
    pub(super) fn load(c: &BertConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
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
            positions_past: c
                .family
                .numbers_positions_past_padding()
                .then_some(c.pad_token_id),
        })
    }

    /// `ids` and `token_types` `(batch, seq)`, checked (positions within the table: at
    /// most [`BertConfig::max_tokens`] columns): `(batch, seq, hidden)`.
    pub(super) fn forward(
        &self,
        ids: &Tensor,
        token_types: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (b, seq) = ids.dims2()?;
        let x = (self.word.forward(ids)? + self.token_type.forward(token_types)?)?;
        let x = match self.positions_past {
            None => {
                let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
                x.broadcast_add(&self.position.forward(&positions)?)?
            }
            Some(pad) => {
                let host = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
                let positions = positions_past_padding(&host, pad);
                let positions = Tensor::from_vec(positions, (b, seq), ids.device())?;
                (x + self.position.forward(&positions)?)?
            }
        };
        dropout_t(self.norm.forward(&x)?, self.dropout, train)
    }
}

/// One post-norm encoder layer: self-attention, then the feed-forward block.
#[derive(Clone, Debug)]
pub(super) struct BertLayer {
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
    pub(super) fn load(c: &BertConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
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
    pub(super) fn forward(&self, x: &Tensor, visible: &[bool], train: bool) -> Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use super::positions_past_padding;

    #[test]
    fn positions_count_the_tokens_that_are_not_padding() {
        // transformers' create_position_ids_from_input_ids with padding_idx 1:
        // right padding, left padding, a padding id inside the row.
        let ids = [
            vec![0, 5, 2, 1, 1],
            vec![1, 1, 0, 7, 2],
            vec![0, 1, 9, 2, 4],
        ];
        let ids: Vec<Vec<u32>> = ids.to_vec();
        let expected = [[2, 3, 4, 1, 1], [1, 1, 2, 3, 4], [2, 1, 3, 4, 5]];
        assert_eq!(positions_past_padding(&ids, 1), expected.concat());
    }
}
