//! Property tests (proptest) over random shapes for every variant.
//!
//! Cases ([`crate::props_support::cases`]): `d_in, d_out ∈ 1..=24`, rank `r ∈ 1..=24` (`r = 1` a
//! quarter of the time, `r > min(d_in, d_out)` often), inputs `(n, d_in)` or
//! `(b, n, d_in)`, with or without bias, rsLoRA on or off, `alpha ∈ [0.25, 8)`, random seeds drawn from a fixed proptest seed (the same cases on every
//! run; set `PROPTEST_RNG_SEED` to explore others).
//! Everything runs in f32 and is checked against a composed f64 reference with an
//! elementwise rounding bound `k · ε_f32 · Σ|terms|` (`k = 4 · (d_in + r + 8)`; DoRA's
//! bound also carries the conditioning of its row norm), so a wrong term fails by a factor
//! of about 10⁴ or more.
//!
//! Per variant — LoRA, LoRA+, VeRA, LoRA-FA, LoRA-drop (a layer on a shared pair), AdaLoRA,
//! DoRA, Delta-LoRA — four properties:
//!
//! 1. `identity_at_init`: with the default init, the adapted forward equals the base forward;
//! 2. `merged_equals_unmerged`: with every trainable tensor set to random non-zero values,
//!    the merged forward equals the unmerged one, and the merged weight equals the
//!    reference `W'`;
//! 3. `merge_unmerge_restores_w`: merge then unmerge gives back `W` within
//!    `k · ε_f32 · (|W| + s·|B_eff||A_eff|)` elementwise;
//! 4. `fused_equals_reference`: the layer's fused forward equals the composed f64
//!    computation of the variant's math (`A_eff`, `B_eff`, row scale recomputed from the
//!    raw tensors), and `delta_weight` equals `s · B_eff A_eff`.
//!
//! Plus three cross-cutting properties:
//!
//! 5. `fused_op_equals_composed`: `FusedLinear::forward` vs `forward_composed` (with and
//!    without low-rank term, row scale, bias; f32 or f64), forward and the gradients of
//!    `x`, `A`, `B` and the row scale;
//! 6. `lora_plus_groups`: over layers of all eight variants, every trainable variable lands
//!    in exactly one LoRA+ group, at `lr` for `A` factors and `lr × ratio` for `B` factors
//!    and vectors;
//! 7. `lora_drop_shared_pair`: unselected LoRA-drop layers share one pair (one update
//!    moves both), parameters are counted once, and the shared layers' forward matches
//!    the reference;
//! 8. `delta_lora_hook_update`: one training step with the Delta-LoRA hook moves `W` by
//!    exactly `λ · s · (B'A' − BA)` (f64 reference from the factors before and after).
//!
//! 8 × 4 + 4 = 36 properties × [`CASES`] = 64 cases = 2304 cases per run.

use crate::props_support::*;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::kernels::{FusedLinear, LowRankTerm};
use lorakit::train::{train_step, DeltaLoraHook, DeltaLoraUpdate, LoraPlus};
use lorakit::{Adapter, DeltaLoraLinear, LoraConfig, LoraInit, ParamRole, Shared};
use proptest::prelude::*;

/// Cases per property.
const CASES: u32 = 64;

variant_properties! {
    lora => Variant::Lora,
    lora_plus => Variant::LoraPlus,
    vera => Variant::Vera,
    lora_fa => Variant::LoraFa,
    lora_drop => Variant::LoraDrop,
    adalora => Variant::AdaLora,
    dora => Variant::Dora,
    delta_lora => Variant::DeltaLora,
}

/// The inputs of one fused product, all trainable except `W` and the bias.
struct KernelInputs {
    w: Tensor,
    bias: Option<Tensor>,
    a: Var,
    b: Var,
    c: Var,
    x: Var,
    g: Tensor,
    scale: f64,
    low_rank: bool,
    row_scale: bool,
}

impl KernelInputs {
    /// Random inputs of `case`'s shapes in `dtype` (f32 or f64).
    fn new(case: &Case, low_rank: bool, row_scale: bool, dtype: DType) -> lorakit::Result<Self> {
        let base = case.base()?;
        let mut rng = case.rng(7);
        let mut u = |shape: Vec<usize>| rng.uniform(shape, -1.0, 1.0, dtype, &Device::Cpu);
        let (a, b, c) = (
            u(vec![case.r, case.d_in])?,
            u(vec![case.d_out, case.r])?,
            u(vec![case.d_out])?,
        );
        let mut out = case.lead.clone();
        out.push(case.d_out);
        Ok(Self {
            w: base.weight().to_dtype(dtype)?,
            bias: base.bias().map(|b| b.to_dtype(dtype)).transpose()?,
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            c: Var::from_tensor(&c)?,
            x: Var::from_tensor(&case.input()?.to_dtype(dtype)?)?,
            g: u(out)?,
            scale: case.alpha / case.r as f64,
            low_rank,
            row_scale,
        })
    }

