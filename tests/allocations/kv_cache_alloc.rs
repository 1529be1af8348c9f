//! Decoding one token at a time through a KV cache holds memory for the cached keys and
//! values only: what the process holds grows with the cached positions, not with every
//! step's whole forward. The adapter's factors are trainable variables, so each step's
//! keys and values come out of the forward with their autograd history; a cache that kept
//! that history would keep every earlier step's tensors alive (quadratic in the length).

use candle_core::{DType, Device, Tensor};
use lorakit::models::llama::LlamaForCausalLM;
use lorakit::peft::PeftAdapter;

use crate::counting::{live_bytes, serial};

#[test]
fn decoding_holds_the_cached_keys_and_values_only() {
    let _serial = serial();
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/models/llama/qwen2"
    );
    let dev = Device::Cpu;
    let plan = PeftAdapter::load(format!("{dir}/lora"), &dev)
        .unwrap()
        .plan()
        .unwrap();
    let model =
        LlamaForCausalLM::from_pretrained(format!("{dir}/base"), DType::F32, &dev, &plan).unwrap();
    let c = model.config();
    // f32 keys and values of every layer, per cached position.
    let per_position = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4;
    let mut cache = model.new_cache();
    let mut token = 1u32;
    let mut step = |cache: &mut _| {
        let ids = Tensor::new(&[[token]], &dev).unwrap();
        let logits = model.forward_cached(&ids, cache).unwrap();
        token = logits
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar()
            .unwrap();
    };
    for _ in 0..8 {
        step(&mut cache);
    }
    let before = live_bytes();
    let steps = 48;
    for _ in 0..steps {
        step(&mut cache);
    }
    let grown = live_bytes().saturating_sub(before);
    // The cache holds 56 positions now; a store that doubles its capacity holds at most
    // twice as many. Allow that, and as much again for allocator-side bookkeeping.
    let bound = 4 * (8 + steps) * per_position;
    assert!(
        grown <= bound,
        "{steps} decoding steps left {grown} more bytes held; the cached keys and values \
         of {} positions are {} bytes",
        8 + steps,
        (8 + steps) * per_position
    );
}
