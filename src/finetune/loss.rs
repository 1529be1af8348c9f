//! The causal language-modelling loss with a per-token mask (prompt tokens and padding
//! masked out), from logits ([`causal_lm_loss_sum`]) or from hidden states and an output
//! head ([`linear_head_loss_sum`], which fuses a frozen head with the loss). The models
//! compute it too ([`CausalLm::loss_sum`]), so it lives in [`crate::models`]; this module
//! keeps its public path.
//!
//! [`CausalLm::loss_sum`]: crate::models::CausalLm::loss_sum

pub use crate::models::lm_loss::{
    causal_lm_loss_sum, causal_lm_loss_sum_composed, linear_head_loss_sum,
};
