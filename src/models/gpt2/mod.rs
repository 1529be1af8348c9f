//! GPT-2 with its language-modeling head (transformers' `GPT2LMHeadModel`), every module
//! built through the model-level API at transformers' own paths, so a PEFT adapter's
//! `target_modules` (`c_attn`, `c_proj`, `c_fc`, `wte`, `wpe`, `lm_head`) and every lorakit
//! variant apply unchanged.
//!
//! | module | path | built by |
//! |---|---|---|
//! | token / position tables | `transformer.wte`, `transformer.wpe` | [`embedding`](crate::model::embedding) |
//! | attention in / out | `transformer.h.N.attn.c_attn`, `transformer.h.N.attn.c_proj` | [`conv1d`](crate::model::conv1d) |
//! | MLP in / out | `transformer.h.N.mlp.c_fc`, `transformer.h.N.mlp.c_proj` | [`conv1d`](crate::model::conv1d) |
//! | norms | `transformer.h.N.ln_1`, `.ln_2`, `transformer.ln_f` | LayerNorm, bias through [`AdapterPlan::bias`] |
//! | output head | tied: `transformer.wte`'s base table (through the plan at `lm_head` when an adapter targets it); untied: `lm_head` | —; [`linear_no_bias`] |
//!
//! The forward is transformers' eager one: a causal mask, absolute positions, no padding
//! mask. [`Gpt2LmHeadModel::forward`] and [`Gpt2LmHeadModel::loss_sum`] run in evaluation
//! mode; [`Gpt2LmHeadModel::forward_t`] and [`Gpt2LmHeadModel::loss_sum_t`] with
//! `train = true` apply the config's `embd_pdrop`, `attn_pdrop` and `resid_pdrop` where
//! transformers' training mode does (the training loop, [`crate::finetune`], calls them so);
//! the adapters apply their own dropout by their training flag. Generation always
//! evaluates. Checked against transformers + PEFT 0.21 on the fixtures of
//! `tests/fixtures/peft_options/` and `tests/fixtures/models/gpt2_base_logits.safetensors`;
//! the dropouts' distribution against transformers' `model.train()` on
//! `tests/fixtures/models/gpt2_dropout_moments.safetensors`.
//!
//! Sequence classification (transformers' `GPT2ForSequenceClassification`):
//! [`Gpt2ForSequenceClassification`].
//!
//! Incremental decoding: [`Gpt2LmHeadModel::forward_cached`] with a [`KvCache`] (the same
//! logits as the full forward at those positions), and [`Gpt2LmHeadModel::generate`]
//! (greedy or sampled, [`crate::models::generation`]).

mod block;
mod classifier;
mod config;
mod generate;
mod trunk;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::frozen::{BaseKind, FrozenLinear};
use crate::kernels::FusedLinear;
use crate::model::{linear_no_bias, AdapterPlan, Linear};
use crate::models::base_prefix::with_base_prefix;
use crate::models::causal_mask::CausalMask;
use crate::models::decoder_trunk::{DecoderTrunk, Pass};
use crate::models::kv_buffer::LayerKv;
use crate::models::lm_loss::{causal_lm_loss_sum, frozen_head_loss_sum, linear_head_loss_sum};
use crate::models::padding::PaddedPositions;

/// The KV cache of [`Gpt2LmHeadModel::forward_cached`] (the Llama models' type: per layer,
/// the keys and values of the positions seen so far).
pub use super::llama::KvCache;
pub use classifier::Gpt2ForSequenceClassification;
pub use config::Gpt2Config;
use trunk::Gpt2Trunk;

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
    trunk: Gpt2Trunk,
    /// `None`: tied to `wte`'s base table.
    lm_head: Option<Linear>,
    /// The folder `from_pretrained` read, as given (transformers' `_name_or_path`).
    name_or_path: Option<String>,
}

