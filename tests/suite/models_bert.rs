//! `lorakit::models::bert`: BertForSequenceClassification against transformers + PEFT 0.21
//! on the `bert_cls` option fixture (tests/fixtures/peft_options/bert_cls: hidden 16, 2
//! layers, 3 labels; LoRA on query/value, bias = "all", the classifier in modules_to_save;
//! and `bert_cls/dora`, a DoRA adapter on the same base)
//! and on masked / token-typed inputs (`scripts/make_bert_mask_logits.py` →
//! tests/fixtures/models/bert_mask_logits.safetensors); the loss gradients of every
//! trainable tensor on a padded batch (`scripts/make_bert_grad_fixture.py` →
//! tests/fixtures/models/bert_mask_grads.safetensors); the config's refusals; bad inputs;
//! and a few training steps with a fresh adapter of the fixture's config.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::checkpoint::Checkpoint;
use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
use lorakit::models::bert::{
    BertConfig, BertForSequenceClassification, HiddenAct, PositionEmbeddingType, ProblemType,
};
use lorakit::peft::{adapted_var_builder, PeftAdapter, PeftConfig};
use lorakit::{Error, LoraConfig};

use crate::peft_common::{assert_close, assert_pytorch_gradients, load, rel_err};
use crate::peft_options::case_dir;

/// PEFT's logits vs ours: relative error bound.
const TOL: f64 = 1e-4;

fn config() -> BertConfig {
    BertConfig::from_file(case_dir("bert_cls").join("base/config.json")).unwrap()
}

fn base_vb() -> VarBuilder<'static> {
    Checkpoint::open(case_dir("bert_cls").join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu)
}

/// The fixture's model with PEFT's adapter loaded, every tensor of the file used.
fn loaded() -> (BertForSequenceClassification, lorakit::model::AdaptedSet) {
    let plan = PeftAdapter::load(case_dir("bert_cls").join("adapter"), &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap();
    let model = BertForSequenceClassification::load(&config(), base_vb(), &plan).unwrap();
    let set = plan.finish().expect("every tensor of the adapter is used");
    (model, set)
}

/// A plan that adapts nothing (no targets, no modules_to_save, no trained biases).
fn empty_plan() -> AdapterPlan {
    AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list(Vec::<String>::new())),
        RankAlpha::new(1, 1.0),
        LoraConfig::default(),
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu),
    )
}

fn io() -> HashMap<String, Tensor> {
    load(&case_dir("bert_cls").join("io.safetensors"))
}

fn mask_fixture() -> HashMap<String, Tensor> {
    load(&crate::peft_common::fixture(
        "models/bert_mask_logits.safetensors",
    ))
}

fn ones_like(ids: &Tensor) -> Tensor {
    Tensor::ones(ids.dims(), DType::I64, &Device::Cpu).unwrap()
}

