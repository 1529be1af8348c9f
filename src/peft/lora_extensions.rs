//! PEFT's extensions of its LoRA config (aLoRA, QALoRA, KaSA, VeLoRA, …) and what lorakit
//! does with a file that sets one.
//!
//! PEFT writes every field of its `LoraConfig` into `adapter_config.json`, unset ones as
//! `null` / `false`. An extension that changes what the adapter computes at inference
//! (the shape of A or B, an extra factor between them, the model's layers) is refused by
//! name when the config is read: loading such a file as plain LoRA would give different
//! outputs from PEFT's without a word. Activated LoRA (which tokens the adapter applies to)
//! is read, because `export-gguf` writes its invocation tokens for llama.cpp, which
//! computes it, but refused wherever lorakit would compute the adapter itself: a plan that
//! builds its layers ([`PeftAdapter::plan`](crate::peft::PeftAdapter::plan),
//! [`PeftConfig::fresh_plan`](crate::peft::PeftConfig::fresh_plan)), and so every load
//! onto a model and every merge. Extensions that change only how PEFT trains are
//! accepted: their adapters compute plain LoRA in evaluation, lorakit loads, merges and
//! trains them as LoRA, and the training-only state PEFT saved beside A and B is left
//! unused. `init_lora_weights` is read here too: PiSSA and OLoRA, after which PEFT's base
//! weights are a residual, are recomputed ([`base_residual`](super::base_residual)); the
//! other inits that change the base are refused wherever the adapter would be computed.

use std::path::Path;

use serde_json::{Map, Value};

use super::base_residual::BaseResidual;
use crate::error::{Error, Result, Scope};

/// A config field that, when set, makes the adapter compute something lorakit does not.
struct Refused {
    field: &'static str,
    reason: &'static str,
}

/// Refused when the config is read.
const REFUSED: &[Refused] = &[
    Refused {
        field: "use_qalora",
        reason: "QALoRA pools the input in groups before A (its A is (r, in / group size)); \
                 lorakit's layers take the full input",
    },
    Refused {
        field: "use_bdlora",
        reason: "BD-LoRA stores A or B as block-diagonal blocks; lorakit's factors are dense",
    },
    Refused {
        field: "kasa_config",
        reason: "KaSA removes the base weight's r smallest singular components and puts a \
                 trained diagonal (lora_diag) between A and B",
    },
    Refused {
        field: "arrow_config",
        reason: "Arrow routes each token among several LoRA experts",
    },
    Refused {
        field: "layer_replication",
        reason: "PEFT repeats layers of the base model; lorakit's models keep the \
                 checkpoint's layers",
    },
    Refused {
        field: "trainable_token_indices",
        reason: "trainable rows of the embedding (trainable tokens) are not supported",
    },
];

/// Read, and refused where lorakit would compute the adapter.
const ACTIVATED_LORA: Refused = Refused {
    field: "alora_invocation_tokens",
    reason: "Activated LoRA (aLoRA) applies the adapter only from its invocation tokens on; \
             lorakit's layers and merges would apply it to every token (export-gguf writes \
             it for llama.cpp, which computes it)",
};

/// PEFT's `init_lora_weights` values that leave the base weights as stored: the loaded A and
/// B replace whatever the init drew (`true` and `false` are booleans). With whether PEFT
/// compares the name ignoring case.
const INITS_KEEPING_THE_BASE: &[(&str, bool)] = &[
    ("gaussian", true),
    ("mica", true),
    ("eva", false),
    ("orthogonal", false),
    ("lora_ga", false),
];

