//! The fused low-rank linear (`FusedLinear::forward`, a CustomOp on the CPU) against the
//! composed candle-op reference (`forward_composed`): outputs and the gradients of x, A, B
//! and the row scale, over many shapes and layouts, in f32 and f64. Also: the frozen W
//! never gets a gradient entry from the fused op.

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use lorakit::init::SeededRng;
use lorakit::kernels::{FusedLinear, LowRankTerm};

/// How `x` is laid out in memory.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// Contiguous `[lead.., d_in]`.
    Contiguous,
    /// 2-D, the transpose of a contiguous `(d_in, n)`.
    Transposed,
    /// Columns `1..=d_in` of a wider contiguous matrix (row stride > d_in).
    Sliced,
    /// 3-D `(b, s, d_in)` from a contiguous `(s, b, d_in)`: leading dims do not merge.
    Permuted,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    lead: &'static [usize],
    d_in: usize,
    d_out: usize,
    /// 0: no low-rank term.
    r: usize,
    bias: bool,
    row_scale: bool,
    layout: Layout,
}

struct Run {
    y: Tensor,
    grads: GradStore,
}

struct Inputs {
    x: Var,
    w: Tensor,
    bias: Option<Tensor>,
    a: Var,
    b: Var,
    c: Var,
    proj: Tensor,
    scale: f64,
}

fn make_x(case: &Case, rng: &mut SeededRng, dtype: DType) -> Tensor {
    let dev = Device::Cpu;
    let d = case.d_in;
    let n: usize = case.lead.iter().product();
    let mut u = |shape: &[usize]| rng.uniform(shape, -1.0, 1.0, dtype, &dev).unwrap();
    match case.layout {
        Layout::Contiguous => {
            let mut dims = case.lead.to_vec();
            dims.push(d);
            u(&dims)
        }
        Layout::Transposed => u(&[d, n]).t().unwrap(),
        Layout::Sliced => u(&[n, d + 3]).narrow(1, 1, d).unwrap(),
        Layout::Permuted => {
            let (b, s) = (case.lead[0], case.lead[1]);
            u(&[s, b, d]).transpose(0, 1).unwrap()
        }
    }
}

