//! `merge_checkpoint` on checkpoints written by transformers' `save_pretrained` (tiny Llama
//! and Qwen2, f32 and bf16, single-file and sharded) with adapters written by PEFT
//! (`scripts/make_checkpoint_fixtures.py`): the merged tensors equal PEFT's
//! `merge_and_unload()`, the output mirrors the input's layout, and a cancelled merge
//! leaves nothing behind.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lorakit::checkpoint::Checkpoint;
use lorakit::peft::{
    adapted_var_builder, merge_checkpoint, MergeOptions, MergeProgress, OutputDType,
};
use serde_json::Value;

use crate::peft_common::{f64_values, fixture, listing, load, rel_err, temp_dir};

const ARCHS: [&str; 2] = ["llama", "qwen2"];
const KINDS: [&str; 6] = ["lora", "dora", "vera", "adalora", "pissa", "olora"];

pub fn ckpt(name: &str) -> PathBuf {
    fixture("checkpoints").join(name)
}

fn adapter(arch: &str, kind: &str) -> PathBuf {
    ckpt(&format!("{arch}_adapters/{kind}"))
}

fn expected(arch: &str, kind: &str, dtype: &str) -> HashMap<String, Tensor> {
    load(&ckpt(&format!("{arch}_merged/{kind}_{dtype}.safetensors")))
}

/// Every tensor of a checkpoint (file or folder), by name.
pub(crate) fn merged_tensors(out: &Path) -> HashMap<String, Tensor> {
    let c = Checkpoint::open(out).unwrap();
    let names: Vec<String> = c.tensors().map(|(_, t)| t.name.clone()).collect();
    names
        .into_iter()
        .map(|n| {
            let t = c.load(&n, &candle_core::Device::Cpu).unwrap();
            (n, t)
        })
        .collect()
}

/// How closely merged bf16 tensors must match PEFT's.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Bf16Match {
    /// Bit for bit.
    Exact,
    /// Bit for bit but for at most this fraction of all entries, each within one bf16 step
    /// of its tensor's largest entry: PiSSA and OLoRA, where PEFT's `f32` SVD or QR puts a
    /// residual entry on the other side of a bf16 rounding boundary now and then.
    NearlyExact(f64),
    /// Each entry within one bf16 ulp of the expected one: an expectation rounded from
    /// another `f32` computation than lorakit's.
    OneUlp,
}

/// Largest difference between two bf16 tensors, in units of the expected value's bf16 ulp.
fn bf16_ulps(got: &[f64], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(g, &w)| {
            let ulp = if w == 0.0 {
                f64::MIN_POSITIVE
            } else {
                2f64.powi(w.abs().log2().floor() as i32 - 7)
            };
            (g - w).abs() / ulp
        })
        .fold(0.0, f64::max)
}

/// Every tensor of `want` in `got`, same dtype; f32 ones within 1e-5 relative, bf16 ones
/// as `bf16` says.
pub(crate) fn assert_matches(
    got: &HashMap<String, Tensor>,
    want: &HashMap<String, Tensor>,
    what: &str,
    bf16: Bf16Match,
) {
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    let mut got_names: Vec<&String> = got.keys().collect();
    got_names.sort();
    assert_eq!(got_names, names, "{what}: tensor names");
    let (mut differing, mut bf16_entries) = (0usize, 0usize);
    for name in names {
        let (g, w) = (&got[name], &want[name]);
        assert_eq!(g.dtype(), w.dtype(), "{what}: `{name}` dtype");
        if w.dtype() != DType::BF16 {
            let e = rel_err(g, w);
            assert!(e <= 1e-5, "{what}: `{name}` relative error {e:.2e}");
            continue;
        }
        let (g, w) = (f64_values(g), f64_values(w));
        bf16_entries += w.len();
        match bf16 {
            Bf16Match::Exact => assert!(g == w, "{what}: `{name}` differs from PEFT's"),
            Bf16Match::NearlyExact(_) => {
                let largest = w.iter().fold(0f64, |m, v| m.max(v.abs()));
                let step = 2f64.powi(largest.log2().floor() as i32 - 7);
                for (a, b) in g.iter().zip(&w) {
                    if a != b {
                        differing += 1;
                        assert!((a - b).abs() <= step, "{what}: `{name}`: {a} for {b}");
                    }
                }
            }
            Bf16Match::OneUlp => {
                let ulps = bf16_ulps(&g, &w);
                assert!(ulps <= 1.0, "{what}: `{name}` off by {ulps} bf16 ulp");
            }
        }
    }
    if let Bf16Match::NearlyExact(fraction) = bf16 {
        assert!(
            differing as f64 <= fraction * bf16_entries as f64,
            "{what}: {differing} of {bf16_entries} bf16 entries differ from PEFT's"
        );
    }
}

