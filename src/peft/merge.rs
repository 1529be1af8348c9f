//! `lorakit merge`: fold a PEFT adapter into a model checkpoint, as PEFT's
//! `merge_and_unload()` does, in streaming memory.
//!
//! The checkpoint is never held: each tensor is read (positioned reads), merged if the
//! adapter targets it, and written at its place in its output shard, whose header is computed
//! from shapes and dtypes before any data. Untargeted tensors are copied in chunks. Peak
//! memory is a few times the largest *adapted* weight, whatever the checkpoint's size.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Storage, Tensor};
use safetensors::tensor::Dtype;
use serde_json::Value;

use crate::checkpoint::convert::{
    convert_into, decode_f32, encode_f32, is_convertible_float, stored_float,
};
use crate::checkpoint::header::byte_len;
use crate::checkpoint::stacked_params::{
    registered_parameters, stacked_part, stacked_whole, unwrapped, StackedRows,
};
use crate::checkpoint::{Checkpoint, Given, Shard, ShardWriter, StoredTensor};
use crate::error::{Error, Result};
use crate::model::plan::AdapterPlan;
use crate::model::ParameterLora;
use crate::peft::inspect::{
    adds_module, base_model_mismatch, base_module_of, classify_keys, load_adapter, match_modules,
    untied_heads, Fit,
};
use crate::peft::load::KEY_PREFIX;
use crate::peft::load::{PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};
use crate::peft::merged_config::merged_config_edit;
use crate::peft::module_names::ModuleNames;
use crate::peft::tied_head::{
    heads_to_untie, missing_head_hint, untie_by_hand_warning, UntiedHead,
};
use crate::peft::weights_file::PICKLE_WEIGHTS_FILE;
use crate::staging::{
    check_destination, leftovers, remove_leftovers, OutputKind, StagedDir, StagedFile,
};

/// Bytes copied per piece for tensors the adapter does not touch.
const COPY_CHUNK: usize = 8 << 20;
/// Elements summed and encoded per piece of a merged weight.
const MERGE_PIECE: usize = 1 << 20;

/// The dtype of the merged checkpoint's float tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputDType {
    /// Each tensor keeps its stored dtype.
    #[default]
    Keep,
    /// Every float tensor (F64, F32, F16, BF16) written as F32.
    F32,
    /// … as F16.
    F16,
    /// … as BF16.
    BF16,
}

impl OutputDType {
    /// The dtype a tensor stored as `stored` is written in.
    fn apply(self, stored: Dtype) -> Dtype {
        if !is_convertible_float(stored) {
            return stored;
        }
        match self {
            OutputDType::Keep => stored,
            OutputDType::F32 => Dtype::F32,
            OutputDType::F16 => Dtype::F16,
            OutputDType::BF16 => Dtype::BF16,
        }
    }
}

impl FromStr for OutputDType {
    type Err = Error;

    /// `keep`, `f32`, `f16`, `bf16` (also `float32`, `float16`, `bfloat16`).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "keep" => Ok(Self::Keep),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            _ => Err(Error::Unsupported {
                what: "output dtype",
                got: s.to_string(),
                supported: "keep, f32, f16, bf16".to_string(),
            }),
        }
    }
}

/// Where a merge is, passed to [`MergeOptions::progress`] after every tensor (and every
/// copied piece of a large one).
#[derive(Clone, Debug)]
pub struct MergeProgress<'a> {
    /// The tensor being written.
    pub tensor: &'a str,
    /// The output file it goes to.
    pub shard: &'a str,
    /// Tensors completely written so far.
    pub tensors_done: usize,
    /// Tensors in the checkpoint.
    pub tensors_total: usize,
    /// Input bytes processed so far.
    pub bytes_done: u64,
    /// Input tensor bytes in all.
    pub bytes_total: u64,
}

/// A progress callback: `ControlFlow::Break(())` cancels the merge (nothing is written).
pub type ProgressFn<'a> = dyn FnMut(&MergeProgress<'_>) -> ControlFlow<()> + 'a;

/// Options of [`merge_checkpoint`].
#[derive(Default)]
pub struct MergeOptions<'a> {
    /// The output's float dtype (default: keep each tensor's).
    pub dtype: OutputDType,
    /// Called as the merge advances; returning `Break` cancels it cleanly.
    pub progress: Option<&'a mut ProgressFn<'a>>,
    /// Delete temporaries of the same destination left by an earlier killed run (see
    /// [`crate::staging::leftovers`]) instead of only reporting them.
    pub remove_leftovers: bool,
    /// The `pad_token_id` to write in the output's `config.json`: the id the model was
    /// trained with, which a PEFT adapter does not record (a decoder classifies a batch of
    /// more than one row only with one set). An error for an output without a
    /// `config.json` (a checkpoint given as a file, or a folder without one).
    pub pad_token_id: Option<u32>,
}

impl std::fmt::Debug for MergeOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergeOptions")
            .field("dtype", &self.dtype)
            .field("progress", &self.progress.is_some())
            .field("remove_leftovers", &self.remove_leftovers)
            .field("pad_token_id", &self.pad_token_id)
            .finish()
    }
}

