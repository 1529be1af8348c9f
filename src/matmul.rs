//! A matrix product that every candle backend accepts: [`matmul`], which the library calls
//! instead of `Tensor::matmul` (`clippy.toml` forbids that and `Tensor::broadcast_matmul`
//! in the crate; no library code needs a broadcast product today).
//!
//! candle's default CPU matmul (the `gemm` crate) takes operands of any strides. Its other
//! paths do not: the `mkl` and `accelerate` CPU features, CUDA (cuBLAS) and Metal each pass
//! an operand's last two dimensions to a BLAS call as a matrix with a leading dimension, so
//! they take only a row-major or a column-major (transposed) matrix whose rows or columns
//! lie exactly end to end, and they refuse anything else (`MatMulUnexpectedStriding`,
//! `MatMulNonContiguous`). A column slice of a wider matrix (one expert's columns of a
//! stacked `lora_B`, the `B` part of a packed `[B | c]`) is such a view: it works on the
//! default CPU build and fails on a GPU.
//!
//! The wrapper copies (`contiguous`) only an operand that some backend would refuse, so a
//! contiguous or transposed operand costs nothing, and the product is the same on every
//! backend. [`accepted_by_every_backend`] is the rule, written from candle 0.11's
//! `cpu_backend` (`MatMul::ab_skip`, the `mkl`/`accelerate` `f`), `cuda_backend`
//! (`gemm_config`) and `candle-metal-kernels` (`mlx_gemm`), taking the strictest of them.

use candle_core::{Layout, Result, Tensor};

/// `lhs · rhs` as `Tensor::matmul`, with any operand that a BLAS-backed backend would
/// refuse made contiguous first (see the module docs).
#[allow(clippy::disallowed_methods)] // The one place that calls candle's matmul.
pub(crate) fn matmul(lhs: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    blas_ready(lhs)?.matmul(&blas_ready(rhs)?)
}

