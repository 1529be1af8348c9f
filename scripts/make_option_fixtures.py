#!/usr/bin/env python3
"""Generates the PEFT LoRA-option fixtures under tests/fixtures/peft_options/: tiny
transformers models (GPT-2, BERT, Llama), LoRA adapters that exercise options beyond
plain Linear LoRA (Conv1D / fan_in_fan_out, embedding LoRA, DoRA on Conv1D,
modules_to_save, bias="all" / "lora_only", lora_bias, layers_to_transform), and what
PEFT computes from those files: merged weights and per-module inputs/outputs.

Usage:
    python3 scripts/make_option_fixtures.py
        removes and rewrites tests/fixtures/peft_options/ (deterministic)

    python3 scripts/make_option_fixtures.py --only CASE [CASE ...]
        rewrites only those cases' folders

    python3 scripts/make_option_fixtures.py --check CASE ADAPTER_DIR IO_FILE
        by-hand check of an adapter written by lorakit: loads CASE's base/ from the
        fixtures, PeftModel.from_pretrained(base, ADAPTER_DIR), runs the fixture's
        input_ids (from CASE/io.safetensors) through it (eval, unmerged) with the same
        hooks as below, and compares every hooked module's output with
        `<path>.output` in IO_FILE (a safetensors file written by lorakit with the same
        key scheme). A module whose `<path>.input` is in IO_FILE is run by itself on
        that input (module-level check: another adapter changes what deeper modules see
        in a whole-model run); `logits` are compared when present. A `<path>.output` key in IO_FILE for a
        module PEFT did not wrap is an error. Prints, per key, the max relative error
        max|lorakit - peft| / max|peft| and exits 1 if any is above 1e-5 (or nothing
        was compared, PEFT reported missing adapter keys, or a tensor's shape differs
        from the same key in CASE/adapter/). Keys that differ from PEFT's own adapter
        file for CASE are listed as notes (PEFT itself ignores unexpected keys and
        missing bias / base_layer keys without a word).

Cases (all f32; each seeds torch itself):
    gpt2_lora    GPT2LMHeadModel (vocab 64, n_embd 16, 2 layers, 2 heads, tied wte),
                 LoRA r=4 alpha=8 on c_attn, c_proj, c_fc (Conv1D) and wte (Embedding),
                 fan_in_fan_out=True
    gpt2_dora    same model, DoRA r=4 alpha=8 on c_attn, c_fc, fan_in_fan_out=True
    bert_cls     BertForSequenceClassification (hidden 16, 2 layers, 3 labels),
                 task_type SEQ_CLS (classifier in modules_to_save), LoRA r=4 alpha=8 on
                 query, value, bias="all"
    llama_embed  LlamaForCausalLM (hidden 16, 2 layers, 2 heads, 1 KV head, untied
                 lm_head), LoRA r=4 alpha=8 on embed_tokens, lm_head, q_proj, v_proj
    llama_bias   same with attention_bias=True, LoRA r=4 alpha=8 on q/v/o_proj,
                 lora_bias=True, layers_to_transform=[0], layers_pattern="layers",
                 bias="lora_only"
    gpt2_pissa   the GPT-2 model, LoRA r=4 alpha=8 on c_attn, c_proj, c_fc,
                 fan_in_fan_out=True, init_lora_weights="pissa" (PEFT replaces each
                 targeted weight by its residual outside the top-4 singular values)
    gpt2_olora   the GPT-2 model, LoRA r=4 alpha=8 rsLoRA on attn.c_proj (square),
                 fan_in_fan_out=True, init_lora_weights="olora"
    llama_olora_dora  the llama_embed model, DoRA r=8 alpha=8 rsLoRA on q/v/o_proj,
                 rank_pattern {v_proj: 2}, alpha_pattern {o_proj: 4},
                 init_lora_weights="olora"
    llama_pissa_dora  the same model, DoRA r=8 alpha=16 on q/v/o_proj and down_proj,
                 init_lora_weights="pissa" (v_proj is 8 x 16: r covers it whole)

Base models: built from the config, then every parameter redrawn (matrices and
embeddings 0.2 * normal, biases 0.1 * normal, norm weights 1 + 0.1 * normal) so no
tensor is zero/one. Adapters: get_peft_model on the base loaded from base/, then every
parameter with requires_grad=True gets 0.1 * normal added (lora_A/B, lora_B.bias,
lora_embedding_A/B, lora_magnitude_vector, modules_to_save copies, trainable biases).

For each CASE the output holds:
    CASE/base/            save_pretrained of the base (model.safetensors, config.json,
                          generation_config.json where transformers writes one)
    CASE/adapter/         PEFT save_pretrained (adapter_config.json,
                          adapter_model.safetensors; PEFT's README.md removed), default
                          save_embedding_layers behaviour
    CASE/merged/          a fresh base from base/, PeftModel.from_pretrained(adapter/),
                          merge_and_unload(), save_pretrained (safetensors)
    CASE/io.safetensors   a fresh base + PeftModel.from_pretrained(adapter/), eval,
                          unmerged, run on input_ids (i64 (2, 5), attention_mask all
                          ones) with forward hooks on every BaseTunerLayer and
                          ModulesToSaveWrapper: `<path>.input` (first positional input;
                          i64 ids for embeddings) and `<path>.output` (f32), where
                          <path> is the module path in the original model (no
                          `base_model.model.` prefix); plus `input_ids`, `logits` (the
                          unmerged PeftModel) and `merged_logits` (the merged model)
    bert_cls/dora/        a second adapter on bert_cls's base (SECOND): DoRA r=4 alpha=8
                          on query, key, dense (attention output, intermediate, output,
                          pooler), task_type SEQ_CLS (its own classifier copy), bias
                          "none"; made with seed + 2 after the rest of the case. Its
                          logits on the same input_ids are in bert_cls/io.safetensors as
                          `dora_logits` (PeftModel.from_pretrained(dora/) on a fresh
                          base, unmerged) and `dora_merged_logits` (merge_and_unload())

Versions used to generate the committed files: torch 2.15.0, transformers 5.24.0,
peft 0.21.2, safetensors 0.8.0 (Python 3.11). PYTHONHASHSEED is pinned (PEFT stores
target_modules from a set).
"""

