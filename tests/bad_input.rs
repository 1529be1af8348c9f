//! Bad input to the layers — the frozen base, every variant's constructors and methods, the
//! fused kernel — returns an `Err` naming the problem, never panics. Empty batches (zero
//! rows, in 2-D or 3-D) are valid and give an empty output.
//!
//! Device mismatches cannot be produced here (only the CPU exists in CI); the same check
//! (`validate::dtype_device`) that rejects a dtype mismatch rejects them.

mod bad_input_common;

use bad_input_common::*;
use candle_core::{DType, Tensor};
use lorakit::kernels::{low_rank_only, FusedLinear, LowRankTerm};
use lorakit::low_rank::{Factor, LowRankPair};
use lorakit::variants::adalora::AdaLoraConfig;
use lorakit::variants::delta_lora::{into_delta_lora, restore_base_weight};
use lorakit::{
    delta_lora_linear, lora_fa, AdaLoraLinear, Adapter, DeltaLoraHook, DeltaLoraUpdate, DoraLinear,
    FrozenLinear, LoraConfig, LoraLinear, Shared, VeraBuilder, VeraConfig, VeraLinear, VeraShared,
};

const D_OUT: usize = 4;
const D_IN: usize = 6;

/// Builds one variant named `proj` on the given base.
type Build = fn(FrozenLinear) -> lorakit::Result<Box<dyn Adapter>>;

fn variants() -> Vec<(&'static str, Build)> {
    vec![
        ("LoRA", |b| {
            Ok(Box::new(LoraLinear::new(
                b,
                &LoraConfig::new(2, 4.0),
                vb("proj"),
            )?))
        }),
        ("LoRA-FA", |b| {
            Ok(Box::new(lora_fa::new(
                b,
                &LoraConfig::new(2, 4.0),
                vb("proj"),
            )?))
        }),
        ("Delta-LoRA", |b| {
            Ok(Box::new(delta_lora_linear(
                b,
                &LoraConfig::new(2, 4.0),
                vb("proj"),
            )?))
        }),
        ("DoRA", |b| {
            Ok(Box::new(DoraLinear::new(
                b,
                &LoraConfig::new(2, 4.0),
                vb("proj"),
            )?))
        }),
        ("VeRA", |b| {
            let config = VeraConfig {
                r: 3,
                ..VeraConfig::default()
            };
            let mut builder = VeraBuilder::new(config);
            builder.reserve_for(&b)?;
            Ok(Box::new(builder.build(b, vb("proj"))?))
        }),
        ("AdaLoRA", |b| {
            Ok(Box::new(AdaLoraLinear::new(
                b,
                &AdaLoraConfig::new(3, 4.0),
                vb("proj"),
            )?))
        }),
    ]
}

#[test]
fn every_variant_rejects_bad_forward_inputs_and_accepts_empty_batches() {
    let mut c = Checker::new();
    for (name, build) in variants() {
        let Some(mut layer) = c.ok(&format!("{name}: build"), || build(base(D_OUT, D_IN))) else {
            continue;
        };
        for train in [false, true] {
            let ctx = format!("{name} (train = {train})");
            c.err(
                &format!("{ctx}: input with the wrong last dim"),
                &["proj", "input", "[3, 5]"],
                || layer.forward_t(&input(&[3, 5], DType::F32), train),
            );
            c.err(
                &format!("{ctx}: f64 input to an f32 layer"),
                &["proj", "dtype", "F64"],
                || layer.forward_t(&input(&[3, D_IN], DType::F64), train),
            );
            c.err(
                &format!("{ctx}: f16 input to an f32 layer"),
                &["proj", "dtype", "F16"],
                || layer.forward_t(&input(&[3, D_IN], DType::F16), train),
            );
            c.err(&format!("{ctx}: scalar input"), &["proj", "input"], || {
                layer.forward_t(&Tensor::new(1f32, &cpu())?, train)
            });
            for dims in [vec![0, D_IN], vec![2, 0, D_IN], vec![0, 3, D_IN]] {
                let mut out_dims = dims.clone();
                *out_dims.last_mut().unwrap() = D_OUT;
                if let Some(y) = c.ok(&format!("{ctx}: empty batch {dims:?}"), || {
                    layer.forward_t(&input(&dims, DType::F32), train)
                }) {
                    c.check(
                        &format!("{ctx}: empty batch {dims:?} output shape"),
                        y.dims() == out_dims,
                        || format!("expected {out_dims:?}, got {:?}", y.dims()),
                    );
                }
            }
        }
        // Training through an empty batch: backward gives zero gradients, no panic.
        c.ok(&format!("{name}: backward through an empty batch"), || {
            let y = layer.forward_t(&input(&[0, D_IN], DType::F32), true)?;
            Ok(y.sum_all()?.backward()?)
        });
        c.err(
            &format!("{name}: unmerge before merge"),
            &["proj", "not merged"],
            || layer.unmerge(),
        );
        c.ok(&format!("{name}: merge"), || layer.merge(true));
        c.err(
            &format!("{name}: merge twice"),
            &["proj", "already merged"],
            || layer.merge(true),
        );
        if let Some(y) = c.ok(&format!("{name}: merged forward of an empty batch"), || {
            layer.forward_t(&input(&[0, D_IN], DType::F32), false)
        }) {
            c.check(
                &format!("{name}: merged empty output"),
                y.dims() == [0, D_OUT],
                || format!("got {:?}", y.dims()),
            );
        }
        c.err(
            &format!("{name}: merged forward with the wrong last dim"),
            &["proj", "input"],
            || layer.forward_t(&input(&[1, D_IN + 1], DType::F32), false),
        );
        layer.set_enabled(false);
        c.err(
            &format!("{name}: forward while merged and disabled"),
            &["proj", "merged"],
            || layer.forward_t(&input(&[1, D_IN], DType::F32), false),
        );
        layer.set_enabled(true);
        c.ok(&format!("{name}: unmerge"), || layer.unmerge());
        c.ok(&format!("{name}: tensors_to_save"), || {
            layer.tensors_to_save()
        });
    }
    c.finish();
}

