#!/usr/bin/env python3
"""Writes tests/fixtures/models/gpt2_dropout_moments.safetensors,
llama_dropout_moments.safetensors, phi3_dropout_moments.safetensors,
bert_dropout_moments.safetensors, distilbert_dropout_moments.safetensors and
roberta_dropout_moments.safetensors: the mean and
standard deviation, over many independent dropout draws, of what transformers'
GPT2LMHeadModel, LlamaForCausalLM, Phi3ForCausalLM, BertForSequenceClassification,
DistilBertForSequenceClassification and RobertaForSequenceClassification compute in training mode (`model.train()`, f32, CPU,
eager attention), for lorakit's models' own dropouts (`Gpt2LmHeadModel::forward_t`,
`LlamaForCausalLM::forward_t`, `BertForSequenceClassification::forward_t`; tests in
`tests/suite/models_dropout.rs`).

Dropout draws cannot be matched one by one across two random generators, so the test
compares their distribution: lorakit's per-element mean and standard deviation of the
logits over its own draws against these, within their sampling error. Each case turns on
one of the config's dropouts (`embd_pdrop`, `attn_pdrop`, `resid_pdrop`), or all three,
so a dropout applied at the wrong place, with the wrong scale, or not at all moves the
moments of its case. The Llama family has one dropout, `attention_dropout`: one case, 0.5,
on a tiny Llama with grouped-query heads and an untied head. Phi-3 adds `resid_pdrop` on
each layer's attention and MLP outputs: a case with it alone (0.5) and one with both
(0.2 each), on the same shape with Phi-3's fused projections. The encoders (32 labels, 4
input rows) have a case with the hidden dropout alone (0.5) and one with the hidden, the
attention probabilities' and the classifier's dropouts at 0.2 each; BERT, RoBERTa and
DistilBERT place them differently (DistilBERT has none after the attention's output
projection and drops after `pre_classifier`'s ReLU; RoBERTa's head drops before each of
its two layers).

Usage:
    python3 scripts/make_dropout_fixtures.py      (rewrites the files; seeded, but PyTorch's
        multi-threaded sums change their low bits from run to run (2026-12-05, 2 cores):
        a rerun gives files that differ in the last bits; the committed ones are each from
        the run that added it)

Keys of each file (f32 unless said):
    <transformers name>       the random model's weights (tied head: no lm_head.weight)
    input_ids                 i64 (2, 8)
    eval_logits               (2, 8, vocab) in evaluation mode (no dropout)
    <case>.mean, <case>.std   (2, 8, vocab) per-element mean and standard deviation
                              (n - 1 denominator) of the logits over DRAWS training-mode
                              forwards, for GPT-2's cases embd, attn, resid, all,
                              Llama's case attn, Phi-3's resid and both, the encoders'
                              hidden and all (encoders: (4, 32) logits, input_ids (4, 8))
Metadata: `config` = JSON of the model's config.json fields lorakit reads (dropouts 0);
`cases` = JSON {case: {the case's dropout fields}}; `draws` = DRAWS.

Versions used for the committed file: torch 2.15.0, transformers 5.25.0, safetensors 0.8.0.
"""

import json
import os

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")

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

GPT2_CASES = {
    "embd": dict(embd_pdrop=0.5, attn_pdrop=0.0, resid_pdrop=0.0),
    "attn": dict(embd_pdrop=0.0, attn_pdrop=0.5, resid_pdrop=0.0),
    "resid": dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.5),
    "all": dict(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1),
}

DRAWS = 40000
# Copies of the two input rows per forward: every row draws its own dropout choices.
COPIES = 2000


LLAMA = dict(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    attention_dropout=0.0,
)

LLAMA_CASES = {"attn": dict(attention_dropout=0.5)}

# Phi-3: the Llama shape with its fused projections; its resid_pdrop drops the attention's
# and the MLP's outputs before their residual adds.
PHI3 = dict(LLAMA, resid_pdrop=0.0)
PHI3_CASES = {"resid": dict(resid_pdrop=0.5), "both": dict(resid_pdrop=0.2, attention_dropout=0.2)}


def randomize(model, is_norm):
    """Norm weights 1 + 0.1 N, biases 0.1 N, every other weight 0.5 N."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_norm(name):
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


def gpt2_model():
    torch.manual_seed(0)
    config = GPT2Config(**BASE)
    config._attn_implementation = "eager"
    model = GPT2LMHeadModel(config)
    randomize(model, lambda n: ".ln_" in n or n.startswith("transformer.ln_f"))
    keys = ["activation_function", "layer_norm_epsilon", "n_embd", "n_head", "n_inner",
            "n_layer", "n_positions", "reorder_and_upcast_attn",
            "scale_attn_by_inverse_layer_idx", "scale_attn_weights", "tie_word_embeddings",
            "vocab_size", "embd_pdrop", "attn_pdrop", "resid_pdrop"]
    return config, model, {k: getattr(config, k) for k in keys}


def decoder_model(model_type, fields):
    """A Llama-family decoder (`model_type` llama or phi3) with config `fields`, eager
    attention, randomized."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, c) for c in classes[model_type])
    torch.manual_seed(0)
    config = config_cls(**fields)
    config._attn_implementation = "eager"
    model = model_cls(config)
    randomize(model, lambda n: n.endswith("norm.weight"))
    return config, model, {"model_type": model_type, **fields}


