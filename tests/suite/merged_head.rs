//! Merging a PEFT `SEQ_CLS` adapter into the checkpoint it was fine-tuned from when that
//! checkpoint has no classification head (a GPT-2 causal LM, a bare BERT encoder, a sharded
//! Llama causal LM with an untied LM head): the merge adds the head, makes the copied
//! `config.json` the classifier's and leaves out the causal LM's own head, as PEFT's
//! `merge_and_unload()` + `save_pretrained()` writes them
//! (`scripts/make_merged_head_fixtures.py` → `tests/fixtures/merged_head/`, transformers
//! 5.25, PEFT 0.21.2, 3 labels).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lorakit::model::AdapterPlan;
use lorakit::models::AutoSequenceClassifier;
use lorakit::peft::{merge_checkpoint, MergeOptions};
use serde_json::Value;

use crate::peft_common::{assert_close, fixture, load, temp_dir};

fn case(name: &str) -> PathBuf {
    fixture("merged_head").join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The tensor names of the merged folder `out` (every `.safetensors` file in it).
fn merged_keys(out: &Path) -> Vec<String> {
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            keys.extend(load(&path).into_keys());
        }
    }
    keys.sort();
    keys
}

/// PEFT's merged tensor names for a case, without the prefix PEFT's classifier puts on a
/// bare encoder's names (`bert.`: transformers loads either form).
fn peft_keys(name: &str, strip: &str) -> Vec<String> {
    let keys: Vec<String> =
        serde_json::from_value(json(&case(name).join("peft_merged_keys.json"))).unwrap();
    let mut keys: Vec<String> = keys
        .into_iter()
        .map(|k| k.strip_prefix(strip).map_or(k.clone(), str::to_string))
        .collect();
    keys.sort();
    keys
}

/// lorakit's classifier built from the merged folder `out` alone gives PEFT's (unmerged)
/// logits of the case `name`.
fn assert_gives_peft_logits(out: &Path, name: &str) {
    let io = load(&case(name).join("io.safetensors"));
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let none = AdapterPlan::none();
    let model = AutoSequenceClassifier::from_pretrained(out, None, DType::F32, &Device::Cpu, &none)
        .unwrap();
    let logits: Tensor = model
        .as_classifier()
        .classify(&ids, None, None, false)
        .unwrap();
    assert_close(
        &logits,
        &io["logits"],
        1e-4,
        &format!("{name}: merged vs PEFT"),
    );
}

/// The merged folder's config.json equals PEFT's merged model's, its tensors are the ones
/// PEFT's merged save holds (a causal LM's `lm_head.weight` left out), and lorakit's
/// classifier built from the merged folder alone gives PEFT's (unmerged) logits.
#[test]
fn a_head_added_by_a_merge_is_described_as_peft_describes_it() {
    // (case, expects the missing-pad_token_id warning, PEFT's prefix, heads left out)
    let bert_heads: &[&str] = &[
        "cls.predictions.bias",
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.dense.weight",
        "cls.seq_relationship.bias",
        "cls.seq_relationship.weight",
    ];
    let cases: [(&str, bool, &str, &[&str]); 4] = [
        ("gpt2", true, "", &[]),
        ("bert", false, "bert.", &[]),
        ("bert_mlm", false, "", bert_heads),
        ("llama", false, "", &["lm_head.weight"]),
    ];
    for (name, decoder, prefix, want_dropped) in cases {
        let dir = case(name);
        let tmp = temp_dir(&format!("merged-head-{name}"));
        let out = tmp.join("merged");
        let report = merge_checkpoint(
            &dir.join("base"),
            &dir.join("adapter"),
            &out,
            MergeOptions::default(),
        )
        .unwrap();
        assert!(!report.added.is_empty(), "{name}: the head is added");
        let seen = lorakit::peft::inspect::inspect_against(&dir.join("adapter"), &dir.join("base"))
            .unwrap();
        assert_eq!(
            seen.config_changes, report.config_changes,
            "{name}: inspect --base tells what a merge changes"
        );
        assert_eq!(
            report.config_changes.len(),
            2,
            "{name}: {:?}",
            report.config_changes
        );
        assert_eq!(
            json(&out.join("config.json")),
            json(&dir.join("peft_merged_config.json")),
            "{name}: config.json as PEFT's merged model saves it"
        );
        let no_pad = report.warnings.iter().any(|w| w.contains("pad_token_id"));
        assert_eq!(no_pad, decoder, "{name}: {:?}", report.warnings);
        assert_eq!(
            merged_keys(&out),
            peft_keys(name, prefix),
            "{name}: the tensors PEFT's merged save holds"
        );
        assert_eq!(report.dropped, want_dropped, "{name}");
        assert_eq!(
            seen.dropped, report.dropped,
            "{name}: inspect --base tells it"
        );
        assert!(
            seen.untargeted.iter().all(|t| !seen.dropped.contains(t)),
            "{name}: a tensor left out is not also listed as kept untargeted"
        );

        assert_gives_peft_logits(&out, name);
    }
}