import argparse
import json
import os
import shutil
import sys
import warnings

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from fixture_env import rerun_pinned

ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "peft_options")
)
PREFIX = "base_model.model."
TOL = 1e-5

GPT2 = dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
BERT = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    num_labels=3,
)
LLAMA = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)

# name: (model class, config factory, LoraConfig kwargs, seed)
CASES = {
    "gpt2_lora": (
        GPT2LMHeadModel,
        lambda: GPT2Config(**GPT2),
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wte"], fan_in_fan_out=True),
        1000,
    ),
    "gpt2_dora": (
        GPT2LMHeadModel,
        lambda: GPT2Config(**GPT2),
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        2000,
    ),
    "bert_cls": (
        BertForSequenceClassification,
        lambda: BertConfig(**BERT),
        dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], bias="all"),
        3000,
    ),
    "llama_embed": (
        LlamaForCausalLM,
        lambda: LlamaConfig(**LLAMA),
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj", "v_proj"]),
        4000,
    ),
    "llama_bias": (
        LlamaForCausalLM,
        lambda: LlamaConfig(**LLAMA, attention_bias=True),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj"],
            lora_bias=True,
            layers_to_transform=[0],
            layers_pattern="layers",
            bias="lora_only",
        ),
        5000,
    ),
    # Inits after which PEFT's base weights are a residual, recomputed when it loads the
    # adapter (tests/suite/peft_base_residual.rs).
    "gpt2_pissa": (
        GPT2LMHeadModel,
        lambda: GPT2Config(**GPT2),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
            init_lora_weights="pissa",
        ),
        6000,
    ),
    "gpt2_olora": (
        GPT2LMHeadModel,
        lambda: GPT2Config(**GPT2),
        # PEFT's OLoRA factors a Conv1D's stored (in, out) matrix: square ones only.
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["attn.c_proj"],
            fan_in_fan_out=True,
            init_lora_weights="olora",
            use_rslora=True,
        ),
        7000,
    ),
    "llama_olora_dora": (
        LlamaForCausalLM,
        lambda: LlamaConfig(**LLAMA),
        dict(
            r=8,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj"],
            init_lora_weights="olora",
            use_dora=True,
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"o_proj": 4},
        ),
        8000,
    ),
    "llama_pissa_dora": (
        LlamaForCausalLM,
        lambda: LlamaConfig(**LLAMA),
        dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            init_lora_weights="pissa",
            use_dora=True,
        ),
        9000,
    ),
}
INPUT_SHAPE = (2, 5)

