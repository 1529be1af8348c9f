//! `adapter_config.json`: PEFT's adapter configuration.
//!
//! Parsed leniently (unknown keys are kept and written back on save, as newer PEFT versions
//! add fields often); fields that change the math are checked, and settings lorakit cannot
//! honour are errors rather than silently ignored.

use std::path::{Path, PathBuf};

use candle_nn::VarBuilder;
use serde_json::{Map, Value};

use super::base_residual::BaseResidual;
use super::lora_extensions::{
    base_residual, check_base_unchanged, check_computable, check_extensions,
};
use crate::adapter::Variant;
use crate::error::{Error, Result, Scope};
use crate::frozen::FrozenLinear;
use crate::model::plan::AdapterPlan;
use crate::model::target::ModuleSettings;
use crate::model::target::{
    FullRegex, LayerFilter, ModuleSelector, Pattern, RankAlpha, TargetSpec,
};
use crate::model::trainable_base::BiasMode;
use crate::model::ParameterTargets;
use crate::variants::build::{peft_glue, PeftGlue, PeftModule};
use crate::variants::lora::LoraConfig;

/// The adapter types lorakit reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeftType {
    /// LoRA, including rsLoRA and DoRA (`use_rslora`, `use_dora`).
    Lora,
    /// VeRA.
    Vera,
    /// AdaLoRA.
    AdaLora,
}

/// The `peft_type` values lorakit supports, for error messages.
pub const SUPPORTED_PEFT_TYPES: &str = "LORA, VERA, ADALORA";

impl PeftType {
    /// PEFT's name (`"LORA"`, `"VERA"`, `"ADALORA"`).
    pub fn as_str(&self) -> &'static str {
        match self {
            PeftType::Lora => "LORA",
            PeftType::Vera => "VERA",
            PeftType::AdaLora => "ADALORA",
        }
    }

    /// Parses PEFT's name; anything else is an error listing the supported types.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "LORA" => Ok(PeftType::Lora),
            "VERA" => Ok(PeftType::Vera),
            "ADALORA" => Ok(PeftType::AdaLora),
            other => Err(Error::Unsupported {
                what: "peft_type",
                got: other.to_string(),
                supported: SUPPORTED_PEFT_TYPES.to_string(),
            }),
        }
    }
}

/// A parsed `adapter_config.json`.
///
/// ```
/// use lorakit::peft::{PeftConfig, PeftType};
/// # fn main() -> lorakit::Result<()> {
/// let json = r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true,
///                "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2},
///                "some_future_key": 1}"#;
/// let config = PeftConfig::from_json_str(json, "adapter_config.json")?;
/// assert_eq!(config.peft_type, PeftType::Lora);
/// assert!(config.targets.is_target("model.layers.0.self_attn.q_proj"));
/// assert_eq!(config.ranks.for_module("model.layers.0.self_attn.v_proj").r, 2);
/// let err = PeftConfig::from_json_str(r#"{"peft_type": "IA3"}"#, "x.json").unwrap_err();
/// assert!(err.to_string().contains("LORA, VERA, ADALORA"));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PeftConfig {
    /// The adapter type.
    pub peft_type: PeftType,
    /// `target_modules` / `exclude_modules`.
    pub targets: TargetSpec,
    /// `r` (AdaLoRA: `init_r`), `lora_alpha`, `rank_pattern`, `alpha_pattern` (LoRA only).
    pub ranks: RankAlpha,
    /// rsLoRA scaling (LoRA).
    pub use_rslora: bool,
    /// DoRA (LoRA).
    pub use_dora: bool,
    /// Adapter-input dropout (`lora_dropout` or `vera_dropout`).
    pub dropout: f64,
    /// `fan_in_fan_out`: the targeted weights are stored `(in, out)` (GPT-2's Conv1D). Used
    /// where the stored layout is not otherwise known (merging a checkpoint); the
    /// model-level API knows it from the module ([`crate::model::conv1d`]).
    pub fan_in_fan_out: bool,
    /// `lora_bias`: LoRA layers have a trainable bias on B (`lora_B.bias`).
    pub lora_bias: bool,
    /// `bias`: which base biases train and are saved with the adapter.
    pub bias: BiasMode,
    /// AdaLoRA's `rank_pattern`: per module (`<path>.lora_E`), which of the `init_r` ranks
    /// were kept.
    pub adalora_ranks: Vec<(String, Vec<bool>)>,
    /// Tensors of the adapter file that hold state of a training-only extension
    /// (VeLoRA's `lora_velora_embed`, MonteCLoRA's `lora_monteclora_sampler.*`; see
    /// [`lora_extensions`](super::lora_extensions)), named by a segment of their key:
    /// [`PeftAdapter`](crate::peft::PeftAdapter) leaves them out when it reads the file.
    pub skipped_tensors: Vec<String>,
    /// `target_parameters` (LoRA): parameters adapted in place of modules, as PEFT's
    /// `ParamWrapper` does: the experts (`experts.gate_up_proj`, `experts.down_proj`) and
    /// the router (`gate.weight`) of a mixture-of-experts model
    /// ([`crate::model::ParameterLora`]); each entry names a parameter key or its suffix.
    pub target_parameters: Vec<String>,
    /// Every key as read (unknown ones included); written back on save.
    pub raw: Map<String, Value>,
}

