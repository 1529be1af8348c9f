//! The encoder: [`BertEmbeddings`] (word, token type and position embeddings, positions
//! numbered as the family numbers them) and the post-norm [`BertLayer`]s, the same
//! computation for every member of the BERT family, at each one's module paths.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::model::{embedding, linear, AdapterPlan, Embedding, Linear};
use crate::models::fused;
use crate::models::ops::{dropout_t, LayerNorm};

use super::config::{BertConfig, BertFamily, HiddenAct};

/// Where a family keeps an encoder layer's modules, relative to the layer.
struct LayerPaths {
    query: &'static str,
    key: &'static str,
    value: &'static str,
    attention_output: &'static str,
    attention_norm: &'static str,
    intermediate: &'static str,
    output: &'static str,
    output_norm: &'static str,
}

/// BERT's and the RoBERTa family's names.
const BERT_PATHS: LayerPaths = LayerPaths {
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    attention_output: "attention.output.dense",
    attention_norm: "attention.output.LayerNorm",
    intermediate: "intermediate.dense",
    output: "output.dense",
    output_norm: "output.LayerNorm",
};

/// DistilBERT's names.
const DISTILBERT_PATHS: LayerPaths = LayerPaths {
    query: "attention.q_lin",
    key: "attention.k_lin",
    value: "attention.v_lin",
    attention_output: "attention.out_lin",
    attention_norm: "sa_layer_norm",
    intermediate: "ffn.lin1",
    output: "ffn.lin2",
    output_norm: "output_layer_norm",
};

/// The module path of layer `i` under the encoder's prefix: `encoder.layer.i`, or
/// DistilBERT's `transformer.layer.i`.
pub(super) fn layer_path(family: BertFamily, i: usize) -> String {
    match family {
        BertFamily::DistilBert => format!("transformer.layer.{i}"),
        _ => format!("encoder.layer.{i}"),
    }
}

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

/// The embeddings: word + token type + position, then LayerNorm and dropout (and
/// ELECTRA's projection to the model width).
#[derive(Clone, Debug)]
pub(super) struct BertEmbeddings {
    word: Embedding,
    position: Embedding,
    /// `None`: no token types (DistilBERT).
    token_type: Option<Embedding>,
    norm: LayerNorm,
    dropout: f64,
    /// `Some(pad_token_id)`: positions numbered past the padding (the RoBERTa family).
    positions_past: Option<u32>,
    /// ELECTRA's `embeddings_project` (`embedding_size` to `hidden_size`), when they differ.
    project: Option<Linear>,
}

impl BertEmbeddings {
    /// The embeddings under `encoder` (the model's `bert.` / `roberta.` / … prefix):
    /// `embeddings.…`, and ELECTRA's `embeddings_project`.
    pub(super) fn load(c: &BertConfig, encoder: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let width = c.embedding_width();
        let project = match c.projects_embeddings() {
            true => Some(linear(
                width,
                c.hidden_size,
                encoder.pp("embeddings_project"),
                plan,
            )?),
            false => None,
        };
        let vb = encoder.pp("embeddings");
        Ok(Self {
            word: embedding(c.vocab_size, width, vb.pp("word_embeddings"), plan)?,
            position: embedding(
                c.max_position_embeddings,
                width,
                vb.pp("position_embeddings"),
                plan,
            )?,
            token_type: match c.family.has_token_types() {
                true => Some(embedding(
                    c.type_vocab_size,
                    width,
                    vb.pp("token_type_embeddings"),
                    plan,
                )?),
                false => None,
            },
            norm: LayerNorm::load(width, c.layer_norm_eps, vb.pp("LayerNorm"), plan)?,
            dropout: c.hidden_dropout_prob,
            positions_past: c
                .family
                .numbers_positions_past_padding()
                .then_some(c.pad_token_id),
            project,
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
        let x = match &self.token_type {
            Some(table) => (self.word.forward(ids)? + table.forward(token_types)?)?,
            None => self.word.forward(ids)?,
        };
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
        let x = dropout_t(self.norm.forward(&x)?, self.dropout, train)?;
        match &self.project {
            Some(project) => Ok(project.forward(&x)?),
            None => Ok(x),
        }
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
    /// Dropout on the attention's output projection (BERT, RoBERTa; not DistilBERT).
    attention_output_dropout: bool,
}

impl BertLayer {
    pub(super) fn load(c: &BertConfig, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let h = c.hidden_size;
        let paths = match c.family {
            BertFamily::DistilBert => &DISTILBERT_PATHS,
            _ => &BERT_PATHS,
        };
        let eps = c.layer_norm_eps;
        let square = |path: &str| linear(h, h, vb.pp(path), plan);
        Ok(Self {
            query: square(paths.query)?,
            key: square(paths.key)?,
            value: square(paths.value)?,
            attention_output: square(paths.attention_output)?,
            attention_norm: LayerNorm::load(h, eps, vb.pp(paths.attention_norm), plan)?,
            intermediate: linear(h, c.intermediate_size, vb.pp(paths.intermediate), plan)?,
            output: linear(c.intermediate_size, h, vb.pp(paths.output), plan)?,
            output_norm: LayerNorm::load(h, eps, vb.pp(paths.output_norm), plan)?,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            act: c.hidden_act,
            hidden_dropout: c.hidden_dropout_prob,
            attention_dropout: c.attention_probs_dropout_prob,
            attention_output_dropout: c.family != BertFamily::DistilBert,
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
        let attn = match self.attention_output_dropout {
            true => dropout_t(attn, self.hidden_dropout, train)?,
            false => attn,
        };
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
