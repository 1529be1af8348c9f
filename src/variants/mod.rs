//! One module per variant.

pub mod adalora;
mod branch;
pub mod delta_lora;
pub mod lora;
pub mod lora_drop;
