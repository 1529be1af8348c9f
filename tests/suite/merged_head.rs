//! Merging a PEFT `SEQ_CLS` adapter into the checkpoint it was fine-tuned from when that
//! checkpoint has no classification head (a GPT-2 causal LM, a bare BERT encoder): the
//! merge adds the head and makes the copied `config.json` the classifier's, as PEFT's
//! `merge_and_unload()` + `save_pretrained()` writes it (`scripts/make_merged_head_fixtures.py`
//! → `tests/fixtures/merged_head/`, transformers 5.24, PEFT 0.21.2, 3 labels).

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

/// The merged folder's config.json equals PEFT's merged model's, and lorakit's classifier
/// built from the merged folder alone gives PEFT's (unmerged) logits.
#[test]
fn a_head_added_by_a_merge_is_described_as_peft_describes_it() {
    for (name, decoder) in [("gpt2", true), ("bert", false)] {
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

        let io = load(&dir.join("io.safetensors"));
        let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
        let none = AdapterPlan::none();
        let model =
            AutoSequenceClassifier::from_pretrained(&out, None, DType::F32, &Device::Cpu, &none)
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
