//! One module per variant.

pub mod lora;
pub mod delta_lora;
