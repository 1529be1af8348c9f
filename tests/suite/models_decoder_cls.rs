//! Decoder sequence classifiers (`LlamaForSequenceClassification` for Llama and Qwen2,
//! `Gpt2ForSequenceClassification`) against transformers 5.24 + PEFT 0.21 (`scripts/make_decoder_cls_fixtures.py` →
//! `tests/fixtures/decoder_cls/`): logits of the base, of PEFT `SEQ_CLS` adapters (LoRA,
//! DoRA; `score` in `modules_to_save`) unmerged and merged, on a batch with a full row, a
//! right-padded row, a left-padded row and a one-token row; bad masks and pad ids refused
//! by name; a fresh adapter trained by the library's loop reloads as PEFT saved it.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::finetune::labeled::{Label, LabeledDataset, LabeledExample};
use lorakit::finetune::schedule::Decay;
use lorakit::finetune::{AdapterRecipe, TrainConfig, Trainer};
use lorakit::model::AdapterPlan;
use lorakit::models::classification::ClassifierConfig;
use lorakit::models::gpt2::Gpt2ForSequenceClassification;
use lorakit::models::llama::LlamaForSequenceClassification;
use lorakit::models::SequenceClassifier;
use lorakit::peft::{PeftAdapter, PeftConfig};
use lorakit::Variant;

use crate::models_llama::check;
use crate::peft_common::{assert_close, fixture, load, rel_err, temp_dir};

const TOL: f64 = 1e-4;

fn case(name: &str) -> PathBuf {
    fixture("decoder_cls").join(name)
}

