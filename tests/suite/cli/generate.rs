//! `lorakit generate`: greedy tokens and text equal transformers' `generate` with PEFT
//! adapters, unmerged and `--merge`d (`tests/fixtures/generate/expected.json`);
//! `--logits-out` writes the prompt's logits as transformers computes them (the models'
//! own logits fixtures, ≤ 1e-4 relative); sampling flags; bad input is one line `error: …`
//! and a non-zero exit, with no file left behind. Repeated `--prompt-ids` give
//! transformers' batched generate with left padding (`tests/fixtures/generate/batch.json`).

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{DType, IndexOp, Tensor};

use super::{assert_success, fails, lorakit, run, Arg};
use crate::generate::{expected, ids};
use crate::peft_common::{fixture, listing, load, rel_err, temp_dir};

fn stdout(out: &Output) -> String {
    assert_success(out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn joined(ids: &[u32]) -> String {
    let parts: Vec<String> = ids.iter().map(u32::to_string).collect();
    parts.join(",")
}

fn llama(case: &str) -> PathBuf {
    fixture("models/llama").join(case)
}

fn gpt2(case: &str) -> PathBuf {
    fixture("peft_options").join(case)
}

/// `generate --model MODEL --prompt-ids IDS` then `extra`.
fn generate_ids(model: &Path, prompt: &[u32], extra: &[Arg]) -> Output {
    let ids = joined(prompt);
    let mut args: Vec<Arg> = vec![&"generate", &"--model", &model, &"--prompt-ids", &ids];
    args.extend_from_slice(extra);
    lorakit(&args)
}

#[test]
fn generated_ids_equal_transformers_unmerged_and_merged() {
    let all = expected();
    let cases = all["cases"].as_array().unwrap();
    // mistral (first prompt), qwen3 (second), gpt2_lora (first), gpt2_dora (second).
    for i in [0usize, 5, 10, 13] {
        let case = &cases[i];
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(case["dir"].as_str().unwrap());
        let (base, adapter) = (
            dir.join(case["base"].as_str().unwrap()),
            dir.join(case["adapter"].as_str().unwrap()),
        );
        let prompt = ids(&case["prompt"]);
        let what = format!("{} {prompt:?}", case["model"]);
        let fixed: [Arg; 3] = [&"--max-new-tokens", &"12", &"--ignore-eos"];
        let out = stdout(&generate_ids(&base, &prompt, &fixed));
        assert_eq!(
            out,
            format!("{}\n", joined(&ids(&case["base_tokens"]))),
            "{what}"
        );
        let with: Vec<Arg> = [&fixed[..], &[&"--adapter", &adapter]].concat();
        let out = stdout(&generate_ids(&base, &prompt, &with));
        assert_eq!(
            out,
            format!("{}\n", joined(&ids(&case["lora_tokens"]))),
            "{what}"
        );
        let merged: Vec<Arg> = [&with[..], &[&"--merge"]].concat();
        let out = stdout(&generate_ids(&base, &prompt, &merged));
        assert_eq!(
            out,
            format!("{}\n", joined(&ids(&case["merged_tokens"]))),
            "{what}"
        );
        // The model's own stop token (2 for Llama, 50256 for GPT-2) does not come within
        // these 12 tokens: the same output without --ignore-eos.
        let default_eos: Vec<Arg> = vec![&"--max-new-tokens", &"12", &"--adapter", &adapter];
        let out = stdout(&generate_ids(&base, &prompt, &default_eos));
        assert_eq!(
            out,
            format!("{}\n", joined(&ids(&case["lora_tokens"]))),
            "{what}"
        );
    }
}

#[test]
fn several_named_adapters_generate_with_the_active_one() {
    // qwen2 with its LoRA and its DoRA loaded side by side: --active picks whose
    // transformers tokens come out (the longer prompt's cases).
    let all = expected();
    let find = |adapter: &str| crate::generate::long_prompt_case(&all, "qwen2", adapter);
    let dir = llama("qwen2");
    let base = dir.join("base");
    let lora = format!("lora={}", dir.join("lora").display());
    let dora = format!("dora={}", dir.join("dora").display());
    for (active, merge) in [("dora", false), ("lora", false), ("dora", true)] {
        let case = find(active);
        let mut extra: Vec<Arg> = vec![
            &"--max-new-tokens",
            &"12",
            &"--ignore-eos",
            &"--adapter",
            &lora,
            &"--adapter",
            &dora,
            &"--active",
            &active,
        ];
        if merge {
            extra.push(&"--merge");
        }
        let out = stdout(&generate_ids(&base, &ids(&case["prompt"]), &extra));
        assert_eq!(
            out,
            format!("{}\n", joined(&ids(&case["lora_tokens"]))),
            "{active}"
        );
    }
    let bad: Vec<Arg> = vec![&"--adapter", &lora, &"--active", &"nope"];
    let out = generate_ids(&base, &[1, 2], &bad);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("`nope`"), "{err}");
}

/// qwen2's base model with the tokenizer fixture beside it (as the script builds it).
fn qwen2_with_tokenizer(tmp: &Path) -> PathBuf {
    let folder = tmp.join("model");
    std::fs::create_dir_all(&folder).unwrap();
    let base = llama("qwen2").join("base");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(base.join(f), folder.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tokenizer").join(f), folder.join(f)).unwrap();
    }
    folder
}

#[test]
fn a_text_prompt_gives_transformers_text() {
    let text = &expected()["text"];
    let dir = temp_dir("cli-generate-text");
    let folder = qwen2_with_tokenizer(&dir);
    let adapter = llama("qwen2").join("lora");
    let prompt = text["prompt_text"].as_str().unwrap();
    let out = lorakit(&[
        &"generate",
        &"--model",
        &folder,
        &"--adapter",
        &adapter,
        &"--prompt",
        &prompt,
        &"--max-new-tokens",
        &"12",
    ]);
    assert_eq!(
        stdout(&out),
        format!("{}\n", text["text"].as_str().unwrap())
    );
    // The same through ids: the tokenizer's encoding is transformers'.
    let ids_out = generate_ids(
        &folder,
        &ids(&text["prompt"]),
        &[&"--adapter", &adapter, &"--max-new-tokens", &"12"],
    );
    assert_eq!(
        stdout(&ids_out),
        format!("{}\n", joined(&ids(&text["tokens"])))
    );
}

/// Runs with `--logits-out` into a fresh folder; the `logits` tensor, after checking the
/// folder holds that file alone.
fn logits_of(model: &Path, prompt: &[u32], extra: &[Arg], name: &str) -> Tensor {
    let tmp = temp_dir(&format!("cli-logits-{name}"));
    let file = tmp.join("logits.safetensors");
    let mut args: Vec<Arg> = vec![&"--max-new-tokens", &"1", &"--logits-out", &file];
    args.extend_from_slice(extra);
    assert_success(&generate_ids(model, prompt, &args));
    assert_eq!(listing(&tmp), ["logits.safetensors"]);
    let mut tensors = load(&file);
    assert_eq!(tensors.len(), 1);
    let logits = tensors.remove("logits").unwrap();
    assert_eq!(
        (logits.dims(), logits.dtype()),
        (&[prompt.len(), 64][..], DType::F32)
    );
    logits
}

fn row_ids(t: &Tensor) -> Vec<u32> {
    t.i(0)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
}

#[test]
fn logits_out_writes_the_prompts_logits_as_transformers() {
    let mut worst: f64 = 0.0;
    let mut check = |got: Tensor, want: Tensor, what: &str| {
        let e = rel_err(&got, &want);
        assert!(e <= 1e-4, "{what}: relative error {e:.3e}");
        worst = worst.max(e);
    };
    let io = load(&llama("qwen2").join("logits.safetensors"));
    let prompt = row_ids(&io["input_ids"]);
    let (base, lora) = (llama("qwen2").join("base"), llama("qwen2").join("lora"));
    check(
        logits_of(&base, &prompt, &[], "qwen2"),
        io["logits"].i(0).unwrap(),
        "qwen2",
    );
    let adapter: [Arg; 2] = [&"--adapter", &lora];
    check(
        logits_of(&base, &prompt, &adapter, "qwen2-lora"),
        io["lora_logits"].i(0).unwrap(),
        "qwen2 LoRA",
    );
    let merged: [Arg; 3] = [&"--adapter", &lora, &"--merge"];
    check(
        logits_of(&base, &prompt, &merged, "qwen2-merged"),
        io["lora_logits"].i(0).unwrap(),
        "qwen2 LoRA merged",
    );

    let io = load(&gpt2("gpt2_lora").join("io.safetensors"));
    let prompt = row_ids(&io["input_ids"]);
    let (base, adapter) = (
        gpt2("gpt2_lora").join("base"),
        gpt2("gpt2_lora").join("adapter"),
    );
    let unmerged: [Arg; 2] = [&"--adapter", &adapter];
    check(
        logits_of(&base, &prompt, &unmerged, "gpt2"),
        io["logits"].i(0).unwrap(),
        "gpt2_lora",
    );
    let merged: [Arg; 3] = [&"--adapter", &adapter, &"--merge"];
    check(
        logits_of(&base, &prompt, &merged, "gpt2-merged"),
        io["merged_logits"].i(0).unwrap(),
        "gpt2_lora merged",
    );
    println!("--logits-out vs transformers: worst relative error {worst:.2e}");
}

#[test]
fn sampling_flags_reproduce_per_seed_and_top_k_1_is_greedy() {
    let base = llama("mistral").join("base");
    let prompt = [1u32, 17, 42, 5];
    let greedy = stdout(&generate_ids(&base, &prompt, &[&"--max-new-tokens", &"12"]));
    let hot = |seed: &str, extra: &[Arg]| {
        let mut args: Vec<Arg> = vec![&"--max-new-tokens", &"12", &"--temperature", &"3"];
        args.extend_from_slice(&[&"--seed", &seed]);
        args.extend_from_slice(extra);
        stdout(&generate_ids(&base, &prompt, &args))
    };
    assert_eq!(hot("4", &[]), hot("4", &[]));
    assert_ne!(hot("4", &[]), greedy);
    assert_eq!(hot("4", &[&"--top-k", &"1"]), greedy);
    assert_eq!(hot("5", &[&"--top-p", &"0.000001"]), greedy);
    // Another dtype runs (its tokens may differ from f32's).
    let bf16 = stdout(&generate_ids(
        &base,
        &prompt,
        &[&"--dtype", &"bf16", &"--max-new-tokens", &"5"],
    ));
    assert_eq!(bf16.trim().split(',').count(), 5, "{bf16}");
}

/// One line `error: …` with each of `want`, exit status `code`.
fn error_line(out: Output, code: i32, want: &[&str]) {
    let status = out.status.code();
    let err = fails(out);
    assert_eq!(status, Some(code), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for w in want {
        assert!(lines[0].contains(w), "`{w}` missing from {err}");
    }
}

#[test]
fn bad_input_is_one_error_line_and_leaves_no_file() {
    let tmp = temp_dir("cli-generate-errors");
    let base = llama("qwen2").join("base");
    let out_file = tmp.join("logits.safetensors");
    let missing = tmp.join("no-such-model");
    error_line(
        generate_ids(&missing, &[1], &[]),
        1,
        &["no-such-model", "no such model folder"],
    );
    let bert = tmp.join("bert");
    std::fs::create_dir_all(&bert).unwrap();
    std::fs::write(bert.join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    error_line(
        generate_ids(&bert, &[1], &[]),
        1,
        &[
            "`bert`",
            "llama, mistral, qwen2, qwen3, granite, smollm3, phi3, gemma, gemma2, gemma3_text, gemma3, olmo2, olmo3, mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, gpt2",
        ],
    );
    // An id out of the vocabulary, with --logits-out: no file is written.
    error_line(
        generate_ids(&base, &[1, 99], &[&"--logits-out", &out_file]),
        1,
        &["token id 99", "vocab_size 64"],
    );
    // Too long for the model: GPT-2's n_positions is 16.
    error_line(
        generate_ids(
            &gpt2("gpt2_dora").join("base"),
            &[1; 10],
            &[&"--max-new-tokens", &"8"],
        ),
        1,
        &["n_positions 16"],
    );
    let usage = |args: &[Arg], want: &[&str]| error_line(lorakit(args), 2, want);
    let g: [Arg; 3] = [&"generate", &"--model", &base];
    usage(
        &[&g[..], &[&"--prompt-ids", &"1,x,3"]].concat(),
        &["--prompt-ids", "`x`"],
    );
    usage(
        &[&g[..], &[&"--prompt-ids", &""]].concat(),
        &["--prompt-ids is empty"],
    );
    usage(&[&g[..], &[&"--prompt-ids", &"1,-2"]].concat(), &["`-2`"]);
    let ids: [Arg; 2] = [&"--prompt-ids", &"1,2"];
    for (extra, want) in [
        (
            vec![&"--temperature" as Arg, &"-1"],
            vec!["--temperature", "-1"],
        ),
        (
            vec![&"--temperature", &"1", &"--top-p", &"1.5"],
            vec!["--top-p", "(0, 1]"],
        ),
        (
            vec![&"--temperature", &"1", &"--top-k", &"0"],
            vec!["--top-k"],
        ),
        (vec![&"--top-p", &"0.9"], vec!["--temperature above 0"]),
    ] {
        usage(&[&g[..], &ids[..], &extra[..]].concat(), &want);
    }
    // A text prompt with no tokenizer.json in the folder.
    error_line(
        lorakit(&[&"generate", &"--model", &base, &"--prompt", &"hello"]),
        1,
        &["tokenizer.json", "--prompt-ids"],
    );
    // An adapter folder that is not one.
    error_line(
        generate_ids(&base, &[1], &[&"--adapter", &base]),
        1,
        &["adapter_config.json"],
    );
    // --logits-out into a missing folder: refused before any work.
    let nowhere = tmp.join("missing/logits.safetensors");
    error_line(
        generate_ids(&base, &[1], &[&"--logits-out", &nowhere]),
        1,
        &["does not exist"],
    );
    assert_eq!(listing(&tmp), ["bert"]);
    // clap's own usage errors: no prompt, both prompts, --merge without --adapter.
    for args in [
        vec![&"generate" as Arg, &"--model", &base],
        vec![
            &"generate",
            &"--model",
            &base,
            &"--prompt",
            &"a",
            &"--prompt-ids",
            &"1",
        ],
        vec![
            &"generate",
            &"--model",
            &base,
            &"--prompt-ids",
            &"1",
            &"--merge",
        ],
    ] {
        let out = lorakit(&args);
        assert_eq!(out.status.code(), Some(2));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
}

#[test]
fn generate_help_lists_its_flags() {
    let out = run(["generate", "--help"]);
    let text = stdout(&out);
    assert!(
        text.contains("Usage: lorakit generate [OPTIONS] --model <DIR>"),
        "{text}"
    );
    for flag in [
        "--adapter <[NAME=]DIR>",
        "--active <NAME>",
        "--merge",
        "--prompt <TEXT>",
        "--prompt-ids <IDS>",
        "--max-new-tokens <N>",
        "--temperature <T>",
        "--top-p <P>",
        "--top-k <K>",
        "--seed <S>",
        "--dtype <DTYPE>",
        "--ignore-eos",
        "--logits-out <FILE>",
    ] {
        assert!(text.contains(flag), "generate --help lacks {flag}: {text}");
    }
}

#[test]
fn repeated_prompts_generate_as_one_batch_of_transformers_rows() {
    // qwen2 with its LoRA: transformers' batched greedy generate with left padding
    // (tests/fixtures/generate/batch.json).
    let path = fixture("generate/batch.json");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = &all["cases"][1];
    assert_eq!(case["model"], "qwen2");
    let dir = llama("qwen2");
    let (base, adapter) = (dir.join("base"), dir.join("lora"));
    let prompts: Vec<String> = case["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| joined(&ids(p)))
        .collect();
    let mut args: Vec<Arg> = vec![&"generate", &"--model", &base, &"--adapter", &adapter];
    for p in &prompts {
        args.extend_from_slice(&[&"--prompt-ids", p]);
    }
    args.extend_from_slice(&[&"--max-new-tokens", &"12", &"--ignore-eos"]);
    let want: String = case["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| format!("{}\n", joined(&ids(row))))
        .collect();
    assert_eq!(stdout(&lorakit(&args)), want);
    // One prompt's logits only.
    let file_dir = temp_dir("cli-generate-batch");
    let file = file_dir.join("logits.safetensors");
    args.extend_from_slice(&[&"--logits-out", &file]);
    error_line(lorakit(&args), 2, &["--logits-out", "one prompt"]);
    assert!(!file.exists());
}
