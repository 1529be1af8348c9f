//! [`StackedLora`]: a trainable LoRA on a mixture of experts' stacked parameter (PEFT's
//! `target_parameters`: the experts' `gate_up_proj` and `down_proj`, the router's
//! `weight`), trained as one [`LoraLinear`] per expert and saved in PEFT's stacked layout;
//! and [`StackedParameter`], how a model describes such a parameter to its plan.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapter::{Adapter, NamedVar, ParamRole};
use crate::checkpoint::stacked_params::StackedRows;
use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::low_rank::{trainable_var, Factor, LowRankPair};
use crate::model::ParameterLora;
use crate::shared::Shared;
use crate::variants::{LoraConfig, LoraLinear};

/// A stacked parameter of a sparse mixture-of-experts block, as the model describes it to
/// its plan ([`AdapterPlan::stacked_loras`](crate::model::AdapterPlan::stacked_loras)).
#[derive(Clone, Debug)]
pub struct StackedParameter {
    /// The parameter's name in its module (`gate_up_proj`, `down_proj`, `weight`).
    pub name: &'static str,
    /// The `target_parameters` entry PEFT's conversion of `target_modules` writes for it
    /// (`gate_up_proj`, `down_proj`, `gate.weight`).
    pub peft_entry: &'static str,
    /// The module paths transformers 4 had in its place, which PEFT's conversion looks for
    /// in `target_modules` (Mixtral's `model.layers.0.mlp.experts.w1` and `….w3` for
    /// `gate_up_proj`, `model.layers.0.mlp.gate` for a router); empty for a model PEFT
    /// converts nothing on (Qwen2-MoE).
    pub converted_from: Vec<String>,
    /// The number of experts `E` (1 for a router).
    pub experts: usize,
    /// Each expert's `(out, in)`.
    pub out_in: (usize, usize),
    /// How each expert's rows are built: `[Gate, Up]` for a `gate_up_proj` that the model
    /// runs as two projections, `[All]` otherwise.
    pub parts: Vec<StackedRows>,
    /// The model's dtype, which the factors take.
    pub dtype: DType,
    /// The model's device.
    pub device: Device,
}

impl StackedParameter {
    /// The parameter `name` (saved as the `target_parameters` entry `peft_entry`) of
    /// `experts` experts, each `out_in`, each run as one layer (`parts` `[All]`), converted
    /// from no module name, in `vb`'s dtype and on its device; set the other fields with
    /// struct-update syntax.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarBuilder;
    /// use lorakit::checkpoint::stacked_params::StackedRows;
    /// use lorakit::model::StackedParameter;
    /// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    /// let p = StackedParameter::new("down_proj", "down_proj", 4, (8, 16), &vb);
    /// assert_eq!((p.experts, p.out_in, p.parts.as_slice()), (4, (8, 16), &[StackedRows::All][..]));
    /// assert!(p.converted_from.is_empty());
    /// ```
    pub fn new(
        name: &'static str,
        peft_entry: &'static str,
        experts: usize,
        out_in: (usize, usize),
        vb: &VarBuilder,
    ) -> Self {
        Self {
            name,
            peft_entry,
            converted_from: Vec::new(),
            experts,
            out_in,
            parts: vec![StackedRows::All],
            dtype: vb.dtype(),
            device: vb.device().clone(),
        }
    }
}

