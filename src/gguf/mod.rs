//! llama.cpp's GGUF files: exporting a PEFT LoRA adapter as a llama.cpp LoRA adapter
//! ([`export`], `lorakit export-gguf`), reading a Llama-family GGUF model under Hugging Face
//! tensor names ([`model`]), and what both share: the name mapping ([`names`]) and the
//! `q_proj` / `k_proj` row permutation of llama.cpp's converter ([`permute`]).

pub mod export;
pub mod model;
pub mod names;
pub mod permute;

pub use export::{export_gguf, GgufDType, GgufExportOptions, GgufExportReport, GgufLora};
pub use model::GgufModel;
pub use names::GgufArch;
