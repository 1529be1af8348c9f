//! [`LlamaConfig`]: a Llama-family `config.json` read as transformers 5.24 reads it.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::activation::GateActivation;
use super::family::{LlamaFamily, GEMMA3_MULTIMODAL};
use super::gemma::GemmaKeys;
use super::layer_types;
use super::longrope::LongRopeScaling;
use super::moe::{MoeConfig, MoeKeys};
use super::multimodal;
use super::multipliers::Multipliers;
use super::norm_layout::{NormPlacement, QkNorm};
use super::rope_keys::RopeKeys;
use super::yarn::YarnScaling;
use crate::error::{Error, Result, Scope};

/// How rotary position embeddings scale their frequencies (transformers' `rope_type`).
///
/// ```
/// use lorakit::models::llama::{LlamaConfig, RopeScaling};
/// # fn main() -> lorakit::Result<()> {
/// // A config in the form transformers 4.x wrote (tests/fixtures/models/llama).
/// let config = LlamaConfig::from_file("tests/fixtures/models/llama/linear_rope/base")?;
/// assert_eq!(config.rope_scaling, RopeScaling::Linear { factor: 2.0 });
/// assert_eq!(config.rope_theta, 500_000.0);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `default`: `θ^(-2i/d)`.
    None,
    /// `linear`: every frequency divided by `factor` (positions interpolated).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `llama3` (Llama 3.1+): low frequencies divided by `factor`, high ones kept, a smooth
    /// ramp between (wavelengths between `original_max_position_embeddings /
    /// high_freq_factor` and `/ low_freq_factor`).
    Llama3 {
        /// The divisor of low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are divided.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length of pretraining.
        original_max_position_embeddings: usize,
    },
    /// Precomputed divisors, one per frequency (`head_dim / 2` of them): frequency `i` is
    /// `θ^(-2i/d) / factors[i]`. This is how llama.cpp stores llama3 scaling in a GGUF
    /// model (its `rope_freqs.weight` tensor); [`LlamaForCausalLM::from_gguf`] reads it.
    ///
    /// [`LlamaForCausalLM::from_gguf`]: crate::models::llama::LlamaForCausalLM::from_gguf
    Factors(Vec<f32>),
    /// `yarn` (Qwen2.5 / Qwen3 long context, and others): see [`YarnScaling`].
    Yarn(YarnScaling),
    /// `longrope` (Phi-3's 128k models, Phi-3.5): see [`LongRopeScaling`].
    LongRope(LongRopeScaling),
}

/// Which keys a layer's queries see.
///
/// ```
/// use lorakit::models::llama::{LayerAttention, LlamaConfig};
/// # fn main() -> lorakit::Result<()> {
/// // A tiny Qwen3 whose second layer slides (use_sliding_window, max_window_layers 1).
/// let config = LlamaConfig::from_file("tests/fixtures/models/llama/qwen3/base")?;
/// assert_eq!(
///     config.layer_attention,
///     [LayerAttention::Full, LayerAttention::Sliding { window: 4 }]
/// );
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerAttention {
    /// Every earlier position and itself (causal).
    Full,
    /// The last `window` positions up to itself: key `j` is seen from query `i` iff
    /// `i - window < j <= i` (transformers' sliding-window mask).
    Sliding {
        /// The window, ≥ 1.
        window: usize,
    },
}

