//! `lorakit export-gguf`: a summary on stdout and a GGUF file; refusals as one error line
//! with nothing written. The file's contents are checked in `gguf_export`.

use std::fs::File;

use candle_core::quantized::gguf_file::Content;

use super::{assert_success, lorakit, one_error_line};
use crate::peft_common::{fixture, listing, temp_dir};

#[test]
fn exports_and_summarizes() {
    let dir = temp_dir("cli-gguf");
    let out = dir.join("adapter.gguf");
    let case = fixture("models/llama/qwen2");
    let run = lorakit(&[
        &"export-gguf",
        &"--adapter",
        &case.join("lora"),
        &"--base",
        &case.join("base"),
        &"--out",
        &out,
        &"--dtype",
        &"f16",
    ]);
    assert_success(&run);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("exported 10 LoRA pair(s)"), "{stdout}");
    assert!(stdout.contains("architecture qwen2"), "{stdout}");
    // rsLoRA and the patterns are reported.
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.lines().all(|l| l.starts_with("warning: ")),
        "{stderr}"
    );
    assert!(stderr.contains("use_rslora"), "{stderr}");
    let content = Content::read(&mut File::open(&out).unwrap()).unwrap();
    assert_eq!(content.tensor_infos.len(), 20);
}

#[test]
fn a_dora_adapter_is_one_error_line_and_no_file() {
    let dir = temp_dir("cli-gguf-dora");
    let out = dir.join("adapter.gguf");
    let run = lorakit(&[
        &"export-gguf",
        &"--adapter",
        &fixture("dora/adapter"),
        &"--base",
        &fixture("models/llama/mistral/base"),
        &"--out",
        &out,
    ]);
    one_error_line(&run, &["DoRA", "llama.cpp"]);
    assert!(listing(&dir).is_empty());
}

#[test]
fn help_names_the_flags_and_the_format() {
    let run = lorakit(&[&"export-gguf", &"--help"]);
    assert_success(&run);
    let text = String::from_utf8_lossy(&run.stdout);
    for want in [
        "Usage: lorakit export-gguf [OPTIONS] --adapter <DIR> --base <MODEL> --out <FILE>",
        "--dtype <DTYPE>",
        "f32, f16, bf16",
        "convert_lora_to_gguf.py",
    ] {
        assert!(text.contains(want), "`{want}` missing: {text}");
    }
}