/// The largest rank (`r`, `init_r`, a `rank_pattern` value) accepted from a config: a
/// corrupted or hostile file must not make a layer allocate `r × d` values without bound
/// (PEFT's ranks are in the tens to low thousands).
pub const MAX_RANK: usize = 1 << 16;

/// `r` must be in `1..=MAX_RANK` (PEFT rejects `r <= 0` too).
fn check_rank(r: usize, field: &'static str, what: &str, p: &Path) -> Result<()> {
    if r == 0 || r > MAX_RANK {
        return Err(Error::file_config(
            p,
            field,
            format!("{what}must be between 1 and {MAX_RANK}, got {r}"),
        ));
    }
    Ok(())
}

/// Reads `key` as a non-negative integer, or `default` when absent / null.
fn get_usize(
    map: &Map<String, Value>,
    key: &'static str,
    default: usize,
    p: &Path,
) -> Result<usize> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
            Error::file_config(p, key, format!("expected a non-negative integer, got {v}"))
        }),
    }
}

fn get_f64(map: &Map<String, Value>, key: &'static str, default: f64, p: &Path) -> Result<f64> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| Error::file_config(p, key, format!("expected a number, got {v}"))),
    }
}

fn get_bool(map: &Map<String, Value>, key: &'static str, p: &Path) -> Result<bool> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| Error::file_config(p, key, format!("expected true or false, got {v}"))),
    }
}

/// `target_parameters`: a list of parameter names (LoRA only, without DoRA, dropout or
/// `lora_bias`, which PEFT's `ParamWrapper` refuses too); empty when absent or null.
fn target_parameters(
    raw: &Map<String, Value>,
    peft_type: PeftType,
    p: &Path,
) -> Result<Vec<String>> {
    let field = "target_parameters";
    let names = match raw.get(field) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::file_config(p, field, "expected a list of parameter names"))?,
        Some(v) => {
            return Err(Error::file_config(
                p,
                field,
                format!("expected a list of parameter names, got {v}"),
            ))
        }
    };
    if names.is_empty() {
        return Ok(names);
    }
    let refused = if peft_type != PeftType::Lora {
        Some(format!("{} (LoRA only)", peft_type.as_str()))
    } else {
        ["use_dora", "lora_bias"]
            .into_iter()
            .find(|k| raw.get(*k).and_then(Value::as_bool) == Some(true))
            .map(|k| format!("{k} (PEFT's ParamWrapper refuses it too)"))
            .or_else(|| {
                let dropout = raw
                    .get("lora_dropout")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0);
                (dropout != 0.0).then(|| format!("lora_dropout {dropout} (PEFT refuses it too)"))
            })
    };
    match refused {
        Some(what) => Err(Error::file_config(
            p,
            field,
            format!("adapters on parameters cannot be combined with {what}"),
        )),
        None => Ok(names),
    }
}

/// Parses a `target_modules` / `exclude_modules` value (list, regex string, `all-linear`).
fn selector(v: &Value, key: &'static str, p: &Path) -> Result<ModuleSelector> {
    match v {
        Value::String(s) if key == "target_modules" && s.eq_ignore_ascii_case("all-linear") => {
            Ok(ModuleSelector::AllLinear)
        }
        Value::String(s) => Ok(ModuleSelector::Regex(FullRegex::new(s, key)?)),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    Error::file_config(p, key, format!("list entries must be strings, got {i}"))
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(ModuleSelector::List),
        other => Err(Error::file_config(
            p,
            key,
            format!("expected a list or a string, got {other}"),
        )),
    }
}