def set_phi3_dropouts(model, p):
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = p.get("attention_dropout", 0.0)
        layer.resid_attn_dropout.p = p["resid_pdrop"]
        layer.resid_mlp_dropout.p = p["resid_pdrop"]


def set_gpt2_dropouts(model, p):
    model.transformer.drop.p = p["embd_pdrop"]
    for block in model.transformer.h:
        block.attn.attn_dropout.p = p["attn_pdrop"]
        block.attn.resid_dropout.p = p["resid_pdrop"]
        block.mlp.dropout.p = p["resid_pdrop"]


def set_llama_dropouts(model, p):
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = p["attention_dropout"]


def write(name, config, model, fields, cases, set_dropouts, rows=2):
    ids = torch.randint(0, config.vocab_size, (rows, 8), dtype=torch.long)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # the embedding table
    tensors["input_ids"] = ids
    model.eval()
    with torch.no_grad():
        tensors["eval_logits"] = model(input_ids=ids).logits.contiguous()
    model.train()
    batch = ids.repeat(COPIES, 1)
    torch.manual_seed(1)
    for case, p in cases.items():
        set_dropouts(model, p)
        shape = tensors["eval_logits"].shape
        total = torch.zeros(shape, dtype=torch.float64)
        squares = torch.zeros_like(total)
        with torch.no_grad():
            for _ in range(DRAWS // COPIES):
                logits = model(input_ids=batch).logits.double()
                logits = logits.reshape(COPIES, *shape)
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
    metadata = {
        "config": json.dumps(fields, sort_keys=True),
        "cases": json.dumps(cases, sort_keys=True),
        "draws": str(DRAWS),
    }
    out = os.path.join(MODELS, f"{name}_dropout_moments.safetensors")
    os.makedirs(MODELS, exist_ok=True)
    save_file(tensors, out, metadata=metadata)
    print(f"wrote {out}: {len(tensors)} tensors")


# Encoders (sequence classifiers, 32 labels so that the logits have elements enough): BERT
# and DistilBERT, whose dropouts sit in different places (DistilBERT: none after the
# attention's output projection; after `pre_classifier`'s ReLU, not before the head).
ENCODER = dict(vocab_size=32, max_position_embeddings=16, num_labels=32)
BERT = dict(ENCODER, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
BERT_CASES = {
    "hidden": dict(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.0, classifier_dropout=0.0),
    "all": dict(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, classifier_dropout=0.2),
}
DISTILBERT = dict(ENCODER, dim=16, n_layers=2, n_heads=2, hidden_dim=32, dropout=0.0, attention_dropout=0.0,
                  seq_classif_dropout=0.0)
ROBERTA = dict(BERT, type_vocab_size=1, pad_token_id=1)
ROBERTA_CASES = BERT_CASES
DISTILBERT_CASES = {
    "hidden": dict(dropout=0.5, attention_dropout=0.0, seq_classif_dropout=0.0),
    "all": dict(dropout=0.2, attention_dropout=0.2, seq_classif_dropout=0.2),
}


def encoder_model(model_type, fields):
    """A BERT or DistilBERT sequence classifier with config `fields`, eager attention,
    randomized."""
    import transformers

    classes = {
        "bert": ("BertConfig", "BertForSequenceClassification"),
        "roberta": ("RobertaConfig", "RobertaForSequenceClassification"),
        "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification"),
    }
    config_cls, model_cls = (getattr(transformers, c) for c in classes[model_type])
    torch.manual_seed(0)
    config = config_cls(**fields)
    config._attn_implementation = "eager"
    model = model_cls(config)
    randomize(model, lambda n: "LayerNorm" in n or "layer_norm" in n)
    return config, model, {"model_type": model_type, **fields}


def set_encoder_dropouts(model, p):
    """Each `nn.Dropout` of a BERT, RoBERTa or DistilBERT classifier at its config field's
    probability: the attention probabilities', the classifier's (the top-level `dropout`,
    RoBERTa's `classifier.dropout`), every other one the hidden states'."""
    bert = "hidden_dropout_prob" in p
    attention = p["attention_probs_dropout_prob" if bert else "attention_dropout"]
    classifier = p["classifier_dropout" if bert else "seq_classif_dropout"]
    hidden = p["hidden_dropout_prob" if bert else "dropout"]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            if name.endswith("attention.self.dropout") or name.endswith("attention.dropout"):
                module.p = attention
            elif name in ("dropout", "classifier.dropout"):
                module.p = classifier
            else:
                module.p = hidden


def main():
    write("gpt2", *gpt2_model(), GPT2_CASES, set_gpt2_dropouts)
    write("llama", *decoder_model("llama", LLAMA), LLAMA_CASES, set_llama_dropouts)
    write("phi3", *decoder_model("phi3", PHI3), PHI3_CASES, set_phi3_dropouts)
    write("bert", *encoder_model("bert", BERT), BERT_CASES, set_encoder_dropouts, rows=4)
    write("distilbert", *encoder_model("distilbert", DISTILBERT), DISTILBERT_CASES, set_encoder_dropouts, rows=4)
    write("roberta", *encoder_model("roberta", ROBERTA), ROBERTA_CASES, set_encoder_dropouts, rows=4)


if __name__ == "__main__":
    main()
