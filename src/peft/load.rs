//! Loading a PEFT adapter directory and attaching it to a model.
//!
//! [`PeftAdapter::plan`] turns the adapter into an [`AdapterPlan`] whose factory builds each
//! targeted layer from the file's tensors; the model is built with
//! [`crate::model::linear`] as usual, and [`AdapterPlan::finish`] then checks that every
//! tensor of the file was used.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::adapter::Adapter;
use crate::checkpoint::layout;
use crate::error::{Error, Result, Scope};
use crate::frozen::{BaseKind, FrozenLinear};
use crate::model::plan::{AdapterFactory, AdapterPlan};
use crate::model::target::ModuleSettings;
use crate::model::ParameterLora;
use crate::peft::config::PeftConfig;
use crate::peft::lora_extensions::{check_computable, is_skipped_tensor};
use crate::peft::tied_head::target_tied_heads;
use crate::peft::weights_file::{parse_safetensors, read_adapter_weights};
use crate::shared::Shared;
use crate::variants::build::{peft_tensor_suffixes, TensorSource};
use crate::variants::lora::LoraConfig;
use crate::variants::lora::LORA_B_BIAS;
use crate::variants::lora_config::lora_scale;
use crate::variants::lora_embedding::EMBEDDING_A;

/// The config file's name in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub use super::weights_file::WEIGHTS_FILE;
/// The prefix PEFT puts before a module path in tensor keys.
pub const KEY_PREFIX: &str = "base_model.model.";
/// The prefix PEFT puts before a model-level tensor's name (VeRA's `vera_A`).
pub const MODEL_KEY_PREFIX: &str = "base_model.";

/// The names under which PEFT stores a base module's own tensors in an adapter file: a
/// `modules_to_save` copy or a `bias = "all"` bias (`weight`, `bias`), a wrapped layer's
/// trained bias (`base_layer.bias`), the embedding copy PEFT saves when an embedding or
/// output head is targeted (`base_layer.weight`).
pub const BASE_TENSOR_NAMES: [&str; 4] = ["weight", "bias", "base_layer.weight", "base_layer.bias"];

/// A PEFT adapter read from disk: its config and tensors.
///
/// ```no_run
/// use candle_core::{DType, Device};
/// use candle_nn::VarBuilder;
/// use lorakit::model::linear;
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let adapter = PeftAdapter::load("my-adapter", &dev)?;
/// let plan = adapter.plan()?;
/// let vb = unsafe { VarBuilder::from_mmaped_safetensors(&["model.safetensors"], DType::F32, &dev)? };
/// let q = linear(64, 64, vb.pp("layers.0.q_proj"), &plan)?; // adapted if targeted
/// let set = plan.finish()?; // errors if a tensor of the file was not used
/// println!("{}", set.param_counts());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PeftAdapter {
    inner: Arc<Files>,
}

#[derive(Debug)]
struct Files {
    config: PeftConfig,
    weights_path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    used: Mutex<HashSet<String>>,
    /// Model-level tensors (VeRA's pair) as first converted for a layer, handed to every
    /// later layer unchanged so the layers share them.
    model_tensors: Mutex<HashMap<String, Tensor>>,
}

