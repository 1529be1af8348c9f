//! LoRA on an embedding table (PEFT's `lora.Embedding`): `y = E[ids] + s · (Aᵀ[ids]) Bᵀ`.
//!
//! The table `E` (`vocab × dim`) is the base's weight in its stored layout (a
//! [`BaseKind::Embedding`] [`FrozenLinear`], `d_in = vocab`, `d_out = dim`), so ΔW is LoRA's
//! `s · B A` (`dim × vocab`) and a merge adds `s · (B A)ᵀ` to `E`, as PEFT does. PEFT names
//! the factors `lora_embedding_A` (`r × vocab`) and `lora_embedding_B` (`dim × r`) and applies
//! no dropout on embeddings.

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapter::{Adapter, NamedVar, ParamRole, Variant};
use crate::error::{Error, Result};
use crate::frozen::{lookup_rows, BaseKind, FrozenLinear};
use crate::init::{LoraInit, SeededRng};
use crate::low_rank::{trainable_var, Factor, LowRankPair};
use crate::validate;
use crate::variants::lora::{delegate_to_lora, LoraLinear};
use crate::variants::lora_config::LoraConfig;

/// PEFT's name of the embedding adapter's A, `(r, vocab)`.
pub const EMBEDDING_A: &str = "lora_embedding_A";
/// PEFT's name of the embedding adapter's B, `(dim, r)`.
pub const EMBEDDING_B: &str = "lora_embedding_B";

/// A frozen embedding table with a LoRA adapter.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraEmbedding};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let table = FrozenLinear::embedding(Tensor::randn(0f32, 1., (50, 8), &dev)?)?;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let layer = LoraEmbedding::new(table.clone(), &LoraConfig::new(4, 8.0), vb.pp("wte"))?;
/// let ids = Tensor::new(&[[3u32, 7, 49]], &dev)?;
/// // B starts at zero: the adapted table equals the base.
/// let diff = (layer.forward(&ids)? - table.forward(&ids)?)?.abs()?.sum_all()?;
/// assert_eq!(diff.to_scalar::<f32>()?, 0.0);
/// assert_eq!(layer.num_trainable_params(), 4 * 50 + 8 * 4);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LoraEmbedding {
    /// The table, the pair and the scale (ΔW, merges, rank and scale are LoRA's); only the
    /// forward over token ids and PEFT's names are the embedding's own.
    lora: LoraLinear,
}

impl LoraEmbedding {
    /// A fresh adapter over the embedding `base`: A `(r, vocab)` and B `(dim, r)`
    /// initialised as PEFT initialises embeddings (A zero and B standard normal, so the
    /// adapter starts as the identity; both random with [`LoraInit::BothRandom`]), created
    /// through `vb` as `lora_embedding_A` / `lora_embedding_B`. Dropout does not apply to
    /// embeddings (PEFT's neither); `lora_bias` is refused.
    pub fn new(base: FrozenLinear, config: &LoraConfig, vb: VarBuilder) -> Result<Self> {
        let name = vb.prefix();
        check_embedding(&name, &base, config)?;
        let (a, b) = init_embedding_pair(&name, &base, config)?;
        let pair = LowRankPair {
            a: Factor::Trainable(trainable_var(&vb, EMBEDDING_A, &a)?),
            b: Factor::Trainable(trainable_var(&vb, EMBEDDING_B, &b)?),
        };
        Self::from_weights(name, base, config, pair)
    }

    /// The adapter `name` from an existing pair (loaded tensors): A `(r, vocab)`, B
    /// `(dim, r)`, `config.r` their rank.
    pub fn from_weights(
        name: impl Into<String>,
        base: FrozenLinear,
        config: &LoraConfig,
        pair: LowRankPair,
    ) -> Result<Self> {
        let name = name.into();
        check_embedding(&name, &base, config)?;
        Ok(Self {
            lora: LoraLinear::over_any_base(name, base, config, pair)?,
        })
    }

    /// The factors: A `(r, vocab)`, B `(dim, r)`.
    pub fn pair(&self) -> &LowRankPair {
        self.lora.pair()
    }

    /// The scale `s`.
    pub fn scale(&self) -> f64 {
        self.lora.scale()
    }
}

