//! Gemma 3's image-and-text checkpoints (`model_type` `gemma3`,
//! `Gemma3ForConditionalGeneration`) read for their text decoder: the fixture
//! `tests/fixtures/models/llama/gemma3_mm` (transformers 5.25 + PEFT 0.21.2, a LoRA on every
//! linear layer of the text decoder and of the vision tower; its logits are the text-only
//! path's), the stored and the current tensor names, adapters made on transformers 4.50's
//! names, merging into the checkpoint, and the Hub's Gemma 3 4B config.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lorakit::finetune::{AdapterRecipe, Dataset, Example, TrainConfig, Trainer};
use lorakit::models::llama::{
    LayerAttention, LlamaConfig, LlamaFamily, LlamaForCausalLM, LlamaForSequenceClassification,
    RopeScaling,
};
use lorakit::models::SequenceClassifier;
use lorakit::peft::{merge_checkpoint, PeftAdapter};
use lorakit::Variant;

use crate::finetune_train::with_recipe;
use crate::models_llama::{build, check, logits, models, no_adapter, peft_plan};
use crate::peft_common::{load, rel_err, temp_dir};

const TOL: f64 = 1e-4;

fn case() -> std::path::PathBuf {
    models("gemma3_mm")
}

/// Copies the safetensors file `from` to `to` with each key renamed by `rename`.
fn copy_renamed(from: &Path, to: &Path, rename: impl Fn(&str) -> String) {
    let renamed: HashMap<String, Tensor> = load(from)
        .into_iter()
        .map(|(k, t)| (rename(&k), t))
        .collect();
    candle_core::safetensors::save(&renamed, to).unwrap();
}

#[test]
fn the_vision_towers_adapters_are_set_aside_and_the_text_decoders_applied() {
    let dir = case();
    let adapter = PeftAdapter::load(dir.join("lora"), &Device::Cpu).unwrap();
    let paths = adapter.module_paths();
    let (vision, text): (Vec<_>, Vec<_>) = paths
        .iter()
        .partition(|p| p.starts_with("model.vision_tower."));
    assert!(!vision.is_empty() && !text.is_empty());
    let plan = adapter.plan().unwrap();
    let config = dir.join("base/config.json");
    let model = build(&config, &dir.join("base"), DType::F32, &plan);
    let layers = plan.finish().unwrap();
    let mut applied = layers.paths();
    applied.sort();
    let mut want: Vec<String> = text.into_iter().cloned().collect();
    want.sort();
    assert_eq!(applied, want);
    assert!(applied
        .iter()
        .all(|p| p.starts_with("model.language_model.layers.")));
    let mut aside = plan.set_aside_modules();
    aside.sort();
    assert_eq!(aside, vision.into_iter().cloned().collect::<Vec<_>>());
    let io = load(&dir.join("logits.safetensors"));
    check(
        &logits(&model, &io["input_ids"]),
        &io["lora_logits"],
        TOL,
        "gemma3_mm lora",
    );
}

#[test]
fn an_adapter_in_transformers_4_50_names_loads_as_peft_loads_it() {
    // PEFT 0.21 renames such an adapter's keys to transformers 5's modules on load (checked
    // by hand: the same logits as the fixture's adapter).
    let dir = case();
    let old = temp_dir("gemma3-mm-old-adapter");
    std::fs::copy(
        dir.join("lora/adapter_config.json"),
        old.join("adapter_config.json"),
    )
    .unwrap();
    copy_renamed(
        &dir.join("lora/adapter_model.safetensors"),
        &old.join("adapter_model.safetensors"),
        |k| {
            k.replace(
                "base_model.model.model.language_model.",
                "base_model.model.language_model.model.",
            )
            .replace(
                "base_model.model.model.vision_tower.",
                "base_model.model.vision_tower.vision_model.",
            )
        },
    );
    let stored = load(&old.join("adapter_model.safetensors"));
    assert!(stored
        .keys()
        .any(|k| k.starts_with("base_model.model.language_model.model.layers.")));
    let plan = peft_plan(&old);
    let config = dir.join("base/config.json");
    let model = build(&config, &dir.join("base"), DType::F32, &plan);
    plan.finish().unwrap();
    let aside = plan.set_aside_modules();
    assert_eq!(aside.len(), 9, "{aside:?}");
    assert!(aside
        .iter()
        .all(|p| p.starts_with("model.vision_tower.encoder.")
            || p.starts_with("model.vision_tower.head.")));
    let io = load(&dir.join("logits.safetensors"));
    check(
        &logits(&model, &io["input_ids"]),
        &io["lora_logits"],
        TOL,
        "gemma3_mm old-name lora",
    );
}

