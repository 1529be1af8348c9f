//! Bad input to PEFT's LoRA options — Conv1D bases, LoRA on embeddings, `lora_bias`,
//! `bias = "lora_only" / "all"`, `modules_to_save`, `layers_to_transform` — returns an `Err`
//! naming what is wrong (the key, the setting, the layer), never panics: tensors of the wrong
//! shape or missing from an adapter file (loaded through the model-level API and merged into
//! a checkpoint), combinations PEFT refuses, embedding inputs that are not token ids, and
//! saves whose config does not describe the layers.
//!
//! Device mismatches cannot be produced here (only the CPU exists in CI); token ids are
//! checked for their device by the same `validate::token_ids` that checks their dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lorakit::model::{
    conv1d, embedding, linear_b, AdaptedSet, AdapterPlan, BiasMode, Linear, ModuleSelector,
    RankAlpha, TargetSpec, TrainableBase,
};
use lorakit::peft::{merge_checkpoint, save_adapter, PeftAdapter, PeftConfig};
use lorakit::{
    AdaLoraConfig, Adapter, BaseKind, DoraLinear, FrozenLinear, LoraConfig, LoraEmbedding,
    LoraFaLinear, LoraLinear, Shared, Variant, VeraConfig, VeraShared,
};
use serde_json::json;

use crate::bad_input_common::*;
use crate::peft_common::temp_dir;

// The tiny model every case builds: one module of each kind, with long paths so a needle
// naming the layer cannot match by accident.
const EMBED: &str = "model.embed_tokens";
const Q: &str = "model.layers.0.self_attn.q_proj";
const O: &str = "model.layers.0.self_attn.o_proj";
const SCORE: &str = "score_head";
const C_ATTN: &str = "transformer.h.0.attn.c_attn";
const VOCAB: usize = 10;
const DIM: usize = 4;

/// The base model's tensors: an embedding `(VOCAB, DIM)`, `q_proj` `DIM → 6` with a bias,
/// `o_proj` `6 → DIM` without one, a classifier `DIM → 3` with a bias, and a GPT-2 Conv1D
/// `c_attn` stored `(DIM, 12)` with a bias.
fn base_tensors() -> HashMap<String, Tensor> {
    let mut t = HashMap::new();
    let mut put = |name: &str, dims: &[usize]| {
        let n: usize = dims.iter().product();
        let v = Tensor::arange(0f32, n as f32, &cpu())
            .and_then(|v| ((v * 0.01)? - 0.1)?.reshape(dims.to_vec()))
            .expect("base tensor");
        t.insert(name.to_string(), v);
    };
    put(&format!("{EMBED}.weight"), &[VOCAB, DIM]);
    put(&format!("{Q}.weight"), &[6, DIM]);
    put(&format!("{Q}.bias"), &[6]);
    put(&format!("{O}.weight"), &[DIM, 6]);
    put(&format!("{SCORE}.weight"), &[3, DIM]);
    put(&format!("{SCORE}.bias"), &[3]);
    put(&format!("{C_ATTN}.weight"), &[DIM, 12]);
    put(&format!("{C_ATTN}.bias"), &[12]);
    t
}

/// Builds the model through `plan` (the model-level API, as model code does) and finishes
/// the plan.
fn build_model(plan: &AdapterPlan) -> lorakit::Result<(HashMap<&'static str, Linear>, AdaptedSet)> {
    let vb = VarBuilder::from_tensors(base_tensors(), DType::F32, &cpu());
    let mut m = HashMap::new();
    m.insert(EMBED, embedding(VOCAB, DIM, vb.pp(EMBED), plan)?);
    m.insert(Q, linear_b(DIM, 6, true, vb.pp(Q), plan)?);
    m.insert(O, linear_b(6, DIM, false, vb.pp(O), plan)?);
    m.insert(SCORE, linear_b(DIM, 3, true, vb.pp(SCORE), plan)?);
    m.insert(C_ATTN, conv1d(DIM, 12, vb.pp(C_ATTN), plan)?);
    let set = plan.finish()?;
    Ok((m, set))
}

fn ones(dims: &[usize]) -> Tensor {
    Tensor::ones(dims.to_vec(), DType::F32, &cpu()).expect("ones")
}

/// `adapter_model.safetensors` bytes holding `tensors` under `base_model.model.<key>`.
fn weights_bytes(tensors: &[(String, Tensor)]) -> Vec<u8> {
    let keyed: Vec<(String, &Tensor)> = tensors
        .iter()
        .map(|(k, t)| (format!("base_model.model.{k}"), t))
        .collect();
    safetensors::serialize(keyed.iter().map(|(k, t)| (k.as_str(), *t)), None).expect("serialize")
}

/// A LoRA adapter config: `extra` keys over `{"peft_type": "LORA", "r": 2, "lora_alpha": 4}`.
fn config_json(extra: serde_json::Value) -> String {
    let mut c = json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4});
    for (k, v) in extra.as_object().expect("object") {
        c[k] = v.clone();
    }
    c.to_string()
}

/// An adapter in memory, through `PeftAdapter::from_bytes`.
fn adapter(config: &str, tensors: &[(String, Tensor)]) -> lorakit::Result<PeftAdapter> {
    PeftAdapter::from_bytes(config, &weights_bytes(tensors), &cpu())
}

fn key(path: &str, suffix: &str) -> String {
    format!("{path}.{suffix}")
}

/// A good LoRA pair for `q_proj` (rank 2).
fn q_pair() -> Vec<(String, Tensor)> {
    vec![
        (key(Q, "lora_A.weight"), ones(&[2, DIM])),
        (key(Q, "lora_B.weight"), ones(&[6, 2])),
    ]
}

/// Loads the adapter onto the model.
fn load_model(config: &str, tensors: &[(String, Tensor)]) -> lorakit::Result<AdaptedSet> {
    let plan = adapter(config, tensors)?.plan()?;
    build_model(&plan).map(|(_, set)| set)
}

/// Writes the base model and the adapter under a fresh temp dir; merges them into
/// `out.safetensors` (returns the merge's result and the output path).
fn merge(
    name: &str,
    config: &str,
    tensors: &[(String, Tensor)],
) -> (lorakit::Result<lorakit::peft::MergeReport>, PathBuf) {
    let dir = temp_dir(&format!("options-bad-{name}"));
    let base = dir.join("model.safetensors");
    candle_core::safetensors::save(&base_tensors(), &base).expect("base");
    let adapter_dir = dir.join("adapter");
    std::fs::create_dir_all(&adapter_dir).expect("adapter dir");
    std::fs::write(adapter_dir.join("adapter_config.json"), config).expect("config");
    std::fs::write(
        adapter_dir.join("adapter_model.safetensors"),
        weights_bytes(tensors),
    )
    .expect("weights");
    let out = dir.join("out.safetensors");
    (
        merge_checkpoint(&base, &adapter_dir, &out, Default::default()),
        out,
    )
}

