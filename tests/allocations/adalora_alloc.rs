//! AdaLoRA's rank allocator keeps running statistics of `|w · g|` across steps; they must
//! be plain values. Computed from the trainable variables, they carry autograd history,
//! and a running average that kept it would chain every step's gradients and products
//! to the next: memory growing with every step of training.

use candle_core::{DType, Device, Module};
use candle_nn::{VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::train::{RankAllocator, RankAllocatorConfig};
use lorakit::{AdaLoraConfig, AdaLoraLinear, FrozenLinear, Shared};

use crate::counting::{live_bytes, serial};

#[test]
fn the_rank_allocator_holds_the_same_memory_at_every_step() {
    let _serial = serial();
    let (n, d, r) = (16, 64, 8);
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(5);
    let w = rng.normal((d, d), 0.0, 0.5, DType::F32, &dev).unwrap();
    let base = FrozenLinear::new(w, None).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let layer = Shared::new(AdaLoraLinear::new(base, &AdaLoraConfig::new(r, 16.0), vb).unwrap());
    let mut config = RankAllocatorConfig::new(1000);
    config.target_r = r / 2;
    let mut allocator = RankAllocator::new(&[layer.clone().erase()], config).unwrap();
    let x = rng.normal((n, d), 0.0, 1.0, DType::F32, &dev).unwrap();
    let mut step = |i: usize| {
        let y = layer.read().forward(&x).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        allocator.update_and_allocate(i, &grads).unwrap();
    };
    for i in 1..=5 {
        step(i);
    }
    let before = live_bytes();
    for i in 6..=40 {
        step(i);
    }
    let grown = live_bytes().saturating_sub(before);
    // One step's gradients of A, E and B, in f32. Statistics that kept their history would
    // hold at least that much more after every step: ≥ 35 × 4128 bytes here. The bound is
    // 8 steps' worth, because the thread pool's own bookkeeping (work-stealing buffers
    // freed later by crossbeam's epoch collector) holds a few KiB more or less at any
    // moment: up to 10.3 KiB was seen, in about 1 run in 8 against a bound of one step.
    let gradients = (r * d + r + d * r) * 4;
    assert!(
        grown < 8 * gradients,
        "35 allocator steps left {grown} more bytes held (one step's gradients: {gradients})"
    );
}
