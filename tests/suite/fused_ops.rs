//! `lorakit::models::fused`, the public transformer ops: each path (lorakit's fused op with
//! its backward for f32 CPU tensors that track a gradient, candle-nn's kernels without a
//! gradient, candle's composition for other dtypes) against an f64 reference — the
//! composition in f64 for values and gradients, and a hand-written f64 loop for the
//! attention's values — and each op's shape errors.

use candle_core::{DType, Tensor, Var};
use lorakit::models::fused::{
    bidirectional_attention, causal_attention, gelu_erf, gelu_tanh, layer_norm,
    padded_causal_attention, rms_norm, rope_heads, silu_mul,
};
use lorakit::Error;

use crate::common::{flat, max_rel_diff, max_rel_vec, randn, rng};

/// The same random values as an f32 and an f64 variable.
fn vars(seed: u64, shape: &[usize]) -> (Var, Var) {
    let t = randn(&mut rng(seed), shape, DType::F64);
    (
        Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap(),
        Var::from_tensor(&t).unwrap(),
    )
}

/// Asserts that `y32` (f32, fused path) equals `y64` (f64 reference) within `tol`, and so
/// does the gradient of `Σ y ⊙ u` for each pair of inputs (`u` random, the same for both).
fn assert_matches(y32: &Tensor, y64: &Tensor, inputs: &[(&str, &Var, &Var)], tol: f64) {
    assert_eq!(y32.dims(), y64.dims());
    let err = max_rel_diff(y32, y64);
    assert!(err < tol, "values differ by {err:e}");
    let u = randn(&mut rng(99), y64.dims(), DType::F64);
    let g32 = (y32 * u.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g64 = (y64 * &u).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, a, b) in inputs {
        let err = max_rel_diff(
            g32.get(a.as_tensor()).unwrap(),
            g64.get(b.as_tensor()).unwrap(),
        );
        assert!(err < tol, "d{name} differs by {err:e}");
    }
}

fn is_shape_error(r: lorakit::Result<Tensor>, what: &str) {
    match r {
        Err(Error::ShapeMismatch { what: w, .. }) if w == what => {}
        other => panic!("expected a shape error for {what}, got {other:?}"),
    }
}

#[test]
fn rms_norm_paths_match_f64() {
    let (x32, x64) = vars(1, &[2, 3, 40]);
    let w64 = randn(&mut rng(2), &[40], DType::F64);
    let w32 = w64.to_dtype(DType::F32).unwrap();
    let y32 = rms_norm(x32.as_tensor(), &w32, 1e-5).unwrap();
    let y64 = rms_norm(x64.as_tensor(), &w64, 1e-5).unwrap();
    assert_matches(&y32, &y64, &[("x", &x32, &x64)], 1e-5);
    // No gradient: candle-nn's kernel.
    let frozen = rms_norm(&x32.as_tensor().detach(), &w32, 1e-5).unwrap();
    assert!(max_rel_diff(&frozen, &y64) < 1e-5);
    is_shape_error(
        rms_norm(x32.as_tensor(), &w32.narrow(0, 0, 39).unwrap(), 1e-5),
        "weight",
    );
}

