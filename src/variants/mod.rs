//! One module per variant.

pub mod delta_lora;
pub mod lora;
