#!/usr/bin/env python3
"""LoRA fine-tuning speed on a GPT-2 model, side by side in one run: lorakit
(`examples/gpt2_speed.rs`) against PyTorch + transformers + PEFT.

The model: a GPT-2 written by transformers with random weights (default 4 layers, hidden
512, 8 heads, vocab 8000, 256 positions; f32), a fresh LoRA r = 16, alpha = 32, no dropout
on c_attn, c_proj and c_fc (PEFT with fan_in_fan_out=True, GPT-2's Conv1D layout). Per
step, at the level a user calls: PyTorch `model(input_ids=ids, labels=ids).loss`,
`backward()`, `AdamW.step()`, `zero_grad(set_to_none=True)`; lorakit
`Gpt2LmHeadModel::loss_sum` over the predicted positions, `backward`, `candle_nn::AdamW`.
Batch 4 x 256 ids; the same thread count on both sides. Rounds alternate the order;
cells are the median over rounds of each process's median step.

    python3 benches/gpt2_compare.py [--rounds 3] [--threads 2] [--steps 12]
        [--layers 4] [--hidden 512] [--lorakit-bin PATH]
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from merge_compare import cpu_name  # noqa: E402 (the benches share it)


def write_model(dir, layers, hidden):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=hidden // 64, vocab_size=8000,
                        n_positions=256, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(dir)


def torch_step_ms(dir, threads, steps, warmup):
    import torch
    from transformers import GPT2LMHeadModel
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(threads)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(dir), LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = (torch.arange(4 * 256) * 7919 % model.config.vocab_size).reshape(4, 256)
    times = []
    for step in range(warmup + steps):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child-torch", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--lorakit-bin", help="a built examples/gpt2_speed (default: build it)")
    args = ap.parse_args()
    if args.child_torch:
        print(json.dumps({"step_ms_median": torch_step_ms(args.child_torch, args.threads, args.steps, args.warmup)}))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = args.lorakit_bin
    if binary is None:
        subprocess.run(["cargo", "build", "--release", "--example", "gpt2_speed"], cwd=root, check=True)
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
        binary = os.path.join(target, "release", "examples", "gpt2_speed")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               RAYON_NUM_THREADS=str(args.threads), CANDLE_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as dir:
        write_model(dir, args.layers, args.hidden)
        sides = {
            "lorakit": [binary, "--model", dir, "--threads", str(args.threads), "--steps", str(args.steps),
                        "--warmup", str(args.warmup)],
            "PyTorch": [sys.executable, os.path.abspath(__file__), "--child-torch", dir, "--threads",
                        str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)],
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
    print(f"- GPT-2 {args.layers} layers, hidden {args.hidden}, vocab 8000, f32; LoRA r=16 on c_attn, c_proj, c_fc; "
          f"batch 4 x 256; {args.rounds} alternating rounds of {args.warmup} + {args.steps} steps")
    print()
    print("| training step (ms, median over rounds) | lorakit | PyTorch + PEFT | lorakit / PyTorch (time) |")
    print("|---|---|---|---|")
    rng = lambda v: f"{min(v):.1f}–{max(v):.1f}"
    print(f"| GPT-2 LoRA step | {k:.1f} ({rng(results['lorakit'])}) | {t:.1f} ({rng(results['PyTorch'])}) | {k / t:.2f} |")


if __name__ == "__main__":
    main()
