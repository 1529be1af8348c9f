#!/usr/bin/env python3
"""Writes tests/fixtures/roberta_cls/: tiny RoBERTa-family sequence classifiers (RoBERTa,
XLM-RoBERTa, and a RoBERTa saved from RobertaForMaskedLM), PEFT SEQ_CLS adapters on them,
and what transformers + PEFT compute from them.

RoBERTa is BERT's encoder with three differences that move logits: positions are numbered
from the input ids (pad_token_id + 1 onwards, padding tokens at pad_token_id, whatever the
attention mask says), there is no pooler, and the head (`classifier`) is two layers
(`dense`, tanh, `out_proj`) on the first token. PEFT's LoRA example for sequence
classification is roberta-large with LoRA on query/value and the head in modules_to_save;
the `roberta` case is that, small.

Usage:
    python3 scripts/make_roberta_fixtures.py
        removes and rewrites tests/fixtures/roberta_cls/ (deterministic)

Output (each model: vocab 64, hidden 16, 2 layers, 2 heads, MLP 32, 12 positions,
pad_token_id 1, one token type, layer_norm_eps 1e-5, every parameter redrawn as
make_option_fixtures redraws its bases):
    roberta/base/          RobertaForSequenceClassification, 3 labels
    roberta/adapter/       PEFT LoRA r=4 alpha=8 on query, value (PEFT's default for
                           roberta), task_type SEQ_CLS (the head in modules_to_save), every
                           trainable parameter given 0.1 * normal on top of its start
    roberta/io.safetensors input_ids (i64 (4, 7): a full row, a row padded on the right
                           with pad_token_id, a row padded on the left, a row with
                           pad_token_id among the tokens it attends to), attention_mask,
                           labels (i64 (4,)); `logits` of the adapter unmerged (eval),
                           `merged_logits` after merge_and_unload(), `base_logits` of the
                           base alone, `loss` (cross-entropy, eval mode) and `grad.<name>`
                           for every trainable tensor under lorakit's name for it (PEFT's
                           name without "base_model.model.", ".default", the LoRA
                           factors' ".weight" and the modules_to_save wrapper)
    xlm_roberta/base/      XLMRobertaForSequenceClassification, 2 labels
    xlm_roberta/adapter/   PEFT LoRA r=4 alpha=8 on all-linear (the head in
                           modules_to_save, so not adapted), perturbed as above
    xlm_roberta/io.safetensors  input_ids and attention_mask as roberta's; `logits`,
                           `merged_logits`
    roberta_mlm/base/      RobertaForMaskedLM: `lm_head.*`, no classifier, no pooler;
                           config.json says 2 labels (transformers' default)
    roberta_mlm/adapter/   PEFT LoRA r=4 alpha=8 on query, value, SEQ_CLS, trained over a
                           fresh RobertaForSequenceClassification of base/ (a random head),
                           perturbed as above: the adapter holds the head
    roberta_mlm/io.safetensors  input_ids, attention_mask; `logits` of the adapter over
                           two fresh classifiers with other random heads (checked equal)

Versions used to generate the committed files: torch 2.15.0, transformers 5.25.0,
peft 0.21.2.
"""

import os
import shutil
import warnings

from fixture_env import rerun_pinned, saved_tensor_names

rerun_pinned()

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

import make_option_fixtures as option_fixtures  # noqa: E402

ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "roberta_cls")
)
SIZES = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=12,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
# <s> = 0, <pad> = 1, </s> = 2, as RoBERTa's vocabulary numbers them.
IDS = torch.tensor(
    [
        [0, 5, 17, 3, 40, 9, 2],
        [0, 9, 33, 61, 2, 1, 1],
        [1, 1, 0, 12, 44, 7, 2],
        [0, 20, 1, 33, 8, 2, 1],
    ]
)
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 0],
    ]
)
LABELS = torch.tensor([2, 0, 1, 0])
# The batch of the models with BERT's vocabulary layout (DistilBERT, ELECTRA): [PAD] = 0,
# [CLS] = 2, [SEP] = 3; a full row, a right-padded one and a left-padded one.
WORDPIECE_IDS = torch.tensor([[2, 5, 17, 33, 40, 3], [2, 9, 61, 3, 0, 0], [0, 2, 12, 44, 7, 3]])
WORDPIECE_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
WORDPIECE_LABELS = torch.tensor([2, 0, 1])


def lorakit_name(peft_name):
    name = peft_name.replace("base_model.model.", "").replace(".default", "")
    name = name.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")
    return name.replace("classifier.modules_to_save.", "classifier.")


def fresh(model_cls, config, seed):
    torch.manual_seed(seed)
    model = model_cls(config)
    option_fixtures.redraw(model)
    return model


def adapt(model, name, seed, **lora):
    """`model` under a fresh PEFT SEQ_CLS adapter of `lora`, every trainable tensor
    perturbed from `seed`."""
    # The adapter's base_model_name_or_path: a name, not this machine's path.
    model.name_or_path = model.config._name_or_path = f"lorakit-fixtures/{name}"
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, **lora))
    torch.manual_seed(seed)
    option_fixtures.perturb_trainable(peft_model)
    return peft_model


