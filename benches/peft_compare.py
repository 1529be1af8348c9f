#!/usr/bin/env python3
"""Side-by-side timings: Hugging Face PEFT on PyTorch's CPU vs lorakit, same shapes, same
thread count, f32, medians in ms. The input needs a gradient in every case (as inside a
model); fwd+bwd is `y.sum().backward()`.

Two tables: the fused LoRA kernel against PEFT's LoRA and the base linear (the shapes of
`benches/fused.rs`), and whole adapted layers of each variant (the cases of
`benches/variant_cases`: one training step at n = 512, d = 1024 with r = 16, VeRA at
r = 256; one-row evaluation at d = 2048). PEFT has no LoRA-FA layer (only an optimizer).

    python3 benches/peft_compare.py [--threads 2] [--rounds 3] [--markdown benches/RESULTS.md]

With --rounds N each case reports the median of its N per-round medians. A round times
the two sides side by side: each group of cases (a kind and shape of the fused table, or one
variant's layer) on PEFT's side and then on lorakit's (the order alternating by round), so
that both sides of a ratio meet about the same moments of a shared machine. The lorakit side
stays up through a round (`compare_json --serve`: its cases set up once, each timed when
asked). --chunks N splits each side's time on a group into N turns, the sides taking turns
(the order flipping every turn), each turn timing 1/N of every case's budget after one
warm-up call; a case's median and minimum are then over all its turns' calls, so the two
sides of a ratio meet the host's busy moments more evenly than with one turn each (the
default). --sequential times each side's cases all in turn instead (one lorakit process per
round, then PyTorch's side), the form of every run up to be93e5c (the last one 2026-12-06
21:49 UTC). Both forms set every case up before timing any (as of eb08613): the cases and
their seeds are as before, but the layers drawn after a dropout case's timing (PyTorch's
generator) now get other, still fixed, random values.
A line under the tables counts, per side and round, the cases whose median was over 1.25 ×
their minimum in that round (calls spread by a busy host), with each round's FMA peak; the
next says whether the run meets issue #19's target (every LoRA, DoRA and VeRA case at
<= 0.9 × PEFT's median) and names the cases over it, or the slowest.

The lorakit side is `cargo bench --bench compare_json` (with `-- --serve` in paired
rounds), run with RAYON_NUM_THREADS set to the same thread count. It calls
`lorakit::threads::park_idle_elementwise_workers` first, as a training program should;
`CANDLE_BARRIER_POOL_SPIN_LIMIT=25000` in the environment times candle's default instead.
It times every case on one of rayon's workers (`lorakit::threads::on_worker`), as a
training or decoding loop runs.

Each round also measures the CPU's f32 FMA peak (`examples/fma_peak.rs`), and a last table
sets the n = 512 cases against it: how close PyTorch's products run to the peak, and how
close lorakit's would have to run for 0.9 × PEFT's time.

--lorakit-features default openblas (any list of cargo feature sets, `default` for none)
runs the lorakit side once per feature set in every round and adds a table of the fused
cases side by side, one column per backend. `amx` there is no cargo feature but the
default build run with `LORAKIT_CPU_AMX=1` (large f32 products on Intel AMX tiles, where
the CPU has them; the route is opt-in), and `nopacked` the default build run with
`LORAKIT_PACKED_PRODUCTS=0` (large f32 products on the `gemm` crate and the chunked route
instead of lorakit's own AVX-512 packing and register block).

Page faults per training step (fused forward + backward + AdamW at n = 512, d = 1024 and
2048, r = 16, steps 1..30 of a fresh process; `cargo bench --bench step_faults`, with and
without `lorakit::memory::retain_freed_buffers`) are printed with PEFT's (the same step in
a fresh Python process: PEFT LoRA layer, `torch.optim.AdamW`), unless --no-faults.

The "fwd" rows of the small batches (n <= EVAL_MAX_ROWS, decoding) time evaluation on both
sides: PEFT's model in eval() under torch.no_grad() on an input without gradient, lorakit's
`LoraLinear::forward_t(x, false)` (the layer API) on an input without gradient tracking.
Every output names the CPU model, its vector extensions and the thread count.
"""
import argparse
import datetime
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from peft import LoraConfig, VeraConfig, get_peft_model

