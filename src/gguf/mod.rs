//! llama.cpp's GGUF files: exporting a PEFT LoRA adapter as a llama.cpp LoRA adapter
//! ([`export`], `lorakit export-gguf`), reading a Llama-family GGUF model under Hugging Face
//! tensor names ([`model`]) and loading a model from it with its quantized blocks kept
//! ([`load`], `LlamaForCausalLM::from_gguf`), and what they share: the name mapping ([`names`]) and the
//! `q_proj` / `k_proj` row permutation of llama.cpp's converter ([`permute`]).

pub mod export;
pub mod load;
pub mod model;
pub mod names;
pub mod permute;

pub use export::{export_gguf, GgufDType, GgufExportOptions, GgufExportReport, GgufLora};
pub use load::GgufTensors;
pub use model::GgufModel;
pub use names::GgufArch;
