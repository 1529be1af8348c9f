//! `merge_checkpoint` on checkpoints written by transformers' `save_pretrained` (tiny Llama
//! and Qwen2, f32 and bf16, single-file and sharded; f16 single-file) with adapters written
//! by PEFT (`scripts/make_checkpoint_fixtures.py`): the merged tensors equal PEFT's
//! `merge_and_unload()` (half-precision ones, PEFT having merged on the model loaded in
//! that dtype, bit for bit for LoRA and but for rare entries a step away for the other
//! variants), the output mirrors the input's layout, and a cancelled merge leaves nothing
//! behind.

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

/// How closely merged half-precision (bf16, f16) tensors must match PEFT's.
#[derive(Clone, Copy, Debug)]
pub(crate) enum HalfMatch {
    /// Bit for bit.
    Exact,
    /// Bit for bit but for at most this fraction of all entries, each within one step of
    /// its tensor's largest entry: where lorakit's `f32` result differs from PyTorch's in
    /// its last bits (PiSSA's SVD, DoRA's norms), which puts an entry on the other side of
    /// a rounding boundary now and then.
    NearlyExact(f64),
    /// Each entry within one ulp of the expected one: an expectation rounded from another
    /// `f32` computation than lorakit's.
    OneUlp,
}

/// The spacing of `dtype`'s values at `x`'s binade (its ulp there): 2^(e − mantissa bits).
fn ulp(dtype: DType, x: f64) -> f64 {
    let mantissa = if dtype == DType::BF16 { 7 } else { 10 };
    if x == 0.0 {
        f64::MIN_POSITIVE
    } else {
        2f64.powi(x.abs().log2().floor() as i32 - mantissa)
    }
}

/// Every tensor of `want` in `got`, same dtype; f32 ones within 1e-5 relative, bf16 and
/// f16 ones as `half` says.
pub(crate) fn assert_matches(
    got: &HashMap<String, Tensor>,
    want: &HashMap<String, Tensor>,
    what: &str,
    half: HalfMatch,
) {
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    let mut got_names: Vec<&String> = got.keys().collect();
    got_names.sort();
    assert_eq!(got_names, names, "{what}: tensor names");
    let (mut differing, mut half_entries) = (0usize, 0usize);
    for name in names {
        let (g, w) = (&got[name], &want[name]);
        let dtype = w.dtype();
        assert_eq!(g.dtype(), dtype, "{what}: `{name}` dtype");
        if dtype != DType::BF16 && dtype != DType::F16 {
            let e = rel_err(g, w);
            assert!(e <= 1e-5, "{what}: `{name}` relative error {e:.2e}");
            continue;
        }
        let (g, w) = (f64_values(g), f64_values(w));
        half_entries += w.len();
        match half {
            HalfMatch::Exact => assert!(g == w, "{what}: `{name}` differs from PEFT's"),
            HalfMatch::NearlyExact(_) => {
                let step = ulp(dtype, w.iter().fold(0f64, |m, v| m.max(v.abs())));
                for (a, b) in g.iter().zip(&w) {
                    if a != b {
                        differing += 1;
                        assert!((a - b).abs() <= step, "{what}: `{name}`: {a} for {b}");
                    }
                }
            }
            HalfMatch::OneUlp => {
                for (a, b) in g.iter().zip(&w) {
                    let ulps = (a - b).abs() / ulp(dtype, *b);
                    assert!(ulps <= 1.0, "{what}: `{name}` off by {ulps} ulp");
                }
            }
        }
    }
    if let HalfMatch::NearlyExact(fraction) = half {
        assert!(
            differing as f64 <= fraction * half_entries as f64,
            "{what}: {differing} of {half_entries} half-precision entries differ from PEFT's"
        );
    }
}

/// How closely lorakit's half-precision merge of `kind` matches PEFT's merge on the model
/// loaded in that dtype (`scripts/make_checkpoint_fixtures.py`): LoRA's f32 result is
/// PyTorch's bit for bit, so its rounding is too. The other variants' f32 results differ
/// from PyTorch's in the last bits now and then (DoRA's norms, PiSSA's SVD …), which puts
/// a rare entry a step away: 18 of 81,216 in f16 on these fixtures, 2 in bf16. Rounding
/// once where PEFT rounds twice (before 59a6b8d) put 3.6–17% of entries a step away.
fn half_match(kind: &str) -> HalfMatch {
    match kind {
        "lora" => HalfMatch::Exact,
        _ => HalfMatch::NearlyExact(0.005),
    }
}

#[test]
fn merges_equal_peft_for_every_arch_dtype_layout_and_variant() {
    let dir = temp_dir("ckpt-merge-all");
    for arch in ARCHS {
        for dtype in ["f32", "bf16", "f16"] {
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
                    half_match(kind),
                );

                if dtype == "f16" {
                    continue; // single-file only
                }
                let sharded = ckpt(&format!("{arch}_{dtype}_sharded"));
                let out = dir.join(format!("{arch}-{dtype}-{kind}-sharded"));
                merge_checkpoint(&sharded, &adapter(arch, kind), &out, Default::default()).unwrap();
                assert_matches(
                    &merged_tensors(&out),
                    &want,
                    &format!("{arch} {dtype} {kind} sharded"),
                    half_match(kind),
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The lazily merging `VarBuilder` over a half-precision checkpoint, asked for tensors of
/// its dtype, gives PEFT's merge of the model loaded in that dtype, as `lorakit merge` does.
#[test]
fn a_lazily_merged_half_checkpoint_gives_pefts_merge_in_its_dtype() {
    for (tag, dtype) in [("bf16", DType::BF16), ("f16", DType::F16)] {
        for kind in KINDS {
            let vb = adapted_var_builder(
                ckpt(&format!("llama_{tag}_single")),
                adapter("llama", kind),
                dtype,
                &Device::Cpu,
            )
            .unwrap();
            let want = expected("llama", kind, tag);
            let got = want
                .iter()
                .map(|(name, t)| (name.clone(), vb.get(t.dims(), name).unwrap()))
                .collect();
            let what = format!("lazily, {tag} {kind}");
            assert_matches(&got, &want, &what, half_match(kind));
        }
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
        HalfMatch::OneUlp,
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
