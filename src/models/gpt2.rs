//! GPT-2 with its language-modeling head (transformers' `GPT2LMHeadModel`), every module
//! built through the model-level API at transformers' own paths, so a PEFT adapter's
//! `target_modules` (`c_attn`, `c_proj`, `c_fc`, `wte`, `wpe`, an untied `lm_head`) and
//! every lorakit variant apply unchanged.
//!
//! | module | path | built by |
//! |---|---|---|
//! | token / position tables | `transformer.wte`, `transformer.wpe` | [`embedding`] |
//! | attention in / out | `transformer.h.N.attn.c_attn`, `transformer.h.N.attn.c_proj` | [`conv1d`] |
//! | MLP in / out | `transformer.h.N.mlp.c_fc`, `transformer.h.N.mlp.c_proj` | [`conv1d`] |
//! | norms | `transformer.h.N.ln_1`, `.ln_2`, `transformer.ln_f` | LayerNorm, bias through [`AdapterPlan::bias`] |
//! | output head | tied: `transformer.wte`'s base table; untied: `lm_head` | —; [`linear_no_bias`] |
//!
//! The forward is transformers' eager one in evaluation mode (no dropout of the model's
//! own; adapters apply theirs in training mode): full sequences, a causal mask, no padding
//! mask and no KV cache. Checked against transformers + PEFT 0.21 on the fixtures of
//! `tests/fixtures/peft_options/` and `tests/fixtures/models/gpt2_base_logits.safetensors`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, Scope};
use crate::frozen::BaseKind;
use crate::model::{conv1d, embedding, linear_no_bias, AdapterPlan, Embedding, Linear};
use crate::models::ops::{softmax_last, LayerNorm};

/// The activations transformers maps for `activation_function` that GPT-2 accepts here:
/// the GELU family.
const ACTIVATIONS: &str = "gelu_new, gelu, gelu_python, gelu_fast, gelu_pytorch_tanh, \
                           gelu_python_tanh, gelu_accurate, gelu_10, quick_gelu";

/// The fields of transformers' `GPT2Config` that the model uses, with transformers'
/// defaults (GPT-2 small); `config.json`'s other fields (dropouts, token ids, summary
/// options) are ignored. transformers' aliases `hidden_size`, `max_position_embeddings`,
/// `num_hidden_layers` and `num_attention_heads` are read too.
///
/// ```
/// use lorakit::models::gpt2::Gpt2Config;
/// # fn main() -> lorakit::Result<()> {
/// let config = Gpt2Config::from_file("tests/fixtures/peft_options/gpt2_lora/base/config.json")?;
/// assert_eq!((config.vocab_size, config.n_embd, config.n_layer, config.n_head), (64, 16, 2, 2));
/// assert_eq!(config.inner_dim(), 64); // n_inner: null → 4 · n_embd
/// assert_eq!(Gpt2Config::default().n_positions, 1024);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gpt2Config {
    /// Vocabulary size (rows of `wte`).
    pub vocab_size: usize,
    /// Longest sequence (rows of `wpe`).
    #[serde(alias = "max_position_embeddings")]
    pub n_positions: usize,
    /// Hidden size.
    #[serde(alias = "hidden_size")]
    pub n_embd: usize,
    /// Number of blocks.
    #[serde(alias = "num_hidden_layers")]
    pub n_layer: usize,
    /// Attention heads; must divide `n_embd`.
    #[serde(alias = "num_attention_heads")]
    pub n_head: usize,
    /// MLP width; `None` is `4 · n_embd`.
    pub n_inner: Option<usize>,
    /// transformers' activation name: `gelu_new` (GPT-2's tanh approximation) or another
    /// of the GELU family transformers maps (`gelu`, `gelu_python`, `gelu_fast`,
    /// `gelu_pytorch_tanh`, `gelu_python_tanh`, `gelu_accurate`, `gelu_10`,
    /// `quick_gelu`); others are refused by name.
    pub activation_function: String,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Scale attention scores by `1/sqrt(head_dim)`.
    pub scale_attn_weights: bool,
    /// Also scale block `N`'s attention scores by `1/(N + 1)`.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// transformers' eager "reorder and upcast": scores and softmax in f32, whatever the
    /// model's dtype (the same numbers as the default path for f32 models).
    pub reorder_and_upcast_attn: bool,
    /// The output head is `wte`'s table (the GPT-2 checkpoints); `false` loads `lm_head`.
    pub tie_word_embeddings: bool,
    /// Cross-attention blocks (encoder-decoder use): refused when `true`.
    pub add_cross_attention: bool,
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Self {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: "gelu_new".to_string(),
            layer_norm_epsilon: 1e-5,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: true,
            add_cross_attention: false,
        }
    }
}