/// A Llama-family decoder's configuration: transformers' `config.json` for a
/// [`LlamaFamily`]'s `model_type`, resolved as transformers 5.24–5.25 resolves it.
///
/// Read with [`LlamaConfig::from_file`] / [`LlamaConfig::from_json`]; the fields are public
/// so a configuration can also be written in code (checked by [`LlamaConfig::validate`],
/// which [`super::LlamaForCausalLM::load`] calls).
///
/// How `config.json` is read:
///
/// - Required: `model_type`, `vocab_size`, `hidden_size`, `intermediate_size`,
///   `num_hidden_layers`, `num_attention_heads` (but for Gemma 3, which takes
///   `Gemma3TextConfig`'s defaults, as transformers does). Any other missing key takes
///   transformers' default for the `model_type` (e.g. a missing `num_key_value_heads` is
///   `num_attention_heads` for Llama, 8 for Mistral and 32 for Qwen; a missing `head_dim`
///   is `hidden_size / num_attention_heads`, 128 for Qwen3; a missing `sliding_window` is
///   4096 for Mistral). Unknown keys are ignored.
/// - RoPE: transformers 5's `rope_parameters` (`rope_type`, `rope_theta`, ...) or the 4.x
///   form (top-level `rope_theta`, `rope_scaling` with `type` or `rope_type`); a non-empty
///   `rope_scaling` wins over `rope_parameters`, a `rope_theta` inside them over the
///   top-level one. `default`, `linear`, `llama3`, `yarn` ([`YarnScaling`]) and, for
///   `phi3`, `longrope` ([`LongRopeScaling`]) are supported; any other `rope_type`
///   (`dynamic`, ...) and per-layer-type RoPE parameters (but Gemma 3's and OLMo 3's,
///   nested by `full_attention` / `sliding_attention`) are errors naming them. `partial_rotary_factor`
///   (inside the RoPE parameters first, then top-level) is read for `phi3`, whose attention
///   rotates only the first `int(head_dim · factor)` dimensions of each head; for the other
///   families a factor other than 1 is an error, as their attention rotates whole heads.
/// - Biases: Llama has `attention_bias` on q/k/v/o and `mlp_bias` on the MLP; Qwen2 always
///   has a bias on q/k/v and none on o or the MLP; Qwen3, OLMo 2 and 3 and the Gemma
///   families have `attention_bias` on q/k/v/o; Mistral has none (transformers ignores these keys where this says so, and so does
///   this).
/// - Sliding window: Mistral applies `sliding_window` (when not null) on every layer;
///   Qwen2/Qwen3 apply it on the layers `layer_types` names `sliding_attention` (derived
///   from `max_window_layers` when absent) and only when `use_sliding_window` is true
///   (Qwen2.5's configs set a `sliding_window` with `use_sliding_window: false`: full
///   attention everywhere); Llama and OLMo 2 have none; Gemma 2 and 3 and OLMo 3 slide on
///   the layers `layer_types` names (by default every other layer, Gemma 2; five in six,
///   Gemma 3's `sliding_window_pattern`; three in four, OLMo 3).
/// - `hidden_act` must be `silu` (or its alias `swish`), but for the Gemma families: a
///   GELU-tanh gate (see [`LlamaFamily`] for their other keys: `query_pre_attn_scalar`,
///   the soft-capping, `rope_local_base_freq`).
/// - `quantization_config`: bitsandbytes 4-bit (`load_in_4bit`, nf4 or fp4, with or
///   without double quantization; the weights are read by `crate::checkpoint::bnb`) and
///   gpt-oss's MXFP4 experts are read; any other method (bitsandbytes 8-bit, GPTQ, AWQ …)
///   is refused, naming it.
/// - `attention_dropout` (0 when absent, as in the Llama-family configs) drops attention
///   probabilities in training mode only ([`LlamaForCausalLM::forward_t`]).
/// - `model_type` `gemma3` (`Gemma3ForConditionalGeneration`, Gemma 3 4B and up): its
///   `text_config` is read as a `gemma3_text` config (errors name it), with the top-level
///   `tie_word_embeddings` (default true) and `quantization_config`; the vision keys are
///   ignored ([`LlamaConfig::multimodal`]).
/// - `mixtral`, `qwen2_moe`, `qwen3_moe`, `olmoe`: the mixture-of-experts keys are read into
///   [`LlamaConfig::moe`] ([`MoeConfig`]: `num_experts` / `num_local_experts`,
///   `num_experts_per_tok`, `moe_intermediate_size`, `norm_topk_prob`,
///   `decoder_sparse_step`, `mlp_only_layers`, `shared_expert_intermediate_size`,
///   `router_jitter_noise`, `output_router_logits`); Qwen2-MoE's `qkv_bias` (default
///   true) puts a bias on q/k/v; Qwen3-MoE slides on every layer when
///   `use_sliding_window`, Qwen2-MoE on every other layer below `max_window_layers`;
///   OLMoE's `clip_qkv` clamps queries, keys and values ([`LlamaConfig::clip_qkv`]).
/// - Ignored: `pretraining_tp` (transformers 5 ignores it), token ids, `use_cache`.
///
/// [`LlamaForCausalLM::forward_t`]: super::LlamaForCausalLM::forward_t
///
/// ```
/// use lorakit::models::llama::{LayerAttention, LlamaConfig, LlamaFamily, RopeScaling};
/// # fn main() -> lorakit::Result<()> {
/// let config = LlamaConfig::from_json(r#"{
///     "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
///     "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
///     "num_key_value_heads": 8, "rope_theta": 500000.0, "tie_word_embeddings": true,
///     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
///                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
/// }"#)?;
/// assert_eq!((config.family, config.head_dim, config.rope_theta), (LlamaFamily::Llama, 64, 5e5));
/// assert!(matches!(config.rope_scaling, RopeScaling::Llama3 { factor: 32.0, .. }));
/// assert_eq!(config.layer_attention, vec![LayerAttention::Full; 16]);
///
/// let dynamic = r#"{"model_type": "qwen2", "vocab_size": 64, "hidden_size": 16,
///     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
///     "rope_scaling": {"type": "dynamic", "factor": 4.0}}"#;
/// let err = LlamaConfig::from_json(dynamic).unwrap_err().to_string();
/// assert!(err.contains("rope_type") && err.contains("dynamic"), "{err}");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// The architecture (`model_type`).
    pub family: LlamaFamily,
    /// Rows of the embedding table and of the output head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP (`gate_proj` / `up_proj` outputs).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads; must
    /// divide them).
    pub num_key_value_heads: usize,
    /// Width of one head (even: RoPE rotates pairs).
    pub head_dim: usize,
    /// RMSNorm's epsilon.
    pub rms_norm_eps: f64,
    /// RoPE's base θ.
    pub rope_theta: f64,
    /// RoPE's frequency scaling.
    pub rope_scaling: RopeScaling,
    /// The fraction of each head that RoPE rotates (1 but for Phi-4-mini's 0.75): the
    /// first [`LlamaConfig::rotary_dim`] dimensions rotate, the rest pass unchanged.
    pub partial_rotary_factor: f64,
    /// The sliding-window layers' own RoPE θ, with unscaled frequencies (Gemma 3's
    /// `rope_local_base_freq`; OLMo 3's sliding layers' RoPE parameters); `None`: they rotate
    /// as the other layers.
    pub sliding_rope_theta: Option<f64>,
    /// The configured context length (only the default for llama3's
    /// `original_max_position_embeddings`; longer inputs are not refused, as in
    /// transformers).
    pub max_position_embeddings: usize,
    /// The output head reuses the embedding table (when the checkpoint has no
    /// `lm_head.weight`, as transformers 5 decides).
    pub tie_word_embeddings: bool,
    /// Bias on `q_proj`, `k_proj`, `v_proj`.
    pub qkv_bias: bool,
    /// Bias on `o_proj`.
    pub o_bias: bool,
    /// Bias on `gate_proj`, `up_proj`, `down_proj`.
    pub mlp_bias: bool,
    /// The MLP's gate activation (`hidden_act`; Gemma 2's and 3's `hidden_activation`).
    pub hidden_act: GateActivation,
    /// Every RMSNorm multiplies by `1 + weight` (Gemma's checkpoints store the weight's
    /// offset from 1), not by `weight`.
    pub unit_offset_norms: bool,
    /// Where each layer normalizes: before each branch (Llama), before and after (Gemma 2
    /// and 3), or after only (OLMo 2 and 3).
    pub norm_placement: NormPlacement,
    /// RMSNorm on queries and keys before RoPE: per head (Qwen3's and Gemma 3's `q_norm`,
    /// `k_norm`) or over the whole projection (OLMo 2's and 3's).
    pub qk_norm: QkNorm,
    /// Each layer's attention pattern (`num_hidden_layers` entries).
    pub layer_attention: Vec<LayerAttention>,
    /// Whether each layer rotates its queries and keys (`num_hidden_layers` entries): all
    /// but SmolLM3's NoPE layers (its `no_rope_layers` entries that are 0).
    pub layer_rope: Vec<bool>,
    /// Whether the attention's q/k/v projections are one `qkv_proj` and the MLP's gate and
    /// up projections one `gate_up_proj` (Phi-3), their outputs split in that order.
    pub fused_projections: bool,
    /// Phi-3's `resid_pdrop` (0 for the other families): the attention's and the MLP's
    /// outputs are dropped at this rate before their residual adds in training mode, as
    /// transformers' `Phi3DecoderLayer` does (evaluation ignores it).
    pub residual_dropout: f64,
    /// Dropout on the attention probabilities (training only).
    pub attention_dropout: f64,
    /// Granite's embedding, attention, residual and logit scalars (the plain decoder's
    /// for the other families; the Gemma families' embedding and attention scales).
    pub multipliers: Multipliers,
    /// Gemma 2's soft-capping of the attention scores, `cap · tanh(scores / cap)` after the
    /// scale and before the mask (`attn_logit_softcapping`; `None`: none).
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2's soft-capping of the causal LM's logits, `cap · tanh(logits / cap)`
    /// (`final_logit_softcapping`; `None`: none).
    pub final_logit_softcapping: Option<f64>,
    /// Read from the `text_config` of an image-and-text checkpoint (`model_type` `gemma3`,
    /// `Gemma3ForConditionalGeneration`): the text decoder's modules sit at
    /// `model.language_model.…` (transformers 5's paths, which PEFT's adapters name; the
    /// checkpoint's own `language_model.model.…` names are read too), the vision tower is
    /// not built, and text goes through the decoder as `Gemma3ForCausalLM`'s would. See
    /// [`LlamaConfig::decoder_prefix`].
    pub multimodal: bool,
    /// The mixture-of-experts settings of Mixtral, Qwen2-MoE and Qwen3-MoE (their sparse
    /// layers' MLPs); `None` for the dense families.
    pub moe: Option<MoeConfig>,
    /// OLMoE's `clip_qkv`: queries, keys and values clamped to `[−c, c]` after their
    /// projections (and the q/k norms); `None`: no clamp.
    pub clip_qkv: Option<f64>,
    /// gpt-oss's attention sinks: each query head has a learned logit
    /// (`self_attn.sinks`) that joins its row's softmax as one more key without a value,
    /// so a row's probabilities sum to less than 1.
    pub attention_sinks: bool,
}

