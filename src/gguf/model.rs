//! A llama.cpp GGUF model file read under Hugging Face names: its tensors as candle
//! [`QTensor`]s in transformers' layout and its metadata as a [`LlamaConfig`].
//!
//! Models load from it with [`crate::models::llama::LlamaForCausalLM::from_gguf`]
//! ([`super::load`]). The metadata keys are those `convert_hf_to_gguf.py`
//! writes through gguf-py's `GGUFWriter` (`{arch}.block_count`, `{arch}.embedding_length`,
//! `{arch}.attention.head_count`, ...; `gguf-py/gguf/constants.py`, `Keys.LLM` /
//! `Keys.Attention` / `Keys.Rope`). `q_proj` / `k_proj` of the `llama` architecture are
//! un-permuted ([`super::permute`]) by moving whole rows, so quantized tensors stay exact.

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use super::names::{gguf_tensor, hf_tensor, GgufArch};
use super::permute::{gather_qtensor_rows, inverse, rope_permutation};
use crate::error::{Error, Result};
use crate::models::llama::{
    GateActivation, LayerAttention, LlamaConfig, LlamaFamily, Multipliers, NormPlacement, QkNorm,
    RopeScaling,
};

/// A GGUF model file, opened (metadata and tensor directory read; tensors on demand).
///
/// ```
/// use candle_core::Device;
/// use lorakit::gguf::GgufModel;
/// # fn main() -> lorakit::Result<()> {
/// // A tiny Mistral as llama.cpp's converter writes it (scripts/make_gguf_fixtures.py).
/// let model = GgufModel::open("tests/fixtures/gguf/model_mistral.gguf")?;
/// let config = model.config()?; // from llama.block_count, llama.embedding_length, ...
/// assert_eq!((config.num_attention_heads, config.num_key_value_heads, config.head_dim), (4, 2, 12));
/// // blk.0.attn_q.weight (Q8_0, rows permuted for llama.cpp's RoPE) in transformers' layout.
/// let q = model.qtensor("model.layers.0.self_attn.q_proj.weight", &Device::Cpu)?;
/// assert_eq!(q.shape().dims(), [config.num_attention_heads * config.head_dim, config.hidden_size]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct GgufModel {
    path: PathBuf,
    content: Content,
    arch: GgufArch,
}

/// The tensor llama.cpp stores precomputed RoPE frequency divisors in.
const ROPE_FREQS: &str = "rope_freqs.weight";

fn gguf_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::checkpoint(path, format!("GGUF: {e}"))
}

