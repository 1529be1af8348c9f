//! [`AutoCausalLm`]: a causal language model chosen by the `model_type` of a model folder's
//! `config.json`, as transformers' `AutoModelForCausalLM` does.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::AdapterPlan;

use super::causal_lm::CausalLm;
use super::generation::GenerationConfig;
use super::gpt2::{Gpt2Config, Gpt2LmHeadModel};
use super::llama::{KvCache, LlamaConfig, LlamaFamily, LlamaForCausalLM, GEMMA3_MULTIMODAL};

/// The `model_type`s [`AutoCausalLm::from_pretrained`] loads.
///
/// ```
/// use lorakit::models::auto::SUPPORTED_MODEL_TYPES;
/// use lorakit::models::llama::LlamaFamily;
/// // The Llama family's seventeen, Gemma 3's image-and-text checkpoints (for their text
/// // decoder), and GPT-2.
/// let llama = SUPPORTED_MODEL_TYPES.iter().filter(|t| LlamaFamily::from_model_type(t).is_some());
/// assert_eq!(llama.count(), LlamaFamily::ALL.len() + 1);
/// assert!(LlamaFamily::ALL.iter().all(|f| SUPPORTED_MODEL_TYPES.contains(&f.model_type())));
/// assert!(SUPPORTED_MODEL_TYPES.contains(&"gpt2"));
/// ```
pub const SUPPORTED_MODEL_TYPES: [&str; 19] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "granite",
    "smollm3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "olmo2",
    "olmo3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "gpt_oss",
    "gpt2",
];

/// Which implementation a `model_type` is built with.
enum Architecture {
    Llama,
    Gpt2,
}

impl Architecture {
    /// The architecture of the model folder `dir`; another `model_type` is an error naming
    /// it and the supported ones.
    fn of(dir: &Path) -> Result<Self> {
        let model_type = AutoCausalLm::model_type(dir)?;
        if LlamaFamily::from_model_type(&model_type).is_some() {
            Ok(Self::Llama)
        } else if model_type == "gpt2" {
            Ok(Self::Gpt2)
        } else {
            Err(Error::Unsupported {
                what: "model_type",
                got: model_type,
                supported: SUPPORTED_MODEL_TYPES.join(", "),
            })
        }
    }
}

/// One of the causal language models of [`crate::models`], chosen by `model_type`
/// ([`SUPPORTED_MODEL_TYPES`]): the Llama family's ([`LlamaForCausalLM`]) or `gpt2`
/// ([`Gpt2LmHeadModel`]). Implements [`CausalLm`]; generates with
/// [`AutoCausalLm::generate`].
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lorakit::models::auto::AutoCausalLm;
/// use lorakit::models::generation::GenerationConfig;
/// use lorakit::models::CausalLm;
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// for (dir, adapter) in [
///     ("tests/fixtures/models/llama/qwen3", "lora"),
///     ("tests/fixtures/peft_options/gpt2_dora", "adapter"),
/// ] {
///     let plan = PeftAdapter::load(format!("{dir}/{adapter}"), &dev)?.plan()?;
///     let model = AutoCausalLm::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan)?;
///     plan.finish()?;
///     let tokens = model.generate(&[1, 2, 3], &GenerationConfig::greedy(4))?;
///     assert_eq!(tokens.len(), 4);
///     assert_eq!(model.logits(&Tensor::new(&[[1u32, 2]], &dev)?)?.dims(), [1, 2, 64]);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub enum AutoCausalLm {
    /// The Llama family (`llama`, `mistral`, `qwen2`, `qwen3`, `granite`, `smollm3`, `phi3`,
    /// `gemma`, `gemma2`, `gemma3_text`, `olmo2`, `olmo3`; `gemma3`'s text decoder).
    Llama(LlamaForCausalLM),
    /// `gpt2`.
    Gpt2(Gpt2LmHeadModel),
}

