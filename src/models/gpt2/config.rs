//! [`Gpt2Config`]: the fields of transformers' `GPT2Config` GPT-2 is built from, and the
//! activations it accepts.

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, Scope};

/// The activations transformers maps for `activation_function` that GPT-2 accepts here:
/// the GELU family.
const ACTIVATIONS: &str = "gelu_new, gelu, gelu_python, gelu_fast, gelu_pytorch_tanh, \
                           gelu_python_tanh, gelu_accurate, gelu_10, quick_gelu";

/// The fields of transformers' `GPT2Config` that the model uses, with transformers'
/// defaults (GPT-2 small); `config.json`'s other fields (token ids, summary options) are
/// ignored. The dropouts apply only in training mode
/// ([`Gpt2LmHeadModel::forward_t`](super::Gpt2LmHeadModel::forward_t)). transformers'
/// aliases `hidden_size`, `max_position_embeddings`, `num_hidden_layers` and
/// `num_attention_heads` are read too.
///
/// ```
/// use lorakit::models::gpt2::Gpt2Config;
/// # fn main() -> lorakit::Result<()> {
/// let config = Gpt2Config::from_file("tests/fixtures/peft_options/gpt2_lora/base/config.json")?;
/// assert_eq!((config.vocab_size, config.n_embd, config.n_layer, config.n_head), (64, 16, 2, 2));
/// assert_eq!(config.inner_dim(), 64); // n_inner: null → 4 · n_embd
/// assert_eq!(Gpt2Config::default().n_positions, 1024);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gpt2Config {
    /// Vocabulary size (rows of `wte`).
    pub vocab_size: usize,
    /// Longest sequence (rows of `wpe`).
    #[serde(alias = "max_position_embeddings")]
    pub n_positions: usize,
    /// Hidden size.
    #[serde(alias = "hidden_size")]
    pub n_embd: usize,
    /// Number of blocks.
    #[serde(alias = "num_hidden_layers")]
    pub n_layer: usize,
    /// Attention heads; must divide `n_embd`.
    #[serde(alias = "num_attention_heads")]
    pub n_head: usize,
    /// MLP width; `None` is `4 · n_embd`.
    pub n_inner: Option<usize>,
    /// transformers' activation name: `gelu_new` (GPT-2's tanh approximation) or another
    /// of the GELU family transformers maps (`gelu`, `gelu_python`, `gelu_fast`,
    /// `gelu_pytorch_tanh`, `gelu_python_tanh`, `gelu_accurate`, `gelu_10`,
    /// `quick_gelu`); others are refused by name.
    pub activation_function: String,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Scale attention scores by `1/sqrt(head_dim)`.
    pub scale_attn_weights: bool,
    /// Also scale block `N`'s attention scores by `1/(N + 1)`.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// transformers' eager "reorder and upcast": scores and softmax in f32, whatever the
    /// model's dtype (the same numbers as the default path for f32 models).
    pub reorder_and_upcast_attn: bool,
    /// The output head is `wte`'s table (the GPT-2 checkpoints); `false` loads `lm_head`.
    pub tie_word_embeddings: bool,
    /// Cross-attention blocks (encoder-decoder use): refused when `true`.
    pub add_cross_attention: bool,
    /// Dropout on the sum of the token and position embeddings (training only).
    pub embd_pdrop: f64,
    /// Dropout on the attention probabilities (training only).
    pub attn_pdrop: f64,
    /// Dropout on each block's attention and MLP outputs before they are added to the
    /// residual stream (training only).
    pub resid_pdrop: f64,
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Self {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: "gelu_new".to_string(),
            layer_norm_epsilon: 1e-5,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            tie_word_embeddings: true,
            add_cross_attention: false,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            resid_pdrop: 0.1,
        }
    }
}

