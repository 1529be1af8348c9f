//! [`QuantizedWeight`]: a frozen `(d_out, d_in)` weight held as candle GGML blocks or as
//! bitsandbytes 4-bit blocks.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::bnb::{Bnb4Blocks, Bnb4Params, Bnb4Type, Lanes};
use super::dequant::dequantize_into;
use crate::error::{Error, Result};

/// The GGML types [`QuantizedWeight::quantize`] produces (quantize-on-load). Any GGML type
/// candle reads is accepted from an already-quantized [`QTensor`]
/// ([`QuantizedWeight::from_qtensor`]).
pub const QUANTIZE_TYPES: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// A frozen weight `W` `(d_out, d_in)` stored quantized: GGML blocks along `d_in` (the
/// layout llama.cpp and candle's `QTensor` use), or bitsandbytes 4-bit blocks as a
/// `…-bnb-4bit` checkpoint stores them ([`crate::quant::bnb`]; CPU only, read by
/// `Checkpoint::load_bnb4`). Cloning shares the blocks.
///
/// lorakit never holds a float copy of the whole weight for training or inference on the
/// CPU: products dequantize a few rows at a time into a small reused buffer (see
/// [`crate::kernels`]). [`QuantizedWeight::dequantize`] makes the full float weight on
/// purpose (merging into a float checkpoint).
///
/// ```
/// use candle_core::{quantized::GgmlDType, Device, Tensor};
/// use lorakit::quant::QuantizedWeight;
/// # fn main() -> lorakit::Result<()> {
/// let w = Tensor::randn(0f32, 1., (4, 64), &Device::Cpu)?;
/// let q = QuantizedWeight::quantize("proj", &w, GgmlDType::Q8_0)?;
/// assert_eq!((q.d_out(), q.d_in(), q.ggml_dtype()), (4, 64, Some(GgmlDType::Q8_0)));
/// assert_eq!(q.storage_bytes(), 4 * 2 * 34); // two 34-byte blocks of 32 per row
/// let err = (q.dequantize()? - &w)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(err < 0.05);
/// // d_in must be a whole number of blocks.
/// let odd = Tensor::zeros((4, 48), candle_core::DType::F32, &Device::Cpu)?;
/// assert!(QuantizedWeight::quantize("proj", &odd, GgmlDType::Q4K).is_err());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct QuantizedWeight {
    blocks: Arc<Blocks>,
    d_out: usize,
    d_in: usize,
}

/// Where a [`QuantizedWeight`]'s values are (behind one pointer: bases hold a weight
/// each).
enum Blocks {
    Ggml(Arc<QTensor>),
    Bnb4(Bnb4Blocks),
}

/// How a [`QuantizedWeight`] is stored.
///
/// ```
/// use candle_core::quantized::GgmlDType;
/// use lorakit::quant::{Bnb4Type, QuantFormat};
/// assert_eq!(QuantFormat::Ggml(GgmlDType::Q4K).to_string(), "Q4K");
/// assert_eq!(QuantFormat::Bnb4(Bnb4Type::Nf4).to_string(), "bitsandbytes nf4");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    /// candle's GGML blocks of this type.
    Ggml(GgmlDType),
    /// bitsandbytes 4-bit blocks of this code book.
    Bnb4(Bnb4Type),
}

impl From<GgmlDType> for QuantFormat {
    fn from(t: GgmlDType) -> Self {
        QuantFormat::Ggml(t)
    }
}

impl From<Bnb4Type> for QuantFormat {
    fn from(t: Bnb4Type) -> Self {
        QuantFormat::Bnb4(t)
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantFormat::Ggml(t) => write!(f, "{t:?}"),
            QuantFormat::Bnb4(t) => write!(f, "bitsandbytes {}", t.name()),
        }
    }
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedWeight")
            .field("format", &self.format())
            .field("d_out", &self.d_out)
            .field("d_in", &self.d_in)
            .finish()
    }
}