/// What a merge did.
#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    /// The module paths whose weights were merged, in file order (a stacked parameter
    /// stored whole, as gpt-oss's experts are, by its own name).
    pub merged: Vec<String>,
    /// Number of tensors written.
    pub tensors: usize,
    /// Number of safetensors files written.
    pub shards: usize,
    /// Files copied beside the weights (config.json, tokenizer files …), by name.
    pub copied: Vec<String>,
    /// Tensors the checkpoint lacked that the adapter's `modules_to_save` copies added (a
    /// classifier head trained on a pretrained encoder), by name.
    pub added: Vec<String>,
    /// Output heads tied to the input embedding that the merge wrote as tensors of their
    /// own (the table with the head's adapter merged), as `head (tied to table)`; the
    /// copied `config.json` then says `tie_word_embeddings: false`.
    pub untied: Vec<String>,
    /// What the merge changed in the copied `config.json` (a `SEQ_CLS` adapter's head
    /// added to a checkpoint without one: the classifier's `architectures` and labels; a
    /// head untied), one line each.
    pub config_changes: Vec<String>,
    /// The checkpoint's tensors the merge left out, by name: a causal LM's head
    /// (`lm_head.weight`) or a BERT's pre-training heads (`cls.*`) when a `SEQ_CLS` merge
    /// makes it a classifier, which has none (PEFT's merged save has no such tensors
    /// either).
    pub dropped: Vec<String>,
    /// Things the user should know that did not stop the merge (a base model that looks
    /// different from the adapter's, leftovers of an earlier killed run).
    pub warnings: Vec<String>,
}

/// Writes `out`: the checkpoint `base` with the PEFT adapter in `adapter_dir` merged into
/// every weight it targets (`<module>.weight`), as PEFT's `merge_and_unload()` computes it
/// on the model loaded in the checkpoint's dtype (in f32, each variant's own merge, then
/// rounded to the output dtype; what PEFT's half-precision model holds rounded before it
/// merges, PiSSA's residual for one, is rounded first: see
/// [`AdapterPlan::merged_module`](crate::model::AdapterPlan::merged_module)), every other
/// tensor copied. A `modules_to_save` module the checkpoint lacks altogether — a
/// classifier head trained on a pretrained encoder, which transformers initialises at
/// random when it loads the encoder — is added
/// from the adapter at the end of the last shard (and in the index), as
/// `merge_and_unload()` leaves it in the model ([`MergeReport::added`]). For a `SEQ_CLS`
/// adapter the copied `config.json` then describes the classifier as PEFT's merged model
/// saves it: `architectures` `…ForSequenceClassification` and one `id2label` entry per row
/// of the head ([`MergeReport::config_changes`]; a decoder without `pad_token_id` gets a
/// warning). Without that, transformers reads the checkpoint as a 2-label classifier. A
/// causal LM's own head (`lm_head.*`, GPT-NeoX's `embed_out.*`) or an encoder's
/// pre-training heads (BERT's `cls.*`, RoBERTa's `lm_head.*`) are then left out, as the
/// classifier has none ([`MergeReport::dropped`]), unless they fill a shard other than the
/// last on their own (then it stays, with a warning: leaving it out would leave a shard with
/// no tensors, which the shard names announce).
///
/// An adapter on an output head tied to the input embedding (`lm_head` of a checkpoint
/// saved with `tie_word_embeddings`, which has no `lm_head.weight`) is merged into a copy of
/// the embedding's table, written as `lm_head.weight` at the end of the last shard, and the
/// copied `config.json` says `tie_word_embeddings: false` ([`MergeReport::untied`]): the
/// merged model gives the unmerged adapter's logits. PEFT's own merge changes the shared
/// table instead, embedding included, and keeps the head tied, which does not. A head the
/// adapter trained in full (`modules_to_save`) is added, and untied in `config.json`, as
/// PEFT's merged save does.
///
/// `base` is a `.safetensors` file (then `out` is a file) or a model folder or its
/// `*.safetensors.index.json` (then `out` is a folder mirroring it: the same shard names and
/// tensor-to-shard assignment, an index with the new `total_size`, and the folder's other
/// files such as `config.json` and tokenizer files). Tensors keep their order and
/// `__metadata__`.
///
/// Everything that can be checked is checked before any data is written: the destination
/// (absent, a regular file for a file, an empty folder for a folder; never one of the
/// inputs), the adapter's modules against the checkpoint's tensors and dtypes. The output is
/// built beside `out` and renamed into place, so an error or a cancel leaves nothing.
///
/// ```no_run
/// use lorakit::peft::{merge_checkpoint, MergeOptions, OutputDType};
/// # fn main() -> lorakit::Result<()> {
/// let report = merge_checkpoint(
///     "models/Qwen2.5-0.5B".as_ref(),
///     "my-adapter".as_ref(),
///     "merged".as_ref(),
///     MergeOptions { dtype: OutputDType::BF16, ..Default::default() },
/// )?;
/// println!("merged {} modules into {} shard(s)", report.merged.len(), report.shards);
/// # Ok(()) }
/// ```
pub fn merge_checkpoint(
    base: &Path,
    adapter_dir: &Path,
    out: &Path,
    options: MergeOptions<'_>,
) -> Result<MergeReport> {
    let ckpt = Checkpoint::open(base)?;
    ckpt.check_bnb4_states()?;
    let kind = match ckpt.given() {
        Given::File => OutputKind::File,
        Given::Folder | Given::Index => OutputKind::Folder,
    };
    refuse_overwrite(out, &ckpt, adapter_dir)?;
    check_destination(out, kind)?;
    let mut report = MergeReport::default();
    if options.remove_leftovers {
        for p in remove_leftovers(out)? {
            report
                .warnings
                .push(format!("removed {} (left by a killed run)", p.display()));
        }
    } else {
        for p in leftovers(out) {
            report.warnings.push(format!(
                "{} was left by an earlier killed run; delete it (or pass --remove-leftovers)",
                p.display()
            ));
        }
    }

    let adapter = load_adapter(adapter_dir)?;
    let plan = adapter.plan()?;
    let parameters = parameter_loras(&adapter, &plan, &ckpt)?;
    let AdapterFit {
        names,
        added,
        untied,
    } = check_adapter_fits(&adapter, &ckpt)?;
    for a in &added {
        // The plan's copy of the tensor, so that `finish` counts it as used.
        plan.stored_tensor(&a.module, &a.own)?;
    }
    if let Some(w) = base_model_mismatch(&adapter, &ckpt) {
        report.warnings.push(w);
    }
    let heads = heads_to_untie(
        &ckpt,
        &untied,
        added.iter().map(|a| (a.name.as_str(), a.value.dims())),
    );
    // The edited config.json (a classifier's, untied heads, a given pad_token_id), read
    // and checked before any data is written.
    let mut config_edit = merged_config_edit(
        &adapter,
        &ckpt,
        added
            .iter()
            .map(|a| (a.module.as_str(), a.own.as_str(), a.value.dims())),
        &heads,
        options.pad_token_id,
    )?;
    if let (None, Some(id)) = (&config_edit, options.pad_token_id) {
        return Err(Error::checkpoint(
            ckpt.path(),
            format!(
                "pad_token_id {id} was given, but the output has no config.json to write it \
                 in (a checkpoint given as a single file, or a folder without config.json)"
            ),
        ));
    }
    if config_edit.is_none() {
        report
            .warnings
            .extend(heads.iter().map(untie_by_hand_warning));
    }
    report.dropped = config_edit
        .as_ref()
        .map(|edit| edit.dropped.clone())
        .unwrap_or_default();
    // The block scales, code books and quant states of bitsandbytes 4-bit weights, which
    // are written dequantized.
    let packed_parts = ckpt
        .tensors()
        .filter(|(_, t)| ckpt.is_bnb4_part(&t.name))
        .map(|(_, t)| t.name.clone());
    let dropped: HashSet<String> = report.dropped.iter().cloned().chain(packed_parts).collect();
    let dropped_bytes: u64 = ckpt
        .tensors()
        .filter(|(_, t)| dropped.contains(&t.name))
        .map(|(_, t)| t.len)
        .sum();

    let untied_names: Vec<String> = untied.iter().map(|u| u.head.clone()).collect();
    let mut job = MergeJob {
        ckpt: &ckpt,
        plan: &plan,
        adapter: &adapter,
        names,
        parameters,
        stash: HashMap::new(),
        dtype: options.dtype,
        progress: options.progress,
        tensors_total: ckpt.len() + added.len() + untied.len() - dropped.len(),
        bytes_total: ckpt.tensors().map(|(_, t)| t.len).sum::<u64>() - dropped_bytes,
        added,
        untied,
        dropped,
        added_bytes: 0,
        tensors_done: 0,
        bytes_done: 0,
        report,
        read_buf: Vec::new(),
        out_buf: Vec::new(),
    };
    match kind {
        OutputKind::File => {
            let (staged, file) = StagedFile::create(out)?;
            let mut file = file;
            // A checkpoint given as a file has exactly one shard.
            for shard in ckpt.shards() {
                job.write_shard(shard, true, &mut file, out)?;
            }
            plan.finish()?;
            staged.commit_file(file)?;
        }
        OutputKind::Folder => {
            let staged = StagedDir::create(out)?;
            let last = ckpt.shards().len().saturating_sub(1);
            for (i, shard) in ckpt.shards().iter().enumerate() {
                let path = staged.path().join(&shard.file_name);
                let mut file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
                job.write_shard(shard, i == last, &mut file, &path)?;
                file.sync_all().map_err(|e| Error::io(&path, e))?;
            }
            plan.finish()?;
            if let Some((name, index)) = ckpt.index() {
                let path = staged.path().join(name);
                let last_file = ckpt.shards().last().map(|s| s.file_name.clone());
                let text = output_index(
                    index,
                    job.bytes_written_total(),
                    &[job.report.added.clone(), untied_names].concat(),
                    last_file.as_deref().unwrap_or_default(),
                    &job.dropped,
                )?;
                std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
            }
            for file in ckpt.companion_files()? {
                let name = file.file_name().map(|n| n.to_owned()).unwrap_or_default();
                let dest = staged.path().join(&name);
                match config_edit.take_if(|_| name == "config.json") {
                    Some(edit) => {
                        std::fs::write(&dest, edit.text).map_err(|e| Error::io(&dest, e))?;
                        job.report.config_changes.extend(edit.changes);
                        job.report.warnings.extend(edit.warnings);
                    }
                    None => {
                        std::fs::copy(&file, &dest).map_err(|e| Error::io(&file, e))?;
                    }
                }
                job.report.copied.push(name.to_string_lossy().into_owned());
            }
            staged.commit()?;
        }
    }
    job.report.tensors = job.tensors_done;
    job.report.shards = ckpt.shards().len();
    Ok(job.report)
}

