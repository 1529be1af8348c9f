#!/usr/bin/env python3
"""Generates the PEFT reference fixtures under tests/fixtures/ (and checks the reverse
direction: adapters saved by lorakit, loaded in PEFT).

Usage:
    python scripts/make_peft_fixtures.py                    # (re)write tests/fixtures/
    python scripts/make_peft_fixtures.py --check-reverse DIR

Each case directory holds:
    model.json               the model: a chain of linears with ReLU between them,
                             {"layers": [[path, d_in, d_out, has_bias], ...]}
    base.safetensors         the base model's state dict (f32, the model's own names)
    adapter/                 PEFT's save_pretrained output (adapter_config.json,
                             adapter_model.safetensors)
    expected.safetensors     `input`, `output` (the adapter reloaded with
                             PeftModel.from_pretrained into a fresh base), `base_output`
    merged.safetensors       merge_and_unload().state_dict() of the reloaded model
    lora_mlp also has base_f16 / base_bf16 and merged_f16 / merged_bf16 (PEFT merging the
    same adapter into a half-precision base).

--check-reverse DIR: DIR/<case>/adapter is an adapter lorakit saved (the Rust test
`peft_roundtrip` writes them when LORAKIT_REVERSE_DIR=DIR is set:
    LORAKIT_REVERSE_DIR=/tmp/rev cargo test --test suite peft_roundtrip::
). Each one is loaded with PeftModel.from_pretrained into the case's base model and its
output compared with the fixture's expected output and with lorakit's own output
(DIR/<case>/output.safetensors). DIR/<case>@<tag>/ holds other adapters on the same base
(e.g. fresh random ones), compared with lorakit's output only.

Versions used to generate the committed files: torch 2.15, peft 0.21.2. Deterministic:
every case seeds torch itself.
"""

import argparse
import json
import os
import shutil
import sys

import torch
from torch import nn
from safetensors.torch import save_file, load_file
from peft import (
    AdaLoraConfig,
    LoraConfig,
    PeftModel,
    VeraConfig,
    get_peft_model,
)
from fixture_env import rerun_pinned

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
N_INPUT = 5


