//! Property tests of PEFT's LoRA options (proptest, fixed seed; see
//! [`crate::props_support::config`]):
//!
//! 1. `conv1d_base_equals_linear_base`: every variant of `Variant::ALL` over a GPT-2 Conv1D
//!    base (weight stored `(in, out)`) computes what the same layer over the equivalent
//!    linear base (`FrozenLinear::new(w_in_out.t().contiguous())`) computes, with random
//!    non-zero factors; its merge equals its unmerged forward and equals the linear layer's
//!    merge (transposed); merge then unmerge restores the stored weight; the stored weight
//!    stays `(in, out)` throughout;
//! 2. `lora_embedding_*`: LoRA on an embedding is the identity at init (bit for bit), equals
//!    `E[ids] + s · (B A)ᵀ[ids]` (computed here with plain candle ops) with random factors,
//!    merges and unmerges exactly; its gradients match finite differences (f64);
//! 3. `lora_bias_*`: PEFT's `lora_bias` (a trainable `lora_B.bias`, over a linear or a
//!    Conv1D base) is the identity at init,
//!    equals `x Wᵀ + b + s (x Aᵀ Bᵀ + bias)`, merges into the base bias and unmerges, and its
//!    gradient is `s · Σ_rows g`;
//! 4. `trainable_base_bias_*`: a base bias made trainable (`bias = "lora_only"` / `"all"`)
//!    under LoRA and DoRA gives the frozen-bias forward, and its gradient is `Σ_rows g`;
//! 5. `modules_to_save_copy`: a `modules_to_save` copy (linear, Conv1D, embedding) starts as
//!    the original, follows its own variables, and gives the original back when disabled;
//! 6. `layers_to_transform_*`: PEFT's layer-index rules on a few paths, and
//!    `modules_to_save` keeping adapters off a module and its children (plain tests).

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::model::{
    conv1d, embedding, linear_b, AdapterPlan, LayerFilter, Linear, ModuleSelector, RankAlpha,
    TargetSpec,
};
use lorakit::peft::PeftConfig;
use lorakit::train::Selection;
use lorakit::{
    AdaLoraConfig, AdaLoraLinear, Adapter, BaseKind, DeltaLoraLinear, DoraLinear, FrozenLinear,
    LoraConfig, LoraDrop, LoraDropConfig, LoraDropLinear, LoraEmbedding, LoraFaLinear, LoraInit,
    LoraLinear, ParamRole, Shared, VeraConfig, VeraLinear, VeraShared,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::common::fd_grad_var;
use crate::props_support::{cases, config, randomize, Case, OrFail, PResult, Variant};

/// Cases per property (each conv1d case builds all eight variants twice).
const CASES: u32 = 24;

fn cpu() -> Device {
    Device::Cpu
}

/// `max |a − b| / max(|b|)` in f64 (shapes must agree).
fn rel(a: &Tensor, b: &Tensor) -> Result<f64, TestCaseError> {
    prop_assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).or_fail()?;
    let b = b.to_dtype(DType::F64).or_fail()?;
    let diff = max_abs(&(&a - &b).or_fail()?)?;
    Ok(diff / max_abs(&b)?.max(1e-30))
}

fn max_abs(t: &Tensor) -> Result<f64, TestCaseError> {
    if t.elem_count() == 0 {
        return Ok(0.0);
    }
    t.to_dtype(DType::F64)
        .or_fail()?
        .abs()
        .or_fail()?
        .flatten_all()
        .or_fail()?
        .max(0)
        .or_fail()?
        .to_scalar::<f64>()
        .or_fail()
}

/// Fails unless `rel(got, want) ≤ tol`.
fn assert_rel(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> PResult {
    let e = rel(got, want)?;
    prop_assert!(e <= tol, "{}: relative error {:e} > {:e}", what, e, tol);
    Ok(())
}

/// Fails unless `max |got − want| ≤ tol · scale`.
fn assert_abs(what: &str, got: &Tensor, want: &Tensor, scale: f64, tol: f64) -> PResult {
    prop_assert_eq!(got.dims(), want.dims(), "{}: shapes differ", what);
    let d =
        (got.to_dtype(DType::F64).or_fail()? - want.to_dtype(DType::F64).or_fail()?).or_fail()?;
    let err = max_abs(&d)?;
    prop_assert!(
        err <= tol * scale,
        "{}: max |diff| {:e} > {:e} × {:e}",
        what,
        err,
        tol,
        scale
    );
    Ok(())
}

fn bit_equal(a: &Tensor, b: &Tensor) -> Result<bool, TestCaseError> {
    let f = |t: &Tensor| -> Result<Vec<u64>, TestCaseError> {
        Ok(t.to_dtype(DType::F64)
            .or_fail()?
            .flatten_all()
            .or_fail()?
            .to_vec1::<f64>()
            .or_fail()?
            .into_iter()
            .map(f64::to_bits)
            .collect())
    };
    Ok(a.dims() == b.dims() && f(a)? == f(b)?)
}

// ---------------------------------------------------------------------------------------
// 1. Every variant over a Conv1D base.
// ---------------------------------------------------------------------------------------

/// A random `U(-1, 1)` weight stored `(d_in, d_out)` and bias, as GPT-2's Conv1D stores them.
fn conv1d_parts(case: &Case) -> lorakit::Result<(Tensor, Option<Tensor>)> {
    let mut rng = case.rng(11);
    let w_io = rng.uniform((case.d_in, case.d_out), -1.0, 1.0, DType::F32, &cpu())?;
    let b = if case.bias {
        Some(rng.uniform(case.d_out, -1.0, 1.0, DType::F32, &cpu())?)
    } else {
        None
    };
    Ok((w_io, b))
}

/// Builds `variant` named `layer` over the base `base()` makes, as `props_support::build`
/// does (same configs, same seeds), in its own VarMap.
fn build_on(
    variant: Variant,
    case: &Case,
    base: &dyn Fn() -> lorakit::Result<FrozenLinear>,
) -> lorakit::Result<(Shared<dyn Adapter>, VarMap)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &cpu());
    let cfg = case.lora_config();
    let layer = match variant {
        Variant::Lora | Variant::LoraPlus => {
            Shared::new(LoraLinear::new(base()?, &cfg, vb.pp("layer"))?).erase()
        }
        Variant::LoraFa => Shared::new(LoraFaLinear::new(base()?, &cfg, vb.pp("layer"))?).erase(),
        Variant::DeltaLora => {
            Shared::new(DeltaLoraLinear::new(base()?, &cfg, vb.pp("layer"))?).erase()
        }
        Variant::Dora => Shared::new(DoraLinear::new(base()?, &cfg, vb.pp("layer"))?).erase(),
        Variant::AdaLora => {
            let ada = AdaLoraConfig {
                seed: case.seed,
                ..AdaLoraConfig::new(case.r, case.alpha)
            };
            Shared::new(AdaLoraLinear::new(base()?, &ada, vb.pp("layer"))?).erase()
        }
        Variant::Vera => {
            let extra = (case.seed % 3) as usize;
            let (max_in, max_out) = (case.d_in + extra, case.d_out + (extra + 1) % 3);
            let shared = VeraShared::new(case.r, max_in, max_out, case.seed, DType::F32, &cpu())?;
            Shared::new(VeraLinear::new(
                base()?,
                &VeraConfig::new(shared),
                vb.pp("layer"),
            )?)
            .erase()
        }
        Variant::LoraDrop => lora_drop_layer(case, base, &vb)?,
    };
    Ok((layer, varmap))
}

