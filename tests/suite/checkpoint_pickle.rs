//! Model checkpoints as older Hub repositories have them: PyTorch pickles
//! (`pytorch_model.bin`, or shards with `pytorch_model.bin.index.json`) rewritten as
//! safetensors by `lorakit::checkpoint::from_pickle` (fixtures as transformers 4 wrote them:
//! `tests/fixtures/peft_pickle/models/`, `scripts/make_pickle_fixtures.py`), and checkpoints
//! saved from the base model alone (tensors without the head's `transformer.` / `bert.`
//! prefix, as the Hub's `gpt2` has them), which the models read as transformers does and
//! PEFT adapters merge into.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lorakit::checkpoint::from_pickle::convert_pickle_checkpoint;
use lorakit::checkpoint::Checkpoint;
use lorakit::model::AdapterPlan;
use lorakit::models::auto::AutoCausalLm;
use lorakit::models::bert::{BertConfig, BertForSequenceClassification};
use lorakit::models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
use lorakit::models::CausalLm;
use lorakit::peft::{adapted_var_builder, merge_checkpoint, MergeOptions, PeftAdapter};

use crate::checkpoint_merge::merged_tensors;
use crate::peft_common::{fixture, load, temp_dir};
use crate::peft_options::case_dir;

fn pickled(name: &str) -> PathBuf {
    fixture(&format!("peft_pickle/models/{name}"))
}

fn same_values(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.dtype() == b.dtype()
        && a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn logits(dir: &Path) -> Tensor {
    let model =
        AutoCausalLm::from_pretrained(dir, DType::F32, &Device::Cpu, &AdapterPlan::none()).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 12, 3, 7]], &Device::Cpu).unwrap();
    model.logits(&ids).unwrap()
}

#[test]
fn pickled_checkpoints_convert_to_the_same_tensors_and_logits() {
    let out = temp_dir("convert-pickles");
    // (pickled folder, the safetensors folder it was made from, prefix the pickle lacks)
    for (name, original, prefix) in [
        ("qwen2_sharded", fixture("models/llama/qwen2/base"), ""),
        ("gpt2", case_dir("gpt2_lora").join("base"), "transformer."),
    ] {
        let converted = out.join(name);
        let report = convert_pickle_checkpoint(&pickled(name), &converted).unwrap();
        assert_eq!(report.copied, ["config.json", "generation_config.json"]);
        let want = merged_tensors(&original);
        let got = merged_tensors(&converted);
        assert_eq!(report.tensors, got.len(), "{name}");
        for (key, t) in &want {
            let bare = key.strip_prefix(prefix).unwrap_or(key);
            let g = got
                .get(bare)
                .unwrap_or_else(|| panic!("{name}: `{bare}` missing"));
            assert!(same_values(g, t), "{name}: `{bare}` differs");
        }
        assert_eq!(
            logits(&converted).to_vec3::<f32>().unwrap(),
            logits(&original).to_vec3::<f32>().unwrap(),
            "{name}"
        );
    }
    // Shards stay shards, with an index naming each tensor's file.
    let sharded = Checkpoint::open(out.join("qwen2_sharded")).unwrap();
    assert_eq!(sharded.shards().len(), 3);
    assert!(sharded.index().is_some());
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn conversion_refuses_what_it_cannot_read_and_writes_nothing() {
    let out = temp_dir("convert-refused");
    let dest = out.join("converted");
    // No pickle checkpoint: both names given.
    let err = convert_pickle_checkpoint(&fixture("models/llama/qwen2/base"), &dest)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pytorch_model.bin") && err.contains("pytorch_model.bin.index.json"),
        "{err}"
    );
    // An index that places a tensor in a shard which lacks it.
    let src = out.join("bad_index");
    std::fs::create_dir(&src).unwrap();
    for entry in std::fs::read_dir(pickled("qwen2_sharded")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, src.join(path.file_name().unwrap())).unwrap();
    }
    let index_path = src.join("pytorch_model.bin.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let (key, shard) = map
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    let other = if shard == "pytorch_model-00001-of-00003.bin" {
        "pytorch_model-00002-of-00003.bin"
    } else {
        "pytorch_model-00001-of-00003.bin"
    };
    map.insert(key.clone(), other.into());
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = convert_pickle_checkpoint(&src, &dest)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&key) && err.contains(other), "{err}");
    // A tensor in two shards: shard 2 replaced by a copy of shard 1 (the index listing one
    // tensor there and none of shard 2's own).
    let one = "pytorch_model-00001-of-00003.bin";
    let two = "pytorch_model-00002-of-00003.bin";
    std::fs::copy(src.join(one), src.join(two)).unwrap();
    let original = pickled("qwen2_sharded").join("pytorch_model.bin.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(original).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    map.retain(|_, v| v != two);
    let in_one = map.iter().find(|(_, v)| *v == one).unwrap().0.clone();
    map.insert(in_one, two.into()); // listed in shard 2, stored in shard 1 too
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = convert_pickle_checkpoint(&src, &dest)
        .unwrap_err()
        .to_string();
    assert!(err.contains("also in an earlier shard"), "{err}");
    // A shard that is not a pickle.
    std::fs::write(src.join(other), b"not a pickle").unwrap();
    let err = convert_pickle_checkpoint(&src, &dest)
        .unwrap_err()
        .to_string();
    assert!(err.contains(other), "{err}");
    assert!(!dest.exists(), "a failed conversion left {dest:?}");
    std::fs::remove_dir_all(out).unwrap();
}

