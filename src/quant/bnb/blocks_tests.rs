//! Tests of [`super::Bnb4Blocks`]: its storage, dequantization and quantization.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::quant::bnb::Bnb4Type;

/// The fixture folder `tests/fixtures/bnb/<case>/<file>`.
fn fixture(case: &str, file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bnb")
        .join(case)
        .join(file)
}

/// The float weights bitsandbytes quantized into each fixture checkpoint give the codes
/// it stored (and, without double quantization, its block scales) bit for bit.
#[test]
fn quantizing_gives_the_codes_and_scales_bitsandbytes_stored() {
    for (case, quant_type) in [("nf4_dq", Bnb4Type::Nf4), ("fp4_f16", Bnb4Type::Fp4)] {
        let stored: HashMap<String, Tensor> =
            candle_core::safetensors::load(fixture(case, "model/model.safetensors"), &Device::Cpu)
                .unwrap();
        let originals: HashMap<String, Tensor> =
            candle_core::safetensors::load(fixture(case, "originals.safetensors"), &Device::Cpu)
                .unwrap();
        assert_eq!(originals.len(), 2);
        for (name, w) in &originals {
            let values: Vec<f32> = w
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let shape = w.dims2().unwrap();
            let mine = Bnb4Blocks::quantize(&values, shape, quant_type, w.dtype()).unwrap();
            let codes: Vec<u8> = stored[name].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(mine.packed, codes, "{case} {name}: codes");
            let scales = &stored[&format!("{name}.absmax")];
            if scales.dtype() == DType::F32 {
                // Without double quantization, the block scales as stored.
                let scales: Vec<f32> = scales.to_vec1().unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&mine.absmax), bits(&scales), "{case} {name}: scales");
            }
        }
    }
}

