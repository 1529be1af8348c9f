//! MXFP4-packed expert weights (GPT-OSS's `X_blocks` + `X_scales`) read through the
//! checkpoint API, compared bit for bit with what transformers' `convert_moe_packed_tensors`
//! returns (`tests/fixtures/mxfp4/`, made by `scripts/make_mxfp4_fixture.py`), and the
//! errors for packed tensors that do not fit together.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lorakit::checkpoint::mxfp4::{dequantize_mxfp4, dequantize_mxfp4_f64, dequantized_shape};
use lorakit::checkpoint::Checkpoint;

use crate::peft_common::{assert_bit_identical, fixture, temp_dir};

const GATE_UP_0: &str = "model.layers.0.mlp.experts.gate_up_proj";
const DOWN_0: &str = "model.layers.0.mlp.experts.down_proj";
/// Every byte value, scales 0, 1, 2, 126, 127, 128, 252..255: subnormals and ±inf.
const GATE_UP_1: &str = "model.layers.1.mlp.experts.gate_up_proj";

/// (name, parameter shape [E, K, R]) of the fixture's packed tensors.
const PACKED: [(&str, [usize; 3]); 3] = [
    (GATE_UP_0, [2, 64, 6]),
    (DOWN_0, [2, 96, 64]),
    (GATE_UP_1, [2, 64, 6]),
];

const DTYPES: [(&str, DType); 4] = [
    ("f32", DType::F32),
    ("bf16", DType::BF16),
    ("f16", DType::F16),
    ("f64", DType::F64),
];