fn inputs(case: &Case, seed: u64, dtype: DType) -> Inputs {
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(seed);
    let x = make_x(case, &mut rng, dtype);
    let mut u =
        |shape: &[usize], lo: f64, hi: f64| rng.uniform(shape, lo, hi, dtype, &dev).unwrap();
    let (d_in, d_out, r) = (case.d_in, case.d_out, case.r.max(1));
    let w = u(&[d_out, d_in], -0.5, 0.5);
    let bias = case.bias.then(|| u(&[d_out], -1.0, 1.0));
    let a = u(&[r, d_in], -0.5, 0.5);
    let b = u(&[d_out, r], -0.5, 0.5);
    // Row scale with some exact zeros (the backward recomputes those columns).
    let mut c = u(&[d_out], 0.5, 1.5);
    if d_out >= 3 {
        let mask: Vec<f64> = (0..d_out)
            .map(|j| if j % 3 == 1 { 0.0 } else { 1.0 })
            .collect();
        c = (c * Tensor::new(mask, &dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
    }
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().unwrap() = d_out;
    let proj = u(&out_dims, -1.0, 1.0);
    Inputs {
        x: Var::from_tensor(&x).unwrap(),
        w,
        bias,
        a: Var::from_tensor(&a).unwrap(),
        b: Var::from_tensor(&b).unwrap(),
        c: Var::from_tensor(&c).unwrap(),
        proj,
        scale: 1.7,
    }
}

fn run(case: &Case, inp: &Inputs, fused: bool) -> Run {
    let layer = FusedLinear {
        weight: &inp.w,
        bias: inp.bias.as_ref(),
        low_rank: (case.r > 0).then(|| LowRankTerm {
            a: inp.a.as_tensor(),
            b: inp.b.as_tensor(),
            scale: inp.scale,
        }),
        row_scale: case.row_scale.then(|| inp.c.as_tensor()),
    };
    let y = if fused {
        layer.forward(inp.x.as_tensor()).unwrap()
    } else {
        layer.forward_composed(inp.x.as_tensor()).unwrap()
    };
    // A random projection makes the incoming gradient random (not all ones).
    let loss = (&y * &inp.proj).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    Run { y, grads }
}

/// `max |got − want| / max |want|`, in f64.
pub(super) fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let g = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let w = want.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff: f64 = (&g - &w)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f64 = w.abs().unwrap().max(0).unwrap().to_scalar().unwrap();
    diff / scale.max(1e-30)
}

fn check(case: Case, dtype: DType, seed: u64) {
    let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
    let inp = inputs(&case, seed, dtype);
    let fused = run(&case, &inp, true);
    let reference = run(&case, &inp, false);
    let ctx = format!("{case:?} {dtype:?}");
    let e = rel_err(&fused.y, &reference.y);
    assert!(e <= tol, "output rel err {e} > {tol} for {ctx}");
    assert_eq!(fused.y.dims(), reference.y.dims());
    let mut checked = vec![("x", inp.x.as_tensor())];
    if case.r > 0 {
        checked.push(("A", inp.a.as_tensor()));
        checked.push(("B", inp.b.as_tensor()));
    }
    if case.row_scale {
        checked.push(("row_scale", inp.c.as_tensor()));
    }
    for (name, t) in checked {
        let want = reference
            .grads
            .get(t)
            .unwrap_or_else(|| panic!("no reference grad {name}"));
        let got = fused
            .grads
            .get(t)
            .unwrap_or_else(|| panic!("no fused grad {name} for {ctx}"));
        let e = rel_err(got, want);
        assert!(e <= tol, "grad {name} rel err {e} > {tol} for {ctx}");
    }
    // The frozen weight gets nothing, and nothing of its shape is in the grad store.
    assert!(fused.grads.get(&inp.w).is_none());
    let w_shaped = fused
        .grads
        .get_ids()
        .filter_map(|id| fused.grads.get_id(*id))
        .filter(|g| g.dims() == [case.d_out, case.d_in])
        .count();
    assert_eq!(w_shaped, 0, "a W-shaped gradient in the store for {ctx}");
}

const fn case(lead: &'static [usize], d_in: usize, d_out: usize, r: usize) -> Case {
    Case {
        lead,
        d_in,
        d_out,
        r,
        bias: false,
        row_scale: false,
        layout: Layout::Contiguous,
    }
}

fn all_cases() -> Vec<Case> {
    let shapes = [
        case(&[7], 12, 9, 3),
        case(&[1], 16, 11, 2),     // n = 1
        case(&[5], 10, 10, 1),     // r = 1, square
        case(&[2, 3], 13, 6, 4),   // 3-D input
        case(&[33], 70, 45, 8),    // big enough for packed gemm kernels
        case(&[4], 9, 14, 0),      // no low-rank term (frozen base only)
        case(&[2, 4, 3], 8, 5, 2), // 4-D input
        case(&[20], 37, 150, 5),   // ≥ 8 rows, ≥ 128 outputs: x Wᵀ by transposed chunks
        case(&[9], 20, 515, 4),    // few rows, ≥ 512 outputs: x Wᵀ through transposes of x and y
        // ≥ 128 rows, both sides of W past 128: in f32 with AVX-512 `x Wᵀ` and the input
        // gradient `g W` (a row-major right-hand side) on the packed route.
        case(&[130], 140, 150, 4),
    ];
    let mut out = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        for (bias, row_scale) in [(false, false), (true, false), (false, true), (true, true)] {
            let layout = match (i + usize::from(bias) + 2 * usize::from(row_scale)) % 4 {
                0 => Layout::Contiguous,
                1 if s.lead.len() == 1 => Layout::Transposed,
                2 if s.lead.len() == 1 => Layout::Sliced,
                3 if s.lead.len() == 2 => Layout::Permuted,
                _ => Layout::Contiguous,
            };
            out.push(Case {
                bias,
                row_scale,
                layout,
                ..*s
            });
        }
    }
    // Every layout at least once on a low-rank case with both bias and row scale.
    for layout in [Layout::Transposed, Layout::Sliced] {
        out.push(Case {
            bias: true,
            row_scale: true,
            layout,
            ..case(&[6], 11, 7, 3)
        });
    }
    out.push(Case {
        bias: true,
        row_scale: true,
        layout: Layout::Permuted,
        ..case(&[3, 2], 11, 7, 3)
    });
    out
}

