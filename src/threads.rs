//! Where a training or decoding loop runs, and how candle's element-wise workers wait:
//! [`on_worker`] runs a loop on one of rayon's worker threads, so each matrix product
//! does not hand its work to sleeping workers and wait for them (lorakit's own loops do
//! this); [`park_idle_elementwise_workers`] (opt-in) makes candle's element-wise workers
//! park soon after their work instead of spinning through the next matrix product.
//!
//! candle 0.11 runs its large element-wise ops (adds, multiplies, the gradient sums of its
//! backward) on a pool of `CANDLE_NUM_THREADS − 1` worker threads. After each op a worker
//! spins for `CANDLE_BARRIER_POOL_SPIN_LIMIT` rounds (25,000 by default, a fraction of a
//! millisecond) before it parks. Matrix products run on a second pool (rayon's, sized to
//! all cores as well), so in a training step, where element-wise ops and products
//! alternate, the spinning workers take cores away from the product that follows. On an
//! AMD EPYC with 2 cores, candle's default spin made the Llama benchmark's training step
//! 4–10% slower, nearly all of it in the backward (`benches/LLAMA_SPEED.md`, "candle's
//! spinning element-wise workers").
//!
//! [`park_idle_elementwise_workers`] sets a short spin, [`SHORT_SPIN_LIMIT`] rounds, about as
//! long as waking a parked thread takes. An op that follows at once still finds its workers
//! awake; a worker that would wait through a product parks before it takes a measurable
//! share of a core. Generation (decoding) is not affected: its element-wise ops are too
//! small for candle's pool.
//!
//! **With the `mkl` feature** the products run on MKL, whose Intel OpenMP workers spin for
//! `KMP_BLOCKTIME` (200 ms by default) after each call: through every element-wise op and
//! every product of the `gemm` crate that follows, on the cores those need. The same call
//! sets [`MKL_BLOCKTIME_VARIABLE`] to `0` (park at once) unless it is set already. On an
//! Intel Xeon with 2 cores the `mkl` build's Llama benchmark trained 2,748–2,814 tokens/s
//! with it and 2,544–2,737 without, three alternating pairs (`benches/LLAMA_SPEED.md`,
//! "Intel Xeon, 2026-12-03").
//!
//! lorakit does not change the spin by itself: the setting is an environment variable that
//! candle reads once, and a library cannot know what else the process does. Call
//! [`park_idle_elementwise_workers`] at the start of a program that trains (the `finetune`
//! example and the Llama benchmark do).
//!
//! ```
//! // First thing in a training program's `main`:
//! let set_here = lorakit::threads::park_idle_elementwise_workers();
//! // `false` when CANDLE_BARRIER_POOL_SPIN_LIMIT was set already (it is left as it is).
//! let value = std::env::var(lorakit::threads::SPIN_LIMIT_VARIABLE).unwrap();
//! assert!(!set_here || value == lorakit::threads::SHORT_SPIN_LIMIT.to_string());
//! ```

/// Runs `f` on one of rayon's worker threads and returns what it returns: inline when the
/// calling thread is a worker already, else on the global pool, the caller waiting.
///
/// lorakit's products and its own kernels split their work over rayon's pool (candle's
/// `gemm` calls too). Called from a thread outside the pool — a program's main thread —
/// each of those hands its work to the workers and puts the caller to sleep until they
/// are done; between two products the workers fall asleep too, so every product of a
/// training step or of a generated token pays two thread wake-ups before and after it runs.
/// Run from a worker, a product splits its work between the calling worker and the others,
/// which are often still awake from the product before. On an Intel Xeon with 2 threads
/// the Llama benchmark trained at 2,580–2,645 tokens/s instead of 2,149–2,322 (~4,000
/// context switches per step before, ~850 after) and generated 301–322 tokens/s instead
/// of 169–201 (`benches/LLAMA_SPEED.md`, "Running on rayon's workers"; with
/// [`crate::memory::retain_freed_buffers`], which keeps a worker's freed buffers too).
/// PyTorch's OpenMP runs a parallel region on the calling thread and its team in the same
/// way.
///
/// lorakit's own loops run on a worker already: [`crate::finetune::Trainer`]'s steps and
/// evaluation, the models' `generate` and `generate_batch`. Wrap your own training or
/// decoding loop (forward, `backward`, optimizer step) in it:
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_nn::Module;
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let x = Tensor::randn(0f32, 1.0, (64, 32), &dev)?;
/// let w = Tensor::randn(0f32, 1.0, (16, 32), &dev)?;
/// let layer = candle_nn::Linear::new(w, None);
/// let sum = lorakit::threads::on_worker(|| -> lorakit::Result<f32> {
///     let mut sum = 0.0;
///     for _ in 0..3 {
///         sum += layer.forward(&x)?.sum_all()?.to_scalar::<f32>()?;
///     }
///     Ok(sum)
/// })?;
/// assert!(sum.is_finite());
/// # Ok(()) }
/// ```
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