fn peft_plan(dir: &std::path::Path) -> AdapterPlan {
    PeftAdapter::load(dir, &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap()
}

fn llama(name: &str, plan: &AdapterPlan) -> LlamaForSequenceClassification {
    LlamaForSequenceClassification::from_pretrained(
        case(name).join("base"),
        DType::F32,
        &Device::Cpu,
        plan,
    )
    .unwrap()
}

#[test]
fn llama_family_classifiers_give_transformers_and_peft_logits() {
    for (name, adapters) in [("llama", &["lora", "dora"][..]), ("qwen2", &["lora"][..])] {
        let io = load(&case(name).join("io.safetensors"));
        let (ids, mask) = (&io["input_ids"], &io["attention_mask"]);
        let base = llama(name, &AdapterPlan::none());
        assert_eq!(base.labels().num_labels, 3);
        assert_eq!(base.labels().pad_token_id, Some(0));
        assert_eq!(base.labels().id2label, ["negative", "neutral", "positive"]);
        let base_logits = base.forward(ids, Some(mask)).unwrap();
        assert_eq!(base_logits.dims(), [4, 3]);
        check(
            &base_logits,
            &io["base_logits"],
            TOL,
            &format!("{name} base"),
        );
        for adapter in adapters {
            let plan = peft_plan(&case(name).join(adapter));
            let model = llama(name, &plan);
            let set = plan.finish().unwrap(); // every tensor of the file used, score too
            assert!(model.score().adapter().is_none(), "score is a trained copy");
            let got = model.forward(ids, Some(mask)).unwrap();
            let what = format!("{name} {adapter}");
            check(&got, &io[&format!("{adapter}.logits")], TOL, &what);
            assert!(
                rel_err(&got, &io["base_logits"]) > 1e-2,
                "{what} changes nothing"
            );
            set.merge_all(true).unwrap();
            let merged = model.forward(ids, Some(mask)).unwrap();
            check(
                &merged,
                &io[&format!("{adapter}.merged_logits")],
                TOL,
                &format!("{what} merged"),
            );
        }
    }
}

#[test]
fn gpt2_classifier_gives_transformers_and_peft_logits() {
    let io = load(&case("gpt2").join("io.safetensors"));
    let (ids, mask) = (&io["input_ids"], &io["attention_mask"]);
    let dir = case("gpt2").join("base");
    let base = Gpt2ForSequenceClassification::from_pretrained(
        &dir,
        DType::F32,
        &Device::Cpu,
        &AdapterPlan::none(),
    )
    .unwrap();
    check(
        &base.forward(ids, Some(mask)).unwrap(),
        &io["base_logits"],
        TOL,
        "gpt2 base",
    );
    let plan = peft_plan(&case("gpt2").join("lora"));
    let model =
        Gpt2ForSequenceClassification::from_pretrained(&dir, DType::F32, &Device::Cpu, &plan)
            .unwrap();
    let set = plan.finish().unwrap();
    assert_eq!(set.len(), 4); // c_attn and c_fc of both blocks
    let got = model.forward(ids, Some(mask)).unwrap();
    check(&got, &io["lora.logits"], TOL, "gpt2 lora");
    assert!(
        rel_err(&got, &io["base_logits"]) > 1e-2,
        "gpt2 lora changes nothing"
    );
    set.merge_all(true).unwrap();
    check(
        &model.forward(ids, Some(mask)).unwrap(),
        &io["lora.merged_logits"],
        TOL,
        "gpt2 lora merged",
    );
    // Absolute positions: a left-padded row numbered from its first slot (transformers'
    // forward) is not the row alone.
    let dev = Device::Cpu;
    let alone = model
        .forward(&Tensor::new(&[[7u32, 9, 4]], &dev).unwrap(), None)
        .unwrap();
    let left = Tensor::new(&[[0u32, 0, 7, 9, 4]], &dev).unwrap();
    let left_mask = Tensor::new(&[[0u32, 0, 1, 1, 1]], &dev).unwrap();
    assert!(rel_err(&model.forward(&left, Some(&left_mask)).unwrap(), &alone) > 1e-3);
}

/// In training mode (`SequenceClassifier::classify` with `train`) the GPT-2 classifier
/// applies the config's dropouts (0.1 each here) on left-padded batches too (the fused
/// attention op with the batch's padding): each forward draws its own choices, and
/// evaluation mode is `forward`.
#[test]
fn the_gpt2_classifier_drops_in_training_mode_only() {
    let io = load(&case("gpt2").join("io.safetensors"));
    let (ids, mask) = (&io["input_ids"], &io["attention_mask"]);
    let dir = case("gpt2").join("base");
    let dev = Device::Cpu;
    let model = Gpt2ForSequenceClassification::from_pretrained(
        &dir,
        DType::F32,
        &dev,
        &AdapterPlan::none(),
    )
    .unwrap();
    let classifier: &dyn lorakit::models::SequenceClassifier = &model;
    let run = |train| classifier.classify(ids, None, Some(mask), train).unwrap();
    let vec = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let eval = model.forward(ids, Some(mask)).unwrap();
    assert_eq!(vec(run(false)), vec(eval.clone()));
    let (a, b) = (run(true), run(true));
    assert!(rel_err(&a, &eval) > 1e-3 && rel_err(&b, &a) > 1e-3);
}

/// In f64 a left-padded batch takes the composed attention (candle ops under the additive
/// mask of `models::causal_mask`; the fused op is f32): it gives transformers' logits too,
/// for the Llama family and GPT-2.
#[test]
fn the_composed_path_masks_left_padding_as_transformers_does() {
    let dev = Device::Cpu;
    let none = AdapterPlan::none();
    for name in ["llama", "qwen2", "gpt2"] {
        let io = load(&case(name).join("io.safetensors"));
        let (ids, mask) = (&io["input_ids"], &io["attention_mask"]);
        let base = case(name).join("base");
        let classifier: Box<dyn SequenceClassifier> = match name {
            "gpt2" => Box::new(
                Gpt2ForSequenceClassification::from_pretrained(&base, DType::F64, &dev, &none)
                    .unwrap(),
            ),
            _ => Box::new(
                LlamaForSequenceClassification::from_pretrained(&base, DType::F64, &dev, &none)
                    .unwrap(),
            ),
        };
        let logits = classifier.classify(ids, None, Some(mask), false).unwrap();
        let logits = logits.to_dtype(DType::F32).unwrap();
        check(&logits, &io["base_logits"], TOL, &format!("{name} f64"));
    }
}

#[test]
fn each_row_is_read_at_its_last_token_whatever_the_padding() {
    let model = llama("llama", &peft_plan(&case("llama").join("lora")));
    let dev = Device::Cpu;
    let alone = model
        .forward(&Tensor::new(&[[7u32, 9, 4]], &dev).unwrap(), None)
        .unwrap();
    // Right padding needs no mask (causal attention); left padding needs it.
    let right = Tensor::new(&[[7u32, 9, 4, 0, 0]], &dev).unwrap();
    assert_close(
        &model.forward(&right, None).unwrap(),
        &alone,
        1e-5,
        "right, no mask",
    );
    let left = Tensor::new(&[[0u32, 0, 7, 9, 4]], &dev).unwrap();
    let left_mask = Tensor::new(&[[0u32, 0, 1, 1, 1]], &dev).unwrap();
    let masked = model.forward(&left, Some(&left_mask)).unwrap();
    // Positions count from the first slot, as transformers' forward; RoPE sees only
    // relative positions, so the row gives what it gives alone (to rounding).
    assert_close(&masked, &alone, 1e-4, "left, masked");
    // Without the mask the padding is attended to: another result again.
    assert!(rel_err(&model.forward(&left, None).unwrap(), &masked) > 1e-4);
}

#[test]
fn bad_masks_pad_ids_and_token_types_are_errors_naming_them() {
    let model = llama("llama", &AdapterPlan::none());
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[5u32, 6, 7, 8], [5, 6, 0, 0]], &dev).unwrap();
    let err = |mask: &[[u32; 4]; 2]| {
        let mask = Tensor::new(mask, &dev).unwrap();
        model.forward(&ids, Some(&mask)).unwrap_err().to_string()
    };
    let holey = err(&[[1, 0, 1, 1], [1, 1, 0, 0]]);
    assert!(
        holey.contains("attention_mask") && holey.contains("row 0"),
        "{holey}"
    );
    let both_sides = err(&[[1, 1, 1, 1], [0, 1, 1, 0]]);
    assert!(both_sides.contains("row 1"), "{both_sides}");
    let empty = err(&[[1, 1, 1, 1], [0, 0, 0, 0]]);
    assert!(empty.contains("row 1"), "{empty}");
    let short = Tensor::new(&[[1u32, 1, 1]], &dev).unwrap();
    let shape = model.forward(&ids, Some(&short)).unwrap_err().to_string();
    assert!(shape.contains("attention_mask"), "{shape}");
    let vocab = Tensor::new(&[[64u32]], &dev).unwrap();
    assert!(model
        .forward(&vocab, None)
        .unwrap_err()
        .to_string()
        .contains("input_ids"));
    // Token types: a decoder has none.
    let types = Tensor::new(&[[0u32, 1, 0, 0], [0, 0, 0, 0]], &dev).unwrap();
    let e = model
        .classify(&ids, Some(&types), None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("token_type_ids"), "{e}");

    // No pad id: one row only, as transformers.
    let labels = ClassifierConfig {
        num_labels: 3,
        ..ClassifierConfig::default()
    };
    let no_pad = LlamaForSequenceClassification::from_pretrained_with(
        case("llama").join("base"),
        &labels,
        DType::F32,
        &dev,
        &AdapterPlan::none(),
    )
    .unwrap();
    let e = no_pad.forward(&ids, None).unwrap_err().to_string();
    assert!(e.contains("pad_token_id"), "{e}");
    // A single row is read at its last slot.
    let row = Tensor::new(&[[5u32, 6, 7, 8]], &dev).unwrap();
    assert_close(
        &no_pad.forward(&row, None).unwrap(),
        &model.forward(&row, None).unwrap(),
        1e-6,
        "no pad id, one row",
    );
    // A head whose size disagrees with the checkpoint is named.
    let four = ClassifierConfig {
        num_labels: 4,
        ..labels
    };
    let e = LlamaForSequenceClassification::from_pretrained_with(
        case("llama").join("base"),
        &four,
        DType::F32,
        &dev,
        &AdapterPlan::none(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("score"), "{e}");
}

