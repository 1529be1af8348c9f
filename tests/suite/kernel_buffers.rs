//! The fused ops reuse their work buffers across calls (saved `x Aᵀ`, the pre-scale
//! output `u`, the scaled incoming gradient, `g B`: a bounded pool inside the kernels).
//! Steps of changing shapes and dtypes, with graphs kept alive across other steps, give
//! the same outputs and gradients as the composed candle-op reference every time, so a
//! reused buffer never carries an old step's values and a held one is never handed out.

use candle_core::{DType, Device, Tensor, Var};
use lorakit::init::SeededRng;
use lorakit::kernels::{FusedLinear, LowRankTerm};

use super::fused_kernel::rel_err;

struct Case {
    x: Var,
    w: Tensor,
    bias: Tensor,
    a: Var,
    b: Var,
    c: Option<Var>,
    proj: Tensor,
}

impl Case {
    fn new(n: usize, d_in: usize, d_out: usize, r: usize, scaled: bool, dtype: DType) -> Self {
        let mut rng = SeededRng::new((n * 1000 + d_in * 10 + r) as u64);
        let mut u = |shape: &[usize]| rng.uniform(shape, -1.0, 1.0, dtype, &Device::Cpu).unwrap();
        Self {
            x: Var::from_tensor(&u(&[n, d_in])).unwrap(),
            w: u(&[d_out, d_in]),
            bias: u(&[d_out]),
            a: Var::from_tensor(&u(&[r, d_in])).unwrap(),
            b: Var::from_tensor(&u(&[d_out, r])).unwrap(),
            c: scaled.then(|| Var::from_tensor(&u(&[d_out])).unwrap()),
            proj: u(&[n, d_out]),
        }
    }

    fn layer(&self) -> FusedLinear<'_> {
        FusedLinear {
            weight: &self.w,
            bias: Some(&self.bias),
            low_rank: Some(LowRankTerm {
                a: self.a.as_tensor(),
                b: self.b.as_tensor(),
                scale: 0.75,
            }),
            row_scale: self.c.as_ref().map(Var::as_tensor),
        }
    }

    /// The output and the gradients of `x`, `A`, `B` (and `c`) for `loss = Σ y ⊙ proj`.
    fn grads(&self, y: &Tensor) -> Vec<Tensor> {
        let g = (y * &self.proj)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![y.clone()];
        let vars = [Some(&self.x), Some(&self.a), Some(&self.b), self.c.as_ref()];
        out.extend(
            vars.into_iter()
                .flatten()
                .map(|v| g.get(v).unwrap().clone()),
        );
        out
    }

    /// Compares the fused results `got` with the composed path's.
    fn check(&self, got: &[Tensor], what: &str) {
        let want = self.grads(&self.layer().forward_composed(self.x.as_tensor()).unwrap());
        let tol = if self.w.dtype() == DType::F64 {
            1e-12
        } else {
            1e-5
        };
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = rel_err(g, w);
            assert!(e <= tol, "{what}: result {i} off by {e} (relative)");
        }
    }
}

#[test]
fn reused_buffers_match_the_composed_path() {
    let shapes = [
        (9, 12, 10, 3, true, DType::F32),
        (4, 6, 7, 2, true, DType::F64),
        (20, 16, 14, 4, true, DType::F32),
        (9, 12, 10, 3, false, DType::F32),
        (3, 5, 5, 1, true, DType::F64),
        (2, 4, 3, 1, true, DType::F32),
    ];
    let cases: Vec<Case> = shapes
        .iter()
        .map(|&(n, d_in, d_out, r, c, dt)| Case::new(n, d_in, d_out, r, c, dt))
        .collect();
    for round in 0..2 {
        // Every forward first (each op holds its saved buffers), then the backwards in
        // reverse order, then once more one step at a time.
        let ys: Vec<Tensor> = cases
            .iter()
            .map(|c| c.layer().forward(c.x.as_tensor()).unwrap())
            .collect();
        for (i, (c, y)) in cases.iter().zip(&ys).enumerate().rev() {
            c.check(&c.grads(y), &format!("round {round}, held, case {i}"));
        }
        drop(ys);
        for (i, c) in cases.iter().enumerate() {
            let y = c.layer().forward(c.x.as_tensor()).unwrap();
            c.check(&c.grads(&y), &format!("round {round}, step, case {i}"));
        }
    }
}