/// Reads a `{key: value}` pattern table in the file's key order (sorted, as PEFT writes).
fn pattern<T: Clone>(
    map: &Map<String, Value>,
    key: &'static str,
    p: &Path,
    conv: impl Fn(&Value) -> Option<T>,
) -> Result<Pattern<T>> {
    let pairs = match map.get(key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| {
                conv(v)
                    .map(|t| (k.clone(), t))
                    .ok_or_else(|| Error::file_config(p, key, format!("bad value for `{k}`: {v}")))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(other) => {
            return Err(Error::file_config(
                p,
                key,
                format!("expected an object, got {other}"),
            ))
        }
    };
    Pattern::new(pairs, key)
}

/// A list of strings (`modules_to_save`), empty when absent or null.
fn string_list(map: &Map<String, Value>, key: &'static str, p: &Path) -> Result<Vec<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    Error::file_config(p, key, format!("list entries must be strings, got {i}"))
                })
            })
            .collect(),
        Some(v) => Err(Error::file_config(
            p,
            key,
            format!("expected a list of strings, got {v}"),
        )),
    }
}

/// `layers_to_transform` (an index or a list of them) with `layers_pattern` (a string or a
/// list), as PEFT reads them; `None` when no layer index is given.
fn layer_filter(map: &Map<String, Value>, p: &Path) -> Result<Option<LayerFilter>> {
    let patterns = match map.get("layers_pattern") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(_) => string_list(map, "layers_pattern", p)?,
    };
    let bad = |v: &Value| {
        Error::file_config(
            p,
            "layers_to_transform",
            format!("expected a layer index or a list of them, got {v}"),
        )
    };
    let indexes = match map.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) if items.is_empty() => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|i| i.as_u64().map(|n| n as usize).ok_or_else(|| bad(i)))
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(v) => Some(vec![v.as_u64().ok_or_else(|| bad(v))? as usize]),
    };
    match indexes {
        Some(indexes) => Ok(Some(LayerFilter::new(indexes, patterns)?)),
        None if patterns.iter().any(|s| !s.is_empty()) => Err(Error::file_config(
            p,
            "layers_pattern",
            "given without layers_to_transform (PEFT refuses this too)",
        )),
        None => Ok(None),
    }
}

