//! MXFP4-packed weights as GPT-OSS checkpoints store their experts (openai/gpt-oss-20b's
//! `model.layers.N.mlp.experts.gate_up_proj_blocks` and `..._scales`), dequantized exactly
//! as transformers does when it loads such a model with `Mxfp4Config(dequantize=True)`
//! (`convert_moe_packed_tensors` in `transformers/integrations/mxfp4.py`, 5.25).
//!
//! A parameter `X` of shape `[E, K, R]` is stored as two `u8` tensors:
//!
//! * `X_blocks`, `[E, R, G, B]` (`B = 16` bytes, `G = K / 32` groups): each byte holds two
//!   FP4 (e2m1) codes, the low nibble first: byte `b` of group `g` gives the values at
//!   `k = g·2B + 2b` (low nibble) and `k + 1` (high nibble);
//! * `X_scales`, `[E, R, G]`: one shared exponent per group, biased by [`SCALE_BIAS`].
//!
//! The value at `[e, k, r]` is `FP4_E2M1_VALUES[code] · 2^(scale − 127)`: transformers
//! dequantizes row by row to `[E, R, K]` and transposes the last two dims to the
//! parameter's layout `[E, K, R]` (`GptOssExperts.gate_up_proj` is `[E, H, 2I]`, stored as
//! `[E, 2I, H/32, 16]`; `down_proj` is `[E, I, H]`, stored as `[E, H, I/32, 16]`).
//!
//! **Rounding, as transformers does it.** transformers dequantizes into the dtype of the
//! parameter it loads into (the model's dtype: bf16 for gpt-oss's `"auto"`): its lookup
//! table is built in that dtype and `torch.ldexp(value, scale − 127, out=...)` writes the
//! product into it. torch's eager `ldexp` (CPU, torch 2.15) is exact before that one
//! rounding (`0 · 2^128` is `0`, `0.5 · 2^128` is `2^127`, no NaN for any scale; its
//! `self * pow(2, other)` decomposition would differ only at the extreme scales, which real
//! checkpoints do not use). Every product `e2m1 · 2^k` that is finite in f32 is exact
//! there, so f32 values rounded to bf16 or f16 give transformers' bf16 or f16 results bit
//! for bit; only f64 keeps the products f32 overflows (`|v| · 2^(s−127) ≥ 2^128`, scales
//! 253..255), hence [`dequantize_mxfp4_f64`]. Subnormal products (scales 0 and 1) stay
//! exact in f32 and bf16 (in f16 they round to zero, as torch rounds them).
//!
//! [`Checkpoint::load_mxfp4`] reads a packed tensor from a checkpoint; a
//! [`Checkpoint::var_builder`] hands `X` to a model that asks for it when the checkpoint
//! holds `X_blocks` and `X_scales` instead (see [`Checkpoint::is_mxfp4`]).

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use safetensors::tensor::Dtype;

use crate::checkpoint::header::StoredTensor;
use crate::checkpoint::source::{Checkpoint, Shard};
use crate::error::{Error, Result};

/// The FP4 (e2m1) values of the 16 codes, transformers' `FP4_VALUES`: codes 8..15 are the
/// negatives of 0..7 (code 8 is `-0.0`).
pub const FP4_E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The bias of the stored scales: a group's factor is `2^(scale − SCALE_BIAS)`.
pub const SCALE_BIAS: i32 = 127;

/// The suffix of a packed tensor's codes (`X_blocks`).
pub const BLOCKS_SUFFIX: &str = "_blocks";

/// The suffix of a packed tensor's scales (`X_scales`).
pub const SCALES_SUFFIX: &str = "_scales";

/// The name of `name`'s packed codes, `name_blocks`.
pub fn blocks_name(name: &str) -> String {
    format!("{name}{BLOCKS_SUFFIX}")
}

/// The name of `name`'s packed scales, `name_scales`.
pub fn scales_name(name: &str) -> String {
    format!("{name}{SCALES_SUFFIX}")
}

/// The shape of the tensor `name` dequantized from blocks of shape `blocks_shape`
/// (`[E, R, G, B]`) and scales of shape `scales_shape` (`[E, R, G]`): `[E, G·B·2, R]`, the
/// parameter's layout. An error naming `name` when the blocks are not 4-dimensional or the
/// scales' shape is not the blocks' without its last dim.
pub fn dequantized_shape(
    name: &str,
    blocks_shape: &[usize],
    scales_shape: &[usize],
) -> Result<Vec<usize>> {
    let [experts, rows, groups, bytes] = packed_dims(name, blocks_shape, scales_shape)?;
    Ok(vec![experts, groups * bytes * 2, rows])
}

