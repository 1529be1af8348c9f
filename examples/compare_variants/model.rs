//! A small encoder-only transformer written with candle-nn. Every linear layer comes from a
//! `LinearFactory`, so the same model code runs pretrained (plain candle linears), fully
//! fine-tuned, or adapted with any lorakit variant.

// clippy.toml keeps the library on `crate::matmul`; code outside it may call candle's own.
#![allow(clippy::disallowed_methods)]

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::tasks::{SEQ, VOCAB};

/// Model width, heads, layers and MLP width.
#[derive(Clone, Copy, Debug)]
pub struct ModelConfig {
    pub d_model: usize,
    pub heads: usize,
    pub layers: usize,
    pub d_mlp: usize,
}

/// Builds the linear layer at `path` (e.g. `layers.0.attn.q_proj`, or `head`) mapping
/// `d_in → d_out`.
pub type LinearFactory<'a> =
    dyn Fn(&str, usize, usize, VarBuilder) -> lorakit::Result<Box<dyn Module>> + 'a;

/// The module paths of the blocks' linear layers, with their shapes `(d_in, d_out)`: what
/// the adapters target (the output head is left frozen).
pub fn linear_paths(cfg: &ModelConfig) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for l in 0..cfg.layers {
        for name in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            out.push((format!("layers.{l}.attn.{name}"), cfg.d_model, cfg.d_model));
        }
        out.push((format!("layers.{l}.mlp.fc1"), cfg.d_model, cfg.d_mlp));
        out.push((format!("layers.{l}.mlp.fc2"), cfg.d_mlp, cfg.d_model));
    }
    out
}

/// Layer norm composed from candle ops (candle-nn's fused layer norm has no backward).
struct Norm {
    gain: Tensor,
    shift: Tensor,
}

impl Norm {
    fn new(d: usize, vb: VarBuilder) -> lorakit::Result<Self> {
        Ok(Self {
            gain: vb.get_with_hints(d, "weight", candle_nn::Init::Const(1.0))?,
            shift: vb.get_with_hints(d, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        normed.broadcast_mul(&self.gain)?.broadcast_add(&self.shift)
    }
}

struct Block {
    norm1: Norm,
    q: Box<dyn Module>,
    k: Box<dyn Module>,
    v: Box<dyn Module>,
    o: Box<dyn Module>,
    norm2: Norm,
    fc1: Box<dyn Module>,
    fc2: Box<dyn Module>,
    heads: usize,
}

impl Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let h = self.norm1.forward(x)?;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(&h)?)?;
        let k = split(self.k.forward(&h)?)?;
        let v = split(self.v.forward(&h)?)?;
        let att = (q.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let mixed = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let x = (x + self.o.forward(&mixed)?)?;
        let h = self.norm2.forward(&x)?;
        let h = self.fc2.forward(&self.fc1.forward(&h)?.gelu()?)?;
        x + h
    }
}

/// The transformer: token and position embeddings, blocks, final norm, output head.
pub struct Transformer {
    tokens: Tensor,
    positions: Tensor,
    blocks: Vec<Block>,
    norm: Norm,
    head: Box<dyn Module>,
}

impl Transformer {
    /// Builds the model; `vb` supplies embeddings, norms and head (trainable or frozen
    /// depending on its backend), `make_linear` every adaptable linear.
    pub fn new(
        cfg: &ModelConfig,
        vb: VarBuilder,
        make_linear: &LinearFactory,
    ) -> lorakit::Result<Self> {
        let d = cfg.d_model;
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.5,
        };
        let tokens = vb.get_with_hints((VOCAB, d), "tok_emb", init)?;
        let positions = vb.get_with_hints((SEQ, d), "pos_emb", init)?;
        let mut blocks = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let p = |name: &str| format!("layers.{l}.{name}");
            let lin = |name: &str, i: usize, o: usize| make_linear(&p(name), i, o, vb.pp(p(name)));
            blocks.push(Block {
                norm1: Norm::new(d, vb.pp(p("norm1")))?,
                q: lin("attn.q_proj", d, d)?,
                k: lin("attn.k_proj", d, d)?,
                v: lin("attn.v_proj", d, d)?,
                o: lin("attn.o_proj", d, d)?,
                norm2: Norm::new(d, vb.pp(p("norm2")))?,
                fc1: lin("mlp.fc1", d, cfg.d_mlp)?,
                fc2: lin("mlp.fc2", cfg.d_mlp, d)?,
                heads: cfg.heads,
            });
        }
        let head = make_linear("head", d, VOCAB, vb.pp("head"))?;
        Ok(Self {
            tokens,
            positions,
            blocks,
            norm: Norm::new(d, vb.pp("norm"))?,
            head,
        })
    }

    /// Logits `(n, SEQ, VOCAB)` for token ids `(n, SEQ)`.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (n, t) = ids.dims2()?;
        let emb = self.tokens.index_select(&ids.flatten_all()?, 0)?;
        let mut x = emb
            .reshape((n, t, ()))?
            .broadcast_add(&self.positions.narrow(0, 0, t)?)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        self.head.forward(&self.norm.forward(&x)?)
    }

    /// Mean cross-entropy against target ids.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.forward(ids)?;
        candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &targets.flatten_all()?)
    }

    /// Fraction of positions predicted right.
    pub fn accuracy(&self, ids: &Tensor, targets: &Tensor) -> candle_core::Result<f64> {
        let pred = self.forward(ids)?.argmax(D::Minus1)?;
        let right = pred.eq(targets)?.to_dtype(DType::F64)?.mean_all()?;
        right.to_scalar::<f64>()
    }
}
