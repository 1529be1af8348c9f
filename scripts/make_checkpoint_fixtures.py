#!/usr/bin/env python3
"""Generates the tiny Hugging Face checkpoint fixtures under tests/fixtures/checkpoints/:
transformers base checkpoints (single-file and sharded, f32 and bf16; f16 single-file),
PEFT adapters of several kinds on them, and what PEFT computes from those files (merged
weights, logits).

Usage:
    python scripts/make_checkpoint_fixtures.py      # removes and rewrites tests/fixtures/checkpoints/

Two tiny architectures, built from configs (no downloads): LlamaForCausalLM and
Qwen2ForCausalLM, hidden 16, intermediate 32, 2 layers, 4 heads, 2 KV heads, vocab 64,
untied lm_head. Every parameter is drawn at random (normal std 0.2; RMSNorm weights
1 + 0.1 * normal) so adapters change outputs visibly. Before the adapters are made the
model's name_or_path is set to lorakit-fixtures/tiny-<arch>, which PEFT records as the
adapters' base_model_name_or_path.

For each ARCH in {llama, qwen2} the output holds:
    ARCH_f32_single/     save_pretrained(safe_serialization=True): model.safetensors,
                         config.json, generation_config.json
    ARCH_f32_sharded/    the same weights with a small max_shard_size: several
                         model-0000i-of-0000n.safetensors and model.safetensors.index.json
    ARCH_bf16_single/    the same weights cast to bf16 (the f32 ones rounded once)
    ARCH_bf16_sharded/   ditto, sharded
    ARCH_f16_single/     the same weights cast to f16 (single-file only)
    ARCH_adapters/KIND/  PEFT save_pretrained output (adapter_config.json,
                         adapter_model.safetensors; PEFT's README.md removed) for
                         KIND in lora (all-linear), dora, vera, adalora, pissa, olora;
                         task_type CAUSAL_LM
    ARCH_merged/KIND_f32.safetensors
                         merge_and_unload().state_dict() of the adapter reloaded with
                         PeftModel.from_pretrained onto a fresh base loaded from
                         ARCH_f32_single (same tensor names as the base checkpoint)
    ARCH_merged/KIND_bf16.safetensors, ARCH_merged/KIND_f16.safetensors
                         merge_and_unload().state_dict() of the adapter reloaded onto
                         ARCH_bf16_single (ARCH_f16_single) loaded in its dtype (what a
                         user of PEFT gets); for lora, dora and vera it equals the f32
                         merge of the upcast half base rounded once (asserted), for
                         pissa, olora and adalora it does not (the count of entries that
                         differ is printed)
    llama_logits.safetensors
                         input_ids (i64, (1, 7)); logits_base, logits_KIND for every KIND
                         (the reloaded, unmerged PeftModel) and
                         logits_lora_merged (the merged model), all f32 (1, 7, 64), f32 llama

Versions used to generate the committed files: torch 2.15.0, transformers 5.25.0,
peft 0.21.2, safetensors 0.8.0 (Python 3.11). Deterministic: every model and adapter
seeds torch itself, and PYTHONHASHSEED is pinned (PEFT stores target_modules from a set).
"""

import glob
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from peft import (
    AdaLoraConfig,
    LoraConfig,
    PeftModel,
    VeraConfig,
    get_peft_model,
)
from fixture_env import rerun_pinned

ROOT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "checkpoints"
)
ROOT = os.path.normpath(ROOT)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, 100),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, 200),
}
CONFIG = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)
SHARD_SIZE = {"f32": "8KB", "bf16": "4KB"}
HALF = [("bf16", torch.bfloat16), ("f16", torch.float16)]
INPUT_IDS = [[1, 17, 42, 5, 63, 30, 9]]


def log(msg):
    print(msg, flush=True)


def name_of(arch):
    return f"lorakit-fixtures/tiny-{arch}"


def build_base(arch):
    config_cls, model_cls, seed = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def set_name(model, arch):
    model.name_or_path = name_of(arch)
    model.config._name_or_path = name_of(arch)