/// `[E, R, G, B]` of blocks whose scales fit them and whose dequantized size fits a `usize`
/// (see [`dequantized_shape`]).
fn packed_dims(name: &str, blocks_shape: &[usize], scales_shape: &[usize]) -> Result<[usize; 4]> {
    let &[experts, rows, groups, bytes] = blocks_shape else {
        return Err(mismatch(
            name,
            format!("MXFP4 blocks `{}`", blocks_name(name)),
            "4 dims [experts, rows, groups, bytes per group]".to_string(),
            format!("{blocks_shape:?}"),
        ));
    };
    let want_scales = [experts, rows, groups];
    if scales_shape != want_scales {
        return Err(mismatch(
            name,
            format!("MXFP4 scales `{}`", scales_name(name)),
            format!("{want_scales:?} (the blocks' shape {blocks_shape:?} without its last dim)"),
            format!("{scales_shape:?}"),
        ));
    }
    let fits = [experts, rows, groups, bytes, 2]
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .is_some();
    if !fits {
        return Err(mismatch(
            name,
            format!("MXFP4 blocks `{}`", blocks_name(name)),
            "a dequantized size that fits in memory".to_string(),
            format!("{blocks_shape:?}"),
        ));
    }
    Ok([experts, rows, groups, bytes])
}

/// Dequantizes the MXFP4 tensor `name` to f32 values, row-major in the parameter's layout
/// `[E, G·B·2, R]` (see [`dequantized_shape`]), bit for bit what transformers'
/// `convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)` returns; rounded to
/// bf16 or f16 they are what it returns in those dtypes (products beyond f32's range are
/// `±inf`; [`dequantize_mxfp4_f64`] keeps them). `blocks` are the bytes of `name_blocks`
/// (shape `blocks_shape`, `[E, R, G, B]`), `scales` those of `name_scales` (`[E, R, G]`).
///
/// Errors (never panics), naming `name`, when the shapes disagree or the data lengths are
/// not the ones the shapes imply.
///
/// ```
/// use lorakit::checkpoint::mxfp4::{dequantize_mxfp4, dequantized_shape};
/// # fn main() -> lorakit::Result<()> {
/// // One expert, one row, one group of 16 bytes (32 values), scale 2^(128 - 127) = 2.
/// // Byte 0x21: low nibble 1 (0.5) first, then high nibble 2 (1.0); 0xF8: -0.0, then -6.0.
/// let mut blocks = [0u8; 16];
/// blocks[0] = 0x21;
/// blocks[1] = 0xF8;
/// let (blocks_shape, scales, scales_shape) = ([1, 1, 1, 16], [128u8], [1, 1, 1]);
/// let shape = dequantized_shape("experts.gate_up_proj", &blocks_shape, &scales_shape)?;
/// assert_eq!(shape, [1, 32, 1]); // [E, H, 2I]: transposed from the stored [E, 2I, H/32, 16]
/// let w = dequantize_mxfp4("experts.gate_up_proj", &blocks, &blocks_shape, &scales, &scales_shape)?;
/// assert_eq!(w[..4], [1.0, 2.0, -0.0, -12.0]);
/// assert!(w[2].is_sign_negative());
///
/// // Scales that do not fit the blocks are refused by name.
/// let err = dequantize_mxfp4("experts.down_proj", &blocks, &blocks_shape, &scales, &[1, 2, 1]);
/// assert!(err.unwrap_err().to_string().contains("experts.down_proj_scales"));
/// # Ok(()) }
/// ```
pub fn dequantize_mxfp4(
    name: &str,
    blocks: &[u8],
    blocks_shape: &[usize],
    scales: &[u8],
    scales_shape: &[usize],
) -> Result<Vec<f32>> {
    // Every finite product is exact in f64 and (when finite there) in f32: one rounding.
    let table = value_table(|v| v as f32);
    dequantize_with(name, blocks, blocks_shape, scales, scales_shape, &table)
}

