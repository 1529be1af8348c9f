//! One module per variant.

pub mod lora;
