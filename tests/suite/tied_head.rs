//! Adapters on an output head tied to the input embedding (`tie_word_embeddings`: the
//! checkpoint has no `lm_head.weight`), against PEFT's unmerged logits
//! (`scripts/make_tied_head_fixtures.py` → `tests/fixtures/tied_head/`, transformers 5.25,
//! PEFT 0.21.2): a sharded Llama with a LoRA on `q_proj`, `v_proj` and `lm_head`, a GPT-2
//! with a DoRA on `lm_head`, a Llama with a LoRA on the embedding and the head under
//! `ensure_weight_tying`, and a Llama whose head the adapter trains in full
//! (`modules_to_save`). A merge writes the head untied; PEFT's own merge of an adapter on the
//! head changes the shared table and keeps the head tied, which the fixtures record as off
//! (`peft_merge.json`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lorakit::model::AdapterPlan;
use lorakit::models::AutoCausalLm;
use lorakit::peft::inspect::{inspect_against, Fit};
use lorakit::peft::{adapted_var_builder, merge_checkpoint, MergeOptions, PeftAdapter};
use serde_json::Value;

use crate::peft_common::{assert_close, fixture, load, rel_err, temp_dir};

/// The fixture cases with an adapter on the tied head, with the embedding table each head
/// is tied to.
const CASES: [(&str, &str); 4] = [
    ("llama", "model.embed_tokens.weight"),
    ("gpt2", "transformer.wte.weight"),
    ("llama_tying", "model.embed_tokens.weight"),
    // The same under a regex `target_modules` (PEFT adds the embedding to the pattern).
    ("llama_tying_regex", "model.embed_tokens.weight"),
];

/// The case whose adapter trains the tied head in full (`modules_to_save`).
const HEAD_COPY: &str = "llama_head_copy";

fn case(name: &str) -> PathBuf {
    fixture("tied_head").join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every tensor of the `.safetensors` files in `dir`, by name.
fn tensors_in(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    let mut all = std::collections::HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            all.extend(load(&path));
        }
    }
    all
}

/// lorakit's causal LM of the folder `dir` with `plan` gives PEFT's unmerged logits of the
/// case `name`.
fn assert_gives_peft_logits(dir: &Path, plan: &AdapterPlan, name: &str, what: &str) {
    let io = load(&case(name).join("io.safetensors"));
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let model = AutoCausalLm::from_pretrained(dir, DType::F32, &Device::Cpu, plan).unwrap();
    plan.finish().unwrap();
    let logits = model.forward(&ids).unwrap();
    assert_close(&logits, &io["logits"], 1e-5, &format!("{name}: {what}"));
}

/// Unmerged, and merged in memory (the head holds its own copy of the table, so the
/// embedding does not change with it, unlike PEFT's in-memory merge).
#[test]
fn an_adapter_on_a_tied_head_gives_pefts_unmerged_logits_merged_in_memory_too() {
    for name in CASES.iter().map(|(name, _)| *name).chain([HEAD_COPY]) {
        let adapter = PeftAdapter::load(case(name).join("adapter"), &Device::Cpu).unwrap();
        let plan = adapter.plan().unwrap();
        let io = load(&case(name).join("io.safetensors"));
        let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
        let base = case(name).join("base");
        let model = AutoCausalLm::from_pretrained(&base, DType::F32, &Device::Cpu, &plan).unwrap();
        let layers = plan.finish().unwrap();
        let unmerged = model.forward(&ids).unwrap();
        assert_close(&unmerged, &io["logits"], 1e-5, &format!("{name}: unmerged"));
        layers.merge_all(true).unwrap();
        let merged = model.forward(&ids).unwrap();
        assert_close(
            &merged,
            &io["logits"],
            1e-5,
            &format!("{name}: merged in memory"),
        );
    }
}

/// The merge writes the head as `lm_head.weight` (the table with the head's adapter merged,
/// in the last shard and the index), leaves the embedding's own tensor as its own adapter
/// makes it, and unties the head in `config.json`: the merged folder alone gives the
/// adapter's logits. PEFT's merged save gives logits off by more than their own size.
#[test]
fn a_merge_writes_a_tied_head_untied_and_gives_the_adapters_logits() {
    for (name, table) in CASES {
        let dir = temp_dir(&format!("tied-head-{name}"));
        let out = dir.join("merged");
        let base = case(name).join("base");
        let adapter = case(name).join("adapter");
        let report = merge_checkpoint(&base, &adapter, &out, MergeOptions::default()).unwrap();
        assert_eq!(
            report.untied,
            [format!("lm_head.weight (tied to {table})")],
            "{name}"
        );
        assert!(report.merged.iter().any(|m| m == "lm_head"), "{name}");
        assert!(report.warnings.is_empty(), "{name}: {:?}", report.warnings);
        assert!(
            report.config_changes[0].starts_with("tie_word_embeddings: false"),
            "{name}: {:?}",
            report.config_changes
        );
        let config = json(&out.join("config.json"));
        assert_eq!(config["tie_word_embeddings"], Value::Bool(false), "{name}");

        let before = tensors_in(&base);
        let after = tensors_in(&out);
        let mut names: Vec<&String> = after.keys().collect();
        names.sort();
        let mut expected: Vec<&String> = before.keys().collect();
        let head = "lm_head.weight".to_string();
        expected.push(&head);
        expected.sort();
        assert_eq!(names, expected, "{name}");
        let embedding_adapted = name.starts_with("llama_tying");
        let same_table = rel_err(&after[table], &before[table]) == 0.0;
        assert_eq!(same_table, !embedding_adapted, "{name}: {table}");
        if embedding_adapted {
            // Under ensure_weight_tying the head's change is the embedding's.
            assert_close(&after[&head], &after[table], 1e-6, "tied factors");
        }
        if let Some(index) = out
            .join("model.safetensors.index.json")
            .is_file()
            .then(|| json(&out.join("model.safetensors.index.json")))
        {
            let last = index["weight_map"]["lm_head.weight"].as_str().unwrap();
            assert!(last.ends_with("-of-00003.safetensors") && last.contains("00003-"));
        }

        assert_gives_peft_logits(&out, &AdapterPlan::none(), name, "merged");
        let peft = json(&case(name).join("peft_merge.json"));
        assert_eq!(peft["tie_word_embeddings"], Value::Bool(true));
        assert!(
            peft["reloaded_max_abs_logit_diff"].as_f64().unwrap() > 0.5,
            "{name}: PEFT's own merge of a tied head was expected to be off"
        );
    }
}

