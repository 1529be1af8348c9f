//! The no-download demo: a tokenizer trained on the bundled text and a tiny random Llama
//! model, written as a Hugging Face model folder (what `--model` reads).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lorakit::finetune::data::tiny_tokenizer;
use lorakit::init::SeededRng;
use serde_json::{json, Value};

/// What the demo made: the model folder and the training data.
pub struct Made {
    pub model: PathBuf,
    pub data: PathBuf,
}

/// Hidden size, layers, heads, KV heads, MLP size of the demo model.
const HIDDEN: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const MLP: usize = 128;
/// The embedding's (and tied head's) init scale.
const EMBED_STD: f64 = 0.1;

/// Writes `dir/model/` (config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json) with a tokenizer trained on the texts of `data`.
pub fn make(dir: &Path, data: &Path) -> lorakit::Result<Made> {
    let texts = corpus(data)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tokenizer = tiny_tokenizer(&refs, 256)?;
    let model = dir.join("model");
    std::fs::create_dir_all(&model).map_err(|e| lorakit::Error::io(&model, e))?;
    let tok_path = model.join("tokenizer.json");
    tokenizer.inner().save(&tok_path, false).map_err(|e| {
        lorakit::Error::usage(
            lorakit::Scope::File(tok_path.clone()),
            format!("could not write the tokenizer: {e}"),
        )
    })?;
    let vocab = tokenizer.vocab_size();
    write_json(
        &model.join("tokenizer_config.json"),
        &json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}),
    )?;
    write_json(
        &model.join("config.json"),
        &json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": HIDDEN,
            "intermediate_size": MLP,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": true,
            "bos_token_id": tokenizer.bos_id(),
            "eos_token_id": tokenizer.eos_id(),
            "torch_dtype": "float32"
        }),
    )?;
    let weights_path = model.join("model.safetensors");
    candle_core::safetensors::save(&weights(vocab)?, &weights_path)?;
    println!(
        "demo: tokenizer (vocab {vocab}) and a {LAYERS}-layer Llama (hidden {HIDDEN}) in {}",
        model.display()
    );
    Ok(Made {
        model,
        data: data.to_path_buf(),
    })
}

/// Every text of the JSONL file (`text`, `prompt`, `completion` values).
fn corpus(path: &Path) -> lorakit::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| lorakit::Error::io(path, e))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let row: Value = serde_json::from_str(line).map_err(|e| lorakit::Error::json(path, &e))?;
        for key in ["text", "prompt", "completion"] {
            if let Some(s) = row.get(key).and_then(Value::as_str) {
                out.push(s.to_string());
            }
        }
    }
    Ok(out)
}

fn write_json(path: &Path, value: &Value) -> lorakit::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| lorakit::Error::json(path, &e))?;
    std::fs::write(path, text).map_err(|e| lorakit::Error::io(path, e))
}

/// Random weights with transformers' names: matrices N(0, 0.02²) as `LlamaForCausalLM`
/// initializes them, norms at 1; the output head tied to the embedding, whose rows are
/// drawn larger (`EMBED_STD`) so that the tied head can express confident predictions
/// (with 0.02 its logits span about ±1 and no adapter could lower the loss much).
fn weights(vocab: usize) -> lorakit::Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let head_dim = HIDDEN / HEADS;
    let mut w = HashMap::new();
    let mut rng = SeededRng::new(0);
    let mut add = |name: String, shape: (usize, usize), std: f64| -> lorakit::Result<()> {
        w.insert(name, rng.normal(shape, 0.0, std, DType::F32, &dev)?);
        Ok(())
    };
    add(
        "model.embed_tokens.weight".into(),
        (vocab, HIDDEN),
        EMBED_STD,
    )?;
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        add(
            format!("{p}.self_attn.q_proj.weight"),
            (HEADS * head_dim, HIDDEN),
            0.02,
        )?;
        add(
            format!("{p}.self_attn.k_proj.weight"),
            (KV_HEADS * head_dim, HIDDEN),
            0.02,
        )?;
        add(
            format!("{p}.self_attn.v_proj.weight"),
            (KV_HEADS * head_dim, HIDDEN),
            0.02,
        )?;
        add(
            format!("{p}.self_attn.o_proj.weight"),
            (HIDDEN, HEADS * head_dim),
            0.02,
        )?;
        add(format!("{p}.mlp.gate_proj.weight"), (MLP, HIDDEN), 0.02)?;
        add(format!("{p}.mlp.up_proj.weight"), (MLP, HIDDEN), 0.02)?;
        add(format!("{p}.mlp.down_proj.weight"), (HIDDEN, MLP), 0.02)?;
    }
    for i in 0..LAYERS {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(
                format!("model.layers.{i}.{norm}.weight"),
                Tensor::ones(HIDDEN, DType::F32, &dev)?,
            );
        }
    }
    w.insert(
        "model.norm.weight".into(),
        Tensor::ones(HIDDEN, DType::F32, &dev)?,
    );
    Ok(w)
}
