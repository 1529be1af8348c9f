#!/usr/bin/env python3
"""Generates tests/fixtures/merged_head/: PEFT SEQ_CLS adapters trained on checkpoints that
have no classification head (a causal LM, a bare encoder), and what PEFT's
merge_and_unload() + save_pretrained() writes for them.

Usage:
    python3 scripts/make_merged_head_fixtures.py
        removes and rewrites tests/fixtures/merged_head/ (deterministic)

A user who fine-tunes a classifier from a pretrained checkpoint loads it with
AutoModelForSequenceClassification.from_pretrained(base, num_labels=3): transformers adds a
fresh head, PEFT's SEQ_CLS task saves it (modules_to_save), and a merge saves a model whose
config.json is the classifier's: `architectures` names the ...ForSequenceClassification
class and `id2label` / `label2id` have the 3 labels. A merge of the same files that copies
the base's config.json unchanged describes a 2-label head (transformers' default) and the
merged checkpoint does not load.

Cases (f32; 3 labels; every trainable parameter gets 0.1 * normal added so none is zero):
    gpt2    base: GPT2LMHeadModel (vocab 64, n_embd 16, 2 layers, 2 heads), no pad token
            adapter: LoRA r=4 alpha=8 on c_attn, head `score`
    bert    base: BertModel (vocab 64, hidden 16, 2 layers, 2 heads, intermediate 32)
            adapter: LoRA r=4 alpha=8 on query, value, head `classifier`
    bert_mlm  base: BertForPreTraining (the bert encoder, its pooler and pre-training heads
            `cls.*` included) with config.json's architectures set to BertForMaskedLM, as
            the Hub's bert-base-uncased is (the classifier has no `cls`: PEFT's merged
            save drops it)
            adapter: LoRA r=4 alpha=8 on query, value, head `classifier`
    llama   base: LlamaForCausalLM (vocab 64, hidden 16, 2 layers, 2 heads, 1 KV head,
            intermediate 32) with an untied `lm_head.weight`, pad token 0, saved in shards
            of at most 8 kB (the classifier has no `lm_head`: PEFT's merged save drops it)
            adapter: LoRA r=4 alpha=8 on q_proj, v_proj, head `score`

README.md, and for each CASE:
    CASE/base/                  save_pretrained of the headless model
    CASE/adapter/               PEFT save_pretrained (README.md removed)
    CASE/peft_merged_config.json  config.json of merge_and_unload().save_pretrained()
    CASE/peft_merged_keys.json    the tensor names that save wrote, sorted
    CASE/io.safetensors         input_ids (i64 (1, 5)) and `logits` (PeftModel, eval,
                                unmerged)

Versions used to generate the committed files: torch 2.15.0, transformers 5.25.0,
peft 0.21.2, safetensors 0.8.0 (Python 3.11).
"""

import json
import shutil
import tempfile
from pathlib import Path

from fixture_env import rerun_pinned, saved_tensor_names

rerun_pinned()

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, TaskType, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    BertConfig,
    BertForPreTraining,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "merged_head"
LABELS = 3


def base_model(case):
    if case == "llama":
        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                          tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return LlamaForCausalLM(cfg), ["q_proj", "v_proj"]
    if case == "gpt2":
        cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                         bos_token_id=1, eos_token_id=2)
        return GPT2LMHeadModel(cfg), ["c_attn"]
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, pad_token_id=0)
    if case == "bert_mlm":
        return BertForPreTraining(cfg), ["query", "value"]
    return BertModel(cfg, add_pooling_layer=True), ["query", "value"]


def make(case):
    torch.manual_seed(0)
    out = OUT / case
    model, targets = base_model(case)
    model.save_pretrained(out / "base", **({"max_shard_size": "8kB"} if case == "llama" else {}))
    if case == "bert_mlm":
        config = json.loads((out / "base" / "config.json").read_text())
        config["architectures"] = ["BertForMaskedLM"]
        (out / "base" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    classifier = AutoModelForSequenceClassification.from_pretrained(out / "base", num_labels=LABELS)
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=targets)
    peft = get_peft_model(classifier, cfg)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    peft.save_pretrained(out / "adapter")
    (out / "adapter" / "README.md").unlink(missing_ok=True)

    ids = torch.tensor([[5, 9, 3, 7, 11]])
    fresh = AutoModelForSequenceClassification.from_pretrained(out / "base", num_labels=LABELS)
    loaded = PeftModel.from_pretrained(fresh, out / "adapter").eval()
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, str(out / "io.safetensors"))

    with tempfile.TemporaryDirectory() as tmp:
        loaded.merge_and_unload().save_pretrained(tmp)
        merged_config = json.loads((Path(tmp) / "config.json").read_text())
        keys = saved_tensor_names(tmp)
    (out / "peft_merged_keys.json").write_text(json.dumps(keys, indent=2) + "\n")
    (out / "peft_merged_config.json").write_text(json.dumps(merged_config, indent=2, sort_keys=True) + "\n")


README = """# Merged-head fixtures

PEFT `SEQ_CLS` LoRA adapters (3 labels) fine-tuned from checkpoints without a
classification head — a GPT-2 causal LM (`GPT2LMHeadModel`, head `score`), a bare BERT
encoder (`BertModel`, head `classifier`), a BERT with its pre-training heads saved as a
`BertForMaskedLM` (as the Hub's `bert-base-uncased`, head `classifier`) and a sharded Llama
causal LM with an untied `lm_head` (`LlamaForCausalLM`, head `score`) — with the `config.json` that PEFT's
`merge_and_unload()` + `save_pretrained()` writes (`peft_merged_config.json`), the tensor
names it writes (`peft_merged_keys.json`) and PEFT's unmerged logits on one row
(`io.safetensors`). Made by
`scripts/make_merged_head_fixtures.py` (its docstring lists every file); checked by
`tests/suite/merged_head.rs`.
"""


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    for case in ["gpt2", "bert", "bert_mlm", "llama"]:
        make(case)
    (OUT / "README.md").write_text(README)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