/// A safe merge that would produce a non-finite weight fails, names the layer and leaves W
/// and the merge state untouched; an unsafe merge is allowed to go through.
#[test]
fn safe_merge_rejects_non_finite_weights_for_every_variant() {
    let mut c = Checker::new();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for (name, build) in variants() {
            let ctx = format!("{name} with a {bad} in W");
            let mut w = weight(D_OUT, D_IN, DType::F32).to_vec2::<f32>().unwrap();
            w[1][2] = bad;
            let w = Tensor::new(w, &cpu()).unwrap();
            let Some(base) = c.ok(&format!("{ctx}: FrozenLinear::new"), || {
                FrozenLinear::new(w.clone(), None)
            }) else {
                continue;
            };
            let Some(mut layer) = c.ok(&format!("{ctx}: build"), || build(base)) else {
                continue;
            };
            c.err(
                &format!("{ctx}: safe merge"),
                &["proj", "non-finite"],
                || layer.merge(true),
            );
            c.check(
                &format!("{ctx}: still unmerged"),
                !layer.is_merged(),
                || "the failed merge changed the merge state".into(),
            );
            c.ok(&format!("{ctx}: forward after a refused merge"), || {
                layer.forward_t(&input(&[2, D_IN], DType::F32), false)
            });
            let same = layer
                .base()
                .weight()
                .to_vec2::<f32>()
                .map(|v| {
                    let w = w.to_vec2::<f32>().unwrap();
                    v.iter()
                        .flatten()
                        .zip(w.iter().flatten())
                        .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()))
                })
                .unwrap_or(false);
            c.check(&format!("{ctx}: W untouched"), same, || {
                "the failed merge changed W".into()
            });
            c.ok(&format!("{ctx}: unsafe merge"), || layer.merge(false));
        }
    }
    c.finish();
}

/// Non-finite adapter factors (a diverged training run): a safe merge refuses them too.
#[test]
fn safe_merge_rejects_non_finite_adapter_factors() {
    let mut c = Checker::new();
    let f = |dims: &[usize]| Tensor::ones(dims.to_vec(), DType::F32, &cpu()).unwrap();
    for bad in [f32::NAN, f32::INFINITY] {
        let b_bad = (f(&[4, 2]) * f64::from(bad)).unwrap();
        let pair = LowRankPair {
            a: Factor::Frozen(f(&[2, 6])),
            b: Factor::Frozen(b_bad),
        };
        let Some(mut l) = c.ok(&format!("from_pair with a {bad} B"), || {
            LoraLinear::from_pair("proj", base(4, 6), pair, 1.0, 0.0)
        }) else {
            continue;
        };
        c.err(
            &format!("safe merge of a {bad} B"),
            &["proj", "non-finite", "24"],
            || l.merge(true),
        );
        c.check(
            &format!("{bad} B: W untouched"),
            l.base().weight().to_vec2::<f32>().unwrap()
                == weight(4, 6, DType::F32).to_vec2::<f32>().unwrap(),
            || "W changed".into(),
        );
    }
    c.finish();
}

#[test]
fn seeded_rng_rejects_bad_distributions_and_shapes() {
    let mut c = Checker::new();
    let dev = cpu();
    let mut rng = lorakit::init::SeededRng::new(0);
    for (what, mean, std) in [
        ("std -1", 0.0, -1.0),
        ("std NaN", 0.0, f64::NAN),
        ("mean inf", f64::INFINITY, 1.0),
    ] {
        c.err(&format!("normal, {what}"), &["init", "std"], || {
            rng.normal((2, 2), mean, std, DType::F32, &dev)
        });
    }
    for (what, lo, hi) in [
        ("lo > hi", 1.0, -1.0),
        ("NaN bound", f64::NAN, 1.0),
        ("infinite bound", -1.0, f64::INFINITY),
    ] {
        c.err(&format!("uniform, {what}"), &["init", "bounds"], || {
            rng.uniform((2, 2), lo, hi, DType::F32, &dev)
        });
    }
    c.err("kaiming with fan_in 0", &["init", "bounds"], || {
        rng.kaiming_uniform_linear(2, 0, DType::F32, &dev)
    });
    c.err(
        "uniform of a shape too large to allocate",
        &["init", "too large"],
        || rng.uniform((1usize << 40, 1usize << 40), -1.0, 1.0, DType::F32, &dev),
    );
    c.ok("uniform of an empty shape", || {
        rng.uniform((0, 3), -1.0, 1.0, DType::F32, &dev)
    });
    c.finish();
}