/// A trainable LoRA on one stacked parameter `(E, out, in)`: per expert `e`, `A_e`
/// `(r, in)` and `B_e` `(out, r)`, changing the expert's weight by `s · B_e A_e`, which is
/// PEFT's `ParamWrapper` (its file holds `lora_A` `(r · E, in)`, the `A_e` stacked, and
/// `lora_B` `(out, r · E)`, whose column `j · E + e` is `B_e`'s column `j`).
///
/// Each expert runs as [`LoraLinear`]s over its frozen weight (one per part of its rows:
/// the gate and up halves of a `gate_up_proj` share `A_e`, each with its half of `B_e`),
/// so the fused kernel computes the low-rank term and no gradient for the frozen weight.
/// The [`AdaptedSet`](crate::model::AdaptedSet) the plan registers it in trains, merges,
/// enables and saves it with the model's other adapters.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::checkpoint::stacked_params::StackedRows;
/// use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, StackedParameter, TargetSpec};
/// use lorakit::{FrozenLinear, LoraConfig};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let vars = VarMap::new();
/// let plan = AdapterPlan::lora(
///     TargetSpec::new(ModuleSelector::AllLinear),
///     RankAlpha::new(2, 4.0),
///     LoraConfig::default(),
///     VarBuilder::from_varmap(&vars, DType::F32, &dev),
/// );
/// // Two experts' `down_proj`, 8 → 4, which PEFT's all-linear adapts (it was `w2`).
/// let down = StackedParameter {
///     name: "down_proj",
///     peft_entry: "down_proj",
///     converted_from: vec!["layers.0.mlp.experts.w2".into()],
///     experts: 2,
///     out_in: (4, 8),
///     parts: vec![StackedRows::All],
///     dtype: DType::F32,
///     device: dev.clone(),
/// };
/// let loras = plan.stacked_loras("layers.0.mlp.experts", &[down])?;
/// let lora = loras[0].as_ref().unwrap();
/// assert_eq!((lora.rank(), lora.experts()), (2, 2));
/// let base = FrozenLinear::new(Tensor::ones((4, 8), DType::F32, &dev)?, None)?;
/// let expert1 = lora.expert_layer(1, 0, base)?; // B starts at zero: the base
/// let y = expert1.forward(&Tensor::ones((3, 8), DType::F32, &dev)?)?;
/// assert_eq!(y.to_vec2::<f32>()?[0], [8.0; 4]);
/// let set = plan.finish()?;
/// assert_eq!(set.trainable_vars().len(), 4); // A and B of each expert
/// let saved: Vec<_> = lora.tensors_to_save()?.into_iter().map(|(k, t)| (k, t.dims().to_vec())).collect();
/// assert_eq!(saved, [("lora_A.weight".to_string(), vec![4, 8]), ("lora_B.weight".to_string(), vec![4, 4])]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct StackedLora {
    key: String,
    wrapper_path: String,
    entry: String,
    config: LoraConfig,
    parts: Vec<StackedRows>,
    out_in: (usize, usize),
    /// `A_e`, `(r, in)`, per expert.
    a: Vec<Var>,
    /// `B_e`'s rows of each part, `(rows, r)`, per expert.
    b: Vec<Vec<Var>>,
    /// The experts' layers built so far ([`StackedLora::expert_layer`]).
    layers: Mutex<Vec<Shared<dyn Adapter>>>,
}

impl StackedLora {
    /// Fresh factors for `param` (its key `key`, saved at PEFT's module path `wrapper_path`
    /// and as the `target_parameters` entry `entry`), created through `vb` at
    /// `wrapper_path`: A as `config.init` says, B zero.
    pub(crate) fn fresh(
        key: String,
        wrapper_path: String,
        entry: String,
        param: &StackedParameter,
        config: LoraConfig,
        vb: &VarBuilder<'static>,
    ) -> Result<Self> {
        config.validate(&key)?;
        let (out, inp) = param.out_in;
        let covered: usize = param.parts.iter().map(|p| p.range(out).1).sum();
        if param.experts == 0 || covered != out {
            return Err(Error::ShapeMismatch {
                layer: key,
                what: "stacked parameter (experts, parts' rows)".to_string(),
                expected: format!("at least one expert, parts covering {out} rows"),
                got: format!("{} experts, parts covering {covered} rows", param.experts),
            });
        }
        let vb = vb.pp(&wrapper_path);
        let (dtype, dev) = (param.dtype, &param.device);
        let mut a = Vec::with_capacity(param.experts);
        let mut b = Vec::with_capacity(param.experts);
        for e in 0..param.experts {
            let name = format!("{key}.{e}");
            let (init_a, _) = config.init_factors(&name, (inp, out), dtype, dev)?;
            a.push(trainable_var(&vb, &format!("lora_A.{e}"), &init_a)?);
            let mut parts = Vec::with_capacity(param.parts.len());
            for &part in &param.parts {
                let rows = part.range(out).1;
                let label = format!("{e}{}", part_suffix(part));
                let (_, init_b) =
                    config.init_factors(&format!("{key}.{label}"), (inp, rows), dtype, dev)?;
                parts.push(trainable_var(&vb, &format!("lora_B.{label}"), &init_b)?);
            }
            b.push(parts);
        }
        Ok(Self::assemble(
            key,
            wrapper_path,
            entry,
            config,
            param,
            a,
            b,
        ))
    }