#[test]
fn layer_norm_paths_match_f64() {
    let (x32, x64) = vars(11, &[2, 3, 40]);
    let (b32, b64) = vars(12, &[40]); // a bias that trains (PEFT's bias = "all")
    let w64 = randn(&mut rng(13), &[40], DType::F64);
    let w32 = w64.to_dtype(DType::F32).unwrap();
    let y32 = layer_norm(x32.as_tensor(), &w32, b32.as_tensor(), 1e-5).unwrap();
    let y64 = layer_norm(x64.as_tensor(), &w64, b64.as_tensor(), 1e-5).unwrap();
    // One row by hand.
    let row = flat(&x64.as_tensor().get(1).unwrap().get(2).unwrap());
    let mean = row.iter().sum::<f64>() / 40.0;
    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 40.0;
    let (w, b) = (flat(&w64), flat(b64.as_tensor()));
    let want: Vec<f64> = (0..40)
        .map(|i| (row[i] - mean) / (var + 1e-5).sqrt() * w[i] + b[i])
        .collect();
    let got = flat(&y64.get(1).unwrap().get(2).unwrap());
    assert!(max_rel_vec(&got, &want) < 1e-12);
    assert_matches(&y32, &y64, &[("x", &x32, &x64), ("bias", &b32, &b64)], 1e-5);
    // No gradient: candle-nn's kernel.
    let frozen = layer_norm(
        &x32.as_tensor().detach(),
        &w32,
        &b32.as_tensor().detach(),
        1e-5,
    )
    .unwrap();
    assert!(max_rel_diff(&frozen, &y64) < 1e-5);
    let short = w32.narrow(0, 0, 39).unwrap();
    is_shape_error(
        layer_norm(x32.as_tensor(), &short, b32.as_tensor(), 1e-5),
        "weight",
    );
    is_shape_error(layer_norm(x32.as_tensor(), &w32, &short, 1e-5), "bias");
}