/// The bf16 rounding equals `half`'s on finite values: every exponent, the mantissas
/// at and around the halfway points, and the largest values (which carry to infinity).
#[test]
fn bf16_rounding_is_halfs() {
    let mut checked = 0;
    for exponent in 0..255u32 {
        for low in [
            0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1_7fff, 0x1_8000, 0x7f_ffff,
        ] {
            for sign in [0u32, 1 << 31] {
                let v = f32::from_bits(sign | (exponent << 23) | low);
                let want = half::bf16::from_f32(v).to_f32();
                assert_eq!(round_to_bf16(v).to_bits(), want.to_bits(), "{v:e}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 255 * 9 * 2);
}

/// `7 × 200` normal values times `factor`.
fn normal_values(factor: f32) -> Vec<f32> {
    let mut g = crate::init::SeededRng::new(5);
    let w = g
        .normal((7, 200), 0.0, 1.0, DType::F32, &Device::Cpu)
        .unwrap();
    let values: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    values.into_iter().map(|v| v * factor).collect()
}

/// The AVX2 expansion gives the portable values bit for bit, for every dtype, code
/// book and range (whole blocks, a partial block before and after, ranges inside one
/// block, odd starts), at scales where f16 rounds to subnormals (1e-6) and overflows
/// (1e5); without AVX2 the same range runs portably.
#[test]
fn vector_expansion_equals_the_portable_one() {
    if Lanes::best(Lanes::Avx2) != Lanes::Avx2 {
        eprintln!("no AVX2 + FMA + F16C on this CPU: the vector expansion is not compared");
    }
    for (dtype, factor) in [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .flat_map(|d| [1.0, 1e-6, 1e5].map(|f| (d, f)))
    {
        let values = normal_values(factor);
        for quant_type in [Bnb4Type::Nf4, Bnb4Type::Fp4] {
            let blocks = Bnb4Blocks::quantize(&values, (7, 200), quant_type, dtype).unwrap();
            for (start, len) in [
                (0, 1400),
                (0, 200),
                (200, 200),
                (13, 700),
                (64, 128),
                (70, 30),
                (1399, 1),
                (1, 1398),
            ] {
                let (mut a, mut b) = (vec![0f32; len], vec![1f32; len]);
                assert!(blocks.dequantize_into(start, &mut a, Lanes::Portable));
                assert!(blocks.dequantize_into(start, &mut b, Lanes::best(Lanes::Avx2)));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let case = format!("{dtype:?} ×{factor} {quant_type:?} {start}+{len}");
                assert_eq!(bits(&a), bits(&b), "{case}");
            }
        }
    }
}

/// The AVX2 dots over whole blocks equal an `f64` dot of the portable values (to f32
/// rounding of the sum), for every dtype and up to four rows; without AVX2 they decline.
#[test]
fn vector_dots_equal_a_dot_of_the_portable_values() {
    let avx2 = Lanes::best(Lanes::Avx2) == Lanes::Avx2;
    let values = normal_values(1.0);
    let xs: Vec<Vec<f32>> = (1..=4)
        .map(|r| (0..1400).map(|k| ((k * r) as f32 * 0.37).sin()).collect())
        .collect();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for quant_type in [Bnb4Type::Nf4, Bnb4Type::Fp4] {
            let blocks = Bnb4Blocks::quantize(&values, (7, 200), quant_type, dtype).unwrap();
            let mut w = vec![0f32; 1400];
            assert!(blocks.dequantize_into(0, &mut w, Lanes::Portable));
            for (start, len, rows) in [(0, 1344, 4), (64, 128, 1), (128, 640, 3)] {
                let rows: Vec<&[f32]> = xs.iter().take(rows).map(|x| &x[..len]).collect();
                let mut out = vec![f32::NAN; rows.len()];
                let did = blocks.dots(start, &rows, &mut out, Lanes::best(Lanes::Avx2));
                assert_eq!(did, avx2, "{dtype:?} {quant_type:?} {start}+{len}");
                if !did {
                    continue;
                }
                for (x, got) in rows.iter().zip(&out) {
                    let terms = || {
                        x.iter()
                            .zip(&w[start..])
                            .map(|(&a, &b)| a as f64 * b as f64)
                    };
                    let (want, size) = (terms().sum::<f64>(), terms().map(f64::abs).sum::<f64>());
                    let err = (*got as f64 - want).abs();
                    assert!(
                        err <= 1e-6 * size,
                        "{dtype:?} {quant_type:?}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// A block of code values times a scale quantizes to exactly those values; a last,
/// partial block and an odd count are padded as bitsandbytes pads; non-finite values
/// and wrong sizes are refused.
#[test]
fn code_values_round_trip_and_bad_input_is_refused() {
    for quant_type in [Bnb4Type::Nf4, Bnb4Type::Fp4] {
        let code = quant_type.code();
        // 3 rows of 45: two whole blocks and one of 7.
        let values: Vec<f32> = (0..135).map(|i| code[(i * 7) % 16] * 0.75).collect();
        let blocks = Bnb4Blocks::quantize(&values, (3, 45), quant_type, DType::F32).unwrap();
        assert_eq!((blocks.packed.len(), blocks.absmax.len()), (68, 3));
        let mut out = vec![0f32; 135];
        assert!(blocks.dequantize_into(0, &mut out, Lanes::Portable));
        assert_eq!(out, values, "{quant_type:?}");
        // Rows of 45 start on odd values too.
        for (r, want) in values.chunks(45).enumerate() {
            let mut row = vec![0f32; 45];
            assert!(blocks.dequantize_into(r * 45, &mut row, Lanes::Portable));
            assert_eq!(row, want, "{quant_type:?} row {r}");
        }
        assert!(!blocks.dequantize_into(100, &mut out, Lanes::Portable));
        let nan = [f32::NAN; 4];
        let err = Bnb4Blocks::quantize(&nan, (2, 2), quant_type, DType::F32).unwrap_err();
        assert!(err.contains("not finite"), "{err}");
        assert!(Bnb4Blocks::quantize(&values, (2, 2), quant_type, DType::F32).is_err());
    }
}