impl Gpt2Config {
    /// Reads a transformers `config.json` and checks it ([`Gpt2Config::validate`]); errors
    /// name the file.
    ///
    /// ```
    /// use lorakit::models::gpt2::Gpt2Config;
    /// # fn main() -> lorakit::Result<()> {
    /// let config = Gpt2Config::from_file("tests/fixtures/peft_options/gpt2_dora/base/config.json")?;
    /// assert_eq!(config.activation_function, "gelu_new");
    /// assert!(Gpt2Config::from_file("no/such/config.json").is_err());
    /// # Ok(()) }
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| Error::json(path, &e))?;
        config.check(&Scope::File(path.to_path_buf()))?;
        Ok(config)
    }

    /// Checks that the model can be built: sizes at least 1 (`n_layer` may be 0), `n_head`
    /// dividing `n_embd`, a finite epsilon ≥ 0, a supported activation, no cross-attention.
    ///
    /// ```
    /// use lorakit::models::gpt2::Gpt2Config;
    /// let bad = Gpt2Config { activation_function: "relu".into(), ..Gpt2Config::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("relu"));
    /// let bad = Gpt2Config { n_head: 5, ..Gpt2Config::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("n_head"));
    /// assert!(Gpt2Config::default().validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.check(&Scope::Settings("GPT-2 config".to_string()))
    }

    /// The MLP width: `n_inner`, or `4 · n_embd` when it is `None` (as transformers).
    ///
    /// ```
    /// use lorakit::models::gpt2::Gpt2Config;
    /// assert_eq!(Gpt2Config::default().inner_dim(), 3072);
    /// assert_eq!(Gpt2Config { n_inner: Some(100), ..Gpt2Config::default() }.inner_dim(), 100);
    /// ```
    pub fn inner_dim(&self) -> usize {
        self.n_inner
            .unwrap_or_else(|| self.n_embd.saturating_mul(4))
    }

    /// [`Gpt2Config::validate`] with errors in `scope`.
    fn check(&self, scope: &Scope) -> Result<()> {
        let invalid = |field: &'static str, reason: String| Error::InvalidConfig {
            scope: scope.clone(),
            field,
            reason,
        };
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return Err(invalid(field, "must be at least 1, got 0".to_string()));
            }
        }
        if self.n_inner == Some(0) {
            return Err(invalid(
                "n_inner",
                "must be at least 1 (or null)".to_string(),
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(invalid(
                "n_head",
                format!(
                    "must divide n_embd = {}, got {} heads",
                    self.n_embd, self.n_head
                ),
            ));
        }
        if u32::try_from(self.vocab_size).is_err() || u32::try_from(self.n_positions).is_err() {
            return Err(invalid(
                "vocab_size",
                "vocab_size and n_positions must fit in u32 (ids are read as u32)".to_string(),
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon >= 0.0) {
            return Err(invalid(
                "layer_norm_epsilon",
                format!("must be finite and ≥ 0, got {}", self.layer_norm_epsilon),
            ));
        }
        self.activation()?;
        if self.add_cross_attention {
            return Err(Error::Unsupported {
                what: "GPT-2 option",
                got: "add_cross_attention = true".to_string(),
                supported: "add_cross_attention = false (decoder-only GPT-2; cross-attention \
                            blocks are not built)"
                    .to_string(),
            });
        }
        Ok(())
    }

    /// The activation named by `activation_function`.
    fn activation(&self) -> Result<Activation> {
        Activation::from_name(&self.activation_function).ok_or_else(|| Error::Unsupported {
            what: "GPT-2 activation_function",
            got: self.activation_function.clone(),
            supported: ACTIVATIONS.to_string(),
        })
    }
}

/// The MLP activation (transformers' `ACT2FN` entries of the GELU family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    /// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`: gelu_new, gelu_fast,
    /// gelu_pytorch_tanh, gelu_python_tanh, gelu_accurate.
    GeluTanh,
    /// `x Φ(x)` with erf: gelu, gelu_python.
    GeluErf,
    /// `clip(x Φ(x), -10, 10)`: gelu_10.
    GeluErfClip10,
    /// `x σ(1.702 x)`: quick_gelu.
    QuickGelu,
}

impl Activation {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" | "gelu_python_tanh"
            | "gelu_accurate" => Self::GeluTanh,
            "gelu" | "gelu_python" => Self::GeluErf,
            "gelu_10" => Self::GeluErfClip10,
            "quick_gelu" => Self::QuickGelu,
            _ => return None,
        })
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluTanh => x.gelu(),
            Self::GeluErf => x.gelu_erf(),
            Self::GeluErfClip10 => x.gelu_erf()?.clamp(-10f32, 10f32),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

