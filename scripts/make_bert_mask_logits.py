#!/usr/bin/env python3
"""Writes tests/fixtures/models/bert_mask_logits.safetensors: what transformers + PEFT
compute for the bert_cls option fixture (tests/fixtures/peft_options/bert_cls: a tiny
BertForSequenceClassification, LoRA on query/value, bias="all", classifier in
modules_to_save) on inputs the fixture's io.safetensors does not cover: an attention
mask with padded positions and non-zero token_type_ids.

Usage:
    python3 scripts/make_bert_mask_logits.py
        (deterministic; overwrites the output file)

Keys (ids and masks i64 (2, 5), logits f32 (2, 3); PEFT's model unmerged, eval):
    input_ids              the bert_cls fixture's input_ids
    attention_mask         row 0: last two positions padded; row 1: all ones
    token_type_ids         a mix of segment 0 and 1 in both rows
    logits_mask            attention_mask, token_type_ids omitted (zeros)
    logits_types           token_type_ids, attention_mask all ones
    logits_mask_types      both
    logits_disabled        attention_mask all ones, token_type_ids omitted, inside
                           PEFT's `disable_adapter()` (LoRA off, the classifier's original
                           module; bias="all" trains the model's own biases, which stay)

Each is computed with attn_implementation="eager" and checked against "sdpa"
(max abs diff < 1e-5).
"""

import os

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
CASE = os.path.join(ROOT, "peft_options", "bert_cls")
OUT = os.path.join(ROOT, "models", "bert_mask_logits.safetensors")


def peft_model(attn):
    base = BertForSequenceClassification.from_pretrained(
        os.path.join(CASE, "base"), dtype=torch.float32, attn_implementation=attn
    )
    return PeftModel.from_pretrained(base, os.path.join(CASE, "adapter")).eval()


def main():
    ids = load_file(os.path.join(CASE, "io.safetensors"))["input_ids"]
    assert ids.shape == (2, 5) and ids.dtype == torch.int64
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.int64)
    types = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]], dtype=torch.int64)
    ones = torch.ones_like(ids)
    runs = {
        "logits_mask": dict(attention_mask=mask),
        "logits_types": dict(attention_mask=ones, token_type_ids=types),
        "logits_mask_types": dict(attention_mask=mask, token_type_ids=types),
    }
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    models = {attn: peft_model(attn) for attn in ("eager", "sdpa")}
    with torch.no_grad():
        for key, kwargs in runs.items():
            got = {a: m(input_ids=ids, **kwargs).logits.float() for a, m in models.items()}
            diff = (got["eager"] - got["sdpa"]).abs().max().item()
            print(f"{key}: eager vs sdpa max abs diff {diff:.2e}")
            assert diff < 1e-5, key
            out[key] = got["eager"].contiguous()
        disabled = {}
        for a, m in models.items():
            with m.disable_adapter():
                disabled[a] = m(input_ids=ids, attention_mask=ones).logits.float()
        diff = (disabled["eager"] - disabled["sdpa"]).abs().max().item()
        print(f"logits_disabled: eager vs sdpa max abs diff {diff:.2e}")
        assert diff < 1e-5
        out["logits_disabled"] = disabled["eager"].contiguous()
        plain = models["eager"](input_ids=ids, attention_mask=ones).logits.float()
        io = load_file(os.path.join(CASE, "io.safetensors"))
        diff = (plain - io["logits"]).abs().max().item()
        print(f"unmasked logits vs the fixture's io.safetensors: max abs diff {diff:.2e}")
        assert diff < 1e-5
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(out, OUT, metadata={"format": "pt"})
    for k, v in out.items():
        print(f"{k} {v.dtype} {tuple(v.shape)}")


if __name__ == "__main__":
    main()
