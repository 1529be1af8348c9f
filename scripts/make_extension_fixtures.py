#!/usr/bin/env python3
"""Generates tests/fixtures/peft_extensions/: adapters that real PEFT writes when a LoRA
config sets one of its extensions (aLoRA, BD-LoRA, KaSA, layer replication, parameter
targets, VeLoRA, MonteCLoRA), on the Mistral model fixture
(tests/fixtures/models/llama/mistral/base, made by scripts/make_model_fixtures.py).
They check `lorakit::peft::lora_extensions` (tests/suite/peft_extensions.rs): the
extensions that change what the adapter computes are refused by name, and the
training-only ones (VeLoRA, MonteCLoRA) load as the LoRA they evaluate to.

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
        velora (velora_config), monteclora (monteclora_config)
    logits.safetensors
        input_ids (i64 (1, 9)); NAME_logits (f32 (1, 9, 64)): the PeftModel in eval
        (PEFT's inference forward) for NAME in alora, velora, monteclora. alora's shows
        the adapter changes the output; a plain LoRA load of the same A and B differs.

Versions used for the committed files: torch 2.15.0, transformers 5.24.0, peft 0.21.2
(Python 3.11). PYTHONHASHSEED is pinned to 0 (the script re-executes itself with it).
"""

import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
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
}
WITH_LOGITS = ["alora", "velora", "monteclora"]


def make(name, options):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    options = dict(options)
    targets = options.pop("target_modules", ["q_proj", "v_proj"])
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **options
    )
    peft_model = get_peft_model(model, config)
    peft_model.eval()
    peft_model.save_pretrained(OUT / name)
    (OUT / name / "README.md").unlink()  # PEFT's model card
    with torch.no_grad():
        return peft_model(input_ids=INPUT_IDS).logits.contiguous()


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
    save_file(logits, OUT / "logits.safetensors")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
