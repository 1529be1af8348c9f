//! [`GroupedAdamW`]: candle's AdamW over parameter groups, each with its own learning rate
//! and weight decay (LoRA+ needs them), stepping from one candle `GradStore`.
//!
//! The update is candle_nn's `AdamW`, op for op (decoupled weight decay, bias correction,
//! the same defaults): with one group it is bit-identical to `candle_nn::AdamW`.
//!
//! Half-precision variables (bf16, f16) get an f32 master copy, as mixed-precision
//! training keeps one: the moments and the update are computed in f32 on the master, and
//! the variable receives the rounded result. Without it an update smaller than half a unit
//! in the last place of a 16-bit value (1/256 of the value in bf16) would be lost every
//! step. Writes to the variable from outside the optimizer (a resumed checkpoint,
//! AdaLoRA's masking) are picked up element by element at the next step: an element
//! whose value no longer equals its rounded master restarts from the variable's value.

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
pub use candle_nn::ParamsAdamW;

use crate::error::{Error, Result};

/// A set of variables sharing a learning rate and a weight decay.
///
/// `lr` / `weight_decay` left at `None` take the optimizer's defaults
/// ([`ParamsAdamW::lr`], [`ParamsAdamW::weight_decay`]), as in PyTorch's param groups.
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// A name for lookups and messages (e.g. `lora_B`).
    pub name: String,
    /// The variables (each may sit in one group only).
    pub vars: Vec<Var>,
    /// The group's learning rate, or `None` for the default.
    pub lr: Option<f64>,
    /// The group's decoupled weight decay, or `None` for the default.
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    /// A group using the optimizer's default learning rate and weight decay.
    pub fn new(name: impl Into<String>, vars: Vec<Var>) -> Self {
        Self {
            name: name.into(),
            vars,
            lr: None,
            weight_decay: None,
        }
    }

    /// Sets the group's learning rate.
    pub fn with_lr(mut self, lr: f64) -> Self {
        self.lr = Some(lr);
        self
    }

    /// Sets the group's weight decay.
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = Some(weight_decay);
        self
    }
}

/// One variable's state: the variable, its f32 master copy when it is a half type, and its
/// two moments (in the master's dtype).
#[derive(Debug)]
struct VarState {
    var: Var,
    master: Option<Var>,
    first_moment: Var,
    second_moment: Var,
}

impl VarState {
    /// The state of a fresh variable: zero moments, a master copy for bf16/f16.
    fn new(var: Var) -> candle_core::Result<Self> {
        let master = match var.dtype() {
            DType::BF16 | DType::F16 => {
                Some(Var::from_tensor(&var.as_tensor().to_dtype(DType::F32)?)?)
            }
            _ => None,
        };
        let dtype = master.as_ref().map_or(var.dtype(), |m| m.dtype());
        let (shape, dev) = (var.shape(), var.device());
        Ok(Self {
            first_moment: Var::zeros(shape, dtype, dev)?,
            second_moment: Var::zeros(shape, dtype, dev)?,
            master,
            var,
        })
    }

    /// The value the update starts from: the variable, or its master copy where the
    /// variable still holds the master's rounding (elsewhere it was written from outside).
    fn current(&self) -> candle_core::Result<Tensor> {
        let Some(master) = &self.master else {
            return Ok(self.var.as_tensor().clone());
        };
        let var = self.var.as_tensor();
        let unchanged = master.as_tensor().to_dtype(var.dtype())?.eq(var)?;
        unchanged.where_cond(master.as_tensor(), &var.to_dtype(master.dtype())?)
    }

    /// Stores the updated value (into the master copy and, rounded, the variable).
    fn set(&self, next: &Tensor) -> candle_core::Result<()> {
        match &self.master {
            Some(master) => {
                master.set(next)?;
                self.var.set(&next.to_dtype(self.var.dtype())?)
            }
            None => self.var.set(next),
        }
    }
}

/// A resolved group: its variables' states, current and initial learning rate, decay.
#[derive(Debug)]
struct Group {
    name: String,
    vars: Vec<VarState>,
    lr: f64,
    initial_lr: f64,
    weight_decay: f64,
}