impl PeftAdapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors` (or, when the
    /// folder has none, PEFT's older `adapter_model.bin`, a `torch.save` pickle read without
    /// running code: [`weights_file`](crate::peft::weights_file)) onto `device`.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = PeftConfig::from_file(dir.join(CONFIG_FILE))?;
        let (weights_path, tensors) = read_adapter_weights(dir, device)?;
        Self::from_parts(config, tensors.into_iter().collect(), weights_path)
    }

    /// An adapter from the contents of its two files, already in memory: the text of
    /// `adapter_config.json` and the bytes of `adapter_model.safetensors` (errors name the
    /// files by these default names). Every declared tensor is checked against the bytes
    /// before anything is allocated.
    ///
    /// ```
    /// use candle_core::Device;
    /// use lorakit::peft::PeftAdapter;
    /// # fn main() -> lorakit::Result<()> {
    /// let config = r#"{"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["fc"]}"#;
    /// // A safetensors file with one F32 tensor of shape [1, 2].
    /// let header = r#"{"base_model.model.fc.lora_A.weight":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}}"#;
    /// let mut weights = (header.len() as u64).to_le_bytes().to_vec();
    /// weights.extend_from_slice(header.as_bytes());
    /// weights.extend_from_slice(&[0u8; 8]);
    /// let adapter = PeftAdapter::from_bytes(config, &weights, &Device::Cpu)?;
    /// assert_eq!(adapter.module_paths(), ["fc"]);
    /// // Cut the file short: an error naming the file, not a panic.
    /// let err = PeftAdapter::from_bytes(config, &weights[..weights.len() - 1], &Device::Cpu).unwrap_err();
    /// assert!(err.to_string().contains("adapter_model.safetensors"));
    /// # Ok(()) }
    /// ```
    pub fn from_bytes(config_json: &str, weights: &[u8], device: &Device) -> Result<Self> {
        let config = PeftConfig::from_json_str(config_json, CONFIG_FILE)?;
        let tensors = parse_safetensors(weights, Path::new(WEIGHTS_FILE), device)?;
        Self::from_parts(config, tensors.into_iter().collect(), WEIGHTS_FILE)
    }

    /// An adapter from an already parsed config and tensors keyed as in PEFT's file. The
    /// state of a training-only extension ([`PeftConfig::skipped_tensors`]) is left out
    /// here, so nothing downstream (layers, merges, inspect, GGUF export) sees it. Under
    /// `ensure_weight_tying` the tied heads the file stores (`lm_head`) are targeted, as PEFT
    /// adapts them beside the embedding they are tied to. An adapter made on an
    /// image-and-text model under transformers 4.50–4.51's names has its keys renamed to
    /// transformers 5's ([`crate::checkpoint::layout`]), as PEFT renames them; a key that
    /// the renaming would give twice is an error naming it.
    pub fn from_parts(
        mut config: PeftConfig,
        mut tensors: BTreeMap<String, Tensor>,
        source: impl Into<PathBuf>,
    ) -> Result<Self> {
        let source = source.into();
        tensors.retain(|key, _| !is_skipped_tensor(key, &config.skipped_tensors));
        let tensors = modernize_llava_keys(tensors, &source)?;
        let low_rank_paths = tensors
            .keys()
            .filter_map(|k| k.strip_prefix(KEY_PREFIX)?.strip_suffix(".lora_A.weight"));
        target_tied_heads(&mut config, low_rank_paths);
        Ok(Self {
            inner: Arc::new(Files {
                config,
                weights_path: source,
                tensors,
                used: Mutex::new(HashSet::new()),
                model_tensors: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The weights file it was read from (as given): `adapter_model.safetensors`, or
    /// `adapter_model.bin` for a folder that has only that.
    pub fn source(&self) -> &Path {
        &self.inner.weights_path
    }

    /// The parsed config.
    pub fn config(&self) -> &PeftConfig {
        &self.inner.config
    }

    /// Every tensor key in the weights file, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        self.inner.tensors.keys().cloned().collect()
    }

    /// The tensor at `key`.
    pub fn tensor(&self, key: &str) -> Option<&Tensor> {
        self.inner.tensors.get(key)
    }

    /// The module paths that have tensors in the file, sorted.
    pub fn module_paths(&self) -> Vec<String> {
        self.inner.module_paths()
    }

    /// The kind of module the adapter takes `path` for when nothing else tells (a merge into
    /// a checkpoint): an embedding if the file has `lora_embedding_A` for it, a Conv1D
    /// (weight stored `(in, out)`) under `fan_in_fan_out`, else a linear layer.
    pub fn base_kind(&self, path: &str) -> BaseKind {
        let embedding = format!("{KEY_PREFIX}{path}.{EMBEDDING_A}");
        if self.inner.tensors.contains_key(&embedding) {
            BaseKind::Embedding
        } else if self.inner.config.fan_in_fan_out {
            BaseKind::Conv1D
        } else {
            BaseKind::Linear
        }
    }

    /// Whether a merge changes the bias of the module at `path`: the file stores one for it
    /// (`bias`, `base_layer.bias`, `lora_B.bias`) or it is one of the `modules_to_save`.
    pub fn changes_bias(&self, path: &str) -> bool {
        self.inner.config.targets.is_module_to_save(path)
            || ["bias", "base_layer.bias", LORA_B_BIAS].iter().any(|n| {
                self.inner
                    .tensors
                    .contains_key(&format!("{KEY_PREFIX}{path}.{n}"))
            })
    }

    /// A plan that attaches this adapter: the config's target rules, with each targeted
    /// layer built from the file's tensors (converted to the base layer's dtype). An
    /// Activated LoRA (`alora_invocation_tokens`) is an error naming it: lorakit's layers
    /// would apply it to every token (see [`lora_extensions`](crate::peft::lora_extensions)).
    pub fn plan(&self) -> Result<AdapterPlan> {
        let c = &self.inner.config;
        let config_file = self.inner.weights_path.with_file_name(CONFIG_FILE);
        check_computable(&c.raw, Scope::File(config_file))?;
        let device = self
            .inner
            .tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        // Variables the plan creates itself (a trainable bias the file does not store) are
        // set from the base through a private VarMap.
        Ok(AdapterPlan::new(
            c.targets.clone(),
            c.ranks.clone(),
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &device),
            LoadedFactory(self.inner.clone()),
        )
        .with_bias_mode(c.bias))
    }
}

/// Builds layers from a loaded adapter's tensors.
struct LoadedFactory(Arc<Files>);

impl Files {
    fn file(&self) -> String {
        self.weights_path.display().to_string()
    }

    /// [`PeftAdapter::module_paths`].
    fn module_paths(&self) -> Vec<String> {
        let mut paths: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix(KEY_PREFIX))
            .filter_map(|k| {
                peft_tensor_suffixes().find_map(|s| k.strip_suffix(s)?.strip_suffix('.'))
            })
            .map(str::to_string)
            .collect();
        paths.dedup();
        paths.sort();
        paths.dedup();
        paths
    }

    /// The tensor `key` checked against `expected`, in the base's dtype and device, marked
    /// as used.
    fn take_key(
        &self,
        key: &str,
        path: &str,
        expected: &[usize],
        base: &FrozenLinear,
    ) -> Result<Tensor> {
        let t = self.tensors.get(key).ok_or_else(|| Error::MissingKey {
            key: key.to_string(),
            file: self.file(),
        })?;
        if t.dims() != expected {
            return Err(Error::ShapeMismatch {
                layer: path.to_string(),
                what: format!(
                    "`{key}` (base weight `{path}.weight` is {:?}{})",
                    base.stored_weight()
                        .map(|w| w.dims().to_vec())
                        .unwrap_or_default(),
                    if base.kind().stores_in_out() {
                        ", stored (in, out)"
                    } else {
                        ""
                    }
                ),
                expected: format!("{expected:?}"),
                got: format!("{:?}", t.dims()),
            });
        }
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string());
        Ok(t.to_dtype(base.dtype())?.to_device(base.device())?)
    }
}

