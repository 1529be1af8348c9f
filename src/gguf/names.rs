//! Tensor names between Hugging Face checkpoints and llama.cpp's GGUF files for the Llama
//! family, both ways, from one table.
//!
//! The names are those of llama.cpp's `gguf-py/gguf/constants.py` (`TENSOR_NAMES`) and the
//! Hugging Face sources `gguf-py/gguf/tensor_mapping.py` maps to them for `llama`, `qwen2`
//! and `qwen3`; the GGUF architecture names are `MODEL_ARCH_NAMES` there, the classes that
//! pick them `conversion/llama.py` (`LlamaForCausalLM`, `MistralForCausalLM`: `llama`) and
//! `conversion/qwen.py` (`Qwen2ForCausalLM`: `qwen2`, `Qwen3ForCausalLM`: `qwen3`).

use crate::error::{Error, Result};
use crate::models::llama::LlamaFamily;

/// A llama.cpp model architecture lorakit maps names for (`general.architecture`).
///
/// ```
/// use lorakit::gguf::GgufArch;
/// use lorakit::models::llama::LlamaFamily;
/// assert_eq!(GgufArch::from_family(LlamaFamily::Mistral)?, GgufArch::Llama); // as llama.cpp converts it
/// assert_eq!(GgufArch::Qwen3.name(), "qwen3");
/// assert!(GgufArch::Llama.permutes_qk() && !GgufArch::Qwen2.permutes_qk());
/// assert!(GgufArch::from_name("gpt2").is_err());
/// # Ok::<(), lorakit::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgufArch {
    /// `llama`: Llama and Mistral checkpoints.
    Llama,
    /// `qwen2`.
    Qwen2,
    /// `qwen3`.
    Qwen3,
}

/// The architectures [`GgufArch::from_name`] accepts, for error messages.
pub const SUPPORTED_ARCHS: &str = "llama, qwen2, qwen3";

impl GgufArch {
    /// The name llama.cpp writes in `general.architecture` and before its hyperparameter
    /// keys (`llama.block_count`).
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2 => "qwen2",
            GgufArch::Qwen3 => "qwen3",
        }
    }

    /// The architecture of a `general.architecture` value.
    pub fn from_name(name: &str) -> Result<Self> {
        [Self::Llama, Self::Qwen2, Self::Qwen3]
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| Error::Unsupported {
                what: "GGUF architecture",
                got: name.to_string(),
                supported: SUPPORTED_ARCHS.to_string(),
            })
    }

    /// The architecture llama.cpp's converter gives a checkpoint of this family. Granite,
    /// SmolLM3, Phi-3, the Gemma families and OLMo 2 and 3 (llama.cpp's `granite`, `smollm3`,
    /// `phi3`, `gemma`, `gemma2`, `gemma3`, `olmo2` and `olmo3`, whose extra keys, norms and fused
    /// tensors lorakit does not map) are errors naming them.
    ///
    /// ```
    /// use lorakit::gguf::GgufArch;
    /// use lorakit::models::llama::LlamaFamily;
    /// assert_eq!(GgufArch::from_family(LlamaFamily::Qwen2)?, GgufArch::Qwen2);
    /// let err = GgufArch::from_family(LlamaFamily::Granite).unwrap_err().to_string();
    /// assert!(err.contains("granite"), "{err}");
    /// # Ok::<(), lorakit::Error>(())
    /// ```
    pub fn from_family(family: LlamaFamily) -> Result<Self> {
        match family {
            LlamaFamily::Llama | LlamaFamily::Mistral => Ok(GgufArch::Llama),
            LlamaFamily::Qwen2 => Ok(GgufArch::Qwen2),
            LlamaFamily::Qwen3 => Ok(GgufArch::Qwen3),
            LlamaFamily::Granite
            | LlamaFamily::SmolLm3
            | LlamaFamily::Phi3
            | LlamaFamily::Gemma
            | LlamaFamily::Gemma2
            | LlamaFamily::Gemma3
            | LlamaFamily::Olmo2
            | LlamaFamily::Olmo3
            | LlamaFamily::Mixtral
            | LlamaFamily::Qwen2Moe
            | LlamaFamily::Qwen3Moe
            | LlamaFamily::Olmoe
            | LlamaFamily::GptOss => Err(Error::Unsupported {
                what: "GGUF architecture for model_type",
                got: family.model_type().to_string(),
                supported: "llama, mistral, qwen2, qwen3".to_string(),
            }),
        }
    }

    /// Whether llama.cpp's converter permutes the rows of `q_proj` / `k_proj` for this
    /// architecture (`LlamaModel.undo_permute`, see [`super::permute`]).
    pub fn permutes_qk(self) -> bool {
        self == GgufArch::Llama
    }
}

