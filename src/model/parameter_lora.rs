//! [`ParameterLora`]: a LoRA on a parameter rather than a module, as PEFT's `ParamWrapper`
//! (`target_parameters`) adapts a mixture-of-experts model's stacked expert weights and its
//! router.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::low_rank::{Factor, LowRankPair};

/// PEFT's LoRA on one parameter (`target_parameters`): for a stack of `E` experts'
/// weights `(E, out, in)`, `lora_A` is `(r · E, in)` and `lora_B` `(out, r · E)`; expert
/// `e`'s weight changes by `scaling · B_e A_e`, where `A_e` is rows `e·r .. (e+1)·r` of
/// `lora_A` and `B_e` the columns `j·E + e` of `lora_B` (PEFT's
/// `ParamWrapper.get_delta_weight`). A 2-D parameter is the case `E = 1`: a plain LoRA.
///
/// PEFT computes the adapted forward with the changed weight (a parametrization). A model
/// built with a loaded adapter runs it as a [`crate::model::StackedLora`] (each expert a
/// LoRA layer on `A_e`, `B_e`, trainable like the adapter's other layers:
/// [`crate::model::AdapterPlan::stacked_loras`]); `lorakit merge` adds its change to the
/// checkpoint's per-expert tensors ([`ParameterLora::delta_rows`]).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lorakit::model::ParameterLora;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// // 2 experts, rank 1, in 3, out 2: A rows are the experts' A_e; B's column e is B_e.
/// let a = Tensor::new(&[[1f32, 0., 0.], [0., 1., 0.]], &dev)?;
/// let b = Tensor::new(&[[1f32, 10.], [2., 20.]], &dev)?;
/// let lora = ParameterLora::new("experts.down_proj", a, b, 1, 0.5)?;
/// assert_eq!(lora.experts(), 2);
/// assert_eq!(lora.out_in(), (2, 3));
/// let delta = lora.delta_rows(1, 0, 2)?.to_vec2::<f32>()?; // 0.5 · [10, 20]ᵀ [0, 1, 0]
/// assert_eq!(delta, [[0., 5., 0.], [0., 10., 0.]]);
/// assert_eq!(lora.delta_rows(1, 1, 1)?.to_vec2::<f32>()?, [[0., 10., 0.]]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ParameterLora {
    key: String,
    wrapper_path: String,
    lora_a: Tensor,
    lora_b: Tensor,
    rank: usize,
    scaling: f64,
}

impl ParameterLora {
    /// The LoRA of the parameter `key` (for errors) with factors `lora_a` `(r · E, in)` and
    /// `lora_b` `(out, r · E)`, rank `rank`, and `scaling` (`α / r`; rsLoRA: `α / √r`).
    pub fn new(
        key: &str,
        lora_a: Tensor,
        lora_b: Tensor,
        rank: usize,
        scaling: f64,
    ) -> Result<Self> {
        let shape_error = |what: &str, expected: String, got: &Tensor| Error::ShapeMismatch {
            layer: key.to_string(),
            what: what.to_string(),
            expected,
            got: format!("{:?}", got.dims()),
        };
        let rows = match lora_a.dims() {
            &[rows, _] if rank > 0 && rows > 0 && rows.is_multiple_of(rank) => rows,
            _ => {
                return Err(shape_error(
                    "lora_A",
                    format!("(r · experts, in) with r = {rank}"),
                    &lora_a,
                ))
            }
        };
        match lora_b.dims() {
            &[_, cols] if cols == rows => {}
            _ => return Err(shape_error("lora_B", format!("(out, {rows})"), &lora_b)),
        }
        let module = key.rsplit_once('.').map_or(key, |(module, _)| module);
        Ok(Self {
            key: key.to_string(),
            wrapper_path: module.to_string(),
            lora_a,
            lora_b,
            rank,
            scaling,
        })
    }

    /// The parameter's key (`model.layers.0.mlp.experts.gate_up_proj`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// This LoRA stored at PEFT's module path `path` (the parameter's module, under a
    /// `base_layer` for each parameter of it wrapped after this one).
    pub fn with_wrapper_path(mut self, path: impl Into<String>) -> Self {
        self.wrapper_path = path.into();
        self
    }

    /// PEFT's module path of its tensors (default: the parameter's module).
    pub fn wrapper_path(&self) -> &str {
        &self.wrapper_path
    }

    /// The rank `r` of each expert's pair.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The scale of `B_e A_e`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// The number of experts `E` the factors cover (1 for a 2-D parameter).
    pub fn experts(&self) -> usize {
        self.lora_a.dims().first().copied().unwrap_or(0) / self.rank
    }

    /// The `(out, in)` of each expert's weight the LoRA changes.
    pub fn out_in(&self) -> (usize, usize) {
        let dim = |t: &Tensor, i: usize| t.dims().get(i).copied().unwrap_or(0);
        (dim(&self.lora_b, 0), dim(&self.lora_a, 1))
    }

    /// Rows `start .. start + rows` of expert `e`'s weight change, in f32:
    /// `scaling · B_e[start..start + rows] A_e`, through the low-rank core every variant
    /// shares ([`LowRankPair::product`]); only those rows are computed (a stacked
    /// `gate_up_proj`'s gate half, say).
    pub fn delta_rows(&self, e: usize, start: usize, rows: usize) -> Result<Tensor> {
        let (a, b) = self.expert_factors(e, start, rows)?;
        let pair = LowRankPair {
            a: Factor::Frozen(a),
            b: Factor::Frozen(b),
        };
        Ok((pair.product()?.to_dtype(DType::F32)? * self.scaling)?)
    }

    /// Expert `e`'s `A_e` `(r, in)` and rows `start .. start + rows` of its `B_e`
    /// `(rows, r)`, as stored (the file's dtype).
    pub fn expert_factors(&self, e: usize, start: usize, rows: usize) -> Result<(Tensor, Tensor)> {
        let experts = self.experts();
        let (out, _) = self.out_in();
        if e >= experts || start + rows > out {
            return Err(Error::ShapeMismatch {
                layer: self.key.clone(),
                what: "expert and rows of the weight change".to_string(),
                expected: format!("an expert < {experts}, rows within {out}"),
                got: format!("expert {e}, rows {start}..{}", start + rows),
            });
        }
        let r = self.rank;
        let b = self
            .lora_b
            .narrow(0, start, rows)?
            .reshape((rows, r, experts))?
            .narrow(2, e, 1)?
            .squeeze(2)?;
        Ok((self.lora_a.narrow(0, e * r, r)?, b))
    }
}