SHAPES = [(512, 1024, 16), (512, 2048, 16), (16, 2048, 16), (1, 2048, 16)]
VARIANT_TRAIN = (512, 1024, 16)
VERA_R = 256
VARIANT_EVAL = (2048, 16)
EVAL_MAX_ROWS = 16  # as benches/common/mod.rs
VECTOR_FLAGS = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile"]


def cpu_info(threads):
    """The CPU model, its vector extensions (of VECTOR_FLAGS) and the thread count."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "vector": [v for v in VECTOR_FLAGS if v in flags], "threads": threads, "logical_cpus": os.cpu_count()}
TRAIN_VARIANTS = ["lora", "lora_dropout", "dora", "lora_fa", "vera", "lora_r8"]
# PEFT's default LoRA rank (LoraConfig.r), the lora_r8 case's (`benches/variant_cases`' DEFAULT_R).
DEFAULT_R = 8
# The cases whose rank is not the shapes' `r`: VeRA's default and PEFT's default LoRA rank.
CASE_RANKS = {"vera": VERA_R, "lora_r8": DEFAULT_R}
EVAL_VARIANTS = ["base", "lora", "dora"]


class Portion:
    """How much of a case's time budget one timing takes, and the calls around it: the
    whole budget after 3 warm-up calls, at least 5 and at most 200 timed calls (`WHOLE`);
    or `of(share)` of it after one warm-up call, at least 2 and at most that share of the
    200, rounded up (a chunk of `--chunks`). `compare_json`'s `Portion` times lorakit's side the same
    way."""

    def __init__(self, share, warmup, least, most):
        self.share, self.warmup, self.least, self.most = share, warmup, least, most

    @classmethod
    def of(cls, share):
        return cls(share, 1, 2, max(2, math.ceil(200 * share)))


Portion.WHOLE = Portion(1.0, 3, 5, 200)

# The most turns --chunks takes: past it a turn's least calls (2) would take each case past
# its 200 calls and its budget.
MAX_CHUNKS = 100


def call_times(f, budget_s, portion):
    """The wall times of `f`'s calls in ms, after warm-up, over about `portion` of
    `budget_s`."""
    for _ in range(portion.warmup):
        f()
    times = []
    start = time.perf_counter()
    budget_s *= portion.share
    while len(times) < portion.least or (time.perf_counter() - start < budget_s and len(times) < portion.most):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def median_ms(f, budget_s, portion):
    """`[median_ms, min_ms]` of `f`'s calls over `budget_s` (`call_times`) for the whole
    portion; for a chunk's share, the calls' times themselves, which the round summarizes
    (as `compare_json --serve` answers the two kinds of request)."""
    times = call_times(f, budget_s, portion)
    if portion is not Portion.WHOLE:
        return times
    return [statistics.median(times), min(times)]


class Net(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x)


def time_train_step(model, x, portion):
    """`median_ms` of a training step's forward and backward over `portion` of its budget:
    the gradients set to none, `model(x).sum().backward()`."""

    def step():
        x.grad = None
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    return median_ms(step, 2.5, portion)


def torch_cases():
    """PEFT's side, set up: `(name, time_it)` per case, where `time_it(portion)` times the
    case over that portion of its budget and returns what `median_ms` does."""
    cases = []
    for n, d, r in SHAPES:
        label = f"n{n}_d{d}_r{r}"
        torch.manual_seed(0)
        x = torch.rand(n, d, requires_grad=True)
        base = Net(d)
        for p in base.parameters():
            p.requires_grad_(False)
        peft = get_peft_model(Net(d), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], init_lora_weights=False))
        for name, model in [("base_linear", base), ("lora_peft", peft)]:
            if n <= EVAL_MAX_ROWS:

                def fwd(portion, model=model, x_eval=x.detach()):
                    def ev():
                        with torch.no_grad():
                            return model(x_eval)

                    model.eval()
                    try:
                        return median_ms(ev, 1.5, portion)
                    finally:
                        model.train()
            else:

                def fwd(portion, model=model, x=x):
                    return median_ms(lambda: model(x), 1.5, portion)

            fb = lambda portion, model=model, x=x: time_train_step(model, x, portion)
            cases += [(f"fwd/{label}/{name}", fwd), (f"fwd_bwd/{label}/{name}", fb)]
    return cases


def peft_layer(d, name, r):
    """One PEFT-adapted `d × d` linear layer, its trainable tensors non-zero."""
    cfg = {
        "lora": LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]),
        "lora_dropout": LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=["0"]),
        "dora": LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=True),
        "vera": VeraConfig(r=VERA_R, target_modules=["0"]),
        "lora_r8": LoraConfig(r=DEFAULT_R, lora_alpha=2 * DEFAULT_R, target_modules=["0"]),
    }[name]
    layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(d, d)), cfg).base_model.model[0]
    for p in layer.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return layer


def torch_variant_cases():
    """PEFT's whole adapted layers, set up, as `torch_cases`."""
    cases = []
    n, d, r = VARIANT_TRAIN
    torch.manual_seed(0)
    x = torch.rand(n, d, requires_grad=True)
    for name in ["lora", "lora_dropout", "dora", "vera", "lora_r8"]:
        layer = peft_layer(d, name, r).train()  # dropout on (lora_dropout's case)

        fb = lambda portion, layer=layer, x=x: time_train_step(layer, x, portion)
        cases.append((f"variants/fwd_bwd_n{n}_d{d}/{name}", fb))
    d, r = VARIANT_EVAL
    x = torch.rand(1, d)
    with torch.no_grad():
        layers = [("base", torch.nn.Linear(d, d))] + [(name, peft_layer(d, name, r).eval()) for name in ["lora", "dora"]]
    for name, layer in layers:

        def ev(portion, layer=layer, x=x):
            with torch.no_grad():
                return median_ms(lambda: layer(x), 1.5, portion)

        cases.append((f"variants/eval_n1_d{d}/{name}", ev))
    return cases


