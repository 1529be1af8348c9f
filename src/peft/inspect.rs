//! `lorakit inspect`: a summary of a PEFT adapter directory ([`inspect`]), and which of a
//! checkpoint's tensors its modules apply to ([`inspect_against`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::Device;
use safetensors::tensor::Dtype;

use crate::checkpoint::convert::is_convertible_float;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::frozen::BaseKind;
use crate::model::plan::COPY_WRAPPER_NAMES;
use crate::peft::config::PeftType;
use crate::peft::load::{PeftAdapter, CONFIG_FILE, KEY_PREFIX, MODEL_KEY_PREFIX, WEIGHTS_FILE};
use crate::peft::merged_config::merged_config_edit;
use crate::peft::module_names::ModuleNames;
use crate::peft::tied_head::{heads_to_untie, tied_table, untie_by_hand_warning, UntiedHead};
use crate::peft::weights_file::PICKLE_WEIGHTS_FILE;
use crate::variants::build::peft_tensor_suffixes;
pub use crate::variants::build::ImpliedShape;
use crate::variants::lora::{lora_scale, LORA_B_BIAS};
use crate::variants::lora_embedding::EMBEDDING_A;
use serde_json::Value;

/// One adapted module as stored in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleSummary {
    /// The module path (a LoRA on a stacked parameter: the parameter's key, with its
    /// number of experts when more than one).
    pub path: String,
    /// Its rank (as stored: AdaLoRA's kept ranks).
    pub rank: usize,
    /// The scale PEFT applies to its low-rank product.
    pub scale: f64,
    /// What kind of module the adapter takes it for (embedding, Conv1D, linear).
    pub kind: BaseKind,
    /// Whether it has a bias on B (`lora_B.bias`).
    pub lora_bias: bool,
}

/// What `lorakit inspect` prints.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// The adapter type (`LORA (DoRA)`, `VERA`, …).
    pub kind: String,
    /// `target_modules` as written in the config.
    pub targets: String,
    /// Per-module rank and scale, sorted by path.
    pub modules: Vec<ModuleSummary>,
    /// Trainable scalars (VeRA's frozen shared pair excluded).
    pub trainable_params: usize,
    /// The dtypes of the stored tensors.
    pub dtypes: Vec<String>,
    /// The config's options beyond rank and targets, one line each (`fan_in_fan_out`,
    /// `lora_bias`, `bias`, `modules_to_save`, `layers_to_transform`).
    pub options: Vec<String>,
    /// Base tensors the adapter stores, which replace the base model's on load and merge
    /// (`modules_to_save` copies, trained biases, PEFT's `base_layer.weight` copies), by
    /// key without `base_model.model.`.
    pub base_tensors: Vec<String>,
    /// Keys lorakit does not understand: loading or merging the adapter stops at them.
    pub unknown: Vec<String>,
}

