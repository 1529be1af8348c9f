//! LoRA+: parameter groups, and faster convergence than LoRA on a small task.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::train::{GroupedAdamW, LoraPlus, GROUP_A, GROUP_B, GROUP_B_NO_DECAY, GROUP_EMBEDDING};
use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraLinear, NamedVar, ParamRole, Shared};

const DEV: Device = Device::Cpu;

fn var(shape: &[usize]) -> Var {
    Var::zeros(shape, DType::F32, &DEV).unwrap()
}

fn named(name: &str, role: ParamRole, v: &Var) -> NamedVar {
    NamedVar {
        name: name.to_string(),
        role,
        var: v.clone(),
    }
}

fn lora_layer(varmap: &VarMap, name: &str, d: usize) -> LoraLinear {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &DEV);
    let w = SeededRng::new(3)
        .normal((d, d), 0.0, 0.3, DType::F32, &DEV)
        .unwrap();
    LoraLinear::new(
        FrozenLinear::new(w, None).unwrap(),
        &LoraConfig::new(2, 4.0),
        vb.pp(name),
    )
    .unwrap()
}

/// `(group name, lr, weight decay)` of `v` in `opt`.
fn placement(opt: &GroupedAdamW, v: &Var) -> (String, f64, f64) {
    let g = opt.group_of(v).expect("variable in a group");
    (
        opt.group_names()[g].to_string(),
        opt.group_lr(g).unwrap(),
        opt.group_weight_decay(g).unwrap(),
    )
}

#[test]
fn each_role_lands_in_its_group_with_its_lr() {
    let (lr, ratio, wd, emb_lr) = (2e-4, 8.0, 0.1, 3e-6);
    let recipe = LoraPlus::new(lr)
        .with_ratio(ratio)
        .with_weight_decay(wd)
        .with_embedding_lr(emb_lr);
    let varmap = VarMap::new();
    let layer = lora_layer(&varmap, "q_proj", 6);
    let magnitude = var(&[6]);
    let bias = var(&[6]);
    let other_matrix = var(&[3, 4]);
    let other_vector = var(&[4]);
    let emb_a = var(&[2, 10]);
    let emb_b = var(&[6, 2]);
    let mut vars: Vec<(String, NamedVar)> = layer
        .trainable_vars()
        .into_iter()
        .map(|v| ("q_proj".to_string(), v))
        .collect();
    let extra = [
        (
            "dora",
            named("lora_magnitude_vector", ParamRole::Vector, &magnitude),
        ),
        ("dora", named("lora_B.bias", ParamRole::Vector, &bias)),
        ("head", named("weight", ParamRole::Other, &other_matrix)),
        ("head", named("scale", ParamRole::Other, &other_vector)),
        (
            "embed",
            named("lora_embedding_A", ParamRole::Embedding, &emb_a),
        ),
        (
            "embed",
            named("lora_embedding_B", ParamRole::Embedding, &emb_b),
        ),
    ];
    vars.extend(extra.iter().map(|(l, v)| (l.to_string(), v.clone())));
    let opt = recipe.build(vars).unwrap();

    let a = layer.pair().a.var().unwrap();
    let b = layer.pair().b.var().unwrap();
    let expect = |v: &Var, group: &str, g_lr: f64, g_wd: f64| {
        let (name, got_lr, got_wd) = placement(&opt, v);
        assert_eq!(name, group, "shape {:?}", v.dims());
        assert_eq!(got_lr, g_lr, "lr of {group}");
        assert_eq!(got_wd, g_wd, "weight decay of {group}");
    };
    expect(a, GROUP_A, lr, wd);
    expect(&other_matrix, GROUP_A, lr, wd);
    expect(b, GROUP_B, lr * ratio, wd);
    expect(&magnitude, GROUP_B, lr * ratio, wd);
    expect(&other_vector, GROUP_B, lr * ratio, wd);
    expect(&bias, GROUP_B_NO_DECAY, lr * ratio, 0.0);
    expect(&emb_a, GROUP_EMBEDDING, emb_lr, wd);
    expect(&emb_b, GROUP_EMBEDDING, emb_lr, wd);
    assert_eq!(opt.num_groups(), 4);
}

