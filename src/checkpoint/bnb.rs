//! bitsandbytes 4-bit weights in a checkpoint (the Hub's `…-bnb-4bit` models, and what
//! transformers' `save_pretrained` writes for a model loaded with
//! `BitsAndBytesConfig(load_in_4bit=True)`): a module's `weight` stored as packed 4-bit
//! codes beside its `weight.absmax`, `weight.quant_map`, (`weight.nested_absmax`,
//! `weight.nested_quant_map`) and `weight.quant_state.bitsandbytes__nf4` / `__fp4` (the
//! layout: [`crate::quant::bnb`]).
//!
//! [`Checkpoint::load_bnb4`] reads one as a [`QuantizedWeight`] that keeps the blocks;
//! [`Checkpoint::var_builder`] and [`crate::peft::merge_checkpoint`] hand out the weight
//! dequantized (to the quant state's dtype) as bitsandbytes computes it.

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::Dtype;

use crate::checkpoint::source::Checkpoint;
use crate::error::{Error, Result};
use crate::quant::bnb::{Bnb4Blocks, Bnb4Params, Bnb4Type, StoredAbsmax};
use crate::quant::QuantizedWeight;

/// What a quant state's tensor name adds to its weight's: `<weight>.quant_state.bitsandbytes__<type>`.
const QUANT_STATE: &str = ".quant_state.bitsandbytes__";

/// The tensors beside a 4-bit weight `<weight>` that belong to it (`<weight>.<part>`).
const PARTS: [&str; 4] = ["absmax", "quant_map", "nested_absmax", "nested_quant_map"];

impl Checkpoint {
    /// The name of `name`'s quant state and its type, when the checkpoint stores the
    /// tensor `name` as bitsandbytes 4-bit.
    fn bnb4_state(&self, name: &str) -> Option<(String, Bnb4Type)> {
        [Bnb4Type::Nf4, Bnb4Type::Fp4].into_iter().find_map(|t| {
            let state = format!("{name}{QUANT_STATE}{}", t.name());
            self.contains(&state).then_some((state, t))
        })
    }

    /// Whether the checkpoint stores the tensor `name` (a module's `weight`) as bitsandbytes
    /// 4-bit blocks (it has `name.quant_state.bitsandbytes__nf4` or `__fp4`).
    ///
    /// ```
    /// use lorakit::checkpoint::Checkpoint;
    /// # fn main() -> lorakit::Result<()> {
    /// let ckpt = Checkpoint::open("tests/fixtures/bnb/nf4_dq/model")?;
    /// assert!(ckpt.is_bnb4("model.layers.0.self_attn.q_proj.weight"));
    /// assert!(!ckpt.is_bnb4("model.embed_tokens.weight"));
    /// assert!(ckpt.is_bnb4_part("model.layers.0.self_attn.q_proj.weight.absmax"));
    /// # Ok(()) }
    /// ```
    pub fn is_bnb4(&self, name: &str) -> bool {
        self.bnb4_state(name).is_some()
    }

    /// Whether the tensor `name` is one of the parts stored beside a bitsandbytes 4-bit
    /// weight (its block scales, code books or quant state), which the dequantized weight
    /// replaces.
    pub fn is_bnb4_part(&self, name: &str) -> bool {
        if let Some((weight, _)) = name.split_once(QUANT_STATE) {
            return self.contains(weight);
        }
        PARTS.iter().any(|part| {
            name.strip_suffix(part)
                .and_then(|w| w.strip_suffix('.'))
                .is_some_and(|w| self.is_bnb4(w))
        })
    }

    /// Whether any tensor is stored as bitsandbytes 4-bit blocks.
    ///
    /// ```
    /// use lorakit::checkpoint::Checkpoint;
    /// # fn main() -> lorakit::Result<()> {
    /// assert!(Checkpoint::open("tests/fixtures/bnb/fp4_f16/model")?.has_bnb4());
    /// assert!(!Checkpoint::open("tests/fixtures/checkpoints/llama_f32_single")?.has_bnb4());
    /// # Ok(()) }
    /// ```
    pub fn has_bnb4(&self) -> bool {
        self.tensors().any(|(_, t)| t.name.contains(QUANT_STATE))
    }

