//! The `lorakit` binary on the PEFT fixtures: merge output equals PEFT's merge_and_unload(),
//! for a file, a model folder and a sharded folder; inspect's summary and its match against a
//! checkpoint; help and usage errors; outputs refused before any work; leftovers of a killed
//! run; signals; and errors a user can act on (one line, non-zero exit, no panic).

// The binary is built only with the `cli` feature (`cargo test --no-default-features`).
#![cfg(feature = "cli")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

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
    let out = lorakit(&[&"merge", &"--base", &missing]);
    assert_eq!(out.status.code(), Some(2), "a usage error exits 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("required arguments were not provided") && err.contains("--adapter <DIR>"),
        "{err}"
    );
    assert!(err.contains("Usage: lorakit merge"), "{err}");
    let out = lorakit(&[&"frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unrecognized subcommand 'frobnicate'"),
        "{err}"
    );
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
    // Found from the headers before any work: the weight's shape and the one the adapter's
    // tensors imply.
    assert!(err.contains("`lin0.weight`"), "{err}");
    assert!(
        err.contains("[20, 12]") && err.contains("[20, 10] (out, in)"),
        "{err}"
    );
    assert!(!tmp.join("o").exists());
}

#[test]
fn unused_and_missing_keys_are_errors() {
    let tmp = temp_dir("cli-keys");
    let adapter = fixture("lora_mlp").join("adapter");
    // The base lacks lin1: the adapter's lin1 tensors would be left unused; said before any
    // work, naming the module and the tensor the checkpoint lacks.
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
        err.contains("the adapter has module `lin1`")
            && err.contains("the checkpoint has no `lin1.weight`"),
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
fn help_for_every_command_and_version() {
    for (args, usage) in [
        (vec!["--help"], "Usage: lorakit <COMMAND>"),
        (vec!["help"], "Usage: lorakit <COMMAND>"),
        (vec!["-h"], "Usage: lorakit <COMMAND>"),
        (
            vec!["merge", "--help"],
            "Usage: lorakit merge [OPTIONS] --base <CHECKPOINT> --adapter <DIR> --out <PATH>",
        ),
        (vec!["merge", "-h"], "Usage: lorakit merge"),
        (vec!["help", "merge"], "Usage: lorakit merge"),
        (
            vec!["inspect", "--help"],
            "Usage: lorakit inspect [OPTIONS] <ADAPTER_DIR>",
        ),
        (vec!["inspect", "-h"], "Usage: lorakit inspect"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_lorakit"))
            .args(&args)
            .output()
            .expect("run lorakit");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {:?}", out.status);
        assert!(text.contains(usage), "{args:?}: {text}");
    }
    let text = String::from_utf8_lossy(&lorakit(&[&"merge", &"--help"]).stdout).into_owned();
    for flag in [
        "--dtype <DTYPE>",
        "keep, f32, f16, bf16",
        "--quiet",
        "--remove-leftovers",
    ] {
        assert!(text.contains(flag), "merge --help lacks {flag}: {text}");
    }
    let text = String::from_utf8_lossy(&lorakit(&[&"inspect", &"--help"]).stdout).into_owned();
    assert!(text.contains("--base <CHECKPOINT>"), "{text}");
    let out = lorakit(&[&"--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("lorakit {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_2() {
    let adapter = fixture("lora_mlp").join("adapter");
    for args in [
        vec![],
        vec![
            "merge",
            "--base",
            "b.safetensors",
            "--adapter",
            "a",
            "--out",
            "o",
            "--dtype",
            "f8",
        ],
        vec!["merge", "--base", "b.safetensors", "--adapter", "a"],
        vec!["inspect"],
        vec!["inspect", adapter.to_str().unwrap(), "extra"],
        vec!["merge", "--frobnicate"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_lorakit"))
            .args(&args)
            .output()
            .expect("run lorakit");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("Usage: lorakit") || err.contains("try '--help'"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let err = String::from_utf8_lossy(
        &lorakit(&[
            &"merge",
            &"--base",
            &"b",
            &"--adapter",
            &"a",
            &"--out",
            &"o",
            &"--dtype",
            &"f8",
        ])
        .stderr,
    )
    .into_owned();
    assert!(
        err.contains("possible values: keep, f32, f16, bf16"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// Checkpoints as folders: lora_mlp's base as one file, a model folder, and a sharded folder.

/// Every tensor of the safetensors files in `path` (a file, or a folder's `*.safetensors`).
fn read_checkpoint(path: &Path) -> HashMap<String, Tensor> {
    if path.is_file() {
        return load(path);
    }
    let mut all = HashMap::new();
    for e in std::fs::read_dir(path).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            for (k, t) in load(&p) {
                assert!(all.insert(k.clone(), t).is_none(), "{k} twice");
            }
        }
    }
    all
}

/// File names in `dir`, hidden ones included, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
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

fn assert_bitwise_equal(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, what: &str) {
    let mut names: Vec<&String> = got.keys().collect();
    names.sort();
    let mut want_names: Vec<&String> = want.keys().collect();
    want_names.sort();
    assert_eq!(names, want_names, "{what}");
    for (k, t) in want {
        let g = &got[k];
        assert_eq!((g.dims(), g.dtype()), (t.dims(), t.dtype()), "{what}: {k}");
        let bits = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(bits(g), bits(t), "{what}: {k}");
    }
}

fn merge_ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let res = lorakit(args);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.is_empty(), "unexpected stderr: {err}");
    String::from_utf8_lossy(&res.stdout).into_owned()
}

#[test]
fn merges_of_a_folder_and_a_sharded_folder_equal_the_single_file_merge() {
    let tmp = temp_dir("cli-folders");
    let (single, sharded) = lora_mlp_folders(&tmp);
    let adapter = fixture("lora_mlp").join("adapter");
    let file_out = tmp.join("merged.safetensors");
    let text = merge_ok(&[
        &"merge",
        &"--base",
        &single.join("model.safetensors"),
        &"--adapter",
        &adapter,
        &"--out",
        &file_out,
    ]);
    assert!(
        text.contains("merged 2 module(s)") && text.contains("1 file(s)"),
        "{text}"
    );
    let want = read_checkpoint(&file_out);
    let peft = load(&fixture("lora_mlp").join("merged.safetensors"));
    for (k, t) in &peft {
        assert_close(&want[k], t, 1e-5, k);
    }
    for (base, name, shards) in [
        (single.clone(), "from-single", 1),
        (sharded.clone(), "from-sharded", 2),
        (
            sharded.join("model.safetensors.index.json"),
            "from-index",
            2,
        ),
    ] {
        let out = tmp.join(name);
        let text = merge_ok(&[
            &"merge",
            &"--base",
            &base,
            &"--adapter",
            &adapter,
            &"--out",
            &out,
        ]);
        assert!(
            text.contains(&format!("{shards} file(s)")),
            "{name}: {text}"
        );
        assert!(
            text.contains("copied: config.json, tokenizer.json"),
            "{name}: {text}"
        );
        assert_bitwise_equal(&read_checkpoint(&out), &want, name);
        let input = if base.is_dir() {
            base.clone()
        } else {
            sharded.clone()
        };
        assert_eq!(
            listing(&out),
            listing(&input),
            "{name}: the output mirrors the input"
        );
    }
    let index = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(
        index(&tmp.join("from-sharded"))["weight_map"],
        index(&sharded)["weight_map"]
    );
}

#[test]
fn dtype_bf16_writes_every_float_tensor_as_bf16() {
    let tmp = temp_dir("cli-bf16");
    let (_, sharded) = lora_mlp_folders(&tmp);
    let adapter = fixture("lora_mlp").join("adapter");
    let want = load(&fixture("lora_mlp").join("merged.safetensors"));
    let file_out = tmp.join("merged.safetensors");
    let folder_out = tmp.join("merged");
    for (base, out) in [
        (fixture("lora_mlp").join("base.safetensors"), &file_out),
        (sharded, &folder_out),
    ] {
        let text = merge_ok(&[
            &"merge",
            &"--base",
            &base,
            &"--adapter",
            &adapter,
            &"--out",
            out,
            &"--dtype",
            &"bf16",
        ]);
        assert!(text.contains("merged 2 module(s)"), "{text}");
        let got = read_checkpoint(out);
        assert_eq!(got.len(), want.len());
        for (k, t) in &got {
            assert_eq!(t.dtype(), DType::BF16, "{}: {k}", out.display());
            assert_close(&t.to_dtype(DType::F32).unwrap(), &want[k], 1e-2, k);
        }
    }
    // --quiet: nothing on stdout, the same file.
    let quiet_out = tmp.join("quiet.safetensors");
    let text = merge_ok(&[
        &"merge",
        &"--base",
        &fixture("lora_mlp").join("base.safetensors"),
        &"--adapter",
        &adapter,
        &"--out",
        &quiet_out,
        &"--dtype",
        &"bf16",
        &"--quiet",
    ]);
    assert!(text.is_empty(), "{text}");
    assert_eq!(
        std::fs::read(&quiet_out).unwrap(),
        std::fs::read(&file_out).unwrap()
    );
}

// ---------------------------------------------------------------------------------------
// Outputs refused before any work.

/// Runs `lorakit args`, killing it and failing the test if it runs past `limit` (a command
/// that opened a fifo for writing would wait for a reader forever).
fn run_with_limit(args: &[&dyn AsRef<std::ffi::OsStr>], limit: Duration) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorakit"));
    for a in args {
        cmd.arg(a);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lorakit");
    wait_at_most(&mut child, limit);
    child.wait_with_output().unwrap()
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

/// A merge into `out` that must be refused before any work: one error line with `want`,
/// and `out`'s folder exactly as before (no temporary, no output).
fn refused(base: &Path, out: &Path, want: &str) {
    let dir = out.ancestors().skip(1).find(|d| d.is_dir()).unwrap();
    let before = listing(dir);
    let adapter = fixture("lora_mlp").join("adapter");
    let res = run_with_limit(
        &[
            &"merge",
            &"--base",
            &base,
            &"--adapter",
            &adapter,
            &"--out",
            &out,
        ],
        Duration::from_secs(60),
    );
    one_error_line(&res, &[want]);
    assert_eq!(
        listing(dir),
        before,
        "{}: something was left",
        out.display()
    );
}

#[test]
fn outputs_that_cannot_be_written_are_refused_before_any_work() {
    let tmp = temp_dir("cli-refuse");
    let (single, sharded) = lora_mlp_folders(&tmp);
    let file_base = single.join("model.safetensors");
    let outs = tmp.join("outs");
    std::fs::create_dir_all(&outs).unwrap();
    // A folder output needs an absent or empty folder.
    let full = outs.join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    refused(&sharded, &full, "the output folder exists and is not empty");
    assert_eq!(
        std::fs::read_to_string(full.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(listing(&full), ["keep.txt"]);
    let file = outs.join("a-file");
    std::fs::write(&file, "mine").unwrap();
    refused(&sharded, &file, "is a file, but the output is a folder");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    // A file output cannot replace a folder.
    let empty = outs.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    refused(
        &file_base,
        &empty,
        "is a folder, but the output is a single file",
    );
    // The inputs themselves.
    refused(&file_base, &file_base, "refusing to overwrite the input");
    refused(&sharded, &sharded, "refusing to overwrite the input");
    refused(
        &sharded.join("model.safetensors.index.json"),
        &sharded,
        "refusing to overwrite the input",
    );
    // A folder that does not exist.
    refused(
        &file_base,
        &outs.join("nope").join("m.safetensors"),
        "does not exist",
    );
    // A fifo: never opened (that would wait for a reader forever).
    #[cfg(unix)]
    {
        let fifo = outs.join("fifo");
        let made = Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            refused(
                &file_base,
                &fifo,
                "is not a regular file or folder (a device, fifo or socket)",
            );
            refused(&sharded, &fifo, "is not a regular file or folder");
            use std::os::unix::fs::FileTypeExt;
            assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        } else {
            eprintln!("skipped: mkfifo failed");
        }
    }
}

/// `--out /dev/null`: a character device is never replaced (nor written to).
#[cfg(unix)]
#[test]
fn dev_null_is_refused() {
    use std::os::unix::fs::FileTypeExt;
    let dev_null = Path::new("/dev/null");
    if !std::fs::metadata(dev_null).is_ok_and(|m| m.file_type().is_char_device()) {
        eprintln!("skipped: no /dev/null character device");
        return;
    }
    let adapter = fixture("lora_mlp").join("adapter");
    let res = run_with_limit(
        &[
            &"merge",
            &"--base",
            &fixture("lora_mlp").join("base.safetensors"),
            &"--adapter",
            &adapter,
            &"--out",
            &dev_null,
        ],
        Duration::from_secs(60),
    );
    one_error_line(
        &res,
        &[
            "/dev/null",
            "not a regular file or folder",
            "refusing to replace it",
        ],
    );
    assert!(std::fs::metadata(dev_null)
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(!Path::new("/dev/.null.tmp").exists());
}

// ---------------------------------------------------------------------------------------
// Leftovers of a killed run.

/// A PID no running process has (on Linux; elsewhere liveness is not checked).
fn dead_pid() -> u32 {
    (999_999..)
        .find(|p| !Path::new("/proc").join(p.to_string()).exists())
        .unwrap()
}

#[test]
fn leftovers_are_reported_and_removed_on_request() {
    let tmp = temp_dir("cli-leftovers");
    let base = fixture("lora_mlp").join("base.safetensors");
    let adapter = fixture("lora_mlp").join("adapter");
    let out = tmp.join("merged.safetensors");
    let dead = format!(".merged.safetensors.tmp{}.0", dead_pid());
    std::fs::write(tmp.join(&dead), "half a file").unwrap();
    // A temporary of a live process (this one) is not a leftover: another merge's.
    let live = format!(".merged.safetensors.tmp{}.7", std::process::id());
    std::fs::write(tmp.join(&live), "in progress").unwrap();
    // Not a temporary of this destination.
    let other = format!(".other.safetensors.tmp{}.0", dead_pid());
    std::fs::write(tmp.join(&other), "someone else's").unwrap();

    let res = lorakit(&[
        &"merge",
        &"--base",
        &base,
        &"--adapter",
        &adapter,
        &"--out",
        &out,
    ]);
    let err = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("warning: ") && lines[0].contains(&dead),
        "{err}"
    );
    assert!(lines[0].contains("--remove-leftovers"), "{err}");
    assert!(tmp.join(&dead).exists(), "only reported without the flag");
    assert!(out.is_file());

    let res = lorakit(&[
        &"merge",
        &"--base",
        &base,
        &"--adapter",
        &adapter,
        &"--out",
        &out,
        &"--remove-leftovers",
    ]);
    let err = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success(), "{err}");
    assert!(
        err.starts_with("warning: removed") && err.contains(&dead),
        "{err}"
    );
    assert_eq!(
        listing(&tmp),
        [live.as_str(), other.as_str(), "merged.safetensors"]
    );
}

// ---------------------------------------------------------------------------------------
// Signals: a merge stopped by SIGINT or SIGTERM removes its temporaries and exits 130.

/// Starts a merge that waits `LORAKIT_TEST_TENSOR_DELAY_MS` (a test-only hook of the
/// binary) after each tensor, so that it is surely still running when signalled.
#[cfg(unix)]
fn slow_merge(base: &Path, out: &Path, ignore_first_signal: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorakit"));
    cmd.args(["merge", "--base"])
        .arg(base)
        .arg("--adapter")
        .arg(fixture("lora_mlp").join("adapter"))
        .arg("--out")
        .arg(out)
        .env("LORAKIT_TEST_TENSOR_DELAY_MS", "60000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if ignore_first_signal {
        cmd.env("LORAKIT_TEST_DELAY_IGNORES_SIGNALS", "1");
    }
    cmd.spawn().expect("run lorakit")
}

/// Waits until the merge's temporary for `out` exists (the merge is writing).
#[cfg(unix)]
fn wait_for_temporary(child: &mut Child, out: &Path) -> PathBuf {
    let name = out.file_name().unwrap().to_string_lossy();
    let prefix = format!(".{name}.tmp{}.", child.id());
    let dir = out.parent().unwrap();
    let start = Instant::now();
    loop {
        if let Some(n) = listing(dir).into_iter().find(|n| n.starts_with(&prefix)) {
            return dir.join(n);
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the merge ended ({status}) before writing");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no temporary appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(unix)]
fn send(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(ok.success());
}

/// Signals a slow merge into `out` once it writes, and checks that it stopped cleanly.
#[cfg(unix)]
fn interrupt(base: &Path, out: &Path, signal: &str) {
    let dir = out.parent().unwrap();
    let before = listing(dir);
    let mut child = slow_merge(base, out, false);
    let tmp = wait_for_temporary(&mut child, out);
    send(&child, signal);
    let status = wait_at_most(&mut child, Duration::from_secs(60));
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(status.code(), Some(130), "{signal}: {err}");
    assert!(
        err.ends_with("interrupted; nothing was written\n"),
        "{signal}: {err}"
    );
    assert!(!tmp.exists(), "{signal}: {} left behind", tmp.display());
    assert_eq!(listing(dir), before, "{signal}");
}

#[cfg(unix)]
#[test]
fn sigterm_or_sigint_during_a_merge_removes_its_temporaries() {
    let tmp = temp_dir("cli-signal");
    let (_, sharded) = lora_mlp_folders(&tmp);
    let outs = tmp.join("outs");
    std::fs::create_dir_all(&outs).unwrap();
    interrupt(
        &fixture("lora_mlp").join("base.safetensors"),
        &outs.join("merged.safetensors"),
        "TERM",
    );
    interrupt(&sharded, &outs.join("merged"), "TERM");
    interrupt(&sharded, &outs.join("merged"), "INT");
}

/// A second signal does not wait for the current tensor: it removes the temporaries and
/// exits at once.
#[cfg(unix)]
#[test]
fn a_second_signal_stops_at_once() {
    use std::io::BufRead;
    let tmp = temp_dir("cli-signal-twice");
    let (_, sharded) = lora_mlp_folders(&tmp);
    let out = tmp.join("merged");
    let before = listing(&tmp);
    let mut child = slow_merge(&sharded, &out, true);
    let staged = wait_for_temporary(&mut child, &out);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    send(&child, "TERM");
    let note = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a note on the first signal");
    assert!(note.contains("stopping after the current tensor"), "{note}");
    send(&child, "TERM");
    let status = wait_at_most(&mut child, Duration::from_secs(50));
    assert_eq!(status.code(), Some(130));
    assert!(
        start.elapsed() < Duration::from_secs(55),
        "it waited for the tensor"
    );
    reader.join().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(rest, ["interrupted; nothing was written"]);
    assert!(!staged.exists(), "{} left behind", staged.display());
    assert_eq!(listing(&tmp), before);
}

// ---------------------------------------------------------------------------------------
// inspect --base, and errors.

#[test]
fn inspect_with_a_base_names_matched_and_unmatched_modules() {
    let tmp = temp_dir("cli-inspect-base");
    let adapter = fixture("lora_mlp").join("adapter");
    // lin0 fits; lin1's out-features differ from lora_B's (2); head is not targeted.
    let base = tmp.join("base.safetensors");
    write_base(
        &base,
        &[
            ("lin0.weight", (20, 10)),
            ("lin1.weight", (3, 20)),
            ("head.weight", (4, 2)),
        ],
    );
    let out = lorakit(&[&"inspect", &adapter, &"--base", &base]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("type: LORA"),
        "the summary comes first: {text}"
    );
    for line in [
        "matched: 1 of 2 module(s)",
        "  lin0 -> lin0.weight  [20, 10] f32  ok",
        "  lin1 -> lin1.weight  [3, 20] f32  MISMATCH: the adapter's tensors imply [2, 20] (out, in)",
        "not targeted: 1 2-D weight(s) of the checkpoint (head)",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
    // A base without lin1.
    write_base(&base, &[("lin0.weight", (20, 10))]);
    let text = String::from_utf8_lossy(&lorakit(&[&"inspect", &adapter, &"--base", &base]).stdout)
        .into_owned();
    assert!(text.contains("  lin1 -> lin1.weight  MISSING"), "{text}");
    assert!(text.contains("matched: 1 of 2 module(s)"), "{text}");
}

#[test]
fn inspect_with_a_sharded_hf_checkpoint_and_a_base_model_warning() {
    let ckpts = fixture("checkpoints");
    let out = lorakit(&[
        &"inspect",
        &ckpts.join("llama_adapters/dora"),
        &"--base",
        &ckpts.join("llama_f32_sharded"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).is_empty());
    assert!(text.contains("(21 tensors in 4 file(s))"), "{text}");
    assert!(
        text.contains("  model.layers.0.self_attn.q_proj -> model.layers.0.self_attn.q_proj.weight  [16, 16] f32  ok"),
        "{text}"
    );
    assert!(text.contains("not targeted: 10 2-D weight(s) of the checkpoint (embed_tokens, gate_proj x2, k_proj x2, lm_head, o_proj x2, up_proj x2)"), "{text}");
    // A Llama adapter against a Qwen2 checkpoint: same shapes, a warning on stderr.
    let out = lorakit(&[
        &"inspect",
        &ckpts.join("llama_adapters/lora"),
        &"--base",
        &ckpts.join("qwen2_f32_single"),
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("warning: the adapter was trained on `lorakit-fixtures/tiny-llama`")
            && err.contains("qwen2"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("matched: 14 of 14 module(s)"));
}

#[test]
fn a_checkpoint_given_as_the_adapter_gets_a_helpful_error() {
    let ckpts = fixture("checkpoints");
    let sharded = ckpts.join("llama_f32_sharded");
    let line = one_error_line(
        &lorakit(&[&"inspect", &sharded]),
        &["not a PEFT adapter folder", "--base"],
    );
    assert!(line.contains("21 tensor(s) in 4 file(s)"), "{line}");
    one_error_line(
        &lorakit(&[
            &"inspect",
            &ckpts.join("llama_f32_single/model.safetensors"),
        ]),
        &["is a model checkpoint", "not a PEFT adapter folder"],
    );
    one_error_line(
        &lorakit(&[
            &"inspect",
            &ckpts.join("llama_adapters/lora/adapter_config.json"),
        ]),
        &["give the adapter's folder"],
    );
    // merge with --base and --adapter swapped: said before any work.
    let tmp = temp_dir("cli-swapped");
    let res = lorakit(&[
        &"merge",
        &"--base",
        &ckpts.join("llama_adapters/lora"),
        &"--adapter",
        &sharded,
        &"--out",
        &tmp.join("o"),
    ]);
    one_error_line(&res, &["not a PEFT adapter folder", "look swapped"]);
    let res = lorakit(&[
        &"merge",
        &"--base",
        &ckpts.join("llama_adapters/lora"),
        &"--adapter",
        &ckpts.join("llama_adapters/dora"),
        &"--out",
        &tmp.join("o"),
    ]);
    one_error_line(&res, &["is a PEFT adapter folder, not a model checkpoint"]);
    assert!(listing(&tmp).is_empty());
}

/// Bad input of every kind: one line `error: …`, exit 1, and never `error: layer …` unless
/// the error is about a layer.
#[test]
fn error_lines_name_what_is_wrong() {
    let tmp = temp_dir("cli-error-lines");
    let adapter = fixture("lora_mlp").join("adapter");
    let good_base = fixture("lora_mlp").join("base.safetensors");
    std::fs::write(tmp.join("text.safetensors"), "hello").unwrap();
    let bytes = std::fs::read(&good_base).unwrap();
    std::fs::write(tmp.join("cut.safetensors"), &bytes[..100]).unwrap();
    let bad_json = tmp.join("bad-json");
    std::fs::create_dir_all(&bad_json).unwrap();
    std::fs::write(bad_json.join("adapter_config.json"), "{\"r\": 4,,}").unwrap();
    write_base(
        &tmp.join("shape.safetensors"),
        &[("lin0.weight", (20, 12)), ("lin1.weight", (2, 20))],
    );
    let out = tmp.join("o.safetensors");
    let merge_args = |base: &Path, adapter: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "merge".into(),
            "--base".into(),
            base.into(),
            "--adapter".into(),
            adapter.into(),
            "--out".into(),
            out.clone().into(),
        ]
    };
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            merge_args(&tmp.join("missing.safetensors"), &adapter),
            "missing.safetensors: No such file",
        ),
        (
            merge_args(&tmp.join("text.safetensors"), &adapter),
            "text.safetensors: safetensors error",
        ),
        (
            merge_args(&tmp.join("cut.safetensors"), &adapter),
            "cut.safetensors: safetensors error",
        ),
        (
            merge_args(&good_base, &tmp.join("no-adapter")),
            "no-adapter/adapter_config.json",
        ),
        (
            merge_args(&good_base, &bad_json),
            "invalid JSON at line 1, column 9",
        ),
        (
            vec!["inspect".into(), tmp.join("no-adapter").into()],
            "adapter_config.json",
        ),
        (
            vec![
                "inspect".into(),
                adapter.clone().into(),
                "--base".into(),
                tmp.join("cut.safetensors").into(),
            ],
            "cut.safetensors",
        ),
    ];
    for (args, want) in cases {
        let res = Command::new(env!("CARGO_BIN_EXE_lorakit"))
            .args(&args)
            .output()
            .unwrap();
        one_error_line(&res, &[want]);
    }
    // A checkpoint's weight that does not fit the adapter, found before any work.
    let res = lorakit(&[
        &"merge",
        &"--base",
        &tmp.join("shape.safetensors"),
        &"--adapter",
        &adapter,
        &"--out",
        &out,
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.starts_with("error: ")
            && err.contains("shape.safetensors: `lin0.weight` has shape [20, 12]")
            && err.lines().count() == 1,
        "{err}"
    );
    assert!(!out.exists());
    assert_eq!(
        listing(&tmp),
        [
            "bad-json",
            "cut.safetensors",
            "shape.safetensors",
            "text.safetensors"
        ]
    );
}
