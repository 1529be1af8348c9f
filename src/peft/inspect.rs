//! `lorakit inspect`: a summary of a PEFT adapter directory.

use std::fmt;
use std::path::Path;

use candle_core::Device;

use crate::error::Result;
use crate::peft::config::PeftType;
use crate::peft::load::{PeftAdapter, KEY_PREFIX};
use crate::variants::lora::lora_scale;

/// One adapted module as stored in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleSummary {
    /// The module path.
    pub path: String,
    /// Its rank (as stored: AdaLoRA's kept ranks).
    pub rank: usize,
    /// The scale PEFT applies to its low-rank product.
    pub scale: f64,
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
}

/// Reads the adapter in `dir` and summarizes it.
pub fn inspect(dir: &Path) -> Result<AdapterSummary> {
    let adapter = PeftAdapter::load(dir, &Device::Cpu)?;
    let c = adapter.config();
    let rows = |key: String| {
        adapter
            .tensor(&format!("{KEY_PREFIX}{key}"))
            .and_then(|t| t.dims().first().copied())
    };
    let mut modules = Vec::new();
    for path in adapter.module_paths() {
        let s = c.ranks.for_module(&path);
        let (rank, scale) = match c.peft_type {
            PeftType::Lora => {
                let r = rows(format!("{path}.lora_A.weight")).unwrap_or(s.r);
                (r, lora_scale(s.alpha, r, c.use_rslora))
            }
            PeftType::AdaLora => (
                rows(format!("{path}.lora_A")).unwrap_or(0),
                s.alpha / (c.ranks.r as f64 + 1e-5),
            ),
            PeftType::Vera => (rows(format!("{path}.vera_lambda_d")).unwrap_or(0), 1.0),
        };
        modules.push(ModuleSummary { path, rank, scale });
    }
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
        if !name.starts_with(KEY_PREFIX) {
            continue; // VeRA's shared, frozen projections
        }
        trainable_params += t.elem_count();
    }
    let targets = c
        .raw
        .get("target_modules")
        .map(|v| v.to_string())
        .unwrap_or_default();
    Ok(AdapterSummary {
        kind: c.describe(),
        targets,
        modules,
        trainable_params,
        dtypes,
    })
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "type: {}", self.kind)?;
        writeln!(f, "target_modules: {}", self.targets)?;
        writeln!(f, "dtype: {}", self.dtypes.join(", "))?;
        writeln!(f, "trainable parameters: {}", self.trainable_params)?;
        writeln!(f, "modules ({}):", self.modules.len())?;
        for m in &self.modules {
            writeln!(f, "  {}  rank {}  scale {}", m.path, m.rank, m.scale)?;
        }
        Ok(())
    }
}
