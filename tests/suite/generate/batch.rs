//! Batched generation (`generate_batch`): prompts of different lengths left-padded into one
//! batch give transformers' own batched greedy `generate` with left padding and an
//! attention mask, PEFT adapters on (`tests/fixtures/generate/batch.json`,
//! `scripts/make_batch_generate_fixtures.py`, which also checks that each row is what its
//! prompt gives alone), with and without a stop token; every row is what lorakit's
//! `generate` gives for its prompt alone, greedy or sampled with a seed.

use lorakit::models::generation::GenerationConfig;
use lorakit::models::sampling::Sampling;
use serde_json::Value;

use super::{folders, ids, with_adapter};
use crate::peft_common::fixture;

fn cases() -> Vec<Value> {
    let path = fixture("generate/batch.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["cases"].as_array().unwrap().clone()
}

fn rows(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

#[test]
fn batched_greedy_equals_transformers_left_padded_and_each_prompt_alone() {
    for case in cases() {
        let name = case["model"].as_str().unwrap();
        let (base, adapter) = folders(&case);
        let (model, _) = with_adapter(&base, &adapter);
        let prompts = rows(&case["prompts"]);
        let greedy = GenerationConfig::greedy(12);
        let got = model.generate_batch(&prompts, &greedy).unwrap();
        assert_eq!(got, rows(&case["tokens"]), "{name}");
        for (prompt, row) in prompts.iter().zip(&got) {
            assert_eq!(&model.generate(prompt, &greedy).unwrap(), row, "{name}");
        }
        // Each row stops at its own stop token and leaves the batch (its cache rows
        // dropped); the others go on as they would alone.
        let stop = u32::try_from(case["stop"].as_u64().unwrap()).unwrap();
        let with_stop = greedy.clone().with_eos([stop]);
        let stopped = model.generate_batch(&prompts, &with_stop).unwrap();
        assert_eq!(stopped, rows(&case["stop_tokens"]), "{name} stop {stop}");
        for (prompt, row) in prompts.iter().zip(&stopped) {
            assert_eq!(&model.generate(prompt, &with_stop).unwrap(), row, "{name}");
        }
    }
}

#[test]
fn sampled_rows_are_each_prompts_own_draw_and_bad_prompts_are_named() {
    let case = &cases()[1]; // qwen2 with its LoRA
    let (base, adapter) = folders(case);
    let (model, _) = with_adapter(&base, &adapter);
    let prompts = rows(&case["prompts"]);
    let hot = GenerationConfig::greedy(8).with_sampling(Sampling::with_temperature(2.0, 7));
    let batch = model.generate_batch(&prompts, &hot).unwrap();
    assert_eq!(batch, model.generate_batch(&prompts, &hot).unwrap());
    for (prompt, row) in prompts.iter().zip(&batch) {
        assert_eq!(&model.generate(prompt, &hot).unwrap(), row);
    }
    assert_ne!(
        batch,
        rows(&case["tokens"])
            .iter()
            .map(|r| r[..8].to_vec())
            .collect::<Vec<_>>()
    );

    assert!(model.generate_batch(&[], &hot).unwrap().is_empty());
    let err = model
        .generate_batch(&[vec![1, 2], vec![64]], &hot)
        .unwrap_err()
        .to_string();
    assert!(err.contains("64") && err.contains("vocab"), "{err}");
    let err = model
        .generate_batch(&[vec![1, 2], vec![]], &hot)
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty"), "{err}");
}
