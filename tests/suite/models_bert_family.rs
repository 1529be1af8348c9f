//! The RoBERTa family, DistilBERT and ELECTRA through `lorakit::models::bert` against transformers
//! 5.25 + PEFT 0.21 (`scripts/make_roberta_fixtures.py` → tests/fixtures/roberta_cls/,
//! `scripts/make_distilbert_fixtures.py` → tests/fixtures/distilbert_cls/,
//! `scripts/make_electra_fixtures.py` → tests/fixtures/electra_cls/): RoBERTa with
//! PEFT's LoRA on query/value and the two-layer head in modules_to_save (logits unmerged,
//! merged, disabled; the loss gradients of every trainable tensor), XLM-RoBERTa with an
//! all-linear LoRA, DistilBERT with a LoRA on every encoder linear and ELECTRA with one on
//! query, value and its embeddings' projection (the same checks), and
//! masked-LM checkpoints whose head the adapter holds (loaded, and merged by `lorakit
//! merge` into a classifier); RoBERTa's positions numbered past the padding; the configs'
//! refusals; training through the trainer and reloading what it saved.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::finetune::labeled::{Label, LabeledDataset, LabeledExample};
use lorakit::finetune::schedule::Decay;
use lorakit::finetune::{AdapterRecipe, TrainConfig, Trainer};
use lorakit::model::AdapterPlan;
use lorakit::models::bert::{BertConfig, BertFamily, BertForSequenceClassification};
use lorakit::models::AutoSequenceClassifier;
use lorakit::peft::PeftAdapter;
use lorakit::Variant;

use crate::models_bert::assert_padded_batch_gradients;
use crate::peft_common::{assert_close, fixture, load, rel_err, temp_dir};

/// PEFT's logits vs ours: relative error bound.
const TOL: f64 = 1e-4;

/// A fixture case: `roberta_cls/…` or `distilbert_cls/…`.
fn case(name: &str) -> PathBuf {
    fixture(name)
}

fn io(name: &str) -> HashMap<String, Tensor> {
    load(&case(name).join("io.safetensors"))
}

/// The case's classifier under `plan` (`None`: its PEFT adapter), and what the plan built.
fn model(
    name: &str,
    plan: Option<AdapterPlan>,
) -> (BertForSequenceClassification, lorakit::model::AdaptedSet) {
    let plan = plan.unwrap_or_else(|| {
        let adapter = PeftAdapter::load(case(name).join("adapter"), &Device::Cpu).unwrap();
        adapter.plan().unwrap()
    });
    let dir = case(name).join("base");
    let model =
        BertForSequenceClassification::from_pretrained(dir, DType::F32, &Device::Cpu, &plan)
            .unwrap();
    let set = plan.finish().expect("every tensor of the adapter is used");
    (model, set)
}

fn logits(model: &BertForSequenceClassification, io: &HashMap<String, Tensor>) -> Tensor {
    model
        .forward(&io["input_ids"], None, Some(&io["attention_mask"]))
        .unwrap()
}

