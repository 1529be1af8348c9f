//! The fused kernels against the f64 product with candle's dequantized weight, for each
//! covered type, every instruction set the CPU has (portable, AVX2, AVX-512F; the ones it
//! lacks named in a message), and 1 ..= 4 input rows.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::{Isa, RowDots, MAX_X_ROWS};

const TYPES: [GgmlDType; 4] = [
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Deterministic values in about `[-scale, scale]`, with a nonzero mean (so that the
/// k-quants' minimums matter).
fn values(len: usize, seed: f64, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as f64 * 0.7548776662 + seed).fract() as f32 * 2.0 - 0.8) * scale)
        .collect()
}

/// `(blocks, dequantized W)` of a `(d_out, d_in)` weight quantized to `ty`.
fn quantized(ty: GgmlDType, d_out: usize, d_in: usize) -> (Vec<u8>, Vec<f32>) {
    let w = Tensor::from_vec(values(d_out * d_in, 0.31, 1.5), (d_out, d_in), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, ty).unwrap();
    let deq = q.dequantize(&Device::Cpu).unwrap();
    let deq = deq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (q.data().unwrap().into_owned(), deq)
}

/// `k.run` with the input sums the kernel reads, computed as the caller does.
fn run(k: &RowDots, blocks: &[u8], xs: &[&[f32]], out: &mut [f32]) -> candle_core::Result<()> {
    let sums = k.input_sums(xs);
    let sums: Vec<&[f32]> = sums.iter().map(Vec::as_slice).collect();
    k.run(blocks, xs, &sums, out)
}

fn isas() -> Vec<Isa> {
    let isas = Isa::up_to(Isa::best());
    if !isas.contains(&Isa::Avx512) {
        println!(
            "fused quantized kernels tested on {isas:?} only (not on this CPU or not allowed)"
        );
    }
    isas
}

#[test]
fn fused_dots_equal_the_dequantized_f64_product() {
    let (d_out, d_in) = (5, 512);
    for ty in TYPES {
        let (blocks, w) = quantized(ty, d_out, d_in);
        for isa in isas() {
            for n in 1..=MAX_X_ROWS {
                let k = RowDots::new(ty, d_in, n, isa).unwrap();
                assert_eq!(k.row_bytes() * d_out, blocks.len());
                let x: Vec<Vec<f32>> = (0..n)
                    .map(|i| values(d_in, 0.17 * i as f64 + 0.05, 1.0))
                    .collect();
                let xs: Vec<&[f32]> = x.iter().map(Vec::as_slice).collect();
                let mut out = vec![f32::NAN; d_out * n];
                run(&k, &blocks, &xs, &mut out).unwrap();
                let mut worst = 0f64;
                for (j, wr) in w.chunks(d_in).enumerate() {
                    for (i, xr) in x.iter().enumerate() {
                        let want: f64 = xr
                            .iter()
                            .zip(wr)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum();
                        let scale: f64 = xr
                            .iter()
                            .zip(wr)
                            .map(|(&a, &b)| f64::from(a * b).abs())
                            .sum();
                        let got = f64::from(out[j * n + i]);
                        worst = worst.max((got - want).abs() / scale);
                    }
                }
                assert!(
                    worst <= 1e-6,
                    "{ty:?}, {isa:?}, {n} rows: relative error {worst:e}"
                );
            }
        }
    }
}

/// The split into row ranges (the threads' tasks) does not change any output bit.
#[test]
fn row_ranges_give_the_same_bits() {
    let (d_out, d_in, n) = (7, 256, 3);
    let x: Vec<Vec<f32>> = (0..n).map(|i| values(d_in, 0.3 * i as f64, 2.0)).collect();
    let xs: Vec<&[f32]> = x.iter().map(Vec::as_slice).collect();
    for ty in TYPES {
        let (blocks, _) = quantized(ty, d_out, d_in);
        for isa in isas() {
            let k = RowDots::new(ty, d_in, n, isa).unwrap();
            let mut whole = vec![0f32; d_out * n];
            run(&k, &blocks, &xs, &mut whole).unwrap();
            let mut split = vec![0f32; d_out * n];
            let (b0, b1) = blocks.split_at(3 * k.row_bytes());
            let (o0, o1) = split.split_at_mut(3 * n);
            run(&k, b0, &xs, o0).unwrap();
            run(&k, b1, &xs, o1).unwrap();
            assert_eq!(whole, split, "{ty:?}, {isa:?}");
        }
    }
}

#[test]
fn uncovered_types_and_bad_lengths_are_refused() {
    assert!(RowDots::new(GgmlDType::Q4_0, 64, 1, Isa::Portable).is_none());
    assert!(RowDots::new(GgmlDType::Q4K, 320, 1, Isa::Portable).is_none());
    assert!(RowDots::new(GgmlDType::Q8_0, 64, MAX_X_ROWS + 1, Isa::Portable).is_none());
    let k = RowDots::new(GgmlDType::Q8_0, 64, 2, Isa::Portable).unwrap();
    let x = vec![0f32; 64];
    let mut out = vec![0f32; 2];
    let blocks = vec![0u8; k.row_bytes()];
    assert!(k.run(&blocks, &[&x], &[], &mut out).is_err()); // one input row, not two
    assert!(k.run(&blocks[1..], &[&x, &x], &[], &mut out).is_err()); // part of a row
    assert!(k.run(&blocks, &[&x, &x[1..]], &[], &mut out).is_err()); // a short input row
    assert!(k.run(&blocks, &[&x, &x], &[&x], &mut out).is_err()); // sums it does not read
    assert!(k.run(&blocks, &[&x, &x], &[], &mut out).is_ok());
    for isa in isas().into_iter().filter(|&isa| isa >= Isa::Avx2) {
        // The in-place Q4_K kernel reads 8 group sums per row of 256 values.
        let k = RowDots::new(GgmlDType::Q4K, 256, 1, isa).unwrap();
        let (x, sums) = (vec![0f32; 256], [0f32; 8]);
        let blocks = vec![0u8; k.row_bytes()];
        let mut out = [0f32];
        assert!(k.run(&blocks, &[&x], &[], &mut out).is_err()); // no sums
        assert!(k.run(&blocks, &[&x], &[&sums[1..]], &mut out).is_err()); // short sums
        assert!(k.run(&blocks, &[&x], &[&sums], &mut out).is_ok());
    }
}