/// AdamW over parameter groups.
///
/// The step count is shared by all groups (as in candle's AdamW, it advances on every
/// [`step`](GroupedAdamW::step) even for variables without a gradient, which are skipped).
///
/// Learning rates change between steps (schedules) with [`set_group_lr`](Self::set_group_lr),
/// [`set_lr_factor`](Self::set_lr_factor) or candle's `Optimizer::set_learning_rate`, which
/// treats its argument as a new *base* learning rate: every group's rate becomes
/// `initial_lr × lr / base_lr`, keeping the ratios between groups (LoRA+) and making a
/// one-group optimizer behave exactly like `candle_nn::AdamW`.
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use lorakit::train::{GroupedAdamW, ParamGroup, ParamsAdamW};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let a = Var::ones((2, 3), DType::F32, &dev)?;
/// let b = Var::ones((3, 2), DType::F32, &dev)?;
/// let mut opt = GroupedAdamW::new(
///     vec![
///         ParamGroup::new("A", vec![a.clone()]),
///         ParamGroup::new("B", vec![b.clone()]).with_lr(1.6e-2).with_weight_decay(0.0),
///     ],
///     ParamsAdamW { lr: 1e-3, ..Default::default() },
/// )?;
/// let loss = a.as_tensor().matmul(b.as_tensor())?.sum_all()?;
/// opt.step(&loss.backward()?)?;
/// assert_eq!(opt.group_lr(1), Some(1.6e-2));
/// opt.set_lr_factor(0.5); // a schedule: every group at half its initial rate
/// assert_eq!(opt.group_lr(0), Some(5e-4));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct GroupedAdamW {
    groups: Vec<Group>,
    params: ParamsAdamW,
    initial_base_lr: f64,
    step_t: usize,
}

impl GroupedAdamW {
    /// Builds the optimizer. `params` gives β₁, β₂, ε and the default learning rate and
    /// weight decay of groups that set none. Non-float variables are dropped (as candle
    /// does). Errors on a variable listed twice or an invalid hyper-parameter.
    pub fn new(groups: Vec<ParamGroup>, params: ParamsAdamW) -> Result<Self> {
        check_hyper("optimizer", &params)?;
        let mut seen = HashSet::new();
        let mut resolved = Vec::with_capacity(groups.len());
        for group in groups {
            let lr = group.lr.unwrap_or(params.lr);
            let weight_decay = group.weight_decay.unwrap_or(params.weight_decay);
            check_rate(&group.name, "lr", lr)?;
            check_rate(&group.name, "weight_decay", weight_decay)?;
            let mut vars = Vec::with_capacity(group.vars.len());
            for var in group.vars.into_iter().filter(|v| v.dtype().is_float()) {
                if !seen.insert(var.as_tensor().id()) {
                    return Err(Error::settings(
                        format!("parameter group `{}`", group.name),
                        "vars",
                        format!(
                            "a variable of shape {:?} is already in a parameter group",
                            var.dims()
                        ),
                    ));
                }
                vars.push(VarState::new(var)?);
            }
            resolved.push(Group {
                name: group.name,
                vars,
                lr,
                initial_lr: lr,
                weight_decay,
            });
        }
        Ok(Self {
            groups: resolved,
            initial_base_lr: params.lr,
            params,
            step_t: 0,
        })
    }

