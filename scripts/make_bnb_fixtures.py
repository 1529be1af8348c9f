#!/usr/bin/env python3
"""Generates tests/fixtures/bnb/: tiny Llama checkpoints quantized by bitsandbytes as
transformers saves them (`from_pretrained(..., quantization_config=BitsAndBytesConfig(
load_in_4bit=True, ...))`, then `save_pretrained`: the `-bnb-4bit` checkpoints of the Hub),
a PEFT LoRA adapter for each, and what transformers, bitsandbytes and PEFT make of them.

Usage:
    python scripts/make_bnb_fixtures.py      # removes and rewrites tests/fixtures/bnb/

Two cases (LlamaForCausalLM, 1 layer, 4 heads, 2 KV heads, vocab 64, untied head):

    nf4_dq/    hidden 128, intermediate 256, bf16; NF4 with double quantization
               (`bnb_4bit_use_double_quant=True`: the block scales are themselves 8-bit
               codes with a second level of scales, `nested_*`, and an offset). The MLP's
               matrices hold 32768 values, 512 blocks of 64: two nested blocks of 256.
    fp4_f16/   hidden 96, intermediate 160, f16; FP4 without double quantization. Rows of
               96 values straddle bitsandbytes' blocks of 64 (they run over the flattened
               weight, not along rows).

Each case folder holds:
    model/                   config.json (with its quantization_config) and
                             model.safetensors as save_pretrained wrote them
    lora/                    a PEFT LoRA (r 8, alpha 16) on q_proj and down_proj, random
                             A and B (init_lora_weights=False), made on the dequantized model
    dequantized.safetensors  `model.dequantize()`'s weights of every quantized module (the
                             values bitsandbytes' dequantize_4bit gives, in the dtype the
                             quant state records), by their checkpoint names
    merged.safetensors       the state dict of PEFT's merge_and_unload of the adapter on the
                             dequantized model, in the model's dtype (what a PEFT user who
                             merges after QLoRA training writes)
    merged_config.json       the config.json that model's save_pretrained writes
    originals.safetensors    the float weights of q_proj and down_proj before quantization
                             (bitsandbytes' quantize_4bit, default implementation on the CPU,
                             made the stored codes and block scales from them)
    logits.safetensors       input_ids (i64, (1, 7)); logits_base and logits_lora, f32
                             (1, 7, 64): the dequantized model cast to f32, without and with
                             the (unmerged) adapter

bitsandbytes' CPU kernel for dequantize_4bit (0.50.2, `cdequantize_blockwise_cpu_*`) takes
blocks along each row, which is wrong when d_in is not a multiple of the block size (its
own quantizer, its default implementation and its CUDA kernel take them over the flattened
weight; the CPU kernel's values are then up to 4x off the weight they quantize). This
script therefore dequantizes with bitsandbytes' default implementation
(`backends/default/ops.py::_dequantize_4bit_compute`, what the CUDA kernel computes; the
nested scales still by bitsandbytes' own `dequantize_blockwise`), and prints how many
values the CPU kernel gives otherwise (none for nf4_dq, whose rows are whole blocks).

Versions used to generate the committed files: torch 2.15.0, transformers 5.25.0,
peft 0.21.2, bitsandbytes 0.50.2 (its CPU backend), safetensors 0.8.0 (Python 3.11).
Deterministic: every model and adapter seeds torch itself.
"""

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fixture_env import rerun_pinned  # noqa: E402

rerun_pinned()

import bitsandbytes.functional as bnb_functional  # noqa: E402
import torch  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "bnb")
IDS = torch.tensor([[1, 17, 42, 5, 63, 0, 9]])

