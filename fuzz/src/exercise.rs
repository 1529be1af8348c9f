//! What each fuzz target does with its input. Shared, via `#[path]`, by the fuzz targets'
//! crate and by lorakit's `tests/suite/fuzz_regressions.rs`; depends on lorakit, candle-core,
//! candle-nn and safetensors only.
//!
//! Structured inputs are parts joined by [`SEP`]: `load_adapter` takes
//! `options byte ++ adapter_config.json, SEP, adapter_model.safetensors`; `merge_corrupted`
//! takes `adapter_config.json, SEP, adapter_model.safetensors, SEP, base.safetensors`.
//! [`join`] builds such an input (seed corpora, regression tests).
//!
//! Every function returns lorakit's `Result` for the input and panics only when an
//! invariant breaks (a written config that does not parse back, an output file half
//! written, a previous output clobbered by a failed merge): a panic is a bug.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lorakit::model::{Linear, ModuleSelector};
use lorakit::peft::{merge_files, MergeReport, PeftAdapter, PeftConfig};
use lorakit::{FrozenLinear, LoraConfig, Result};

/// Separates the parts of a structured input.
pub const SEP: &[u8] = b"\n\xffLORAKIT-FUZZ-PART\xff\n";

/// The largest base layer side and size the harness itself builds (its own allocations
/// must stay small: the library's are what is under test).
const MAX_SIDE: usize = 4096;
const MAX_ELEMS: usize = 1 << 16;
/// At most this many module paths are attached per input.
const MAX_PATHS: usize = 8;

/// Splits `data` at the first `N - 1` separators; missing parts are empty.
pub fn split<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut parts = [&data[..0]; N];
    let mut rest = data;
    for part in parts.iter_mut().take(N - 1) {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(i) => {
                *part = &rest[..i];
                rest = &rest[i + SEP.len()..];
            }
            None => {
                *part = rest;
                rest = &rest[rest.len()..];
            }
        }
    }
    parts[N - 1] = rest;
    parts
}

/// Joins parts with [`SEP`] (the inverse of [`split`]).
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEP)
}

/// Target `config_json`: `adapter_config.json` parsing. On success the config must write
/// JSON that parses back to the same settings, and a fresh plan from it must attach to a
/// small base at a path it targets (a huge rank must be refused, not allocated).
pub fn config_json(data: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(data);
    let config = PeftConfig::from_json_str(&text, "adapter_config.json")?;
    let json = config.to_json_string()?;
    let again = PeftConfig::from_json_str(&json, "round-trip.json")
        .unwrap_or_else(|e| panic!("a written config does not parse back: {e}\n{json}"));
    assert_eq!(config.describe(), again.describe());
    assert_eq!(config.ranks.r, again.ranks.r);
    assert_eq!(config.adalora_ranks, again.adalora_ranks);
    let paths = candidate_paths(&config);
    for path in &paths {
        assert_eq!(
            config.targets.is_target(path),
            again.targets.is_target(path)
        );
        assert_eq!(
            config.ranks.for_module(path).r,
            again.ranks.for_module(path).r
        );
        let _ = config.adalora_mask(path);
    }
    let plan = config.fresh_plan(
        VarBuilder::zeros(DType::F32, &Device::Cpu),
        &LoraConfig::default(),
    )?;
    if let Some(path) = paths.iter().find(|p| plan.is_target(p)) {
        let base = FrozenLinear::new(base_weight(4, 4, DType::F32)?, None)?;
        exercise_layer(plan.adapt(path, base)?, 4)?;
    }
    plan.finish()?;
    Ok(())
}

/// A few module paths a config may target: typical names and its list entries.
fn candidate_paths(config: &PeftConfig) -> Vec<String> {
    let mut paths: Vec<String> = ["model.layers.0.self_attn.q_proj", "fc", "lin0"]
        .into_iter()
        .map(String::from)
        .collect();
    if let ModuleSelector::List(names) = &config.targets.target {
        paths.extend(names.iter().take(MAX_PATHS).cloned());
    }
    paths
}

