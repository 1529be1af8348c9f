#!/usr/bin/env python3
"""Independent llama.cpp-format references for lorakit's GGUF export and GGUF model reader.

Needs gguf-py (llama.cpp's `gguf-py`, on PyPI as `gguf`; made with 0.19.0: `pip install
gguf`), torch, transformers and peft (made with torch 2.15.0, transformers 5.24.0, peft
0.21.2). Run from the repository root:

    python3 scripts/make_gguf_fixtures.py            # rewrites tests/fixtures/gguf/
    python3 scripts/make_gguf_fixtures.py --check F  # dumps an adapter GGUF with gguf-py

What it writes (deterministic), all from the existing PEFT / transformers fixtures:

1. `adapter_<case>.gguf`: the PEFT adapter converted the way llama.cpp's
   `convert_lora_to_gguf.py` converts it: tensor names from gguf-py's own map
   (`gguf.get_tensor_name_map(arch, n_layers)`, i.e. `tensor_mapping.py`), `NAME.lora_a` =
   `lora_A`, `NAME.lora_b` = `lora_B` untransposed, `token_embd.weight.lora_a` =
   `lora_embedding_A.T`, for the `llama` architecture `q_proj` / `k_proj` `lora_B` rows put
   through `LlamaModel.permute` (the reshape / swapaxes / reshape of `conversion/llama.py`,
   which `LoraTorchTensor.permute` applies to `lora_B` only), metadata by `GGUFWriter`
   (`add_type(GGUFType.ADAPTER)`, `Keys.Adapter.TYPE = "lora"`, `Keys.Adapter.LORA_ALPHA`),
   f32 (the converter's default `--outtype`). Cases: `mistral` (llama arch, GQA 4/2,
   head_dim 12, all linear layers), `qwen3` (qwen3 arch, no permutation), `llama_embed`
   (embedding, lm_head, q/v_proj with 2/1 heads).
2. `qwen2_delta.safetensors`: for the qwen2 adapter (rsLoRA, rank_pattern, alpha_pattern,
   which the converter ignores: its file would be mis-scaled), PEFT's own
   `get_delta_weight` of every adapted module (`scale · B @ A`), keyed by module path: what
   llama.cpp's `alpha / rank · lora_b @ lora_a` must equal for lorakit's file.
3. `model_<case>.gguf`: a GGUF model written as `convert_hf_to_gguf.py` writes one
   (`GGUFWriter` hyperparameter keys, gguf-py's tensor names, `LlamaModel.permute` on
   `q_proj` / `k_proj` for the llama arch): `mistral` (its `attn_q` quantized to Q8_0 by
   gguf-py's `quants.quantize`, the rest f32) and `qwen2` (q/k/v biases, tied embeddings).
   No tokenizer metadata (the reader does not need it).
   `llama3_rope` (llama3 RoPE scaling) also gets `rope_freqs.weight`, the per-frequency
   divisors `LlamaModel.generate_extra_tensors` computes (its loop, verbatim in
   `rope_factors` below). One deviation, on purpose: the converter reads
   `original_max_position_embeddings` from the top level of config.json (default 8192),
   where transformers 5 keeps it inside `rope_parameters` (64 in this fixture); the
   fixture uses the value transformers uses, so the file describes the same model.
"""

import argparse
import math
import shutil
import sys
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "gguf"

ARCH = {  # HF architectures[0] -> gguf MODEL_ARCH (conversion/llama.py, conversion/qwen.py)
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
}


