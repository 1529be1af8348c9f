//! One module per variant.

pub mod dora;
mod dora_cache;
pub mod dora_norm;
pub mod lora;
pub mod lora_fa;
pub mod vera;
