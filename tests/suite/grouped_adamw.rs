//! GroupedAdamW against candle_nn::AdamW, bit for bit.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use lorakit::init::SeededRng;
use lorakit::train::{GroupedAdamW, ParamGroup};

const DEV: Device = Device::Cpu;

/// Two pairs of variables with identical starting values.
fn twin_vars(seed: u64, shapes: &[(usize, usize)]) -> (Vec<Var>, Vec<Var>) {
    let mut rng = SeededRng::new(seed);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for &s in shapes {
        let t = rng.normal(s, 0.0, 1.0, DType::F32, &DEV).unwrap();
        a.push(Var::from_tensor(&t).unwrap());
        b.push(Var::from_tensor(&t.copy().unwrap()).unwrap());
    }
    (a, b)
}

/// A loss of the vars that changes with the step (so gradients differ per step).
fn loss(vars: &[Var], x: &Tensor) -> Tensor {
    let h = x.matmul(&vars[0].as_tensor().t().unwrap()).unwrap();
    let y = h.matmul(&vars[1].as_tensor().t().unwrap()).unwrap();
    (y.tanh().unwrap().sqr().unwrap().sum_all().unwrap()
        + vars[2].as_tensor().sqr().unwrap().sum_all().unwrap())
    .unwrap()
}

fn bits(vars: &[Var]) -> Vec<Vec<u32>> {
    vars.iter()
        .map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

const SHAPES: [(usize, usize); 3] = [(3, 5), (4, 3), (2, 7)];

#[test]
fn one_group_equals_candle_adamw_bit_for_bit() {
    let (ours_v, theirs_v) = twin_vars(1, &SHAPES);
    let params = ParamsAdamW {
        lr: 3e-2,
        weight_decay: 0.05,
        ..Default::default()
    };
    let mut ours =
        GroupedAdamW::new(vec![ParamGroup::new("all", ours_v.clone())], params.clone()).unwrap();
    let mut theirs = candle_nn::AdamW::new(theirs_v.clone(), params).unwrap();
    let mut rng = SeededRng::new(7);
    for step in 0..10 {
        let x = rng.normal((6, 5), 0.0, 1.0, DType::F32, &DEV).unwrap();
        if step == 5 {
            // a schedule change between steps
            Optimizer::set_learning_rate(&mut ours, 1e-2);
            theirs.set_learning_rate(1e-2);
        }
        ours.backward_step(&loss(&ours_v, &x)).unwrap();
        theirs.backward_step(&loss(&theirs_v, &x)).unwrap();
        assert_eq!(bits(&ours_v), bits(&theirs_v), "step {step}");
    }
    assert_ne!(bits(&ours_v), bits(&twin_vars(1, &SHAPES).0));
}

#[test]
fn optimizer_trait_new_equals_candle_adamw() {
    let (ours_v, theirs_v) = twin_vars(2, &SHAPES);
    let mut ours =
        <GroupedAdamW as Optimizer>::new(ours_v.clone(), ParamsAdamW::default()).unwrap();
    let mut theirs = candle_nn::AdamW::new(theirs_v.clone(), ParamsAdamW::default()).unwrap();
    let x = SeededRng::new(3)
        .normal((6, 5), 0.0, 1.0, DType::F32, &DEV)
        .unwrap();
    for _ in 0..10 {
        Optimizer::backward_step(&mut ours, &loss(&ours_v, &x)).unwrap();
        theirs.backward_step(&loss(&theirs_v, &x)).unwrap();
    }
    assert_eq!(bits(&ours_v), bits(&theirs_v));
}

/// Each group behaves as its own candle AdamW with that group's lr and decay, all stepping
/// from the same gradients.
#[test]
fn groups_equal_separate_candle_adamws() {
    let (ours_v, theirs_v) = twin_vars(4, &SHAPES);
    let defaults = ParamsAdamW {
        lr: 1e-2,
        ..Default::default()
    };
    let mut ours = GroupedAdamW::new(
        vec![
            ParamGroup::new("a", vec![ours_v[0].clone()]),
            ParamGroup::new("b", vec![ours_v[1].clone(), ours_v[2].clone()])
                .with_lr(1.6e-1)
                .with_weight_decay(0.0),
        ],
        defaults.clone(),
    )
    .unwrap();
    let mut theirs_a = candle_nn::AdamW::new(vec![theirs_v[0].clone()], defaults).unwrap();
    let b_params = ParamsAdamW {
        lr: 1.6e-1,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut theirs_b =
        candle_nn::AdamW::new(vec![theirs_v[1].clone(), theirs_v[2].clone()], b_params).unwrap();
    let mut rng = SeededRng::new(5);
    for step in 0..10 {
        let x = rng.normal((6, 5), 0.0, 1.0, DType::F32, &DEV).unwrap();
        if step == 4 {
            let b = ours.group_index("b").unwrap();
            ours.set_group_lr(b, 5e-2).unwrap();
            theirs_b.set_learning_rate(5e-2);
        }
        ours.backward_step(&loss(&ours_v, &x)).unwrap();
        let grads = loss(&theirs_v, &x).backward().unwrap();
        theirs_a.step(&grads).unwrap();
        theirs_b.step(&grads).unwrap();
        assert_eq!(bits(&ours_v), bits(&theirs_v), "step {step}");
    }
}

#[test]
fn schedules_keep_group_ratios() {
    let (v, _) = twin_vars(6, &SHAPES);
    let mut opt = GroupedAdamW::new(
        vec![
            ParamGroup::new("a", vec![v[0].clone()]),
            ParamGroup::new("b", vec![v[1].clone()]).with_lr(16e-3),
        ],
        ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    Optimizer::set_learning_rate(&mut opt, 5e-4);
    assert_eq!(Optimizer::learning_rate(&opt), 5e-4);
    assert_eq!(opt.group_lr(0), Some(5e-4));
    assert!((opt.group_lr(1).unwrap() - 8e-3).abs() < 1e-15);
    opt.set_lr_factor(0.25);
    assert!((opt.group_lr(1).unwrap() - 4e-3).abs() < 1e-15);
    assert_eq!(opt.group_of(&v[1]), Some(1));
    assert_eq!(opt.group_of(&v[2]), None);
}

#[test]
fn invalid_groups_are_errors() {
    let (v, _) = twin_vars(8, &SHAPES);
    let dup = GroupedAdamW::new(
        vec![
            ParamGroup::new("a", vec![v[0].clone()]),
            ParamGroup::new("b", vec![v[0].clone()]),
        ],
        ParamsAdamW::default(),
    );
    assert!(dup.unwrap_err().to_string().contains("`b`"));
    let neg = GroupedAdamW::new(
        vec![ParamGroup::new("neg", vec![v[1].clone()]).with_lr(-1.0)],
        ParamsAdamW::default(),
    );
    assert!(neg.unwrap_err().to_string().contains("neg"));
    let beta = GroupedAdamW::new(
        vec![],
        ParamsAdamW {
            beta1: 1.0,
            ..Default::default()
        },
    );
    assert!(beta.is_err());
}

/// `sum(var · c)`: a gradient `c` that does not depend on the variable's value, so an f32
/// run and a bf16 run see the same gradients.
fn linear_loss(var: &Var, c: &Tensor) -> Tensor {
    (var.as_tensor().to_dtype(DType::F32).unwrap() * c)
        .unwrap()
        .sum_all()
        .unwrap()
}

/// A variable holding `start` in `dtype` and an AdamW over it alone.
fn one_var_adamw(start: &Tensor, dtype: DType, params: &ParamsAdamW) -> (Var, GroupedAdamW) {
    let var = Var::from_tensor(&start.to_dtype(dtype).unwrap()).unwrap();
    let opt = GroupedAdamW::new(
        vec![ParamGroup::new("w", vec![var.clone()])],
        params.clone(),
    )
    .unwrap();
    (var, opt)
}

#[test]
fn half_precision_vars_train_on_an_f32_master_copy() {
    // Steps of lr = 1e-3 on values near 1: below half a bf16 ulp (2^-8), so updating the
    // bf16 value itself would round every step away. The master copy follows an f32 run
    // bit for bit, and the bf16 variable holds its rounding.
    let mut rng = SeededRng::new(3);
    let start = (rng.uniform(16, -0.5, 0.5, DType::F32, &DEV).unwrap() + 1.0).unwrap();
    let start = start
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    // bf16-representable, as the cast's backward rounds the half run's gradient to bf16.
    let c = rng.normal(16, 0.0, 1.0, DType::F32, &DEV).unwrap();
    let c = c
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 0.01,
        ..Default::default()
    };
    let (full, mut opt_full) = one_var_adamw(&start, DType::F32, &params);
    let (half, mut opt_half) = one_var_adamw(&start, DType::BF16, &params);
    for _ in 0..50 {
        opt_full.backward_step(&linear_loss(&full, &c)).unwrap();
        opt_half.backward_step(&linear_loss(&half, &c)).unwrap();
    }
    let rounded = full.as_tensor().to_dtype(DType::BF16).unwrap();
    let got = half
        .as_tensor()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = rounded
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got, want);
    let moved = (full.as_tensor() - &start)
        .unwrap()
        .abs()
        .unwrap()
        .min_all()
        .unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 0.04,
        "the f32 run moved every value"
    );
    let (_, m, _) = opt_half.moments().into_iter().next().unwrap();
    assert_eq!(m.dtype(), DType::F32);
}

