//! A BERT checkpoint without a pooler (saved from `BertForMaskedLM`, as many pretrained
//! encoders are) under a classifier: the pooler is trained with the head
//! (`modules_to_save`), as a PEFT adapter must train it for its logits to survive a
//! reload (`scripts/make_bert_no_pooler_fixtures.py` → `tests/fixtures/bert_no_pooler/`,
//! transformers 5.25, PEFT 0.21.2); without that the classifier is an error naming the
//! pooler; and a fine-tune on such a checkpoint saves an adapter that reloads to the
//! trained model's logits.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::finetune::AdapterRecipe;
use lorakit::model::AdapterPlan;
use lorakit::models::bert::BertForSequenceClassification;
use lorakit::models::AutoSequenceClassifier;
use lorakit::peft::{merge_checkpoint, MergeOptions, PeftAdapter};
use lorakit::Variant;

use crate::peft_common::{assert_close, fixture, load, temp_dir};

fn case() -> PathBuf {
    fixture("bert_no_pooler")
}

fn base() -> PathBuf {
    case().join("base")
}

/// The fixture's inputs as lorakit takes them: `(input_ids, attention_mask)`.
fn inputs() -> (Tensor, Tensor) {
    let io = load(&case().join("io.safetensors"));
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    (ids, io["attention_mask"].clone())
}

fn logits(model: &BertForSequenceClassification) -> Tensor {
    let (ids, mask) = inputs();
    model.forward(&ids, None, Some(&mask)).unwrap()
}

fn classifier(
    dir: &std::path::Path,
    plan: &AdapterPlan,
) -> lorakit::Result<BertForSequenceClassification> {
    BertForSequenceClassification::from_pretrained(dir, DType::F32, &Device::Cpu, plan)
}

/// PEFT's adapter, which trained the pooler with the head, over the pooler-less base gives
/// PEFT's logits, every tensor of the file used; merged into the base it gives PEFT's
/// merged logits from the merged folder alone, which now holds the pooler.
#[test]
fn a_peft_adapter_with_its_pooler_gives_pefts_logits_unmerged_and_merged() {
    let io = load(&case().join("io.safetensors"));
    let plan = PeftAdapter::load(case().join("adapter"), &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap();
    let model = classifier(&base(), &plan).unwrap();
    plan.finish().expect("every tensor of the adapter is used");
    assert_close(&logits(&model), &io["logits"], 1e-5, "unmerged vs PEFT");

    let tmp = temp_dir("bert-no-pooler-merge");
    let out = tmp.join("merged");
    merge_checkpoint(
        &base(),
        &case().join("adapter"),
        &out,
        MergeOptions::default(),
    )
    .unwrap();
    let merged = load(&out.join("model.safetensors"));
    assert!(
        merged.contains_key("bert.pooler.dense.weight"),
        "{:?}",
        merged.keys()
    );
    let model = classifier(&out, &AdapterPlan::none()).unwrap();
    assert_close(
        &logits(&model),
        &io["merged_logits"],
        1e-5,
        "merged vs PEFT",
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A fresh plan that does not train the pooler is refused by name, with the fix; one that
/// does (what `AutoSequenceClassifier::modules_to_save` lists for this checkpoint) builds a
/// classifier whose new pooler is trainable and the same on every build.
#[test]
fn a_missing_pooler_is_trained_with_the_head_or_refused() {
    let dev = Device::Cpu;
    let shapes = AutoSequenceClassifier::linear_shapes(base()).unwrap();
    let fresh = |modules: Vec<String>| {
        let mut recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["query", "value"]);
        recipe.modules_to_save = modules;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
        let plan = recipe.plan(vb, &shapes, DType::F32, &dev).unwrap();
        (classifier(&base(), &plan), vars)
    };
    let err = fresh(vec!["classifier".into()]).0.unwrap_err().to_string();
    for needle in ["bert.pooler.dense", "modules_to_save", "\"pooler\""] {
        assert!(err.contains(needle), "{needle} in: {err}");
    }

    let modules = AutoSequenceClassifier::modules_to_save(base()).unwrap();
    assert_eq!(modules, ["classifier", "pooler"]);
    let (a, vars) = fresh(modules.clone());
    let trained: Vec<String> = vars.data().lock().unwrap().keys().cloned().collect();
    assert!(
        trained.iter().any(|k| k.contains("pooler")),
        "the new pooler trains: {trained:?}"
    );
    let b = fresh(modules).0.unwrap();
    assert_close(
        &logits(&a.unwrap()),
        &logits(&b),
        0.0,
        "a new pooler is seeded",
    );
}

/// A fine-tune on the pooler-less checkpoint with the modules it needs trains the new
/// pooler (its weights move), and the saved adapter holds it: reloaded onto the same
/// checkpoint, the adapter gives the trained model's logits.
#[test]
fn a_fine_tune_saves_the_pooler_it_trained() {
    use lorakit::finetune::labeled::{Label, LabeledExample};
    use lorakit::finetune::schedule::Decay;
    use lorakit::finetune::{LabeledDataset, TrainConfig, Trainer};

    let dev = Device::Cpu;
    let mut recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["query", "value"]);
    recipe.modules_to_save = AutoSequenceClassifier::modules_to_save(base()).unwrap();
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let shapes = AutoSequenceClassifier::linear_shapes(base()).unwrap();
    let plan = recipe.plan(vb, &shapes, DType::F32, &dev).unwrap();
    let model = classifier(&base(), &plan).unwrap();
    let pooler = |vars: &VarMap| -> Vec<f32> {
        let data = vars.data().lock().unwrap();
        let (_, var) = data
            .iter()
            .find(|(k, _)| k.contains("pooler") && k.ends_with("weight"))
            .expect("a pooler variable");
        var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    };
    let start = pooler(&vars);
    let examples = (0..8u32)
        .map(|i| {
            let ids = vec![2, 10 + i, 20 + (i * 3) % 40, 3];
            LabeledExample::new(ids, vec![0; 4], Label::Class(i % 2)).unwrap()
        })
        .collect();
    let data = LabeledDataset::from_examples(examples);
    let mut config = TrainConfig::new(3);
    (config.lr, config.warmup_steps, config.decay) = (1e-2, 0, Decay::Constant);
    (config.batch.batch_size, config.batch.seq_len) = (4, 16);
    let mut trainer =
        Trainer::for_classifier(&model, plan.finish().unwrap(), recipe, config).unwrap();
    trainer.train(&data, None, |_| {}).unwrap();
    assert_ne!(pooler(&vars), start, "the new pooler trained");

    let saved = temp_dir("bert-no-pooler-finetune");
    trainer.save_adapter(&saved).unwrap();
    let reloaded_plan = PeftAdapter::load(&saved, &dev).unwrap().plan().unwrap();
    let reloaded = classifier(&base(), &reloaded_plan).unwrap();
    reloaded_plan.finish().unwrap();
    assert_close(&logits(&reloaded), &logits(&model), 1e-5, "reloaded");
    std::fs::remove_dir_all(&saved).unwrap();
}