/// A merge that adds no head (the checkpoint already is the classifier) copies
/// config.json byte for byte.
#[test]
fn a_merge_that_adds_no_head_copies_config_json_unchanged() {
    let dir = fixture("decoder_cls").join("gpt2");
    let tmp = temp_dir("merged-head-none");
    let out = tmp.join("merged");
    let report = merge_checkpoint(
        &dir.join("base"),
        &dir.join("lora"),
        &out,
        MergeOptions::default(),
    )
    .unwrap();
    assert!(report.added.is_empty() && report.config_changes.is_empty());
    assert_eq!(
        std::fs::read(out.join("config.json")).unwrap(),
        std::fs::read(dir.join("base/config.json")).unwrap()
    );
}

/// A config.json the merge cannot rewrite (not a JSON object) is an error naming the
/// checkpoint's file, raised before anything is written: no output, no temporary left.
#[test]
fn an_unreadable_config_json_stops_the_merge_before_it_writes() {
    let dir = case("gpt2");
    let tmp = temp_dir("merged-head-bad-config");
    let base = tmp.join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy(
        dir.join("base/model.safetensors"),
        base.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(base.join("config.json"), "[1, 2]").unwrap();
    let out = tmp.join("merged");
    let err = merge_checkpoint(&base, &dir.join("adapter"), &out, MergeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("object"),
        "{err}"
    );
    assert!(
        err.contains(&base.display().to_string()),
        "names the checkpoint's file: {err}"
    );
    let left: Vec<_> = std::fs::read_dir(&*tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["base"], "nothing written beside it");
}

/// A causal LM's head that fills a shard other than the last on its own stays, with a
/// warning (leaving it out would leave a shard with no tensors, which the shard names
/// announce), and the output still loads: here the Llama fixture's last shard
/// (`lm_head.weight` alone) is renamed to sort first.
#[test]
fn a_head_alone_in_an_earlier_shard_stays_with_a_warning() {
    let dir = case("llama");
    let tmp = temp_dir("merged-head-empty-shard");
    let base = tmp.join("base");
    std::fs::create_dir_all(&base).unwrap();
    let (head_shard, renamed) = (
        "model-00004-of-00004.safetensors",
        "model-00000-of-00004.safetensors",
    );
    for entry in std::fs::read_dir(dir.join("base")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let dest = if name == head_shard { renamed } else { &name };
        std::fs::copy(&path, base.join(dest)).unwrap();
    }
    let index_path = base.join("model.safetensors.index.json");
    let mut index = json(&index_path);
    index["weight_map"]["lm_head.weight"] = Value::from(renamed);
    std::fs::write(&index_path, serde_json::to_string(&index).unwrap()).unwrap();

    let out = tmp.join("merged");
    let report =
        merge_checkpoint(&base, &dir.join("adapter"), &out, MergeOptions::default()).unwrap();
    assert!(report.dropped.is_empty(), "{:?}", report.dropped);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("lm_head.weight kept") && w.contains(renamed)),
        "{:?}",
        report.warnings
    );
    let seen = lorakit::peft::inspect::inspect_against(&dir.join("adapter"), &base).unwrap();
    assert!(
        seen.dropped.is_empty(),
        "inspect agrees: {:?}",
        seen.dropped
    );
    let mut want = peft_keys("llama", "");
    want.push("lm_head.weight".to_string());
    want.sort();
    assert_eq!(merged_keys(&out), want);

    assert_gives_peft_logits(&out, "llama");
}

/// `MergeOptions::pad_token_id` writes the id the model was trained with into the merged
/// config.json (a PEFT adapter does not record it), which silences the warning; an output
/// without a config.json refuses it before writing anything.
#[test]
fn a_given_pad_token_id_is_written_into_the_merged_config() {
    let dir = case("gpt2");
    let tmp = temp_dir("merged-head-pad");
    let out = tmp.join("merged");
    let options = MergeOptions {
        pad_token_id: Some(2),
        ..Default::default()
    };
    let report = merge_checkpoint(&dir.join("base"), &dir.join("adapter"), &out, options).unwrap();
    assert_eq!(
        json(&out.join("config.json"))["pad_token_id"],
        Value::from(2)
    );
    assert!(
        report
            .config_changes
            .iter()
            .any(|c| c.starts_with("pad_token_id: 2")),
        "{:?}",
        report.config_changes
    );
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_gives_peft_logits(&out, "gpt2");

    let file_out = tmp.join("merged.safetensors");
    let options = MergeOptions {
        pad_token_id: Some(2),
        ..Default::default()
    };
    let err = merge_checkpoint(
        &dir.join("base/model.safetensors"),
        &dir.join("adapter"),
        &file_out,
        options,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("pad_token_id 2") && err.contains("config.json"),
        "{err}"
    );
    assert!(!file_out.exists());
}
