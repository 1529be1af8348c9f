//! What each fuzz target does with its input. Shared, via `#[path]`, by the fuzz targets'
//! crate and by lorakit's `tests/suite/fuzz_regressions.rs`; depends on lorakit, candle-core,
//! candle-nn, safetensors and serde_json only (all of them lorakit's own dependencies), and
//! embeds the two small adapters of `fuzz/adapters/`.
//!
//! Structured inputs are parts joined by [`SEP`]: `load_adapter` takes
//! `options byte ++ adapter_config.json, SEP, adapter_model.safetensors`; `merge_corrupted`
//! takes `adapter_config.json, SEP, adapter_model.safetensors, SEP, base.safetensors`;
//! `checkpoint_folder` takes `options byte ++ model.safetensors.index.json, SEP, shard 1,
//! SEP, shard 2 [, SEP, config.json]`; `checkpoint_file` takes `options byte ++
//! model.safetensors`. [`join`] builds such an input (seed corpora, regression tests).
//!
//! Every function returns lorakit's `Result` for the input and panics only when an
//! invariant breaks (a written config that does not parse back, an output file half
//! written, a previous output clobbered by a failed merge): a panic is a bug.

#![allow(dead_code)]

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lorakit::checkpoint::convert::{convert_into, is_convertible_float};
use lorakit::checkpoint::header::byte_len;
use lorakit::checkpoint::{Checkpoint, Given};
use lorakit::model::{AdapterPlan, Linear, ModuleSelector};
use lorakit::peft::{
    merge_checkpoint, merge_files, MergeOptions, MergeProgress, MergeReport, OutputDType,
    PeftAdapter, PeftConfig,
};
use lorakit::{BaseKind, FrozenLinear, LoraConfig, Result};
use safetensors::tensor::{Dtype, View};
use serde_json::Value;

/// Separates the parts of a structured input.
pub const SEP: &[u8] = b"\n\xffLORAKIT-FUZZ-PART\xff\n";

/// The largest base layer side and size the harness itself builds (its own allocations
/// must stay small: the library's are what is under test).
const MAX_SIDE: usize = 4096;
const MAX_ELEMS: usize = 1 << 16;
/// At most this many module paths are attached per input.
const MAX_PATHS: usize = 16;

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
        assert_eq!(
            config.targets.is_target_kind(path, BaseKind::Embedding),
            again.targets.is_target_kind(path, BaseKind::Embedding)
        );
        assert_eq!(
            config.targets.is_module_to_save(path),
            again.targets.is_module_to_save(path)
        );
        assert_eq!(config.bias, again.bias);
        let _ = config.adalora_mask(path);
    }
    let plan = config.fresh_plan(
        VarBuilder::zeros(DType::F32, &Device::Cpu),
        &LoraConfig::default(),
    )?;
    if let Some(path) = paths.iter().find(|p| plan.is_target(p)) {
        // A base bias when the adapter trains one or adds `lora_B.bias` to it.
        let bias = (config.lora_bias || config.bias != lorakit::peft::BiasMode::None)
            .then(|| base_weight(1, 4, DType::F32).and_then(|b| Ok(b.flatten_all()?)))
            .transpose()?;
        let base = FrozenLinear::new(base_weight(4, 4, DType::F32)?, bias)?;
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
        // The kind the file implies (an embedding for `lora_embedding_A`, a Conv1D under
        // fan_in_fan_out), with a bias when it has a `lora_B.bias` or the config trains biases.
        let kind = adapter.base_kind(path);
        let weight = base_weight(d_out, d_in, dtype)?;
        let stored = if kind.stores_in_out() {
            weight.t()?.contiguous()?
        } else {
            weight
        };
        // A `lora_B.bias` needs a base bias to merge into (PEFT refuses the merge too).
        let wants_bias = options & 4 != 0 || adapter.changes_bias(path);
        let bias = (kind != BaseKind::Embedding && wants_bias)
            .then(|| base_weight(1, d_out, dtype).and_then(|b| Ok(b.flatten_all()?)))
            .transpose()?;
        let base = FrozenLinear::from_stored(kind, stored, bias)?;
        exercise_layer(plan.adapt(path, base)?, d_in)?;
    }
    build_base_modules(&adapter, &plan, dtype)?;
    plan.finish()?;
    Ok(())
}