def load_base(arch, dtype_dir="f32", dtype=torch.float32):
    _, model_cls, _ = ARCHS[arch]
    model = model_cls.from_pretrained(os.path.join(ROOT, f"{arch}_{dtype_dir}_single"), dtype=dtype)
    assert model.dtype == dtype
    set_name(model, arch)
    return model.eval()


def write_base(arch):
    model = build_base(arch)
    set_name(model, arch)
    for tag, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        m = model.to(dtype)
        single = os.path.join(ROOT, f"{arch}_{tag}_single")
        sharded = os.path.join(ROOT, f"{arch}_{tag}_sharded")
        m.save_pretrained(single, safe_serialization=True)
        m.save_pretrained(sharded, safe_serialization=True, max_shard_size=SHARD_SIZE[tag])
        assert os.listdir(single) and os.path.exists(os.path.join(single, "model.safetensors"))
        shards = sorted(glob.glob(os.path.join(sharded, "model-*-of-*.safetensors")))
        assert len(shards) >= 3, f"{sharded}: only {len(shards)} shards"
        assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
        assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
        # Same tensors either way.
        a = load_file(os.path.join(single, "model.safetensors"))
        b = {}
        for s in shards:
            b.update(load_file(s))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == dtype and torch.equal(a[k], b[k]), k
        log(f"wrote {single}, {sharded} ({len(shards)} shards)")
    # f16 (Llama 2's Hub dtype), single-file only; from the f32 weights (`to` above
    # converted `model` in place).
    load_base(arch).to(torch.float16).save_pretrained(
        os.path.join(ROOT, f"{arch}_f16_single"), safe_serialization=True
    )
    # bf16 and f16 are exactly the f32 weights rounded once.
    f32 = load_file(os.path.join(ROOT, f"{arch}_f32_single", "model.safetensors"))
    for tag, dtype in HALF:
        half = load_file(os.path.join(ROOT, f"{arch}_{tag}_single", "model.safetensors"))
        for k in f32:
            assert torch.equal(f32[k].to(dtype), half[k]), k


def randomize(model, rules):
    """rules: [(substring of parameter name, fn(tensor) -> new value)]; first match wins."""
    hit = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            for i, (sub, fn) in enumerate(rules):
                if sub in name:
                    p.copy_(fn(p))
                    hit.add(i)
                    break
    assert hit == set(range(len(rules))), f"randomize: rules not matched: {rules}"


def normal(std):
    return lambda p: std * torch.randn_like(p)


def make_lora(model, arch):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    pm = get_peft_model(model, config)
    randomize(pm, [("lora_A", normal(0.2)), ("lora_B", normal(0.1))])
    return pm


def make_dora(model, arch):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(model, config)
    randomize(
        pm,
        [
            ("lora_A", normal(0.2)),
            ("lora_B", normal(0.1)),
            ("lora_magnitude_vector", lambda p: p * (1 + 0.1 * torch.randn_like(p))),
        ],
    )
    return pm


def make_vera(model, arch):
    config = VeraConfig(
        r=8, target_modules=["gate_proj", "up_proj"], save_projection=True, task_type="CAUSAL_LM"
    )
    pm = get_peft_model(model, config)
    randomize(pm, [("vera_lambda_b", normal(0.5)), ("vera_lambda_d", normal(0.5))])
    return pm


def make_adalora(model, arch):
    total_step = 10
    config = AdaLoraConfig(
        init_r=6,
        target_r=4,
        lora_alpha=8,
        tinit=2,
        tfinal=3,
        deltaT=1,
        total_step=total_step,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(model, config)
    randomize(pm, [("lora_A", normal(0.2)), ("lora_B", normal(0.2)), ("lora_E", normal(0.5))])
    # Real AdaLoRA training with the rank allocator, so some ranks get pruned and the
    # adapter is saved with a rank_pattern.
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 8))
    for step in range(total_step):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()
    rank_pattern = pm.peft_config["default"].rank_pattern
    assert rank_pattern, "AdaLoRA: no rank_pattern after training"
    # Non-trivial values for the kept ranks (pruned ranks are dropped on save).
    randomize(pm, [("lora_A", normal(0.2)), ("lora_B", normal(0.2)), ("lora_E", normal(0.5))])
    return pm