def cell(v):
    """A (median, min) pair, or a dash where one side has no such case."""
    return f"{v[0]:.3f} ({v[1]:.3f})" if v else "–"


def ratio(a, b):
    """Ratio of medians (of minima), or a dash."""
    return f"{a[0] / b[0]:.2f} ({a[1] / b[1]:.2f})" if a and b else "–"


def variant_cases():
    """(prefix, name, label) of each variant case in the variants table's order: the prefix
    names its group (a training step, a one-row evaluation), the label is its row there."""
    n, d, r = VARIANT_TRAIN
    de, _ = VARIANT_EVAL
    groups = [(f"variants/fwd_bwd_n{n}_d{d}", TRAIN_VARIANTS), (f"variants/eval_n1_d{de}", EVAL_VARIANTS)]
    for prefix, names in groups:
        for name in names:
            rank = CASE_RANKS.get(name, r)
            shown = name.removesuffix(f"_r{rank}")
            yield prefix, name, f"{prefix.split('/')[1]}/{shown}" + ("" if name == "base" else f"_r{rank}")


def variants_table(t, k):
    lines = [
        "| case | PEFT | lorakit | lorakit / PEFT | / LoRA, PEFT | / LoRA, lorakit |",
        "|---|---|---|---|---|---|",
    ]
    for prefix, name, label in variant_cases():
        kc, tc = k[f"{prefix}/{name}"], t.get(f"{prefix}/{name}")
        kl, tl = k[f"{prefix}/lora"], t[f"{prefix}/lora"]
        lines.append(
            f"| {label} | {cell(tc)} | {cell(kc)} | {ratio(kc, tc)} | {ratio(tc, tl)} | {ratio(kc, kl)} |"
        )
    return "\n".join(lines)


TARGET = 0.9  # issue #19: every LoRA, DoRA and VeRA case at or under this × PEFT's median