/// What an `init_lora_weights` string that changes the base weights means for lorakit.
enum BaseChange {
    /// Recomputed when the adapter is built ([`BaseResidual`]).
    Computed(BaseResidual),
    /// Refused, with why.
    Refused(&'static str),
}

/// How PEFT treats `init`, if it changes the base weights (`None`: it does not, or it is
/// not an init PEFT knows).
fn base_change(init: &str) -> Option<BaseChange> {
    if init == "pissa" {
        Some(BaseChange::Computed(BaseResidual::Pissa))
    } else if init.eq_ignore_ascii_case("olora") {
        Some(BaseChange::Computed(BaseResidual::Olora))
    } else if init.starts_with("pissa") {
        Some(BaseChange::Refused(
            "PiSSA with a randomized SVD: PEFT replaces each targeted base weight by a \
             residual from `torch.svd_lowrank`, drawn anew (from torch's random state) every \
             time it loads the adapter, so no load reproduces another (or the training's) \
             exactly",
        ))
    } else if init.starts_with("corda") {
        Some(BaseChange::Refused(
            "CorDA: the base weights are replaced by a residual computed from activation \
             statistics of a calibration set, which the adapter does not hold (PEFT itself \
             needs `preprocess_corda` first)",
        ))
    } else if init == "loftq" {
        Some(BaseChange::Refused(
            "LoftQ: the base weights are replaced by their quantized residual, computed \
             from `loftq_config` when PEFT loads the adapter",
        ))
    } else {
        None
    }
}

/// The residual PEFT makes of the base weights when it loads this config's adapter
/// (`init_lora_weights` "pissa" or "olora"; [`BaseResidual`]), or `None`. Refuses the
/// inits that change the base in a way lorakit does not compute (a randomized PiSSA,
/// CorDA, LoftQ), naming the init and how PEFT converts such an adapter to plain LoRA,
/// and, as PEFT does, a string that names no init. PEFT leaves an embedding's table as
/// it is for these inits; a refused one refuses the whole adapter all the same.
pub(crate) fn base_residual(
    raw: &Map<String, Value>,
    scope: Scope,
) -> Result<Option<BaseResidual>> {
    let field = "init_lora_weights";
    let reason = match raw.get(field) {
        None | Some(Value::Null | Value::Bool(_)) => return Ok(None),
        Some(Value::String(init)) => match base_change(init) {
            Some(BaseChange::Computed(residual)) => return Ok(Some(residual)),
            Some(BaseChange::Refused(why)) => {
                format!("\"{init}\" is not supported by lorakit: {why}. {CONVERT}")
            }
            None if INITS_KEEPING_THE_BASE.iter().any(|&(known, any_case)| {
                init == known || (any_case && init.eq_ignore_ascii_case(known))
            }) =>
            {
                return Ok(None)
            }
            None => format!(
                "unknown value \"{init}\" (PEFT refuses it too); known: true, false, {}, \
                 pissa, pissa_niter_N, olora, corda, loftq",
                INITS_KEEPING_THE_BASE
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        Some(other) => format!("expected a boolean or a string, got {other}"),
    };
    Err(Error::InvalidConfig {
        scope,
        field,
        reason,
    })
}

/// How PEFT turns an adapter whose init changed the base into plain LoRA.
const CONVERT: &str = "Convert the adapter to plain LoRA with PEFT, \
    `model.save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter as \
    initialized>)` (rank 2r, on the original base), or merge it with PEFT";

/// Refuses every init that changes the base weights, [`base_residual`]'s computed ones
/// too, where lorakit cannot apply the residual; `where_` says why (llama.cpp, after
/// `export-gguf`, adds B·A to the base as stored).
pub(crate) fn check_base_unchanged(
    raw: &Map<String, Value>,
    scope: Scope,
    where_: &str,
) -> Result<()> {
    match base_residual(raw, scope.clone())? {
        None => Ok(()),
        Some(residual) => Err(Error::InvalidConfig {
            scope,
            field: "init_lora_weights",
            reason: format!(
                "\"{}\": PEFT replaces each targeted base weight by a residual when it \
                 loads this adapter, {where_}. {CONVERT}",
                residual.name()
            ),
        }),
    }
}

/// A config field whose method changes only PEFT's training: `names` are the tensors (a
/// segment of the key after the module path) PEFT saves for it, which lorakit skips.
struct TrainingOnly {
    field: &'static str,
    names: &'static [&'static str],
}

const TRAINING_ONLY: &[TrainingOnly] = &[
    // VeLoRA: A's backward reads compressed activations; evaluation is `B (A x)`.
    TrainingOnly {
        field: "velora_config",
        names: &["lora_velora_embed"],
    },
    // MonteCLoRA: A is perturbed by sampled noise in training only.
    TrainingOnly {
        field: "monteclora_config",
        names: &["lora_monteclora_sampler"],
    },
];

/// Refuses a config that sets an extension lorakit cannot compute (naming the field and
/// what it does), and removes the fields of training-only extensions from `raw` (an
/// adapter lorakit saves back is plain LoRA). Returns the tensor names PEFT saved for
/// those extensions, to be left unused by the loader.
pub(crate) fn check_extensions(raw: &mut Map<String, Value>, path: &Path) -> Result<Vec<String>> {
    for refused in REFUSED {
        if raw.get(refused.field).is_some_and(is_set) {
            return Err(Error::file_config(
                path,
                refused.field,
                format!("not supported by lorakit: {}", refused.reason),
            ));
        }
    }
    let mut skipped = Vec::new();
    for extension in TRAINING_ONLY {
        if raw.remove(extension.field).as_ref().is_some_and(is_set) {
            skipped.extend(extension.names.iter().map(|n| n.to_string()));
        }
    }
    Ok(skipped)
}

/// Refuses a config lorakit can read but not compute (Activated LoRA, an init that changes
/// the base weights in a way lorakit does not recompute: [`base_residual`]); `scope` names
/// where it came from.
pub(crate) fn check_computable(raw: &Map<String, Value>, scope: Scope) -> Result<()> {
    base_residual(raw, scope.clone())?;
    match raw.get(ACTIVATED_LORA.field) {
        Some(v) if is_set(v) => Err(Error::InvalidConfig {
            scope,
            field: ACTIVATED_LORA.field,
            reason: format!("not supported by lorakit: {}", ACTIVATED_LORA.reason),
        }),
        _ => Ok(()),
    }
}

/// Whether `key` (a tensor of the adapter file) belongs to one of `skipped`'s methods.
pub(crate) fn is_skipped_tensor(key: &str, skipped: &[String]) -> bool {
    key.split('.')
        .any(|segment| skipped.iter().any(|s| s == segment))
}

/// What PEFT writes for an unset field: `null`, `false`, an empty list or map.
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => unreachable!(),
        }
    }

    #[test]
    fn unset_fields_pass_and_set_ones_are_refused_by_name() {
        let p = Path::new("adapter_config.json");
        let mut unset = raw(json!({"alora_invocation_tokens": [5], "use_qalora": false,
            "layer_replication": [], "kasa_config": {}, "velora_config": null}));
        assert_eq!(
            check_extensions(&mut unset, p).unwrap(),
            Vec::<String>::new()
        );
        let scope = || Scope::Settings("config".into());
        assert!(check_computable(&unset, scope()).is_err());
        unset.insert("alora_invocation_tokens".into(), Value::Null);
        assert!(check_computable(&unset, scope()).is_ok());
        for (field, value) in [
            ("use_qalora", json!(true)),
            ("layer_replication", json!([[0, 2]])),
            ("kasa_config", json!({"r": 4})),
        ] {
            let mut set = raw(json!({ field: value }));
            let err = check_extensions(&mut set, p).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    /// Inits that leave the base give no residual, PiSSA and OLoRA theirs, as PEFT spells
    /// them; those lorakit does not recompute, and strings PEFT does not know, are refused
    /// naming the value. `check_base_unchanged` refuses PiSSA and OLoRA too, saying where.
    #[test]
    fn inits_are_read_as_peft_reads_them() {
        let config = |v: Value| raw(json!({ "init_lora_weights": v }));
        let scope = || Scope::Settings("config".into());
        for keeps in [
            json!(true),
            json!(false),
            Value::Null,
            json!("gaussian"),
            json!("Gaussian"),
            json!("eva"),
            json!("orthogonal"),
            json!("lora_ga"),
            json!("MiCA"),
        ] {
            assert_eq!(
                base_residual(&config(keeps.clone()), scope()).unwrap(),
                None,
                "{keeps}"
            );
            assert!(check_base_unchanged(&config(keeps), scope(), "here").is_ok());
        }
        assert_eq!(base_residual(&Map::new(), scope()).unwrap(), None);
        for (value, residual) in [
            ("pissa", BaseResidual::Pissa),
            ("olora", BaseResidual::Olora),
            ("OLoRA", BaseResidual::Olora),
        ] {
            let c = config(json!(value));
            assert_eq!(base_residual(&c, scope()).unwrap(), Some(residual));
            let err = check_base_unchanged(&c, scope(), "which llama.cpp cannot do");
            let err = err.unwrap_err().to_string();
            assert!(
                err.contains("llama.cpp") && err.contains(residual.name()),
                "{err}"
            );
        }
        for (value, says) in [
            ("pissa_niter_4", "randomized"),
            ("corda", "CorDA"),
            ("loftq", "LoftQ"),
            ("EVA", "unknown"),
            ("PISSA", "unknown"),
            ("kaiming", "unknown"),
        ] {
            let err = base_residual(&config(json!(value)), scope())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(value) && err.contains(says) && err.contains("init_lora_weights"),
                "{err}"
            );
        }
        let err = base_residual(&config(json!(1)), scope()).unwrap_err();
        assert!(err.to_string().contains("boolean"));
    }

    #[test]
    fn training_only_fields_are_dropped_and_their_tensors_skipped() {
        let p = Path::new("adapter_config.json");
        let mut set = raw(json!({"velora_config": {"rank": 1}, "r": 4}));
        let skipped = check_extensions(&mut set, p).unwrap();
        assert!(!set.contains_key("velora_config"));
        assert!(is_skipped_tensor(
            "base_model.model.layers.0.q_proj.lora_velora_embed",
            &skipped
        ));
        assert!(!is_skipped_tensor(
            "base_model.model.layers.0.q_proj.lora_A.weight",
            &skipped
        ));
    }
}
