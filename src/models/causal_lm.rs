//! [`CausalLm`]: what the training loop ([`crate::finetune`]) needs of a causal language
//! model, implemented by every decoder in [`crate::models`].

use candle_core::{Device, Tensor};

use crate::error::Result;

use super::gpt2::Gpt2LmHeadModel;
use super::llama::LlamaForCausalLM;
use super::lm_loss::causal_lm_loss_sum;

/// A causal language model: token ids `(batch, seq)` to next-token logits
/// `(batch, seq, vocab)`, each position seeing itself and the positions before it.
/// `Sync`: training and generation run it on one of rayon's worker threads
/// ([`crate::threads::on_worker`]).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lorakit::models::llama::LlamaForCausalLM;
/// use lorakit::models::CausalLm;
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// let dir = "tests/fixtures/models/llama/qwen2";
/// let plan = PeftAdapter::load(format!("{dir}/lora"), &Device::Cpu)?.plan()?;
/// let model = LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &Device::Cpu, &plan)?;
/// let lm: &dyn CausalLm = &model;
/// let logits = lm.logits(&Tensor::new(&[[1u32, 2, 3]], lm.device())?)?;
/// assert_eq!(logits.dims(), [1, 3, lm.vocab_size()]);
/// # Ok(()) }
/// ```
pub trait CausalLm: Sync {
    /// Logits `(batch, seq, vocab)` for token ids `(batch, seq)`.
    fn logits(&self, input_ids: &Tensor) -> Result<Tensor>;
    /// The vocabulary size (the logits' last dimension).
    fn vocab_size(&self) -> usize;
    /// The device the model lives on.
    fn device(&self) -> &Device;
    /// The longest sequence the model can take, when it has a hard limit (GPT-2's
    /// `n_positions`: a table of learned positions); `None` when longer inputs run (RoPE
    /// models: transformers does not refuse past `max_position_embeddings` either).
    fn max_positions(&self) -> Option<usize> {
        None
    }
    /// The summed next-token loss of a batch (`loss_mask` `(batch, seq)`, 1 where a token
    /// is a prediction target): [`causal_lm_loss_sum`] of [`CausalLm::logits`], which the
    /// default computes. This crate's models fuse a frozen output head with the loss (see
    /// [`LlamaForCausalLM::loss_sum`]).
    ///
    /// [`causal_lm_loss_sum`]: crate::finetune::loss::causal_lm_loss_sum
    fn loss_sum(&self, input_ids: &Tensor, loss_mask: &Tensor) -> Result<Tensor> {
        causal_lm_loss_sum(&self.logits(input_ids)?, input_ids, loss_mask)
    }
    /// [`CausalLm::loss_sum`] for evaluation: the same value, detached (no gradient flows
    /// from it). This crate's models then skip the head's input gradient that their fused
    /// head + loss op otherwise computes in the forward.
    fn eval_loss_sum(&self, input_ids: &Tensor, loss_mask: &Tensor) -> Result<Tensor> {
        Ok(self.loss_sum(input_ids, loss_mask)?.detach())
    }
    /// [`CausalLm::loss_sum`] in the model's training mode when `train`: its own dropouts
    /// apply, as after transformers' `model.train()` (what the training loop calls). The
    /// default, for a model without dropout of its own, is [`CausalLm::loss_sum`].
    fn loss_sum_t(&self, input_ids: &Tensor, loss_mask: &Tensor, train: bool) -> Result<Tensor> {
        let _ = train;
        self.loss_sum(input_ids, loss_mask)
    }
    /// The model folder it was loaded from, as given (transformers' `_name_or_path`), when
    /// known: the training loop saves it as PEFT's `base_model_name_or_path`.
    fn name_or_path(&self) -> Option<&str> {
        None
    }
    /// The module prefixes the model's checkpoint has but the model does not build (an
    /// image-and-text model's vision tower when only the text decoder is built): the
    /// training loop saves them as PEFT's `exclude_modules`, so that PEFT, applying the
    /// adapter's `target_modules` to the whole model, adds no layers there. Default: none.
    fn modules_not_built(&self) -> &'static [&'static str] {
        &[]
    }
}

impl CausalLm for LlamaForCausalLM {
    fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward(input_ids)
    }

    fn loss_sum(&self, input_ids: &Tensor, loss_mask: &Tensor) -> Result<Tensor> {
        LlamaForCausalLM::loss_sum(self, input_ids, loss_mask)
    }

    fn eval_loss_sum(&self, input_ids: &Tensor, loss_mask: &Tensor) -> Result<Tensor> {
        self.loss_sum_tracked(input_ids, loss_mask, false, false)
    }

    fn loss_sum_t(&self, input_ids: &Tensor, loss_mask: &Tensor, train: bool) -> Result<Tensor> {
        LlamaForCausalLM::loss_sum_t(self, input_ids, loss_mask, train)
    }

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }

    fn device(&self) -> &Device {
        LlamaForCausalLM::device(self)
    }

    fn name_or_path(&self) -> Option<&str> {
        LlamaForCausalLM::name_or_path(self)
    }

    fn modules_not_built(&self) -> &'static [&'static str] {
        self.config().modules_not_built()
    }
}

impl CausalLm for Gpt2LmHeadModel {
    fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward(input_ids)
    }

    fn loss_sum(&self, input_ids: &Tensor, loss_mask: &Tensor) -> Result<Tensor> {
        Gpt2LmHeadModel::loss_sum(self, input_ids, loss_mask)
    }

    fn eval_loss_sum(&self, input_ids: &Tensor, loss_mask: &Tensor) -> Result<Tensor> {
        self.loss_sum_tracked(input_ids, loss_mask, false, false)
    }

    fn loss_sum_t(&self, input_ids: &Tensor, loss_mask: &Tensor, train: bool) -> Result<Tensor> {
        Gpt2LmHeadModel::loss_sum_t(self, input_ids, loss_mask, train)
    }

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }

    fn device(&self) -> &Device {
        Gpt2LmHeadModel::device(self)
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.config().n_positions)
    }

    fn name_or_path(&self) -> Option<&str> {
        Gpt2LmHeadModel::name_or_path(self)
    }
}
