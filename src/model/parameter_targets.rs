//! [`ParameterTargets`]: which stacked parameters of a mixture of experts a fresh LoRA plan
//! adapts, as PEFT 0.21 chooses them (its `target_parameters`, and its conversion of
//! `target_modules` for transformers 5's mixtures of experts).

use std::sync::Arc;

use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::model::stacked_lora::{StackedLora, StackedParameter};
use crate::model::target::{list_entry_matches, ModuleSelector, RankAlpha, TargetSpec};
use crate::variants::build::ModuleSettings;
use crate::variants::LoraConfig;

/// Which stacked parameters a fresh LoRA plan adapts ([`AdapterPlan::with_parameter_targets`](crate::model::AdapterPlan::with_parameter_targets)),
/// as PEFT 0.21 chooses them: those `names` (PEFT's `target_parameters`) select, and those
/// its conversion of `target_modules` for transformers 5's mixtures of experts adds (on
/// Mixtral, Qwen3-MoE and OLMoE: `w1`/`w3` or `gate_proj`/`up_proj` become the experts'
/// `gate_up_proj` at twice the rank and alpha, `w2`/`down_proj` their `down_proj`, `gate`
/// the router's `gate.weight`; `all-linear` selects them all).
#[derive(Clone, Debug)]
pub struct ParameterTargets {
    /// PEFT's `target_parameters`: parameter keys or `"." + key` suffixes.
    pub names: Vec<String>,
    /// The init, seed and rsLoRA of the fresh factors (rank and alpha come from the plan's
    /// [`RankAlpha`]); its dropout must be 0 and `lora_bias` off, as PEFT's `ParamWrapper`
    /// requires.
    pub lora: LoraConfig,
}

impl ParameterTargets {
    /// Targets from `lora`'s settings, with `names` as PEFT's `target_parameters`.
    pub fn new(names: Vec<String>, lora: LoraConfig) -> Self {
        Self { names, lora }
    }

    /// The fresh LoRAs of the parameters `params` (in the order `module` registers them)
    /// that these targets select; their variables are created through `vb`, at PEFT's
    /// module path of each (the first targeted parameter innermost, under a `base_layer`
    /// for each later one).
    pub(crate) fn build(
        &self,
        module: &str,
        params: &[StackedParameter],
        targets: &TargetSpec,
        ranks: &RankAlpha,
        vb: &VarBuilder<'static>,
    ) -> Result<Vec<Option<Arc<StackedLora>>>> {
        let chosen = params
            .iter()
            .map(|p| self.settings(module, p, targets, ranks))
            .collect::<Result<Vec<_>>>()?;
        let count = chosen.iter().flatten().count();
        let mut out = Vec::with_capacity(params.len());
        let mut index = 0;
        for (param, choice) in params.iter().zip(chosen) {
            let Some((entry, settings)) = choice else {
                out.push(None);
                continue;
            };
            let key = format!("{module}.{}", param.name);
            let refused = match (self.lora.dropout > 0.0, self.lora.lora_bias) {
                (true, _) => Some(("lora_dropout", format!("{}", self.lora.dropout))),
                (false, true) => Some(("lora_bias", "true".to_string())),
                (false, false) => None,
            };
            if let Some((field, value)) = refused {
                return Err(Error::layer_config(
                    key,
                    field,
                    format!(
                        "is {value}, which a LoRA on a parameter does not take (PEFT refuses it \
                         too): change it, or name only modules to adapt (not all-linear, nor \
                         the experts' or router's names)"
                    ),
                ));
            }
            index += 1;
            let wrapper = format!("{module}{}", ".base_layer".repeat(count - index));
            let config = self.lora.for_module(settings);
            let lora = StackedLora::fresh(key, wrapper, entry, param, config, vb)?;
            out.push(Some(Arc::new(lora)));
        }
        Ok(out)
    }

    /// The `target_parameters` entry and rank/alpha of the parameter `param` of `module`,
    /// if it is targeted.
    fn settings(
        &self,
        module: &str,
        param: &StackedParameter,
        targets: &TargetSpec,
        ranks: &RankAlpha,
    ) -> Result<Option<(String, ModuleSettings)>> {
        let key = format!("{module}.{}", param.name);
        if let Some(entry) = self.names.iter().find(|n| list_entry_matches(n, &key)) {
            return Ok(Some((entry.clone(), ranks.for_module(&key))));
        }
        let selected: Vec<&String> = param
            .converted_from
            .iter()
            .filter(|path| converts(&targets.target, path))
            .collect();
        if selected.is_empty() {
            return Ok(None);
        }
        let leaf = |path: &str| path.rsplit('.').next().unwrap_or(path).to_string();
        if selected.len() < param.converted_from.len() {
            let missing: Vec<String> = param
                .converted_from
                .iter()
                .filter(|p| !selected.contains(p))
                .map(|p| leaf(p))
                .collect();
            return Err(Error::layer_config(
                key,
                "target_modules",
                format!(
                    "targets {} but not {}: transformers 5 fuses them into `{}`, so PEFT (and \
                     lorakit) can adapt them only together",
                    selected
                        .iter()
                        .map(|p| leaf(p))
                        .collect::<Vec<_>>()
                        .join(", "),
                    missing.join(", "),
                    param.name
                ),
            ));
        }
        // PEFT doubles the rank and alpha of a fused pair (its `rank_pattern` and
        // `alpha_pattern` for the parameter), keeping each half's alpha / r.
        let fused = selected.len();
        let settings = ModuleSettings {
            r: ranks.r * fused,
            alpha: ranks.alpha * fused as f64,
        };
        Ok(Some((param.peft_entry.to_string(), settings)))
    }
}

/// Whether PEFT's conversion of `target_modules` (`target`) selects the transformers 4
/// module at `path`: `all-linear` selects every one; a list entry equal to its name or
/// ending in `"." + name`; a regex that matches the path.
fn converts(target: &ModuleSelector, path: &str) -> bool {
    let name = path.rsplit('.').next().unwrap_or(path);
    match target {
        ModuleSelector::AllLinear => true,
        ModuleSelector::List(entries) => entries.iter().any(|e| list_entry_matches(name, e)),
        ModuleSelector::Regex(re) => re.is_match(path),
    }
}
