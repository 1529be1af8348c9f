//! One module per variant.

pub mod adalora;
mod branch;
pub mod delta_lora;
pub mod dora;
mod dora_cache;
pub mod dora_norm;
pub mod lora;
pub mod lora_drop;
pub mod lora_fa;
pub mod vera;