/// A head the adapter trained in full is added and untied in `config.json`, as PEFT's
/// merged save writes it (which gives PEFT's unmerged logits here).
#[test]
fn a_trained_copy_of_a_tied_head_is_added_and_untied_as_peft_saves_it() {
    let dir = temp_dir("tied-head-copy");
    let out = dir.join("merged");
    let base = case(HEAD_COPY).join("base");
    let adapter = case(HEAD_COPY).join("adapter");
    let report = merge_checkpoint(&base, &adapter, &out, MergeOptions::default()).unwrap();
    assert_eq!(report.added, ["lm_head.weight"]);
    assert!(report.untied.is_empty());
    assert!(report.config_changes[0].starts_with("tie_word_embeddings: false"));
    let peft = json(&case(HEAD_COPY).join("peft_merge.json"));
    assert_eq!(peft["tie_word_embeddings"], Value::Bool(false));
    assert_eq!(
        json(&out.join("config.json"))["tie_word_embeddings"],
        Value::Bool(false)
    );
    let mut keys: Vec<String> = tensors_in(&out).into_keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        serde_json::from_value::<Vec<String>>(peft["keys"].clone()).unwrap()
    );
    assert_gives_peft_logits(&out, &AdapterPlan::none(), HEAD_COPY, "merged");
}

#[test]
fn inspect_names_the_table_a_head_is_tied_to_and_the_config_change() {
    let m = inspect_against(&case("llama").join("adapter"), &case("llama").join("base")).unwrap();
    let head = m.modules.iter().find(|m| m.path == "lm_head").unwrap();
    assert_eq!(
        head.fit,
        Fit::TiedToEmbedding("model.embed_tokens.weight".into())
    );
    assert!(m.all_fit());
    assert!(m.config_changes[0].contains("tie_word_embeddings: false"));
    assert!(m.to_string().contains("tied to model.embed_tokens.weight"));
}

/// A checkpoint given as one file has no `config.json` to edit: the head is written all the
/// same, with a warning saying what to set.
#[test]
fn a_single_file_merge_unties_the_head_with_a_warning() {
    let dir = temp_dir("tied-head-file");
    let out = dir.join("merged.safetensors");
    let base = case("gpt2").join("base/model.safetensors");
    let report = merge_checkpoint(
        &base,
        &case("gpt2").join("adapter"),
        &out,
        MergeOptions::default(),
    )
    .unwrap();
    assert!(load(&out).contains_key("lm_head.weight"));
    assert!(report.config_changes.is_empty());
    let warning = report.warnings.join("\n");
    assert!(
        warning.contains("lm_head.weight") && warning.contains("tie_word_embeddings"),
        "{warning}"
    );
}

/// A config that says the head is not tied, with no head in the checkpoint: the head is
/// missing, not tied, and the merge stops before writing anything.
#[test]
fn a_missing_head_of_an_untied_config_is_an_error() {
    let dir = temp_dir("tied-head-untied");
    let base = dir.join("base");
    std::fs::create_dir(&base).unwrap();
    for entry in std::fs::read_dir(case("gpt2").join("base")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, base.join(path.file_name().unwrap())).unwrap();
    }
    let text = std::fs::read_to_string(base.join("config.json")).unwrap();
    let untied = text.replace(
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    assert_ne!(text, untied);
    std::fs::write(base.join("config.json"), untied).unwrap();
    let out = dir.join("merged");
    let err = merge_checkpoint(
        &base,
        &case("gpt2").join("adapter"),
        &out,
        MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("lm_head.weight") && err.contains("tie_word_embeddings to false"),
        "{err}"
    );
    assert!(!out.exists());
}

/// A model built from a `VarBuilder` reads the table for a tied head: the adapter's head
/// would be lost, so the adapted VarBuilder refuses it, naming the head and the table.
#[test]
fn the_adapted_var_builder_refuses_a_tied_head() {
    let err = adapted_var_builder(
        case("llama").join("base"),
        case("llama").join("adapter"),
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("lm_head") && err.contains("model.embed_tokens.weight"),
        "{err}"
    );
}