/// The tensors of the module at `path` in a loaded file.
struct ModuleTensors<'a> {
    files: &'a Files,
    path: &'a str,
    base: &'a FrozenLinear,
}

impl ModuleTensors<'_> {
    fn key(&self, suffix: &str) -> String {
        format!("{KEY_PREFIX}{}.{suffix}", self.path)
    }
}

impl TensorSource for ModuleTensors<'_> {
    fn layer_tensor(&self, suffix: &str, expected: &[usize]) -> Result<Tensor> {
        let key = self.key(suffix);
        self.files.take_key(&key, self.path, expected, self.base)
    }

    fn layer_rows(&self, suffix: &str) -> Result<usize> {
        let key = self.key(suffix);
        match self.files.tensors.get(&key) {
            Some(t) => Ok(t.dims().first().copied().unwrap_or(0)),
            None => Err(Error::MissingKey {
                key,
                file: self.files.file(),
            }),
        }
    }

    fn model_tensor(&self, name: &str) -> Result<Option<Tensor>> {
        let key = format!("{MODEL_KEY_PREFIX}{name}");
        let mut cache = self
            .files
            .model_tensors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&key) {
            return Ok(Some(t.clone()));
        }
        let Some(stored) = self.files.tensors.get(&key) else {
            return Ok(None);
        };
        let t = self
            .files
            .take_key(&key, self.path, stored.dims(), self.base)?;
        cache.insert(key, t.clone());
        Ok(Some(t))
    }

    fn file(&self) -> String {
        self.files.file()
    }
}