/// One transformer block (`transformer.h.N`).
#[derive(Clone, Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    n_head: usize,
    /// The attention scores' factor: `1/sqrt(head_dim)` and/or `1/(N + 1)`.
    scale: f64,
    upcast: bool,
    activation: Activation,
}

impl Block {
    fn load(config: &Gpt2Config, index: usize, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        let (d, eps) = (config.n_embd, config.layer_norm_epsilon);
        let inner = config.inner_dim();
        let head_dim = d / config.n_head;
        let mut scale = 1.0;
        if config.scale_attn_weights {
            scale /= (head_dim as f64).sqrt();
        }
        if config.scale_attn_by_inverse_layer_idx {
            scale /= (index + 1) as f64;
        }
        Ok(Self {
            ln_1: LayerNorm::load(d, eps, vb.pp("ln_1"), plan)?,
            c_attn: conv1d(d, 3 * d, vb.pp("attn.c_attn"), plan)?,
            attn_proj: conv1d(d, d, vb.pp("attn.c_proj"), plan)?,
            ln_2: LayerNorm::load(d, eps, vb.pp("ln_2"), plan)?,
            c_fc: conv1d(d, inner, vb.pp("mlp.c_fc"), plan)?,
            mlp_proj: conv1d(inner, d, vb.pp("mlp.c_proj"), plan)?,
            n_head: config.n_head,
            scale,
            upcast: config.reorder_and_upcast_attn,
            activation: config.activation()?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let attn = self.attention(&self.ln_1.forward(x)?, mask)?;
        let x = (x + attn)?;
        let h = self.c_fc.forward(&self.ln_2.forward(&x)?)?;
        let mlp = self.mlp_proj.forward(&self.activation.apply(&h)?)?;
        Ok((x + mlp)?)
    }

    /// Causal multi-head self-attention; `mask` is `(seq, seq)`, 0 on and below the
    /// diagonal and -inf above it.
    fn attention(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let head_dim = d / self.n_head;
        let qkv = self.c_attn.forward(x)?;
        let heads = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(D::Minus1, i * d, d)?
                .reshape((b, s, self.n_head, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let (q, k) = if self.upcast {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q, k)
        };
        let scores = (q.matmul(&k.t()?.contiguous()?)? * self.scale)?;
        let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
        let probs = softmax_last(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, d))?;
        Ok(self.attn_proj.forward(&out)?)
    }
}

/// transformers' `GPT2LMHeadModel` over a [`VarBuilder`] holding a GPT-2 checkpoint,
/// adapted by an [`AdapterPlan`]: a PEFT adapter's plan ([`crate::peft::PeftAdapter::plan`])
/// gives PEFT's logits, a fresh plan (any variant) makes the model trainable.
///
/// The tied output head is `transformer.wte`'s *base* table, read at each forward: as in
/// transformers + PEFT, a LoRA on `wte` changes the input embeddings but not the head
/// while unmerged, and both once merged (the table is the merged one then).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lorakit::checkpoint::Checkpoint;
/// use lorakit::models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// let dir = "tests/fixtures/peft_options/gpt2_lora";
/// let dev = Device::Cpu;
/// let config = Gpt2Config::from_file(format!("{dir}/base/config.json"))?;
/// let vb = Checkpoint::open(format!("{dir}/base"))?.var_builder(DType::F32, &dev);
/// let plan = PeftAdapter::load(format!("{dir}/adapter"), &dev)?.plan()?;
/// let model = Gpt2LmHeadModel::load(&config, vb, &plan)?;
/// let adapted = plan.finish()?; // every tensor of the adapter file was used
/// assert_eq!(adapted.len(), 9); // c_attn, c_proj, c_fc, mlp.c_proj × 2 layers, and wte
/// let logits = model.forward(&Tensor::new(&[[1u32, 2, 3]], &dev)?)?;
/// assert_eq!(logits.dims(), [1, 3, 64]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Gpt2LmHeadModel {
    config: Gpt2Config,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// `None`: tied to `wte`'s base table.
    lm_head: Option<Linear>,
    device: Device,
}

impl Gpt2LmHeadModel {
    /// Builds the model from the checkpoint at `vb` (transformers' names:
    /// `transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`, …, and
    /// `lm_head.weight` when untied), every module through `plan`. Call
    /// [`AdapterPlan::finish`] afterwards.
    ///
    /// Refused, by name: an invalid config ([`Gpt2Config::validate`]); a plan that adapts,
    /// copies or stores tensors for the tied `lm_head` (it is `wte`'s table, not a module
    /// of its own); `modules_to_save` naming a LayerNorm.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::checkpoint::Checkpoint;
    /// use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
    /// use lorakit::models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
    /// use lorakit::LoraConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_lora/base";
    /// let dev = Device::Cpu;
    /// let config = Gpt2Config::from_file(format!("{dir}/config.json"))?;
    /// // A fresh LoRA on the attention of every block, to train.
    /// let vars = VarMap::new();
    /// let plan = AdapterPlan::lora(
    ///     TargetSpec::new(ModuleSelector::list(["c_attn"])),
    ///     RankAlpha::new(4, 8.0),
    ///     LoraConfig::default(),
    ///     VarBuilder::from_varmap(&vars, DType::F32, &dev),
    /// );
    /// let vb = Checkpoint::open(dir)?.var_builder(DType::F32, &dev);
    /// let _model = Gpt2LmHeadModel::load(&config, vb, &plan)?;
    /// assert_eq!(
    ///     plan.finish()?.paths(),
    ///     ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    /// );
    /// # Ok(()) }
    /// ```
    pub fn load(config: &Gpt2Config, vb: VarBuilder, plan: &AdapterPlan) -> Result<Self> {
        config.validate()?;
        let d = config.n_embd;
        let t = vb.pp("transformer");
        let wte = embedding(config.vocab_size, d, t.pp("wte"), plan)?;
        let wpe = embedding(config.n_positions, d, t.pp("wpe"), plan)?;
        let blocks = (0..config.n_layer)
            .map(|i| Block::load(config, i, t.pp("h").pp(i), plan))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(d, config.layer_norm_epsilon, t.pp("ln_f"), plan)?;
        let lm_head = if config.tie_word_embeddings {
            let head = vb.pp("lm_head").prefix();
            if plan.touches(&head, BaseKind::Linear) {
                return Err(Error::Unsupported {
                    what: "adapter on GPT-2's tied output head",
                    got: head,
                    supported: "an untied lm_head (tie_word_embeddings = false); the tied \
                                head is transformer.wte's base table"
                        .to_string(),
                });
            }
            None
        } else {
            Some(linear_no_bias(
                d,
                config.vocab_size,
                vb.pp("lm_head"),
                plan,
            )?)
        };
        let device = base_table(&wte)?.device().clone();
        Ok(Self {
            config: config.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            device,
        })
    }

