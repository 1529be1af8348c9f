//! `lorakit::model::NamedAdapters`: several adapters on one model, one active (PEFT's
//! `load_adapter` / `set_adapter` / `disable_adapter` / `delete_adapter`).
//!
//! Reference: `tests/fixtures/models/llama/qwen2/logits.safetensors`'s `multi_*` logits,
//! made by PEFT on one PeftModel holding the LoRA (as "default") and the DoRA (loaded with
//! `load_adapter` as "dora"), switched with `set_adapter`, `disable_adapter()` and
//! `delete_adapter("default")` (`scripts/make_model_fixtures.py`). GPT-2 and BERT: each
//! adapter on the shared model gives PEFT's logits for that adapter alone (bert_cls/dora)
//! or lorakit's single-adapter model (checked against PEFT in models_gpt2.rs).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lorakit::checkpoint::Checkpoint;
use lorakit::model::{AdapterPlan, NamedAdapters};
use lorakit::models::bert::{BertConfig, BertForSequenceClassification};
use lorakit::models::generation::GenerationConfig;
use lorakit::models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
use lorakit::models::llama::{LlamaConfig, LlamaForCausalLM};
use lorakit::models::AutoCausalLm;
use lorakit::peft::PeftAdapter;
use lorakit::Variant;

use crate::peft_common::{assert_close, fixture, load, rel_err};
use crate::peft_options::case_dir;

const TOL: f64 = 1e-4;

fn qwen2() -> PathBuf {
    fixture("models/llama/qwen2")
}

