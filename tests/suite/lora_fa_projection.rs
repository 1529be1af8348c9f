//! LoRA-FA's gradient projection against an independent f64 computation, and training with
//! a frozen A.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::low_rank::{Factor, LowRankPair};
use lorakit::train::{train_step, GroupedAdamW, LoraFaProjection, ParamGroup, StepHook};
use lorakit::{Adapter, Error, FrozenLinear, LoraConfig, LoraFaLinear, LoraLinear, Shared};

const DEV: Device = Device::Cpu;

/// A LoRA-FA layer in f64: random W, frozen random A, trainable B (zero unless `b_random`).
fn lora_fa_layer(
    name: &str,
    d_in: usize,
    d_out: usize,
    r: usize,
    scale: f64,
    seed: u64,
) -> Shared<LoraFaLinear> {
    let mut rng = SeededRng::new(seed);
    let w = rng
        .normal((d_out, d_in), 0.0, 0.5, DType::F64, &DEV)
        .unwrap();
    let a = rng
        .kaiming_uniform_linear(r, d_in, DType::F64, &DEV)
        .unwrap();
    let b = Var::zeros((d_out, r), DType::F64, &DEV).unwrap();
    let pair = LowRankPair {
        a: Factor::Frozen(a),
        b: Factor::Trainable(b),
    };
    let base = FrozenLinear::new(w, None).unwrap();
    let config = LoraConfig {
        alpha: scale * r as f64,
        ..LoraConfig::new(r, 1.0)
    };
    Shared::new(LoraFaLinear::from_weights(name, base, &config, pair).unwrap())
}

