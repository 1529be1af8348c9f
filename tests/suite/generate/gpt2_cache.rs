//! GPT-2's KV cache: every cached step (prefill, single tokens, chunks) gives the full
//! forward's logits at those positions, with and without PEFT adapters; greedy generation
//! equals argmax by recompute; misuse is an error that leaves the cache as it was.

use candle_core::{DType, Device, IndexOp, Tensor};
use lorakit::model::AdapterPlan;
use lorakit::models::generation::GenerationConfig;
use lorakit::models::gpt2::Gpt2LmHeadModel;
use lorakit::peft::PeftAdapter;

use crate::peft_common::{fixture, rel_err};

const CACHE_TOL: f64 = 1e-5;

fn model(case: &str, adapter: bool) -> Gpt2LmHeadModel {
    let dir = fixture("peft_options").join(case);
    let plan = if adapter {
        PeftAdapter::load(dir.join("adapter"), &Device::Cpu)
            .unwrap()
            .plan()
            .unwrap()
    } else {
        AdapterPlan::none()
    };
    let model = Gpt2LmHeadModel::from_pretrained(dir.join("base"), DType::F32, &Device::Cpu, &plan)
        .unwrap();
    plan.finish().unwrap();
    model
}

fn models() -> Vec<(String, Gpt2LmHeadModel)> {
    let mut out = Vec::new();
    for case in ["gpt2_lora", "gpt2_dora"] {
        out.push((format!("{case} base"), model(case, false)));
        out.push((format!("{case} adapter"), model(case, true)));
    }
    out
}

#[test]
fn gpt2_cached_steps_give_full_forward_logits() {
    // 16 positions: n_positions, the most GPT-2's fixtures take.
    let ids = Tensor::new(
        &[
            [3u32, 14, 15, 9, 26, 53, 5, 8, 9, 7, 9, 32, 38, 46, 26, 43],
            [2, 7, 1, 8, 28, 18, 28, 45, 9, 0, 4, 52, 35, 36, 2, 63],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let chunks = [3usize, 1, 1, 4, 1, 1, 2, 1, 1, 1];
    assert_eq!(chunks.iter().sum::<usize>(), 16);
    let mut worst: f64 = 0.0;
    // The default cache and one set for inference (buffers read in place).
    let caches = |m: &Gpt2LmHeadModel| [m.new_cache(), m.new_cache().for_inference()];
    for (what, model) in models() {
        for mut cache in caches(&model) {
            let what = format!("{what} (for inference: {})", cache.is_for_inference());
            let mut start = 0;
            for (step, &n) in chunks.iter().enumerate() {
                let got = model
                    .forward_cached(&ids.narrow(1, start, n).unwrap(), &mut cache)
                    .unwrap();
                assert_eq!(got.dims(), [2, n, 64]);
                assert_eq!(cache.len(), start + n);
                let full = model
                    .forward(&ids.narrow(1, 0, start + n).unwrap())
                    .unwrap();
                let e = rel_err(&got, &full.narrow(1, start, n).unwrap());
                assert!(e <= CACHE_TOL, "{what} step {step}: relative error {e:.3e}");
                worst = worst.max(e);
                start += n;
            }
            // Full: one more position is refused, and the cache stays as it was.
            let err = model
                .forward_cached(
                    &Tensor::new(&[[1u32], [2]], &Device::Cpu).unwrap(),
                    &mut cache,
                )
                .unwrap_err()
                .to_string();
            assert!(err.contains("n_positions 16"), "{err}");
            assert_eq!(cache.len(), 16);
        }
    }
    println!("GPT-2 cached vs full forward: worst relative error {worst:.2e}");
}

#[test]
fn gpt2_greedy_generation_equals_argmax_by_recompute() {
    let prompt = [59u32, 13, 15, 57];
    for (what, model) in models() {
        let mut seq = prompt.to_vec();
        for _ in 0..12 {
            let ids = Tensor::new(&seq[..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model.forward(&ids).unwrap();
            let next = logits
                .i((0, seq.len() - 1))
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            seq.push(next);
        }
        let got = model
            .generate(&prompt, &GenerationConfig::greedy(12))
            .unwrap();
        assert_eq!(got, seq[4..], "{what}");
    }
}

#[test]
fn gpt2_cache_misuse_is_an_error_and_a_reset_starts_over() {
    let model = model("gpt2_lora", true);
    let dev = Device::Cpu;
    let mut cache = model.new_cache();
    let pair = Tensor::new(&[[1u32, 2], [3, 4]], &dev).unwrap();
    model.forward_cached(&pair, &mut cache).unwrap();
    let err = model
        .forward_cached(&Tensor::new(&[[1u32]], &dev).unwrap(), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("batch size 1") && err.contains("holds 2"),
        "{err}"
    );
    let err = model
        .forward_cached(&Tensor::new(&[[64u32], [1]], &dev).unwrap(), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("token index 64"), "{err}");
    assert_eq!((cache.len(), cache.batch()), (2, Some(2)));
    let err = model
        .forward_cached(
            &Tensor::new(&[[1u32]], &dev).unwrap(),
            &mut lorakit::models::KvCache::with_layers(3),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 layers"), "{err}");

    cache.reset();
    let single = Tensor::new(&[[5u32, 6, 7]], &dev).unwrap();
    let got = model.forward_cached(&single, &mut cache).unwrap();
    assert!(rel_err(&got, &model.forward(&single).unwrap()) <= CACHE_TOL);
    assert_eq!((cache.len(), cache.batch()), (3, Some(1)));
}