/// Reads the adapter in `dir` and summarizes it. A `dir` that is a model checkpoint rather
/// than an adapter folder gets an error that says so ([`not_an_adapter`]).
pub fn inspect(dir: &Path) -> Result<AdapterSummary> {
    let adapter = load_adapter(dir)?;
    let c = adapter.config();
    let rows = |key: String| {
        adapter
            .tensor(&format!("{KEY_PREFIX}{key}"))
            .and_then(|t| t.dims().first().copied())
    };
    let mut modules = Vec::new();
    for path in adapter.module_paths() {
        // A LoRA on a stacked parameter: listed under the parameter's key, its rank per
        // expert.
        if let Some(key) = c.parameter_at(&path) {
            let s = c.ranks.for_module(&key);
            let experts = rows(format!("{path}.lora_A.weight")).unwrap_or(0) / s.r.max(1);
            modules.push(ModuleSummary {
                path: match experts {
                    1 => key,
                    e => format!("{key} ({e} experts)"),
                },
                rank: s.r,
                scale: lora_scale(s.alpha, s.r, c.use_rslora),
                kind: BaseKind::Linear,
                lora_bias: false,
            });
            continue;
        }
        let s = c.ranks.for_module(&path);
        let (rank, scale) = match c.peft_type {
            PeftType::Lora => {
                let r = rows(format!("{path}.lora_A.weight"))
                    .or_else(|| rows(format!("{path}.{EMBEDDING_A}")))
                    .unwrap_or(s.r);
                (r, lora_scale(s.alpha, r, c.use_rslora))
            }
            PeftType::AdaLora => (
                rows(format!("{path}.lora_A")).unwrap_or(0),
                s.alpha / (c.ranks.r as f64 + 1e-5),
            ),
            PeftType::Vera => (rows(format!("{path}.vera_lambda_d")).unwrap_or(0), 1.0),
        };
        let kind = adapter.base_kind(&path);
        let lora_bias = adapter
            .tensor(&format!("{KEY_PREFIX}{path}.{LORA_B_BIAS}"))
            .is_some();
        modules.push(ModuleSummary {
            path,
            rank,
            scale,
            kind,
            lora_bias,
        });
    }
    let (base_tensors, unknown) = classify_keys(&adapter);
    let mut dtypes = Vec::new();
    let mut trainable_params = 0;
    for name in adapter.tensor_names() {
        let Some(t) = adapter.tensor(&name) else {
            continue;
        };
        let d = format!("{:?}", t.dtype()).to_lowercase();
        if !dtypes.contains(&d) {
            dtypes.push(d);
        }
        if !name.starts_with(KEY_PREFIX) || name.contains(".original_module.") {
            continue; // VeRA's shared, frozen projections; a copy's untrained original
        }
        trainable_params += t.elem_count();
    }
    let mut targets = c
        .raw
        .get("target_modules")
        .map(|v| v.to_string())
        .unwrap_or_default();
    if !c.target_parameters.is_empty() {
        targets += &format!("; target_parameters: {:?}", c.target_parameters);
    }
    Ok(AdapterSummary {
        kind: c.describe(),
        targets,
        modules,
        trainable_params,
        dtypes,
        options: option_lines(c),
        base_tensors,
        unknown,
    })
}

/// The config's options beyond rank and targets, as `inspect` prints them.
fn option_lines(c: &crate::peft::PeftConfig) -> Vec<String> {
    let mut lines = Vec::new();
    if c.fan_in_fan_out {
        lines.push("fan_in_fan_out: true (weights stored (in, out), as GPT-2's Conv1D)".into());
    }
    if c.lora_bias {
        lines.push("lora_bias: true (a trainable bias on B)".into());
    }
    if c.bias != crate::model::BiasMode::None {
        lines.push(format!(
            "bias: {} (trained biases saved with the adapter)",
            c.bias.as_str()
        ));
    }
    if !c.targets.modules_to_save.is_empty() {
        lines.push(format!(
            "modules_to_save: {} (full trainable copies)",
            c.targets.modules_to_save.join(", ")
        ));
    }
    if let Some(f) = &c.targets.layers {
        let patterns: Vec<&str> = f.patterns().collect();
        let pattern = if patterns.is_empty() {
            String::new()
        } else {
            format!(", layers_pattern: {}", patterns.join(", "))
        };
        lines.push(format!("layers_to_transform: {:?}{pattern}", f.indexes));
    }
    if let Ok(Some(residual)) = c.base_residual() {
        lines.push(format!(
            "init_lora_weights: {} (the targeted base weights become a residual on load, \
             as in PEFT; recomputed by lorakit's loads and merges)",
            residual.name()
        ));
    }
    // What loading onto a model or merging would refuse (Activated LoRA, an init that
    // changes the base weights in a way lorakit does not recompute): said here, before a
    // merge is tried.
    let scope = crate::error::Scope::Settings("adapter_config.json".into());
    if let Err(refused) = crate::peft::lora_extensions::check_computable(&c.raw, scope) {
        lines.push(format!("not computed by lorakit (load, merge): {refused}"));
    }
    lines
}