/// Three LoRA-drop layers over `base()`, calibrated, layer 0 kept and layers 1, 2 moved onto
/// one shared pair; returns layer 1 (as `props_support::lora_drop_model`).
fn lora_drop_layer(
    case: &Case,
    base: &dyn Fn() -> lorakit::Result<FrozenLinear>,
    vb: &VarBuilder,
) -> lorakit::Result<Shared<dyn Adapter>> {
    let stage1 = LoraConfig {
        init: LoraInit::BothRandom,
        ..case.lora_config()
    };
    let mut layers = Vec::new();
    for i in 0..3 {
        let l = LoraDropLinear::new(base()?, &stage1, vb.pp(format!("l{i}")))?;
        if i > 0 {
            if let Some(b) = l.lora().pair().b.var() {
                b.set(&b.as_tensor().zeros_like()?)?;
            }
        }
        layers.push(Shared::new(l).erase());
    }
    let shared = case.lora_config();
    let drop = LoraDrop::new(
        &layers,
        LoraDropConfig {
            selection: Selection::TopN(1),
            shared_init: shared.init,
            shared_seed: shared.seed,
            ..LoraDropConfig::default()
        },
    )?;
    let x = case.input()?;
    let importance = drop.calibrate(|| {
        for l in &layers {
            l.read().forward_t(&x, false)?;
        }
        Ok(())
    })?;
    drop.share_unselected(&importance, vb.pp("shared"))?;
    Ok(layers[1].clone())
}

/// The Conv1D property for one variant.
fn conv1d_case(variant: Variant, case: &Case) -> PResult {
    let (w_io, bias) = conv1d_parts(case).or_fail()?;
    let conv_base = || FrozenLinear::conv1d(w_io.clone(), bias.clone());
    let lin_base = || FrozenLinear::new(w_io.t()?.contiguous()?, bias.clone());
    let (conv, _m1) = build_on(variant, case, &conv_base).or_fail()?;
    let (lin, _m2) = build_on(variant, case, &lin_base).or_fail()?;
    let mut conv = conv.write();
    let mut lin = lin.write();
    prop_assert_eq!(conv.base().kind(), BaseKind::Conv1D, "{}", variant);
    let stored0 = conv.base().stored_weight().or_fail()?;
    prop_assert_eq!(stored0.dims(), &[case.d_in, case.d_out][..]);
    randomize(&*conv, case.seed).or_fail()?;
    randomize(&*lin, case.seed).or_fail()?;
    let x = case.input().or_fail()?;

    let y_conv = conv.forward_t(&x, false).or_fail()?;
    let y_lin = lin.forward_t(&x, false).or_fail()?;
    let mut out = case.lead.clone();
    out.push(case.d_out);
    prop_assert_eq!(y_conv.dims(), &out[..], "{}", variant);
    assert_rel(
        &format!("{variant}: Conv1D vs linear base forward"),
        &y_conv,
        &y_lin,
        1e-5,
    )?;
    let dw_conv = conv.delta_weight().or_fail()?;
    let dw_lin = lin.delta_weight().or_fail()?;
    prop_assert_eq!(dw_conv.dims(), &[case.d_out, case.d_in][..]);
    assert_rel(
        &format!("{variant}: ΔW over Conv1D vs linear"),
        &dw_conv,
        &dw_lin,
        1e-5,
    )?;

    let w0 = conv.base().stored_weight().or_fail()?.copy().or_fail()?;
    conv.merge(true).or_fail()?;
    lin.merge(true).or_fail()?;
    let stored = conv.base().stored_weight().or_fail()?;
    prop_assert_eq!(stored.dims(), &[case.d_in, case.d_out][..], "{}", variant);
    prop_assert_eq!(conv.base().kind(), BaseKind::Conv1D);
    let merged = conv.forward_t(&x, false).or_fail()?;
    assert_rel(
        &format!("{variant}: Conv1D merged vs unmerged forward"),
        &merged,
        &y_conv,
        1e-5,
    )?;
    let lin_merged_t = lin.base().weight().t().or_fail()?;
    assert_rel(
        &format!("{variant}: Conv1D merged stored weight vs linear merged Wᵀ"),
        &stored,
        &lin_merged_t,
        1e-5,
    )?;

    conv.unmerge().or_fail()?;
    let restored = conv.base().stored_weight().or_fail()?;
    prop_assert_eq!(restored.dims(), &[case.d_in, case.d_out][..]);
    // Adding and taking off ΔW rounds at the scale of |W| + |ΔW|.
    let scale = max_abs(&w0)? + max_abs(&dw_conv)?;
    assert_abs(
        &format!("{variant}: stored weight after merge + unmerge"),
        &restored,
        &w0,
        scale,
        1e-5,
    )?;
    let again = conv.forward_t(&x, false).or_fail()?;
    assert_rel(
        &format!("{variant}: forward after unmerge"),
        &again,
        &y_conv,
        1e-5,
    )?;
    Ok(())
}

