//! Sequence-classification fine-tuning (`Trainer::for_classifier`) against PyTorch + PEFT
//! (`scripts/make_classify_fixtures.py` → `tests/fixtures/finetune/classify/`): BERT-style
//! tokenization with truncation, one AdamW step (with and without accumulation), a new head
//! on a pretrained encoder, checkpoints and resume, and bad data refused by name.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::finetune::labeled::{Label, LabeledDataset, LabeledExample};
use lorakit::finetune::schedule::Decay;
use lorakit::finetune::{AdapterRecipe, Packing, TrainConfig, Trainer};
use lorakit::model::AdapterPlan;
use lorakit::models::bert::{BertConfig, BertForSequenceClassification};
use lorakit::peft::{PeftAdapter, PeftConfig};
use lorakit::tokenizer::TextTokenizer;
use lorakit::Variant;

use crate::finetune_train::assert_step_equals_pytorch;
use crate::peft_common::{assert_close, fixture, load, rel_err, temp_dir};

fn dir() -> PathBuf {
    fixture("finetune/classify")
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(dir().join("tokenizer")).unwrap()
}

/// The encoder's config with two labels (transformers' `num_labels=2`); dropout 0 unless
/// `dropout`.
fn config(dropout: bool) -> BertConfig {
    let mut config = BertConfig::from_file(dir().join("encoder/config.json")).unwrap();
    config.num_labels = 2;
    if !dropout {
        config.hidden_dropout_prob = 0.0;
        config.attention_probs_dropout_prob = 0.0;
    }
    config
}

fn model(plan: &AdapterPlan, dropout: bool) -> BertForSequenceClassification {
    BertForSequenceClassification::from_pretrained_with(
        dir().join("encoder"),
        &config(dropout),
        DType::F32,
        &Device::Cpu,
        plan,
    )
    .unwrap()
}

fn settings(steps: usize) -> TrainConfig {
    let mut config = TrainConfig::new(steps);
    config.lr = 1e-2;
    config.warmup_steps = 0;
    config.decay = Decay::Constant;
    config.batch.seq_len = 16;
    config
}

