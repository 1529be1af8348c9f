//! Saving adapters as PEFT files (`adapter_config.json`, `adapter_model.safetensors`) that
//! PEFT's `PeftModel.from_pretrained` loads, and the atomic file write used for every output.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::{Map, Value};

use crate::adapter::Variant;
use crate::error::{Error, Result};
use crate::frozen::BaseKind;
use crate::model::adapted_set::AdaptedSet;
use crate::model::trainable_base::BiasMode;
use crate::model::StackedLora;
use crate::peft::config::PeftConfig;
use crate::peft::load::{CONFIG_FILE, KEY_PREFIX, MODEL_KEY_PREFIX, WEIGHTS_FILE};
pub use crate::staging::{write_atomic, write_atomic_all_with, write_atomic_with};
use crate::variants::lora::lora_scale;
use crate::variants::vera::fit_shared_pair;

/// Serializes named tensors to safetensors bytes (tensors are moved to the CPU).
pub(crate) fn safetensors_bytes(tensors: &[(String, Tensor)], path: &Path) -> Result<Vec<u8>> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                t.to_device(&candle_core::Device::Cpu)?.contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(cpu.iter().map(|(k, t)| (k.as_str(), t)), None).map_err(|e| {
        Error::SafeTensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    })
}

/// The tensors of `set` under PEFT's keys: each layer's as `base_model.model.<path>.<suffix>`,
/// and each model-level tensor (VeRA's pair) once, as `base_model.<name>`.
pub fn adapter_tensors(set: &AdaptedSet) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    let mut model_level: BTreeMap<String, Tensor> = BTreeMap::new();
    // The largest input and output of the layers that use model-level tensors.
    let mut largest = (0, 0);
    for (path, layer) in set.layers() {
        let layer = layer.read();
        for (suffix, t) in layer.tensors_to_save()? {
            out.push((format!("{KEY_PREFIX}{path}.{suffix}"), t));
        }
        let model_tensors = layer.model_tensors();
        if !model_tensors.is_empty() {
            largest = (
                largest.0.max(layer.base().d_in()),
                largest.1.max(layer.base().d_out()),
            );
        }
        for (name, t) in model_tensors {
            match model_level.get(&name) {
                None => {
                    model_level.insert(name, t);
                }
                Some(earlier) if earlier.id() == t.id() => {}
                Some(_) => {
                    return Err(Error::layer_config(
                        path,
                        "model tensors",
                        format!(
                            "the layers of one adapter must share one `{name}`, and this \
                             layer's differs from an earlier layer's"
                        ),
                    ))
                }
            }
        }
    }
    for (path, module) in set.trainable_bases() {
        for (name, t) in module.tensors_to_save() {
            out.push((format!("{KEY_PREFIX}{path}.{name}"), t));
        }
    }
    for lora in set.stacked_loras() {
        for (name, t) in lora.tensors_to_save()? {
            out.push((format!("{KEY_PREFIX}{}.{name}", lora.wrapper_path()), t));
        }
    }
    for v in set.trainable_tensors() {
        out.push((
            format!("{KEY_PREFIX}{}", v.full_name()),
            v.var.var.as_tensor().clone(),
        ));
    }
    for (name, t) in model_level {
        let t = fit_shared_pair(&name, t, largest)?;
        out.push((format!("{MODEL_KEY_PREFIX}{name}"), t));
    }
    Ok(out)
}