proptest! {
    #![proptest_config(config(CASES))]

    #[test]
    fn conv1d_base_equals_linear_base(case in cases()) {
        for variant in Variant::ALL {
            conv1d_case(variant, &case)?;
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. LoRA on an embedding.
// ---------------------------------------------------------------------------------------

/// An embedding case: table `(vocab, dim)`, rank, ids of shape `ids_dims` in `ids_dtype`.
#[derive(Clone, Debug)]
struct EmbCase {
    vocab: usize,
    dim: usize,
    r: usize,
    alpha: f64,
    rslora: bool,
    ids_dims: Vec<usize>,
    ids_dtype: DType,
    seed: u64,
}

fn emb_cases() -> impl Strategy<Value = EmbCase> {
    let ids_dims = prop::collection::vec(1usize..=5, 1..=3);
    let dtype = prop_oneof![Just(DType::U8), Just(DType::U32), Just(DType::I64)];
    (
        (1usize..=40, 1usize..=16, 1usize..=8),
        0.25f64..8.0,
        any::<bool>(),
        ids_dims,
        dtype,
        any::<u64>(),
    )
        .prop_map(
            |((vocab, dim, r), alpha, rslora, ids_dims, ids_dtype, seed)| EmbCase {
                vocab,
                dim,
                r,
                alpha,
                rslora,
                ids_dims,
                ids_dtype,
                seed,
            },
        )
}

impl EmbCase {
    fn rng(&self, stream: u64) -> SeededRng {
        SeededRng::new(self.seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn table(&self) -> lorakit::Result<Tensor> {
        self.rng(1)
            .uniform((self.vocab, self.dim), -1.0, 1.0, DType::F32, &cpu())
    }

    /// Ids in `0..vocab` (every id once when there are enough positions, then random).
    fn ids(&self) -> lorakit::Result<Tensor> {
        let n: usize = self.ids_dims.iter().product();
        let u = self
            .rng(2)
            .uniform(n, 0.0, 1.0, DType::F64, &cpu())?
            .to_vec1::<f64>()?;
        let values: Vec<u32> = u
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i < self.vocab && n >= self.vocab {
                    i as u32
                } else {
                    ((v * self.vocab as f64) as usize).min(self.vocab - 1) as u32
                }
            })
            .collect();
        Ok(Tensor::from_vec(values, self.ids_dims.clone(), &cpu())?.to_dtype(self.ids_dtype)?)
    }

    fn config(&self) -> LoraConfig {
        LoraConfig {
            use_rslora: self.rslora,
            seed: self.seed,
            ..LoraConfig::new(self.r, self.alpha)
        }
    }
}

/// `table[ids] + s · (B A)ᵀ[ids]` in f64 with plain candle ops.
fn embedding_reference(
    table: &Tensor,
    a: &Tensor,
    b: &Tensor,
    s: f64,
    ids: &Tensor,
) -> lorakit::Result<Tensor> {
    let f = |t: &Tensor| t.to_dtype(DType::F64);
    let delta_t = (f(b)?.matmul(&f(a)?)?.t()? * s)?; // (vocab, dim)
    let full = (f(table)? + delta_t)?;
    let flat = ids.to_dtype(DType::U32)?.flatten_all()?;
    let rows = full.index_select(&flat, 0)?;
    let mut dims = ids.dims().to_vec();
    dims.push(table.dim(1)?);
    Ok(rows.reshape(dims)?)
}

fn lora_embedding_case(c: &EmbCase) -> PResult {
    let table = c.table().or_fail()?;
    let base = FrozenLinear::embedding(table.clone()).or_fail()?;
    prop_assert_eq!(base.kind(), BaseKind::Embedding);
    prop_assert_eq!((base.d_in(), base.d_out()), (c.vocab, c.dim));
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &cpu());
    let mut layer = LoraEmbedding::new(base.clone(), &c.config(), vb.pp("wte")).or_fail()?;
    let ids = c.ids().or_fail()?;

    // Identity at init, bit for bit: A is zero.
    let y0 = layer.forward_t(&ids, false).or_fail()?;
    let lookup = base.forward(&ids).or_fail()?;
    let mut out = c.ids_dims.clone();
    out.push(c.dim);
    prop_assert_eq!(y0.dims(), &out[..]);
    prop_assert!(bit_equal(&y0, &lookup)?, "identity at init is not exact");
    let names: Vec<String> = layer.trainable_vars().into_iter().map(|v| v.name).collect();
    prop_assert_eq!(names, ["lora_embedding_A", "lora_embedding_B"]);
    prop_assert_eq!(layer.num_trainable_params(), c.r * (c.vocab + c.dim));

    // Random factors: the composed reference.
    randomize(&layer, c.seed).or_fail()?;
    let (a, b) = (
        layer.pair().a.tensor().clone(),
        layer.pair().b.tensor().clone(),
    );
    prop_assert_eq!(a.dims(), &[c.r, c.vocab][..]);
    prop_assert_eq!(b.dims(), &[c.dim, c.r][..]);
    let y = layer.forward_t(&ids, false).or_fail()?;
    let want = embedding_reference(&table, &a, &b, layer.scale(), &ids).or_fail()?;
    assert_rel("embedding forward vs reference", &y, &want, 1e-5)?;
    let scale = c.config().scale();
    prop_assert!((layer.scale() - scale).abs() <= 1e-12 * scale);

    // Merge = unmerged; merge + unmerge restores the table.
    let delta = layer.delta_weight().or_fail()?;
    prop_assert_eq!(delta.dims(), &[c.dim, c.vocab][..]);
    layer.merge(true).or_fail()?;
    let stored = layer.base().stored_weight().or_fail()?;
    prop_assert_eq!(stored.dims(), &[c.vocab, c.dim][..]);
    let merged_table = (table.to_dtype(DType::F64).or_fail()?
        + delta.t().or_fail()?.to_dtype(DType::F64).or_fail()?)
    .or_fail()?;
    assert_rel("merged table", &stored, &merged_table, 1e-5)?;
    let ym = layer.forward_t(&ids, false).or_fail()?;
    assert_rel("merged vs unmerged embedding forward", &ym, &y, 1e-5)?;
    layer.unmerge().or_fail()?;
    let restored = layer.base().stored_weight().or_fail()?;
    let scale = max_abs(&table)? + max_abs(&delta)?;
    assert_abs(
        "table after merge + unmerge",
        &restored,
        &table,
        scale,
        1e-5,
    )?;
    Ok(())
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn lora_embedding_identity_reference_merge(c in emb_cases()) {
        lora_embedding_case(&c)?;
    }
}

/// A tiny f64 LoRA embedding with random A and B, and its ids (one id repeated, one absent).
fn tiny_f64_embedding() -> (LoraEmbedding, Tensor, Var, Var) {
    let dev = cpu();
    let mut rng = SeededRng::new(7);
    let table = rng
        .uniform((5, 3), -1.0, 1.0, DType::F64, &dev)
        .expect("table");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let layer = LoraEmbedding::new(
        FrozenLinear::embedding(table).unwrap(),
        &LoraConfig::new(2, 3.0),
        vb.pp("emb"),
    )
    .unwrap();
    let a = layer.pair().a.var().unwrap().clone();
    let b = layer.pair().b.var().unwrap().clone();
    a.set(&rng.uniform((2, 5), -1.0, 1.0, DType::F64, &dev).unwrap())
        .unwrap();
    b.set(&rng.uniform((3, 2), -1.0, 1.0, DType::F64, &dev).unwrap())
        .unwrap();
    // Id 2 never occurs: A's column 2 must get a zero gradient.
    let ids = Tensor::new(&[[0u32, 3, 3], [4, 1, 0]], &dev).unwrap();
    (layer, ids, a, b)
}

#[test]
fn lora_embedding_gradients_match_finite_differences() {
    let (layer, ids, a, b) = tiny_f64_embedding();
    let g = SeededRng::new(8)
        .uniform((2, 3, 3), -1.0, 1.0, DType::F64, &cpu())
        .unwrap();
    type Loss = Box<dyn Fn(&Tensor) -> Tensor>;
    let losses: [(&str, Loss); 2] = [
        ("sum", Box::new(|y: &Tensor| y.sum_all().unwrap())),
        (
            "weighted squares",
            Box::new(move |y: &Tensor| {
                ((y * &g).unwrap() + y.sqr().unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
            }),
        ),
    ];
    for (name, loss) in &losses {
        let y = layer.forward_t(&ids, true).unwrap();
        let grads = loss(&y).backward().unwrap();
        let value = || -> f64 {
            loss(&layer.forward_t(&ids, true).unwrap())
                .to_scalar::<f64>()
                .unwrap()
        };
        for (var_name, var) in [("A", &a), ("B", &b)] {
            let analytic = crate::common::flat(grads.get(var.as_tensor()).unwrap_or_else(|| {
                panic!("{name}: no gradient for {var_name}");
            }));
            let numeric = fd_grad_var(var, 1e-6, value);
            let e = crate::common::rel_err(&analytic, &numeric);
            assert!(
                e < 1e-7,
                "{name}: d/d{var_name}: relative error {e:e}\n analytic {analytic:?}\n numeric {numeric:?}"
            );
        }
        // A's column for the absent id 2 gets nothing.
        let ga = grads.get(a.as_tensor()).unwrap();
        let col2 = crate::common::flat(&ga.narrow(1, 2, 1).unwrap());
        assert!(col2.iter().all(|v| *v == 0.0), "{name}: {col2:?}");
    }
}

/// u8 token ids address every row of a table: candle's `index_select` treats an id equal
/// to its dtype's maximum (255 for u8) as padding and returns zeros, so a vocabulary over
/// 255 entries read with u8 ids loses row 255.
#[test]
fn u8_ids_address_row_255() {
    let dev = cpu();
    let table = Tensor::arange(0f32, 300. * 2., &dev)
        .unwrap()
        .reshape((300, 2))
        .unwrap();
    let ids = Tensor::new(&[254u8, 255], &dev).unwrap();
    let base = FrozenLinear::embedding(table.clone()).unwrap();
    let want = [[508f32, 509.], [510., 511.]];
    assert_eq!(
        base.forward(&ids).unwrap().to_vec2::<f32>().unwrap(),
        want,
        "frozen embedding"
    );
    let layer = LoraEmbedding::new(base, &LoraConfig::new(2, 2.0), vb_f32("wte")).unwrap();
    assert_eq!(
        layer
            .forward_t(&ids, false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap(),
        want,
        "LoRA embedding"
    );
}

fn vb_f32(prefix: &str) -> VarBuilder<'static> {
    VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu()).pp(prefix)
}

// ---------------------------------------------------------------------------------------
// 3. lora_bias.
// ---------------------------------------------------------------------------------------

/// `x Wᵀ + b + s (x Aᵀ Bᵀ + bias)` in f64, `x` flattened to `(n, d_in)`.
fn lora_bias_reference(layer: &LoraLinear, x: &Tensor) -> lorakit::Result<Tensor> {
    let f = |t: &Tensor| t.to_dtype(DType::F64);
    let d_in = layer.base().d_in();
    let x = f(&x.reshape(((), d_in))?)?;
    let w = f(layer.base().weight())?;
    let (a, b) = (f(layer.pair().a.tensor())?, f(layer.pair().b.tensor())?);
    let bias = f(layer.lora_bias().expect("lora_bias").as_tensor())?;
    let s = layer.scale();
    let mut y = x.matmul(&w.t()?)?;
    if let Some(b0) = layer.base().bias() {
        y = y.broadcast_add(&f(b0)?)?;
    }
    let low = x.matmul(&a.t()?)?.matmul(&b.t()?)?.broadcast_add(&bias)?;
    Ok((y + (low * s)?)?)
}

fn flat2(t: &Tensor) -> Result<Tensor, TestCaseError> {
    let d = t.dims().last().copied().unwrap_or(1);
    t.reshape(((), d)).or_fail()
}

fn lora_bias_case(case: &Case) -> PResult {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &cpu());
    let cfg = LoraConfig {
        lora_bias: true,
        ..case.lora_config()
    };
    // Half the cases over a GPT-2 Conv1D holding the same W (stored transposed).
    let linear = case.base().or_fail()?;
    let base = if case.seed % 2 == 1 {
        let w_io = linear.weight().t().or_fail()?.contiguous().or_fail()?;
        FrozenLinear::conv1d(w_io, linear.bias().cloned()).or_fail()?
    } else {
        linear
    };
    let mut layer = LoraLinear::new(base.clone(), &cfg, vb.pp("layer")).or_fail()?;
    let x = case.input().or_fail()?;

    // Identity at init: B and its bias are zero.
    let bias = layer.lora_bias().expect("lora_bias").clone();
    prop_assert_eq!(bias.dims(), &[case.d_out][..]);
    prop_assert_eq!(max_abs(bias.as_tensor())?, 0.0);
    let vars = layer.trainable_vars();
    let named: Vec<(&str, ParamRole)> = vars.iter().map(|v| (v.name.as_str(), v.role)).collect();
    prop_assert!(
        named.contains(&("lora_B.bias", ParamRole::LowRankB)),
        "{:?}",
        named
    );
    prop_assert_eq!(varmap.all_vars().len(), 3);
    let y0 = layer.forward_t(&x, false).or_fail()?;
    let base_y = base.forward(&x).or_fail()?;
    assert_rel("lora_bias identity at init", &y0, &base_y, 1e-6)?;
    let saved: Vec<String> = layer
        .tensors_to_save()
        .or_fail()?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    prop_assert!(saved.iter().any(|n| n == "lora_B.bias"), "{:?}", saved);

    // Random A, B and bias: the composed reference.
    randomize(&layer, case.seed).or_fail()?;
    prop_assert!(max_abs(bias.as_tensor())? > 0.0);
    let y = layer.forward_t(&x, false).or_fail()?;
    let want = lora_bias_reference(&layer, &x).or_fail()?;
    assert_rel("lora_bias forward vs reference", &flat2(&y)?, &want, 1e-5)?;
    let delta_bias = layer.delta_bias().or_fail()?.expect("delta bias");
    let s_bias = (bias.as_tensor() * layer.scale()).or_fail()?;
    assert_rel("delta_bias = s · bias", &delta_bias, &s_bias, 1e-6)?;

    // The gradient of the bias: s · Σ_rows g.
    let g = case
        .rng(21)
        .uniform(y.shape().clone(), -1.0, 1.0, DType::F32, &cpu())
        .or_fail()?;
    let grads = (layer.forward_t(&x, true).or_fail()? * &g)
        .or_fail()?
        .sum_all()
        .or_fail()?
        .backward()
        .or_fail()?;
    let got = grads.get(bias.as_tensor());
    prop_assert!(got.is_some(), "lora_B.bias got no gradient");
    let want_g = (flat2(&g)?.sum(0).or_fail()? * layer.scale()).or_fail()?;
    assert_rel("d/d lora_B.bias", got.unwrap(), &want_g, 1e-5)?;
    for v in [layer.pair().a.var(), layer.pair().b.var()] {
        let v = v.expect("trainable factor");
        prop_assert!(grads.get(v.as_tensor()).is_some());
    }

    let w0 = layer.base().weight().copy().or_fail()?;
    match base.bias() {
        Some(b0) => {
            // Merge adds s · bias to the base bias; unmerge restores W and b.
            layer.merge(true).or_fail()?;
            let ym = layer.forward_t(&x, false).or_fail()?;
            assert_rel("lora_bias merged vs unmerged", &ym, &y, 1e-5)?;
            let merged_b = layer.base().bias().expect("bias").clone();
            let want_b = (b0 + &delta_bias).or_fail()?;
            assert_rel("merged base bias", &merged_b, &want_b, 1e-6)?;
            layer.unmerge().or_fail()?;
            prop_assert_eq!(layer.base().kind(), base.kind());
            let (now, was) = (
                layer.base().stored_weight().or_fail()?,
                base.stored_weight().or_fail()?,
            );
            prop_assert_eq!(now.dims(), was.dims());
            let scale = max_abs(&w0)? + max_abs(&layer.delta_weight().or_fail()?)?;
            assert_abs(
                "W after merge + unmerge",
                layer.base().weight(),
                &w0,
                scale,
                1e-5,
            )?;
            let scale_b = max_abs(b0)? + max_abs(&delta_bias)?;
            assert_abs(
                "b after merge + unmerge",
                layer.base().bias().expect("bias"),
                b0,
                scale_b,
                1e-6,
            )?;
        }
        None => {
            // No base bias to merge into: refused, and nothing changes.
            let err = layer.merge(true);
            prop_assert!(err.is_err(), "merged lora_bias into a base without a bias");
            let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
            prop_assert!(
                msg.contains("lora_bias") && msg.contains("`layer`"),
                "{}",
                msg
            );
            prop_assert!(!layer.is_merged());
            prop_assert!(bit_equal(layer.base().weight(), &w0)?);
            prop_assert!(layer.base().bias().is_none());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn lora_bias_identity_reference_merge_gradient(case in cases()) {
        lora_bias_case(&case)?;
    }
}

// ---------------------------------------------------------------------------------------
// 4. A trainable base bias under LoRA and DoRA.
// ---------------------------------------------------------------------------------------

/// Sets the layer's own variables (not a trainable base bias) to random values, as
/// `props_support::randomize` does.
fn randomize_own(layer: &dyn Adapter, seed: u64) -> lorakit::Result<()> {
    let mut rng = SeededRng::new(seed ^ 0x5eed);
    for v in layer.own_vars() {
        let t = v.var.as_tensor();
        let (lo, hi) = match v.role {
            ParamRole::Vector => (0.5, 1.5),
            _ => (-1.0, 1.0),
        };
        v.var
            .set(&rng.uniform(t.shape().clone(), lo, hi, t.dtype(), t.device())?)?;
    }
    Ok(())
}

fn trainable_bias_case(variant: Variant, case: &Case) -> PResult {
    let case = Case {
        bias: true,
        ..case.clone()
    };
    let base = case.base().or_fail()?;
    let b0 = base.bias().expect("bias").copy().or_fail()?;
    let bias_var = Var::from_tensor(&b0).or_fail()?;
    let trainable_base = base.clone().with_trainable_bias(&bias_var).or_fail()?;
    prop_assert!(trainable_base.trainable_bias().is_some());
    prop_assert!(base.trainable_bias().is_none());
    let build = |b: FrozenLinear| -> lorakit::Result<(Shared<dyn Adapter>, VarMap)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &cpu()).pp("layer");
        let cfg = case.lora_config();
        let l = match variant {
            Variant::Dora => Shared::new(DoraLinear::new(b, &cfg, vb)?).erase(),
            _ => Shared::new(LoraLinear::new(b, &cfg, vb)?).erase(),
        };
        Ok((l, varmap))
    };
    let (frozen, _m1) = build(base).or_fail()?;
    let (trained, _m2) = build(trainable_base).or_fail()?;
    let mut trained = trained.write();
    let frozen = frozen.read();
    randomize_own(&*frozen, case.seed).or_fail()?;
    randomize_own(&*trained, case.seed).or_fail()?;
    let names: Vec<String> = trained
        .trainable_vars()
        .into_iter()
        .map(|v| v.name)
        .collect();
    prop_assert!(names.iter().any(|n| n == "base_layer.bias"), "{:?}", names);
    let x = case.input().or_fail()?;
    let y_f = frozen.forward_t(&x, false).or_fail()?;
    let y_t = trained.forward_t(&x, false).or_fail()?;
    assert_rel(
        &format!("{variant}: trainable-bias vs frozen-bias forward"),
        &y_t,
        &y_f,
        1e-6,
    )?;

    let g = case
        .rng(31)
        .uniform(y_t.shape().clone(), -1.0, 1.0, DType::F32, &cpu())
        .or_fail()?;
    let grads = (trained.forward_t(&x, true).or_fail()? * &g)
        .or_fail()?
        .sum_all()
        .or_fail()?
        .backward()
        .or_fail()?;
    let got = grads.get(bias_var.as_tensor());
    prop_assert!(got.is_some(), "{}: the base bias got no gradient", variant);
    let want = flat2(&g)?.sum(0).or_fail()?;
    assert_rel(
        &format!("{variant}: d/d base bias = Σ_rows g"),
        got.unwrap(),
        &want,
        1e-5,
    )?;
    prop_assert!(
        grads.get(trained.base().weight()).is_none(),
        "W got a gradient"
    );

    // A merge leaves the bias variable alone and keeps the forward.
    trained.merge(true).or_fail()?;
    let ym = trained.forward_t(&x, false).or_fail()?;
    assert_rel(&format!("{variant}: merged forward"), &ym, &y_t, 1e-5)?;
    prop_assert!(bit_equal(bias_var.as_tensor(), &b0)?);
    trained.unmerge().or_fail()?;
    Ok(())
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn trainable_base_bias_under_lora_and_dora(case in cases()) {
        trainable_bias_case(Variant::Lora, &case)?;
        trainable_bias_case(Variant::Dora, &case)?;
    }
}

/// `lora_bias` over a trainable base bias: a merge adds `s · lora_B.bias` to the bias
/// variable itself, and an unmerge takes it off again.
#[test]
fn lora_bias_merges_into_a_trainable_base_bias_and_back() {
    let dev = cpu();
    let mut rng = SeededRng::new(3);
    let w = rng.uniform((4, 3), -1.0, 1.0, DType::F32, &dev).unwrap();
    let b0 = rng.uniform(4, -1.0, 1.0, DType::F32, &dev).unwrap();
    let bias_var = Var::from_tensor(&b0).unwrap();
    let base = FrozenLinear::new(w, None)
        .unwrap()
        .with_trainable_bias(&bias_var)
        .unwrap();
    let cfg = LoraConfig {
        lora_bias: true,
        ..LoraConfig::new(2, 4.0)
    };
    let mut layer = LoraLinear::new(base, &cfg, vb_f32("proj")).unwrap();
    // Randomizes A, B, lora_B.bias and the base bias variable.
    randomize(&layer, 5).unwrap();
    let b1 = bias_var.as_tensor().copy().unwrap();
    assert!(crate::common::max_rel_diff(&b1, &b0) > 0.1);
    let x = rng.uniform((2, 3), -1.0, 1.0, DType::F32, &dev).unwrap();
    let y = layer.forward_t(&x, false).unwrap();
    let db = layer.delta_bias().unwrap().unwrap();
    layer.merge(true).unwrap();
    let want = (&b1 + &db).unwrap();
    assert!(crate::common::max_rel_diff(bias_var.as_tensor(), &want) < 1e-6);
    let ym = layer.forward_t(&x, false).unwrap();
    assert!(crate::common::max_rel_diff(&ym, &y) < 1e-5);
    layer.unmerge().unwrap();
    assert!(crate::common::max_rel_diff(bias_var.as_tensor(), &b1) < 1e-6);
    assert!(crate::common::max_rel_diff(&layer.forward_t(&x, false).unwrap(), &y) < 1e-5);
}

// ---------------------------------------------------------------------------------------
// 5. modules_to_save copies.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct CopyCase {
    kind: BaseKind,
    d_in: usize,
    d_out: usize,
    rows: usize,
    seed: u64,
}

