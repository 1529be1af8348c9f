//! Rotary position embeddings: the frequencies (with `linear` / `llama3` / `yarn` /
//! `longrope` scaling, or llama.cpp's precomputed factors), computed as transformers computes them,
//! and the cos/sin tables a forward uses.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

use super::config::{LlamaConfig, RopeScaling};
use crate::models::padding;

impl LlamaConfig {
    /// RoPE's inverse frequencies, [`LlamaConfig::rotary_dim`]` / 2` of them (`head_dim / 2`
    /// but for a `partial_rotary_factor`), computed in f32 as transformers computes them
    /// (its `inv_freq` buffer), scaling included.
    ///
    /// ```
    /// use lorakit::models::llama::{LlamaConfig, RopeScaling};
    /// # fn main() -> lorakit::Result<()> {
    /// let mut config = LlamaConfig::from_json(r#"{"model_type": "llama", "vocab_size": 8,
    ///     "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1,
    ///     "num_attention_heads": 2}"#)?;
    /// let close = |got: Vec<f32>, want: [f32; 4]| {
    ///     got.iter().zip(want).all(|(g, w)| (g - w).abs() <= 1e-6 * w)
    /// };
    /// assert!(close(config.inv_freq(), [1.0, 0.1, 0.01, 0.001])); // θ = 10000, head_dim 8
    /// config.rope_scaling = RopeScaling::Linear { factor: 2.0 };
    /// assert!(close(config.inv_freq(), [0.5, 0.05, 0.005, 0.0005]));
    /// # Ok(()) }
    /// ```
    pub fn inv_freq(&self) -> Vec<f32> {
        self.inv_freq_for(0)
    }

    /// [`LlamaConfig::inv_freq`] for a forward whose positions end at `seq_len` (its last
    /// position + 1): only LongRoPE depends on it ([`super::LongRopeScaling`]).
    pub fn inv_freq_for(&self, seq_len: usize) -> Vec<f32> {
        let rotary_dim = self.rotary_dim();
        let powers = self.powers(self.rope_theta);
        let plain = powers.iter().map(|p| 1.0 / p);
        match self.rope_scaling {
            RopeScaling::None => plain.collect(),
            RopeScaling::Linear { factor } => plain.map(|f| f / factor as f32).collect(),
            RopeScaling::Factors(ref factors) => plain.zip(factors).map(|(f, d)| f / d).collect(),
            RopeScaling::Yarn(ref yarn) => yarn.inv_freq(&powers, rotary_dim, self.rope_theta),
            RopeScaling::LongRope(ref long) => long.inv_freq(&powers, seq_len),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                );
                let old_len = original_max_position_embeddings as f32;
                let (low_wavelen, high_wavelen) = (old_len / low, old_len / high);
                plain
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old_len / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// The dimensions at the start of each head that RoPE rotates:
    /// `int(head_dim · partial_rotary_factor)`, as transformers computes it; the whole head
    /// but for Phi-4-mini (factor 0.75), whose remaining dimensions pass unrotated.
    ///
    /// ```
    /// use lorakit::models::llama::LlamaConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let config = LlamaConfig::from_json(r#"{"model_type": "phi3", "vocab_size": 8,
    ///     "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
    ///     "num_attention_heads": 4, "partial_rotary_factor": 0.75}"#)?;
    /// assert_eq!((config.head_dim, config.rotary_dim()), (16, 12));
    /// assert_eq!(config.inv_freq().len(), 6);
    /// # Ok(()) }
    /// ```
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }

    /// The sliding-window layers' inverse frequencies when they have their own θ
    /// ([`LlamaConfig::sliding_rope_theta`]: Gemma 3's `rope_local_base_freq`, OLMo 3's
    /// sliding layers' θ): unscaled,
    /// [`LlamaConfig::rotary_dim`]` / 2` of them; `None` when they rotate as the others.
    ///
    /// ```
    /// use lorakit::models::llama::LlamaConfig;
    /// # fn main() -> lorakit::Result<()> {
    /// let config = LlamaConfig::from_json(r#"{"model_type": "gemma3_text", "vocab_size": 8,
    ///     "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 6,
    ///     "num_attention_heads": 4, "head_dim": 8}"#)?;
    /// // θ 1 000 000 on the full-attention layers, 10 000 on the sliding ones.
    /// assert_eq!(config.rope_theta, 1e6);
    /// let sliding = config.sliding_inv_freq().unwrap();
    /// assert!((sliding[1] - 0.1).abs() < 1e-7 && (config.inv_freq()[1] - 10f32.powf(-1.5)).abs() < 1e-7);
    /// # Ok(()) }
    /// ```
    pub fn sliding_inv_freq(&self) -> Option<Vec<f32>> {
        let theta = self.sliding_rope_theta?;
        Some(self.powers(theta).iter().map(|p| 1.0 / p).collect())
    }

