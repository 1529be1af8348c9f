//! The fused op's small elementwise CUDA kernels, compiled with NVRTC on first use (one
//! module, every dtype): the forward's epilogue (row scale, bias, and the pre-scale output
//! the backward needs), the backward's `g' = c ⊙ g`, and the row scale's gradient
//! `dc_j = Σ_i g_ij u_ij` as two passes over fixed row blocks (partial sums in f32, added
//! in block order: the result does not depend on the launch).
//!
//! Half types are handled as raw 16-bit words (no CUDA headers needed at run time): bf16
//! widens by a shift and narrows with round-to-nearest-even; f16 converts with PTX's `cvt`.
//! Arithmetic is f32 (f64 for f64).

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};

use super::dtype::CudaFloat;

const SRC: &str = r#"
struct bf16_t { unsigned short x; };
struct f16_t { unsigned short x; };

template <typename T> struct Num;
template <> struct Num<float> {
    typedef float Acc;
    static __device__ float load(float v) { return v; }
    static __device__ float store(float v) { return v; }
};
template <> struct Num<double> {
    typedef double Acc;
    static __device__ double load(double v) { return v; }
    static __device__ double store(double v) { return v; }
};
template <> struct Num<bf16_t> {
    typedef float Acc;
    static __device__ float load(bf16_t v) { return __uint_as_float(((unsigned)v.x) << 16); }
    static __device__ bf16_t store(float f) {
        unsigned u = __float_as_uint(f);
        bf16_t r;
        if ((u & 0x7fffffffu) > 0x7f800000u) { r.x = (unsigned short)((u >> 16) | 0x40u); return r; }
        u += 0x7fffu + ((u >> 16) & 1u);
        r.x = (unsigned short)(u >> 16);
        return r;
    }
};
template <> struct Num<f16_t> {
    typedef float Acc;
    static __device__ float load(f16_t v) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
        return f;
    }
    static __device__ f16_t store(float f) {
        f16_t r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(f));
        return r;
    }
};

// y[i, j] = (has_c ? c[j * cs] : 1) * y[i, j] + (has_b ? b[j] : 0); with save_u, u = y first.
template <typename T>
__device__ void epilogue(T* y, T* u, int save_u, const T* c, long cs, const T* b, long total,
                         long d_out, int has_c, int has_b) {
    typedef typename Num<T>::Acc A;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long)blockDim.x * gridDim.x) {
        long j = i % d_out;
        if (save_u) u[i] = y[i];
        A v = Num<T>::load(y[i]);
        if (has_c) v *= Num<T>::load(c[j * cs]);
        if (has_b) v += Num<T>::load(b[j]);
        y[i] = Num<T>::store(v);
    }
}

// out[i, j] = g[i, j] * c[j * cs]
template <typename T>
__device__ void scale_columns(T* out, const T* g, const T* c, long cs, long total, long d_out) {
    typedef typename Num<T>::Acc A;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long)blockDim.x * gridDim.x) {
        long j = i % d_out;
        out[i] = Num<T>::store(Num<T>::load(g[i]) * Num<T>::load(c[j * cs]));
    }
}

// partial[blk, j] = sum over rows blk*rows_per_block .. of g[i, j] * u[i, j]; grid (x: columns, y: row blocks)
template <typename T>
__device__ void column_dot_partial(typename Num<T>::Acc* partial, const T* g, const T* u, long n,
                                   long d_out, long rows_per_block) {
    typedef typename Num<T>::Acc A;
    long j = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long blk = blockIdx.y;
    if (j >= d_out) return;
    long start = blk * rows_per_block;
    long end = start + rows_per_block < n ? start + rows_per_block : n;
    A acc = 0;
    for (long i = start; i < end; ++i) acc += Num<T>::load(g[i * d_out + j]) * Num<T>::load(u[i * d_out + j]);
    partial[blk * d_out + j] = acc;
}

// out[j * out_stride] = sum over blocks of partial[blk, j], in block order
template <typename T>
__device__ void column_dot_finish(T* out, long out_offset, long out_stride, const typename Num<T>::Acc* partial,
                                  long blocks, long d_out) {
    typedef typename Num<T>::Acc A;
    long j = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d_out) return;
    A acc = 0;
    for (long b = 0; b < blocks; ++b) acc += partial[b * d_out + j];
    out[out_offset + j * out_stride] = Num<T>::store(acc);
}

#define LORAKIT_KERNELS(T, S)                                                                     \
extern "C" __global__ void lorakit_epilogue_##S(T* y, T* u, int save_u, const T* c, long cs,     \
    const T* b, long total, long d_out, int has_c, int has_b) {                                   \
    epilogue<T>(y, u, save_u, c, cs, b, total, d_out, has_c, has_b);                              \
}                                                                                                 \
extern "C" __global__ void lorakit_scale_columns_##S(T* out, const T* g, const T* c, long cs,    \
    long total, long d_out) {                                                                     \
    scale_columns<T>(out, g, c, cs, total, d_out);                                                \
}                                                                                                 \
extern "C" __global__ void lorakit_column_dot_partial_##S(Num<T>::Acc* partial, const T* g,      \
    const T* u, long n, long d_out, long rows_per_block) {                                        \
    column_dot_partial<T>(partial, g, u, n, d_out, rows_per_block);                               \
}                                                                                                 \
extern "C" __global__ void lorakit_column_dot_finish_##S(T* out, long out_offset, long out_stride,\
    const Num<T>::Acc* partial, long blocks, long d_out) {                                        \
    column_dot_finish<T>(out, out_offset, out_stride, partial, blocks, d_out);                                \
}

