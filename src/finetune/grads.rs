//! Gradient accumulation over micro-batches and clipping by global norm.

use candle_core::backprop::GradStore;
use candle_core::Var;

use crate::error::Result;
use crate::kernels::sum_of_squares;

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
    /// which has no f64, each variable's sum of squares); with
    /// `Some(max_norm)`, scales every gradient by `max_norm / norm` when the norm exceeds
    /// it (PyTorch's `clip_grad_norm_`, whose ε of 1e-6 is kept). Returns the norm before
    /// clipping.
    pub fn clip_global_norm(&mut self, max_norm: Option<f64>) -> Result<f64> {
        let mut squares = 0f64;
        for var in &self.vars {
            if let Some(g) = self.store.get(var.as_tensor()) {
                squares += sum_of_squares(g)?;
            }
        }
        let norm = squares.sqrt();
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

    /// The accumulated gradients, for step hooks and the optimizer.
    pub fn store(&self) -> &GradStore {
        &self.store
    }

    /// The accumulated gradients, mutably (hooks such as LoRA-FA's projection rewrite them).
    pub fn store_mut(&mut self) -> &mut GradStore {
        &mut self.store
    }
}