/// transformers' `ignore_mismatched_sizes`: a checkpoint head of another number of classes
/// is replaced by a new one when the plan trains the head; without that plan (or the
/// option) it stays an error naming the head.
#[test]
fn a_mismatched_head_is_replaced_only_when_asked_and_trained() {
    let dev = Device::Cpu;
    let labels = ClassifierConfig {
        num_labels: 4,
        pad_token_id: Some(0),
        ignore_mismatched_sizes: true,
        ..ClassifierConfig::default()
    };
    let dir = case("llama").join("base");
    let load = |plan: &AdapterPlan| {
        LlamaForSequenceClassification::from_pretrained_with(&dir, &labels, DType::F32, &dev, plan)
    };
    let e = load(&AdapterPlan::none()).unwrap_err().to_string();
    assert!(e.contains("score"), "{e}");
    let mut recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["q_proj"]);
    recipe.modules_to_save = vec!["score".into()];
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let plan = recipe.plan(vb, &[], DType::F32, &dev).unwrap();
    let model = load(&plan).unwrap();
    plan.finish().unwrap();
    let ids = Tensor::new(&[[5u32, 6, 7]], &dev).unwrap();
    assert_eq!(model.forward(&ids, None).unwrap().dims(), [1, 4]);
    // A head of the right size is the checkpoint's, with the option or without.
    let three = ClassifierConfig {
        num_labels: 3,
        ..labels.clone()
    };
    let kept = LlamaForSequenceClassification::from_pretrained_with(
        &dir,
        &three,
        DType::F32,
        &dev,
        &AdapterPlan::none(),
    )
    .unwrap();
    let io = load_io();
    let (ids, mask) = (&io["input_ids"], &io["attention_mask"]);
    check(
        &kept.forward(ids, Some(mask)).unwrap(),
        &io["base_logits"],
        TOL,
        "kept head",
    );
}

