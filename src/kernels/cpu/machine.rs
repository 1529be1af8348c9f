//! What the CPU reports, read once per process, for the kernels' route choices: the
//! widest vector instruction set the decode kernel can use, and the per-core data cache
//! sizes.
//!
//! - Instruction set: `is_x86_feature_detected!` (AVX-512F, else AVX2 with FMA, else the
//!   portable scalar code). `LORAKIT_CPU_ISA=scalar|avx2|avx512` lowers the choice (for
//!   comparisons and debugging) for the f32/f64 decode kernel, the quantized one
//!   (`quant::dot`, whose AVX2 and AVX-512 code also needs F16C), the packed products (an
//!   AVX-512 or an AVX2 register block; off below AVX2) and AMX tiles (they need AVX-512:
//!   below it they are off); it never selects a set the CPU lacks.
//! - Caches: Linux's `/sys/devices/system/cpu/cpu0/cache/index*/` (`level`, `type`,
//!   `size`), else CPUID leaf `0x8000_0006` (the L2 size, reported by Intel and AMD
//!   alike), else 32 KiB L1d and 256 KiB L2, the smallest of the x86 cores of the last
//!   decade.

use std::sync::OnceLock;

/// The vector instruction sets of the decode kernel, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Portable code (any CPU).
    Scalar,
    /// 256-bit AVX2 with FMA.
    Avx2,
    /// 512-bit AVX-512F.
    Avx512,
}

impl Isa {
    /// Every set, narrowest first.
    #[cfg(test)]
    pub(crate) const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// Whether this CPU can run code for the set.
    pub(crate) fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Vector width in bytes (SSE2's 16 for the portable code).
    pub(crate) fn vector_bytes(self) -> usize {
        match self {
            Isa::Scalar => 16,
            Isa::Avx2 => 32,
            Isa::Avx512 => 64,
        }
    }

    /// Elements of `size` bytes per vector (at least 1).
    pub(crate) fn lanes(self, size: usize) -> usize {
        (self.vector_bytes() / size.max(1)).max(1)
    }

    /// The name `LORAKIT_CPU_ISA` takes.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// The facts the kernels route by.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Machine {
    /// The widest available set, lowered by `LORAKIT_CPU_ISA`.
    pub isa: Isa,
    /// Level-1 data cache of one core, bytes.
    pub l1d: usize,
    /// Level-2 cache of one core, bytes.
    pub l2: usize,
    /// Whether the decode kernel runs (on unless `LORAKIT_DECODE_KERNEL=0`; see
    /// `super::gemv`).
    pub decode_kernel: bool,
}

impl Machine {
    /// An AVX-512 server core as the routing tests assume it (48 KiB L1d, 2 MiB L2, the
    /// decode kernel on), whatever CPU runs them.
    #[cfg(test)]
    pub(crate) const AVX512_SERVER: Machine = Machine {
        isa: Isa::Avx512,
        l1d: 48 << 10,
        l2: 2 << 20,
        decode_kernel: true,
    };
}

/// The machine, read on first use.
pub(crate) fn machine() -> &'static Machine {
    static MACHINE: OnceLock<Machine> = OnceLock::new();
    MACHINE.get_or_init(|| {
        let widest = [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.available())
            .unwrap_or(Isa::Scalar);
        let asked = std::env::var("LORAKIT_CPU_ISA").ok();
        let isa = [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .find(|isa| asked.as_deref() == Some(isa.name()))
            .map_or(widest, |isa| isa.min(widest));
        let (l1d, l2) = sysfs_caches().unwrap_or((None, None));
        Machine {
            isa,
            l1d: l1d.unwrap_or(32 << 10),
            l2: l2.or_else(cpuid_l2).unwrap_or(256 << 10),
            decode_kernel: std::env::var("LORAKIT_DECODE_KERNEL").as_deref() != Ok("0"),
        }
    })
}

/// `(L1d, L2)` of cpu0 from sysfs, bytes.
fn sysfs_caches() -> Option<(Option<usize>, Option<usize>)> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    let (mut l1d, mut l2) = (None, None);
    for entry in dir.flatten() {
        let read = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size"))
        else {
            continue;
        };
        let size = parse_size(size.trim());
        match (level.trim(), kind.trim()) {
            ("1", "Data") => l1d = size,
            ("2", "Unified" | "Data") => l2 = size,
            _ => {}
        }
    }
    Some((l1d, l2))
}

/// A sysfs cache size (`48K`, `2048K`, `1M`) in bytes.
fn parse_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.strip_suffix('K') {
        Some(d) => (d, 1 << 10),
        None => match s.strip_suffix('M') {
            Some(d) => (d, 1 << 20),
            None => (s, 1),
        },
    };
    digits.parse::<usize>().ok().map(|v| v * unit)
}

/// The L2 size from CPUID leaf `0x8000_0006` (ECX bits 31..16, KiB).
#[cfg(target_arch = "x86_64")]
fn cpuid_l2() -> Option<usize> {
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max < 0x8000_0006 {
        return None;
    }
    let kib = std::arch::x86_64::__cpuid(0x8000_0006).ecx >> 16;
    (kib > 0).then_some(kib as usize * 1024)
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid_l2() -> Option<usize> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_sizes_parse() {
        assert_eq!(parse_size("48K"), Some(48 << 10));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("x"), None);
    }

    #[test]
    fn the_machine_is_plausible() {
        let m = machine();
        println!("{m:?}");
        assert!(m.isa.available());
        assert!(m.l1d >= 4 << 10 && m.l2 >= m.l1d);
    }
}