/// [`merge`], then removes its temp dir.
fn merge_once(
    name: &str,
    config: &str,
    tensors: &[(String, Tensor)],
) -> lorakit::Result<lorakit::peft::MergeReport> {
    let (res, out) = merge(name, config, tensors);
    if let Some(dir) = out.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    res
}

/// One bad adapter file: loading it onto the model and merging it into the checkpoint both
/// fail naming `needles`, and the merge writes nothing.
fn load_and_merge_refuse(
    c: &mut Checker,
    what: &str,
    config: &str,
    tensors: &[(String, Tensor)],
    needles: &[&str],
) {
    load_and_merge_refuse_with(c, what, config, tensors, needles, needles)
}

/// As [`load_and_merge_refuse`], with the words each message must hold.
fn load_and_merge_refuse_with(
    c: &mut Checker,
    what: &str,
    config: &str,
    tensors: &[(String, Tensor)],
    load_needles: &[&str],
    merge_needles: &[&str],
) {
    c.err(&format!("load, {what}"), load_needles, || {
        load_model(config, tensors)
    });
    let slug: String = what
        .chars()
        .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '-' })
        .collect();
    let mut out = PathBuf::new();
    c.err(&format!("merge, {what}"), merge_needles, || {
        let (res, o) = merge(&slug, config, tensors);
        out = o;
        res
    });
    c.check(
        &format!("merge, {what}: nothing written"),
        !out.exists(),
        || format!("{} exists", out.display()),
    );
    if let Some(dir) = out.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

// ---------------------------------------------------------------------------------------
// Wrong shapes.
// ---------------------------------------------------------------------------------------

#[test]
fn tensors_of_the_wrong_shape_are_refused_by_key_and_layer() {
    let mut c = Checker::new();
    let lora_q = config_json(json!({"target_modules": ["q_proj"]}));
    let lora_embed = config_json(json!({"target_modules": ["embed_tokens"]}));

    load_and_merge_refuse(
        &mut c,
        "lora_embedding_A of the wrong vocab",
        &lora_embed,
        &[
            (key(EMBED, "lora_embedding_A"), ones(&[2, VOCAB + 1])),
            (key(EMBED, "lora_embedding_B"), ones(&[DIM, 2])),
        ],
        &[EMBED, "11"],
    );
    c.err(
        "load, lora_embedding_A of the wrong vocab names the key",
        &[EMBED, "lora_embedding_A", "[2, 10]", "[2, 11]"],
        || {
            load_model(
                &lora_embed,
                &[
                    (key(EMBED, "lora_embedding_A"), ones(&[2, VOCAB + 1])),
                    (key(EMBED, "lora_embedding_B"), ones(&[DIM, 2])),
                ],
            )
        },
    );
    load_and_merge_refuse(
        &mut c,
        "lora_embedding_B of the wrong dim",
        &lora_embed,
        &[
            (key(EMBED, "lora_embedding_A"), ones(&[2, VOCAB])),
            (key(EMBED, "lora_embedding_B"), ones(&[DIM + 1, 2])),
        ],
        &[EMBED, "5"],
    );
    load_and_merge_refuse(
        &mut c,
        "lora_B.bias of the wrong length",
        &config_json(json!({"target_modules": ["q_proj"], "lora_bias": true})),
        &[q_pair(), vec![(key(Q, "lora_B.bias"), ones(&[5]))]].concat(),
        &[Q, "lora_B.bias", "[6]", "[5]"],
    );
    load_and_merge_refuse(
        &mut c,
        "a modules_to_save weight of the wrong shape",
        &config_json(json!({"target_modules": ["q_proj"], "modules_to_save": [SCORE]})),
        &[q_pair(), vec![(key(SCORE, "weight"), ones(&[3, DIM + 1]))]].concat(),
        &[SCORE, "weight", "[3, 4]", "[3, 5]"],
    );
    load_and_merge_refuse(
        &mut c,
        "a modules_to_save bias of the wrong length",
        &config_json(json!({"target_modules": ["q_proj"], "modules_to_save": [SCORE]})),
        &[
            q_pair(),
            vec![
                (key(SCORE, "weight"), ones(&[3, DIM])),
                (key(SCORE, "bias"), ones(&[4])),
            ],
        ]
        .concat(),
        &[SCORE, "bias", "[3]", "[4]"],
    );
    // A `base_layer.bias` under bias = "none": loading takes it as a frozen replacement of
    // the base's bias; a merge refuses the key itself (PEFT saves none under "none").
    load_and_merge_refuse_with(
        &mut c,
        "a base_layer.bias of the wrong length under bias = none",
        &lora_q,
        &[q_pair(), vec![(key(Q, "base_layer.bias"), ones(&[7]))]].concat(),
        &[Q, "bias", "[6]", "[7]"],
        &[Q, "base_layer.bias"],
    );
    // A `bias = "all"` bias of a module without an adapter.
    load_and_merge_refuse(
        &mut c,
        "a bias = all bias of the wrong length",
        &config_json(json!({"target_modules": ["q_proj"], "bias": "all"})),
        &[q_pair(), vec![(key(SCORE, "bias"), ones(&[4]))]].concat(),
        &[SCORE, "bias", "[3]", "[4]"],
    );
    // GPT-2's Conv1D: lora_A is (r, in) whatever the stored layout.
    load_and_merge_refuse(
        &mut c,
        "a Conv1D lora_A of the transposed shape",
        &config_json(json!({"target_modules": ["c_attn"], "fan_in_fan_out": true})),
        &[
            (key(C_ATTN, "lora_A.weight"), ones(&[2, 12])),
            (key(C_ATTN, "lora_B.weight"), ones(&[DIM, 2])),
        ],
        &[C_ATTN],
    );
    c.err(
        "load, the embedding copy base_layer.weight of the wrong shape",
        &[EMBED, "base_layer.weight", "[10, 4]", "[11, 4]"],
        || {
            load_model(
                &lora_embed,
                &[
                    (key(EMBED, "lora_embedding_A"), ones(&[2, VOCAB])),
                    (key(EMBED, "lora_embedding_B"), ones(&[DIM, 2])),
                    (key(EMBED, "base_layer.weight"), ones(&[VOCAB + 1, DIM])),
                ],
            )
        },
    );
    c.finish();
}

