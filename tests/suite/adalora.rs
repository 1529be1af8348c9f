//! AdaLoRA: layer invariants, orthogonality penalty, budget schedule, importance scores and
//! masking, truncated save and reload. References: PEFT's schedule (fixture), f64 hand
//! computations on plain vectors.

use crate::peft_common::f64_values;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lorakit::train::{
    budget_schedule, orthogonality_penalty, train_step, RankAllocator, RankAllocatorConfig,
};
use lorakit::{AdaLoraConfig, AdaLoraLinear, AdaLoraWeights, Adapter, Error, FrozenLinear, Shared};

type R = lorakit::Result<()>;

fn dev() -> Device {
    Device::Cpu
}

fn base(d_in: usize, d_out: usize, seed: u64) -> lorakit::Result<FrozenLinear> {
    let mut rng = lorakit::init::SeededRng::new(seed);
    let w = rng.normal((d_out, d_in), 0.0, 0.5, DType::F32, &dev())?;
    let b = rng.normal(d_out, 0.0, 0.5, DType::F32, &dev())?;
    FrozenLinear::new(w, Some(b))
}

fn layer(
    vb: &VarBuilder,
    name: &str,
    d_in: usize,
    d_out: usize,
    r: usize,
) -> lorakit::Result<AdaLoraLinear> {
    AdaLoraLinear::new(
        base(d_in, d_out, name.len() as u64)?,
        &AdaLoraConfig::new(r, 6.0),
        vb.pp(name),
    )
}

/// The layers as the training rules take them.
fn erased(layers: &[Shared<AdaLoraLinear>]) -> Vec<Shared<dyn Adapter>> {
    layers.iter().map(|l| l.clone().erase()).collect()
}

/// An AdaLoRA layer from loaded tensors (`rank_pattern`: PEFT's entry for the layer).
fn from_tensors(
    name: &str,
    base: FrozenLinear,
    (a, e, b): (Tensor, Tensor, Tensor),
    init_r: usize,
    alpha: f64,
    rank_pattern: Option<Vec<bool>>,
) -> lorakit::Result<AdaLoraLinear> {
    let config = AdaLoraConfig::new(init_r, alpha);
    let weights = AdaLoraWeights {
        a,
        e,
        b,
        rank_pattern,
    };
    AdaLoraLinear::from_weights(name, base, &config, weights)
}