impl PeftConfig {
    /// Reads and parses `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::error::read_text(path)?;
        Self::from_json_str(&text, path)
    }

    /// Parses JSON text; `path` names the file in errors.
    pub fn from_json_str(text: &str, path: impl Into<PathBuf>) -> Result<Self> {
        let path: PathBuf = path.into();
        let p = path.as_path();
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.clone(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        let Value::Object(mut raw) = value else {
            return Err(Error::file_config(
                p,
                "(top level)",
                "expected a JSON object",
            ));
        };
        let peft_type = match raw.get("peft_type") {
            Some(Value::String(s)) => PeftType::parse(s)?,
            other => {
                return Err(Error::Unsupported {
                    what: "peft_type",
                    got: match other {
                        None => format!("missing (in {})", p.display()),
                        Some(v) => format!("{v} (in {})", p.display()),
                    },
                    supported: SUPPORTED_PEFT_TYPES.to_string(),
                })
            }
        };
        let target_parameters = target_parameters(&raw, peft_type, p)?;
        let targets = match raw.get("target_modules") {
            // PEFT allows a config that targets parameters only.
            None | Some(Value::Null) if !target_parameters.is_empty() => {
                TargetSpec::new(ModuleSelector::list(Vec::<String>::new()))
            }
            None | Some(Value::Null) => {
                return Err(Error::file_config(
                    p,
                    "target_modules",
                    "missing: PEFT's per-architecture defaults are not known to lorakit; list the modules",
                ))
            }
            Some(v) => TargetSpec::new(selector(v, "target_modules", p)?),
        };
        let targets = match raw.get("exclude_modules") {
            None | Some(Value::Null) => targets,
            Some(v) => targets.exclude(selector(v, "exclude_modules", p)?),
        };
        let skipped_tensors = check_extensions(&mut raw, p)?;
        let mut targets = targets;
        if let Some(filter) = layer_filter(&raw, p)? {
            if matches!(targets.target, ModuleSelector::Regex(_)) {
                return Err(Error::file_config(
                    p,
                    "layers_to_transform",
                    "cannot be used when target_modules is a regex string (PEFT refuses this too)",
                ));
            }
            targets = targets.layers(filter);
        }
        targets = targets.modules_to_save(string_list(&raw, "modules_to_save", p)?);
        let fan_in_fan_out = get_bool(&raw, "fan_in_fan_out", p)?;
        let lora_bias = get_bool(&raw, "lora_bias", p)?;
        let bias = match raw.get("bias") {
            None | Some(Value::Null) => BiasMode::None,
            Some(Value::String(b)) => b.parse().map_err(|_| {
                Error::file_config(
                    p,
                    "bias",
                    format!("expected \"none\", \"lora_only\" or \"all\", got \"{b}\""),
                )
            })?,
            Some(v) => {
                return Err(Error::file_config(
                    p,
                    "bias",
                    format!("expected a string, got {v}"),
                ))
            }
        };
        if lora_bias && peft_type != PeftType::Lora {
            return Err(Error::file_config(
                p,
                "lora_bias",
                format!(
                    "lora_bias is a LoRA setting; {} adapters have no bias on B",
                    peft_type.as_str()
                ),
            ));
        }
        if lora_bias && get_bool(&raw, "use_dora", p)? {
            return Err(Error::file_config(
                p,
                "lora_bias",
                "lora_bias is not supported with DoRA (use_dora); PEFT refuses this combination too",
            ));
        }

        let (default_r, dropout_key) = match peft_type {
            PeftType::Lora => (8, "lora_dropout"),
            PeftType::Vera => (256, "vera_dropout"),
            PeftType::AdaLora => (12, "lora_dropout"),
        };
        let r_key = match peft_type {
            PeftType::AdaLora => "init_r",
            _ => "r",
        };
        let r = get_usize(&raw, r_key, default_r, p)?;
        check_rank(r, r_key, "", p)?;
        let mut ranks = RankAlpha::new(r, get_f64(&raw, "lora_alpha", 8.0, p)?);
        let mut adalora_ranks = Vec::new();
        match peft_type {
            PeftType::Lora => {
                ranks.rank_pattern =
                    pattern(&raw, "rank_pattern", p, |v| v.as_u64().map(|n| n as usize))?;
                ranks.alpha_pattern = pattern(&raw, "alpha_pattern", p, Value::as_f64)?;
                for (k, &n) in ranks.rank_pattern.pairs() {
                    check_rank(n, "rank_pattern", &format!("`{k}`: "), p)?;
                }
            }
            PeftType::AdaLora => {
                if let Some(Value::Object(o)) = raw.get("rank_pattern") {
                    for (k, v) in o {
                        let mask = v
                            .as_array()
                            .and_then(|a| {
                                a.iter().map(Value::as_bool).collect::<Option<Vec<bool>>>()
                            })
                            .ok_or_else(|| {
                                Error::file_config(
                                    p,
                                    "rank_pattern",
                                    format!("`{k}`: expected a list of booleans"),
                                )
                            })?;
                        if mask.len() != r {
                            return Err(Error::file_config(
                                p,
                                "rank_pattern",
                                format!("`{k}` has {} entries, init_r is {r}", mask.len()),
                            ));
                        }
                        adalora_ranks.push((k.clone(), mask));
                    }
                }
            }
            PeftType::Vera => {}
        }
        Ok(Self {
            peft_type,
            targets,
            ranks,
            use_rslora: get_bool(&raw, "use_rslora", p)?,
            use_dora: get_bool(&raw, "use_dora", p)?,
            dropout: get_f64(&raw, dropout_key, 0.0, p)?,
            fan_in_fan_out,
            lora_bias,
            bias,
            adalora_ranks,
            skipped_tensors,
            target_parameters,
            raw,
        })
    }

    /// Whether `target_parameters` selects the parameter `key`
    /// (`model.layers.0.mlp.experts.gate_up_proj`): an entry equal to it or to a suffix of
    /// it after a dot, as PEFT matches them.
    ///
    /// ```
    /// use lorakit::peft::PeftConfig;
    /// let mut config = PeftConfig::lora(4, 8.0, &[]);
    /// config.target_parameters = vec!["experts.gate_up_proj".to_string()];
    /// assert!(config.targets_parameter("model.layers.0.mlp.experts.gate_up_proj"));
    /// assert!(!config.targets_parameter("model.layers.0.mlp.experts.down_proj"));
    /// ```
    pub fn targets_parameter(&self, key: &str) -> bool {
        self.target_parameters.iter().any(|t| {
            key.strip_suffix(t.as_str())
                .is_some_and(|head| head.is_empty() || head.ends_with('.'))
        })
    }

    /// The parameters of `module` that `target_parameters` selects, of those it registers
    /// (`registered`, in order): PEFT wraps them in this order, the first innermost.
    pub fn targeted_parameters<'a>(&self, module: &str, registered: &[&'a str]) -> Vec<&'a str> {
        registered
            .iter()
            .copied()
            .filter(|p| self.targets_parameter(&format!("{module}.{p}")))
            .collect()
    }

    /// The parameter (`model.layers.0.mlp.experts.gate_up_proj`) whose LoRA PEFT stores at
    /// the adapter's module path `path` (its `.base_layer` levels give the nesting), for a
    /// sparse block's experts or router; `None` for any other module.
    ///
    /// ```
    /// use lorakit::peft::PeftConfig;
    /// let mut config = PeftConfig::lora(4, 8.0, &[]);
    /// config.target_parameters = vec!["gate_up_proj".into(), "down_proj".into()];
    /// let at = |path: &str| config.parameter_at(path);
    /// assert_eq!(at("model.layers.0.mlp.experts").as_deref(), Some("model.layers.0.mlp.experts.down_proj"));
    /// assert_eq!(at("model.layers.0.mlp.experts.base_layer").as_deref(), Some("model.layers.0.mlp.experts.gate_up_proj"));
    /// assert_eq!(at("model.layers.0.self_attn.q_proj"), None);
    /// ```
    pub fn parameter_at(&self, path: &str) -> Option<String> {
        use crate::checkpoint::stacked_params::{registered_parameters, unwrapped};
        let module = unwrapped(path);
        let depth = path
            .get(module.len()..)
            .unwrap_or("")
            .matches(".base_layer")
            .count();
        let chosen = self.targeted_parameters(module, registered_parameters(module)?);
        let index = chosen.len().checked_sub(1 + depth)?;
        chosen.get(index).map(|p| format!("{module}.{p}"))
    }

    /// Whether the adapter's module `path` holds a LoRA on a parameter
    /// ([`PeftConfig::parameter_at`]).
    pub fn is_parameter_module(&self, path: &str) -> bool {
        self.parameter_at(path).is_some()
    }

    /// A LoRA config for fresh adapters (PEFT's defaults for everything not given).
    pub fn lora(r: usize, alpha: f64, target_modules: &[&str]) -> Self {
        Self::new(Variant::Lora, r, alpha, target_modules)
    }

    /// The config PEFT reads back for layers of `variant` with rank `r` (AdaLoRA: `init_r`;
    /// VeRA: the shared pair's rank) and `lora_alpha` (unused by VeRA), targeting
    /// `target_modules` (PEFT's defaults for everything not given). LoRA+, LoRA-FA,
    /// LoRA-drop and Delta-LoRA layers save as LoRA; DoRA as LoRA with `use_dora`. An
    /// AdaLoRA config also needs PEFT's `total_step` in [`PeftConfig::raw`] before saving.
    ///
    /// ```
    /// use lorakit::peft::{PeftConfig, PeftType};
    /// use lorakit::Variant;
    /// let config = PeftConfig::new(Variant::Dora, 8, 16.0, &["q_proj"]);
    /// assert_eq!((config.peft_type, config.use_dora), (PeftType::Lora, true));
    /// assert_eq!(config.variant(), Variant::Dora);
    /// ```
    pub fn new(variant: Variant, r: usize, alpha: f64, target_modules: &[&str]) -> Self {
        let peft_type = match variant.saved_as() {
            Variant::Vera => PeftType::Vera,
            Variant::AdaLora => PeftType::AdaLora,
            _ => PeftType::Lora,
        };
        let use_dora = variant == Variant::Dora;
        let r_key = match peft_type {
            PeftType::AdaLora => "init_r",
            _ => "r",
        };
        let mut raw = Map::new();
        raw.insert("peft_type".into(), peft_type.as_str().into());
        raw.insert(r_key.into(), r.into());
        raw.insert("lora_alpha".into(), alpha.into());
        if use_dora {
            raw.insert("use_dora".into(), true.into());
        }
        raw.insert(
            "target_modules".into(),
            Value::Array(target_modules.iter().map(|s| Value::from(*s)).collect()),
        );
        Self {
            peft_type,
            targets: TargetSpec::new(ModuleSelector::list(target_modules.iter().copied())),
            ranks: RankAlpha::new(r, alpha),
            use_rslora: false,
            use_dora,
            dropout: 0.0,
            fan_in_fan_out: false,
            lora_bias: false,
            bias: BiasMode::None,
            adalora_ranks: Vec::new(),
            skipped_tensors: Vec::new(),
            target_parameters: Vec::new(),
            raw,
        }
    }

    /// The variant whose layers this config describes: LoRA, DoRA (`use_dora`), VeRA or
    /// AdaLoRA.
    pub fn variant(&self) -> Variant {
        match (self.peft_type, self.use_dora) {
            (PeftType::Lora, false) => Variant::Lora,
            (PeftType::Lora, true) => Variant::Dora,
            (PeftType::Vera, _) => Variant::Vera,
            (PeftType::AdaLora, _) => Variant::AdaLora,
        }
    }

    /// `base_model_name_or_path`: the model the adapter was trained on, as PEFT recorded it
    /// (a Hub id or a local path), when present and not empty.
    pub fn base_model_name_or_path(&self) -> Option<&str> {
        self.raw
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// The glue that builds this config's layers.
    pub(crate) fn glue(&self) -> Result<&'static dyn PeftGlue> {
        peft_glue(self.variant()).ok_or_else(|| Error::Unsupported {
            what: "adapter type",
            got: self.describe(),
            supported: SUPPORTED_PEFT_TYPES.to_string(),
        })
    }

    /// One module's settings under this config (`init` and `seed` for fresh layers).
    pub(crate) fn module<'a>(
        &'a self,
        path: &'a str,
        settings: ModuleSettings,
        init: &LoraConfig,
    ) -> PeftModule<'a> {
        PeftModule {
            path,
            settings,
            use_rslora: self.use_rslora,
            dropout: self.dropout,
            raw: &self.raw,
            init: init.init,
            seed: init.seed,
            lora_bias: self.lora_bias,
        }
    }

    /// The residual PEFT makes of the targeted base weights when it loads an adapter of
    /// this config (`init_lora_weights` "pissa" or "olora"), which lorakit recomputes in
    /// [`PeftAdapter::plan`](crate::peft::PeftAdapter::plan); `None` for an init that
    /// leaves them. An init lorakit does not recompute (a randomized PiSSA, CorDA, LoftQ)
    /// or does not know is an error naming it.
    ///
    /// ```
    /// use lorakit::peft::{BaseResidual, PeftConfig};
    /// # fn main() -> lorakit::Result<()> {
    /// let json = |init: &str| format!(
    ///     r#"{{"peft_type": "LORA", "target_modules": ["q_proj"], "init_lora_weights": {init}}}"#);
    /// let config = PeftConfig::from_json_str(&json("\"pissa\""), "adapter_config.json")?;
    /// assert_eq!(config.base_residual()?, Some(BaseResidual::Pissa));
    /// let config = PeftConfig::from_json_str(&json("true"), "adapter_config.json")?;
    /// assert_eq!(config.base_residual()?, None);
    /// let config = PeftConfig::from_json_str(&json("\"loftq\""), "adapter_config.json")?;
    /// assert!(config.base_residual().unwrap_err().to_string().contains("LoftQ"));
    /// # Ok(()) }
    /// ```
    pub fn base_residual(&self) -> Result<Option<BaseResidual>> {
        if self.peft_type != PeftType::Lora {
            return Ok(None);
        }
        base_residual(&self.raw, Scope::Settings("PEFT config".into()))
    }

    /// A plan that gives every target a fresh, trainable adapter of this config's type,
    /// with per-module rank and alpha from the config; `init` supplies what the config does
    /// not say (init scheme, seed). A LoRA config also trains LoRAs on the stacked
    /// parameters of a mixture of experts that PEFT's would (its `target_parameters`, and
    /// what PEFT's conversion of `target_modules` adds: see
    /// [`ParameterTargets`]). Save the trained set with
    /// [`save_adapter`](crate::peft::save_adapter) and this config
    /// ([`PeftConfig::with_parameter_loras`] names what its conversion added).
    pub fn fresh_plan(
        &self,
        adapter_vb: VarBuilder<'static>,
        init: &LoraConfig,
    ) -> Result<AdapterPlan> {
        check_computable(&self.raw, Scope::Settings("PEFT config".into()))?;
        check_base_unchanged(
            &self.raw,
            Scope::Settings("PEFT config".into()),
            "and lorakit does not draw these inits for a fresh adapter (it recomputes the \
             residual only for an adapter it loads)",
        )?;
        let glue = self.glue()?;
        glue.can_build_fresh()?;
        // LoRA on the stacked parameters PEFT adapts: `target_parameters`, and those its
        // conversion of `target_modules` adds on a mixture of experts.
        let lora = LoraConfig {
            dropout: self.dropout,
            use_rslora: self.use_rslora,
            ..init.clone()
        };
        let parameters = ParameterTargets::new(self.target_parameters.clone(), lora);
        let (config, init) = (self.clone(), init.clone());
        let factory = move |path: &str,
                            base: FrozenLinear,
                            vb: VarBuilder<'static>,
                            s: ModuleSettings|
              -> Result<crate::Shared<dyn crate::Adapter>> {
            glue.fresh(&config.module(path, s, &init), base, vb)
        };
        let plan = AdapterPlan::new(
            self.targets.clone(),
            self.ranks.clone(),
            adapter_vb,
            factory,
        )
        .with_bias_mode(self.bias);
        Ok(match self.variant() {
            Variant::Lora => plan.with_parameter_targets(parameters),
            _ => plan,
        })
    }

    /// This config with `adapter_config.json`'s `key` set to `value`, parsed again, so every
    /// setting is checked as if read from a file (e.g. `("modules_to_save",
    /// json!(["classifier"]))`, `("bias", json!("lora_only"))`, `("fan_in_fan_out",
    /// json!(true))`, `("layers_to_transform", json!([0, 1]))`).
    ///
    /// ```
    /// use lorakit::peft::{BiasMode, PeftConfig};
    /// # fn main() -> lorakit::Result<()> {
    /// let config = PeftConfig::lora(4, 8.0, &["query", "value"])
    ///     .with_setting("modules_to_save", serde_json::json!(["classifier"]))?
    ///     .with_setting("bias", serde_json::json!("lora_only"))?;
    /// assert_eq!(config.bias, BiasMode::LoraOnly);
    /// assert!(config.targets.is_module_to_save("classifier"));
    /// assert!(config.with_setting("bias", serde_json::json!("some")).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_setting(&self, key: &str, value: Value) -> Result<Self> {
        let mut raw = self.raw.clone();
        raw.insert(key.to_string(), value);
        let text = serde_json::to_string(&Value::Object(raw))
            .map_err(|e| Error::json(PathBuf::from("adapter_config.json"), &e))?;
        Self::from_json_str(&text, "adapter_config.json")
    }

    /// A short name of the adapter type: `LORA`, `LORA (rsLoRA)`, `LORA (DoRA)`, `VERA`, `ADALORA`.
    pub fn describe(&self) -> String {
        match (self.peft_type, self.use_dora, self.use_rslora) {
            (PeftType::Lora, true, true) => "LORA (DoRA, rsLoRA)".to_string(),
            (PeftType::Lora, true, false) => "LORA (DoRA)".to_string(),
            (PeftType::Lora, false, true) => "LORA (rsLoRA)".to_string(),
            (t, _, _) => t.as_str().to_string(),
        }
    }

    /// The AdaLoRA kept-rank mask of the module at `path`, if the config has one.
    pub fn adalora_mask(&self, path: &str) -> Option<&[bool]> {
        let key = format!("{path}.lora_E");
        self.adalora_ranks
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, m)| m.as_slice())
    }

    /// The JSON PEFT reads: every key read from the file (or set by a constructor), with
    /// keys sorted as PEFT writes them.
    pub fn to_json_string(&self) -> Result<String> {
        serde_json::to_string_pretty(&Value::Object(self.raw.clone())).map_err(|e| Error::Json {
            path: PathBuf::from("adapter_config.json"),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })
    }
}
