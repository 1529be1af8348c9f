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
//! unused.

use std::path::Path;

use serde_json::{Map, Value};

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

/// Why an `init_lora_weights` value that changes the base weights cannot be computed by
/// lorakit (`None`: not one of them).
fn base_changing_init(init: &str) -> Option<&'static str> {
    let lower = init.to_ascii_lowercase();
    if init.starts_with("pissa") {
        Some(
            "PiSSA: when PEFT loads the adapter it replaces each targeted base weight W by \
             the residual W − U_r S_r V_rᵀ of its r largest singular values (by a \
             randomized SVD for `pissa_niter_N`), and A and B were trained against that \
             residual",
        )
    } else if lower == "olora" {
        Some(
            "OLoRA: when PEFT loads the adapter it replaces each targeted base weight W by \
             W − scale · Q_r R_r from W's QR decomposition, and A and B were trained against \
             that residual",
        )
    } else if init.starts_with("corda") {
        Some(
            "CorDA: the base weights are replaced by a residual computed from activation \
             statistics of a calibration set (PEFT itself needs `preprocess_corda` first)",
        )
    } else if init == "loftq" {
        Some(
            "LoftQ: the base weights are replaced by their quantized residual, computed \
             from `loftq_config` when PEFT loads the adapter",
        )
    } else {
        None
    }
}

/// Refuses an `init_lora_weights` that makes PEFT change the base weights when it loads
/// the adapter (PiSSA, OLoRA, CorDA, LoftQ): applied to the weights as stored, such an
/// adapter computes something else than in PEFT, whether lorakit computes it or llama.cpp
/// does after `export-gguf`. Refuses, as PEFT does, a string that names no init. The
/// message says how PEFT converts such an adapter to plain LoRA. PEFT leaves an
/// embedding's base unchanged for PiSSA, OLoRA and CorDA; the whole adapter is refused
/// all the same.
pub(crate) fn check_base_unchanged(raw: &Map<String, Value>, scope: Scope) -> Result<()> {
    let field = "init_lora_weights";
    let reason = match raw.get(field) {
        None | Some(Value::Null | Value::Bool(_)) => return Ok(()),
        Some(Value::String(init)) => match base_changing_init(init) {
            Some(why) => format!(
                "\"{init}\" is not supported by lorakit: {why}. Convert the adapter to plain \
                 LoRA with PEFT, `model.save_pretrained(out, \
                 path_initial_model_for_weight_conversion=<the adapter as initialized>)` \
                 (rank 2r), or merge it with PEFT"
            ),
            None if INITS_KEEPING_THE_BASE.iter().any(|&(known, any_case)| {
                init == known || (any_case && init.eq_ignore_ascii_case(known))
            }) =>
            {
                return Ok(())
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
/// the base weights: [`check_base_unchanged`]); `scope` names where it came from.
pub(crate) fn check_computable(raw: &Map<String, Value>, scope: Scope) -> Result<()> {
    check_base_unchanged(raw, scope.clone())?;
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

    /// Inits that leave the base pass, as PEFT spells them; those that change it, and
    /// strings PEFT does not know, are refused naming the value.
    #[test]
    fn inits_are_checked_as_peft_reads_them() {
        let check = |v: Value| {
            check_base_unchanged(
                &raw(json!({ "init_lora_weights": v })),
                Scope::Settings("config".into()),
            )
        };
        for ok in [
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
            assert!(check(ok.clone()).is_ok(), "{ok}");
        }
        assert!(check_base_unchanged(&Map::new(), Scope::Settings("c".into())).is_ok());
        for (value, says) in [
            ("pissa", "PiSSA"),
            ("pissa_niter_4", "PiSSA"),
            ("olora", "OLoRA"),
            ("OLoRA", "OLoRA"),
            ("corda", "CorDA"),
            ("loftq", "LoftQ"),
            ("EVA", "unknown"),
            ("PISSA", "unknown"),
            ("kaiming", "unknown"),
        ] {
            let err = check(json!(value)).unwrap_err().to_string();
            assert!(
                err.contains(value) && err.contains(says) && err.contains("init_lora_weights"),
                "{err}"
            );
        }
        assert!(check(json!(1)).unwrap_err().to_string().contains("boolean"));
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
