//! [`CpuReport`]: what lorakit's CPU kernels read off this machine and route by, for a
//! benchmark's output or a user's bug report.

use std::fmt;

use super::machine;

/// The facts lorakit's CPU kernels route by, as they stand in this process: the vector
/// instruction set the decode kernels use (the widest the CPU has, lowered by
/// `LORAKIT_CPU_ISA`), the per-core caches the route thresholds scale with, whether the
/// decode kernel is on (`LORAKIT_DECODE_KERNEL=0` turns it off), whether large `f32`
/// products run on Intel AMX tiles (off unless `LORAKIT_CPU_AMX=1` asks for them, on a CPU
/// that has them), whether large `f32` products run on lorakit's own packing and register
/// block (on with AVX-512F or AVX2 unless `LORAKIT_PACKED_PRODUCTS=0`), the size of
/// rayon's pool
/// the kernels split work over, and the CPU's model name (Linux's `/proc/cpuinfo`).
///
/// Its [`Display`](fmt::Display) is one line; the benchmarks print it with every run, so
/// a figure always names the machine and the routes behind it.
///
/// ```
/// use lorakit::kernels::CpuReport;
///
/// let report = CpuReport::current();
/// assert!(report.f32_lanes >= 4 && report.l2_bytes > 0 && report.threads >= 1);
/// let line = report.to_string();
/// assert!(line.contains(report.vector_set) && line.contains("threads"));
/// println!("{line}"); // e.g. "AMD EPYC: avx512 (16 f32 lanes), L1d 48 KiB, L2 1024 KiB per core, decode kernel on, AMX off, packed products on, 2 threads"
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuReport {
    /// The CPU's model name, where the OS reports one.
    pub model: Option<String>,
    /// The decode kernels' vector instruction set: `"avx512"`, `"avx2"` or `"scalar"`.
    pub vector_set: &'static str,
    /// `f32` elements per vector of that set (4 for the portable code).
    pub f32_lanes: usize,
    /// One core's level-1 data cache, in bytes (32 KiB where the machine does not say).
    pub l1d_bytes: usize,
    /// One core's level-2 cache, in bytes (256 KiB where the machine does not say).
    pub l2_bytes: usize,
    /// Whether the decode kernel runs.
    pub decode_kernel: bool,
    /// Whether large `f32` products run on Intel AMX tiles (at `f32`-level accuracy: the
    /// operands split into three bfloat16 parts each).
    pub amx_tiles: bool,
    /// Whether large `f32` products run on lorakit's own packing and register block
    /// (`kernels::cpu::packed`; AVX-512 or AVX2, as [`CpuReport::vector_set`] says).
    pub packed_products: bool,
    /// Threads in the rayon pool of the calling thread (the global pool from outside one).
    pub threads: usize,
}

impl CpuReport {
    /// The report for this process.
    pub fn current() -> Self {
        let m = machine();
        Self {
            model: model_name(),
            vector_set: m.isa.name(),
            f32_lanes: m.isa.lanes(std::mem::size_of::<f32>()),
            l1d_bytes: m.l1d,
            l2_bytes: m.l2,
            decode_kernel: m.decode_kernel,
            amx_tiles: super::cpu::amx_products(),
            packed_products: super::cpu::packed_products(),
            threads: rayon::current_num_threads(),
        }
    }
}

impl fmt::Display for CpuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ({} f32 lanes), L1d {} KiB, L2 {} KiB per core, decode kernel {}, AMX {}, packed products {}, {} threads",
            self.model.as_deref().unwrap_or("unknown CPU"),
            self.vector_set,
            self.f32_lanes,
            self.l1d_bytes >> 10,
            self.l2_bytes >> 10,
            if self.decode_kernel { "on" } else { "off" },
            if self.amx_tiles { "on" } else { "off" },
            if self.packed_products { "on" } else { "off" },
            self.threads,
        )
    }
}

/// The first `model name` of `/proc/cpuinfo`, if there is one.
fn model_name() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "model name")
        .map(|(_, value)| value.trim().to_string())
        .filter(|name| !name.is_empty())
}
