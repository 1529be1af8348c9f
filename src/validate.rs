//! Argument checks shared by every layer, so each error reads the same everywhere.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Rank must be at least one.
pub(crate) fn rank(layer: &str, rank: usize) -> Result<()> {
    if rank == 0 {
        return Err(Error::InvalidRank {
            layer: layer.to_string(),
            rank,
        });
    }
    Ok(())
}

/// Alpha must be finite and strictly positive.
pub(crate) fn alpha(layer: &str, alpha: f64) -> Result<()> {
    if !alpha.is_finite() || alpha <= 0.0 {
        return Err(Error::InvalidAlpha {
            layer: layer.to_string(),
            alpha,
        });
    }
    Ok(())
}

/// Dropout probability must lie in `[0, 1)`.
pub(crate) fn dropout(layer: &str, p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::InvalidDropout {
            layer: layer.to_string(),
            dropout: p,
        });
    }
    Ok(())
}

/// The first of a model config's dropout fields (`None`: unset) outside `[0, 1)`, with
/// the message its error gives.
pub(crate) fn config_dropouts(
    fields: impl IntoIterator<Item = (&'static str, Option<f64>)>,
) -> Option<(&'static str, String)> {
    fields.into_iter().find_map(|(field, p)| {
        p.filter(|p| !(0.0..1.0).contains(p))
            .map(|p| (field, format!("must be in [0, 1), got {p}")))
    })
}

/// A device's name for messages (`cpu`, `cuda:0`, `metal:0`).
pub(crate) fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// `t` must have the given dtype and live on the given device.
pub(crate) fn dtype_device(
    layer: &str,
    what: &str,
    t: &Tensor,
    dtype: DType,
    device: &Device,
) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            layer: layer.to_string(),
            what: what.to_string(),
            expected: dtype,
            got: t.dtype(),
        });
    }
    if !t.device().same_device(device) {
        return Err(Error::DeviceMismatch {
            layer: layer.to_string(),
            what: what.to_string(),
            expected: device_name(device),
            got: device_name(t.device()),
        });
    }
    Ok(())
}

/// `t` must hold floating-point values (F16, BF16, F32 or F64): layers compute in float.
pub(crate) fn float_dtype(layer: &str, what: &str, t: &Tensor) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(Error::layer_config(
            layer.to_string(),
            "dtype",
            format!(
                "{what} must be a float tensor (F16, BF16, F32 or F64), got {:?}",
                t.dtype()
            ),
        ));
    }
    Ok(())
}

/// No dimension of `t` may be zero (a layer with no inputs or no outputs is a mistake).
pub(crate) fn nonzero_dims(layer: &str, what: &str, t: &Tensor) -> Result<()> {
    if t.dims().contains(&0) {
        return Err(Error::ShapeMismatch {
            layer: layer.to_string(),
            what: what.to_string(),
            expected: "every dimension ≥ 1".to_string(),
            got: format!("{:?}", t.dims()),
        });
    }
    Ok(())
}

/// A fresh tensor of `dims` must be addressable: its element count times 8 bytes (the f64
/// staging buffer of [`crate::init::SeededRng`]) must fit in `isize::MAX`. Larger requests
/// (a rank of 2⁶⁰) are mistakes that would otherwise panic on overflow. Sizes that fit but
/// exceed the machine's memory still fail in the allocator, as any allocation does.
pub(crate) fn alloc_size(
    layer: &str,
    field: &'static str,
    what: &str,
    dims: &[usize],
) -> Result<()> {
    let bytes = dims.iter().try_fold(8usize, |acc, &d| acc.checked_mul(d));
    if bytes.is_none_or(|b| b > isize::MAX as usize) {
        return Err(Error::layer_config(
            layer.to_string(),
            field,
            format!("{what} of shape {dims:?} is too large to allocate"),
        ));
    }
    Ok(())
}

/// `t` must have exactly `dims`.
pub(crate) fn shape(layer: &str, what: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::ShapeMismatch {
            layer: layer.to_string(),
            what: what.to_string(),
            expected: format!("{dims:?}"),
            got: format!("{:?}", t.dims()),
        });
    }
    Ok(())
}

/// An input to an embedding: integer token ids (U8, U32 or I64) of any shape, on the layer's
/// device, each in `0..vocab` (checked with two reductions: on a GPU, a sync).
pub(crate) fn token_ids(layer: &str, ids: &Tensor, vocab: usize, device: &Device) -> Result<()> {
    named_token_ids(layer, "input", ids, vocab, device)
}

/// [`token_ids`] with the input named `what` in errors (a model's `input_ids`).
pub(crate) fn named_token_ids(
    layer: &str,
    what: &'static str,
    ids: &Tensor,
    vocab: usize,
    device: &Device,
) -> Result<()> {
    if !matches!(ids.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Err(Error::layer_config(
            layer.to_string(),
            what,
            format!(
                "an embedding takes integer token ids (u8, u32 or i64), got {:?}",
                ids.dtype()
            ),
        ));
    }
    if !ids.device().same_device(device) {
        return Err(Error::DeviceMismatch {
            layer: layer.to_string(),
            what: what.to_string(),
            expected: device_name(device),
            got: device_name(ids.device()),
        });
    }
    if ids.elem_count() == 0 {
        return Ok(());
    }
    let wide = ids.flatten_all()?.to_dtype(DType::I64)?;
    let (lo, hi) = (
        wide.min_all()?.to_scalar::<i64>()?,
        wide.max_all()?.to_scalar::<i64>()?,
    );
    if lo < 0 || usize::try_from(hi).map_or(true, |h| h >= vocab) {
        let bad = if lo < 0 { lo } else { hi };
        return Err(Error::layer_config(
            layer.to_string(),
            what,
            format!("token index {bad} is out of range for an embedding of {vocab} rows"),
        ));
    }
    Ok(())
}

/// `base` must not be an embedding table: layer types other than [`crate::LoraEmbedding`]
/// adapt linear layers only.
pub(crate) fn not_embedding(layer: &str, base: &crate::FrozenLinear, variant: &str) -> Result<()> {
    if base.kind() == crate::BaseKind::Embedding {
        return Err(Error::layer_config(
            layer.to_string(),
            "base",
            format!(
                "`{layer}` is an embedding; a {variant} layer adapts linear layers (LoRA on an \
                 embedding is `LoraEmbedding`)"
            ),
        ));
    }
    Ok(())
}

/// An input to a linear layer: rank ≥ 1 with last dimension `d_in`, the layer's dtype and device.
pub(crate) fn linear_input(
    layer: &str,
    x: &Tensor,
    d_in: usize,
    dtype: DType,
    device: &Device,
) -> Result<()> {
    let last = x.dims().last().copied();
    if last != Some(d_in) {
        return Err(Error::ShapeMismatch {
            layer: layer.to_string(),
            what: "input".to_string(),
            expected: format!("[.., {d_in}]"),
            got: format!("{:?}", x.dims()),
        });
    }
    dtype_device(layer, "input", x, dtype, device)
}