fn load_io() -> std::collections::HashMap<String, Tensor> {
    load(&case("llama").join("io.safetensors"))
}

/// Three-class data over ids 1..63: the class is which third of the ids the row's tokens
/// mostly come from.
fn labeled(rows: usize) -> LabeledDataset {
    let examples = (0..rows)
        .map(|r| {
            let class = r % 3;
            let len = 3 + r % 4;
            let ids = (0..len)
                .map(|t| (1 + class * 20 + (r * 7 + t * 3) % 20) as u32)
                .collect();
            LabeledExample::new(ids, vec![0; len], Label::Class(class as u32)).unwrap()
        })
        .collect();
    LabeledDataset::from_examples(examples)
}

#[test]
fn a_fresh_adapter_trains_and_saves_a_seq_cls_adapter_that_reloads() {
    let dev = Device::Cpu;
    let mut recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["q_proj", "v_proj"]);
    recipe.modules_to_save = vec!["score".into()];
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let plan = recipe.plan(vb, &[], DType::F32, &dev).unwrap();
    let model = llama("llama", &plan);
    let mut config = TrainConfig::new(30);
    (config.lr, config.warmup_steps, config.decay) = (2e-2, 0, Decay::Constant);
    (config.batch.batch_size, config.batch.seq_len) = (6, 8);
    let data = labeled(24);

    // The batches must pad with the model's pad id (0): another is refused up front.
    config.batch.pad_id = 5;
    let set = plan.finish().unwrap();
    let mut wrong =
        Trainer::for_classifier(&model, set.clone(), recipe.clone(), config.clone()).unwrap();
    let e = wrong.train(&data, None, |_| {}).unwrap_err().to_string();
    assert!(e.contains("pad_id") && e.contains("pad_token_id 0"), "{e}");

    config.batch.pad_id = 0;
    let mut trainer = Trainer::for_classifier(&model, set, recipe, config).unwrap();
    let before = trainer.evaluation(&data).unwrap();
    trainer.train(&data, None, |_| {}).unwrap();
    let after = trainer.evaluation(&data).unwrap();
    assert!(after.loss < 0.5 * before.loss, "{before:?} -> {after:?}");

    let saved = temp_dir("decoder-cls");
    trainer.save_adapter(&saved).unwrap();
    let peft = PeftConfig::from_file(saved.join("adapter_config.json")).unwrap();
    assert_eq!(peft.raw["task_type"], "SEQ_CLS");
    assert_eq!(peft.raw["modules_to_save"], serde_json::json!(["score"]));
    let reloaded_plan = peft_plan(&saved);
    let reloaded = llama("llama", &reloaded_plan);
    reloaded_plan.finish().unwrap();
    let io = load(&case("llama").join("io.safetensors"));
    let (ids, mask) = (&io["input_ids"], &io["attention_mask"]);
    assert_close(
        &reloaded.forward(ids, Some(mask)).unwrap(),
        &model.forward(ids, Some(mask)).unwrap(),
        1e-5,
        "reloaded",
    );
}