/// The keys read from `config.json`, as written.
#[derive(Deserialize)]
pub(super) struct RawConfig {
    pub(super) model_type: Option<String>,
    pub(super) vocab_size: Option<usize>,
    pub(super) hidden_size: Option<usize>,
    pub(super) intermediate_size: Option<usize>,
    pub(super) num_hidden_layers: Option<usize>,
    pub(super) num_attention_heads: Option<usize>,
    #[serde(default, deserialize_with = "crate::error::present")]
    pub(super) num_key_value_heads: Option<Option<usize>>,
    #[serde(default, deserialize_with = "crate::error::present")]
    pub(super) head_dim: Option<Option<usize>>,
    pub(super) rms_norm_eps: Option<f64>,
    pub(super) rope_theta: Option<f64>,
    pub(super) rope_parameters: Option<Map<String, Value>>,
    pub(super) rope_scaling: Option<Map<String, Value>>,
    pub(super) partial_rotary_factor: Option<f64>,
    pub(super) original_max_position_embeddings: Option<usize>,
    pub(super) max_position_embeddings: Option<usize>,
    pub(super) tie_word_embeddings: Option<bool>,
    pub(super) attention_bias: Option<bool>,
    pub(super) qkv_bias: Option<bool>,
    pub(super) mlp_bias: Option<bool>,
    pub(super) hidden_act: Option<String>,
    #[serde(default, deserialize_with = "crate::error::present")]
    pub(super) sliding_window: Option<Option<usize>>,
    pub(super) use_sliding_window: Option<bool>,
    pub(super) max_window_layers: Option<usize>,
    pub(super) layer_types: Option<Vec<String>>,
    pub(super) no_rope_layers: Option<Vec<u8>>,
    pub(super) no_rope_layer_interval: Option<usize>,
    pub(super) quantization_config: Option<Value>,
    pub(super) attention_dropout: Option<f64>,
    pub(super) resid_pdrop: Option<f64>,
    pub(super) embedding_multiplier: Option<f64>,
    pub(super) attention_multiplier: Option<f64>,
    pub(super) residual_multiplier: Option<f64>,
    pub(super) logits_scaling: Option<f64>,
    pub(super) clip_qkv: Option<f64>,
}

