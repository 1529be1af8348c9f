//! Training checkpoints: the adapter as a PEFT directory plus what resuming needs, written
//! as one folder that appears complete or not at all.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::task::Task;
use super::trainer::{Progress, Trainer};
use crate::adapter::{Adapter, Variant};
use crate::error::{Error, Result, Scope};
use crate::peft::save_adapter;
use crate::peft::weights_file::read_safetensors;
use crate::shared::Shared;
use crate::staging::StagedDir;
use crate::train::{LayerImportance, LoraDrop};

/// The trainer's state file in a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// Every trainable variable by its full name.
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
/// AdamW's moments (`<full name>.exp_avg`, `.exp_avg_sq`).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// AdaLoRA's allocator state.
pub const ALLOCATOR_FILE: &str = "allocator.safetensors";
/// Delta-LoRA's base weights as its rule moved them (`<layer path>.base_layer.weight`).
pub const DELTA_LORA_BASE_FILE: &str = "delta_lora_base.safetensors";

/// `trainer_state.json`: the progress and the settings a resumed run must share.
#[derive(Serialize, Deserialize)]
struct StateFile {
    format: u32,
    recipe: String,
    batch_size: usize,
    seq_len: usize,
    packing: String,
    grad_accum: usize,
    seed: u64,
    max_steps: usize,
    optimizer_steps: usize,
    progress: Progress,
}

impl StateFile {
    fn of<T: Task>(t: &Trainer<T>) -> Self {
        Self {
            format: 1,
            recipe: t.recipe.describe(),
            batch_size: t.config.batch.batch_size,
            seq_len: t.config.batch.seq_len,
            packing: format!("{:?}", t.config.batch.packing),
            grad_accum: t.config.grad_accum,
            seed: t.config.seed,
            max_steps: t.config.max_steps,
            optimizer_steps: t.rule.optimizer.step_count(),
            progress: t.progress.clone(),
        }
    }

    /// The settings that must agree for a resumed run to continue the same run.
    fn settings(&self) -> [(&'static str, String); 7] {
        [
            ("recipe", self.recipe.clone()),
            ("batch_size", self.batch_size.to_string()),
            ("seq_len", self.seq_len.to_string()),
            ("packing", self.packing.clone()),
            ("grad_accum", self.grad_accum.to_string()),
            ("seed", self.seed.to_string()),
            ("max_steps", self.max_steps.to_string()),
        ]
    }
}

impl<T: Task> Trainer<'_, T> {
    /// Writes a checkpoint folder at `dir`: the PEFT adapter files and the resume state
    /// (see [`Trainer`]). The folder is staged beside `dir` and renamed into place, so an
    /// interrupted save leaves no partial checkpoint; an existing non-empty `dir` is an
    /// error.
    pub fn save_checkpoint(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let staged = StagedDir::create(dir)?;
        let tmp = staged.path();
        save_adapter(tmp, &self.peft_config()?, &self.adapters)?;
        let names = self.var_names();
        let trainable: Vec<(String, Tensor)> = names
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        write_tensors(&tmp.join(TRAINABLE_FILE), &trainable)?;
        let by_id: HashMap<_, _> = names
            .iter()
            .map(|(name, var)| (var.as_tensor().id(), name.clone()))
            .collect();
        let mut moments = Vec::new();
        for (var, m, v) in self.rule.optimizer.moments() {
            let name = by_id.get(&var.as_tensor().id()).ok_or_else(|| {
                Error::settings(
                    "checkpoint",
                    "optimizer",
                    "the optimizer holds a variable the adapters do not",
                )
            })?;
            moments.push((format!("{name}.exp_avg"), m));
            moments.push((format!("{name}.exp_avg_sq"), v));
        }
        write_tensors(&tmp.join(OPTIMIZER_FILE), &moments)?;
        if let Some(allocator) = &self.rule.allocator {
            write_tensors(&tmp.join(ALLOCATOR_FILE), &allocator.state_tensors()?)?;
        }
        if self.recipe.variant == Variant::DeltaLora {
            let weights = super::delta_base::base_weights(&self.adapters)?;
            write_tensors(&tmp.join(DELTA_LORA_BASE_FILE), &weights)?;
        }
        let json = serde_json::to_string_pretty(&StateFile::of(self))
            .map_err(|e| Error::json(dir.join(STATE_FILE), &e))?;
        let state_path = tmp.join(STATE_FILE);
        std::fs::write(&state_path, json).map_err(|e| Error::io(&state_path, e))?;
        staged.commit()
    }

