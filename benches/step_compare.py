"""The driver `gpt2_compare.py` and `bert_compare.py` share: one training step of a model
that transformers writes, timed in fresh processes on both sides (a lorakit example and
PyTorch + PEFT), rounds alternating which side goes first; the table prints the median over
rounds of each process's median step, with the range over rounds."""
import argparse, json, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from merge_compare import cpu_name  # noqa: E402 (the benches share it)


def timed_steps(step, steps, warmup):
    """The median ms of `steps` calls of `step` after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        step()
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(doc, example, write_model, torch_step_ms, case, describe, lorakit_args=()):
    """Parses the shared flags; as the PyTorch child, prints `torch_step_ms(dir, threads,
    steps, warmup)`; else builds `examples/{example}.rs` (unless `--lorakit-bin`), writes
    the model with `write_model(dir, layers, hidden)` and prints the table for `case`,
    `describe(args)` saying what was run."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child-torch", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--lorakit-bin", help=f"a built examples/{example} (default: build it)")
    args = ap.parse_args()
    if args.child_torch:
        ms = torch_step_ms(args.child_torch, args.threads, args.steps, args.warmup)
        print(json.dumps({"step_ms_median": ms}))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = args.lorakit_bin
    if binary is None:
        subprocess.run(["cargo", "build", "--release", "--example", example], cwd=root, check=True)
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
        binary = os.path.join(target, "release", "examples", example)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               RAYON_NUM_THREADS=str(args.threads), CANDLE_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    common = ["--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    with tempfile.TemporaryDirectory() as dir:
        write_model(dir, args.layers, args.hidden)
        sides = {
            "lorakit": [binary, "--model", dir, *common, *lorakit_args],
            "PyTorch": [sys.executable, os.path.abspath(sys.argv[0]), "--child-torch", dir, *common],
        }
        results = {k: [] for k in sides}
        for rnd in range(args.rounds):
            order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
            for side in order:
                out = subprocess.run(sides[side], env=env, check=True, capture_output=True, text=True).stdout
                ms = json.loads(out.strip().splitlines()[-1])["step_ms_median"]
                results[side].append(ms)
                print(f"- round {rnd + 1} {side}: {ms:.1f} ms", file=sys.stderr, flush=True)
    k, t = statistics.median(results["lorakit"]), statistics.median(results["PyTorch"])
    print(f"- CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; threads: {args.threads}; "
          f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- {describe(args)}; {args.rounds} alternating rounds of {args.warmup} + {args.steps} steps")
    print()
    print("| training step (ms, median over rounds) | lorakit | PyTorch + PEFT | lorakit / PyTorch (time) |")
    print("|---|---|---|---|")
    rng = lambda v: f"{min(v):.1f}–{max(v):.1f}"
    print(f"| {case} | {k:.1f} ({rng(results['lorakit'])}) | {t:.1f} ({rng(results['PyTorch'])}) | {k / t:.2f} |")
