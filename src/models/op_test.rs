//! What the fused ops' unit tests share: checking an op's value and gradients against
//! the composed candle ops it replaces.

use candle_core::Tensor;

/// The largest absolute element of `t`.
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts that `fused` equals `composed` within `tol` relative to the largest element,
/// and so does the gradient of `Σ out ⊙ u` (`u` random, the same for both) for each of
/// `inputs`. `case` names the case in a failure.
pub(crate) fn assert_same_op(
    fused: &Tensor,
    composed: &Tensor,
    inputs: &[(&str, &Tensor)],
    tol: f32,
    case: &str,
) {
    assert_eq!(fused.dims(), composed.dims(), "{case}: shapes differ");
    let err = max_abs(&(fused - composed).unwrap()) / max_abs(composed);
    assert!(err <= tol, "{case}: values differ by {err:e}");
    let u = Tensor::randn(0f32, 1., fused.shape(), fused.device()).unwrap();
    let grads = |out: &Tensor| (out * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let (gf, gc) = (grads(fused), grads(composed));
    for (name, x) in inputs {
        let (a, b) = (gf.get(x).unwrap(), gc.get(x).unwrap());
        assert_eq!(a.dims(), x.dims(), "{case}: d{name} has the wrong shape");
        let err = max_abs(&(a - b).unwrap()) / max_abs(b);
        assert!(err <= tol, "{case}: d{name} differs by {err:e}");
    }
}
