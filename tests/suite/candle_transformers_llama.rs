//! PEFT adapters on an unmodified candle-transformers model: `adapted_var_builder` merges
//! each targeted weight as `candle_transformers::models::llama::Llama::load` asks for it.
//! The logits equal transformers + PEFT's (unmerged PeftModel, committed fixture) and those
//! of the same model loaded from the merged checkpoint.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
use lorakit::checkpoint::Checkpoint;
use lorakit::peft::{adapted_var_builder, merge_checkpoint};

use crate::checkpoint_merge::ckpt;
use crate::peft_common::{assert_close, load, temp_dir};

/// The last position's logits of the tiny Llama built from `vb` on the fixture's input.
fn last_logits(vb: VarBuilder<'static>) -> Tensor {
    let text = std::fs::read_to_string(ckpt("llama_f32_single/config.json")).unwrap();
    let config: LlamaConfig = serde_json::from_str(&text).unwrap();
    let config = config.into_config(false);
    let model = Llama::load(vb, &config).unwrap();
    let mut cache = Cache::new(false, DType::F32, &config, &Device::Cpu).unwrap();
    let ids = reference("input_ids").to_dtype(DType::U32).unwrap();
    model.forward(&ids, 0, &mut cache).unwrap()
}

/// A tensor of the fixture's logits file; logits as the last position's, (1, vocab).
fn reference(name: &str) -> Tensor {
    let t = load(&ckpt("llama_logits.safetensors"))
        .remove(name)
        .unwrap();
    if name.starts_with("logits") {
        let n = t.dim(1).unwrap();
        t.i((.., n - 1, ..)).unwrap()
    } else {
        t
    }
}

#[test]
fn the_base_checkpoint_gives_transformers_logits() {
    for base in ["llama_f32_single", "llama_f32_sharded"] {
        let vb = Checkpoint::open(ckpt(base))
            .unwrap()
            .var_builder(DType::F32, &Device::Cpu);
        assert_close(&last_logits(vb), &reference("logits_base"), 1e-4, base);
    }
}

#[test]
fn every_peft_adapter_gives_peft_logits_on_an_unmodified_model() {
    let dir = temp_dir("ct-llama");
    for kind in ["lora", "dora", "vera", "adalora", "pissa", "olora"] {
        let adapter = ckpt(&format!("llama_adapters/{kind}"));
        let lazily = last_logits(
            adapted_var_builder(
                ckpt("llama_f32_sharded"),
                &adapter,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap(),
        );
        assert_close(&lazily, &reference(&format!("logits_{kind}")), 1e-4, kind);
        // The adapter changes the logits (the check above is not the base's).
        assert!(crate::peft_common::rel_err(&lazily, &reference("logits_base")) > 1e-2);

        let out = dir.join(kind);
        merge_checkpoint(
            &ckpt("llama_f32_single"),
            &adapter,
            &out,
            Default::default(),
        )
        .unwrap();
        let merged = last_logits(
            Checkpoint::open(&out)
                .unwrap()
                .var_builder(DType::F32, &Device::Cpu),
        );
        assert_close(
            &merged,
            &lazily,
            1e-6,
            &format!("{kind}: merged file vs lazy merge"),
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_adapter_for_another_model_is_refused_when_the_var_builder_is_made() {
    let err = adapted_var_builder(
        ckpt("llama_f32_single"),
        crate::peft_common::fixture("lora_mlp/adapter"),
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("the adapter has module"), "{err}");
}

/// LoRA on `embed_tokens` and `lm_head` (PEFT's `lora_embedding_A/B`, the `base_layer.weight`
/// copies PEFT saves with them): the unmodified model loaded through `adapted_var_builder`
/// gives PEFT's logits on every position.
#[test]
fn an_adapter_on_the_embeddings_and_head_gives_peft_logits() {
    let dir = crate::peft_options::case_dir("llama_embed");
    let text = std::fs::read_to_string(dir.join("base/config.json")).unwrap();
    let config: LlamaConfig = serde_json::from_str(&text).unwrap();
    let config = config.into_config(false);
    let vb = adapted_var_builder(
        dir.join("base"),
        dir.join("adapter"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let model = Llama::load(vb, &config).unwrap();
    let io = load(&dir.join("io.safetensors"));
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let n = ids.dim(1).unwrap();
    // candle's Llama returns the last position's logits; compare those of each sequence.
    for row in 0..ids.dim(0).unwrap() {
        let mut cache = Cache::new(false, DType::F32, &config, &Device::Cpu).unwrap();
        let logits = model
            .forward(&ids.i(row..row + 1).unwrap(), 0, &mut cache)
            .unwrap();
        let peft = io["logits"].i((row..row + 1, n - 1, ..)).unwrap();
        assert_close(&logits, &peft, 1e-4, &format!("sequence {row}"));
    }
    // Not the base model's logits.
    let base = Checkpoint::open(dir.join("base"))
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let base = Llama::load(base, &config).unwrap();
    let mut cache = Cache::new(false, DType::F32, &config, &Device::Cpu).unwrap();
    let logits = base.forward(&ids.i(0..1).unwrap(), 0, &mut cache).unwrap();
    let peft = io["logits"].i((0..1, n - 1, ..)).unwrap();
    assert!(crate::peft_common::rel_err(&logits, &peft) > 1e-2);
}