impl AdapterFactory for LoadedFactory {
    fn build(
        &self,
        path: &str,
        base: FrozenLinear,
        _vb: VarBuilder<'static>,
        settings: ModuleSettings,
    ) -> Result<Shared<dyn Adapter>> {
        let files = &*self.0;
        let config = &files.config;
        // PiSSA and OLoRA: the residual PEFT leaves of the base when it loads the adapter.
        let base = match config.base_residual()? {
            Some(residual) => {
                let scale = lora_scale(settings.alpha, settings.r, config.use_rslora);
                residual.apply(path, base, settings.r, scale)?
            }
            None => base,
        };
        let module = config.module(path, settings, &LoraConfig::default());
        let source = ModuleTensors {
            files,
            path,
            base: &base,
        };
        config.glue()?.load(&module, base.clone(), &source)
    }

    fn covers(&self, path: &str) -> bool {
        let prefix = format!("{KEY_PREFIX}{path}.");
        self.0
            .tensors
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix))
            || !matches!(
                self.0.config.targets.target,
                crate::model::target::ModuleSelector::AllLinear
            )
    }

    fn stored_tensor(&self, path: &str, name: &str) -> Result<Option<Tensor>> {
        let key = format!("{KEY_PREFIX}{path}.{name}");
        let Some(t) = self.0.tensors.get(&key) else {
            return Ok(None);
        };
        self.0
            .used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
        Ok(Some(t.clone()))
    }

    fn parameter_lora(
        &self,
        path: &str,
        registered: &[&str],
    ) -> Result<Vec<Option<ParameterLora>>> {
        let config = &self.0.config;
        let key_of = |param: &str| format!("{path}.{param}");
        let chosen = config.targeted_parameters(path, registered);
        if let (false, Some(residual)) = (chosen.is_empty(), config.base_residual()?) {
            return Err(Error::layer_config(
                path.to_string(),
                "init_lora_weights",
                format!(
                    "\"{}\" with target_parameters: lorakit recomputes the base's residual \
                     for linear modules only",
                    residual.name()
                ),
            ));
        }
        let mut out = vec![None; registered.len()];
        // PEFT wraps the parameters in the order the module registers them, each wrapper
        // around the last: the first is innermost, under the most `base_layer`s.
        for (i, param) in chosen.iter().enumerate() {
            let nesting = "base_layer.".repeat(chosen.len() - 1 - i);
            let a = self.stored_tensor(path, &format!("{nesting}lora_A.weight"))?;
            let b = self.stored_tensor(path, &format!("{nesting}lora_B.weight"))?;
            let key = key_of(param);
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                // Targeted but not in the file (PEFT warns of missing keys): no change.
                (None, None) => continue,
                (a, _) => {
                    let missing = if a.is_none() { "lora_A" } else { "lora_B" };
                    return Err(Error::MissingKey {
                        key: format!("{KEY_PREFIX}{path}.{nesting}{missing}.weight"),
                        file: self.0.file(),
                    });
                }
            };
            let settings = config.ranks.for_module(&key);
            let scaling = if config.use_rslora {
                settings.alpha / (settings.r as f64).sqrt()
            } else {
                settings.alpha / settings.r as f64
            };
            let wrapper = format!("{path}{}", ".base_layer".repeat(chosen.len() - 1 - i));
            let lora =
                ParameterLora::new(&key, a, b, settings.r, scaling)?.with_wrapper_path(wrapper);
            if let Some(slot) = registered
                .iter()
                .position(|p| p == param)
                .and_then(|j| out.get_mut(j))
            {
                *slot = Some(lora);
            }
        }
        Ok(out)
    }

    fn stores_for(&self, path: &str) -> bool {
        BASE_TENSOR_NAMES.iter().any(|n| {
            self.0
                .tensors
                .contains_key(&format!("{KEY_PREFIX}{path}.{n}"))
        })
    }

    fn set_aside(&self, prefix: &str) -> Vec<String> {
        let under = format!("{KEY_PREFIX}{prefix}.");
        let mut used = self.0.used.lock().unwrap_or_else(|e| e.into_inner());
        used.extend(
            self.0
                .tensors
                .keys()
                .filter(|k| k.starts_with(&under))
                .cloned(),
        );
        let module_prefix = format!("{prefix}.");
        let mut paths = self.0.module_paths();
        paths.retain(|p| p.starts_with(&module_prefix));
        paths
    }

    fn finish(&self) -> Result<()> {
        let used = self.0.used.lock().unwrap_or_else(|e| e.into_inner());
        let unused: Vec<&String> = self
            .0
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .collect();
        let parameters = &self.0.config.target_parameters;
        match unused.first() {
            None => Ok(()),
            // LoRA on parameters applies where a model asks for it (a mixture of experts'
            // experts and router): anything else stays unused.
            Some(example) if !parameters.is_empty() => Err(Error::file_config(
                self.0.weights_path.with_file_name(CONFIG_FILE),
                "target_parameters",
                format!(
                    "{} tensors unused (e.g. `{example}`): lorakit applies LoRA on parameters \
                     ({}) only to the experts' stacked weights and the router of a mixture of \
                     experts (mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss) loaded with this \
                     adapter alone (not among named adapters, which switch at run time)",
                    unused.len(),
                    parameters.join(", ")
                ),
            )),
            Some(example) => Err(Error::UnusedKeys {
                count: unused.len(),
                example: (*example).clone(),
                file: self.0.file(),
            }),
        }
    }
}