fn packed_file() -> PathBuf {
    fixture("mxfp4/packed.safetensors")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("mxfp4/expected.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn var_builder_dequantizes_bit_for_bit_like_transformers() {
    let expected = expected();
    for (tag, dtype) in DTYPES {
        let vb = Checkpoint::open(packed_file())
            .unwrap()
            .var_builder(dtype, &Device::Cpu);
        for (name, shape) in PACKED {
            assert!(vb.contains_tensor(name), "{name}");
            let got = vb.get(&shape, name).unwrap();
            assert_bit_identical(
                &got,
                &expected[&format!("{tag}/{name}")],
                &format!("{tag} {name}"),
            );
        }
        // The model's own path, through prefixes.
        let experts = vb.pp("model.layers.0.mlp.experts");
        let got = experts.get((2, 96, 64), "down_proj").unwrap();
        assert_bit_identical(&got, &expected[&format!("{tag}/{DOWN_0}")], tag);
        // Plain tensors beside the packed ones are read as they are.
        let bias = experts.get((2, 6), "gate_up_proj_bias").unwrap();
        assert_eq!(bias.dtype(), dtype);
        assert!(!experts.contains_tensor("up_proj"));
    }
}

#[test]
fn the_extreme_scales_overflow_and_underflow_as_transformers_does() {
    let expected = expected();
    let f32s = expected[&format!("f32/{GATE_UP_1}")].flatten_all().unwrap();
    let f32s = f32s.to_vec1::<f32>().unwrap();
    assert!(
        f32s.iter().any(|v| v.is_infinite()),
        "the fixture reaches ±inf"
    );
    assert!(
        f32s.iter().any(|v| v.is_subnormal()),
        "the fixture reaches subnormals"
    );
    assert!(
        f32s.iter().all(|v| !v.is_nan()),
        "transformers makes no NaN"
    );
    let f64s = expected[&format!("f64/{GATE_UP_1}")].flatten_all().unwrap();
    assert!(f64s.to_vec1::<f64>().unwrap().iter().all(|v| v.is_finite()));

    let ckpt = Checkpoint::open(packed_file()).unwrap();
    for (tag, dtype) in DTYPES {
        let got = ckpt.load_mxfp4(GATE_UP_1, dtype, &Device::Cpu).unwrap();
        assert_bit_identical(&got, &expected[&format!("{tag}/{GATE_UP_1}")], tag);
    }
}

#[test]
fn the_checkpoint_sees_packed_tensors_under_the_parameter_name() {
    let ckpt = Checkpoint::open(packed_file()).unwrap();
    for (name, shape) in PACKED {
        assert!(!ckpt.contains(name), "the stored names are the parts");
        assert!(ckpt.is_mxfp4(name));
        assert_eq!(ckpt.mxfp4_shape(name).unwrap(), shape);
    }
    assert!(!ckpt.is_mxfp4("model.layers.0.mlp.experts.gate_up_proj_bias"));
    assert!(!ckpt.is_mxfp4("model.layers.2.mlp.experts.gate_up_proj"));
}

#[test]
fn the_pure_function_matches_transformers() {
    let packed = candle_core::safetensors::load(packed_file(), &Device::Cpu).unwrap();
    let expected = expected();
    let bytes = |n: String| {
        let t = &packed[&n];
        (
            t.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
            t.dims().to_vec(),
        )
    };
    for (name, shape) in PACKED {
        let (blocks, bs) = bytes(format!("{name}_blocks"));
        let (scales, ss) = bytes(format!("{name}_scales"));
        assert_eq!(dequantized_shape(name, &bs, &ss).unwrap(), shape);
        let v = dequantize_mxfp4(name, &blocks, &bs, &scales, &ss).unwrap();
        let got = Tensor::from_vec(v, &shape, &Device::Cpu).unwrap();
        assert_bit_identical(&got, &expected[&format!("f32/{name}")], name);
        let v = dequantize_mxfp4_f64(name, &blocks, &bs, &scales, &ss).unwrap();
        let got = Tensor::from_vec(v, &shape, &Device::Cpu).unwrap();
        assert_bit_identical(&got, &expected[&format!("f64/{name}")], name);
    }
}

#[test]
fn a_request_of_another_shape_is_refused_by_name() {
    let vb = Checkpoint::open(packed_file())
        .unwrap()
        .var_builder(DType::BF16, &Device::Cpu);
    // The stored [E, 2I, H/32, 16] layout, not the parameter's [E, H, 2I].
    let err = vb.get((2, 6, 64), GATE_UP_0).unwrap_err().to_string();
    assert!(
        err.contains(GATE_UP_0) && err.contains("packed.safetensors"),
        "{err}"
    );
}

/// A single-file checkpoint of `tensors` under `dir`.
fn write(dir: &Path, file: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let path = dir.join(file);
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

fn u8s(shape: &[usize]) -> Tensor {
    let n = shape.iter().product::<usize>();
    let v: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

const X: &str = "model.layers.0.mlp.experts.gate_up_proj";

/// Reading `X` from `path` fails with one line containing `needles`, directly and through a
/// var builder (whose candle error may carry a backtrace after that line).
fn refused(path: &Path, needles: &[&str]) {
    let ckpt = Checkpoint::open(path).unwrap();
    let direct = ckpt
        .load_mxfp4(X, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(!direct.contains('\n'), "one line: {direct}");
    let vb = ckpt.var_builder(DType::BF16, &Device::Cpu);
    let via_vb = vb.get((2, 64, 6), X).unwrap_err().to_string();
    let via_vb = via_vb.lines().next().unwrap_or_default().to_string();
    for err in [direct, via_vb] {
        for n in needles {
            assert!(err.contains(n), "`{n}` not in: {err}");
        }
    }
}

#[test]
fn packed_parts_that_do_not_fit_are_refused_by_name() {
    let dir = temp_dir("mxfp4-bad");
    let blocks = (format!("{X}_blocks"), u8s(&[2, 6, 2, 16]));

    let wrong_scales = write(
        &dir,
        "wrong_scales.safetensors",
        &[
            (&blocks.0, blocks.1.clone()),
            (&format!("{X}_scales"), u8s(&[2, 6, 3])),
        ],
    );
    refused(
        &wrong_scales,
        &[
            &format!("{X}_scales"),
            "[2, 6, 2]",
            "[2, 6, 3]",
            "wrong_scales",
        ],
    );

    let missing_scales = write(
        &dir,
        "missing_scales.safetensors",
        &[(&blocks.0, blocks.1.clone())],
    );
    refused(
        &missing_scales,
        &[
            &format!("{X}_scales"),
            &format!("{X}_blocks"),
            "missing_scales",
        ],
    );
    let vb = Checkpoint::open(&missing_scales)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    assert!(
        vb.contains_tensor(X),
        "half a pair is an error when read, not a missing tensor"
    );

    let scales_u32 = u8s(&[2, 6, 2]).to_dtype(DType::U32).unwrap();
    let wide_scales = write(
        &dir,
        "wide_scales.safetensors",
        &[
            (&blocks.0, blocks.1.clone()),
            (&format!("{X}_scales"), scales_u32),
        ],
    );
    refused(&wide_scales, &[&format!("{X}_scales"), "U32", "U8"]);

    let flat_blocks = write(
        &dir,
        "flat_blocks.safetensors",
        &[
            (&blocks.0, u8s(&[2, 6, 32])),
            (&format!("{X}_scales"), u8s(&[2, 6])),
        ],
    );
    refused(
        &flat_blocks,
        &[&format!("{X}_blocks"), "4 dims", "[2, 6, 32]"],
    );
}

#[test]
fn the_pure_function_refuses_inconsistent_input_by_name() {
    let name = "experts.down_proj";
    let (blocks, scales) = (vec![0u8; 2 * 3 * 16], vec![127u8; 2 * 3]);
    let ok = dequantize_mxfp4(name, &blocks, &[2, 3, 1, 16], &scales, &[2, 3, 1]).unwrap();
    assert_eq!(ok.len(), 2 * 32 * 3);

    let err = |r: lorakit::Result<Vec<f32>>| r.unwrap_err().to_string();
    let e = err(dequantize_mxfp4(
        name,
        &blocks,
        &[2, 3, 1, 16],
        &scales,
        &[2, 1, 3],
    ));
    assert!(
        e.contains("experts.down_proj_scales") && e.contains("[2, 1, 3]"),
        "{e}"
    );
    let e = err(dequantize_mxfp4(name, &blocks, &[6, 16], &scales, &[6]));
    assert!(
        e.contains("experts.down_proj_blocks") && e.contains("4 dims"),
        "{e}"
    );
    let e = err(dequantize_mxfp4(
        name,
        &blocks[1..],
        &[2, 3, 1, 16],
        &scales,
        &[2, 3, 1],
    ));
    assert!(
        e.contains("experts.down_proj_blocks") && e.contains("95 bytes"),
        "{e}"
    );
    let e = err(dequantize_mxfp4(
        name,
        &blocks,
        &[2, 3, 1, 16],
        &scales[..5],
        &[2, 3, 1],
    ));
    assert!(
        e.contains("experts.down_proj_scales") && e.contains("5 bytes"),
        "{e}"
    );
    let huge = [usize::MAX / 2, 3, 1, 16];
    let e = err(dequantize_mxfp4(name, &blocks, &huge, &scales, &huge[..3]));
    assert!(e.contains("experts.down_proj_blocks"), "{e}");
}