#[test]
fn frozen_linear_rejects_bad_weights_and_inputs() {
    let mut c = Checker::new();
    let dev = cpu();
    c.err("1-D weight", &["weight", "[6]"], || {
        FrozenLinear::new(Tensor::ones(6, DType::F32, &dev)?, None)
    });
    c.err("3-D weight", &["weight", "[2, 3, 4]"], || {
        FrozenLinear::new(Tensor::ones((2, 3, 4), DType::F32, &dev)?, None)
    });
    c.err("scalar weight", &["weight", "[]"], || {
        FrozenLinear::new(Tensor::new(1f32, &dev)?, None)
    });
    c.err("bias of the wrong length", &["bias", "[5]"], || {
        FrozenLinear::new(
            weight(4, 6, DType::F32),
            Some(Tensor::ones(5, DType::F32, &dev)?),
        )
    });
    c.err("2-D bias", &["bias", "[1, 4]"], || {
        FrozenLinear::new(
            weight(4, 6, DType::F32),
            Some(Tensor::ones((1, 4), DType::F32, &dev)?),
        )
    });
    c.err("f64 bias on an f32 weight", &["bias", "F64"], || {
        FrozenLinear::new(
            weight(4, 6, DType::F32),
            Some(Tensor::ones(4, DType::F64, &dev)?),
        )
    });
    c.err("d_out = 0", &["base", "weight", "[0, 6]"], || {
        FrozenLinear::new(weight(0, 6, DType::F32), None)
    });
    c.err("d_in = 0", &["weight", "[4, 0]"], || {
        FrozenLinear::new(weight(4, 0, DType::F32), None)
    });
    c.err("integer weight", &["base", "weight", "U32"], || {
        FrozenLinear::new(Tensor::zeros((4, 6), DType::U32, &dev)?, None)
    });
    let b = base(4, 6);
    c.err(
        "forward_checked: wrong last dim",
        &["lin", "input", "[2, 7]"],
        || b.forward_checked("lin", &input(&[2, 7], DType::F32)),
    );
    c.err("forward_checked: f64 input", &["lin", "F64"], || {
        b.forward_checked("lin", &input(&[2, 6], DType::F64))
    });
    c.err("forward_checked: scalar", &["lin", "input"], || {
        b.forward_checked("lin", &Tensor::new(0f32, &dev)?)
    });
    if let Some(y) = c.ok("forward_checked: empty batch", || {
        b.forward_checked("lin", &input(&[0, 6], DType::F32))
    }) {
        c.check("forward_checked: empty output", y.dims() == [0, 4], || {
            format!("got {:?}", y.dims())
        });
    }
    c.err(
        "from_var_builder with a mis-shaped stored weight",
        &["weight"],
        || {
            let varmap = candle_nn::VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            vb.pp("lin").get((3, 3), "weight")?;
            FrozenLinear::from_var_builder(6, 4, false, vb.pp("lin"))
        },
    );
    c.finish();
}