fn mat(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

fn matmul(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (n, k, m) = (a.len(), b.len(), b[0].len());
    (0..n)
        .map(|i| {
            (0..m)
                .map(|j| (0..k).map(|l| a[i][l] * b[l][j]).sum())
                .collect()
        })
        .collect()
}

fn transpose(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    (0..a[0].len())
        .map(|j| a.iter().map(|row| row[j]).collect())
        .collect()
}

/// Solves `M z = rhs` for symmetric positive definite `M` by Cholesky.
fn cholesky_solve(m: &[Vec<f64>], rhs: &[f64]) -> Vec<f64> {
    let n = m.len();
    let mut l = vec![vec![0f64; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            l[i][j] = if i == j {
                (m[i][i] - s).sqrt()
            } else {
                (m[i][j] - s) / l[j][j]
            };
        }
    }
    let mut y = vec![0f64; n];
    for i in 0..n {
        y[i] = (rhs[i] - (0..i).map(|k| l[i][k] * y[k]).sum::<f64>()) / l[i][i];
    }
    let mut z = vec![0f64; n];
    for i in (0..n).rev() {
        z[i] = (y[i] - (i + 1..n).map(|k| l[k][i] * z[k]).sum::<f64>()) / l[i][i];
    }
    z
}

/// The projected gradient for loss `sum(y ⊙ C)`, from scratch in f64:
/// `g_B = s·Cᵀ(X Aᵀ)`, then `(1/s²) g_B (A Aᵀ + 1e-8 I)⁻¹` row by row with Cholesky.
fn reference_projection(x: &[Vec<f64>], c: &[Vec<f64>], a: &[Vec<f64>], s: f64) -> Vec<Vec<f64>> {
    let xa = matmul(x, &transpose(a));
    let g_b: Vec<Vec<f64>> = matmul(&transpose(c), &xa)
        .into_iter()
        .map(|row| row.into_iter().map(|v| v * s).collect())
        .collect();
    let mut m = matmul(a, &transpose(a));
    for (i, row) in m.iter_mut().enumerate() {
        row[i] += 1e-8;
    }
    g_b.iter()
        .map(|row| {
            cholesky_solve(&m, row)
                .into_iter()
                .map(|v| v / (s * s))
                .collect()
        })
        .collect()
}

fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn projected_gradient_matches_f64_reference_per_layer() {
    // Two layers of different shapes, rank and scale, listed in the hook in reverse order:
    // pairing is per layer, not by parameter order.
    let l1 = lora_fa_layer("enc.0.q", 5, 6, 3, 2.0, 1);
    let l2 = lora_fa_layer("enc.0.v", 7, 4, 2, 0.5, 2);
    let mut hook = LoraFaProjection::new(&[l2.clone().erase(), l1.clone().erase()]).unwrap();
    assert_eq!(hook.len(), 2);
    let mut rng = SeededRng::new(9);
    let x1 = rng.normal((8, 5), 0.0, 1.0, DType::F64, &DEV).unwrap();
    let x2 = rng.normal((8, 7), 0.0, 1.0, DType::F64, &DEV).unwrap();
    let c1 = rng.normal((8, 6), 0.0, 1.0, DType::F64, &DEV).unwrap();
    let c2 = rng.normal((8, 4), 0.0, 1.0, DType::F64, &DEV).unwrap();
    let y1 = l1.read().forward_t(&x1, true).unwrap();
    let y2 = l2.read().forward_t(&x2, true).unwrap();
    let loss =
        ((y1 * &c1).unwrap().sum_all().unwrap() + (y2 * &c2).unwrap().sum_all().unwrap()).unwrap();
    let mut grads = loss.backward().unwrap();
    hook.before_step(1, &mut grads).unwrap();
    for (layer, x, c) in [(&l1, &x1, &c1), (&l2, &x2, &c2)] {
        let guard = layer.read();
        let b = guard.lora().pair().b.var().unwrap();
        let got = mat(grads.get(b).unwrap());
        let want = reference_projection(
            &mat(x),
            &mat(c),
            &mat(guard.lora().pair().a.tensor()),
            guard.lora().scale(),
        );
        let err = max_abs_diff(&got, &want);
        let size = want.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
        eprintln!(
            "{}: max abs diff {err:e}, max abs value {size:e}",
            guard.name()
        );
        assert!(size > 1e-3, "{}: non-trivial gradient", guard.name());
        assert!(err <= 1e-10, "{}: max |diff| {err:e}", guard.name());
    }
}

#[test]
fn a_stays_bit_identical_and_b_trains() {
    let layer = lora_fa_layer("fc", 6, 5, 2, 1.5, 3);
    let a0 = layer.read().lora().pair().a.tensor().copy().unwrap();
    let b = layer.read().lora().pair().b.var().unwrap().clone();
    let vars: Vec<Var> = layer
        .read()
        .trainable_vars()
        .into_iter()
        .map(|v| v.var)
        .collect();
    assert_eq!(vars.len(), 1, "only B trains");
    let mut opt = GroupedAdamW::new(
        vec![ParamGroup::new("lora_B", vars)],
        ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut hook = LoraFaProjection::new(&[layer.clone().erase()]).unwrap();
    let mut rng = SeededRng::new(4);
    let x = rng.normal((10, 6), 0.0, 1.0, DType::F64, &DEV).unwrap();
    let target = rng.normal((10, 5), 0.0, 1.0, DType::F64, &DEV).unwrap();
    for step in 1..=8 {
        let y = layer.read().forward_t(&x, true).unwrap();
        let loss = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        train_step(&loss, &mut opt, &mut [&mut hook], step).unwrap();
    }
    let a = layer.read().lora().pair().a.tensor().copy().unwrap();
    let bits = |t: &Tensor| -> Vec<u64> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert_eq!(bits(&a), bits(&a0));
    let b_norm = b
        .as_tensor()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(b_norm > 0.0);
}

#[test]
fn only_lora_fa_layers_are_selected() {
    // The projection picks the LoRA-FA layers out of the slice it is given; a slice with
    // none is a usage error.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &DEV);
    let base = FrozenLinear::new(Tensor::zeros((4, 4), DType::F32, &DEV).unwrap(), None).unwrap();
    let plain =
        Shared::new(LoraLinear::new(base, &LoraConfig::new(2, 2.0), vb.pp("plain")).unwrap());
    let err = LoraFaProjection::new(&[plain.clone().erase()]).unwrap_err();
    assert!(matches!(err, Error::Usage { .. }), "{err:?}");
    assert!(err.to_string().contains("LoRA-FA"), "{err}");
    let fa = lora_fa_layer("fa", 4, 4, 2, 1.0, 5);
    let hook = LoraFaProjection::new(&[plain.erase(), fa.erase()]).unwrap();
    assert_eq!(hook.len(), 1);
    assert!(format!("{hook:?}").contains("\"fa\""), "{hook:?}");
    assert!(!format!("{hook:?}").contains("plain"), "{hook:?}");
}