def adapter_cases(t, k):
    """(label, lorakit, PEFT) of every case that sets a LoRA, DoRA or VeRA layer or op against
    PEFT's: the fused op against PEFT's LoRA layer in every kind and shape, and each variant
    that PEFT has (not LoRA-FA, a PEFT optimizer only; not the base layer alone)."""
    for kind in ["fwd", "fwd_bwd"]:
        for n, d, r in SHAPES:
            label = f"{kind}/n{n}_d{d}_r{r}"
            yield label, k[f"{label}/lora_fused"], t[f"{label}/lora_peft"]
    for prefix, name, label in variant_cases():
        if name != "base" and f"{prefix}/{name}" in t:
            yield label, k[f"{prefix}/{name}"], t[f"{prefix}/{name}"]


def target_line(t, k):
    """Whether the run meets issue #19's target, every LoRA, DoRA and VeRA case at
    <= TARGET × PEFT's median; naming the cases over it (with their ratio of minima), or the
    slowest case when none is."""
    ratios = sorted(((kc[0] / tc[0], kc[1] / tc[1], label) for label, kc, tc in adapter_cases(t, k)), reverse=True)
    over = [f"{label} {m:.3f} ({lo:.3f})" for m, lo, label in ratios if m > TARGET]
    head = f"Target (every LoRA, DoRA and VeRA case at <= {TARGET} x PEFT's median, {len(ratios)} cases): "
    if over:
        return head + f"not met in this run: {len(over)} over it, " + ", ".join(over) + " (ratio of medians (of minima))."
    m, lo, label = ratios[0]
    return head + f"met in this run; the slowest, {label}, at {m:.3f} ({lo:.3f})."


# Runtime settings that --lorakit-features takes as if they were feature sets: the
# default build with these environment variables.
RUNTIME_SETS = {"amx": {"LORAKIT_CPU_AMX": "1"}, "nopacked": {"LORAKIT_PACKED_PRODUCTS": "0"}}


def lorakit_bench(threads, features, bench, *args):
    """`cargo bench --bench <bench>` for one feature set (or runtime set) on `threads`
    threads, `args` passed to the bench: `(command, cwd, env)` for `subprocess`."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), **RUNTIME_SETS.get(features, {}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    feats = [] if features == "default" or features in RUNTIME_SETS else ["--features", features]
    return ["cargo", "bench", "--bench", bench, *feats, *(["--", *args] if args else [])], root, env


def note_routes(features, line):
    """Keeps the lorakit side's `lorakit kernels:` line for the machine line."""
    if line.startswith(ROUTES_PREFIX):
        LORAKIT_ROUTES[features] = line[len(ROUTES_PREFIX):].strip()


def lorakit_cases(threads, features="default", bench="compare_json"):
    cmd, root, env = lorakit_bench(threads, features, bench)
    proc = subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    for line in lines:
        note_routes(features, line)
    return json.loads(lines[-1])


class LorakitServer:
    """`compare_json --serve` for one feature set: its cases set up in a child process,
    each timed when asked (`time`)."""

    def __init__(self, threads, features="default"):
        cmd, root, env = lorakit_bench(threads, features, "compare_json", "--serve")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )
        line = self._line()
        while not line.startswith("["):
            note_routes(features, line)
            line = self._line()
        self.names = json.loads(line)

    def _line(self):
        line = self.proc.stdout.readline()
        if not line:
            self._ended()
        return line

    def _ended(self):
        """Exits with the end of the server's stderr: it stopped before it was done."""
        self.proc.wait()
        self.stderr.seek(0)
        sys.exit(f"compare_json --serve ended early:\n{self.stderr.read()[-4000:]}")

    def time(self, name, portion):
        """`[median_ms, min_ms]` of the case `name`, timed now over its whole budget; for a
        chunk's share (a `portion` other than the whole), its calls' times over that share."""
        request = name if portion is Portion.WHOLE else f"{name} {portion.share!r}"
        try:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        except OSError:  # the server has ended: its own error is in its stderr
            self._ended()
        line = self._line()
        while not line.startswith("{"):  # anything else the server printed
            line = self._line()
        answer = json.loads(line)
        if "error" in answer:
            sys.exit(f"compare_json --serve: {answer['error']}")
        return answer[name]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()