/// A trained `base_layer.bias` (`bias = "lora_only"`) of the wrong length must be refused
/// naming the layer's path and the key, as every other tensor of the file is.
#[test]
fn a_trained_base_layer_bias_of_the_wrong_length_names_the_layer() {
    let mut c = Checker::new();
    load_and_merge_refuse(
        &mut c,
        "a trained base_layer.bias of the wrong length",
        &config_json(json!({"target_modules": ["q_proj"], "bias": "lora_only"})),
        &[q_pair(), vec![(key(Q, "base_layer.bias"), ones(&[7]))]].concat(),
        &[Q, "base_layer.bias", "[6]", "[7]"],
    );
    c.finish();
}

/// A weight that is not 2-D is refused as `FrozenLinear::new` refuses it: naming the
/// weight and the expected `[d_in, d_out]` / `[vocab, dim]`.
#[test]
fn conv1d_and_embedding_name_a_weight_that_is_not_2d() {
    let mut c = Checker::new();
    c.err(
        "FrozenLinear::conv1d, 1-D weight",
        &["weight", "[5]"],
        || FrozenLinear::conv1d(ones(&[5]), None),
    );
    c.err(
        "FrozenLinear::embedding, 1-D table",
        &["weight", "[5]"],
        || FrozenLinear::embedding(ones(&[5])),
    );
    c.err(
        "FrozenLinear::embedding, 3-D table",
        &["weight", "[2, 3, 4]"],
        || FrozenLinear::embedding(ones(&[2, 3, 4])),
    );
    c.finish();
}

/// Messages about a Conv1D's or an embedding's tensors give shapes in the layout the files
/// store them in (`(in, out)`, `(vocab, dim)`), so the user can compare them with the file.
#[test]
fn shapes_in_messages_are_in_the_stored_layout() {
    let mut c = Checker::new();
    let conv = config_json(json!({"target_modules": ["c_attn"], "fan_in_fan_out": true}));
    let conv_tensors = [
        (key(C_ATTN, "lora_A.weight"), ones(&[2, 12])),
        (key(C_ATTN, "lora_B.weight"), ones(&[DIM, 2])),
    ];
    c.err(
        "load, a Conv1D stored [4, 12] with lora_A for in = 12",
        &[C_ATTN, "lora_A", "[4, 12]"],
        || load_model(&conv, &conv_tensors),
    );
    c.err(
        "merge, a Conv1D stored [4, 12] with lora_A for in = 12",
        &[C_ATTN, "[4, 12]", "[12, 4]"],
        || merge_once("layout-conv", &conv, &conv_tensors),
    );
    let emb = config_json(json!({"target_modules": ["embed_tokens"]}));
    let emb_tensors = [
        (key(EMBED, "lora_embedding_A"), ones(&[2, VOCAB + 1])),
        (key(EMBED, "lora_embedding_B"), ones(&[DIM, 2])),
    ];
    c.err(
        "load, an embedding stored [10, 4] with lora_embedding_A for 11 ids",
        &[EMBED, "lora_embedding_A", "[10, 4]"],
        || load_model(&emb, &emb_tensors),
    );
    c.err(
        "merge, an embedding stored [10, 4] with lora_embedding_A for 11 ids",
        &[EMBED, "[10, 4]", "[11, 4]"],
        || merge_once("layout-emb", &emb, &emb_tensors),
    );
    c.finish();
}

/// A `base_layer.bias` of the right shape under bias = "none" (PEFT never saves one, but
/// loads one given, `strict=False`): loading through the model-level API and merging into a
/// checkpoint should agree on whether the file is usable.
#[test]
fn load_and_merge_agree_on_a_base_layer_bias_under_bias_none() {
    let config = config_json(json!({"target_modules": ["q_proj"]}));
    let tensors = [q_pair(), vec![(key(Q, "base_layer.bias"), ones(&[6]))]].concat();
    let loaded = load_model(&config, &tensors).map(drop);
    let merged = merge_once("bias-none-base-layer-bias", &config, &tensors).map(drop);
    assert_eq!(
        loaded.is_ok(),
        merged.is_ok(),
        "load: {loaded:?}; merge: {merged:?}"
    );
}

