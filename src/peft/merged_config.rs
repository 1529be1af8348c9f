//! The merged folder's `config.json` when a merge adds a sequence-classification head.
//!
//! A classifier fine-tuned from a checkpoint without a head (a causal LM, a bare encoder)
//! gets a fresh head when transformers loads it with `num_labels`, and PEFT's `SEQ_CLS`
//! task saves that head in `modules_to_save`. PEFT's `merge_and_unload()` then saves the
//! classifier's config: `architectures` names the `…ForSequenceClassification` class and
//! `id2label` / `label2id` list the labels. The checkpoint's own `config.json` describes no
//! head, which transformers reads as 2 labels: with any other number the merged checkpoint
//! does not load. [`classifier_config`] makes the copied file say what PEFT's does.

use std::path::Path;

use serde_json::{Map, Value};

use crate::checkpoint::{Checkpoint, Given};
use crate::error::{Error, Result};
use crate::peft::load::PeftAdapter;

/// The heads PEFT's `SEQ_CLS` task adds to `modules_to_save` (`classifier` for encoders,
/// `score` for decoders).
const SEQ_CLS_HEADS: [&str; 2] = ["classifier", "score"];

/// Endings of head-less or language-modelling architecture names, longest first, and
/// whether the model is a decoder: `GPT2LMHeadModel`, `Qwen2ForCausalLM`,
/// `BertForMaskedLM`, `BertModel` …
const ARCHITECTURE_ENDINGS: [(&str, bool); 6] = [
    ("ForConditionalGeneration", true),
    ("ForPreTraining", false),
    ("LMHeadModel", true),
    ("ForCausalLM", true),
    ("ForMaskedLM", false),
    ("Model", false),
];

/// What [`classifier_config`] changed, and what the user should know.
#[derive(Debug, Default)]
pub(crate) struct ConfigEdit {
    /// The new file's text.
    pub text: String,
    /// One line per change.
    pub changes: Vec<String>,
    /// Things the file cannot say on its own (a decoder without a padding token).
    pub warnings: Vec<String>,
}

/// What a merge of `adapter` into `ckpt` writes as the output folder's `config.json` when
/// it adds a `SEQ_CLS` head ([`classifier_config`] on the checkpoint's file); `None` when
/// it adds none, the output is a single file, or the checkpoint has no `config.json`.
/// `added` lists the tensors the merge adds as `(module, own name, shape)`. Read before any
/// data is written (the merge) or without writing anything (`inspect --base`).
pub(crate) fn merged_config_edit<'a>(
    adapter: &PeftAdapter,
    ckpt: &Checkpoint,
    added: impl IntoIterator<Item = (&'a str, &'a str, &'a [usize])>,
) -> Result<Option<ConfigEdit>> {
    let config = ckpt.folder().join("config.json");
    match added_head_labels(adapter, added) {
        Some(labels) if !matches!(ckpt.given(), Given::File) && config.is_file() => {
            classifier_config(&config, labels).map(Some)
        }
        _ => Ok(None),
    }
}

/// The number of labels of the head a merge adds: the rows of the added `weight` of a
/// `SEQ_CLS` adapter's head ([`SEQ_CLS_HEADS`]); `None` for any other adapter or when no
/// such head is added.
fn added_head_labels<'a>(
    adapter: &PeftAdapter,
    added: impl IntoIterator<Item = (&'a str, &'a str, &'a [usize])>,
) -> Option<usize> {
    let task = adapter
        .config()
        .raw
        .get("task_type")
        .and_then(Value::as_str);
    if task != Some("SEQ_CLS") {
        return None;
    }
    added.into_iter().find_map(|(module, own, shape)| {
        let head = module.rsplit('.').next().unwrap_or(module);
        match (head, own, shape) {
            (head, "weight", [labels, _]) if *labels > 0 && SEQ_CLS_HEADS.contains(&head) => {
                Some(*labels)
            }
            _ => None,
        }
    })
}