    /// One AdamW step on every variable that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.check_rates()?;
        Ok(self.step_candle(grads)?)
    }

    /// Every group's current rate is valid: a schedule (`set_lr_factor`,
    /// `Optimizer::set_learning_rate`) cannot report a bad value itself, so the step does.
    fn check_rates(&self) -> Result<()> {
        for group in &self.groups {
            check_rate(&group.name, "lr", group.lr)?;
        }
        check_rate("optimizer", "lr", self.params.lr)
    }

    /// The update, with candle_nn's AdamW op order (bit-identical for one group).
    fn step_candle(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_t += 1;
        let beta1 = self.params.beta1;
        let beta2 = self.params.beta2;
        let scale_m = 1f64 / (1f64 - beta1.powi(self.step_t as i32));
        let scale_v = 1f64 / (1f64 - beta2.powi(self.step_t as i32));
        for group in &self.groups {
            let lr = group.lr;
            let lr_lambda = lr * group.weight_decay;
            for state in &group.vars {
                let (m, v) = (&state.first_moment, &state.second_moment);
                if let Some(g) = grads.get(state.var.as_tensor()) {
                    let theta = state.current()?;
                    let g = &g.to_dtype(theta.dtype())?;
                    let next_m = ((m.as_tensor() * beta1)? + (g * (1.0 - beta1))?)?;
                    let next_v = ((v.as_tensor() * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let m_hat = (&next_m * scale_m)?;
                    let v_hat = (&next_v * scale_v)?;
                    let next_theta = (&theta * (1f64 - lr_lambda))?;
                    let adjusted_grad = (m_hat / (v_hat.sqrt()? + self.params.eps)?)?;
                    let next_theta = (next_theta - (adjusted_grad * lr)?)?;
                    m.set(&next_m)?;
                    v.set(&next_v)?;
                    state.set(&next_theta)?;
                }
            }
        }
        Ok(())
    }

    /// Backward from `loss`, then one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> usize {
        self.step_t
    }

    /// Every variable with its first and second moments (`exp_avg`, `exp_avg_sq`), in group
    /// order: what a training checkpoint stores to resume the optimizer exactly (f32
    /// moments for a half-precision variable; its f32 master copy is not among them, so a
    /// resumed half-precision run restarts from the variables' 16-bit values).
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use lorakit::train::{GroupedAdamW, ParamGroup, ParamsAdamW};
    /// # fn main() -> lorakit::Result<()> {
    /// let w = Var::ones(3, DType::F32, &Device::Cpu)?;
    /// let mut opt = GroupedAdamW::new(vec![ParamGroup::new("w", vec![w.clone()])], ParamsAdamW::default())?;
    /// opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?;
    /// let (var, m, v) = opt.moments().into_iter().next().unwrap();
    /// assert_eq!(var.as_tensor().id(), w.as_tensor().id());
    ///
    /// // A fresh optimizer over the same variable continues exactly where this one was.
    /// let mut resumed = GroupedAdamW::new(vec![ParamGroup::new("w", vec![w.clone()])], ParamsAdamW::default())?;
    /// resumed.load_moments(&w, &m, &v)?;
    /// resumed.set_step_count(opt.step_count());
    /// assert_eq!(resumed.step_count(), 1);
    /// # Ok(()) }
    /// ```
    pub fn moments(&self) -> Vec<(Var, Tensor, Tensor)> {
        self.groups
            .iter()
            .flat_map(|g| &g.vars)
            .map(|s| {
                (
                    s.var.clone(),
                    s.first_moment.as_tensor().clone(),
                    s.second_moment.as_tensor().clone(),
                )
            })
            .collect()
    }

    /// Sets the moments of `var` (as [`moments`](Self::moments) returned them). Errors if
    /// `var` is in no group, or on a moment of another shape or dtype.
    pub fn load_moments(&mut self, var: &Var, first: &Tensor, second: &Tensor) -> Result<()> {
        let id = var.as_tensor().id();
        let state = self
            .groups
            .iter()
            .flat_map(|g| &g.vars)
            .find(|s| s.var.as_tensor().id() == id)
            .ok_or_else(|| {
                Error::settings(
                    "optimizer",
                    "moments",
                    format!(
                        "a variable of shape {:?} is in no parameter group",
                        var.dims()
                    ),
                )
            })?;
        for (what, moment, value) in [
            ("exp_avg", &state.first_moment, first),
            ("exp_avg_sq", &state.second_moment, second),
        ] {
            if value.dims() != moment.dims() || value.dtype() != moment.dtype() {
                return Err(Error::settings(
                    "optimizer",
                    "moments",
                    format!(
                        "{what} is {:?} {:?}, its variable {:?} {:?}",
                        value.dims(),
                        value.dtype(),
                        moment.dims(),
                        moment.dtype()
                    ),
                ));
            }
            moment.set(&value.to_device(moment.device())?)?;
        }
        Ok(())
    }

    /// Sets the number of steps taken (bias correction uses it): with
    /// [`load_moments`](Self::load_moments), resumes an optimizer from a checkpoint.
    pub fn set_step_count(&mut self, steps: usize) {
        self.step_t = steps;
    }

    /// β₁, β₂, ε and the default learning rate / weight decay.
    pub fn params(&self) -> &ParamsAdamW {
        &self.params
    }

    /// Number of groups.
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// The groups' names, in order.
    pub fn group_names(&self) -> Vec<&str> {
        self.groups.iter().map(|g| g.name.as_str()).collect()
    }

    /// Index of the group called `name`.
    pub fn group_index(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }

    /// Index of the group holding `var`.
    pub fn group_of(&self, var: &Var) -> Option<usize> {
        let id = var.as_tensor().id();
        self.groups
            .iter()
            .position(|g| g.vars.iter().any(|s| s.var.as_tensor().id() == id))
    }

    /// The variables of group `index`.
    pub fn group_vars(&self, index: usize) -> Option<Vec<Var>> {
        let group = self.groups.get(index)?;
        Some(group.vars.iter().map(|s| s.var.clone()).collect())
    }

    /// The current learning rate of group `index`.
    pub fn group_lr(&self, index: usize) -> Option<f64> {
        self.groups.get(index).map(|g| g.lr)
    }

    /// The weight decay of group `index`.
    pub fn group_weight_decay(&self, index: usize) -> Option<f64> {
        self.groups.get(index).map(|g| g.weight_decay)
    }

    /// Sets the learning rate of group `index` (errors on a bad index or rate).
    pub fn set_group_lr(&mut self, index: usize, lr: f64) -> Result<()> {
        let count = self.groups.len();
        let group = self.groups.get_mut(index).ok_or_else(|| {
            Error::settings(
                "optimizer",
                "group",
                format!("index {index} out of range ({count} groups)"),
            )
        })?;
        check_rate(&group.name, "lr", lr)?;
        group.lr = lr;
        Ok(())
    }

    /// A schedule multiplier: every group's rate becomes `factor × its initial rate`
    /// (PyTorch's `LambdaLR`). A factor that makes a rate negative or non-finite makes the
    /// next [`step`](Self::step) fail with an error naming the group.
    pub fn set_lr_factor(&mut self, factor: f64) {
        for group in &mut self.groups {
            group.lr = group.initial_lr * factor;
        }
        self.params.lr = self.initial_base_lr * factor;
    }

    /// Sets the base learning rate; groups follow in proportion (see the type's docs).
    fn set_base_lr(&mut self, lr: f64) {
        let base = self.initial_base_lr;
        for group in &mut self.groups {
            group.lr = if base == 0.0 {
                lr
            } else {
                (group.initial_lr / base) * lr
            };
        }
        self.params.lr = lr;
    }
}