#[test]
fn configs_of_the_family_read_as_transformers_reads_them() {
    let roberta = BertConfig::from_file(case("roberta_cls/roberta/base/config.json")).unwrap();
    assert_eq!(roberta.family, BertFamily::Roberta);
    assert_eq!((roberta.pad_token_id, roberta.type_vocab_size), (1, 1));
    assert_eq!(roberta.layer_norm_eps, 1e-5);
    assert_eq!(
        (roberta.max_position_embeddings, roberta.max_tokens()),
        (12, 10)
    );
    let xlm = BertConfig::from_file(case("roberta_cls/xlm_roberta/base/config.json")).unwrap();
    assert_eq!((xlm.family, xlm.num_labels), (BertFamily::XlmRoberta, 2));

    // What a file leaves out takes its own config class's default.
    let parse = |text: &str| BertConfig::from_json_str(text, "config.json");
    let bare = parse(r#"{"model_type": "roberta"}"#).unwrap();
    assert_eq!((bare.vocab_size, bare.pad_token_id), (50265, 1));
    let camembert = parse(r#"{"model_type": "camembert"}"#).unwrap();
    assert_eq!(camembert.family, BertFamily::Camembert);
    assert_eq!((camembert.vocab_size, camembert.pad_token_id), (30522, 1));
    let bert = parse("{}").unwrap();
    assert_eq!((bert.family, bert.pad_token_id), (BertFamily::Bert, 0));
    assert_eq!(bert.max_tokens(), bert.max_position_embeddings);

    // DistilBERT's own keys and defaults.
    let distil = BertConfig::from_file(case("distilbert_cls/distilbert/base/config.json")).unwrap();
    assert_eq!(distil.family, BertFamily::DistilBert);
    assert_eq!((distil.hidden_size, distil.num_hidden_layers), (16, 2));
    assert_eq!(
        (distil.num_attention_heads, distil.intermediate_size),
        (2, 32)
    );
    assert_eq!(distil.classifier_dropout, Some(0.2));
    let bare = parse(r#"{"model_type": "distilbert"}"#).unwrap();
    assert_eq!((bare.hidden_size, bare.num_hidden_layers), (768, 6));
    assert_eq!((bare.layer_norm_eps, bare.type_vocab_size), (1e-12, 1));

    // ELECTRA's config class has smaller defaults, and an embedding width of its own.
    let electra = parse(r#"{"model_type": "electra"}"#).unwrap();
    assert_eq!((electra.hidden_size, electra.embedding_width()), (256, 128));
    assert_eq!(
        (electra.num_attention_heads, electra.intermediate_size),
        (4, 1024)
    );
    // Other families' embeddings are as wide as the model, whatever `embedding_size` says.
    let bert = parse(r#"{"hidden_size": 32, "num_attention_heads": 4, "embedding_size": 8}"#);
    let bert = bert.unwrap();
    assert_eq!(bert.embedding_width(), 32);

    // Refusals name the field (DistilBERT's by its own key).
    let refused = [
        (r#"{"model_type": "deberta-v2"}"#, "xlm-roberta"),
        (
            r#"{"model_type": "roberta", "vocab_size": 8, "pad_token_id": 8}"#,
            "pad_token_id",
        ),
        (
            r#"{"model_type": "roberta", "max_position_embeddings": 2}"#,
            "max_position_embeddings",
        ),
        (
            r#"{"model_type": "roberta", "pad_token_id": null}"#,
            "pad_token_id",
        ),
        (
            r#"{"model_type": "distilbert", "dim": 10, "n_heads": 4}"#,
            "dim",
        ),
        (
            r#"{"model_type": "distilbert", "activation": "swish"}"#,
            "activation",
        ),
    ];
    for (text, field) in refused {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(field), "{text}: {err}");
    }
    // DistilBERT's errors speak its keys only.
    let err = parse(r#"{"model_type": "distilbert", "dim": 10, "n_heads": 4}"#);
    let err = err.unwrap_err().to_string();
    assert!(
        err.contains("n_heads (4)") && !err.contains("num_attention"),
        "{err}"
    );
}

#[test]
fn pefts_lora_gives_pefts_logits_unmerged_merged_and_disabled() {
    let (model, set) = model("roberta_cls/roberta", None);
    assert_eq!(
        set.paths(),
        [
            "roberta.encoder.layer.0.attention.self.query",
            "roberta.encoder.layer.0.attention.self.value",
            "roberta.encoder.layer.1.attention.self.query",
            "roberta.encoder.layer.1.attention.self.value",
        ]
    );
    let mut trained: Vec<String> = set.trainable_vars().iter().map(|v| v.full_name()).collect();
    trained.retain(|n| n.starts_with("classifier"));
    trained.sort();
    let head = [
        "classifier.dense.bias",
        "classifier.dense.weight",
        "classifier.out_proj.bias",
        "classifier.out_proj.weight",
    ];
    assert_eq!(
        trained, head,
        "the two-layer head trains as a modules_to_save copy"
    );
    let io = io("roberta_cls/roberta");
    let unmerged = logits(&model, &io);
    assert_close(&unmerged, &io["logits"], TOL, "PEFT's logits");
    set.set_enabled(false);
    assert_close(&logits(&model, &io), &io["base_logits"], TOL, "disabled");
    set.set_enabled(true);
    set.merge_all(true).unwrap();
    assert_close(&logits(&model, &io), &io["merged_logits"], TOL, "merged");
    assert!(
        rel_err(&io["logits"], &io["base_logits"]) > 1e-2,
        "the adapter matters"
    );
}

/// Positions come from the ids, not the mask: a row padded on the right gives the logits
/// it gives alone. The fixture's row padded on the left (whose first token, the one the
/// head reads, is padding, as transformers reads it) and its row with `pad_token_id`
/// among the tokens it attends to give PEFT's logits in
/// `pefts_lora_gives_pefts_logits_unmerged_merged_and_disabled`; numbering by column, or
/// by the mask, would move them.
#[test]
fn positions_are_numbered_past_the_padding() {
    let (model, _set) = model("roberta_cls/roberta", None);
    let io = io("roberta_cls/roberta");
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let alone = ids.narrow(0, 1, 1).unwrap().narrow(1, 0, 5).unwrap();
    let alone = model.forward(&alone, None, None).unwrap();
    let padded = logits(&model, &io).narrow(0, 1, 1).unwrap();
    assert_close(&alone, &padded, 1e-5, "a row alone vs padded on the right");
    // Longer than the positions allow (12 positions from pad_token_id + 1 = 2: 10 tokens).
    let long = Tensor::full(5u32, (1, 11), &Device::Cpu).unwrap();
    let err = model.forward(&long, None, None).unwrap_err().to_string();
    assert!(
        err.contains("pad_token_id (1)") && err.contains("= 10"),
        "{err}"
    );
    let ten = Tensor::full(5u32, (1, 10), &Device::Cpu).unwrap();
    model.forward(&ten, None, None).unwrap();
    // Token types past the one type RoBERTa has are refused by name.
    let types = Tensor::ones((1, 10), DType::U32, &Device::Cpu).unwrap();
    let err = model.forward(&ten, Some(&types), None).unwrap_err();
    assert!(err.to_string().contains("token_type"), "{err}");
}

#[test]
fn padded_batch_gives_pytorchs_gradients() {
    let (model, set) = model("roberta_cls/roberta", None);
    assert_padded_batch_gradients(&model, &set, &io("roberta_cls/roberta"));
}

#[test]
fn xlm_roberta_with_an_all_linear_lora_gives_pefts_logits() {
    let (model, set) = model("roberta_cls/xlm_roberta", None);
    // Every linear of both layers; the head is a modules_to_save copy, not adapted.
    assert_eq!(set.len(), 2 * 6);
    assert!(set.paths().iter().all(|p| p.starts_with("roberta.encoder")));
    let io = io("roberta_cls/xlm_roberta");
    assert_close(&logits(&model, &io), &io["logits"], TOL, "PEFT's logits");
    set.merge_all(true).unwrap();
    assert_close(&logits(&model, &io), &io["merged_logits"], TOL, "merged");
}

/// The masked-LM cases: (case, the head layer a plan must train, the head's tensors, the
/// classifier's architecture, a tensor of the masked-LM head).
const MASKED_LM_CASES: [(&str, &str, [&str; 4], &str, &str); 3] = [
    (
        "roberta_cls/roberta_mlm",
        "classifier.dense",
        [
            "classifier.dense.bias",
            "classifier.dense.weight",
            "classifier.out_proj.bias",
            "classifier.out_proj.weight",
        ],
        "RobertaForSequenceClassification",
        "lm_head.dense.weight",
    ),
    (
        "distilbert_cls/distilbert_mlm",
        "pre_classifier",
        [
            "classifier.bias",
            "classifier.weight",
            "pre_classifier.bias",
            "pre_classifier.weight",
        ],
        "DistilBertForSequenceClassification",
        "vocab_transform.weight",
    ),
    (
        "electra_cls/electra_disc",
        "classifier.dense",
        [
            "classifier.dense.bias",
            "classifier.dense.weight",
            "classifier.out_proj.bias",
            "classifier.out_proj.weight",
        ],
        "ElectraForSequenceClassification",
        "discriminator_predictions.dense.weight",
    ),
];

#[test]
fn a_masked_lm_checkpoint_takes_the_head_its_adapter_holds() {
    for (name, first_layer, ..) in MASKED_LM_CASES {
        let base = case(name).join("base");
        // No pooler to train; PEFT's "classifier" covers DistilBERT's pre_classifier too
        // (modules_to_save match as a plain suffix).
        let modules = AutoSequenceClassifier::modules_to_save(&base).unwrap();
        assert_eq!(modules, ["classifier"], "{name}");
        let (model, _set) = model(name, None);
        let io = io(name);
        assert_close(&logits(&model, &io), &io["logits"], TOL, name);
        // Without an adapter that holds or trains the head: an error naming it.
        let none = AdapterPlan::none();
        let err =
            BertForSequenceClassification::from_pretrained(&base, DType::F32, &Device::Cpu, &none)
                .unwrap_err()
                .to_string();
        assert!(err.contains(first_layer), "{name}: {err}");
    }
}

/// A fresh LoRA on the attention's query and value (`BertFamily::default_targets`) with
/// the head in modules_to_save, trained by the
/// trainer (batches padded with the model's pad id), saved as PEFT saves it and loaded back.
#[test]
fn the_trainer_trains_and_saves_an_adapter_that_loads_back() {
    let dev = Device::Cpu;
    let cases = [
        ("roberta_cls/roberta/base", BertFamily::Roberta, Some(1), 10),
        (
            "distilbert_cls/distilbert/base",
            BertFamily::DistilBert,
            None,
            16,
        ),
        ("electra_cls/electra/base", BertFamily::Electra, None, 16),
    ];
    for (name, family, pad, max_positions) in cases {
        let dir = case(name);
        let none = AdapterPlan::none();
        let classifier =
            AutoSequenceClassifier::from_pretrained(&dir, None, DType::F32, &dev, &none).unwrap();
        let classifier = classifier.as_classifier();
        assert_eq!(classifier.pad_token_id(), pad, "{name}");
        assert_eq!(classifier.max_positions(), Some(max_positions), "{name}");

        let targets = family.default_targets();
        let mut recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &targets);
        recipe.modules_to_save = AutoSequenceClassifier::modules_to_save(&dir).unwrap();
        let vars = VarMap::new();
        let shapes = AutoSequenceClassifier::linear_shapes(&dir).unwrap();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
        let plan = recipe.plan(vb, &shapes, DType::F32, &dev).unwrap();
        // No dropout: the run is the same every time.
        let mut config = BertConfig::from_file(dir.join("config.json")).unwrap();
        config.hidden_dropout_prob = 0.0;
        config.attention_probs_dropout_prob = 0.0;
        config.classifier_dropout = Some(0.0);
        let model = BertForSequenceClassification::from_pretrained_with(
            &dir,
            &config,
            DType::F32,
            &dev,
            &plan,
        )
        .unwrap();
        let set = plan.finish().unwrap();
        let rows: [(&[u32], u32); 4] = [
            (&[0, 5, 17, 3, 2], 0),
            (&[0, 9, 33, 61, 40, 7, 2], 1),
            (&[0, 12, 44, 2], 2),
            (&[0, 50, 8, 8, 31, 2], 1),
        ];
        // DistilBERT has no token types, but its tokenizer file numbers a sentence
        // pair's second text 1: the trainer gives it none, as transformers does.
        let second_text = u32::from(family == BertFamily::DistilBert);
        let examples = rows
            .iter()
            .map(|(ids, label)| {
                let half = ids.len() / 2;
                let types = (0..ids.len()).map(|i| u32::from(i >= half) * second_text);
                let types = types.collect();
                LabeledExample::new(ids.to_vec(), types, Label::Class(*label)).unwrap()
            })
            .collect();
        let data = LabeledDataset::from_examples(examples);
        let mut config = TrainConfig::new(24);
        config.lr = 2e-2;
        config.warmup_steps = 0;
        config.decay = Decay::Constant;
        config.batch.seq_len = 10;
        config.batch.batch_size = 4;
        config.batch.pad_id = pad.unwrap_or(0);
        let mut trainer = Trainer::for_classifier(&model, set, recipe, config).unwrap();
        let before = trainer.evaluation(&data).unwrap();
        trainer.train(&data, None, |_| {}).unwrap();
        let after = trainer.evaluation(&data).unwrap();
        assert!(
            after.loss < 0.5 * before.loss,
            "{name}: {before:?} -> {after:?}"
        );

        let out = temp_dir("bert_family_trained");
        trainer.save_adapter(&out).unwrap();
        let ids = Tensor::new(&[[0u32, 9, 33, 61, 40, 7, 2]], &dev).unwrap();
        let trained = model.forward(&ids, None, None).unwrap();
        let plan = PeftAdapter::load(&out, &dev).unwrap().plan().unwrap();
        let reloaded =
            BertForSequenceClassification::from_pretrained(&dir, DType::F32, &dev, &plan).unwrap();
        plan.finish().expect("every saved tensor is used");
        let again = reloaded.forward(&ids, None, None).unwrap();
        assert_close(&again, &trained, 1e-6, name);
    }
}

/// `lorakit merge` of the adapter that trained a head on a masked-LM save: the head is
/// added, the masked-LM head dropped, the config made a 2-label classifier's, and the
/// merged folder alone gives PEFT's logits.
#[test]
fn merging_into_a_masked_lm_save_makes_a_classifier() {
    use lorakit::peft::{merge_checkpoint, MergeOptions};
    for (name, _, head, architecture, pretraining) in MASKED_LM_CASES {
        let out = temp_dir("bert_family_merge");
        let folder = out.join("merged");
        let (base, adapter) = (case(name).join("base"), case(name).join("adapter"));
        let report = merge_checkpoint(&base, &adapter, &folder, MergeOptions::default()).unwrap();
        assert_eq!(report.added, head, "{name}");
        let text = std::fs::read_to_string(folder.join("config.json")).unwrap();
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(config["architectures"], serde_json::json!([architecture]));
        assert_eq!(config["id2label"].as_object().map(|m| m.len()), Some(2));
        let merged_names = lorakit::checkpoint::Checkpoint::open(&folder).unwrap();
        let original = lorakit::checkpoint::Checkpoint::open(&base).unwrap();
        assert!(original.contains(pretraining), "{name}: {pretraining}");
        assert!(
            !merged_names.contains(pretraining),
            "{name}: the masked-LM head is dropped"
        );
        let none = AdapterPlan::none();
        let merged = BertForSequenceClassification::from_pretrained(
            &folder,
            DType::F32,
            &Device::Cpu,
            &none,
        )
        .unwrap();
        let io = io(name);
        assert_close(&logits(&merged, &io), &io["logits"], TOL, name);
    }
}

/// `name`'s PEFT adapter (`adapted` layers, the first at `first`): PEFT's logits unmerged,
/// disabled and merged, and the loss gradients of every trainable tensor.
fn assert_case_gives_pefts_logits_and_gradients(name: &str, adapted: usize, first: &str) {
    let (model, set) = model(name, None);
    assert_eq!(set.len(), adapted, "{name}");
    assert_eq!(set.paths().first().map(String::as_str), Some(first));
    let io = io(name);
    assert_padded_batch_gradients(&model, &set, &io);
    assert_close(&logits(&model, &io), &io["logits"], TOL, name);
    set.set_enabled(false);
    assert_close(&logits(&model, &io), &io["base_logits"], TOL, name);
    set.set_enabled(true);
    set.merge_all(true).unwrap();
    assert_close(&logits(&model, &io), &io["merged_logits"], TOL, name);
}

/// DistilBERT with PEFT's LoRA on every linear of its encoder (`pre_classifier` and
/// `classifier` trained copies); token types other than 0 are refused.
#[test]
fn distilbert_gives_pefts_logits_and_gradients() {
    let name = "distilbert_cls/distilbert";
    let first = "distilbert.transformer.layer.0.attention.q_lin";
    assert_case_gives_pefts_logits_and_gradients(name, 2 * 6, first);
    let (model, set) = model(name, None);
    let trained: Vec<String> = set.trainable_vars().iter().map(|v| v.full_name()).collect();
    assert!(
        trained.iter().any(|n| n == "pre_classifier.weight"),
        "{trained:?}"
    );
    let ids = Tensor::new(&[[2u32, 5, 3]], &Device::Cpu).unwrap();
    let types = Tensor::new(&[[0u32, 0, 1]], &Device::Cpu).unwrap();
    let err = model.forward(&ids, Some(&types), None).unwrap_err();
    assert!(err.to_string().contains("no token types"), "{err}");

    // PEFT's suffix rule makes `pre_classifier` a modules_to_save copy of "classifier",
    // and PEFT 0.21 refuses a model that also adapts it ("all-linear" does): so does the
    // plan, naming the layer.
    let dir = case(name).join("base");
    let mut recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["all-linear"]);
    recipe.modules_to_save = vec!["classifier".to_string()];
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let shapes = AutoSequenceClassifier::linear_shapes(&dir).unwrap();
    let plan = recipe.plan(vb, &shapes, DType::F32, &Device::Cpu).unwrap();
    let err = BertForSequenceClassification::from_pretrained(&dir, DType::F32, &Device::Cpu, &plan)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`pre_classifier` is both a target"), "{err}");

    // A DistilBERT config built by hand with BERT's two token types still has none.
    let mut config = BertConfig::from_file(case(name).join("base/config.json")).unwrap();
    config.type_vocab_size = 2;
    let vb = lorakit::checkpoint::Checkpoint::open(case(name).join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let plain = BertForSequenceClassification::load(&config, vb, &AdapterPlan::none()).unwrap();
    let err = plain.forward(&ids, Some(&types), None).unwrap_err();
    assert!(err.to_string().contains("no token types"), "{err}");
}

/// ELECTRA with PEFT's LoRA on query, value and the embeddings' projection (8 wide to 16).
#[test]
fn electra_gives_pefts_logits_and_gradients() {
    let name = "electra_cls/electra";
    assert_case_gives_pefts_logits_and_gradients(name, 1 + 2 * 2, "electra.embeddings_project");
    let config = BertConfig::from_file(case(name).join("base/config.json")).unwrap();
    assert_eq!((config.embedding_width(), config.hidden_size), (8, 16));
    assert!(config.linear_shapes().contains(&(8, 16)));
}

/// The Hub's `roberta-base` and `xlm-roberta-base` hold a pooler that
/// `RobertaForSequenceClassification` has not: merging a SEQ_CLS adapter into such a save
/// leaves it out, as PEFT's merged classifier has none.
#[test]
fn merging_drops_robertas_unused_pooler() {
    use lorakit::peft::{merge_checkpoint, MergeOptions};
    let name = "roberta_cls/roberta_mlm";
    let tmp = temp_dir("roberta_pooler");
    let base = tmp.join("base");
    std::fs::create_dir_all(&base).unwrap();
    let original = case(name).join("base");
    std::fs::copy(original.join("config.json"), base.join("config.json")).unwrap();
    let mut tensors = load(&original.join("model.safetensors"));
    let dev = Device::Cpu;
    tensors.insert(
        "roberta.pooler.dense.weight".into(),
        Tensor::ones((16, 16), DType::F32, &dev).unwrap(),
    );
    tensors.insert(
        "roberta.pooler.dense.bias".into(),
        Tensor::zeros(16, DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&tensors, base.join("model.safetensors")).unwrap();
    let folder = tmp.join("merged");
    let adapter = case(name).join("adapter");
    merge_checkpoint(&base, &adapter, &folder, MergeOptions::default()).unwrap();
    let merged = lorakit::checkpoint::Checkpoint::open(&folder).unwrap();
    assert!(!merged.contains("roberta.pooler.dense.weight"));
    assert!(merged.contains("roberta.embeddings.word_embeddings.weight"));
    let none = AdapterPlan::none();
    let model =
        BertForSequenceClassification::from_pretrained(&folder, DType::F32, &dev, &none).unwrap();
    let io = io(name);
    assert_close(
        &logits(&model, &io),
        &io["logits"],
        TOL,
        "merged without the pooler",
    );
}