#[test]
fn lora_family_constructors_reject_bad_configs_and_tensors() {
    let mut c = Checker::new();
    let dev = cpu();
    // Config values, through every constructor that takes a LoraConfig.
    let bad_configs: Vec<(&str, LoraConfig, &[&str])> = vec![
        (
            "rank 0",
            LoraConfig::new(0, 4.0),
            &["proj", "rank", "got 0"],
        ),
        (
            "alpha NaN",
            LoraConfig::new(2, f64::NAN),
            &["proj", "alpha", "NaN"],
        ),
        (
            "alpha -1",
            LoraConfig::new(2, -1.0),
            &["proj", "alpha", "-1"],
        ),
        ("alpha 0", LoraConfig::new(2, 0.0), &["proj", "alpha", "0"]),
        (
            "alpha inf",
            LoraConfig::new(2, f64::INFINITY),
            &["proj", "alpha", "inf"],
        ),
        (
            "dropout 1",
            LoraConfig {
                dropout: 1.0,
                ..LoraConfig::new(2, 4.0)
            },
            &["proj", "dropout", "1"],
        ),
        (
            "dropout -0.1",
            LoraConfig {
                dropout: -0.1,
                ..LoraConfig::new(2, 4.0)
            },
            &["proj", "dropout", "-0.1"],
        ),
        (
            "dropout NaN",
            LoraConfig {
                dropout: f64::NAN,
                ..LoraConfig::new(2, 4.0)
            },
            &["proj", "dropout", "NaN"],
        ),
    ];
    for (what, config, needles) in &bad_configs {
        c.err(&format!("LoraConfig::validate, {what}"), needles, || {
            config.validate("proj")
        });
        c.err(&format!("LoraLinear::new, {what}"), needles, || {
            LoraLinear::new(base(4, 6), config, vb("proj"))
        });
        c.err(&format!("lora_fa::new, {what}"), needles, || {
            lora_fa::new(base(4, 6), config, vb("proj"))
        });
        c.err(&format!("DoraLinear::new, {what}"), needles, || {
            DoraLinear::new(base(4, 6), config, vb("proj"))
        });
        if config.dropout == 0.0 {
            c.err(&format!("delta_lora_linear, {what}"), needles, || {
                delta_lora_linear(base(4, 6), config, vb("proj"))
            });
        }
    }
    c.err(
        "delta_lora_linear with dropout",
        &["proj", "dropout", "0.1"],
        || {
            let config = LoraConfig {
                dropout: 0.1,
                ..LoraConfig::new(2, 4.0)
            };
            delta_lora_linear(base(4, 6), &config, vb("proj"))
        },
    );
    c.err("into_delta_lora with dropout", &["proj", "dropout"], || {
        let config = LoraConfig {
            dropout: 0.1,
            ..LoraConfig::new(2, 4.0)
        };
        into_delta_lora(LoraLinear::new(base(4, 6), &config, vb("proj"))?)
    });
    // A rank whose factors cannot even be addressed is refused before any allocation.
    for r in [usize::MAX / 2, 1usize << 61] {
        let huge = LoraConfig::new(r, 4.0);
        let needles = &["proj", "`r`", "too large"][..];
        c.err(&format!("LoraLinear::new, rank {r}"), needles, || {
            LoraLinear::new(base(4, 6), &huge, vb("proj"))
        });
        c.err(&format!("lora_fa::new, rank {r}"), needles, || {
            lora_fa::new(base(4, 6), &huge, vb("proj"))
        });
        c.err(&format!("DoraLinear::new, rank {r}"), needles, || {
            DoraLinear::new(base(4, 6), &huge, vb("proj"))
        });
        c.err(&format!("delta_lora_linear, rank {r}"), needles, || {
            delta_lora_linear(base(4, 6), &huge, vb("proj"))
        });
    }
    // Rank above min(d_in, d_out) is legal (PEFT allows it).
    c.ok("LoraLinear::new with r > min(d_in, d_out)", || {
        LoraLinear::new(base(4, 6), &LoraConfig::new(9, 4.0), vb("proj"))
    });

    // Explicit tensors.
    let pair = |a: Tensor, b: Tensor| LowRankPair {
        a: Factor::Frozen(a),
        b: Factor::Frozen(b),
    };
    let f = |dims: &[usize], dtype: DType| Tensor::ones(dims.to_vec(), dtype, &dev).unwrap();
    let bad_pairs: Vec<(&str, Tensor, Tensor, &[&str])> = vec![
        (
            "A with the wrong d_in",
            f(&[2, 5], DType::F32),
            f(&[4, 2], DType::F32),
            &["proj", "lora_A", "[2, 5]"],
        ),
        (
            "B with the wrong d_out",
            f(&[2, 6], DType::F32),
            f(&[3, 2], DType::F32),
            &["proj", "lora_B", "[3, 2]"],
        ),
        (
            "A and B ranks differ",
            f(&[2, 6], DType::F32),
            f(&[4, 3], DType::F32),
            &["proj", "lora_B", "[4, 3]"],
        ),
        (
            "rank 0 tensors",
            f(&[0, 6], DType::F32),
            f(&[4, 0], DType::F32),
            &["proj", "rank", "got 0"],
        ),
        (
            "1-D A",
            f(&[6], DType::F32),
            f(&[4, 6], DType::F32),
            &["proj", "lora_A"],
        ),
        (
            "scalar A",
            Tensor::new(1f32, &dev).unwrap(),
            f(&[4, 1], DType::F32),
            &["proj"],
        ),
        (
            "3-D A",
            f(&[2, 6, 1], DType::F32),
            f(&[4, 2], DType::F32),
            &["proj", "lora_A"],
        ),
        (
            "f16 A with an f32 W",
            f(&[2, 6], DType::F16),
            f(&[4, 2], DType::F32),
            &["proj", "lora_A", "F16"],
        ),
        (
            "f64 B with an f32 W",
            f(&[2, 6], DType::F32),
            f(&[4, 2], DType::F64),
            &["proj", "lora_B", "F64"],
        ),
    ];
    for (what, a, b, needles) in &bad_pairs {
        c.err(&format!("LoraLinear::from_pair, {what}"), needles, || {
            LoraLinear::from_pair("proj", base(4, 6), pair(a.clone(), b.clone()), 1.0, 0.0)
        });
        c.err(&format!("lora_fa::from_tensors, {what}"), needles, || {
            lora_fa::from_tensors("proj", base(4, 6), a.clone(), b.clone(), 1.0, 0.0)
        });
        c.err(
            &format!("DoraLinear::from_tensors, {what}"),
            needles,
            || {
                DoraLinear::from_tensors(
                    "proj",
                    base(4, 6),
                    pair(a.clone(), b.clone()),
                    f(&[4], DType::F32),
                    1.0,
                    0.0,
                )
            },
        );
        c.err(&format!("LoraLinear::set_pair, {what}"), needles, || {
            let mut l = LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?;
            l.set_pair(pair(a.clone(), b.clone()))
        });
        c.no_panic(&format!("LowRankPair::rank, {what}"), || {
            pair(a.clone(), b.clone()).rank()
        });
        c.no_panic(&format!("LowRankPair::product, {what}"), || {
            pair(a.clone(), b.clone()).product().map(|_| ())
        });
    }
    let good = || pair(f(&[2, 6], DType::F32), f(&[4, 2], DType::F32));
    for scale in [f64::NAN, f64::INFINITY] {
        c.err(
            &format!("from_pair with scale {scale}"),
            &["proj", "scale"],
            || LoraLinear::from_pair("proj", base(4, 6), good(), scale, 0.0),
        );
        c.err(
            &format!("lora_fa::from_tensors with scale {scale}"),
            &["proj", "scale"],
            || {
                lora_fa::from_tensors(
                    "proj",
                    base(4, 6),
                    f(&[2, 6], DType::F32),
                    f(&[4, 2], DType::F32),
                    scale,
                    0.0,
                )
            },
        );
    }
    c.err(
        "from_pair with dropout 2",
        &["proj", "dropout", "2"],
        || LoraLinear::from_pair("proj", base(4, 6), good(), 1.0, 2.0),
    );
    c.err("set_pair while merged", &["proj", "merged"], || {
        let mut l = LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?;
        l.merge(true)?;
        l.set_pair(good())
    });
    // DoRA's magnitude.
    for (what, m, needles) in [
        (
            "magnitude of the wrong length",
            f(&[3], DType::F32),
            &["proj", "lora_magnitude_vector", "[3]"][..],
        ),
        (
            "2-D magnitude",
            f(&[4, 1], DType::F32),
            &["proj", "lora_magnitude_vector"][..],
        ),
        (
            "f64 magnitude",
            f(&[4], DType::F64),
            &["proj", "lora_magnitude_vector", "F64"][..],
        ),
    ] {
        c.err(
            &format!("DoraLinear::from_tensors, {what}"),
            needles,
            || DoraLinear::from_tensors("proj", base(4, 6), good(), m.clone(), 1.0, 0.0),
        );
    }
    if let Some(dora) = c.ok("DoRA build", || {
        DoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))
    }) {
        let x = input(&[3, 6], DType::F32);
        c.err(
            "DoRA dropped input of another shape",
            &["proj", "dropped input"],
            || dora.forward_with_dropped_input(&x, &input(&[2, 6], DType::F32)),
        );
        c.err(
            "DoRA dropped input with the wrong last dim",
            &["proj", "input"],
            || dora.forward_with_dropped_input(&x, &input(&[3, 5], DType::F32)),
        );
        c.err("DoRA dropped input f64", &["proj", "F64"], || {
            dora.forward_with_dropped_input(&x, &input(&[3, 6], DType::F64))
        });
        c.ok("DoRA dropped input, empty batch", || {
            dora.forward_with_dropped_input(
                &input(&[0, 6], DType::F32),
                &input(&[0, 6], DType::F32),
            )
        });
        let mut dora = dora;
        c.ok("DoRA merge", || dora.merge(true));
        c.err(
            "DoRA forward_with_dropped_input while merged",
            &["proj", "merged"],
            || dora.forward_with_dropped_input(&x, &x),
        );
    }
    // Delta-LoRA's weight restore.
    if let Some(mut delta) = c.ok("Delta-LoRA build", || {
        delta_lora_linear(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))
    }) {
        c.err(
            "restore_base_weight of the wrong shape",
            &["proj", "weight", "[6, 4]"],
            || restore_base_weight(&mut delta, weight(6, 4, DType::F32)),
        );
        c.err(
            "restore_base_weight in f64",
            &["proj", "weight", "F64"],
            || restore_base_weight(&mut delta, weight(4, 6, DType::F64)),
        );
        c.ok("restore_base_weight", || {
            restore_base_weight(&mut delta, weight(4, 6, DType::F32))
        });
        c.ok("Delta-LoRA merge", || delta.merge(true));
        c.err(
            "restore_base_weight while merged",
            &["proj", "merged"],
            || restore_base_weight(&mut delta, weight(4, 6, DType::F32)),
        );
    }
    c.err(
        "restore_base_weight on a plain LoRA layer",
        &["proj", "Delta-LoRA"],
        || {
            let mut l = LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?;
            restore_base_weight(&mut l, weight(4, 6, DType::F32))
        },
    );
    for lambda in [f64::NAN, f64::INFINITY] {
        c.err(
            &format!("DeltaLoraHook lambda {lambda}"),
            &["lambda"],
            || {
                let l = delta_lora_linear(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?;
                DeltaLoraHook::new([Shared::new(l)], DeltaLoraUpdate::new(lambda, 0))
            },
        );
    }
    c.err("DeltaLoraHook over a plain LoRA layer", &["proj"], || {
        let l = LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?;
        DeltaLoraHook::new([Shared::new(l)], DeltaLoraUpdate::new(1.0, 0))
    });
    c.finish();
}