/// `t` itself when every backend's matmul takes its layout, else a contiguous copy.
fn blas_ready(t: &Tensor) -> Result<Tensor> {
    if accepted_by_every_backend(t.layout()) {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Whether every candle matmul backend takes an operand of this layout: its last two
/// dimensions `(rows, cols)` row-major with leading dimension `cols`, or column-major with
/// leading dimension `rows` (a transposed contiguous matrix), where a dimension of size 1
/// may have any stride in the row-major case; and its batch dimensions (at most two) at one
/// stride each, or two that flatten to one.
fn accepted_by_every_backend(layout: &Layout) -> bool {
    let ([batch_dims @ .., rows, cols], [batch_strides @ .., row_stride, col_stride]) =
        (layout.dims(), layout.stride())
    else {
        // candle's matmul refuses these itself, on every backend; a copy would not help.
        return true;
    };
    let row_major = (*col_stride == 1 || *cols == 1) && (row_stride == cols || *rows == 1);
    // mkl and accelerate take a transposed operand only with exactly these strides (CUDA
    // and Metal also allow a size-1 dimension there to have any stride).
    let column_major = col_stride == rows && *row_stride == 1;
    let batch = match (batch_dims, batch_strides) {
        ([outer, inner], [outer_stride, inner_stride]) => {
            *outer_stride == inner_stride * inner || *outer == 1 || *inner == 1
        }
        // No batch dimension, or one at any stride: every backend steps through it.
        // More than two: candle refuses those on every backend; a copy would not help.
        _ => true,
    };
    (row_major || column_major) && batch
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // candle's own products are the references.
mod tests {
    use candle_core::{Device, IndexOp, Tensor};

    use super::*;

    fn arange(dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .reshape(dims)
            .unwrap()
    }

    fn accepted(t: &Tensor) -> bool {
        accepted_by_every_backend(t.layout())
    }

    #[test]
    fn contiguous_and_transposed_matrices_are_taken_as_they_are() {
        let m = arange(&[4, 6]);
        assert!(accepted(&m));
        assert!(accepted(&m.t().unwrap()));
        let batched = arange(&[2, 3, 4, 6]);
        assert!(accepted(&batched));
        assert!(accepted(&batched.t().unwrap()));
        // A single row: the stride between rows does not matter.
        assert!(accepted(&m.i((1..2, 0..3)).unwrap()));
        // Broadcast batch dimensions (stride 0), as `broadcast_matmul` makes them.
        let shared = m.broadcast_as((5, 4, 6)).unwrap();
        assert!(accepted(&shared));
        assert!(accepted(&m.broadcast_as((2, 5, 4, 6)).unwrap()));
    }

    #[test]
    fn padded_and_permuted_views_are_refused() {
        let m = arange(&[4, 6]);
        // Columns 0..4 of a 6-column matrix: rows 6 apart for 4 values (a stacked lora_B's
        // expert, the B of a packed [B | c]).
        let narrow = m.narrow(1, 0, 4).unwrap();
        assert!(!accepted(&narrow));
        assert!(!accepted(&narrow.t().unwrap()));
        // A single column of a wider matrix, as a column and as a row.
        let column = m.i((.., 2..3)).unwrap();
        assert!(!accepted(&column));
        assert!(!accepted(&column.t().unwrap()));
        // Every other column.
        let strided = arange(&[4, 3, 2]).i((.., .., 0)).unwrap();
        assert!(!accepted(&strided));
        // Batch dimensions whose strides do not flatten to one.
        let permuted = arange(&[2, 3, 4, 6]).transpose(0, 1).unwrap();
        assert!(!accepted(&permuted));
        // Every refused layout is taken once made contiguous.
        for t in [narrow, column, strided, permuted] {
            assert!(accepted(&t.contiguous().unwrap()));
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::models::op_test::max_abs(&(a - b).unwrap())
    }

    /// On the default CPU build candle's matmul takes the refused views as they are: the
    /// copy changes no value of the product.
    #[cfg(not(any(feature = "mkl", feature = "accelerate")))]
    #[test]
    fn products_of_refused_views_equal_candles_strided_products() {
        let b = arange(&[5, 7]).narrow(1, 0, 3).unwrap(); // (5, 3), padded rows
        let a = arange(&[3, 4]).affine(0.5, -1.0).unwrap();
        let x = arange(&[2, 5]);
        assert_eq!(
            max_diff(&matmul(&b, &a).unwrap(), &b.matmul(&a).unwrap()),
            0.0
        );
        assert_eq!(
            max_diff(&matmul(&x, &b).unwrap(), &x.matmul(&b).unwrap()),
            0.0
        );
        let bt = b.t().unwrap();
        assert_eq!(
            max_diff(
                &matmul(&bt, &x.t().unwrap()).unwrap(),
                &bt.matmul(&x.t().unwrap()).unwrap()
            ),
            0.0
        );
    }

    /// With a BLAS-backed CPU matmul the rule is candle's own: it takes exactly the
    /// accepted layouts, and the wrapper takes the refused ones too.
    #[cfg(any(feature = "mkl", feature = "accelerate"))]
    #[test]
    fn the_rule_is_the_blas_backends_rule() {
        let m = arange(&[6, 6]);
        let square_views = [
            m.clone(),
            m.t().unwrap(),
            m.narrow(1, 0, 6).unwrap(),
            arange(&[6, 8]).narrow(1, 1, 6).unwrap(),
            arange(&[8, 6]).narrow(0, 1, 6).unwrap().t().unwrap(),
            arange(&[6, 6, 2]).i((.., .., 1)).unwrap(),
            arange(&[6, 8]).narrow(1, 2, 6).unwrap().t().unwrap(),
        ];
        for view in &square_views {
            let direct = view.matmul(&m).is_ok() && m.matmul(view).is_ok();
            assert_eq!(direct, accepted(view), "{:?}", view.layout());
            assert_eq!(
                max_diff(
                    &matmul(view, &m).unwrap(),
                    &view.contiguous().unwrap().matmul(&m).unwrap()
                ),
                0.0
            );
        }
    }
}