def save_adapter(peft_model, adapter_dir, head):
    """Saves the adapter (no README) and checks that it holds the tensors `head`."""
    peft_model.save_pretrained(adapter_dir)
    os.remove(os.path.join(adapter_dir, "README.md"))
    saved = saved_tensor_names(adapter_dir)
    for key in head:
        assert f"base_model.model.{key}" in saved, (key, saved)


HEAD = ["classifier.dense.weight", "classifier.out_proj.bias"]


def logits_of(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.contiguous()


def gradients(model, ids, mask, labels):
    """The eval-mode loss of `labels` and `grad.<lorakit's name>` of every trainable tensor
    of `model` (a PeftModel loaded trainable)."""
    model.eval()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    out = {"labels": labels, "loss": loss.detach()}
    for param_name, p in model.named_parameters():
        if p.requires_grad:
            out[f"grad.{lorakit_name(param_name)}"] = p.grad.detach().clone().contiguous()
    return out


def write_classifier(case, model_cls, config, seed, head, ids=IDS, mask=MASK, labels=None, **lora):
    """A base of `model_cls` at `case`/base, an adapter of `lora` on it (it must hold the
    tensors `head`), and PEFT's logits on `ids` / `mask`: unmerged, merged, disabled; with
    `labels`, their loss and its gradients."""
    base_dir, adapter_dir = os.path.join(case, "base"), os.path.join(case, "adapter")
    fresh(model_cls, config, seed).save_pretrained(base_dir)
    name = os.path.basename(case)
    peft_model = adapt(model_cls.from_pretrained(base_dir), name, seed + 1, **lora)
    save_adapter(peft_model, adapter_dir, head)

    loaded = PeftModel.from_pretrained(model_cls.from_pretrained(base_dir), adapter_dir)
    loaded.eval()
    out = {"input_ids": ids, "attention_mask": mask, "logits": logits_of(loaded, ids, mask)}
    with loaded.disable_adapter():
        out["base_logits"] = logits_of(loaded, ids, mask)
    if labels is not None:
        trainable = PeftModel.from_pretrained(
            model_cls.from_pretrained(base_dir), adapter_dir, is_trainable=True
        )
        out.update(gradients(trainable, ids, mask, labels))
    out["merged_logits"] = logits_of(loaded.merge_and_unload(), ids, mask)
    save_file(out, os.path.join(case, "io.safetensors"))
    print(f"wrote {case}: logits {out['logits'].tolist()}")


def write_masked_lm_case(case, mlm, classifier_cls, seed, targets, head, ids=IDS, mask=MASK):
    """A masked-LM save `mlm` (a model to save: no classification head) at `case`/base,
    an adapter that trained a head over a fresh `classifier_cls` of it (LoRA on
    `targets`, perturbed from `seed + 2`; it must hold the tensors `head`), and the logits
    of two loads over other random heads (checked equal: the adapter holds the head)."""
    base_dir, adapter_dir = os.path.join(case, "base"), os.path.join(case, "adapter")
    mlm.save_pretrained(base_dir)
    names = saved_tensor_names(base_dir)
    assert not any("pooler" in n or "classifier" in n for n in names), names

    def classifier(draw):
        torch.manual_seed(draw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return classifier_cls.from_pretrained(base_dir)

    name = os.path.basename(case)
    peft_model = adapt(classifier(seed + 1), name, seed + 2, target_modules=targets)
    save_adapter(peft_model, adapter_dir, head)
    logits = []
    for draw in [seed + 3, seed + 4]:
        loaded = PeftModel.from_pretrained(classifier(draw), adapter_dir).eval()
        logits.append(logits_of(loaded, ids, mask))
    assert torch.equal(logits[0], logits[1])
    out = {"input_ids": ids, "attention_mask": mask, "logits": logits[0]}
    save_file(out, os.path.join(case, "io.safetensors"))
    print(f"wrote {case}: logits {logits[0].tolist()}")


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    torch.set_num_threads(1)
    write_classifier(
        os.path.join(ROOT, "roberta"),
        RobertaForSequenceClassification,
        RobertaConfig(**SIZES, num_labels=3),
        10,
        HEAD,
        labels=LABELS,
        target_modules=["query", "value"],
    )
    write_classifier(
        os.path.join(ROOT, "xlm_roberta"),
        XLMRobertaForSequenceClassification,
        XLMRobertaConfig(**SIZES, num_labels=2),
        14,
        HEAD,
        target_modules="all-linear",
    )
    write_masked_lm_case(
        os.path.join(ROOT, "roberta_mlm"),
        fresh(RobertaForMaskedLM, RobertaConfig(**SIZES), 20),
        RobertaForSequenceClassification,
        20,
        ["query", "value"],
        HEAD,
    )


if __name__ == "__main__":
    main()