def pair_key(name):
    """The cases timed side by side: a variant's case on its own, the fused table's cases
    by kind and shape (PEFT's base and LoRA with lorakit's base, composed and fused)."""
    return name if name.startswith("variants/") else name.rsplit("/", 1)[0]


# Seconds between one side's cases and the other's, for the first side's threads to stop
# spinning (PyTorch's OpenMP team, rayon's and candle's workers) before the second starts.
SIDE_PAUSE_S = 0.05


ROUND_KINDS = {
    False: "paired (each group of cases timed on PEFT's side and then on lorakit's, the side that goes first alternating by round)",
    True: "sequential (each side's cases all in turn, the sides alternating)",
}


def paired_round(threads, feats, peft_first, chunks=1):
    """One round with the two sides side by side: per `pair_key` group, PEFT's cases and
    each lorakit feature set's, in turn (PEFT first when `peft_first`, else last). With
    `chunks` > 1 the sides take turns that many times per group, each turn timing a
    `1 / chunks` share of every case's budget (the order flipping every turn), and each
    case's median and minimum are over all its turns' calls. Returns `(PEFT's results,
    {feature set: its results})`."""
    servers = {f: LorakitServer(threads, f) for f in feats}
    # Per group, per side ("peft" or a feature set), the side's cases as (name, timer).
    groups = {}

    def add(side, name, time_it):
        groups.setdefault(pair_key(name), {}).setdefault(side, []).append((name, time_it))

    for f, server in servers.items():
        for name in server.names:
            add(f, name, functools.partial(server.time, name))
    for name, time_it in torch_cases() + torch_variant_cases():
        add("peft", name, time_it)
    results = {side: {} for side in ["peft", *feats]}
    order = ["peft", *feats] if peft_first else [*feats, "peft"]
    portion = Portion.WHOLE if chunks == 1 else Portion.of(1 / chunks)
    for group in groups.values():
        calls = {}
        for chunk in range(chunks):
            for side in order if chunk % 2 == 0 else order[::-1]:
                time.sleep(SIDE_PAUSE_S)
                for name, time_it in group.get(side, []):
                    if chunks == 1:
                        results[side][name] = time_it(portion)
                    else:
                        calls.setdefault((side, name), []).extend(time_it(portion))
        for (side, name), times in calls.items():
            results[side][name] = [statistics.median(times), min(times)]
    for server in servers.values():
        server.close()
    return results.pop("peft"), results


# What lorakit's kernels read off the CPU (`lorakit::kernels::CpuReport`), as the
# lorakit side printed it, per feature set.
ROUTES_PREFIX = "lorakit kernels:"
LORAKIT_ROUTES = {}


FAULT_STEPS = 30


def torch_step_faults(d):
    """Child process: PEFT LoRA training steps at n = 512, r = 16 (forward, sum, backward,
    AdamW), minor faults and ms per step, as one JSON line."""
    torch.manual_seed(0)
    x = torch.rand(512, d, requires_grad=True)
    model = get_peft_model(Net(d), LoraConfig(r=16, lora_alpha=32, target_modules=["lin"], init_lora_weights=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    faults, ms = [], []
    for _ in range(FAULT_STEPS):
        f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        x.grad = None
        opt.zero_grad(set_to_none=True)
        model(x).sum().backward()
        opt.step()
        ms.append((time.perf_counter() - t) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"faults": faults, "ms": ms}))


def fault_cases(threads, features):
    """Faults per step: lorakit (per feature set) and PEFT, each case in a fresh process."""
    out = {f: lorakit_cases(threads, f, "step_faults") for f in features}
    for d in (1024, 2048):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--torch-faults", str(d)],
            check=True, capture_output=True, text=True,
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        f, m = r["faults"], r["ms"]
        out.setdefault("peft", {})[f"step_faults/n512_d{d}_r16/peft"] = {
            "faults": f, "first": f[0], "first5": sum(f[:5]) / 5, "steady": statistics.median(f[10:]),
            "ms": m, "first_ms": m[0], "steady_ms": statistics.median(m[10:]),
        }
    return out


