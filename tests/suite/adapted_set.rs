//! The model-level set of adapted layers: listing, counts, variables with roles,
//! enable/disable, merge_all/unmerge_all (with rollback), checked against hand counts and
//! the base model's own outputs.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lorakit::low_rank::{Factor, LowRankPair};
use lorakit::model::{
    linear, linear_no_bias, AdaptedSet, AdapterPlan, Linear, ModuleSelector, RankAlpha, TargetSpec,
};
use lorakit::{FrozenLinear, LoraConfig, LoraInit, LoraLinear, ParamRole, Shared};

struct Model {
    layers: Vec<Linear>,
}

/// q (8→8, bias), v (8→8), head (8→3, bias); q and v targeted, v with rank 1.
fn build(base: &VarMap) -> (Model, AdaptedSet, VarMap) {
    let dev = Device::Cpu;
    let vb = VarBuilder::from_varmap(base, DType::F32, &dev);
    let adapter_vars = VarMap::new();
    let mut ranks = RankAlpha::new(2, 4.0);
    ranks.rank_pattern =
        lorakit::model::Pattern::new([("v".to_string(), 1)], "rank_pattern").unwrap();
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::AllLinear).output_head("head"),
        ranks,
        LoraConfig {
            init: LoraInit::BothRandom,
            ..LoraConfig::default()
        },
        VarBuilder::from_varmap(&adapter_vars, DType::F32, &dev),
    );
    let layers = vec![
        linear(8, 8, vb.pp("blk.q"), &plan).unwrap(),
        linear_no_bias(8, 8, vb.pp("blk.v"), &plan).unwrap(),
        linear(8, 3, vb.pp("head"), &plan).unwrap(),
    ];
    (Model { layers }, plan.finish().unwrap(), adapter_vars)
}

impl Model {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.layers
            .iter()
            .fold(x.clone(), |x, l| l.forward(&x).unwrap())
    }
}

fn base_forward(base: &VarMap, x: &Tensor) -> Tensor {
    let vb = VarBuilder::from_varmap(base, DType::F32, &Device::Cpu);
    let q = candle_nn::linear(8, 8, vb.pp("blk.q")).unwrap();
    let v = candle_nn::linear_no_bias(8, 8, vb.pp("blk.v")).unwrap();
    let h = candle_nn::linear(8, 3, vb.pp("head")).unwrap();
    h.forward(&v.forward(&q.forward(x).unwrap()).unwrap())
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn lists_counts_and_vars() {
    let base = VarMap::new();
    let (_model, set, adapter_vars) = build(&base);
    assert_eq!(set.paths(), ["blk.q", "blk.v"]);
    let c = set.param_counts();
    // q: A 2×8 + B 8×2; v: A 1×8 + B 8×1.  Bases: q 64+8, v 64, head 24+3.
    assert_eq!(c.trainable, 32 + 16);
    assert_eq!(c.total, 48 + 72 + 64 + 27);
    assert!((c.percent() - 100.0 * 48.0 / 211.0).abs() < 1e-12);
    assert_eq!(c.with_other_params(100).total, 311);
    let vars = set.trainable_vars();
    let names: Vec<_> = vars.iter().map(|v| (v.full_name(), v.var.role)).collect();
    assert_eq!(
        names,
        [
            ("blk.q.lora_A".to_string(), ParamRole::LowRankA),
            ("blk.q.lora_B".to_string(), ParamRole::LowRankB),
            ("blk.v.lora_A".to_string(), ParamRole::LowRankA),
            ("blk.v.lora_B".to_string(), ParamRole::LowRankB),
        ]
    );
    // The same variables the adapter VarMap trains.
    assert_eq!(adapter_vars.all_vars().len(), set.vars().len());
}

/// The largest magnitude in `t` (at least 1): the scale for an f32 tolerance.
fn scale(t: &Tensor) -> f32 {
    let m: f32 = t.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    m.max(1.0)
}

#[test]
fn disable_merge_unmerge() {
    let base = VarMap::new();
    let x = Tensor::randn(0f32, 1., (4, 8), &Device::Cpu).unwrap();
    // candle_nn's constructors create the base weights with their random inits first.
    let y0 = base_forward(&base, &x);
    let (model, set, _) = build(&base);
    let y = model.forward(&x);
    assert!(max_diff(&y, &y0) > 1e-3, "the adapters change the output");
    set.set_enabled(false);
    // The disabled layers run lorakit's fused op, the reference candle's matmul: the same
    // products summed in another order, so equal up to f32 rounding (a few units in the
    // last place of outputs up to ~10; the inputs and inits are random per run).
    let disabled = max_diff(&model.forward(&x), &y0);
    assert!(disabled < 1e-6 * scale(&y0), "{disabled:e}");
    set.set_enabled(true);
    let w_before: Vec<Tensor> = set
        .layers()
        .iter()
        .map(|(_, l)| l.read().base().weight().clone())
        .collect();
    set.merge_all(true).unwrap();
    assert!(set.layers().iter().all(|(_, l)| l.read().is_merged()));
    assert!(max_diff(&model.forward(&x), &y) < 1e-5 * scale(&y));
    set.merge_all(true).unwrap(); // already merged: nothing to do
    set.unmerge_all().unwrap();
    for ((_, l), w) in set.layers().iter().zip(&w_before) {
        assert!(!l.read().is_merged());
        assert!(max_diff(l.read().base().weight(), w) < 1e-6);
    }
    assert!(max_diff(&model.forward(&x), &y) < 1e-5 * scale(&y));
}

#[test]
fn merge_all_rolls_back_on_failure() {
    let dev = Device::Cpu;
    let set = AdaptedSet::new();
    let w = Tensor::randn(0f32, 1., (4, 4), &dev).unwrap();
    for (name, b_val) in [("ok", 0.5f32), ("bad", f32::INFINITY)] {
        let pair = LowRankPair {
            a: Factor::Trainable(Var::ones((1, 4), DType::F32, &dev).unwrap()),
            b: Factor::Frozen(Tensor::full(b_val, (4, 1), &dev).unwrap()),
        };
        let layer = LoraLinear::from_weights(
            name,
            FrozenLinear::new(w.clone(), None).unwrap(),
            &LoraConfig::new(1, 1.0), // scale 1
            pair,
        )
        .unwrap();
        set.insert(name, Shared::new(layer).erase()).unwrap();
    }
    let err = set.merge_all(true).unwrap_err();
    assert!(err.to_string().contains("bad"), "{err}");
    let ok = set.get("ok").unwrap();
    assert!(!ok.read().is_merged());
    assert!(max_diff(ok.read().base().weight(), &w) < 1e-6);
    // A path registered twice is refused.
    let dup = set.get("ok").unwrap();
    assert!(set.insert("ok", dup).is_err());
}