impl candle_nn::Optimizer for GroupedAdamW {
    type Config = ParamsAdamW;

    /// One group named `default` with `config`'s learning rate and weight decay: the same
    /// optimizer as `candle_nn::AdamW::new(vars, config)`.
    fn new(vars: Vec<Var>, config: ParamsAdamW) -> candle_core::Result<Self> {
        GroupedAdamW::new(vec![ParamGroup::new("default", vars)], config)
            .map_err(candle_core::Error::wrap)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.check_rates().map_err(candle_core::Error::wrap)?;
        self.step_candle(grads)
    }

    /// The base learning rate.
    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.set_base_lr(lr)
    }
}

fn check_hyper(name: &str, p: &ParamsAdamW) -> Result<()> {
    for (field, beta) in [("beta1", p.beta1), ("beta2", p.beta2)] {
        if !(0.0..1.0).contains(&beta) {
            return Err(Error::settings(
                name.to_string(),
                field,
                format!("must be in [0, 1), got {beta}"),
            ));
        }
    }
    check_rate(name, "eps", p.eps)?;
    check_rate(name, "lr", p.lr)?;
    check_rate(name, "weight_decay", p.weight_decay)
}

/// A learning rate, decay or epsilon: finite and ≥ 0.
fn check_rate(group: &str, field: &'static str, value: f64) -> Result<()> {
    if !value.is_finite() || value < 0.0 {
        return Err(Error::settings(
            format!("parameter group `{group}`"),
            field,
            format!("must be finite and >= 0, got {value}"),
        ));
    }
    Ok(())
}
