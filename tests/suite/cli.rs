//! The `lorakit` binary on the PEFT fixtures: merge output equals PEFT's merge_and_unload(),
//! inspect's summary, and errors a user can act on (non-zero exit, no panic).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use crate::peft_common::{assert_close, fixture, load, temp_dir};
use candle_core::{DType, Device, Tensor};

fn lorakit(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorakit"));
    for a in args {
        cmd.arg(a);
    }
    cmd.output().expect("run lorakit")
}

/// Runs a command that must fail; returns its stderr.
fn fails(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = lorakit(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

fn merge(base: &Path, adapter: &Path, out: &Path) -> Output {
    lorakit(&[
        &"merge",
        &"--base",
        &base,
        &"--adapter",
        &adapter,
        &"--out",
        &out,
    ])
}

#[test]
fn merge_matches_peft_merge_and_unload() {
    for case in [
        "lora_mlp",
        "rslora_patterns",
        "llama_names",
        "dora",
        "vera",
        "adalora",
    ] {
        let dir = fixture(case);
        let out = temp_dir(&format!("cli-{case}")).join("merged.safetensors");
        let res = merge(&dir.join("base.safetensors"), &dir.join("adapter"), &out);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let (got, want) = (load(&out), load(&dir.join("merged.safetensors")));
        assert_eq!(got.len(), want.len(), "{case}");
        for (k, t) in &want {
            assert_close(&got[k], t, 1e-5, &format!("{case}: {k}"));
        }
    }
}

/// `"all-linear"` in a config: with only the base's tensors to go on, the merge adapts the
/// 2-D weights the adapter file has tensors for (and leaves other linears alone).
#[test]
fn merge_all_linear_config() {
    let tmp = temp_dir("cli-all-linear");
    let src = fixture("llama_names");
    let adapter = tmp.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::copy(
        src.join("adapter/adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(src.join("adapter/adapter_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["target_modules"] = "all-linear".into();
    config["exclude_modules"] = serde_json::Value::Null;
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    let out = tmp.join("merged.safetensors");
    let res = merge(&src.join("base.safetensors"), &adapter, &out);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let (got, want) = (load(&out), load(&src.join("merged.safetensors")));
    for (k, t) in &want {
        assert_close(&got[k], t, 1e-5, k);
    }
}

#[test]
fn inspect_summarizes() {
    let out = lorakit(&[&"inspect", &fixture("rslora_patterns").join("adapter")]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("type: LORA (rsLoRA)"), "{text}");
    assert!(text.contains("dtype: f32"), "{text}");
    // rank_pattern {"fc1": 2, "blocks.1.fc2": 3}, alpha 6 (10 for 0.fc2), scale alpha/√r.
    for (path, r, alpha) in [
        ("blocks.0.fc1", 2, 6.0),
        ("blocks.0.fc2", 4, 10.0),
        ("blocks.1.fc2", 3, 6.0),
    ] {
        let line = format!("{path}  rank {r}  scale {}", alpha / f64::sqrt(r as f64));
        assert!(text.contains(&line), "missing `{line}` in\n{text}");
    }
    // A and B of each module: (2·6 + 12·2) + (4·12 + 6·4) + (3·12 + 6·3).
    assert!(text.contains("trainable parameters: 162"), "{text}");
}

#[test]
fn inspect_adalora_keeps_init_r_in_the_scale() {
    let out = lorakit(&[&"inspect", &fixture("adalora").join("adapter")]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("type: ADALORA"), "{text}");
    // Kept ranks from the file's rank_pattern; lora_alpha 4, init_r 6.
    let scale = 4.0 / (6.0 + 1e-5);
    for (path, r) in [("lin0", 2), ("lin1", 3), ("lin2", 1)] {
        let line = format!("{path}  rank {r}  scale {scale}");
        assert!(text.contains(&line), "missing `{line}` in\n{text}");
    }
}

#[test]
fn refuses_to_overwrite_inputs() {
    let tmp = temp_dir("cli-overwrite");
    let base = tmp.join("base.safetensors");
    std::fs::copy(fixture("lora_mlp").join("base.safetensors"), &base).unwrap();
    let before = std::fs::read(&base).unwrap();
    let adapter = fixture("lora_mlp").join("adapter");
    let err = fails(&[
        &"merge",
        &"--base",
        &base,
        &"--adapter",
        &adapter,
        &"--out",
        &base,
    ]);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(&base).unwrap(), before);
    let weights = adapter.join("adapter_model.safetensors");
    let err = fails(&[
        &"merge",
        &"--base",
        &base,
        &"--adapter",
        &adapter,
        &"--out",
        &weights,
    ]);
    assert!(err.contains("refusing to overwrite"), "{err}");
}

#[test]
fn missing_files_and_bad_arguments() {
    let tmp = temp_dir("cli-missing");
    let adapter = fixture("lora_mlp").join("adapter");
    let missing = tmp.join("nope.safetensors");
    let err = fails(&[
        &"merge",
        &"--base",
        &missing,
        &"--adapter",
        &adapter,
        &"--out",
        &tmp.join("o"),
    ]);
    assert!(err.contains("nope.safetensors"), "{err}");
    let err = fails(&[&"inspect", &tmp]);
    assert!(err.contains("adapter_config.json"), "{err}");
    let err = fails(&[&"merge", &"--base", &missing]);
    assert!(err.contains("missing --adapter"), "{err}");
    assert!(err.contains("usage"), "{err}");
    let err = fails(&[&"frobnicate"]);
    assert!(err.contains("unknown command"), "{err}");
    assert!(!tmp.join("o").exists());
}

#[test]
fn bad_json_reports_its_position() {
    let tmp = temp_dir("cli-json");
    std::fs::write(
        tmp.join("adapter_config.json"),
        "{\n  \"peft_type\": \"LORA\",\n  \"r\": 4,,\n}",
    )
    .unwrap();
    let err = fails(&[&"inspect", &tmp]);
    assert!(err.contains("line 3, column 10"), "{err}");
    std::fs::write(
        tmp.join("adapter_config.json"),
        r#"{"peft_type": "PROMPT_TUNING"}"#,
    )
    .unwrap();
    let err = fails(&[&"inspect", &tmp]);
    assert!(
        err.contains("PROMPT_TUNING") && err.contains("LORA, VERA, ADALORA"),
        "{err}"
    );
    std::fs::write(tmp.join("adapter_config.json"), r#"{"r": 4}"#).unwrap();
    let err = fails(&[&"inspect", &tmp]);
    assert!(
        err.contains("peft_type") && err.contains("missing"),
        "{err}"
    );
}

fn write_base(path: &Path, tensors: &[(&str, (usize, usize))]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, s)| {
            (
                k.to_string(),
                Tensor::zeros(*s, DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn shape_mismatch_names_key_and_shapes() {
    let tmp = temp_dir("cli-shape");
    let base = tmp.join("base.safetensors");
    write_base(
        &base,
        &[("lin0.weight", (20, 12)), ("lin1.weight", (2, 20))],
    );
    let err = fails(&[
        &"merge",
        &"--base",
        &base,
        &"--adapter",
        &fixture("lora_mlp").join("adapter"),
        &"--out",
        &tmp.join("o"),
    ]);
    assert!(err.contains("base_model.model.lin0.lora_A.weight"), "{err}");
    assert!(
        err.contains("[20, 12]") && err.contains("[4, 12]") && err.contains("[4, 10]"),
        "{err}"
    );
    assert!(!tmp.join("o").exists());
}

#[test]
fn unused_and_missing_keys_are_errors() {
    let tmp = temp_dir("cli-keys");
    let adapter = fixture("lora_mlp").join("adapter");
    // The base lacks lin1: the adapter's lin1 tensors are left unused.
    let base = tmp.join("base.safetensors");
    write_base(&base, &[("lin0.weight", (20, 10))]);
    let err = fails(&[
        &"merge",
        &"--base",
        &base,
        &"--adapter",
        &adapter,
        &"--out",
        &tmp.join("o"),
    ]);
    assert!(
        err.contains("not used") && err.contains("lin1.lora_A.weight"),
        "{err}"
    );
    // The adapter lacks lin1's B.
    let bad = tmp.join("adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let mut t = load(&adapter.join("adapter_model.safetensors"));
    t.remove("base_model.model.lin1.lora_B.weight");
    candle_core::safetensors::save(&t, bad.join("adapter_model.safetensors")).unwrap();
    let err = fails(&[
        &"merge",
        &"--base",
        &fixture("lora_mlp").join("base.safetensors"),
        &"--adapter",
        &bad,
        &"--out",
        &tmp.join("o"),
    ]);
    assert!(
        err.contains("missing tensor `base_model.model.lin1.lora_B.weight`"),
        "{err}"
    );
    assert!(!tmp.join("o").exists());
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    // The reader is gone before the command writes (`lorakit inspect dir | head`).
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let adapter = fixture("lora_mlp").join("adapter");
    for args in [vec!["inspect", adapter.to_str().unwrap()], vec!["--help"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_lorakit"))
            .args(&args)
            .stdout(writer.try_clone().expect("the pipe's writer"))
            .output()
            .expect("run lorakit");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

#[test]
fn help_after_a_command_prints_the_usage() {
    for args in [["merge", "--help"], ["inspect", "-h"]] {
        let out = lorakit(&[&args[0], &args[1]]);
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("lorakit merge --base"), "{args:?}: {text}");
    }
}
