//! The CPU's f32 fused multiply-add peak, measured: the ceiling any f32 matrix product can
//! reach on this machine, which `benches/peft_compare.py` sets the GEMM-bound cases
//! against (how close PyTorch's products run to it, and how close lorakit's would have to
//! run to be 0.9 × PEFT's time).
//!
//! Each thread runs twelve independent chains of FMA instructions on the widest vectors the
//! CPU reports (AVX-512F: 16 lanes; AVX2 + FMA: 8), enough chains to cover the
//! instruction's latency on two FMA units; the best of five runs (~0.1 s each at AVX-512
//! speeds) counts.
//! Prints one JSON object: `{"isa", "lanes", "threads", "gflops", "gflops_one_thread"}`.
//!
//! ```text
//! cargo run --release --example fma_peak -- [--threads 2] [--isa avx2]
//! ```
//!
//! `--isa avx2` measures the AVX2 + FMA peak on a CPU that has AVX-512 too.
//!
//! x86-64 only; elsewhere (or without FMA) it says so and exits with an error.

use std::hint::black_box;
use std::time::Instant;

/// FMA instructions per chain and run.
const ITERATIONS: u64 = 60_000_000;
/// Independent accumulators.
const CHAINS: usize = 12;
/// Runs per thread count; the fastest counts.
const RUNS: usize = 5;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut avx2_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--threads" => {
                let value = args.next().ok_or("--threads needs a value")?;
                threads = value
                    .parse()
                    .map_err(|_| format!("--threads {value}: not a count"))?;
            }
            "--isa" => match args.next().as_deref() {
                Some("avx2") => avx2_only = true,
                other => {
                    let other = other.unwrap_or("(none)");
                    return Err(format!("--isa {other}: only `avx2` can be chosen"));
                }
            },
            "-h" | "--help" => {
                println!("usage: fma_peak [--threads N] [--isa avx2]");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    if threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    let (isa, lanes) =
        widest(avx2_only).ok_or("no AVX-512F or AVX2 + FMA on this CPU (x86-64 only)")?;
    let one = best_gflops(1, lanes);
    let all = best_gflops(threads, lanes);
    println!(
        "{{\"isa\": \"{isa}\", \"lanes\": {lanes}, \"threads\": {threads}, \"gflops\": {all:.1}, \
         \"gflops_one_thread\": {one:.1}}}"
    );
    Ok(())
}

/// The widest FMA vectors this CPU has (AVX2 at most with `avx2_only`): (name, f32 lanes).
fn widest(avx2_only: bool) -> Option<(&'static str, usize)> {
    #[cfg(target_arch = "x86_64")]
    {
        if !avx2_only && is_x86_feature_detected!("avx512f") {
            return Some(("avx512f", 16));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Some(("avx2+fma", 8));
        }
    }
    let _ = avx2_only;
    None
}

/// The best GFLOP/s of `RUNS` runs with `threads` threads at once.
fn best_gflops(threads: usize, lanes: usize) -> f64 {
    let flops = (ITERATIONS * CHAINS as u64 * lanes as u64 * 2 * threads as u64) as f64;
    (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| black_box(chains(lanes)));
                }
            });
            flops / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// Runs the chains on `lanes`-wide vectors; returns their sum (so none is optimized away).
fn chains(lanes: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `widest` detected the instruction set of the function called.
        if lanes == 16 {
            return unsafe { chains_avx512() };
        }
        return unsafe { chains_avx2() };
    }
    #[allow(unreachable_code)]
    {
        let _ = lanes;
        0.0
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chains_avx512() -> f32 {
    use std::arch::x86_64::*;
    let x = _mm512_set1_ps(black_box(0.999_999));
    let y = _mm512_set1_ps(black_box(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..ITERATIONS {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, x, y);
        }
    }
    let sum = acc
        .iter()
        .fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
    _mm512_reduce_add_ps(sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains_avx2() -> f32 {
    use std::arch::x86_64::*;
    let x = _mm256_set1_ps(black_box(0.999_999));
    let y = _mm256_set1_ps(black_box(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    for _ in 0..ITERATIONS {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, x, y);
        }
    }
    let sum = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    lanes.iter().sum()
}