/// The checkpoint's `config.json` at `source` rewritten for a classifier with `labels`
/// outputs ([`ConfigEdit::text`]), as transformers saves the classifier PEFT merged:
///
/// - `architectures`: `<stem>ForSequenceClassification` for `<stem>LMHeadModel`,
///   `<stem>ForCausalLM`, `<stem>ForMaskedLM`, `<stem>ForPreTraining`,
///   `<stem>ForConditionalGeneration` or `<stem>Model` (a name that already ends in
///   `ForSequenceClassification` stays; any other is left with a warning: transformers'
///   Auto classes go by `model_type`);
/// - `id2label` / `label2id`: kept when `id2label` already has `labels` entries, else
///   transformers' defaults `LABEL_0 …`; `num_labels`, where the file has one, set.
///
/// A decoder's config without `pad_token_id` gets a warning: transformers classifies a
/// batch of more than one row only with one set (PEFT's merge keeps whatever was given when
/// the model was loaded). Keys are written sorted, two-space indented, as transformers
/// writes them. Errors name `source`: unreadable, not JSON, not an object.
fn classifier_config(source: &Path, labels: usize) -> Result<ConfigEdit> {
    let text = std::fs::read_to_string(source).map_err(|e| Error::io(source, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::json(source, &e))?;
    let Value::Object(mut config) = value else {
        return Err(Error::checkpoint(
            source,
            "config.json is not a JSON object",
        ));
    };
    let mut edit = ConfigEdit::default();
    let decoder = set_architecture(&mut config, &mut edit);
    set_labels(&mut config, labels, &mut edit);
    let pad = config.get("pad_token_id").filter(|v| !v.is_null());
    if decoder && pad.is_none() {
        edit.warnings.push(
            "config.json has no pad_token_id: transformers classifies batches of more than \
             one row with a decoder only when one is set"
                .to_string(),
        );
    }
    // serde_json's map is sorted already unless some dependency turns on its
    // `preserve_order` feature; sorted here either way.
    let sorted: serde_json::Map<String, Value> = {
        let mut entries: Vec<(String, Value)> = config.into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.into_iter().collect()
    };
    let mut out = serde_json::to_string_pretty(&Value::Object(sorted))
        .map_err(|e| Error::json(source, &e))?;
    out.push('\n');
    edit.text = out;
    Ok(edit)
}

/// `architectures` as a classifier's; returns whether the model is a decoder (by the name
/// it had).
fn set_architecture(config: &mut Map<String, Value>, edit: &mut ConfigEdit) -> bool {
    let first = config
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(name) = first else {
        edit.warnings.push(
            "config.json names no architecture; transformers' Auto classes go by model_type"
                .to_string(),
        );
        return false;
    };
    if name.ends_with("ForSequenceClassification") {
        return false;
    }
    let Some((stem, decoder)) = ARCHITECTURE_ENDINGS.iter().find_map(|(end, decoder)| {
        name.strip_suffix(end)
            .filter(|stem| !stem.is_empty())
            .map(|stem| (stem, *decoder))
    }) else {
        edit.warnings.push(format!(
            "config.json's architecture {name} has no sequence-classification name lorakit \
             knows; left as it is (transformers' Auto classes go by model_type)"
        ));
        return false;
    };
    let classifier = format!("{stem}ForSequenceClassification");
    edit.changes
        .push(format!("architectures: {name} -> {classifier}"));
    config.insert("architectures".into(), Value::from(vec![classifier]));
    decoder
}

/// `id2label` / `label2id` (and `num_labels`, if present) for `labels` outputs.
fn set_labels(config: &mut Map<String, Value>, labels: usize, edit: &mut ConfigEdit) {
    let named = config
        .get("id2label")
        .and_then(Value::as_object)
        .map_or(0, Map::len);
    if named != labels {
        let id2label: Map<String, Value> = (0..labels)
            .map(|i| (i.to_string(), Value::from(format!("LABEL_{i}"))))
            .collect();
        let label2id: Map<String, Value> = (0..labels)
            .map(|i| (format!("LABEL_{i}"), Value::from(i)))
            .collect();
        config.insert("id2label".into(), Value::Object(id2label));
        config.insert("label2id".into(), Value::Object(label2id));
        edit.changes.push(format!(
            "id2label / label2id: {labels} labels (LABEL_0 … LABEL_{}), the head's rows",
            labels - 1
        ));
    }
    if config
        .get("num_labels")
        .is_some_and(|v| v.as_u64() != Some(labels as u64))
    {
        config.insert("num_labels".into(), Value::from(labels));
        edit.changes.push(format!("num_labels: {labels}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` written to a fresh file, then [`classifier_config`] on it: the edit and the
    /// file's contents after it (unchanged: the caller writes the new text).
    fn edited(name: &str, text: &str, labels: usize) -> (Result<ConfigEdit>, String) {
        let dir =
            std::env::temp_dir().join(format!("lorakit-merged-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, text).unwrap();
        let edit = classifier_config(&path, labels);
        let after = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        (edit, after)
    }

    #[test]
    fn labels_the_config_already_names_are_kept() {
        let text = r#"{"architectures": ["LlamaForCausalLM"], "pad_token_id": 0,
            "id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1}}"#;
        let (edit, after) = edited("named", text, 2);
        let edit = edit.unwrap();
        assert_eq!(
            edit.changes,
            ["architectures: LlamaForCausalLM -> LlamaForSequenceClassification"]
        );
        assert!(edit.warnings.is_empty(), "{:?}", edit.warnings);
        let v: Value = serde_json::from_str(&edit.text).unwrap();
        assert_eq!(v["id2label"]["1"], "pos");
        assert!(edit.text.ends_with("}\n"));
        assert_eq!(after, text, "the source is not touched");
    }

    #[test]
    fn an_unknown_architecture_is_left_with_a_warning() {
        let (edit, _) = edited(
            "odd",
            r#"{"architectures": ["Mystery"], "num_labels": 2}"#,
            4,
        );
        let edit = edit.unwrap();
        assert!(
            edit.warnings.iter().any(|w| w.contains("Mystery")),
            "{:?}",
            edit.warnings
        );
        let v: Value = serde_json::from_str(&edit.text).unwrap();
        assert_eq!(v["architectures"][0], "Mystery");
        assert_eq!(
            (v["num_labels"].as_u64(), v["id2label"]["3"].as_str()),
            (Some(4), Some("LABEL_3"))
        );
    }

    #[test]
    fn a_config_that_is_not_an_object_is_an_error_naming_the_file() {
        let (edit, after) = edited("list", "[1, 2]", 3);
        let err = edit.unwrap_err().to_string();
        assert!(err.contains("list.json") && err.contains("object"), "{err}");
        assert_eq!(after, "[1, 2]", "left as it was");
    }
}
