//! Where a Llama-family decoder layer puts its RMSNorms ([`NormPlacement`]) and how it
//! normalizes queries and keys ([`QkNorm`]).

/// Where each decoder layer normalizes.
///
/// ```
/// use lorakit::models::llama::{LlamaConfig, NormPlacement};
/// # fn main() -> lorakit::Result<()> {
/// let gemma2 = LlamaConfig::from_file("tests/fixtures/models/llama/gemma2/base")?;
/// assert_eq!(gemma2.norm_placement, NormPlacement::Sandwich);
/// let olmo2 = LlamaConfig::from_file("tests/fixtures/models/llama/olmo2/base")?;
/// assert_eq!(olmo2.norm_placement, NormPlacement::Post);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum NormPlacement {
    /// Before each branch (Llama): `input_layernorm` before attention,
    /// `post_attention_layernorm` before the MLP.
    #[default]
    Pre,
    /// Before and after each branch (Gemma 2 and 3): `input_layernorm` and
    /// `post_attention_layernorm` around attention, `pre_feedforward_layernorm` and
    /// `post_feedforward_layernorm` around the MLP, each output normalized before its
    /// residual add.
    Sandwich,
    /// After each branch only (OLMo 2 and 3): `post_attention_layernorm` on the attention's
    /// output, `post_feedforward_layernorm` on the MLP's, each before its residual add; the
    /// branches read the residual stream as it is.
    Post,
}

/// How queries and keys are normalized before RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum QkNorm {
    /// Not at all.
    #[default]
    None,
    /// RMSNorm over each head's `head_dim` values, one weight shared by the heads (Qwen3's
    /// and Gemma 3's `q_norm`, `k_norm`).
    PerHead,
    /// RMSNorm over the whole projection (`heads · head_dim` values) before it is split into
    /// heads (OLMo 2's and 3's `q_norm`, `k_norm`).
    Whole,
}