impl LlamaConfig {
    /// Reads `config.json` from a model folder, or the file at `path`; errors name the
    /// file.
    ///
    /// ```
    /// use lorakit::models::llama::{LlamaConfig, LlamaFamily};
    /// # fn main() -> lorakit::Result<()> {
    /// let config = LlamaConfig::from_file("tests/fixtures/models/llama/mistral/base")?;
    /// assert_eq!(config.family, LlamaFamily::Mistral);
    /// assert_eq!(config.head_dim, 12); // given explicitly: not hidden_size / heads = 8
    /// assert!(LlamaConfig::from_file("no/such/model").is_err());
    /// # Ok(()) }
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = crate::error::read_text(&file)?;
        Self::parse(&text, file)
    }

    /// Parses the text of a `config.json` (errors name it `config.json`).
    ///
    /// ```
    /// use lorakit::models::llama::LlamaConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let config = LlamaConfig::from_json(r#"{"model_type": "qwen2", "vocab_size": 151936,
    ///     "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    ///     "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": true,
    ///     "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": false}"#)?;
    /// assert_eq!(config.head_dim, 64);
    /// assert!(config.qkv_bias && !config.o_bias && config.tie_word_embeddings);
    /// let gelu = r#"{"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
    ///     "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
    ///     "hidden_act": "gelu"}"#;
    /// let err = LlamaConfig::from_json(gelu).unwrap_err().to_string();
    /// assert!(err.contains("hidden_act") && err.contains("gelu"), "{err}");
    /// # Ok(()) }
    /// ```
    pub fn from_json(text: &str) -> Result<Self> {
        Self::parse(text, PathBuf::from("config.json"))
    }

    fn parse(text: &str, file: PathBuf) -> Result<Self> {
        let raw: RawConfig = crate::error::parse_json(text, &file)?;
        if raw.model_type.as_deref() == Some(GEMMA3_MULTIMODAL) {
            return Self::parse_multimodal(text, &file);
        }
        // The Gemma families' own keys, read apart (not flattened into `RawConfig`: serde's
        // `flatten` would lose the key's name in a type error).
        let family = raw
            .model_type
            .as_deref()
            .and_then(LlamaFamily::from_model_type);
        let gemma = match family {
            Some(f) if f.is_gemma() => crate::error::parse_json(text, &file)?,
            _ => GemmaKeys::default(),
        };
        let moe = match family {
            Some(f) if f.is_moe() => Some(crate::error::parse_json::<MoeKeys>(text, &file)?),
            _ => None,
        };
        let mut config = Self::resolve(raw, &gemma, &file)?;
        if let Some(keys) = moe {
            let (f, layers) = (config.family, config.num_hidden_layers);
            config.moe = Some(keys.resolve(f, layers, config.intermediate_size, &file)?);
        }
        config.validate_in(Scope::File(file))?;
        Ok(config)
    }

    /// A `gemma3` config: its text decoder's, from `text_config` ([`LlamaConfig::multimodal`]).
    fn parse_multimodal(text: &str, file: &Path) -> Result<Self> {
        let (mut raw, outer) = multimodal::read_text_config::<RawConfig>(text, file)?;
        let (gemma, _) = multimodal::read_text_config::<GemmaKeys>(text, file)?;
        raw.model_type = Some(LlamaFamily::Gemma3.model_type().to_string());
        raw.tie_word_embeddings = Some(outer.tie_word_embeddings.unwrap_or(true));
        raw.quantization_config = outer.quantization_config.or(raw.quantization_config);
        let scope = multimodal::text_config_scope(file);
        let mut config = Self::resolve(raw, &gemma, &scope)?;
        config.multimodal = true;
        config.validate_in(Scope::File(scope))?;
        Ok(config)
    }

    fn resolve(raw: RawConfig, gemma_keys: &GemmaKeys, file: &Path) -> Result<Self> {
        let invalid = |field: &'static str, reason: &str| Error::file_config(file, field, reason);
        let all = LlamaFamily::model_types(|_| true);
        let model_type = raw
            .model_type
            .as_deref()
            .ok_or_else(|| invalid("model_type", &format!("missing (one of {all} expected)")))?;
        let family =
            LlamaFamily::from_model_type(model_type).ok_or_else(|| Error::Unsupported {
                what: "model_type",
                got: model_type.to_string(),
                supported: all.clone(),
            })?;
        // Required but for Gemma 3, which takes `Gemma3TextConfig`'s defaults (the Hub's
        // gemma3 configs leave most of them out).
        let gemma3_default = |default: usize| (family == LlamaFamily::Gemma3).then_some(default);
        let required = |value: Option<usize>, field: &'static str, gemma3: usize| {
            value
                .or(gemma3_default(gemma3))
                .ok_or_else(|| invalid(field, "missing"))
        };
        let vocab_size = required(raw.vocab_size, "vocab_size", 262_208)?;
        let hidden_size = required(raw.hidden_size, "hidden_size", 2304)?;
        let intermediate_size = required(raw.intermediate_size, "intermediate_size", 9216)?;
        let num_hidden_layers = required(raw.num_hidden_layers, "num_hidden_layers", 26)?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads", 8)?;
        if num_attention_heads == 0 {
            return Err(invalid("num_attention_heads", "must be at least 1"));
        }

        if let Some(q) = raw.quantization_config.as_ref().filter(|q| !q.is_null()) {
            let method = q
                .get("quant_method")
                .and_then(Value::as_str)
                .unwrap_or("present");
            // gpt-oss's released checkpoints store the experts in MXFP4, which the
            // checkpoint reader dequantizes as transformers does
            // (`crate::checkpoint::mxfp4`); bitsandbytes 4-bit weights are read as blocks
            // (`crate::checkpoint::bnb`); everything else is stored plainly.
            let is_true = |key: &str| q.get(key).and_then(Value::as_bool) == Some(true);
            let bnb_4bit =
                method == "bitsandbytes" && (is_true("load_in_4bit") || is_true("_load_in_4bit"));
            let read = bnb_4bit || (family == LlamaFamily::GptOss && method == "mxfp4");
            if !read {
                let got = match method == "bitsandbytes" {
                    true => "bitsandbytes 8-bit (LLM.int8)".to_string(),
                    false => method.to_string(),
                };
                return Err(Error::Unsupported {
                    what: "quantization_config (quantized weights)",
                    got,
                    supported: "unquantized f32, f16 or bf16 checkpoints, bitsandbytes 4-bit \
                                (nf4, fp4) ones, and gpt-oss's MXFP4 experts"
                        .to_string(),
                });
            }
        }
        let gemma = family.is_gemma();
        let gemma_settings = if gemma {
            let act = raw.hidden_act.as_deref();
            Some(gemma_keys.resolve(family, hidden_size, act, file)?)
        } else {
            let act = raw.hidden_act.as_deref().unwrap_or("silu");
            if act != "silu" && act != "swish" {
                return Err(Error::Unsupported {
                    what: "hidden_act",
                    got: act.to_string(),
                    supported: "silu (swish)".to_string(),
                });
            }
            None
        };

        // transformers' class defaults when a key is absent; `null` where noted.
        let num_key_value_heads = match raw.num_key_value_heads {
            Some(Some(n)) => n,
            Some(None) => num_attention_heads,
            None => match family {
                LlamaFamily::GptOss => 8,
                LlamaFamily::Llama
                | LlamaFamily::Granite
                | LlamaFamily::Phi3
                | LlamaFamily::Olmo2
                | LlamaFamily::Olmo3
                | LlamaFamily::Olmoe => num_attention_heads,
                LlamaFamily::Mistral | LlamaFamily::Mixtral => 8,
                LlamaFamily::SmolLm3
                | LlamaFamily::Gemma2
                | LlamaFamily::Gemma3
                | LlamaFamily::Qwen3Moe => 4,
                LlamaFamily::Gemma | LlamaFamily::Qwen2Moe => 16,
                LlamaFamily::Qwen2 | LlamaFamily::Qwen3 => 32,
            },
        };
        let head_dim = match (raw.head_dim, family) {
            (Some(Some(d)), _) => d,
            (None, LlamaFamily::Qwen3) => 128,
            (None, f) if f.is_gemma() => 256,
            (None, LlamaFamily::GptOss) => 64,
            (Some(None), LlamaFamily::Qwen3) => {
                return Err(invalid("head_dim", "null (Qwen3 needs a head_dim)"))
            }
            (_, _) => hidden_size / num_attention_heads,
        };
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(match family {
            LlamaFamily::Llama | LlamaFamily::Granite | LlamaFamily::Olmo2 | LlamaFamily::Olmo3 => {
                2048
            }
            LlamaFamily::Olmoe => 4096,
            LlamaFamily::Gemma | LlamaFamily::Gemma2 => 8192,
            LlamaFamily::Phi3 => 4096,
            LlamaFamily::Mistral
            | LlamaFamily::Gemma3
            | LlamaFamily::Mixtral
            | LlamaFamily::GptOss => 131_072,
            LlamaFamily::Qwen2
            | LlamaFamily::Qwen3
            | LlamaFamily::SmolLm3
            | LlamaFamily::Qwen2Moe
            | LlamaFamily::Qwen3Moe => 32_768,
        });

        let sizes = (family, max_position_embeddings);
        let layered = match family {
            LlamaFamily::Gemma3 => Some((
                (raw.rope_theta, 1_000_000.0),
                (gemma_keys.rope_local_base_freq, 10_000.0),
            )),
            // The top-level θ (the 4.57 form) for both types, as transformers 4.57 reads it
            // (5.25 pops it for the full-attention layers and leaves the sliding ones at
            // 500 000; the released OLMo 3 configs have 500 000, where the two agree).
            LlamaFamily::Olmo3 => Some(((raw.rope_theta, 500_000.0), (raw.rope_theta, 500_000.0))),
            _ => None,
        };
        let (rope_theta, rope_scaling, partial_rotary_factor, sliding_rope_theta) =
            if let Some(thetas) = layered {
                layer_type_rope(&raw, thetas, sizes, file)?
            } else {
                let (theta, scaling, partial) =
                    resolve_rope(&raw, max_position_embeddings, family, file)?;
                (theta, scaling, partial, None)
            };

        // GptOssConfig's default is biased attention.
        let attention_bias = raw.attention_bias.unwrap_or(family == LlamaFamily::GptOss);
        let (qkv_bias, o_bias, mlp_bias) = match family {
            LlamaFamily::Llama | LlamaFamily::Granite => (
                attention_bias,
                attention_bias,
                raw.mlp_bias.unwrap_or(false),
            ),
            LlamaFamily::Mistral | LlamaFamily::Phi3 | LlamaFamily::Mixtral => {
                (false, false, false)
            }
            LlamaFamily::Qwen2 => (true, false, false),
            LlamaFamily::Qwen2Moe => (raw.qkv_bias.unwrap_or(true), false, false),
            LlamaFamily::Qwen3
            | LlamaFamily::Qwen3Moe
            | LlamaFamily::Gemma
            | LlamaFamily::Gemma2
            | LlamaFamily::Gemma3
            | LlamaFamily::Olmo2
            | LlamaFamily::Olmo3
            | LlamaFamily::Olmoe
            | LlamaFamily::GptOss => (attention_bias, attention_bias, false),
            LlamaFamily::SmolLm3 => (
                attention_bias,
                attention_bias,
                raw.mlp_bias.unwrap_or(false),
            ),
        };

        // `None` in the file's `sliding_window` is "no window"; absent is 4096.
        let layer_rope = match family {
            LlamaFamily::SmolLm3 => smollm3_rope_layers(&raw, num_hidden_layers, file)?,
            _ => vec![true; num_hidden_layers],
        };
        // `None` in the file's `sliding_window` is "no window"; absent is 4096 (SmolLM3:
        // none).
        let window = match (raw.sliding_window, family) {
            (Some(w), _) => w,
            (None, LlamaFamily::SmolLm3 | LlamaFamily::Phi3 | LlamaFamily::Mixtral) => None,
            (None, LlamaFamily::GptOss) => Some(128),
            (None, _) => Some(4096),
        };
        let layer_attention = match family {
            LlamaFamily::Llama | LlamaFamily::Granite | LlamaFamily::Olmo2 | LlamaFamily::Olmoe => {
                vec![LayerAttention::Full; num_hidden_layers]
            }
            LlamaFamily::Gemma | LlamaFamily::Gemma2 | LlamaFamily::Gemma3 => {
                let types = raw.layer_types.as_deref();
                let names = gemma_keys.layer_type_names(family, types, num_hidden_layers, file)?;
                layer_kinds(&names, window, "sliding_window is null", file)?
            }
            LlamaFamily::GptOss => {
                // GptOssConfig's default: sliding and full layers alternating, the first
                // one sliding.
                let names = raw.layer_types.clone().unwrap_or_else(|| {
                    (0..num_hidden_layers)
                        .map(|i| match i % 2 {
                            0 => "sliding_attention".to_string(),
                            _ => "full_attention".to_string(),
                        })
                        .collect()
                });
                layer_kinds(&names, window, "sliding_window is null", file)?
            }
            LlamaFamily::Olmo3 => {
                // Olmo3Config's default: every fourth layer full attention.
                let names = raw
                    .layer_types
                    .clone()
                    .unwrap_or_else(|| layer_types::every_nth_full(num_hidden_layers, 4));
                layer_kinds(&names, window, "sliding_window is null", file)?
            }
            LlamaFamily::Mistral | LlamaFamily::Phi3 | LlamaFamily::Mixtral => {
                let kind = match window {
                    Some(window) => LayerAttention::Sliding { window },
                    None => LayerAttention::Full,
                };
                vec![kind; num_hidden_layers]
            }
            LlamaFamily::Qwen3Moe => {
                // Qwen3MoeConfig: the window on every layer when use_sliding_window.
                let window = window.filter(|_| raw.use_sliding_window.unwrap_or(false));
                let kind = window.map_or(LayerAttention::Full, |window| LayerAttention::Sliding {
                    window,
                });
                vec![kind; num_hidden_layers]
            }
            LlamaFamily::Qwen2
            | LlamaFamily::Qwen3
            | LlamaFamily::SmolLm3
            | LlamaFamily::Qwen2Moe => {
                let window = window.filter(|_| raw.use_sliding_window.unwrap_or(false));
                let max_window_layers = raw.max_window_layers.unwrap_or(28);
                // transformers' default layer_types: Qwen slides from max_window_layers
                // on, SmolLM3 on its NoPE layers, Qwen2-MoE on every other layer (the
                // first one first) below max_window_layers.
                let slides = |i: usize| match family {
                    LlamaFamily::SmolLm3 => !layer_rope.get(i).copied().unwrap_or(true),
                    LlamaFamily::Qwen2Moe => i.is_multiple_of(2) && i < max_window_layers,
                    _ => i >= max_window_layers,
                };
                let names = raw.layer_types.clone().unwrap_or_else(|| {
                    (0..num_hidden_layers)
                        .map(|i| {
                            if window.is_some() && slides(i) {
                                "sliding_attention".to_string()
                            } else {
                                "full_attention".to_string()
                            }
                        })
                        .collect()
                });
                let no_window = "use_sliding_window is false or sliding_window is null";
                layer_kinds(&names, window, no_window, file)?
            }
        };

        Ok(Self {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(match family {
                LlamaFamily::Phi3
                | LlamaFamily::Olmo2
                | LlamaFamily::Olmo3
                | LlamaFamily::Mixtral
                | LlamaFamily::Olmoe
                | LlamaFamily::GptOss => 1e-5,
                _ => 1e-6,
            }),
            rope_theta,
            rope_scaling,
            partial_rotary_factor,
            sliding_rope_theta,
            max_position_embeddings,
            tie_word_embeddings: raw
                .tie_word_embeddings
                .unwrap_or(family == LlamaFamily::SmolLm3 || gemma),
            qkv_bias,
            o_bias,
            mlp_bias,
            hidden_act: gemma_settings
                .as_ref()
                .map_or(GateActivation::Silu, |g| g.hidden_act),
            unit_offset_norms: gemma,
            norm_placement: match family {
                LlamaFamily::Gemma2 | LlamaFamily::Gemma3 => NormPlacement::Sandwich,
                LlamaFamily::Olmo2 | LlamaFamily::Olmo3 => NormPlacement::Post,
                _ => NormPlacement::Pre,
            },
            qk_norm: match family {
                LlamaFamily::Qwen3 | LlamaFamily::Gemma3 | LlamaFamily::Qwen3Moe => QkNorm::PerHead,
                LlamaFamily::Olmo2 | LlamaFamily::Olmo3 | LlamaFamily::Olmoe => QkNorm::Whole,
                _ => QkNorm::None,
            },
            layer_attention,
            layer_rope,
            fused_projections: family == LlamaFamily::Phi3,
            residual_dropout: match family {
                LlamaFamily::Phi3 => raw.resid_pdrop.unwrap_or(0.0),
                _ => 0.0,
            },
            attention_dropout: raw.attention_dropout.unwrap_or(0.0),
            multipliers: match (&gemma_settings, family) {
                (Some(settings), _) => settings.multipliers,
                (None, LlamaFamily::Granite) => Multipliers::granite(
                    raw.embedding_multiplier,
                    raw.attention_multiplier,
                    raw.residual_multiplier,
                    raw.logits_scaling,
                ),
                _ => Multipliers::default(),
            },
            attn_logit_softcapping: gemma_settings.as_ref().and_then(|g| g.softcaps.0),
            final_logit_softcapping: gemma_settings.as_ref().and_then(|g| g.softcaps.1),
            multimodal: false,
            moe: None,
            clip_qkv: match family {
                LlamaFamily::Olmoe => raw.clip_qkv,
                _ => None,
            },
            attention_sinks: family == LlamaFamily::GptOss,
        })
    }

    /// The module path the decoder's modules sit under: `model` (`model.embed_tokens`,
    /// `model.layers.N.…`, `model.norm`), or `model.language_model` for the text decoder of
    /// an image-and-text checkpoint ([`LlamaConfig::multimodal`]). The output head is
    /// `lm_head` in both.
    ///
    /// ```
    /// use lorakit::models::llama::LlamaConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let gemma3 = LlamaConfig::from_file("tests/fixtures/models/llama/gemma3_mm/base")?;
    /// assert_eq!(gemma3.decoder_prefix(), "model.language_model");
    /// let qwen2 = LlamaConfig::from_file("tests/fixtures/models/llama/qwen2/base")?;
    /// assert_eq!(qwen2.decoder_prefix(), "model");
    /// # Ok(()) }
    /// ```
    pub fn decoder_prefix(&self) -> &'static str {
        if self.multimodal {
            crate::checkpoint::layout::TEXT_DECODER
        } else {
            "model"
        }
    }

    /// Whether the dense layers' MLPs (`gate_proj`, `up_proj`, `down_proj`) take adapters:
    /// all but Qwen3-MoE's. PEFT 0.21 reads those names on a `qwen3_moe` model as the
    /// experts' stacked parameters (its conversion of transformers 4's targets), so it
    /// never adapts a dense layer's MLP there and drops an adapter's tensors for it; lorakit
    /// keeps them frozen too, so that its adapters load in PEFT as trained.
    ///
    /// ```
    /// use lorakit::models::llama::LlamaConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let qwen3_moe = LlamaConfig::from_file("tests/fixtures/models/llama/qwen3_moe/base")?;
    /// assert!(!qwen3_moe.dense_mlp_adaptable());
    /// let qwen2_moe = LlamaConfig::from_file("tests/fixtures/models/llama/qwen2_moe/base")?;
    /// assert!(qwen2_moe.dense_mlp_adaptable());
    /// # Ok(()) }
    /// ```
    pub fn dense_mlp_adaptable(&self) -> bool {
        self.family != LlamaFamily::Qwen3Moe
    }

    /// Whether PEFT 0.21 converts `target_modules` into LoRAs on parameters for this
    /// model: on Mixtral, Qwen3-MoE and OLMoE (its conversion table for transformers 5's
    /// MoE models, which does not cover `qwen2_moe` itself) `all-linear`, and the experts'
    /// and router's transformers 4 module names, adapt the experts' stacked weights and the
    /// router. lorakit's LoRA does the same ([`crate::model::ParameterTargets`]); an
    /// adapter trained with `all-linear` on such a model is saved with the modules it
    /// adapted listed by name (and its LoRAs on parameters, if any), so that PEFT loads
    /// exactly those.
    ///
    /// ```
    /// use lorakit::models::llama::LlamaConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let path = |case: &str| format!("tests/fixtures/models/llama/{case}/base");
    /// assert!(LlamaConfig::from_file(path("mixtral"))?.peft_all_linear_adds_parameters());
    /// assert!(!LlamaConfig::from_file(path("qwen2_moe"))?.peft_all_linear_adds_parameters());
    /// # Ok(()) }
    /// ```
    pub fn peft_all_linear_adds_parameters(&self) -> bool {
        matches!(
            self.family,
            LlamaFamily::Mixtral | LlamaFamily::Qwen3Moe | LlamaFamily::Olmoe
        )
    }

    /// The module prefixes an image-and-text checkpoint has beside the text decoder, which
    /// the model does not build ([`LlamaConfig::multimodal`]): its vision tower and
    /// projector; none for a text model.
    ///
    /// ```
    /// use lorakit::models::llama::LlamaConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let gemma3 = LlamaConfig::from_file("tests/fixtures/models/llama/gemma3_mm/base")?;
    /// assert_eq!(gemma3.modules_not_built(), ["model.vision_tower", "model.multi_modal_projector"]);
    /// assert!(LlamaConfig::from_file("tests/fixtures/models/llama/qwen2/base")?.modules_not_built().is_empty());
    /// # Ok(()) }
    /// ```
    pub fn modules_not_built(&self) -> &'static [&'static str] {
        if self.multimodal {
            &crate::checkpoint::layout::VISION_MODULES
        } else {
            &[]
        }
    }

    /// The `(d_in, d_out)` of every kind of linear layer the model has: the attention's
    /// q, k, v and o projections, the MLP's gate, up and down projections, and the output
    /// head (what VeRA's shared pair must cover).
    ///
    /// ```
    /// use lorakit::models::llama::LlamaConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let config = LlamaConfig::from_file("tests/fixtures/models/llama/qwen2/base")?;
    /// let (d, f) = (config.hidden_size, config.intermediate_size);
    /// assert!(config.linear_shapes().contains(&(d, f)) && config.linear_shapes().contains(&(f, d)));
    /// # Ok(()) }
    /// ```
    pub fn linear_shapes(&self) -> Vec<(usize, usize)> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        if self.fused_projections {
            return vec![
                (d, q + 2 * kv),
                (q, d),
                (d, 2 * f),
                (f, d),
                (d, self.vocab_size),
            ];
        }
        let mut shapes = vec![
            (d, q),
            (d, kv),
            (q, d),
            (d, f),
            (f, d),
            (d, self.vocab_size),
        ];
        // Qwen2-MoE's shared expert and its gate (the experts take no adapter).
        if let Some(s) = self
            .moe
            .as_ref()
            .and_then(|m| m.shared_expert_intermediate_size)
        {
            shapes.extend([(d, s), (s, d), (d, 1)]);
        }
        shapes
    }

    /// Checks that the configuration describes a model that can be built: sizes ≥ 1,
    /// `num_key_value_heads` dividing `num_attention_heads`, an even `head_dim`, finite
    /// positive θ and scaling factors, one [`LayerAttention`] per layer, windows ≥ 1.
    ///
    /// ```
    /// use lorakit::models::llama::LlamaConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let mut config = LlamaConfig::from_file("tests/fixtures/models/llama/qwen2/base")?;
    /// config.validate()?;
    /// config.num_key_value_heads = 3; // does not divide 4 query heads
    /// let err = config.validate().unwrap_err().to_string();
    /// assert!(err.contains("num_key_value_heads"), "{err}");
    /// # Ok(()) }
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.validate_in(Scope::Settings("Llama config".to_string()))
    }

    fn validate_in(&self, scope: Scope) -> Result<()> {
        let invalid = |field: &'static str, reason: String| Error::InvalidConfig {
            scope: scope.clone(),
            field,
            reason,
        };
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1, got 0".to_string()));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                format!("RoPE needs an even head_dim, got {}", self.head_dim),
            ));
        }
        if !self.rms_norm_eps.is_finite() || self.rms_norm_eps < 0.0 {
            return Err(invalid(
                "rms_norm_eps",
                format!("must be finite and ≥ 0, got {}", self.rms_norm_eps),
            ));
        }
        let dropout = [
            ("attention_dropout", Some(self.attention_dropout)),
            ("resid_pdrop", Some(self.residual_dropout)),
        ];
        if let Some((field, reason)) = crate::validate::config_dropouts(dropout) {
            return Err(invalid(field, reason));
        }
        let positive = |field: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(invalid(field, format!("must be finite and > 0, got {v}")))
            }
        };
        positive("rope_theta", self.rope_theta)?;
        if let Some(clip) = self.clip_qkv {
            positive("clip_qkv", clip)?;
        }
        if let Some(theta) = self.sliding_rope_theta {
            let key = match self.family {
                LlamaFamily::Gemma3 => "rope_local_base_freq",
                _ => "sliding_attention rope_theta",
            };
            positive(key, theta)?;
        }
        for (field, cap) in [
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(cap) = cap {
                positive(field, cap)?;
            }
        }
        let rotary_dim = self.rotary_dim_in(&invalid)?;
        self.multipliers
            .validate(&|field, reason| invalid(field, reason))?;
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => positive("factor", factor)?,
            RopeScaling::Factors(ref factors) => {
                if factors.len() != rotary_dim / 2 {
                    return Err(invalid(
                        "rope factors",
                        format!(
                            "{} of them for {rotary_dim} rotated dimensions: need {}",
                            factors.len(),
                            rotary_dim / 2
                        ),
                    ));
                }
                for &f in factors {
                    positive("rope factor", f64::from(f))?;
                }
            }
            RopeScaling::Yarn(ref yarn) => {
                yarn.validate(&|field, reason| invalid(field, reason))?
            }
            RopeScaling::LongRope(ref long) => {
                long.validate(rotary_dim, &|field, reason| invalid(field, reason))?
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", factor)?;
                positive("low_freq_factor", low_freq_factor)?;
                positive("high_freq_factor", high_freq_factor)?;
                if high_freq_factor == low_freq_factor {
                    return Err(invalid(
                        "high_freq_factor",
                        format!("must differ from low_freq_factor (both {low_freq_factor})"),
                    ));
                }
                if original_max_position_embeddings == 0 {
                    return Err(invalid(
                        "original_max_position_embeddings",
                        "must be at least 1, got 0".to_string(),
                    ));
                }
            }
        }
        if self.layer_rope.len() != self.num_hidden_layers {
            return Err(invalid(
                "no_rope_layers",
                format!(
                    "{} entries for {} layers",
                    self.layer_rope.len(),
                    self.num_hidden_layers
                ),
            ));
        }
        if self.layer_attention.len() != self.num_hidden_layers {
            return Err(invalid(
                "layer_types",
                format!(
                    "{} entries for {} layers",
                    self.layer_attention.len(),
                    self.num_hidden_layers
                ),
            ));
        }
        match (&self.moe, self.family.is_moe()) {
            (Some(moe), true) if moe.sparse_layers.len() != self.num_hidden_layers => {
                return Err(invalid(
                    "mlp_only_layers",
                    format!(
                        "sparse layers given for {} layers, not {}",
                        moe.sparse_layers.len(),
                        self.num_hidden_layers
                    ),
                ))
            }
            (Some(_), false) => {
                return Err(invalid(
                    "moe",
                    format!("{} has no mixture of experts", self.family.model_type()),
                ))
            }
            (None, true) => {
                return Err(invalid(
                    "moe",
                    format!("{} needs its experts' settings", self.family.model_type()),
                ))
            }
            _ => {}
        }
        if self
            .layer_attention
            .contains(&LayerAttention::Sliding { window: 0 })
        {
            return Err(invalid(
                "sliding_window",
                "must be at least 1, got 0".to_string(),
            ));
        }
        Ok(())
    }
}