    /// The same product with every input replaced by `|input|` in f64: its output and
    /// gradients are the sums of the absolute values of the terms (the product is
    /// multilinear), i.e. the rounding bounds of the f32 results.
    fn abs_f64(&self) -> lorakit::Result<Self> {
        let f = |t: &Tensor| -> lorakit::Result<Tensor> { Ok(t.abs()?.to_dtype(DType::F64)?) };
        let v = |t: &Var| -> lorakit::Result<Var> { Ok(Var::from_tensor(&f(t.as_tensor())?)?) };
        Ok(Self {
            w: f(&self.w)?,
            bias: self.bias.as_ref().map(f).transpose()?,
            a: v(&self.a)?,
            b: v(&self.b)?,
            c: v(&self.c)?,
            x: v(&self.x)?,
            g: f(&self.g)?,
            scale: self.scale.abs(),
            low_rank: self.low_rank,
            row_scale: self.row_scale,
        })
    }

    /// Output and the gradients of `(x, A, B, c)` (`None` where not used) of
    /// `Σ g ⊙ y`, through the fused op or the composed reference.
    fn run(&self, fused: bool) -> lorakit::Result<(Tensor, Vec<Option<Tensor>>)> {
        let layer = FusedLinear {
            weight: &self.w,
            bias: self.bias.as_ref(),
            low_rank: self.low_rank.then(|| LowRankTerm {
                a: self.a.as_tensor(),
                b: self.b.as_tensor(),
                scale: self.scale,
            }),
            row_scale: self.row_scale.then(|| self.c.as_tensor()),
        };
        let x = self.x.as_tensor();
        let y = if fused {
            layer.forward(x)?
        } else {
            layer.forward_composed(x)?
        };
        let grads = (&y * &self.g)?.sum_all()?.backward()?;
        if grads.get(&self.w).is_some() {
            return Err(candle_core::Error::Msg("W received a gradient".into()).into());
        }
        let vars = [&self.x, &self.a, &self.b, &self.c];
        Ok((
            y,
            vars.iter()
                .map(|v| grads.get(v.as_tensor()).cloned())
                .collect(),
        ))
    }
}

fn fused_op_case(case: &Case, low_rank: bool, row_scale: bool, f64_op: bool) -> PResult {
    let dtype = if f64_op { DType::F64 } else { DType::F32 };
    let inputs = KernelInputs::new(case, low_rank, row_scale, dtype).or_fail()?;
    let (y_fused, g_fused) = inputs.run(true).or_fail()?;
    let (y_comp, g_comp) = inputs.run(false).or_fail()?;
    let (y_abs, g_abs) = inputs.abs_f64().or_fail()?.run(false).or_fail()?;
    // k counts units of ε_f32; rescale for f64.
    let unit = if f64_op { f64::EPSILON / EPS } else { 1.0 };
    let k = k_for(case) * unit;
    prop_assert_eq!(y_fused.dtype(), dtype);
    let y_comp = y_comp.to_dtype(DType::F64).or_fail()?;
    assert_within("fused vs composed forward", &y_fused, &y_comp, &y_abs, k)?;
    let names = ["dx", "dA", "dB", "dc"];
    for (((name, f), c), bound) in names.iter().zip(&g_fused).zip(&g_comp).zip(&g_abs) {
        match (f, c, bound) {
            (Some(f), Some(c), Some(bound)) => {
                let c = c.to_dtype(DType::F64).or_fail()?;
                assert_within(name, f, &c, bound, k)?;
            }
            (None, None, _) => {}
            _ => prop_assert!(false, "{}: fused and composed disagree on presence", name),
        }
    }
    Ok(())
}

/// LoRA+: every trainable variable of every variant is in exactly one group, at the
/// learning rate its role calls for.
fn lora_plus_groups(case: &Case, lr: f64, ratio: f64) -> PResult {
    let built: Vec<Built> = Variant::ALL
        .iter()
        .map(|&v| build(v, case))
        .collect::<lorakit::Result<_>>()
        .or_fail()?;
    let guards: Vec<_> = built.iter().map(|b| b.layer.read()).collect();
    let adapters = guards.iter().map(|g| &**g as &dyn Adapter);
    let opt = LoraPlus::new(lr)
        .with_ratio(ratio)
        .build_from_adapters(adapters)
        .or_fail()?;
    let groups: Vec<Vec<Var>> = (0..opt.num_groups())
        .map(|i| opt.group_vars(i).unwrap_or_default())
        .collect();
    let mut total = 0;
    for g in &guards {
        for v in g.trainable_vars() {
            total += 1;
            let id = v.var.as_tensor().id();
            let holding = groups
                .iter()
                .filter(|vars| vars.iter().any(|x| x.as_tensor().id() == id))
                .count();
            prop_assert_eq!(holding, 1, "{}.{} in {} groups", g.name(), v.name, holding);
            let group = opt.group_of(&v.var).unwrap_or(usize::MAX);
            let want = match v.role {
                ParamRole::LowRankA => lr,
                ParamRole::LowRankB | ParamRole::Vector => lr * ratio,
                other => return Err(TestCaseError::fail(format!("unexpected role {other:?}"))),
            };
            let got = opt.group_lr(group).unwrap_or(f64::NAN);
            prop_assert!(
                (got - want).abs() <= 1e-12 * want,
                "{}: lr {} != {}",
                v.name,
                got,
                want
            );
        }
    }
    let grouped: usize = groups.iter().map(Vec::len).sum();
    prop_assert_eq!(grouped, total);
    Ok(())
}

