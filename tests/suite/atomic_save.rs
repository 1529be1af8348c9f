//! Atomic saves: a failed write (read-only directory, a writer that fails after N bytes, a
//! rename that cannot happen) leaves the previous file byte-identical and no temporary
//! file behind, and returns an error naming the path. Covers the raw writer
//! (`write_atomic`, `write_atomic_with`), adapters (`save_adapter`, both files, including a
//! Delta-LoRA checkpoint with its updated base weight) and merged models (`merge_files`).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::model::AdaptedSet;
use lorakit::peft::save::{write_atomic_all_with, write_atomic_with};
use lorakit::peft::{merge_files, save_adapter, write_atomic, PeftConfig};
use lorakit::{DeltaLoraConfig, DeltaLoraLinear, FrozenLinear, LoraConfig, Shared};

use crate::peft_common::listing as entries;
use crate::peft_common::{temp_dir, TempDir};

const WEIGHTS: &str = "adapter_model.safetensors";
const CONFIG: &str = "adapter_config.json";

/// A fresh, empty directory for one test, removed when dropped.
fn fresh_dir(case: &str) -> TempDir {
    temp_dir(&format!("atomic-{case}"))
}

fn make_writable(dir: &Path) {
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
}

fn assert_no_temporaries(dir: &Path, case: &str) {
    let temps: Vec<String> = entries(dir)
        .into_iter()
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(temps.is_empty(), "{case}: temporary files left: {temps:?}");
}

/// Makes `dir` read-only; returns false (after printing why) when the OS ignores that, as
/// it does for root, in which case the caller skips the read-only check.
fn make_read_only(dir: &Path) -> bool {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = dir.join("probe");
    if std::fs::write(&probe, b"x").is_ok() {
        let _ = std::fs::remove_file(&probe);
        make_writable(dir);
        eprintln!(
            "note: skipping the read-only-directory check: this process can write into a \
             0o555 directory (running as root?)"
        );
        return false;
    }
    true
}

/// A writer that accepts `left` bytes, then fails (a disk that fills up part-way).
struct FailAfter<'a> {
    inner: &'a mut dyn Write,
    left: usize,
}

impl Write for FailAfter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("injected failure: disk full"));
        }
        let n = buf.len().min(self.left);
        let n = self.inner.write(&buf[..n])?;
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn writer_failing_after_n_bytes_keeps_previous_file() {
    let dir = fresh_dir("fail-after-n");
    let path = dir.join("model.safetensors");
    let old: Vec<u8> = (0..64u8).collect();
    write_atomic(&path, &old).unwrap();
    let new: Vec<u8> = (0..200u8).rev().collect();
    for n in [0, 1, new.len() / 2, new.len() - 1] {
        let err = write_atomic_with(&path, |w| FailAfter { inner: w, left: n }.write_all(&new))
            .expect_err("a write that fails must return Err");
        let msg = err.to_string();
        assert!(
            msg.contains("model.safetensors") && msg.contains("injected failure"),
            "n = {n}: error should name the path and the cause: {msg}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            old,
            "n = {n}: previous file changed"
        );
        assert_no_temporaries(&dir, &format!("n = {n}"));
        assert_eq!(entries(&dir), ["model.safetensors"], "n = {n}");
    }
    // The same path then saves normally.
    write_atomic_with(&path, |w| w.write_all(&new)).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), new);
    assert_no_temporaries(&dir, "after a good save");
}

/// A two-file save (as `save_adapter` does it) where either file's writer fails part-way:
/// both previous files stay byte-identical and no temporary remains.
#[test]
fn two_file_save_failing_in_either_file_keeps_both_previous_files() {
    let dir = fresh_dir("two-files");
    let (a, b) = (
        dir.join("adapter_model.safetensors"),
        dir.join("adapter_config.json"),
    );
    write_atomic(&a, b"old weights").unwrap();
    write_atomic(&b, b"old config").unwrap();
    let new: [Vec<u8>; 2] = [(0..100u8).collect(), (100..180u8).collect()];
    for failing in [0, 1] {
        let len = new[failing].len();
        for n in [0, 1, len / 2, len - 1] {
            let case = format!("file {failing} fails after {n} bytes");
            let err = write_atomic_all_with(&[&a, &b], |i, w| {
                if i == failing {
                    FailAfter { inner: w, left: n }.write_all(&new[i])
                } else {
                    w.write_all(&new[i])
                }
            })
            .expect_err(&case);
            let name = if failing == 0 { WEIGHTS } else { CONFIG };
            assert!(
                err.to_string().contains(name),
                "{case}: error names {name}: {err}"
            );
            assert_eq!(std::fs::read(&a).unwrap(), b"old weights", "{case}");
            assert_eq!(std::fs::read(&b).unwrap(), b"old config", "{case}");
            assert_no_temporaries(&dir, &case);
        }
    }
    write_atomic_all_with(&[&a, &b], |i, w| w.write_all(&new[i])).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), new[0]);
    assert_eq!(std::fs::read(&b).unwrap(), new[1]);
    assert_no_temporaries(&dir, "two files, success");
}

