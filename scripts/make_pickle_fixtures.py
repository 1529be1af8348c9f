#!/usr/bin/env python3
"""Generates tests/fixtures/peft_pickle/: PEFT adapters saved as `adapter_model.bin` (a
torch.save pickle, PEFT's format before 0.6 and with safe_serialization=False), on the
Mistral model fixture (tests/fixtures/models/llama/mistral/base, made by
scripts/make_model_fixtures.py), and models saved as `pytorch_model.bin` (single and
sharded). They check `lorakit::peft::weights_file` and
`lorakit::checkpoint::from_pickle` (tests/suite/peft_pickle.rs).

Usage:
    python3 scripts/make_pickle_fixtures.py
        removes and rewrites tests/fixtures/peft_pickle/ (deterministic)

Files:
    f32/adapter_config.json, f32/adapter_model.bin
        LoRA r=4 alpha=8 on q_proj, v_proj, init_lora_weights=False (torch.manual_seed(0)),
        the model in f32
    bf16/...  the same adapter made on the model in bf16 with autocast_adapter_dtype=False
        (PEFT stores bf16 tensors: BFloat16Storage)
    logits.safetensors
        input_ids (i64 (1, 9)); f32_logits (f32 (1, 9, 64)): PeftModel.from_pretrained on
        f32/, eval, unmerged; bf16_logits likewise for bf16/ on the bf16 model (as f32)
    oversized/adapter_config.json, oversized/adapter_model.bin
        a one-tensor state dict ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A
        .weight": zeros(4, 300)}) whose pickled shape and stride were rewritten to
        (4, 65535) and (65535, 1) (the two bytes of each BININT2 300): a file that claims
        more data than it holds

    models/gpt2/      tests/fixtures/peft_options/gpt2_lora/base loaded by transformers, its
        GPT2Model's state dict (no `transformer.` prefix, as the Hub's gpt2 has it)
        torch.save'd as pytorch_model.bin; config.json, generation_config.json copied
    models/qwen2_sharded/  tests/fixtures/models/llama/qwen2/base's state dict (tied
        lm_head.weight included, sharing the embedding's storage) in 3 shards
        pytorch_model-0000i-of-00003.bin (every third tensor) with
        pytorch_model.bin.index.json, as transformers 4 wrote them

Versions used for the committed files: torch 2.15.0, transformers 5.24.0, peft 0.21.2
(Python 3.11).
"""

import io
import json
import shutil
import zipfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from fixture_env import rerun_pinned

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "tests/fixtures/models/llama/mistral/base"
OUT = ROOT / "tests/fixtures/peft_pickle"
INPUT_IDS = torch.tensor([[1, 5, 9, 12, 3, 7, 30, 2, 8]])
OVERSIZED_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def make(name, dtype):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=dtype)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    # autocast_adapter_dtype=False: the adapter stays in the model's dtype (PEFT's default
    # upcasts it to f32).
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    peft_model.save_pretrained(OUT / name, safe_serialization=False)
    (OUT / name / "README.md").unlink()  # PEFT's model card
    assert (OUT / name / "adapter_model.bin").exists()
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=dtype)
    reloaded = PeftModel.from_pretrained(base, OUT / name, autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        return reloaded(input_ids=INPUT_IDS).logits.float().contiguous()


def oversized():
    """A state dict whose pickled shape claims 65535 columns over storage for 300."""
    buf = io.BytesIO()
    torch.save({OVERSIZED_KEY: torch.zeros(4, 300)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    (OUT / "oversized").mkdir()
    with zipfile.ZipFile(OUT / "oversized/adapter_model.bin", "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                # 300 is the shape's second entry and the stride's first.
                bininit2_300 = b"M" + (300).to_bytes(2, "little")
                assert data.count(bininit2_300) == 2, data
                data = data.replace(bininit2_300, b"M" + (65535).to_bytes(2, "little"))
            dst.writestr(info, data)
    shutil.copy(OUT / "f32/adapter_config.json", OUT / "oversized/adapter_config.json")


def pickled_model(src, name, shards=1, base_only=False):
    """The model folder `src` written again as PyTorch pickles under models/NAME, as
    transformers 4 wrote them (transformers 5 writes safetensors only): torch.save of the
    state dict as pytorch_model.bin, or split into `shards` files
    pytorch_model-0000i-of-0000n.bin with pytorch_model.bin.index.json. `base_only`: the
    base model's state dict alone (names without the head's prefix), as the Hub's gpt2 has
    it. config.json and generation_config.json are copied."""
    from transformers import AutoModelForCausalLM as Auto

    model = Auto.from_pretrained(ROOT / src, dtype=torch.float32)
    state = (model.base_model if base_only else model).state_dict()
    state = {k: v.contiguous() for k, v in state.items()}
    out = OUT / "models" / name
    out.mkdir(parents=True)
    for extra in ["config.json", "generation_config.json"]:
        shutil.copy(ROOT / src / extra, out / extra)
    if shards == 1:
        torch.save(state, out / "pytorch_model.bin")
        return
    names = list(state)
    weight_map, total = {}, 0
    for i in range(shards):
        part = {k: state[k] for k in names[i::shards]}
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save(part, out / file)
        for k, v in part.items():
            weight_map[k] = file
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def main():
    rerun_pinned()
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    logits = {
        "input_ids": INPUT_IDS.clone(),
        "f32_logits": make("f32", torch.float32),
        "bf16_logits": make("bf16", torch.bfloat16),
    }
    save_file(logits, OUT / "logits.safetensors")
    oversized()
    pickled_model("tests/fixtures/peft_options/gpt2_lora/base", "gpt2", base_only=True)
    pickled_model("tests/fixtures/models/llama/qwen2/base", "qwen2_sharded", shards=3)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