#[test]
fn old_names_are_renamed_alone_and_a_key_stored_twice_is_refused() {
    let dir = case();
    let text = std::fs::read_to_string(dir.join("lora/adapter_config.json")).unwrap();
    let config = lorakit::peft::PeftConfig::from_json_str(&text, "adapter_config.json").unwrap();
    // An adapter on the vision tower alone targets its own module names.
    let mut vision_config: serde_json::Value = serde_json::from_str(&text).unwrap();
    vision_config["target_modules"] = serde_json::json!(["fc1", "fc2", "out_proj"]);
    let vision_config =
        lorakit::peft::PeftConfig::from_json_str(&vision_config.to_string(), "adapter_config.json")
            .unwrap();
    let tensors = load(&dir.join("lora/adapter_model.safetensors"));
    // Only the vision tower's modules, in transformers 4.50's names: renamed, set aside.
    let vision_only = tensors
        .iter()
        .filter(|(k, _)| k.contains(".vision_tower."))
        .map(|(k, t)| {
            let old = k.replace(
                "base_model.model.model.vision_tower.",
                "base_model.model.vision_tower.vision_model.",
            );
            (old, t.clone())
        })
        .collect();
    let adapter = PeftAdapter::from_parts(
        vision_config,
        vision_only,
        "vision/adapter_model.safetensors",
    )
    .unwrap();
    assert!(adapter
        .module_paths()
        .iter()
        .all(|p| p.starts_with("model.vision_tower.")));
    let plan = adapter.plan().unwrap();
    build(
        &dir.join("base/config.json"),
        &dir.join("base"),
        DType::F32,
        &plan,
    );
    assert!(plan.finish().unwrap().is_empty());
    assert_eq!(plan.set_aside_modules().len(), 9);
    // One tensor under both names: an error naming it, not one silently dropped.
    let mut both: std::collections::BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight";
    let old = key.replace("model.model.language_model.", "model.language_model.model.");
    both.insert(old, both[key].clone());
    let err = PeftAdapter::from_parts(config, both, "both/adapter_model.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(key) && err.contains("both/adapter_model.safetensors"),
        "{err}"
    );
}

#[test]
fn a_checkpoint_in_either_names_gives_the_same_model() {
    // The fixture is stored as transformers saves it (`language_model.model.…`); the same
    // tensors under transformers 5's module names (`model.language_model.…`) load too.
    let dir = case();
    let stored = load(&dir.join("base/model.safetensors"));
    assert!(stored.contains_key("language_model.model.embed_tokens.weight"));
    let current = temp_dir("gemma3-mm-current-names");
    copy_renamed(
        &dir.join("base/model.safetensors"),
        &current.join("model.safetensors"),
        |k| k.replace("language_model.model.", "model.language_model."),
    );
    let config = dir.join("base/config.json");
    let io = load(&dir.join("logits.safetensors"));
    let model = build(
        &config,
        &current.join("model.safetensors"),
        DType::F32,
        &no_adapter(),
    );
    check(
        &logits(&model, &io["input_ids"]),
        &io["logits"],
        TOL,
        "gemma3_mm current names",
    );
    // The stored names under a prefix, read through a VarBuilder at that prefix.
    let wrapped = current.join("wrapped.safetensors");
    copy_renamed(&dir.join("base/model.safetensors"), &wrapped, |k| {
        format!("outer.{k}")
    });
    let config = LlamaConfig::from_file(&config).unwrap();
    let vb = lorakit::checkpoint::Checkpoint::open(&wrapped)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu)
        .pp("outer");
    let model = LlamaForCausalLM::load(&config, vb, &no_adapter()).unwrap();
    check(
        &logits(&model, &io["input_ids"]),
        &io["logits"],
        TOL,
        "gemma3_mm stored names under a prefix",
    );
}