/// Builds, as model code would, the base modules the file stores tensors for besides its
/// adapted ones (`modules_to_save` copies, biases trained under `bias = "all"`): a linear
/// layer when it stores a 2-D weight, else the bias of a module the model builds itself.
fn build_base_modules(adapter: &PeftAdapter, plan: &AdapterPlan, dtype: DType) -> Result<()> {
    let adapted: HashSet<String> = adapter.module_paths().into_iter().collect();
    let mut done = HashSet::new();
    for key in adapter.tensor_names() {
        let Some((module, _)) = key
            .strip_prefix("base_model.model.")
            .and_then(|rel| rel.rsplit_once('.'))
        else {
            continue;
        };
        let module = ["base_layer", "modules_to_save", "original_module"]
            .iter()
            .find_map(|w| module.strip_suffix(&format!(".{w}")))
            .unwrap_or(module);
        if adapted.contains(module) || !done.insert(module.to_string()) || done.len() > 64 {
            continue;
        }
        let stored = |name: &str| adapter.tensor(&format!("base_model.model.{module}.{name}"));
        let bias = stored("bias").or_else(|| stored("modules_to_save.bias"));
        let bias_len = bias.and_then(|b| b.dims().first().copied());
        match stored("weight").map(|w| w.dims().to_vec()).as_deref() {
            Some(&[out, inp]) if out <= MAX_SIDE && inp <= MAX_SIDE && out * inp <= MAX_ELEMS => {
                let bias = match bias_len {
                    Some(n) if n == out => Some(base_weight(1, n, dtype)?.flatten_all()?),
                    _ => None,
                };
                let base = FrozenLinear::new(base_weight(out, inp, dtype)?, bias)?;
                exercise_layer(plan.adapt(module, base)?, inp)?;
            }
            _ => {
                if let Some(n) = bias_len.filter(|&n| n <= MAX_SIDE) {
                    plan.bias(module, base_weight(1, n, dtype)?.flatten_all()?)?;
                }
            }
        }
    }
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
    let d_in = dim(
        &[
            "lora_A.weight",
            "lora_A",
            "lora_embedding_A",
            "base_model.vera_A",
        ],
        1,
    )
    .unwrap_or(4);
    let d_out = dim(
        &[
            "lora_B.weight",
            "lora_B",
            "lora_embedding_B",
            "vera_lambda_b",
            "lora_magnitude_vector",
            "lora_B.bias",
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

/// Runs an adapted layer on 2-D and 3-D inputs (token ids for an embedding), merged and
/// unmerged; a trainable copy or bias on one input.
fn exercise_layer(layer: Linear, d_in: usize) -> Result<()> {
    let layer = match layer {
        Linear::Adapted(layer) => layer,
        Linear::Trainable(module) => {
            let x = input_for(module.original(), d_in)?;
            let _ = module.forward_checked(&x)?;
            return Ok(());
        }
        Linear::Frozen(_) => return Ok(()),
    };
    let x = input_for(layer.read().base(), d_in)?;
    let _ = layer.read().forward_t(&x, false)?;
    let _ = layer.read().forward_t(&x.unsqueeze(0)?, true)?;
    layer.write().merge(true)?;
    let _ = layer.read().forward_t(&x, false)?;
    layer.write().unmerge()?;
    let _ = layer.read().forward_t(&x, false)?;
    Ok(())
}

/// A 3-row input for `base`: floats `(3, d_in)`, or token ids below `d_in` for an embedding.
fn input_for(base: &FrozenLinear, d_in: usize) -> Result<Tensor> {
    if base.kind() == BaseKind::Embedding {
        let ids: Vec<u32> = (0..3u32).map(|i| i % d_in.max(1) as u32).collect();
        return Ok(Tensor::new(ids.as_slice(), &Device::Cpu)?);
    }
    base_weight(3, d_in, base.dtype())
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

// ---------------------------------------------------------------------------------------
// Checkpoints: `Checkpoint::open` and `merge_checkpoint` on a fuzzed folder or file.
// ---------------------------------------------------------------------------------------

/// The index and shard names `checkpoint_folder` writes its parts to.
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// See [`INDEX_NAME`].
pub const SHARD_NAMES: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];
/// The `config.json` written beside the shards when the input has no fourth part.
const DEFAULT_CONFIG: &[u8] = br#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#;

/// The adapters merged into every checkpoint: PEFT's LoRA and DoRA of the tiny Llama of
/// `tests/fixtures/checkpoints/`, trimmed to `model.layers.0.self_attn.q_proj` (a 16 × 16
/// weight, r = 4) by `fuzz/make_seeds.py`.
const LORA: [&[u8]; 2] = [
    include_bytes!("../adapters/lora/adapter_config.json"),
    include_bytes!("../adapters/lora/adapter_model.safetensors"),
];
/// See [`LORA`].
const DORA: [&[u8]; 2] = [
    include_bytes!("../adapters/dora/adapter_config.json"),
    include_bytes!("../adapters/dora/adapter_model.safetensors"),
];

/// A process id no process has (Linux's `pid_max` is at most 2^22): a temporary named
/// after it is a leftover of a killed run.
const DEAD_PID: u32 = u32::MAX;

/// The options byte of `checkpoint_folder` and `checkpoint_file`.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointOptions {
    /// Bits 0-1: the output dtype (keep, F32, F16, BF16).
    pub dtype: OutputDType,
    /// Bit 2: merge the DoRA adapter (else the LoRA one).
    pub dora: bool,
    /// Bit 3: `checkpoint_folder` names the base by its index file (else the folder);
    /// `checkpoint_file` has no previous output (else `out.safetensors` exists).
    pub bit3: bool,
    /// Bit 4: the output path is an existing folder (`checkpoint_folder`: empty, so the
    /// merge may replace it; `checkpoint_file`: holding a file, so the merge must refuse).
    pub out_dir: bool,
    /// Bit 5: a temporary left by a killed run lies beside the output.
    pub leftover: bool,
    /// Bit 6: `MergeOptions::remove_leftovers`.
    pub remove_leftovers: bool,
    /// Bit 7: cancel the merge from its progress callback at the second tick.
    pub cancel: bool,
}

impl CheckpointOptions {
    /// Decodes the options byte.
    pub fn from_byte(b: u8) -> Self {
        let bit = |i: u8| b & (1 << i) != 0;
        Self {
            dtype: [
                OutputDType::Keep,
                OutputDType::F32,
                OutputDType::F16,
                OutputDType::BF16,
            ][usize::from(b & 3)],
            dora: bit(2),
            bit3: bit(3),
            out_dir: bit(4),
            leftover: bit(5),
            remove_leftovers: bit(6),
            cancel: bit(7),
        }
    }
}

fn write_file(p: &Path, b: &[u8]) {
    std::fs::write(p, b).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// The names in a folder, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| {
            e.expect("a dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Every file of a folder with its bytes (the inputs, to check a merge left them alone).
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    listing(dir)
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).expect("read an input file");
            (n, bytes)
        })
        .collect()
}