    /// The LoRA a loaded adapter stores for `param` ([`ParameterLora`]: PEFT's factors,
    /// split per expert and part into variables in the model's dtype, which train like the
    /// adapter's other layers), at the file's module path.
    pub fn from_loaded(lora: &ParameterLora, param: &StackedParameter) -> Result<Self> {
        let got = (lora.experts(), lora.out_in());
        if got != (param.experts, param.out_in) {
            return Err(Error::ShapeMismatch {
                layer: lora.key().to_string(),
                what: "LoRA on the parameter (experts, (out, in) per expert)".to_string(),
                expected: format!("({}, {:?})", param.experts, param.out_in),
                got: format!("{got:?}"),
            });
        }
        let r = lora.rank();
        // The scale PEFT computed (alpha / r, or rsLoRA's alpha / √r) as alpha / r.
        let config = LoraConfig::new(r, lora.scaling() * r as f64);
        config.validate(lora.key())?;
        let var = |t: Tensor| -> Result<Var> {
            let t = t.to_dtype(param.dtype)?.to_device(&param.device)?;
            Ok(Var::from_tensor(&t.contiguous()?)?)
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for e in 0..param.experts {
            let mut parts = Vec::with_capacity(param.parts.len());
            for part in &param.parts {
                let (start, rows) = part.range(param.out_in.0);
                let (a_e, b_rows) = lora.expert_factors(e, start, rows)?;
                if parts.is_empty() {
                    a.push(var(a_e)?);
                }
                parts.push(var(b_rows)?);
            }
            b.push(parts);
        }
        let (key, wrapper) = (lora.key().to_string(), lora.wrapper_path().to_string());
        let entry = param.peft_entry.to_string();
        Ok(Self::assemble(key, wrapper, entry, config, param, a, b))
    }

    fn assemble(
        key: String,
        wrapper_path: String,
        entry: String,
        config: LoraConfig,
        param: &StackedParameter,
        a: Vec<Var>,
        b: Vec<Vec<Var>>,
    ) -> Self {
        Self {
            key,
            wrapper_path,
            entry,
            config,
            parts: param.parts.clone(),
            out_in: param.out_in,
            a,
            b,
            layers: Mutex::new(Vec::new()),
        }
    }

    /// The parameter's key (`model.layers.0.mlp.experts.gate_up_proj`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// PEFT's module path of its tensors (`model.layers.0.mlp.experts.base_layer` when a
    /// later parameter of the module is adapted too).
    pub fn wrapper_path(&self) -> &str {
        &self.wrapper_path
    }

    /// The `target_parameters` entry a saved config names it by (`gate_up_proj`).
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// The rank `r` of each expert's pair.
    pub fn rank(&self) -> usize {
        self.config.r
    }

    /// `lora_alpha`.
    pub fn alpha(&self) -> f64 {
        self.config.alpha
    }

    /// The scale `s` (`α / r`; rsLoRA: `α / √r`).
    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    /// The number of experts.
    pub fn experts(&self) -> usize {
        self.a.len()
    }

    /// Expert `e`'s layer for part `part` of its rows (an index into the parameter's
    /// [`StackedParameter::parts`]) over `base`, its frozen weight for those rows: a
    /// [`LoraLinear`] on `A_e` and that part of `B_e`, registered here so that the set
    /// trains, merges and enables it.
    pub fn expert_layer(
        &self,
        e: usize,
        part: usize,
        base: FrozenLinear,
    ) -> Result<Shared<dyn Adapter>> {
        let (Some(a), Some(b), Some(rows)) = (
            self.a.get(e),
            self.b.get(e).and_then(|parts| parts.get(part)),
            self.parts.get(part),
        ) else {
            return Err(Error::ShapeMismatch {
                layer: self.key.clone(),
                what: "expert and part of a stacked parameter".to_string(),
                expected: format!(
                    "an expert < {}, a part < {}",
                    self.a.len(),
                    self.parts.len()
                ),
                got: format!("expert {e}, part {part}"),
            });
        };
        let name = format!("{}.{e}{}", self.key, part_suffix(*rows));
        let pair = LowRankPair {
            a: Factor::Trainable(a.clone()),
            b: Factor::Trainable(b.clone()),
        };
        let layer = Shared::new(LoraLinear::from_weights(name, base, &self.config, pair)?).erase();
        self.layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(layer.clone());
        Ok(layer)
    }

    /// The experts' layers built so far.
    pub fn layers(&self) -> Vec<Shared<dyn Adapter>> {
        self.layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The trainable factors, named under [`StackedLora::wrapper_path`]: `lora_A.<e>`,
    /// `lora_B.<e>` (`lora_B.<e>.gate` and `….up` for the halves of a `gate_up_proj`).
    pub fn named_vars(&self) -> Vec<NamedVar> {
        let mut out = Vec::new();
        for (e, (a, parts)) in self.a.iter().zip(&self.b).enumerate() {
            out.push(NamedVar {
                name: format!("lora_A.{e}"),
                role: ParamRole::LowRankA,
                var: a.clone(),
            });
            for (b, &rows) in parts.iter().zip(&self.parts) {
                out.push(NamedVar {
                    name: format!("lora_B.{e}{}", part_suffix(rows)),
                    role: ParamRole::LowRankB,
                    var: b.clone(),
                });
            }
        }
        out
    }

    /// The scalars of the experts' frozen weights its layers hold.
    pub fn num_base_params(&self) -> usize {
        self.layers()
            .iter()
            .map(|l| l.read().num_base_params())
            .sum()
    }

    /// PEFT's tensors (`lora_A.weight` `(r · E, in)`, `lora_B.weight` `(out, r · E)`), to
    /// be saved under [`StackedLora::wrapper_path`].
    pub fn tensors_to_save(&self) -> Result<Vec<(String, Tensor)>> {
        let a: Vec<&Tensor> = self.a.iter().map(|v| v.as_tensor()).collect();
        let per_expert = self
            .b
            .iter()
            .map(|parts| {
                let parts: Vec<&Tensor> = parts.iter().map(|v| v.as_tensor()).collect();
                Ok(Tensor::cat(&parts, 0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        // (out, r, E): column j · E + e of the flattened (out, r · E) is B_e's column j.
        let b = Tensor::stack(&per_expert, 2)?;
        let (out, r) = (self.out_in.0, self.rank());
        let b = b.reshape((out, r * self.experts()))?;
        Ok(vec![
            ("lora_A.weight".to_string(), Tensor::cat(&a, 0)?.detach()),
            ("lora_B.weight".to_string(), b.detach()),
        ])
    }
}

/// The suffix naming a part of an expert's rows (`.gate`, `.up`; none for all of them).
fn part_suffix(rows: StackedRows) -> &'static str {
    match rows {
        StackedRows::All => "",
        StackedRows::Gate => ".gate",
        StackedRows::Up => ".up",
    }
}