class Chain(nn.Module):
    """Linears at arbitrary dotted paths, applied in order with ReLU between them."""

    def __init__(self, layers):
        super().__init__()
        self.layer_specs = layers
        for path, d_in, d_out, bias in layers:
            parent = self
            parts = path.split(".")
            for part in parts[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(parts[-1], nn.Linear(d_in, d_out, bias=bias))

    def forward(self, x):
        for i, (path, *_rest) in enumerate(self.layer_specs):
            x = self.get_submodule(path)(x)
            if i + 1 < len(self.layer_specs):
                x = torch.relu(x)
        return x


def contiguous(sd):
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def perturb(model, std=0.3):
    """Gives every adapter tensor a non-trivial value (B starts at zero in PEFT)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def lora_mlp():
    layers = [["lin0", 10, 20, True], ["lin1", 20, 2, True]]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"])
    return layers, config, None


@case
def rslora_patterns():
    layers = [
        ["blocks.0.fc1", 6, 12, True],
        ["blocks.0.fc2", 12, 6, True],
        ["blocks.1.fc1", 6, 12, False],
        ["blocks.1.fc2", 12, 6, True],
        ["head", 6, 3, True],
    ]
    config = LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=r"blocks\.\d+\.fc[12]",
        exclude_modules=["blocks.1.fc1"],
        rank_pattern={"fc1": 2, "blocks.1.fc2": 3},
        alpha_pattern={"0.fc2": 10},
    )
    return layers, config, None


@case
def llama_names():
    d, h = 8, 12
    layers = []
    for i in range(2):
        p = f"model.layers.{i}"
        layers += [
            [f"{p}.self_attn.q_proj", d, d, False],
            [f"{p}.self_attn.k_proj", d, d, False],
            [f"{p}.self_attn.v_proj", d, d, False],
            [f"{p}.self_attn.o_proj", d, d, False],
            [f"{p}.mlp.gate_proj", d, h, False],
            [f"{p}.mlp.up_proj", h, h, False],
            [f"{p}.mlp.down_proj", h, d, False],
        ]
    layers.append(["lm_head", d, 16, False])
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        exclude_modules=["model.layers.1.self_attn.o_proj"],
    )
    return layers, config, None


@case
def dora():
    layers = [["lin0", 10, 20, True], ["lin1", 20, 2, False]]
    config = LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=["lin0", "lin1"])
    return layers, config, None


@case
def vera():
    layers = [["lin0", 10, 20, True], ["lin1", 20, 6, True]]
    config = VeraConfig(r=4, target_modules=["lin0", "lin1"], save_projection=True, d_initial=0.1)
    return layers, config, None


@case
def adalora():
    layers = [["lin0", 10, 16, True], ["lin1", 16, 16, True], ["lin2", 16, 4, True]]
    config = AdaLoraConfig(
        init_r=6,
        target_r=2,
        lora_alpha=4,
        tinit=2,
        tfinal=3,
        deltaT=1,
        total_step=12,
        target_modules=["lin0", "lin1", "lin2"],
    )
    return layers, config, adalora_train


def adalora_train(model, layers):
    """Real AdaLoRA training: steps with update_and_allocate, so ranks get pruned."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    x = torch.randn(32, layers[0][1])
    y = torch.randn(32, layers[-1][2])
    total = model.peft_config["default"].total_step
    for step in range(total):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()


def build_base(layers, seed):
    torch.manual_seed(seed)
    return Chain(layers).eval()


def write_case(name, seed):
    layers, config, train = CASES[name]()
    out = os.path.join(ROOT, name)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump({"layers": layers}, f, indent=1)
        f.write("\n")

    base = build_base(layers, seed)
    base_sd = contiguous(base.state_dict())
    save_file(base_sd, os.path.join(out, "base.safetensors"))

    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(build_base(layers, seed), config)
    if train is not None:
        train(peft_model, layers)
    perturb(peft_model)
    adapter_dir = os.path.join(out, "adapter")
    peft_model.save_pretrained(adapter_dir)
    os.remove(os.path.join(adapter_dir, "README.md"))

    # Reload into a fresh base, as a user would.
    reloaded = PeftModel.from_pretrained(build_base(layers, seed), adapter_dir).eval()
    torch.manual_seed(seed + 2)
    x = torch.randn(N_INPUT, layers[0][1])
    with torch.no_grad():
        output = reloaded(x)
        with reloaded.disable_adapter():
            base_output = reloaded(x)
        if train is None:
            trained_out = peft_model.eval()(x)
            assert torch.allclose(trained_out, output, atol=1e-6), f"{name}: reload differs"
    save_file(
        {"input": x, "output": output.contiguous(), "base_output": base_output.contiguous()},
        os.path.join(out, "expected.safetensors"),
    )
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(x), output, atol=1e-5), f"{name}: merged output differs"
    save_file(contiguous(merged.state_dict()), os.path.join(out, "merged.safetensors"))

    if name == "lora_mlp":
        for dtype, tag in [(torch.float16, "f16"), (torch.bfloat16, "bf16")]:
            half = build_base(layers, seed).to(dtype)
            save_file(contiguous(half.state_dict()), os.path.join(out, f"base_{tag}.safetensors"))
            m = PeftModel.from_pretrained(half, adapter_dir).merge_and_unload()
            save_file(contiguous(m.state_dict()), os.path.join(out, f"merged_{tag}.safetensors"))
    print(f"wrote {out}")


def check_reverse(root):
    failures = 0
    checked = 0
    for entry in sorted(os.listdir(root)):
        # DIR/<case>: the fixture's adapter re-saved by lorakit; DIR/<case>@<tag>: another
        # adapter (fresh, trained, ...) on the same base, with its own input and output.
        name = entry.split("@")[0]
        adapter_dir = os.path.join(root, entry, "adapter")
        fixture = os.path.join(ROOT, name)
        if not os.path.isdir(adapter_dir) or not os.path.isdir(fixture):
            continue
        with open(os.path.join(fixture, "model.json")) as f:
            layers = json.load(f)["layers"]
        base = Chain(layers)
        base.load_state_dict(load_file(os.path.join(fixture, "base.safetensors")))
        model = PeftModel.from_pretrained(base.eval(), adapter_dir).eval()
        refs = {}
        if "@" not in entry:
            expected = load_file(os.path.join(fixture, "expected.safetensors"))
            refs["PEFT fixture"] = (expected["input"], expected["output"])
        extra = os.path.join(root, entry, "output.safetensors")
        if os.path.exists(extra):
            t = load_file(extra)
            refs["lorakit"] = (t["input"], t["output"])
        for label, (x, ref) in refs.items():
            with torch.no_grad():
                got = model(x)
            err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            ok = err <= 1e-5
            checked += 1
            failures += 0 if ok else 1
            print(f"{entry}: PEFT output vs {label}: relative max error {err:.2e} {'ok' if ok else 'FAIL'}")
    print(f"{checked} comparisons, {failures} failures")
    if failures or not checked:
        sys.exit(1)


def main():
    rerun_pinned()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-reverse", metavar="DIR")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.check_reverse:
        check_reverse(args.check_reverse)
        return
    for i, name in enumerate(CASES):
        write_case(name, 1000 + 10 * i)


if __name__ == "__main__":
    main()
