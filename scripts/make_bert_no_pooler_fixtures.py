#!/usr/bin/env python3
"""Writes tests/fixtures/bert_no_pooler/: a BERT checkpoint without a pooler (saved from
`BertForMaskedLM`, as many pretrained encoders are), a PEFT classifier adapter trained on
it with the pooler in `modules_to_save`, and what transformers + PEFT compute from them.

transformers builds `BertForSequenceClassification` on such a checkpoint with a random
pooler (and a random classifier), with a warning. PEFT's `SEQ_CLS` task saves the
classifier (`modules_to_save`), but not the pooler unless it is listed too; with
`modules_to_save=["pooler"]` (PEFT adds "classifier") the adapter holds both, so every
load gives the same logits. That is what this adapter is.

Usage:
    python3 scripts/make_bert_no_pooler_fixtures.py
        removes and rewrites tests/fixtures/bert_no_pooler/ (deterministic)

Output:
    base/              BertForMaskedLM (vocab 64, hidden 16, 2 layers, 2 heads, MLP 32,
                       16 positions), every parameter redrawn as make_option_fixtures
                       redraws its bases; its
                       model.safetensors has `cls.predictions.*` and no `bert.pooler.*`;
                       config.json says 2 labels (transformers' default)
    adapter/           PEFT LoRA r=4 alpha=8 on query, value, task_type SEQ_CLS,
                       modules_to_save ["pooler"] (+ "classifier"), every trainable
                       parameter given 0.1 * normal on top of its start
    io.safetensors     input_ids (i64 (2, 5)), attention_mask (the second row padded
                       on the right by 2), `logits` of PeftModel.from_pretrained(adapter/)
                       over a fresh BertForSequenceClassification of base/ (its own random
                       pooler and head, another seed: the adapter replaces both), eval,
                       unmerged; `merged_logits` after merge_and_unload()

Versions used to generate the committed files: torch 2.15.0, transformers 5.25.0,
peft 0.21.2.
"""

import os
import shutil
import warnings

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification
from peft import LoraConfig, PeftModel, get_peft_model
from fixture_env import rerun_pinned, saved_tensor_names
import make_option_fixtures as option_fixtures

ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "bert_no_pooler")
)
# make_option_fixtures' tiny BERT, with transformers' default 2 labels.
BERT = {k: v for k, v in option_fixtures.BERT.items() if k != "num_labels"}


def classifier(base_dir, seed):
    """A fresh BertForSequenceClassification of base_dir: its pooler and head random from
    `seed` (transformers warns that they are newly initialized)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BertForSequenceClassification.from_pretrained(base_dir)


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    base_dir, adapter_dir = os.path.join(ROOT, "base"), os.path.join(ROOT, "adapter")
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(**BERT))
    option_fixtures.redraw(mlm)
    mlm.save_pretrained(base_dir)
    names = saved_tensor_names(base_dir)
    assert not any("pooler" in n for n in names), names
    assert any(n.startswith("cls.predictions") for n in names), names

    model = classifier(base_dir, 1)
    # The adapter's base_model_name_or_path: a name, not this machine's path.
    model.name_or_path = model.config._name_or_path = "lorakit-fixtures/bert_no_pooler"
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        modules_to_save=["pooler"],
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(2)
    option_fixtures.perturb_trainable(peft_model)
    peft_model.save_pretrained(adapter_dir)
    os.remove(os.path.join(adapter_dir, "README.md"))
    saved = saved_tensor_names(adapter_dir)
    for key in ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight"]:
        assert f"base_model.model.{key}" in saved, (key, saved)

    ids = torch.tensor([[5, 17, 3, 40, 2], [9, 33, 61, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    logits = []
    for seed in [3, 4]:
        loaded = PeftModel.from_pretrained(classifier(base_dir, seed), adapter_dir).eval()
        with torch.no_grad():
            logits.append(loaded(input_ids=ids, attention_mask=mask).logits)
    # The adapter holds the pooler and the head: two loads with other random ones agree.
    assert torch.equal(logits[0], logits[1])
    with torch.no_grad():
        merged = loaded.merge_and_unload()(input_ids=ids, attention_mask=mask).logits
    save_file(
        {
            "input_ids": ids,
            "attention_mask": mask,
            "logits": logits[0].contiguous(),
            "merged_logits": merged.contiguous(),
        },
        os.path.join(ROOT, "io.safetensors"),
    )
    print(f"wrote {ROOT}: logits {logits[0].tolist()}")


if __name__ == "__main__":
    rerun_pinned()
    main()