#[test]
fn layer_constructors_refuse_wrong_shapes() {
    let mut c = Checker::new();
    let table = || FrozenLinear::embedding(weight(VOCAB, DIM, DType::F32)).unwrap();
    c.err(
        "FrozenLinear::conv1d, bias of the wrong length",
        &["bias", "[5]", "[6]"],
        || FrozenLinear::conv1d(weight(DIM, 5, DType::F32), Some(ones(&[6]))),
    );
    c.err("FrozenLinear::embedding, empty table", &["weight"], || {
        FrozenLinear::embedding(Tensor::zeros((0, DIM), DType::F32, &cpu()).unwrap())
    });
    c.err(
        "FrozenLinear::embedding, integer table",
        &["weight"],
        || FrozenLinear::embedding(Tensor::zeros((VOCAB, DIM), DType::U32, &cpu()).unwrap()),
    );
    c.err(
        "FrozenLinear::from_stored, an embedding with a bias",
        &["bias", "embedding"],
        || {
            FrozenLinear::from_stored(
                BaseKind::Embedding,
                weight(VOCAB, DIM, DType::F32),
                Some(ones(&[DIM])),
            )
        },
    );
    c.err(
        "with_trainable_bias, wrong length",
        &["bias", "[4]", "[3]"],
        || base(4, 6).with_trainable_bias(&Var::ones(3, DType::F32, &cpu())?),
    );
    c.err("with_trainable_bias, wrong dtype", &["bias", "F64"], || {
        base(4, 6).with_trainable_bias(&Var::ones(4, DType::F64, &cpu())?)
    });
    c.err(
        "LoraLinear::with_lora_bias, wrong length",
        &["proj", "lora_B.bias", "[4]", "[5]"],
        || {
            LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?
                .with_lora_bias(Var::ones(5, DType::F32, &cpu())?)
        },
    );
    c.err(
        "LoraEmbedding::from_weights, A of the wrong vocab",
        &["wte", "lora_A", "[2, 10]", "[2, 9]"],
        || {
            let pair = lorakit::low_rank::LowRankPair {
                a: lorakit::low_rank::Factor::Frozen(ones(&[2, VOCAB - 1])),
                b: lorakit::low_rank::Factor::Frozen(ones(&[DIM, 2])),
            };
            LoraEmbedding::from_weights("wte", table(), &LoraConfig::new(2, 4.0), pair)
        },
    );
    c.err(
        "TrainableBase::from_parts, a copy of the wrong shape",
        &[SCORE, "weight", "[3, 4]", "[4, 3]"],
        || {
            TrainableBase::from_parts(
                SCORE,
                FrozenLinear::new(weight(3, DIM, DType::F32), Some(ones(&[3])))?,
                Some(Var::ones((DIM, 3), DType::F32, &cpu())?),
                None,
            )
        },
    );
    c.err(
        "TrainableBase::from_parts, a Conv1D copy in the linear layout",
        &[C_ATTN, "weight", "[4, 12]", "[12, 4]"],
        || {
            TrainableBase::from_parts(
                C_ATTN,
                FrozenLinear::conv1d(weight(DIM, 12, DType::F32), None)?,
                Some(Var::ones((12, DIM), DType::F32, &cpu())?),
                None,
            )
        },
    );
    c.err(
        "TrainableBase::bias_only, a module without a bias",
        &[O, "bias"],
        || TrainableBase::bias_only(O, base(DIM, 6), vb(O)),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------
// Missing tensors.
// ---------------------------------------------------------------------------------------

#[test]
fn missing_tensors_are_refused_by_key() {
    let mut c = Checker::new();
    let bias_key = format!("base_model.model.{Q}.lora_B.bias");
    load_and_merge_refuse(
        &mut c,
        "lora_bias without lora_B.bias",
        &config_json(json!({"target_modules": ["q_proj"], "lora_bias": true})),
        &q_pair(),
        &[&bias_key, "adapter_model.safetensors"],
    );
    // The other way round: a lora_B.bias the config does not announce is never used.
    load_and_merge_refuse(
        &mut c,
        "lora_B.bias without lora_bias",
        &config_json(json!({"target_modules": ["q_proj"]})),
        &[q_pair(), vec![(key(Q, "lora_B.bias"), ones(&[6]))]].concat(),
        &[&bias_key, "not used"],
    );
    let b_key = format!("base_model.model.{EMBED}.lora_embedding_B");
    load_and_merge_refuse(
        &mut c,
        "lora_embedding_A without lora_embedding_B",
        &config_json(json!({"target_modules": ["embed_tokens"]})),
        &[(key(EMBED, "lora_embedding_A"), ones(&[2, VOCAB]))],
        &[&b_key],
    );
    c.finish();
}

/// A `modules_to_save` module the file stores nothing for gets a fresh copy of the original
/// (what PEFT's `ModulesToSaveWrapper` holds before loading); one the file stores only the
/// bias of keeps the original weight, frozen. Documented behaviour, not an error.
#[test]
fn modules_to_save_without_tensors_copy_the_original() {
    let config = config_json(json!({"target_modules": ["q_proj"], "modules_to_save": [SCORE]}));
    let x = Tensor::new(&[[1f32, -2., 3., 0.5]], &cpu()).unwrap();
    let original = {
        let t = base_tensors();
        FrozenLinear::new(
            t[&format!("{SCORE}.weight")].clone(),
            Some(t[&format!("{SCORE}.bias")].clone()),
        )
        .unwrap()
    };
    let y_orig = original.forward(&x).unwrap();

    let plan = adapter(&config, &q_pair()).unwrap().plan().unwrap();
    let (modules, set) = build_model(&plan).unwrap();
    let score = modules[SCORE].trainable().expect("a trainable copy");
    assert!(score.is_full_copy());
    assert_eq!(set.trainable_bases().len(), 1);
    let y = modules[SCORE].forward(&x).unwrap();
    assert_eq!(
        y.to_vec2::<f32>().unwrap(),
        y_orig.to_vec2::<f32>().unwrap()
    );

    let file_bias = Tensor::new(&[1f32, 2., 3.], &cpu()).unwrap();
    let tensors = [q_pair(), vec![(key(SCORE, "bias"), file_bias.clone())]].concat();
    let plan = adapter(&config, &tensors).unwrap().plan().unwrap();
    let (modules, _set) = build_model(&plan).unwrap();
    let score = modules[SCORE].trainable().expect("a trainable module");
    // Still a `modules_to_save` copy (saved back as one), whose weight stays the original's.
    assert!(score.is_full_copy());
    let names: Vec<String> = score.trainable_vars().into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["bias"], "the weight stays the original's, frozen");
    let want = (x.matmul(&original.weight().t().unwrap()).unwrap())
        .broadcast_add(&file_bias)
        .unwrap();
    let got = modules[SCORE].forward(&x).unwrap();
    assert!(crate::common::max_rel_diff(&got, &want) < 1e-6);
}

// ---------------------------------------------------------------------------------------
// Combinations PEFT refuses.
// ---------------------------------------------------------------------------------------

#[test]
fn settings_peft_refuses_are_refused_by_name() {
    let mut c = Checker::new();
    let parse = |extra: serde_json::Value| {
        move || PeftConfig::from_json_str(&config_json(extra), "adapter_config.json")
    };
    let cases: Vec<(&str, serde_json::Value, &[&str])> = vec![
        (
            "lora_bias with use_dora",
            json!({"target_modules": ["q"], "lora_bias": true, "use_dora": true}),
            &["adapter_config.json", "lora_bias", "use_dora"],
        ),
        (
            "lora_bias with VERA",
            json!({"peft_type": "VERA", "target_modules": ["q"], "lora_bias": true}),
            &["adapter_config.json", "lora_bias", "VERA"],
        ),
        (
            "lora_bias with ADALORA",
            json!({"peft_type": "ADALORA", "target_modules": ["q"], "lora_bias": true}),
            &["adapter_config.json", "lora_bias", "ADALORA"],
        ),
        (
            "layers_to_transform with a regex target_modules",
            json!({"target_modules": ".*q_proj", "layers_to_transform": [0]}),
            &["adapter_config.json", "layers_to_transform", "regex"],
        ),
        (
            "layers_pattern without layers_to_transform",
            json!({"target_modules": ["q"], "layers_pattern": "layers"}),
            &[
                "adapter_config.json",
                "layers_pattern",
                "layers_to_transform",
            ],
        ),
        (
            "layers_pattern with an empty layers_to_transform",
            json!({"target_modules": ["q"], "layers_pattern": ["layers"], "layers_to_transform": []}),
            &["layers_pattern", "layers_to_transform"],
        ),
        (
            "layers_pattern that is not a regex",
            json!({"target_modules": ["q"], "layers_pattern": "lay(ers", "layers_to_transform": [0]}),
            &["layers_pattern", "lay(ers"],
        ),
        (
            "layers_to_transform of strings",
            json!({"target_modules": ["q"], "layers_to_transform": ["0"]}),
            &["layers_to_transform", "\"0\""],
        ),
        (
            "a negative layers_to_transform",
            json!({"target_modules": ["q"], "layers_to_transform": -1}),
            &["layers_to_transform", "-1"],
        ),
        (
            "bias = some",
            json!({"target_modules": ["q"], "bias": "some"}),
            &["adapter_config.json", "bias", "some", "lora_only"],
        ),
        (
            "bias = true",
            json!({"target_modules": ["q"], "bias": true}),
            &["adapter_config.json", "bias", "true"],
        ),
        (
            "modules_to_save as a string",
            json!({"target_modules": ["q"], "modules_to_save": "classifier"}),
            &[
                "adapter_config.json",
                "modules_to_save",
                "list",
                "classifier",
            ],
        ),
        (
            "modules_to_save of numbers",
            json!({"target_modules": ["q"], "modules_to_save": [1]}),
            &["modules_to_save", "strings"],
        ),
        (
            "lora_bias as a string",
            json!({"target_modules": ["q"], "lora_bias": "yes"}),
            &["lora_bias", "true or false", "yes"],
        ),
        (
            "fan_in_fan_out as a number",
            json!({"target_modules": ["q"], "fan_in_fan_out": 1}),
            &["fan_in_fan_out", "true or false"],
        ),
    ];
    for (what, extra, needles) in cases {
        c.err(
            &format!("PeftConfig::from_json_str, {what}"),
            needles,
            parse(extra),
        );
    }
    // The same through with_setting, which re-reads the config.
    let dora = PeftConfig::new(Variant::Dora, 2, 4.0, &["q"]);
    c.err(
        "with_setting, lora_bias on a DoRA config",
        &["lora_bias", "use_dora"],
        || dora.with_setting("lora_bias", json!(true)),
    );
    let lora = PeftConfig::lora(2, 4.0, &["q"]);
    c.err(
        "with_setting, use_dora on a lora_bias config",
        &["lora_bias", "use_dora"],
        || {
            lora.with_setting("lora_bias", json!(true))?
                .with_setting("use_dora", json!(true))
        },
    );
    c.err("with_setting, bias = some", &["bias", "some"], || {
        lora.with_setting("bias", json!("some"))
    });
    c.err(
        "with_setting, modules_to_save as a string",
        &["modules_to_save", "list"],
        || lora.with_setting("modules_to_save", json!("classifier")),
    );
    c.err(
        "with_setting, layers_pattern alone",
        &["layers_pattern", "layers_to_transform"],
        || lora.with_setting("layers_pattern", json!("layers")),
    );
    let regex = PeftConfig::from_json_str(&config_json(json!({"target_modules": ".*q"})), "c.json")
        .unwrap();
    c.err(
        "with_setting, layers_to_transform on a regex target",
        &["layers_to_transform", "regex"],
        || regex.with_setting("layers_to_transform", json!([0, 1])),
    );
    c.err(
        "with_setting, lora_bias on a VeRA config",
        &["lora_bias", "VERA"],
        || PeftConfig::new(Variant::Vera, 2, 4.0, &["q"]).with_setting("lora_bias", json!(true)),
    );
    c.finish();
}

/// The plans of every variant but LoRA (and LoRA+), over `adapter_map`'s VarBuilder.
fn non_lora_plans() -> Vec<(&'static str, AdapterPlan)> {
    let targets = || TargetSpec::new(ModuleSelector::list(["embed_tokens", "q_proj"]));
    let ranks = || RankAlpha::new(2, 4.0);
    let avb = || VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu());
    let shared = VeraShared::covering(2, 0, [(VOCAB, DIM), (DIM, 6)], DType::F32, &cpu())
        .expect("vera pair");
    vec![
        (
            "DoRA",
            AdapterPlan::dora(targets(), ranks(), LoraConfig::default(), avb()),
        ),
        (
            "LoRA-FA",
            AdapterPlan::lora_fa(targets(), ranks(), LoraConfig::default(), avb()),
        ),
        (
            "LoRA-drop",
            AdapterPlan::lora_drop(targets(), ranks(), LoraConfig::default(), avb()),
        ),
        (
            "Delta-LoRA",
            AdapterPlan::delta_lora(targets(), ranks(), LoraConfig::default(), avb()),
        ),
        (
            "AdaLoRA",
            AdapterPlan::adalora(targets(), ranks(), AdaLoraConfig::new(2, 4.0), avb()),
        ),
        (
            "VeRA",
            AdapterPlan::vera(targets(), VeraConfig::new(shared), avb()),
        ),
    ]
}