#[test]
fn fused_matches_composed_f32() {
    for (i, c) in all_cases().into_iter().enumerate() {
        check(c, DType::F32, 100 + i as u64);
    }
}

#[test]
fn fused_matches_composed_f64() {
    for (i, c) in all_cases().into_iter().enumerate() {
        check(c, DType::F64, 200 + i as u64);
    }
}

#[test]
fn half_precision_runs_in_f32_and_casts_back() {
    let c = Case {
        bias: true,
        row_scale: true,
        ..case(&[3], 8, 6, 2)
    };
    for dtype in [DType::F16, DType::BF16] {
        let inp = inputs(&c, 7, dtype);
        let fused = run(&c, &inp, true);
        let reference = run(&c, &inp, false);
        assert_eq!(fused.y.dtype(), dtype);
        // Both paths compute in f32 and round once: equal up to one half-precision ulp.
        let e = rel_err(&fused.y, &reference.y);
        assert!(e <= 1e-2, "{dtype:?}: rel err {e}");
        let gx = fused.grads.get(inp.x.as_tensor()).unwrap();
        assert_eq!(gx.dtype(), dtype);
    }
}

#[test]
fn constant_inputs_get_no_gradient() {
    // x and A constants (LoRA-FA's frozen A, a first layer's input): only B trains.
    let c = case(&[4], 6, 5, 2);
    let inp = inputs(&c, 3, DType::F64);
    let (x, a) = (inp.x.as_tensor().detach(), inp.a.as_tensor().detach());
    let layer = FusedLinear {
        weight: &inp.w,
        bias: None,
        low_rank: Some(LowRankTerm {
            a: &a,
            b: inp.b.as_tensor(),
            scale: 0.5,
        }),
        row_scale: None,
    };
    let grads_of = |y: Tensor| {
        (y * &inp.proj)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let fused = grads_of(layer.forward(&x).unwrap());
    let reference = grads_of(layer.forward_composed(&x).unwrap());
    let b = inp.b.as_tensor();
    assert!(rel_err(fused.get(b).unwrap(), reference.get(b).unwrap()) <= 1e-10);
    assert!(fused.get(&x).is_none() && fused.get(&a).is_none());
}

#[test]
fn composed_reference_does_form_a_weight_gradient() {
    // Shows the W-shaped check in `check` can fail: the composed path's matmul backward
    // builds a (d_out, d_in) gradient for the frozen weight.
    let c = case(&[4], 6, 5, 2);
    let inp = inputs(&c, 5, DType::F32);
    let reference = run(&c, &inp, false);
    let w_shaped = reference
        .grads
        .get_ids()
        .filter_map(|id| reference.grads.get_id(*id))
        .filter(|g| g.dims() == [5, 6] || g.dims() == [6, 5])
        .count();
    assert!(w_shaped > 0);
}

#[test]
fn broadcast_incoming_gradient() {
    // `sum_all`'s backward hands the op a stride-0 (broadcast) gradient.
    let c = Case {
        bias: true,
        row_scale: true,
        ..case(&[2, 5], 9, 7, 3)
    };
    let inp = inputs(&c, 11, DType::F64);
    let layer = FusedLinear {
        weight: &inp.w,
        bias: inp.bias.as_ref(),
        low_rank: Some(LowRankTerm {
            a: inp.a.as_tensor(),
            b: inp.b.as_tensor(),
            scale: inp.scale,
        }),
        row_scale: Some(inp.c.as_tensor()),
    };
    let x = inp.x.as_tensor();
    let fused = layer
        .forward(x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let reference = layer
        .forward_composed(x)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for t in [x, inp.a.as_tensor(), inp.b.as_tensor(), inp.c.as_tensor()] {
        let e = rel_err(fused.get(t).unwrap(), reference.get(t).unwrap());
        assert!(e <= 1e-10, "rel err {e}");
    }
}
