//! The fused op on a CUDA device against the CPU f64 reference (the same product composed
//! from candle ops, its gradients by candle's autograd): forward, `dx`, `dA`, `dB` and the
//! row scale's gradient, in f32 (≤ 1e-5 relative) and in bf16/f16 (a bound scaled by the
//! format's unit roundoff), with and without bias and row scale, odd sizes; no gradient for
//! `W`.
//!
//! `base_residual` checks PiSSA's and OLoRA's residuals on the device against the CPU's.
//!
//! `cargo test --features cuda --test cuda`. Without a CUDA device every test prints that
//! it was skipped and passes: these tests only mean something where a GPU ran them
//! (`scripts/gpu-check.sh`).

mod base_residual;

use candle_core::{DType, Device, Tensor, Var};
use lorakit::kernels::{FusedLinear, LowRankTerm};

/// The CUDA device, or `None` (with a message) where there is none.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// The tolerance on `max |got − want| / max |want|` for outputs stored in `dtype`.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F64 => 1e-12,
        // unit roundoff 2^-8 (bf16) and 2^-11 (f16): a few roundings of stored
        // intermediates (x Aᵀ, g ⊙ c, the output) on top of f32 accumulation.
        DType::BF16 => 4.0 * 2f64.powi(-8),
        DType::F16 => 4.0 * 2f64.powi(-11),
        d => panic!("no tolerance for {d:?}"),
    }
}

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let got = got
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1e-30);
    let diff = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / scale
}

/// One configuration: sizes and which optional parts are present.
#[derive(Clone, Copy, Debug)]
struct Case {
    n: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    bias: bool,
    row_scale: bool,
}

/// The case's tensors on `dev` in `dtype` (values drawn on the CPU in f64, then rounded,
/// so the reference sees exactly the rounded values).
struct Inputs {
    x: Var,
    w: Tensor,
    a: Var,
    b: Var,
    c: Var,
    bias: Tensor,
    probe: Tensor,
}

fn inputs(case: Case, dtype: DType, dev: &Device) -> Inputs {
    let cpu = Device::Cpu;
    let draw = |shape: &[usize], std: f64| {
        Tensor::randn(0f64, std, shape, &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(dev)
            .unwrap()
    };
    let c = (draw(&[case.d_out], 0.2).to_dtype(DType::F64).unwrap() + 1.0)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    Inputs {
        x: Var::from_tensor(&draw(&[case.n, case.d_in], 1.0)).unwrap(),
        w: draw(&[case.d_out, case.d_in], 0.3),
        a: Var::from_tensor(&draw(&[case.r, case.d_in], 0.3)).unwrap(),
        b: Var::from_tensor(&draw(&[case.d_out, case.r], 0.3)).unwrap(),
        c: Var::from_tensor(&c).unwrap(),
        bias: draw(&[case.d_out], 1.0),
        probe: draw(&[case.n, case.d_out], 1.0),
    }
}

/// The forward and the gradients of `x`, `A`, `B`, `c` of `sum(y ⊙ probe)`; with
/// `composed`, through candle ops instead of the fused op.
fn run(case: Case, t: &Inputs, composed: bool) -> Vec<Option<Tensor>> {
    let layer = FusedLinear {
        weight: &t.w,
        bias: case.bias.then_some(&t.bias),
        low_rank: (case.r > 0).then(|| LowRankTerm {
            a: t.a.as_tensor(),
            b: t.b.as_tensor(),
            scale: 0.75,
        }),
        row_scale: case.row_scale.then(|| t.c.as_tensor()),
    };
    let y = if composed {
        layer.forward_composed(t.x.as_tensor())
    } else {
        layer.forward(t.x.as_tensor())
    }
    .unwrap();
    let loss = (&y * &t.probe).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(&t.w).is_none(), "{case:?}: W received a gradient");
    let mut out = vec![Some(y.clone())];
    for v in [&t.x, &t.a, &t.b, &t.c] {
        out.push(grads.get(v.as_tensor()).cloned());
    }
    out
}