#[test]
fn only_lora_adapts_embeddings() {
    let mut c = Checker::new();
    let vb = || VarBuilder::from_tensors(base_tensors(), DType::F32, &cpu());
    for (name, plan) in non_lora_plans() {
        c.err(
            &format!("model::embedding with a {name} plan"),
            &[name, "embedding", EMBED],
            || embedding(VOCAB, DIM, vb().pp(EMBED), &plan),
        );
        // The same plan adapts a linear layer.
        c.ok(&format!("model::linear_b with a {name} plan"), || {
            linear_b(DIM, 6, true, vb().pp(Q), &plan)
        });
    }
    // Through PEFT configs: fresh (DoRA) and loaded (DoRA, VeRA, AdaLoRA).
    let dora = PeftConfig::new(Variant::Dora, 2, 4.0, &["embed_tokens"]);
    c.err(
        "PeftConfig::fresh_plan (DoRA) on an embedding",
        &["DoRA", "embedding", EMBED],
        || {
            let plan = dora.fresh_plan(
                VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu()),
                &LoraConfig::default(),
            )?;
            embedding(VOCAB, DIM, vb().pp(EMBED), &plan)
        },
    );
    let emb_pair = || {
        vec![
            (key(EMBED, "lora_embedding_A"), ones(&[2, VOCAB])),
            (key(EMBED, "lora_embedding_B"), ones(&[DIM, 2])),
        ]
    };
    for (name, config, tensors) in [
        (
            "DoRA",
            config_json(json!({"target_modules": ["embed_tokens"], "use_dora": true})),
            [
                emb_pair(),
                vec![(key(EMBED, "lora_magnitude_vector"), ones(&[DIM]))],
            ]
            .concat(),
        ),
        (
            "VeRA",
            config_json(json!({"peft_type": "VERA", "target_modules": ["embed_tokens"]})),
            vec![
                (key(EMBED, "vera_lambda_b"), ones(&[DIM])),
                (key(EMBED, "vera_lambda_d"), ones(&[2])),
            ],
        ),
        (
            "AdaLoRA",
            config_json(json!({"peft_type": "ADALORA", "init_r": 2,
                               "target_modules": ["embed_tokens"], "total_step": 10})),
            vec![
                (key(EMBED, "lora_A"), ones(&[2, VOCAB])),
                (key(EMBED, "lora_B"), ones(&[DIM, 2])),
                (key(EMBED, "lora_E"), ones(&[2, 1])),
            ],
        ),
    ] {
        c.err(
            &format!("a {name} adapter file on an embedding"),
            &[name, "embedding", EMBED],
            || {
                let plan = adapter(&config, &tensors)?.plan()?;
                embedding(VOCAB, DIM, vb().pp(EMBED), &plan)
            },
        );
    }
    c.finish();
}

