//! What the models' fused CPU ops (`swiglu`, `rms_norm`, `rope_op`) share: reading an
//! input as a contiguous f32 slice.

use candle_core::{CpuStorage, Layout, WithDType};

/// The contiguous f32 elements of an op input; `op` names the op in the error.
pub(crate) fn f32_input<'a>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let data = f32::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets().and_then(|(a, b)| data.get(a..b)) {
        Some(d) => Ok(d),
        None => candle_core::bail!("{op}: inputs must be contiguous f32"),
    }
}