#[test]
fn rope_heads_paths_match_f64() {
    let (b, t, h, d) = (2, 5, 3, 8);
    let (x32, x64) = vars(3, &[b, t, h, d]);
    let angles: Vec<f64> = (0..t)
        .flat_map(|p| (0..d / 2).map(move |i| p as f64 * 10f64.powf(-(i as f64) / 2.0)))
        .collect();
    let table = |f: fn(f64) -> f64| {
        Tensor::from_vec(
            angles.iter().map(|&a| f(a)).collect::<Vec<_>>(),
            (t, d / 2),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (cos64, sin64) = (table(f64::cos), table(f64::sin));
    let (cos32, sin32) = (
        cos64.to_dtype(DType::F32).unwrap(),
        sin64.to_dtype(DType::F32).unwrap(),
    );
    let y32 = rope_heads(x32.as_tensor(), &cos32, &sin32).unwrap();
    let y64 = rope_heads(x64.as_tensor(), &cos64, &sin64).unwrap();
    assert_eq!(y32.dims(), &[b, h, t, d]);
    // The reference by hand for one element: head 1, position 4, pair (1, 1 + d/2).
    let xs = flat(
        &x64.as_tensor()
            .get(1)
            .unwrap()
            .get(4)
            .unwrap()
            .get(1)
            .unwrap(),
    );
    let (c, s) = (angles[4 * d / 2 + 1].cos(), angles[4 * d / 2 + 1].sin());
    let want = [xs[1] * c - xs[1 + d / 2] * s, xs[1 + d / 2] * c + xs[1] * s];
    let got = flat(&y32.get(1).unwrap().get(1).unwrap().get(4).unwrap());
    assert!(max_rel_vec(&[got[1], got[1 + d / 2]], &want) < 1e-6);
    assert_matches(&y32, &y64, &[("x", &x32, &x64)], 1e-5);
    let frozen = rope_heads(&x32.as_tensor().detach(), &cos32, &sin32).unwrap();
    assert!(max_rel_diff(&frozen, &y64) < 1e-5);
    is_shape_error(
        rope_heads(x32.as_tensor(), &cos32.narrow(0, 0, 4).unwrap(), &sin32),
        "cos",
    );
    is_shape_error(
        rope_heads(&x32.as_tensor().narrow(3, 0, 7).unwrap(), &cos32, &sin32),
        "x",
    );
}

/// Attention by hand in f64: queries at `kv − t ..`, keys at `0..kv`, query head `i` on
/// key/value head `i / (h / g)`; the query at `pos` of batch element `bi` sees key `j`
/// when `sees(bi, pos, j)`, and a query that sees no key weighs all keys equally (as an
/// additive mask of the most negative value makes it).
fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    sees: impl Fn(usize, usize, usize) -> bool,
) -> Vec<f64> {
    let (b, h, t, d) = q.dims4().unwrap();
    let (g, kv) = (k.dim(1).unwrap(), k.dim(2).unwrap());
    let (q, k, v) = (flat(q), flat(k), flat(v));
    let mut out = vec![0.0; b * t * h * d];
    for bi in 0..b {
        for hi in 0..h {
            let gi = hi / (h / g);
            for i in 0..t {
                let pos = kv - t + i;
                let mut seen: Vec<usize> = (0..kv).filter(|&j| sees(bi, pos, j)).collect();
                let blind = seen.is_empty();
                if blind {
                    seen = (0..kv).collect();
                }
                let qrow = &q[((bi * h + hi) * t + i) * d..][..d];
                let scores: Vec<f64> = seen
                    .iter()
                    .map(|&j| {
                        let krow = &k[((bi * g + gi) * kv + j) * d..][..d];
                        let score = scale * qrow.iter().zip(krow).map(|(a, b)| a * b).sum::<f64>();
                        if blind {
                            0.0
                        } else {
                            score
                        }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (p, &j) in e.iter().zip(&seen) {
                    let vrow = &v[((bi * g + gi) * kv + j) * d..][..d];
                    for c in 0..d {
                        out[((bi * t + i) * h + hi) * d + c] += p / z * vrow[c];
                    }
                }
            }
        }
    }
    out
}

/// Queries `(b, h, t, d)`, keys and values `(b, g, kv, d)` from seeds `seed ..= seed + 2`,
/// as [`vars`] pairs; `dims` is `[b, h, g, t, kv, d]`.
fn attention_vars(seed: u64, dims: [usize; 6]) -> [(Var, Var); 3] {
    let [b, h, g, t, kv, d] = dims;
    [
        vars(seed, &[b, h, t, d]),
        vars(seed + 1, &[b, g, kv, d]),
        vars(seed + 2, &[b, g, kv, d]),
    ]
}

/// Left-padded rows: the fused f32 op and the composed f64 ops give the by-hand reference
/// (a token sees its row's tokens, a padding slot only itself) and the same gradients, for
/// a whole sequence (padding queries included) and queries after cached keys; a pad count
/// per row is required.
#[test]
fn padded_causal_attention_paths_match_f64() {
    let pads = [0, 2];
    for (t, kv, seed) in [(5, 5, 11), (2, 6, 12)] {
        let (b, h, g, d) = (2, 4, 2, 8);
        let [(q32, q64), (k32, k64), (v32, v64)] = attention_vars(seed, [b, h, g, t, kv, d]);
        let scale = 1.0 / (d as f64).sqrt();
        for window in [None, Some(2)] {
            let run = |q: &Var, k: &Var, v: &Var| {
                let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                padded_causal_attention(q, k, v, scale, window, &pads).unwrap()
            };
            let (y32, y64) = (run(&q32, &k32, &v32), run(&q64, &k64, &v64));
            let want = attention_reference(
                q64.as_tensor(),
                k64.as_tensor(),
                v64.as_tensor(),
                scale,
                |bi, pos, j| match pads[bi] {
                    pad if pos < pad => j == pos,
                    pad => j >= pad && j <= pos && window.is_none_or(|w| j + w > pos),
                },
            );
            let case = format!("t {t}, kv {kv}, window {window:?}");
            assert!(max_rel_vec(&flat(&y32), &want) < 1e-5, "{case}: fused");
            assert!(max_rel_vec(&flat(&y64), &want) < 1e-12, "{case}: composed");
            let inputs = [("q", &q32, &q64), ("k", &k32, &k64), ("v", &v32, &v64)];
            assert_matches(&y32, &y64, &inputs, 1e-5);
        }
        let (q, k, v) = (q32.as_tensor(), k32.as_tensor(), v32.as_tensor());
        assert!(matches!(
            padded_causal_attention(q, k, v, 1.0, None, &[1]),
            Err(Error::Usage { .. })
        ));
    }
}

#[test]
fn causal_attention_paths_match_f64() {
    let (b, h, g, t, kv, d) = (2, 4, 2, 3, 5, 8);
    let [(q32, q64), (k32, k64), (v32, v64)] = attention_vars(4, [b, h, g, t, kv, d]);
    let scale = 1.0 / (d as f64).sqrt();
    for window in [None, Some(2)] {
        let run = |q: &Var, k: &Var, v: &Var| {
            causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, window).unwrap()
        };
        let (y32, y64) = (run(&q32, &k32, &v32), run(&q64, &k64, &v64));
        assert_eq!(y32.dims(), &[b, t, h * d]);
        let want = attention_reference(
            q64.as_tensor(),
            k64.as_tensor(),
            v64.as_tensor(),
            scale,
            |_, pos, j| j <= pos && window.is_none_or(|w| j + w > pos),
        );
        assert!(
            max_rel_vec(&flat(&y32), &want) < 1e-5,
            "{window:?}: fused vs by hand"
        );
        assert!(
            max_rel_vec(&flat(&y64), &want) < 1e-12,
            "{window:?}: composed vs by hand"
        );
        assert_matches(
            &y32,
            &y64,
            &[("q", &q32, &q64), ("k", &k32, &k64), ("v", &v32, &v64)],
            1e-5,
        );
    }
    let (q, k, v) = (q32.as_tensor(), k32.as_tensor(), v32.as_tensor());
    is_shape_error(
        causal_attention(&q.narrow(1, 0, 3).unwrap(), k, v, scale, None),
        "k",
    );
    is_shape_error(
        causal_attention(q, &k.narrow(2, 0, 2).unwrap(), v, scale, None),
        "k",
    );
    is_shape_error(
        causal_attention(q, k, &v.narrow(2, 0, 4).unwrap(), scale, None),
        "v",
    );
    assert!(matches!(
        causal_attention(q, k, v, scale, Some(0)),
        Err(Error::Usage { .. })
    ));
}

/// Under a key mask: trailing padding, a masked key inside the span, and (the last case) a
/// batch element whose mask holds no key, which weighs its keys equally on both paths.
/// Dropout is covered by the op's unit tests (its draws differ between the paths); here
/// only its argument check.
#[test]
fn bidirectional_attention_paths_match_f64() {
    let (b, h, g, t, kv, d) = (2, 4, 2, 5, 6, 8);
    let [(q32, q64), (k32, k64), (v32, v64)] = attention_vars(14, [b, h, g, t, kv, d]);
    let scale = 1.0 / (d as f64).sqrt();
    let masks: [[[u32; 6]; 2]; 3] = [
        [[1; 6], [1; 6]],
        [[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 0]],
        [[1, 1, 0, 1, 1, 1], [0; 6]],
    ];
    for rows in masks {
        let mask = Tensor::new(&rows, q32.device()).unwrap();
        let run = |q: &Var, k: &Var, v: &Var| {
            let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            bidirectional_attention(q, k, v, scale, Some(&mask), 0.0).unwrap()
        };
        let (y32, y64) = (run(&q32, &k32, &v32), run(&q64, &k64, &v64));
        assert_eq!(y32.dims(), &[b, t, h * d]);
        let want = attention_reference(
            q64.as_tensor(),
            k64.as_tensor(),
            v64.as_tensor(),
            scale,
            |bi, _, j| rows[bi][j] != 0,
        );
        let case = format!("{rows:?}");
        assert!(
            max_rel_vec(&flat(&y32), &want) < 1e-5,
            "{case}: f32 vs by hand"
        );
        assert!(
            max_rel_vec(&flat(&y64), &want) < 1e-12,
            "{case}: f64 vs by hand"
        );
        // A batch element that sees nothing has gradients only through its values (its
        // scores are all the most negative value): compare values there only.
        if rows.iter().all(|row| row.contains(&1)) {
            let inputs = [("q", &q32, &q64), ("k", &k32, &k64), ("v", &v32, &v64)];
            assert_matches(&y32, &y64, &inputs, 1e-5);
        }
    }
    let (q, k, v) = (q32.as_tensor(), k32.as_tensor(), v32.as_tensor());
    let unmasked = bidirectional_attention(q, k, v, scale, None, 0.0).unwrap();
    let all = Tensor::ones((b, kv), DType::U8, q.device()).unwrap();
    let masked = bidirectional_attention(q, k, v, scale, Some(&all), 0.0).unwrap();
    assert_eq!(flat(&unmasked), flat(&masked), "no mask is a mask of ones");
    let mask = Some(&all);
    is_shape_error(
        bidirectional_attention(&q.narrow(1, 0, 3).unwrap(), k, v, scale, mask, 0.0),
        "k",
    );
    is_shape_error(
        bidirectional_attention(q, k, &v.narrow(2, 0, 4).unwrap(), scale, mask, 0.0),
        "v",
    );
    let short = all.narrow(1, 0, kv - 1).unwrap();
    is_shape_error(
        bidirectional_attention(q, k, v, scale, Some(&short), 0.0),
        "key_mask",
    );
    for p in [-0.1, 1.0, f64::NAN] {
        assert!(matches!(
            bidirectional_attention(q, k, v, scale, mask, p),
            Err(Error::InvalidDropout { .. })
        ));
    }
}

#[test]
fn silu_mul_paths_match_f64() {
    let (g32, g64) = vars(7, &[3, 70]);
    let (u32_, u64_) = vars(8, &[3, 70]);
    let y32 = silu_mul(g32.as_tensor(), u32_.as_tensor()).unwrap();
    let y64 = silu_mul(g64.as_tensor(), u64_.as_tensor()).unwrap();
    let want: Vec<f64> = flat(g64.as_tensor())
        .iter()
        .zip(flat(u64_.as_tensor()))
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    assert!(max_rel_vec(&flat(&y64), &want) < 1e-12);
    assert_matches(
        &y32,
        &y64,
        &[("gate", &g32, &g64), ("up", &u32_, &u64_)],
        1e-5,
    );
    is_shape_error(
        silu_mul(g32.as_tensor(), &u32_.as_tensor().narrow(1, 0, 69).unwrap()),
        "up",
    );
}

#[test]
fn gelu_tanh_paths_match_f64() {
    let (x32, x64) = vars(9, &[3, 90]);
    let y32 = gelu_tanh(x32.as_tensor()).unwrap();
    let y64 = gelu_tanh(x64.as_tensor()).unwrap();
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let want: Vec<f64> = flat(x64.as_tensor())
        .iter()
        .map(|&x| 0.5 * x * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh()))
        .collect();
    assert!(max_rel_vec(&flat(&y64), &want) < 1e-12);
    assert_matches(&y32, &y64, &[("x", &x32, &x64)], 1e-5);
}

#[test]
fn gelu_erf_paths_match_f64() {
    let (x32, x64) = vars(10, &[3, 90]);
    let y32 = gelu_erf(x32.as_tensor()).unwrap();
    // f64 goes through candle's `gelu_erf` and its composed backward.
    let y64 = gelu_erf(x64.as_tensor()).unwrap();
    // Φ by the erf series in f64 (the inputs are within |x| < 6, where it converges).
    let phi = |x: f64| {
        let z = x / std::f64::consts::SQRT_2;
        let (mut term, mut sum) = (z, z);
        for n in 1..200 {
            term *= -z * z / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        0.5 * (1.0 + 2.0 / std::f64::consts::PI.sqrt() * sum)
    };
    let inputs = flat(x64.as_tensor());
    assert!(inputs.iter().all(|x| x.abs() < 6.0));
    let want: Vec<f64> = inputs.iter().map(|&x| x * phi(x)).collect();
    assert!(max_rel_vec(&flat(&y64), &want) < 1e-9);
    assert!(max_rel_vec(&flat(&y32), &want) < 1e-5);
    assert_matches(&y32, &y64, &[("x", &x32, &x64)], 1e-5);
}
