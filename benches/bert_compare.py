#!/usr/bin/env python3
"""LoRA fine-tuning speed on a BERT (or RoBERTa) sequence classifier, side by side in one
run: lorakit (`examples/bert_speed.rs`) against PyTorch + transformers + PEFT.

The model: a `BertForSequenceClassification` (`--family roberta`:
`RobertaForSequenceClassification`, 514 positions, one token type; `--family distilbert`:
`DistilBertForSequenceClassification`, LoRA on q_lin and v_lin) written by transformers
with random weights
(default 4 layers, hidden 512, 8 heads, intermediate 2048, vocab 8000, 2 labels; f32; the
config's dropout, 0.1), a fresh LoRA r = 16, alpha = 32, no dropout on query and value
(DistilBERT: q_lin and v_lin)
and the classifier trained in full (PEFT's SEQ_CLS task). Per step, in training mode, at
the level a user calls: PyTorch `model(input_ids, attention_mask=mask, labels=labels).loss`,
`backward()`, `AdamW.step()`, `zero_grad(set_to_none=True)`; lorakit
`BertForSequenceClassification::forward_t` + `loss`, `backward`, `candle_nn::AdamW`.
Batch 16 x 128 ids, each row's tail padded to a length of its own (the same mask on both
sides); the same thread count on both sides. Rounds alternate the order; cells are the
median over rounds of each process's median step (`step_compare.py`).

    python3 benches/bert_compare.py [--family bert|roberta|distilbert] [--rounds 3] [--threads 2]
        [--steps 12] [--layers 4] [--hidden 512] [--lorakit-bin PATH]
"""
import os, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_compare import main, timed_steps  # noqa: E402 (the benches share it)

BATCH, SEQ = 16, 128
# `--family`, read here (the shared flags are step_compare's): only the model written
# differs, both sides load it by its config.
FAMILY = "bert"
if "--family" in sys.argv:
    at = sys.argv.index("--family")
    FAMILY = sys.argv[at + 1]
    del sys.argv[at:at + 2]
    if FAMILY not in ("bert", "roberta", "distilbert"):
        sys.exit(f"--family: bert, roberta or distilbert, not {FAMILY}")


def write_model(dir, layers, hidden):
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)
    torch.manual_seed(0)
    sizes = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=hidden // 64,
                 intermediate_size=4 * hidden, vocab_size=8000, num_labels=2)
    if FAMILY == "roberta":
        config = RobertaConfig(**sizes, max_position_embeddings=514, type_vocab_size=1)
        RobertaForSequenceClassification(config).save_pretrained(dir)
    elif FAMILY == "distilbert":
        config = DistilBertConfig(dim=hidden, n_layers=layers, n_heads=hidden // 64, hidden_dim=4 * hidden,
                                  vocab_size=8000, num_labels=2)
        DistilBertForSequenceClassification(config).save_pretrained(dir)
    else:
        BertForSequenceClassification(BertConfig(**sizes)).save_pretrained(dir)


def inputs(vocab, labels):
    """The ids, mask and labels examples/bert_speed.rs builds."""
    import torch
    ids = (torch.arange(BATCH * SEQ) * 7919 % vocab).reshape(BATCH, SEQ)
    i = torch.arange(BATCH * SEQ)
    mask = ((i % SEQ) < SEQ - (i // SEQ * 7) % (SEQ // 2)).long().reshape(BATCH, SEQ)
    return ids, mask, torch.arange(BATCH) % labels


def torch_step_ms(dir, threads, steps, warmup):
    import torch
    from transformers import AutoModelForSequenceClassification
    from peft import LoraConfig, TaskType, get_peft_model
    torch.set_num_threads(threads)
    base = AutoModelForSequenceClassification.from_pretrained(dir)
    targets = ["q_lin", "v_lin"] if base.config.model_type == "distilbert" else ["query", "value"]
    model = get_peft_model(base, LoraConfig(
        task_type=TaskType.SEQ_CLS, r=16, lora_alpha=32, lora_dropout=0.0,
        target_modules=targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids, mask, labels = inputs(model.config.vocab_size, model.config.num_labels)

    def step():
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed_steps(step, steps, warmup)


if __name__ == "__main__":
    name = {"bert": "BERT", "roberta": "RoBERTa", "distilbert": "DistilBERT"}[FAMILY]
    targets = "q_lin, v_lin" if FAMILY == "distilbert" else "query, value"
    main(__doc__, "bert_speed", write_model, torch_step_ms, f"{name} classifier LoRA step",
         lambda a: f"{name} classifier {a.layers} layers, hidden {a.hidden}, vocab 8000, 2 labels, f32, "
                   f"dropout 0.1; LoRA r=16 on {targets}, classifier trained in full; batch {BATCH} x "
                   f"{SEQ}, padded tails",
         lorakit_args=["--batch", str(BATCH), "--seq", str(SEQ)])
