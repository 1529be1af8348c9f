//! The sampler on fixed logits rows: invalid settings are errors naming the setting;
//! greedy is the first argmax; draws follow softmax(logits / T) (chi-square over many
//! draws); top-k (ties with the k-th kept), then top-p (the smallest most-likely set
//! reaching p), in transformers' order; the same seed, the same draws.

use candle_core::{DType, Device, Tensor};
use lorakit::models::sampling::{Sampler, Sampling};

fn sampler(s: Sampling) -> Sampler {
    Sampler::new(s).unwrap()
}

fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
    let m = logits
        .iter()
        .fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
    let e: Vec<f64> = logits
        .iter()
        .map(|&v| ((f64::from(v) - m) / t).exp())
        .collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|x| x / total).collect()
}

/// Pearson's chi-square of `n` draws against `probs` (tokens of probability 0 must not
/// be drawn at all).
fn chi_square(s: &mut Sampler, logits: &[f32], probs: &[f64], n: usize) -> f64 {
    let mut counts = vec![0usize; probs.len()];
    for _ in 0..n {
        counts[s.sample_f32(logits).unwrap() as usize] += 1;
    }
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            if p == 0.0 {
                assert_eq!(c, 0, "a filtered-out token was drawn");
                0.0
            } else {
                let want = p * n as f64;
                (c as f64 - want).powi(2) / want
            }
        })
        .sum()
}

const LOGITS: [f32; 6] = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0];

#[test]
fn draws_follow_softmax_at_each_temperature() {
    // 5 degrees of freedom: P(chi² > 25) ≈ 1.4e-4; the draws are fixed by the seed.
    for (t, seed) in [(0.5, 1u64), (1.0, 2), (2.0, 3), (10.0, 4)] {
        let mut s = sampler(Sampling::with_temperature(t, seed));
        let want = softmax(&LOGITS, t);
        let got = s.probabilities(&LOGITS).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "T={t}: {got:?} vs {want:?}");
        }
        let chi2 = chi_square(&mut s, &LOGITS, &want, 20_000);
        assert!(chi2 < 25.0, "T={t}: chi-square {chi2:.1}");
    }
}

#[test]
fn top_k_then_top_p_keep_transformers_sets() {
    let probs = [0.4f64, 0.3, 0.2, 0.1];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    let dist = |top_k, top_p| {
        let s = Sampling {
            top_k,
            top_p,
            ..Sampling::with_temperature(1.0, 0)
        };
        sampler(s).probabilities(&logits).unwrap()
    };
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
    assert!(close(
        &dist(Some(2), None),
        &[4.0 / 7.0, 3.0 / 7.0, 0.0, 0.0]
    ));
    assert!(close(
        &dist(None, Some(0.65)),
        &[4.0 / 7.0, 3.0 / 7.0, 0.0, 0.0]
    ));
    assert!(close(&dist(None, Some(0.35)), &[1.0, 0.0, 0.0, 0.0]));
    assert!(close(
        &dist(None, Some(0.75)),
        &[4.0 / 9.0, 3.0 / 9.0, 2.0 / 9.0, 0.0]
    ));
    assert!(close(&dist(None, Some(1.0)), &probs));
    // top-k first: after it, 4/7 ≥ 0.5 alone (top-p first would keep two).
    assert!(close(&dist(Some(2), Some(0.5)), &[1.0, 0.0, 0.0, 0.0]));
    // Ties with the k-th logit are kept (transformers: logits < k-th value are removed).
    let tied = [1.0f32, 3.0, 3.0, 2.0];
    let s = Sampling {
        top_k: Some(1),
        ..Sampling::with_temperature(1.0, 0)
    };
    assert_eq!(
        sampler(s).probabilities(&tied).unwrap(),
        [0.0, 0.5, 0.5, 0.0]
    );

    // Draws from a filtered distribution follow it (3 dof: P(chi² > 20) ≈ 1.7e-4).
    let s = Sampling {
        top_k: Some(3),
        top_p: Some(0.8),
        ..Sampling::with_temperature(0.7, 11)
    };
    let mut s = sampler(s);
    let want = s.probabilities(&LOGITS).unwrap();
    assert_eq!(want.iter().filter(|&&p| p > 0.0).count(), 2, "{want:?}");
    assert!(chi_square(&mut s, &LOGITS, &want, 20_000) < 20.0);
}

#[test]
fn greedy_is_the_first_argmax_and_needs_no_draws() {
    let mut g = sampler(Sampling::greedy());
    assert_eq!(
        g.sample_f32(&[0.0, 5.0, 5.0, f32::NEG_INFINITY]).unwrap(),
        1
    );
    assert_eq!(g.sample_f32(&[f32::NEG_INFINITY, -1e30]).unwrap(), 1);
    assert_eq!(g.probabilities(&[0.0, 5.0, 5.0]).unwrap(), [0.0, 1.0, 0.0]);
    // Any dtype, any row shape.
    let row = Tensor::new(&[[[0.5f32, 2.0, -1.0]]], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(g.sample(&row).unwrap(), 1);
    // A vanishing temperature is greedy too, without overflow.
    let mut cold = sampler(Sampling::with_temperature(1e-300, 5));
    for _ in 0..10 {
        assert_eq!(cold.sample_f32(&LOGITS).unwrap(), 0);
    }
}

#[test]
fn same_seed_same_draws_and_impossible_tokens_never_come() {
    let draws = |seed: u64, n: usize| -> Vec<u32> {
        let mut s = sampler(Sampling::with_temperature(1.5, seed));
        (0..n).map(|_| s.sample_f32(&LOGITS).unwrap()).collect()
    };
    assert_eq!(draws(7, 200), draws(7, 200));
    assert_ne!(draws(7, 200), draws(8, 200));
    let mut s = sampler(Sampling::with_temperature(5.0, 3));
    let masked = [0.0f32, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
    for _ in 0..500 {
        assert!(matches!(s.sample_f32(&masked).unwrap(), 0 | 2));
    }
}

#[test]
fn invalid_settings_and_rows_are_errors_naming_them() {
    let err = |s: Sampling| Sampler::new(s).unwrap_err().to_string();
    for (t, shown) in [(-1.0, "-1"), (f64::NAN, "NaN"), (f64::INFINITY, "inf")] {
        let e = err(Sampling::with_temperature(t, 0));
        assert!(e.contains("`temperature`") && e.contains(shown), "{e}");
    }
    let e = err(Sampling {
        top_k: Some(0),
        ..Sampling::with_temperature(1.0, 0)
    });
    assert!(e.contains("`top_k`"), "{e}");
    for p in [0.0, -0.1, 1.5, f64::NAN] {
        let e = err(Sampling {
            top_p: Some(p),
            ..Sampling::with_temperature(1.0, 0)
        });
        assert!(e.contains("`top_p`") && e.contains("(0, 1]"), "{e}");
    }
    let mut s = sampler(Sampling::with_temperature(1.0, 0));
    assert!(s.sample_f32(&[]).unwrap_err().to_string().contains("empty"));
    let e = s.sample_f32(&[0.0, f32::NAN]).unwrap_err().to_string();
    assert!(e.contains("logit 1 is NaN"), "{e}");
    assert!(s.sample_f32(&[f32::INFINITY, 0.0]).is_err());
    let e = s
        .sample_f32(&[f32::NEG_INFINITY; 3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no token is possible"), "{e}");
}