CASES = {
    "nf4_dq": dict(
        hidden=128,
        intermediate=256,
        dtype=torch.bfloat16,
        quant=dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    ),
    "fp4_f16": dict(
        hidden=96,
        intermediate=160,
        dtype=torch.float16,
        quant=dict(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    ),
}


CPU_DEQUANTIZE_4BIT = bnb_functional.dequantize_4bit


def flat_dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
    """bitsandbytes' dequantize_4bit with blocks over the flattened weight, as its CUDA
    kernel and default implementation take them (see the module docs)."""
    assert quant_state is not None and out is None and absmax is None
    scales = quant_state.absmax
    if quant_state.nested:
        scales = bnb_functional.dequantize_blockwise(quant_state.absmax, quant_state.state2)
        scales += quant_state.offset
        scales = scales.float()
    code = _get_4bit_code(quant_state.quant_type, A.device)
    flat = A.view(torch.uint8).reshape(-1)
    return _dequantize_4bit_compute(
        flat, scales, code, quant_state.blocksize, quant_state.shape, quant_state.dtype
    )


bnb_functional.dequantize_4bit = flat_dequantize_4bit


def base_model(hidden, intermediate, dtype, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.to(dtype)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float().contiguous()


def make(case, spec, seed):
    out = os.path.join(ROOT, case)
    float_dir = os.path.join(out, "_float")
    float_model = base_model(spec["hidden"], spec["intermediate"], spec["dtype"], seed)
    float_model.save_pretrained(float_dir)
    originals = {
        n: p.detach().contiguous()
        for n, p in float_model.state_dict().items()
        if n.endswith(("q_proj.weight", "down_proj.weight"))
    }
    save_file(originals, os.path.join(out, "originals.safetensors"))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=spec["dtype"], **spec["quant"])
    quantized = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=config, dtype=spec["dtype"], device_map="cpu"
    )
    quantized.save_pretrained(os.path.join(out, "model"))
    shutil.rmtree(float_dir)
    for extra in ("generation_config.json",):
        path = os.path.join(out, "model", extra)
        if os.path.exists(path):
            os.remove(path)

    def dequantized_model():
        m = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"), device_map="cpu")
        return m.dequantize()

    model = dequantized_model()
    packed = json.load(open(os.path.join(out, "model", "config.json")))["quantization_config"]
    print(case, "quantization_config:", packed)
    quantized_modules = [
        n for n, m in quantized.named_modules() if type(m).__name__ == "Linear4bit"
    ]
    weights = dict(model.state_dict())
    cpu_kernel_off = 0
    for n, m in quantized.named_modules():
        if type(m).__name__ == "Linear4bit":
            cpu = CPU_DEQUANTIZE_4BIT(m.weight.data, m.weight.quant_state)
            cpu_kernel_off += (cpu != weights[f"{n}.weight"]).sum().item()
    print(case, "values bitsandbytes' CPU dequantize kernel gives otherwise:", cpu_kernel_off)
    save_file(
        {f"{n}.weight": weights[f"{n}.weight"].contiguous() for n in quantized_modules},
        os.path.join(out, "dequantized.safetensors"),
    )

    torch.manual_seed(seed + 1)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(dequantized_model(), lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    peft_model.save_pretrained(os.path.join(out, "lora"))
    readme = os.path.join(out, "lora", "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    reloaded = PeftModel.from_pretrained(dequantized_model().float(), os.path.join(out, "lora"))
    with torch.no_grad():
        with reloaded.disable_adapter():
            base_logits = logits(reloaded)
        lora_logits = logits(reloaded)
    save_file(
        {"input_ids": IDS.contiguous(), "logits_base": base_logits, "logits_lora": lora_logits},
        os.path.join(out, "logits.safetensors"),
    )

    merged = PeftModel.from_pretrained(dequantized_model(), os.path.join(out, "lora")).merge_and_unload()
    state = {k: v.contiguous() for k, v in merged.state_dict().items()}
    assert all(v.dtype == spec["dtype"] for v in state.values()), "merged dtypes"
    save_file(state, os.path.join(out, "merged.safetensors"))
    merged_dir = os.path.join(out, "_merged")
    merged.save_pretrained(merged_dir)
    shutil.copy(os.path.join(merged_dir, "config.json"), os.path.join(out, "merged_config.json"))
    shutil.rmtree(merged_dir)


def main():
    if os.path.exists(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)
    for i, (case, spec) in enumerate(CASES.items()):
        make(case, spec, 1000 + 10 * i)


if __name__ == "__main__":
    main()
