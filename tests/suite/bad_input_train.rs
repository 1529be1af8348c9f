//! Bad input to the training, model and PEFT-file APIs — optimizer groups, LoRA+, the
//! AdaLoRA rank allocator, LoRA-FA's projection, LoRA-drop's policy, target selectors,
//! adapter configs, plans, adapted sets, loading, inspecting and merging — returns an `Err`
//! naming the problem, never panics.

use std::collections::BTreeMap;

use crate::bad_input_common::*;
use candle_core::{DType, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::model::{linear_no_bias, AdaptedSet, ModuleSelector, Pattern};
use lorakit::peft::{inspect, merge_files, save_adapter, PeftAdapter, PeftConfig, PeftType};
use lorakit::train::lora_drop::{normalize_importance, sample_indices, select_layers};
use lorakit::train::{
    budget_schedule, GroupedAdamW, LoraFaProjection, LoraPlus, ParamGroup, ParamsAdamW,
    RankAllocator, RankAllocatorConfig, SampleSize, Selection,
};
use lorakit::variants::adalora::AdaLoraConfig;
use lorakit::variants::dora::norm::{factored_row_norms, row_sq_norms};
use lorakit::{
    AdaLoraLinear, Adapter, DeltaLoraConfig, DeltaLoraLinear, LoraConfig, LoraDrop, LoraDropConfig,
    LoraDropLinear, LoraFaConfig, LoraFaLinear, LoraLinear, Shared,
};

fn var(dims: &[usize]) -> Var {
    Var::ones(dims.to_vec(), DType::F32, &cpu()).unwrap()
}

#[test]
fn optimizer_groups_reject_bad_rates() {
    let mut c = Checker::new();
    let group = |name: &str| ParamGroup::new(name, vec![var(&[2, 3])]);
    for (what, g, needles) in [
        (
            "negative lr",
            group("A").with_lr(-1e-3),
            &["A", "lr", "-0.001"][..],
        ),
        (
            "NaN lr",
            group("A").with_lr(f64::NAN),
            &["A", "lr", "NaN"][..],
        ),
        (
            "infinite lr",
            group("A").with_lr(f64::INFINITY),
            &["A", "lr", "inf"][..],
        ),
        (
            "negative weight decay",
            group("B").with_weight_decay(-0.1),
            &["B", "weight_decay", "-0.1"][..],
        ),
    ] {
        c.err(&format!("GroupedAdamW::new, {what}"), needles, || {
            GroupedAdamW::new(vec![g], ParamsAdamW::default())
        });
    }
    for (what, params, needles) in [
        (
            "beta1 = 1",
            ParamsAdamW {
                beta1: 1.0,
                ..Default::default()
            },
            &["beta1", "1"][..],
        ),
        (
            "beta2 NaN",
            ParamsAdamW {
                beta2: f64::NAN,
                ..Default::default()
            },
            &["beta2", "NaN"][..],
        ),
        (
            "eps -1",
            ParamsAdamW {
                eps: -1.0,
                ..Default::default()
            },
            &["eps", "-1"][..],
        ),
        (
            "base lr -1",
            ParamsAdamW {
                lr: -1.0,
                ..Default::default()
            },
            &["lr", "-1"][..],
        ),
    ] {
        c.err(&format!("GroupedAdamW::new, {what}"), needles, || {
            GroupedAdamW::new(vec![group("A")], params)
        });
    }
    c.err("the same variable in two groups", &["B", "already"], || {
        let v = var(&[2, 2]);
        GroupedAdamW::new(
            vec![
                ParamGroup::new("A", vec![v.clone()]),
                ParamGroup::new("B", vec![v]),
            ],
            ParamsAdamW::default(),
        )
    });
    if let Some(mut opt) = c.ok("GroupedAdamW::new", || {
        GroupedAdamW::new(vec![group("A"), group("B")], ParamsAdamW::default())
    }) {
        c.err(
            "set_group_lr out of range",
            &["index 5", "2 groups"],
            || opt.set_group_lr(5, 1e-3),
        );
        c.err("set_group_lr negative", &["B", "lr", "-2"], || {
            opt.set_group_lr(1, -2.0)
        });
        c.check(
            "group_lr out of range is None",
            opt.group_lr(9).is_none(),
            || "got Some".into(),
        );
        // Schedules cannot return errors themselves; the next step reports the bad rate.
        let v = opt.group_vars(0).unwrap().remove(0);
        let loss = || v.as_tensor().sqr().unwrap().sum_all().unwrap();
        opt.set_lr_factor(-1.0);
        c.err(
            "step after set_lr_factor(-1)",
            &["A", "lr", "-0.001"],
            || opt.backward_step(&loss()),
        );
        opt.set_lr_factor(f64::NAN);
        c.err("step after set_lr_factor(NaN)", &["lr", "NaN"], || {
            opt.backward_step(&loss())
        });
        Optimizer::set_learning_rate(&mut opt, f64::INFINITY);
        c.err(
            "Optimizer::step after set_learning_rate(inf)",
            &["lr", "inf"],
            || {
                let grads = loss().backward()?;
                Ok(Optimizer::step(&mut opt, &grads)?)
            },
        );
        let before = v.as_tensor().to_vec2::<f32>().unwrap();
        c.check(
            "a refused step leaves the parameters",
            before == vec![vec![1f32; 3]; 2],
            || format!("got {before:?}"),
        );
        opt.set_lr_factor(1.0);
        c.ok("step after restoring the schedule", || {
            opt.backward_step(&loss())
        });
    }
    // LoRA+.
    let layer = LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj")).unwrap();
    for (what, recipe, needles) in [
        (
            "ratio 0",
            LoraPlus::new(1e-3).with_ratio(0.0),
            &["ratio", "0"][..],
        ),
        (
            "ratio NaN",
            LoraPlus::new(1e-3).with_ratio(f64::NAN),
            &["ratio", "NaN"][..],
        ),
        (
            "ratio -16",
            LoraPlus::new(1e-3).with_ratio(-16.0),
            &["ratio", "-16"][..],
        ),
        ("negative lr", LoraPlus::new(-1e-3), &["lr", "-0.001"][..]),
        ("NaN lr", LoraPlus::new(f64::NAN), &["lr", "NaN"][..]),
        (
            "negative weight decay",
            LoraPlus::new(1e-3).with_weight_decay(-1.0),
            &["weight_decay", "-1"][..],
        ),
        (
            "negative embedding lr",
            LoraPlus::new(1e-3).with_embedding_lr(-1.0),
            &["embedding_lr", "-1"][..],
        ),
    ] {
        c.err(
            &format!("LoraPlus::build_from_adapters, {what}"),
            needles,
            || recipe.build_from_adapters([&layer as &dyn Adapter]),
        );
    }
    c.finish();
}

/// `adalora_layers` as the training rules take them.
fn adalora_set(n: usize, init_r: usize) -> Vec<Shared<dyn Adapter>> {
    adalora_layers(n, init_r)
        .into_iter()
        .map(Shared::erase)
        .collect()
}

fn adalora_layers(n: usize, init_r: usize) -> Vec<Shared<AdaLoraLinear>> {
    (0..n)
        .map(|i| {
            let l = AdaLoraLinear::new(
                base(4, 6),
                &AdaLoraConfig::new(init_r, 4.0),
                vb(&format!("layer{i}")),
            )
            .unwrap();
            Shared::new(l)
        })
        .collect()
}

#[test]
fn adalora_allocator_rejects_bad_budgets_and_schedules() {
    let mut c = Checker::new();
    let cfg = |f: fn(&mut RankAllocatorConfig)| {
        let mut config = RankAllocatorConfig::new(100);
        config.target_r = 2;
        f(&mut config);
        config
    };
    c.err(
        "target budget above the total rank",
        &["target_r", "target budget 10", "initial budget 6"],
        || {
            let mut config = cfg(|_| {});
            config.target_r = 5;
            RankAllocator::new(&adalora_set(2, 3), config)
        },
    );
    c.err(
        "target budget equal to the total rank",
        &["target_r", "6"],
        || {
            let mut config = cfg(|_| {});
            config.target_r = 3;
            RankAllocator::new(&adalora_set(2, 3), config)
        },
    );
    // The allocator picks the AdaLoRA layers out of what it is given: none is a usage error.
    c.err(
        "no layers",
        &[
            "AdaLoRA rank allocator",
            "none of the 0 layer(s)",
            "AdaLoRA",
        ],
        || RankAllocator::new(&[], cfg(|_| {})),
    );
    c.err(
        "no AdaLoRA layer among the layers",
        &[
            "AdaLoRA rank allocator",
            "none of the 1 layer(s)",
            "AdaLoRA",
        ],
        || {
            let l = LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?;
            RankAllocator::new(&[Shared::new(l).erase()], cfg(|_| {}))
        },
    );
    for (what, config, needles) in [
        (
            "total_step 0",
            cfg(|c| c.total_step = 0),
            &["total_step", "0"][..],
        ),
        ("beta1 1", cfg(|c| c.beta1 = 1.0), &["beta1", "1"][..]),
        (
            "beta2 NaN",
            cfg(|c| c.beta2 = f64::NAN),
            &["beta2", "NaN"][..],
        ),
        ("deltaT 0", cfg(|c| c.delta_t = 0), &["deltaT", "0"][..]),
        (
            "orth_reg_weight -1",
            cfg(|c| c.orth_reg_weight = -1.0),
            &["orth_reg_weight", "-1"][..],
        ),
        (
            "tinit + tfinal ≥ total",
            cfg(|c| {
                c.tinit = 60;
                c.tfinal = 40
            }),
            &["tinit", "60", "40"][..],
        ),
        (
            "tinit = usize::MAX",
            cfg(|c| {
                c.tinit = usize::MAX;
                c.tfinal = 1
            }),
            &["tinit"][..],
        ),
        (
            "tfinal = usize::MAX",
            cfg(|c| c.tfinal = usize::MAX),
            &["tinit"][..],
        ),
    ] {
        c.err(
            &format!("RankAllocatorConfig::validate, {what}"),
            needles,
            || config.validate(),
        );
        c.err(&format!("RankAllocator::new, {what}"), needles, || {
            RankAllocator::new(&adalora_set(2, 3), config.clone())
        });
    }
    // The schedule is a pure function over any step: no overflow at the extremes.
    let config = cfg(|c| {
        c.tinit = 10;
        c.tfinal = 10;
    });
    for step in [0, 10, 11, 89, 90, 91, 100, 1000, usize::MAX] {
        if let Some(b) = c.no_panic(&format!("budget_schedule at step {step}"), || {
            budget_schedule(&config, 6, 4, step)
        }) {
            c.check(
                &format!("budget at step {step} within [4, 6]"),
                (4..=6).contains(&b.budget),
                || format!("got {}", b.budget),
            );
        }
    }
    // Steps beyond total_step and gradients that miss the layers are fine.
    if let Some(mut alloc) = c.ok("RankAllocator::new", || {
        RankAllocator::new(&adalora_set(2, 3), config.clone())
    }) {
        let grads = Tensor::zeros(1, DType::F32, &cpu())
            .unwrap()
            .backward()
            .unwrap();
        for step in [1, 50, 100, 500, usize::MAX] {
            c.ok(&format!("update_and_allocate at step {step}"), || {
                alloc.update_and_allocate(step, &grads)
            });
        }
    }
    c.finish();
}

#[test]
fn lora_fa_projection_and_lora_drop_reject_bad_input() {
    let mut c = Checker::new();
    // The projection picks the LoRA-FA layers out of what it is given: none is an error.
    c.err(
        "LoraFaProjection over a plain LoRA layer",
        &["LoRA-FA projection", "none of the 1 layer(s)", "LoRA-FA"],
        || {
            let l = LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?;
            LoraFaProjection::new(&[Shared::new(l).erase()])
        },
    );
    c.ok("LoraFaProjection over a LoRA-FA layer", || {
        let l = LoraFaLinear::new(base(4, 6), &LoraFaConfig::new(2, 4.0), vb("proj"))?;
        LoraFaProjection::new(&[Shared::new(l).erase()])
    });
    // LoRA-drop's policy.
    c.err("sample of an empty data set", &["sample", "empty"], || {
        sample_indices(0, SampleSize::Fraction(0.5), 0)
    });
    for f in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        c.err(
            &format!("sample fraction {f}"),
            &["sample", &format!("{f}")],
            || sample_indices(10, SampleSize::Fraction(f), 0),
        );
    }
    c.err("sample count 0", &["sample", "0"], || {
        sample_indices(10, SampleSize::Count(0), 0)
    });
    c.no_panic("sample count above n", || {
        sample_indices(10, SampleSize::Count(50), 0)
    });
    for (what, raw, needles) in [
        (
            "NaN score",
            vec![1.0, f64::NAN],
            &["importance", "#1", "NaN"][..],
        ),
        (
            "negative score",
            vec![-1.0, 1.0],
            &["importance", "#0", "-1"][..],
        ),
        (
            "infinite score",
            vec![f64::INFINITY],
            &["importance", "inf"][..],
        ),
    ] {
        c.err(&format!("normalize_importance, {what}"), needles, || {
            normalize_importance(&raw)
        });
    }
    c.no_panic("normalize_importance of all zeros", || {
        normalize_importance(&[0.0, 0.0])
    });
    c.no_panic("normalize_importance of nothing", || {
        normalize_importance(&[])
    });
    for t in [0.0, -1.0, 1.5, f64::NAN] {
        c.err(
            &format!("select_layers threshold {t}"),
            &["threshold"],
            || select_layers(&[0.5, 0.5], Selection::Threshold(t)),
        );
    }
    // Keeping no layer of its own (all share one pair) is a legal, if extreme, choice.
    c.ok("select_layers top-0", || {
        select_layers(&[0.5, 0.5], Selection::TopN(0))
    });
    c.no_panic("select_layers top-5 of 2", || {
        select_layers(&[0.5, 0.5], Selection::TopN(5))
    });
    c.no_panic("select_layers over no layers", || {
        select_layers(&[], Selection::TopN(1))
    });
    c.err(
        "share_unselected with the wrong number of scores",
        &["importance"],
        || {
            let l = LoraDropLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?;
            let config = LoraDropConfig {
                selection: Selection::TopN(1),
                ..LoraDropConfig::default()
            };
            let drop = LoraDrop::new(&[Shared::new(l).erase()], config)?;
            drop.share_unselected(&[], vb("shared"))
                .map(|r| r.params_after)
        },
    );
    // DoRA's norm helpers.
    c.err("row_sq_norms of a vector", &[], || {
        row_sq_norms(&Tensor::ones(4, DType::F32, &cpu())?)
    });
    c.err("factored_row_norms with mismatched A", &[], || {
        let w = weight(4, 6, DType::F32);
        factored_row_norms(
            &row_sq_norms(&w)?,
            &w,
            &weight(2, 5, DType::F32),
            &weight(4, 2, DType::F32),
            1.0,
        )
    });
    c.finish();
}