impl Gpt2Config {
    /// Reads a transformers `config.json` and checks it ([`Gpt2Config::validate`]); errors
    /// name the file.
    ///
    /// ```
    /// use lorakit::models::gpt2::Gpt2Config;
    /// # fn main() -> lorakit::Result<()> {
    /// let config = Gpt2Config::from_file("tests/fixtures/peft_options/gpt2_dora/base/config.json")?;
    /// assert_eq!(config.activation_function, "gelu_new");
    /// assert!(Gpt2Config::from_file("no/such/config.json").is_err());
    /// # Ok(()) }
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::error::read_text(path)?;
        let config: Self = crate::error::parse_json(&text, path)?;
        config.check(&Scope::File(path.to_path_buf()))?;
        Ok(config)
    }

    /// Checks that the model can be built: sizes at least 1 (`n_layer` may be 0), `n_head`
    /// dividing `n_embd`, a finite epsilon ≥ 0, dropouts in `[0, 1)`, a supported
    /// activation, no cross-attention.
    ///
    /// ```
    /// use lorakit::models::gpt2::Gpt2Config;
    /// let bad = Gpt2Config { activation_function: "relu".into(), ..Gpt2Config::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("relu"));
    /// let bad = Gpt2Config { n_head: 5, ..Gpt2Config::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("n_head"));
    /// let bad = Gpt2Config { attn_pdrop: 1.0, ..Gpt2Config::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("attn_pdrop"));
    /// assert!(Gpt2Config::default().validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.check(&Scope::Settings("GPT-2 config".to_string()))
    }

    /// The MLP width: `n_inner`, or `4 · n_embd` when it is `None` (as transformers).
    ///
    /// ```
    /// use lorakit::models::gpt2::Gpt2Config;
    /// assert_eq!(Gpt2Config::default().inner_dim(), 3072);
    /// assert_eq!(Gpt2Config { n_inner: Some(100), ..Gpt2Config::default() }.inner_dim(), 100);
    /// ```
    pub fn inner_dim(&self) -> usize {
        self.n_inner
            .unwrap_or_else(|| self.n_embd.saturating_mul(4))
    }

    /// The `(d_in, d_out)` shapes of the model's adaptable linear maps: the attention's
    /// `c_attn` and `c_proj`, the MLP's `c_fc` and `c_proj`, and the output head (what
    /// VeRA's shared pair must cover; [`AdapterRecipe::plan`](crate::finetune::AdapterRecipe::plan)
    /// takes them).
    ///
    /// ```
    /// use lorakit::models::gpt2::Gpt2Config;
    /// let config = Gpt2Config::default();
    /// assert!(config.linear_shapes().contains(&(768, 3 * 768))); // c_attn
    /// assert!(config.linear_shapes().contains(&(3072, 768))); // mlp.c_proj
    /// ```
    pub fn linear_shapes(&self) -> Vec<(usize, usize)> {
        let (d, f) = (self.n_embd, self.inner_dim());
        vec![
            (d, d.saturating_mul(3)),
            (d, d),
            (d, f),
            (f, d),
            (d, self.vocab_size),
        ]
    }

    /// [`Gpt2Config::validate`] with errors in `scope`.
    fn check(&self, scope: &Scope) -> Result<()> {
        let invalid = |field: &'static str, reason: String| Error::InvalidConfig {
            scope: scope.clone(),
            field,
            reason,
        };
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return Err(invalid(field, "must be at least 1, got 0".to_string()));
            }
        }
        if self.n_inner == Some(0) {
            return Err(invalid(
                "n_inner",
                "must be at least 1 (or null)".to_string(),
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(invalid(
                "n_head",
                format!(
                    "must divide n_embd = {}, got {} heads",
                    self.n_embd, self.n_head
                ),
            ));
        }
        if u32::try_from(self.vocab_size).is_err() || u32::try_from(self.n_positions).is_err() {
            return Err(invalid(
                "vocab_size",
                "vocab_size and n_positions must fit in u32 (ids are read as u32)".to_string(),
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon >= 0.0) {
            return Err(invalid(
                "layer_norm_epsilon",
                format!("must be finite and ≥ 0, got {}", self.layer_norm_epsilon),
            ));
        }
        let dropouts = [
            ("embd_pdrop", Some(self.embd_pdrop)),
            ("attn_pdrop", Some(self.attn_pdrop)),
            ("resid_pdrop", Some(self.resid_pdrop)),
        ];
        if let Some((field, reason)) = crate::validate::config_dropouts(dropouts) {
            return Err(invalid(field, reason));
        }
        self.activation()?;
        if self.add_cross_attention {
            return Err(Error::Unsupported {
                what: "GPT-2 option",
                got: "add_cross_attention = true".to_string(),
                supported: "add_cross_attention = false (decoder-only GPT-2; cross-attention \
                            blocks are not built)"
                    .to_string(),
            });
        }
        Ok(())
    }

    /// The activation named by `activation_function`.
    pub(super) fn activation(&self) -> Result<Activation> {
        Activation::from_name(&self.activation_function).ok_or_else(|| Error::Unsupported {
            what: "GPT-2 activation_function",
            got: self.activation_function.clone(),
            supported: ACTIVATIONS.to_string(),
        })
    }
}

/// The MLP activation (transformers' `ACT2FN` entries of the GELU family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Activation {
    /// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`: gelu_new, gelu_fast,
    /// gelu_pytorch_tanh, gelu_python_tanh, gelu_accurate.
    GeluTanh,
    /// `x Φ(x)` with erf: gelu, gelu_python.
    GeluErf,
    /// `clip(x Φ(x), -10, 10)`: gelu_10.
    GeluErfClip10,
    /// `x σ(1.702 x)`: quick_gelu.
    QuickGelu,
}

impl Activation {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" | "gelu_python_tanh"
            | "gelu_accurate" => Self::GeluTanh,
            "gelu" | "gelu_python" => Self::GeluErf,
            "gelu_10" => Self::GeluErfClip10,
            "quick_gelu" => Self::QuickGelu,
            _ => return None,
        })
    }

    pub(super) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluTanh => crate::models::gelu::gelu_tanh(x),
            Self::GeluErf => crate::models::gelu::gelu_erf(x),
            Self::GeluErfClip10 => crate::models::gelu::gelu_erf(x)?.clamp(-10f32, 10f32),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}