#[test]
fn read_only_directory_keeps_previous_file() {
    let dir = fresh_dir("read-only");
    let path = dir.join("out.bin");
    write_atomic(&path, b"previous").unwrap();
    if !make_read_only(&dir) {
        return;
    }
    let result = write_atomic(&path, b"new content");
    make_writable(&dir);
    let msg = result.expect_err("read-only directory").to_string();
    assert!(msg.contains("out.bin"), "error should name the path: {msg}");
    assert_eq!(std::fs::read(&path).unwrap(), b"previous");
    assert_no_temporaries(&dir, "read-only");
}

/// Works as root too: a target that is a non-empty directory cannot be replaced by a rename.
#[test]
fn failed_rename_keeps_target_and_removes_temporary() {
    let dir = fresh_dir("rename-fails");
    let path = dir.join("occupied");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("keep"), b"keep").unwrap();
    let msg = write_atomic(&path, b"data")
        .expect_err("rename over a non-empty directory")
        .to_string();
    assert!(
        msg.contains("occupied"),
        "error should name the path: {msg}"
    );
    assert_eq!(std::fs::read(path.join("keep")).unwrap(), b"keep");
    assert_no_temporaries(&dir, "rename fails");
}

/// Works as root too: a parent that is a file, not a directory.
#[test]
fn missing_directory_is_an_error_naming_the_path() {
    let dir = fresh_dir("not-a-dir");
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    let msg = write_atomic(&file.join("out.bin"), b"data")
        .expect_err("parent is a file")
        .to_string();
    assert!(msg.contains("out.bin"), "error should name the path: {msg}");
    assert_eq!(entries(&dir), ["file"]);
}