/// Checks that `config` describes `set`: every layer is a target, of the config's variant,
/// with the rank and scale the config gives its path (otherwise PEFT would load something
/// else).
fn check_consistent(config: &PeftConfig, set: &AdaptedSet) -> Result<()> {
    let stacked = set.stacked_loras();
    if !config.target_parameters.is_empty() && stacked.is_empty() {
        // The config promises LoRAs on parameters the set does not hold (a model without
        // experts, named adapters): PEFT would start them afresh.
        return Err(Error::Unsupported {
            what: "saving an adapter with LoRA on parameters (target_parameters) that the \
                   model does not hold",
            got: config.target_parameters.join(", "),
            supported: "LoRAs on a mixture of experts' experts and router, built by the \
                        model (AdaptedSet::stacked_loras)"
                .to_string(),
        });
    }
    for lora in &stacked {
        check_stacked(config, lora)?;
    }
    let glue = config.glue()?;
    for (path, layer) in set.layers() {
        if !config.targets.is_target(&path) {
            return Err(Error::layer_config(
                path,
                "target_modules",
                "the layer is adapted but the config does not target it",
            ));
        }
        let layer = layer.read();
        if layer.kind().saved_as() != config.variant() {
            return Err(Error::layer_config(
                path,
                "peft_type",
                format!(
                    "the layer is saved as {} but the config describes {} ({})",
                    layer.kind().saved_as(),
                    config.variant(),
                    config.describe()
                ),
            ));
        }
        check_options(config, &path, &*layer)?;
        let module = config.module(&path, config.ranks.for_module(&path), &Default::default());
        let (r, scale) = glue.rank_and_scale(&module);
        let (layer_r, layer_scale) = layer.rank_and_scale();
        if layer_r != r || (layer_scale - scale).abs() > 1e-9 * scale.abs().max(1.0) {
            return Err(Error::layer_config(
                path,
                "r",
                format!(
                    "layer has rank {layer_r} and scale {layer_scale}, the config gives rank {r} \
                     and scale {scale}"
                ),
            ));
        }
    }
    for (path, module) in set.trainable_bases() {
        let (field, ok) = if module.is_full_copy() {
            ("modules_to_save", config.targets.is_module_to_save(&path))
        } else {
            ("bias", config.bias == BiasMode::All)
        };
        if !ok {
            return Err(Error::layer_config(
                path,
                field,
                format!(
                    "the module trains its own tensors but the config's {field} does not say so \
                     (PEFT would not load them)"
                ),
            ));
        }
    }
    if let Some(v) = set.trainable_tensors().first() {
        if config.bias != BiasMode::All {
            return Err(Error::layer_config(
                v.layer.clone(),
                "bias",
                format!(
                    "`{}` trains but the config's bias is not \"all\" (PEFT would not load it)",
                    v.full_name()
                ),
            ));
        }
    }
    glue.check_save(&config.raw)
}

/// Checks that `config` names the stacked parameter `lora` adapts in `target_parameters`,
/// with its rank and scale (PEFT would otherwise build a different LoRA, or none).
fn check_stacked(config: &PeftConfig, lora: &StackedLora) -> Result<()> {
    let key = lora.key();
    if !config.targets_parameter(key) || config.variant() != Variant::Lora {
        return Err(Error::layer_config(
            key,
            "target_parameters",
            format!(
                "the parameter has a LoRA but the config ({}, target_parameters [{}]) does not \
                 give it one; PeftConfig::with_parameter_loras adds it",
                config.describe(),
                config.target_parameters.join(", ")
            ),
        ));
    }
    let settings = config.ranks.for_module(key);
    let scale = lora_scale(settings.alpha, settings.r, config.use_rslora);
    if settings.r != lora.rank() || (scale - lora.scale()).abs() > 1e-9 * scale.abs().max(1.0) {
        return Err(Error::layer_config(
            key,
            "r",
            format!(
                "the LoRA has rank {} and scale {}, the config gives rank {} and scale {scale}",
                lora.rank(),
                lora.scale(),
                settings.r
            ),
        ));
    }
    Ok(())
}