def make_residual(init, targets):
    """PiSSA or OLoRA: PEFT replaces each targeted base weight by a residual (here and again
    on every load); A and B start from it and are then moved as training would."""

    def make(model, arch):
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights=init,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        pm = get_peft_model(model, config)
        moved = lambda p: p + 0.05 * torch.randn_like(p)
        randomize(pm, [("lora_A", moved), ("lora_B", moved)])
        return pm

    return make


def reference_llama_logits(w, ids):
    """A textbook Llama forward (what candle-transformers' Llama computes) from a state
    dict: checks that the logits fixtures are plain Llama logits of the merged weights."""
    H, KV, D = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"], 4
    eps, theta = CONFIG["rms_norm_eps"], CONFIG["rope_theta"]

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def rope(x):
        t = x.shape[1]
        inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
        f = torch.outer(torch.arange(t).float(), inv)
        cos, sin = torch.cat([f, f], -1).cos(), torch.cat([f, f], -1).sin()
        return x * cos + torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1) * sin

    x = w["model.embed_tokens.weight"][ids[0]]
    t = x.shape[0]
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(t, H, D).transpose(0, 1)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(t, KV, D).transpose(0, 1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(t, KV, D).transpose(0, 1)
        q, k = rope(q), rope(k).repeat_interleave(H // KV, 0)
        v = v.repeat_interleave(H // KV, 0)
        a = (q @ k.transpose(-1, -2) / D**0.5).masked_fill(mask, float("-inf")).softmax(-1)
        x = x + (a @ v).transpose(0, 1).reshape(t, H * D) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (g * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return (rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T).unsqueeze(0)


KINDS = {
    "lora": make_lora,
    "dora": make_dora,
    "vera": make_vera,
    "adalora": make_adalora,
    "pissa": make_residual("pissa", "all-linear"),
    "olora": make_residual("olora", ["q_proj", "v_proj", "up_proj", "down_proj"]),
}

RESIDUAL_KINDS = ("pissa", "olora")


def contiguous(sd):
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def write_adapters(arch):
    _, _, seed = ARCHS[arch]
    base_sd = load_file(os.path.join(ROOT, f"{arch}_f32_single", "model.safetensors"))
    half_sd = {
        tag: load_file(os.path.join(ROOT, f"{arch}_{tag}_single", "model.safetensors"))
        for tag, _ in HALF
    }
    ids = torch.tensor(INPUT_IDS, dtype=torch.int64)
    logits = {}
    merged_dir = os.path.join(ROOT, f"{arch}_merged")
    os.makedirs(merged_dir, exist_ok=True)
    summary = {}
    for i, (kind, make) in enumerate(KINDS.items()):
        adapter_dir = os.path.join(ROOT, f"{arch}_adapters", kind)
        torch.manual_seed(seed + 10 + i)
        pm = make(load_base(arch), arch)
        assert pm.peft_config["default"].base_model_name_or_path == name_of(arch)
        pm.save_pretrained(adapter_dir)
        readme = os.path.join(adapter_dir, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            assert json.load(f)["base_model_name_or_path"] == name_of(arch)

        # Expectations come from the files: reload onto a fresh base.
        reloaded = PeftModel.from_pretrained(load_base(arch), adapter_dir).eval()
        with torch.no_grad():
            if arch == "llama":
                logits[f"logits_{kind}"] = reloaded(input_ids=ids).logits.contiguous()
                # Disabled, a PiSSA/OLoRA model runs the residual base, not the original.
                if kind not in RESIDUAL_KINDS:
                    with reloaded.disable_adapter():
                        base_logits = reloaded(input_ids=ids).logits.contiguous()
                    if "logits_base" in logits:
                        assert torch.equal(logits["logits_base"], base_logits)
                    logits["logits_base"] = base_logits
                # The model as trained/randomized gives the same output (not for AdaLoRA,
                # whose ranknum changes on reload).
                if kind != "adalora":
                    diff = (pm(input_ids=ids).logits - logits[f"logits_{kind}"]).abs().max()
                    assert diff < 1e-5, f"{kind}: reload differs by {diff}"
        merged = reloaded.merge_and_unload().eval()
        merged_sd = contiguous(merged.state_dict())
        assert merged_sd.keys() == base_sd.keys(), (
            f"{arch}/{kind}: merged keys differ: {set(merged_sd) ^ set(base_sd)}"
        )
        if arch == "llama" and kind == "lora":
            with torch.no_grad():
                m_logits = merged(input_ids=ids).logits.contiguous()
            diff = (m_logits - logits["logits_lora"]).abs().max().item()
            assert diff <= 1e-5, f"merged lora logits differ by {diff}"
            logits["logits_lora_merged"] = m_logits
        save_file(merged_sd, os.path.join(merged_dir, f"{kind}_f32.safetensors"), metadata={"format": "pt"})

        # bf16 and f16 as PEFT merges them: the adapter reloaded onto the half base loaded
        # in its dtype. Against "rounded once" (the half base upcast exactly, merged in f32,
        # cast): PEFT adds its f32 ΔW to the half weight and rounds once too, but rounds a
        # PiSSA/OLoRA residual to the half dtype before that, and AdaLoRA's A, E, B when it
        # resizes them to the rank_pattern after its adapter-dtype autocast.
        halves = {}
        for tag, dtype in HALF:
            m = PeftModel.from_pretrained(load_base(arch, tag, dtype), adapter_dir)
            m_sd = contiguous(m.eval().merge_and_unload().state_dict())
            assert m_sd.keys() == base_sd.keys()
            assert all(v.dtype == dtype for v in m_sd.values())
            save_file(m_sd, os.path.join(merged_dir, f"{kind}_{tag}.safetensors"), metadata={"format": "pt"})
            halves[tag] = m_sd
            up = load_base(arch, tag, torch.float32)
            up_sd = up.state_dict()
            for k in half_sd[tag]:
                assert torch.equal(up_sd[k], half_sd[tag][k].float()), k
            once = PeftModel.from_pretrained(up, adapter_dir).eval().merge_and_unload()
            once_sd = {k: v.to(dtype) for k, v in contiguous(once.state_dict()).items()}
            differ = sum(int((once_sd[k] != m_sd[k]).sum()) for k in m_sd)
            total = sum(v.numel() for v in m_sd.values())
            if kind in ("lora", "dora", "vera"):
                assert differ == 0, f"{arch}/{kind}: PEFT's {tag} merge is not the f32 one rounded once"
            else:
                assert differ > 0, f"{arch}/{kind}: expected PEFT's {tag} merge to round earlier"
            log(f"{arch}/{kind}: PEFT's {tag} merge differs from the f32 one rounded once in {differ}/{total} entries")
        m16_sd, base_bf16_sd = halves["bf16"], half_sd["bf16"]

        # Sanity: targeted weights changed, everything else byte-identical to the base.
        changed = sorted(k for k in base_sd if not torch.equal(merged_sd[k], base_sd[k]))
        changed16 = sorted(k for k in base_sd if not torch.equal(m16_sd[k], base_bf16_sd[k]))
        assert changed, f"{arch}/{kind}: merge changed nothing"
        assert set(changed16) <= set(changed), f"{arch}/{kind}: bf16 changed more than f32"
        modules = sorted({k.rsplit(".", 2)[-2] for k in changed})
        rel = max(
            ((merged_sd[k] - base_sd[k]).norm() / base_sd[k].norm()).item() for k in changed
        )
        summary[kind] = (len(changed), len(changed16), modules, rel)
    if arch == "llama":
        logits = {"input_ids": ids, **logits}
        for k in KINDS:
            assert not torch.allclose(logits[f"logits_{k}"], logits["logits_base"], atol=1e-3), k
        save_file(logits, os.path.join(ROOT, "llama_logits.safetensors"), metadata={"format": "pt"})
        for k in ["base", *KINDS]:
            sd = base_sd if k == "base" else load_file(os.path.join(merged_dir, f"{k}_f32.safetensors"))
            diff = (reference_llama_logits(sd, ids) - logits[f"logits_{k}"]).abs().max().item()
            assert diff < 1e-5, f"reference Llama forward differs for {k}: {diff}"
            log(f"llama/{k}: textbook Llama forward of the merged weights matches PEFT's logits ({diff:.1e})")
    for kind, (n, n16, modules, rel) in summary.items():
        log(
            f"{arch}/{kind}: {n} tensors changed by merging (bf16: {n16}), modules {modules}, "
            f"max relative change {rel:.3f}; all others byte-identical"
        )


README = """# Tiny Hugging Face checkpoints (generated)

Generated by `scripts/make_checkpoint_fixtures.py` (see its docstring for details and the
torch / transformers / peft versions used). Regenerate with

    python scripts/make_checkpoint_fixtures.py

which removes and rewrites this whole folder (deterministic).

Two tiny random models, `llama` (LlamaForCausalLM) and `qwen2` (Qwen2ForCausalLM):
hidden 16, intermediate 32, 2 layers, 4 heads, 2 KV heads, vocab 64, untied `lm_head`.

| path | what |
| --- | --- |
| `ARCH_f32_single/` | transformers `save_pretrained` (safetensors): `model.safetensors`, `config.json`, `generation_config.json` |
| `ARCH_f32_sharded/` | same weights, sharded: `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` |
| `ARCH_bf16_single/`, `ARCH_bf16_sharded/` | same weights cast to bf16 |
| `ARCH_f16_single/` | same weights cast to f16 |
| `ARCH_adapters/{lora,dora,vera,adalora,pissa,olora}/` | PEFT `save_pretrained` adapters (made on the f32 model); `base_model_name_or_path` is `lorakit-fixtures/tiny-ARCH` |
| `ARCH_merged/KIND_f32.safetensors` | PEFT `merge_and_unload()` of the adapter reloaded onto `ARCH_f32_single`; same tensor names as the base |
| `ARCH_merged/KIND_bf16.safetensors`, `KIND_f16.safetensors` | PEFT `merge_and_unload()` of the adapter reloaded onto `ARCH_bf16_single` / `ARCH_f16_single` loaded in its dtype |
| `llama_logits.safetensors` | `input_ids` (i64, (1, 7)) and f32 logits (1, 7, 64) of the llama f32 model: `logits_base`, `logits_KIND` for each adapter (unmerged PeftModel), `logits_lora_merged` |

Adapters: `lora` r=4, alpha=8, all-linear (PEFT excludes `lm_head`); `dora` r=4, alpha=8,
q/v/down_proj; `vera` r=8, gate/up_proj, projections saved; `adalora` init_r=6,
target_r=4, alpha=8, q/k/v/o_proj, trained 10 steps with the rank allocator (saved with a
`rank_pattern`, pruned ranks dropped); `pissa` r=4, alpha=8, all-linear, and `olora` r=4,
alpha=8, q/v/up/down_proj (PEFT replaces each targeted base weight by a residual on every
load), A and B moved from their init by normal noise (std 0.05).
"""


def main():
    rerun_pinned()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if os.path.exists(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    for arch in ARCHS:
        write_base(arch)
        write_adapters(arch)
    with open(os.path.join(ROOT, "README.md"), "w") as f:
        f.write(README)
    total = 0
    for dirpath, _, files in os.walk(ROOT):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    log(f"wrote {ROOT}: {total / 1024:.0f} KiB")
    assert total < 2 * 1024 * 1024


if __name__ == "__main__":
    main()