fn copy_cases() -> impl Strategy<Value = CopyCase> {
    let kind = prop_oneof![
        Just(BaseKind::Linear),
        Just(BaseKind::Conv1D),
        Just(BaseKind::Embedding)
    ];
    (kind, 1usize..=12, 1usize..=12, 1usize..=5, any::<u64>()).prop_map(
        |(kind, d_in, d_out, rows, seed)| CopyCase {
            kind,
            d_in,
            d_out,
            rows,
            seed,
        },
    )
}

fn copy_case(c: &CopyCase) -> PResult {
    let dev = cpu();
    let mut rng = SeededRng::new(c.seed);
    let path = "classifier";
    // The checkpoint's tensors, in each kind's stored layout.
    let stored_dims = match c.kind {
        BaseKind::Linear => (c.d_out, c.d_in),
        BaseKind::Conv1D | BaseKind::Embedding => (c.d_in, c.d_out),
    };
    let w = rng
        .uniform(stored_dims, -1.0, 1.0, DType::F32, &dev)
        .or_fail()?;
    let b = rng
        .uniform(c.d_out, -1.0, 1.0, DType::F32, &dev)
        .or_fail()?;
    let mut tensors = HashMap::new();
    tensors.insert(format!("{path}.weight"), w.clone());
    if c.kind != BaseKind::Embedding {
        tensors.insert(format!("{path}.bias"), b.clone());
    }
    let base_vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let adapter_map = VarMap::new();
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list(["q_proj"])).modules_to_save([path]),
        RankAlpha::new(2, 4.0),
        LoraConfig::default(),
        VarBuilder::from_varmap(&adapter_map, DType::F32, &dev),
    );
    let (original, module) = match c.kind {
        BaseKind::Linear => (
            FrozenLinear::new(w.clone(), Some(b.clone())).or_fail()?,
            linear_b(c.d_in, c.d_out, true, base_vb.pp(path), &plan).or_fail()?,
        ),
        BaseKind::Conv1D => (
            FrozenLinear::conv1d(w.clone(), Some(b.clone())).or_fail()?,
            conv1d(c.d_in, c.d_out, base_vb.pp(path), &plan).or_fail()?,
        ),
        BaseKind::Embedding => (
            FrozenLinear::embedding(w.clone()).or_fail()?,
            embedding(c.d_in, c.d_out, base_vb.pp(path), &plan).or_fail()?,
        ),
    };
    let copy = match &module {
        Linear::Trainable(m) => m.clone(),
        other => {
            return Err(TestCaseError::fail(format!(
                "expected a trainable copy, got {other:?}"
            )))
        }
    };
    prop_assert!(copy.is_full_copy());
    prop_assert_eq!(copy.name(), path);
    let set = plan.finish().or_fail()?;
    prop_assert!(set.is_empty());
    let bases: Vec<String> = set.trainable_bases().into_iter().map(|(p, _)| p).collect();
    prop_assert_eq!(bases, [path]);
    let n_vars = if c.kind == BaseKind::Embedding { 1 } else { 2 };
    prop_assert_eq!(set.vars().len(), n_vars);
    prop_assert_eq!(adapter_map.all_vars().len(), n_vars);

    let x = match c.kind {
        BaseKind::Embedding => {
            let ids: Vec<u32> = (0..c.rows).map(|i| (i * 7 % c.d_in) as u32).collect();
            Tensor::from_vec(ids, c.rows, &dev).or_fail()?
        }
        _ => rng
            .uniform((c.rows, c.d_in), -1.0, 1.0, DType::F32, &dev)
            .or_fail()?,
    };
    let y_orig = original.forward(&x).or_fail()?;
    let y0 = module.forward(&x).or_fail()?;
    // Equal up to rounding: the trainable copy multiplies through candle's autograd matmul
    // (its weight needs a gradient), the frozen original through lorakit's fused kernel,
    // whose summation order may differ (the decode kernel for a few rows).
    assert_rel("initial copy against the original", &y0, &y_orig, 1e-6)?;

    // New values for the copy's variables: the forward follows them.
    let vars = copy.trainable_vars();
    // The bias moves by more than the weight change can offset (|0.5 · Σx| ≤ 0.5 · d_in for
    // x in [-1, 1]), so a linear output moves by at least 0.25 whatever x is.
    let new_w = (w.clone() + 0.5).or_fail()?;
    let new_b = (b.clone() - (0.5 * c.d_in as f64 + 0.25)).or_fail()?;
    for v in &vars {
        match v.name.as_str() {
            "weight" => v.var.set(&new_w).or_fail()?,
            "bias" => v.var.set(&new_b).or_fail()?,
            other => return Err(TestCaseError::fail(format!("unexpected var {other}"))),
        }
    }
    let want = match c.kind {
        BaseKind::Linear => FrozenLinear::new(new_w.clone(), Some(new_b.clone())),
        BaseKind::Conv1D => FrozenLinear::conv1d(new_w.clone(), Some(new_b.clone())),
        BaseKind::Embedding => FrozenLinear::embedding(new_w.clone()),
    }
    .or_fail()?
    .forward(&x)
    .or_fail()?;
    let y1 = module.forward(&x).or_fail()?;
    assert_rel("copy forward after changing its vars", &y1, &want, 1e-6)?;
    prop_assert!(max_abs(&(&y1 - &y_orig).or_fail()?)? > 0.1);
    let checked = copy.forward_checked(&x).or_fail()?;
    prop_assert!(bit_equal(&checked, &y1)?);

    // Disabled: the original, exactly; enabled again: the copy.
    copy.set_enabled(false);
    prop_assert!(bit_equal(&module.forward(&x).or_fail()?, &y_orig)?);
    copy.set_enabled(true);
    prop_assert!(bit_equal(&module.forward(&x).or_fail()?, &y1)?);
    set.set_enabled(false);
    prop_assert!(bit_equal(&module.forward(&x).or_fail()?, &y_orig)?);
    set.set_enabled(true);
    prop_assert!(bit_equal(&module.forward(&x).or_fail()?, &y1)?);
    // The original module is untouched.
    prop_assert!(bit_equal(&copy.original().stored_weight().or_fail()?, &w)?);
    Ok(())
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn modules_to_save_copy(c in copy_cases()) {
        copy_case(&c)?;
    }
}