/// [`merge_checkpoint`] with default options, for a single `.safetensors` file (kept for
/// callers of the first API; any checkpoint form works).
pub fn merge_files(base: &Path, adapter_dir: &Path, out: &Path) -> Result<MergeReport> {
    merge_checkpoint(base, adapter_dir, out, MergeOptions::default())
}

/// One merge's state while shards are written.
struct MergeJob<'c, 'p> {
    ckpt: &'c Checkpoint,
    plan: &'c AdapterPlan,
    adapter: &'c PeftAdapter,
    /// The checkpoint's names for the adapter's modules.
    names: ModuleNames,
    /// The adapter's LoRAs on parameters, by (module, parameter) ([`parameter_loras`]).
    parameters: ParameterLoras,
    /// Merged tensors computed with an earlier tensor of their module (a module's weight
    /// and bias are merged together) and not written yet, by name; at most one module's.
    stash: HashMap<String, Tensor>,
    /// Tensors the checkpoint lacks that the adapter adds, written at the end of the last
    /// shard.
    added: Vec<AddedTensor>,
    /// Tied heads written untied after them.
    untied: Vec<UntiedHead>,
    /// The data bytes of both, once written.
    added_bytes: u64,
    /// The checkpoint's tensors left out ([`MergeReport::dropped`]).
    dropped: HashSet<String>,
    dtype: OutputDType,
    progress: Option<&'p mut ProgressFn<'p>>,
    tensors_total: usize,
    bytes_total: u64,
    tensors_done: usize,
    bytes_done: u64,
    report: MergeReport,
    /// Reused across tensors: the stored bytes of a weight, and an encoded piece.
    read_buf: Vec<u8>,
    out_buf: Vec<u8>,
}

