"""PEFT's numbers for the shapes in benches/variants.rs (CPU, f32, 2 threads, medians).

Run: python benches/peft_variants.py   (needs torch and peft; not used by tests)
"""
import time

import torch
from peft import LoraConfig, VeraConfig, get_peft_model

torch.set_num_threads(2)
torch.manual_seed(0)


def median_ms(f, reps=15):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def adapted(d, cfg):
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(d, d)), cfg)
    layer = model.base_model.model[0]
    for p in layer.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return layer


def fwd_bwd(layer, x):
    layer(x).sum().backward()


n, d = 512, 1024
x = torch.randn(n, d, requires_grad=True)
for name, cfg in [
    ("lora r16", LoraConfig(r=16, lora_alpha=32, target_modules=["0"])),
    ("dora r16", LoraConfig(r=16, lora_alpha=32, target_modules=["0"], use_dora=True)),
    ("vera r256", VeraConfig(r=256, target_modules=["0"])),
]:
    layer = adapted(d, cfg)
    print(f"fwd+bwd n={n} d={d} {name}: {median_ms(lambda: fwd_bwd(layer, x)):.2f} ms")

d = 2048
x = torch.randn(1, d)
with torch.no_grad():
    for name, cfg in [
        ("lora r16", LoraConfig(r=16, lora_alpha=32, target_modules=["0"])),
        ("dora r16", LoraConfig(r=16, lora_alpha=32, target_modules=["0"], use_dora=True)),
    ]:
        layer = adapted(d, cfg).eval()
        print(f"eval n=1 d={d} {name}: {median_ms(lambda: layer(x), reps=51) * 1e3:.1f} us")