    /// Continues the run saved in the checkpoint folder `dir`: restores every trainable
    /// variable, AdamW's moments and step count, the data position, the logs, LoRA-drop's
    /// layer sharing, AdaLoRA's allocator and Delta-LoRA's moved base weights. Call it on a
    /// trainer built exactly as the saved one was (same model, recipe and settings), before
    /// [`Trainer::train`].
    ///
    /// Errors, before anything changes: a missing or malformed file (named), a setting
    /// that differs from the checkpoint's (named, both values shown). A variable (or a
    /// Delta-LoRA layer's weight) missing from its file or of another shape is an error
    /// naming it (the trainer is then in an undefined state: build a new one).
    pub fn resume(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let state_path = dir.join(STATE_FILE);
        let text = crate::error::read_text(&state_path)?;
        let saved: StateFile = crate::error::parse_json(&text, &state_path)?;
        let current = StateFile::of(self);
        for ((field, was), (_, now)) in saved.settings().iter().zip(current.settings()) {
            if *was != now {
                return Err(Error::usage(
                    Scope::File(state_path.clone()),
                    format!("the checkpoint was trained with {field} = {was}, this trainer has {now}: resume with the same settings"),
                ));
            }
        }
        let device = self.task.device().clone();
        let trainable = read_map(&dir.join(TRAINABLE_FILE), &device)?;
        let moments = read_map(&dir.join(OPTIMIZER_FILE), &device)?;
        let allocator = match self.rule.allocator {
            Some(_) => Some(read_map(&dir.join(ALLOCATOR_FILE), &device)?),
            None => None,
        };
        // Up to step K Delta-LoRA's base weights have not moved (older checkpoints lack the file).
        let delta_path = dir.join(DELTA_LORA_BASE_FILE);
        let moved = self.recipe.variant == Variant::DeltaLora
            && saved.progress.step > self.recipe.delta_lora.start_step;
        let delta_base = if moved {
            Some(read_map(&delta_path, &device)?)
        } else {
            None
        };
        if let Some(importance) = &saved.progress.lora_drop {
            let layers: Vec<Shared<dyn Adapter>> =
                self.adapters.layers().into_iter().map(|(_, l)| l).collect();
            let drop = LoraDrop::new(&layers, self.recipe.lora_drop.clone())?;
            let importance: Vec<LayerImportance> = importance
                .iter()
                .map(|(name, raw, importance)| LayerImportance {
                    name: name.clone(),
                    raw: *raw,
                    importance: *importance,
                })
                .collect();
            self.share_lora_drop(&drop, &importance)?;
        }
        let file = dir.join(TRAINABLE_FILE);
        for (name, var) in self.var_names() {
            let value = lookup(&trainable, &name, &file)?;
            check_like(value, var.as_tensor(), &name, &file)?;
            var.set(value)?;
            let m = lookup(
                &moments,
                &format!("{name}.exp_avg"),
                &dir.join(OPTIMIZER_FILE),
            )?;
            let v = lookup(
                &moments,
                &format!("{name}.exp_avg_sq"),
                &dir.join(OPTIMIZER_FILE),
            )?;
            self.rule.optimizer.load_moments(&var, m, v)?;
        }
        if let Some(weights) = &delta_base {
            super::delta_base::restore(&self.adapters, |key, like| {
                let value = lookup(weights, key, &delta_path)?;
                check_like(value, like, key, &delta_path)?;
                Ok(value.clone())
            })?;
        }
        self.rule.optimizer.set_step_count(saved.optimizer_steps);
        if let (Some(alloc), Some(state)) = (self.rule.allocator.as_mut(), allocator) {
            alloc.load_state(&state)?;
        }
        self.progress = saved.progress;
        Ok(())
    }

    /// Every trainable variable with its full name (`<layer path>.<name>`), in the set's
    /// order.
    fn var_names(&self) -> Vec<(String, candle_core::Var)> {
        self.adapters
            .trainable_vars()
            .into_iter()
            .map(|v| (v.full_name(), v.var.var))
            .collect()
    }
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(cpu.iter().map(|(k, t)| (k.as_str(), t)), None, path).map_err(
        |e| Error::SafeTensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        },
    )
}

fn read_map(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::usage(
            Scope::File(path.to_path_buf()),
            "missing from the checkpoint (was it written by Trainer::save_checkpoint?)",
        ));
    }
    Ok(read_safetensors(path, device)?.into_iter().collect())
}

fn lookup<'a>(map: &'a HashMap<String, Tensor>, key: &str, file: &Path) -> Result<&'a Tensor> {
    map.get(key).ok_or_else(|| Error::MissingKey {
        key: key.to_string(),
        file: file.display().to_string(),
    })
}

fn check_like(value: &Tensor, like: &Tensor, name: &str, file: &Path) -> Result<()> {
    if value.dims() != like.dims() || value.dtype() != like.dtype() {
        return Err(Error::ShapeMismatch {
            layer: name.to_string(),
            what: format!("`{name}` in {}", file.display()),
            expected: format!("{:?} {:?}", like.dims(), like.dtype()),
            got: format!("{:?} {:?}", value.dims(), value.dtype()),
        });
    }
    Ok(())
}
