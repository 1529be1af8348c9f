#!/usr/bin/env python3
"""Writes tests/fixtures/models/gpt2_base_logits.safetensors: what transformers'
GPT2LMHeadModel (eval, f32, CPU, eager attention) computes, for lorakit's GPT-2
(`src/models/gpt2.rs`, tests in `tests/suite/models_gpt2.rs`).

Usage:
    python3 scripts/make_gpt2_base_logits.py      (deterministic; rewrites the file)

Keys (every tensor f32 unless said):
    <case>.logits                  (2, 5, vocab) logits of the BASE model (no adapter)
    <case>.input_ids               i64 (2, 5), only for the random cases below
    <case>.<transformers name>     the random cases' weights (`<case>.transformer.wte.weight`,
                                   ..., `<case>.lm_head.weight` when untied)
Metadata: `configs` = JSON object {case: the case's config.json fields} (random cases only;
one key, as safetensors writes metadata in no fixed order).

Cases:
    gpt2_lora, gpt2_dora   the base models of tests/fixtures/peft_options/<case>/base on
                           that case's io.safetensors `input_ids` (base model logits:
                           what lorakit gives with the adapter disabled)
    opt_*                  tiny random models (vocab 32, n_embd 8, 2 heads) with one option
                           each away from the defaults (see CASES); weights 0.2 N(0,1),
                           biases 0.1 N, norm weights 1 + 0.1 N, norm biases 0.1 N;
                           `opt_gelu_10` gets c_fc biases of +12 on half the features so
                           the clip at 10 is reached

Versions used for the committed file: torch 2.15.0, transformers 5.24.0, safetensors 0.8.0.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEFT_OPTIONS = os.path.join(ROOT, "tests", "fixtures", "peft_options")
OUT = os.path.join(ROOT, "tests", "fixtures", "models", "gpt2_base_logits.safetensors")

BASE = dict(
    vocab_size=32, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=None, eos_token_id=None
)

# (case, config overrides)
CASES = [
    ("opt_gelu", dict(activation_function="gelu")),
    ("opt_gelu_python", dict(activation_function="gelu_python")),
    ("opt_gelu_fast", dict(activation_function="gelu_fast")),
    ("opt_gelu_pytorch_tanh", dict(activation_function="gelu_pytorch_tanh")),
    ("opt_gelu_python_tanh", dict(activation_function="gelu_python_tanh")),
    ("opt_gelu_accurate", dict(activation_function="gelu_accurate")),
    ("opt_gelu_10", dict(activation_function="gelu_10")),
    ("opt_quick_gelu", dict(activation_function="quick_gelu")),
    # Everything else away from the defaults at once: untied head, n_inner, no 1/sqrt(d)
    # scale but 1/(layer+1), the reordered and upcast attention, another epsilon, 3 layers.
    (
        "opt_untied_scales",
        dict(
            tie_word_embeddings=False,
            n_inner=12,
            n_layer=3,
            scale_attn_weights=False,
            scale_attn_by_inverse_layer_idx=True,
            reorder_and_upcast_attn=True,
            layer_norm_epsilon=1e-3,
        ),
    ),
    # The scale by 1/sqrt(head_dim) together with 1/(layer+1).
    ("opt_inverse_layer_idx", dict(scale_attn_by_inverse_layer_idx=True, n_layer=3)),
]


def base_logits(case):
    model = GPT2LMHeadModel.from_pretrained(
        os.path.join(PEFT_OPTIONS, case, "base"), attn_implementation="eager"
    ).eval()
    ids = load_file(os.path.join(PEFT_OPTIONS, case, "io.safetensors"))["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def random_case(seed, name, overrides):
    torch.manual_seed(seed)
    config = GPT2Config(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".ln_" in pname or pname.startswith("transformer.ln_f"):
                if pname.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        if name == "opt_gelu_10":
            for block in model.transformer.h:
                b = block.mlp.c_fc.bias
                b[: b.shape[0] // 2] += 12.0
        if not config.tie_word_embeddings:
            # named_parameters() lists a tied weight once; untied, lm_head got its own draw.
            assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
        ids = torch.randint(0, config.vocab_size, (2, 5), dtype=torch.long)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    tensors = {f"{name}.{k}": v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop(f"{name}.lm_head.weight", None)
    tensors[f"{name}.input_ids"] = ids
    tensors[f"{name}.logits"] = logits
    keys = ["activation_function", "layer_norm_epsilon", "n_embd", "n_head", "n_inner",
            "n_layer", "n_positions", "reorder_and_upcast_attn",
            "scale_attn_by_inverse_layer_idx", "scale_attn_weights", "tie_word_embeddings",
            "vocab_size"]
    config = {k: getattr(config, k) for k in keys}
    return tensors, config


def main():
    tensors, configs = {}, {}
    for case in ["gpt2_lora", "gpt2_dora"]:
        tensors[f"{case}.logits"] = base_logits(case).contiguous()
    for seed, (name, overrides) in enumerate(CASES):
        t, config = random_case(seed, name, overrides)
        tensors.update(t)
        configs[name] = config
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata={"configs": json.dumps(configs, sort_keys=True)})
    print(f"wrote {OUT}: {len(tensors)} tensors, {len(configs)} configs")


if __name__ == "__main__":
    main()