impl AutoCausalLm {
    /// The `model_type` of the model folder `dir` (its `config.json`'s field).
    ///
    /// Errors: no such folder, no `config.json` in it, malformed JSON, or no string
    /// `model_type`.
    ///
    /// ```
    /// use lorakit::models::auto::AutoCausalLm;
    /// # fn main() -> lorakit::Result<()> {
    /// assert_eq!(AutoCausalLm::model_type("tests/fixtures/models/llama/mistral/base")?, "mistral");
    /// assert_eq!(AutoCausalLm::model_type("tests/fixtures/peft_options/gpt2_lora/base")?, "gpt2");
    /// assert!(AutoCausalLm::model_type("no/such/folder").is_err());
    /// # Ok(()) }
    /// ```
    pub fn model_type(dir: impl AsRef<Path>) -> Result<String> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::checkpoint(
                dir,
                "no such model folder (one holds config.json and model.safetensors)",
            ));
        }
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(Error::checkpoint(
                dir,
                "no config.json in this folder (a model folder as save_pretrained writes it)",
            ));
        }
        let text = crate::error::read_text(&path)?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::json(&path, &e))?;
        match config.get("model_type").and_then(|v| v.as_str()) {
            Some(t) => Ok(t.to_string()),
            None => Err(Error::file_config(
                &path,
                "model_type",
                format!(
                    "missing (or not a string): lorakit loads model_type {}",
                    SUPPORTED_MODEL_TYPES.join(", ")
                ),
            )),
        }
    }

    /// Builds the model of the folder `dir` in `dtype` on `device`, by its `model_type`
    /// ([`SUPPORTED_MODEL_TYPES`]), every adaptable module made by `plan` (call
    /// `plan.finish()` afterwards): [`LlamaForCausalLM::from_pretrained`] or
    /// [`Gpt2LmHeadModel::from_pretrained`]. Another `model_type` is an error naming it and
    /// the supported ones.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::auto::AutoCausalLm;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/llama3_rope/base";
    /// let model = AutoCausalLm::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// assert!(matches!(model, AutoCausalLm::Llama(_)));
    /// assert_eq!(model.model_type_name(), "llama");
    /// # Ok(()) }
    /// ```
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        plan: &AdapterPlan,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        Ok(match Architecture::of(dir)? {
            Architecture::Llama => {
                Self::Llama(LlamaForCausalLM::from_pretrained(dir, dtype, device, plan)?)
            }
            Architecture::Gpt2 => {
                Self::Gpt2(Gpt2LmHeadModel::from_pretrained(dir, dtype, device, plan)?)
            }
        })
    }

    /// The `(d_in, d_out)` shapes of the adaptable linear maps of the model folder `dir`,
    /// by its `model_type`: [`LlamaConfig::linear_shapes`] or
    /// [`Gpt2Config::linear_shapes`] (what
    /// [`AdapterRecipe::plan`](crate::finetune::AdapterRecipe::plan) takes, before the
    /// model is built).
    ///
    /// ```
    /// use lorakit::models::auto::AutoCausalLm;
    /// # fn main() -> lorakit::Result<()> {
    /// let shapes = AutoCausalLm::linear_shapes("tests/fixtures/peft_options/gpt2_lora/base")?;
    /// assert!(shapes.contains(&(16, 48))); // c_attn: n_embd 16 → q, k, v
    /// assert!(AutoCausalLm::linear_shapes("no/such/folder").is_err());
    /// # Ok(()) }
    /// ```
    pub fn linear_shapes(dir: impl AsRef<Path>) -> Result<Vec<(usize, usize)>> {
        let dir = dir.as_ref();
        let config = dir.join("config.json");
        Ok(match Architecture::of(dir)? {
            Architecture::Llama => LlamaConfig::from_file(config)?.linear_shapes(),
            Architecture::Gpt2 => Gpt2Config::from_file(config)?.linear_shapes(),
        })
    }

    /// The `model_type` of the loaded model (`"qwen2"`, `"gpt2"`, …).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::auto::AutoCausalLm;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_lora/base";
    /// let model = AutoCausalLm::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// assert_eq!(model.model_type_name(), "gpt2");
    /// # Ok(()) }
    /// ```
    pub fn model_type_name(&self) -> &'static str {
        match self {
            Self::Llama(m) if m.config().multimodal => GEMMA3_MULTIMODAL,
            Self::Llama(m) => m.config().family.model_type(),
            Self::Gpt2(_) => "gpt2",
        }
    }

    /// Logits `(batch, seq, vocab)` for token ids `(batch, seq)` over whole sequences
    /// (the model's `forward`).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::auto::AutoCausalLm;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/qwen2/base";
    /// let model = AutoCausalLm::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// let logits = model.forward(&Tensor::new(&[[1u32, 17, 42]], &Device::Cpu)?)?;
    /// assert_eq!(logits.dims(), [1, 3, 64]);
    /// # Ok(()) }
    /// ```
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Llama(m) => m.forward(input_ids),
            Self::Gpt2(m) => m.forward(input_ids),
        }
    }

    /// An empty [`KvCache`] for this model.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::auto::AutoCausalLm;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_lora/base";
    /// let model = AutoCausalLm::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// assert!(model.new_cache().is_empty());
    /// # Ok(()) }
    /// ```
    pub fn new_cache(&self) -> KvCache {
        match self {
            Self::Llama(m) => m.new_cache(),
            Self::Gpt2(m) => m.new_cache(),
        }
    }

    /// Logits of new token ids after those in `cache` (the model's `forward_cached`).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::auto::AutoCausalLm;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/peft_options/gpt2_lora/base";
    /// let model = AutoCausalLm::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// let mut cache = model.new_cache();
    /// model.forward_cached(&Tensor::new(&[[1u32, 2]], &Device::Cpu)?, &mut cache)?;
    /// let step = model.forward_cached(&Tensor::new(&[[3u32]], &Device::Cpu)?, &mut cache)?;
    /// assert_eq!((step.dims(), cache.len()), (&[1, 1, 64][..], 3));
    /// # Ok(()) }
    /// ```
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        match self {
            Self::Llama(m) => m.forward_cached(input_ids, cache),
            Self::Gpt2(m) => m.forward_cached(input_ids, cache),
        }
    }

    /// Generates one sequence after `prompt` (the model's `generate`: see
    /// [`LlamaForCausalLM::generate`]); returns the new tokens.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::auto::AutoCausalLm;
    /// use lorakit::models::generation::GenerationConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/mistral/base";
    /// let model = AutoCausalLm::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// // transformers' greedy tokens (tests/fixtures/generate/expected.json)
    /// let tokens = model.generate(&[1, 17, 42, 5], &GenerationConfig::greedy(12))?;
    /// assert_eq!(tokens, [41, 5, 5, 5, 5, 60, 31, 35, 62, 54, 62, 31]);
    /// assert!(model.generate(&[99], &GenerationConfig::greedy(1)).is_err()); // vocab is 64
    /// # Ok(()) }
    /// ```
    pub fn generate(&self, prompt: &[u32], config: &GenerationConfig) -> Result<Vec<u32>> {
        match self {
            Self::Llama(m) => m.generate(prompt, config),
            Self::Gpt2(m) => m.generate(prompt, config),
        }
    }

    /// Generates after each of `prompts` in one batch (the model's `generate_batch`: see
    /// [`LlamaForCausalLM::generate_batch`]); row `r` holds `prompts[r]`'s new tokens.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lorakit::model::AdapterPlan;
    /// use lorakit::models::auto::AutoCausalLm;
    /// use lorakit::models::generation::GenerationConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let dir = "tests/fixtures/models/llama/mistral/base";
    /// let model = AutoCausalLm::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none())?;
    /// let prompts = vec![vec![1u32, 17, 42, 5], vec![3, 14]];
    /// let rows = model.generate_batch(&prompts, &GenerationConfig::greedy(4))?;
    /// assert_eq!(rows[0], [41, 5, 5, 5]); // as `generate` gives for the first prompt alone
    /// assert_eq!(rows[1], model.generate(&prompts[1], &GenerationConfig::greedy(4))?);
    /// # Ok(()) }
    /// ```
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
    ) -> Result<Vec<Vec<u32>>> {
        match self {
            Self::Llama(m) => m.generate_batch(prompts, config),
            Self::Gpt2(m) => m.generate_batch(prompts, config),
        }
    }
}

