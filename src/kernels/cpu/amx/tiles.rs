//! Intel AMX tiles: whether this process may use them, the tile shapes the kernel
//! configures, and the microkernel (`TDPBF16PS` on eight 1 KiB tile registers).
//!
//! AMX needs three things: the CPU's CPUID bits (AMX-TILE, AMX-BF16), the OS's XSAVE
//! support for tile state (XCR0 bits 17 and 18), and, on Linux, a per-process permission
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`). [`available`] checks all
//! three once per process. The tile instructions are written as inline assembly (Rust's
//! AMX intrinsics and target features are unstable); the assembler takes them whatever
//! the compile-time target, and they only run after [`available`] said yes.

/// Rows of a tile (and of each half of a 32-row or 32-column block).
pub(super) const TILE_ROWS: usize = 16;

/// bfloat16 elements of a tile: 16 rows of 64 bytes.
pub(super) const TILE_ELEMS: usize = 512;

/// Whether the AMX kernel can run in this process (module docs), checked once.
pub(super) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_has_amx() && permitted())
}

/// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (bit 24); the OS saves tile state
/// (XCR0 bits 17 and 18, read when OSXSAVE is set).
#[cfg(target_arch = "x86_64")]
fn cpu_has_amx() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 || !osxsave {
        return false;
    }
    // SAFETY: XGETBV is present when CPUID reports OSXSAVE (checked above).
    let xcr0 = unsafe { _xgetbv(0) };
    xcr0 & (0b11 << 17) == 0b11 << 17
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx() -> bool {
    false
}

/// Linux's per-process permission for the tile data state (granted once, for all
/// threads of the process).
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn permitted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes the process's XSAVE
    // permissions; it reads and writes no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
fn permitted() -> bool {
    false
}

/// The tile configuration `LDTILECFG` reads: palette 1, all eight tiles 16 rows of 64
/// bytes (16 × 16 `f32` accumulators, or 16 × 32 bfloat16 operands).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[allow(clippy::indexing_slicing)] // evaluated at compile time: a bad index fails the build
const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row, little-endian u16
        c[48 + t] = TILE_ROWS as u8;
        t += 1;
    }
    TileConfig(c)
};

/// The tile registers configured on the calling thread for the closure's duration, then
/// released (`TILERELEASE`, so the thread's context switches stop saving tile state).
///
/// # Safety
/// [`available`] must have returned `true`.
pub(super) unsafe fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
    // The configuration stays in force on this thread until `TILERELEASE`: the compiler
    // never uses tile registers itself (they are clobber-only in Rust's inline assembly),
    // so [`block_32x32`]'s later assembly blocks find it as set here.
    // SAFETY: AMX is available (the caller's contract); CONFIG is a valid palette-1
    // configuration, 64-byte aligned.
    unsafe {
        std::arch::asm!(
            "ldtilecfg [{}]",
            in(reg) CONFIG.0.as_ptr(),
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack)
        )
    };
    let out = f();
    // SAFETY: as above; releasing the configured tiles.
    unsafe {
        std::arch::asm!(
            "tilerelease",
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack)
        )
    };
    out
}

/// One 32 × 32 block of the destination: `out = c + Σ planes A·B` over `blocks` depth
/// blocks of 32, as the 2 × 2 tiles `tmm0..tmm3`, with `tmm4, tmm5` the two 16-row halves
/// of `a` and `tmm6, tmm7` the two 16-column halves of `b` (see `super::pack` for the
/// layouts). Each depth block adds the six plane products high·high, high·middle,
/// middle·middle, middle·high, low·high and high·low, in that order, reloading one
/// operand pair between products.
///
/// # Safety
/// Tiles configured ([`with_tiles`]); `a` and `b` hold `blocks ≥ 1` packed depth blocks
/// (`blocks · 3 · 2 · TILE_ELEMS` bfloat16 each); `c` and `out` address 32 rows of 32
/// `f32` at row strides `c_rs` and `out_rs` (elements), `out` writable and unaliased
/// except that it may be `c` itself.
pub(super) unsafe fn block_32x32(
    a: *const u16,
    b: *const u16,
    blocks: usize,
    c: *const f32,
    c_rs: usize,
    out: *mut f32,
    out_rs: usize,
) {
    // SAFETY: the caller's contract; each tile load reads 16 rows of 64 bytes at the
    // 64-byte stride of the packed panels or the destination's row stride.
    unsafe {
        std::arch::asm!(
            "tileloadd tmm0, [{c} + {crs}*1]",
            "tileloadd tmm1, [{c} + {crs}*1 + 64]",
            "tileloadd tmm2, [{c2} + {crs}*1]",
            "tileloadd tmm3, [{c2} + {crs}*1 + 64]",
            "2:",
            // high · high
            "tileloadd tmm4, [{a} + {s}*1]",
            "tileloadd tmm6, [{b} + {s}*1]",
            "tileloadd tmm7, [{b} + {s}*1 + 1024]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a} + {s}*1 + 1024]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // high · middle
            "tileloadd tmm6, [{b} + {s}*1 + 2048]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm7, [{b} + {s}*1 + 3072]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // middle · middle
            "tileloadd tmm4, [{a} + {s}*1 + 2048]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a} + {s}*1 + 3072]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // middle · high
            "tileloadd tmm6, [{b} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm7, [{b} + {s}*1 + 1024]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // low · high
            "tileloadd tmm4, [{a} + {s}*1 + 4096]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a} + {s}*1 + 5120]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // high · low
            "tileloadd tmm4, [{a} + {s}*1]",
            "tileloadd tmm6, [{b} + {s}*1 + 4096]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b} + {s}*1 + 5120]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a} + {s}*1 + 1024]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 6144",
            "add {b}, 6144",
            "dec {blocks}",
            "jnz 2b",
            "tilestored [{o} + {ors}*1], tmm0",
            "tilestored [{o} + {ors}*1 + 64], tmm1",
            "tilestored [{o2} + {ors}*1], tmm2",
            "tilestored [{o2} + {ors}*1 + 64], tmm3",
            a = inout(reg) a => _,
            b = inout(reg) b => _,
            blocks = inout(reg) blocks => _,
            c = in(reg) c,
            c2 = in(reg) c.wrapping_add(TILE_ROWS * c_rs),
            crs = in(reg) c_rs * 4,
            o = in(reg) out,
            o2 = in(reg) out.wrapping_add(TILE_ROWS * out_rs),
            ors = in(reg) out_rs * 4,
            s = in(reg) 64usize,
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack)
        );
    }
}