// ---------------------------------------------------------------------------------------
// 6. layers_to_transform.
// ---------------------------------------------------------------------------------------

fn peft_config(json: &str) -> PeftConfig {
    PeftConfig::from_json_str(json, "adapter_config.json").unwrap_or_else(|e| panic!("{json}: {e}"))
}

/// `(path, adapted?)` under a config.
fn check_targets(config: &PeftConfig, cases: &[(&str, bool)]) {
    for (path, want) in cases {
        assert_eq!(
            config.targets.is_target(path),
            *want,
            "{path} under {:?}",
            config.targets
        );
    }
}

#[test]
fn layers_to_transform_with_a_pattern() {
    let llama = peft_config(
        r#"{"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"],
            "layers_to_transform": [0, 2], "layers_pattern": "layers"}"#,
    );
    check_targets(
        &llama,
        &[
            ("model.layers.0.self_attn.q_proj", true),
            ("model.layers.2.self_attn.v_proj", true),
            ("model.layers.1.self_attn.q_proj", false),
            ("model.layers.10.self_attn.q_proj", false),
            ("model.layers.0.self_attn.k_proj", false),
            // No index after `layers.`: not adapted.
            ("model.q_proj", false),
        ],
    );
    // GPT-2's blocks are `transformer.h.<i>`; a single index (not a list) works too.
    let gpt2 = peft_config(
        r#"{"peft_type": "LORA", "target_modules": ["c_attn"], "fan_in_fan_out": true,
            "layers_to_transform": 1, "layers_pattern": ["h"]}"#,
    );
    check_targets(
        &gpt2,
        &[
            ("transformer.h.1.attn.c_attn", true),
            ("transformer.h.0.attn.c_attn", false),
            ("transformer.h.11.attn.c_attn", false),
        ],
    );
    // A pattern that does not occur in the path: not adapted.
    let other = llama
        .with_setting("layers_pattern", serde_json::json!("blocks"))
        .unwrap();
    check_targets(&other, &[("model.layers.0.self_attn.q_proj", false)]);
}