#[test]
fn half_precision_vars_pick_up_outside_writes() {
    // Zeroing some elements (as AdaLoRA's masking does) between steps: those restart from
    // zero, the others continue from the master copy.
    let c = Tensor::new(&[1f32, -1., 0.5, 2.], &DEV).unwrap();
    let params = ParamsAdamW {
        lr: 1e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let start = Tensor::new(&[1f32, 1., 1., 1.], &DEV).unwrap();
    let (full, mut opt_full) = one_var_adamw(&start, DType::F32, &params);
    let (half, mut opt_half) = one_var_adamw(&start, DType::BF16, &params);
    let mask = Tensor::new(&[1f32, 0., 1., 0.], &DEV).unwrap();
    for step in 0..20 {
        if step == 10 {
            full.set(&(full.as_tensor() * &mask).unwrap()).unwrap();
            half.set(&(half.as_tensor() * mask.to_dtype(DType::BF16).unwrap()).unwrap())
                .unwrap();
        }
        opt_full.backward_step(&linear_loss(&full, &c)).unwrap();
        opt_half.backward_step(&linear_loss(&half, &c)).unwrap();
    }
    let want = full
        .as_tensor()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let got = half.as_tensor().to_dtype(DType::F32).unwrap();
    // Elements 0 and 2 continued from the master (exact); 1 and 3 restarted from the
    // written zero, as the f32 run did (exact too: zero is representable).
    assert_eq!(
        got.to_vec1::<f32>().unwrap(),
        want.to_vec1::<f32>().unwrap()
    );
}