/// Whether `rel` (a key without `base_model.model.`) is a base tensor this config saves: a
/// `modules_to_save` copy's tensors (and its wrapper's duplicates), a trained bias under
/// the config's `bias`, or a `base_layer.weight` copy (PEFT's for targeted embeddings and
/// heads; lorakit's Delta-LoRA weight).
fn is_base_tensor(c: &crate::peft::PeftConfig, rel: &str) -> bool {
    use crate::model::BiasMode;
    let module = |name: &str| {
        rel.strip_suffix(name)
            .and_then(|p| p.strip_suffix('.'))
            .filter(|p| !p.is_empty())
    };
    let copy = |name: &str| module(name).is_some_and(|p| c.targets.is_module_to_save(p));
    COPY_WRAPPER_NAMES.iter().any(|n| copy(n))
        || copy("weight")
        || copy("bias")
        || (c.bias == BiasMode::All && module("bias").is_some())
        || module("base_layer.bias").is_some()
        || module("base_layer.weight").is_some()
}

/// The file's keys that are base tensors (see [`AdapterSummary::base_tensors`]) and those
/// lorakit does not understand, each without `base_model.model.`.
pub(crate) fn classify_keys(adapter: &PeftAdapter) -> (Vec<String>, Vec<String>) {
    let (mut base, mut unknown) = (Vec::new(), Vec::new());
    for key in adapter.tensor_names() {
        let Some(rel) = key.strip_prefix(KEY_PREFIX) else {
            // Model-level tensors (VeRA's shared pair) belong to the adapter.
            if !key.starts_with(MODEL_KEY_PREFIX) {
                unknown.push(key);
            }
            continue;
        };
        let adapter_tensor = peft_tensor_suffixes().any(|s| {
            rel.strip_suffix(s)
                .is_some_and(|p| p.ends_with('.') && p.len() > 1)
        });
        if adapter_tensor {
            continue;
        }
        if is_base_tensor(adapter.config(), rel) {
            base.push(rel.to_string());
        } else {
            unknown.push(rel.to_string());
        }
    }
    (base, unknown)
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "type: {}", self.kind)?;
        writeln!(f, "target_modules: {}", self.targets)?;
        writeln!(f, "dtype: {}", self.dtypes.join(", "))?;
        writeln!(f, "trainable parameters: {}", self.trainable_params)?;
        for option in &self.options {
            writeln!(f, "{option}")?;
        }
        writeln!(f, "modules ({}):", self.modules.len())?;
        for m in &self.modules {
            write!(f, "  {}  rank {}  scale {}", m.path, m.rank, m.scale)?;
            if m.kind != BaseKind::Linear {
                write!(f, "  {}", m.kind.name())?;
            }
            if m.lora_bias {
                write!(f, "  +lora_B.bias")?;
            }
            writeln!(f)?;
        }
        if !self.base_tensors.is_empty() {
            writeln!(
                f,
                "base tensors replaced on load and merge, or added where the checkpoint lacks \
                 them ({}):",
                self.base_tensors.len()
            )?;
            for name in &self.base_tensors {
                writeln!(f, "  {name}")?;
            }
        }
        if !self.unknown.is_empty() {
            writeln!(
                f,
                "NOT UNDERSTOOD ({}; loading and merging stop at them):",
                self.unknown.len()
            )?;
            for name in &self.unknown {
                writeln!(f, "  {name}")?;
            }
        }
        Ok(())
    }
}

/// Loads the adapter in `dir` on the CPU; when that fails because `dir` is not an adapter
/// folder at all, the error says what it is instead.
pub(crate) fn load_adapter(dir: &Path) -> Result<PeftAdapter> {
    PeftAdapter::load(dir, &Device::Cpu).map_err(|e| not_an_adapter(dir).unwrap_or(e))
}