#[test]
fn layers_to_transform_without_a_pattern_reads_the_first_index() {
    let config = peft_config(
        r#"{"peft_type": "LORA", "target_modules": ["q_proj", "c_attn", "w1"],
            "layers_to_transform": [1]}"#,
    );
    check_targets(
        &config,
        &[
            ("model.layers.1.self_attn.q_proj", true),
            ("model.layers.0.self_attn.q_proj", false),
            ("transformer.h.1.attn.c_attn", true),
            ("transformer.h.2.attn.c_attn", false),
            // MoE: the layer index (1), not the expert index, decides (PEFT's fix of
            // huggingface/peft#3016: a lazy `.*?`).
            ("model.layers.1.experts.0.w1", true),
            ("model.layers.1.experts.3.w1", true),
            ("model.layers.0.experts.1.w1", false),
            ("model.layers.2.experts.1.w1", false),
            // No layer index at all: not adapted.
            ("model.q_proj", false),
            ("transformer.c_attn", false),
            // ... unless the path is an entry itself (see the next test).
            ("q_proj", true),
        ],
    );
    // The same through the model-level filter.
    let filter = LayerFilter::new(vec![1], vec![]).unwrap();
    assert_eq!(filter.layer_index("model.layers.1.experts.0.w1"), Some(1));
    assert_eq!(filter.layer_index("transformer.h.1.attn.c_attn"), Some(1));
    assert_eq!(filter.layer_index("model.q_proj"), None);
    let with_pattern = LayerFilter::new(vec![1], vec!["layers".into()]).unwrap();
    assert_eq!(
        with_pattern.layer_index("model.layers.1.experts.0.w1"),
        Some(1)
    );
    assert_eq!(
        with_pattern.layer_index("transformer.h.1.attn.c_attn"),
        None
    );
}

