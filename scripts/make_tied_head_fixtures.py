#!/usr/bin/env python3
"""Generates tests/fixtures/tied_head/: PEFT adapters on the output head of models whose
head is tied to the input embedding (`tie_word_embeddings`), and what PEFT's merge makes
of them.

Usage:
    python3 scripts/make_tied_head_fixtures.py
        removes and rewrites tests/fixtures/tied_head/ (deterministic)

A tied checkpoint has no `lm_head.weight`: the head is the embedding table. PEFT puts an
adapter on `lm_head` all the same, and the unmerged model is right. PEFT's
`merge_and_unload()` then adds the head's change to the shared table, so the embedding
changes too, and `save_pretrained()` writes the table alone with `tie_word_embeddings`
still true: the reloaded merged model's logits are not the adapter's (PEFT warns and
suggests untying first). `peft_merge.json` records by how much. A head trained in full
(`modules_to_save`) PEFT's merged save writes untied, and right.

Cases (f32; every trainable parameter gets 0.1 * normal added so none is zero):
    llama        base: LlamaForCausalLM (vocab 64, hidden 16, 2 layers, 2 heads, 1 KV
                 head, intermediate 32), tied, saved in shards of at most 8 kB
                 adapter: LoRA r=4 alpha=8 on q_proj, v_proj, lm_head
    gpt2         base: GPT2LMHeadModel (vocab 64, n_embd 16, 2 layers, 2 heads), tied,
                 one file
                 adapter: DoRA r=4 alpha=8 on lm_head
    llama_tying  the llama base, one file
                 adapter: LoRA r=4 alpha=8 on embed_tokens and lm_head with
                 ensure_weight_tying (the head's factors are the embedding's; PEFT saves
                 the base layers too: save_embedding_layers)
    llama_head_copy  the llama base, one file
                 adapter: LoRA r=4 alpha=8 on q_proj, lm_head trained in full
                 (modules_to_save: PEFT's copy of the tied head)
    llama_tying_regex  the llama base, one file
                 adapter: LoRA r=4 alpha=8, target_modules the regex
                 `.*\.(q_proj|v_proj)|.*embed_tokens`, ensure_weight_tying (PEFT saves
                 the regex with `|^model\.embed_tokens$` added, and the head's factors
                 under lm_head as for llama_tying)

README.md, and for each CASE:
    CASE/base/            save_pretrained of the base model
    CASE/adapter/         PEFT save_pretrained (README.md removed)
    CASE/io.safetensors   input_ids (i64 (1, 5)) and `logits` (PeftModel, eval, unmerged)
    CASE/peft_merge.json  PEFT's merge_and_unload() + save_pretrained(), reloaded by
                          transformers: the tensor names it wrote, its config's
                          tie_word_embeddings, and the largest |logit - unmerged logit|

Versions used to generate the committed files: torch 2.15.0, transformers 5.25.0,
peft 0.21.2, safetensors 0.8.0 (Python 3.11).
"""

import json
import shutil
import tempfile
import warnings
from pathlib import Path

from fixture_env import rerun_pinned, saved_tensor_names

rerun_pinned()

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tied_head"
IDS = [[5, 9, 3, 7, 11]]


def llama():
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def gpt2():
    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg)


CASES = {
    "llama": (llama, {"max_shard_size": "8kB"},
              dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])),
    "gpt2": (gpt2, {}, dict(r=4, lora_alpha=8, target_modules=["lm_head"], use_dora=True)),
    "llama_tying": (llama, {}, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"],
                                    ensure_weight_tying=True)),
    "llama_head_copy": (llama, {}, dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                        modules_to_save=["lm_head"])),
    "llama_tying_regex": (llama, {}, dict(r=4, lora_alpha=8,
                                          target_modules=r".*\.(q_proj|v_proj)|.*embed_tokens",
                                          ensure_weight_tying=True)),
}


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def make(case):
    build, save_args, lora = CASES[case]
    torch.manual_seed(0)
    out = OUT / case
    model = build()
    assert model.lm_head.weight is model.get_input_embeddings().weight, "the base must be tied"
    model.save_pretrained(out / "base", **save_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's tied-head warnings: the point of the fixture
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(out / "base"), LoraConfig(**lora))
        with torch.no_grad():
            for p in peft.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        peft.save_pretrained(out / "adapter")
        (out / "adapter" / "README.md").unlink(missing_ok=True)

        ids = torch.tensor(IDS)
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"),
                                           out / "adapter").eval()
        logits = logits_of(loaded, ids)
        save_file({"input_ids": ids, "logits": logits.contiguous()}, str(out / "io.safetensors"))

        with tempfile.TemporaryDirectory() as tmp:
            loaded.merge_and_unload().save_pretrained(tmp)
            keys = saved_tensor_names(tmp)
            tied = json.loads((Path(tmp) / "config.json").read_text()).get("tie_word_embeddings")
            reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
            diff = (logits_of(reloaded, ids) - logits).abs().max().item()
    report = {"keys": keys, "tie_word_embeddings": tied,
              "reloaded_max_abs_logit_diff": round(diff, 6),
              "unmerged_max_abs_logit": round(logits.abs().max().item(), 6)}
    (out / "peft_merge.json").write_text(json.dumps(report, indent=2) + "\n")


README = """# Tied-head fixtures

PEFT adapters on the output head (`lm_head`) of checkpoints whose head is tied to the
input embedding — a sharded Llama (LoRA), a GPT-2 (DoRA), a Llama with a LoRA on the
embedding and the head under `ensure_weight_tying` (with a list and with a regex
`target_modules`), and a Llama whose head the adapter trains in full (`modules_to_save`) — with PEFT's unmerged logits on one row
(`io.safetensors`) and what PEFT's own merge wrote (`peft_merge.json`: for an adapter on the
head it changes the shared table and keeps the head tied, so its merged model's logits
differ from the adapter's; a trained copy it writes untied, and right).
Made by `scripts/make_tied_head_fixtures.py` (its docstring lists every file); checked by
`tests/suite/tied_head.rs` and, in transformers, `scripts/check_tied_head_merge.py`.
"""


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    for case in CASES:
        make(case)
    (OUT / "README.md").write_text(README)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