impl QuantizedWeight {
    /// Quantizes a float weight `(d_out, d_in)` to `to`: a GGML type (one of
    /// [`QUANTIZE_TYPES`], on the weight's device), or a bitsandbytes 4-bit code book (a
    /// CPU weight only, as bitsandbytes' `quantize_4bit` does, in blocks of 64 without double
    /// quantization; the quant state records the weight's dtype). `layer` names the layer
    /// in errors: a `d_in` that is not a multiple of a GGML type's block size (32, or 256
    /// for the k-quants) is refused, as is a non-finite value for bitsandbytes.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use lorakit::quant::{Bnb4Type, QuantFormat, QuantizedWeight};
    /// # fn main() -> lorakit::Result<()> {
    /// let w = Tensor::randn(0f32, 1., (4, 96), &Device::Cpu)?.to_dtype(DType::BF16)?;
    /// let q = QuantizedWeight::quantize("proj", &w, Bnb4Type::Nf4)?;
    /// assert_eq!(q.format(), QuantFormat::Bnb4(Bnb4Type::Nf4));
    /// assert_eq!(q.bnb4_params().map(|p| (p.blocksize, p.dtype)), Some((64, DType::BF16)));
    /// assert_eq!(q.storage_bytes(), 4 * 96 / 2 + 4 * 6); // codes and six f32 block scales
    /// # Ok(()) }
    /// ```
    pub fn quantize(layer: &str, weight: &Tensor, to: impl Into<QuantFormat>) -> Result<Self> {
        let dtype = match to.into() {
            QuantFormat::Ggml(dtype) => dtype,
            QuantFormat::Bnb4(quant_type) => return Self::quantize_bnb4(layer, weight, quant_type),
        };
        if !QUANTIZE_TYPES.contains(&dtype) {
            return Err(Error::Unsupported {
                what: "quantization type",
                got: format!("{dtype:?}"),
                supported: QUANTIZE_TYPES.map(|t| format!("{t:?}")).join(", "),
            });
        }
        let (d_out, d_in) = weight_dims(layer, weight.dims())?;
        check_blocks(layer, d_in, dtype)?;
        if !weight.dtype().is_float() {
            return Err(Error::DTypeMismatch {
                layer: layer.to_string(),
                what: "weight to quantize".to_string(),
                expected: DType::F32,
                got: weight.dtype(),
            });
        }
        let q = QTensor::quantize(&weight.detach(), dtype)?;
        Ok(Self {
            blocks: Arc::new(Blocks::Ggml(Arc::new(q))),
            d_out,
            d_in,
        })
    }