impl MergeJob<'_, '_> {
    /// Writes `shard`'s tensors, merged or copied, to `file` (named `path` in errors), and,
    /// in the `last` shard, the tensors the adapter adds and the untied heads.
    fn write_shard(
        &mut self,
        shard: &Shard,
        last: bool,
        file: &mut std::fs::File,
        path: &Path,
    ) -> Result<()> {
        let kept: Vec<&StoredTensor> = shard
            .header
            .tensors()
            .iter()
            .filter(|t| !self.dropped.contains(&t.name))
            .collect();
        let mut plan: Vec<(String, Dtype, Vec<usize>)> = kept
            .iter()
            .map(|t| {
                let (shape, dtype) = self.float_view(t);
                (t.name.clone(), self.dtype.apply(dtype), shape)
            })
            .collect();
        let (added, untied) = if last {
            (
                std::mem::take(&mut self.added),
                std::mem::take(&mut self.untied),
            )
        } else {
            Default::default()
        };
        for a in &added {
            plan.push((
                a.name.clone(),
                self.dtype.apply(a.stored_dtype()),
                a.value.dims().to_vec(),
            ));
        }
        for u in &untied {
            plan.push((u.head.clone(), self.dtype.apply(u.dtype), u.shape.clone()));
        }
        let mut writer =
            ShardWriter::begin(file, path, &plan, shard.header.user_metadata().cloned())?;
        let (stored, extra) = plan.split_at(kept.len());
        let (extra, heads) = extra.split_at(added.len());
        for (tensor, (_, out_dtype, _)) in kept.into_iter().zip(stored) {
            if !self.write_merged(tensor, *out_dtype, &mut writer)? {
                self.copy(shard, tensor, *out_dtype, &mut writer)?;
            }
            self.tensors_done += 1;
            self.tick(&tensor.name, &shard.file_name)?;
        }
        for (a, (_, out_dtype, shape)) in added.iter().zip(extra) {
            self.write_f32(&a.value, &a.name, *out_dtype, &mut writer)?;
            self.added_bytes += byte_len(*out_dtype, shape).unwrap_or(0);
            self.report.added.push(a.name.clone());
            self.tensors_done += 1;
            self.tick(&a.name, &shard.file_name)?;
        }
        for (u, (_, out_dtype, shape)) in untied.iter().zip(heads) {
            self.write_untied(u, *out_dtype, &mut writer)?;
            self.added_bytes += byte_len(*out_dtype, shape).unwrap_or(0);
            self.tensors_done += 1;
            self.tick(&u.head, &shard.file_name)?;
        }
        writer.finish().map(drop)
    }

    /// Writes the tied head `u` as a tensor of its own: its embedding table with the head's
    /// adapter merged, the module's own variant merge (in f32, as every merged weight).
    fn write_untied(
        &mut self,
        u: &UntiedHead,
        out_dtype: Dtype,
        writer: &mut ShardWriter<&mut std::fs::File>,
    ) -> Result<()> {
        let stored_path = u.head.strip_suffix(".weight").unwrap_or(&u.head);
        let path = self.names.in_adapter(stored_path);
        let kind = self.adapter.base_kind(&path);
        let merged = match self.read_as_stored(&u.table)? {
            Some(table) => self.plan.merged_module(&path, kind, &table, None)?,
            None => None,
        };
        let Some(merged) = merged else {
            return Err(Error::checkpoint(
                self.ckpt.path(),
                format!(
                    "`{}`, the table `{path}` is tied to, could not be merged",
                    u.table
                ),
            ));
        };
        self.write_f32(&merged.weight, &path, out_dtype, writer)?;
        self.report.merged.push(path.clone());
        self.report
            .untied
            .push(format!("{} (tied to {})", u.head, u.table));
        Ok(())
    }

    /// Writes the merged tensor in `out_dtype` if the adapter changes this tensor's module
    /// (returns whether it did): the module's weight (and bias) are decoded to f32, merged
    /// by the variant's own layer (in f32, checked for non-finite values), or replaced by
    /// the adapter's copy, and encoded a piece at a time. A weight costs about three f32
    /// copies of itself in memory; the module's other tensor waits in the stash.
    fn write_merged(
        &mut self,
        tensor: &StoredTensor,
        out_dtype: Dtype,
        writer: &mut ShardWriter<&mut std::fs::File>,
    ) -> Result<bool> {
        let merged = match self.stash.remove(&tensor.name) {
            Some(t) => t,
            None => match self.merge_parameter_part(tensor)? {
                Some(t) => t,
                None => match self.merge_module_of(tensor)? {
                    Some(t) => t,
                    None => return Ok(false),
                },
            },
        };
        // A module's path; a stack stored whole (gpt-oss) goes by its own name.
        let path = module_of(&tensor.name).map_or(tensor.name.as_str(), |(p, _)| p);
        let (shape, _) = self.float_view(tensor);
        if merged.elem_count() != shape.iter().product::<usize>() {
            return Err(Error::ShapeMismatch {
                layer: path.to_string(),
                what: "merged weight".to_string(),
                expected: format!("{shape:?}"),
                got: format!("{:?} {:?}", merged.dims(), merged.dtype()),
            });
        }
        self.write_f32(&merged, path, out_dtype, writer)?;
        if tensor.name.ends_with(".weight") || stacked_whole(&tensor.name).is_some() {
            self.report.merged.push(path.to_string());
        }
        self.bytes_done += tensor.len;
        Ok(true)
    }