impl GgufModel {
    /// Reads the header of the GGUF file at `path`. Errors for a file that is not GGUF, an
    /// adapter (`general.type = "adapter"`) or an architecture other than `llama`, `qwen2`,
    /// `qwen3`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| gguf_error(path, e))?;
        if let Some(Value::String(t)) = content.metadata.get("general.type") {
            if t != "model" {
                return Err(gguf_error(
                    path,
                    format!("general.type is `{t}`: not a model (a LoRA adapter is applied by llama.cpp, not opened as a model)"),
                ));
            }
        }
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(a)) => GgufArch::from_name(a)?,
            _ => return Err(gguf_error(path, "no general.architecture string")),
        };
        Ok(Self {
            path: path.to_path_buf(),
            content,
            arch,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The architecture (`general.architecture`).
    pub fn arch(&self) -> GgufArch {
        self.arch
    }

    /// The file's metadata and tensor directory as candle read them (GGUF names).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// The Hugging Face names of the tensors that have one, sorted (a tensor without one,
    /// such as `rope_freqs.weight`, is left out).
    pub fn hf_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .content
            .tensor_infos
            .keys()
            .filter_map(|n| hf_tensor(n))
            .collect();
        names.sort();
        names
    }

    /// The tensor transformers calls `hf_name`, as stored (any GGUF type) but in
    /// transformers' layout: `(out, in)` for a linear weight, `q_proj` / `k_proj` rows in
    /// Hugging Face's order.
    pub fn qtensor(&self, hf_name: &str, device: &Device) -> Result<QTensor> {
        let missing = || Error::MissingKey {
            key: hf_name.to_string(),
            file: self.path.display().to_string(),
        };
        let name = gguf_tensor(hf_name).ok_or_else(missing)?;
        if !self.content.tensor_infos.contains_key(&name) {
            return Err(missing());
        }
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let t = self
            .content
            .tensor(&mut file, &name, device)
            .map_err(|e| gguf_error(&self.path, format!("{name}: {e}")))?;
        let heads = if !self.arch.permutes_qk() {
            None
        } else if hf_name.contains("self_attn.q_proj.") {
            Some(self.usize_key("attention.head_count")?)
        } else if hf_name.contains("self_attn.k_proj.") {
            Some(self.head_count_kv()?)
        } else {
            None
        };
        let Some(n_head) = heads else {
            return Ok(t);
        };
        let rows = t.shape().dims().first().copied().unwrap_or(0);
        let perm = inverse(&rope_permutation(rows, n_head, hf_name)?);
        gather_qtensor_rows(&t, &perm, hf_name, device)
    }

    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch.name())
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(&self.key(key))
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(n) => Some(u64::from(*n)),
            Value::U16(n) => Some(u64::from(*n)),
            Value::U32(n) => Some(u64::from(*n)),
            Value::U64(n) => Some(*n),
            Value::I32(n) => u64::try_from(*n).ok(),
            Value::I64(n) => u64::try_from(*n).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| gguf_error(&self.path, format!("{}: not a count: {v:?}", self.key(key))))
    }

    fn usize_key(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| gguf_error(&self.path, format!("{} is missing", self.key(key))))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(gguf_error(
                &self.path,
                format!("{}: not a float: {v:?}", self.key(key)),
            )),
        }
    }

    fn head_count_kv(&self) -> Result<usize> {
        match self.usize_opt("attention.head_count_kv")? {
            Some(n) => Ok(n),
            None => self.usize_key("attention.head_count"),
        }
    }

    fn has(&self, gguf_name: &str) -> bool {
        self.content.tensor_infos.contains_key(gguf_name)
    }

    fn refuse(&self, what: &'static str, got: impl Into<String>) -> Error {
        Error::Unsupported {
            what,
            got: got.into(),
            supported: format!(
                "plain {} GGUF models (default or linear RoPE, full attention, dense MLP)",
                self.arch.name()
            ),
        }
    }

    /// `rope_freqs.weight`: the per-frequency divisors llama.cpp's converter precomputes for
    /// llama3 RoPE scaling, `head_dim / 2` of them (an error names the tensor otherwise).
    fn rope_factors(&self, head_dim: usize) -> Result<Vec<f32>> {
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let factors = self
            .content
            .tensor(&mut file, ROPE_FREQS, &Device::Cpu)
            .and_then(|t| t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| gguf_error(&self.path, format!("{ROPE_FREQS}: {e}")))?;
        if factors.len() != head_dim / 2 {
            return Err(gguf_error(
                &self.path,
                format!(
                    "{ROPE_FREQS} holds {} values, head_dim {head_dim} needs {}",
                    factors.len(),
                    head_dim / 2
                ),
            ));
        }
        Ok(factors)
    }

    /// The model's configuration from the file's metadata (and which tensors it has:
    /// biases, `q_norm`, a separate `output`). Options lorakit's Llama cannot run are
    /// errors naming them: RoPE scaling other than linear or precomputed factors
    /// (`rope_freqs.weight`, how llama.cpp stores Llama 3.1's scaling: read as
    /// [`RopeScaling::Factors`]), a rotary dimension other than the head dimension, a
    /// sliding window, experts.
    ///
    /// A Mistral model comes back as [`LlamaFamily::Llama`] (llama.cpp converts it to the
    /// `llama` architecture and keeps no sliding window).
    pub fn config(&self) -> Result<LlamaConfig> {
        let family = match self.arch {
            GgufArch::Llama => LlamaFamily::Llama,
            GgufArch::Qwen2 => LlamaFamily::Qwen2,
            GgufArch::Qwen3 => LlamaFamily::Qwen3,
        };
        for key in ["expert_count", "attention.sliding_window"] {
            if let Some(v) = self.value(key) {
                return Err(self.refuse("GGUF metadata", format!("{} = {v:?}", self.key(key))));
            }
        }
        let hidden_size = self.usize_key("embedding_length")?;
        let num_attention_heads = self.usize_key("attention.head_count")?;
        let head_dim = match self.usize_opt("attention.key_length")? {
            Some(d) => d,
            None => hidden_size.checked_div(num_attention_heads).unwrap_or(0),
        };
        if let Some(v) = self.usize_opt("attention.value_length")? {
            if v != head_dim {
                return Err(self.refuse(
                    "GGUF metadata",
                    format!("attention.value_length {v} ≠ key_length {head_dim}"),
                ));
            }
        }
        if let Some(d) = self.usize_opt("rope.dimension_count")? {
            if d != head_dim {
                return Err(self.refuse(
                    "GGUF metadata",
                    format!(
                        "{} = {d} (partial rotary; head dim {head_dim})",
                        self.key("rope.dimension_count")
                    ),
                ));
            }
        }
        let rope_scaling = match self.value("rope.scaling.type") {
            None if self.has(ROPE_FREQS) => RopeScaling::Factors(self.rope_factors(head_dim)?),
            None => RopeScaling::None,
            Some(Value::String(t)) if t == "none" => RopeScaling::None,
            Some(v) if self.has(ROPE_FREQS) => {
                return Err(self.refuse(
                    "GGUF metadata",
                    format!(
                        "{} = {v:?} together with {ROPE_FREQS}",
                        self.key("rope.scaling.type")
                    ),
                ))
            }
            Some(Value::String(t)) if t == "linear" => RopeScaling::Linear {
                factor: self.f64_opt("rope.scaling.factor")?.ok_or_else(|| {
                    gguf_error(
                        &self.path,
                        format!("{} is missing", self.key("rope.scaling.factor")),
                    )
                })?,
            },
            Some(v) => {
                return Err(self.refuse(
                    "GGUF metadata",
                    format!("{} = {v:?}", self.key("rope.scaling.type")),
                ))
            }
        };
        let vocab_size = match self.usize_opt("vocab_size")? {
            Some(v) => v,
            None => self
                .content
                .tensor_infos
                .get("token_embd.weight")
                .and_then(|t| t.shape.dims().first().copied())
                .ok_or_else(|| gguf_error(&self.path, "no vocab_size and no token_embd.weight"))?,
        };
        let num_hidden_layers = self.usize_key("block_count")?;
        let config = LlamaConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: self.usize_key("feed_forward_length")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: self.head_count_kv()?,
            head_dim,
            rms_norm_eps: self
                .f64_opt("attention.layer_norm_rms_epsilon")?
                .ok_or_else(|| {
                    gguf_error(
                        &self.path,
                        format!(
                            "{} is missing",
                            self.key("attention.layer_norm_rms_epsilon")
                        ),
                    )
                })?,
            rope_theta: self.f64_opt("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            partial_rotary_factor: 1.0,
            sliding_rope_theta: None,
            max_position_embeddings: self.usize_key("context_length")?,
            tie_word_embeddings: !self.has("output.weight"),
            qkv_bias: self.has("blk.0.attn_q.bias"),
            o_bias: self.has("blk.0.attn_output.bias"),
            mlp_bias: self.has("blk.0.ffn_gate.bias"),
            hidden_act: GateActivation::Silu,
            unit_offset_norms: false,
            norm_placement: NormPlacement::Pre,
            qk_norm: if self.has("blk.0.attn_q_norm.weight") {
                QkNorm::PerHead
            } else {
                QkNorm::None
            },
            layer_attention: vec![LayerAttention::Full; num_hidden_layers],
            layer_rope: vec![true; num_hidden_layers],
            fused_projections: false,
            residual_dropout: 0.0,
            attention_dropout: 0.0,
            multipliers: Multipliers::default(),
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            multimodal: false,
            moe: None,
            clip_qkv: None,
            attention_sinks: false,
        };
        config.validate()?;
        Ok(config)
    }
}