/// [`dequantize_mxfp4`] in f64: what `convert_moe_packed_tensors(..., dtype=torch.float64)`
/// returns (it differs from the f32 values only where those overflow to `±inf`).
pub fn dequantize_mxfp4_f64(
    name: &str,
    blocks: &[u8],
    blocks_shape: &[usize],
    scales: &[u8],
    scales_shape: &[usize],
) -> Result<Vec<f64>> {
    let table = value_table(|v| v);
    dequantize_with(name, blocks, blocks_shape, scales, scales_shape, &table)
}

/// `FP4_E2M1_VALUES[code] · 2^(scale − 127)`, exact in f64, through `cast`, at
/// `[scale][code]`.
fn value_table<T>(cast: impl Fn(f64) -> T) -> Vec<[T; 16]> {
    (0..256u32)
        .map(|scale| {
            // 2^(scale − 127) for scale in 0..=255 is a normal f64: built from its bits.
            let factor = f64::from_bits(u64::from(scale + 1023 - 127) << 52);
            FP4_E2M1_VALUES.map(|v| cast(f64::from(v) * factor))
        })
        .collect()
}

fn dequantize_with<T: Copy + Default + Send + Sync>(
    name: &str,
    blocks: &[u8],
    blocks_shape: &[usize],
    scales: &[u8],
    scales_shape: &[usize],
    table: &[[T; 16]],
) -> Result<Vec<T>> {
    let [experts, rows, groups, bytes] = packed_dims(name, blocks_shape, scales_shape)?;
    // No product overflows: `packed_dims` checked E·R·G·B·2.
    let scales_len = experts * rows * groups;
    for (what, tensor, len, want) in [
        (
            "blocks",
            blocks_name(name),
            blocks.len(),
            scales_len * bytes,
        ),
        ("scales", scales_name(name), scales.len(), scales_len),
    ] {
        if len != want {
            return Err(mismatch(
                name,
                format!("MXFP4 {what} `{tensor}` data"),
                format!("{want} bytes"),
                format!("{len} bytes"),
            ));
        }
    }
    if table.len() != 256 {
        return Err(mismatch(
            name,
            "MXFP4 value table".to_string(),
            "256 scales".to_string(),
            table.len().to_string(),
        ));
    }
    let mut out = vec![T::default(); scales_len * bytes * 2];
    // Output rows k in [g·2B, (g+1)·2B) of expert e (all R columns) come from group g of
    // every row of expert e: one task per (expert, group), each writing its own chunk.
    let chunk = 2 * bytes * rows;
    if chunk == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(task, dst)| {
            let (e, g) = (task / groups, task % groups);
            unpack_group(dst, blocks, scales, table, (e, g), (rows, groups, bytes));
        });
    Ok(out)
}

/// Output rows `[g·2B, (g+1)·2B)` of expert `e`, `dst` (`2B × R`, row-major), from group
/// `g` of each of the expert's `R` rows.
// Every index is in range by what `dequantize_with` checked: the row group
// `(e·R + r)·G + g < E·R·G = scales.len()`, its bytes end at most at `E·R·G·B =
// blocks.len()`, `(2b + 1)·R + r < 2B·R = dst.len()`, a scale is below 256 (the table's
// length) and a nibble below 16.
#[allow(clippy::indexing_slicing)]
fn unpack_group<T: Copy>(
    dst: &mut [T],
    blocks: &[u8],
    scales: &[u8],
    table: &[[T; 16]],
    (e, g): (usize, usize),
    (rows, groups, bytes): (usize, usize, usize),
) {
    for r in 0..rows {
        let row_group = (e * rows + r) * groups + g;
        let values = &table[usize::from(scales[row_group])];
        let src = &blocks[row_group * bytes..][..bytes];
        for (b, &byte) in src.iter().enumerate() {
            dst[2 * b * rows + r] = values[usize::from(byte & 0x0F)];
            dst[(2 * b + 1) * rows + r] = values[usize::from(byte >> 4)];
        }
    }
}

fn mismatch(name: &str, what: String, expected: String, got: String) -> Error {
    Error::ShapeMismatch {
        layer: name.to_string(),
        what,
        expected,
        got,
    }
}

/// A packed tensor's two parts in a checkpoint, with the dequantized shape.
struct Packed<'a> {
    blocks: (&'a Shard, &'a StoredTensor),
    scales: (&'a Shard, &'a StoredTensor),
    shape: Vec<usize>,
}