    /// Writes `value` (named `what` in errors) decoded to f32 and encoded as `out_dtype`,
    /// a piece at a time.
    fn write_f32(
        &mut self,
        value: &Tensor,
        what: &str,
        out_dtype: Dtype,
        writer: &mut ShardWriter<&mut std::fs::File>,
    ) -> Result<()> {
        let value = value
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        let (storage, layout) = value.storage_and_layout();
        let values = match &*storage {
            Storage::Cpu(cpu) => f32_slice(cpu, layout),
            _ => None,
        };
        let Some(values) = values else {
            return Err(Error::ShapeMismatch {
                layer: what.to_string(),
                what: "tensor to write".to_string(),
                expected: "contiguous f32 on the CPU".to_string(),
                got: format!("{:?} {:?}", value.dims(), value.dtype()),
            });
        };
        let mut out = std::mem::take(&mut self.out_buf);
        for piece in values.chunks(MERGE_PIECE) {
            out.clear();
            encode_f32(piece, out_dtype, &mut out);
            writer.write(&out)?;
        }
        self.out_buf = out;
        Ok(())
    }

    /// `tensor` plus its part of a LoRA on a stacked parameter (an expert's projection, a
    /// router; or the whole stack, as gpt-oss stores it), in f32, if the adapter has one on
    /// it.
    fn merge_parameter_part(&mut self, tensor: &StoredTensor) -> Result<Option<Tensor>> {
        let delta = if let Some(part) = stacked_part(&tensor.name) {
            let Some(lora) = self.parameters.get(&(part.module, part.param)) else {
                return Ok(None);
            };
            let (start, rows) = part.rows.range(lora.out_in().0);
            (lora.delta_rows(part.expert, start, rows)?, lora)
        } else if let Some(key) = stacked_whole(&tensor.name) {
            let Some(lora) = self.parameters.get(&key) else {
                return Ok(None);
            };
            (whole_delta(lora, tensor.shape.len())?, lora)
        } else {
            return Ok(None);
        };
        let (delta, lora) = delta;
        let key = lora.key().to_string();
        let Some(weight) = self.read_f32(&tensor.name)? else {
            return Err(Error::checkpoint(
                self.ckpt.path(),
                format!(
                    "`{}` is stored as {:?}; the LoRA on `{}` needs a float weight \
                     (F32, F16, BF16, F64) to merge into",
                    tensor.name, tensor.dtype, key
                ),
            ));
        };
        Ok(Some((weight + delta)?))
    }

    /// Merges the module `tensor` belongs to (`<path>.weight` / `<path>.bias`) if the plan
    /// changes it: returns `tensor`'s merged value and stashes the module's other tensor.
    fn merge_module_of(&mut self, tensor: &StoredTensor) -> Result<Option<Tensor>> {
        let Some((stored_path, own)) = module_of(&tensor.name) else {
            return Ok(None);
        };
        let path = &self.names.in_adapter(stored_path);
        let kind = self.adapter.base_kind(path);
        if !is_convertible_float(self.float_view(tensor).1) || !self.plan.touches(path, kind) {
            return Ok(None);
        }
        let weight_name = format!("{stored_path}.weight");
        let bias_name = format!("{stored_path}.bias");
        let weight = self.read_as_stored(&weight_name)?;
        if weight.as_ref().is_none_or(|w| w.rank() != 2) {
            // Not a linear module (a norm under bias = "all"): the adapter's tensor, if any,
            // replaces the stored one.
            return self.plan.stored_tensor(path, own);
        }
        let (Some(weight), bias) = (weight, self.read_f32(&bias_name)?) else {
            return Ok(None);
        };
        let Some(merged) = self
            .plan
            .merged_module(path, kind, &weight, bias.as_ref())?
        else {
            return Ok(None);
        };
        let (mine, other) = match (own, merged.bias) {
            ("weight", bias) => (Some(merged.weight), bias.map(|b| (bias_name, b))),
            (_, bias) => (bias, Some((weight_name, merged.weight))),
        };
        if let Some((name, t)) = other {
            self.stash.insert(name, t);
        }
        Ok(mine)
    }

    /// The checkpoint's tensor `name` in its stored dtype where that is half precision
    /// (F16, BF16), else in f32 (`None` if it has none): what the plan's merge needs to
    /// round a replaced base weight as PEFT's model, in that dtype, holds it.
    fn read_as_stored(&mut self, name: &str) -> Result<Option<Tensor>> {
        let half = match self.ckpt.float_view(name).map(|(_, dtype)| dtype) {
            Some(Dtype::BF16) => Some(DType::BF16),
            Some(Dtype::F16) => Some(DType::F16),
            _ => None,
        };
        let value = self.read_f32(name)?;
        match (value, half) {
            // Exact: the f32 values were decoded from `half`.
            (Some(v), Some(half)) => Ok(Some(v.to_dtype(half)?)),
            (value, _) => Ok(value),
        }
    }

    /// The checkpoint's tensor `name` decoded to f32 (`None` if it has none): for
    /// bitsandbytes 4-bit blocks, their values (in their quant state's dtype) as f32.
    fn read_f32(&mut self, name: &str) -> Result<Option<Tensor>> {
        let Some((shard, stored)) = self.ckpt.get(name) else {
            return Ok(None);
        };
        if self.ckpt.is_bnb4(name) {
            return Ok(Some(self.ckpt.load_bnb4(name)?.dequantize()?));
        }
        if !is_convertible_float(stored.dtype) {
            return Ok(None);
        }
        let mut bytes = std::mem::take(&mut self.read_buf);
        bytes.resize(usize::try_from(stored.len).unwrap_or(usize::MAX), 0);
        shard.read_at(&mut bytes, stored.offset)?;
        let mut values = Vec::new();
        decode_f32(stored.dtype, &bytes, &mut values);
        self.read_buf = bytes;
        Ok(Some(Tensor::from_vec(
            values,
            stored.shape.as_slice(),
            &Device::Cpu,
        )?))
    }

