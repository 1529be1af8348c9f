#!/usr/bin/env python3
"""Writes tests/fixtures/distilbert_cls/: tiny DistilBERT sequence classifiers, PEFT
SEQ_CLS adapters on them, and what transformers + PEFT compute from them.

DistilBERT is BERT's encoder under other names (`distilbert.transformer.layer.N.attention.
q_lin`, `sa_layer_norm`, `ffn.lin1`, …) and another config (`dim`, `n_layers`, …), with no
token types, no dropout after the attention's output projection, LayerNorm eps 1e-12
whatever the config says, and a head of its own: `pre_classifier`, ReLU, dropout
(`seq_classif_dropout`), `classifier` on the first token. PEFT's SEQ_CLS task puts
`classifier` in modules_to_save and matches it as a plain suffix, so `pre_classifier` is
copied and saved too: an adapter trained on a masked-LM save (as the Hub's
`distilbert-base-uncased` is, with neither layer) reloads the same.

Usage:
    python3 scripts/make_distilbert_fixtures.py
        removes and rewrites tests/fixtures/distilbert_cls/ (deterministic)

Output (each model: vocab 64, dim 16, 2 layers, 2 heads, hidden_dim 32, 16 positions,
every parameter redrawn as make_option_fixtures redraws its bases):
    distilbert/base/          DistilBertForSequenceClassification, 3 labels
    distilbert/adapter/       PEFT LoRA r=4 alpha=8 on every linear layer of the encoder
                              (SEQ_CLS: `classifier` in modules_to_save, which PEFT matches
                              as a plain suffix, so `pre_classifier` is a trained copy too),
                              every trainable parameter given 0.1 * normal on top of its
                              start
    distilbert/io.safetensors input_ids (i64 (3, 6): a full row, a row padded on the right,
                              a row padded on the left), attention_mask, labels; `logits`
                              (unmerged, eval), `merged_logits`, `base_logits` (disabled),
                              `loss` (cross-entropy, eval mode) and `grad.<name>` for every
                              trainable tensor under lorakit's name for it
    distilbert_mlm/base/      DistilBertForMaskedLM (`vocab_transform`, `vocab_projector`,
                              no pre_classifier, no classifier; 2 labels by default)
    distilbert_mlm/adapter/   PEFT LoRA r=4 alpha=8 on q_lin, v_lin,
                              SEQ_CLS (its copies of pre_classifier and classifier), trained
                              over a fresh classifier of base/, perturbed as above
    distilbert_mlm/io.safetensors  input_ids, attention_mask; `logits` of the adapter over
                              two fresh classifiers with other random heads (checked equal)

Versions used to generate the committed files: torch 2.15.0, transformers 5.25.0,
peft 0.21.2.
"""

import os
import shutil

from fixture_env import rerun_pinned

rerun_pinned()

import torch  # noqa: E402
from transformers import (  # noqa: E402
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
)

from make_roberta_fixtures import (  # noqa: E402
    fresh,
    write_classifier,
    write_masked_lm_case,
    WORDPIECE_IDS,
    WORDPIECE_LABELS,
    WORDPIECE_MASK,
)

ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "distilbert_cls")
)
SIZES = dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16)
IDS, MASK, LABELS = WORDPIECE_IDS, WORDPIECE_MASK, WORDPIECE_LABELS


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    torch.set_num_threads(1)
    # Every linear of the encoder by name. PEFT's SEQ_CLS matches modules_to_save
    # ["classifier"] by a plain suffix, so `pre_classifier` is a trained copy too, and
    # PEFT 0.21 fails on any target that adapts it ("all-linear" included).
    write_classifier(
        os.path.join(ROOT, "distilbert"),
        DistilBertForSequenceClassification,
        DistilBertConfig(**SIZES, num_labels=3),
        30,
        ["pre_classifier.weight", "classifier.weight"],
        IDS,
        MASK,
        labels=LABELS,
        target_modules=["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    )
    # The adapter holds pre_classifier (which SEQ_CLS's "classifier" matches as a suffix)
    # and the head.
    write_masked_lm_case(
        os.path.join(ROOT, "distilbert_mlm"),
        fresh(DistilBertForMaskedLM, DistilBertConfig(**SIZES), 40),
        DistilBertForSequenceClassification,
        40,
        ["q_lin", "v_lin"],
        ["pre_classifier.weight", "classifier.bias"],
        IDS,
        MASK,
    )


if __name__ == "__main__":
    main()