/// The BERT fixture's checkpoint with its `bert.` prefix removed (what `BertModel` saves),
/// written beside `dir`.
fn bare_bert(dir: &Path) -> PathBuf {
    let base = case_dir("bert_cls").join("base");
    let renamed: HashMap<String, Tensor> = merged_tensors(&base)
        .into_iter()
        .map(|(k, t)| (k.strip_prefix("bert.").unwrap_or(&k).to_string(), t))
        .collect();
    let out = dir.join("bare_bert");
    std::fs::create_dir(&out).unwrap();
    candle_core::safetensors::save(&renamed, out.join("model.safetensors")).unwrap();
    std::fs::copy(base.join("config.json"), out.join("config.json")).unwrap();
    out
}

#[test]
fn base_model_checkpoints_load_under_the_heads_prefix_with_adapters() {
    let dir = temp_dir("bare-bert");
    let bare = bare_bert(&dir);
    let config = BertConfig::from_file(bare.join("config.json")).unwrap();
    let io = load(&case_dir("bert_cls").join("io.safetensors"));
    let ids = &io["input_ids"];
    let plan = PeftAdapter::load(case_dir("bert_cls").join("adapter"), &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap();
    let vb = Checkpoint::open(&bare)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let model = BertForSequenceClassification::load(&config, vb, &plan).unwrap();
    // Adapter modules keep the head's names, so every tensor of PEFT's file is used.
    plan.finish().unwrap();
    let logits = model.forward(ids, None, None).unwrap();
    crate::peft_common::assert_close(&logits, &io["logits"], 1e-4, "bare BERT + PEFT adapter");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A PEFT adapter (module names `transformer.…`) on a GPT-2 checkpoint saved from the base
/// model (`h.0.…`, converted from the pickle fixture): merged in streaming memory, and
/// through `adapted_var_builder`, it gives PEFT's merged weights and logits.
#[test]
fn adapters_merge_into_base_model_checkpoints() {
    let dir = temp_dir("bare-gpt2-merge");
    let bare = dir.join("bare");
    convert_pickle_checkpoint(&pickled("gpt2"), &bare).unwrap();
    let adapter = case_dir("gpt2_lora").join("adapter");
    let peft_merged = case_dir("gpt2_lora").join("merged");

    let out = dir.join("merged");
    let report = merge_checkpoint(&bare, &adapter, &out, MergeOptions::default()).unwrap();
    assert!(
        report.merged.iter().any(|p| p == "h.0.attn.c_attn"),
        "{:?}",
        report.merged
    );
    let want = merged_tensors(&peft_merged);
    for (name, t) in merged_tensors(&out) {
        let w = &want[&format!("transformer.{name}")];
        crate::peft_common::assert_close(&t, w, 1e-6, &name);
    }

    let want_logits = logits(&peft_merged);
    let vb = adapted_var_builder(&bare, &adapter, DType::F32, &Device::Cpu).unwrap();
    let config = Gpt2Config::from_file(bare.join("config.json")).unwrap();
    let model = Gpt2LmHeadModel::load(&config, vb, &AdapterPlan::none()).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 12, 3, 7]], &Device::Cpu).unwrap();
    crate::peft_common::assert_close(
        &model.forward(&ids).unwrap(),
        &want_logits,
        1e-5,
        "adapted_var_builder on the bare checkpoint",
    );
    std::fs::remove_dir_all(dir).unwrap();
}
