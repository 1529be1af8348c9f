//! The fused CPU kernels give bit-identical outputs and gradients whatever the thread
//! count: every GEMM computes each output element over the whole inner dimension, and the
//! column sums behind DoRA's and VeRA's vector gradients add fixed 32-row blocks in block
//! order (`src/kernels/cpu/rowwise.rs`), not in the order rayon's work stealing happens to
//! finish them.
//!
//! - In one process: each variant runs inside a one-thread and a three-thread rayon pool
//!   (how rayon splits the row-wise passes and the chunked products).
//! - Across processes: the test binary reruns itself with `RAYON_NUM_THREADS` = 1 and 3
//!   (which also sets how `gemm` partitions its products) and compares fingerprints.
//!
//! The shapes take every column-major route (chunked `x Wᵀ` at 100 and 200 rows; the
//! transposed route at 20 rows, its output rows split over the threads, and at 12 rows
//! where a vector holds 8 `f32` (AVX2); the decode kernel at 3 rows, and at 12 with
//! AVX-512, its output columns split over the threads; the low-rank products' rows split
//! over the threads at 200 rows × 384 × 400, `src/kernels/cpu/thin.rs`, and not at 150
//! rows on three threads, where a part of 50 rows would take the `gemm` crate's small-product
//! shortcut and its other blocking of the 600-deep products) and span several 32-row blocks.
//! The rank is 8, and 4 and 16 at 200 × 384 × 400 once more: the low-rank products fewer
//! than a vector's lanes wide (`x Aᵀ`, `g B`, `dB`) run on the decode kernel, transposed
//! (`src/kernels/cpu/gemv/transposed.rs`), at ranks 4 and 8 with AVX-512 and at 4 with
//! AVX2; the others (`(x Aᵀ) Bᵀ`, `(g B) A`), those at r = 8 with AVX2 and those at
//! r = 16 split their rows (`x Aᵀ` after copying `Aᵀ` row-major, where one thread hands
//! the `gemm` crate the column-major view).
//!
//! Under `--features openblas` the cross-process test is ignored: OpenBLAS, which then runs
//! most of the products, partitions them by its thread count (set from
//! `RAYON_NUM_THREADS`, not from the rayon pool a call runs in: `src/kernels/cpu/blas.rs`),
//! and its results differ in the last bits between 1 and 3 threads. The in-process test
//! still holds there. With `mkl` both passed on an AMD EPYC Zen 4 (2026-12-07).

use std::process::Command;

use crate::common::bit_identical;
use crate::props_support::*;
use candle_core::Tensor;
use lorakit::Adapter;

/// `(rows, d_in, d_out, r)` of the cases.
const SHAPES: [(usize, usize, usize, usize); 9] = [
    (100, 48, 150, 8),
    (12, 40, 520, 8),
    (20, 640, 800, 8),
    (200, 96, 300, 8),
    (3, 72, 520, 8),
    (200, 384, 400, 8),
    (200, 384, 400, 4),
    (200, 384, 400, 16),
    (150, 600, 400, 8),
];

/// Set in the child processes of the cross-process test.
const CHILD_ENV: &str = "LORAKIT_DETERMINISM_CHILD";

/// Every variant with a fused kernel of its own, on every shape: the layer (trainable
/// tensors random) and its input.
fn cases() -> lorakit::Result<Vec<(String, Built, Tensor)>> {
    let mut out = Vec::new();
    for variant in [Variant::Lora, Variant::Dora, Variant::Vera] {
        for (rows, d_in, d_out, r) in SHAPES {
            let case = Case {
                d_in,
                d_out,
                r,
                lead: vec![rows],
                bias: true,
                rslora: false,
                alpha: 2.0 * r as f64,
                seed: 7,
            };
            let built = build(variant, &case)?;
            randomize(&*built.layer.read(), 11)?;
            let name = format!("{variant:?} {rows}x{d_in}->{d_out} r{r}");
            out.push((name, built, case.input()?));
        }
    }
    Ok(out)
}

