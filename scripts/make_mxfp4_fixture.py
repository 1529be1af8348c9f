#!/usr/bin/env python3
"""Generates tests/fixtures/mxfp4/: MXFP4-packed expert weights as GPT-OSS checkpoints store
them, and what transformers' own `convert_moe_packed_tensors` (the function its
`Mxfp4Dequantize` conversion calls when a model is loaded with
`Mxfp4Config(dequantize=True)`) makes of them.

Usage:
    python scripts/make_mxfp4_fixture.py      # rewrites tests/fixtures/mxfp4/

packed.safetensors (checkpoint names, as openai/gpt-oss-20b stores them):
    model.layers.0.mlp.experts.gate_up_proj_blocks  u8 [2, 6, 2, 16]   E=2, 2I=6, H=64
    model.layers.0.mlp.experts.gate_up_proj_scales  u8 [2, 6, 2]       scales 112..135
    model.layers.0.mlp.experts.gate_up_proj_bias    bf16 [2, 6]        stored plainly
    model.layers.0.mlp.experts.down_proj_blocks     u8 [2, 64, 3, 16]  E=2, H=64, I=96
    model.layers.0.mlp.experts.down_proj_scales     u8 [2, 64, 3]
    model.layers.1.mlp.experts.gate_up_proj_blocks  u8 [2, 6, 2, 16]   every byte value
    model.layers.1.mlp.experts.gate_up_proj_scales  u8 [2, 6, 2]       extreme scales:
        0, 1, 2, 126, 127, 128, 252, 253, 254, 255 (2^-127 .. 2^128: subnormal products,
        overflow to ±inf; torch's ldexp is exact, so 0 · 2^128 is 0, never NaN)

expected.safetensors: for each X above (model.layers.N.mlp.experts.{gate_up,down}_proj)
and each dtype D in f32, bf16, f16, f64, the tensor `D/X` that
`convert_moe_packed_tensors(blocks, scales, dtype=D)` returns: the parameter's layout
[E, H, 2I] for gate_up_proj and [E, I, H] for down_proj (transformers transposes the last
two dims). transformers dequantizes into the dtype of the parameter it loads into (the
model's dtype, bf16 for gpt-oss's "auto"); the FP4 lookup table is built in that dtype and
`torch.ldexp(value, scale - 127)` writes into it, i.e. the exact product rounded once.

Versions used to generate the committed files: torch 2.15.0, transformers 5.25.0, on the
CPU. Deterministic (seeded).
"""

import os
import sys

if os.environ.get("HF_HUB_OFFLINE") != "1":
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch
from safetensors.torch import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

OUT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "mxfp4")
)
PREFIX = "model.layers.{}.mlp.experts.{}"
EXTREME_SCALES = [0, 1, 2, 126, 127, 128, 252, 253, 254, 255]
DTYPES = {
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "f64": torch.float64,
}


def main():
    g = torch.Generator().manual_seed(20250805)

    def rand_u8(shape, low=0, high=256):
        return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(torch.uint8)

    packed = {}
    # Layer 0: realistic scales (gpt-oss-20b's lie around 115..130).
    packed[PREFIX.format(0, "gate_up_proj_blocks")] = rand_u8((2, 6, 2, 16))
    packed[PREFIX.format(0, "gate_up_proj_scales")] = rand_u8((2, 6, 2), 112, 136)
    packed[PREFIX.format(0, "gate_up_proj_bias")] = torch.randn(
        (2, 6), generator=g
    ).to(torch.bfloat16)
    packed[PREFIX.format(0, "down_proj_blocks")] = rand_u8((2, 64, 3, 16))
    packed[PREFIX.format(0, "down_proj_scales")] = rand_u8((2, 64, 3), 112, 136)
    # Layer 1: every byte value appears in the blocks, every extreme scale in the scales.
    blocks = torch.arange(2 * 6 * 2 * 16, dtype=torch.int64) % 256
    blocks = blocks[torch.randperm(blocks.numel(), generator=g)]
    packed[PREFIX.format(1, "gate_up_proj_blocks")] = blocks.to(torch.uint8).reshape(2, 6, 2, 16)
    scales = torch.tensor(EXTREME_SCALES * 3, dtype=torch.int64)[: 2 * 6 * 2]
    scales = scales[torch.randperm(scales.numel(), generator=g)]
    packed[PREFIX.format(1, "gate_up_proj_scales")] = scales.to(torch.uint8).reshape(2, 6, 2)

    expected = {}
    for layer, proj in [(0, "gate_up_proj"), (0, "down_proj"), (1, "gate_up_proj")]:
        name = PREFIX.format(layer, proj)
        blocks = packed[name + "_blocks"]
        scales = packed[name + "_scales"]
        for tag, dtype in DTYPES.items():
            out = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)
            assert out.dtype == dtype, (name, tag, out.dtype)
            e, rows, groups, b = blocks.shape
            assert tuple(out.shape) == (e, groups * b * 2, rows), (name, tuple(out.shape))
            assert not torch.isnan(out).any(), f"{tag}/{name}: transformers produced NaN"
            expected[f"{tag}/{name}"] = out.contiguous()
        # Exactness: f32 and bf16 agree wherever bf16 is finite (every value e2m1 · 2^k).
        f32, bf16 = expected[f"f32/{name}"], expected[f"bf16/{name}"]
        assert torch.equal(f32.to(torch.bfloat16), bf16), name

    os.makedirs(OUT, exist_ok=True)
    save_file(packed, os.path.join(OUT, "packed.safetensors"))
    save_file(expected, os.path.join(OUT, "expected.safetensors"))
    infs = int(torch.isinf(expected[f"f32/{PREFIX.format(1, 'gate_up_proj')}"]).sum())
    print(f"wrote {OUT}: {len(packed)} packed tensors, {len(expected)} expected ({infs} inf in layer 1 f32)")


if __name__ == "__main__":
    main()