/// The layer types of the other variants, built directly over an embedding table, must
/// refuse it (their forward takes float features, not token ids).
#[test]
fn layer_types_refuse_an_embedding_base_directly() {
    let mut c = Checker::new();
    let table = || FrozenLinear::embedding(weight(VOCAB, DIM, DType::F32)).unwrap();
    let cfg = LoraConfig::new(2, 4.0);
    c.err(
        "LoraLinear::new on an embedding",
        &["wte", "embedding"],
        || LoraLinear::new(table(), &cfg, vb("wte")),
    );
    c.err(
        "DoraLinear::new on an embedding",
        &["wte", "embedding", "DoRA"],
        || DoraLinear::new(table(), &cfg, vb("wte")),
    );
    c.err(
        "LoraFaLinear::new on an embedding",
        &["wte", "embedding", "LoRA-FA"],
        || LoraFaLinear::new(table(), &cfg, vb("wte")),
    );
    c.err(
        "AdaLoraLinear::new on an embedding",
        &["wte", "embedding", "AdaLoRA"],
        || lorakit::AdaLoraLinear::new(table(), &AdaLoraConfig::new(2, 4.0), vb("wte")),
    );
    c.finish();
}

/// Whatever the constructors accept, no layer panics on an embedding base: each forward
/// over token ids is an `Err` or an output of the right shape.
#[test]
fn layer_types_over_an_embedding_base_never_panic() {
    let mut c = Checker::new();
    let ids = Tensor::new(&[[1u32, 2, 9]], &cpu()).unwrap();
    type Make = fn() -> lorakit::Result<Box<dyn Adapter>>;
    fn table() -> FrozenLinear {
        FrozenLinear::embedding(weight(VOCAB, DIM, DType::F32)).unwrap()
    }
    let makers: Vec<(&str, Make)> = vec![
        ("LoraLinear", || {
            Ok(Box::new(LoraLinear::new(
                table(),
                &LoraConfig::new(2, 4.0),
                vb("wte"),
            )?))
        }),
        ("DoraLinear", || {
            Ok(Box::new(DoraLinear::new(
                table(),
                &LoraConfig::new(2, 4.0),
                vb("wte"),
            )?))
        }),
        ("LoraFaLinear", || {
            Ok(Box::new(LoraFaLinear::new(
                table(),
                &LoraConfig::new(2, 4.0),
                vb("wte"),
            )?))
        }),
    ];
    for (name, make) in makers {
        c.no_panic(
            &format!("{name} over an embedding: build and forward"),
            || {
                make().and_then(|l| {
                    let y = l.forward_t(&ids, false)?;
                    Ok(y.dims().to_vec())
                })
            },
        );
    }
    c.finish();
}