#[test]
fn vera_rejects_bad_pairs_ranks_and_layer_sizes() {
    let mut c = Checker::new();
    let dev = cpu();
    let f = |dims: &[usize], dtype: DType| Tensor::ones(dims.to_vec(), dtype, &dev).unwrap();
    let config = |r| VeraConfig {
        r,
        ..VeraConfig::default()
    };
    c.err("VeraShared::new rank 0", &["vera", "rank", "got 0"], || {
        VeraShared::new(0, 6, 4, 0, DType::F32, &dev)
    });
    for (what, a, b, needles) in [
        (
            "1-D A",
            f(&[6], DType::F32),
            f(&[4, 2], DType::F32),
            &["vera", "[6]"][..],
        ),
        (
            "ranks differ",
            f(&[2, 6], DType::F32),
            f(&[4, 3], DType::F32),
            &["vera", "[2, 6]", "[4, 3]"][..],
        ),
        (
            "rank 0",
            f(&[0, 6], DType::F32),
            f(&[4, 0], DType::F32),
            &["vera", "rank", "got 0"][..],
        ),
        (
            "f16 B with f32 A",
            f(&[2, 6], DType::F32),
            f(&[4, 2], DType::F16),
            &["vera", "vera_B", "F16"][..],
        ),
        (
            "scalar A",
            Tensor::new(1f32, &dev).unwrap(),
            f(&[4, 1], DType::F32),
            &["vera"][..],
        ),
    ] {
        c.err(
            &format!("VeraShared::from_tensors, {what}"),
            needles,
            || VeraShared::from_tensors(a.clone(), b.clone()),
        );
    }
    c.err(
        "VeraShared::new with a rank too large to allocate",
        &["vera", "too large"],
        || VeraShared::new(1 << 61, 6, 4, 0, DType::F32, &dev),
    );
    c.err(
        "VeraBuilder reserving a layer too large to allocate",
        &["vera", "too large"],
        || {
            let mut builder = VeraBuilder::new(config(2));
            builder.reserve(usize::MAX, 4)?;
            builder.shared(DType::F32, &dev)
        },
    );
    let shared = VeraShared::new(3, 6, 4, 0, DType::F32, &dev).unwrap();
    c.err(
        "VeraLinear::new with r above the shared pair's rank",
        &["proj", "r = 5", "rank 3"],
        || VeraLinear::new(base(4, 6), &shared, &config(5), vb("proj")),
    );
    c.err(
        "VeraLinear::new with r below the shared pair's rank",
        &["proj", "r = 2", "rank 3"],
        || VeraLinear::new(base(4, 6), &shared, &config(2), vb("proj")),
    );
    c.err(
        "VeraLinear::new with rank 0",
        &["proj", "rank", "got 0"],
        || VeraLinear::new(base(4, 6), &shared, &config(0), vb("proj")),
    );
    c.err(
        "VeraLinear::new, d_in larger than the pair",
        &["proj", "d_in = 7"],
        || VeraLinear::new(base(4, 7), &shared, &config(3), vb("proj")),
    );
    c.err(
        "VeraLinear::new, d_out larger than the pair",
        &["proj", "d_out = 5"],
        || VeraLinear::new(base(5, 6), &shared, &config(3), vb("proj")),
    );
    c.err(
        "VeraLinear::new, f64 layer with an f32 pair",
        &["proj", "shared pair", "F32"],
        || {
            VeraLinear::new(
                base_dtype(4, 6, DType::F64),
                &shared,
                &config(3),
                vb("proj"),
            )
        },
    );
    c.err(
        "VeraConfig d_initial NaN",
        &["proj", "d_initial", "NaN"],
        || {
            let cfg = VeraConfig {
                d_initial: f64::NAN,
                ..config(3)
            };
            VeraLinear::new(base(4, 6), &shared, &cfg, vb("proj"))
        },
    );
    c.err("VeraConfig dropout 1", &["proj", "dropout"], || {
        let cfg = VeraConfig {
            dropout: 1.0,
            ..config(3)
        };
        VeraLinear::new(base(4, 6), &shared, &cfg, vb("proj"))
    });
    for (what, d, b, needles) in [
        (
            "lambda_d of the wrong length",
            f(&[2], DType::F32),
            f(&[4], DType::F32),
            &["proj", "vera_lambda_d", "[2]"][..],
        ),
        (
            "lambda_b of the wrong length",
            f(&[3], DType::F32),
            f(&[6], DType::F32),
            &["proj", "vera_lambda_b", "[6]"][..],
        ),
        (
            "2-D lambda_b",
            f(&[3], DType::F32),
            f(&[4, 1], DType::F32),
            &["proj", "vera_lambda_b"][..],
        ),
        (
            "f64 lambda_d",
            f(&[3], DType::F64),
            f(&[4], DType::F32),
            &["proj", "vera_lambda_d", "F64"][..],
        ),
    ] {
        c.err(
            &format!("VeraLinear::from_tensors, {what}"),
            needles,
            || VeraLinear::from_tensors("proj", base(4, 6), &shared, d.clone(), b.clone(), 0.0),
        );
    }
    // The builder: growing after the pair exists, and rank 0.
    c.err(
        "VeraBuilder::reserve after the pair was created",
        &["vera", "8 → 9"],
        || {
            let mut builder = VeraBuilder::new(config(3));
            builder.reserve(6, 4)?;
            builder.shared(DType::F32, &dev)?;
            builder.reserve(8, 9).map(|_| ())
        },
    );
    c.err(
        "VeraBuilder::with_shared, layer larger than the pair",
        &["vera"],
        || {
            let mut builder = VeraBuilder::with_shared(config(3), shared.clone());
            builder.reserve_for(&base(4, 7)).map(|_| ())
        },
    );
    c.err(
        "VeraBuilder::build, layer larger than the reserved shapes",
        &["proj", "d_in = 7"],
        || {
            let mut builder = VeraBuilder::new(config(3));
            builder.reserve(6, 4)?;
            builder.build(base(4, 7), vb("proj"))
        },
    );
    c.err("VeraBuilder rank 0", &["vera", "rank", "got 0"], || {
        let mut builder = VeraBuilder::new(config(0));
        builder.reserve(6, 4)?;
        builder.build(base(4, 6), vb("proj"))
    });
    c.err(
        "VeraBuilder::build with nothing reserved",
        &["proj"],
        || {
            let mut builder = VeraBuilder::new(config(3));
            builder.build(base(4, 6), vb("proj"))
        },
    );
    c.finish();
}

