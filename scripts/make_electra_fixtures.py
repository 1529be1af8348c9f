#!/usr/bin/env python3
"""Writes tests/fixtures/electra_cls/: tiny ELECTRA (discriminator) sequence classifiers,
PEFT SEQ_CLS adapters on them, and what transformers + PEFT compute from them.

ELECTRA is BERT's encoder under `electra.` with embeddings of `embedding_size`, projected
to `hidden_size` by `electra.embeddings_project` when the two differ, no pooler, and
RoBERTa's two-layer head with the exact GELU for tanh (`classifier.dense`, GELU,
`classifier.out_proj`, a dropout before each).

Usage:
    python3 scripts/make_electra_fixtures.py
        removes and rewrites tests/fixtures/electra_cls/ (deterministic)

Output (each model: vocab 64, embedding_size 8, hidden 16, 2 layers, 2 heads, MLP 32, 16
positions, every parameter redrawn as make_option_fixtures redraws its bases):
    electra/base/          ElectraForSequenceClassification, 3 labels
    electra/adapter/       PEFT LoRA r=4 alpha=8 on query, value (PEFT's default for
                           ELECTRA) and embeddings_project, task_type SEQ_CLS (the head in
                           modules_to_save), every trainable parameter given 0.1 * normal
                           on top of its start
    electra/io.safetensors input_ids (i64 (3, 6): a full row, a row padded on the right, a
                           row padded on the left), attention_mask, labels; `logits`
                           (unmerged, eval), `merged_logits`, `base_logits` (disabled),
                           `loss` and `grad.<name>` for every trainable tensor
    electra_disc/base/     ElectraForPreTraining (the Hub's discriminators:
                           `discriminator_predictions.*`, no classifier)
    electra_disc/adapter/  PEFT LoRA r=4 alpha=8 on query, value, SEQ_CLS, trained over a
                           fresh classifier of base/ (a random head), perturbed as above
    electra_disc/io.safetensors  input_ids, attention_mask; `logits` of the adapter over two
                           fresh classifiers with other random heads (checked equal)

Versions used to generate the committed files: torch 2.15.0, transformers 5.25.0,
peft 0.21.2.
"""

import os
import shutil

from fixture_env import rerun_pinned

rerun_pinned()

import torch  # noqa: E402
from transformers import ElectraConfig, ElectraForPreTraining, ElectraForSequenceClassification  # noqa: E402

from make_roberta_fixtures import (  # noqa: E402
    HEAD,
    fresh,
    write_classifier,
    write_masked_lm_case,
    WORDPIECE_IDS,
    WORDPIECE_LABELS,
    WORDPIECE_MASK,
)

ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "electra_cls")
)
SIZES = dict(
    vocab_size=64,
    embedding_size=8,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
)
IDS, MASK, LABELS = WORDPIECE_IDS, WORDPIECE_MASK, WORDPIECE_LABELS


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    torch.set_num_threads(1)
    write_classifier(
        os.path.join(ROOT, "electra"),
        ElectraForSequenceClassification,
        ElectraConfig(**SIZES, num_labels=3),
        50,
        HEAD,
        IDS,
        MASK,
        labels=LABELS,
        target_modules=["query", "value", "embeddings_project"],
    )
    write_masked_lm_case(
        os.path.join(ROOT, "electra_disc"),
        fresh(ElectraForPreTraining, ElectraConfig(**SIZES), 60),
        ElectraForSequenceClassification,
        60,
        ["query", "value"],
        HEAD,
        IDS,
        MASK,
    )


if __name__ == "__main__":
    main()