def faults_table(faults):
    lines = [
        "Minor page faults per training step (fused fwd + bwd + AdamW, n = 512, r = 16, f32), "
        f"fresh process, steps 1..{FAULT_STEPS}: step 1, mean of steps 1-5, median of steps 11-{FAULT_STEPS}; "
        "ms of step 1 and median ms of steps 11-30.",
        "",
        "| case | side | faults step 1 | faults 1-5 | faults steady | ms step 1 | ms steady |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, cases in faults.items():
        for case, v in cases.items():
            _, label, mode = case.split("/")
            name = "PEFT" if side == "peft" else f"lorakit {side}, {mode}"
            fmt = lambda x: "–" if x is None else f"{x:.0f}"
            lines.append(
                f"| {label} | {name} | {fmt(v['first'])} | {fmt(v['first5'])} | {fmt(v['steady'])} "
                f"| {v['first_ms']:.2f} | {v['steady_ms']:.2f} |"
            )
    return "\n".join(lines)


def backends_table(t, kb):
    """The fused LoRA cases, one lorakit column per feature set, against PEFT."""
    names = list(kb)
    head = " | ".join(f"lorakit fused ({n})" for n in names)
    ratios = " | ".join(f"{n} / PEFT" for n in names)
    lines = [
        f"| case | PEFT LoRA | {head} | {ratios} |",
        "|---|---|" + "---|" * (2 * len(names)),
    ]
    for kind in ["fwd", "fwd_bwd"]:
        for n, d, r in SHAPES:
            label = f"{kind}/n{n}_d{d}_r{r}"
            pl = t[f"{label}/lora_peft"]
            ks = [kb[b][f"{label}/lora_fused"] for b in names]
            lines.append(f"| {label} | {cell(pl)} | " + " | ".join(cell(k) for k in ks) + " | "
                         + " | ".join(ratio(k, pl) for k in ks) + " |")
    lines.append(f"| variants/fwd_bwd/lora | {cell(t['variants/fwd_bwd_n512_d1024/lora'])} | "
                 + " | ".join(cell(kb[b]["variants/fwd_bwd_n512_d1024/lora"]) for b in names) + " | "
                 + " | ".join(ratio(kb[b]["variants/fwd_bwd_n512_d1024/lora"], t["variants/fwd_bwd_n512_d1024/lora"]) for b in names) + " |")
    return "\n".join(lines)


def fma_peak(threads):
    """The CPU's measured f32 FMA peak (`examples/fma_peak.rs`), a dict with `gflops`
    (`threads` threads), `gflops_one_thread` and `isa`; None where it cannot run."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        ["cargo", "run", "--release", "--quiet", "--example", "fma_peak", "--", "--threads", str(threads)],
        cwd=root, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gemm_bound_flops(kind, n, d, r):
    """Floating-point operations of one case, `(base, with the low-rank term)`: the base
    products (`x Wᵀ`, and `g W` for the input's gradient; no weight gradient) and the
    low-rank ones (forward `x Aᵀ`, `(x Aᵀ) Bᵀ`; backward `g B`, `(g B) A`, `dA`, `dB`)."""
    base = 2 * n * d * d * (1 if kind == "fwd" else 2)
    low_rank = 4 * n * r * d * (1 if kind == "fwd" else 3)
    return base, base + low_rank


def peak_table(t, k, peak):
    """The n = 512 cases against the FMA peak: how fast PyTorch's base and PEFT's LoRA
    ran, how fast lorakit ran, and how fast lorakit would have to run for 0.9 × PEFT."""
    g = peak["gflops"]
    lines = [
        f"Against the CPU's f32 FMA peak, {g:.0f} GFLOP/s on {peak['threads']} threads "
        f"({peak['isa']}; {peak['gflops_one_thread']:.0f} on one; `examples/fma_peak.rs`, median over rounds): "
        "GFLOP/s of each case's products (medians) and their share of the peak.",
        "",
        "| case | PEFT base | PEFT LoRA | lorakit fused | lorakit at 0.9 × PEFT LoRA's time would need |",
        "|---|---|---|---|---|",
    ]
    for kind in ["fwd", "fwd_bwd"]:
        for n, d, r in SHAPES:
            if n <= EVAL_MAX_ROWS:
                continue
            label = f"{kind}/n{n}_d{d}_r{r}"
            base_flops, flops = gemm_bound_flops(kind, n, d, r)
            rate = lambda fl, ms: fl / (ms * 1e-3) / 1e9
            pb = rate(base_flops, t[f"{label}/base_linear"][0])
            pl = rate(flops, t[f"{label}/lora_peft"][0])
            kf = rate(flops, k[f"{label}/lora_fused"][0])
            need = rate(flops, 0.9 * t[f"{label}/lora_peft"][0])
            cells = " | ".join(f"{v:.0f} ({v / g:.0%})" for v in [pb, pl, kf, need])
            lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


DISTURBED = 1.25  # a round's median over this many times its minimum: calls spread by the host


def disturbed_counts(rounds):
    """Per round, how many cases had their median over DISTURBED × their minimum in that round:
    the calls of a case spread that far apart when the host took the CPU for part of them."""
    return [sum(1 for m, lo in r.values() if m > DISTURBED * lo) for r in rounds]


def disturbance_line(ts, ks, peaks):
    """One line naming each side's disturbed cases per round (`disturbed_counts`) and each
    round's measured FMA peak, for judging how far a run's medians can be trusted."""
    sides = [("PEFT", ts)] + [(f"lorakit[{f}]", rs) for f, rs in ks.items()]
    parts = [f"{name} {', '.join(map(str, disturbed_counts(rs)))} of {len(rs[0])}" for name, rs in sides]
    line = (
        f"Cases per round whose median was over {DISTURBED} × their minimum in that round "
        + "(calls spread by a busy host): "
        + "; ".join(parts)
    )
    if all(peaks):
        line += "; FMA peak per round " + ", ".join(f"{p['gflops']:.0f}" for p in peaks) + " GFLOP/s"
    return line + "."


def combine(rounds):
    """(median over rounds of the medians, min over rounds of the minima)."""
    return statistics.median(m for m, _ in rounds), min(lo for _, lo in rounds)


def candle_spin_limit():
    """The spin limit of candle's element-wise workers on the lorakit side: the caller's
    CANDLE_BARRIER_POOL_SPIN_LIMIT, else the 200 that `compare_json` sets through
    `lorakit::threads::park_idle_elementwise_workers`."""
    if "CANDLE_BARRIER_POOL_SPIN_LIMIT" in os.environ:  # kept as set (candle ignores a value it cannot parse)
        return repr(os.environ["CANDLE_BARRIER_POOL_SPIN_LIMIT"])
    return "200 (park_idle_elementwise_workers)"


def table(t, k, threads):
    cpu = cpu_info(threads)
    lines = [
        f"Machine: {cpu['model']} ({', '.join(cpu['vector']) or 'no vector extensions listed'}), "
        f"{cpu['logical_cpus']} logical CPUs; "
        f"threads: {threads} (torch.set_num_threads / RAYON_NUM_THREADS); "
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}"
        + (f"; OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}" if os.environ.get("OPENBLAS_CORETYPE") else "")
        + f"; lorakit's candle element-wise spin limit {candle_spin_limit()}"
        + "".join(f"; lorakit[{f}] kernels: {r}" for f, r in LORAKIT_ROUTES.items())
        + ".",
        "",
        "Each cell: median (min) in ms; ratios of medians (of minima). The fwd rows at "
        f"n <= {EVAL_MAX_ROWS} are evaluation (no gradient tracking on either side; lorakit through LoraLinear).",
        "",
        "| case | PEFT base | PEFT LoRA | lorakit base | lorakit composed | lorakit fused | fused / PEFT LoRA | fused / lorakit base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ["fwd", "fwd_bwd"]:
        for n, d, r in SHAPES:
            label = f"{kind}/n{n}_d{d}_r{r}"
            pb, pl = t[f"{label}/base_linear"], t[f"{label}/lora_peft"]
            kb, kc, kf = (k[f"{label}/{p}"] for p in ["base_linear", "lora_composed", "lora_fused"])
            cells = " | ".join(f"{m:.3f} ({lo:.3f})" for m, lo in [pb, pl, kb, kc, kf])
            ratios = " | ".join(f"{kf[0] / o[0]:.2f} ({kf[1] / o[1]:.2f})" for o in [pl, kb])
            lines.append(f"| {label} | {cells} | {ratios} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--lorakit-features", nargs="+", default=["default"],
                    help="cargo feature sets for the lorakit side, one run each per round (`default`: none)")
    ap.add_argument("--no-faults", action="store_true", help="skip the page-faults-per-step measurement")
    ap.add_argument("--chunks", type=int, default=1,
                    help="in a paired round, the turns each side takes per group of cases, each "
                    "timing that share of every case's budget (default 1: one turn each)")
    ap.add_argument("--sequential", action="store_true",
                    help="time each side's cases all in turn per round (lorakit first), not side by side per group of cases")
    ap.add_argument("--torch-faults", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 1 <= args.chunks <= MAX_CHUNKS or (args.chunks > 1 and args.sequential):
        ap.error(f"--chunks takes a whole number from 1 to {MAX_CHUNKS}, and only in paired rounds (not with --sequential)")
    torch.set_num_threads(args.threads)
    if args.torch_faults:
        return torch_step_faults(args.torch_faults)
    feats = args.lorakit_features
    ks, ts, peaks = {f: [] for f in feats}, [], []
    for i in range(args.rounds):
        if args.sequential:
            for f in feats:
                ks[f].append(lorakit_cases(args.threads, f))
            ts.append({name: time_it(Portion.WHOLE) for name, time_it in torch_cases() + torch_variant_cases()})
        else:
            t_round, k_round = paired_round(args.threads, feats, peft_first=i % 2 == 0, chunks=args.chunks)
            ts.append(t_round)
            for f in feats:
                ks[f].append(k_round[f])
        peaks.append(fma_peak(args.threads))
        print(json.dumps({"peft": ts[-1], **{f"lorakit[{f}]": ks[f][-1] for f in feats}, "cpu": cpu_info(args.threads)}), flush=True)
    kb = {f: {c: combine([r[c] for r in rs]) for c in rs[0]} for f, rs in ks.items()}
    k = kb[feats[0]]
    t = {c: combine([r[c] for r in ts]) for c in ts[0]}
    md = (
        table(t, k, args.threads)
        + "\n\nVariants (whole adapted layers):\n\n"
        + variants_table(t, k)
        + f"\n\nMedian of {args.rounds} {ROUND_KINDS[args.sequential]} round(s) of per-case medians"
        + (f" (each group in {args.chunks} turns a side, each case's median over all its turns' calls)" if args.chunks > 1 else "")
        + ". "
        + disturbance_line(ts, ks, peaks)
        + "\n\n"
        + target_line(t, k)
    )
    if all(peaks):
        peak = {**peaks[0], **{key: statistics.median(p[key] for p in peaks) for key in ["gflops", "gflops_one_thread"]}}
        md += "\n\n" + peak_table(t, k, peak)
    if len(feats) > 1:
        md += f"\n\nBackends (lorakit feature sets; the tables above are `{feats[0]}`):\n\n" + backends_table(t, kb)
    if not args.no_faults:
        faults = fault_cases(args.threads, feats)
        print(json.dumps({"step_faults": faults}), flush=True)
        md += "\n\n" + faults_table(faults)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Fused kernel benchmarks (ms, f32, CPU)\n\n" + md + "\n")


if __name__ == "__main__":
    main()