#[test]
fn tokenization_equals_transformers() {
    let text = std::fs::read_to_string(dir().join("tokenizer/expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let max_len = expected["max_length"].as_u64().unwrap() as usize;
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let tok = tokenizer();
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let pair = case["text_pair"].as_str();
        let (got_ids, got_types) = tok.encode_truncated(text, pair, max_len).unwrap();
        assert_eq!(got_ids, ids(&case["input_ids"]), "{text:?} / {pair:?}");
        assert_eq!(
            got_types,
            ids(&case["token_type_ids"]),
            "{text:?} / {pair:?}"
        );
    }
}

/// The fixture batch as examples (padding stripped by the attention mask).
fn step_examples() -> LabeledDataset {
    let batch = load(&dir().join("step/batch.safetensors"));
    let rows = |key: &str| {
        batch[key]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()
    };
    let (ids, types, mask) = (
        rows("input_ids"),
        rows("token_type_ids"),
        rows("attention_mask"),
    );
    let labels = batch["labels"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let examples = (0..ids.len())
        .map(|r| {
            let len = mask[r].iter().filter(|&&m| m == 1).count();
            LabeledExample::new(
                ids[r][..len].to_vec(),
                types[r][..len].to_vec(),
                Label::Class(labels[r]),
            )
            .unwrap()
        })
        .collect();
    LabeledDataset::from_examples(examples)
}

/// PEFT's adapter before the step, loaded trainable; one step of the trainer, compared with
/// PyTorch's.
fn one_step(batch_size: usize, grad_accum: usize) {
    let dev = Device::Cpu;
    let adapter = PeftAdapter::load(dir().join("step/adapter"), &dev).unwrap();
    let plan = adapter.plan().unwrap();
    let model = model(&plan, false);
    let set = plan.finish().unwrap();
    let mut config = settings(1);
    config.batch.batch_size = batch_size;
    config.grad_accum = grad_accum;
    let recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["query", "value"]);
    let mut trainer = Trainer::for_classifier(&model, set.clone(), recipe, config).unwrap();
    let report = trainer.train(&step_examples(), None, |_| {}).unwrap();
    let expected = load(&dir().join("step/expected.safetensors"));
    assert_eq!(report.history[0].targets, 3, "the step counts its examples");
    assert_step_equals_pytorch(&report.history[0], &set, &expected);
}

#[test]
fn one_step_equals_pytorch() {
    one_step(3, 1);
}

/// Micro-batches of 2 and 1 examples: the step's loss is the mean over its 3 examples (a
/// mean of the two batch means would differ).
#[test]
fn accumulated_uneven_step_equals_pytorch() {
    one_step(2, 2);
}

/// A fresh adapter of `variant` on query and value, and a new head (`modules_to_save`),
/// as a user starts.
fn recipe(variant: Variant) -> AdapterRecipe {
    let mut recipe = AdapterRecipe::new(variant, 4, 8.0, &["query", "value"]);
    recipe.modules_to_save = vec!["classifier".into()];
    recipe
}

fn fresh_plan(recipe: &AdapterRecipe, vars: &VarMap) -> AdapterPlan {
    let dev = Device::Cpu;
    let shapes = config(false).linear_shapes();
    recipe
        .plan(
            VarBuilder::from_varmap(vars, DType::F32, &dev),
            &shapes,
            DType::F32,
            &dev,
        )
        .unwrap()
}

fn train_data() -> LabeledDataset {
    LabeledDataset::from_jsonl(dir().join("train.jsonl"), &tokenizer(), 16).unwrap()
}

#[test]
fn every_variant_learns_a_new_head_and_saves_a_seq_cls_adapter() {
    let data = train_data();
    for variant in Variant::ALL {
        let recipe = recipe(variant);
        let vars = VarMap::new();
        let plan = fresh_plan(&recipe, &vars);
        let model = model(&plan, false);
        let mut config = settings(40);
        config.batch.batch_size = 8;
        // LoRA+ trains B at 16 × the rate.
        config.lr = if variant == Variant::LoraPlus {
            5e-3
        } else {
            5e-2
        };
        let mut trainer =
            Trainer::for_classifier(&model, plan.finish().unwrap(), recipe, config).unwrap();
        let before = trainer.evaluation(&data).unwrap();
        trainer.train(&data, None, |_| {}).unwrap();
        let after = trainer.evaluation(&data).unwrap();
        // The LoRA-family rules lower the loss in 40 steps; VeRA's and AdaLoRA's start
        // from zero scales and barely move at these settings (only finite is asserted);
        // LoRA learns the task.
        assert!(after.loss.is_finite(), "{variant}: {after:?}");
        if !matches!(variant, Variant::Vera | Variant::AdaLora) {
            assert!(
                after.loss < before.loss,
                "{variant}: {before:?} -> {after:?}"
            );
        }
        if variant == Variant::Lora {
            assert!(after.accuracy.unwrap() >= 0.9, "{before:?} -> {after:?}");
        }
        let saved = temp_dir(&format!("classify-{variant}"));
        trainer.save_adapter(&saved).unwrap();
        let peft = PeftConfig::from_file(saved.join("adapter_config.json")).unwrap();
        assert_eq!(peft.raw["task_type"], "SEQ_CLS", "{variant}");
        assert_eq!(
            peft.raw["modules_to_save"],
            serde_json::json!(["classifier"])
        );
        let name = dir().join("encoder").display().to_string();
        assert_eq!(peft.raw["base_model_name_or_path"], name.as_str());
        // Reloaded onto the encoder, the adapter gives the trained model's logits.
        let reloaded_plan = PeftAdapter::load(&saved, &Device::Cpu)
            .unwrap()
            .plan()
            .unwrap();
        let reloaded = self::model(&reloaded_plan, false);
        reloaded_plan.finish().unwrap();
        let ids = Tensor::new(&[[2u32, 5, 48, 10, 26, 27, 28, 3]], &Device::Cpu).unwrap();
        assert_close(
            &reloaded.forward(&ids, None, None).unwrap(),
            &model.forward(&ids, None, None).unwrap(),
            1e-5,
            &format!("{variant} reloaded"),
        );
        std::fs::remove_dir_all(&saved).unwrap();
    }
}

/// A run interrupted by a checkpoint and resumed ends where the uninterrupted run does.
#[test]
fn resumed_runs_end_where_uninterrupted_runs_do() {
    let data = train_data();
    let out = temp_dir("classify-resume");
    let run = |steps: usize, resume: bool| {
        let recipe = recipe(Variant::Lora);
        let vars = VarMap::new();
        let plan = fresh_plan(&recipe, &vars);
        let model = model(&plan, false);
        let mut config = settings(6);
        config.batch.batch_size = 5;
        config.save_every = Some(3);
        config.output_dir = Some(out.join(if resume { "b" } else { "a" }));
        let set = plan.finish().unwrap();
        let mut trainer = Trainer::for_classifier(&model, set.clone(), recipe, config).unwrap();
        if resume {
            trainer.resume(out.join("a/checkpoint-3")).unwrap();
        }
        let report = trainer.train(&data, Some(&data), |_| {}).unwrap();
        assert_eq!(report.history.len(), steps);
        let evals = report.evals;
        assert!(evals.iter().all(|e| e.accuracy.is_some()), "{evals:?}");
        set.trainable_vars()
            .into_iter()
            .map(|v| (v.full_name(), v.var.var.as_tensor().clone()))
            .collect::<Vec<_>>()
    };
    let whole = run(6, false);
    let resumed = run(6, true);
    for ((name, a), (_, b)) in whole.iter().zip(&resumed) {
        assert!(rel_err(a, b) < 1e-6, "{name}: resumed differs");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_data_and_settings_are_refused_by_name() {
    let recipe = recipe(Variant::Lora);
    let vars = VarMap::new();
    let plan = fresh_plan(&recipe, &vars);
    let model = model(&plan, false);
    let set = plan.finish().unwrap();
    let example = |ids: Vec<u32>, label| {
        let n = ids.len();
        LabeledExample::new(ids, vec![0; n], label).unwrap()
    };
    let train_err = |data: LabeledDataset, config: TrainConfig| {
        let mut trainer =
            Trainer::for_classifier(&model, set.clone(), recipe.clone(), config).unwrap();
        trainer.train(&data, None, |_| {}).unwrap_err().to_string()
    };
    let cases: Vec<(LabeledExample, &str)> = vec![
        (
            example(vec![2, 5, 3], Label::Class(2)),
            "label 2 is not a class of the model's 2",
        ),
        (
            example(vec![2, 5, 3], Label::Values(vec![0.5, 0.5])),
            "but example 0's is Class(1)",
        ),
        (
            example(vec![2, 70, 3], Label::Class(0)),
            "token 1: id 70 is outside the vocabulary of 61",
        ),
        (
            example(vec![2; 17], Label::Class(0)),
            "17 tokens, more than seq_len 16",
        ),
    ];
    for (bad, want) in cases {
        let data =
            LabeledDataset::from_examples(vec![example(vec![2, 5, 3], Label::Class(1)), bad]);
        let err = train_err(data, settings(1));
        assert!(err.contains("example 1") && err.contains(want), "{err}");
    }
    let types = LabeledExample::new(vec![2, 5, 3], vec![0, 2, 0], Label::Class(0)).unwrap();
    let err = train_err(LabeledDataset::from_examples(vec![types]), settings(1));
    assert!(
        err.contains("id 2 is outside the token types of 2"),
        "{err}"
    );
    let mut packed = settings(1);
    packed.batch.packing = Packing::Pack;
    let err = train_err(train_data(), packed);
    assert!(
        err.contains("packing") && err.contains("Packing::Pad"),
        "{err}"
    );
    let mut long = settings(1);
    long.batch.seq_len = 33;
    let err = Trainer::for_classifier(&model, set.clone(), recipe.clone(), long)
        .err()
        .unwrap();
    assert!(err.to_string().contains("32 positions"), "{err}");

    // JSONL lines, each named by file and line.
    let tmp = temp_dir("classify-jsonl");
    for (line, want) in [
        (r#"{"text": "good"}"#, "no `label`"),
        (r#"{"text": "good", "label": -1}"#, "negative integer"),
        (
            r#"{"text": "good", "label": 4294967296}"#,
            "too large for a class index",
        ),
        (r#"{"text": "good", "label": 1e40}"#, "not a finite number"),
        (
            r#"{"text": "good", "label": [1, "x"]}"#,
            "`label`[1] must be a number",
        ),
        (
            r#"{"text": "good", "input_ids": [2, 3], "label": 0}"#,
            "give one",
        ),
        (
            r#"{"input_ids": [2, 5, 5, 5, 3], "label": 0}"#,
            "more than max_len 4",
        ),
        (r#"{"text": 5, "label": 0}"#, "`text` must be a string"),
    ] {
        let file = tmp.join("bad.jsonl");
        std::fs::write(
            &file,
            format!("{{\"text\": \"fine\", \"label\": 0}}\n{line}\n"),
        )
        .unwrap();
        let err = LabeledDataset::from_jsonl(&file, &tokenizer(), 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.jsonl: line 2") && err.contains(want),
            "{line}: {err}"
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();

    // An encoder without a head, loaded with a plan that does not train one.
    let none = AdapterPlan::none();
    let err = BertForSequenceClassification::from_pretrained_with(
        dir().join("encoder"),
        &config(false),
        DType::F32,
        &Device::Cpu,
        &none,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("classifier.weight"), "{err}");
}

/// An adapter the `classify` example trained (DoRA on query/value, a new head; the
/// commands are in `scripts/make_classify_fixtures.py`), loaded by real PEFT onto the
/// encoder (`--check-trained`): PEFT's logits equal lorakit's.
#[test]
fn a_trained_adapter_gives_pefts_logits_in_peft() {
    let adapter = dir().join("trained_dora");
    let plan = PeftAdapter::load(&adapter, &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap();
    let (got, want) = reference_logits(&model(&plan, true));
    plan.finish().unwrap();
    assert_close(&got, &want, 1e-4, "lorakit vs PEFT");
}

/// `model`'s logits on the trained adapter's reference inputs, and PEFT's.
fn reference_logits(model: &BertForSequenceClassification) -> (Tensor, Tensor) {
    let expected = load(&dir().join("trained_dora/peft_logits.safetensors"));
    let input = |key: &str| expected[key].to_dtype(DType::U32).unwrap();
    let logits = model
        .forward(
            &input("input_ids"),
            Some(&input("token_type_ids")),
            Some(&input("attention_mask")),
        )
        .unwrap();
    (logits, expected["logits"].clone())
}

/// The reference logits of a model built from `folder` with no adapter, and PEFT's.
fn merged_logits(folder: &std::path::Path) -> (Tensor, Tensor) {
    let none = AdapterPlan::none();
    let model = BertForSequenceClassification::from_pretrained_with(
        folder,
        &config(true),
        DType::F32,
        &Device::Cpu,
        &none,
    )
    .unwrap();
    reference_logits(&model)
}

/// Merging a SEQ_CLS adapter into the encoder it was trained on adds the new head (the
/// encoder has none), as PEFT's merge_and_unload leaves it in the model: the merged
/// checkpoint alone gives PEFT's logits, as a folder, a file and a sharded folder.
#[test]
fn merging_into_a_headless_encoder_adds_the_head() {
    use lorakit::peft::{adapted_var_builder, merge_checkpoint, MergeOptions};
    let adapter = dir().join("trained_dora");
    let tmp = temp_dir("classify-merge");
    let folder = tmp.join("folder");
    let report = merge_checkpoint(
        &dir().join("encoder"),
        &adapter,
        &folder,
        MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(report.added, ["classifier.bias", "classifier.weight"]);
    let seen = lorakit::peft::inspect::inspect_against(&adapter, &dir().join("encoder")).unwrap();
    assert_eq!(
        seen.added, report.added,
        "inspect --base tells what a merge adds"
    );
    let (got, want) = merged_logits(&folder);
    assert_close(&got, &want, 1e-4, "merged folder vs PEFT");

    // A single file in, a file out.
    let file = tmp.join("merged.safetensors");
    merge_checkpoint(
        &dir().join("encoder/model.safetensors"),
        &adapter,
        &file,
        MergeOptions::default(),
    )
    .unwrap();
    let single = tmp.join("single");
    std::fs::create_dir_all(&single).unwrap();
    std::fs::rename(&file, single.join("model.safetensors")).unwrap();
    assert_close(
        &merged_logits(&single).0,
        &want,
        1e-4,
        "merged file vs PEFT",
    );

    // Two shards and an index: the head goes into the last shard, the index maps it there.
    let sharded = tmp.join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    let tensors = load(&dir().join("encoder/model.safetensors"));
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (part, file_name) in [
        (first, "model-00001-of-00002.safetensors"),
        (second, "model-00002-of-00002.safetensors"),
    ] {
        let map: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&map, sharded.join(file_name)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file_name.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let merged = tmp.join("sharded-merged");
    merge_checkpoint(&sharded, &adapter, &merged, MergeOptions::default()).unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(merged.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        index["weight_map"]["classifier.weight"],
        "model-00002-of-00002.safetensors"
    );
    let data_bytes: u64 = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    .iter()
    .map(|f| {
        load(&merged.join(f))
            .values()
            .map(|t| (t.elem_count() * 4) as u64)
            .sum::<u64>()
    })
    .sum();
    assert_eq!(index["metadata"]["total_size"], data_bytes);
    std::fs::copy(
        dir().join("encoder/config.json"),
        merged.join("config.json"),
    )
    .ok();
    assert_close(
        &merged_logits(&merged).0,
        &want,
        1e-4,
        "merged shards vs PEFT",
    );

    // A VarBuilder over the encoder cannot hand out a head it does not have.
    let err = adapted_var_builder(dir().join("encoder"), &adapter, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("adds `classifier") && err.contains("lorakit merge"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Labels given by class name, looked up in the config's `id2label` (the names the
/// `classify` example's `--labels` sets).
#[test]
fn class_names_are_looked_up_in_id2label() {
    let recipe = recipe(Variant::Lora);
    let vars = VarMap::new();
    let plan = fresh_plan(&recipe, &vars);
    let mut named = config(false);
    named.id2label = vec!["negative".into(), "positive".into()];
    let model = BertForSequenceClassification::from_pretrained_with(
        dir().join("encoder"),
        &named,
        DType::F32,
        &Device::Cpu,
        &plan,
    )
    .unwrap();
    let set = plan.finish().unwrap();
    let tmp = temp_dir("classify-names");
    let file = tmp.join("named.jsonl");
    std::fs::write(
        &file,
        "{\"text\": \"a good film\", \"label\": \"positive\"}\n{\"text\": \"dull\", \"label\": \"negative\"}\n",
    )
    .unwrap();
    let data = LabeledDataset::from_jsonl(&file, &tokenizer(), 16).unwrap();
    assert_eq!(data.examples()[0].label, Label::Name("positive".into()));
    let mut config = settings(1);
    config.batch.batch_size = 2;
    let trainer = Trainer::for_classifier(&model, set, recipe.clone(), config.clone()).unwrap();
    let batch =
        &lorakit::finetune::Task::batches(trainer.task(), &data, &config.batch, 0, 0).unwrap()[0];
    let ids = batch.input_ids.to_vec2::<u32>().unwrap();
    let labels = batch.labels.to_vec1::<u32>().unwrap();
    for (row, label) in ids.iter().zip(&labels) {
        // "a good film" is the longer row; it is "positive" (1).
        let tokens = row.iter().filter(|&&t| t != 0).count();
        assert_eq!(*label, u32::from(tokens > 3), "{ids:?} {labels:?}");
    }
    trainer.evaluation(&data).unwrap();

    std::fs::write(&file, "{\"text\": \"good\", \"label\": \"neutral\"}\n").unwrap();
    let unknown = LabeledDataset::from_jsonl(&file, &tokenizer(), 16).unwrap();
    let err = trainer.evaluation(&unknown).unwrap_err().to_string();
    assert!(
        err.contains("named.jsonl: line 1") && err.contains("negative, positive"),
        "{err}"
    );
    // Without names in the config, a name is an error that says so.
    let plain_vars = VarMap::new();
    let plain_plan = fresh_plan(&recipe, &plain_vars);
    let unnamed = self::model(&plain_plan, false);
    let plain =
        Trainer::for_classifier(&unnamed, plain_plan.finish().unwrap(), recipe, config).unwrap();
    let err = plain.evaluation(&data).unwrap_err().to_string();
    assert!(err.contains("names none of its 2 classes"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