/// Target `checkpoint_folder`: the index, two shards and `config.json` of the input are
/// written to `model/` in a fresh temporary directory (a part that is empty is not written:
/// no index, one shard), `Checkpoint::open` checks what it opens, then `merge_checkpoint`
/// merges the embedded adapter into `out/`. On success the output folder must open with
/// the input's shard names, tensors (merged, copied or converted exactly), index (with
/// `total_size` the sum of the tensors' bytes) and other files; on failure `out` must be as
/// before (absent or an empty folder). Either way the inputs are unchanged and no
/// temporary is left.
pub fn checkpoint_folder(data: &[u8]) -> Result<MergeReport> {
    let Some((&options, rest)) = data.split_first() else {
        return Ok(MergeReport::default());
    };
    let o = CheckpointOptions::from_byte(options);
    let [index, shard_a, shard_b, config] = split::<4>(rest);
    let config = if config.is_empty() {
        DEFAULT_CONFIG
    } else {
        config
    };
    let tmp = TempDir::new();
    let dir = &tmp.0;
    let model = dir.join("model");
    std::fs::create_dir(&model).expect("create model/");
    for (name, bytes) in [
        (INDEX_NAME, index),
        (SHARD_NAMES[0], shard_a),
        (SHARD_NAMES[1], shard_b),
        ("config.json", config),
    ] {
        if !bytes.is_empty() {
            write_file(&model.join(name), bytes);
        }
    }
    let base = if o.bit3 {
        model.join(INDEX_NAME)
    } else {
        model.clone()
    };
    run_checkpoint_merge(dir, &base, &model, "out", o)
}