    /// Copies an untargeted tensor in pieces, converting its dtype if asked (bitsandbytes
    /// 4-bit blocks: their dequantized weight).
    fn copy(
        &mut self,
        shard: &Shard,
        tensor: &StoredTensor,
        out_dtype: Dtype,
        writer: &mut ShardWriter<&mut std::fs::File>,
    ) -> Result<()> {
        if self.ckpt.is_bnb4(&tensor.name) {
            if let Some(weight) = self.read_f32(&tensor.name)? {
                self.write_f32(&weight, &tensor.name, out_dtype, writer)?;
            }
            self.bytes_done += tensor.len;
            return Ok(());
        }
        let width = (tensor.dtype.bitsize() / 8).max(1);
        let step = (COPY_CHUNK / width * width).max(width) as u64;
        let mut buf = Vec::new();
        let mut converted = Vec::new();
        let mut done = 0u64;
        while done < tensor.len {
            let n = step.min(tensor.len - done) as usize;
            buf.resize(n, 0);
            shard.read_at(&mut buf, tensor.offset + done)?;
            if out_dtype == tensor.dtype {
                writer.write(&buf)?;
            } else {
                converted.clear();
                convert_into(tensor.dtype, out_dtype, &buf, &mut converted);
                writer.write(&converted)?;
            }
            done += n as u64;
            self.bytes_done += n as u64;
            if done < tensor.len {
                self.tick(&tensor.name, &shard.file_name)?;
            }
        }
        Ok(())
    }

    /// `tensor`'s shape and dtype as a float tensor ([`Checkpoint::float_view`]: the
    /// dequantized weight of bitsandbytes 4-bit blocks).
    fn float_view(&self, tensor: &StoredTensor) -> (Vec<usize>, Dtype) {
        self.ckpt
            .float_view(&tensor.name)
            .unwrap_or_else(|| (tensor.shape.clone(), tensor.dtype))
    }

    /// Reports progress; a `Break` from the callback cancels the merge.
    fn tick(&mut self, tensor: &str, shard: &str) -> Result<()> {
        let Some(progress) = self.progress.as_mut() else {
            return Ok(());
        };
        let state = MergeProgress {
            tensor,
            shard,
            tensors_done: self.tensors_done,
            tensors_total: self.tensors_total,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
        };
        match progress(&state) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => Err(Error::Cancelled {
                what: "merge".to_string(),
            }),
        }
    }

    /// The data bytes of every output tensor (the index's `total_size`), the added ones
    /// included (call it after the shards are written).
    fn bytes_written_total(&self) -> u64 {
        let stored: u64 = self
            .ckpt
            .tensors()
            .filter(|(_, t)| !self.dropped.contains(&t.name))
            .map(|(_, t)| {
                let (shape, dtype) = self.float_view(t);
                byte_len(self.dtype.apply(dtype), &shape).unwrap_or(t.len)
            })
            .sum();
        stored + self.added_bytes
    }
}

/// A contiguous f32 CPU tensor's values, in place.
fn f32_slice<'a>(
    cpu: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> Option<&'a [f32]> {
    let (a, b) = layout.contiguous_offsets()?;
    cpu.as_slice::<f32>().ok()?.get(a..b)
}

/// A tensor's module path and own name: `("<path>", "weight")` for `<path>.weight`, and
/// the same for `.bias`; `None` for other tensors.
fn module_of(name: &str) -> Option<(&str, &'static str)> {
    if let Some(p) = name.strip_suffix(".weight") {
        return Some((p, "weight"));
    }
    name.strip_suffix(".bias").map(|p| (p, "bias"))
}

/// What [`check_adapter_fits`] found.
pub(crate) struct AdapterFit {
    /// The mapping from the adapter's module paths to the checkpoint's names.
    pub names: ModuleNames,
    /// Tensors of `modules_to_save` copies whose module the checkpoint lacks (a classifier
    /// head trained on a pretrained encoder): a merge adds them.
    pub added: Vec<AddedTensor>,
    /// Adapted heads tied to the input embedding ([`crate::peft::tied_head`]): a merge
    /// writes each as a tensor of its own.
    pub untied: Vec<UntiedHead>,
}

/// A tensor the adapter adds to the checkpoint.
pub(crate) struct AddedTensor {
    /// Its name in the checkpoint.
    pub name: String,
    /// Its module's path in the adapter, and `weight` or `bias`.
    pub module: String,
    pub own: String,
    /// Its value (a float tensor).
    pub value: Tensor,
}

impl AddedTensor {
    /// The dtype the adapter stores it in (the output's `OutputDType` applies).
    fn stored_dtype(&self) -> Dtype {
        stored_float(self.value.dtype()).unwrap_or(Dtype::F32)
    }
}

/// A LoRA's change to a stacked parameter stored whole (`rank` 2: the router's `(out, in)`;
/// 3: the experts' `(E, in, out)`, each expert's change transposed, as PEFT's
/// `ParamWrapper` adds it to gpt-oss's transposed stacks), in f32.
fn whole_delta(lora: &ParameterLora, rank: usize) -> Result<Tensor> {
    let out = lora.out_in().0;
    if rank == 2 {
        return lora.delta_rows(0, 0, out);
    }
    let experts = (0..lora.experts())
        .map(|e| Ok(lora.delta_rows(e, 0, out)?.t()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&experts, 0)?)
}