#[test]
fn selectors_configs_plans_and_sets_reject_bad_input() {
    let mut c = Checker::new();
    c.err(
        "target regex that does not compile",
        &["target_modules", "`(q`"],
        || ModuleSelector::regex("(q"),
    );
    c.err(
        "pattern regex that does not compile",
        &["rank_pattern", "`[`"],
        || Pattern::new([("[".to_string(), 4usize)], "rank_pattern"),
    );
    c.ok("PeftType::parse LORA", || PeftType::parse("LORA"));
    c.err("PeftType::parse IA3", &["IA3"], || PeftType::parse("IA3"));
    let parse = |json: &str| PeftConfig::from_json_str(json, "cfg/adapter_config.json");
    for (what, json, needles) in [
        (
            "not JSON",
            "{ not json",
            &["adapter_config.json", "line 1"][..],
        ),
        ("a JSON list", "[1, 2]", &["adapter_config.json"][..]),
        ("empty", "", &["adapter_config.json"][..]),
        (
            "no peft_type",
            r#"{"target_modules": ["q"]}"#,
            &["peft_type", "missing"][..],
        ),
        (
            "unknown peft_type",
            r#"{"peft_type": "IA3", "target_modules": ["q"]}"#,
            &["IA3"][..],
        ),
        (
            "no target_modules",
            r#"{"peft_type": "LORA"}"#,
            &["target_modules"][..],
        ),
        (
            "bad target regex",
            r#"{"peft_type": "LORA", "target_modules": "(q"}"#,
            &["target_modules", "(q"][..],
        ),
        (
            "bad exclude regex",
            r#"{"peft_type": "LORA", "target_modules": ["q"], "exclude_modules": "["}"#,
            &["exclude_modules"][..],
        ),
        (
            "bad rank_pattern regex",
            r#"{"peft_type": "LORA", "target_modules": ["q"], "rank_pattern": {"(": 4}}"#,
            &["rank_pattern", "("][..],
        ),
        (
            "r as a string",
            r#"{"peft_type": "LORA", "target_modules": ["q"], "r": "8"}"#,
            &["r"][..],
        ),
        (
            "negative r",
            r#"{"peft_type": "LORA", "target_modules": ["q"], "r": -8}"#,
            &["r", "-8"][..],
        ),
        (
            "lora_alpha as a string",
            r#"{"peft_type": "LORA", "target_modules": ["q"], "lora_alpha": "x"}"#,
            &["lora_alpha"][..],
        ),
        (
            "fan_in_fan_out not a bool",
            r#"{"peft_type": "LORA", "target_modules": ["q"], "fan_in_fan_out": "yes"}"#,
            &["fan_in_fan_out"][..],
        ),
        (
            "AdaLoRA mask of the wrong length",
            r#"{"peft_type": "ADALORA", "target_modules": ["q"], "init_r": 3, "rank_pattern": {"q.lora_E": [true]}}"#,
            &["rank_pattern", "init_r is 3"][..],
        ),
    ] {
        c.err(
            &format!("PeftConfig::from_json_str, {what}"),
            needles,
            || parse(json),
        );
    }
    c.err(
        "PeftConfig::from_file, no such file",
        &["nowhere/adapter_config.json"],
        || PeftConfig::from_file("nowhere/adapter_config.json"),
    );
    // Values that cannot build a layer: the config rejects ranks outside 1..=MAX_RANK
    // (naming the file and field); the rest fail when the layer is built (naming it).
    for (what, json, needles) in [
        (
            "r = 0",
            r#"{"peft_type": "LORA", "target_modules": ["q"], "r": 0}"#,
            &["adapter_config.json", "`r`", "got 0"][..],
        ),
        (
            "lora_alpha = -4",
            r#"{"peft_type": "LORA", "target_modules": ["q"], "lora_alpha": -4}"#,
            &["q", "alpha", "-4"][..],
        ),
        (
            "lora_dropout = 1.5",
            r#"{"peft_type": "LORA", "target_modules": ["q"], "lora_dropout": 1.5}"#,
            &["q", "dropout", "1.5"][..],
        ),
        (
            "rank_pattern r = 0",
            r#"{"peft_type": "LORA", "target_modules": ["q"], "rank_pattern": {"q": 0}}"#,
            &["q", "rank", "got 0"][..],
        ),
        (
            "AdaLoRA init_r = 0",
            r#"{"peft_type": "ADALORA", "target_modules": ["q"], "init_r": 0}"#,
            &["adapter_config.json", "init_r", "got 0"][..],
        ),
        (
            "r = 2^61",
            r#"{"peft_type": "LORA", "target_modules": ["q"], "r": 2305843009213693952}"#,
            &["adapter_config.json", "65536", "2305843009213693952"][..],
        ),
        (
            "DoRA r = 0",
            r#"{"peft_type": "LORA", "use_dora": true, "target_modules": ["q"], "r": 0}"#,
            &["adapter_config.json", "`r`", "got 0"][..],
        ),
    ] {
        c.err(&format!("fresh plan, {what}"), needles, || {
            let config = parse(json)?;
            let base_vars = VarMap::new();
            let base_vb = VarBuilder::from_varmap(&base_vars, DType::F32, &cpu());
            let adapter_vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu());
            let plan = config.fresh_plan(adapter_vb, &LoraConfig::default())?;
            linear_no_bias(6, 4, base_vb.pp("q"), &plan)?;
            plan.finish()
        });
    }
    c.err(
        "linear_no_bias with d_in = 0",
        &["weight", "[4, 0]"],
        || {
            let plan = PeftConfig::lora(2, 4.0, &["q"]).fresh_plan(
                VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu()),
                &LoraConfig::default(),
            )?;
            let base_vars = VarMap::new();
            linear_no_bias(
                0,
                4,
                VarBuilder::from_varmap(&base_vars, DType::F32, &cpu()).pp("q"),
                &plan,
            )
        },
    );
    // Adapted sets.
    let layer = || -> lorakit::Result<Shared<dyn Adapter>> {
        Ok(Shared::new(LoraLinear::new(
            base(4, 6),
            &LoraConfig::new(2, 4.0),
            vb("q"),
        )?)
        .erase())
    };
    c.err("AdaptedSet::insert of a path twice", &["q"], || {
        let set = AdaptedSet::new();
        set.insert("q", layer()?)?;
        set.insert("q", layer()?)
    });
    c.err(
        "AdaptedSet::merge_all(safe) with a NaN weight",
        &["q", "non-finite"],
        || {
            let set = AdaptedSet::new();
            let mut w = weight(4, 6, DType::F32).to_vec2::<f32>()?;
            w[0][0] = f32::NAN;
            let base = lorakit::FrozenLinear::new(Tensor::new(w, &cpu())?, None)?;
            set.insert(
                "q",
                Shared::new(LoraLinear::new(base, &LoraConfig::new(2, 4.0), vb("q"))?).erase(),
            )?;
            set.merge_all(true)
        },
    );
    // unmerge_all only touches merged layers (documented), so on an unmerged set it is a no-op.
    c.ok("AdaptedSet::unmerge_all when not merged", || {
        let set = AdaptedSet::new();
        set.insert("q", layer()?)?;
        set.unmerge_all()
    });
    // Saving an inconsistent adapter.
    let dir = std::env::temp_dir().join(format!("lorakit-test-{}-bad-save", std::process::id()));
    c.err(
        "save_adapter, layer not targeted by the config",
        &["q", "target_modules"],
        || {
            let set = AdaptedSet::new();
            set.insert("q", layer()?)?;
            save_adapter(&dir, &PeftConfig::lora(2, 4.0, &["k"]), &set)
        },
    );
    c.err(
        "save_adapter, rank differs from the config",
        &["q", "rank 2"],
        || {
            let set = AdaptedSet::new();
            set.insert("q", layer()?)?;
            save_adapter(&dir, &PeftConfig::lora(3, 4.0, &["q"]), &set)
        },
    );
    c.check("a refused save writes nothing", !dir.exists(), || {
        format!("{} exists", dir.display())
    });
    c.finish();
}

