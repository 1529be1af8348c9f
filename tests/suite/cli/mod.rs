//! The `lorakit` binary on the PEFT fixtures, by topic: merges and their outputs (`merge`),
//! `inspect` and `inspect --base` (`inspect`), help and usage errors (`help`), outputs refused
//! before any work (`refusals`), errors a user can act on (one line, non-zero exit, no panic;
//! `errors`), leftovers of a killed run (`leftovers`) and signals (`signals`). Here: the
//! helpers they share.

// The binary is built only with the `cli` feature (`cargo test --no-default-features`).
#![cfg(feature = "cli")]

mod classify;
mod errors;
mod export_gguf;
mod generate;
mod help;
mod inspect;
mod leftovers;
mod merge;
mod options;
mod refusals;
#[cfg(unix)]
mod signals;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use crate::peft_common::{fixture, load};
use candle_core::{DType, Device, Tensor};

/// One argument of a command line: a string or a path.
type Arg<'a> = &'a dyn AsRef<OsStr>;

/// The `lorakit` binary, not yet run.
fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lorakit"))
}

fn run<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    bin().args(args).output().expect("run lorakit")
}

fn lorakit(args: &[Arg]) -> Output {
    run(args)
}

/// `merge --base BASE --adapter ADAPTER --out OUT`, then `extra`.
fn merge_args(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "merge".into(),
        "--base".into(),
        base.into(),
        "--adapter".into(),
        adapter.into(),
        "--out".into(),
        out.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args
}

fn merge(base: &Path, adapter: &Path, out: &Path) -> Output {
    merge_with(base, adapter, out, &[])
}

/// A merge with `extra` arguments after `--out`.
fn merge_with(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    run(merge_args(base, adapter, out, extra))
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Checks that a command failed (without a panic); returns its stderr.
fn fails(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

/// Asserts that `out` was an error with exit status 1 reported as one line `error: …`
/// containing each of `want`, and returns that line.
fn one_error_line(out: &Output, want: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        !lines[0].starts_with("error: layer"),
        "not about a layer: {err}"
    );
    for w in want {
        assert!(lines[0].contains(w), "`{w}` missing from {err}");
    }
    lines[0].to_string()
}

/// Waits for `child` to exit; kills it and panics after `limit`.
fn wait_at_most(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lorakit still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A checkpoint of zero f32 tensors with the given names and shapes.
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

/// lora_mlp's base as `single/` (model.safetensors) and `sharded/` (lin0's tensors in one
/// shard, lin1's in another, and an index), each with a config.json and a tokenizer.json.
fn lora_mlp_folders(tmp: &Path) -> (PathBuf, PathBuf) {
    let base = load(&fixture("lora_mlp").join("base.safetensors"));
    let (single, sharded) = (tmp.join("single"), tmp.join("sharded"));
    for dir in [&single, &sharded] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), r#"{"model_type": "mlp"}"#).unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    }
    candle_core::safetensors::save(&base, single.join("model.safetensors")).unwrap();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    for (i, layer) in ["lin0", "lin1"].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> = base
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{layer}.")))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        for (k, t) in &part {
            weight_map.insert(k.clone(), file.clone().into());
            total += t.elem_count() * 4;
        }
        candle_core::safetensors::save(&part, sharded.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    (single, sharded)
}