/// The options a layer needs from the config: `lora_bias` for a bias on B, a `bias` mode
/// for a trained base bias, `fan_in_fan_out` for a Conv1D base.
fn check_options(config: &PeftConfig, path: &str, layer: &dyn crate::Adapter) -> Result<()> {
    let problem = if layer.delta_bias()?.is_some() != config.lora_bias {
        Some((
            "lora_bias",
            format!(
                "the layer {} a bias on B but the config has lora_bias = {}",
                if config.lora_bias { "has no" } else { "has" },
                config.lora_bias
            ),
        ))
    } else if layer.base().trainable_bias().is_some() && config.bias == BiasMode::None {
        Some((
            "bias",
            "the layer trains its base bias but the config has bias = \"none\"".to_string(),
        ))
    } else if layer.base().kind() == BaseKind::Conv1D && !config.fan_in_fan_out {
        Some((
            "fan_in_fan_out",
            "the base is a Conv1D (weight stored (in, out)) but the config has fan_in_fan_out = \
             false; set it so merges write the weight in its layout"
                .to_string(),
        ))
    } else {
        None
    };
    match problem {
        Some((field, reason)) => Err(Error::layer_config(path, field, reason)),
        None => Ok(()),
    }
}

/// The config to write: `config`, plus what the layers know and the config may not
/// ([`crate::Adapter::config_entries`], e.g. AdaLoRA's kept ranks as PEFT's `rank_pattern`).
fn with_layer_state(config: &PeftConfig, set: &AdaptedSet) -> Result<PeftConfig> {
    let mut config = config.clone();
    let mut objects: BTreeMap<&'static str, Map<String, Value>> = BTreeMap::new();
    for (_, layer) in set.layers() {
        for entry in layer.read().config_entries() {
            match entry.key {
                Some(key) => {
                    objects
                        .entry(entry.field)
                        .or_default()
                        .insert(key, entry.value);
                }
                None => {
                    config.raw.insert(entry.field.to_string(), entry.value);
                }
            }
        }
    }
    for (field, object) in objects {
        config.raw.insert(field.to_string(), Value::Object(object));
    }
    Ok(config)
}

/// Writes `dir/adapter_config.json` (from `config`) and `dir/adapter_model.safetensors`
/// (the layers' tensors), each atomically; creates `dir` if needed.
///
/// # Failure state
///
/// Both files are first serialized in memory, then written and fsynced under temporary
/// names in `dir`; only when both are on disk are they renamed over their targets, weights
/// first, then the config. So:
///
/// - any failure while serializing or writing (full disk, read-only or missing directory,
///   an I/O error part-way) leaves both previous files untouched and no temporary behind;
/// - the one remaining window is between the two renames: if the config's rename fails
///   (or the process dies right after the first rename), `dir` holds the **new weights
///   with the previous config** (or no config, for a first save). The error names the
///   config path; saving again repairs the directory.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::model::linear_no_bias;
/// use lorakit::peft::{save_adapter, PeftAdapter, PeftConfig};
/// use lorakit::LoraConfig;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let (base, adapter_vars) = (VarMap::new(), VarMap::new());
/// let base_vb = VarBuilder::from_varmap(&base, DType::F32, &dev);
/// let config = PeftConfig::lora(2, 4.0, &["q"]);
/// let vb = VarBuilder::from_varmap(&adapter_vars, DType::F32, &dev);
/// let plan = config.fresh_plan(vb, &LoraConfig::default())?;
/// let _q = linear_no_bias(8, 8, base_vb.pp("q"), &plan)?;
/// let dir = std::env::temp_dir().join(format!("lorakit-doc-save-{}", std::process::id()));
/// save_adapter(&dir, &config, &plan.finish()?)?;
/// let loaded = PeftAdapter::load(&dir, &dev)?;
/// assert_eq!(loaded.tensor_names(), ["base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"]);
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(()) }
/// ```
pub fn save_adapter(dir: impl AsRef<Path>, config: &PeftConfig, set: &AdaptedSet) -> Result<()> {
    let dir = dir.as_ref();
    check_consistent(config, set)?;
    let config = with_layer_state(config, set)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let weights = dir.join(WEIGHTS_FILE);
    let bytes = safetensors_bytes(&adapter_tensors(set)?, &weights)?;
    let json = config.to_json_string()?;
    // Both files are written and fsynced under temporary names before either is renamed.
    let files: [&[u8]; 2] = [&bytes, json.as_bytes()];
    write_atomic_all_with(&[&weights, &dir.join(CONFIG_FILE)], |i, w| {
        w.write_all(files.get(i).copied().unwrap_or_default())
    })
}
