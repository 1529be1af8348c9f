//! DoRA never allocates a `d_out × d_in` temporary for its norms or row scale (a counting
//! global allocator records the largest single allocation while DoRA's own code runs).
//! A whole training step through the fused kernel allocates no W-sized buffer either.

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use lorakit::{Adapter, DoraLinear, FrozenLinear, LoraConfig, LoraInit};

use crate::common::*;
use crate::counting::{exact_size_allocations, largest_during, serial};

fn layer(d: usize) -> DoraLinear {
    let mut g = rng(40);
    let base = FrozenLinear::new(rand(&mut g, &[d, d], DType::F32), None).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let config = LoraConfig {
        init: LoraInit::BothRandom,
        ..LoraConfig::new(8, 16.0)
    };
    DoraLinear::new(base, &config, vb).unwrap()
}

#[test]
fn no_weight_sized_temporary() {
    let _serial = serial();
    let d = 512;
    let weight_bytes = d * d * 4;
    let layer = layer(d);
    // Norms and row scale, training (fresh) and evaluation (cache fill, then hit). The
    // largest block seen is the matmul packing buffer (d × 64 floats), a quarter of W at
    // this size and a shrinking fraction beyond.
    let largest = largest_during(|| {
        layer.row_scale(true).unwrap();
        layer.row_scale(false).unwrap();
        layer.row_scale(false).unwrap();
    });
    assert!(largest < weight_bytes / 4, "largest allocation {largest} B");
    // A whole training step: no buffer of exactly `d_out × d_in` floats (a W-sized tensor,
    // such as the gradient candle's composed matmul backward forms for the frozen W). At
    // this non-square size no other buffer of the step has that many elements; gemm's
    // internal packing workspace for W (not a tensor) is excluded by the exact-size match.
    let (d_in, d_out) = (72, 104);
    let mut g = rng(42);
    let base = FrozenLinear::new(rand(&mut g, &[d_out, d_in], DType::F32), None).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let config = LoraConfig {
        init: LoraInit::BothRandom,
        ..LoraConfig::new(4, 8.0)
    };
    let small = DoraLinear::new(base, &config, vb).unwrap();
    let x = rand(&mut rng(41), &[6, d_in], DType::F32);
    let step = || {
        let y = small.forward_t(&x, true).unwrap();
        y.sum_all().unwrap().backward().unwrap();
    };
    step();
    let seen = exact_size_allocations(d_out * d_in * 4, step);
    assert_eq!(
        seen, 0,
        "{seen} W-sized allocations in a DoRA training step"
    );
}