fn llama(dir: &Path, plan: &AdapterPlan) -> LlamaForCausalLM {
    let config = LlamaConfig::from_file(dir.join("base/config.json")).unwrap();
    let vb = Checkpoint::open(dir.join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    LlamaForCausalLM::load(&config, vb, plan).unwrap()
}

fn err_text<T: std::fmt::Debug>(r: lorakit::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn switching_adapters_gives_pefts_logits_for_each() {
    let dir = qwen2();
    let io = load(&dir.join("logits.safetensors"));
    let ids = &io["input_ids"];
    let adapters = NamedAdapters::new();
    let plan = adapters.plan();
    let model = llama(&dir, &plan);
    assert!(plan.finish().unwrap().is_empty());
    // Every linear and the (tied) head are slots; no adapter yet: the base model.
    assert_eq!(adapters.paths().len(), 2 * 7 + 2);
    assert_eq!(adapters.active(), None);
    assert_close(
        &model.forward(ids).unwrap(),
        &io["logits"],
        TOL,
        "no adapter",
    );

    let lora = adapters
        .load_peft("default", dir.join("lora"), &Device::Cpu)
        .unwrap();
    let dora = adapters
        .load_peft("dora", dir.join("dora"), &Device::Cpu)
        .unwrap();
    assert_eq!(adapters.names(), ["default", "dora"]);
    assert_eq!(adapters.active().as_deref(), Some("default"));
    // Each adapter keeps its own variant and targets.
    assert_eq!(lora.len(), 2 * 5);
    assert_eq!(dora.len(), 2 * 4);
    assert!(lora
        .layers()
        .iter()
        .all(|(_, l)| l.read().kind() == Variant::Lora));
    assert!(dora
        .layers()
        .iter()
        .all(|(_, l)| l.read().kind() == Variant::Dora));
    // The frozen base is shared: the two adapters' q_proj layers hold one weight tensor.
    let q = "model.layers.0.self_attn.q_proj";
    let (wa, wb) = (
        lora.get(q).unwrap().read().base().weight().clone(),
        dora.get(q).unwrap().read().base().weight().clone(),
    );
    assert_eq!(wa.id(), wb.id(), "the base weight was copied");

    let default = model.forward(ids).unwrap();
    assert_close(
        &default,
        &io["multi_default_logits"],
        TOL,
        "active: default (LoRA)",
    );
    adapters.set_active("dora").unwrap();
    let with_dora = model.forward(ids).unwrap();
    assert_close(&with_dora, &io["multi_dora_logits"], TOL, "active: dora");
    assert!(rel_err(&with_dora, &default) > 1e-2);
    adapters.set_enabled(false);
    assert_close(
        &model.forward(ids).unwrap(),
        &io["multi_disabled_logits"],
        TOL,
        "disable_adapter()",
    );
    adapters.set_enabled(true);

    // Merged, then switched: unmerged first (as PEFT), so the other adapter is exact.
    adapters.merge(true).unwrap();
    assert!(adapters.is_merged());
    assert_close(
        &model.forward(ids).unwrap(),
        &io["multi_dora_logits"],
        TOL,
        "dora merged",
    );
    let err = err_text(adapters.delete("dora"));
    assert!(err.contains("`dora`") && err.contains("merged"), "{err}");
    adapters.set_active("default").unwrap();
    assert!(!adapters.is_merged());
    assert_close(
        &model.forward(ids).unwrap(),
        &io["multi_default_logits"],
        TOL,
        "default again",
    );

    // Deleting the active adapter activates the first remaining one.
    adapters.delete("default").unwrap();
    assert_eq!(adapters.names(), ["dora"]);
    assert_eq!(adapters.active().as_deref(), Some("dora"));
    assert_close(
        &model.forward(ids).unwrap(),
        &io["multi_after_delete_logits"],
        TOL,
        "after delete_adapter(\"default\")",
    );
    // The last one gone: the base model.
    adapters.delete("dora").unwrap();
    assert_eq!(adapters.active(), None);
    assert_close(
        &model.forward(ids).unwrap(),
        &io["logits"],
        TOL,
        "all deleted",
    );
}

#[test]
fn bad_names_and_bad_adapters_are_errors_naming_them() {
    let dir = qwen2();
    let adapters = NamedAdapters::new();
    // Before a model is built there is nothing to load onto.
    let err = err_text(adapters.load_peft("a", dir.join("lora"), &Device::Cpu));
    assert!(
        err.contains("`a`") && err.contains("NamedAdapters::plan"),
        "{err}"
    );
    let _model = llama(&dir, &adapters.plan());
    adapters
        .load_peft("a", dir.join("lora"), &Device::Cpu)
        .unwrap();
    let err = err_text(adapters.load_peft("a", dir.join("dora"), &Device::Cpu));
    assert!(err.contains("`a`") && err.contains("already"), "{err}");
    let err = err_text(adapters.set_active("nope"));
    assert!(err.contains("`nope`") && err.contains("`a`"), "{err}");
    assert!(err_text(adapters.delete("nope")).contains("`nope`"));
    assert!(err_text(adapters.load_peft("", dir.join("dora"), &Device::Cpu)).contains("empty"));
    // A missing folder, an adapter made for another model: errors naming the adapter
    // (and the module), and nothing is added.
    let err = err_text(adapters.load_peft("gone", dir.join("no_such"), &Device::Cpu));
    assert!(err.contains("`gone`") && err.contains("no_such"), "{err}");
    let other = fixture("models/llama/qwen3/adalora");
    let err = err_text(adapters.load_peft("qwen3", other, &Device::Cpu));
    assert!(err.contains("`qwen3`") && err.contains("proj"), "{err}");
    assert_eq!(adapters.names(), ["a"]);
    assert_eq!(adapters.active().as_deref(), Some("a"));
}

fn gpt2(case: &str, plan: &AdapterPlan) -> Gpt2LmHeadModel {
    let dir = case_dir(case);
    let config = Gpt2Config::from_file(dir.join("base/config.json")).unwrap();
    let vb = Checkpoint::open(dir.join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    Gpt2LmHeadModel::load(&config, vb, plan).unwrap()
}

fn peft_plan(dir: &Path) -> AdapterPlan {
    PeftAdapter::load(dir, &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap()
}

#[test]
fn gpt2_holds_a_dora_and_a_lora_on_conv1d_and_the_tied_embedding() {
    // gpt2_dora's base with its DoRA (PEFT's logits) and gpt2_lora's LoRA (same shapes;
    // Conv1D and the tied wte): each active adapter gives what the single-adapter model
    // gives, merged and unmerged.
    let io = load(&case_dir("gpt2_dora").join("io.safetensors"));
    let ids = &io["input_ids"];
    let adapters = NamedAdapters::new();
    let model = gpt2("gpt2_dora", &adapters.plan());
    adapters
        .load_peft("dora", case_dir("gpt2_dora").join("adapter"), &Device::Cpu)
        .unwrap();
    adapters
        .load_peft("lora", case_dir("gpt2_lora").join("adapter"), &Device::Cpu)
        .unwrap();
    assert_close(
        &model.forward(ids).unwrap(),
        &io["logits"],
        TOL,
        "gpt2 dora (PEFT)",
    );

    let plan = peft_plan(&case_dir("gpt2_lora").join("adapter"));
    let single = gpt2("gpt2_dora", &plan);
    let single_set = plan.finish().unwrap();
    let want = single.forward(ids).unwrap();
    adapters.set_active("lora").unwrap();
    assert_close(&model.forward(ids).unwrap(), &want, 1e-5, "gpt2 lora");
    // Merged: the tied head follows the merged wte, as in the single-adapter model.
    adapters.merge(true).unwrap();
    single_set.merge_all(true).unwrap();
    let merged = single.forward(ids).unwrap();
    assert!(rel_err(&merged, &want) > 1e-2);
    assert_close(
        &model.forward(ids).unwrap(),
        &merged,
        1e-5,
        "gpt2 lora merged",
    );
    adapters.set_active("dora").unwrap();
    assert_close(
        &model.forward(ids).unwrap(),
        &io["logits"],
        TOL,
        "gpt2 dora again",
    );
}

#[test]
fn bert_switches_adapters_and_their_classifier_copies() {
    let dir = case_dir("bert_cls");
    let io = load(&dir.join("io.safetensors"));
    let ids = &io["input_ids"];
    let config = BertConfig::from_file(dir.join("base/config.json")).unwrap();
    let vb = Checkpoint::open(dir.join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let adapters = NamedAdapters::new();
    let model = BertForSequenceClassification::load(&config, vb, &adapters.plan()).unwrap();
    let base = model.forward(ids, None, None).unwrap();
    let dora = adapters
        .load_peft("dora", dir.join("dora"), &Device::Cpu)
        .unwrap();
    // DoRA layers and the adapter's own classifier copy (modules_to_save).
    assert_eq!(dora.len(), 2 * 5 + 1);
    assert_eq!(dora.trainable_bases().len(), 1);
    assert_close(
        &model.forward(ids, None, None).unwrap(),
        &io["dora_logits"],
        TOL,
        "bert dora",
    );
    // A second adapter with its own classifier copy, fresh (B = 0, the copy equal to the
    // original): the base model's logits while it is active.
    let fresh = AdapterPlan::lora(
        lorakit::model::TargetSpec::new(lorakit::model::ModuleSelector::list(["query"]))
            .modules_to_save(["classifier"]),
        lorakit::model::RankAlpha::new(2, 4.0),
        lorakit::LoraConfig::default(),
        candle_nn::VarBuilder::from_varmap(&candle_nn::VarMap::new(), DType::F32, &Device::Cpu),
    );
    adapters.add("fresh", &fresh).unwrap();
    adapters.set_active("fresh").unwrap();
    assert_close(
        &model.forward(ids, None, None).unwrap(),
        &base,
        1e-6,
        "fresh = base",
    );
    adapters.set_active("dora").unwrap();
    assert_close(
        &model.forward(ids, None, None).unwrap(),
        &io["dora_logits"],
        TOL,
        "dora again",
    );
    // bert_cls's LoRA trains LayerNorm biases (bias = "all"), which the model reads once
    // when built: refused by name, nothing added.
    let err = err_text(adapters.load_peft("lora", dir.join("adapter"), &Device::Cpu));
    assert!(
        err.contains("`lora`") && err.contains("LayerNorm.bias"),
        "{err}"
    );
    assert_eq!(adapters.names(), ["dora", "fresh"]);
}

#[test]
fn greedy_generation_follows_the_active_adapter() {
    // transformers' greedy tokens for qwen2 with its LoRA and with its DoRA
    // (tests/fixtures/generate/expected.json), from one model holding both.
    let all = crate::generate::expected();
    let case = |adapter: &str| crate::generate::long_prompt_case(&all, "qwen2", adapter);
    let dir = qwen2();
    let adapters = NamedAdapters::new();
    let model =
        AutoCausalLm::from_pretrained(dir.join("base"), DType::F32, &Device::Cpu, &adapters.plan())
            .unwrap();
    adapters
        .load_peft("lora", dir.join("lora"), &Device::Cpu)
        .unwrap();
    adapters
        .load_peft("dora", dir.join("dora"), &Device::Cpu)
        .unwrap();
    let greedy = GenerationConfig::greedy(12);
    for name in ["lora", "dora", "lora"] {
        adapters.set_active(name).unwrap();
        let c = case(name);
        let prompt = crate::generate::ids(&c["prompt"]);
        let got = model.generate(&prompt, &greedy).unwrap();
        assert_eq!(got, crate::generate::ids(&c["lora_tokens"]), "{name}");
    }
    adapters.set_enabled(false);
    let c = case("dora");
    let prompt = crate::generate::ids(&c["prompt"]);
    assert_eq!(
        model.generate(&prompt, &greedy).unwrap(),
        crate::generate::ids(&c["base_tokens"])
    );
}
