//! The merged folder's `config.json` when a merge adds a sequence-classification head or
//! unties an output head from the input embedding.
//!
//! A classifier fine-tuned from a checkpoint without a head (a causal LM, a bare encoder)
//! gets a fresh head when transformers loads it with `num_labels`, and PEFT's `SEQ_CLS`
//! task saves that head in `modules_to_save`. PEFT's `merge_and_unload()` then saves the
//! classifier's config: `architectures` names the `…ForSequenceClassification` class and
//! `id2label` / `label2id` list the labels. The checkpoint's own `config.json` describes no
//! head, which transformers reads as 2 labels: with any other number the merged checkpoint
//! does not load. [`edited_config`] makes the copied file say what PEFT's does.
//!
//! A causal LM's checkpoint also holds its language-modelling head (`lm_head.weight`), and
//! a BERT saved with its pre-training heads (the Hub's `bert-base-uncased`) holds `cls.*`,
//! which the classifier does not have: PEFT's merged save has no such tensors, and
//! transformers reports them as unexpected and ignores them. [`ConfigEdit::dropped`] names
//! those tensors, and the merge leaves them out.
//!
//! A merge that writes a tied head as a tensor of its own ([`crate::peft::tied_head`]) sets
//! `tie_word_embeddings` to `false`: else transformers ties the head back to the embedding
//! when it loads the folder, and the head's adapter is lost.

use std::path::Path;

use serde_json::{Map, Value};

use crate::checkpoint::{Checkpoint, Given};
use crate::error::{Error, Result};
use crate::peft::load::PeftAdapter;
use crate::peft::tied_head::UntiedHead;

/// The heads PEFT's `SEQ_CLS` task adds to `modules_to_save` (`classifier` for encoders,
/// `score` for decoders).
const SEQ_CLS_HEADS: [&str; 2] = ["classifier", "score"];

/// The top-level modules that hold a pre-training head in transformers' checkpoints: a
/// language-modelling head (`lm_head` for Llama, Qwen2, Mistral, GPT-2, OPT … and
/// RoBERTa's masked-LM head, `embed_out` for GPT-NeoX), BERT's masked-LM and
/// next-sentence heads (`cls`), DistilBERT's masked-LM head (`vocab_transform`,
/// `vocab_layer_norm`, `vocab_projector`) and ELECTRA's discriminator and generator heads
/// (`discriminator_predictions`, `generator_predictions`, `generator_lm_head`). A
/// `…ForSequenceClassification` model has none of them.
const PRETRAINING_HEADS: [&str; 9] = [
    "lm_head",
    "embed_out",
    "cls",
    "vocab_transform",
    "vocab_layer_norm",
    "vocab_projector",
    "discriminator_predictions",
    "generator_predictions",
    "generator_lm_head",
];

/// What a checkpoint's architecture was before it became a classifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A causal LM (`…ForCausalLM`, `…LMHeadModel`): a decoder with an LM head the
    /// classifier drops.
    CausalLm,
    /// Another decoder (`…ForConditionalGeneration`): its heads are left as they are.
    OtherDecoder,
    /// An encoder (`…ForMaskedLM`, `…ForPreTraining`, a bare `…Model`): its pre-training
    /// heads, if the checkpoint has them, the classifier drops.
    Encoder,
}

/// Endings of head-less or language-modelling architecture names, longest first, and what
/// kind of model each names: `GPT2LMHeadModel`, `Qwen2ForCausalLM`, `BertForMaskedLM`,
/// `BertModel` …
const ARCHITECTURE_ENDINGS: [(&str, Origin); 6] = [
    ("ForConditionalGeneration", Origin::OtherDecoder),
    ("ForPreTraining", Origin::Encoder),
    ("LMHeadModel", Origin::CausalLm),
    ("ForCausalLM", Origin::CausalLm),
    ("ForMaskedLM", Origin::Encoder),
    ("Model", Origin::Encoder),
];

/// What [`edited_config`] changed, and what the user should know.
#[derive(Debug, Default)]
pub(crate) struct ConfigEdit {
    /// The new file's text.
    pub text: String,
    /// One line per change.
    pub changes: Vec<String>,
    /// Things the file cannot say on its own (a decoder without a padding token).
    pub warnings: Vec<String>,
    /// The checkpoint's tensors the classifier does not have, which the merge leaves out:
    /// pre-training heads ([`PRETRAINING_HEADS`]), by name, sorted.
    pub dropped: Vec<String>,
    /// The architecture the checkpoint named, when it was one lorakit renames.
    origin: Option<Origin>,
}