/// When `dir` is not a PEFT adapter folder (it has no `adapter_config.json`) but a model
/// checkpoint (a `.safetensors` file, a model folder or an index), or one of an adapter's
/// two files, an error that says so; `None` otherwise (then the error of loading it as an
/// adapter is the one to show). Meant for a command given its arguments the wrong way round.
///
/// ```
/// use lorakit::peft::inspect::not_an_adapter;
/// # fn main() {
/// let dir = std::path::Path::new("tests/fixtures/checkpoints/llama_f32_sharded");
/// let err = not_an_adapter(dir).expect("a checkpoint, not an adapter");
/// assert!(err.to_string().contains("not a PEFT adapter"));
/// assert!(not_an_adapter("tests/fixtures/checkpoints/llama_adapters/lora".as_ref()).is_none());
/// # }
/// ```
pub fn not_an_adapter(dir: &Path) -> Option<Error> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    if dir.is_file()
        && matches!(
            name.as_deref(),
            Some(CONFIG_FILE | WEIGHTS_FILE | PICKLE_WEIGHTS_FILE)
        )
    {
        return Some(Error::checkpoint(
            dir,
            "is one of an adapter's files; give the adapter's folder (the one holding \
             adapter_config.json and adapter_model.safetensors)",
        ));
    }
    if dir.join(CONFIG_FILE).is_file() {
        return None;
    }
    let ckpt = Checkpoint::open(dir).ok()?;
    Some(Error::checkpoint(
        dir,
        format!(
            "is a model checkpoint ({} tensor(s) in {} file(s)), not a PEFT adapter folder \
             (there is no {CONFIG_FILE})",
            ckpt.len(),
            ckpt.shards().len()
        ),
    ))
}

/// How an adapter module's base weight fits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fit {
    /// A 2-D float weight of the shape the adapter's tensors imply: a merge applies to it.
    Fits,
    /// The checkpoint has no `<path>.weight`.
    Missing,
    /// The checkpoint has no `<path>.weight` because the module is an output head tied to
    /// the input embedding whose table it names (`model.embed_tokens.weight`): the adapter
    /// applies to that table, and a merge writes the head as a tensor of its own, untied
    /// (see [`crate::peft::merge_checkpoint`]).
    TiedToEmbedding(String),
    /// The weight is not 2-D (not a linear layer's).
    NotTwoD,
    /// The weight's dtype is not a float a merge can compute in (a quantized weight).
    NotFloat,
    /// The weight is 2-D but not the shape the adapter's tensors imply.
    ShapeDiffers,
}

/// One adapter module and the base tensor it applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleMatch {
    /// The module path (`model.layers.0.self_attn.q_proj`).
    pub path: String,
    /// The base tensor it applies to (`<path>.weight`).
    pub tensor: String,
    /// That tensor's shape and dtype in the checkpoint, when it has it.
    pub base: Option<(Vec<usize>, Dtype)>,
    /// The shape the adapter's tensors imply for it, `(out, in)`.
    pub implied: ImpliedShape,
    /// The kind of module the adapter takes it for (an embedding, a Conv1D under
    /// `fan_in_fan_out`, else a linear layer): Conv1D and embedding weights are stored
    /// `(in, out)`.
    pub kind: BaseKind,
    /// Whether it fits.
    pub fit: Fit,
}

impl ModuleMatch {
    /// Whether a merge applies to the module: its weight [`Fit::Fits`], or it is a head
    /// [`Fit::TiedToEmbedding`].
    pub fn fits(&self) -> bool {
        matches!(self.fit, Fit::Fits | Fit::TiedToEmbedding(_))
    }
}

