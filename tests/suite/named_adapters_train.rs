//! Training through `lorakit::model::NamedAdapters`: two adapters on one model (a fresh
//! LoRA to train and PEFT's DoRA from `tests/fixtures/models/llama/qwen2/dora`), the active
//! one trains, the other keeps every tensor, switching changes the logits, and each saved
//! adapter reloads (into a fresh `NamedAdapters` model) to the trained model's logits.
//! References: the tensors and logits before training, and the composed model itself.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::finetune::{AdapterRecipe, Dataset, Example, TrainConfig, Trainer};
use lorakit::model::{AdaptedSet, NamedAdapters};
use lorakit::models::llama::{LlamaConfig, LlamaForCausalLM};
use lorakit::models::CausalLm;
use lorakit::peft::{save_adapter, PeftAdapter};
use lorakit::Variant;

use crate::peft_common::{fixture, rel_err, temp_dir};

/// Every tensor the adapter saves, copied, by `<layer>.<name>`.
fn tensors(set: &AdaptedSet) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (path, layer) in set.layers() {
        for (name, t) in layer.read().tensors_to_save().unwrap() {
            out.insert(format!("{path}.{name}"), t.copy().unwrap());
        }
    }
    out
}

fn data() -> Dataset {
    let examples = (0..4u32)
        .map(|i| {
            let ids: Vec<u32> = (0..10).map(|k| 3 + i * 9 + (k % 5)).collect();
            Example::new(ids, vec![true; 10]).unwrap()
        })
        .collect();
    Dataset::from_examples(examples)
}

fn logits(model: &dyn CausalLm) -> Tensor {
    let ids = Tensor::new(&[[3u32, 4, 5, 6, 7, 3, 4]], &Device::Cpu).unwrap();
    model.logits(&ids).unwrap()
}

/// A fresh model under a `NamedAdapters` registry.
fn build_model(adapters: &NamedAdapters) -> LlamaForCausalLM {
    let plan = adapters.plan();
    let dir = fixture("models/llama/qwen2/base");
    let model = LlamaForCausalLM::from_pretrained(dir, DType::F32, &Device::Cpu, &plan).unwrap();
    plan.finish().unwrap();
    model
}

#[test]
fn the_active_adapter_trains_and_the_other_keeps_its_tensors() {
    let dev = Device::Cpu;
    let qwen2 = fixture("models/llama/qwen2");
    let config = LlamaConfig::from_file(qwen2.join("base/config.json")).unwrap();
    let adapters = NamedAdapters::new();
    let model = build_model(&adapters);
    let recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["q_proj", "v_proj", "up_proj"]);
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let plan = recipe
        .plan(vb, &config.linear_shapes(), DType::F32, &dev)
        .unwrap();
    let fresh = adapters.add("fresh", &plan).unwrap();
    let dora = adapters
        .load_peft("dora", qwen2.join("dora"), &dev)
        .unwrap();
    assert_eq!(adapters.active().as_deref(), Some("fresh"));
    let dora_before = tensors(&dora);
    adapters.set_active("dora").unwrap();
    let dora_logits = logits(&model);

    // Training the inactive adapter is refused: the loss does not reach it.
    let mut settings = TrainConfig::new(12);
    settings.lr = 1e-2;
    settings.batch.batch_size = 4;
    settings.batch.seq_len = 10;
    let mut idle = Trainer::new(&model, fresh.clone(), recipe.clone(), settings.clone()).unwrap();
    let err = idle.train(&data(), None, |_| {}).unwrap_err().to_string();
    assert!(err.contains("gradient") && err.contains("active"), "{err}");
    drop(idle);

    adapters.set_active("fresh").unwrap();
    let fresh_before = tensors(&fresh);
    let mut trainer = Trainer::new(&model, fresh.clone(), recipe, settings).unwrap();
    let before = trainer.evaluate(&data()).unwrap();
    trainer.train(&data(), None, |_| {}).unwrap();
    let after = trainer.evaluate(&data()).unwrap();
    assert!(after < 0.9 * before, "loss {before} -> {after}");
    let trained = tensors(&fresh);
    let moved = fresh_before
        .iter()
        .filter(|(k, t)| rel_err(&trained[*k], t) > 1e-3)
        .count();
    assert!(moved > 0, "no tensor of the trained adapter moved");
    for (key, t) in &dora_before {
        let now = &tensors(&dora)[key];
        assert_eq!(rel_err(now, t), 0.0, "inactive adapter's {key} changed");
    }

    // Switching changes the logits; the inactive adapter still gives its own.
    let fresh_logits = logits(&model);
    adapters.set_active("dora").unwrap();
    assert_eq!(rel_err(&logits(&model), &dora_logits), 0.0);
    assert!(rel_err(&fresh_logits, &dora_logits) > 1e-3);

    // Each saved adapter reloads onto a fresh model to the same logits.
    let out = temp_dir("named-train");
    trainer.save_adapter(out.join("fresh")).unwrap();
    let dora_config = PeftAdapter::load(qwen2.join("dora"), &dev).unwrap();
    save_adapter(out.join("dora"), dora_config.config(), &dora).unwrap();
    let again = NamedAdapters::new();
    let reloaded = build_model(&again);
    for (name, want) in [("fresh", &fresh_logits), ("dora", &dora_logits)] {
        again.load_peft(name, out.join(name), &dev).unwrap();
        again.set_active(name).unwrap();
        let err = rel_err(&logits(&reloaded), want);
        assert!(err < 1e-5, "{name}: reloaded logits differ by {err:e}");
    }
    std::fs::remove_dir_all(&out).ok();
}
