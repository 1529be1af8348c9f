//! Gradient accumulation over micro-batches and clipping by global norm.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;
use crate::kernels::{host_scalar, sum_of_squares};

/// The summed gradients of a set of variables over the micro-batches of one optimizer
/// step. Only the variables' gradients are kept: the store each backward pass returns
/// (which holds a gradient for every intermediate tensor too) is dropped at once.
///
/// ```
/// use candle_core::{DType, Device, Var};
/// use lorakit::finetune::grads::GradAccumulator;
/// # fn main() -> lorakit::Result<()> {
/// let w = Var::ones(2, DType::F32, &Device::Cpu)?;
/// let mut acc = GradAccumulator::new(vec![w.clone()]);
/// for scale in [1f64, 2.] {
///     acc.add(&(w.as_tensor() * scale)?.sum_all()?.backward()?)?;
/// }
/// let norm = acc.clip_global_norm(Some(1.0))?; // ‖(3, 3)‖ = 4.24…, scaled down to 1
/// assert!((norm - 18f64.sqrt()).abs() < 1e-6);
/// let g = acc.store().get(w.as_tensor()).unwrap().to_vec1::<f32>()?;
/// assert!((g[0] - 0.5f32.sqrt()).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub struct GradAccumulator {
    vars: Vec<Var>,
    store: GradStore,
}

impl GradAccumulator {
    /// An empty accumulator for `vars` (the trainable variables).
    pub fn new(vars: Vec<Var>) -> Self {
        Self {
            vars,
            store: GradStore::default(),
        }
    }

    /// Adds the variables' gradients from one backward pass (variables the loss did not
    /// reach are skipped).
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for var in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let sum = match self.store.get(var.as_tensor()) {
                Some(previous) => (previous + g)?,
                None => g.detach(),
            };
            self.store.insert(var.as_tensor(), sum);
        }
        Ok(())
    }

    /// The global L2 norm of the accumulated gradients (computed in f64; in f32 on Metal,
    /// which has no f64); with `Some(max_norm)`, scales every gradient by
    /// `max_norm / norm` when the norm exceeds it (PyTorch's `clip_grad_norm_`, whose ε of
    /// 1e-6 is kept). Returns the norm before clipping.
    ///
    /// The squared norms add up on each gradient's device, and each device's total is read
    /// once: on a GPU one synchronisation per step, not one per variable.
    pub fn clip_global_norm(&mut self, max_norm: Option<f64>) -> Result<f64> {
        let norm = self.squared_norm()?.sqrt();
        if let Some(max_norm) = max_norm {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                for var in &self.vars {
                    if let Some(g) = self.store.remove(var.as_tensor()) {
                        self.store.insert(var.as_tensor(), (g * coef)?);
                    }
                }
            }
        }
        Ok(norm)
    }

    /// `Σ ‖g‖²` over the accumulated gradients: one running total per device, read once.
    fn squared_norm(&self) -> Result<f64> {
        let mut totals: Vec<Tensor> = Vec::new();
        for g in self
            .vars
            .iter()
            .filter_map(|v| self.store.get(v.as_tensor()))
        {
            let squares = sum_of_squares(g)?;
            match totals
                .iter_mut()
                .find(|t| t.device().same_device(g.device()))
            {
                Some(total) => *total = (&*total + squares)?,
                None => totals.push(squares),
            }
        }
        let mut sum = 0f64;
        for total in &totals {
            sum += host_scalar(total)?;
        }
        Ok(sum)
    }

    /// The accumulated gradients, for step hooks and the optimizer.
    pub fn store(&self) -> &GradStore {
        &self.store
    }

    /// The accumulated gradients, mutably (hooks such as LoRA-FA's projection rewrite them).
    pub fn store_mut(&mut self) -> &mut GradStore {
        &mut self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The norm over variables of several dtypes (one without a gradient) against the sum
    /// of their squared values in f64 on the host, and the clipped gradients against
    /// `g · max / norm`.
    #[test]
    fn global_norm_and_clipping_match_a_host_reference() {
        let dev = Device::Cpu;
        let values = [
            vec![3f64, -4.0, 0.5],
            vec![1.25, 2.0],
            vec![-7.0],
            vec![9.0, 9.0],
        ];
        let dtypes = [DType::F32, DType::BF16, DType::F64, DType::F16];
        let vars: Vec<Var> = values
            .iter()
            .zip(dtypes)
            .map(|(v, dt)| {
                let t = Tensor::new(v.as_slice(), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                Var::from_tensor(&t).unwrap()
            })
            .collect();
        // The loss reaches the first three variables: each gradient is the variable itself.
        let loss = vars[..3]
            .iter()
            .map(|v| {
                v.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    * 0.5
            })
            .try_fold(Tensor::new(0f64, &dev).unwrap(), |acc, t| acc + t.unwrap())
            .unwrap();
        let mut acc = GradAccumulator::new(vars.clone());
        acc.add(&loss.backward().unwrap()).unwrap();
        let want: f64 = values[..3]
            .iter()
            .flatten()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();

        let max = 2.0;
        let norm = acc.clip_global_norm(Some(max)).unwrap();
        assert!((norm - want).abs() < 1e-12 * want, "{norm} vs {want}");
        for (var, v) in vars[..3].iter().zip(&values) {
            let g = acc.store().get(var.as_tensor()).unwrap();
            let g = g.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            for (gi, xi) in g.iter().zip(v) {
                let clipped = xi * max / (want + 1e-6);
                let tol = if var.dtype() == DType::BF16 {
                    1e-2
                } else {
                    1e-6
                };
                assert!(
                    (gi - clipped).abs() <= tol * clipped.abs(),
                    "{gi} vs {clipped}"
                );
            }
        }
        assert!(acc.store().get(vars[3].as_tensor()).is_none());
    }
}