/// Target `checkpoint_file`: the input's safetensors file is written to a fresh temporary
/// directory beside an existing `out.safetensors` (unless options bit 3), `Checkpoint::open`
/// checks what it opens, then `merge_checkpoint` merges the embedded adapter into
/// `out.safetensors`. On success the output must open with the input's tensors (merged,
/// copied or converted exactly) and `__metadata__`; on failure the previous output must be
/// byte-for-byte untouched (or still absent). No temporary may be left.
pub fn checkpoint_file(data: &[u8]) -> Result<MergeReport> {
    let Some((&options, file)) = data.split_first() else {
        return Ok(MergeReport::default());
    };
    let o = CheckpointOptions::from_byte(options);
    let tmp = TempDir::new();
    let dir = &tmp.0;
    let model = dir.join("model");
    std::fs::create_dir(&model).expect("create model/");
    write_file(&model.join("model.safetensors"), file);
    let base = model.join("model.safetensors");
    run_checkpoint_merge(dir, &base, &model, "out.safetensors", o)
}

/// What `out` held before the merge.
#[derive(Debug, PartialEq, Eq)]
enum Previous {
    Absent,
    File(Vec<u8>),
    Folder(Vec<String>),
}

fn previous(out: &Path) -> Previous {
    match std::fs::symlink_metadata(out) {
        Err(_) => Previous::Absent,
        Ok(m) if m.is_dir() => Previous::Folder(listing(out)),
        Ok(_) => Previous::File(std::fs::read(out).expect("read the previous output")),
    }
}

/// The shared body of the two checkpoint targets: `dir` holds `adapter/` (empty) and the
/// input folder `model/`; `base` is the checkpoint to open; the output is `dir/out_name`.
fn run_checkpoint_merge(
    dir: &Path,
    base: &Path,
    model: &Path,
    out_name: &str,
    o: CheckpointOptions,
) -> Result<MergeReport> {
    let is_file = out_name.ends_with(".safetensors");
    let [config, weights] = if o.dora { DORA } else { LORA };
    write_file(&dir.join("adapter/adapter_config.json"), config);
    write_file(&dir.join("adapter/adapter_model.safetensors"), weights);
    let out = dir.join(out_name);
    if is_file {
        if o.out_dir {
            std::fs::create_dir(&out).expect("create out/");
            write_file(&out.join("previous"), PREVIOUS_OUTPUT);
        } else if !o.bit3 {
            write_file(&out, PREVIOUS_OUTPUT);
        }
    } else if o.out_dir {
        std::fs::create_dir(&out).expect("create out/");
    }
    let leftover = dir.join(format!(".{out_name}.tmp{DEAD_PID}.0"));
    if o.leftover {
        write_file(&leftover, b"left by a killed run");
    }
    let inputs = snapshot(model);
    let before = previous(&out);

    let opened = Checkpoint::open(base);
    if let Ok(ckpt) = &opened {
        check_opened(ckpt);
    }

    let (mut ticks, mut last) = (0usize, (0usize, 0u64));
    let mut progress = |p: &MergeProgress<'_>| {
        assert!(p.tensors_done <= p.tensors_total, "progress: {p:?}");
        assert!(p.bytes_done <= p.bytes_total, "progress: {p:?}");
        assert!(
            (p.tensors_done, p.bytes_done) >= last,
            "progress went back: {p:?}"
        );
        last = (p.tensors_done, p.bytes_done);
        ticks += 1;
        if o.cancel && ticks == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let result = merge_checkpoint(
        base,
        &dir.join("adapter"),
        &out,
        MergeOptions {
            dtype: o.dtype,
            progress: Some(&mut progress),
            remove_leftovers: o.remove_leftovers,
            pad_token_id: None,
        },
    );

    assert!(
        snapshot(model) == inputs,
        "the merge changed its input folder"
    );
    match (&result, &opened) {
        (Ok(report), Ok(ckpt)) => {
            assert!(!(o.cancel && ticks >= 2), "a cancelled merge returned Ok");
            check_merged(ckpt, &out, report, o);
            if o.leftover {
                let named = |w: &String| w.contains(&format!(".tmp{DEAD_PID}.0"));
                assert!(report.warnings.iter().any(named), "{:?}", report.warnings);
                assert_eq!(leftover.exists(), !o.remove_leftovers, "the leftover");
            }
        }
        (Ok(_), Err(e)) => panic!("merge succeeded on a checkpoint that does not open: {e}"),
        (Err(_), _) => assert_eq!(previous(&out), before, "a failed merge changed the output"),
    }
    if o.leftover && !o.remove_leftovers {
        let kept = std::fs::read(&leftover).expect("the leftover is kept");
        assert_eq!(kept, b"left by a killed run");
    }
    let mut expected = vec!["adapter".to_string(), "model".to_string()];
    if std::fs::symlink_metadata(&out).is_ok() {
        expected.push(out_name.to_string());
    }
    if leftover.exists() {
        expected.push(leftover.file_name().unwrap().to_string_lossy().into_owned());
    }
    expected.sort();
    assert_eq!(listing(dir), expected, "stray files beside the output");
    result
}

