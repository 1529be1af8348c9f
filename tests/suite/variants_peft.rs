//! DoRA and VeRA against PEFT 0.21 itself: outputs, gradients (DoRA's detached norm) and
//! merged weights recorded by tests/fixtures/make_variant_fixtures.py (f64).

use crate::common::*;
use candle_core::{DType, Device, Tensor, Var};
use lorakit::low_rank::{Factor, LowRankPair};
use lorakit::{
    Adapter, DoraLinear, DoraWeights, FrozenLinear, VeraConfig, VeraLinear, VeraShared, VeraWeights,
};
use serde_json::Value;

fn fixtures() -> Value {
    let text = include_str!("../fixtures/variants_peft.json");
    serde_json::from_str(text).expect("fixture JSON")
}

fn t2(v: &Value) -> Tensor {
    let rows: M = serde_json::from_value(v.clone()).expect("matrix");
    tensor(&rows, DType::F64)
}

fn t1(v: &Value) -> Tensor {
    let xs: Vec<f64> = serde_json::from_value(v.clone()).expect("vector");
    Tensor::new(xs, &Device::Cpu).unwrap()
}

fn check(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let err = max_rel_diff(got, want);
    assert!(err < tol, "{name}: relative difference {err}");
}

#[test]
fn dora_matches_peft() {
    let f = &fixtures()["dora"];
    let base = FrozenLinear::new(t2(&f["weight"]), Some(t1(&f["bias"]))).unwrap();
    let a = Var::from_tensor(&t2(&f["lora_A"])).unwrap();
    let b = Var::from_tensor(&t2(&f["lora_B"])).unwrap();
    let pair = LowRankPair {
        a: Factor::Trainable(a.clone()),
        b: Factor::Trainable(b.clone()),
    };
    let scale = f["scale"].as_f64().unwrap();
    let m = t1(&f["magnitude"]);
    let config = lora_config_with_scale(pair.rank(), scale);
    let weights = DoraWeights { pair, magnitude: m };
    let mut layer = DoraLinear::from_weights("0", base, &config, weights).unwrap();
    let (x, r) = (t2(&f["x"]), t2(&f["r"]));
    for train in [true, false] {
        check(
            "y",
            &layer.forward_t(&x, train).unwrap(),
            &t2(&f["y"]),
            1e-12,
        );
    }
    let y = layer.forward_t(&x, true).unwrap();
    let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
    check(
        "grad A",
        grads.get(a.as_tensor()).unwrap(),
        &t2(&f["grad_lora_A"]),
        1e-10,
    );
    check(
        "grad B",
        grads.get(b.as_tensor()).unwrap(),
        &t2(&f["grad_lora_B"]),
        1e-10,
    );
    let gm = grads.get(layer.magnitude().as_tensor()).unwrap();
    check("grad m", gm, &t1(&f["grad_magnitude"]), 1e-10);
    layer.merge(true).unwrap();
    check(
        "merged",
        layer.base().weight(),
        &t2(&f["merged_weight"]),
        1e-12,
    );
}

#[test]
fn vera_matches_peft() {
    let f = &fixtures()["vera"];
    let shared = VeraShared::from_tensors(t2(&f["vera_A"]), t2(&f["vera_B"])).unwrap();
    for (i, l) in f["layers"].as_array().unwrap().iter().enumerate() {
        let base = FrozenLinear::new(t2(&l["weight"]), Some(t1(&l["bias"]))).unwrap();
        let (ld, lb) = (t1(&l["lambda_d"]), t1(&l["lambda_b"]));
        let weights = VeraWeights {
            lambda_d: ld,
            lambda_b: lb,
        };
        let config = VeraConfig::new(shared.clone());
        let mut layer = VeraLinear::from_weights(format!("{i}"), base, &config, weights).unwrap();
        let (x, r) = (t2(&l["x"]), t2(&l["r"]));
        let y = layer.forward_t(&x, true).unwrap();
        check("y", &y, &t2(&l["y"]), 1e-12);
        let grads = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let gd = grads.get(layer.lambda_d().as_tensor()).unwrap();
        check("grad λ_d", gd, &t1(&l["grad_lambda_d"]), 1e-10);
        let gb = grads.get(layer.lambda_b().as_tensor()).unwrap();
        check("grad λ_b", gb, &t1(&l["grad_lambda_b"]), 1e-10);
        layer.merge(true).unwrap();
        check(
            "merged",
            layer.base().weight(),
            &t2(&l["merged_weight"]),
            1e-12,
        );
    }
}
