//! LoRA-drop: sampling, calibration against an f64 reference, selection, sharing by
//! reference, parameter accounting, stage-2 training of shared pairs.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::train::lora_drop::{normalize_importance, sample_indices, select_layers};
use lorakit::train::{SampleSize, Selection};
use lorakit::{
    Adapter, FrozenLinear, LoraConfig, LoraDrop, LoraDropConfig, LoraDropLinear, LoraInit,
    LoraLinear, Shared,
};

type R = lorakit::Result<()>;

fn dev() -> Device {
    Device::Cpu
}

fn vec2(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

fn lora_cfg() -> LoraConfig {
    let mut cfg = LoraConfig::new(2, 4.0);
    cfg.init = LoraInit::BothRandom;
    cfg
}

/// Five layers: three 6→6, two 6→4. Layer 0's B is scaled up (large output), layer 1's
/// scaled down to near zero.
fn model(vb: &VarBuilder) -> lorakit::Result<Vec<Shared<LoraDropLinear>>> {
    let mut rng = lorakit::init::SeededRng::new(3);
    let shapes = [(6, 6), (6, 6), (6, 6), (6, 4), (6, 4)];
    let mut out = Vec::new();
    for (i, (d_in, d_out)) in shapes.into_iter().enumerate() {
        let w = rng.normal((d_out, d_in), 0.0, 0.5, DType::F32, &dev())?;
        let l = LoraDropLinear::new(
            FrozenLinear::new(w, None)?,
            &lora_cfg(),
            vb.pp(format!("l{i}")),
        )?;
        let factor = match i {
            0 => 20.0,
            1 => 1e-4,
            _ => 1.0,
        };
        if let Some(b) = l.lora().pair().b.var() {
            b.set(&(b.as_tensor() * factor)?)?;
        }
        out.push(Shared::new(l));
    }
    Ok(out)
}

/// The layers as a model's registry holds them (the same layers, type-erased).
fn erased(layers: &[Shared<LoraDropLinear>]) -> Vec<Shared<dyn Adapter>> {
    layers.iter().map(|l| l.clone().erase()).collect()
}

/// g = Σ_rows ‖s · B A x‖² in f64.
fn g_ref(l: &LoraLinear, x: &[Vec<f64>]) -> f64 {
    let a = vec2(l.pair().a.tensor());
    let b = vec2(l.pair().b.tensor());
    let s = l.scale();
    x.iter()
        .map(|row| {
            let xa: Vec<f64> = a
                .iter()
                .map(|ar| ar.iter().zip(row).map(|(p, q)| p * q).sum())
                .collect();
            b.iter()
                .map(|br| {
                    let v: f64 = s * br.iter().zip(&xa).map(|(p, q)| p * q).sum::<f64>();
                    v * v
                })
                .sum::<f64>()
        })
        .sum()
}

#[test]
fn sample_is_deterministic_and_sized() -> R {
    let a = sample_indices(50, SampleSize::Fraction(0.2), 9)?;
    assert_eq!(a, sample_indices(50, SampleSize::Fraction(0.2), 9)?);
    assert_eq!(a.len(), 10);
    assert!(a.windows(2).all(|w| w[0] < w[1]) && a.iter().all(|&i| i < 50));
    assert_ne!(a, sample_indices(50, SampleSize::Fraction(0.2), 10)?);
    assert_eq!(sample_indices(50, SampleSize::Count(7), 0)?.len(), 7);
    assert!(sample_indices(50, SampleSize::Count(51), 0).is_err());
    assert!(sample_indices(50, SampleSize::Fraction(0.0), 0).is_err());
    Ok(())
}

#[test]
fn selection_by_threshold_and_top_n() -> R {
    let imp = normalize_importance(&[1.0, 6.0, 0.5, 2.5])?;
    assert_eq!(imp, vec![0.1, 0.6, 0.05, 0.25]);
    // 0.6 + 0.25 = 0.85 < 0.9, + 0.1 reaches it.
    assert_eq!(
        select_layers(&imp, Selection::Threshold(0.9))?,
        [true, true, false, true]
    );
    assert_eq!(
        select_layers(&imp, Selection::Threshold(0.6))?,
        [false, true, false, false]
    );
    assert_eq!(
        select_layers(&imp, Selection::TopN(2))?,
        [false, true, false, true]
    );
    assert!(select_layers(&imp, Selection::Threshold(1.5)).is_err());
    assert!(normalize_importance(&[1.0, f64::NAN]).is_err());
    Ok(())
}

#[test]
fn calibration_matches_f64_reference() -> R {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let layers = model(&vb)?;
    let drop = LoraDrop::new(&erased(&layers), LoraDropConfig::default())?;
    let xs: Vec<Tensor> = (0..3)
        .map(|_| Tensor::randn(0f32, 1., (4, 6), &dev()))
        .collect::<candle_core::Result<_>>()?;
    // Outside calibration nothing is recorded.
    layers[0].forward(&xs[0])?;
    let imp = drop.calibrate(|| {
        for x in &xs {
            for l in &layers {
                l.read().forward_t(x, true)?;
            }
        }
        Ok(())
    })?;
    let raw: Vec<f64> = layers
        .iter()
        .map(|l| xs.iter().map(|x| g_ref(l.read().lora(), &vec2(x))).sum())
        .collect();
    let total: f64 = raw.iter().sum();
    for ((got, want), l) in imp.iter().zip(&raw).zip(&layers) {
        assert!(
            (got.raw - want).abs() <= 1e-4 * want.max(1e-12),
            "{got:?} vs {want}"
        );
        assert!((got.importance - want / total).abs() < 1e-6);
        assert_eq!(got.name, l.read().name());
    }
    assert!(imp[0].importance > 0.9 && imp[1].importance < 1e-6);
    Ok(())
}

#[test]
fn stage1_then_sharing_drops_parameters_and_shares_storage() -> R {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let layers = model(&vb)?;
    let data = Tensor::randn(0f32, 1., (40, 6), &dev())?;
    let target = Tensor::randn(0f32, 1., (40, 6), &dev())?;
    // The shared pairs get LoRA's default init with seed 0 (`LoraConfig::new(2, 4.0)`'s).
    let config = LoraDropConfig {
        sample: SampleSize::Fraction(0.25),
        stage1_steps: 3,
        shared_init: LoraInit::Default,
        shared_seed: 0,
        ..LoraDropConfig::default()
    };
    let drop = LoraDrop::new(&erased(&layers), config.clone())?;
    let mut opt = candle_nn::AdamW::new_lr(drop.trainable_vars(), 1e-3)?;
    let mut steps = Vec::new();
    let stage1 = drop.stage1(
        40,
        |step, sample| {
            steps.push((step, sample.len()));
            let idx = Tensor::from_vec(
                sample.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                sample.len(),
                &dev(),
            )?;
            let (x, y) = (data.index_select(&idx, 0)?, target.index_select(&idx, 0)?);
            let mut loss = (layers[0].read().forward_t(&x, true)? - &y)?
                .sqr()?
                .mean_all()?;
            for l in &layers[1..] {
                loss = (loss + l.read().forward_t(&x, true)?.sqr()?.mean_all()?)?;
            }
            opt.backward_step(&loss)?;
            Ok(())
        },
        |sample| {
            let idx: Vec<u32> = sample.iter().map(|&i| i as u32).collect();
            let x = data.index_select(&Tensor::from_vec(idx, sample.len(), &dev())?, 0)?;
            for l in &layers {
                l.read().forward_t(&x, false)?;
            }
            Ok(())
        },
    )?;
    assert_eq!(steps, vec![(1, 10), (2, 10), (3, 10)]);
    // The sample stage 1 trained and calibrated on is returned: the configured uniform one.
    assert_eq!(
        stage1.sample,
        sample_indices(40, config.sample, config.seed)?
    );
    assert_eq!(stage1.importance.len(), layers.len());
    let report = drop.share_unselected(&stage1.importance, vb.pp("shared"))?;
    assert_eq!(report.selected, vec!["l0".to_string()]);
    assert!(report.shared.contains(&"l1".to_string()));
    assert_eq!(report.shared.len(), 4);
    assert_eq!(report.shared_pairs, 2);

    // Independent count: every layer r·(d_in + d_out) before; after, l0 plus one pair per shape.
    let before = 3 * 2 * (6 + 6) + 2 * 2 * (6 + 4);
    let after = 2 * (6 + 6) + 2 * (6 + 6) + 2 * (6 + 4);
    assert_eq!((report.params_before, report.params_after), (before, after));
    assert!((report.reduction() - (1.0 - after as f64 / before as f64)).abs() < 1e-12);
    assert_eq!(drop.num_trainable_params(), after);

    // Shared layers hold the same storage: writing through one is seen by the other.
    let a1 = layers[1].read().lora().pair().a.var().unwrap().clone();
    let a2 = layers[2].read().lora().pair().a.tensor().clone();
    a1.set(&Tensor::full(0.25f32, (2, 6), &dev())?)?;
    assert_eq!(vec2(&a2), vec![vec![0.25; 6]; 2]);
    let a3 = layers[3].read().lora().pair().a.tensor().id();
    assert_eq!(a3, layers[4].read().lora().pair().a.tensor().id());
    assert_ne!(a3, a2.id());

    // Stage 2: the shared pair starts at B = 0 (base output) and trains once for all.
    let x = Tensor::randn(0f32, 1., (5, 6), &dev())?;
    let base1 = layers[1].read().base().forward(&x)?;
    assert_eq!(vec2(&layers[1].read().forward_t(&x, false)?), vec2(&base1));
    let mut opt = candle_nn::AdamW::new_lr(drop.trainable_vars(), 1e-2)?;
    let loss = (layers[1].read().forward_t(&x, true)?.sum_all()?
        + layers[2].read().forward_t(&x, true)?.sum_all()?)?;
    opt.backward_step(&loss)?;
    let b1 = vec2(layers[1].read().lora().pair().b.tensor());
    assert!(b1.iter().flatten().any(|v| *v != 0.0));
    assert_eq!(b1, vec2(layers[2].read().lora().pair().b.tensor()));
    Ok(())
}
