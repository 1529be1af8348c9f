#!/usr/bin/env python3
"""Writes tests/fixtures/models/bert_mask_grads.safetensors: the loss gradients transformers
+ PEFT compute for the bert_cls option fixture (tests/fixtures/peft_options/bert_cls: a tiny
BertForSequenceClassification, LoRA r = 4 on query/value, bias="all", the classifier in
modules_to_save) on a batch with padded positions, in eval mode (no dropout), so that
lorakit's backward through its fused attention (padding mask, softmax) and the rest of
the model can be compared with PyTorch's autograd.

Usage:
    python3 scripts/make_bert_grad_fixture.py
        (deterministic; overwrites the output file)

Keys:
    input_ids, attention_mask, labels   i64: (2, 5), (2, 5) (row 0: last two positions
                                         padded), (2,)
    loss                                 f32 scalar: single-label cross-entropy
    grad.<name>                          f32: the gradient of every trainable tensor, under
                                         lorakit's name for it (PEFT's name without
                                         "base_model.model.", ".default", ".weight" of the
                                         LoRA factors and the modules_to_save wrapper)

Computed with attn_implementation="eager" and checked against "sdpa" (max abs diff of
every gradient < 1e-6).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_env import rerun_pinned  # noqa: E402

rerun_pinned()

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
CASE = os.path.join(ROOT, "peft_options", "bert_cls")
OUT = os.path.join(ROOT, "models", "bert_mask_grads.safetensors")

IDS = torch.tensor([[14, 25, 8, 27, 13], [12, 49, 20, 13, 60]])
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
LABELS = torch.tensor([0, 2])


def lorakit_name(peft_name):
    name = peft_name.replace("base_model.model.", "").replace(".default", "")
    name = name.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")
    return name.replace("classifier.modules_to_save.", "classifier.")


def gradients(attn):
    base = BertForSequenceClassification.from_pretrained(
        os.path.join(CASE, "base"), attn_implementation=attn
    )
    model = PeftModel.from_pretrained(base, os.path.join(CASE, "adapter"), is_trainable=True)
    model.eval()
    loss = model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss
    loss.backward()
    grads = {
        lorakit_name(name): p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    return loss.detach(), grads


def main():
    loss, grads = gradients("eager")
    _, sdpa = gradients("sdpa")
    assert grads.keys() == sdpa.keys()
    for name, g in grads.items():
        diff = (g - sdpa[name]).abs().max().item()
        assert diff < 1e-6, f"{name}: eager and sdpa differ by {diff}"
    out = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS, "loss": loss}
    out.update({f"grad.{name}": g.contiguous() for name, g in grads.items()})
    save_file(out, OUT)
    print(f"wrote {OUT}: {len(grads)} gradients, loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
