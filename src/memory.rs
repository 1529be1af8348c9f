//! Opt-in allocator tuning for training processes: keep freed large buffers resident.
//!
//! A training step allocates and frees the same few large buffers every step (the layer
//! output, candle's gradient accumulators (a zero tensor plus the sum, per gradient),
//! `dx`, ...: 2 MiB each at 512 rows of 1024 f32). glibc's `malloc` serves blocks above its mmap threshold (128 KiB at start)
//! with a fresh `mmap` and gives them back to the kernel on `free`, so each such block
//! costs one minor page fault per 4 KiB page when it is next written, every step. glibc
//! raises the threshold by itself after the first frees of such blocks, and trims the top
//! of its heap above twice that, so a fresh process keeps faulting for several steps and
//! again whenever the heap shrinks. PyTorch avoids this with its caching allocator.
//!
//! lorakit does not change process-wide allocator settings by itself: a library cannot
//! know what else the process does. [`retain_freed_buffers`] is the opt-in for programs
//! that train (the `finetune` example calls it at start): it fixes glibc's mmap threshold at
//! [`RETAINED_BUFFER_BYTES`] and its trim threshold at [`RETAINED_HEAP_BYTES`], so freed
//! buffers up to 32 MiB stay in the heap for the next step (and the heap keeps what a step
//! frees, up to 2 GiB), and makes every thread
//! allocate from that one heap (one arena): a thread other than the main one otherwise
//! gets an arena of its own, made of 64 MiB heaps that glibc maps and unmaps as they fill
//! and empty. That matters since the training loop runs on one of rayon's workers
//! ([`crate::threads::on_worker`]): there, without the single arena, the Llama benchmark's
//! step faulted in ~4,400 pages per step instead of ~90 (Intel Xeon, 2 threads).
//! `benches/step_faults.rs` measures minor page faults per step with and without it.
//!
//! The fused ops' own work buffers (saved intermediates and backward temporaries) are
//! reused across steps regardless of this setting (a small bounded pool inside
//! [`crate::kernels`]); the outputs and the gradients candle accumulates are ordinary
//! candle tensors, which this setting is for.
//!
//! ```
//! // In a training program's `main`, before the first step:
//! let applied = lorakit::memory::retain_freed_buffers();
//! // glibc on Linux: the thresholds are set; elsewhere nothing changes.
//! assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
//! ```

/// Blocks up to this size (32 MiB, glibc's ceiling for the mmap threshold on 64-bit
/// systems) come from the heap and stay there when freed, after
/// [`retain_freed_buffers`]. Larger ones are still mapped and unmapped per allocation.
pub const RETAINED_BUFFER_BYTES: usize = 32 << 20;

/// Free memory at the top of the heap that glibc keeps instead of returning it to the
/// kernel, after [`retain_freed_buffers`]: 2 GiB − 1 byte, the largest value `mallopt`
/// takes. A training step frees at its end most of what it allocated and allocates it
/// again in the next step, so what is kept is what the next step uses: the peak resident
/// memory stays what the step needs, only it is not given back between steps. A smaller
/// threshold (256 MiB until 2026-12-03) let glibc return a larger step's memory every
/// step: a BERT classifier's LoRA step (4 layers × 512, batch 16 × 128, ~1 GiB at its
/// peak) faulted 150,000–190,000 pages per step in again and took 1,063 instead of 891–897 ms
/// (Intel Xeon, 2 threads), its peak resident memory 1,054 against 1,091 MiB.
pub const RETAINED_HEAP_BYTES: usize = (1 << 31) - 1;

/// Opt-in: tells the C allocator (glibc on Linux) to keep freed buffers of up to
/// [`RETAINED_BUFFER_BYTES`] in the process and up to [`RETAINED_HEAP_BYTES`] of free heap
/// top, so a training step does not fault in fresh pages for buffers the last step freed.
///
/// Process-wide (`mallopt(M_MMAP_THRESHOLD)`, `mallopt(M_TRIM_THRESHOLD)` and
/// `mallopt(M_ARENA_MAX, 1)`), and it turns off glibc's own threshold adjustment; call it
/// once, early, from a program that trains, before it starts threads (a thread that has
/// allocated already keeps its own arena). The cost is resident memory: freed blocks are
/// kept for reuse rather than returned to the system; and threads that allocate at the same
/// time take turns on the one heap's lock (a training step's allocations are few and
/// large). Returns whether the settings were applied (`false` on other platforms and C
/// libraries, where it does nothing).
pub fn retain_freed_buffers() -> bool {
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    let (Ok(mmap), Ok(trim)) = (
        libc::c_int::try_from(RETAINED_BUFFER_BYTES),
        libc::c_int::try_from(RETAINED_HEAP_BYTES),
    ) else {
        return false;
    };
    // SAFETY: `mallopt` only changes allocator parameters; both values are in the ranges
    // glibc accepts (it returns 0 for one it rejects).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1
            && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}