#[test]
fn adalora_layer_rejects_bad_configs_tensors_and_masks() {
    let mut c = Checker::new();
    let dev = cpu();
    let f = |dims: &[usize], dtype: DType| Tensor::ones(dims.to_vec(), dtype, &dev).unwrap();
    for (what, config, needles) in [
        (
            "init_r 0",
            AdaLoraConfig::new(0, 4.0),
            &["proj", "rank", "got 0"][..],
        ),
        (
            "alpha NaN",
            AdaLoraConfig::new(3, f64::NAN),
            &["proj", "alpha", "NaN"][..],
        ),
        (
            "alpha -2",
            AdaLoraConfig::new(3, -2.0),
            &["proj", "alpha", "-2"][..],
        ),
        (
            "init_r too large to allocate",
            AdaLoraConfig::new(1 << 61, 4.0),
            &["proj", "init_r", "too large"][..],
        ),
        (
            "dropout 1.5",
            AdaLoraConfig {
                dropout: 1.5,
                ..AdaLoraConfig::new(3, 4.0)
            },
            &["proj", "dropout", "1.5"][..],
        ),
    ] {
        c.err(&format!("AdaLoraLinear::new, {what}"), needles, || {
            AdaLoraLinear::new(base(4, 6), &config, vb("proj"))
        });
    }
    let from = |a: Tensor, e: Tensor, b: Tensor, init_r: usize| {
        AdaLoraLinear::from_tensors("proj", base(4, 6), a, e, b, init_r, 4.0, 0.0)
    };
    for (what, a, e, b, init_r, needles) in [
        (
            "rank above init_r",
            f(&[4, 6], DType::F32),
            f(&[4, 1], DType::F32),
            f(&[4, 4], DType::F32),
            3,
            &["proj", "init_r = 3", "rank 4"][..],
        ),
        (
            "init_r 0",
            f(&[0, 6], DType::F32),
            f(&[0, 1], DType::F32),
            f(&[4, 0], DType::F32),
            0,
            &["proj", "rank", "got 0"][..],
        ),
        (
            "A with the wrong d_in",
            f(&[2, 5], DType::F32),
            f(&[2, 1], DType::F32),
            f(&[4, 2], DType::F32),
            3,
            &["proj", "lora_A", "[2, 5]"][..],
        ),
        (
            "E of the wrong shape",
            f(&[2, 6], DType::F32),
            f(&[2], DType::F32),
            f(&[4, 2], DType::F32),
            3,
            &["proj", "lora_E", "[2]"][..],
        ),
        (
            "B of the wrong shape",
            f(&[2, 6], DType::F32),
            f(&[2, 1], DType::F32),
            f(&[4, 3], DType::F32),
            3,
            &["proj", "lora_B", "[4, 3]"][..],
        ),
        (
            "f16 E",
            f(&[2, 6], DType::F32),
            f(&[2, 1], DType::F16),
            f(&[4, 2], DType::F32),
            3,
            &["proj", "lora_E", "F16"][..],
        ),
        (
            "scalar A",
            Tensor::new(1f32, &dev).unwrap(),
            f(&[2, 1], DType::F32),
            f(&[4, 2], DType::F32),
            3,
            &["proj", "lora_A"][..],
        ),
    ] {
        c.err(
            &format!("AdaLoraLinear::from_tensors, {what}"),
            needles,
            || from(a.clone(), e.clone(), b.clone(), init_r),
        );
    }
    // A rank-0 layer (everything pruned, as a saved AdaLoRA can be) is valid and works.
    if let Some(mut l) = c.ok("AdaLoraLinear::from_tensors with rank 0 < init_r", || {
        from(
            f(&[0, 6], DType::F32),
            f(&[0, 1], DType::F32),
            f(&[4, 0], DType::F32),
            3,
        )
    }) {
        c.ok("rank-0 AdaLoRA forward", || {
            l.forward_t(&input(&[2, 6], DType::F32), true)
        });
        c.ok("rank-0 AdaLoRA empty batch", || {
            l.forward_t(&input(&[0, 6], DType::F32), true)
        });
        c.ok("rank-0 AdaLoRA merge", || l.merge(true));
        c.ok("rank-0 AdaLoRA unmerge", || l.unmerge());
        c.ok("rank-0 AdaLoRA tensors_to_save", || l.tensors_to_save());
    }
    if let Some(mut l) = c.ok("AdaLoRA build", || {
        AdaLoraLinear::new(base(4, 6), &AdaLoraConfig::new(3, 4.0), vb("proj"))
    }) {
        c.err(
            "apply_mask of the wrong length",
            &["proj", "rank mask", "2 entries"],
            || l.apply_mask(&[true, false]),
        );
        c.err(
            "set_loaded_rank_pattern of the wrong length",
            &["proj", "rank_pattern"],
            || l.set_loaded_rank_pattern(&[true, true]),
        );
        c.err(
            "set_loaded_rank_pattern with too few kept",
            &["proj", "rank_pattern"],
            || l.set_loaded_rank_pattern(&[true, false, false]),
        );
        c.ok("apply_mask pruning everything", || {
            l.apply_mask(&[false, false, false])
        });
        c.ok("forward with everything pruned", || {
            l.forward_t(&input(&[2, 6], DType::F32), true)
        });
        c.ok("tensors_to_save with everything pruned", || {
            l.tensors_to_save()
        });
        c.ok("merge", || l.merge(true));
        c.err("apply_mask while merged", &["proj", "merged"], || {
            l.apply_mask(&[true, true, true])
        });
    }
    c.finish();
}