    /// Reads the quant state of every bitsandbytes 4-bit tensor: the first that does not
    /// parse is an error naming it (before a merge writes anything).
    pub(crate) fn check_bnb4_states(&self) -> Result<()> {
        for (_, t) in self.tensors() {
            if let Some(weight) = t.name.split_once(QUANT_STATE).map(|(w, _)| w) {
                self.bnb4_params(weight)?;
            }
        }
        Ok(())
    }

    /// The settings of the bitsandbytes 4-bit tensor `name` (from its quant state).
    ///
    /// ```
    /// use candle_core::DType;
    /// use lorakit::checkpoint::Checkpoint;
    /// use lorakit::quant::Bnb4Type;
    /// # fn main() -> lorakit::Result<()> {
    /// let ckpt = Checkpoint::open("tests/fixtures/bnb/nf4_dq/model")?;
    /// let p = ckpt.bnb4_params("model.layers.0.mlp.down_proj.weight")?;
    /// assert_eq!((p.quant_type, p.dtype, p.shape), (Bnb4Type::Nf4, DType::BF16, (128, 256)));
    /// assert!(p.nested.is_some());
    /// assert!(ckpt.bnb4_params("model.embed_tokens.weight").is_err());
    /// # Ok(()) }
    /// ```
    pub fn bnb4_params(&self, name: &str) -> Result<Bnb4Params> {
        let Some((state, quant_type)) = self.bnb4_state(name) else {
            return Err(self.bnb4_error(name, "it is not stored as bitsandbytes 4-bit blocks"));
        };
        let params = Bnb4Params::parse(&self.raw_bytes(&state)?)
            .map_err(|why| self.bnb4_error(name, &format!("`{state}`: {why}")))?;
        if params.quant_type != quant_type {
            return Err(self.bnb4_error(
                name,
                &format!("`{state}` says quant_type {}", params.quant_type.name()),
            ));
        }
        Ok(params)
    }