#[test]
fn merging_into_the_checkpoint_keeps_its_names_and_folds_in_every_module() {
    let dir = case();
    let tmp = temp_dir("gemma3-mm-merged");
    let out = tmp.join("merged");
    let report = merge_checkpoint(
        &dir.join("base"),
        &dir.join("lora"),
        &out,
        Default::default(),
    )
    .unwrap();
    let adapter = PeftAdapter::load(dir.join("lora"), &Device::Cpu).unwrap();
    assert_eq!(report.merged.len(), adapter.module_paths().len());
    let base = load(&dir.join("base/model.safetensors"));
    let merged = load(&out.join("model.safetensors"));
    let mut names: Vec<&String> = merged.keys().collect();
    let mut want: Vec<&String> = base.keys().collect();
    names.sort();
    want.sort();
    assert_eq!(names, want, "the merged checkpoint keeps the stored names");

    // The text path: the merged model gives PEFT's adapted logits.
    let io = load(&dir.join("logits.safetensors"));
    let config = dir.join("base/config.json");
    let model = build(&config, &out, DType::F32, &no_adapter());
    check(
        &logits(&model, &io["input_ids"]),
        &io["lora_logits"],
        TOL,
        "gemma3_mm merged",
    );
    // A vision tower module (no text reaches it): W + (α / r) B A.
    let module = "vision_tower.encoder.layers.0.mlp.fc1";
    let key = |part: &str| format!("base_model.model.model.{module}.{part}.weight");
    let a = adapter.tensor(&key("lora_A")).unwrap();
    let b = adapter.tensor(&key("lora_B")).unwrap();
    let scale = 8.0 / 4.0;
    let want =
        (&base[&format!("{module}.weight")] + (b.matmul(a).unwrap() * scale).unwrap()).unwrap();
    let got = &merged[&format!("{module}.weight")];
    assert!(rel_err(got, &want) < 1e-6, "{module}");
    assert!(rel_err(got, &base[&format!("{module}.weight")]) > 1e-3);
}

#[test]
fn merging_into_the_hubs_names_finds_the_vision_towers_weights() {
    // The Hub's Gemma 3 checkpoints keep SigLIP's `vision_model` level
    // (`vision_tower.vision_model.encoder.…`), which transformers 5 drops from its modules.
    let dir = case();
    let tmp = temp_dir("gemma3-mm-hub-names");
    let base = tmp.join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy(dir.join("base/config.json"), base.join("config.json")).unwrap();
    copy_renamed(
        &dir.join("base/model.safetensors"),
        &base.join("model.safetensors"),
        |k| k.replacen("vision_tower.", "vision_tower.vision_model.", 1),
    );
    let out = tmp.join("merged");
    let report = merge_checkpoint(&base, &dir.join("lora"), &out, Default::default()).unwrap();
    let before = load(&base.join("model.safetensors"));
    let merged = load(&out.join("model.safetensors"));
    let fc1 = "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight";
    assert!(report.merged.len() == 23 && merged.contains_key(fc1));
    assert!(
        rel_err(&merged[fc1], &before[fc1]) > 1e-3,
        "{fc1} not merged"
    );
    assert_eq!(merged.len(), before.len());
}

/// Gemma 3 4B's `config.json` as the Hub has it (transformers 4.50's form: a sparse
/// `text_config`).
const GEMMA3_4B: &str = r#"{"architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999, "eoi_token_index": 256000, "eos_token_id": [1, 106],
    "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
        "model_type": "gemma3_text", "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
        "model_type": "siglip_vision_model", "num_attention_heads": 16,
        "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": false}}"#;