/// The fused op on the GPU in `dtype` against the CPU f64 composed reference.
fn check(dev: &Device, case: Case, dtype: DType) {
    let t = inputs(case, dtype, dev);
    let on_cpu = |v: &Tensor| {
        v.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let var = |v: &Var| Var::from_tensor(&on_cpu(v.as_tensor())).unwrap();
    let reference = Inputs {
        x: var(&t.x),
        w: on_cpu(&t.w),
        a: var(&t.a),
        b: var(&t.b),
        c: var(&t.c),
        bias: on_cpu(&t.bias),
        probe: on_cpu(&t.probe),
    };
    let got = run(case, &t, false);
    let want = run(case, &reference, true);
    let names = ["y", "dx", "dA", "dB", "dc"];
    for ((name, g), w) in names.iter().zip(&got).zip(&want) {
        match (g, w) {
            (Some(g), Some(w)) => {
                let e = rel_err(g, w);
                assert!(
                    e <= tolerance(dtype),
                    "{case:?} {dtype:?} {name}: relative error {e:.3e}"
                );
            }
            (None, None) => {}
            _ => panic!("{case:?} {dtype:?} {name}: present on one side only"),
        }
    }
}

const CASES: [Case; 5] = [
    Case {
        n: 5,
        d_in: 33,
        d_out: 17,
        r: 4,
        bias: false,
        row_scale: false,
    },
    Case {
        n: 7,
        d_in: 64,
        d_out: 40,
        r: 8,
        bias: true,
        row_scale: false,
    },
    Case {
        n: 70,
        d_in: 48,
        d_out: 80,
        r: 3,
        bias: true,
        row_scale: true,
    },
    Case {
        n: 130,
        d_in: 96,
        d_out: 33,
        r: 16,
        bias: false,
        row_scale: true,
    },
    Case {
        n: 3,
        d_in: 16,
        d_out: 24,
        r: 0,
        bias: true,
        row_scale: true,
    },
];

/// Every case in each of `dtypes`.
fn check_cases(dtypes: &[DType]) {
    let Some(dev) = gpu() else { return };
    for case in CASES {
        for &dtype in dtypes {
            check(&dev, case, dtype);
        }
    }
}

#[test]
fn fused_op_matches_the_f64_reference_in_f32_and_f64() {
    check_cases(&[DType::F32, DType::F64]);
}

#[test]
fn fused_op_matches_the_f64_reference_in_bf16_and_f16() {
    check_cases(&[DType::BF16, DType::F16]);
}

#[test]
fn a_constant_input_gets_no_gradient() {
    let Some(dev) = gpu() else { return };
    let case = CASES[2];
    let t = inputs(case, DType::F32, &dev);
    let layer = FusedLinear {
        weight: &t.w,
        bias: Some(&t.bias),
        low_rank: Some(LowRankTerm {
            a: t.a.as_tensor(),
            b: t.b.as_tensor(),
            scale: 0.5,
        }),
        row_scale: None,
    };
    let x = t.x.as_tensor().detach();
    let grads = layer
        .forward(&x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&x).is_none());
    assert!(grads.get(t.a.as_tensor()).is_some() && grads.get(t.b.as_tensor()).is_some());
}

/// VeRA's op on the GPU in `dtype` against the CPU f64 composed reference: forward and the
/// gradients of `x`, `mid` and `out` (none for the frozen `W`, `A`, `B`).
fn check_scaled(
    dev: &Device,
    (n, d_in, d_out, r): (usize, usize, usize, usize),
    bias: bool,
    dtype: DType,
) {
    use lorakit::kernels::ScaledLowRankLinear;
    let cpu = Device::Cpu;
    let draw = |shape: &[usize], std: f64| {
        Tensor::randn(0f64, std, shape, &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let host = [
        draw(&[n, d_in], 1.0),
        draw(&[d_out, d_in], 0.3),
        draw(&[r, d_in], 0.3),
        draw(&[d_out, r], 0.3),
        draw(&[r], 1.0),
        draw(&[d_out], 1.0),
        draw(&[d_out], 1.0),
        draw(&[n, d_out], 1.0),
    ];
    let run = |device: &Device, as_dtype: DType, composed: bool| {
        let t: Vec<Tensor> = host
            .iter()
            .map(|t| t.to_dtype(as_dtype).unwrap().to_device(device).unwrap())
            .collect();
        let (x, mid, out) = (
            Var::from_tensor(&t[0]).unwrap(),
            Var::from_tensor(&t[4]).unwrap(),
            Var::from_tensor(&t[5]).unwrap(),
        );
        let layer = ScaledLowRankLinear {
            weight: &t[1],
            bias: bias.then_some(&t[6]),
            a: &t[2],
            b: &t[3],
            mid: mid.as_tensor(),
            out: out.as_tensor(),
        };
        let y = if composed {
            layer.forward_composed(x.as_tensor())
        } else {
            layer.forward(x.as_tensor())
        }
        .unwrap();
        let grads = (&y * &t[7]).unwrap().sum_all().unwrap().backward().unwrap();
        for frozen in [&t[1], &t[2], &t[3]] {
            assert!(
                grads.get(frozen).is_none(),
                "a frozen factor received a gradient"
            );
        }
        let mut out_list = vec![y];
        for v in [&x, &mid, &out] {
            out_list.push(grads.get(v.as_tensor()).unwrap().clone());
        }
        out_list
    };
    let got = run(dev, dtype, false);
    let want = run(&cpu, DType::F64, true);
    for ((name, g), w) in ["y", "dx", "d_mid", "d_out"].iter().zip(&got).zip(&want) {
        let e = rel_err(g, w);
        assert!(
            e <= tolerance(dtype),
            "VeRA {n}x{d_in}x{d_out} r {r} {dtype:?} {name}: relative error {e:.3e}"
        );
    }
}

#[test]
fn vera_op_matches_the_f64_reference() {
    let Some(dev) = gpu() else { return };
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        check_scaled(&dev, (6, 40, 24, 8), true, dtype);
        check_scaled(&dev, (130, 33, 70, 5), false, dtype);
    }
}