/// Which of a checkpoint's tensors an adapter applies to: what [`inspect_against`] returns
/// and `lorakit inspect ADAPTER --base CHECKPOINT` prints.
#[derive(Clone, Debug)]
pub struct CheckpointMatch {
    /// The checkpoint, as given.
    pub checkpoint: PathBuf,
    /// Its number of tensors.
    pub tensors: usize,
    /// Its number of safetensors files.
    pub shards: usize,
    /// Every module the adapter file stores, sorted by path.
    pub modules: Vec<ModuleMatch>,
    /// 2-D `.weight` tensors of the checkpoint that the config's `target_modules` select but
    /// the adapter file has no tensors for (a merge stops at the first: a missing tensor).
    pub targeted_without_tensors: Vec<String>,
    /// 2-D `.weight` tensors of the checkpoint the adapter leaves alone (embeddings, heads,
    /// linears it does not target; not those a merge leaves out, [`Self::dropped`]), by
    /// name.
    pub untargeted: Vec<String>,
    /// Tensors of `modules_to_save` copies whose module the checkpoint lacks (a head
    /// trained on a pretrained encoder), by name: a merge adds them.
    pub added: Vec<String>,
    /// What a merge into a folder would change in its `config.json` for such a head (see
    /// [`crate::peft::merge_checkpoint`]), one line each; empty otherwise.
    pub config_changes: Vec<String>,
    /// The checkpoint's tensors such a merge would leave out (a causal LM's head, a BERT's
    /// pre-training heads: the classifier has none), by name.
    pub dropped: Vec<String>,
    /// Things worth knowing that are not a mismatch of tensors: the adapter's
    /// `base_model_name_or_path` and the checkpoint's `config.json` naming different models.
    pub warnings: Vec<String>,
}

impl CheckpointMatch {
    /// Whether a merge of the adapter into the checkpoint would find every module's weight:
    /// every module fits, and no weight the config targets lacks its tensors.
    pub fn all_fit(&self) -> bool {
        self.modules.iter().all(ModuleMatch::fits) && self.targeted_without_tensors.is_empty()
    }
}