# A second adapter of another variant on a case's base: case -> (folder, LoraConfig kwargs).
SECOND = {
    "bert_cls": (
        "dora",
        dict(task_type="SEQ_CLS", r=4, lora_alpha=8, use_dora=True, target_modules=["query", "key", "dense"]),
    ),
}


def log(msg):
    print(msg, flush=True)


def case_dir(case, *parts):
    return os.path.join(ROOT, case, *parts)


def name_of(case):
    return f"lorakit-fixtures/{case}"


def set_name(model, case):
    model.name_or_path = name_of(case)
    model.config._name_or_path = name_of(case)


def is_norm(name):
    leaf = name.rsplit(".", 2)
    mod = leaf[-2] if len(leaf) >= 2 else ""
    return "norm" in mod.lower() or mod.startswith("ln_")


def redraw(model):
    """Every parameter redrawn from the torch generator, in order: biases 0.1 * normal,
    norm weights 1 + 0.1 * normal, the rest 0.2 * normal."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif is_norm(name):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


def build_base(case):
    model_cls, config, _, seed = CASES[case]
    torch.manual_seed(seed)
    model = model_cls(config())
    redraw(model)
    set_name(model, case)
    return model.eval()


def load_base(case, path=None):
    model_cls = CASES[case][0]
    model = model_cls.from_pretrained(path or case_dir(case, "base"), dtype=torch.float32)
    assert model.dtype == torch.float32
    set_name(model, case)
    return model.eval()


def input_ids_for(case):
    seed = CASES[case][3]
    g = torch.Generator().manual_seed(seed + 7)
    return torch.randint(0, 64, INPUT_SHAPE, generator=g, dtype=torch.int64)


def wrapped_modules(model):
    """(path in the original model, module) for every PEFT-wrapped module."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
            assert name.startswith(PREFIX), name
            out.append((name[len(PREFIX) :], module))
    # No wrapper nested in another one.
    names = [n for n, _ in out]
    for a in names:
        assert not any(b != a and b.startswith(a + ".") for b in names), a
    return out