/// The variable candle's element-wise pool reads its spin limit from, once, when the pool
/// starts (at the first large element-wise op).
pub const SPIN_LIMIT_VARIABLE: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// The spin [`park_idle_elementwise_workers`] sets: 200 rounds of the CPU's spin-wait hint,
/// a few microseconds, the order of a thread wake-up. On the AMD EPYC measured, 0, 200 and
/// 2,000 gave the same training speed within noise, and candle's 25,000 was 4–10% slower.
pub const SHORT_SPIN_LIMIT: u32 = 200;

/// The variable Intel's OpenMP runtime (MKL's threads, `mkl` feature) reads its workers'
/// spin time from, in milliseconds, once, at its first parallel region.
pub const MKL_BLOCKTIME_VARIABLE: &str = "KMP_BLOCKTIME";

/// Opt-in: makes candle's element-wise workers spin [`SHORT_SPIN_LIMIT`] rounds after each
/// op before they park, unless [`SPIN_LIMIT_VARIABLE`] is set already (a user's own value
/// wins). Returns whether it set the variable. In a build with the `mkl` feature it also
/// sets [`MKL_BLOCKTIME_VARIABLE`] to `0` unless it is set (the module docs).
///
/// Call it first thing in `main`: candle reads the variable once, when its pool starts, so
/// a call after the first large element-wise op has no effect; and setting an environment
/// variable is only sound while no other thread reads the environment, so call it before
/// the program starts threads.
pub fn park_idle_elementwise_workers() -> bool {
    #[cfg(feature = "mkl")]
    if std::env::var_os(MKL_BLOCKTIME_VARIABLE).is_none() {
        std::env::set_var(MKL_BLOCKTIME_VARIABLE, "0");
    }
    if std::env::var_os(SPIN_LIMIT_VARIABLE).is_some() {
        return false;
    }
    std::env::set_var(SPIN_LIMIT_VARIABLE, SHORT_SPIN_LIMIT.to_string());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From a thread outside the pool, `f` runs on a worker and its value (an error too)
    /// comes back; from a worker, it runs on that same thread.
    #[test]
    fn on_worker_runs_on_a_worker_inline_when_on_one() {
        assert_eq!(rayon::current_thread_index(), None);
        let outer = on_worker(|| (rayon::current_thread_index(), std::thread::current().id()));
        assert!(outer.0.is_some(), "not run on a rayon worker");
        assert_ne!(outer.1, std::thread::current().id());
        let (worker, inner) = on_worker(|| {
            let here = std::thread::current().id();
            (here, on_worker(|| std::thread::current().id()))
        });
        assert_eq!(worker, inner, "a nested call left its worker");
        let failed: Result<(), String> = on_worker(|| Err("refused".to_string()));
        assert_eq!(failed, Err("refused".to_string()));
    }

    /// With `mkl`, Intel OpenMP's workers are told to park at once, unless the
    /// environment chose already.
    #[cfg(feature = "mkl")]
    #[test]
    fn mkl_workers_park_at_once() {
        let before = std::env::var(MKL_BLOCKTIME_VARIABLE).ok();
        park_idle_elementwise_workers();
        let after = std::env::var(MKL_BLOCKTIME_VARIABLE).ok();
        assert_eq!(after.as_deref(), Some(before.as_deref().unwrap_or("0")));
    }
}
