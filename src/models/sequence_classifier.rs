//! [`SequenceClassifier`]: what the training loop's sequence classification
//! ([`crate::finetune::classification`]) needs of a model, implemented by
//! [`BertForSequenceClassification`] and the decoders' classifiers
//! ([`crate::models::llama::LlamaForSequenceClassification`],
//! [`crate::models::gpt2::Gpt2ForSequenceClassification`]).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

use super::bert::BertForSequenceClassification;
use super::classification::LastTokenHead;
use super::classification::ProblemType;
use super::decoder_classifier::AsDecoderParts;
use super::decoder_trunk::DecoderTrunk;

/// A sequence classifier: token ids `(batch, seq)` (with token types and an attention
/// mask) to logits `(batch, num_labels)`, and the loss transformers computes for them.
/// `Sync`: training runs it on one of rayon's worker threads ([`crate::threads::on_worker`]).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::VarBuilder;
/// use lorakit::models::bert::{BertConfig, BertForSequenceClassification};
/// use lorakit::models::SequenceClassifier;
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// let dir = std::path::Path::new("tests/fixtures/peft_options/bert_cls");
/// let dev = Device::Cpu;
/// let config = BertConfig::from_file(dir.join("base/config.json"))?;
/// let weights = [dir.join("base/model.safetensors")];
/// let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &dev)? };
/// let plan = PeftAdapter::load(dir.join("adapter"), &dev)?.plan()?;
/// let model = BertForSequenceClassification::load(&config, vb, &plan)?;
/// let classifier: &dyn SequenceClassifier = &model;
/// let ids = Tensor::new(&[[2u32, 14, 25, 3]], &dev)?;
/// let logits = classifier.classify(&ids, None, None, false)?;
/// assert_eq!(logits.dims(), [1, classifier.num_labels()]);
/// # Ok(()) }
/// ```
pub trait SequenceClassifier: Sync {
    /// Logits `(batch, num_labels)`. `token_type_ids` and `attention_mask` are
    /// `(batch, seq)` (`None`: all zeros, attend to every token); `train` runs the model in
    /// training mode (dropout), as transformers' `model.train()`.
    fn classify(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor>;
    /// The mean loss of `logits` against `labels` for the model's problem type (see
    /// [`BertForSequenceClassification::loss`]).
    fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor>;
    /// The number of outputs.
    fn num_labels(&self) -> usize;
    /// The problem type the model's config names, if any (transformers infers it from
    /// `num_labels` and the labels' dtype otherwise).
    fn problem_type(&self) -> Option<ProblemType>;
    /// The classes' names in index order (the config's `id2label`), empty when it names
    /// none: labeled data may give classes by name.
    fn label_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// The vocabulary size (token ids must be below it).
    fn vocab_size(&self) -> usize;
    /// The number of token types (token type ids must be below it).
    fn type_vocab_size(&self) -> usize;
    /// Whether the model reads token types at all. DistilBERT does not: transformers'
    /// tokenizer for it gives none (its `tokenizer.json` template still numbers a sentence
    /// pair's second text 1), so the training loop passes it none. Default: true.
    fn reads_token_types(&self) -> bool {
        true
    }
    /// The device the model lives on.
    fn device(&self) -> &Device;
    /// The longest sequence the model can take (a table of learned positions).
    fn max_positions(&self) -> Option<usize>;
    /// The model folder it was loaded from, when known: the training loop saves it as
    /// PEFT's `base_model_name_or_path`.
    fn name_or_path(&self) -> Option<&str> {
        None
    }
    /// The module prefixes the model's checkpoint has but the model does not build (see
    /// [`CausalLm::modules_not_built`](crate::models::CausalLm::modules_not_built)): the
    /// training loop saves them as PEFT's `exclude_modules`. Default: none.
    fn modules_not_built(&self) -> &'static [&'static str] {
        &[]
    }
    /// The padding token batches should pad with (the config's `pad_token_id`): a decoder
    /// classifier skips it to find each row's last token, the RoBERTa family numbers
    /// positions past it. `None` for BERT, DistilBERT and ELECTRA, which read the first
    /// token and number positions by column.
    fn pad_token_id(&self) -> Option<u32> {
        None
    }
    /// Whether the model reads each row at its last token (a decoder): then batches of
    /// more than one row need [`SequenceClassifier::pad_token_id`].
    fn reads_last_token(&self) -> bool {
        false
    }
}

impl SequenceClassifier for BertForSequenceClassification {
    fn classify(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_t(input_ids, token_type_ids, attention_mask, train)
    }

    fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        BertForSequenceClassification::loss(self, logits, labels)
    }

    fn num_labels(&self) -> usize {
        self.config().num_labels
    }

    fn problem_type(&self) -> Option<ProblemType> {
        self.config().problem_type
    }

    fn label_names(&self) -> Vec<String> {
        self.config().labels().names()
    }

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }

    fn type_vocab_size(&self) -> usize {
        self.config().type_vocab_size
    }

    fn device(&self) -> &Device {
        BertForSequenceClassification::device(self)
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.config().max_tokens())
    }

    fn reads_token_types(&self) -> bool {
        self.config().family.has_token_types()
    }

    fn name_or_path(&self) -> Option<&str> {
        BertForSequenceClassification::name_or_path(self)
    }

    /// The RoBERTa family's `pad_token_id` (positions are numbered past it, so batches
    /// should pad with it); `None` for BERT, DistilBERT and ELECTRA.
    fn pad_token_id(&self) -> Option<u32> {
        let config = self.config();
        (config.family.numbers_positions_past_padding()).then_some(config.pad_token_id)
    }
}

/// Refuses token types other than 0 for a model without token types (a decoder).
fn no_token_types(token_type_ids: Option<&Tensor>, head: &str) -> Result<()> {
    let Some(types) = token_type_ids else {
        return Ok(());
    };
    let any = types
        .ne(0f64)?
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?;
    if any.to_scalar::<f32>()? > 0.0 {
        return Err(Error::layer_config(
            head,
            "token_type_ids",
            "a decoder has no token types: pass none, or zeros".to_string(),
        ));
    }
    Ok(())
}

impl<M: AsDecoderParts + Sync> SequenceClassifier for M {
    /// A decoder has no token types (they must be 0); `train` applies the model's own
    /// dropouts (GPT-2's; the Llama family's `attention_dropout`) as transformers' training
    /// mode does, and the adapters follow their own training flag.
    fn classify(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        no_token_types(token_type_ids, LastTokenHead::NAME)?;
        self.parts().forward(input_ids, attention_mask, train)
    }

    fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        self.parts().head.loss(logits, labels)
    }

    fn num_labels(&self) -> usize {
        self.parts().head.labels.num_labels
    }

    fn problem_type(&self) -> Option<ProblemType> {
        self.parts().head.labels.problem_type
    }

    fn label_names(&self) -> Vec<String> {
        self.parts().head.labels.names()
    }

    fn vocab_size(&self) -> usize {
        self.parts().trunk.vocab_size()
    }

    fn type_vocab_size(&self) -> usize {
        1
    }

    fn device(&self) -> &Device {
        self.parts().trunk.device()
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.parts().trunk.max_positions())
    }

    fn name_or_path(&self) -> Option<&str> {
        self.parts().name_or_path.as_deref()
    }

    fn modules_not_built(&self) -> &'static [&'static str] {
        self.parts().trunk.modules_not_built()
    }

    fn pad_token_id(&self) -> Option<u32> {
        self.parts().head.labels.pad_token_id
    }

    fn reads_last_token(&self) -> bool {
        true
    }
}
