//! Bad input to the layers — the frozen base, every variant's constructors and methods, the
//! fused kernel — returns an `Err` naming the problem, never panics. Empty batches (zero
//! rows, in 2-D or 3-D) are valid and give an empty output.
//!
//! Device mismatches cannot be produced here (only the CPU exists in CI); the same check
//! (`validate::dtype_device`) that rejects a dtype mismatch rejects them.

use crate::bad_input_common::*;
use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::kernels::{low_rank_only, FusedLinear, LowRankTerm};
use lorakit::low_rank::{Factor, LowRankPair};
use lorakit::model::{
    linear_no_bias, AdaptedSet, AdapterPlan, Linear, ModuleSelector, RankAlpha, TargetSpec,
};
use lorakit::peft::{save_adapter, PeftConfig};
use lorakit::train::{
    LayerImportance, LoraDropConfig, LoraFaProjection, RankAllocator, RankAllocatorConfig,
};
use lorakit::variants::AdapterLayer;
use lorakit::{
    AdaLoraConfig, AdaLoraLinear, AdaLoraWeights, Adapter, DeltaLoraConfig, DeltaLoraHook,
    DeltaLoraLinear, DeltaLoraUpdate, DoraLinear, DoraWeights, Error, FrozenLinear, LoraConfig,
    LoraDrop, LoraDropLinear, LoraFaConfig, LoraFaLinear, LoraLinear, Scope, Shared, Variant,
    VeraConfig, VeraLinear, VeraShared, VeraWeights,
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
            Ok(Box::new(LoraFaLinear::new(
                b,
                &LoraFaConfig::new(2, 4.0),
                vb("proj"),
            )?))
        }),
        ("LoRA-drop", |b| {
            Ok(Box::new(LoraDropLinear::new(
                b,
                &LoraConfig::new(2, 4.0),
                vb("proj"),
            )?))
        }),
        ("Delta-LoRA", |b| {
            Ok(Box::new(DeltaLoraLinear::new(
                b,
                &DeltaLoraConfig::new(2, 4.0),
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
            let shared =
                VeraShared::covering(3, 0, [(b.d_in(), b.d_out())], b.dtype(), b.device())?;
            Ok(Box::new(VeraLinear::new(
                b,
                &VeraConfig::new(shared),
                vb("proj"),
            )?))
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

/// The config `from_weights` needs to give a rank-`r` pair the scale `scale` (`alpha / r`,
/// no rsLoRA) and dropout `dropout`: what the old `from_pair(.., scale, dropout)` took.
fn scale_config(r: usize, scale: f64, dropout: f64) -> LoraConfig {
    LoraConfig {
        alpha: scale * r as f64,
        dropout,
        ..LoraConfig::new(r, 1.0)
    }
}

/// Builds a LoRA-family layer named `proj` fresh from a config.
type New = fn(FrozenLinear, &LoraConfig, VarBuilder<'static>) -> lorakit::Result<Box<dyn Adapter>>;

/// Every LoRA-family layer's `new`; `true` where the layer takes dropout (Delta-LoRA does not).
fn lora_family_new() -> Vec<(&'static str, New, bool)> {
    vec![
        (
            "LoraLinear::new",
            |b, c, vb| Ok(Box::new(LoraLinear::new(b, c, vb)?)),
            true,
        ),
        (
            "LoraFaLinear::new",
            |b, c, vb| Ok(Box::new(LoraFaLinear::new(b, c, vb)?)),
            true,
        ),
        (
            "LoraDropLinear::new",
            |b, c, vb| Ok(Box::new(LoraDropLinear::new(b, c, vb)?)),
            true,
        ),
        (
            "DoraLinear::new",
            |b, c, vb| Ok(Box::new(DoraLinear::new(b, c, vb)?)),
            true,
        ),
        (
            "DeltaLoraLinear::new",
            |b, c, vb| Ok(Box::new(DeltaLoraLinear::new(b, c, vb)?)),
            false,
        ),
    ]
}

/// Builds a LoRA-family layer named `proj` from a config and a pair (DoRA: with a magnitude
/// of ones).
type FromWeights = fn(FrozenLinear, &LoraConfig, LowRankPair) -> lorakit::Result<Box<dyn Adapter>>;

/// Every LoRA-family layer's `from_weights`; `true` where the layer takes dropout.
fn lora_family_from_weights() -> Vec<(&'static str, FromWeights, bool)> {
    vec![
        (
            "LoraLinear::from_weights",
            |b, c, p| Ok(Box::new(LoraLinear::from_weights("proj", b, c, p)?)),
            true,
        ),
        (
            "LoraFaLinear::from_weights",
            |b, c, p| Ok(Box::new(LoraFaLinear::from_weights("proj", b, c, p)?)),
            true,
        ),
        (
            "LoraDropLinear::from_weights",
            |b, c, p| Ok(Box::new(LoraDropLinear::from_weights("proj", b, c, p)?)),
            true,
        ),
        (
            "DoraLinear::from_weights",
            |b, c, p| {
                let magnitude = Tensor::ones(b.d_out(), b.dtype(), b.device())?;
                let weights = DoraWeights { pair: p, magnitude };
                Ok(Box::new(DoraLinear::from_weights("proj", b, c, weights)?))
            },
            true,
        ),
        (
            "DeltaLoraLinear::from_weights",
            |b, c, p| Ok(Box::new(DeltaLoraLinear::from_weights("proj", b, c, p)?)),
            false,
        ),
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
        let Some(mut l) = c.ok(&format!("from_weights with a {bad} B"), || {
            LoraLinear::from_weights("proj", base(4, 6), &scale_config(2, 1.0, 0.0), pair)
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
    let good = || LowRankPair {
        a: Factor::Frozen(Tensor::ones((2, 6), DType::F32, &dev).unwrap()),
        b: Factor::Frozen(Tensor::ones((4, 2), DType::F32, &dev).unwrap()),
    };
    for (what, config, needles) in &bad_configs {
        c.err(&format!("LoraConfig::validate, {what}"), needles, || {
            config.validate("proj")
        });
        for (name, new, takes_dropout) in lora_family_new() {
            if takes_dropout || config.dropout == 0.0 {
                c.err(&format!("{name}, {what}"), needles, || {
                    new(base(4, 6), config, vb("proj"))
                });
            }
        }
        // The config is checked before the pair (a rank-2 pair that fits the base).
        for (name, from_weights, takes_dropout) in lora_family_from_weights() {
            if takes_dropout || config.dropout == 0.0 {
                c.err(&format!("{name}, {what}"), needles, || {
                    from_weights(base(4, 6), config, good())
                });
            }
        }
    }
    c.err(
        "DeltaLoraLinear::new with dropout",
        &["proj", "dropout", "0.1"],
        || {
            let config = LoraConfig {
                dropout: 0.1,
                ..LoraConfig::new(2, 4.0)
            };
            DeltaLoraLinear::new(base(4, 6), &config, vb("proj"))
        },
    );
    c.err(
        "DeltaLoraLinear::from_weights with dropout",
        &["proj", "dropout"],
        || {
            let config = LoraConfig {
                dropout: 0.1,
                ..LoraConfig::new(2, 4.0)
            };
            DeltaLoraLinear::from_weights("proj", base(4, 6), &config, good())
        },
    );
    // A rank whose factors cannot even be addressed is refused before any allocation.
    for r in [usize::MAX / 2, 1usize << 61] {
        let huge = LoraConfig::new(r, 4.0);
        let needles = &["proj", "`r`", "too large"][..];
        for (name, new, _) in lora_family_new() {
            c.err(&format!("{name}, rank {r}"), needles, || {
                new(base(4, 6), &huge, vb("proj"))
            });
        }
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
    // A valid config of rank 2 and scale 1 (the old `from_pair(.., 1.0, 0.0)`): the pair is
    // what is wrong.
    let unit = scale_config(2, 1.0, 0.0);
    for (what, a, b, needles) in &bad_pairs {
        for (name, from_weights, _) in lora_family_from_weights() {
            c.err(&format!("{name}, {what}"), needles, || {
                from_weights(base(4, 6), &unit, pair(a.clone(), b.clone()))
            });
        }
        c.err(&format!("LoraLinear::set_pair, {what}"), needles, || {
            let mut l = LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?;
            l.set_pair(pair(a.clone(), b.clone()))
        });
        c.err(
            &format!("LoraDropLinear::set_pair, {what}"),
            needles,
            || {
                let mut l = LoraDropLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?;
                l.set_pair(pair(a.clone(), b.clone()))
            },
        );
        c.no_panic(&format!("LowRankPair::rank, {what}"), || {
            pair(a.clone(), b.clone()).rank()
        });
        c.no_panic(&format!("LowRankPair::product, {what}"), || {
            pair(a.clone(), b.clone()).product().map(|_| ())
        });
    }
    for (name, from_weights, takes_dropout) in lora_family_from_weights() {
        c.ok(&format!("{name}, a valid pair"), || {
            from_weights(base(4, 6), &unit, good())
        });
        // The scale is the config's `alpha / r` now (it was an argument): a non-finite one
        // comes from a non-finite alpha, refused as such.
        for alpha in [f64::NAN, f64::INFINITY] {
            let config = LoraConfig::new(2, alpha);
            c.err(
                &format!("{name} with alpha {alpha}"),
                &["proj", "alpha", &alpha.to_string()],
                || from_weights(base(4, 6), &config, good()),
            );
        }
        // New: the config's rank must be the pair's.
        c.err_where(
            &format!("{name} with r = 3 for a rank-2 pair"),
            &["proj", "r = 3", "rank 2"],
            "Error::InvalidConfig for the layer",
            |e| matches!(e, Error::InvalidConfig { scope: Scope::Layer(l), field: "r", .. } if l == "proj"),
            || from_weights(base(4, 6), &LoraConfig::new(3, 3.0), good()),
        );
        if takes_dropout {
            c.err(
                &format!("{name} with dropout 2"),
                &["proj", "dropout", "2"],
                || from_weights(base(4, 6), &scale_config(2, 1.0, 2.0), good()),
            );
        }
    }
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
            &format!("DoraLinear::from_weights, {what}"),
            needles,
            || {
                let weights = DoraWeights {
                    pair: good(),
                    magnitude: m.clone(),
                };
                DoraLinear::from_weights("proj", base(4, 6), &unit, weights)
            },
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
    // Delta-LoRA's weight restore (a method of the Delta-LoRA layer, so it cannot be called
    // on another variant's layer any more).
    if let Some(mut delta) = c.ok("Delta-LoRA build", || {
        DeltaLoraLinear::new(base(4, 6), &DeltaLoraConfig::new(2, 4.0), vb("proj"))
    }) {
        c.err(
            "restore_base_weight of the wrong shape",
            &["proj", "weight", "[6, 4]"],
            || delta.restore_base_weight(weight(6, 4, DType::F32)),
        );
        c.err(
            "restore_base_weight in f64",
            &["proj", "weight", "F64"],
            || delta.restore_base_weight(weight(4, 6, DType::F64)),
        );
        c.ok("restore_base_weight", || {
            delta.restore_base_weight(weight(4, 6, DType::F32))
        });
        c.ok("Delta-LoRA merge", || delta.merge(true));
        c.err(
            "restore_base_weight while merged",
            &["proj", "merged"],
            || delta.restore_base_weight(weight(4, 6, DType::F32)),
        );
    }
    for lambda in [f64::NAN, f64::INFINITY] {
        c.err(
            &format!("DeltaLoraHook lambda {lambda}"),
            &["lambda"],
            || {
                let config = DeltaLoraConfig::new(2, 4.0);
                let l = DeltaLoraLinear::new(base(4, 6), &config, vb("proj"))?;
                DeltaLoraHook::new(&[Shared::new(l).erase()], DeltaLoraUpdate::new(lambda, 0))
            },
        );
    }
    // The hook picks the Delta-LoRA layers from what it is given; a plain LoRA layer alone
    // leaves it none, a usage error naming the hook (it used to name the layer).
    c.err_where(
        "DeltaLoraHook over a plain LoRA layer",
        &["Delta-LoRA hook", "Delta-LoRA layer"],
        "Error::Usage",
        |e| matches!(e, Error::Usage { .. }),
        || {
            let l = LoraLinear::new(base(4, 6), &LoraConfig::new(2, 4.0), vb("proj"))?;
            DeltaLoraHook::new(&[Shared::new(l).erase()], DeltaLoraUpdate::new(1.0, 0))
        },
    );
    c.finish();
}

#[test]
fn vera_rejects_bad_pairs_ranks_and_layer_sizes() {
    let mut c = Checker::new();
    let dev = cpu();
    let f = |dims: &[usize], dtype: DType| Tensor::ones(dims.to_vec(), dtype, &dev).unwrap();
    // The pair names itself "VeRA shared pair" in errors (it was "vera").
    const PAIR: &str = "VeRA shared pair";
    c.err("VeraShared::new rank 0", &[PAIR, "rank", "got 0"], || {
        VeraShared::new(0, 6, 4, 0, DType::F32, &dev)
    });
    c.err(
        "VeraShared::covering rank 0",
        &[PAIR, "rank", "got 0"],
        || VeraShared::covering(0, 0, [(6, 4)], DType::F32, &dev),
    );
    for (what, a, b, needles) in [
        (
            "1-D A",
            f(&[6], DType::F32),
            f(&[4, 2], DType::F32),
            &[PAIR, "[6]"][..],
        ),
        (
            "ranks differ",
            f(&[2, 6], DType::F32),
            f(&[4, 3], DType::F32),
            &[PAIR, "[2, 6]", "[4, 3]"][..],
        ),
        (
            "rank 0",
            f(&[0, 6], DType::F32),
            f(&[4, 0], DType::F32),
            &[PAIR, "rank", "got 0"][..],
        ),
        (
            "f16 B with f32 A",
            f(&[2, 6], DType::F32),
            f(&[4, 2], DType::F16),
            &[PAIR, "vera_B", "F16"][..],
        ),
        (
            "scalar A",
            Tensor::new(1f32, &dev).unwrap(),
            f(&[4, 1], DType::F32),
            &[PAIR][..],
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
        &[PAIR, "too large"],
        || VeraShared::new(1 << 61, 6, 4, 0, DType::F32, &dev),
    );
    c.err(
        "VeraShared::covering a layer too large to allocate",
        &[PAIR, "too large"],
        || VeraShared::covering(2, 0, [(6, 4), (usize::MAX, 4)], DType::F32, &dev),
    );
    // The pair covers the largest of the shapes.
    if let Some(p) = c.ok("VeraShared::covering two shapes", || {
        VeraShared::covering(3, 0, [(6, 2), (5, 4)], DType::F32, &dev)
    }) {
        c.check(
            "VeraShared::covering size",
            (p.rank(), p.max_d_in(), p.max_d_out()) == (3, 6, 4),
            || format!("got {:?}", (p.rank(), p.max_d_in(), p.max_d_out())),
        );
    }
    // The layer's rank is the pair's (VeraConfig has no `r` to disagree with it any more).
    let shared = VeraShared::new(3, 6, 4, 0, DType::F32, &dev).unwrap();
    let config = VeraConfig::new(shared.clone());
    c.err(
        "VeraLinear::new, d_in larger than the pair",
        &["proj", "d_in = 7"],
        || VeraLinear::new(base(4, 7), &config, vb("proj")),
    );
    c.err(
        "VeraLinear::new, d_out larger than the pair",
        &["proj", "d_out = 5"],
        || VeraLinear::new(base(5, 6), &config, vb("proj")),
    );
    c.err(
        "VeraLinear::new, f64 layer with an f32 pair",
        &["proj", "shared pair", "F32"],
        || VeraLinear::new(base_dtype(4, 6, DType::F64), &config, vb("proj")),
    );
    c.err(
        "VeraConfig d_initial NaN",
        &["proj", "d_initial", "NaN"],
        || {
            let cfg = VeraConfig {
                d_initial: f64::NAN,
                ..config.clone()
            };
            VeraLinear::new(base(4, 6), &cfg, vb("proj"))
        },
    );
    c.err("VeraConfig dropout 1", &["proj", "dropout"], || {
        let cfg = VeraConfig {
            dropout: 1.0,
            ..config.clone()
        };
        VeraLinear::new(base(4, 6), &cfg, vb("proj"))
    });
    c.err(
        "VeraLinear::from_weights, dropout 1",
        &["proj", "dropout"],
        || {
            let cfg = VeraConfig {
                dropout: 1.0,
                ..config.clone()
            };
            let weights = VeraWeights {
                lambda_d: f(&[3], DType::F32),
                lambda_b: f(&[4], DType::F32),
            };
            VeraLinear::from_weights("proj", base(4, 6), &cfg, weights)
        },
    );
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
            &format!("VeraLinear::from_weights, {what}"),
            needles,
            || {
                let weights = VeraWeights {
                    lambda_d: d.clone(),
                    lambda_b: b.clone(),
                };
                VeraLinear::from_weights("proj", base(4, 6), &config, weights)
            },
        );
    }
    c.ok("VeraLinear::from_weights, valid vectors", || {
        let weights = VeraWeights {
            lambda_d: f(&[3], DType::F32),
            lambda_b: f(&[4], DType::F32),
        };
        VeraLinear::from_weights("proj", base(4, 6), &config, weights)
    });
    // A pair made for other shapes than the layer's (it was VeraBuilder's reserve/build).
    c.err(
        "VeraLinear::from_weights, layer larger than the pair",
        &["proj", "d_in = 7"],
        || {
            let weights = VeraWeights {
                lambda_d: f(&[3], DType::F32),
                lambda_b: f(&[4], DType::F32),
            };
            VeraLinear::from_weights("proj", base(4, 7), &config, weights)
        },
    );
    c.err(
        "VeraLinear::new, layer larger than the covered shapes",
        &["proj", "d_in = 7"],
        || {
            let shared = VeraShared::covering(3, 0, [(6, 4)], DType::F32, &dev)?;
            VeraLinear::new(base(4, 7), &VeraConfig::new(shared), vb("proj"))
        },
    );
    c.err(
        "VeraLinear::new over a pair covering no shapes",
        &["proj", "d_in = 6"],
        || {
            let shared = VeraShared::covering(3, 0, [], DType::F32, &dev)?;
            VeraLinear::new(base(4, 6), &VeraConfig::new(shared), vb("proj"))
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
    let from_pattern =
        |a: Tensor, e: Tensor, b: Tensor, init_r: usize, pattern: Option<&[bool]>| {
            let weights = AdaLoraWeights {
                a,
                e,
                b,
                rank_pattern: pattern.map(<[bool]>::to_vec),
            };
            AdaLoraLinear::from_weights(
                "proj",
                base(4, 6),
                &AdaLoraConfig::new(init_r, 4.0),
                weights,
            )
        };
    let from = |a: Tensor, e: Tensor, b: Tensor, init_r: usize| from_pattern(a, e, b, init_r, None);
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
            &format!("AdaLoraLinear::from_weights, {what}"),
            needles,
            || from(a.clone(), e.clone(), b.clone(), init_r),
        );
    }
    // A rank-0 layer (everything pruned, as a saved AdaLoRA can be) is valid and works.
    if let Some(mut l) = c.ok("AdaLoraLinear::from_weights with rank 0 < init_r", || {
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
    // A loaded layer's `rank_pattern` (which of the init_r ranks its rows are) must have
    // init_r entries with as many kept as the layer's rank (it was `set_loaded_rank_pattern`).
    let full = || {
        (
            f(&[3, 6], DType::F32),
            f(&[3, 1], DType::F32),
            f(&[4, 3], DType::F32),
        )
    };
    let two = || {
        (
            f(&[2, 6], DType::F32),
            f(&[2, 1], DType::F32),
            f(&[4, 2], DType::F32),
        )
    };
    for (what, (a, e, b), pattern) in [
        (
            "rank_pattern of the wrong length",
            full(),
            &[true, true][..],
        ),
        (
            "rank_pattern with too few kept",
            full(),
            &[true, false, false][..],
        ),
        (
            "rank_pattern with too many kept",
            two(),
            &[true, true, true][..],
        ),
    ] {
        c.err(
            &format!("AdaLoraLinear::from_weights, {what}"),
            &["proj", "rank_pattern"],
            || from_pattern(a, e, b, 3, Some(pattern)),
        );
    }
    if let Some(l) = c.ok("AdaLoraLinear::from_weights, a valid rank_pattern", || {
        let (a, e, b) = two();
        from_pattern(a, e, b, 3, Some(&[true, false, true]))
    }) {
        c.check(
            "loaded rank_pattern kept",
            l.rank_pattern() == [true, false, true],
            || format!("got {:?}", l.rank_pattern()),
        );
    }
    if let Some(mut l) = c.ok("AdaLoRA build", || {
        AdaLoraLinear::new(base(4, 6), &AdaLoraConfig::new(3, 4.0), vb("proj"))
    }) {
        c.err(
            "apply_mask of the wrong length",
            &["proj", "rank mask", "2 entries"],
            || l.apply_mask(&[true, false]),
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

/// One fresh layer of each of the seven layer types, named `proj`, each over its own VarMap.
fn one_of_each() -> lorakit::Result<Vec<Shared<dyn Adapter>>> {
    let cfg = LoraConfig::new(2, 4.0);
    let b = || base(D_OUT, D_IN);
    let shared = VeraShared::covering(3, 0, [(D_IN, D_OUT)], DType::F32, &cpu())?;
    Ok(vec![
        Shared::new(LoraLinear::new(b(), &cfg, vb("proj"))?).erase(),
        Shared::new(LoraFaLinear::new(b(), &cfg, vb("proj"))?).erase(),
        Shared::new(LoraDropLinear::new(b(), &cfg, vb("proj"))?).erase(),
        Shared::new(DeltaLoraLinear::new(b(), &cfg, vb("proj"))?).erase(),
        Shared::new(DoraLinear::new(b(), &cfg, vb("proj"))?).erase(),
        Shared::new(VeraLinear::new(b(), &VeraConfig::new(shared), vb("proj"))?).erase(),
        Shared::new(AdaLoraLinear::new(
            b(),
            &AdaLoraConfig::new(3, 4.0),
            vb("proj"),
        )?)
        .erase(),
    ])
}

/// Every training rule takes a model's layers as `&[Shared<dyn Adapter>]` and works on those
/// of its variant: given none of them (only other variants' layers, or nothing), it refuses
/// with a usage error naming the rule and the variant it needs; given a mixed set, it picks
/// its own layer. (This replaces the old runtime refusals of calling a variant's rule on
/// another variant's layer, such as `restore_base_weight` on a plain LoRA layer, which the
/// types now rule out.)
#[test]
fn training_rules_refuse_sets_without_their_variant() {
    let mut c = Checker::new();
    let Some(all) = c.ok("one layer of each type", one_of_each) else {
        c.finish();
        return;
    };
    let pick = |only_others: bool, v: Variant| -> Vec<Shared<dyn Adapter>> {
        if !only_others {
            return Vec::new();
        }
        all.iter()
            .filter(|l| l.read().kind() != v)
            .cloned()
            .collect()
    };
    let usage = |e: &Error| {
        matches!(
            e,
            Error::Usage {
                scope: Scope::Settings(_),
                ..
            }
        )
    };
    let allocator = || RankAllocatorConfig {
        target_r: 1,
        ..RankAllocatorConfig::new(10)
    };
    for (what, only_others) in [("no layers", false), ("other variants only", true)] {
        c.err_where(
            &format!("LoraFaProjection::new, {what}"),
            &["LoRA-FA projection", "LoRA-FA layer"],
            "Error::Usage",
            usage,
            || LoraFaProjection::new(&pick(only_others, Variant::LoraFa)),
        );
        c.err_where(
            &format!("DeltaLoraHook::new, {what}"),
            &["Delta-LoRA hook", "Delta-LoRA layer"],
            "Error::Usage",
            usage,
            || {
                let layers = pick(only_others, Variant::DeltaLora);
                DeltaLoraHook::new(&layers, DeltaLoraUpdate::new(1.0, 0))
            },
        );
        c.err_where(
            &format!("RankAllocator::new, {what}"),
            &["AdaLoRA rank allocator", "AdaLoRA layer"],
            "Error::Usage",
            usage,
            || RankAllocator::new(&pick(only_others, Variant::AdaLora), allocator()),
        );
        c.err_where(
            &format!("LoraDrop::new, {what}"),
            &["LoRA-drop", "LoRA-drop layer"],
            "Error::Usage",
            usage,
            || {
                let layers = pick(only_others, Variant::LoraDrop);
                LoraDrop::new(&layers, LoraDropConfig::default())
            },
        );
    }
    if let Some(p) = c.ok("LoraFaProjection::new, every variant", || {
        LoraFaProjection::new(&all)
    }) {
        c.check("LoraFaProjection picks one layer", p.len() == 1, || {
            format!("picked {}", p.len())
        });
    }
    c.ok("DeltaLoraHook::new, every variant", || {
        DeltaLoraHook::new(&all, DeltaLoraUpdate::new(1.0, 0))
    });
    if let Some(a) = c.ok("RankAllocator::new, every variant", || {
        RankAllocator::new(&all, allocator())
    }) {
        c.check(
            "RankAllocator picks one layer",
            a.layers().len() == 1,
            || format!("picked {}", a.layers().len()),
        );
    }
    if let Some(d) = c.ok("LoraDrop::new, every variant", || {
        LoraDrop::new(&all, LoraDropConfig::default())
    }) {
        c.check("LoraDrop picks one layer", d.layers().len() == 1, || {
            format!("picked {}", d.layers().len())
        });
        // Its importances are one per LoRA-drop layer, not one per layer given.
        c.err(
            "LoraDrop::share_unselected with importances for every layer",
            &["LoRA-drop", "importance", "7 scores for 1 layers"],
            || {
                let importance: Vec<LayerImportance> = all
                    .iter()
                    .map(|l| LayerImportance {
                        name: l.read().name().to_string(),
                        raw: 1.0,
                        importance: 1.0 / 7.0,
                    })
                    .collect();
                d.share_unselected(&importance, vb("shared"))
            },
        );
    }
    c.finish();
}

/// Adapts a `d_in → D_OUT` module `q` (weights from a fresh VarMap) with `plan`.
fn adapt_q(plan: &AdapterPlan, d_in: usize) -> lorakit::Result<Linear> {
    let base_map = VarMap::new();
    let base_vb = VarBuilder::from_varmap(&base_map, DType::F32, &cpu());
    linear_no_bias(d_in, D_OUT, base_vb.pp("q"), plan)
}

fn targets_q() -> TargetSpec {
    TargetSpec::new(ModuleSelector::list(["q"]))
}

/// A plan giving `q` a fresh `L` (its variables in a fresh VarMap).
fn plan_of<L: AdapterLayer>(ranks: RankAlpha, config: L::Config) -> AdapterPlan {
    AdapterPlan::of::<L>(targets_q(), ranks, config, vb(""))
}

/// Good and bad ranks, alphas and dropouts through a plan of LoRA-config layers `L`.
fn check_lora_config_plan<L: AdapterLayer<Config = LoraConfig>>(c: &mut Checker, name: &str) {
    let config = LoraConfig::default();
    c.ok(&format!("AdapterPlan::of::<{name}>, valid"), || {
        adapt_q(&plan_of::<L>(RankAlpha::new(2, 4.0), config.clone()), D_IN)
    });
    c.err(
        &format!("AdapterPlan::of::<{name}>, rank 0"),
        &["q", "rank", "got 0"],
        || adapt_q(&plan_of::<L>(RankAlpha::new(0, 4.0), config.clone()), D_IN),
    );
    c.err(
        &format!("AdapterPlan::of::<{name}>, alpha NaN"),
        &["q", "alpha", "NaN"],
        || {
            adapt_q(
                &plan_of::<L>(RankAlpha::new(2, f64::NAN), config.clone()),
                D_IN,
            )
        },
    );
    c.err(
        &format!("AdapterPlan::of::<{name}>, dropout 1"),
        &["q", "dropout", "1"],
        || {
            let config = LoraConfig {
                dropout: 1.0,
                ..config.clone()
            };
            adapt_q(&plan_of::<L>(RankAlpha::new(2, 4.0), config), D_IN)
        },
    );
}

/// `AdapterPlan::of` builds any layer type for every targeted module: a module's bad rank,
/// alpha or dropout is refused when the layer is built, naming the module's path.
#[test]
fn adapter_plans_of_every_layer_type_reject_bad_settings() {
    let mut c = Checker::new();
    check_lora_config_plan::<LoraLinear>(&mut c, "LoraLinear");
    check_lora_config_plan::<LoraFaLinear>(&mut c, "LoraFaLinear");
    check_lora_config_plan::<LoraDropLinear>(&mut c, "LoraDropLinear");
    check_lora_config_plan::<DeltaLoraLinear>(&mut c, "DeltaLoraLinear");
    check_lora_config_plan::<DoraLinear>(&mut c, "DoraLinear");
    c.err(
        "AdapterPlan::delta_lora with dropout",
        &["q", "dropout", "0.1"],
        || {
            let config = DeltaLoraConfig {
                dropout: 0.1,
                ..DeltaLoraConfig::default()
            };
            let ranks = RankAlpha::new(2, 4.0);
            adapt_q(
                &AdapterPlan::delta_lora(targets_q(), ranks, config, vb("")),
                D_IN,
            )
        },
    );
    // AdaLoRA: every layer has the config's init_r; the plan gives the alpha.
    let ada = |ranks: RankAlpha, init_r: usize| {
        adapt_q(
            &plan_of::<AdaLoraLinear>(ranks, AdaLoraConfig::new(init_r, 4.0)),
            D_IN,
        )
    };
    c.ok("AdapterPlan::of::<AdaLoraLinear>, valid", || {
        ada(RankAlpha::new(2, 4.0), 3)
    });
    c.err(
        "AdapterPlan::of::<AdaLoraLinear>, init_r 0",
        &["q", "rank", "got 0"],
        || ada(RankAlpha::new(2, 4.0), 0),
    );
    c.err(
        "AdapterPlan::of::<AdaLoraLinear>, alpha NaN",
        &["q", "alpha", "NaN"],
        || ada(RankAlpha::new(2, f64::NAN), 3),
    );
    // VeRA: the pair must cover every target.
    let pair = VeraShared::covering(3, 0, [(D_IN, D_OUT)], DType::F32, &cpu()).unwrap();
    let vera = |d_in: usize| {
        let plan = AdapterPlan::vera(targets_q(), VeraConfig::new(pair.clone()), vb(""));
        adapt_q(&plan, d_in)
    };
    c.ok("AdapterPlan::vera, valid", || vera(D_IN));
    c.err(
        "AdapterPlan::vera, a target larger than the pair",
        &["q", "d_in = 7"],
        || vera(D_IN + 1),
    );
    c.err(
        "AdapterPlan::of::<VeraLinear>, d_initial NaN",
        &["q", "d_initial", "NaN"],
        || {
            let config = VeraConfig {
                d_initial: f64::NAN,
                ..VeraConfig::new(pair.clone())
            };
            adapt_q(&plan_of::<VeraLinear>(RankAlpha::new(3, 1.0), config), D_IN)
        },
    );
    c.finish();
}

/// `PeftConfig::new(variant, ..)` builds a config for any variant without panicking, even
/// from bad numbers; they are refused when layers are built from it, and saving refuses
/// layers of another variant than the config's.
#[test]
fn peft_configs_of_every_variant_reject_bad_settings_when_used() {
    let mut c = Checker::new();
    let fresh = |config: &PeftConfig| -> lorakit::Result<Linear> {
        let plan = config.fresh_plan(vb(""), &LoraConfig::default())?;
        adapt_q(&plan, D_IN)
    };
    let cases = [
        ("valid", 2, 4.0),
        ("rank 0", 0, 4.0),
        ("alpha NaN", 2, f64::NAN),
    ];
    for v in Variant::ALL {
        for (what, r, alpha) in cases {
            let ctx = format!("PeftConfig::new({v}), {what}");
            let Some(config) = c.no_panic(&format!("{ctx}: new"), || {
                PeftConfig::new(v, r, alpha, &["q"])
            }) else {
                continue;
            };
            let described = if v == Variant::Dora { v } else { v.saved_as() };
            c.check(
                &format!("{ctx}: variant"),
                config.variant() == described,
                || format!("{} instead of {described}", config.variant()),
            );
            c.ok(&format!("{ctx}: to_json_string"), || {
                config.to_json_string()
            });
            if v == Variant::Vera {
                // VeRA's fresh layers need the model's pair: no fresh plan from a config.
                c.err(&format!("{ctx}: fresh plan"), &["VERA"], || fresh(&config));
            } else if what == "valid" {
                c.ok(&format!("{ctx}: fresh layer"), || fresh(&config));
            } else {
                let needles: &[&str] = match what {
                    "rank 0" => &["q", "rank", "got 0"],
                    _ => &["q", "alpha", "NaN"],
                };
                c.err(&format!("{ctx}: fresh layer"), needles, || fresh(&config));
            }
        }
    }
    // Saving checks the layers' variant against the config's: DoRA layers under a plain
    // LoRA config (and LoRA layers under a DoRA one) would be misread by PEFT.
    let dir = std::env::temp_dir().join(format!("lorakit-bad-input-{}", std::process::id()));
    let set_of = |dora: bool| -> lorakit::Result<AdaptedSet> {
        let (ranks, config) = (RankAlpha::new(2, 4.0), LoraConfig::default());
        let plan = if dora {
            AdapterPlan::dora(targets_q(), ranks, config, vb(""))
        } else {
            AdapterPlan::lora(targets_q(), ranks, config, vb(""))
        };
        adapt_q(&plan, D_IN)?;
        plan.finish()
    };
    let config = |v: Variant| PeftConfig::new(v, 2, 4.0, &["q"]);
    c.err(
        "save_adapter: DoRA layers under PeftConfig::new(LoRA)",
        &["q", "peft_type", "DoRA"],
        || save_adapter(&dir, &config(Variant::Lora), &set_of(true)?),
    );
    c.err(
        "save_adapter: LoRA layers under PeftConfig::new(DoRA)",
        &["q", "peft_type", "DoRA"],
        || save_adapter(&dir, &config(Variant::Dora), &set_of(false)?),
    );
    c.check("refused saves wrote nothing", !dir.exists(), || {
        format!("{} was created", dir.display())
    });
    c.ok(
        "save_adapter: DoRA layers under PeftConfig::new(DoRA)",
        || save_adapter(&dir, &config(Variant::Dora), &set_of(true)?),
    );
    std::fs::remove_dir_all(&dir).ok();
    c.finish();
}

/// Builds a layer over a base through a given VarBuilder.
type BuildIn = fn(FrozenLinear, VarBuilder<'static>) -> lorakit::Result<Box<dyn Adapter>>;

/// Every layer type's `new`, with a valid config.
fn builders_in() -> Vec<(&'static str, BuildIn)> {
    vec![
        ("LoraLinear", |b, vb| {
            Ok(Box::new(LoraLinear::new(b, &LoraConfig::new(2, 4.0), vb)?))
        }),
        ("LoraFaLinear", |b, vb| {
            Ok(Box::new(LoraFaLinear::new(
                b,
                &LoraFaConfig::new(2, 4.0),
                vb,
            )?))
        }),
        ("LoraDropLinear", |b, vb| {
            Ok(Box::new(LoraDropLinear::new(
                b,
                &LoraConfig::new(2, 4.0),
                vb,
            )?))
        }),
        ("DeltaLoraLinear", |b, vb| {
            Ok(Box::new(DeltaLoraLinear::new(
                b,
                &DeltaLoraConfig::new(2, 4.0),
                vb,
            )?))
        }),
        ("DoraLinear", |b, vb| {
            Ok(Box::new(DoraLinear::new(b, &LoraConfig::new(2, 4.0), vb)?))
        }),
        ("VeraLinear", |b, vb| {
            let shared =
                VeraShared::covering(3, 0, [(b.d_in(), b.d_out())], b.dtype(), b.device())?;
            Ok(Box::new(VeraLinear::new(b, &VeraConfig::new(shared), vb)?))
        }),
        ("AdaLoraLinear", |b, vb| {
            Ok(Box::new(AdaLoraLinear::new(
                b,
                &AdaLoraConfig::new(3, 4.0),
                vb,
            )?))
        }),
    ]
}

/// Every trainable value of a layer, in order.
fn var_values(l: &dyn Adapter) -> Vec<Vec<f32>> {
    l.trainable_vars()
        .iter()
        .map(|v| {
            let t = v.var.as_tensor().flatten_all().unwrap();
            t.to_vec1::<f32>().unwrap()
        })
        .collect()
}

/// Building a second layer under a `VarBuilder` prefix of one `VarMap` that already holds a
/// layer's variables is refused, naming the prefix (it used to share the first layer's
/// variables and re-initialise them); the first layer is left as it was.
#[test]
fn a_second_layer_under_the_same_prefix_of_one_varmap_is_refused() {
    let mut c = Checker::new();
    let is_prefix_error = |e: &Error| {
        matches!(
            e,
            Error::InvalidConfig { scope: Scope::Layer(l), field: "VarBuilder prefix", .. }
                if l == "model.proj"
        )
    };
    for (name, build) in builders_in() {
        let varmap = VarMap::new();
        let root = VarBuilder::from_varmap(&varmap, DType::F32, &cpu());
        let Some(first) = c.ok(&format!("{name}: first layer under `model.proj`"), || {
            build(base(D_OUT, D_IN), root.pp("model").pp("proj"))
        }) else {
            continue;
        };
        // Values no init produces, so a re-initialisation would show.
        for v in first.trainable_vars() {
            let t = v.var.as_tensor();
            v.var.set(&(t.ones_like().unwrap() * 0.5).unwrap()).unwrap();
        }
        let before = var_values(&*first);
        let n_vars = varmap.all_vars().len();
        c.err_where(
            &format!("{name}: second layer under `model.proj`"),
            &["model.proj", "VarBuilder prefix", "already exists"],
            "Error::InvalidConfig of the layer `model.proj`",
            is_prefix_error,
            || build(base(D_OUT, D_IN), root.pp("model.proj")),
        );
        c.check(
            &format!("{name}: first layer untouched"),
            var_values(&*first) == before,
            || "the refused build changed the first layer's variables".into(),
        );
        c.check(
            &format!("{name}: no variable added"),
            varmap.all_vars().len() == n_vars,
            || format!("{} variables, {n_vars} before", varmap.all_vars().len()),
        );
        c.ok(&format!("{name}: a layer under another prefix"), || {
            build(base(D_OUT, D_IN), root.pp("model").pp("other"))
        });
    }
    // Two plans over one adapter VarMap, both adapting the module `q`.
    c.err(
        "two plans over one VarMap adapting `q`",
        &["q", "VarBuilder prefix", "`q.lora_A`"],
        || {
            let adapter_map = VarMap::new();
            let plan = || {
                AdapterPlan::lora(
                    targets_q(),
                    RankAlpha::new(2, 4.0),
                    LoraConfig::default(),
                    VarBuilder::from_varmap(&adapter_map, DType::F32, &cpu()),
                )
            };
            adapt_q(&plan(), D_IN)?;
            adapt_q(&plan(), D_IN)
        },
    );
    c.finish();
}