#[test]
fn lora_bias_is_refused_on_embeddings() {
    let mut c = Checker::new();
    let cfg = LoraConfig {
        lora_bias: true,
        ..LoraConfig::new(2, 4.0)
    };
    let table = || FrozenLinear::embedding(weight(VOCAB, DIM, DType::F32)).unwrap();
    c.err(
        "LoraEmbedding::new with lora_bias",
        &["wte", "lora_bias", "embedding"],
        || LoraEmbedding::new(table(), &cfg, vb("wte")),
    );
    c.err(
        "LoraEmbedding::new over a linear base",
        &["wte", "LoraEmbedding", "embedding", "linear"],
        || LoraEmbedding::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("wte")),
    );
    c.err(
        "LoraEmbedding::new over a Conv1D base",
        &["wte", "embedding", "Conv1D"],
        || {
            LoraEmbedding::new(
                FrozenLinear::conv1d(weight(6, 4, DType::F32), None)?,
                &LoraConfig::new(2, 4.0),
                vb("wte"),
            )
        },
    );
    let vbt = || VarBuilder::from_tensors(base_tensors(), DType::F32, &cpu());
    c.err(
        "model::embedding with a lora_bias plan",
        &[EMBED, "lora_bias", "embedding"],
        || {
            let plan = AdapterPlan::lora(
                TargetSpec::new(ModuleSelector::list(["embed_tokens"])),
                RankAlpha::new(2, 4.0),
                cfg.clone(),
                VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu()),
            );
            embedding(VOCAB, DIM, vbt().pp(EMBED), &plan)
        },
    );
    c.err(
        "PeftConfig::fresh_plan with lora_bias on an embedding",
        &[EMBED, "lora_bias", "embedding"],
        || {
            let config = PeftConfig::lora(2, 4.0, &["embed_tokens"])
                .with_setting("lora_bias", json!(true))?;
            let plan = config.fresh_plan(
                VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu()),
                &LoraConfig::default(),
            )?;
            embedding(VOCAB, DIM, vbt().pp(EMBED), &plan)
        },
    );
    c.err(
        "a lora_bias adapter file on an embedding",
        &[EMBED, "lora_bias", "embedding"],
        || {
            let config =
                config_json(json!({"target_modules": ["embed_tokens"], "lora_bias": true}));
            let tensors = vec![
                (key(EMBED, "lora_embedding_A"), ones(&[2, VOCAB])),
                (key(EMBED, "lora_embedding_B"), ones(&[DIM, 2])),
            ];
            let plan = adapter(&config, &tensors)?.plan()?;
            embedding(VOCAB, DIM, vbt().pp(EMBED), &plan)
        },
    );
    // Every other variant's layer refuses lora_bias, naming itself.
    let lb = || LoraConfig {
        lora_bias: true,
        ..LoraConfig::new(2, 4.0)
    };
    c.err(
        "DoraLinear::new with lora_bias",
        &["proj", "lora_bias", "DoRA"],
        || DoraLinear::new(base(4, 6), &lb(), vb("proj")),
    );
    c.err(
        "LoraFaLinear::new with lora_bias",
        &["proj", "lora_bias", "LoRA-FA"],
        || LoraFaLinear::new(base(4, 6), &lb(), vb("proj")),
    );
    c.err(
        "LoraDropLinear::new with lora_bias",
        &["proj", "lora_bias", "LoRA-drop"],
        || lorakit::LoraDropLinear::new(base(4, 6), &lb(), vb("proj")),
    );
    c.err(
        "DeltaLoraLinear::new with lora_bias",
        &["proj", "lora_bias", "Delta-LoRA"],
        || lorakit::DeltaLoraLinear::new(base(4, 6), &lb(), vb("proj")),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------
// Merging lora_bias into a base without a bias.
// ---------------------------------------------------------------------------------------

/// A LoRA layer with `lora_bias` and non-zero factors over `base`, named `name`.
fn lora_bias_layer(name: &str, base: FrozenLinear) -> LoraLinear {
    let cfg = LoraConfig {
        lora_bias: true,
        ..LoraConfig::new(2, 4.0)
    };
    let layer = LoraLinear::new(base, &cfg, vb(name)).unwrap();
    for v in layer.trainable_vars() {
        let t = v.var.as_tensor();
        v.var.set(&(t.ones_like().unwrap() * 0.5).unwrap()).unwrap();
    }
    layer
}

#[test]
fn merging_lora_bias_needs_a_base_bias() {
    let mut c = Checker::new();
    let mut layer = lora_bias_layer(O, base(DIM, 6));
    let w0 = layer.base().weight().to_vec2::<f32>().unwrap();
    c.err(
        "merge, lora_bias over a base without a bias",
        &[O, "lora_bias", "none"],
        || layer.merge(true),
    );
    c.check(
        "a refused merge leaves the layer unmerged",
        !layer.is_merged(),
        || "merged".into(),
    );
    c.check(
        "a refused merge leaves W as it was",
        layer.base().weight().to_vec2::<f32>().unwrap() == w0,
        || "W changed".into(),
    );
    c.check("no bias appears", layer.base().bias().is_none(), || {
        "a bias appeared".into()
    });
    c.err("unmerge of the unmerged layer", &[O, "not merged"], || {
        layer.unmerge()
    });
    // The forward still works (s · bias is added without a base bias).
    c.ok("forward without a base bias", || {
        layer.forward_t(&input(&[2, 6], DType::F32), false)
    });

    // merge_all stops at it and unmerges the layers it merged before.
    let set = AdaptedSet::new();
    let good = Shared::new(lora_bias_layer(
        Q,
        FrozenLinear::new(weight(6, 6, DType::F32), Some(ones(&[6]))).unwrap(),
    ))
    .erase();
    set.insert(Q, good.clone()).unwrap();
    set.insert(O, Shared::new(lora_bias_layer(O, base(DIM, 6))).erase())
        .unwrap();
    c.err(
        "merge_all, one layer without a base bias",
        &[O, "lora_bias"],
        || set.merge_all(true),
    );
    c.check(
        "merge_all rolls back the layers it merged",
        !good.read().is_merged(),
        || "q_proj left merged".into(),
    );

    // A lora_bias adapter merged into a checkpoint whose module has no bias.
    let config = config_json(json!({"target_modules": ["o_proj"], "lora_bias": true}));
    let tensors = vec![
        (key(O, "lora_A.weight"), ones(&[2, 6])),
        (key(O, "lora_B.weight"), ones(&[DIM, 2])),
        (key(O, "lora_B.bias"), ones(&[DIM])),
    ];
    let mut out = PathBuf::new();
    c.err(
        "merge_checkpoint, lora_bias into a module without a bias",
        &[O, "lora_bias"],
        || {
            let (res, o) = merge("lora-bias-no-base-bias", &config, &tensors);
            out = o;
            res
        },
    );
    c.check("the refused merge wrote nothing", !out.exists(), || {
        format!("{} exists", out.display())
    });
    if let Some(dir) = out.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    c.finish();
}

// ---------------------------------------------------------------------------------------
// Embedding inputs.
// ---------------------------------------------------------------------------------------

#[test]
fn embeddings_take_token_ids_only() {
    let mut c = Checker::new();
    let table = || FrozenLinear::embedding(weight(VOCAB, DIM, DType::F32)).unwrap();
    let layer = LoraEmbedding::new(table(), &LoraConfig::new(2, 4.0), vb("wte")).unwrap();
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        let x = Tensor::zeros((1, 3), dtype, &cpu()).unwrap();
        c.err(
            &format!("LoraEmbedding forward, {dtype:?} input"),
            &["wte", "token ids", &format!("{dtype:?}")],
            || layer.forward_t(&x, false),
        );
        c.err(
            &format!("LoraEmbedding Module::forward, {dtype:?} input"),
            &["wte", "token ids"],
            || Ok(layer.forward(&x)?),
        );
        c.err(
            &format!("FrozenLinear::forward_checked (embedding), {dtype:?} input"),
            &["wte", "token ids"],
            || table().forward_checked("wte", &x),
        );
    }
    // The ids' shape is free, but each id must be in the table.
    c.ok("LoraEmbedding forward, 0-d ids", || {
        layer.forward_t(&Tensor::new(3u32, &cpu())?, false)
    });
    c.ok("LoraEmbedding forward, empty ids", || {
        layer.forward_t(&Tensor::zeros((2, 0), DType::U32, &cpu())?, false)
    });
    for (what, ids) in [
        (
            "u32 id = vocab",
            Tensor::new(&[1u32, VOCAB as u32], &cpu()).unwrap(),
        ),
        ("i64 id = -1", Tensor::new(&[1i64, -1], &cpu()).unwrap()),
        ("u8 id = 200", Tensor::new(&[1u8, 200], &cpu()).unwrap()),
    ] {
        c.err(
            &format!("LoraEmbedding forward, {what}"),
            &["index"],
            || layer.forward_t(&ids, false),
        );
        c.err(
            &format!("frozen embedding forward, {what}"),
            &["index"],
            || table().forward_checked("wte", &ids),
        );
    }

    // A modules_to_save copy of an embedding checks its input the same way.
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list(["q_proj"])).modules_to_save(["embed_tokens"]),
        RankAlpha::new(2, 4.0),
        LoraConfig::default(),
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu()),
    );
    let (modules, _) = build_model(&plan).unwrap();
    let copy = modules[EMBED].trainable().expect("a trainable copy");
    let floats = Tensor::zeros((1, 3), DType::F32, &cpu()).unwrap();
    c.err(
        "modules_to_save embedding copy, float input",
        &[EMBED, "token ids", "F32"],
        || copy.forward_checked(&floats),
    );
    c.err(
        "modules_to_save embedding copy, Module::forward of floats",
        &[],
        || Ok(modules[EMBED].forward(&floats)?),
    );
    // A Conv1D takes features: the wrong width names it.
    c.err(
        "Conv1D adapted layer, wrong input width",
        &[C_ATTN, "[.., 4]"],
        || {
            let plan = AdapterPlan::lora(
                TargetSpec::new(ModuleSelector::list(["c_attn"])),
                RankAlpha::new(2, 4.0),
                LoraConfig::default(),
                VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu()),
            );
            let (modules, _) = build_model(&plan)?;
            let layer = modules[C_ATTN].adapter().expect("adapted").clone();
            let y = layer.read().forward_t(&input(&[2, 12], DType::F32), false);
            y
        },
    );
    c.err(
        "Conv1D adapted layer, token ids",
        &[C_ATTN, "input"],
        || {
            let plan = AdapterPlan::lora(
                TargetSpec::new(ModuleSelector::list(["c_attn"])),
                RankAlpha::new(2, 4.0),
                LoraConfig::default(),
                VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu()),
            );
            let (modules, _) = build_model(&plan)?;
            let layer = modules[C_ATTN].adapter().expect("adapted").clone();
            let y = layer
                .read()
                .forward_t(&Tensor::new(&[[1u32, 2, 3, 4]], &cpu())?, false);
            y
        },
    );
    c.finish();
}