#[test]
fn defaults_and_adapter_entry_points() {
    let recipe = LoraPlus::new(1e-3);
    assert_eq!(recipe.ratio, 16.0);
    assert_eq!(recipe.embedding_lr, 1e-6);
    let varmap = VarMap::new();
    let l1 = lora_layer(&varmap, "l1", 4);
    let l2 = lora_layer(&varmap, "l2", 4);
    let (a1, b2) = (
        l1.pair().a.var().unwrap().clone(),
        l2.pair().b.var().unwrap().clone(),
    );
    let opt = recipe
        .build_from_adapters([&l1 as &dyn Adapter, &l2])
        .unwrap();
    assert_eq!(opt.group_names(), [GROUP_A, GROUP_B]); // empty groups left out
    assert_eq!(placement(&opt, &a1).1, 1e-3);
    assert_eq!(placement(&opt, &b2).1, 1e-3 * 16.0);

    // A pair shared by two layers is listed once.
    let l3 = LoraLinear::from_weights(
        "l3",
        l1.base().clone(),
        &LoraConfig::new(2, 2.0), // scale 1
        l1.pair().clone(),
    )
    .unwrap();
    let shared: Vec<Shared<dyn Adapter>> = vec![Shared::new(l1).erase(), Shared::new(l3).erase()];
    let opt = recipe.build_from_shared(&shared).unwrap();
    assert_eq!(opt.group_vars(0).unwrap().len(), 1);
    assert!(LoraPlus::new(1e-3)
        .with_ratio(0.0)
        .build(Vec::new())
        .is_err());
}

/// Steps until the training loss falls to `target` (or `None` within `max_steps`).
fn steps_to_loss(
    ratio: f64,
    lr: f64,
    target_fraction: f64,
    max_steps: usize,
) -> (Option<usize>, f64) {
    let (d_in, d_out, n) = (16, 12, 64);
    let mut rng = SeededRng::new(2024);
    let w0 = rng
        .normal((d_out, d_in), 0.0, 0.3, DType::F32, &DEV)
        .unwrap();
    let b_star = rng.normal((d_out, 2), 0.0, 0.5, DType::F32, &DEV).unwrap();
    let a_star = rng.normal((2, d_in), 0.0, 0.5, DType::F32, &DEV).unwrap();
    let w_star = (&w0 + b_star.matmul(&a_star).unwrap()).unwrap();
    let x = rng.normal((n, d_in), 0.0, 1.0, DType::F32, &DEV).unwrap();
    let y = x.matmul(&w_star.t().unwrap()).unwrap();

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &DEV);
    let config = LoraConfig {
        seed: 11,
        ..LoraConfig::new(4, 4.0)
    };
    let layer =
        LoraLinear::new(FrozenLinear::new(w0, None).unwrap(), &config, vb.pp("fc")).unwrap();
    let mut opt = LoraPlus::new(lr)
        .with_ratio(ratio)
        .with_weight_decay(0.0)
        .build_from_adapters([&layer as &dyn Adapter])
        .unwrap();
    let loss_of = |l: &LoraLinear| -> Tensor {
        (l.forward_t(&x, true).unwrap() - &y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let initial = loss_of(&layer).to_scalar::<f32>().unwrap() as f64;
    let target = initial * target_fraction;
    for step in 1..=max_steps {
        let loss = loss_of(&layer);
        opt.backward_step(&loss).unwrap();
        let after = loss_of(&layer).to_scalar::<f32>().unwrap() as f64;
        if after <= target {
            return (Some(step), initial);
        }
    }
    (None, initial)
}

#[test]
fn lora_plus_reaches_the_loss_in_fewer_steps_than_lora() {
    let (fraction, max_steps) = (0.05, 4000);
    for lr in [5e-4, 2e-3] {
        let (lora, initial) = steps_to_loss(1.0, lr, fraction, max_steps);
        let (plus, _) = steps_to_loss(16.0, lr, fraction, max_steps);
        eprintln!(
            "loss {initial:.4} -> {:.4} at base lr {lr}: LoRA {lora:?} steps, LoRA+ (ratio 16) {plus:?} steps",
            initial * fraction
        );
        let lora = lora.expect("LoRA reaches the target");
        let plus = plus.expect("LoRA+ reaches the target");
        assert!(plus < lora, "lr {lr}: LoRA+ {plus} steps vs LoRA {lora}");
    }
}