/// PEFT's embedding init: A `(r, vocab)` zero and B `(dim, r)` standard normal; both random
/// (A normal too) for [`LoraInit::BothRandom`].
fn init_embedding_pair(
    name: &str,
    base: &FrozenLinear,
    config: &LoraConfig,
) -> Result<(Tensor, Tensor)> {
    let (vocab, dim, r) = (base.d_in(), base.d_out(), config.r);
    validate::alloc_size(name, "r", EMBEDDING_A, &[r, vocab])?;
    validate::alloc_size(name, "r", EMBEDDING_B, &[dim, r])?;
    let (dtype, dev) = (base.dtype(), base.device());
    let mut rng = SeededRng::for_layer(config.seed, name);
    let a = match config.init {
        LoraInit::BothRandom => rng.normal((r, vocab), 0.0, 1.0, dtype, dev)?,
        LoraInit::Default | LoraInit::Gaussian => Tensor::zeros((r, vocab), dtype, dev)?,
    };
    let b = rng.normal((dim, r), 0.0, 1.0, dtype, dev)?;
    Ok((a, b))
}

/// The base must be an embedding, and the config must not ask for what embeddings lack.
fn check_embedding(name: &str, base: &FrozenLinear, config: &LoraConfig) -> Result<()> {
    if base.kind() != BaseKind::Embedding {
        return Err(Error::layer_config(
            name,
            "base",
            format!(
                "LoraEmbedding needs an embedding base, got a {} layer",
                base.kind().name()
            ),
        ));
    }
    if config.lora_bias {
        return Err(Error::layer_config(
            name,
            "lora_bias",
            "lora_bias is not supported on embeddings (PEFT refuses it too)",
        ));
    }
    config.validate(name)
}

impl Adapter for LoraEmbedding {
    delegate_to_lora!(lora);

    fn kind(&self) -> Variant {
        Variant::Lora
    }

    fn forward_adapted(&self, ids: &Tensor, _train: bool) -> Result<Tensor> {
        let table = self.base().stored_weight()?;
        let compute = crate::kernels::compute_dtype(table.dtype(), table.device());
        let y = lookup_rows(&table, ids)?;
        // A's columns at the ids (Aᵀ's rows, read from A as stored): (n, r), then times Bᵀ.
        let pair = self.lora.pair();
        let a = pair.a.tensor().to_dtype(compute)?;
        let b = pair.b.tensor().to_dtype(compute)?;
        let after_a = a
            .index_select(&ids.flatten_all()?.to_dtype(candle_core::DType::U32)?, 1)?
            .t()?;
        let low = (crate::matmul::matmul(&after_a, &b.t()?)? * self.lora.scale())?;
        let low = low.reshape(y.dims())?.to_dtype(y.dtype())?;
        Ok((y + low)?)
    }

    fn own_vars(&self) -> Vec<NamedVar> {
        let pair = self.lora.pair();
        [(EMBEDDING_A, &pair.a), (EMBEDDING_B, &pair.b)]
            .into_iter()
            .filter_map(|(name, f)| {
                f.var().map(|v| NamedVar {
                    name: name.to_string(),
                    role: ParamRole::Embedding,
                    var: v.clone(),
                })
            })
            .collect()
    }

    fn own_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let pair = self.lora.pair();
        Ok(vec![
            (EMBEDDING_A.to_string(), pair.a.tensor().clone()),
            (EMBEDDING_B.to_string(), pair.b.tensor().clone()),
        ])
    }
}

crate::impl_module_for_adapter!(LoraEmbedding);

/// The pair `lora_embedding_A` `(r, vocab)`, `lora_embedding_B` `(dim, r)` of a module in an
/// adapter file.
pub(crate) fn load_embedding_pair(
    config: &LoraConfig,
    base: &FrozenLinear,
    source: &dyn crate::variants::build::TensorSource,
) -> Result<LowRankPair> {
    let a = source.layer_tensor(EMBEDDING_A, &[config.r, base.d_in()])?;
    let b = source.layer_tensor(EMBEDDING_B, &[base.d_out(), config.r])?;
    Ok(LowRankPair {
        a: Factor::Trainable(Var::from_tensor(&a)?),
        b: Factor::Trainable(Var::from_tensor(&b)?),
    })
}