    /// [`QuantizedWeight::quantize`] to bitsandbytes 4-bit blocks.
    fn quantize_bnb4(layer: &str, weight: &Tensor, quant_type: Bnb4Type) -> Result<Self> {
        let (d_out, d_in) = weight_dims(layer, weight.dims())?;
        if !weight.device().is_cpu() {
            return Err(Error::layer_config(
                layer,
                "quantize",
                format!(
                    "bitsandbytes 4-bit blocks are held on the CPU; a weight on {:?} takes a \
                     GGML type (or stays float)",
                    weight.device()
                ),
            ));
        }
        let dtype = weight.dtype();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::DTypeMismatch {
                layer: layer.to_string(),
                what: "weight to quantize to bitsandbytes 4-bit".to_string(),
                expected: DType::BF16,
                got: dtype,
            });
        }
        let values: Vec<f32> = weight
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let blocks = Bnb4Blocks::quantize(&values, (d_out, d_in), quant_type, dtype)
            .map_err(|why| Error::layer_config(layer, "quantize", why))?;
        Ok(Self::from_bnb4(blocks))
    }

    /// Wraps an already-quantized tensor `(d_out, d_in)` (a GGUF file's, as stored), of
    /// any GGML type candle dequantizes.
    pub fn from_qtensor(layer: &str, q: impl Into<Arc<QTensor>>) -> Result<Self> {
        let q = q.into();
        let (d_out, d_in) = weight_dims(layer, q.shape().dims())?;
        check_blocks(layer, d_in, q.dtype())?;
        Ok(Self {
            blocks: Arc::new(Blocks::Ggml(q)),
            d_out,
            d_in,
        })
    }

    /// Wraps bitsandbytes 4-bit blocks (on the CPU).
    pub(crate) fn from_bnb4(blocks: Bnb4Blocks) -> Self {
        let (d_out, d_in) = blocks.params().shape;
        Self {
            blocks: Arc::new(Blocks::Bnb4(blocks)),
            d_out,
            d_in,
        }
    }

    /// The GGML tensor, for GGML blocks.
    pub fn qtensor(&self) -> Option<&Arc<QTensor>> {
        match self.blocks.as_ref() {
            Blocks::Ggml(q) => Some(q),
            Blocks::Bnb4(_) => None,
        }
    }

    /// The GGML type of the blocks, for GGML blocks.
    pub fn ggml_dtype(&self) -> Option<GgmlDType> {
        self.qtensor().map(|q| q.dtype())
    }

    /// The settings of bitsandbytes blocks.
    pub fn bnb4_params(&self) -> Option<&Bnb4Params> {
        self.bnb4_blocks().map(Bnb4Blocks::params)
    }

    /// The bitsandbytes blocks, for bitsandbytes blocks.
    pub(crate) fn bnb4_blocks(&self) -> Option<&Bnb4Blocks> {
        match self.blocks.as_ref() {
            Blocks::Ggml(_) => None,
            Blocks::Bnb4(b) => Some(b),
        }
    }

    /// How the weight is stored.
    pub fn format(&self) -> QuantFormat {
        match self.blocks.as_ref() {
            Blocks::Ggml(q) => QuantFormat::Ggml(q.dtype()),
            Blocks::Bnb4(b) => QuantFormat::Bnb4(b.params().quant_type),
        }
    }

    /// Output features (rows).
    pub fn d_out(&self) -> usize {
        self.d_out
    }

    /// Input features (columns).
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// The device the blocks live on (bitsandbytes blocks: the CPU).
    pub fn device(&self) -> Device {
        match self.blocks.as_ref() {
            Blocks::Ggml(q) => q.device(),
            Blocks::Bnb4(_) => Device::Cpu,
        }
    }

    /// Bytes the blocks take (the resident size of the weight).
    pub fn storage_bytes(&self) -> usize {
        match self.blocks.as_ref() {
            Blocks::Ggml(q) => q.storage_size_in_bytes(),
            Blocks::Bnb4(b) => b.storage_bytes(),
        }
    }

    /// The whole weight as an f32 tensor `(d_out, d_in)` on its device: a full float copy,
    /// made on purpose (merging into a float checkpoint, devices without the tiled CPU
    /// product). bitsandbytes blocks give their values rounded to the quant state's dtype,
    /// as bitsandbytes dequantizes them.
    pub fn dequantize(&self) -> Result<Tensor> {
        match self.blocks.as_ref() {
            Blocks::Ggml(q) => Ok(q.dequantize(&q.device())?),
            Blocks::Bnb4(_) => {
                let mut values = vec![0f32; self.d_out * self.d_in];
                self.dequantize_rows(0, &mut values, Lanes::best(Lanes::Avx2))?;
                Ok(Tensor::from_vec(
                    values,
                    (self.d_out, self.d_in),
                    &Device::Cpu,
                )?)
            }
        }
    }

    /// [`QuantizedWeight::dequantize`] on `device` in `dtype`.
    pub(crate) fn dequantize_to(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        Ok(self.dequantize()?.to_device(device)?.to_dtype(dtype)?)
    }

    /// Dequantizes rows `row0 ..` into `out` (a whole number of rows, `d_in` floats each),
    /// rows spread over the thread pool, bitsandbytes blocks with `lanes` (the vector code
    /// runs only where the CPU has it, the portable code otherwise)
    /// (the caller's choice of instruction set). CPU weights only.
    pub(crate) fn dequantize_rows(
        &self,
        row0: usize,
        out: &mut [f32],
        lanes: Lanes,
    ) -> candle_core::Result<()> {
        let d_in = self.d_in.max(1);
        let rows = out.len() / d_in;
        let per_task = rows
            .div_ceil(4 * rayon::current_num_threads().max(1))
            .max(1);
        self.check_rows(row0, out.len())?;
        out.par_chunks_mut(per_task * d_in)
            .enumerate()
            .try_for_each(|(i, out)| self.dequantize_rows_here(row0 + i * per_task, out, lanes))
    }

    /// [`QuantizedWeight::dequantize_rows`] on the calling thread (a caller that is already
    /// one task of many).
    pub(crate) fn dequantize_rows_here(
        &self,
        row0: usize,
        out: &mut [f32],
        lanes: Lanes,
    ) -> candle_core::Result<()> {
        match self.blocks.as_ref() {
            Blocks::Ggml(q) => {
                let dtype = q.dtype();
                self.with_row_bytes(row0, out.len(), |bytes| dequantize_into(dtype, bytes, out))
            }
            Blocks::Bnb4(b) => {
                self.check_rows(row0, out.len())?;
                if !b.dequantize_into(row0 * self.d_in, out, lanes) {
                    candle_core::bail!("quantized weight: rows from {row0} outside the blocks");
                }
                Ok(())
            }
        }
    }

    /// `out[r] = Σ_k xs[r][k] · W[row, k]` in f32 straight from bitsandbytes blocks, where
    /// a vector kernel applies (see `Bnb4Blocks::dots`); `false` otherwise (GGML blocks
    /// included), nothing written.
    pub(crate) fn bnb4_row_dots(
        &self,
        row: usize,
        xs: &[&[f32]],
        out: &mut [f32],
        lanes: Lanes,
    ) -> bool {
        let inside = row < self.d_out && xs.iter().all(|x| x.len() == self.d_in);
        match self.bnb4_blocks() {
            Some(b) if inside => b.dots(row * self.d_in, xs, out, lanes),
            _ => false,
        }
    }

    /// An error unless `floats` values from row `row0` are a whole number of rows inside
    /// the weight.
    fn check_rows(&self, row0: usize, floats: usize) -> candle_core::Result<()> {
        let d_in = self.d_in.max(1);
        let rows = floats / d_in;
        if !floats.is_multiple_of(d_in) || row0 + rows > self.d_out {
            candle_core::bail!(
                "quantized weight: rows {row0}..{} of {} ({floats} floats for rows of {d_in})",
                row0 + rows,
                self.d_out,
            );
        }
        Ok(())
    }

    /// Runs `f` on the GGML blocks of the rows from `row0` that `floats` values fill (a
    /// whole number of rows inside the weight). CPU GGML weights only.
    pub(crate) fn with_row_bytes<R>(
        &self,
        row0: usize,
        floats: usize,
        f: impl FnOnce(&[u8]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let Blocks::Ggml(q) = self.blocks.as_ref() else {
            candle_core::bail!("quantized weight: bitsandbytes blocks are not GGML rows");
        };
        self.check_rows(row0, floats)?;
        let rows = floats / self.d_in.max(1);
        if !q.device().is_cpu() {
            candle_core::bail!("quantized weight: the tiled product needs CPU blocks");
        }
        let data = q.data()?;
        let rb = self.d_in / q.dtype().block_size() * q.dtype().type_size();
        let Some(bytes) = data.get(row0 * rb..(row0 + rows) * rb) else {
            candle_core::bail!(
                "quantized weight: rows {row0}..{} outside the blocks",
                row0 + rows
            );
        };
        f(bytes)
    }

    /// Squared row norms `‖W_i‖²` `(d_out,)` in f32 (f64 accumulation), computed tile by
    /// tile from the blocks (DoRA's cached weight norm): on a non-CPU device, from the
    /// dequantized weight.
    pub fn row_sq_norms(&self) -> Result<Tensor> {
        if !self.device().is_cpu() {
            let w = self.dequantize()?;
            return Ok(w.sqr()?.sum(1)?);
        }
        let rows = tile_rows(self.d_out, self.d_in);
        let mut tile = vec![0f32; rows * self.d_in];
        let mut norms = Vec::with_capacity(self.d_out);
        for j0 in (0..self.d_out).step_by(rows.max(1)) {
            let k = rows.min(self.d_out - j0);
            let buf = tile.get_mut(..k * self.d_in).unwrap_or_default();
            self.dequantize_rows(j0, buf, Lanes::best(Lanes::Avx2))?;
            norms.extend(buf.chunks(self.d_in.max(1)).map(|row| {
                row.iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>() as f32
            }));
        }
        Ok(Tensor::from_vec(norms, self.d_out, &Device::Cpu)?)
    }
}

