#!/usr/bin/env python3
"""Writes tests/fixtures/generate/expected.json: what transformers' `generate` gives on the
committed tiny fixture models with their PEFT adapters, for lorakit's generation
(`src/models/generation.rs`, `lorakit generate`; tests in tests/suite/generate.rs and
tests/suite/cli/generate.rs).

Usage:
    python3 scripts/make_generate_fixtures.py      (deterministic; rewrites the file)

Models (nothing new is trained or drawn; the fixtures of other scripts are read):
    mistral, qwen2, qwen3, llama3_rope, linear_rope
        tests/fixtures/models/llama/CASE/{base,lora} (scripts/make_model_fixtures.py)
    mistral, qwen2, qwen3, llama3_rope with their second variant (the longer prompt only)
        tests/fixtures/models/llama/CASE/{base,vera|dora|adalora}: mistral/vera,
        qwen2/dora, qwen3/adalora, llama3_rope/dora (the `adapter` field names the folder;
        the `lora_*` fields hold that adapter's tokens whatever its variant)
    gpt2_lora, gpt2_dora
        tests/fixtures/peft_options/CASE/{base,adapter} (scripts/make_option_fixtures.py;
        n_positions 16, so prompts are 4 tokens: 4 + 12 new fit)

For each model and prompt, greedy decoding (`do_sample=False`, `max_new_tokens=12`, f32,
CPU, eval, default attention):
    base          the base model alone (AutoModelForCausalLM.from_pretrained)
    lora          the PEFT adapter loaded with PeftModel.from_pretrained, unmerged
    merged        the same after merge_and_unload()
all three with `eos_token_id=None` (no stop token: always 12 tokens), and
    lora_stop     the unmerged adapter with two stop tokens `stop`: the fifth token of
                  `lora` and one not generated before it (ends early, the stop included).
`eos` is the model's own stop token (generation_config.json: 2 for the Llama fixtures,
50256 for GPT-2, outside its vocabulary of 64), what `lorakit generate` stops at.
`merged_differs`: PEFT's merge_and_unload() folds a LoRA on a tied table into the tensor
the embedding and the head share, so the merged model is another model for gpt2_lora
(LoRA on wte: lorakit's tied GPT-2 head follows the merged table, as PEFT) and
linear_rope (LoRA on the tied lm_head: lorakit's Llama head holds a table of its own, so
there lorakit's merged model stays the unmerged one); elsewhere merging changes nothing.
`min_margin` is the smallest gap between the largest and second-largest logit over every
step of `lora` (how far greedy decoding is from a tie: lorakit's logits agree to ~1e-6).

A text case (`text`): the qwen2 base model and LoRA with the tokenizer of
tests/fixtures/tokenizer/ copied beside it (a temporary folder; the CLI test builds the
same one): the prompt text is encoded by AutoTokenizer (adding `<s>`), generated with the
tokenizer's eos_token as stop token (`</s>` = 2: qwen2's config names none, and `lorakit
generate` falls back to the tokenizer's), and the new tokens decoded with
skip_special_tokens=True. The tokenizer is loaded from tests/fixtures/tokenizer/ itself:
in the model folder transformers 5 would pick Qwen2Tokenizer by config.json's model_type
and swap this tokenizer.json's Metaspace pre-tokenizer for Qwen's byte-level one.

expected.json:
    {"versions": {...}, "max_new_tokens": 12,
     "cases": [{"model": "qwen2", "dir": "tests/fixtures/models/llama/qwen2",
                "base": "base", "adapter": "lora", "model_type": "qwen2",
                "prompt": [...], "eos": [2] or [],
                "base_tokens": [...], "lora_tokens": [...], "merged_tokens": [...],
                "merged_differs": false, "stop": [t, u], "lora_stop_tokens": [...],
                "min_margin": 0.1}, ...],
     "text": {"model": "qwen2", "prompt_text": "...", "prompt": [...], "tokens": [...],
              "text": "..."}}
Token lists hold the new tokens only (not the prompt).

Versions used for the committed file: torch 2.15.0, transformers 5.24.0, peft 0.21.2.
"""

import copy
import json
import os
import shutil
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "generate", "expected.json")
MAX_NEW = 12

LLAMA_PROMPTS = [[1, 17, 42, 5], [3, 14, 15, 9, 26, 53, 5, 8]]
GPT2_PROMPTS = [[59, 13, 15, 57], [32, 13, 29, 45]]

# (name, folder relative to ROOT, base subfolder, adapter subfolder, prompts)
MODELS = [
    (c, f"tests/fixtures/models/llama/{c}", "base", "lora", LLAMA_PROMPTS)
    for c in ["mistral", "qwen2", "qwen3", "llama3_rope", "linear_rope"]
] + [
    (c, f"tests/fixtures/peft_options/{c}", "base", "adapter", GPT2_PROMPTS)
    for c in ["gpt2_lora", "gpt2_dora"]
] + [
    # The second variant of four Llama-family cases (scripts/make_model_fixtures.py's
    # SECOND), on the longer prompt only.
    (c, f"tests/fixtures/models/llama/{c}", "base", kind, LLAMA_PROMPTS[1:])
    for c, kind in [("mistral", "vera"), ("qwen2", "dora"), ("qwen3", "adalora"), ("llama3_rope", "dora")]
]
TEXT_PROMPT = "hello world, the quick"