/// A one-layer Delta-LoRA adapter set (its checkpoint includes the updated base weight)
/// whose B is `b_fill` everywhere, so two saves give different bytes.
fn delta_lora_set(b_fill: f64) -> (PeftConfig, AdaptedSet) {
    let dev = Device::Cpu;
    let w = Tensor::arange(0f32, 24., &dev)
        .unwrap()
        .reshape((4, 6))
        .unwrap();
    let base = FrozenLinear::new(w, None).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let layer = DeltaLoraLinear::new(base, &DeltaLoraConfig::new(2, 4.0), vb.pp("q")).unwrap();
    let b = (Tensor::ones((4, 2), DType::F32, &dev).unwrap() * b_fill).unwrap();
    layer.lora().pair().b.var().unwrap().set(&b).unwrap();
    let set = AdaptedSet::new();
    set.insert("q", Shared::new(layer).erase()).unwrap();
    (PeftConfig::lora(2, 4.0, &["q"]), set)
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    entries(dir)
        .into_iter()
        .filter(|n| dir.join(n).is_file())
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

#[test]
fn save_adapter_into_read_only_directory_keeps_both_files() {
    let dir = fresh_dir("adapter-read-only");
    let (config, set) = delta_lora_set(0.5);
    save_adapter(&dir, &config, &set).unwrap();
    let before = snapshot(&dir);
    assert_eq!(before.len(), 2);
    if !make_read_only(&dir) {
        return;
    }
    let (config2, set2) = delta_lora_set(1.5);
    let result = save_adapter(&dir, &config2, &set2);
    make_writable(&dir);
    let msg = result.expect_err("read-only directory").to_string();
    assert!(msg.contains(WEIGHTS), "error should name the file: {msg}");
    assert_eq!(snapshot(&dir), before, "previous adapter changed");
    assert_no_temporaries(&dir, "adapter read-only");
}

/// The first rename (weights) fails: nothing changes, both temporaries are removed.
#[test]
fn save_adapter_failing_first_rename_changes_nothing() {
    let dir = fresh_dir("adapter-first-rename");
    let (config, set) = delta_lora_set(0.5);
    save_adapter(&dir, &config, &set).unwrap();
    let old_config = std::fs::read(dir.join(CONFIG)).unwrap();
    // Replace the weights file by a non-empty directory so its rename fails.
    std::fs::remove_file(dir.join(WEIGHTS)).unwrap();
    std::fs::create_dir(dir.join(WEIGHTS)).unwrap();
    std::fs::write(dir.join(WEIGHTS).join("keep"), b"keep").unwrap();
    let (config2, set2) = delta_lora_set(1.5);
    let mut config2 = config2;
    config2.raw.insert("marker".into(), serde_json::json!(1));
    let msg = save_adapter(&dir, &config2, &set2)
        .expect_err("weights rename must fail")
        .to_string();
    assert!(msg.contains(WEIGHTS), "error should name the file: {msg}");
    assert_eq!(
        std::fs::read(dir.join(CONFIG)).unwrap(),
        old_config,
        "config changed"
    );
    assert_no_temporaries(&dir, "first rename");
}

/// A folder where the config file goes: refused when the files are staged, before either
/// rename, so the previous weights stay (the documented new-weights/old-config window of
/// `write_atomic_all_with` needs a rename that fails after the checks, e.g. a race).
#[test]
fn save_adapter_with_a_folder_in_place_of_the_config_changes_nothing() {
    let dir = fresh_dir("adapter-second-rename");
    let (config, set) = delta_lora_set(0.5);
    save_adapter(&dir, &config, &set).unwrap();
    let old_weights = std::fs::read(dir.join(WEIGHTS)).unwrap();
    std::fs::remove_file(dir.join(CONFIG)).unwrap();
    std::fs::create_dir(dir.join(CONFIG)).unwrap();
    std::fs::write(dir.join(CONFIG).join("keep"), b"keep").unwrap();
    let (config2, set2) = delta_lora_set(1.5);
    let msg = save_adapter(&dir, &config2, &set2)
        .expect_err("a folder in place of the config must be refused")
        .to_string();
    assert!(msg.contains(CONFIG), "error should name the file: {msg}");
    assert!(msg.contains("is a folder"), "{msg}");
    let new_weights = std::fs::read(dir.join(WEIGHTS)).unwrap();
    assert_eq!(new_weights, old_weights, "weights unchanged");
    assert_eq!(
        std::fs::read(dir.join(CONFIG).join("keep")).unwrap(),
        b"keep"
    );
    assert_no_temporaries(&dir, "second rename");
}

/// A two-layer base model and a matching LoRA adapter on disk.
fn merge_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let dev = Device::Cpu;
    let base = dir.join("base.safetensors");
    let w = Tensor::arange(0f32, 24., &dev)
        .unwrap()
        .reshape((4, 6))
        .unwrap();
    let tensors = std::collections::HashMap::from([("q.weight".to_string(), w.clone())]);
    candle_core::safetensors::save(&tensors, &base).unwrap();
    let adapter = dir.join("adapter");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let layer = lorakit::LoraLinear::new(
        FrozenLinear::new(w, None).unwrap(),
        &LoraConfig::new(2, 4.0),
        vb.pp("q"),
    )
    .unwrap();
    let set = AdaptedSet::new();
    set.insert("q", Shared::new(layer).erase()).unwrap();
    save_adapter(&adapter, &PeftConfig::lora(2, 4.0, &["q"]), &set).unwrap();
    (base, adapter)
}

