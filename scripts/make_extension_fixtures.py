#!/usr/bin/env python3
"""Generates tests/fixtures/peft_extensions/: adapters that real PEFT writes when a LoRA
config sets one of its extensions (aLoRA, BD-LoRA, KaSA, layer replication, parameter
targets, VeLoRA, MonteCLoRA) or an init that changes the base weights (PiSSA, OLoRA), on
the Mistral model fixture
(tests/fixtures/models/llama/mistral/base, made by scripts/make_model_fixtures.py).
They check `lorakit::peft::lora_extensions` (tests/suite/peft_extensions.rs): the
extensions that change what the adapter computes are refused by name, and the
training-only ones (VeLoRA, MonteCLoRA) load as the LoRA they evaluate to; PiSSA and
OLoRA give PEFT's logits with the base's residual recomputed.

Usage:
    python3 scripts/make_extension_fixtures.py
        removes and rewrites tests/fixtures/peft_extensions/ (deterministic)

Every adapter: LoRA r=4 alpha=8 on q_proj and v_proj (KaSA likewise; the parameter
target on q_proj.weight), init_lora_weights=False (A and B random, so the adapter
changes the logits), made with torch.manual_seed(0) and saved with save_pretrained.

Files:
    NAME/adapter_config.json, NAME/adapter_model.safetensors
        for NAME in alora (alora_invocation_tokens [5, 9]), bdlora (use_bdlora: A of
        q_proj and B of v_proj block-diagonal, 2 blocks), kasa (kasa_config),
        layer_replication ([[0, 2], [1, 2]]), target_parameters (["q_proj.weight"]),
        velora (velora_config), monteclora (monteclora_config), pissa and olora
        (init_lora_weights "pissa" / "olora": PEFT replaces each targeted base weight by
        a residual; A and B are then moved by 0.05 · N(0, 1) noise, seed 1, standing in
        for training, since at the init the residual and B·A add up to the base again),
        pissa_converted and olora_converted (the same adapters saved with PEFT's
        `path_initial_model_for_weight_conversion`: plain LoRA of rank 8 on the original
        base weights, init_lora_weights true)
    logits.safetensors
        input_ids (i64 (1, 9)); NAME_logits (f32 (1, 9, 64)): the PeftModel in eval
        (PEFT's inference forward) for NAME in alora, velora, monteclora, pissa, olora.
        alora's shows the adapter changes the output; a plain LoRA load of the same A
        and B differs. pissa's and olora's are checked to equal those of the adapter
        reloaded by PeftModel.from_pretrained onto the original base (which recomputes
        the residual), within 1e-5. NAME_disabled_logits for pissa and olora: that
        reloaded model under `disable_adapter()` (the residual base alone).

Versions used for the committed files: torch 2.15.0, transformers 5.24.0, peft 0.21.2
(Python 3.11). PYTHONHASHSEED is pinned to 0 (the script re-executes itself with it).
"""

import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from fixture_env import rerun_pinned

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "tests/fixtures/models/llama/mistral/base"
OUT = ROOT / "tests/fixtures/peft_extensions"
INPUT_IDS = torch.tensor([[1, 5, 9, 12, 3, 7, 30, 2, 8]])

CASES = {
    "alora": dict(alora_invocation_tokens=[5, 9]),
    "bdlora": dict(
        use_bdlora=BdLoraConfig(
            target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"], nblocks=2
        )
    ),
    "kasa": dict(kasa_config=KasaConfig()),
    "layer_replication": dict(layer_replication=[[0, 2], [1, 2]]),
    "target_parameters": dict(target_modules=[], target_parameters=["q_proj.weight"]),
    "velora": dict(velora_config=VeloraConfig()),
    "monteclora": dict(monteclora_config=MontecloraConfig()),
    "pissa": dict(init_lora_weights="pissa"),
    "olora": dict(init_lora_weights="olora"),
}
WITH_LOGITS = ["alora", "velora", "monteclora", "pissa", "olora"]
# The logits of the base-changing adapters' models with the adapter disabled.
disabled = {}
# Inits that replace the base weights by a residual when PEFT builds (or loads) the adapter.
BASE_CHANGING = ["pissa", "olora"]


def make(name, options):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    options = dict(options)
    targets = options.pop("target_modules", ["q_proj", "v_proj"])
    options.setdefault("init_lora_weights", False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, **options)
    peft_model = get_peft_model(model, config)
    initial = OUT / f"{name}_initial"
    if name in BASE_CHANGING:
        # The adapter as initialized, for PEFT's conversion to plain LoRA below.
        peft_model.save_pretrained(initial)
        # Stand-in for training: move A and B away from the init, whose B·A the residual
        # base cancels exactly.
        torch.manual_seed(1)
        with torch.no_grad():
            for key, param in peft_model.named_parameters():
                if "lora_" in key:
                    param.add_(0.05 * torch.randn_like(param))
    peft_model.eval()
    peft_model.save_pretrained(OUT / name)
    (OUT / name / "README.md").unlink()  # PEFT's model card
    with torch.no_grad():
        out = peft_model(input_ids=INPUT_IDS).logits.contiguous()
    if name in BASE_CHANGING:
        # PEFT recomputes the residual from the original base when it loads the adapter.
        fresh = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(fresh, OUT / name).eval()
        with torch.no_grad():
            again = reloaded(input_ids=INPUT_IDS).logits
        assert torch.allclose(again, out, rtol=0, atol=1e-5), name
        # Disabled, PEFT's model runs the residual base.
        with torch.no_grad(), reloaded.disable_adapter():
            disabled[name] = reloaded(input_ids=INPUT_IDS).logits.contiguous()
        # What PEFT's docs advise for sharing: a plain LoRA of rank 2r on the original base.
        converted = OUT / f"{name}_converted"
        peft_model.save_pretrained(
            converted, path_initial_model_for_weight_conversion=str(initial)
        )
        (converted / "README.md").unlink()
        shutil.rmtree(initial)
    return out


def main():
    rerun_pinned()
    torch.set_num_threads(1)
    readme = (OUT / "README.md").read_text() if (OUT / "README.md").exists() else None
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    if readme is not None:
        (OUT / "README.md").write_text(readme)
    logits = {"input_ids": INPUT_IDS.clone()}
    for name, options in CASES.items():
        out = make(name, options)
        if name in WITH_LOGITS:
            logits[f"{name}_logits"] = out
    logits.update({f"{name}_disabled_logits": t for name, t in disabled.items()})
    save_file(logits, OUT / "logits.safetensors")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