impl LlamaConfig {
    /// [`LlamaConfig::rotary_dim`] after checking `partial_rotary_factor`: in (0, 1], below
    /// 1 only for Phi-3, and giving an even width of at least 2.
    fn rotary_dim_in(&self, invalid: &dyn Fn(&'static str, String) -> Error) -> Result<usize> {
        let factor = self.partial_rotary_factor;
        if !(factor.is_finite() && factor > 0.0 && factor <= 1.0) {
            return Err(invalid(
                "partial_rotary_factor",
                format!("must be in (0, 1], got {factor}"),
            ));
        }
        if factor < 1.0 && self.family != LlamaFamily::Phi3 {
            return Err(invalid(
                "partial_rotary_factor",
                format!(
                    "{factor} for {}: only phi3's attention rotates part of a head",
                    self.family.model_type()
                ),
            ));
        }
        let dim = self.rotary_dim();
        if dim < 2 || !dim.is_multiple_of(2) {
            return Err(invalid(
                "partial_rotary_factor",
                format!(
                    "{factor} of head_dim {} rotates {dim} dimensions: RoPE needs an even \
                     number, at least 2",
                    self.head_dim
                ),
            ));
        }
        Ok(dim)
    }
}

/// The `rope_type`s supported, for messages.
const ROPE_TYPES: &str = "default, linear, llama3, yarn (and longrope for phi3)";

/// RoPE's θ and scaling from `rope_scaling` / `rope_parameters` / `rope_theta`, with
/// transformers' precedence (`convert_rope_params_to_dict`, `standardize_rope_params`).
pub(super) fn resolve_rope(
    raw: &RawConfig,
    max_position_embeddings: usize,
    family: LlamaFamily,
    file: &Path,
) -> Result<(f64, RopeScaling, f64)> {
    let default_theta = match family {
        LlamaFamily::SmolLm3 => 2_000_000.0,
        LlamaFamily::GptOss => 150_000.0,
        LlamaFamily::Mixtral => 1_000_000.0,
        _ => 10_000.0,
    };
    // GptOssConfig's default RoPE is YaRN; the others' is plain RoPE.
    let empty = match family {
        LlamaFamily::GptOss => gpt_oss_default_rope(),
        _ => Map::new(),
    };
    let rope = raw
        .rope_scaling
        .as_ref()
        .filter(|m| !m.is_empty())
        .or(raw.rope_parameters.as_ref())
        .unwrap_or(&empty);
    if let Some((key, _)) = rope.iter().find(|(_, v)| v.is_object()) {
        return Err(Error::Unsupported {
            what: "per-layer-type RoPE parameters",
            got: key.clone(),
            supported: "one rope_parameters for every layer (per layer type: gemma3_text, olmo3)"
                .to_string(),
        });
    }
    let theta = (raw.rope_theta, default_theta);
    resolve_rope_map(rope, theta, raw, max_position_embeddings, family, file)
}

/// GptOssConfig's default `rope_parameters`: YaRN, factor 32 over 4096 positions.
fn gpt_oss_default_rope() -> Map<String, Value> {
    let number = |x: f64| Value::from(x);
    [
        ("rope_type", Value::from("yarn")),
        ("factor", number(32.0)),
        ("beta_fast", number(32.0)),
        ("beta_slow", number(1.0)),
        ("truncate", Value::from(false)),
        ("original_max_position_embeddings", Value::from(4096)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// RoPE per layer type (Gemma 3, OLMo 3): the full-attention layers' θ (`full_theta`: the
/// top-level θ and the family's default, for a dict without one), scaling (Gemma 3 4B+:
/// `linear`, factor 8; OLMo 3: YaRN) and partial factor, and the sliding layers' θ
/// (`sliding_theta` likewise: Gemma 3's `rope_local_base_freq`, default 10 000; OLMo 3's
/// top-level θ), which are unscaled.
fn layer_type_rope(
    raw: &RawConfig,
    (full_theta, sliding_theta): ((Option<f64>, f64), (Option<f64>, f64)),
    (family, max): (LlamaFamily, usize),
    file: &Path,
) -> Result<(f64, RopeScaling, f64, Option<f64>)> {
    let empty = Map::new();
    let given = (raw.rope_parameters.as_ref(), raw.rope_scaling.as_ref());
    let (full, sliding) = layer_types::rope_maps(family.model_type(), given, &empty, file)?;
    let (theta, scaling, partial) = resolve_rope_map(full, full_theta, raw, max, family, file)?;
    let (local, local_scaling, _) =
        resolve_rope_map(sliding, sliding_theta, raw, max, family, file)?;
    if local_scaling != RopeScaling::None {
        return Err(Error::Unsupported {
            what: "RoPE scaling on sliding_attention layers",
            got: format!("{local_scaling:?} for {}", family.model_type()),
            supported: "default RoPE there (scaling on full_attention layers only)".to_string(),
        });
    }
    Ok((theta, scaling, partial, Some(local)))
}

/// RoPE's θ, scaling and `partial_rotary_factor` from one RoPE dict `rope` (flat), with
/// `(top-level θ, default θ)` for a dict without `rope_theta`; the top-level
/// `partial_rotary_factor` and `original_max_position_embeddings` come from `raw`.
fn resolve_rope_map(
    rope: &Map<String, Value>,
    (top_theta, default_theta): (Option<f64>, f64),
    raw: &RawConfig,
    max_position_embeddings: usize,
    family: LlamaFamily,
    file: &Path,
) -> Result<(f64, RopeScaling, f64)> {
    let phi3 = family == LlamaFamily::Phi3;
    // The top-level `original_max_position_embeddings`: Phi3Config has one, 4096 when the
    // file has none.
    let top_original = raw
        .original_max_position_embeddings
        .or(phi3.then_some(4096));
    let keys = RopeKeys::new(rope, file, max_position_embeddings);
    let number = |key| keys.number(key);
    let theta = number("rope_theta")?.or(top_theta).unwrap_or(default_theta);
    let partial = number("partial_rotary_factor")?
        .or(raw.partial_rotary_factor)
        .unwrap_or(1.0);
    if partial != 1.0 && !phi3 {
        return Err(Error::Unsupported {
            what: "partial_rotary_factor",
            got: format!("{partial} for {}", family.model_type()),
            supported: "1.0 (RoPE over the whole head; below 1 only for phi3)".to_string(),
        });
    }
    let rope_type = match rope.get("rope_type").or_else(|| rope.get("type")) {
        None | Some(Value::Null) => "default",
        // Phi-3 reads its older names for LongRoPE so (`convert_rope_params_to_dict`).
        Some(Value::String(s)) if phi3 && (s == "su" || s == "yarn") => "longrope",
        Some(Value::String(s)) => s.as_str(),
        Some(v) => return Err(keys.invalid("rope_type", format!("expected a string, got {v}"))),
    };
    let need = |key: &'static str| -> Result<f64> {
        number(key)?
            .ok_or_else(|| keys.invalid(key, format!("missing for rope_type `{rope_type}`")))
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => {
            let original = keys.original_max(top_original)?;
            RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: original,
            }
        }
        // LongRoPE as Phi-3 runs it (generation re-runs its sequence at the switch):
        // only for phi3, the family whose configs use it.
        "longrope" | "yarn" if rope_type == "yarn" || phi3 => {
            let original = keys.original_max(top_original)?;
            if rope_type == "yarn" {
                RopeScaling::Yarn(YarnScaling::resolve(&keys, original)?)
            } else {
                RopeScaling::LongRope(LongRopeScaling::resolve(&keys, original)?)
            }
        }
        other => {
            return Err(Error::Unsupported {
                what: "rope_type",
                got: other.to_string(),
                supported: ROPE_TYPES.to_string(),
            })
        }
    };
    Ok((theta, scaling, partial))
}

/// Each layer's [`LayerAttention`] from its `layer_types` name, sliding layers taking
/// `window`; `no_window` says why a sliding layer may have none.
fn layer_kinds(
    names: &[String],
    window: Option<usize>,
    no_window: &str,
    file: &Path,
) -> Result<Vec<LayerAttention>> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| match (name.as_str(), window) {
            ("full_attention", _) => Ok(LayerAttention::Full),
            ("sliding_attention", Some(window)) => Ok(LayerAttention::Sliding { window }),
            ("sliding_attention", None) => Err(Error::file_config(
                file,
                "layer_types",
                format!("layer {i} is `sliding_attention` but there is no window ({no_window})"),
            )),
            (other, _) => Err(Error::Unsupported {
                what: "layer_types entry",
                got: other.to_string(),
                supported: "full_attention, sliding_attention".to_string(),
            }),
        })
        .collect()
}

