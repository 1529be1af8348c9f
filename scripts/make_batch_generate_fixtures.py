#!/usr/bin/env python3
"""Writes tests/fixtures/generate/batch.json: transformers' own batched greedy `generate`
with left padding on the committed tiny fixture models with their PEFT adapters, for
lorakit's `generate_batch` (src/models/generation.rs; tests in
tests/suite/generate_batch.rs).

Usage:
    python3 scripts/make_batch_generate_fixtures.py      (deterministic; rewrites the file)

Models (nothing new is trained or drawn; the fixtures of other scripts are read):
    mistral (sliding window 4), qwen2, qwen3 (a sliding layer), llama3_rope
        tests/fixtures/models/llama/CASE/{base,lora} (scripts/make_model_fixtures.py)
    gpt2_lora, gpt2_dora
        tests/fixtures/peft_options/CASE/{base,adapter} (scripts/make_option_fixtures.py;
        n_positions 16: the longest prompt is 4 tokens, 4 + 12 new fit)

For each model, the prompts of different lengths are left-padded with token 0 into one
batch with an attention mask (0 on the padding), and PEFT's unmerged adapter generates
greedily (`do_sample=False`, `max_new_tokens=12`, f32, CPU, eval, default attention):
    tokens       with no stop token (every row 12 tokens)
    stop         one stop token: the fifth token of the first row (that row ends there,
                 the stop included; the others run on, unless they reach it too)
    stop_tokens  the rows' tokens under `stop`, each cut after its first stop token
                 (transformers pads a finished row; the padding is dropped here)
Each row is also generated alone (batch 1, no padding) and must give the same tokens: the
script asserts it, so the file also records what generating each prompt alone gives.

batch.json:
    {"versions": {...}, "max_new_tokens": 12,
     "cases": [{"model": "qwen2", "dir": "tests/fixtures/models/llama/qwen2",
                "base": "base", "adapter": "lora", "prompts": [[...], ...],
                "tokens": [[...], ...], "stop": t, "stop_tokens": [[...], ...]}, ...]}
Token lists hold the new tokens only (not the prompt).

Versions used for the committed file: torch 2.15.0, transformers 5.24.0, peft 0.21.2.
"""

import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, GenerationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "generate", "batch.json")
MAX_NEW = 12
PAD = 0

LLAMA_PROMPTS = [[1, 17, 42, 5], [3, 14, 15, 9, 26, 53, 5, 8], [11], [60, 2, 33]]
GPT2_PROMPTS = [[59, 13, 15, 57], [32, 13], [7, 40, 21]]

MODELS = [
    (c, f"tests/fixtures/models/llama/{c}", "base", "lora", LLAMA_PROMPTS)
    for c in ["mistral", "qwen2", "qwen3", "llama3_rope"]
] + [
    (c, f"tests/fixtures/peft_options/{c}", "base", "adapter", GPT2_PROMPTS)
    for c in ["gpt2_lora", "gpt2_dora"]
]


def generate(model, prompts, eos):
    """Greedy new tokens per row of the left-padded batch, cut after the first stop."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=MAX_NEW,
        eos_token_id=eos,
        pad_token_id=PAD,
        bos_token_id=None,
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    rows = []
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


def case(name, rel, base_sub, adapter_sub, prompts):
    base = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, rel, base_sub), dtype=torch.float32)
    # No stop token but the one asked for (not the model's generation_config.json's).
    base.generation_config.eos_token_id = None
    model = PeftModel.from_pretrained(base.eval(), os.path.join(ROOT, rel, adapter_sub)).eval()
    tokens = generate(model, prompts, None)
    alone = [generate(model, [p], None)[0] for p in prompts]
    assert tokens == alone, (name, tokens, alone)
    assert all(len(t) == MAX_NEW for t in tokens), name
    stop = tokens[0][4]
    stop_tokens = generate(model, prompts, stop)
    assert stop_tokens[0] == tokens[0][: tokens[0].index(stop) + 1], name
    print(f"{name}: {tokens}, stop {stop}: {stop_tokens}", flush=True)
    return {
        "model": name,
        "dir": rel,
        "base": base_sub,
        "adapter": adapter_sub,
        "prompts": prompts,
        "tokens": tokens,
        "stop": stop,
        "stop_tokens": stop_tokens,
    }


def main():
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    versions = {m.__name__: m.__version__.split("+")[0] for m in (torch, transformers, peft)}
    out = {
        "versions": versions,
        "max_new_tokens": MAX_NEW,
        "cases": [case(*m) for m in MODELS],
    }
    with open(OUT, "w") as f:
        json.dump(out, f)
        f.write("\n")
    print(f"wrote {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
