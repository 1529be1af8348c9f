#!/usr/bin/env python3
"""Streaming merge vs PEFT's `merge_and_unload`: wall time and peak RSS, side by side.

Generates (once; reused while the settings match) a random f32 `LlamaForCausalLM` of
≥ 1 GB with transformers, saved as one `model.safetensors`, and two PEFT adapters for it:
LoRA r = 16, alpha = 32 on all linear layers (B random, so the merge changes every
weight) and DoRA (the same, `use_dora=True`, magnitudes perturbed). Then for each
(checkpoint, adapter) pair it runs, each in a fresh process under `/usr/bin/time`:

- PEFT, what a PEFT user runs: `AutoModelForCausalLM.from_pretrained(base, dtype=<the
  checkpoint's dtype>)`, `PeftModel.from_pretrained`, `merge_and_unload()`,
  `save_pretrained(out)` (python's import time included; the import alone is timed once
  and printed for reference);
- lorakit: `target/release/lorakit merge --base <folder> --adapter <dir> --out <out>`;

and checks that lorakit's output equals PEFT's (per tensor, max |a − b| / max |b|).

    python3 benches/merge_compare.py [--rounds 2] [--bf16] [--sharded] [--pissa] [--workdir DIR]
                                     [--no-build] [--markdown FILE]

Each round runs both sides of every case once, PEFT and lorakit in alternating order;
the table reports the median over rounds. Before the timed rounds every checkpoint is read
once so that both sides read it from a warm page cache (the machine needs RAM for the
checkpoint plus PEFT's peak). Outputs are deleted after each run. `--bf16` adds a bf16
copy of the checkpoint, `--sharded` an f32 copy in 300 MB shards (both merged with the same
f32 adapters), `--pissa` a PiSSA adapter (r = 16, all linear layers, made on the f32
checkpoint: both sides recompute each targeted weight's residual). The lorakit binary is built with `cargo build --release --bin lorakit`
unless `--no-build` is given.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "lorakit")

MODEL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
ADAPTER = dict(r=16, lora_alpha=32, target_modules="all-linear")
SEED = 0
MIN_BYTES = 1.0e9

# Run in the child process for the PEFT side: what a PEFT user writes.
PEFT_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, transformers
from transformers import AutoModelForCausalLM
from peft import PeftModel
t1 = time.perf_counter()
base, adapter, out, dtype = sys.argv[1:5]
dtype = getattr(torch, dtype)
kw = {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}
model = AutoModelForCausalLM.from_pretrained(base, **kw)
model = PeftModel.from_pretrained(model, adapter)
t2 = time.perf_counter()
model = model.merge_and_unload()
t3 = time.perf_counter()
skw = {} if int(transformers.__version__.split(".")[0]) >= 5 else {"safe_serialization": True}
model.save_pretrained(out, **skw)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "merge": t3 - t2, "save": t4 - t3}))
"""


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    except OSError:
        pass
    return "?"


def versions():
    import peft
    import safetensors
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }


def dir_bytes(path):
    return sum(
        os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")
    )


def settings_match(workdir, want):
    try:
        with open(os.path.join(workdir, "settings.json")) as f:
            return json.load(f) == want
    except (OSError, ValueError):
        return False