/// How many rows of a `(d_out, d_in)` weight one dequantized tile holds: about 256 Ki
/// floats (1 MiB in f32), at least one row.
pub(crate) fn tile_rows(d_out: usize, d_in: usize) -> usize {
    const TILE_FLOATS: usize = 1 << 18;
    (TILE_FLOATS / d_in.max(1)).clamp(1, d_out.max(1))
}

/// A weight's `(d_out, d_in)`, or an error naming the layer.
fn weight_dims(layer: &str, dims: &[usize]) -> Result<(usize, usize)> {
    match *dims {
        [d_out, d_in] if d_out > 0 && d_in > 0 => Ok((d_out, d_in)),
        _ => Err(Error::ShapeMismatch {
            layer: layer.to_string(),
            what: "quantized weight".to_string(),
            expected: "[d_out, d_in], both at least 1".to_string(),
            got: format!("{dims:?}"),
        }),
    }
}

/// `d_in` must be a whole number of `dtype` blocks (GGML blocks run along rows).
fn check_blocks(layer: &str, d_in: usize, dtype: GgmlDType) -> Result<()> {
    let bs = dtype.block_size();
    if !d_in.is_multiple_of(bs) {
        return Err(Error::ShapeMismatch {
            layer: layer.to_string(),
            what: format!("weight quantized to {dtype:?} (blocks of {bs} along d_in)"),
            expected: format!("d_in a multiple of the block size {bs}"),
            got: format!("d_in = {d_in}"),
        });
    }
    Ok(())
}