/// Target `load_adapter`: a PEFT adapter from a config and safetensors bytes, attached to
/// small bases shaped after its tensors, then run, merged, run, unmerged. The options byte
/// picks the base dtype (F32, F16, BF16, F64).
pub fn load_adapter(data: &[u8]) -> Result<()> {
    let Some((&options, rest)) = data.split_first() else {
        return Ok(());
    };
    let dtype = [DType::F32, DType::F16, DType::BF16, DType::F64][usize::from(options & 3)];
    let [config, weights] = split::<2>(rest);
    let adapter = PeftAdapter::from_bytes(&String::from_utf8_lossy(config), weights, &Device::Cpu)?;
    let _ = (adapter.tensor_names(), adapter.config().describe());
    let plan = adapter.plan()?;
    for path in adapter.module_paths().iter().take(MAX_PATHS) {
        let (d_in, d_out) = base_dims(&adapter, path);
        let base = FrozenLinear::new(base_weight(d_out, d_in, dtype)?, None)?;
        exercise_layer(plan.adapt(path, base)?, d_in)?;
    }
    plan.finish()?;
    Ok(())
}

/// The base shape the adapter's tensors at `path` ask for (4 × 4 when they do not say,
/// or ask for more than the harness builds).
fn base_dims(adapter: &PeftAdapter, path: &str) -> (usize, usize) {
    let dim = |suffixes: &[&str], axis: usize| {
        suffixes.iter().find_map(|s| {
            let key = if s.starts_with("base_model.") {
                s.to_string()
            } else {
                format!("base_model.model.{path}.{s}")
            };
            adapter.tensor(&key)?.dims().get(axis).copied()
        })
    };
    let d_in = dim(&["lora_A.weight", "lora_A", "base_model.vera_A"], 1).unwrap_or(4);
    let d_out = dim(
        &[
            "lora_B.weight",
            "lora_B",
            "vera_lambda_b",
            "lora_magnitude_vector",
        ],
        0,
    )
    .unwrap_or(4);
    if d_in > MAX_SIDE || d_out > MAX_SIDE || d_in.saturating_mul(d_out) > MAX_ELEMS {
        return (4, 4);
    }
    (d_in, d_out)
}

/// A deterministic `d_out × d_in` base weight in `dtype`.
fn base_weight(d_out: usize, d_in: usize, dtype: DType) -> Result<Tensor> {
    let n = d_out * d_in;
    let w = Tensor::arange(0u32, n as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .affine(0.37, 0.0)?
        .sin()?
        .reshape((d_out, d_in))?
        .to_dtype(dtype)?;
    Ok(w)
}

/// Runs an adapted layer on 2-D and 3-D inputs, merged and unmerged.
fn exercise_layer(layer: Linear, d_in: usize) -> Result<()> {
    let Linear::Adapted(layer) = layer else {
        return Ok(());
    };
    let dtype = layer.read().base().dtype();
    let x = base_weight(3, d_in, dtype)?;
    let _ = layer.read().forward_t(&x, false)?;
    let _ = layer.read().forward_t(&x.unsqueeze(0)?, true)?;
    layer.write().merge(true)?;
    let _ = layer.read().forward_t(&x, false)?;
    layer.write().unmerge()?;
    let _ = layer.read().forward_t(&x, false)?;
    Ok(())
}

static RUN: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir (`TMPDIR`), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let n = RUN.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lorakit-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("adapter")).expect("create a temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a failed merge must leave at `out`: the previous file, untouched.
const PREVIOUS_OUTPUT: &[u8] = b"previous output";

/// Target `merge_corrupted`: `lorakit merge` ([`merge_files`]) on the three files of the
/// input, written to a temporary directory. On success the output must be a complete
/// safetensors file with the reported number of tensors; on failure the previous output
/// must be untouched. Either way no temporary file may be left behind.
pub fn merge_corrupted(data: &[u8]) -> Result<MergeReport> {
    let [config, weights, base] = split::<3>(data);
    let tmp = TempDir::new();
    let dir = &tmp.0;
    let write = |p: &Path, b: &[u8]| std::fs::write(p, b).expect("write a temp file");
    write(&dir.join("adapter/adapter_config.json"), config);
    write(&dir.join("adapter/adapter_model.safetensors"), weights);
    write(&dir.join("base.safetensors"), base);
    let out = dir.join("out.safetensors");
    write(&out, PREVIOUS_OUTPUT);
    let result = merge_files(&dir.join("base.safetensors"), &dir.join("adapter"), &out);
    let written = std::fs::read(&out).expect("the output file exists");
    match &result {
        Ok(report) => {
            let st = safetensors::SafeTensors::deserialize(&written)
                .unwrap_or_else(|e| panic!("merge returned Ok but wrote a bad file: {e}"));
            assert_eq!(st.len(), report.tensors, "tensor count in the merged file");
        }
        Err(_) => assert_eq!(
            written, PREVIOUS_OUTPUT,
            "a failed merge changed the output"
        ),
    }
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .expect("list the temp dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["adapter", "base.safetensors", "out.safetensors"],
        "stray files"
    );
    result
}
