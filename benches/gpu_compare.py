#!/usr/bin/env python3
"""Side-by-side GPU timings: Hugging Face PEFT on PyTorch vs lorakit on the same GPU, in
one run (issue "CUDA that has run"). Cases (n = 4096 tokens, d = 4096, r = 16, VeRA
r = 256, bf16 unless --dtype): the base GEMM alone, base forward + input-gradient GEMMs,
LoRA forward (no grad), LoRA / DoRA / VeRA forward + backward (`y.sum().backward()`, the
input requiring a gradient as inside a network). Medians in ms, each timed call ending
with a device synchronize.

    python3 benches/gpu_compare.py --lorakit-bin PATH [--dtype bf16] [--markdown F] [--json F]

PATH is the `gpu_json` bench binary (`cargo bench --features cuda --bench gpu_json
--no-run` prints it); scripts/gpu-check.sh builds and carries it.
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import torch
from peft import LoraConfig, VeraConfig, get_peft_model

N, D, R, VERA_R = 4096, 4096, 16, 256


def median_ms(f, iters):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(times), min(times)]


class One(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.proj = torch.nn.Linear(D, D, bias=True, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def peft_layer(kind, dtype):
    model = One(dtype).cuda()
    if kind == "vera":
        cfg = VeraConfig(r=VERA_R, target_modules=["proj"], init_weights=False)
    else:
        cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"], use_dora=kind == "dora",
                         init_lora_weights=False)
    return get_peft_model(model, cfg).to(dtype)


def torch_cases(dtype, iters):
    torch.manual_seed(0)
    dev = "cuda"
    w = (torch.rand(D, D, device=dev) * 0.04 - 0.02).to(dtype)
    x = (torch.rand(N, D, device=dev) * 2 - 1).to(dtype)
    g = (torch.rand(N, D, device=dev) * 2 - 1).to(dtype)
    out = {}
    with torch.no_grad():
        out["base_fwd"] = median_ms(lambda: x @ w.t(), iters)

        def fwd_dgrad():
            x @ w.t()
            g @ w
        out["base_fwd_dgrad"] = median_ms(fwd_dgrad, iters)
        lora = peft_layer("lora", dtype).eval()
        out["lora_fwd"] = median_ms(lambda: lora(x), iters)
    for kind in ["lora", "dora", "vera"]:
        layer = peft_layer(kind, dtype).train()
        xv = x.clone().requires_grad_(True)

        def step():
            layer(xv).sum().backward()
        out[f"{kind}_fwd_bwd"] = median_ms(step, iters)
        del layer
    return out


def lorakit_cases(binary, dtype, iters):
    env = dict(os.environ, LORAKIT_GPU_DTYPE=dtype, LORAKIT_GPU_ITERS=str(iters))
    run = subprocess.run([binary], env=env, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lorakit-bin", required=True)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--markdown")
    p.add_argument("--json")
    a = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    if a.dtype == "f32":
        torch.backends.cuda.matmul.allow_tf32 = False
    ours = lorakit_cases(a.lorakit_bin, a.dtype, a.iters)
    theirs = torch_cases(dtype, a.iters)
    gpu = torch.cuda.get_device_name(0)
    cases = ["base_fwd", "base_fwd_dgrad", "lora_fwd", "lora_fwd_bwd", "dora_fwd_bwd", "vera_fwd_bwd"]
    lines = [f"GPU: {gpu}; {a.dtype}; n = {N}, d = {D}, r = {R} (VeRA r = {VERA_R}); medians of {a.iters} in ms; "
             f"torch {torch.__version__}", "",
             "| case | lorakit | PyTorch / PEFT | lorakit / PEFT |", "|---|---|---|---|"]
    for c in cases:
        l, t = ours[c][0], theirs[c][0]
        lines.append(f"| {c} | {l:.3f} | {t:.3f} | {l / t:.2f} |")
    m = lambda c: ours[c][0]
    targets = [
        ("LoRA fwd / base GEMM (lorakit)", m("lora_fwd") / m("base_fwd"), 1.05),
        ("LoRA fwd+bwd / base fwd + dgrad GEMMs (lorakit)", m("lora_fwd_bwd") / m("base_fwd_dgrad"), 1.05),
        ("LoRA fwd+bwd / PEFT's", m("lora_fwd_bwd") / theirs["lora_fwd_bwd"][0], 0.8),
        ("DoRA fwd+bwd / lorakit LoRA", m("dora_fwd_bwd") / m("lora_fwd_bwd"), 1.1),
        ("VeRA fwd+bwd / PEFT's", m("vera_fwd_bwd") / theirs["vera_fwd_bwd"][0], 1.0),
    ]
    lines += ["", "| target | ratio | goal | met |", "|---|---|---|---|"]
    for name, r, goal in targets:
        lines.append(f"| {name} | {r:.2f} | ≤ {goal} | {'yes' if r <= goal else 'no'} |")
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        open(a.markdown, "w").write(text + "\n")
    if a.json:
        json.dump({"gpu": gpu, "dtype": a.dtype, "lorakit": ours, "peft": theirs}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