fn mat(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// s · B diag(E) A in f64.
fn delta_ref(a: &[Vec<f64>], e: &[f64], b: &[Vec<f64>], s: f64) -> Vec<Vec<f64>> {
    let (d_out, d_in) = (b.len(), a[0].len());
    (0..d_out)
        .map(|o| {
            (0..d_in)
                .map(|i| s * (0..e.len()).map(|k| b[o][k] * e[k] * a[k][i]).sum::<f64>())
                .collect()
        })
        .collect()
}

fn set_e(l: &AdaLoraLinear, values: &[f32]) -> R {
    let t = Tensor::from_vec(values.to_vec(), (values.len(), 1), &dev())?;
    l.e().set(&t)?;
    Ok(())
}

#[test]
fn identity_at_init_and_scale() -> R {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let l = layer(&vb, "q", 5, 7, 4)?;
    let x = Tensor::randn(0f32, 1., (3, 5), &dev())?;
    let y = l.forward_t(&x, true)?;
    let y0 = l.base().forward(&x)?;
    assert_eq!(mat(&y), mat(&y0));
    assert_eq!(f64_values(l.e().as_tensor()), vec![0.0; 4]);
    assert!((l.scale() - 6.0 / (4.0 + 1e-5)).abs() < 1e-15);
    // A, B ~ N(0, 0.02²): every entry well inside ±6σ, not all zero.
    let a = f64_values(l.a().as_tensor());
    assert!(a.iter().all(|v| v.abs() < 0.12) && a.iter().any(|v| *v != 0.0));
    assert_eq!(vm.all_vars().len(), 3);
    Ok(())
}

#[test]
fn forward_merge_and_delta_match_f64_reference() -> R {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let mut l = layer(&vb, "v", 4, 3, 3)?;
    l.a().set(&Tensor::randn(0f32, 1., (3, 4), &dev())?)?;
    l.b().set(&Tensor::randn(0f32, 1., (3, 3), &dev())?)?;
    set_e(&l, &[0.5, -1.5, 2.0])?;
    let (a, e, b) = (
        mat(l.a().as_tensor()),
        f64_values(l.e().as_tensor()),
        mat(l.b().as_tensor()),
    );
    let want = delta_ref(&a, &e, &b, l.scale());
    assert!(max_diff(&mat(&l.delta_weight()?), &want) < 1e-5);

    let x = Tensor::randn(0f32, 1., (5, 4), &dev())?;
    let w0 = mat(l.base().weight());
    let bias = f64_values(l.base().bias().unwrap());
    let xs = mat(&x);
    let y_ref: Vec<Vec<f64>> = xs
        .iter()
        .map(|row| {
            (0..3)
                .map(|o| {
                    bias[o]
                        + (0..4)
                            .map(|i| (w0[o][i] + want[o][i]) * row[i])
                            .sum::<f64>()
                })
                .collect()
        })
        .collect();
    let y = mat(&l.forward_t(&x, false)?);
    assert!(max_diff(&y, &y_ref) < 1e-4);
    l.merge(true)?;
    assert!(max_diff(&mat(&l.forward_t(&x, false)?), &y_ref) < 1e-4);
    assert!(l.apply_mask(&[true, false, true]).is_err());
    l.unmerge()?;
    assert!(max_diff(&mat(l.base().weight()), &w0) < 1e-6);
    Ok(())
}

#[test]
fn gradients_reach_a_e_and_b() -> R {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let l = layer(&vb, "k", 4, 3, 2)?;
    set_e(&l, &[1.0, 2.0])?;
    let x = Tensor::randn(0f32, 1., (5, 4), &dev())?;
    let grads = l.forward_t(&x, true)?.sqr()?.sum_all()?.backward()?;
    for v in [l.a(), l.e(), l.b()] {
        let g = grads.get(v.as_tensor()).expect("gradient");
        assert!(f64_values(g).iter().any(|x| *x != 0.0));
    }
    assert!(grads.get(l.base().weight()).is_none());
    Ok(())
}

#[test]
fn orthogonality_penalty_matches_hand_computation() -> R {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let l1 = layer(&vb, "a", 4, 3, 2)?;
    let l2 = layer(&vb, "b", 3, 5, 3)?;
    for l in [&l1, &l2] {
        let (r, d_in) = l.a().as_tensor().dims2()?;
        let d_out = l.b().as_tensor().dims()[0];
        l.a().set(&Tensor::randn(0f32, 1., (r, d_in), &dev())?)?;
        l.b().set(&Tensor::randn(0f32, 1., (d_out, r), &dev())?)?;
    }
    // ‖M Mᵀ − I‖_F for A (rows), ‖Mᵀ M − I‖_F for B (columns), in f64.
    let fro = |m: &[Vec<f64>], rows: bool| -> f64 {
        let n = if rows { m.len() } else { m[0].len() };
        let mut s = 0.0;
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = if rows {
                    m[i].iter().zip(&m[j]).map(|(x, y)| x * y).sum()
                } else {
                    m.iter().map(|row| row[i] * row[j]).sum()
                };
                let d = dot - if i == j { 1.0 } else { 0.0 };
                s += d * d;
            }
        }
        s.sqrt()
    };
    let mut want = 0.0;
    for l in [&l1, &l2] {
        want += fro(&mat(l.a().as_tensor()), true) + fro(&mat(l.b().as_tensor()), false);
    }
    want /= 4.0;
    let layers = vec![Shared::new(l1), Shared::new(l2)];
    let got = orthogonality_penalty(&erased(&layers))?.to_scalar::<f32>()? as f64;
    assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");
    // It is differentiable in A and B.
    let grads = orthogonality_penalty(&erased(&layers))?.backward()?;
    assert!(grads.get(layers[0].read().a().as_tensor()).is_some());
    // γ from the config.
    let mut cfg = RankAllocatorConfig::new(10);
    cfg.target_r = 1;
    let alloc = RankAllocator::new(&erased(&layers), cfg)?;
    let pen = alloc.orthogonality_penalty()?.to_scalar::<f32>()? as f64;
    assert!((pen - 0.5 * want).abs() < 1e-4 * want.max(1.0));
    Ok(())
}

#[derive(serde::Deserialize)]
struct ScheduleCase {
    tinit: usize,
    tfinal: usize,
    delta_t: usize,
    total_step: usize,
    init_budget: usize,
    target_budget: usize,
    schedule: Vec<(usize, bool)>,
}