#[test]
fn kernel_entry_points_reject_mismatched_operands() {
    let mut c = Checker::new();
    let dev = cpu();
    let f = |dims: &[usize], dtype: DType| Tensor::ones(dims.to_vec(), dtype, &dev).unwrap();
    let w = f(&[4, 6], DType::F32);
    let (a, b) = (f(&[2, 6], DType::F32), f(&[4, 2], DType::F32));
    let x = f(&[3, 6], DType::F32);
    let (w1, bias3, c5, b43, b52, a64) = (
        b.flatten_all().unwrap(),
        f(&[3], DType::F32),
        f(&[5], DType::F32),
        f(&[4, 3], DType::F32),
        f(&[5, 2], DType::F32),
        f(&[2, 6], DType::F64),
    );
    let (bias4, c4) = (f(&[4], DType::F32), f(&[4], DType::F32));
    let term = |a, b| LowRankTerm { a, b, scale: 1.0 };
    let run = |fl: FusedLinear, x: &Tensor| -> lorakit::Result<(Tensor, Tensor)> {
        Ok((fl.forward(x)?, fl.forward_composed(x)?))
    };
    let cases: Vec<(&str, FusedLinear, Tensor)> = vec![
        (
            "x with the wrong last dim",
            FusedLinear {
                weight: &w,
                bias: None,
                low_rank: Some(term(&a, &b)),
                row_scale: None,
            },
            f(&[3, 5], DType::F32),
        ),
        (
            "x with the wrong last dim, no low-rank term",
            FusedLinear {
                weight: &w,
                bias: None,
                low_rank: None,
                row_scale: None,
            },
            f(&[3, 7], DType::F32),
        ),
        (
            "1-D weight",
            FusedLinear {
                weight: &w1,
                bias: None,
                low_rank: None,
                row_scale: None,
            },
            x.clone(),
        ),
        (
            "bias of the wrong length",
            FusedLinear {
                weight: &w,
                bias: Some(&bias3),
                low_rank: None,
                row_scale: None,
            },
            x.clone(),
        ),
        (
            "row scale of the wrong length",
            FusedLinear {
                weight: &w,
                bias: None,
                low_rank: Some(term(&a, &b)),
                row_scale: Some(&c5),
            },
            x.clone(),
        ),
        (
            "B of the wrong rank",
            FusedLinear {
                weight: &w,
                bias: None,
                low_rank: Some(term(&a, &b43)),
                row_scale: None,
            },
            x.clone(),
        ),
        (
            "B of the wrong d_out",
            FusedLinear {
                weight: &w,
                bias: None,
                low_rank: Some(term(&a, &b52)),
                row_scale: None,
            },
            x.clone(),
        ),
        (
            "scalar x",
            FusedLinear {
                weight: &w,
                bias: None,
                low_rank: None,
                row_scale: None,
            },
            Tensor::new(1f32, &dev).unwrap(),
        ),
    ];
    for (what, fl, x) in cases {
        let needles: &[&str] = match what {
            "x with the wrong last dim" => &["fused linear", "input", "[3, 5]"],
            "x with the wrong last dim, no low-rank term" => &["fused linear", "input", "[3, 7]"],
            "1-D weight" => &["fused linear", "weight", "[8]"],
            "bias of the wrong length" => &["fused linear", "bias", "[3]"],
            "row scale of the wrong length" => &["fused linear", "row scale", "[5]"],
            "B of the wrong rank" => &["fused linear", "B", "[4, 3]"],
            "B of the wrong d_out" => &["fused linear", "B", "[5, 2]"],
            "scalar x" => &["fused linear", "input", "[]"],
            _ => &["fused linear"],
        };
        c.err(&format!("FusedLinear, {what}"), needles, || run(fl, &x));
    }
    // Mixed dtypes are not an error at this level: the kernel casts every operand to x's
    // compute dtype (documented in `kernels`; DoRA passes an f32 row scale for f16 layers).
    // The layers check dtypes before they call it (see the tests above).
    for (what, fl, x) in [
        (
            "f64 A, f32 x",
            FusedLinear {
                weight: &w,
                bias: None,
                low_rank: Some(term(&a64, &b)),
                row_scale: None,
            },
            x.clone(),
        ),
        (
            "f32 W, f64 x",
            FusedLinear {
                weight: &w,
                bias: None,
                low_rank: Some(term(&a, &b)),
                row_scale: None,
            },
            f(&[3, 6], DType::F64),
        ),
    ] {
        if let Some((y, yc)) = c.ok(&format!("FusedLinear, {what}"), || run(fl, &x)) {
            c.check(
                &format!("FusedLinear, {what}: output dtype"),
                y.dtype() == x.dtype() && yc.dtype() == x.dtype(),
                || {
                    format!(
                        "x is {:?}, got {:?} and {:?}",
                        x.dtype(),
                        y.dtype(),
                        yc.dtype()
                    )
                },
            );
        }
    }
    if let Some((y, _)) = c.ok("FusedLinear, empty batch", || {
        run(
            FusedLinear {
                weight: &w,
                bias: Some(&bias4),
                low_rank: Some(term(&a, &b)),
                row_scale: Some(&c4),
            },
            &f(&[0, 6], DType::F32),
        )
    }) {
        c.check("FusedLinear, empty output", y.dims() == [0, 4], || {
            format!("got {:?}", y.dims())
        });
    }
    c.err("low_rank_only with the wrong A", &[], || {
        let a25 = f(&[2, 5], DType::F32);
        // low_rank_only is the LoRA-drop probe's helper: candle's matmul error is enough.
        low_rank_only(
            &x,
            &LowRankTerm {
                a: &a25,
                b: &b,
                scale: 1.0,
            },
        )
    });
    c.finish();
}