impl CausalLm for AutoCausalLm {
    fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward(input_ids)
    }

    fn loss_sum(&self, input_ids: &Tensor, loss_mask: &Tensor) -> Result<Tensor> {
        match self {
            Self::Llama(m) => m.loss_sum(input_ids, loss_mask),
            Self::Gpt2(m) => m.loss_sum(input_ids, loss_mask),
        }
    }

    fn eval_loss_sum(&self, input_ids: &Tensor, loss_mask: &Tensor) -> Result<Tensor> {
        match self {
            Self::Llama(m) => CausalLm::eval_loss_sum(m, input_ids, loss_mask),
            Self::Gpt2(m) => CausalLm::eval_loss_sum(m, input_ids, loss_mask),
        }
    }

    fn loss_sum_t(&self, input_ids: &Tensor, loss_mask: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Llama(m) => CausalLm::loss_sum_t(m, input_ids, loss_mask, train),
            Self::Gpt2(m) => CausalLm::loss_sum_t(m, input_ids, loss_mask, train),
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            Self::Llama(m) => m.vocab_size(),
            Self::Gpt2(m) => m.vocab_size(),
        }
    }

    fn device(&self) -> &Device {
        match self {
            Self::Llama(m) => LlamaForCausalLM::device(m),
            Self::Gpt2(m) => Gpt2LmHeadModel::device(m),
        }
    }

    fn max_positions(&self) -> Option<usize> {
        match self {
            Self::Llama(m) => m.max_positions(),
            Self::Gpt2(m) => m.max_positions(),
        }
    }

    fn name_or_path(&self) -> Option<&str> {
        match self {
            Self::Llama(m) => m.name_or_path(),
            Self::Gpt2(m) => m.name_or_path(),
        }
    }

    fn modules_not_built(&self) -> &'static [&'static str] {
        match self {
            Self::Llama(m) => m.modules_not_built(),
            Self::Gpt2(m) => m.modules_not_built(),
        }
    }
}