#[test]
fn budget_schedule_matches_peft() -> R {
    let text = include_str!("../fixtures/adalora_budget.json");
    let cases: Vec<ScheduleCase> = serde_json::from_str(text).unwrap();
    for c in &cases {
        let mut cfg = RankAllocatorConfig::new(c.total_step);
        (cfg.tinit, cfg.tfinal, cfg.delta_t) = (c.tinit, c.tfinal, c.delta_t);
        let (b0, bt) = (c.init_budget, c.target_budget);
        let mut prev = b0;
        for (step, &(budget, mask)) in c.schedule.iter().enumerate() {
            let got = budget_schedule(&cfg, b0, bt, step);
            assert_eq!((got.budget, got.mask), (budget, mask), "step {step}");
            // Shape of the schedule, independently of the fixture.
            if step <= c.tinit {
                assert_eq!(got.budget, b0);
                assert!(!got.mask);
            } else if step > c.total_step - c.tfinal {
                assert_eq!(got.budget, bt);
                assert!(got.mask);
            } else {
                assert!(got.budget <= prev && got.budget >= bt);
                let t = (step - c.tinit) as f64 / (c.total_step - c.tfinal - c.tinit) as f64;
                let f = ((b0 - bt) as f64 * (1.0 - t).powi(3) + bt as f64).floor() as usize;
                assert_eq!(got.budget, f, "step {step}");
                assert_eq!(got.mask, step % c.delta_t == 0);
            }
            prev = got.budget;
        }
    }
    Ok(())
}

/// A GradStore holding chosen gradients for the given tensors.
fn grads_for(pairs: &[(&Tensor, Vec<f32>)]) -> lorakit::Result<candle_core::backprop::GradStore> {
    let dummy = Var::new(0f32, &dev())?;
    let mut g = (dummy.as_tensor() * 1.0)?.backward()?;
    for (t, v) in pairs {
        g.insert(t, Tensor::from_vec(v.clone(), t.shape(), &dev())?);
    }
    Ok(g)
}

#[test]
fn scores_match_independent_f64_computation() -> R {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let l = layer(&vb, "fc", 3, 2, 2)?;
    l.a().set(&Tensor::new(
        &[[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75]],
        &dev(),
    )?)?;
    l.b()
        .set(&Tensor::new(&[[1.0f32, -0.5], [0.3, 2.0]], &dev())?)?;
    set_e(&l, &[0.7, -1.2])?;
    let layer = Shared::new(l);
    let mut cfg = RankAllocatorConfig::new(20);
    (cfg.tinit, cfg.target_r, cfg.beta1, cfg.beta2) = (10, 1, 0.8, 0.6);
    let mut alloc = RankAllocator::new(&[layer.clone().erase()], cfg)?;
    let (a_t, e_t, b_t) = {
        let l = layer.read();
        (
            l.a().as_tensor().clone(),
            l.e().as_tensor().clone(),
            l.b().as_tensor().clone(),
        )
    };
    let (w_a, w_e, w_b) = (f64_values(&a_t), f64_values(&e_t), f64_values(&b_t));
    // Reference state: per element (ī, ū).
    let mut st: Vec<Vec<(f64, f64)>> = vec![
        vec![(0.0, 0.0); 6],
        vec![(0.0, 0.0); 2],
        vec![(0.0, 0.0); 4],
    ];
    for step in 1..=3usize {
        let k = step as f32;
        let ga: Vec<f32> = (0..6).map(|i| (i as f32 - 2.5) * 0.3 * k).collect();
        let ge: Vec<f32> = vec![0.9 / k, -0.4 * k];
        let gb: Vec<f32> = (0..4).map(|i| (1.0 + i as f32) * 0.2 - 0.1 * k).collect();
        let grads = grads_for(&[(&a_t, ga.clone()), (&e_t, ge.clone()), (&b_t, gb.clone())])?;
        assert_eq!(alloc.update_and_allocate(step, &grads)?, None);
        for (s, (w, g)) in st.iter_mut().zip([(&w_a, &ga), (&w_e, &ge), (&w_b, &gb)]) {
            for (el, (wv, gv)) in s.iter_mut().zip(w.iter().zip(g.iter())) {
                let i = (wv * *gv as f64).abs();
                el.0 = 0.8 * el.0 + 0.2 * i;
                el.1 = 0.6 * el.1 + 0.4 * (i - el.0).abs();
            }
        }
    }
    let sc = |el: &(f64, f64)| el.0 * el.1;
    // A is (2, 3): mean over its row; B is (2, 2): mean over its column.
    let want: Vec<f64> = (0..2)
        .map(|r| {
            sc(&st[1][r])
                + (0..3).map(|j| sc(&st[0][r * 3 + j])).sum::<f64>() / 3.0
                + (0..2).map(|o| sc(&st[2][o * 2 + r])).sum::<f64>() / 2.0
        })
        .collect();
    let got = &alloc.triplet_scores()?[0];
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1e-6),
            "{got:?} vs {want:?}"
        );
    }
    Ok(())
}