/// VeRA's shared pair, built to cover every linear layer of the model (GPT-2's MLP is
/// 16 → 64), is saved as PEFT sizes it from the targeted layers alone (`c_attn`,
/// 16 → 48): PEFT refused the larger pair with a size mismatch. Checked against PEFT by
/// hand with `scripts/make_decoder_cls_fixtures.py --check gpt2`.
#[test]
fn a_vera_adapter_on_some_layers_saves_the_pair_peft_sizes() {
    let dev = Device::Cpu;
    let dir = case("gpt2").join("base");
    let mut recipe = AdapterRecipe::new(Variant::Vera, 4, 8.0, &["c_attn"]);
    recipe.modules_to_save = vec!["score".into()];
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let shapes = lorakit::models::AutoSequenceClassifier::linear_shapes(&dir).unwrap();
    assert!(shapes.iter().any(|&(_, out)| out == 64), "{shapes:?}");
    let plan = recipe.plan(vb, &shapes, DType::F32, &dev).unwrap();
    let model =
        Gpt2ForSequenceClassification::from_pretrained(&dir, DType::F32, &dev, &plan).unwrap();
    let mut config = TrainConfig::new(5);
    (config.lr, config.warmup_steps, config.decay) = (2e-2, 0, Decay::Constant);
    (config.batch.batch_size, config.batch.seq_len) = (6, 8);
    let mut trainer =
        Trainer::for_classifier(&model, plan.finish().unwrap(), recipe, config).unwrap();
    trainer.train(&labeled(12), None, |_| {}).unwrap();
    let saved = temp_dir("decoder-cls-vera");
    trainer.save_adapter(&saved).unwrap();
    let file = load(&saved.join("adapter_model.safetensors"));
    assert_eq!(file["base_model.vera_A"].dims(), [4, 16]);
    assert_eq!(file["base_model.vera_B"].dims(), [48, 4]);
    let reloaded_plan = peft_plan(&saved);
    let reloaded =
        Gpt2ForSequenceClassification::from_pretrained(&dir, DType::F32, &dev, &reloaded_plan)
            .unwrap();
    reloaded_plan.finish().unwrap();
    let io = load(&case("gpt2").join("io.safetensors"));
    let (ids, mask) = (&io["input_ids"], &io["attention_mask"]);
    assert_close(
        &reloaded.forward(ids, Some(mask)).unwrap(),
        &model.forward(ids, Some(mask)).unwrap(),
        1e-5,
        "vera reloaded",
    );
}
