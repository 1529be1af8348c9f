#!/usr/bin/env python3
"""PiSSA's and OLoRA's base residuals, side by side: what PEFT computes for every targeted
layer when it loads (or creates) such an adapter, and what lorakit computes when it builds
the module (`lorakit::peft::BaseResidual`, `benches/base_residual.rs`).

Each weight (f32, seeded) gets, in one process per side and one call per weight:
  - PEFT: `get_peft_model` of a one-`nn.Linear` model with `LoraConfig(r, lora_alpha=r,
    init_lora_weights="pissa")`, then `"olora"` (its `pissa_init` / `olora_init`:
    `torch.linalg.svd` / `torch.linalg.qr` in f32, the residual written into the layer);
  - lorakit: `BaseResidual::Pissa.apply` / `Olora.apply` (f64 on the host).
Both run with the same thread count. The PiSSA residuals of both are compared with an f64
`torch.linalg.svd` one (max |difference| / max |residual|).

Weights: Gaussian (a flat top spectrum: the slow case for lorakit's iteration) and a
decaying spectrum (singular values 2·(i+1)^-0.6, closer to trained weights), at the
shapes of --shapes.

    python3 benches/pissa_compare.py [--ranks 16 128] [--threads 2]
        [--shapes 1024x768 2048x2048 4096x4096]
"""
import argparse, json, os, subprocess, sys, tempfile, time

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from merge_compare import cpu_name  # noqa: E402 (the benches share it)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def weights(shapes):
    g = torch.Generator().manual_seed(0)
    out = {}
    for m, n in shapes:
        out[f"gauss_{m}x{n}"] = torch.randn(m, n, generator=g) * 0.02
        k = min(m, n)
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        s = torch.tensor([2.0 * (i + 1) ** -0.6 for i in range(k)], dtype=torch.float64)
        out[f"decay_{m}x{n}"] = ((u * s) @ v.T).float()
    return out


def peft_side(path, r, threads):
    """Seconds per weight for PEFT's PiSSA and OLoRA inits, and its PiSSA residuals."""
    import warnings
    from peft import LoraConfig, get_peft_model

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    times, residuals = {}, {}
    for name, w in load_file(path).items():
        entry = {}
        for init in ("pissa", "olora"):
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                layer.weight.copy_(w)
            model = torch.nn.Sequential()
            model.add_module("fc", layer)
            config = LoraConfig(r=r, lora_alpha=r, target_modules=["fc"], init_lora_weights=init)
            start = time.perf_counter()
            peft_model = get_peft_model(model, config)
            entry[f"{init}_s"] = time.perf_counter() - start
            if init == "pissa":
                residuals[name] = peft_model.base_model.model.fc.base_layer.weight.detach().clone()
        times[name] = entry
    return times, residuals


def exact_residual(w, r):
    v, s, uh = torch.linalg.svd(w.double(), full_matrices=False)
    return w.double() - v[:, :r] @ torch.diag(s[:r]) @ uh[:r]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["1024x768", "2048x2048", "4096x4096"])
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    subprocess.run(["cargo", "bench", "--bench", "base_residual", "--no-run"], cwd=ROOT, check=True, env=env)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.safetensors")
        ws = weights(shapes)
        save_file(ws, path)
        print(f"CPU: {cpu_name()}, {args.threads} threads; torch {torch.__version__}")
        print("| weight | r | PEFT PiSSA s | lorakit PiSSA s | PEFT OLoRA s | lorakit OLoRA s | PiSSA error: PEFT, lorakit |")
        print("|---|---|---|---|---|---|---|")
        for r in args.ranks:
            out = os.path.join(tmp, f"res{r}.safetensors")
            done = subprocess.run(
                ["cargo", "bench", "--bench", "base_residual", "--", path, str(r), out],
                cwd=ROOT, check=True, env=env, capture_output=True, text=True,
            )
            ours = json.loads(done.stdout.strip().splitlines()[-1])
            ours_res = load_file(out)
            theirs, theirs_res = peft_side(path, r, args.threads)
            for name, w in ws.items():
                exact = exact_residual(w, r)
                scale = exact.abs().max()
                err = lambda x: ((x.double() - exact).abs().max() / scale).item()  # noqa: E731
                print(
                    f"| {name} | {r} | {theirs[name]['pissa_s']:.2f} | {ours[name]['pissa_s']:.2f} "
                    f"| {theirs[name]['olora_s']:.2f} | {ours[name]['olora_s']:.2f} "
                    f"| {err(theirs_res[name]):.1e}, {err(ours_res[name]):.1e} |"
                )


if __name__ == "__main__":
    main()