#[test]
fn an_exact_full_path_in_target_modules_bypasses_the_layer_filter() {
    // PEFT's `check_target_module_exists`: `key in target_modules` is a match before (and
    // without) the layer-index rule, which applies to suffix matches only.
    let config = peft_config(
        r#"{"peft_type": "LORA",
            "target_modules": ["q_proj", "model.layers.3.self_attn.v_proj", "lm_head"],
            "layers_to_transform": [0], "layers_pattern": "layers"}"#,
    );
    check_targets(
        &config,
        &[
            ("model.layers.3.self_attn.v_proj", true),
            ("model.layers.0.self_attn.v_proj", false),
            ("model.layers.3.self_attn.q_proj", false),
            ("model.layers.0.self_attn.q_proj", true),
            ("lm_head", true),
        ],
    );
    // The same rules through the model-level API: a plan builds what the config says.
    let spec = TargetSpec::new(ModuleSelector::list([
        "q_proj",
        "model.layers.3.self_attn.v_proj",
    ]))
    .layers(LayerFilter::new(vec![0], vec!["layers".into()]).unwrap());
    let dev = cpu();
    let base_map = VarMap::new();
    let base_vb = VarBuilder::from_varmap(&base_map, DType::F32, &dev);
    let plan = AdapterPlan::lora(
        spec,
        RankAlpha::new(2, 4.0),
        LoraConfig::default(),
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev),
    );
    for i in 0..4 {
        for p in ["q_proj", "v_proj"] {
            let path = format!("model.layers.{i}.self_attn.{p}");
            linear_b(4, 4, false, base_vb.pp(&path), &plan).unwrap();
        }
    }
    assert_eq!(
        plan.finish().unwrap().paths(),
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.3.self_attn.v_proj"
        ]
    );
}

#[test]
fn modules_to_save_are_never_adapted() {
    // PEFT keeps adapters off `modules_to_save` modules and everything inside them, even
    // when target_modules names them.
    let config = peft_config(
        r#"{"peft_type": "LORA", "target_modules": ["classifier", "dense", "q_proj"],
            "modules_to_save": ["classifier"]}"#,
    );
    check_targets(
        &config,
        &[
            ("classifier", false),
            ("classifier.dense", false),
            ("bert.encoder.layer.0.attention.self.q_proj", true),
            ("bert.pooler.dense", true),
        ],
    );
    assert!(config.targets.is_module_to_save("classifier"));
    assert!(config.targets.is_module_to_save("classifier.dense"));
    assert!(!config.targets.is_module_to_save("bert.pooler.dense"));
}