def generate(workdir, want_bf16, want_sharded, want_pissa):
    """Writes the checkpoints and adapters that are missing; returns {name: folder}."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {"model": MODEL, "adapter": ADAPTER, "seed": SEED, "transformers": transformers.__version__}
    if not settings_match(workdir, settings):
        if os.path.exists(workdir):
            print(f"settings changed: regenerating {workdir}", flush=True)
            shutil.rmtree(workdir)
        os.makedirs(workdir)
    v5 = int(transformers.__version__.split(".")[0]) >= 5
    skw = {} if v5 else {"safe_serialization": True}
    paths = {
        "f32": os.path.join(workdir, "base-f32"),
        "f32-sharded": os.path.join(workdir, "base-f32-sharded"),
        "bf16": os.path.join(workdir, "base-bf16"),
        "lora": os.path.join(workdir, "adapter-lora"),
        "dora": os.path.join(workdir, "adapter-dora"),
        "pissa": os.path.join(workdir, "adapter-pissa"),
    }
    needed = (
        ["f32", "lora", "dora"]
        + (["bf16"] if want_bf16 else [])
        + (["f32-sharded"] if want_sharded else [])
        + (["pissa"] if want_pissa else [])
    )
    missing = [n for n in needed if not os.path.exists(os.path.join(paths[n], ".done"))]
    if missing:
        print(f"generating {', '.join(missing)} in {workdir}", flush=True)
        t = time.perf_counter()
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(LlamaConfig(**MODEL)).eval()
        n_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        assert n_bytes >= MIN_BYTES, f"model is {n_bytes} bytes, want ≥ {MIN_BYTES:.0f}"

        def save(name, m, shard):
            shutil.rmtree(paths[name], ignore_errors=True)
            m.save_pretrained(paths[name], max_shard_size=shard, **skw)
            open(os.path.join(paths[name], ".done"), "w").close()

        if "f32" in missing:
            save("f32", model, "20GB")
            files = [f for f in os.listdir(paths["f32"]) if f.endswith(".safetensors")]
            assert files == ["model.safetensors"], files
        if "f32-sharded" in missing:
            save("f32-sharded", model, "300MB")
        for name, dora in [("lora", False), ("dora", True)]:
            if name not in missing:
                continue
            torch.manual_seed(SEED + 1 + dora)
            cfg = LoraConfig(**ADAPTER, use_dora=dora, init_lora_weights=False)
            pm = get_peft_model(LlamaForCausalLM(LlamaConfig(**MODEL)).eval(), cfg)
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_B" in n:
                        torch.nn.init.normal_(p, std=0.02)
                    elif "lora_magnitude_vector" in n:
                        p.mul_(1 + 0.1 * torch.randn_like(p))
            shutil.rmtree(paths[name], ignore_errors=True)
            pm.save_pretrained(paths[name])
            # The adapter names the f32 checkpoint as its base.
            cfg_path = os.path.join(paths[name], "adapter_config.json")
            with open(cfg_path) as f:
                c = json.load(f)
            c["base_model_name_or_path"] = paths["f32"]
            with open(cfg_path, "w") as f:
                json.dump(c, f, indent=2)
            open(os.path.join(paths[name], ".done"), "w").close()
            del pm
        if "pissa" in missing:
            # PiSSA's A and B come from the SVD of this very base (PEFT replaces each weight
            # by its residual on every load): made on the saved f32 checkpoint, then moved
            # as training would.
            torch.manual_seed(SEED + 3)
            base = LlamaForCausalLM.from_pretrained(paths["f32"], dtype=torch.float32).eval()
            pm = get_peft_model(base, LoraConfig(**ADAPTER, init_lora_weights="pissa"))
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_" in n:
                        p.add_(0.01 * p.abs().mean() * torch.randn_like(p))
            shutil.rmtree(paths["pissa"], ignore_errors=True)
            pm.save_pretrained(paths["pissa"])
            open(os.path.join(paths["pissa"], ".done"), "w").close()
            del pm, base
        if "bf16" in missing:
            save("bf16", model.to(torch.bfloat16), "20GB")
        del model
        with open(os.path.join(workdir, "settings.json"), "w") as f:
            json.dump(settings, f)
        print(f"generated in {time.perf_counter() - t:.0f} s", flush=True)
    return paths


def warm(folder):
    """Reads every file of `folder` once, so both sides start from a warm page cache."""
    for f in sorted(os.listdir(folder)):
        p = os.path.join(folder, f)
        if os.path.isfile(p):
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def timed(cmd):
    """Runs `cmd` under /usr/bin/time: (wall s, peak RSS bytes, stdout)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        proc = subprocess.run(
            ["/usr/bin/time", "-o", tf.name, "-f", "%e %M"] + cmd, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        last = tf.read().strip().splitlines()[-1].split()
    return float(last[0]), int(last[1]) * 1024, proc.stdout


def run_peft(base, adapter, out, dtype):
    wall, rss, stdout = timed([sys.executable, "-c", PEFT_CHILD, base, adapter, out, dtype])
    phases = json.loads(stdout.strip().splitlines()[-1])
    return wall, rss, phases


def run_lorakit(base, adapter, out, quiet):
    cmd = [BIN, "merge", "--base", base, "--adapter", adapter, "--out", out] + (["--quiet"] if quiet else [])
    wall, rss, _ = timed(cmd)
    return wall, rss, None


def compare(peft_out, kit_out, dtype):
    """(max over tensors of max|a-b|/max|b|, identical tensors, total, key problems,
    differing entries, total entries)."""
    import torch
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for f in sorted(os.listdir(folder)):
            if f.endswith(".safetensors"):
                out.update({k: (os.path.join(folder, f)) for k in safe_open(os.path.join(folder, f), "pt").keys()})
        return out

    a, b = tensors(kit_out), tensors(peft_out)
    problems = []
    if set(a) != set(b):
        problems.append(f"only lorakit: {sorted(set(a) - set(b))[:5]}, only PEFT: {sorted(set(b) - set(a))[:5]}")
    worst, worst_name, same, dtypes_differ = 0.0, None, 0, 0
    entries, entries_differ = 0, 0
    handles = {}

    def get(path, key):
        if path not in handles:
            handles[path] = safe_open(path, "pt")
        return handles[path].get_tensor(key)

    for k in sorted(set(a) & set(b)):
        x, y = get(a[k], k), get(b[k], k)
        if x.dtype != y.dtype:
            dtypes_differ += 1
        if x.shape != y.shape:
            problems.append(f"{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        entries += y.numel()
        if x.dtype == y.dtype:
            entries_differ += int((x != y).sum())
        if torch.equal(x, y):
            same += 1
            continue
        x64, y64 = x.double(), y.double()
        rel = ((x64 - y64).abs().max() / y64.abs().max().clamp_min(1e-30)).item()
        if rel > worst:
            worst, worst_name = rel, k
    if dtypes_differ:
        problems.append(f"{dtypes_differ} tensor(s) with another dtype")
    return worst, worst_name, same, len(set(a) & set(b)), problems, entries_differ, entries


def gb(n):
    return n / 1e9


def read_tensor(folder, key):
    from safetensors import safe_open

    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                if key in h.keys():
                    return h.get_tensor(key)
    raise KeyError(f"{key} not in {folder}")


def pissa_check(base, adapter, peft_out, kit_out, key):
    """Both sides' merged `key` (a PiSSA-adapted weight) against the merge computed from an
    f64 SVD of the base weight, rounded as PEFT's model in the checkpoint's dtype rounds
    (the residual to that dtype, then the sum): (σ_r − σ_{r+1}) / σ_1, and per side the
    largest difference relative to the largest entry and the count of entries that differ."""
    import torch

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        cfg = json.load(f)
    r, scale = cfg["r"], cfg["lora_alpha"] / cfg["r"]
    module = key[: -len(".weight")]
    w = read_tensor(base, key)
    a = read_tensor(adapter, f"base_model.model.{module}.lora_A.weight").double()
    b = read_tensor(adapter, f"base_model.model.{module}.lora_B.weight").double()
    u, sigma, vh = torch.linalg.svd(w.double(), full_matrices=False)
    residual = w.double() - u[:, :r] @ torch.diag(sigma[:r]) @ vh[:r]
    want = (residual.to(w.dtype).double() + scale * b @ a).to(w.dtype).double()
    largest = want.abs().max()
    sides = {}
    for side, out in [("lorakit", kit_out), ("PEFT", peft_out)]:
        got = read_tensor(out, key).double()
        sides[side] = (((got - want).abs().max() / largest).item(), int((got != want).sum()))
    return ((sigma[r - 1] - sigma[r]) / sigma[0]).item(), sides, want.numel()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/lorakit-merge-bench")
    ap.add_argument("--bf16", action="store_true", help="also a bf16 copy of the checkpoint")
    ap.add_argument("--sharded", action="store_true", help="also an f32 copy in 300 MB shards")
    ap.add_argument("--pissa", action="store_true",
                    help="also a PiSSA adapter (PEFT and lorakit compute the base's residual)")
    ap.add_argument("--no-build", action="store_true", help="use target/release/lorakit as it is")
    ap.add_argument("--markdown", help="append the output to this file")
    args = ap.parse_args()

    if not args.no_build:
        print("cargo build --release --bin lorakit", flush=True)
        subprocess.run(["cargo", "build", "--release", "--bin", "lorakit"], cwd=ROOT, check=True)
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: run `cargo build --release --bin lorakit`")
    usage = subprocess.run([BIN, "merge", "--help"], capture_output=True, text=True)
    quiet = "--quiet" in usage.stdout + usage.stderr

    paths = generate(args.workdir, args.bf16, args.sharded, args.pissa)
    outdir = os.path.join(args.workdir, "out")
    shutil.rmtree(outdir, ignore_errors=True)
    os.makedirs(outdir)

    checkpoints = [("f32", "float32")]
    if args.sharded:
        checkpoints.append(("f32-sharded", "float32"))
    if args.bf16:
        checkpoints.append(("bf16", "bfloat16"))
    adapters = ["lora", "dora"] + (["pissa"] if args.pissa else [])
    cases = [(c, dt, a) for c, dt in checkpoints for a in adapters]

    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    say(f"CPU: {cpu_name()} ({cpu_flags()}), {os.cpu_count()} logical CPUs; "
        f"RAM {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    say("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + f"; lorakit {BIN}"
        + (" (--quiet)" if quiet else ""))
    imp = [timed([sys.executable, "-c", "import torch, transformers, peft; from peft import PeftModel"])
           for _ in range(2)]
    say(f"python import of torch + transformers + peft alone: {imp[-1][0]:.2f} s, "
        f"{gb(imp[-1][1]):.2f} GB peak RSS (included in PEFT's wall and RSS below)")

    for c, _ in checkpoints:
        warm(paths[c])
    say(f"load average before the rounds: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    say()
    results = {case: {"peft": [], "kit": [], "phases": []} for case in cases}
    checks = {}
    pissa_checks = {}
    for rnd in range(args.rounds):
        for i, (c, dt, a) in enumerate(cases):
            case = (c, dt, a)
            order = ["peft", "kit"] if (rnd + i) % 2 == 0 else ["kit", "peft"]
            outs = {}
            for side in order:
                out = os.path.join(outdir, f"{side}-{c}-{a}")
                shutil.rmtree(out, ignore_errors=True)
                if side == "peft":
                    wall, rss, phases = run_peft(paths[c], paths[a], out, dt)
                    results[case]["phases"].append(phases)
                else:
                    wall, rss, _ = run_lorakit(paths[c], paths[a], out, quiet)
                results[case][side].append((wall, rss))
                outs[side] = out
                say(f"- round {rnd + 1} {c} {a} {'PEFT' if side == 'peft' else 'lorakit'}: "
                    f"{wall:.2f} s, {gb(rss):.2f} GB")
            if case not in checks:
                checks[case] = compare(outs["peft"], outs["kit"], dt)
                worst_key = checks[case][1]
                if a == "pissa" and worst_key is not None:
                    pissa_checks[case] = (worst_key, pissa_check(
                        paths[c], paths[a], outs["peft"], outs["kit"], worst_key))
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)

    say(f"load average after the rounds: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    say()
    say(f"| case | checkpoint | PEFT wall s | PEFT peak RSS GB (× ckpt) | lorakit wall s "
        f"| lorakit peak RSS GB (× ckpt) | wall lorakit/PEFT | RSS lorakit/PEFT |")
    say("|---|---|---|---|---|---|---|---|")
    for case in cases:
        c, _, a = case
        size = dir_bytes(paths[c])
        pw = statistics.median(w for w, _ in results[case]["peft"])
        pr = statistics.median(r for _, r in results[case]["peft"])
        kw = statistics.median(w for w, _ in results[case]["kit"])
        kr = statistics.median(r for _, r in results[case]["kit"])
        say(f"| {c} {a} | {gb(size):.3f} GB | {pw:.2f} | {gb(pr):.2f} ({pr / size:.2f}×) | {kw:.2f} "
            f"| {gb(kr):.2f} ({kr / size:.2f}×) | {kw / pw:.2f} | {kr / pr:.2f} |")
    say()
    say(f"Median of {args.rounds} round(s) (PEFT and lorakit alternate which runs first); "
        "wall and peak RSS (max resident set, /usr/bin/time %M) of the whole process.")
    say()
    say("PEFT's phases (median s): import, load (from_pretrained + PeftModel), merge_and_unload, save_pretrained")
    for case in cases:
        ph = results[case]["phases"]
        say(f"- {case[0]} {case[2]}: " + ", ".join(
            f"{k} {statistics.median(p[k] for p in ph):.2f}" for k in ["import", "load", "merge", "save"]))
    say()
    say("lorakit vs PEFT outputs (max over tensors of max|lorakit − PEFT| / max|PEFT|):")
    for case in cases:
        worst, name, same, total, problems, differ, entries = checks[case]
        tol = 1e-5 if case[1] == "float32" else 1e-2
        verdict = "OK" if worst <= tol and not problems else "MISMATCH"
        if verdict == "MISMATCH" and case in pissa_checks and not problems:
            # PEFT's f32 SVD is off where σ_r and σ_r+1 nearly meet: judged by the f64 one.
            kit_err = pissa_checks[case][1][1]["lorakit"][0]
            verdict = "OK against an f64 SVD" if kit_err <= tol else verdict
        say(f"- {case[0]} {case[2]}: {verdict} — {same}/{total} tensors bit-identical "
            f"({differ}/{entries} entries differ), worst {worst:.2e}"
            + (f" ({name})" if name else "") + f", tolerance {tol:g}" + (f"; {'; '.join(problems)}" if problems else ""))
        if case in pissa_checks:
            key, (gap, sides, n) = pissa_checks[case]
            say(f"  - `{key}` against the merge from an f64 SVD, rounded as PEFT rounds "
                f"((σ_r − σ_r+1) / σ_1 = {gap:.1e}): " + "; ".join(
                    f"{side} {err:.2e} ({differ}/{n} entries differ)" for side, (err, differ) in sides.items()))
    shutil.rmtree(outdir, ignore_errors=True)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