    /// `θ^(2i/d)` for the `d = rotary_dim` rotated dimensions' pairs, in f32 as transformers
    /// computes them (RoPE's unscaled wavelengths over 2π).
    fn powers(&self, theta: f64) -> Vec<f32> {
        let rotary_dim = self.rotary_dim();
        let (dim, base) = (rotary_dim as f32, theta as f32);
        (0..rotary_dim / 2)
            .map(|i| base.powf((2 * i) as f32 / dim))
            .collect()
    }

    /// What RoPE's cos and sin tables are multiplied by: YaRN's and LongRoPE's
    /// `attention_factor`, 1 for every other scaling (transformers' `attention_scaling`).
    pub fn rope_attention_factor(&self) -> f32 {
        match self.rope_scaling {
            RopeScaling::Yarn(ref yarn) => yarn.attention_factor as f32,
            RopeScaling::LongRope(ref long) => long.attention_factor as f32,
            _ => 1.0,
        }
    }
}

/// RoPE's cos and sin for positions `offset..offset + len`, `(len, head_dim / 2)` in the
/// model's dtype (`(batch, len, head_dim / 2)` with each row's own positions for a
/// left-padded batch, see `models::padding`): angles `position · inv_freq` in f32, their
/// cos and sin times the config's [`LlamaConfig::rope_attention_factor`], as transformers
/// computes them.
#[derive(Clone, Debug)]
pub(crate) struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    pub(crate) fn new(
        inv_freq: &[f32],
        attention_factor: f32,
        offset: usize,
        len: usize,
        pads: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = inv_freq.len();
        let rows = pads.unwrap_or(&[0]);
        let angles: Vec<f32> = rows
            .iter()
            .flat_map(|&pad| {
                (offset..offset + len).flat_map(move |slot| {
                    let p = padding::position(slot, pad);
                    inv_freq.iter().map(move |f| p as f32 * f)
                })
            })
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos() * attention_factor).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin() * attention_factor).collect();
        let table = |v: Vec<f32>| -> Result<Tensor> {
            let t = match pads {
                Some(p) => Tensor::from_vec(v, (p.len(), len, half), &Device::Cpu)?,
                None => Tensor::from_vec(v, (len, half), &Device::Cpu)?,
            };
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        };
        Ok(Self {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }

    /// Whether each row has its own positions (a left-padded batch).
    fn per_row(&self) -> bool {
        self.cos.rank() == 3
    }

    /// The heads of a projection `x` `(batch, len, heads, head_dim)`, rotated:
    /// `(batch, heads, len, head_dim)` ([`crate::models::fused::rope_heads`]; per-row
    /// tables: the transpose and [`RopeTables::apply`]).
    ///
    /// Tables narrower than the heads (a `partial_rotary_factor`) rotate the first
    /// `2 · tables' width` dimensions of each head and pass the rest, as transformers'
    /// Phi-3 attention does.
    pub(crate) fn apply_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (head_dim, rotary_dim) = (x.dim(D::Minus1)?, 2 * self.cos.dim(D::Minus1)?);
        if rotary_dim < head_dim {
            let rotated = self.apply_heads(&x.narrow(D::Minus1, 0, rotary_dim)?)?;
            let passed = x
                .narrow(D::Minus1, rotary_dim, head_dim - rotary_dim)?
                .transpose(1, 2)?;
            return Ok(Tensor::cat(&[rotated, passed], D::Minus1)?.contiguous()?);
        }
        if self.per_row() {
            self.apply(&x.transpose(1, 2)?.contiguous()?)
        } else {
            crate::models::fused::rope_heads(x, &self.cos, &self.sin)
        }
    }

    /// Rotates `x` `(batch, heads, len, head_dim)` in transformers' layout (the two
    /// halves of a head are the pairs: `rotate_half`), i.e. candle-nn's `rope`, not
    /// `rope_i`. Per-row tables (batched generation) take candle-nn's fused kernel, which
    /// has no backward.
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() && !self.per_row() {
            Ok(candle_nn::rotary_emb::rope_slow(x, &self.cos, &self.sin)?)
        } else {
            Ok(candle_nn::rotary_emb::rope(
                &x.contiguous()?,
                &self.cos,
                &self.sin,
            )?)
        }
    }
}
