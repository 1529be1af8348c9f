#!/usr/bin/env python3
"""Writes tests/fixtures/models/gpt2_dropout_moments.safetensors: the mean and standard
deviation, over many independent dropout draws, of what transformers' GPT2LMHeadModel
computes in training mode (`model.train()`, f32, CPU, eager attention), for lorakit's
GPT-2 dropouts (`Gpt2LmHeadModel::forward_t`, test in `tests/suite/models_gpt2.rs`).

Dropout draws cannot be matched one by one across two random generators, so the test
compares their distribution: lorakit's per-element mean and standard deviation of the
logits over its own draws against these, within their sampling error. Each case turns on
one of the config's dropouts (`embd_pdrop`, `attn_pdrop`, `resid_pdrop`), or all three,
so a dropout applied at the wrong place, with the wrong scale, or not at all moves the
moments of its case.

Usage:
    python3 scripts/make_gpt2_dropout_fixture.py      (deterministic; rewrites the file)

Keys (f32 unless said):
    <transformers name>       the random model's weights (tied head: no lm_head.weight)
    input_ids                 i64 (2, 8)
    eval_logits               (2, 8, vocab) in evaluation mode (no dropout)
    <case>.mean, <case>.std   (2, 8, vocab) per-element mean and standard deviation
                              (n - 1 denominator) of the logits over DRAWS training-mode
                              forwards, for cases embd, attn, resid, all
Metadata: `config` = JSON of the model's config.json fields lorakit reads (dropouts 0);
`cases` = JSON {case: {embd_pdrop, attn_pdrop, resid_pdrop}}; `draws` = DRAWS.

Versions used for the committed file: torch 2.15.0, transformers 5.25.0, safetensors 0.8.0.
"""

import json
import os

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "models", "gpt2_dropout_moments.safetensors")

BASE = dict(
    vocab_size=32,
    n_positions=16,
    n_embd=16,
    n_layer=2,
    n_head=2,
    bos_token_id=None,
    eos_token_id=None,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    resid_pdrop=0.0,
)

CASES = {
    "embd": dict(embd_pdrop=0.5, attn_pdrop=0.0, resid_pdrop=0.0),
    "attn": dict(embd_pdrop=0.0, attn_pdrop=0.5, resid_pdrop=0.0),
    "resid": dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.5),
    "all": dict(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1),
}

DRAWS = 40000
# Copies of the two input rows per forward: every row draws its own dropout choices.
COPIES = 2000


def random_model():
    torch.manual_seed(0)
    config = GPT2Config(**BASE)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                # Large enough that the softmaxes, GELUs and norms are far from linear,
                # so each dropout moves the logits' mean, not only their spread.
                p.copy_(0.5 * torch.randn_like(p))
    return config, model


def set_dropouts(model, p):
    model.transformer.drop.p = p["embd_pdrop"]
    for block in model.transformer.h:
        block.attn.attn_dropout.p = p["attn_pdrop"]
        block.attn.resid_dropout.p = p["resid_pdrop"]
        block.mlp.dropout.p = p["resid_pdrop"]


def main():
    config, model = random_model()
    ids = torch.randint(0, config.vocab_size, (2, 8), dtype=torch.long)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors.pop("lm_head.weight", None)  # tied to transformer.wte.weight
    tensors["input_ids"] = ids
    model.eval()
    with torch.no_grad():
        tensors["eval_logits"] = model(input_ids=ids).logits.contiguous()
    model.train()
    batch = ids.repeat(COPIES, 1)
    torch.manual_seed(1)
    for case, p in CASES.items():
        set_dropouts(model, p)
        total = torch.zeros(ids.shape + (config.vocab_size,), dtype=torch.float64)
        squares = torch.zeros_like(total)
        with torch.no_grad():
            for _ in range(DRAWS // COPIES):
                logits = model(input_ids=batch).logits.double()
                logits = logits.reshape(COPIES, *ids.shape, config.vocab_size)
                total += logits.sum(0)
                squares += (logits * logits).sum(0)
        mean = total / DRAWS
        var = (squares - DRAWS * mean * mean) / (DRAWS - 1)
        tensors[f"{case}.mean"] = mean.float().contiguous()
        tensors[f"{case}.std"] = var.clamp(min=0).sqrt().float().contiguous()
        # How far training mode's mean lies from evaluation, in standard errors of a
        # 1,000-draw mean (the test's own draws): the test relies on it being large.
        se = tensors[f"{case}.std"] / 1000**0.5
        shift = ((mean.float() - tensors["eval_logits"]) / se).abs()
        print(f"{case}: |train mean - eval| / se(1000 draws): median {shift.median():.1f}, "
              f"max {shift.max():.1f}; std median {tensors[f'{case}.std'].median():.3f}")
    keys = ["activation_function", "layer_norm_epsilon", "n_embd", "n_head", "n_inner",
            "n_layer", "n_positions", "reorder_and_upcast_attn",
            "scale_attn_by_inverse_layer_idx", "scale_attn_weights", "tie_word_embeddings",
            "vocab_size", "embd_pdrop", "attn_pdrop", "resid_pdrop"]
    metadata = {
        "config": json.dumps({k: getattr(config, k) for k in keys}, sort_keys=True),
        "cases": json.dumps(CASES, sort_keys=True),
        "draws": str(DRAWS),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata=metadata)
    print(f"wrote {OUT}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