def permute(weights, n_head, n_head_kv):
    """LlamaModel.permute, verbatim in effect (conversion/llama.py)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def hf_config(base):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(base)


def arch_of(cfg):
    return ARCH[cfg.architectures[0]]


def maybe_permute(arch, name, t, cfg):
    if arch != gguf.MODEL_ARCH.LLAMA:
        return t
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute(t, cfg.num_attention_heads, cfg.num_attention_heads)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute(t, cfg.num_attention_heads, cfg.num_key_value_heads)
    return t


def convert_adapter(case, adapter_dir, base_dir):
    import json
    cfg = hf_config(base_dir)
    arch = arch_of(cfg)
    lparams = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    pairs = {}
    for name, t in tensors.items():
        base = name.replace("base_model.model.", "")
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                             (".lora_embedding_A", "A"), (".lora_embedding_B", "B")):
            if base.endswith(suffix):
                pairs.setdefault(base[: -len(suffix)] + ".weight", {})[part] = t.float()
                break
        else:
            assert name.endswith(".base_layer.weight"), name
    w = gguf.GGUFWriter(str(OUT / f"adapter_{case}.gguf"), gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lparams["lora_alpha"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for hf_name in sorted(pairs):
        a, b = pairs[hf_name]["A"], pairs[hf_name]["B"]
        dest = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert dest is not None, hf_name
        b = maybe_permute(arch, hf_name, b, cfg)
        if dest == "token_embd.weight":
            a = a.T
        w.add_tensor(dest + ".lora_a", a.contiguous().numpy())
        w.add_tensor(dest + ".lora_b", b.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def peft_deltas(adapter_dir, base_dir, out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir)
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            path = name.replace("base_model.model.", "")
            deltas[path] = module.get_delta_weight("default").detach().float().contiguous()
    save_file(deltas, str(out))


def rope_factors(head_dim, rope):
    """`rope_freqs.weight` as convert_hf_to_gguf.py's LlamaModel computes it for llama3."""
    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(1)
        elif wavelen > low_freq_wavelen:
            out.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def convert_model(case, base_dir, quantize_q):
    write_model_gguf(base_dir, OUT / f"model_{case}.gguf", quantize_q)


def write_model_gguf(base_dir, path, quantize_q=False, no_vocab=False):
    """The HF folder `base_dir` as convert_hf_to_gguf.py writes it, to `path`: f32, with
    `attn_q` in Q8_0 when `quantize_q`; `no_vocab` adds `tokenizer.ggml.model = "none"`
    (llama.cpp's loader needs the key; lorakit's reader does not). Returns the config."""
    cfg = hf_config(base_dir)
    arch = arch_of(cfg)
    tensors = load_file(base_dir / "model.safetensors")
    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if no_vocab:
        w.add_tokenizer_model("none")
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise SystemExit(f"{base_dir}: rope_type {rope.get('rope_type')} not handled here")
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", rope_factors(head_dim, rope).numpy())
    for name in sorted(tensors):
        t = maybe_permute(arch, name, tensors[name].float(), cfg)
        dest = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert dest is not None, name
        data = t.contiguous().numpy()
        if quantize_q and dest.endswith("attn_q.weight"):
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(dest, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(dest, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg


def check(path):
    """Prints an adapter GGUF as gguf-py's reader sees it (metadata, names, ne, types)."""
    r = gguf.GGUFReader(path)
    for field in r.fields.values():
        if field.name.startswith("GGUF."):
            continue
        print(f"{field.name} = {field.contents()!r}")
    for t in r.tensors:
        print(t.name, list(t.shape), t.tensor_type.name)
    kv = {f.name: f.contents() for f in r.fields.values()}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora", kv
    names = {t.name: t for t in r.tensors}
    for name, t in names.items():
        assert name.endswith((".lora_a", ".lora_b")), name
        other = names[name[:-1] + ("b" if name.endswith("a") else "a")]
        a, b = (t, other) if name.endswith("a") else (other, t)
        # llama-adapter.cpp's check: a.ne[1] == b.ne[0] (the rank), except token_embd.
        if not name.startswith("token_embd"):
            assert a.shape[1] == b.shape[0], (name, list(a.shape), list(b.shape))
    print("ok:", len(names), "tensors")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", type=Path, help="dump and sanity-check an adapter GGUF")
    args = ap.parse_args()
    if args.check:
        check(args.check)
        return
    torch.manual_seed(0)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    llama = FIX / "models" / "llama"
    for case in ["mistral", "qwen3"]:
        convert_adapter(case, llama / case / "lora", llama / case / "base")
    emb = FIX / "peft_options" / "llama_embed"
    convert_adapter("llama_embed", emb / "adapter", emb / "base")
    peft_deltas(llama / "qwen2" / "lora", llama / "qwen2" / "base", OUT / "qwen2_delta.safetensors")
    convert_model("mistral", llama / "mistral" / "base", quantize_q=True)
    convert_model("qwen2", llama / "qwen2" / "base", quantize_q=False)
    convert_model("llama3_rope", llama / "llama3_rope" / "base", quantize_q=False)
    print("wrote", sorted(p.name for p in OUT.iterdir()), file=sys.stderr)


if __name__ == "__main__":
    main()