/// An adapter held in memory: `config` plus `tensors`, as `PeftAdapter::from_parts` takes.
fn adapter(config: PeftConfig, tensors: &[(&str, Tensor)]) -> PeftAdapter {
    let map: BTreeMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    PeftAdapter::from_parts(config, map, "mem/adapter_model.safetensors").unwrap()
}

fn load_onto_q(adapter: &PeftAdapter) -> lorakit::Result<AdaptedSet> {
    let plan = adapter.plan()?;
    let base_vars = VarMap::new();
    let base_vb = VarBuilder::from_varmap(&base_vars, DType::F32, &cpu());
    linear_no_bias(6, 4, base_vb.pp("q"), &plan)?;
    plan.finish()
}

#[test]
fn loading_inspecting_and_merging_reject_bad_files() {
    let mut c = Checker::new();
    let f = |dims: &[usize], dtype: DType| Tensor::ones(dims.to_vec(), dtype, &cpu()).unwrap();
    let key_a = "base_model.model.q.lora_A.weight";
    let key_b = "base_model.model.q.lora_B.weight";
    let config = PeftConfig::lora(2, 4.0, &["q"]);
    for (what, tensors, needles) in [
        (
            "A missing",
            vec![(key_b, f(&[4, 2], DType::F32))],
            &["q.lora_A"][..],
        ),
        (
            "A with the wrong d_in",
            vec![
                (key_a, f(&[2, 5], DType::F32)),
                (key_b, f(&[4, 2], DType::F32)),
            ],
            &["q", "lora_A", "[2, 5]"][..],
        ),
        (
            "rank differs from the config",
            vec![
                (key_a, f(&[3, 6], DType::F32)),
                (key_b, f(&[4, 3], DType::F32)),
            ],
            &["q"][..],
        ),
        (
            "1-D A",
            vec![
                (key_a, f(&[12], DType::F32)),
                (key_b, f(&[4, 2], DType::F32)),
            ],
            &["q", "lora_A"][..],
        ),
        (
            "an unused key",
            vec![
                (key_a, f(&[2, 6], DType::F32)),
                (key_b, f(&[4, 2], DType::F32)),
                ("base_model.model.k.lora_A.weight", f(&[2, 6], DType::F32)),
            ],
            &["k.lora_A"][..],
        ),
    ] {
        c.err(&format!("load onto q, {what}"), needles, || {
            load_onto_q(&adapter(config.clone(), &tensors))
        });
    }
    c.err(
        "PeftAdapter::load, no such directory",
        &["no-such-adapter"],
        || PeftAdapter::load("no-such-adapter", &cpu()),
    );
    c.err("inspect, no such directory", &["no-such-adapter"], || {
        inspect(std::path::Path::new("no-such-adapter"))
    });
    let dir = std::env::temp_dir().join(format!("lorakit-test-{}-bad-files", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("adapter")).unwrap();
    std::fs::write(
        dir.join("adapter/adapter_config.json"),
        r#"{"peft_type": "LORA", "target_modules": ["q"], "r": 2}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("adapter/adapter_model.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
    )
    .unwrap();
    c.err(
        "PeftAdapter::load, truncated safetensors",
        &["adapter_model.safetensors"],
        || PeftAdapter::load(dir.join("adapter"), &cpu()),
    );
    c.err(
        "inspect, truncated safetensors",
        &["adapter_model.safetensors"],
        || inspect(&dir.join("adapter")),
    );
    // A valid adapter, so the merge errors below come from the base file.
    let set = AdaptedSet::new();
    let q = LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("q")).unwrap();
    set.insert("q", Shared::new(q).erase()).unwrap();
    save_adapter(dir.join("good"), &PeftConfig::lora(2, 4.0, &["q"]), &set).unwrap();
    let base = dir.join("base.safetensors");
    c.err("merge_files, no such base", &["base.safetensors"], || {
        merge_files(&base, &dir.join("good"), &dir.join("out.safetensors"))
    });
    std::fs::write(&base, b"not a safetensors file").unwrap();
    c.err("merge_files, corrupted base", &["base.safetensors"], || {
        merge_files(&base, &dir.join("good"), &dir.join("out.safetensors"))
    });
    c.err(
        "merge_files onto its own base",
        &["base.safetensors"],
        || merge_files(&base, &dir.join("good"), &base),
    );
    c.check(
        "a refused merge writes nothing",
        !dir.join("out.safetensors").exists(),
        || "out.safetensors exists".into(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    c.finish();
}

#[test]
fn lora_drop_layers_and_step_hooks_handle_bad_input() {
    let mut c = Checker::new();
    let l = LoraDropLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj")).unwrap();
    let wrapped = Shared::new(l);
    let drop = LoraDrop::new(&[wrapped.clone().erase()], LoraDropConfig::default()).unwrap();
    c.err(
        "LoraDropLinear::forward_t, wrong last dim",
        &["proj", "input"],
        || wrapped.read().forward_t(&input(&[2, 5], DType::F32), true),
    );
    c.err(
        "LoraDropLinear::forward_t, f64 input",
        &["proj", "F64"],
        || wrapped.read().forward_t(&input(&[2, 6], DType::F64), true),
    );
    c.ok("LoraDropLinear::forward_t, empty batch", || {
        wrapped.read().forward_t(&input(&[0, 6], DType::F32), true)
    });
    c.err(
        "calibrate with a failing forward",
        &["proj", "input"],
        || {
            drop.calibrate(|| {
                wrapped
                    .read()
                    .forward_t(&input(&[2, 5], DType::F32), false)
                    .map(|_| ())
            })
        },
    );
    c.ok(
        "calibrate on an empty batch (zero importance everywhere)",
        || {
            drop.calibrate(|| {
                wrapped
                    .read()
                    .forward_t(&input(&[0, 6], DType::F32), false)
                    .map(|_| ())
            })
        },
    );
    c.err("stage1 on an empty data set", &["sample", "empty"], || {
        drop.stage1(0, |_, _| Ok(()), |_| Ok(()))
    });
    // Step hooks with gradients that miss their layers: nothing to do, no error.
    let empty = || {
        Tensor::zeros(1, DType::F32, &cpu())
            .unwrap()
            .backward()
            .unwrap()
    };
    c.ok("DeltaLoraHook::before_step without gradients", || {
        use lorakit::train::StepHook;
        let l = DeltaLoraLinear::new(base(4, 6), &DeltaLoraConfig::new(2, 4.0), vb("proj"))?;
        let mut hook = lorakit::DeltaLoraHook::new(
            &[Shared::new(l).erase()],
            lorakit::DeltaLoraUpdate::new(1.0, 0),
        )?;
        let mut grads = empty();
        hook.before_step(1, &mut grads)?;
        hook.after_step(1, &grads)
    });
    c.ok("LoraFaProjection::project without gradients", || {
        let l = LoraFaLinear::new(base(4, 6), &LoraFaConfig::new(2, 4.0), vb("proj"))?;
        let mut proj = LoraFaProjection::new(&[Shared::new(l).erase()])?;
        proj.project(&mut empty())
    });
    c.ok("orthogonality_penalty over no layers", || {
        lorakit::train::orthogonality_penalty(&[])
    });
    c.ok("orthogonality_penalty over fully pruned layers", || {
        let layers = adalora_layers(1, 3);
        layers[0].write().apply_mask(&[false, false, false])?;
        let layers: Vec<Shared<dyn Adapter>> = layers.into_iter().map(Shared::erase).collect();
        lorakit::train::orthogonality_penalty(&layers)
    });
    // Two layers built on one VarMap under the same prefix with different ranks: the stored
    // variable does not fit the second; candle's error names the variable.
    c.err(
        "a var builder holding a variable of another shape",
        &["lora_A"],
        || {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &cpu());
            LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb.pp("proj"))?;
            LoraLinear::new(base(4, 6), &LoraConfig::new(3, 4.0), vb.pp("proj"))
        },
    );
    // The same with a variable of the right shape: the second layer would silently share
    // (and re-initialize) the first one's variables, so it is refused, naming the variable.
    c.err(
        "a second layer under a prefix that already holds its variables",
        &["proj", "VarBuilder prefix", "proj.lora_A", "already exists"],
        || {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &cpu());
            LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb.pp("proj"))?;
            LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb.pp("proj"))
        },
    );
    c.err(
        "train_step with an optimizer whose schedule went negative",
        &["lr"],
        || {
            let v = var(&[2, 2]);
            let mut opt = GroupedAdamW::new(
                vec![ParamGroup::new("g", vec![v.clone()])],
                ParamsAdamW::default(),
            )?;
            opt.set_lr_factor(-1.0);
            let loss = v.as_tensor().sqr()?.sum_all()?;
            lorakit::train::train_step(&loss, &mut opt, &mut [], 1)
        },
    );
    c.finish();
}