/// Matches the PEFT adapter in `adapter_dir` against the checkpoint at `checkpoint` (a
/// `.safetensors` file, a model folder or its index): for each module the adapter stores,
/// the base tensor it applies to (`<path>.weight`), that tensor's shape and dtype, and
/// whether it fits (found, 2-D, a float, the `(out, in)` shape the adapter's tensors imply);
/// the weights the config targets that the file has no tensors for; and the checkpoint's
/// other 2-D weights, which the adapter does not target. Reads the checkpoint's headers
/// only, never its tensor data.
///
/// ```
/// use lorakit::peft::inspect::{inspect_against, Fit};
/// # fn main() -> lorakit::Result<()> {
/// let m = inspect_against(
///     "tests/fixtures/checkpoints/llama_adapters/dora".as_ref(),
///     "tests/fixtures/checkpoints/llama_f32_sharded".as_ref(),
/// )?;
/// assert!(m.all_fit());
/// let q = &m.modules[0];
/// assert_eq!(q.tensor, format!("{}.weight", q.path));
/// assert_eq!(q.fit, Fit::Fits);
/// // The embeddings, the head and the linears DoRA was not put on.
/// assert!(m.untargeted.iter().any(|t| t == "lm_head.weight"));
/// println!("{m}");
/// # Ok(()) }
/// ```
pub fn inspect_against(adapter_dir: &Path, checkpoint: &Path) -> Result<CheckpointMatch> {
    let adapter = load_adapter(adapter_dir)?;
    let ckpt = Checkpoint::open(checkpoint)?;
    let plan = adapter.plan()?;
    let names = ModuleNames::of(&adapter, &ckpt);
    let modules = match_modules(&adapter, &ckpt, &names);
    let base_keys = classify_keys(&adapter).0;
    let added_keys: Vec<(&str, &str, Vec<usize>)> = base_keys
        .iter()
        .map(|rel| {
            let (module, own) = base_module_of(rel);
            let dims = adapter
                .tensor(&format!("{KEY_PREFIX}{rel}"))
                .map(|t| t.dims().to_vec())
                .unwrap_or_default();
            (module, own, dims)
        })
        .filter(|(module, _, _)| adds_module(&adapter, &ckpt, &names, module))
        .collect();
    let added_names: Vec<(String, &[usize])> = added_keys
        .iter()
        .map(|(module, own, dims)| {
            let name = names.in_checkpoint(&format!("{module}.{own}"));
            (name, dims.as_slice())
        })
        .collect();
    let mut added: Vec<String> = added_names.iter().map(|(n, _)| n.clone()).collect();
    added.sort();
    // The heads a merge would write that the checkpoint ties: merged from their table, or
    // the adapter's copy.
    let heads = heads_to_untie(
        &ckpt,
        &untied_heads(&ckpt, &modules),
        added_names.iter().map(|(n, d)| (n.as_str(), *d)),
    );
    let mut warnings: Vec<String> = base_model_mismatch(&adapter, &ckpt).into_iter().collect();
    let (config_changes, dropped) = match merged_config_edit(
        &adapter,
        &ckpt,
        added_keys.iter().map(|(m, o, d)| (*m, *o, d.as_slice())),
        &heads,
        None,
    )? {
        Some(edit) => (edit.changes, edit.dropped),
        None => {
            warnings.extend(heads.iter().map(untie_by_hand_warning));
            Default::default()
        }
    };
    let stored: BTreeSet<&str> = modules.iter().map(|m| m.path.as_str()).collect();
    let (mut targeted_without_tensors, mut untargeted) = (Vec::new(), Vec::new());
    for (_, t) in ckpt.tensors() {
        let Some(path) = t.name.strip_suffix(".weight") else {
            continue;
        };
        if t.shape.len() != 2 || stored.contains(path) || dropped.contains(&t.name) {
            continue;
        }
        if plan.is_target(path) {
            targeted_without_tensors.push(t.name.clone());
        } else {
            untargeted.push(t.name.clone());
        }
    }
    targeted_without_tensors.sort();
    untargeted.sort();
    Ok(CheckpointMatch {
        checkpoint: checkpoint.to_path_buf(),
        tensors: ckpt.len(),
        shards: ckpt.shards().len(),
        modules,
        targeted_without_tensors,
        untargeted,
        added,
        config_changes,
        dropped,
        warnings,
    })
}

/// The base module and own name (`weight`, `bias`) of a base tensor the adapter stores
/// (`rel`, its key without PEFT's prefix): `<p>.weight|bias`, `<p>.base_layer.*`,
/// `<p>.modules_to_save.*` and `<p>.original_module.*` all replace (or duplicate)
/// `<p>.weight|bias`.
pub(crate) fn base_module_of(rel: &str) -> (&str, &str) {
    let (module, own) = rel.rsplit_once('.').unwrap_or((rel, ""));
    let module = ["base_layer", "modules_to_save", "original_module"]
        .iter()
        .find_map(|w| module.strip_suffix(&format!(".{w}")))
        .unwrap_or(module);
    (module, own)
}

/// Whether a merge adds `module` to `ckpt`: one of the adapter's `modules_to_save` (a
/// trained head) that the checkpoint lacks altogether (neither weight nor bias).
pub(crate) fn adds_module(
    adapter: &PeftAdapter,
    ckpt: &Checkpoint,
    names: &ModuleNames,
    module: &str,
) -> bool {
    adapter.config().targets.is_module_to_save(module)
        && ["weight", "bias"].iter().all(|own| {
            ckpt.get(&names.in_checkpoint(&format!("{module}.{own}")))
                .is_none()
        })
}

/// The heads among `modules` tied to the input embedding ([`Fit::TiedToEmbedding`], the
/// table [`match_modules`] found), each with its table's shape and dtype: a merge writes
/// them as tensors of their own.
pub(crate) fn untied_heads(ckpt: &Checkpoint, modules: &[ModuleMatch]) -> Vec<UntiedHead> {
    modules
        .iter()
        .filter_map(|m| match &m.fit {
            Fit::TiedToEmbedding(table) => {
                ckpt.get(table).map(|(_, t)| UntiedHead::of(&m.tensor, t))
            }
            _ => None,
        })
        .collect()
}

