//! Loading a PEFT adapter directory and attaching it to a model.
//!
//! [`PeftAdapter::plan`] turns the adapter into an [`AdapterPlan`] whose factory builds each
//! targeted layer from the file's tensors; the model is built with
//! [`crate::model::linear`] as usual, and [`AdapterPlan::finish`] then checks that every
//! tensor of the file was used.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapter::Adapter;
use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::low_rank::{Factor, LowRankPair};
use crate::model::plan::{AdapterFactory, AdapterPlan};
use crate::model::target::ModuleSettings;
use crate::peft::config::{PeftConfig, PeftType};
use crate::shared::Shared;
use crate::variants::adalora::AdaLoraLinear;
use crate::variants::dora::DoraLinear;
use crate::variants::lora::{lora_scale, LoraLinear};
use crate::variants::vera::{VeraLinear, VeraShared};

/// The config file's name in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file's name in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before a module path in tensor keys.
pub const KEY_PREFIX: &str = "base_model.model.";

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
    /// VeRA's shared pair, built from the file on first use.
    vera_shared: Mutex<Option<VeraShared>>,
}

impl PeftAdapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors` onto `device`.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = PeftConfig::from_file(dir.join(CONFIG_FILE))?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let tensors = read_safetensors(&weights_path, device)?;
        Ok(Self::from_parts(
            config,
            tensors.into_iter().collect(),
            weights_path,
        ))
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
        Ok(Self::from_parts(
            config,
            tensors.into_iter().collect(),
            WEIGHTS_FILE,
        ))
    }

    /// An adapter from an already parsed config and tensors keyed as in PEFT's file.
    pub fn from_parts(
        config: PeftConfig,
        tensors: BTreeMap<String, Tensor>,
        source: impl Into<PathBuf>,
    ) -> Self {
        Self {
            inner: Arc::new(Files {
                config,
                weights_path: source.into(),
                tensors,
                used: Mutex::new(HashSet::new()),
                vera_shared: Mutex::new(None),
            }),
        }
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
        let mut paths: Vec<String> = self
            .inner
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix(KEY_PREFIX))
            .filter_map(|k| {
                let suffixes = [
                    ".lora_A.weight",
                    ".lora_B.weight",
                    ".lora_magnitude_vector",
                    ".vera_lambda_b",
                    ".vera_lambda_d",
                    ".lora_A",
                    ".lora_B",
                    ".lora_E",
                ];
                suffixes.iter().find_map(|s| k.strip_suffix(s))
            })
            .map(str::to_string)
            .collect();
        paths.dedup();
        paths.sort();
        paths.dedup();
        paths
    }

    /// A plan that attaches this adapter: the config's target rules, with each targeted
    /// layer built from the file's tensors (converted to the base layer's dtype).
    pub fn plan(&self) -> Result<AdapterPlan> {
        let c = &self.inner.config;
        let device = self
            .inner
            .tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        Ok(AdapterPlan::new(
            c.targets.clone(),
            c.ranks.clone(),
            VarBuilder::zeros(DType::F32, &device),
            LoadedFactory(self.inner.clone()),
        ))
    }
}

/// Reads every tensor of a safetensors file.
pub(crate) fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(&bytes, path, device)
}

/// Every tensor of safetensors `bytes`; `path` names the file in errors.
fn parse_safetensors(bytes: &[u8], path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::SafeTensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device).map_err(|e| {
            Error::SafeTensors {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: {e}"),
            }
        })?;
        out.push((name, t));
    }
    Ok(out)
}

/// Builds layers from a loaded adapter's tensors.
struct LoadedFactory(Arc<Files>);

impl Files {
    fn file(&self) -> String {
        self.weights_path.display().to_string()
    }

    /// The tensor `base_model.model.<path>.<suffix>` checked against `expected`, in the base's
    /// dtype and device, marked as used.
    fn take(
        &self,
        path: &str,
        suffix: &str,
        expected: &[usize],
        base: &FrozenLinear,
    ) -> Result<Tensor> {
        let key = format!("{KEY_PREFIX}{path}.{suffix}");
        self.take_key(&key, path, expected, base)
    }

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
                    "`{key}` (base weight `{path}.weight` is {:?})",
                    base.weight().dims()
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

    /// The rank stored in the file for `path` (rows of `<suffix>`), for error-free shape
    /// checks where the rank is not in the config (AdaLoRA's truncated ranks).
    fn rows(&self, path: &str, suffix: &str) -> Result<usize> {
        let key = format!("{KEY_PREFIX}{path}.{suffix}");
        self.tensors
            .get(&key)
            .map(|t| t.dims().first().copied().unwrap_or(0))
            .ok_or_else(|| Error::MissingKey {
                key,
                file: self.file(),
            })
    }
}

fn trainable(t: Tensor) -> Result<Factor> {
    Ok(Factor::Trainable(Var::from_tensor(&t)?))
}

impl LoadedFactory {
    fn lora(
        &self,
        path: &str,
        base: FrozenLinear,
        s: ModuleSettings,
    ) -> Result<Shared<dyn Adapter>> {
        let f = &self.0;
        let c = &f.config;
        let (d_in, d_out) = (base.d_in(), base.d_out());
        let a = f.take(path, "lora_A.weight", &[s.r, d_in], &base)?;
        let b = f.take(path, "lora_B.weight", &[d_out, s.r], &base)?;
        let pair = LowRankPair {
            a: trainable(a)?,
            b: trainable(b)?,
        };
        let scale = lora_scale(s.alpha, s.r, c.use_rslora);
        if c.use_dora {
            let m = f.take(path, "lora_magnitude_vector", &[d_out], &base)?;
            let layer = DoraLinear::from_tensors(path, base, pair, m, scale, c.dropout)?;
            return Ok(Shared::new(layer).erase());
        }
        let layer = LoraLinear::from_pair(path, base, pair, scale, c.dropout)?;
        Ok(Shared::new(layer).erase())
    }
}

impl LoadedFactory {
    /// AdaLoRA: the file holds the kept ranks only (`lora_A`, `lora_E`, `lora_B`, no
    /// `.weight`); `rank_pattern` says which of the `init_r` ranks they are. The scale keeps
    /// `init_r`, as in PEFT.
    fn adalora(
        &self,
        path: &str,
        base: FrozenLinear,
        s: ModuleSettings,
    ) -> Result<Shared<dyn Adapter>> {
        let f = &self.0;
        let c = &f.config;
        let (d_in, d_out) = (base.d_in(), base.d_out());
        let r = f.rows(path, "lora_A")?;
        let a = f.take(path, "lora_A", &[r, d_in], &base)?;
        let e = f.take(path, "lora_E", &[r, 1], &base)?;
        let b = f.take(path, "lora_B", &[d_out, r], &base)?;
        let mut layer =
            AdaLoraLinear::from_tensors(path, base, a, e, b, c.ranks.r, s.alpha, c.dropout)?;
        if let Some(mask) = c.adalora_mask(path) {
            layer.set_loaded_rank_pattern(mask)?;
        }
        Ok(Shared::new(layer).erase())
    }
}

impl LoadedFactory {
    /// VeRA's shared pair (`base_model.vera_A`, `base_model.vera_B`), read once, in the
    /// base's dtype; checked to cover the layer at `path`.
    fn vera_shared(&self, path: &str, base: &FrozenLinear) -> Result<VeraShared> {
        let f = &self.0;
        let mut cached = f.vera_shared.lock().unwrap_or_else(|e| e.into_inner());
        let shared = match cached.as_ref() {
            Some(s) => s.clone(),
            None => {
                let (ka, kb) = ("base_model.vera_A", "base_model.vera_B");
                let (Some(a), Some(b)) = (f.tensors.get(ka), f.tensors.get(kb)) else {
                    return Err(Error::Unsupported {
                        what: "VeRA adapter without its shared projections",
                        got: format!(
                            "no `{ka}` / `{kb}` in {} (saved with save_projection = false)",
                            f.file()
                        ),
                        supported: "adapters saved with save_projection = true".to_string(),
                    });
                };
                let a = f.take_key(ka, path, a.dims(), base)?;
                let b = f.take_key(kb, path, b.dims(), base)?;
                let s = VeraShared::from_tensors(a, b)?;
                *cached = Some(s.clone());
                s
            }
        };
        for (key, have, need, dims) in [
            (
                "base_model.vera_A",
                shared.max_d_in(),
                base.d_in(),
                shared.a().dims(),
            ),
            (
                "base_model.vera_B",
                shared.max_d_out(),
                base.d_out(),
                shared.b().dims(),
            ),
        ] {
            if have < need {
                return Err(Error::ShapeMismatch {
                    layer: path.to_string(),
                    what: format!(
                        "`{key}` (base weight `{path}.weight` is {:?})",
                        base.weight().dims()
                    ),
                    expected: format!(
                        "a pair covering d_in = {}, d_out = {}",
                        base.d_in(),
                        base.d_out()
                    ),
                    got: format!("{dims:?}"),
                });
            }
        }
        Ok(shared)
    }

    /// VeRA: per-layer `vera_lambda_d` (`r`) and `vera_lambda_b` (`d_out`) over the shared pair.
    fn vera(&self, path: &str, base: FrozenLinear) -> Result<Shared<dyn Adapter>> {
        let shared = self.vera_shared(path, &base)?;
        let f = &self.0;
        let ld = f.take(path, "vera_lambda_d", &[shared.rank()], &base)?;
        let lb = f.take(path, "vera_lambda_b", &[base.d_out()], &base)?;
        let layer = VeraLinear::from_tensors(path, base, &shared, ld, lb, f.config.dropout)?;
        Ok(Shared::new(layer).erase())
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
        match self.0.config.peft_type {
            PeftType::Lora => self.lora(path, base, settings),
            PeftType::AdaLora => self.adalora(path, base, settings),
            PeftType::Vera => self.vera(path, base),
        }
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

    fn finish(&self) -> Result<()> {
        let used = self.0.used.lock().unwrap_or_else(|e| e.into_inner());
        let unused: Vec<&String> = self
            .0
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .collect();
        match unused.first() {
            None => Ok(()),
            Some(example) => Err(Error::UnusedKeys {
                count: unused.len(),
                example: (*example).clone(),
                file: self.0.file(),
            }),
        }
    }
}
