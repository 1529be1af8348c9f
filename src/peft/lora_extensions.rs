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

/// Refuses a config lorakit can read but not compute (Activated LoRA); `scope` names where
/// it came from.
pub(crate) fn check_computable(raw: &Map<String, Value>, scope: Scope) -> Result<()> {
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