#[test]
fn masking_keeps_exactly_the_budget_with_ties_broken_in_order() -> R {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let layers: Vec<_> = (0..3)
        .map(|i| -> lorakit::Result<_> {
            let l = layer(&vb, &format!("l{i}"), 4, 4, 4)?;
            set_e(&l, &[1.0, 2.0, 3.0, 4.0])?;
            Ok(Shared::new(l))
        })
        .collect::<lorakit::Result<_>>()?;
    let mut cfg = RankAllocatorConfig::new(10);
    (cfg.target_r, cfg.tfinal) = (1, 2);
    let mut alloc = RankAllocator::new(&erased(&layers), cfg)?;
    // No gradients: every score is 0, all tie.
    let grads = grads_for(&[])?;
    let budget = alloc
        .update_and_allocate(1, &grads)?
        .expect("masks at step 1");
    assert_eq!(budget, alloc.schedule(1).budget);
    let nonzero: Vec<Vec<bool>> = layers
        .iter()
        .map(|l| {
            f64_values(l.read().e().as_tensor())
                .iter()
                .map(|v| *v != 0.0)
                .collect()
        })
        .collect();
    assert_eq!(nonzero.iter().flatten().filter(|k| **k).count(), budget);
    // The k = 12 − budget pruned ranks are the first ones in (layer, rank) order.
    let k = 12 - budget;
    for (pos, keep) in nonzero.iter().flatten().enumerate() {
        assert_eq!(*keep, pos >= k, "position {pos}");
    }
    for (l, nz) in layers.iter().zip(&nonzero) {
        assert_eq!(l.read().rank_pattern(), *nz);
    }
    Ok(())
}

/// A tiny regression trained with the allocator as a step hook through the whole schedule.
#[test]
fn full_schedule_ends_at_target_and_reapplies_final_mask() -> R {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let layers: Vec<_> = (0..3)
        .map(|i| Ok(Shared::new(layer(&vb, &format!("m{i}"), 6, 6, 4)?)))
        .collect::<lorakit::Result<_>>()?;
    let mut cfg = RankAllocatorConfig::new(24);
    (cfg.target_r, cfg.tinit, cfg.tfinal, cfg.delta_t) = (2, 3, 6, 2);
    let mut alloc = RankAllocator::new(&erased(&layers), cfg)?;
    let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 2e-2)?;
    let mut rng = lorakit::init::SeededRng::new(7);
    let x = rng.normal((32, 6), 0.0, 1.0, DType::F32, &dev())?;
    let target = rng.normal((32, 6), 0.0, 1.0, DType::F32, &dev())?;
    for step in 1..=24 {
        let mut h = x.clone();
        for l in &layers {
            h = l.read().forward_t(&h, true)?;
        }
        let loss = ((h - &target)?.sqr()?.mean_all()? + alloc.orthogonality_penalty()?)?;
        train_step(&loss, &mut opt, &mut [&mut alloc], step)?;
        let nonzero: usize = layers
            .iter()
            .map(|l| {
                f64_values(l.read().e().as_tensor())
                    .iter()
                    .filter(|v| **v != 0.0)
                    .count()
            })
            .sum();
        let b = alloc.schedule(step);
        if b.mask {
            assert_eq!(nonzero, b.budget, "step {step}");
        }
        if step >= 18 {
            assert_eq!(nonzero, 6, "final mask at step {step}");
        }
    }
    let kept: usize = layers.iter().map(|l| l.read().kept_rank()).sum();
    assert_eq!(kept, alloc.target_budget());
    let pattern = alloc.rank_pattern();
    assert_eq!(pattern.len(), 3);
    assert_eq!(pattern.values().flatten().filter(|k| **k).count(), 6);
    assert!(pattern.contains_key("m0.lora_E"));
    Ok(())
}