/// Modules outside the decoder layers: (Hugging Face module path, GGUF name).
const GLOBAL: [(&str, &str); 3] = [
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
];

/// Modules of decoder layer N: (Hugging Face path after `model.layers.N.`, GGUF name after
/// `blk.N.`).
const LAYER: [(&str, &str); 11] = [
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

const HF_LAYERS: &str = "model.layers.";
const GGUF_LAYERS: &str = "blk.";

/// Maps a module path through [`GLOBAL`] and [`LAYER`]: Hugging Face → GGUF when
/// `forward`, GGUF → Hugging Face otherwise.
fn map_module(module: &str, forward: bool) -> Option<String> {
    let pick = |&(hf, gg): &(&'static str, &'static str)| if forward { (hf, gg) } else { (gg, hf) };
    let (from_layers, to_layers) = if forward {
        (HF_LAYERS, GGUF_LAYERS)
    } else {
        (GGUF_LAYERS, HF_LAYERS)
    };
    if let Some((_, to)) = GLOBAL.iter().map(pick).find(|(from, _)| *from == module) {
        return Some(to.to_string());
    }
    let rest = module.strip_prefix(from_layers)?;
    let (layer, inner) = rest.split_once('.')?;
    // A plain decimal layer index, as both formats write it.
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (_, to) = LAYER.iter().map(pick).find(|(from, _)| *from == inner)?;
    Some(format!("{to_layers}{layer}.{to}"))
}

/// Splits `name` into a module path and its parameter (`weight` or `bias`).
fn split_param(name: &str) -> Option<(&str, &str)> {
    ["weight", "bias"]
        .into_iter()
        .find_map(|p| Some((name.strip_suffix(p)?.strip_suffix('.')?, p)))
}

/// The GGUF module name of a Hugging Face module path (`model.layers.3.mlp.up_proj` →
/// `blk.3.ffn_up`), `None` for a module llama.cpp's Llama-family graphs do not have.
///
/// ```
/// use lorakit::gguf::names::{gguf_module, hf_module};
/// assert_eq!(gguf_module("model.layers.3.self_attn.o_proj").as_deref(), Some("blk.3.attn_output"));
/// assert_eq!(gguf_module("lm_head").as_deref(), Some("output"));
/// assert_eq!(gguf_module("model.layers.3.mlp.fc1"), None);
/// assert_eq!(hf_module("blk.0.ffn_gate").as_deref(), Some("model.layers.0.mlp.gate_proj"));
/// ```
pub fn gguf_module(hf_module: &str) -> Option<String> {
    map_module(hf_module, true)
}

/// The Hugging Face module path of a GGUF module name (the inverse of [`gguf_module`]).
pub fn hf_module(gguf_module: &str) -> Option<String> {
    map_module(gguf_module, false)
}

/// The GGUF name of a Hugging Face tensor (`model.layers.0.self_attn.q_proj.weight` →
/// `blk.0.attn_q.weight`; `.weight` and `.bias` only).
///
/// ```
/// use lorakit::gguf::names::{gguf_tensor, hf_tensor};
/// assert_eq!(gguf_tensor("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
/// assert_eq!(hf_tensor("blk.1.attn_k.bias").as_deref(), Some("model.layers.1.self_attn.k_proj.bias"));
/// assert_eq!(hf_tensor("rope_freqs.weight"), None);
/// ```
pub fn gguf_tensor(hf_name: &str) -> Option<String> {
    let (module, param) = split_param(hf_name)?;
    Some(format!("{}.{param}", gguf_module(module)?))
}

/// The Hugging Face name of a GGUF tensor (the inverse of [`gguf_tensor`]).
pub fn hf_tensor(gguf_name: &str) -> Option<String> {
    let (module, param) = split_param(gguf_name)?;
    Some(format!("{}.{param}", hf_module(module)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips() {
        for (hf, gg) in GLOBAL {
            assert_eq!(gguf_module(hf).as_deref(), Some(gg));
            assert_eq!(hf_module(gg).as_deref(), Some(hf));
        }
        for (hf, gg) in LAYER {
            let h = format!("model.layers.12.{hf}.weight");
            let g = format!("blk.12.{gg}.weight");
            assert_eq!(gguf_tensor(&h).as_deref(), Some(g.as_str()));
            assert_eq!(hf_tensor(&g).as_deref(), Some(h.as_str()));
        }
    }

    #[test]
    fn unknown_names_are_none() {
        for name in [
            "model.layers.x.mlp.up_proj",
            "model.layers..mlp.up_proj",
            "model.layers.0.mlp",
            "layers.0.mlp.up_proj",
            "blk.0.attn_q.lora_a",
        ] {
            assert_eq!(gguf_module(name), None, "{name}");
            assert_eq!(hf_module(name), None, "{name}");
        }
        assert_eq!(gguf_tensor("lm_head.lora_A"), None);
    }
}
