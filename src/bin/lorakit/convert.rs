//! `lorakit convert`: a model folder saved as PyTorch pickles rewritten as safetensors.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use lorakit::checkpoint::from_pickle::convert_pickle_checkpoint;

use super::{emit, fail};

pub const ABOUT: &str = "\
Rewrite a model folder saved as PyTorch pickles (pytorch_model.bin, or shards listed in
pytorch_model.bin.index.json) as safetensors (model.safetensors, or model-0000i-of-0000n
shards with model.safetensors.index.json), so that merge, inspect and generate can read it.

The pickles are read with candle's unpickler, which runs no code (Python's torch.load can
run code from such a file), one tensor at a time, each tensor's size checked against its
file first. Names, dtypes, shapes and values are kept; config.json, tokenizer files and the
folder's other non-weight files are copied. The folder is built under a temporary name
beside --out and renamed into place: an error leaves nothing behind.";

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The model folder holding pytorch_model.bin or pytorch_model.bin.index.json and shards
    #[arg(value_name = "MODEL_DIR")]
    model: PathBuf,
    /// The folder to write (new, or empty)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// No summary on stdout; errors still go to stderr
    #[arg(short, long)]
    quiet: bool,
}

pub fn convert(args: ConvertArgs) -> ExitCode {
    let report = match convert_pickle_checkpoint(&args.model, &args.out) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if args.quiet {
        return ExitCode::SUCCESS;
    }
    let copied = if report.copied.is_empty() {
        String::new()
    } else {
        format!("; copied {}", report.copied.join(", "))
    };
    emit(&format!(
        "wrote {} tensor(s), {:.1} MB, in {} safetensors file(s) to {}{copied}\n",
        report.tensors,
        report.bytes as f64 / 1e6,
        report.shards,
        args.out.display()
    ))
}