#[test]
fn truncated_save_loads_back() -> R {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let mut l = layer(&vb, "out", 5, 4, 4)?;
    l.a().set(&Tensor::randn(0f32, 1., (4, 5), &dev())?)?;
    set_e(&l, &[0.3, -0.8, 1.1, 0.6])?;
    l.apply_mask(&[true, false, true, false])?;
    let x = Tensor::randn(0f32, 1., (3, 5), &dev())?;
    let y = mat(&l.forward_t(&x, false)?);
    let saved = l.tensors_to_save()?;
    let names: Vec<_> = saved.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["lora_A", "lora_B", "lora_E"]);
    let get = |n: &str| saved.iter().find(|(k, _)| k == n).unwrap().1.clone();
    assert_eq!(get("lora_A").dims(), &[2, 5]);
    assert_eq!(get("lora_B").dims(), &[4, 2]);
    assert_eq!(
        f64_values(&get("lora_E")),
        f64_values(&Tensor::new(&[0.3f32, 1.1], &dev())?)
    );
    let saved_aeb = || (get("lora_A"), get("lora_E"), get("lora_B"));
    let back = from_tensors("out", l.base().clone(), saved_aeb(), 4, 6.0, None)?;
    assert_eq!(back.scale(), l.scale());
    assert_eq!(back.rank(), 2);
    assert!(max_diff(&mat(&back.forward_t(&x, false)?), &y) < 1e-5);
    assert!(max_diff(&mat(&back.delta_weight()?), &mat(&l.delta_weight()?)) < 1e-6);
    // Without a pattern, the rows are the first initial ranks.
    assert_eq!(back.rank_pattern(), vec![true, true, false, false]);
    // With the saved pattern, the layer knows which initial ranks it holds.
    let back = from_tensors(
        "out",
        l.base().clone(),
        saved_aeb(),
        4,
        6.0,
        Some(l.rank_pattern()),
    )?;
    assert_eq!(back.rank_pattern(), vec![true, false, true, false]);
    // A pattern whose kept count is not the tensors' rank is refused.
    let err = from_tensors(
        "out",
        l.base().clone(),
        saved_aeb(),
        4,
        6.0,
        Some(vec![true, true, true, false]),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "rank_pattern",
                ..
            }
        ),
        "{err:?}"
    );
    // A rank that exceeds init_r is refused.
    assert!(from_tensors("out", l.base().clone(), saved_aeb(), 1, 6.0, None).is_err());
    Ok(())
}

#[test]
fn invalid_configs_are_errors() -> R {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let l = Shared::new(layer(&vb, "x", 3, 3, 2)?);
    let mut cfg = RankAllocatorConfig::new(10);
    cfg.target_r = 2; // equals init_r: nothing to prune
    assert!(RankAllocator::new(&[l.clone().erase()], cfg.clone()).is_err());
    cfg.target_r = 1;
    cfg.tinit = 10;
    assert!(RankAllocator::new(&[l.clone().erase()], cfg.clone()).is_err());
    cfg.tinit = 0;
    cfg.beta1 = 1.0;
    let err = RankAllocator::new(&[l.erase()], cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("beta1"), "{err}");
    Ok(())
}

/// A truncated adapter saved by PEFT 0.21 (tests/fixtures/adalora_peft.py) loads through
/// `from_weights` and reproduces PEFT's output; re-saving gives PEFT's names and shapes.
#[test]
fn peft_truncated_adapter_loads_and_matches_peft_output() -> R {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/adalora_peft");
    let adapter =
        candle_core::safetensors::load(format!("{dir}/adapter_model.safetensors"), &dev())?;
    let reference = candle_core::safetensors::load(format!("{dir}/reference.safetensors"), &dev())?;
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let init_r = config["init_r"].as_u64().unwrap() as usize;
    let alpha = config["lora_alpha"].as_f64().unwrap();
    let mut layers = Vec::new();
    for name in ["lin0", "lin1"] {
        let base = FrozenLinear::new(
            reference[&format!("{name}.weight")].clone(),
            Some(reference[&format!("{name}.bias")].clone()),
        )?;
        let key = |t: &str| adapter[&format!("base_model.model.{name}.{t}")].clone();
        let pattern: Vec<bool> = config["rank_pattern"][format!("{name}.lora_E")]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect();
        let l = from_tensors(
            name,
            base,
            (key("lora_A"), key("lora_E"), key("lora_B")),
            init_r,
            alpha,
            Some(pattern.clone()),
        )?;
        assert_eq!(l.rank_pattern(), pattern);
        for (suffix, t) in l.tensors_to_save()? {
            assert_eq!(f64_values(&t), f64_values(&key(&suffix)), "{name}.{suffix}");
            assert_eq!(t.dims(), key(&suffix).dims());
        }
        layers.push(l);
    }
    let h = layers[0].forward_t(&reference["x"], false)?.relu()?;
    let y = layers[1].forward_t(&h, false)?;
    assert!(max_diff(&mat(&y), &mat(&reference["y"])) < 1e-5);
    // The adapter matters: without it the output differs.
    let h0 = layers[0].base().forward(&reference["x"])?.relu()?;
    let y0 = layers[1].base().forward(&h0)?;
    assert!(max_diff(&mat(&y0), &mat(&reference["y"])) > 1e-3);
    Ok(())
}