/// How closely lorakit's bf16 merge of `kind` matches PEFT's merge on the model loaded in
/// bf16 (`scripts/make_checkpoint_fixtures.py`).
fn bf16_match(kind: &str) -> Bf16Match {
    match kind {
        "pissa" | "olora" => Bf16Match::NearlyExact(0.005),
        _ => Bf16Match::Exact,
    }
}

#[test]
fn merges_equal_peft_for_every_arch_dtype_layout_and_variant() {
    let dir = temp_dir("ckpt-merge-all");
    for arch in ARCHS {
        for dtype in ["f32", "bf16"] {
            for kind in KINDS {
                let want = expected(arch, kind, dtype);
                let single = ckpt(&format!("{arch}_{dtype}_single/model.safetensors"));
                let out = dir.join(format!("{arch}-{dtype}-{kind}.safetensors"));
                let report =
                    merge_checkpoint(&single, &adapter(arch, kind), &out, Default::default())
                        .unwrap();
                assert!(!report.merged.is_empty());
                assert!(report.warnings.is_empty(), "{:?}", report.warnings);
                assert_matches(
                    &merged_tensors(&out),
                    &want,
                    &format!("{arch} {dtype} {kind}"),
                    bf16_match(kind),
                );

                let sharded = ckpt(&format!("{arch}_{dtype}_sharded"));
                let out = dir.join(format!("{arch}-{dtype}-{kind}-sharded"));
                merge_checkpoint(&sharded, &adapter(arch, kind), &out, Default::default()).unwrap();
                assert_matches(
                    &merged_tensors(&out),
                    &want,
                    &format!("{arch} {dtype} {kind} sharded"),
                    bf16_match(kind),
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The lazily merging `VarBuilder` over a bf16 checkpoint, asked for bf16 tensors, gives
/// PEFT's merge of the model loaded in bf16, as `lorakit merge` does.
#[test]
fn a_lazily_merged_bf16_checkpoint_gives_pefts_bf16_merge() {
    for kind in KINDS {
        let vb = adapted_var_builder(
            ckpt("llama_bf16_single"),
            adapter("llama", kind),
            DType::BF16,
            &Device::Cpu,
        )
        .unwrap();
        let want = expected("llama", kind, "bf16");
        let got = want
            .iter()
            .map(|(name, t)| (name.clone(), vb.get(t.dims(), name).unwrap()))
            .collect();
        assert_matches(&got, &want, &format!("lazily, {kind}"), bf16_match(kind));
    }
}

/// A tensor's name, dtype and shape.
type TensorLayout = (String, String, Vec<usize>);

/// The shard files, each with its tensors in file order.
fn layout(folder: &Path) -> Vec<(String, Vec<TensorLayout>)> {
    let c = Checkpoint::open(folder).unwrap();
    c.shards()
        .iter()
        .map(|s| {
            let tensors = s
                .header
                .tensors()
                .iter()
                .map(|t| (t.name.clone(), format!("{:?}", t.dtype), t.shape.clone()))
                .collect();
            (s.file_name.clone(), tensors)
        })
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_merged_folder_mirrors_its_input() {
    let dir = temp_dir("ckpt-merge-layout");
    let base = ckpt("qwen2_f32_sharded");
    // The folder, and the index file itself, give the same folder.
    for (i, given) in [base.clone(), base.join("model.safetensors.index.json")]
        .iter()
        .enumerate()
    {
        let out = dir.join(format!("out{i}"));
        let report =
            merge_checkpoint(given, &adapter("qwen2", "lora"), &out, Default::default()).unwrap();
        assert_eq!(report.shards, 4);
        assert_eq!(report.copied, ["config.json", "generation_config.json"]);
        assert_eq!(layout(&out), layout(&base));
        for f in ["config.json", "generation_config.json"] {
            assert_eq!(
                std::fs::read(out.join(f)).unwrap(),
                std::fs::read(base.join(f)).unwrap()
            );
        }
        let index_in = read_json(&base.join("model.safetensors.index.json"));
        let index_out = read_json(&out.join("model.safetensors.index.json"));
        assert_eq!(index_out["weight_map"], index_in["weight_map"]);
        // Same dtypes, so the same total size; it is also the sum of the tensors' bytes.
        let bytes: u64 = Checkpoint::open(&out)
            .unwrap()
            .tensors()
            .map(|(_, t)| t.len)
            .sum();
        assert_eq!(index_out["metadata"]["total_size"], Value::from(bytes));
        assert_eq!(
            index_out["metadata"]["total_size"],
            index_in["metadata"]["total_size"]
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn output_dtype_converts_every_float_tensor_and_updates_total_size() {
    let dir = temp_dir("ckpt-merge-dtype");
    let out = dir.join("bf16");
    let options = MergeOptions {
        dtype: OutputDType::BF16,
        ..Default::default()
    };
    merge_checkpoint(
        &ckpt("llama_f32_sharded"),
        &adapter("llama", "dora"),
        &out,
        options,
    )
    .unwrap();
    // The f32 merge, rounded once to bf16.
    let want: HashMap<String, Tensor> = expected("llama", "dora", "f32")
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    assert_matches(
        &merged_tensors(&out),
        &want,
        "f32 → bf16",
        Bf16Match::OneUlp,
    );
    let index = read_json(&out.join("model.safetensors.index.json"));
    let index_in = read_json(&ckpt("llama_f32_sharded/model.safetensors.index.json"));
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap() * 2,
        index_in["metadata"]["total_size"].as_u64().unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_merge_cancelled_after_any_shard_leaves_nothing() {
    let dir = temp_dir("ckpt-merge-cancel");
    let base = ckpt("llama_bf16_sharded");
    let shards = Checkpoint::open(&base).unwrap().shards().len();
    for (layout_name, given) in [
        ("folder", base.clone()),
        ("file", ckpt("llama_bf16_single/model.safetensors")),
    ] {
        let stops = if layout_name == "folder" { shards } else { 1 };
        for stop_after in 1..=stops {
            let out = dir.join(format!("{layout_name}-{stop_after}"));
            let mut seen: Vec<String> = Vec::new();
            let mut cancel = |p: &MergeProgress<'_>| {
                if seen.last().map(String::as_str) != Some(p.shard) {
                    seen.push(p.shard.to_string());
                }
                // Stop at the first tick of shard `stop_after + 1`, or at the very end.
                if seen.len() > stop_after || p.tensors_done == p.tensors_total {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            };
            let options = MergeOptions {
                progress: Some(&mut cancel),
                ..Default::default()
            };
            let err = merge_checkpoint(&given, &adapter("llama", "vera"), &out, options)
                .unwrap_err()
                .to_string();
            assert_eq!(err, "merge cancelled; nothing was written");
            assert!(!out.exists(), "{}", out.display());
            assert_eq!(
                listing(&dir),
                Vec::<String>::new(),
                "{layout_name} {stop_after}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_llama_adapter_on_a_qwen2_checkpoint_merges_with_a_warning() {
    let dir = temp_dir("ckpt-merge-mismatch");
    let report = merge_checkpoint(
        &ckpt("qwen2_f32_single"),
        &adapter("llama", "lora"),
        &dir.join("out"),
        Default::default(),
    )
    .unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    let w = &report.warnings[0];
    assert!(
        w.contains("lorakit-fixtures/tiny-llama") && w.contains("qwen2"),
        "{w}"
    );
    // The matching pair warns about nothing.
    let report = merge_checkpoint(
        &ckpt("llama_f32_single"),
        &adapter("llama", "lora"),
        &dir.join("out2"),
        Default::default(),
    )
    .unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    std::fs::remove_dir_all(&dir).unwrap();
}