def run_hooked(model, ids):
    """Runs model on ids with hooks on the PEFT-wrapped modules; returns (records, logits)."""
    records = {}
    handles = []

    def make_hook(path):
        def hook(module, args, kwargs, output):
            assert path + ".output" not in records, f"{path} called twice"
            x = args[0] if args else next(iter(kwargs.values()))
            assert isinstance(output, torch.Tensor), (path, type(output))
            records[path + ".input"] = x.detach().contiguous().clone()
            records[path + ".output"] = output.detach().float().contiguous().clone()

        return hook

    mods = wrapped_modules(model)
    assert mods, "no PEFT-wrapped modules"
    for path, module in mods:
        handles.append(module.register_forward_hook(make_hook(path), with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        for h in handles:
            h.remove()
    missing = [p for p, _ in mods if p + ".output" not in records]
    assert not missing, f"wrapped modules not called: {missing}"
    return records, logits.detach().float().contiguous().clone()


def perturb_trainable(model):
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
                names.append(name)
    return names


def load_peft(case, adapter_dir, base_path=None):
    """PeftModel.from_pretrained on a fresh base; returns (model, PEFT's warnings as strings)."""
    base = load_base(case, base_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, adapter_dir).eval()
    return pm, [str(w.message) for w in caught]


def bad_load_warnings(msgs):
    return [m for m in msgs if "missing adapter keys" in m.lower() or "unexpected" in m.lower()]


def write_case(case):
    _, _, lora_kwargs, seed = CASES[case]
    out = case_dir(case)
    os.makedirs(out)
    base = build_base(case)
    base.save_pretrained(case_dir(case, "base"), safe_serialization=True)
    base_sd = load_file(case_dir(case, "base", "model.safetensors"))
    log(f"== {case}: base {len(base_sd)} tensors")

    # Adapter.
    torch.manual_seed(seed + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_peft_model(load_base(case), LoraConfig(**lora_kwargs))
        trainable = perturb_trainable(pm)
        pm.eval()
        pm.save_pretrained(case_dir(case, "adapter"))
    for w in caught:
        log(f"  warning (get_peft_model/save): {w.category.__name__}: {w.message}")
    log(f"  trainable parameters perturbed: {len(trainable)}")
    for n in trainable:
        log(f"    {n}")
    readme = case_dir(case, "adapter", "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    adapter_sd = load_file(case_dir(case, "adapter", "adapter_model.safetensors"))
    with open(case_dir(case, "adapter", "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == name_of(case)
    for k, v in adapter_sd.items():
        assert v.dtype == torch.float32, k
        log(f"  adapter key {k} {tuple(v.shape)}")

    ids = input_ids_for(case)

    # Unmerged reload.
    reloaded, msgs = load_peft(case, case_dir(case, "adapter"))
    for m in msgs:
        log(f"  warning (from_pretrained): {m}")
    assert not bad_load_warnings(msgs), msgs
    records, logits = run_hooked(reloaded, ids)
    _, trained_logits = run_hooked(pm, ids)
    diff = (trained_logits - logits).abs().max().item()
    log(f"  reloaded vs in-memory adapter logits: max abs diff {diff:.2e}")

    # Merged.
    merged_pm, _ = load_peft(case, case_dir(case, "adapter"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merged_pm.merge_and_unload().eval()
    for w in caught:
        log(f"  warning (merge_and_unload): {w.category.__name__}: {w.message}")
    merged.save_pretrained(case_dir(case, "merged"), safe_serialization=True)
    merged_sd = load_file(case_dir(case, "merged", "model.safetensors"))
    if merged_sd.keys() != base_sd.keys():
        log(f"  merged keys differ from base: +{sorted(set(merged_sd) - set(base_sd))} -{sorted(set(base_sd) - set(merged_sd))}")
    changed = sorted(k for k in base_sd if k in merged_sd and not torch.equal(base_sd[k], merged_sd[k]))
    log(f"  merged tensors changed vs base ({len(changed)}): {changed}")
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().contiguous()
    mdiff = (merged_logits - logits).abs().max().item()
    log(f"  merged vs unmerged logits: max abs diff {mdiff:.2e}")
    # Reloading merged/ gives the merged model's logits (nothing lost in saving).
    with torch.no_grad():
        again = load_base(case, case_dir(case, "merged"))(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    adiff = (again - merged_logits).abs().max().item()
    log(f"  merged/ reloaded vs merged model logits: max abs diff {adiff:.2e}")
    assert adiff < 1e-5, case

    with torch.no_grad():
        base_logits = load_base(case)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (base_logits - logits).abs().max() > 1e-2, f"{case}: adapter does not change the output"

    io = {"input_ids": ids.contiguous(), "logits": logits, "merged_logits": merged_logits, **records}
    if case in SECOND:
        io.update(write_second(case, ids, base_logits, logits))
    save_file(io, case_dir(case, "io.safetensors"), metadata={"format": "pt"})
    log(f"  io keys: {sorted(records)}")
    return dict(diff=diff, mdiff=mdiff)


def write_second(case, ids, base_logits, logits):
    """The case's second adapter (SECOND), made after everything else with seed + 2 (the
    first adapter's files do not depend on it): saved to CASE/<kind>/, reloaded alone
    onto a fresh base for `<kind>_logits` (unmerged) and `<kind>_merged_logits`."""
    kind, lora_kwargs = SECOND[case]
    torch.manual_seed(CASES[case][3] + 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_peft_model(load_base(case), LoraConfig(**lora_kwargs))
        perturb_trainable(pm)
        pm.eval()
        pm.save_pretrained(case_dir(case, kind))
    for w in caught:
        log(f"  warning ({kind} get_peft_model/save): {w.category.__name__}: {w.message}")
    readme = case_dir(case, kind, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    reloaded, msgs = load_peft(case, case_dir(case, kind))
    assert not bad_load_warnings(msgs), msgs
    with torch.no_grad():
        second = reloaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().contiguous()
        in_memory = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        merged = reloaded.merge_and_unload().eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (in_memory - second).abs().max() < 1e-5, (case, kind)
    change = (second - base_logits).abs().max().item()
    log(f"  {kind}: changes the logits by {change:.3f}; merged vs unmerged {(merged - second).abs().max().item():.1e}")
    assert change > 1e-2, f"{case}/{kind}: adapter does not change the output"
    assert (second - logits).abs().max() > 1e-2, (case, kind)
    return {f"{kind}_logits": second, f"{kind}_merged_logits": merged.float().contiguous()}


def check(case, adapter_dir, io_file):
    assert case in CASES, f"unknown case {case}; one of {list(CASES)}"
    fixture_io = load_file(case_dir(case, "io.safetensors"))
    ids = fixture_io["input_ids"]
    pm, msgs = load_peft(case, adapter_dir)
    ok = True
    for m in msgs:
        log(f"warning (from_pretrained): {m}")
    if bad_load_warnings(msgs):
        log("FAIL: PEFT reported missing/unexpected adapter keys")
        ok = False
    # PEFT ignores unexpected keys and missing bias / base_layer keys silently: list how
    # the key set differs from PEFT's own adapter for this case (not an error by itself).
    ours = load_file(case_dir(case, "adapter", "adapter_model.safetensors"))
    given = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    for k in sorted(set(ours) - set(given)):
        log(f"note: key in PEFT's adapter, not in {adapter_dir}: {k}")
    for k in sorted(set(given) - set(ours)):
        log(f"note: key in {adapter_dir}, not in PEFT's adapter: {k}")
    for k in sorted(set(given) & set(ours)):
        if given[k].shape != ours[k].shape:
            log(f"FAIL {k}: shape {tuple(given[k].shape)}, PEFT's adapter {tuple(ours[k].shape)}")
            ok = False
    records, logits = run_hooked(pm, ids)
    records["logits"] = logits
    theirs = load_file(io_file)
    # A module whose input is in IO_FILE is run by itself on that input: an adapter other
    # than the fixture's changes what deeper modules see in a whole-model run.
    mods = dict(wrapped_modules(pm))
    fed = set()
    with torch.no_grad():
        for key in sorted(theirs):
            path = key[: -len(".output")] if key.endswith(".output") else None
            if path in mods and path + ".input" in theirs:
                x = theirs[path + ".input"]
                records[key] = mods[path](x).float().contiguous()
                fed.add(path + ".input")
    compared = 0
    for key in sorted(theirs):
        if key == "input_ids" or key == "merged_logits" or key in fed:
            continue
        if key not in records:
            if key.endswith(".output"):
                log(f"FAIL {key}: no such PEFT-wrapped module")
                ok = False
            else:
                log(f"skip {key}: not recorded by PEFT")
            continue
        ref, got = records[key], theirs[key]
        if ref.shape != got.shape:
            log(f"FAIL {key}: shape {tuple(got.shape)}, PEFT {tuple(ref.shape)}")
            ok = False
            continue
        if not ref.is_floating_point():
            same = torch.equal(ref, got.to(ref.dtype))
            log(f"{'ok  ' if same else 'FAIL'} {key}: integer input {'equal' if same else 'differs'}")
            ok &= same
            compared += 1
            continue
        ref, got = ref.double(), got.double()
        rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        good = rel <= TOL
        log(f"{'ok  ' if good else 'FAIL'} {key}: max rel err {rel:.3e}")
        ok &= good
        compared += 1
    not_given = sorted(k for k in records if k.endswith(".output") and k not in theirs)
    if not_given:
        log(f"note: PEFT-wrapped modules with no output in {io_file}: {not_given}")
    if compared == 0:
        log("FAIL: nothing compared")
        ok = False
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--check",
        nargs=3,
        metavar=("CASE", "ADAPTER_DIR", "IO_FILE"),
        help="compare a lorakit-written adapter's module outputs with PEFT's",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="CASE",
        help="rewrite only these cases' folders, leaving the others as they are",
    )
    args = parser.parse_args()
    rerun_pinned()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if args.check:
        sys.exit(check(*args.check))
    if args.only:
        for case in args.only:
            if os.path.exists(case_dir(case)):
                shutil.rmtree(case_dir(case))
            write_case(case)
        return
    if os.path.exists(ROOT):
        # Keep a hand-written README.md.
        readme = os.path.join(ROOT, "README.md")
        keep = open(readme).read() if os.path.exists(readme) else None
        shutil.rmtree(ROOT)
        os.makedirs(ROOT)
        if keep is not None:
            with open(readme, "w") as f:
                f.write(keep)
    else:
        os.makedirs(ROOT)
    for case in CASES:
        write_case(case)
    total = 0
    for dirpath, _, files in os.walk(ROOT):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    log(f"wrote {ROOT}: {total / 1024:.0f} KiB")
    assert total < 2 * 1024 * 1024


if __name__ == "__main__":
    main()