impl Checkpoint {
    /// Whether `name` is MXFP4-packed here: the checkpoint does not hold `name` but holds
    /// `name_blocks` or `name_scales` (a checkpoint with only one of them is an error at
    /// [`Checkpoint::load_mxfp4`], not a missing tensor).
    pub fn is_mxfp4(&self, name: &str) -> bool {
        !self.contains(name)
            && (self.contains(&blocks_name(name)) || self.contains(&scales_name(name)))
    }

    /// The shape of the MXFP4-packed tensor `name` once dequantized (`[E, G·B·2, R]`, the
    /// parameter's layout), from the headers alone. An error naming the tensor when it is
    /// not packed here, a part is missing or not `u8`, or the parts' shapes disagree.
    pub fn mxfp4_shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.packed(name)?.shape)
    }

    /// Reads the MXFP4-packed tensor `name` (`name_blocks` and `name_scales`) and
    /// dequantizes it as transformers does (see the [module docs](self)) into `dtype` on
    /// `device`, in the parameter's layout: `[E, H, 2I]` for GPT-OSS's
    /// `mlp.experts.gate_up_proj`, `[E, I, H]` for `down_proj`. f64 is computed in f64;
    /// every other dtype is the f32 values cast (bit for bit transformers' bf16 and f16).
    /// Errors name the file and the tensor: parts missing, not `u8`, or of shapes that
    /// disagree.
    ///
    /// ```no_run
    /// use candle_core::{DType, Device};
    /// use lorakit::checkpoint::Checkpoint;
    /// # fn main() -> lorakit::Result<()> {
    /// let ckpt = Checkpoint::open("models/gpt-oss-20b")?;
    /// let name = "model.layers.0.mlp.experts.gate_up_proj";
    /// assert!(ckpt.is_mxfp4(name));
    /// let w = ckpt.load_mxfp4(name, DType::BF16, &Device::Cpu)?;
    /// assert_eq!(w.dims(), [32, 2880, 5760]);
    /// # Ok(()) }
    /// ```
    pub fn load_mxfp4(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let packed = self.packed(name)?;
        let (blocks_shard, blocks_info) = packed.blocks;
        let (scales_shard, scales_info) = packed.scales;
        let blocks = blocks_shard.read_tensor_bytes(blocks_info)?;
        let scales = scales_shard.read_tensor_bytes(scales_info)?;
        let (bs, ss) = (&blocks_info.shape, &scales_info.shape);
        let in_file = |e: Error| Error::checkpoint(&blocks_shard.path, e.to_string());
        let t = if dtype == DType::F64 {
            let v = dequantize_mxfp4_f64(name, &blocks, bs, &scales, ss).map_err(in_file)?;
            Tensor::from_vec(v, packed.shape, &Device::Cpu)?
        } else {
            let v = dequantize_mxfp4(name, &blocks, bs, &scales, ss).map_err(in_file)?;
            Tensor::from_vec(v, packed.shape, &Device::Cpu)?.to_dtype(dtype)?
        };
        Ok(t.to_device(device)?)
    }

    /// `name`'s two parts, checked: both present, `u8`, of shapes that agree.
    fn packed(&self, name: &str) -> Result<Packed<'_>> {
        let part = |part: String, other: String| -> Result<(&Shard, &StoredTensor)> {
            let Some((shard, info)) = self.get(&part) else {
                let why = match self.contains(&other) {
                    true => format!("holds `{other}` but not `{part}`"),
                    false => format!("holds neither `{name}` nor its parts `{part}` and `{other}`"),
                };
                return Err(Error::checkpoint(
                    self.path(),
                    format!("MXFP4 tensor `{name}`: the checkpoint {why}"),
                ));
            };
            if info.dtype != Dtype::U8 {
                return Err(Error::checkpoint(
                    &shard.path,
                    format!(
                        "MXFP4 tensor `{name}`: `{part}` is {:?}, expected U8",
                        info.dtype
                    ),
                ));
            }
            Ok((shard, info))
        };
        let blocks = part(blocks_name(name), scales_name(name))?;
        let scales = part(scales_name(name), blocks_name(name))?;
        let shape = dequantized_shape(name, &blocks.1.shape, &scales.1.shape)
            .map_err(|e| Error::checkpoint(&blocks.0.path, e.to_string()))?;
        Ok(Packed {
            blocks,
            scales,
            shape,
        })
    }
}
