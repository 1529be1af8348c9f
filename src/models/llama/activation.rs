//! [`GateActivation`]: the activation of the gated MLP's gate.

/// The activation of the MLP's gate: `act(gate_proj(x)) ⊙ up_proj(x)`.
///
/// ```
/// use lorakit::models::llama::{GateActivation, LlamaConfig};
/// # fn main() -> lorakit::Result<()> {
/// let config = LlamaConfig::from_json(r#"{"model_type": "gemma3_text", "vocab_size": 8,
///     "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
///     "num_attention_heads": 4, "head_dim": 4}"#)?;
/// assert_eq!(config.hidden_act, GateActivation::GeluTanh);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GateActivation {
    /// `silu` (`swish`): the Llama families.
    Silu,
    /// GELU's tanh approximation (`gelu_pytorch_tanh`, `gelu_new`): Gemma.
    GeluTanh,
}