/// Each module the adapter stores, matched with its base tensor in `ckpt` (headers only).
pub(crate) fn match_modules(
    adapter: &PeftAdapter,
    ckpt: &Checkpoint,
    names: &ModuleNames,
) -> Vec<ModuleMatch> {
    let glue = adapter.config().glue().ok();
    adapter
        .module_paths()
        .into_iter()
        // LoRA on parameters: matched by `merge`'s own check ([`crate::checkpoint::stacked_params`]).
        .filter(|path| !adapter.config().is_parameter_module(path))
        .map(|path| {
            let layer_dims = |suffix: &str| {
                adapter
                    .tensor(&format!("{KEY_PREFIX}{path}.{suffix}"))
                    .map(|t| t.dims().to_vec())
            };
            let model_dims = |name: &str| {
                adapter
                    .tensor(&format!("{MODEL_KEY_PREFIX}{name}"))
                    .map(|t| t.dims().to_vec())
            };
            let implied = glue
                .map(|g| g.implied_shape(&layer_dims, &model_dims))
                .unwrap_or_default();
            let tensor = names.in_checkpoint(&format!("{path}.weight"));
            let kind = adapter.base_kind(&path);
            let base = ckpt.float_view(&tensor);
            let out_in = |shape: &[usize]| match (kind.stores_in_out(), shape) {
                (true, &[inp, out]) => vec![out, inp],
                _ => shape.to_vec(),
            };
            let fit = match &base {
                None => tied_table(ckpt, &tensor, |shape| implied.admits(shape))
                    .map_or(Fit::Missing, |tied| Fit::TiedToEmbedding(tied.table)),
                Some((shape, _)) if shape.len() != 2 => Fit::NotTwoD,
                Some((_, dtype)) if !is_convertible_float(*dtype) => Fit::NotFloat,
                Some((shape, _)) if !implied.admits(&out_in(shape)) => Fit::ShapeDiffers,
                Some(_) => Fit::Fits,
            };
            ModuleMatch {
                path,
                tensor,
                base,
                implied,
                kind,
                fit,
            }
        })
        .collect()
}

/// The last component of a tensor's module path (`k_proj` for
/// `model.layers.0.self_attn.k_proj.weight`), to group names.
fn module_kind(tensor: &str) -> &str {
    let path = tensor.strip_suffix(".weight").unwrap_or(tensor);
    path.rsplit('.').next().unwrap_or(path)
}

fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}").to_lowercase()
}

impl fmt::Display for ModuleMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.path, self.tensor)?;
        if let Some((shape, dtype)) = &self.base {
            write!(f, "  {shape:?} {}", dtype_name(*dtype))?;
        }
        match &self.fit {
            Fit::Fits => write!(f, "  ok"),
            Fit::TiedToEmbedding(table) => write!(
                f,
                "  ok: tied to {table} (tie_word_embeddings); a merge writes it untied"
            ),
            Fit::Missing => write!(f, "  MISSING: the checkpoint has no such tensor"),
            Fit::NotTwoD => write!(f, "  MISMATCH: not a 2-D linear weight"),
            Fit::NotFloat => write!(f, "  MISMATCH: not a float weight (quantized?)"),
            Fit::ShapeDiffers => write!(
                f,
                "  MISMATCH: the adapter's tensors imply {} (out, in)",
                self.implied
            ),
        }
    }
}

