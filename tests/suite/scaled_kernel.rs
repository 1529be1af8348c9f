//! VeRA's fused product (`ScaledLowRankLinear::forward`, a CustomOp on the CPU) against its
//! composed candle-op reference (`forward_composed`): outputs and the gradients of x, mid
//! (λ_d) and out (λ_b) in f32 and f64, with strided frozen factors (slices of a larger
//! shared pair), 3-D inputs, bias, a broadcast incoming gradient and constant vectors.
//! The frozen W, A and B never get a gradient.

use crate::common::{randn, rng};
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use lorakit::kernels::ScaledLowRankLinear;

#[derive(Clone, Copy, Debug)]
struct Case {
    lead: &'static [usize],
    d_in: usize,
    d_out: usize,
    r: usize,
    bias: bool,
    /// A and B sliced out of larger matrices (as VeRA's smaller layers do).
    sliced: bool,
    /// The incoming gradient of `sum_all` (stride 0) instead of a random projection.
    broadcast_grad: bool,
}

struct Inputs {
    x: Var,
    w: Tensor,
    bias: Option<Tensor>,
    a: Tensor,
    b: Tensor,
    mid: Var,
    out: Var,
}

fn inputs(case: &Case, seed: u64, dtype: DType) -> Inputs {
    let g = &mut rng(seed);
    let mut shape = case.lead.to_vec();
    shape.push(case.d_in);
    let (extra_in, extra_out) = if case.sliced { (5, 3) } else { (0, 0) };
    let a_full = randn(g, &[case.r, case.d_in + extra_in], dtype);
    let b_full = randn(g, &[case.d_out + extra_out, case.r], dtype);
    Inputs {
        x: Var::from_tensor(&randn(g, &shape, dtype)).unwrap(),
        w: randn(g, &[case.d_out, case.d_in], dtype),
        bias: case.bias.then(|| randn(g, &[case.d_out], dtype)),
        a: a_full.narrow(1, 0, case.d_in).unwrap(),
        b: b_full.narrow(0, 0, case.d_out).unwrap(),
        mid: Var::from_tensor(&randn(g, &[case.r], dtype)).unwrap(),
        out: Var::from_tensor(&randn(g, &[case.d_out], dtype)).unwrap(),
    }
}

fn layer(inp: &Inputs) -> ScaledLowRankLinear<'_> {
    ScaledLowRankLinear {
        weight: &inp.w,
        bias: inp.bias.as_ref(),
        a: &inp.a,
        b: &inp.b,
        mid: inp.mid.as_tensor(),
        out: inp.out.as_tensor(),
    }
}

fn run(case: &Case, inp: &Inputs, fused: bool) -> (Tensor, GradStore) {
    let l = layer(inp);
    let x = inp.x.as_tensor();
    let y = if fused {
        l.forward(x).unwrap()
    } else {
        l.forward_composed(x).unwrap()
    };
    let loss = if case.broadcast_grad {
        y.sum_all().unwrap()
    } else {
        let proj = randn(&mut rng(99), y.dims(), y.dtype());
        (&y * proj).unwrap().sum_all().unwrap()
    };
    let grads = loss.backward().unwrap();
    (y, grads)
}

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    crate::common::max_rel_diff(got, want)
}

fn check(case: Case, dtype: DType) {
    let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
    let inp = inputs(&case, 7, dtype);
    let (y, fused) = run(&case, &inp, true);
    let (y_ref, reference) = run(&case, &inp, false);
    let ctx = format!("{case:?} {dtype:?}");
    let e = rel_err(&y, &y_ref);
    assert!(e <= tol, "output rel err {e} for {ctx}");
    for (name, t) in [
        ("x", inp.x.as_tensor()),
        ("mid", inp.mid.as_tensor()),
        ("out", inp.out.as_tensor()),
    ] {
        let got = fused
            .get(t)
            .unwrap_or_else(|| panic!("no grad {name} for {ctx}"));
        let e = rel_err(got, reference.get(t).unwrap());
        assert!(e <= tol, "grad {name} rel err {e} for {ctx}");
    }
    for frozen in [&inp.w, &inp.a, &inp.b] {
        assert!(
            fused.get(frozen).is_none(),
            "a frozen tensor got a gradient: {ctx}"
        );
    }
}

const fn case(lead: &'static [usize], d_in: usize, d_out: usize, r: usize) -> Case {
    Case {
        lead,
        d_in,
        d_out,
        r,
        bias: false,
        sliced: false,
        broadcast_grad: false,
    }
}

fn all_cases() -> Vec<Case> {
    vec![
        case(&[7], 12, 9, 4),
        case(&[1], 6, 5, 1),
        case(&[3], 4, 6, 16), // r > min(d_in, d_out), as VeRA's r = 256 on small layers
        Case {
            bias: true,
            ..case(&[2, 3], 8, 7, 5)
        },
        Case {
            sliced: true,
            ..case(&[6], 9, 8, 3)
        },
        Case {
            sliced: true,
            bias: true,
            broadcast_grad: true,
            ..case(&[2, 4], 5, 10, 6)
        },
        // ≥ 128 columns: x Wᵀ, x A_sᵀ and (·) B_sᵀ by transposed chunks.
        Case {
            sliced: true,
            bias: true,
            ..case(&[20], 40, 130, 140)
        },
    ]
}

#[test]
fn fused_matches_composed_f64() {
    for c in all_cases() {
        check(c, DType::F64);
    }
}

#[test]
fn fused_matches_composed_f32() {
    for c in all_cases() {
        check(c, DType::F32);
    }
}

#[test]
fn constant_vectors_and_input_get_no_gradient() {
    let c = case(&[4], 6, 5, 3);
    let inp = inputs(&c, 3, DType::F64);
    let (x, mid) = (inp.x.as_tensor().detach(), inp.mid.as_tensor().detach());
    let l = ScaledLowRankLinear {
        mid: &mid,
        ..layer(&inp)
    };
    let grads_of = |y: Tensor| y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let fused = grads_of(l.forward(&x).unwrap());
    let reference = grads_of(l.forward_composed(&x).unwrap());
    let out = inp.out.as_tensor();
    assert!(rel_err(fused.get(out).unwrap(), reference.get(out).unwrap()) <= 1e-10);
    assert!(fused.get(&x).is_none() && fused.get(&mid).is_none());
}

#[test]
fn half_precision_runs_in_f32_and_casts_back() {
    let c = case(&[3], 8, 6, 4);
    let inp = inputs(&c, 5, DType::F32);
    let reference = layer(&inp).forward(inp.x.as_tensor()).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let x = inp.x.as_tensor().to_dtype(dtype).unwrap();
        let y = layer(&inp).forward(&x).unwrap();
        assert_eq!(y.dtype(), dtype);
        let e = rel_err(&y.to_dtype(DType::F32).unwrap(), &reference);
        assert!(e <= 2e-2, "{dtype:?}: rel err {e}");
    }
}

#[test]
fn mismatched_shapes_are_an_error() {
    let c = case(&[3], 8, 6, 4);
    let inp = inputs(&c, 5, DType::F32);
    let short_mid = inp.mid.as_tensor().narrow(0, 0, 3).unwrap();
    let l = ScaledLowRankLinear {
        mid: &short_mid,
        ..layer(&inp)
    };
    let err = l.forward(inp.x.as_tensor()).unwrap_err().to_string();
    assert!(err.contains("mid"), "{err}");
}