/// What a merge of `adapter` into `ckpt` writes as the output folder's `config.json` when
/// it adds a `SEQ_CLS` head or unties heads ([`edited_config`] on the checkpoint's file);
/// `None` when it does neither, the output is a single file, or the checkpoint has no
/// `config.json`. `added` lists the tensors the merge adds as `(module, own name, shape)`,
/// `untied` the heads it writes untied (merged from their table, or the adapter's copy),
/// `pad_token_id` an id the user gives for the file (an edit of its own).
/// Read before any data is written (the merge) or without writing anything
/// (`inspect --base`).
pub(crate) fn merged_config_edit<'a>(
    adapter: &PeftAdapter,
    ckpt: &Checkpoint,
    added: impl IntoIterator<Item = (&'a str, &'a str, &'a [usize])>,
    untied: &[UntiedHead],
    pad_token_id: Option<u32>,
) -> Result<Option<ConfigEdit>> {
    let config = ckpt.folder().join("config.json");
    if matches!(ckpt.given(), Given::File) || !config.is_file() {
        return Ok(None);
    }
    let labels = added_head_labels(adapter, added);
    let dequantized = ckpt.has_bnb4();
    if labels.is_none() && untied.is_empty() && pad_token_id.is_none() && !dequantized {
        return Ok(None);
    }
    let mut edit = edited_config(&config, labels, untied, pad_token_id, dequantized)?;
    if matches!(edit.origin, Some(Origin::CausalLm | Origin::Encoder)) {
        drop_pretraining_heads(ckpt, &mut edit);
    }
    Ok(Some(edit))
}

/// Whether `name` is a tensor of a pre-training head ([`PRETRAINING_HEADS`]), or of the
/// RoBERTa family's pooler (`roberta.pooler.*`, which the Hub's `roberta-base` and
/// `xlm-roberta-base` hold and `RobertaForSequenceClassification` has not).
fn is_pretraining_head(name: &str) -> bool {
    name.starts_with("roberta.pooler.")
        || name
            .split_once('.')
            .is_some_and(|(module, _)| PRETRAINING_HEADS.contains(&module))
}

/// Sets [`ConfigEdit::dropped`] to the tensors of `ckpt`'s pre-training heads, sorted
/// — except in a shard other than the last that holds nothing else: that shard would be
/// left with no tensors, and the output mirrors the checkpoint's shard names
/// (`…-of-0000N`), which announce it. Those stay, with a warning (transformers ignores
/// them).
fn drop_pretraining_heads(ckpt: &Checkpoint, edit: &mut ConfigEdit) {
    let last = ckpt.shards().len().saturating_sub(1);
    let mut names = Vec::new();
    for (i, shard) in ckpt.shards().iter().enumerate() {
        let tensors = shard.header.tensors();
        let heads: Vec<&str> = tensors
            .iter()
            .map(|t| t.name.as_str())
            .filter(|name| is_pretraining_head(name))
            .collect();
        if i != last && !heads.is_empty() && heads.len() == tensors.len() {
            edit.warnings.push(format!(
                "{} kept: it fills the shard {} alone, which would be left empty (the \
                 classifier has no such head; transformers ignores it)",
                heads.join(", "),
                shard.file_name
            ));
            continue;
        }
        names.extend(heads.into_iter().map(str::to_string));
    }
    names.sort();
    edit.dropped = names;
}

/// The number of labels of the head a merge adds: the rows of the added `weight` of a
/// `SEQ_CLS` adapter's head ([`SEQ_CLS_HEADS`], or its `out_proj`: the RoBERTa family's
/// `classifier.dense` / `classifier.out_proj`); `None` for any other adapter or when no
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
        // The RoBERTa family's two-layer head ends in `classifier.out_proj`.
        let module = module.strip_suffix(".out_proj").unwrap_or(module);
        let head = module.rsplit('.').next().unwrap_or(module);
        match (head, own, shape) {
            (head, "weight", [labels, _]) if *labels > 0 && SEQ_CLS_HEADS.contains(&head) => {
                Some(*labels)
            }
            _ => None,
        }
    })
}