    /// Reads the bitsandbytes 4-bit tensor `name` (`<module>.weight`) as a
    /// [`QuantizedWeight`] that keeps its blocks (about 4.5 bits a value; CPU). Errors name
    /// the tensor and the file: a part missing or of the wrong dtype or size, a quant state
    /// that does not parse, a `quant_map` other than bitsandbytes' code book, a
    /// non-finite block scale.
    ///
    /// ```
    /// use lorakit::checkpoint::Checkpoint;
    /// use lorakit::quant::{Bnb4Type, QuantFormat};
    /// # fn main() -> lorakit::Result<()> {
    /// let ckpt = Checkpoint::open("tests/fixtures/bnb/nf4_dq/model")?;
    /// let w = ckpt.load_bnb4("model.layers.0.mlp.up_proj.weight")?;
    /// assert_eq!((w.d_out(), w.d_in(), w.format()), (256, 128, QuantFormat::Bnb4(Bnb4Type::Nf4)));
    /// assert!(w.storage_bytes() < 256 * 128); // under a byte a value
    /// let values = w.dequantize()?; // f32 holding the bf16 values bitsandbytes gives
    /// assert_eq!(values.dims(), [256, 128]);
    /// # Ok(()) }
    /// ```
    pub fn load_bnb4(&self, name: &str) -> Result<QuantizedWeight> {
        let params = self.bnb4_params(name)?;
        let code = self.f32_part(name, "quant_map")?;
        let expected = params.quant_type.code();
        if code.len() != 16
            || code
                .iter()
                .zip(expected)
                .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(self.bnb4_error(
                name,
                &format!(
                    "`{name}.quant_map` is not bitsandbytes' {} code book (which its kernels use)",
                    params.quant_type.name()
                ),
            ));
        }
        let absmax_name = format!("{name}.absmax");
        let absmax = match self.get(&absmax_name).map(|(_, t)| t.dtype) {
            Some(Dtype::F32) => StoredAbsmax::Plain(self.f32_part(name, "absmax")?),
            Some(Dtype::U8) if params.nested.is_some() => StoredAbsmax::Nested {
                codes: self.raw_bytes(&absmax_name)?,
                scales: self.f32_part(name, "nested_absmax")?,
                code: self.f32_part(name, "nested_quant_map")?,
            },
            Some(other) => {
                return Err(self.bnb4_error(
                    name,
                    &format!(
                        "`{absmax_name}` is {other:?}: expected F32 (or U8 with the quant \
                         state's nested settings)"
                    ),
                ))
            }
            None => return Err(self.bnb4_error(name, &format!("`{absmax_name}` is missing"))),
        };
        let blocks = Bnb4Blocks::new(params, self.raw_bytes(name)?, absmax)
            .map_err(|why| self.bnb4_error(name, &why))?;
        Ok(QuantizedWeight::from_bnb4(blocks))
    }

    /// The bitsandbytes 4-bit tensor `name` dequantized as bitsandbytes does, in the quant
    /// state's dtype (on the CPU).
    ///
    /// ```
    /// use candle_core::DType;
    /// use lorakit::checkpoint::Checkpoint;
    /// # fn main() -> lorakit::Result<()> {
    /// let ckpt = Checkpoint::open("tests/fixtures/bnb/fp4_f16/model")?;
    /// let w = ckpt.load_bnb4_dequantized("model.layers.0.self_attn.q_proj.weight")?;
    /// assert_eq!((w.dims(), w.dtype()), (&[96, 96][..], DType::F16));
    /// # Ok(()) }
    /// ```
    pub fn load_bnb4_dequantized(&self, name: &str) -> Result<Tensor> {
        let w = self.load_bnb4(name)?;
        let dtype = w.bnb4_params().map_or(DType::F32, |p| p.dtype);
        w.dequantize_to(&Device::Cpu, dtype)
    }

    /// The shape and dtype of the tensor `name` as a float tensor: as stored, or for
    /// bitsandbytes 4-bit blocks, those of the weight they dequantize to (its quant state's
    /// shape and dtype). `None` when the checkpoint has no `name`.
    ///
    /// ```
    /// use lorakit::checkpoint::Checkpoint;
    /// use safetensors::Dtype;
    /// # fn main() -> lorakit::Result<()> {
    /// let ckpt = Checkpoint::open("tests/fixtures/bnb/nf4_dq/model")?;
    /// let q = "model.layers.0.self_attn.q_proj.weight";
    /// assert_eq!(ckpt.get(q).map(|(_, t)| t.dtype), Some(Dtype::U8)); // packed codes
    /// assert_eq!(ckpt.float_view(q), Some((vec![128, 128], Dtype::BF16)));
    /// # Ok(()) }
    /// ```
    pub fn float_view(&self, name: &str) -> Option<(Vec<usize>, Dtype)> {
        let (_, stored) = self.get(name)?;
        let dequantized = match self.is_bnb4(name) {
            true => self.bnb4_params(name).ok(),
            false => None,
        };
        Some(match dequantized {
            Some(p) => (vec![p.shape.0, p.shape.1], stored_dtype(p.dtype)),
            None => (stored.shape.clone(), stored.dtype),
        })
    }

    /// The stored bytes of the tensor `name`.
    fn raw_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let (shard, tensor) = self.get(name).ok_or_else(|| Error::MissingKey {
            key: name.to_string(),
            file: self.path().display().to_string(),
        })?;
        shard.read_tensor_bytes(tensor)
    }

    /// The f32 values of `<weight>.<part>`.
    fn f32_part(&self, weight: &str, part: &str) -> Result<Vec<f32>> {
        let name = format!("{weight}.{part}");
        match self.get(&name).map(|(_, t)| t.dtype) {
            Some(Dtype::F32) => Ok(self.load(&name, &Device::Cpu)?.flatten_all()?.to_vec1()?),
            Some(other) => {
                Err(self.bnb4_error(weight, &format!("`{name}` is {other:?}, expected F32")))
            }
            None => Err(self.bnb4_error(weight, &format!("`{name}` is missing"))),
        }
    }

    /// An error naming the 4-bit tensor `name`, the file and `why`.
    fn bnb4_error(&self, name: &str, why: &str) -> Error {
        let file = self
            .get(name)
            .map_or(self.path(), |(s, _)| s.path.as_path());
        Error::checkpoint(file, format!("bitsandbytes 4-bit tensor `{name}`: {why}"))
    }
}

/// The safetensors dtype of a float `dtype` bitsandbytes dequantizes to.
fn stored_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        _ => Dtype::F32,
    }
}