/// LoRA-drop: layers 1 and 2 share one pair after the switch; layer 0 keeps its own.
fn lora_drop_shared_pair(case: &Case) -> PResult {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let (ld, layers) = lora_drop_model(case, &vb).or_fail()?;
    let ids = |i: usize| -> Vec<_> {
        let l = layers[i].read();
        l.trainable_vars()
            .iter()
            .map(|v| v.var.as_tensor().id())
            .collect()
    };
    prop_assert_eq!(ids(1), ids(2));
    prop_assert_ne!(ids(0), ids(1));
    prop_assert_eq!(ld.trainable_vars().len(), 4);
    let pair = case.r * (case.d_in + case.d_out);
    prop_assert_eq!(ld.num_trainable_params(), 2 * pair);
    // Randomizing through layer 1 moves layer 2.
    randomize(&*layers[1].read(), case.seed).or_fail()?;
    let x = case.input().or_fail()?;
    let other = layers[2].read();
    let p = parts(&*other).or_fail()?;
    let r = p.reference().or_fail()?;
    let (want, bound) = p.forward(&x, &r).or_fail()?;
    prop_assert!(
        want.abs()
            .or_fail()?
            .max_all()
            .or_fail()?
            .to_scalar::<f64>()
            .or_fail()?
            > 0.0
    );
    drop(other);
    let y = layers[2].read().forward_t(&x, false).or_fail()?;
    assert_within(
        "shared layer forward",
        &flatten(&y).or_fail()?,
        &want,
        &bound,
        k_for(case),
    )?;
    Ok(())
}

/// Delta-LoRA: after one SGD step with the hook, `W₁ = W₀ + λ · s · (B₁A₁ − B₀A₀)`.
fn delta_lora_hook_update(case: &Case, lambda: f64) -> PResult {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = LoraConfig {
        init: LoraInit::BothRandom,
        ..case.lora_config()
    };
    let base = case.base().or_fail()?;
    let layer = Shared::new(DeltaLoraLinear::new(base, &cfg, vb.pp("layer")).or_fail()?);
    let snapshot = |l: &DeltaLoraLinear| -> lorakit::Result<(Tensor, Tensor, Tensor)> {
        let f = |t: &Tensor| t.to_dtype(DType::F64);
        let p = l.lora().pair();
        Ok((f(l.base().weight())?, f(p.a.tensor())?, f(p.b.tensor())?))
    };
    let (w0, a0, b0) = snapshot(&layer.read()).or_fail()?;
    let mut hook =
        DeltaLoraHook::new(&[layer.clone().erase()], DeltaLoraUpdate::new(lambda, 0)).or_fail()?;
    let mut opt = <candle_nn::SGD as Optimizer>::new(varmap.all_vars(), 0.1).or_fail()?;
    let x = case.input().or_fail()?;
    let loss = layer
        .read()
        .forward_t(&x, true)
        .or_fail()?
        .sqr()
        .or_fail()?;
    let loss = loss.mean_all().or_fail()?;
    train_step(&loss, &mut opt, &mut [&mut hook], 1).or_fail()?;
    let (w1, a1, b1) = snapshot(&layer.read()).or_fail()?;
    let ls = lambda * cfg.scale();
    let prod = |b: &Tensor, a: &Tensor| b.matmul(a);
    let step = (prod(&b1, &a1).or_fail()? - prod(&b0, &a0).or_fail()?).or_fail()?;
    let want = (&w0 + (step * ls).or_fail()?).or_fail()?;
    let abs = |b: &Tensor, a: &Tensor| prod(&b.abs()?, &a.abs()?);
    let terms = (abs(&b1, &a1).or_fail()? + abs(&b0, &a0).or_fail()?).or_fail()?;
    let bound = (w0.abs().or_fail()? + (terms * ls.abs()).or_fail()?).or_fail()?;
    assert_within("W after a Delta-LoRA step", &w1, &want, &bound, k_for(case))?;
    Ok(())
}

proptest! {
    #![proptest_config(crate::props_support::config(CASES))]

    #[test]
    fn delta_lora_hook_update_is_exact(case in cases(), lambda in -2.0f64..4.0) {
        delta_lora_hook_update(&case, lambda)?;
    }

    #[test]
    fn fused_op_equals_composed(
        case in cases(),
        low_rank in any::<bool>(),
        row_scale in any::<bool>(),
        f64_op in any::<bool>(),
    ) {
        fused_op_case(&case, low_rank, row_scale, f64_op)?;
    }

    #[test]
    fn lora_plus_groups_by_role(case in cases(), lr in 1e-5f64..1e-2, ratio in 1.0f64..64.0) {
        lora_plus_groups(&case, lr, ratio)?;
    }

    #[test]
    fn lora_drop_shared_pair_is_shared(case in cases()) {
        lora_drop_shared_pair(&case)?;
    }
}