/// SmolLM3's per-layer RoPE switch, as its config's `__post_init__` makes it: the
/// `no_rope_layers` list (1: the layer rotates, 0: NoPE), or without one every
/// `no_rope_layer_interval`-th layer (default 4) NoPE.
fn smollm3_rope_layers(raw: &RawConfig, layers: usize, file: &Path) -> Result<Vec<bool>> {
    let invalid = |field: &'static str, reason: String| Error::file_config(file, field, reason);
    match &raw.no_rope_layers {
        Some(flags) => {
            if flags.len() != layers {
                return Err(invalid(
                    "no_rope_layers",
                    format!("{} entries for {layers} layers", flags.len()),
                ));
            }
            flags
                .iter()
                .map(|&f| match f {
                    0 | 1 => Ok(f == 1),
                    other => Err(invalid(
                        "no_rope_layers",
                        format!("entries are 0 (NoPE) or 1 (RoPE), got {other}"),
                    )),
                })
                .collect()
        }
        None => {
            let interval = raw.no_rope_layer_interval.unwrap_or(4);
            if interval == 0 {
                return Err(invalid(
                    "no_rope_layer_interval",
                    "must be at least 1, got 0".to_string(),
                ));
            }
            Ok((0..layers)
                .map(|i| !(i + 1).is_multiple_of(interval))
                .collect())
        }
    }
}