#[test]
fn gemma3_4b_config_reads_as_transformers_reads_it() {
    // What transformers 5.25's Gemma3Config makes of it: the Gemma3TextConfig defaults for
    // what the text_config leaves out (vocab 262208, 8 heads, 4 KV heads, head_dim 256,
    // query_pre_attn_scalar 256, 131072 positions), full attention on layers 5, 11, 17, 23,
    // 29, linear ×8 at θ 1e6 there and θ 1e4 on the sliding layers, tied.
    let c = LlamaConfig::from_json(GEMMA3_4B).unwrap();
    assert!(c.multimodal && c.family == LlamaFamily::Gemma3);
    assert_eq!(c.decoder_prefix(), "model.language_model");
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (262_208, 2560, 10240, 34)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (8, 4, 256)
    );
    assert_eq!(c.max_position_embeddings, 131_072);
    assert_eq!(c.multipliers.attention_scale(c.head_dim), 1.0 / 16.0);
    let full: Vec<usize> = (0..34)
        .filter(|&i| c.layer_attention[i] == LayerAttention::Full)
        .collect();
    assert_eq!(full, [5, 11, 17, 23, 29]);
    assert!(c.layer_attention.iter().all(|k| matches!(
        k,
        LayerAttention::Full | LayerAttention::Sliding { window: 1024 }
    )));
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
    assert_eq!((c.rope_theta, c.sliding_rope_theta), (1e6, Some(1e4)));
    assert!(c.tie_word_embeddings);

    // The top-level tie_word_embeddings is the one Gemma3ForConditionalGeneration reads.
    let untied = GEMMA3_4B.replace(
        r#""model_type": "gemma3","#,
        r#""model_type": "gemma3", "tie_word_embeddings": false,"#,
    );
    assert!(!LlamaConfig::from_json(&untied).unwrap().tie_word_embeddings);
}

#[test]
fn bad_gemma3_configs_are_errors_naming_the_key() {
    let err = |text: &str| LlamaConfig::from_json(text).unwrap_err().to_string();
    let cases: [(String, &[&str]); 4] = [
        (
            r#"{"model_type": "gemma3", "vision_config": {}}"#.to_string(),
            &["text_config", "missing"],
        ),
        (
            GEMMA3_4B.replace(r#""model_type": "gemma3_text""#, r#""model_type": "llama""#),
            &["text_config", "llama", "gemma3_text"],
        ),
        (
            GEMMA3_4B.replace(r#""hidden_size": 2560"#, r#""hidden_size": "wide""#),
            &["text_config.hidden_size", "invalid type"],
        ),
        (
            GEMMA3_4B.replace(
                r#""model_type": "gemma3","#,
                r#""model_type": "gemma3", "quantization_config": {"quant_method": "bitsandbytes"},"#,
            ),
            &["quantization_config", "bitsandbytes"],
        ),
    ];
    for (text, needles) in cases {
        let e = err(&text);
        for n in needles {
            assert!(e.contains(n), "`{e}` does not mention `{n}`");
        }
    }
    // A value out of its domain names the text_config.
    let e = err(&GEMMA3_4B.replace(
        r#""sliding_window": 1024"#,
        r#""sliding_window": 1024, "query_pre_attn_scalar": 0"#,
    ));
    assert!(
        e.contains("(text_config)") && e.contains("query_pre_attn_scalar"),
        "{e}"
    );
}

#[test]
fn a_trained_adapter_excludes_the_vision_tower_and_reloads() {
    // PEFT applies target_modules to the whole model: without `exclude_modules` an
    // all-linear adapter trained on the text decoder would get (untrained) layers on the
    // vision tower in PEFT and a missing-keys warning. Checked by hand with PEFT 0.21.2: it
    // loads the saved adapter onto Gemma3ForConditionalGeneration without one, and its
    // logits equal lorakit's.
    let dev = Device::Cpu;
    let dir = case().join("base");
    let config = LlamaConfig::from_file(&dir).unwrap();
    let recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["all-linear"]);
    let (model, set) = with_recipe(&dir, &config, &recipe);
    let mut settings = TrainConfig::new(2);
    settings.lr = 1e-2;
    settings.batch.seq_len = 8;
    let examples = (0..4u32)
        .map(|i| {
            Example::new(
                (0..8).map(|k| (i * 7 + k * 3) % 64).collect(),
                vec![true; 8],
            )
        })
        .collect::<lorakit::Result<Vec<_>>>()
        .unwrap();
    let mut trainer = Trainer::new(&model, set, recipe, settings).unwrap();
    trainer
        .train(&Dataset::from_examples(examples), None, |_| {})
        .unwrap();
    let out = temp_dir("gemma3-mm-trained");
    trainer.save_adapter(&*out).unwrap();

    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["target_modules"], "all-linear");
    let exclude = saved["exclude_modules"].as_str().unwrap();
    let loaded = PeftAdapter::load(&*out, &dev).unwrap();
    let targets = &loaded.config().targets;
    for (path, adapted) in [
        ("model.language_model.layers.0.self_attn.q_proj", true),
        (
            "model.vision_tower.encoder.layers.0.self_attn.q_proj",
            false,
        ),
        ("model.vision_tower.head.mlp.fc1", false),
        ("model.multi_modal_projector.linear", false),
    ] {
        assert_eq!(targets.is_target(path), adapted, "{path} under {exclude}");
    }
    let plan = peft_plan(&out);
    let reloaded = LlamaForCausalLM::from_pretrained(&dir, DType::F32, &dev, &plan).unwrap();
    assert_eq!(plan.finish().unwrap().paths().len(), 14);
    let ids = Tensor::new(&[[3u32, 9, 27, 17, 51]], &dev).unwrap();
    assert!(rel_err(&logits(&reloaded, &ids), &logits(&model, &ids)) < 1e-6);
}