/// What `Checkpoint::open` returned must hold together: every listed tensor is `get`-able
/// from its shard, lies inside its file after the header, sized by its dtype and shape, the
/// tensors of a shard back to back up to the end of the file, and each loads (float and
/// common integer dtypes must) with its shape. Loading allocates the tensor's length, which
/// the checks above bound by the file's size.
fn check_opened(ckpt: &Checkpoint) {
    let mut count = 0;
    for shard in ckpt.shards() {
        let file_len = std::fs::metadata(&shard.path).expect("a shard").len();
        let mut end: Option<u64> = None;
        for t in shard.header.tensors() {
            count += 1;
            let t_end = t.offset.checked_add(t.len);
            assert!(
                t_end.is_some_and(|e| e <= file_len),
                "`{}` ({} + {}) runs past the {file_len}-byte {}",
                t.name,
                t.offset,
                t.len,
                shard.file_name
            );
            if let Some(e) = end {
                assert_eq!(
                    t.offset, e,
                    "`{}` does not follow the previous tensor",
                    t.name
                );
            }
            assert!(t.offset >= 8, "`{}` overlaps the header length", t.name);
            end = t_end;
            assert_eq!(
                Some(t.len),
                byte_len(t.dtype, &t.shape),
                "`{}` size",
                t.name
            );
            let (s, got) = ckpt.get(&t.name).expect("a listed tensor is get-able");
            assert_eq!((s.file_name.as_str(), got), (shard.file_name.as_str(), t));
            assert!(ckpt.contains(&t.name));
            match ckpt.load(&t.name, &Device::Cpu) {
                Ok(x) => assert_eq!(x.dims(), t.shape.as_slice(), "`{}` loaded", t.name),
                Err(e) => assert!(
                    !matches!(
                        t.dtype,
                        Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::U8 | Dtype::I64
                    ),
                    "`{}` ({:?}) does not load: {e}",
                    t.name,
                    t.dtype
                ),
            }
        }
        if let Some(e) = end {
            assert_eq!(
                e, file_len,
                "{}: data does not end the file",
                shard.file_name
            );
        }
    }
    assert_eq!(count, ckpt.len(), "tensors listed vs held");
    let _ = (ckpt.config_json(), ckpt.companion_files(), ckpt.index());
}

/// The dtype the merge writes a tensor stored as `stored` in.
fn output_dtype(dtype: OutputDType, stored: Dtype) -> Dtype {
    match (dtype, is_convertible_float(stored)) {
        (_, false) | (OutputDType::Keep, _) => stored,
        (OutputDType::F32, _) => Dtype::F32,
        (OutputDType::F16, _) => Dtype::F16,
        (OutputDType::BF16, _) => Dtype::BF16,
    }
}

fn candle_of(dtype: Dtype) -> DType {
    match dtype {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        _ => DType::BF16,
    }
}

