//! The uniform API: every variant through one plan constructor and one save path, training
//! rules picking their layers out of a mixed model, the `Variant` enum, the VarBuilder
//! prefix guard, and `apply_t` versus `forward_t`.

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::model::{linear, AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
use lorakit::peft::{save_adapter, PeftAdapter, PeftConfig};
use lorakit::train::{orthogonality_penalty, DeltaLoraUpdate, LoraDropConfig, RankAllocatorConfig};
use lorakit::{
    AdaLoraConfig, AdaLoraLinear, Adapter, DeltaLoraHook, DeltaLoraLinear, DoraLinear, Error,
    FrozenLinear, LoraConfig, LoraDrop, LoraDropLinear, LoraFaLinear, LoraFaProjection, LoraInit,
    LoraLinear, RankAllocator, Shared, Variant, VeraConfig, VeraLinear, VeraShared,
};

fn targets() -> TargetSpec {
    TargetSpec::new(ModuleSelector::list(["q", "v"]))
}

fn vb(map: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(map, DType::F32, &Device::Cpu)
}

/// Builds a three-layer model (`q`, `v`, `o`, 8 → 8; `o` not targeted) with `plan` over a
/// fresh zero base; returns its adapted layers.
fn build(plan: &AdapterPlan) -> Vec<Shared<dyn Adapter>> {
    build_over(plan, &VarMap::new())
}

/// [`build`] over the base weights in `base` (created as zeros if missing).
fn build_over(plan: &AdapterPlan, base: &VarMap) -> Vec<Shared<dyn Adapter>> {
    let base_vb = vb(base);
    linear(8, 8, base_vb.pp("q"), plan).unwrap();
    linear(8, 8, base_vb.pp("v"), plan).unwrap();
    linear(8, 8, base_vb.pp("o"), plan).unwrap();
    plan.finish()
        .unwrap()
        .layers()
        .into_iter()
        .map(|(_, l)| l)
        .collect()
}

/// One plan per variant's layer type, all through `AdapterPlan::of` or its named forms.
fn plans(adapter: &VarMap) -> Vec<(Variant, AdapterPlan)> {
    let ranks = RankAlpha::new(4, 8.0);
    let lora = LoraConfig::new(4, 8.0);
    let pair = VeraShared::covering(4, 0, [(8, 8)], DType::F32, &Device::Cpu).unwrap();
    let v = |name: &str| vb(adapter).pp(name);
    vec![
        (
            Variant::Lora,
            AdapterPlan::lora(targets(), ranks.clone(), lora.clone(), v("lora")),
        ),
        (
            Variant::LoraFa,
            AdapterPlan::lora_fa(targets(), ranks.clone(), lora.clone(), v("fa")),
        ),
        (
            Variant::LoraDrop,
            AdapterPlan::lora_drop(targets(), ranks.clone(), lora.clone(), v("drop")),
        ),
        (
            Variant::DeltaLora,
            AdapterPlan::delta_lora(targets(), ranks.clone(), lora.clone(), v("delta")),
        ),
        (
            Variant::Dora,
            AdapterPlan::dora(targets(), ranks.clone(), lora.clone(), v("dora")),
        ),
        (
            Variant::AdaLora,
            AdapterPlan::adalora(targets(), ranks, AdaLoraConfig::new(4, 8.0), v("ada")),
        ),
        (
            Variant::Vera,
            AdapterPlan::vera(targets(), VeraConfig::new(pair), v("vera")),
        ),
    ]
}

#[test]
fn every_variant_builds_through_a_plan_with_its_own_kind() {
    let adapter = VarMap::new();
    for (variant, plan) in plans(&adapter) {
        let layers = build(&plan);
        assert_eq!(layers.len(), 2, "{variant}");
        for l in &layers {
            assert_eq!(l.read().kind(), variant);
        }
    }
}

#[test]
fn training_rules_pick_their_layers_out_of_a_mixed_model() {
    let adapter = VarMap::new();
    let all: Vec<Shared<dyn Adapter>> = plans(&adapter)
        .iter()
        .flat_map(|(_, plan)| build(plan))
        .collect();
    assert_eq!(all.len(), 14);
    assert_eq!(LoraFaProjection::new(&all).unwrap().len(), 2);
    let drop = LoraDrop::new(&all, LoraDropConfig::default()).unwrap();
    assert_eq!(drop.layers().len(), 2);
    assert!(drop
        .layers()
        .iter()
        .all(|l| l.read().kind() == Variant::LoraDrop));
    DeltaLoraHook::new(&all, DeltaLoraUpdate::new(0.5, 0)).unwrap();
    let config = RankAllocatorConfig {
        target_r: 2,
        ..RankAllocatorConfig::new(10)
    };
    let alloc = RankAllocator::new(&all, config).unwrap();
    assert_eq!(alloc.layers().len(), 2);
    assert_eq!(alloc.init_budget(), 8);
    // The penalty over the whole model equals the one over its AdaLoRA layers.
    let whole = orthogonality_penalty(&all).unwrap();
    let own = orthogonality_penalty(alloc.layers()).unwrap();
    assert_eq!(
        whole.to_scalar::<f32>().unwrap(),
        own.to_scalar::<f32>().unwrap()
    );
}

#[test]
fn a_rule_without_layers_of_its_variant_is_an_error_naming_it() {
    let adapter = VarMap::new();
    let (_, plan) = plans(&adapter).swap_remove(0);
    let lora_only = build(&plan);
    let err = DeltaLoraHook::new(&lora_only, DeltaLoraUpdate::new(0.5, 0)).unwrap_err();
    assert!(matches!(err, Error::Usage { .. }), "{err}");
    assert!(err.to_string().contains("Delta-LoRA"), "{err}");
    let err = RankAllocator::new(&lora_only, RankAllocatorConfig::new(10)).unwrap_err();
    assert!(err.to_string().contains("AdaLoRA"), "{err}");
    assert!(LoraFaProjection::new(&lora_only).is_err());
    assert!(LoraDrop::new(&lora_only, LoraDropConfig::default()).is_err());
}

#[test]
fn lora_drop_checks_its_settings_when_built() {
    let adapter = VarMap::new();
    let (_, plan) = plans(&adapter).swap_remove(2);
    let layers = build(&plan);
    assert!(LoraDrop::new(&layers, LoraDropConfig::default()).is_ok());
    for config in [
        LoraDropConfig {
            sample: lorakit::SampleSize::Fraction(1.5),
            ..LoraDropConfig::default()
        },
        LoraDropConfig {
            sample: lorakit::SampleSize::Count(0),
            ..LoraDropConfig::default()
        },
        LoraDropConfig {
            selection: lorakit::Selection::Threshold(0.0),
            ..LoraDropConfig::default()
        },
    ] {
        let err = LoraDrop::new(&layers, config.clone()).unwrap_err();
        assert!(err.to_string().contains("LoRA-drop"), "{config:?}: {err}");
    }
}

#[test]
fn variant_names_round_trip() {
    for v in Variant::ALL {
        assert_eq!(v.id().parse::<Variant>().unwrap(), v);
        assert_eq!(v.name().parse::<Variant>().unwrap(), v);
        assert_eq!(v.to_string(), v.name());
    }
    let err = "ia3".parse::<Variant>().unwrap_err();
    assert!(err.to_string().contains("delta-lora"), "{err}");
}

/// Sets every variable of `map` to seeded random values.
fn randomize(map: &VarMap, seed: u64) {
    let mut rng = lorakit::init::SeededRng::new(seed);
    for var in map.all_vars() {
        let t = var.as_tensor();
        let values = rng
            .uniform(t.shape().clone(), -0.5, 0.5, t.dtype(), t.device())
            .unwrap();
        var.set(&values).unwrap();
    }
}

#[test]
fn every_variant_saves_under_the_config_peft_reads_and_loads_back() {
    let dev = Device::Cpu;
    let adapter = VarMap::new();
    for (i, (variant, plan)) in plans(&adapter).into_iter().enumerate() {
        // The base weights exist before the model is built, as when loaded from a file.
        let base = VarMap::new();
        for m in ["q", "v", "o"] {
            vb(&base).pp(m).get((8, 8), "weight").unwrap();
            vb(&base).pp(m).get(8, "bias").unwrap();
        }
        randomize(&base, 2 * i as u64);
        let layers = plan.finish().unwrap();
        build_over(&plan, &base);
        randomize(&adapter, 2 * i as u64 + 1);
        let mut config = PeftConfig::new(variant, 4, 8.0, &["q", "v"]);
        config.raw.insert("total_step".into(), 10.into());
        let dir = std::env::temp_dir().join(format!(
            "lorakit-api-shape-{}-{}",
            variant.id(),
            std::process::id()
        ));
        save_adapter(&dir, &config, &layers).unwrap();
        let loaded = PeftAdapter::load(&dir, &dev).unwrap();
        assert_eq!(loaded.config().variant(), variant.saved_as(), "{variant}");
        // Delta-LoRA's updated W is saved as `base_layer.weight`, which PEFT loads into the
        // base layer, and so does lorakit's loader: the reloaded outputs below include it.
        let reloaded = build_over(&loaded.plan().unwrap(), &base);
        assert_eq!(reloaded.len(), 2);
        let x = lorakit::init::SeededRng::new(99)
            .uniform((3, 8), -1.0, 1.0, DType::F32, &dev)
            .unwrap();
        for (l, r) in layers.layers().iter().zip(&reloaded) {
            let (a, b) = (l.1.forward(&x).unwrap(), r.forward(&x).unwrap());
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(scale > 0.1, "{variant}: a trivial output proves nothing");
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5 * scale, "{variant}");
            assert_eq!(r.read().kind(), variant.saved_as());
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn saving_a_layer_under_another_variants_config_is_an_error() {
    let adapter = VarMap::new();
    let dora = AdapterPlan::dora(
        targets(),
        RankAlpha::new(4, 8.0),
        LoraConfig::new(4, 8.0),
        vb(&adapter),
    );
    build(&dora);
    let dir = std::env::temp_dir().join(format!("lorakit-api-mismatch-{}", std::process::id()));
    let lora_config = PeftConfig::new(Variant::Lora, 4, 8.0, &["q", "v"]);
    let err = save_adapter(&dir, &lora_config, &dora.finish().unwrap()).unwrap_err();
    assert!(err.to_string().contains("DoRA"), "{err}");
    assert!(!dir.exists(), "nothing written");
}

#[test]
fn two_layers_under_one_prefix_are_refused() {
    let dev = Device::Cpu;
    let adapter = VarMap::new();
    let base = || FrozenLinear::new(Tensor::ones((4, 4), DType::F32, &dev).unwrap(), None);
    let config = LoraConfig::new(2, 2.0);
    LoraLinear::new(base().unwrap(), &config, vb(&adapter).pp("q")).unwrap();
    let err = LoraLinear::new(base().unwrap(), &config, vb(&adapter).pp("q")).unwrap_err();
    assert!(err.to_string().contains("q.lora_A"), "{err}");
    // Every variant's constructor goes through the same guard.
    assert!(DoraLinear::new(base().unwrap(), &config, vb(&adapter).pp("q")).is_err());
    assert!(LoraFaLinear::new(base().unwrap(), &config, vb(&adapter).pp("q")).is_err());
    assert!(DeltaLoraLinear::new(base().unwrap(), &config, vb(&adapter).pp("q")).is_err());
    assert!(LoraDropLinear::new(base().unwrap(), &config, vb(&adapter).pp("q")).is_err());
    let ada = AdaLoraConfig::new(2, 2.0);
    AdaLoraLinear::new(base().unwrap(), &ada, vb(&adapter).pp("a")).unwrap();
    assert!(AdaLoraLinear::new(base().unwrap(), &ada, vb(&adapter).pp("a")).is_err());
    let pair = VeraShared::covering(2, 0, [(4, 4)], DType::F32, &dev).unwrap();
    let vera = VeraConfig::new(pair);
    VeraLinear::new(base().unwrap(), &vera, vb(&adapter).pp("w")).unwrap();
    assert!(VeraLinear::new(base().unwrap(), &vera, vb(&adapter).pp("w")).is_err());
    // The first layer's variables were not re-initialised by the refused ones.
    assert_eq!(adapter.all_vars().len(), 2 + 3 + 2);
}

#[test]
fn apply_t_runs_in_the_stored_mode_while_forward_t_takes_the_flag() {
    let dev = Device::Cpu;
    let adapter = VarMap::new();
    let base = FrozenLinear::new(Tensor::ones((16, 64), DType::F32, &dev).unwrap(), None).unwrap();
    let config = LoraConfig {
        dropout: 0.5,
        init: LoraInit::BothRandom,
        ..LoraConfig::new(4, 8.0)
    };
    let layer = LoraLinear::new(base, &config, vb(&adapter).pp("q")).unwrap();
    let x = Tensor::ones((32, 64), DType::F32, &dev).unwrap();
    let eval = Adapter::forward_t(&layer, &x, false).unwrap();
    let same = |a: &Tensor, b: &Tensor| {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap() == 0.0
    };
    // candle's blanket ModuleT ignores `train`: evaluation mode, no dropout.
    assert!(same(&x.apply_t(&layer, true).unwrap(), &eval));
    assert!(same(&ModuleT::forward_t(&layer, &x, true).unwrap(), &eval));
    // Adapter::forward_t honours it: dropout changes the output.
    assert!(!same(&Adapter::forward_t(&layer, &x, true).unwrap(), &eval));
    // After set_training(true), Module::forward and apply_t train too.
    layer.set_training(true);
    assert!(!same(&x.apply_t(&layer, false).unwrap(), &eval));
    assert!(!same(&layer.forward(&x).unwrap(), &eval));
}
