//! Generation (`lorakit::models::{generation, sampling, auto}`): greedy tokens equal
//! transformers' `generate` with PEFT adapters, unmerged and merged, on the committed tiny
//! models (`tests/fixtures/generate/expected.json`, `scripts/make_generate_fixtures.py`);
//! `AutoCausalLm` picks the model by `model_type`. GPT-2's KV cache (`gpt2_cache`) and the
//! sampler (`sampling`) are in their own files.

mod batch;
mod gpt2_cache;
mod sampling;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lorakit::model::AdapterPlan;
use lorakit::models::generation::{stop_tokens, GenerationConfig};
use lorakit::models::sampling::Sampling;
use lorakit::models::{AutoCausalLm, CausalLm};
use lorakit::peft::PeftAdapter;
use serde_json::Value;

use crate::peft_common::{fixture, temp_dir};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// `tests/fixtures/generate/expected.json`.
pub(crate) fn expected() -> Value {
    let path = fixture("generate/expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The case of `model` with the adapter folder `adapter` on the 8-token prompt.
pub(crate) fn long_prompt_case(all: &Value, model: &str, adapter: &str) -> Value {
    all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["model"] == model
                && c["adapter"] == adapter
                && c["prompt"].as_array().unwrap().len() == 8
        })
        .unwrap()
        .clone()
}

pub(crate) fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// The case's base folder and adapter folder.
fn folders(case: &Value) -> (PathBuf, PathBuf) {
    let dir = root().join(case["dir"].as_str().unwrap());
    (
        dir.join(case["base"].as_str().unwrap()),
        dir.join(case["adapter"].as_str().unwrap()),
    )
}

fn with_adapter(base: &Path, adapter: &Path) -> (AutoCausalLm, lorakit::model::AdaptedSet) {
    let plan = PeftAdapter::load(adapter, &Device::Cpu)
        .unwrap()
        .plan()
        .unwrap();
    let model = AutoCausalLm::from_pretrained(base, DType::F32, &Device::Cpu, &plan).unwrap();
    (model, plan.finish().unwrap())
}