#[test]
fn merge_files_failure_keeps_previous_output() {
    let dir = fresh_dir("merge");
    let (base, adapter) = merge_inputs(&dir);
    let out_dir = dir.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("merged.safetensors");
    std::fs::write(&out, b"previous merged model").unwrap();

    // A corrupted adapter: fails before anything is written.
    let bad_adapter = dir.join("bad-adapter");
    std::fs::create_dir(&bad_adapter).unwrap();
    std::fs::copy(adapter.join(CONFIG), bad_adapter.join(CONFIG)).unwrap();
    let bytes = std::fs::read(adapter.join(WEIGHTS)).unwrap();
    std::fs::write(bad_adapter.join(WEIGHTS), &bytes[..bytes.len() / 2]).unwrap();
    let msg = merge_files(&base, &bad_adapter, &out)
        .expect_err("truncated adapter")
        .to_string();
    assert!(msg.contains(WEIGHTS), "error should name the file: {msg}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous merged model");
    assert_no_temporaries(&out_dir, "merge, corrupted adapter");

    // A read-only output directory.
    if make_read_only(&out_dir) {
        let result = merge_files(&base, &adapter, &out);
        make_writable(&out_dir);
        let msg = result.expect_err("read-only output directory").to_string();
        assert!(
            msg.contains("merged.safetensors"),
            "error names the path: {msg}"
        );
        assert_eq!(std::fs::read(&out).unwrap(), b"previous merged model");
        assert_no_temporaries(&out_dir, "merge, read-only");
    }

    // An output path that cannot be replaced (a non-empty directory): rename fails.
    let occupied = out_dir.join("occupied.safetensors");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("keep"), b"keep").unwrap();
    let msg = merge_files(&base, &adapter, &occupied)
        .expect_err("output is a directory")
        .to_string();
    assert!(
        msg.contains("occupied.safetensors"),
        "error names the path: {msg}"
    );
    assert_eq!(std::fs::read(occupied.join("keep")).unwrap(), b"keep");
    assert_no_temporaries(&out_dir, "merge, rename fails");

    // And a good merge replaces the previous output.
    merge_files(&base, &adapter, &out).unwrap();
    assert_ne!(std::fs::read(&out).unwrap(), b"previous merged model");
    assert_no_temporaries(&out_dir, "merge, success");
}

/// A one-layer AdaLoRA adapter (saved with its rank pattern) whose B is `b_fill`.
fn adalora_set(b_fill: f64) -> (PeftConfig, AdaptedSet) {
    let config = PeftConfig::from_json_str(
        r#"{"peft_type": "ADALORA", "target_modules": ["q"], "init_r": 3, "lora_alpha": 4,
            "total_step": 10}"#,
        "adalora/adapter_config.json",
    )
    .unwrap();
    let dev = Device::Cpu;
    let adapter_vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev);
    let plan = config
        .fresh_plan(adapter_vb, &LoraConfig::default())
        .unwrap();
    let base_vars = VarMap::new();
    let base_vb = VarBuilder::from_varmap(&base_vars, DType::F32, &dev);
    lorakit::model::linear_no_bias(6, 4, base_vb.pp("q"), &plan).unwrap();
    let set = plan.finish().unwrap();
    let layer = set.get("q").unwrap();
    {
        let guard = layer.read();
        let ada = guard
            .as_any()
            .downcast_ref::<lorakit::AdaLoraLinear>()
            .unwrap();
        let b = (Tensor::ones((4, 3), DType::F32, &dev).unwrap() * b_fill).unwrap();
        ada.b().set(&b).unwrap();
    }
    (config, set)
}

#[test]
fn adalora_save_failing_rename_keeps_previous_adapter() {
    let dir = fresh_dir("adalora");
    let (config, set) = adalora_set(0.5);
    save_adapter(&dir, &config, &set).unwrap();
    let old_config = std::fs::read(dir.join(CONFIG)).unwrap();
    std::fs::remove_file(dir.join(WEIGHTS)).unwrap();
    std::fs::create_dir(dir.join(WEIGHTS)).unwrap();
    std::fs::write(dir.join(WEIGHTS).join("keep"), b"keep").unwrap();
    let (mut config2, set2) = adalora_set(1.5);
    config2.raw.insert("marker".into(), serde_json::json!(1));
    let msg = save_adapter(&dir, &config2, &set2)
        .expect_err("weights rename must fail")
        .to_string();
    assert!(msg.contains(WEIGHTS), "error should name the file: {msg}");
    assert_eq!(std::fs::read(dir.join(CONFIG)).unwrap(), old_config);
    assert_no_temporaries(&dir, "AdaLoRA, first rename");
    // Once the obstacle is gone, the save goes through and the pair reloads.
    std::fs::remove_dir_all(dir.join(WEIGHTS)).unwrap();
    save_adapter(&dir, &config2, &set2).unwrap();
    lorakit::peft::PeftAdapter::load(&dir, &Device::Cpu).unwrap();
    assert_no_temporaries(&dir, "AdaLoRA, success");
}
