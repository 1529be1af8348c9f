//! `lorakit export-gguf`: a PEFT LoRA adapter as a llama.cpp LoRA adapter in GGUF.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use lorakit::gguf::{export_gguf, GgufDType, GgufExportOptions};

use super::{emit, fail, warn};

pub const ABOUT: &str = "\
Export a PEFT LoRA adapter as a llama.cpp LoRA adapter (GGUF), for
`llama-cli -m model.gguf --lora adapter.gguf`, as llama.cpp's convert_lora_to_gguf.py does.

--base is the adapter's base model (its folder or config.json; weights are not read): its
architecture (llama, mistral, qwen2, qwen3) picks llama.cpp's tensor names and, for
Llama and Mistral, the head counts the q_proj/k_proj rows are permuted with.

Only plain LoRA exports (LoRA+, LoRA-FA, LoRA-drop and Delta-LoRA save plain LoRA):
DoRA, VeRA, AdaLoRA, lora_bias, modules_to_save and modules llama.cpp has no tensor for
are refused. llama.cpp scales every pair by one alpha over its rank: rsLoRA and
rank/alpha patterns are written exactly by choosing that alpha and folding the remaining
ratios into lora_b (each reported as a warning). The file is built under a temporary name
beside --out and renamed into place: an error leaves nothing behind.";

#[derive(Args, Debug)]
pub struct ExportGgufArgs {
    /// The PEFT adapter folder (adapter_config.json and adapter_model.safetensors)
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// The base model's folder or its config.json (architecture and head counts)
    #[arg(long, value_name = "MODEL")]
    base: PathBuf,
    /// The GGUF file to write
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The dtype of the written lora_a / lora_b tensors
    #[arg(long, value_enum, value_name = "DTYPE", default_value_t = GgufDTypeArg::F32)]
    dtype: GgufDTypeArg,
    /// No summary on stdout; warnings and errors still go to stderr
    #[arg(short, long)]
    quiet: bool,
}

/// `--dtype`'s values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum GgufDTypeArg {
    #[value(alias = "float32")]
    F32,
    #[value(alias = "float16")]
    F16,
    #[value(alias = "bfloat16")]
    Bf16,
}

pub fn export(args: ExportGgufArgs) -> ExitCode {
    let dtype = match args.dtype {
        GgufDTypeArg::F32 => GgufDType::F32,
        GgufDTypeArg::F16 => GgufDType::F16,
        GgufDTypeArg::Bf16 => GgufDType::BF16,
    };
    let options = GgufExportOptions { dtype };
    let report = match export_gguf(&args.adapter, &args.base, &args.out, &options) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    for note in &report.notes {
        warn(note);
    }
    if args.quiet {
        return ExitCode::SUCCESS;
    }
    emit(&format!(
        "exported {} LoRA pair(s) to {} (architecture {}, adapter.lora.alpha {})\n",
        report.pairs,
        args.out.display(),
        report.arch.name(),
        report.alpha
    ))
}