impl Gpt2LmHeadModel {
    /// Builds the model from the checkpoint at `vb` (transformers' names:
    /// `transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`, …, and
    /// `lm_head.weight` when untied), every module through `plan`. Call
    /// [`AdapterPlan::finish`] afterwards.
    ///
    /// A tied head is `wte`'s base table; a plan that targets `lm_head` adapts it over that
    /// table, as PEFT does (the Llama family's [`crate::models::llama::LlamaForCausalLM`]
    /// the same). Refused, by name: an invalid config ([`Gpt2Config::validate`]);
    /// `modules_to_save` naming a LayerNorm.
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
        let vb = with_base_prefix(vb, "transformer", "wte.weight");
        let trunk = Gpt2Trunk::load(config, &vb, plan)?;
        let lm_head = if config.tie_word_embeddings {
            let head = vb.pp("lm_head").prefix();
            if plan.touches(&head, BaseKind::Linear) {
                // PEFT adapts `lm_head` over the shared table: the table's base (without an
                // adapter `wte` may have) is the head's frozen weight.
                let table = trunk.wte.base_stored_weight()?;
                Some(plan.adapt(&head, FrozenLinear::new(table, None)?)?)
            } else {
                None
            }
        } else {
            Some(linear_no_bias(
                d,
                config.vocab_size,
                vb.pp("lm_head"),
                plan,
            )?)
        };
        Ok(Self {
            trunk,
            lm_head,
            name_or_path: None,
        })
    }

    /// Reads `config.json` from the model folder `dir` (as `save_pretrained` writes it:
    /// one `model.safetensors` or shards with their index) and builds the model in `dtype`
    /// on `device` with [`Gpt2LmHeadModel::load`]; tensors are read one at a time
    /// ([`Checkpoint`]). Call [`AdapterPlan::finish`] afterwards.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use lorakit::models::gpt2::Gpt2LmHeadModel;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_lora";
    /// let dev = Device::Cpu;
    /// let plan = PeftAdapter::load(format!("{dir}/adapter"), &dev)?.plan()?;
    /// let model = Gpt2LmHeadModel::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
    /// assert_eq!(plan.finish()?.len(), 9);
    /// let logits = model.forward(&Tensor::new(&[[1u32, 2, 3]], &dev)?)?;
    /// assert_eq!(logits.dims(), [1, 3, 64]);
    /// assert!(Gpt2LmHeadModel::from_pretrained("no/such/folder", DType::F32, &dev, &plan).is_err());
    /// # Ok(()) }
    /// ```
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Gpt2Config::from_file(dir.join("config.json"))?;
        let vb = Checkpoint::open(dir)?.var_builder(dtype, device);
        let mut model = Self::load(&config, vb, plan)?;
        model.name_or_path = Some(dir.display().to_string());
        Ok(model)
    }

    /// The model folder [`from_pretrained`](Self::from_pretrained) read, as given
    /// (transformers' `config._name_or_path`); `None` for a model built with `load`. The
    /// training loop saves it as PEFT's `base_model_name_or_path`, which
    /// `AutoPeftModelForCausalLM` loads the base model from.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::gpt2::Gpt2LmHeadModel;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_lora/base";
    /// let model = Gpt2LmHeadModel::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// assert_eq!(model.name_or_path(), Some(dir));
    /// # Ok(()) }
    /// ```
    pub fn name_or_path(&self) -> Option<&str> {
        self.name_or_path.as_deref()
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
        &self.trunk.config
    }

    /// The device the model lives on.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::gpt2::Gpt2LmHeadModel;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_lora/base";
    /// let model = Gpt2LmHeadModel::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// assert!(model.device().is_cpu());
    /// # Ok(()) }
    /// ```
    pub fn device(&self) -> &Device {
        &self.trunk.device
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
        self.forward_t(input_ids, false)
    }

    /// [`Gpt2LmHeadModel::forward`] in training mode when `train`: the config's
    /// `embd_pdrop`, `attn_pdrop` and `resid_pdrop` dropouts apply where transformers'
    /// `GPT2LMHeadModel` applies them after `model.train()` (each call draws its own
    /// choices). The adapters' own dropout follows their training flag
    /// ([`crate::model::AdaptedSet::set_training`]).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::gpt2::Gpt2LmHeadModel;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_lora/base"; // dropouts 0.1
    /// let dev = Device::Cpu;
    /// let model = Gpt2LmHeadModel::from_pretrained(dir, DType::F32, &dev, &AdapterPlan::none())?;
    /// let ids = Tensor::new(&[[5u32, 9, 2, 7]], &dev)?;
    /// let differ = |a: Tensor, b: Tensor| -> lorakit::Result<bool> {
    ///     Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.0)
    /// };
    /// assert!(!differ(model.forward_t(&ids, false)?, model.forward(&ids)?)?);
    /// assert!(differ(model.forward_t(&ids, true)?, model.forward_t(&ids, true)?)?);
    /// # Ok(()) }
    /// ```
    pub fn forward_t(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        self.trunk.check_ids(input_ids)?;
        let numbering = PaddedPositions::AfterPadding;
        let hidden = self.trunk.hidden(input_ids, None, numbering, train)?;
        self.head(&hidden)
    }

    /// The summed next-token loss of a batch, as
    /// [`LlamaForCausalLM::loss_sum`](crate::models::llama::LlamaForCausalLM::loss_sum):
    /// a frozen output head (the tied `wte` table's base, or a frozen `lm_head`) runs with
    /// the loss as one op on the CPU in f32, without storing the logits.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use lorakit::finetune::loss::causal_lm_loss_sum;
    /// use lorakit::models::gpt2::Gpt2LmHeadModel;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_lora"; // tied head
    /// let dev = Device::Cpu;
    /// let plan = PeftAdapter::load(format!("{dir}/adapter"), &dev)?.plan()?;
    /// let model = Gpt2LmHeadModel::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
    /// let ids = Tensor::new(&[[5u32, 9, 2, 7]], &dev)?;
    /// let mask = Tensor::new(&[[0f32, 1., 1., 1.]], &dev)?;
    /// let loss = model.loss_sum(&ids, &mask)?.to_scalar::<f32>()?;
    /// let reference = causal_lm_loss_sum(&model.forward(&ids)?, &ids, &mask)?.to_scalar::<f32>()?;
    /// assert!((loss - reference).abs() < 1e-5 * reference);
    /// # Ok(()) }
    /// ```
    pub fn loss_sum(&self, input_ids: &Tensor, loss_mask: &Tensor) -> Result<Tensor> {
        self.loss_sum_t(input_ids, loss_mask, false)
    }

    /// [`Gpt2LmHeadModel::loss_sum`] in training mode when `train` (the config's dropouts,
    /// as [`Gpt2LmHeadModel::forward_t`]): what a training step computes.
    pub fn loss_sum_t(
        &self,
        input_ids: &Tensor,
        loss_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.loss_sum_tracked(input_ids, loss_mask, true, train)
    }

    /// [`Gpt2LmHeadModel::loss_sum_t`]; without `gradient`, the hidden states are detached
    /// before the head (evaluation: no head gradient computed).
    pub(crate) fn loss_sum_tracked(
        &self,
        input_ids: &Tensor,
        loss_mask: &Tensor,
        gradient: bool,
        train: bool,
    ) -> Result<Tensor> {
        let hidden = self.trunk.loss_hidden(input_ids, gradient, train)?;
        match &self.lm_head {
            Some(head) => linear_head_loss_sum(&hidden, head, input_ids, loss_mask),
            None => {
                let table = self.trunk.wte.base_stored_weight()?;
                match frozen_head_loss_sum(&hidden, (&table, None, None), input_ids, loss_mask)? {
                    Some(loss) => Ok(loss),
                    None => causal_lm_loss_sum(&self.head(&hidden)?, input_ids, loss_mask),
                }
            }
        }
    }

    /// The model on `input_ids` at positions `offset..` after each block's cached keys and
    /// values `past` (in block order): the logits and every block's grown cache entry.
    /// `values_only`: attention reads the new keys and values as stored values
    /// (`KvCache::for_inference`). The ids are checked by the caller, and
    /// `offset + seq ≤ n_positions`.
    pub(crate) fn run<'a>(
        &self,
        input_ids: &Tensor,
        offset: usize,
        past: impl Iterator<Item = &'a Option<LayerKv>>,
        pads: Option<&[usize]>,
        values_only: bool,
    ) -> Result<(Tensor, Vec<LayerKv>)> {
        let pass = Pass::decoding(offset, pads, values_only);
        let (x, grown) = self.trunk.run_hidden(input_ids, past, pass)?;
        Ok((self.head(&x)?, grown))
    }

    /// The logits of the hidden states `x` `(batch, seq, d)`.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        Ok(match &self.lm_head {
            Some(head) => head.forward(x)?,
            None => {
                let table = self.trunk.wte.base_stored_weight()?; // (vocab, d)
                if table.track_op() {
                    // A table trained in full (`modules_to_save`): candle's matmul, whose
                    // backward reaches it.
                    let d = self.config().n_embd;
                    let logits = crate::matmul::matmul(&x.reshape((batch * seq, d))?, &table.t()?)?;
                    logits.reshape((batch, seq, self.config().vocab_size))?
                } else {
                    // A frozen table: the fused op, which computes no gradient for it and
                    // streams it on every thread when decoding (candle's matmul ran a
                    // one-row product as one thread's loop: a quarter of GPT-2 small's
                    // time per generated token).
                    let head = FusedLinear {
                        weight: &table,
                        bias: None,
                        low_rank: None,
                        row_scale: None,
                    };
                    head.forward(x)?
                }
            }
        })
    }
}
/// The causal mask of `seq` queries at positions `offset..` over the keys at
/// `0..offset + seq` (`models::causal_mask`; a left-padded batch's additive mask is
/// `(batch, 1, seq, offset + seq)`).
fn causal_mask(seq: usize, offset: usize, pads: Option<&[usize]>, device: &Device) -> CausalMask {
    let sizes = (seq, offset.saturating_add(seq), offset);
    CausalMask::new(sizes, None, pads, 1, device)
}