/// The checkpoint's `config.json` at `source` rewritten ([`ConfigEdit::text`]) for a
/// classifier with `labels` outputs, if given, with `untied` heads
/// (`tie_word_embeddings: false`, when any) and with `pad_token_id`, if given. For a
/// classifier, as transformers saves the classifier PEFT merged:
///
/// - `architectures`: `<stem>ForSequenceClassification` for `<stem>LMHeadModel`,
///   `<stem>ForCausalLM`, `<stem>ForMaskedLM`, `<stem>ForPreTraining`,
///   `<stem>ForConditionalGeneration` or `<stem>Model` (a name that already ends in
///   `ForSequenceClassification` stays; any other is left with a warning: transformers'
///   Auto classes go by `model_type`);
/// - `id2label` / `label2id`: kept when `id2label` already has `labels` entries, else
///   transformers' defaults `LABEL_0 …`; `num_labels`, where the file has one, set.
///
/// A decoder's config without `pad_token_id` (none in the file, none given) gets a warning:
/// transformers classifies a batch of more than one row only with one set (PEFT's merge
/// keeps whatever was given when the model was loaded). Keys are written sorted, two-space indented, as transformers
/// writes them. Errors name `source`: unreadable, not JSON, not an object.
fn edited_config(
    source: &Path,
    labels: Option<usize>,
    untied: &[UntiedHead],
    pad_token_id: Option<u32>,
    dequantized: bool,
) -> Result<ConfigEdit> {
    let text = crate::error::read_text(source)?;
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::json(source, &e))?;
    let Value::Object(mut config) = value else {
        return Err(Error::checkpoint(
            source,
            "config.json is not a JSON object",
        ));
    };
    let mut edit = ConfigEdit::default();
    if let Some(id) = pad_token_id {
        let old = config.insert("pad_token_id".into(), Value::from(id));
        if old.as_ref().and_then(Value::as_u64) != Some(u64::from(id)) {
            let was = old.map_or_else(|| "none".to_string(), |v| v.to_string());
            edit.changes
                .push(format!("pad_token_id: {id} (was {was}), as given"));
        }
    }
    if let Some(labels) = labels {
        make_classifier(&mut config, labels, &mut edit);
    }
    if dequantized && config.remove("quantization_config").is_some() {
        edit.changes.push(
            "quantization_config removed: the bitsandbytes 4-bit weights are written \
             dequantized, as transformers' `model.dequantize()` saves them"
                .to_string(),
        );
    }
    if !untied.is_empty() {
        let heads: Vec<String> = untied
            .iter()
            .map(|u| format!("{}, tied to {} in the checkpoint", u.head, u.table))
            .collect();
        config.insert("tie_word_embeddings".into(), Value::Bool(false));
        edit.changes.push(format!(
            "tie_word_embeddings: false ({}, is written as its own tensor; the embedding \
             keeps its own weights)",
            heads.join("; ")
        ));
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

/// `architectures`, labels and the padding warning of a classifier with `labels` outputs.
fn make_classifier(config: &mut Map<String, Value>, labels: usize, edit: &mut ConfigEdit) {
    edit.origin = set_architecture(config, edit);
    let decoder = matches!(edit.origin, Some(Origin::CausalLm | Origin::OtherDecoder));
    set_labels(config, labels, edit);
    let pad = config.get("pad_token_id").filter(|v| !v.is_null());
    if decoder && pad.is_none() {
        edit.warnings.push(
            "config.json has no pad_token_id: transformers classifies batches of more than \
             one row with a decoder only when one is set (give the one the model was trained \
             with: lorakit merge --pad-token-id, MergeOptions::pad_token_id)"
                .to_string(),
        );
    }
}

/// `architectures` as a classifier's; returns what kind of model the name it had names
/// (`None` when it names none, is a classifier already or is not one lorakit knows).
fn set_architecture(config: &mut Map<String, Value>, edit: &mut ConfigEdit) -> Option<Origin> {
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
        return None;
    };
    if name.ends_with("ForSequenceClassification") {
        return None;
    }
    let Some((stem, origin)) = ARCHITECTURE_ENDINGS.iter().find_map(|(end, origin)| {
        name.strip_suffix(end)
            .filter(|stem| !stem.is_empty())
            .map(|stem| (stem, *origin))
    }) else {
        edit.warnings.push(format!(
            "config.json's architecture {name} has no sequence-classification name lorakit \
             knows; left as it is (transformers' Auto classes go by model_type)"
        ));
        return None;
    };
    let classifier = format!("{stem}ForSequenceClassification");
    edit.changes
        .push(format!("architectures: {name} -> {classifier}"));
    config.insert("architectures".into(), Value::from(vec![classifier]));
    Some(origin)
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

    /// `text` written to a fresh file, then [`edited_config`] for `labels` on it: the edit and the
    /// file's contents after it (unchanged: the caller writes the new text). The file and its
    /// folder (one per test, so that tests running at once do not share it) are removed.
    fn edited(name: &str, text: &str, labels: usize) -> (Result<ConfigEdit>, String) {
        let dir = std::env::temp_dir().join(format!(
            "lorakit-merged-config-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, text).unwrap();
        let edit = edited_config(&path, Some(labels), &[], None, false);
        let after = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_dir(&dir).unwrap();
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