/// An adapter's LoRAs on parameters by (transformers 5's module path, parameter name).
type ParameterLoras = HashMap<(String, &'static str), ParameterLora>;

/// The adapter's LoRAs on parameters (`target_parameters`: a sparse block's stacked expert
/// weights and router), each checked before any work against the checkpoint's per-expert
/// tensors ([`stacked_part`]), or its stacks stored whole (gpt-oss's, [`stacked_whole`]):
/// present, one per expert the LoRA covers, of the shape its change has.
fn parameter_loras(
    adapter: &PeftAdapter,
    plan: &AdapterPlan,
    ckpt: &Checkpoint,
) -> Result<ParameterLoras> {
    let config = adapter.config();
    let mut modules: Vec<String> = adapter
        .module_paths()
        .iter()
        .filter(|p| config.is_parameter_module(p))
        .map(|p| unwrapped(p).to_string())
        .collect();
    modules.sort();
    modules.dedup();
    let mut loras = ParameterLoras::new();
    if modules.is_empty() {
        return Ok(loras);
    }
    // The checkpoint's parts of each stacked parameter: (expert, rows, shape).
    type Parts = Vec<(usize, StackedRows, Vec<usize>)>;
    let mut stored: HashMap<(String, &'static str), Parts> = HashMap::new();
    // Stacked parameters stored whole (gpt-oss): their shapes.
    let mut whole: HashMap<(String, &'static str), Vec<usize>> = HashMap::new();
    for (_, t) in ckpt.tensors() {
        if let Some(key) = stacked_whole(&t.name) {
            whole.insert(key, t.shape.clone());
        }
        if let Some(part) = stacked_part(&t.name) {
            stored.entry((part.module, part.param)).or_default().push((
                part.expert,
                part.rows,
                t.shape.clone(),
            ));
        }
    }
    for module in modules {
        let params = registered_parameters(&module).unwrap_or_default();
        for (param, lora) in params.iter().zip(plan.parameter_lora(&module, params)?) {
            let Some(lora) = lora else { continue };
            let key = (module.clone(), *param);
            let (out, inp) = lora.out_in();
            if let Some(shape) = whole.get(&key) {
                // gpt-oss's stacks are `(E, in, out)` (told from transformers 5's `(E, out,
                // in)` by their `…_bias`, which only gpt-oss stores), its router `(out, in)`.
                let name = format!("{module}.{param}");
                let gpt_oss = ckpt.contains(&format!("{name}_bias")) && lora.experts() > 1;
                if shape.len() == 3 && !gpt_oss {
                    return Err(Error::checkpoint(
                        ckpt.path(),
                        format!(
                            "`{name}` is stored whole without gpt-oss's `{name}_bias`, or with \
                             one expert: lorakit merges whole stacks in gpt-oss's `(E, in, \
                             out)` layout (two or more experts) only"
                        ),
                    ));
                }
                let expected = match shape.len() {
                    2 => vec![out, inp],
                    _ => vec![lora.experts(), inp, out],
                };
                if *shape != expected || (shape.len() == 2 && lora.experts() != 1) {
                    return Err(Error::ShapeMismatch {
                        layer: lora.key().to_string(),
                        what: "the stored stacked parameter for the LoRA on it".to_string(),
                        expected: format!("{expected:?} for {} experts", lora.experts()),
                        got: format!("{shape:?}"),
                    });
                }
                loras.insert(key, lora);
                continue;
            }
            let name = format!("{module}.{param}");
            if ckpt.is_mxfp4(&name) {
                return Err(Error::checkpoint(
                    ckpt.path(),
                    format!(
                        "the adapter has a LoRA on `{name}`, which the checkpoint stores in \
                         MXFP4 (`{name}_blocks`, `…_scales`): merging into quantized experts is \
                         not supported; apply the adapter unmerged (e.g. `lorakit generate \
                         --adapter`), or merge into a bf16 copy of the checkpoint (transformers \
                         writes one: `from_pretrained(dir, quantization_config=\
                         Mxfp4Config(dequantize=True), dtype=torch.bfloat16)`, then \
                         `save_pretrained`)"
                    ),
                ));
            }
            let Some(parts) = stored.get(&key) else {
                return Err(Error::checkpoint(
                    ckpt.path(),
                    format!(
                        "the adapter has a LoRA on `{name}` but the checkpoint has no tensor of \
                         it (an expert's `…experts.E.gate_proj.weight` / `w1`, the router's \
                         `…gate.weight`, or gpt-oss's stacks `…experts.gate_up_proj`; an \
                         adapter for another model?)"
                    ),
                ));
            };
            let experts = parts.iter().map(|(e, _, _)| e + 1).max().unwrap_or(0);
            for (e, rows, shape) in parts {
                let (_, n) = rows.range(out);
                if experts != lora.experts() || shape.as_slice() != [n, inp] {
                    return Err(Error::ShapeMismatch {
                        layer: lora.key().to_string(),
                        what: format!("expert {e}'s stored weight for the LoRA on the parameter"),
                        expected: format!("[{n}, {inp}] for each of {} experts", lora.experts()),
                        got: format!("{shape:?} ({experts} experts stored)"),
                    });
                }
            }
            loras.insert(key, lora);
        }
    }
    Ok(loras)
}

/// Before any work: every module the adapter stores must have a 2-D float weight in the
/// checkpoint, of the shape the adapter's tensors imply; every base tensor it stores must
/// be in the checkpoint with its shape, unless it belongs to a `modules_to_save` module the
/// checkpoint lacks altogether (then it is added).
pub(crate) fn check_adapter_fits(adapter: &PeftAdapter, ckpt: &Checkpoint) -> Result<AdapterFit> {
    let names = ModuleNames::of(adapter, ckpt);
    let modules = match_modules(adapter, ckpt, &names);
    let untied = untied_heads(ckpt, &modules);
    for m in modules {
        let (path, name) = (&m.path, &m.tensor);
        let shape = m.base.as_ref().map(|(s, _)| s.clone()).unwrap_or_default();
        let problem = match m.fit {
            Fit::Fits | Fit::TiedToEmbedding(_) => continue,
            Fit::Missing => format!(
                "the adapter has module `{path}` but the checkpoint has no `{name}` (an \
                 adapter for another model?){}",
                missing_head_hint(name).unwrap_or_default()
            ),
            Fit::NotTwoD => {
                format!("`{name}` has shape {shape:?}; the adapter needs a 2-D linear weight")
            }
            Fit::NotFloat => format!(
                "`{name}` is stored as {:?}; unsupported base weight dtype for a merge \
                 (supported: F32, F16, BF16, F64)",
                m.base.as_ref().map(|(_, d)| *d).unwrap_or(Dtype::F32)
            ),
            Fit::ShapeDiffers if m.kind.stores_in_out() => {
                let dim = |d: Option<usize>| d.map_or_else(|| "?".to_string(), |d| d.to_string());
                format!(
                    "`{name}` has shape {shape:?} (a {} weight, stored (in, out)) but the \
                     adapter's tensors for `{path}` imply [{}, {}] (an adapter for another \
                     model?)",
                    m.kind.name(),
                    dim(m.implied.in_features),
                    dim(m.implied.out_features)
                )
            }
            Fit::ShapeDiffers => format!(
                "`{name}` has shape {shape:?} but the adapter's tensors for `{path}` imply {} \
                 (out, in) (an adapter for another model?)",
                m.implied
            ),
        };
        let file = ckpt
            .get(name)
            .map_or_else(|| ckpt.path().to_path_buf(), |(s, _)| s.path.clone());
        return Err(Error::checkpoint(file, problem));
    }
    let (base_tensors, unknown) = classify_keys(adapter);
    if let Some(key) = unknown.first() {
        return Err(Error::checkpoint(
            adapter_weights_path(adapter),
            format!(
                "the adapter has `{key}`, which is neither a tensor of a LoRA-family module nor \
                 a base tensor PEFT saves ({} such key(s); `lorakit inspect` lists them)",
                unknown.len()
            ),
        ));
    }
    let mut added = Vec::new();
    for rel in base_tensors {
        let (module, own) = base_module_of(&rel);
        let name = names.in_checkpoint(&format!("{module}.{own}"));
        let stored = adapter
            .tensor(&format!("{KEY_PREFIX}{rel}"))
            .map(|t| t.dims().to_vec())
            .unwrap_or_default();
        let tied = untied.iter().find(|u| u.head == name);
        let problem = match ckpt.get(&name) {
            // PEFT's copy of a tied head's table (`lm_head.base_layer.weight`).
            None if tied.is_some_and(|u| u.shape == stored) => continue,
            None if adds_module(adapter, ckpt, &names, module) => {
                let value = adapter.tensor(&format!("{KEY_PREFIX}{rel}")).cloned();
                if let Some(value) = value.filter(|v| v.dtype().is_float()) {
                    added.push(AddedTensor {
                        name,
                        module: module.to_string(),
                        own: own.to_string(),
                        value,
                    });
                    continue;
                }
                format!("the adapter stores `{rel}`, which is not a float tensor, for a module the checkpoint lacks")
            }
            None => format!(
                "the adapter stores `{rel}` for the base tensor `{name}`, which the checkpoint \
                 does not have (an adapter for another model?)"
            ),
            Some((_, t)) if t.shape != stored => format!(
                "the adapter stores `{rel}` with shape {stored:?} but the checkpoint's `{name}` \
                 has shape {:?} (an adapter for another model?)",
                t.shape
            ),
            Some(_) => continue,
        };
        return Err(Error::checkpoint(ckpt.path(), problem));
    }
    Ok(AdapterFit {
        names,
        added,
        untied,
    })
}

/// The adapter's weights file, for messages.
fn adapter_weights_path(adapter: &PeftAdapter) -> PathBuf {
    PathBuf::from(adapter.source())
}

/// The index for the output: the input's, with `metadata.total_size` recomputed, the
/// `added` tensors mapped to the shard `added_to` and the `dropped` ones removed.
fn output_index(
    index: &serde_json::Map<String, Value>,
    total_size: u64,
    added: &[String],
    added_to: &str,
    dropped: &HashSet<String>,
) -> Result<String> {
    let mut index = index.clone();
    if let Some(Value::Object(map)) = index.get_mut("weight_map") {
        map.retain(|name, _| !dropped.contains(name));
        for name in added {
            map.insert(name.clone(), Value::from(added_to));
        }
    }
    let metadata = index
        .entry("metadata")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Value::Object(m) = metadata {
        m.insert("total_size".to_string(), Value::from(total_size));
    }
    serde_json::to_string_pretty(&Value::Object(index))
        .map(|s| s + "\n")
        .map_err(|e| Error::json(INDEX_OUT, &e))
}

const INDEX_OUT: &str = "model.safetensors.index.json";

/// Errors if `out` is, or would replace, one of the inputs: the checkpoint (its file, folder
/// or shards) or the adapter's folder and files.
fn refuse_overwrite(out: &Path, ckpt: &Checkpoint, adapter_dir: &Path) -> Result<()> {
    let Ok(out_real) = std::fs::canonicalize(out) else {
        return Ok(()); // does not exist yet
    };
    let mut inputs: Vec<PathBuf> = vec![
        adapter_dir.to_path_buf(),
        adapter_dir.join(CONFIG_FILE),
        adapter_dir.join(WEIGHTS_FILE),
        adapter_dir.join(PICKLE_WEIGHTS_FILE),
        ckpt.path().to_path_buf(),
    ];
    inputs.extend(ckpt.shards().iter().map(|s| s.path.clone()));
    if ckpt.given() != Given::File {
        inputs.push(ckpt.folder().to_path_buf());
    }
    for input in inputs {
        if std::fs::canonicalize(&input).is_ok_and(|i| i == out_real) {
            return Err(Error::checkpoint(
                out,
                format!("refusing to overwrite the input {}", input.display()),
            ));
        }
    }
    Ok(())
}