/// An id equal to the id dtype's maximum (u32::MAX) is not in any table: it must be refused
/// like any other out-of-range id.
#[test]
fn the_largest_id_is_out_of_range_too() {
    let mut c = Checker::new();
    let table = || FrozenLinear::embedding(weight(VOCAB, DIM, DType::F32)).unwrap();
    let layer = LoraEmbedding::new(table(), &LoraConfig::new(2, 4.0), vb("wte")).unwrap();
    for (what, ids) in [
        ("u32::MAX", Tensor::new(&[1u32, u32::MAX], &cpu()).unwrap()),
        ("255u8", Tensor::new(&[1u8, 255], &cpu()).unwrap()),
    ] {
        c.err(
            &format!("LoraEmbedding forward, id {what}"),
            &["index"],
            || layer.forward_t(&ids, false),
        );
        c.err(
            &format!("frozen embedding forward, id {what}"),
            &["index"],
            || table().forward_checked("wte", &ids),
        );
    }
    c.finish();
}

/// An id outside the table names the layer, the id and the vocabulary size.
#[test]
fn out_of_range_ids_name_the_layer() {
    let mut c = Checker::new();
    let table = FrozenLinear::embedding(weight(VOCAB, DIM, DType::F32)).unwrap();
    let layer = LoraEmbedding::new(table, &LoraConfig::new(2, 4.0), vb("wte")).unwrap();
    c.err("LoraEmbedding forward, id = vocab", &["wte", "10"], || {
        layer.forward_t(&Tensor::new(&[1u32, 10], &cpu())?, false)
    });
    c.err("LoraEmbedding forward, id = -1", &["wte", "-1"], || {
        layer.forward_t(&Tensor::new(&[1i64, -1], &cpu())?, false)
    });
    c.finish();
}

// ---------------------------------------------------------------------------------------
// Saving: the config must describe the layers.
// ---------------------------------------------------------------------------------------

/// Builds the model with a fresh plan from `train_config` and saves it under `save_config`
/// into `dir`.
fn train_and_save(
    train_config: &PeftConfig,
    save_config: &PeftConfig,
    dir: &Path,
) -> lorakit::Result<()> {
    let plan = train_config.fresh_plan(
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu()),
        &LoraConfig::default(),
    )?;
    let (_, set) = build_model(&plan)?;
    save_adapter(dir, save_config, &set)
}

#[test]
fn saving_under_a_config_that_does_not_describe_the_layers_is_refused() {
    let mut c = Checker::new();
    let root = temp_dir("options-bad-save");
    let conv = PeftConfig::lora(2, 4.0, &["c_attn"]);
    let conv_ok = conv.with_setting("fan_in_fan_out", json!(true)).unwrap();
    let q = PeftConfig::lora(2, 4.0, &["q_proj"]);
    let q_lora_only = q.with_setting("bias", json!("lora_only")).unwrap();
    let q_all = q.with_setting("bias", json!("all")).unwrap();
    let q_lora_bias = q.with_setting("lora_bias", json!(true)).unwrap();
    let q_to_save = q.with_setting("modules_to_save", json!([SCORE])).unwrap();
    let cases: Vec<(&str, &PeftConfig, &PeftConfig, Vec<&str>)> = vec![
        (
            "a Conv1D layer without fan_in_fan_out",
            &conv_ok,
            &conv,
            vec![C_ATTN, "fan_in_fan_out", "Conv1D"],
        ),
        (
            "a trained base bias under bias = none",
            &q_lora_only,
            &q,
            vec![Q, "bias", "none"],
        ),
        (
            "a bias = all bias under bias = lora_only",
            &q_all,
            &q_lora_only,
            vec![SCORE, "bias"],
        ),
        (
            "a lora_bias layer without lora_bias",
            &q_lora_bias,
            &q,
            vec![Q, "lora_bias", "false"],
        ),
        (
            "a layer without lora_bias under lora_bias",
            &q,
            &q_lora_bias,
            vec![Q, "lora_bias", "true"],
        ),
        (
            "a modules_to_save copy without modules_to_save",
            &q_to_save,
            &q,
            vec![SCORE, "modules_to_save"],
        ),
    ];
    for (i, (what, train, save, needles)) in cases.into_iter().enumerate() {
        let dir = root.join(format!("case{i}"));
        c.err(&format!("save_adapter, {what}"), &needles, || {
            train_and_save(train, save, &dir)
        });
        c.check(
            &format!("save_adapter, {what}: nothing written"),
            !dir.exists(),
            || format!("{} exists", dir.display()),
        );
        // The config the set was trained with saves it.
        let good = root.join(format!("good{i}"));
        c.ok(
            &format!("save_adapter under its own config ({what})"),
            || train_and_save(train, train, &good),
        );
    }
    // A Conv1D built directly (not through a plan) saves under fan_in_fan_out only, too.
    c.err(
        "save_adapter, a Conv1D LoraLinear in a hand-built set",
        &[C_ATTN, "fan_in_fan_out"],
        || {
            let set = AdaptedSet::new();
            let layer = LoraLinear::new(
                FrozenLinear::conv1d(weight(DIM, 12, DType::F32), None)?,
                &LoraConfig::new(2, 4.0),
                vb(C_ATTN),
            )?;
            set.insert(C_ATTN, Shared::new(layer).erase())?;
            save_adapter(root.join("hand"), &conv, &set)
        },
    );
    let _ = std::fs::remove_dir_all(&root);
    c.finish();
}

/// `BiasMode` parses PEFT's three names only.
#[test]
fn bias_modes_parse_pefts_names_only() {
    let mut c = Checker::new();
    for bad in ["some", "None", "", "lora-only", "ALL"] {
        c.err(
            &format!("BiasMode::from_str({bad:?})"),
            &["bias", "lora_only"],
            || bad.parse::<BiasMode>(),
        );
    }
    for (good, mode) in [
        ("none", BiasMode::None),
        ("lora_only", BiasMode::LoraOnly),
        ("all", BiasMode::All),
    ] {
        let parsed = c.ok(&format!("BiasMode::from_str({good:?})"), || {
            good.parse::<BiasMode>()
        });
        c.check(
            &format!("{good} parses to {mode:?}"),
            parsed == Some(mode),
            || format!("{parsed:?}"),
        );
    }
    c.finish();
}