#[test]
fn config_reads_transformers_config_json() {
    let c = config();
    assert_eq!(c.vocab_size, 64);
    assert_eq!(c.hidden_size, 16);
    assert_eq!(c.num_hidden_layers, 2);
    assert_eq!(c.num_attention_heads, 2);
    assert_eq!(c.intermediate_size, 32);
    assert_eq!(c.hidden_act, HiddenAct::Gelu);
    assert_eq!(c.max_position_embeddings, 16);
    assert_eq!(c.type_vocab_size, 2);
    assert_eq!(c.layer_norm_eps, 1e-12);
    assert_eq!(c.position_embedding_type, PositionEmbeddingType::Absolute);
    assert_eq!(c.num_labels, 3, "from id2label");
    assert_eq!(c.problem_type, None);
    assert_eq!(c.classifier_dropout, None);
    assert_eq!(c.hidden_dropout_prob, 0.1);

    let parse = |text: &str| BertConfig::from_json_str(text, "config.json");
    // Defaults: transformers' BertConfig (bert-base), 2 labels.
    assert_eq!(parse("{}").unwrap(), BertConfig::default());
    assert_eq!(BertConfig::default().num_labels, 2);
    assert_eq!(parse(r#"{"num_labels": 5}"#).unwrap().num_labels, 5);
    // transformers: id2label wins over a num_labels that disagrees (it only warns).
    let both = r#"{"num_labels": 5, "id2label": {"0": "a", "1": "b", "2": "c"}}"#;
    assert_eq!(parse(both).unwrap().num_labels, 3);
    let c = parse(
        r#"{"hidden_act": "gelu_new", "position_embedding_type": "absolute",
            "problem_type": "multi_label_classification", "classifier_dropout": null,
            "model_type": "bert", "is_decoder": false}"#,
    )
    .unwrap();
    assert_eq!(c.hidden_act, HiddenAct::GeluNew);
    assert_eq!(c.problem_type, Some(ProblemType::MultiLabelClassification));
    assert_eq!(
        parse(r#"{"hidden_act": "relu"}"#).unwrap().hidden_act,
        HiddenAct::Relu
    );
}

#[test]
fn unsupported_config_options_are_errors_naming_them() {
    let parse = |text: &str| BertConfig::from_json_str(text, "config.json").unwrap_err();
    let unsupported = |text: &str, option: &str, value: &str| {
        let err = parse(text);
        match &err {
            Error::Unsupported { what, got, .. } => {
                assert_eq!((*what, got.as_str()), (option, value), "{text}: {err}")
            }
            other => panic!("{text}: expected Unsupported, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(option) && msg.contains(value), "{msg}");
    };
    unsupported(r#"{"hidden_act": "swish"}"#, "hidden_act", "swish");
    unsupported(r#"{"hidden_act": "gelu_fast"}"#, "hidden_act", "gelu_fast");
    unsupported(
        r#"{"position_embedding_type": "relative_key"}"#,
        "position_embedding_type",
        "relative_key",
    );
    unsupported(
        r#"{"position_embedding_type": "relative_key_query"}"#,
        "position_embedding_type",
        "relative_key_query",
    );
    unsupported(r#"{"is_decoder": true}"#, "is_decoder", "true");
    unsupported(
        r#"{"model_type": "deberta-v2"}"#,
        "model_type",
        "deberta-v2",
    );
    unsupported(r#"{"problem_type": "ranking"}"#, "problem_type", "ranking");

    // Values out of their domain name the field and the file.
    let invalid = |text: &str, field: &str| {
        let msg = parse(text).to_string();
        assert!(
            msg.contains(field) && msg.contains("config.json"),
            "{text}: {msg}"
        );
    };
    invalid(
        r#"{"hidden_size": 10, "num_attention_heads": 3}"#,
        "hidden_size",
    );
    invalid(r#"{"num_attention_heads": 0}"#, "num_attention_heads");
    invalid(r#"{"id2label": {}}"#, "num_labels");
    invalid(r#"{"hidden_dropout_prob": 1.0}"#, "hidden_dropout_prob");
    invalid(r#"{"layer_norm_eps": -1e-5}"#, "layer_norm_eps");
    invalid(
        r#"{"num_labels": 1, "problem_type": "single_label_classification"}"#,
        "problem_type",
    );
    // Malformed JSON and wrong types: the file and the position.
    let msg = parse(r#"{"hidden_size": "big"}"#).to_string();
    assert!(msg.contains("config.json") && msg.contains("line"), "{msg}");
    // A missing file names its path.
    let msg = BertConfig::from_file("no/such/config.json")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no/such/config.json"), "{msg}");

    // A config built by hand is checked by load.
    let bad = BertConfig {
        hidden_size: 15,
        ..config()
    };
    let err = BertForSequenceClassification::load(&bad, base_vb(), &empty_plan()).unwrap_err();
    assert!(err.to_string().contains("hidden_size"), "{err}");
}

#[test]
fn loaded_adapter_gives_pefts_logits() {
    let (model, set) = loaded();
    assert_eq!(
        set.paths(),
        [
            "bert.encoder.layer.0.attention.self.query",
            "bert.encoder.layer.0.attention.self.value",
            "bert.encoder.layer.1.attention.self.query",
            "bert.encoder.layer.1.attention.self.value",
        ]
    );
    let names: Vec<String> = set.trainable_vars().iter().map(|v| v.full_name()).collect();
    for name in [
        "classifier.weight",
        "classifier.bias",
        "bert.embeddings.LayerNorm.bias",
        "bert.encoder.layer.1.output.LayerNorm.bias",
        "bert.pooler.dense.bias",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} trains: {names:?}");
    }
    let io = io();
    let ids = &io["input_ids"];
    assert_eq!(ids.dtype(), DType::I64);
    let logits = model.forward(ids, None, Some(&ones_like(ids))).unwrap();
    assert_eq!(logits.dims(), [2, 3]);
    assert_close(&logits, &io["logits"], TOL, "PEFT's logits");
    // No mask, u32 ids, explicit zero token types: the same.
    let ids32 = ids.to_dtype(DType::U32).unwrap();
    let zeros = Tensor::zeros((2, 5), DType::U32, &Device::Cpu).unwrap();
    let again = model.forward(&ids32, Some(&zeros), None).unwrap();
    assert_close(&again, &logits, 1e-6, "u32 ids, no mask");
    // Training mode without dropout computes the same with the composed ops.
    let no_dropout = BertConfig {
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        ..config()
    };
    let plan = PeftAdapter::load(case_dir("bert_cls").join("adapter"), &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap();
    let model = BertForSequenceClassification::load(&no_dropout, base_vb(), &plan).unwrap();
    plan.finish().unwrap();
    let train = model.forward_t(ids, None, None, true).unwrap();
    assert_close(&train, &io["logits"], TOL, "train-mode logits, no dropout");
}

#[test]
fn a_dora_adapter_gives_pefts_logits_unmerged_and_merged() {
    // bert_cls/dora: DoRA on query, key and every `dense` (attention output,
    // intermediate, output, pooler), its own classifier copy, on bert_cls's base.
    let plan = PeftAdapter::load(case_dir("bert_cls").join("dora"), &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap();
    let model = BertForSequenceClassification::load(&config(), base_vb(), &plan).unwrap();
    let set = plan.finish().expect("every tensor of the adapter is used");
    assert_eq!(set.len(), 2 * 5 + 1);
    for (path, layer) in set.layers() {
        assert_eq!(layer.read().kind(), lorakit::Variant::Dora, "{path}");
    }
    let io = io();
    let ids = &io["input_ids"];
    let logits = model.forward(ids, None, Some(&ones_like(ids))).unwrap();
    assert_close(&logits, &io["dora_logits"], TOL, "PEFT's DoRA logits");
    assert!(
        rel_err(&logits, &io["logits"]) > 1e-2,
        "not the LoRA's logits"
    );
    set.merge_all(true).unwrap();
    let merged = model.forward(ids, None, None).unwrap();
    assert_close(
        &merged,
        &io["dora_merged_logits"],
        TOL,
        "PEFT's merged DoRA",
    );
}

#[test]
fn merged_adapter_gives_pefts_merged_logits() {
    let (model, set) = loaded();
    let io = io();
    let ids = &io["input_ids"];
    set.merge_all(true).unwrap();
    let merged = model.forward(ids, None, Some(&ones_like(ids))).unwrap();
    assert_close(&merged, &io["merged_logits"], TOL, "PEFT's merged logits");
    set.unmerge_all().unwrap();
    let unmerged = model.forward(ids, None, None).unwrap();
    assert_close(&unmerged, &io["logits"], TOL, "unmerged again");
}

#[test]
fn adapted_var_builder_with_an_empty_plan_gives_the_merged_logits() {
    let dir = case_dir("bert_cls");
    let vb = adapted_var_builder(
        dir.join("base"),
        dir.join("adapter"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let plan = empty_plan();
    let model = BertForSequenceClassification::load(&config(), vb, &plan).unwrap();
    let set = plan.finish().unwrap();
    assert!(set.is_empty() && set.trainable_vars().is_empty());
    let io = io();
    let ids = &io["input_ids"];
    let logits = model.forward(ids, None, Some(&ones_like(ids))).unwrap();
    assert_close(&logits, &io["merged_logits"], TOL, "merged on load");

    // The base alone (no adapter anywhere) differs.
    let base = BertForSequenceClassification::load(&config(), base_vb(), &empty_plan()).unwrap();
    let plain = base.forward(ids, None, None).unwrap();
    assert!(rel_err(&plain, &io["logits"]) > 1e-2);
}

#[test]
fn disabled_adapters_change_the_logits() {
    let (model, set) = loaded();
    let io = io();
    let ids = &io["input_ids"];
    set.set_enabled(false);
    let off = model.forward(ids, None, None).unwrap();
    let e = rel_err(&off, &io["logits"]);
    assert!(
        e > 1e-2,
        "disabled: relative error to PEFT's logits only {e:.2e}"
    );
    // PEFT's `disable_adapter()`: the LoRA pairs and the classifier copy are off, the
    // biases trained under bias = "all" stay (PEFT trains them in place).
    let pefts_disabled = &mask_fixture()["logits_disabled"];
    assert_close(
        &off,
        pefts_disabled,
        TOL,
        "disabled, as PEFT's disable_adapter()",
    );
    set.set_enabled(true);
    let on = model.forward(ids, None, None).unwrap();
    assert_close(&on, &io["logits"], TOL, "enabled again");
}

/// The backward through the whole model (the fused attention under a padding mask, the
/// LayerNorms, GELU, the pooler, the classifier) gives PyTorch + PEFT's gradients for
/// every trainable tensor: the LoRA factors, the biases `bias = "all"` trains, and the
/// classifier copy. Errors are relative to the largest gradient of all (the key biases'
/// gradients are zero up to rounding on both sides: a per-row constant in the scores).
#[test]
fn padded_batch_gives_pytorchs_gradients() {
    let fx = load(&crate::peft_common::fixture(
        "models/bert_mask_grads.safetensors",
    ));
    let (model, set) = loaded();
    assert_padded_batch_gradients(&model, &set, &fx);
}

/// The loss of `model` (eval mode) on `fx`'s `input_ids`, `attention_mask` and `labels`
/// is `fx["loss"]`, and its gradients are `fx`'s (`assert_pytorch_gradients`).
pub(crate) fn assert_padded_batch_gradients(
    model: &BertForSequenceClassification,
    set: &lorakit::model::AdaptedSet,
    fx: &HashMap<String, Tensor>,
) {
    let logits = model
        .forward_t(&fx["input_ids"], None, Some(&fx["attention_mask"]), false)
        .unwrap();
    let loss = model.loss(&logits, &fx["labels"]).unwrap();
    assert_close(&loss, &fx["loss"], 1e-5, "loss");
    assert_pytorch_gradients(fx, &loss, set);
}

#[test]
fn attention_mask_and_token_types_give_transformers_logits() {
    let (model, _set) = loaded();
    let f = mask_fixture();
    let (ids, mask, types) = (&f["input_ids"], &f["attention_mask"], &f["token_type_ids"]);
    let masked = model.forward(ids, None, Some(mask)).unwrap();
    assert_close(&masked, &f["logits_mask"], TOL, "padded row 0");
    let typed = model
        .forward(ids, Some(types), Some(&ones_like(ids)))
        .unwrap();
    assert_close(&typed, &f["logits_types"], TOL, "token types");
    let both = model.forward(ids, Some(types), Some(mask)).unwrap();
    assert_close(
        &both,
        &f["logits_mask_types"],
        TOL,
        "padding and token types",
    );

    // What the padding changes: row 0 (whose last two positions are padded) is row 0's
    // first three tokens alone; row 1 (no padding) is as unmasked; padded ids do not matter.
    let unmasked = model.forward(ids, None, None).unwrap();
    let row = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();
    let short = model
        .forward(&row(ids, 0).narrow(1, 0, 3).unwrap(), None, None)
        .unwrap();
    assert_close(&row(&masked, 0), &short, 1e-5, "padded row = its prefix");
    assert!(rel_err(&row(&masked, 0), &row(&unmasked, 0)) > 1e-3);
    assert_close(&row(&masked, 1), &row(&unmasked, 1), 1e-6, "unpadded row");
    let mut rows: Vec<Vec<i64>> = ids.to_vec2().unwrap();
    rows[0][3] = (rows[0][3] + 1) % 64;
    rows[0][4] = (rows[0][4] + 7) % 64;
    let swapped = Tensor::from_vec(rows.concat(), (2, 5), &Device::Cpu).unwrap();
    let again = model.forward(&swapped, None, Some(mask)).unwrap();
    assert_close(&again, &masked, 1e-6, "padded ids do not matter");
    // A float mask and a u8 mask read the same.
    for dtype in [DType::F32, DType::U8] {
        let m = mask.to_dtype(dtype).unwrap();
        let y = model.forward(ids, None, Some(&m)).unwrap();
        assert_close(&y, &masked, 1e-6, &format!("{dtype:?} mask"));
    }
}

#[test]
fn bad_inputs_are_errors_naming_them() {
    let (model, _set) = loaded();
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
    let err = |r: lorakit::Result<Tensor>| r.unwrap_err().to_string();
    let msg = err(model.forward(&Tensor::new(&[1u32, 2, 3], &dev).unwrap(), None, None));
    assert!(msg.contains("input_ids"), "{msg}");
    let long = Tensor::zeros((1, 17), DType::U32, &dev).unwrap();
    let msg = err(model.forward(&long, None, None));
    assert!(msg.contains("max_position_embeddings (16)"), "{msg}");
    let empty = Tensor::zeros((1, 0), DType::U32, &dev).unwrap();
    assert!(model.forward(&empty, None, None).is_err());
    let msg = err(model.forward(&Tensor::new(&[[1u32, 64]], &dev).unwrap(), None, None));
    assert!(
        msg.contains("word_embeddings") && msg.contains("64"),
        "{msg}"
    );
    let msg = err(model.forward(&Tensor::new(&[[1f32, 2.]], &dev).unwrap(), None, None));
    assert!(
        msg.contains("word_embeddings") && msg.contains("F32"),
        "{msg}"
    );
    let types = Tensor::new(&[[0u32, 2, 1]], &dev).unwrap();
    let msg = err(model.forward(&ids, Some(&types), None));
    assert!(msg.contains("token_type_embeddings"), "{msg}");
    let types = Tensor::new(&[[0u32, 1]], &dev).unwrap();
    let msg = err(model.forward(&ids, Some(&types), None));
    assert!(msg.contains("token_type_ids"), "{msg}");
    let mask = Tensor::new(&[[1u32, 1]], &dev).unwrap();
    let msg = err(model.forward(&ids, None, Some(&mask)));
    assert!(msg.contains("attention_mask"), "{msg}");

    // Losses: shapes and label ranges.
    let logits = model.forward(&ids, None, None).unwrap();
    let msg = err(model.loss(&logits, &Tensor::new(&[3u32], &dev).unwrap()));
    assert!(msg.contains("labels") && msg.contains('3'), "{msg}");
    let msg = err(model.loss(&logits, &Tensor::new(&[-100i64], &dev).unwrap()));
    assert!(msg.contains("-100"), "{msg}");
    let msg = err(model.loss(&logits, &Tensor::new(&[0u32, 1], &dev).unwrap()));
    assert!(msg.contains("labels"), "{msg}");
    let msg = err(model.loss(
        &logits.flatten_all().unwrap(),
        &Tensor::new(&[0u32], &dev).unwrap(),
    ));
    assert!(msg.contains("logits"), "{msg}");
}

#[test]
fn losses_follow_transformers_problem_types() {
    let (model, _set) = loaded();
    let dev = Device::Cpu;
    let logits = Tensor::new(&[[1f32, -2., 0.5], [0., 3., -1.]], &dev).unwrap();
    let scalar = |t: Tensor| t.to_scalar::<f32>().unwrap() as f64;
    // Integer labels: cross-entropy (PyTorch: F.cross_entropy gives 1.7763, mean).
    let ce = scalar(
        model
            .loss(&logits, &Tensor::new(&[2i64, 0], &dev).unwrap())
            .unwrap(),
    );
    let expect_ce = {
        let lse = |r: [f64; 3]| r.iter().map(|x| x.exp()).sum::<f64>().ln();
        ((lse([1., -2., 0.5]) - 0.5) + (lse([0., 3., -1.]) - 0.)) / 2.0
    };
    assert!((ce - expect_ce).abs() < 1e-5, "{ce} vs {expect_ce}");
    // Float labels: binary cross-entropy with logits, mean over every entry.
    let y = Tensor::new(&[[1f32, 0., 1.], [0., 1., 0.]], &dev).unwrap();
    let bce = scalar(model.loss(&logits, &y).unwrap());
    let xs = [1f64, -2., 0.5, 0., 3., -1.];
    let ys = [1f64, 0., 1., 0., 1., 0.];
    let expect_bce = xs
        .iter()
        .zip(ys)
        .map(|(&x, y)| {
            let p = 1.0 / (1.0 + (-x).exp());
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        })
        .sum::<f64>()
        / 6.0;
    assert!((bce - expect_bce).abs() < 1e-5, "{bce} vs {expect_bce}");
    // Large logits stay finite.
    let big = Tensor::new(&[[100f32, -100., 0.]], &dev).unwrap();
    let y = Tensor::new(&[[0f32, 1., 0.]], &dev).unwrap();
    let l = scalar(model.loss(&big, &y).unwrap());
    assert!(
        l.is_finite() && (l - (200.0 + 2f64.ln()) / 3.0).abs() < 1e-3,
        "{l}"
    );
}

#[test]
fn regression_loss_for_one_label() {
    let dev = Device::Cpu;
    let config = BertConfig {
        vocab_size: 16,
        hidden_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 16,
        max_position_embeddings: 8,
        num_labels: 1,
        hidden_act: HiddenAct::Relu,
        ..BertConfig::default()
    };
    let base = VarMap::new();
    let vb = VarBuilder::from_varmap(&base, DType::F32, &dev);
    let model = BertForSequenceClassification::load(&config, vb, &empty_plan()).unwrap();
    let ids = Tensor::new(&[[1u32, 2], [3, 4]], &dev).unwrap();
    let logits = model.forward(&ids, None, None).unwrap();
    assert_eq!(logits.dims(), [2, 1]);
    let labels = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
    let loss = model
        .loss(&logits, &labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    let expect = ((v[0] - 0.5).powi(2) + (v[1] + 1.0).powi(2)) / 2.0;
    assert!((loss - expect).abs() < 1e-5, "{loss} vs {expect}");
}

#[test]
fn a_fresh_lora_of_the_fixtures_config_trains() {
    let dev = Device::Cpu;
    let dir = case_dir("bert_cls");
    let peft = PeftConfig::from_file(dir.join("adapter/adapter_config.json")).unwrap();
    let varmap = VarMap::new();
    let plan = peft
        .fresh_plan(
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
            &LoraConfig::default(),
        )
        .unwrap();
    let model = BertForSequenceClassification::load(&config(), base_vb(), &plan).unwrap();
    let set = plan.finish().unwrap();
    assert_eq!(set.len(), 4, "query and value of both layers");

    let ids = Tensor::new(
        &[
            [14u32, 25, 8, 27, 13],
            [12, 49, 20, 13, 60],
            [3, 9, 33, 41, 2],
            [50, 7, 7, 18, 31],
        ],
        &dev,
    )
    .unwrap();
    let labels = Tensor::new(&[0u32, 1, 2, 1], &dev).unwrap();
    let eval_loss = || {
        let logits = model.forward(&ids, None, None).unwrap();
        model
            .loss(&logits, &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // A fresh LoRA (B = 0) and copies of the base's head and biases: the base's logits.
    let base = BertForSequenceClassification::load(&config(), base_vb(), &empty_plan()).unwrap();
    assert_close(
        &model.forward(&ids, None, None).unwrap(),
        &base.forward(&ids, None, None).unwrap(),
        1e-6,
        "fresh adapter = base",
    );

    let before = eval_loss();
    let mut opt = candle_nn::AdamW::new_lr(set.vars(), 1e-2).unwrap();
    set.set_training(true);
    for _ in 0..15 {
        let logits = model.forward_t(&ids, None, None, true).unwrap();
        let loss = model.loss(&logits, &labels).unwrap();
        opt.backward_step(&loss).unwrap();
    }
    set.set_training(false);
    let after = eval_loss();
    assert!(
        after < 0.7 * before,
        "loss {before} -> {after}: expected a clear decrease"
    );
    // Gradients reach every trainable tensor: the LoRA pairs (queries only through the
    // softmax), the classifier copy, and biases before every LayerNorm (the embeddings').
    for v in set.trainable_vars() {
        let name = v.full_name();
        let t = v.var.var.as_tensor();
        if name.ends_with("lora_B.weight") {
            let norm = t
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{name} still zero after training");
        }
    }
    let moved = |name: &str| {
        let v = set
            .trainable_vars()
            .into_iter()
            .find(|v| v.full_name() == name)
            .unwrap_or_else(|| panic!("{name} trains"));
        let now = v.var.var.as_tensor().clone();
        let base_key = name.replace(".base_layer", "");
        let original = load(&dir.join("base/model.safetensors"))[&base_key].clone();
        rel_err(&now, &original) > 0.0
    };
    for name in [
        "bert.encoder.layer.0.attention.self.query.base_layer.bias",
        "bert.embeddings.LayerNorm.bias",
        "bert.encoder.layer.0.attention.output.LayerNorm.bias",
        "classifier.weight",
    ] {
        assert!(moved(name), "{name} did not move");
    }
}