/// A successful merge's output, against its input `ckpt`.
fn check_merged(ckpt: &Checkpoint, out: &Path, report: &MergeReport, o: CheckpointOptions) {
    let merged = Checkpoint::open(out)
        .unwrap_or_else(|e| panic!("merge returned Ok but its output does not open: {e}"));
    let given = if ckpt.given() == Given::File {
        Given::File
    } else {
        Given::Folder
    };
    assert_eq!(merged.given(), given, "output kind");
    assert_eq!(report.tensors, ckpt.len(), "report.tensors");
    assert_eq!(report.shards, ckpt.shards().len(), "report.shards");
    let names = |c: &Checkpoint| -> Vec<String> {
        c.shards().iter().map(|s| s.file_name.clone()).collect()
    };
    assert_eq!(merged.shards().len(), ckpt.shards().len(), "shard count");
    if given == Given::Folder {
        assert_eq!(names(&merged), names(ckpt), "shard names");
    }

    // The expected merged weights come from a fresh plan of the same adapter.
    let [config, weights] = if o.dora { DORA } else { LORA };
    let adapter = PeftAdapter::from_bytes(
        std::str::from_utf8(config).expect("UTF-8 config"),
        weights,
        &Device::Cpu,
    )
    .expect("the embedded adapter loads");
    let plan = adapter.plan().expect("the embedded adapter plans");
    let mut total = 0u64;
    let mut merged_paths = Vec::new();
    for (si, so) in ckpt.shards().iter().zip(merged.shards()) {
        assert_eq!(
            si.header.user_metadata(),
            so.header.user_metadata(),
            "{}: __metadata__",
            si.file_name
        );
        let (ti, to) = (si.header.tensors(), so.header.tensors());
        assert_eq!(ti.len(), to.len(), "{}: tensor count", si.file_name);
        for (ti, to) in ti.iter().zip(to) {
            assert_eq!(
                (&ti.name, &ti.shape),
                (&to.name, &to.shape),
                "names and shapes"
            );
            let dtype = output_dtype(o.dtype, ti.dtype);
            assert_eq!(to.dtype, dtype, "`{}` dtype", ti.name);
            total += to.len;
            let input = si.read_tensor_bytes(ti).expect("read an input tensor");
            let got = so.read_tensor_bytes(to).expect("read an output tensor");
            let target = ti
                .name
                .strip_suffix(".weight")
                .filter(|p| ti.shape.len() == 2 && plan.is_target(p));
            let merged_weight = match target {
                Some(p) => {
                    let w = ckpt.load(&ti.name, &Device::Cpu).expect("load a target");
                    plan.merged_weight(p, &w)
                        .expect("a fresh plan merges what the merge merged")
                        .map(|m| (p, m))
                }
                None => None,
            };
            let want = match merged_weight {
                Some((p, m)) => {
                    merged_paths.push(p.to_string());
                    let m = m
                        .to_dtype(candle_of(dtype))
                        .expect("cast the merged weight");
                    View::data(&m).into_owned()
                }
                None if dtype == ti.dtype => input,
                None => {
                    let mut v = Vec::new();
                    convert_into(ti.dtype, dtype, &input, &mut v);
                    v
                }
            };
            assert!(
                got == want,
                "`{}` in {}: wrong bytes",
                ti.name,
                so.file_name
            );
        }
    }
    assert_eq!(report.merged, merged_paths, "report.merged");

    if given == Given::File {
        assert!(
            report.copied.is_empty(),
            "copied files beside a single file"
        );
        return;
    }
    // The folder: shards, index, and the input folder's other files, copied.
    let mut files = names(ckpt);
    let companions: Vec<String> = ckpt
        .companion_files()
        .expect("list companions")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(report.copied, companions, "report.copied");
    for name in &companions {
        let (a, b) = (ckpt.folder().join(name), out.join(name));
        assert!(
            std::fs::read(a).ok() == std::fs::read(b).ok(),
            "{name} copied"
        );
    }
    files.extend(companions);
    match (ckpt.index(), merged.index()) {
        (None, None) => {}
        (Some((ni, ii)), Some((no, io))) => {
            assert_eq!(ni, no, "index name");
            files.push(no.to_string());
            let strip = |m: &serde_json::Map<String, Value>| {
                let mut m = m.clone();
                if let Some(Value::Object(meta)) = m.get_mut("metadata") {
                    meta.remove("total_size");
                    if meta.is_empty() {
                        // The output adds `metadata` to an index without one.
                        m.remove("metadata");
                    }
                }
                m
            };
            assert_eq!(strip(ii), strip(io), "the index, total_size aside");
            // A `metadata` that is not an object is passed through as it is.
            if matches!(ii.get("metadata"), None | Some(Value::Object(_))) {
                let size = io
                    .get("metadata")
                    .and_then(|m| m.get("total_size"))
                    .and_then(Value::as_u64);
                assert_eq!(
                    size,
                    Some(total),
                    "index total_size vs the shards' tensor bytes"
                );
            }
        }
        (i, m) => panic!("index in: {:?}, out: {:?}", i.map(|i| i.0), m.map(|m| m.0)),
    }
    files.sort();
    files.dedup();
    assert_eq!(listing(out), files, "the output folder's files");
}