LORAKIT_KERNELS(float, f32)
LORAKIT_KERNELS(double, f64)
LORAKIT_KERNELS(bf16_t, bf16)
LORAKIT_KERNELS(f16_t, f16)
"#;

const MODULE: &str = "lorakit_fused_elementwise";

/// Threads per block of every kernel here.
const THREADS: u32 = 256;

/// Rows per block of the column sums' first pass.
const ROWS_PER_BLOCK: usize = 64;

/// The module's PTX, compiled once per process.
fn ptx() -> candle_core::Result<&'static str> {
    static PTX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(p) = PTX.get() {
        return Ok(p);
    }
    let ptx = candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SRC).w()?;
    Ok(PTX.get_or_init(|| ptx.to_src()))
}

/// The kernel `name` of this module, loaded on `dev` (compiled on first use).
fn func(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, MODULE, ptx()?)?
        .into_cuda_function())
}

/// A grid-stride launch over `total` elements.
fn flat_launch(total: usize) -> LaunchConfig {
    let blocks = u32::try_from(total.div_ceil(THREADS as usize).clamp(1, 65_535)).unwrap_or(65_535);
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn long(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A per-column vector read at stride `stride` (a column of a packed matrix).
pub(super) struct Column<'v, 'a, T> {
    /// The elements, the column's first at index 0.
    pub view: &'v CudaView<'a, T>,
    /// The distance between consecutive elements.
    pub stride: usize,
}

impl<T> Column<'_, '_, T> {
    fn check(&self, len: usize, what: &str) -> candle_core::Result<()> {
        if len > 0 && (len - 1) * self.stride >= self.view.len() {
            candle_core::bail!("fused linear (cuda): the {what} holds fewer than {len} values");
        }
        Ok(())
    }
}

/// In place on the `n × d_out` output `y`: `y = c ⊙ y + b` per column, first copying
/// the pre-scale `y` into `save_u` when given.
pub(super) fn epilogue<T: CudaFloat>(
    dev: &CudaDevice,
    y: &mut CudaSlice<T>,
    d_out: usize,
    save_u: Option<&mut CudaSlice<T>>,
    row_scale: Option<Column<'_, '_, T>>,
    bias: Option<&CudaView<'_, T>>,
) -> candle_core::Result<()> {
    let total = y.len();
    if let Some(c) = &row_scale {
        c.check(d_out, "row scale")?;
    }
    if bias.is_some_and(|b| b.len() < d_out) || save_u.as_ref().is_some_and(|u| u.len() < total) {
        candle_core::bail!("fused linear (cuda): the bias or the saved output is too short");
    }
    if total == 0 || (row_scale.is_none() && bias.is_none() && save_u.is_none()) {
        return Ok(());
    }
    let f = func(dev, &format!("lorakit_epilogue_{}", T::SUFFIX))?;
    // Absent operands are passed as a one-element buffer the kernel does not read.
    let dummy = dev.alloc_zeros::<T>(1)?;
    let dummy_view = dummy.slice(..);
    let mut dummy_u = dev.alloc_zeros::<T>(1)?;
    let (has_c, has_b, has_u) = (
        i32::from(row_scale.is_some()),
        i32::from(bias.is_some()),
        i32::from(save_u.is_some()),
    );
    let (c_view, cs) = match &row_scale {
        Some(c) => (c.view, c.stride),
        None => (&dummy_view, 0),
    };
    let b_view = bias.unwrap_or(&dummy_view);
    let u = save_u.unwrap_or(&mut dummy_u);
    let (cs, total_l, d_out_l) = (long(cs), long(total), long(d_out));
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(y);
    b.arg(u);
    b.arg(&has_u);
    b.arg(c_view);
    b.arg(&cs);
    b.arg(b_view);
    b.arg(&total_l);
    b.arg(&d_out_l);
    b.arg(&has_c);
    b.arg(&has_b);
    // SAFETY: the kernel reads `c[j * cs]` and `b[j]` for `j < d_out` (checked above) and
    // reads/writes `y[i]`, `u[i]` for `i < total`, the length of both.
    unsafe { b.launch(flat_launch(total)) }.w()?;
    Ok(())
}

/// `g ⊙ c` per column for the `n × d_out` gradient `g`, into a new buffer.
pub(super) fn scale_columns<T: CudaFloat>(
    dev: &CudaDevice,
    g: &CudaView<'_, T>,
    d_out: usize,
    c: Column<'_, '_, T>,
) -> candle_core::Result<CudaSlice<T>> {
    c.check(d_out, "row scale")?;
    let total = g.len();
    // SAFETY: every element is written by the kernel below before it is read.
    let mut out = unsafe { dev.alloc::<T>(total) }?;
    if total == 0 {
        return Ok(out);
    }
    let f = func(dev, &format!("lorakit_scale_columns_{}", T::SUFFIX))?;
    let (cs, total_l, d_out_l) = (long(c.stride), long(total), long(d_out));
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut out);
    b.arg(g);
    b.arg(c.view);
    b.arg(&cs);
    b.arg(&total_l);
    b.arg(&d_out_l);
    // SAFETY: `out` and `g` hold `total` elements, `c` holds `d_out` at stride `cs`.
    unsafe { b.launch(flat_launch(total)) }.w()?;
    Ok(out)
}

/// `out[offset + j · stride] = Σ_i g_ij u_ij` for `n × d_out` matrices `g`, `u`: fixed blocks of
/// rows summed in parallel into an f32 (f64) scratch, then the blocks in order.
pub(super) fn column_dot<T: CudaFloat>(
    dev: &CudaDevice,
    g: &CudaView<'_, T>,
    u: &CudaView<'_, T>,
    (n, d_out): (usize, usize),
    out: &mut CudaSlice<T>,
    (out_offset, out_stride): (usize, usize),
) -> candle_core::Result<()> {
    if g.len() < n * d_out || u.len() < n * d_out {
        candle_core::bail!(
            "fused linear (cuda): a column sum over a {n}x{d_out} matrix with fewer elements"
        );
    }
    if d_out > 0 && out_offset + (d_out - 1) * out_stride >= out.len() {
        candle_core::bail!("fused linear (cuda): the row scale's gradient does not fit its buffer");
    }
    if d_out == 0 {
        return Ok(());
    }
    let blocks = n.div_ceil(ROWS_PER_BLOCK).max(1);
    let col_blocks =
        u32::try_from(d_out.div_ceil(THREADS as usize)).map_err(candle_core::Error::wrap)?;
    let row_blocks = u32::try_from(blocks).map_err(candle_core::Error::wrap)?;
    let dims = ColumnDotDims {
        n: long(n),
        d_out: long(d_out),
        rows_per_block: long(ROWS_PER_BLOCK),
        blocks: long(blocks),
        out_offset: long(out_offset),
        out_stride: long(out_stride),
    };
    let first = LaunchConfig {
        grid_dim: (col_blocks, row_blocks, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let second = LaunchConfig {
        grid_dim: (col_blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let partial_name = format!("lorakit_column_dot_partial_{}", T::SUFFIX);
    let finish_name = format!("lorakit_column_dot_finish_{}", T::SUFFIX);
    let names = [&partial_name[..], &finish_name[..]];
    if T::F64_SCALARS {
        launch_column_dot::<T, f64>(dev, names, [first, second], g, u, &dims, out)
    } else {
        launch_column_dot::<T, f32>(dev, names, [first, second], g, u, &dims, out)
    }
}

/// [`column_dot`]'s sizes, as the kernels take them.
struct ColumnDotDims {
    n: i64,
    d_out: i64,
    rows_per_block: i64,
    blocks: i64,
    out_offset: i64,
    out_stride: i64,
}

/// The two launches of [`column_dot`] (partial sums, then their sum) over a scratch of the
/// accumulation type `A`.
fn launch_column_dot<T: CudaFloat, A: CudaFloat>(
    dev: &CudaDevice,
    [partial_name, finish_name]: [&str; 2],
    [first, second]: [LaunchConfig; 2],
    g: &CudaView<'_, T>,
    u: &CudaView<'_, T>,
    dims: &ColumnDotDims,
    out: &mut CudaSlice<T>,
) -> candle_core::Result<()> {
    let blocks = usize::try_from(dims.blocks * dims.d_out).unwrap_or(0);
    let mut partial = dev.alloc_zeros::<A>(blocks)?;
    let f = func(dev, partial_name)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut partial);
    b.arg(g);
    b.arg(u);
    b.arg(&dims.n);
    b.arg(&dims.d_out);
    b.arg(&dims.rows_per_block);
    // SAFETY: block (x, y) reads rows y·rows_per_block.. (< n) of column x·THREADS + t
    // (< d_out) of `g`, `u` (n · d_out elements, checked) and writes `partial[y, j]`,
    // inside its `blocks · d_out` elements.
    unsafe { b.launch(first) }.w()?;
    let f = func(dev, finish_name)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(out);
    b.arg(&dims.out_offset);
    b.arg(&dims.out_stride);
    b.arg(&partial);
    b.arg(&dims.blocks);
    b.arg(&dims.d_out);
    // SAFETY: reads `partial` (`blocks · d_out`) and writes `out[j · out_stride]`,
    // `j < d_out`, checked to fit.
    unsafe { b.launch(second) }.w()?;
    Ok(())
}