#[derive(serde::Deserialize)]
struct ParamRecord {
    value: Vec<f32>,
    grad: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct AllocStep {
    step: usize,
    params: std::collections::HashMap<String, ParamRecord>,
    scores: std::collections::HashMap<String, Vec<f64>>,
    e_after: std::collections::HashMap<String, Vec<f64>>,
    rank_pattern: Option<std::collections::BTreeMap<String, Vec<bool>>>,
}

#[derive(serde::Deserialize)]
struct AllocFixture {
    init_r: usize,
    target_r: usize,
    tinit: usize,
    tfinal: usize,
    delta_t: usize,
    total_step: usize,
    steps: Vec<AllocStep>,
}

/// PEFT's RankAllocator fed the same values and gradients (tests/fixtures/adalora_allocator.py):
/// same triplet scores, same masked E, same rank pattern.
#[test]
fn allocator_matches_peft_rank_allocator() -> R {
    let fx: AllocFixture =
        serde_json::from_str(include_str!("../fixtures/adalora_allocator.json")).unwrap();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev());
    let cfg = AdaLoraConfig::new(fx.init_r, 6.0);
    let names = ["lin0", "lin1"];
    let layers: Vec<Shared<AdaLoraLinear>> = [(5, 3), (3, 4)]
        .iter()
        .zip(names)
        .map(|(&(d_in, d_out), n)| {
            Ok(Shared::new(AdaLoraLinear::new(
                base(d_in, d_out, 1)?,
                &cfg,
                vb.pp(n),
            )?))
        })
        .collect::<lorakit::Result<_>>()?;
    let mut config = RankAllocatorConfig::new(fx.total_step);
    (config.target_r, config.tinit, config.tfinal, config.delta_t) =
        (fx.target_r, fx.tinit, fx.tfinal, fx.delta_t);
    let mut alloc = RankAllocator::new(&erased(&layers), config)?;
    for st in &fx.steps {
        let mut inserts = Vec::new();
        for (l, name) in layers.iter().zip(names) {
            let l = l.read();
            for (part, var) in [("lora_A", l.a()), ("lora_E", l.e()), ("lora_B", l.b())] {
                let rec = &st.params[&format!("{name}.{part}")];
                var.set(&Tensor::from_vec(rec.value.clone(), var.shape(), &dev())?)?;
                inserts.push((var.as_tensor().clone(), rec.grad.clone()));
            }
        }
        let pairs: Vec<(&Tensor, Vec<f32>)> = inserts.iter().map(|(t, g)| (t, g.clone())).collect();
        let masked = alloc.update_and_allocate(st.step, &grads_for(&pairs)?)?;
        assert_eq!(
            masked.is_some(),
            st.rank_pattern.is_some(),
            "step {}",
            st.step
        );
        for (got, name) in alloc.triplet_scores()?.iter().zip(names) {
            let want = &st.scores[name];
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1e-9),
                    "{name}: {got:?} vs {want:?}"
                );
            }
        }
        for (l, name) in layers.iter().zip(names) {
            let e = f64_values(l.read().e().as_tensor());
            for (g, w) in e.iter().zip(&st.e_after[name]) {
                assert!((g - w).abs() < 1e-6, "{name}: {e:?}");
            }
        }
        if let Some(p) = &st.rank_pattern {
            assert_eq!(&alloc.rank_pattern(), p);
        }
    }
    Ok(())
}
