//! LoRA-drop's stratified stage-1 sample: per-label counts against an independent
//! largest-remainder computation in f64, determinism, validity, and `stage1_stratified`
//! training on exactly that sample.

use std::collections::BTreeMap;

use lorakit::train::lora_drop::{sample_indices, stratified_sample_indices, SampleSize};

/// Per-label quotas by Hamilton's method in f64 (the reference).
fn expected_counts(labels: &[u32], total: usize) -> BTreeMap<u32, usize> {
    let mut sizes: BTreeMap<u32, usize> = BTreeMap::new();
    for &l in labels {
        *sizes.entry(l).or_default() += 1;
    }
    let n = labels.len() as f64;
    let exact: Vec<(u32, f64)> = sizes
        .iter()
        .map(|(&l, &c)| (l, total as f64 * c as f64 / n))
        .collect();
    let mut out: BTreeMap<u32, usize> = exact
        .iter()
        .map(|&(l, e)| (l, e.floor() as usize))
        .collect();
    let mut left = total - out.values().sum::<usize>();
    let mut order = exact.clone();
    order.sort_by(|a, b| {
        (b.1 - b.1.floor())
            .total_cmp(&(a.1 - a.1.floor()))
            .then(a.0.cmp(&b.0))
    });
    for (l, _) in order {
        if left == 0 {
            break;
        }
        *out.get_mut(&l).unwrap() += 1;
        left -= 1;
    }
    out
}

fn labels(seed: u64, n: usize, classes: u32) -> Vec<u32> {
    // Skewed classes: label k with weight ~ 1/(k+1), from a small LCG.
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (state >> 33) as f64 / (1u64 << 31) as f64;
            let weights: Vec<f64> = (0..classes).map(|k| 1.0 / (k as f64 + 1.0)).collect();
            let total: f64 = weights.iter().sum();
            let mut acc = 0.0;
            for (k, w) in weights.iter().enumerate() {
                acc += w / total;
                if u < acc {
                    return k as u32;
                }
            }
            classes - 1
        })
        .collect()
}

#[test]
fn per_label_counts_follow_the_data_shares() {
    for (seed, n, classes, size) in [
        (1, 200, 4, SampleSize::Fraction(0.1)),
        (2, 97, 5, SampleSize::Fraction(0.33)),
        (3, 50, 3, SampleSize::Count(7)),
        (4, 1000, 7, SampleSize::Fraction(0.05)),
        (5, 12, 6, SampleSize::Count(1)),
    ] {
        let labels = labels(seed, n, classes);
        let sample = stratified_sample_indices(&labels, size, seed).unwrap();
        // Same size as the uniform sample.
        assert_eq!(sample.len(), sample_indices(n, size, seed).unwrap().len());
        // Sorted, unique, in range.
        assert!(sample.windows(2).all(|w| w[0] < w[1]));
        assert!(sample.iter().all(|&i| i < n));
        let mut got: BTreeMap<u32, usize> = BTreeMap::new();
        for &i in &sample {
            *got.entry(labels[i]).or_default() += 1;
        }
        let want = expected_counts(&labels, sample.len());
        for (l, &c) in &want {
            assert_eq!(
                got.get(l).copied().unwrap_or(0),
                c,
                "label {l}, case {seed}"
            );
        }
    }
}

#[test]
fn deterministic_for_a_seed_and_different_across_seeds() {
    let labels = labels(9, 300, 4);
    let a = stratified_sample_indices(&labels, SampleSize::Fraction(0.2), 11).unwrap();
    assert_eq!(
        a,
        stratified_sample_indices(&labels, SampleSize::Fraction(0.2), 11).unwrap()
    );
    assert_ne!(
        a,
        stratified_sample_indices(&labels, SampleSize::Fraction(0.2), 12).unwrap()
    );
}

#[test]
fn string_labels_and_bad_sizes() {
    let labels = ["pos", "neg", "neg", "pos", "neutral", "neg"];
    let sample = stratified_sample_indices(&labels, SampleSize::Count(3), 0).unwrap();
    assert_eq!(sample.len(), 3);
    let err = stratified_sample_indices(&labels, SampleSize::Count(7), 0).unwrap_err();
    assert!(err.to_string().contains("count"), "{err}");
    let empty: [u8; 0] = [];
    let err = stratified_sample_indices(&empty, SampleSize::Fraction(0.5), 0).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn stage1_stratified_trains_and_calibrates_on_the_stratified_sample() {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};
    use lorakit::train::Stage1;
    use lorakit::{FrozenLinear, LoraConfig, LoraDrop, LoraDropConfig, LoraDropLinear, Shared};

    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let w = Tensor::randn(0f32, 1., (3, 4), &dev).unwrap();
    let layer = LoraDropLinear::new(
        FrozenLinear::new(w, None).unwrap(),
        &LoraConfig::new(2, 4.0),
        vb.pp("l"),
    )
    .unwrap();
    let layer = Shared::new(layer).erase();
    let labels = labels(21, 60, 3);
    let config = LoraDropConfig {
        sample: SampleSize::Fraction(0.25),
        stage1_steps: 2,
        ..LoraDropConfig::default()
    };
    let drop = LoraDrop::new(std::slice::from_ref(&layer), config.clone()).unwrap();
    let want = stratified_sample_indices(&labels, config.sample, config.seed).unwrap();
    let data = Tensor::randn(0f32, 1., (60, 4), &dev).unwrap();
    let mut trained_on = Vec::new();
    let Stage1 { sample, importance } = drop
        .stage1_stratified(
            &labels,
            |_, sample| {
                trained_on.push(sample.to_vec());
                Ok(())
            },
            |sample| {
                assert_eq!(sample, want.as_slice());
                let idx: Vec<u32> = sample.iter().map(|&i| i as u32).collect();
                let x = data.index_select(&Tensor::new(idx, &dev)?, 0)?;
                layer.read().forward_t(&x, false).map(|_| ())
            },
        )
        .unwrap();
    // The returned sample is the one trained and calibrated on.
    assert_eq!(sample, want);
    assert_eq!(trained_on, vec![want.clone(), want]);
    assert_eq!(importance.len(), 1);
}