impl fmt::Display for CheckpointMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fitting = self.modules.iter().filter(|m| m.fits()).count();
        writeln!(
            f,
            "checkpoint: {} ({} tensors in {} file(s))",
            self.checkpoint.display(),
            self.tensors,
            self.shards
        )?;
        writeln!(f, "matched: {fitting} of {} module(s)", self.modules.len())?;
        for m in &self.modules {
            writeln!(f, "  {m}")?;
        }
        if !self.targeted_without_tensors.is_empty() {
            writeln!(
                f,
                "targeted by target_modules but not in the adapter file ({}):",
                self.targeted_without_tensors.len()
            )?;
            for t in &self.targeted_without_tensors {
                writeln!(f, "  {t}")?;
            }
        }
        if !self.added.is_empty() {
            writeln!(
                f,
                "added by a merge (modules_to_save the checkpoint lacks): {}",
                self.added.join(", ")
            )?;
        }
        for change in &self.config_changes {
            writeln!(f, "a merge's config.json: {change}")?;
        }
        if !self.dropped.is_empty() {
            writeln!(
                f,
                "left out by a merge (pre-training heads, which the classifier has not): {}",
                self.dropped.join(", ")
            )?;
        }
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for t in &self.untargeted {
            *kinds.entry(module_kind(t)).or_default() += 1;
        }
        let kinds: Vec<String> = kinds
            .into_iter()
            .map(|(k, n)| {
                if n == 1 {
                    k.to_string()
                } else {
                    format!("{k} x{n}")
                }
            })
            .collect();
        write!(
            f,
            "not targeted: {} 2-D weight(s) of the checkpoint",
            self.untargeted.len()
        )?;
        if kinds.is_empty() {
            writeln!(f)
        } else {
            writeln!(f, " ({})", kinds.join(", "))
        }
    }
}

/// A warning when the adapter's `base_model_name_or_path` and the checkpoint's config.json
/// name different models: different `_name_or_path`s (last path component), or an adapter
/// name that mentions another model family than the checkpoint's `model_type`.
pub(crate) fn base_model_mismatch(adapter: &PeftAdapter, ckpt: &Checkpoint) -> Option<String> {
    let adapter_base = adapter.config().base_model_name_or_path()?;
    let config = ckpt.config_json()?;
    let last = |s: &str| {
        s.trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    let str_of = |k: &str| config.get(k).and_then(Value::as_str).map(str::to_string);
    if let Some(name) = str_of("_name_or_path").filter(|n| !n.is_empty()) {
        if last(&name) != last(adapter_base) {
            return Some(format!(
                "the adapter was trained on `{adapter_base}` but the checkpoint's config.json \
                 says `{name}`"
            ));
        }
        return None;
    }
    let model_type = str_of("model_type")?;
    let family_of = |s: &str| -> Option<&'static str> {
        let s = s.to_ascii_lowercase().replace(['-', '_', '.'], "");
        MODEL_FAMILIES
            .iter()
            .find(|(_, keys)| keys.iter().any(|k| s.contains(k)))
            .map(|(f, _)| *f)
    };
    let (Some(adapter_family), Some(ckpt_family)) =
        (family_of(&last(adapter_base)), family_of(&model_type))
    else {
        return None;
    };
    (adapter_family != ckpt_family).then(|| {
        let arch = config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or(&model_type);
        format!(
            "the adapter was trained on `{adapter_base}` ({adapter_family}) but the checkpoint \
             is a {arch} (model_type `{model_type}`)"
        )
    })
}

/// Model families by the substrings of their names (after removing `-`, `_`, `.`); the
/// more specific first.
const MODEL_FAMILIES: &[(&str, &[&str])] = &[
    ("Qwen", &["qwen"]),
    ("Mistral", &["mistral", "mixtral"]),
    ("Gemma", &["gemma"]),
    ("Phi", &["phi"]),
    ("GPT-2", &["gpt2"]),
    ("GPT-NeoX", &["gptneox", "pythia"]),
    ("BERT", &["roberta", "bert"]),
    ("T5", &["t5"]),
    ("Falcon", &["falcon"]),
    ("OPT", &["opt"]),
    ("Llama", &["llama", "smollm"]),
];