#[test]
fn greedy_tokens_equal_transformers_unmerged_and_merged() {
    let all = expected();
    let max_new = usize::try_from(all["max_new_tokens"].as_u64().unwrap()).unwrap();
    let cases = all["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 18);
    let greedy = GenerationConfig::greedy(max_new);
    for case in cases {
        let name = format!(
            "{} {} {:?}",
            case["model"],
            case["adapter"],
            ids(&case["prompt"])
        );
        let prompt = ids(&case["prompt"]);
        let (base_dir, adapter_dir) = folders(case);

        let base = AutoCausalLm::from_pretrained(
            &base_dir,
            DType::F32,
            &Device::Cpu,
            &AdapterPlan::none(),
        )
        .unwrap();
        assert_eq!(base.model_type_name(), case["model_type"].as_str().unwrap());
        let got = base.generate(&prompt, &greedy).unwrap();
        assert_eq!(got, ids(&case["base_tokens"]), "{name}: base model");

        let (model, adapted) = with_adapter(&base_dir, &adapter_dir);
        let lora = model.generate(&prompt, &greedy).unwrap();
        assert_eq!(lora, ids(&case["lora_tokens"]), "{name}: unmerged adapter");
        let stop = greedy.clone().with_eos(ids(&case["stop"]));
        let got = model.generate(&prompt, &stop).unwrap();
        assert_eq!(got, ids(&case["lora_stop_tokens"]), "{name}: stop tokens");

        adapted.merge_all(true).unwrap();
        let merged = model.generate(&prompt, &greedy).unwrap();
        // PEFT merges a LoRA on linear_rope's tied lm_head into the table its embedding
        // shares (another model); lorakit's Llama head holds a table of its own, so its
        // merged model is the unmerged one. GPT-2's tied head follows a merged wte as
        // PEFT's does (gpt2_lora's merged tokens differ from its unmerged ones).
        let want = if case["model"] == "linear_rope" {
            assert!(case["merged_differs"].as_bool().unwrap());
            ids(&case["lora_tokens"])
        } else {
            ids(&case["merged_tokens"])
        };
        assert_eq!(merged, want, "{name}: merged adapter");
        adapted.unmerge_all().unwrap();
        assert_eq!(
            model.generate(&prompt, &greedy).unwrap(),
            lora,
            "{name}: unmerged again"
        );
        println!(
            "{name}: {} tokens as transformers (min top-2 logit gap {:.3})",
            lora.len(),
            case["min_margin"].as_f64().unwrap()
        );
    }
}

#[test]
fn generate_greedy_is_generate_with_a_greedy_config() {
    let case = &expected()["cases"][2]; // qwen2, first prompt
    let (base, adapter) = folders(case);
    let (model, _) = with_adapter(&base, &adapter);
    let AutoCausalLm::Llama(llama) = &model else {
        panic!("qwen2 is a Llama-family model")
    };
    let prompt = ids(&case["prompt"]);
    let want = ids(&case["lora_tokens"]);
    assert_eq!(llama.generate_greedy(&prompt, 12, None).unwrap(), want);
    let eos = want[3];
    let first = want.iter().position(|&t| t == eos).unwrap();
    assert_eq!(
        llama.generate_greedy(&prompt, 12, Some(eos)).unwrap(),
        want[..=first]
    );
}

#[test]
fn sampling_with_top_k_1_or_a_tiny_top_p_is_greedy_and_seeds_reproduce() {
    let cases = expected();
    for case in [&cases["cases"][0], &cases["cases"][10]] {
        // mistral, gpt2_lora
        let (base, adapter) = folders(case);
        let (model, _) = with_adapter(&base, &adapter);
        let prompt = ids(&case["prompt"]);
        let want = ids(&case["lora_tokens"]);
        let config = |sampling: Sampling| GenerationConfig::greedy(12).with_sampling(sampling);
        for seed in [0, 1, 99] {
            let hot = Sampling::with_temperature(3.0, seed);
            let top1 = Sampling {
                top_k: Some(1),
                ..hot.clone()
            };
            let tiny_p = Sampling {
                top_p: Some(1e-9),
                ..hot.clone()
            };
            assert_eq!(model.generate(&prompt, &config(top1)).unwrap(), want);
            assert_eq!(model.generate(&prompt, &config(tiny_p)).unwrap(), want);
            let a = model.generate(&prompt, &config(hot.clone())).unwrap();
            assert_eq!(
                a,
                model.generate(&prompt, &config(hot)).unwrap(),
                "seed {seed}"
            );
            assert_eq!(a.len(), 12);
        }
        // At temperature 3 different seeds give different tokens.
        let draws: Vec<Vec<u32>> = (0..4)
            .map(|s| {
                model
                    .generate(&prompt, &config(Sampling::with_temperature(3.0, s)))
                    .unwrap()
            })
            .collect();
        assert!(draws.iter().any(|d| d != &draws[0]), "{draws:?}");
        assert!(draws.iter().any(|d| d != &want), "{draws:?}");
    }
}

#[test]
fn generation_errors_name_the_problem_before_any_work() {
    let case = &expected()["cases"][0]; // mistral: vocab 64, 64 positions
    let (base, _) = folders(case);
    let model =
        AutoCausalLm::from_pretrained(&base, DType::F32, &Device::Cpu, &AdapterPlan::none())
            .unwrap();
    let err = |prompt: &[u32], config: GenerationConfig| {
        model.generate(prompt, &config).unwrap_err().to_string()
    };
    assert!(err(&[], GenerationConfig::greedy(2)).contains("prompt is empty"));
    let e = err(&[1, 64], GenerationConfig::greedy(2));
    assert!(
        e.contains("token id 64") && e.contains("vocab_size 64"),
        "{e}"
    );
    let e = err(&[1; 60], GenerationConfig::greedy(6));
    assert!(
        e.contains("65 positions") && e.contains("max_position_embeddings 64"),
        "{e}"
    );
    assert_eq!(
        model
            .generate(&[1; 60], &GenerationConfig::greedy(5))
            .unwrap()
            .len(),
        5
    );
    let bad = GenerationConfig::greedy(2).with_sampling(Sampling::with_temperature(-0.5, 0));
    assert!(err(&[1], bad).contains("temperature"));
    assert!(model
        .generate(&[1], &GenerationConfig::greedy(0))
        .unwrap()
        .is_empty());
}

#[test]
fn auto_causal_lm_chooses_by_model_type_and_names_unsupported_ones() {
    let dev = Device::Cpu;
    let none = AdapterPlan::none();
    for (dir, kind) in [
        ("models/llama/mistral/base", "mistral"),
        ("models/llama/qwen2/base", "qwen2"),
        ("models/llama/qwen3/base", "qwen3"),
        ("models/llama/llama3_rope/base", "llama"),
        ("models/llama/gemma3_mm/base", "gemma3"),
        ("peft_options/gpt2_dora/base", "gpt2"),
    ] {
        let model = AutoCausalLm::from_pretrained(fixture(dir), DType::F32, &dev, &none).unwrap();
        assert_eq!(model.model_type_name(), kind);
        assert_eq!(model.vocab_size(), 64);
        assert_eq!(matches!(model, AutoCausalLm::Gpt2(_)), kind == "gpt2");
    }
    let tmp = temp_dir("auto-model-type");
    std::fs::write(tmp.join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    let e = AutoCausalLm::from_pretrained(&tmp, DType::F32, &dev, &none)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`bert`"), "{e}");
    assert!(
        e.contains("llama, mistral, qwen2, qwen3, granite, smollm3, phi3, gemma, gemma2, gemma3_text, gemma3, olmo2, olmo3, mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, gpt2"),
        "{e}"
    );
    std::fs::write(tmp.join("config.json"), r#"{"vocab_size": 4}"#).unwrap();
    let e = AutoCausalLm::model_type(&tmp).unwrap_err().to_string();
    assert!(e.contains("model_type") && e.contains("missing"), "{e}");
    std::fs::write(tmp.join("config.json"), "{").unwrap();
    assert!(AutoCausalLm::model_type(&tmp)
        .unwrap_err()
        .to_string()
        .contains("JSON"));
    let e = AutoCausalLm::model_type(tmp.join("nope"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such model folder"), "{e}");
    std::fs::remove_file(tmp.join("config.json")).unwrap();
    let e = AutoCausalLm::model_type(&tmp).unwrap_err().to_string();
    assert!(e.contains("no config.json"), "{e}");
}

#[test]
fn stop_tokens_come_from_generation_config_then_config() {
    let tmp = temp_dir("stop-tokens");
    assert!(stop_tokens(&tmp).unwrap().is_empty());
    std::fs::write(tmp.join("config.json"), r#"{"eos_token_id": 7}"#).unwrap();
    assert_eq!(stop_tokens(&tmp).unwrap(), [7]);
    std::fs::write(
        tmp.join("generation_config.json"),
        r#"{"eos_token_id": [3, 9]}"#,
    )
    .unwrap();
    assert_eq!(stop_tokens(&tmp).unwrap(), [3, 9]);
    std::fs::write(
        tmp.join("generation_config.json"),
        r#"{"eos_token_id": null}"#,
    )
    .unwrap();
    assert_eq!(stop_tokens(&tmp).unwrap(), [7]);
    std::fs::write(
        tmp.join("generation_config.json"),
        r#"{"eos_token_id": -1}"#,
    )
    .unwrap();
    let e = stop_tokens(&tmp).unwrap_err().to_string();
    assert!(
        e.contains("generation_config.json") && e.contains("eos_token_id"),
        "{e}"
    );
}