#[test]
fn gemma3_sequence_classifier_gives_transformers_and_peft_logits() {
    // Gemma3ForSequenceClassification (pad id in text_config) on a batch with a
    // left-padded row, and its PEFT SEQ_CLS LoRA (q_proj / v_proj of both towers, `score`
    // in modules_to_save): the vision tower's modules set aside.
    let (model, plan) = check_classifier_fixture(&case(), "gemma3_mm classifier");
    assert_eq!(model.pad_token_id(), Some(0));
    // What a classifier trained on it saves as exclude_modules.
    assert_eq!(
        model.modules_not_built(),
        ["model.vision_tower", "model.multi_modal_projector"]
    );
    let aside = plan.set_aside_modules();
    assert!(
        aside.len() == 2 && aside.iter().all(|p| p.starts_with("model.vision_tower.")),
        "{aside:?}"
    );
}

/// Checks the classifier fixture of the case folder `dir` (`cls`, `cls_lora`,
/// `cls_logits.safetensors`: transformers' logits on a batch with a left-padded row, and
/// PEFT's with its SEQ_CLS LoRA) and returns the plain classifier and the LoRA's finished
/// plan for more checks.
pub(crate) fn check_classifier_fixture(
    dir: &std::path::Path,
    what: &str,
) -> (LlamaForSequenceClassification, lorakit::model::AdapterPlan) {
    let io = load(&dir.join("cls_logits.safetensors"));
    let (ids, mask) = (&io["input_ids"], &io["attention_mask"]);
    let classifier = |plan: &lorakit::model::AdapterPlan| {
        LlamaForSequenceClassification::from_pretrained(
            dir.join("cls"),
            DType::F32,
            &Device::Cpu,
            plan,
        )
        .unwrap()
    };
    let model = classifier(&no_adapter());
    check(
        &model.forward(ids, Some(mask)).unwrap(),
        &io["logits"],
        TOL,
        what,
    );
    let plan = peft_plan(&dir.join("cls_lora"));
    let adapted = classifier(&plan);
    plan.finish().unwrap();
    let got = adapted.forward(ids, Some(mask)).unwrap();
    check(&got, &io["lora_logits"], TOL, &format!("{what} lora"));
    (model, plan)
}
