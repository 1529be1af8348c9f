#!/usr/bin/env python3
"""Generates the decoder sequence-classification fixtures under tests/fixtures/decoder_cls/:
tiny transformers `…ForSequenceClassification` decoders, PEFT SEQ_CLS adapters on them, and
what transformers + PEFT compute from those files.

Usage:
    python3 scripts/make_decoder_cls_fixtures.py
        removes and rewrites tests/fixtures/decoder_cls/ (deterministic)

    python3 scripts/make_decoder_cls_fixtures.py --check CASE ADAPTER_DIR LOGITS_FILE
        by-hand check of an adapter written by lorakit: PeftModel.from_pretrained(CASE's
        base, ADAPTER_DIR) runs CASE's io.safetensors `input_ids` / `attention_mask` (eval,
        unmerged) and its logits are compared with `logits` in LOGITS_FILE (a safetensors
        file written by lorakit); prints the max relative error and exits 1 above 1e-4.

Cases (f32; vocab 64, hidden 16, 2 layers, 3 labels, pad_token_id 0):
    llama   LlamaForSequenceClassification (4 heads, 2 KV heads, untied)
            lora/  LoRA r=4 alpha=8 on q_proj, v_proj
            dora/  DoRA r=4 alpha=8 on q_proj, k_proj, down_proj
    qwen2   Qwen2ForSequenceClassification (q/k/v bias)
            lora/  LoRA r=4 alpha=8, target_modules="all-linear"
    gpt2    GPT2ForSequenceClassification (n_embd 16, 2 heads)
            lora/  LoRA r=4 alpha=8 on c_attn, c_fc (Conv1D, fan_in_fan_out)

Every adapter: task_type SEQ_CLS (PEFT adds `score` to modules_to_save), then every
trainable parameter gets 0.1 * normal added so none is zero (lora_B, the score copy).
Base models: built from the config, every parameter redrawn (matrices 0.2 * normal,
biases 0.1 * normal, norm weights 1 + 0.1 * normal).

For each CASE:
    CASE/base/            save_pretrained of the base classifier
    CASE/ADAPTER/         PEFT save_pretrained (README.md removed)
    CASE/io.safetensors   input_ids (i64 (4, 6): a full row, a right-padded row, a
                          left-padded row, a row of one token and padding) and
                          attention_mask; `base_logits` (transformers, eval); per adapter
                          `ADAPTER.logits` (PeftModel.from_pretrained on a fresh base,
                          eval, unmerged) and `ADAPTER.merged_logits` (merge_and_unload())

Versions used to generate the committed files: torch 2.15.0, transformers 5.24.0,
peft 0.21.2, safetensors 0.8.0 (Python 3.11).
"""

import argparse
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from fixture_env import rerun_pinned

ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "decoder_cls")
)
PAD = 0
LABELS = {"id2label": {0: "negative", 1: "neutral", 2: "positive"}}


def llama_config():
    return LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False, pad_token_id=PAD, **LABELS,
    )


def qwen2_config():
    return Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False, pad_token_id=PAD, **LABELS,
    )


def gpt2_config():
    return GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2, **LABELS,
    )


LORA = dict(r=4, lora_alpha=8, task_type=TaskType.SEQ_CLS, init_lora_weights=False)
CASES = {
    "llama": (LlamaForSequenceClassification, llama_config, 11, {
        "lora": dict(LORA, target_modules=["q_proj", "v_proj"]),
        "dora": dict(LORA, target_modules=["q_proj", "k_proj", "down_proj"], use_dora=True),
    }),
    "qwen2": (Qwen2ForSequenceClassification, qwen2_config, 12, {
        "lora": dict(LORA, target_modules="all-linear"),
    }),
    "gpt2": (GPT2ForSequenceClassification, gpt2_config, 13, {
        "lora": dict(LORA, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    }),
}


def inputs(seed):
    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(1, 64, (4, 6), generator=g, dtype=torch.int64)
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = PAD, 0  # right padding
    ids[2, :2], mask[2, :2] = PAD, 0  # left padding
    ids[3, 1:], mask[3, 1:] = PAD, 0  # one token
    return ids, mask


def build_base(case):
    cls, config, seed, _ = CASES[case]
    torch.manual_seed(seed)
    model = cls(config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def load_base(case):
    model = CASES[case][0].from_pretrained(os.path.join(ROOT, case, "base"), dtype=torch.float32)
    return model.eval()


def logits_of(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().contiguous()


def write_case(case):
    out = os.path.join(ROOT, case)
    build_base(case).save_pretrained(os.path.join(out, "base"))
    _, _, seed, adapters = CASES[case]
    ids, mask = inputs(seed)
    io = {"input_ids": ids, "attention_mask": mask, "base_logits": logits_of(load_base(case), ids, mask)}
    for k, (name, kwargs) in enumerate(adapters.items()):
        torch.manual_seed(seed + 100 + k)
        pm = get_peft_model(load_base(case), LoraConfig(**kwargs))
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        adir = os.path.join(out, name)
        pm.save_pretrained(adir)
        readme = os.path.join(adir, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        fresh = PeftModel.from_pretrained(load_base(case), adir).eval()
        io[f"{name}.logits"] = logits_of(fresh, ids, mask)
        merged = PeftModel.from_pretrained(load_base(case), adir).merge_and_unload().eval()
        io[f"{name}.merged_logits"] = logits_of(merged, ids, mask)
        keys = sorted(load_file(os.path.join(adir, "adapter_model.safetensors")))
        print(case, name, len(keys), "tensors, e.g.", [k for k in keys if "score" in k])
    save_file(io, os.path.join(out, "io.safetensors"))


def check(case, adapter_dir, logits_file):
    io = load_file(os.path.join(ROOT, case, "io.safetensors"))
    pm = PeftModel.from_pretrained(load_base(case), adapter_dir).eval()
    want = logits_of(pm, io["input_ids"], io["attention_mask"])
    got = load_file(logits_file)["logits"].float()
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{case}: max relative error {err:.3g} over logits {tuple(want.shape)}")
    sys.exit(0 if err <= 1e-4 else 1)


def main():
    rerun_pinned()
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", nargs=3, metavar=("CASE", "ADAPTER_DIR", "LOGITS_FILE"))
    args = ap.parse_args()
    if args.check:
        check(*args.check)
        return
    shutil.rmtree(ROOT, ignore_errors=True)
    for case in CASES:
        write_case(case)


if __name__ == "__main__":
    main()