/// The layer's output and the gradients of `Σ y ⊙ g` for the input and every trainable
/// variable, in the order of `trainable_vars`.
fn outputs(layer: &dyn Adapter, x: &Tensor) -> lorakit::Result<Vec<Tensor>> {
    let x = candle_core::Var::from_tensor(x)?;
    let y = layer.forward_t(x.as_tensor(), true)?;
    let g = Tensor::ones_like(&y)?.cumsum(y.rank() - 1)?.sin()?;
    let grads = (&y * &g)?.sum_all()?.backward()?;
    let mut out = vec![
        y,
        grads.get(x.as_tensor()).cloned().unwrap_or(x.zeros_like()?),
    ];
    for v in layer.trainable_vars() {
        let grad = grads.get(v.var.as_tensor()).cloned();
        out.push(grad.ok_or_else(|| candle_core::Error::Msg(format!("no grad {}", v.name)))?);
    }
    Ok(out)
}

/// [`outputs`] inside a rayon pool of `threads` threads.
fn outputs_on(layer: &dyn Adapter, x: &Tensor, threads: usize) -> lorakit::Result<Vec<Tensor>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(candle_core::Error::wrap)?;
    pool.install(|| outputs(layer, x))
}

/// FNV-1a over the f32 bits of every tensor.
fn fingerprint(tensors: &[Tensor]) -> lorakit::Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in tensors {
        for v in t.flatten_all()?.to_vec1::<f32>()? {
            h = (h ^ u64::from(v.to_bits())).wrapping_mul(0x100_0000_01b3);
        }
    }
    Ok(h)
}

#[test]
fn outputs_and_gradients_do_not_depend_on_the_pool_size() -> lorakit::Result<()> {
    for (name, built, x) in cases()? {
        let layer = built.layer.read();
        let one = outputs_on(&*layer, &x, 1)?;
        let three = outputs_on(&*layer, &x, 3)?;
        assert_eq!(one.len(), three.len());
        for (i, (a, b)) in one.iter().zip(&three).enumerate() {
            assert!(
                bit_identical(a, b),
                "{name}: tensor {i} differs between pools of 1 and 3 threads"
            );
        }
    }
    Ok(())
}

#[test]
#[cfg_attr(
    feature = "openblas",
    ignore = "OpenBLAS splits its products differently per thread count: its results differ in the last bits"
)]
fn outputs_and_gradients_do_not_depend_on_rayon_num_threads() -> lorakit::Result<()> {
    const NAME: &str = "outputs_and_gradients_do_not_depend_on_rayon_num_threads";
    if std::env::var_os(CHILD_ENV).is_some() {
        for (name, built, x) in cases()? {
            let out = outputs(&*built.layer.read(), &x)?;
            println!("FINGERPRINT {name}: {:016x}", fingerprint(&out)?);
        }
        return Ok(());
    }
    // The test's name in this binary: its module path without the crate's name.
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let test = format!("{module}::{NAME}");
    let exe = std::env::current_exe().expect("the test binary's path");
    let runs: Vec<Vec<String>> = [1, 3]
        .iter()
        .map(|threads| {
            let out = Command::new(&exe)
                .args(["--exact", &test, "--nocapture", "--test-threads", "1"])
                .env(CHILD_ENV, "1")
                .env("RAYON_NUM_THREADS", threads.to_string())
                .output()
                .expect("the test binary reruns");
            assert!(out.status.success(), "child with {threads} threads failed");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                // The harness's "test … " may precede the first one on its line.
                .filter_map(|l| l.split_once("FINGERPRINT ").map(|(_, f)| f.to_string()))
                .collect()
        })
        .collect();
    assert_eq!(runs[0].len(), 3 * SHAPES.len(), "{runs:?}");
    assert_eq!(runs[0], runs[1], "RAYON_NUM_THREADS = 1 vs 3");
    Ok(())
}