    /// The config the model was built with.
    ///
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use lorakit::checkpoint::Checkpoint;
    /// # use lorakit::peft::PeftAdapter;
    /// use lorakit::models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
    /// # fn main() -> lorakit::Result<()> {
    /// # let dir = "tests/fixtures/peft_options/gpt2_dora";
    /// # let dev = Device::Cpu;
    /// # let vb = Checkpoint::open(format!("{dir}/base"))?.var_builder(DType::F32, &dev);
    /// # let plan = PeftAdapter::load(format!("{dir}/adapter"), &dev)?.plan()?;
    /// let config = Gpt2Config::from_file(format!("{dir}/base/config.json"))?;
    /// let model = Gpt2LmHeadModel::load(&config, vb, &plan)?;
    /// assert_eq!(model.config(), &config);
    /// # Ok(()) }
    /// ```
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `(batch, seq, vocab)` for token ids `(batch, seq)` (u8, u32 or i64, each below
    /// `vocab_size`; `1 ≤ seq ≤ n_positions`), positions `0..seq`, causal attention. Ids
    /// out of range, a wrong rank or length, or another device are errors, not panics.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use lorakit::checkpoint::Checkpoint;
    /// use lorakit::models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_dora";
    /// let dev = Device::Cpu;
    /// let config = Gpt2Config::from_file(format!("{dir}/base/config.json"))?;
    /// let vb = Checkpoint::open(format!("{dir}/base"))?.var_builder(DType::F32, &dev);
    /// let plan = PeftAdapter::load(format!("{dir}/adapter"), &dev)?.plan()?;
    /// let model = Gpt2LmHeadModel::load(&config, vb, &plan)?;
    /// plan.finish()?;
    /// let ids = Tensor::new(&[[59i64, 13, 15, 57, 63], [32, 13, 29, 45, 47]], &dev)?;
    /// let logits = model.forward(&ids)?;
    /// assert_eq!(logits.dims(), [2, 5, 64]);
    /// // Causal: the first position's logits do not depend on later tokens.
    /// let first = model.forward(&ids.narrow(1, 0, 1)?)?;
    /// let diff = (first - logits.narrow(1, 0, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(diff < 1e-5);
    /// assert!(model.forward(&Tensor::new(&[[64u32]], &dev)?).is_err()); // not in the vocabulary
    /// # Ok(()) }
    /// ```
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
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
        let seq_u32 = u32::try_from(seq).map_err(|_| bad_shape("seq < 2^32".to_string()))?;
        let positions = Tensor::arange(0u32, seq_u32, &self.device)?;
        let mut x = self
            .wte
            .forward(input_ids)?
            .broadcast_add(&self.wpe.forward(&positions)?)?;
        let mask = causal_mask(seq, &self.device)?;
        for block in &self.blocks {
            x = block.forward(&x, &mask)?;
        }
        let x = self.ln_f.forward(&x)?;
        match &self.lm_head {
            Some(head) => Ok(head.forward(&x)?),
            None => {
                let table = base_table(&self.wte)?; // (vocab, d)
                let d = self.config.n_embd;
                let logits = x.reshape((batch * seq, d))?.matmul(&table.t()?)?;
                Ok(logits.reshape((batch, seq, self.config.vocab_size))?)
            }
        }
    }
}

/// An embedding module's base table `(vocab, dim)` as it stands now (merged into while an
/// adapter is merged; the original of a `modules_to_save` copy).
fn base_table(module: &Embedding) -> Result<Tensor> {
    match module {
        Linear::Frozen(base) => base.stored_weight(),
        Linear::Adapted(layer) => layer.read().base().stored_weight(),
        Linear::Trainable(module) => module.original().stored_weight(),
    }
}

/// `(seq, seq)` f32: 0 where a position may attend (itself and earlier), -inf elsewhere.
fn causal_mask(seq: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (seq, seq), device)?)
}