/// The keys of an adapter made on an image-and-text model of the LLaVA kind under
/// transformers 4.50–4.51 (`base_model.model.language_model.model.layers.…`,
/// `…vision_tower.vision_model.…`) renamed to transformers 5's module paths
/// (`base_model.model.model.language_model.layers.…`), as PEFT renames them when it loads
/// one ([`layout`]): when any key is under one of those stored names that no text-only
/// model has (all but the bare `vision_tower`), every key is renamed. Any other adapter's
/// keys are unchanged. Two keys renamed to one are an error naming it.
fn modernize_llava_keys(
    tensors: BTreeMap<String, Tensor>,
    file: &Path,
) -> Result<BTreeMap<String, Tensor>> {
    let stored = layout::MODULE_PREFIXES
        .iter()
        .flat_map(|(_, stored)| stored.iter())
        .filter(|s| s.contains('.'))
        .map(|s| format!("{KEY_PREFIX}{s}."));
    let is_stored = |key: &str| stored.clone().any(|s| key.starts_with(&s));
    if !tensors.keys().any(|k| is_stored(k)) {
        return Ok(tensors);
    }
    let mut renamed = BTreeMap::new();
    for (key, t) in tensors {
        let key = match key.strip_prefix(KEY_PREFIX) {
            Some(rest) => format!("{KEY_PREFIX}{}", layout::current_name(rest)),
            None => key,
        };
        if renamed.insert(key.clone(), t).is_some() {
            return Err(Error::checkpoint(
                file,
                format!("`{key}` is stored twice, under transformers 5's name and the older one"),
            ));
        }
    }
    Ok(renamed)
}