def log(msg):
    print(msg, flush=True)


def load_base(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def greedy(model, prompt, eos):
    """The new tokens of greedy decoding and the smallest top-1 / top-2 logit gap."""
    ids = torch.tensor([prompt])
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=MAX_NEW,
        eos_token_id=eos,
        pad_token_id=0,
        bos_token_id=None,
        output_scores=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out.sequences[0, len(prompt):].tolist()
    margin = min(
        float((lambda top: top[0] - top[1])(step[0].topk(2).values)) for step in out.logits
    )
    if eos is None:
        assert len(new) == MAX_NEW, (len(new), new)
    return new, margin


def stop_tokens(path):
    with open(os.path.join(path, "generation_config.json")) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return []
    return eos if isinstance(eos, list) else [eos]


def model_case(name, rel, base_sub, adapter_sub, prompt):
    base_dir = os.path.join(ROOT, rel, base_sub)
    adapter_dir = os.path.join(ROOT, rel, adapter_sub)
    base_tokens, _ = greedy(load_base(base_dir), prompt, None)
    lora = PeftModel.from_pretrained(load_base(base_dir), adapter_dir).eval()
    lora_tokens, margin = greedy(lora, prompt, None)
    eos = stop_tokens(base_dir)
    # Two stop tokens: the fifth generated one (so the output ends there, stop included)
    # and one not generated before it.
    stop = [lora_tokens[4], next(t for t in range(64) if t not in lora_tokens[:5])]
    lora_stop_tokens, _ = greedy(lora, prompt, stop)
    assert lora_stop_tokens == lora_tokens[: lora_tokens.index(stop[0]) + 1], name
    assert lora_tokens != base_tokens, (name, adapter_sub, "the adapter changes nothing")
    merged = copy.deepcopy(lora).merge_and_unload().eval()
    merged_tokens, _ = greedy(merged, prompt, None)
    # PEFT merges a LoRA on a tied table into the tensor the embedding and the head share,
    # so the merged model is another model where the adapter targets one of them: wte
    # (gpt2_lora) or the tied lm_head (linear_rope). Elsewhere merging changes nothing.
    differs = merged_tokens != lora_tokens
    assert differs == (name in ("gpt2_lora", "linear_rope")), (name, merged_tokens, lora_tokens)
    with open(os.path.join(base_dir, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    log(f"{name} {adapter_sub} {prompt}: lora {lora_tokens} (margin {margin:.3g}), base {base_tokens}, "
        f"merged {merged_tokens}, stop {stop}: {lora_stop_tokens}")
    return {
        "model": name,
        "dir": rel,
        "base": base_sub,
        "adapter": adapter_sub,
        "model_type": model_type,
        "prompt": prompt,
        "eos": eos,
        "base_tokens": base_tokens,
        "lora_tokens": lora_tokens,
        "merged_tokens": merged_tokens,
        "merged_differs": differs,
        "stop": stop,
        "lora_stop_tokens": lora_stop_tokens,
        "min_margin": margin,
    }


def text_case():
    src = os.path.join(ROOT, "tests", "fixtures", "models", "llama", "qwen2")
    tok_dir = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
    # The tokenizer is read from its own folder: in a folder with qwen2's config.json,
    # transformers 5 picks Qwen2Tokenizer by model_type, which replaces this tokenizer.json's
    # Metaspace pre-tokenizer and decoder with Qwen's byte-level ones (other ids, other
    # text). lorakit, like the `tokenizers` library, uses tokenizer.json as written.
    tok = AutoTokenizer.from_pretrained(tok_dir)
    prompt = tok(TEXT_PROMPT)["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        shutil.copytree(os.path.join(src, "base"), folder)
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(os.path.join(tok_dir, f), folder)
        lora = PeftModel.from_pretrained(load_base(folder), os.path.join(src, "lora")).eval()
        # qwen2's config names no stop token: `lorakit generate` then stops at the
        # tokenizer's eos_token, passed here as transformers does not look there.
        assert not stop_tokens(folder)
        tokens, margin = greedy(lora, prompt, [tok.eos_token_id])
    text = tok.decode(tokens, skip_special_tokens=True)
    log(f"text {TEXT_PROMPT!r} -> {prompt}: {tokens} {text!r} (margin {margin:.3g})")
    return {
        "model": "qwen2",
        "prompt_text": TEXT_PROMPT,
        "prompt": prompt,
        "tokens": tokens,
        "text": text,
        "min_margin": margin,
    }


def main():
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cases = [
        model_case(name, rel, b, a, prompt)
        for name, rel, b, a, prompts in MODELS
        for prompt in prompts
    ]
    out = {
        "versions": {
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "max_new_tokens": MAX_NEW,
        "cases": cases,
        "text": text_case(),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    log(f"wrote {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
