#!/usr/bin/env python3
"""LoRA fine-tuning and generation speed on a Llama-shaped model, side by side in one run:
lorakit (`examples/llama_speed.rs`) against PyTorch + transformers + PEFT.

The shape (both sides): 4 layers, hidden 512, 8 heads, 4 KV heads, MLP 1408, vocab 8000
(untied head), RMSNorm eps 1e-6, RoPE theta 10000; random base weights; a fresh LoRA with
r = 16, alpha = 32, no dropout on q/k/v/o/gate/up/down_proj (B = 0); f32; the same thread
count on both sides (`torch.set_num_threads`; `--threads` of the example, which sets
`RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS`).

- Training, per step, at the API level a user calls: PyTorch `model(input_ids=ids,
  labels=ids)` (transformers shifts the labels; mean cross-entropy over the 4 x 255
  predicted positions), `loss.backward()`, `AdamW.step()` over the trainable parameters
  (lr 1e-4, defaults otherwise), `zero_grad(set_to_none=True)`; lorakit
  `model.loss_sum(ids, mask)` (the same shifted cross-entropy, the frozen head fused with it)
  over the count, `loss.backward()`, `candle_nn::AdamW::step`. Batch 4 x 256
  random ids; tokens/s = 1024 / median step time.
- Generation: batch 1, an 8-token random prompt, 128 new tokens, greedy, KV cache on
  (transformers' default dynamic cache; lorakit's `generate_greedy`), adapter unmerged,
  eval mode; PyTorch `model.generate(..., do_sample=False, min_new_tokens=N,
  max_new_tokens=N)` under `torch.no_grad()`. tokens/s = new tokens / wall time of the
  call (prefill of the prompt included on both sides). Then the same in a batch: random
  prompts of 8, 16, 24 and 32 tokens left-padded into one (attention mask 0 on the
  padding; lorakit's `generate_batch`), tokens/s = all rows' new tokens / wall time.
- Peak memory: each mode of each side in its own fresh process; PyTorch `ru_maxrss`,
  lorakit `VmHWM` (the same number: the process's resident high-water mark). The python
  process's RSS right after `import torch, transformers, peft` is shown too.
- Attention: transformers' default implementation (sdpa; the one it picked is printed).
  lorakit's attention: one fused op (scores, mask, softmax, probs . v; its own backward in
  training), over the KV cache's buffers in place in generation. The per-op run times
  lorakit's RMSNorm, RoPE, attention and silu . up through `lorakit::models::fused`, the ops
  its step runs.

Each round runs every mode of both sides once, in alternating order (lorakit first in odd
rounds, PyTorch first in even ones); cells are the median over rounds of each process's
own median, with the range over rounds. Then (unless --no-ops) one per-op run of each side:
the pieces a training step is made of, timed alone at the step's shapes (forward, and
forward + backward from a fixed random upstream gradient), times their count per step; and a
`torch.profiler` table of two PyTorch training steps.

    python3 benches/llama_compare.py [--family llama|gemma2|gemma3|olmo2|qwen3_moe|qwen3_moe_experts|gpt_oss_experts] [--quick] [--rounds 3] [--threads 2] [--steps 10]
        [--gen-tokens 128] [--lorakit-bin PATH | --no-build] [--no-ops]
        [--markdown FILE] [--json FILE]

`--family gemma3`: the same sizes as a Gemma 3 text decoder (`Gemma3ForCausalLM`: norms
times 1 + weight, four per layer and q/k norms, a GELU-tanh gate, every other layer sliding
over 128 positions with its own RoPE θ; GEMMA3_EXTRA), training and generation only (the
per-op run is Llama's). `--family gemma2`: Gemma 2 at the same keys, with its default
soft-capping of attention scores (50) and logits (30) (PyTorch: eager attention, as
transformers runs Gemma 2). `--family olmo2`: the same sizes as OLMo 2 (`Olmo2ForCausalLM`:
norms after attention and the MLP only, q/k norms over the whole projections), training and
generation only. `--family qwen3_moe`: Qwen3-MoE at the same sizes (`Qwen3MoeForCausalLM`:
per-head q/k norms, 8 experts 704 wide (`--moe-experts N`: N), 2 per token, in every layer; QWEN3_MOE_EXTRA), the
LoRA on q/k/v/o_proj only, training and generation only. `--family qwen3_moe_experts`: the
same model with the LoRA on q/k/v/o and gate/up/down_proj, which both PEFT 0.21 and lorakit
read on qwen3_moe as LoRA on the experts' stacked parameters (`gate_up_proj` at rank 2r,
`down_proj`): lorakit runs each expert's LoRA through its fused kernel, PEFT's `ParamWrapper`
adds B·A to every expert's weight on each forward. `--family gpt_oss_experts`: gpt-oss at
the same sizes (`GptOssForCausalLM`: biased attention with sinks, every other layer sliding
over 128 positions, GptOssConfig's YaRN; 8 experts 704 wide, 2 per token, stored stacked with
biases, a biased router; GPT_OSS_EXTRA), the LoRA on q/k/v/o_proj and `target_parameters`
`experts.gate_up_proj`, `experts.down_proj` (GPT_OSS_PARAMETERS), training and generation
only.

`--quick`: one round, 2 timed steps, 32 new tokens, short per-op budgets (a check that
everything runs, not a measurement).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_DIR = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
DEFAULT_BIN = os.path.join(TARGET_DIR, "release", "examples", "llama_speed")

SHAPE = dict(
    vocab_size=8000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
# --family gemma3: the same sizes as a Gemma 3 text decoder (examples/llama_speed.rs sets the
# same keys): head_dim 64 (hidden / heads), the usual attention scale, every other layer
# sliding over 128 positions (θ 10 000 there, 1 000 000 on the others), untied head.
GEMMA3_EXTRA = dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=128, sliding_window_pattern=2)
# --family gemma2: the same keys but the pattern (Gemma 2 alternates by itself), and Gemma 2's
# default soft-capping (attention scores 50, logits 30).
# --family qwen3_moe: Qwen3-MoE at the same sizes (examples/llama_speed.rs sets the same keys):
# head_dim 64, 8 experts 704 wide (half the dense MLP), 2 per token, renormalized; the LoRA on
# the attention only (PEFT 0.21 reads gate_proj / up_proj / down_proj on qwen3_moe as the
# experts' parameters). --family qwen3_moe_experts: the same model with the LoRA on
# q/k/v/o and gate_proj / up_proj / down_proj, which PEFT 0.21 (and lorakit's LoRA) turns into
# LoRA on the experts' stacked gate_up_proj (rank 2r) and down_proj: PEFT's all-linear on it
# but the router.
QWEN3_MOE_EXTRA = dict(head_dim=64, num_experts=8, moe_intermediate_size=704, num_experts_per_tok=2,
                       norm_topk_prob=True)
# --family gpt_oss_experts: gpt-oss at the same sizes (examples/llama_speed.rs sets the same
# keys): 8 experts 704 wide, 2 per token, head_dim 64, window 128 on every other layer, ε 1e-5,
# GptOssConfig's default RoPE (YaRN); LoRA on q/k/v/o and on the experts' stacks by name.
GPT_OSS_EXTRA = dict(head_dim=64, num_local_experts=8, intermediate_size=704, num_experts_per_tok=2,
                     sliding_window=128, rms_norm_eps=1e-5)
GPT_OSS_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
FAMILY_NAMES = {"gemma2": "Gemma 2", "gemma3": "Gemma 3", "olmo2": "OLMo 2", "qwen3_moe": "Qwen3-MoE",
                "qwen3_moe_experts": "Qwen3-MoE, LoRA on the experts too",
                "gpt_oss_experts": "gpt-oss, LoRA on the attention and the experts"}


def family_label(family):
    """The model's name in the report, with the keys set besides SHAPE's."""
    if family == "llama":
        return "Llama"
    extra = ", ".join(f"{k} {v}" for k, v in family_extra(family).items())
    return FAMILY_NAMES[family] + (f" ({extra})" if extra else "")


def family_extra(family):
    """The Gemma keys set besides SHAPE's for `family` (none for llama)."""
    if family in ("llama", "olmo2"):
        return {}
    if family.startswith("qwen3_moe"):
        return QWEN3_MOE_EXTRA
    if family == "gpt_oss_experts":
        return GPT_OSS_EXTRA
    return {k: v for k, v in GEMMA3_EXTRA.items() if family == "gemma3" or k != "sliding_window_pattern"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION_TARGETS = TARGETS[:4]


def targets_of(family):
    """The modules the benchmark's LoRA adapts."""
    return ATTENTION_TARGETS if family in ("qwen3_moe", "gpt_oss_experts") else TARGETS


def target_parameters_of(family):
    """The stacked parameters the benchmark's LoRA adapts by name (target_parameters)."""
    return GPT_OSS_PARAMETERS if family == "gpt_oss_experts" else None
RANK, ALPHA, LR, PROMPT_LEN = 16, 32, 1e-4, 8
BATCH_PROMPT_LENS = [8, 16, 24, 32]


# --------------------------------------------------------------------------------------
# The PyTorch side, run in a child process per mode.
# --------------------------------------------------------------------------------------


def rss_mib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def torch_setup(threads, family="llama", seed=0):
    t0 = time.perf_counter()
    import torch
    import transformers
    import peft

    import_s = time.perf_counter() - t0
    rss_import = rss_mib()
    torch.set_num_threads(threads)
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                              LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    if family == "gemma3":
        # f32, transformers' init (N(0, 0.02), norms' offsets 0)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**SHAPE, **family_extra(family)))
    elif family == "gemma2":
        # Gemma 2's own alternation; its soft-capping defaults (scores 50, logits 30)
        model = Gemma2ForCausalLM(Gemma2Config(**SHAPE, **family_extra(family)))
    elif family == "olmo2":
        # norms after attention and the MLP only, q/k norms over the whole projections
        model = Olmo2ForCausalLM(Olmo2Config(**SHAPE))
    elif family.startswith("qwen3_moe"):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**SHAPE, **family_extra(family)))
    elif family == "gpt_oss_experts":
        from transformers import GptOssConfig, GptOssForCausalLM

        shape = {k: v for k, v in SHAPE.items() if k not in GPT_OSS_EXTRA}
        model = GptOssForCausalLM(GptOssConfig(**shape, **GPT_OSS_EXTRA))
    else:
        model = LlamaForCausalLM(LlamaConfig(**SHAPE))  # f32, transformers' init (N(0, 0.02), norms 1)
    model = get_peft_model(
        model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets_of(family),
                          target_parameters=target_parameters_of(family))
    )
    info = {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "attn_implementation": model.base_model.model.config._attn_implementation,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "import_s": import_s,
        "rss_after_import_mib": rss_import,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "base_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "adapted_layers": sum(1 for _, m in model.named_modules() if m.__class__.__name__ == "Linear"
                              and hasattr(m, "lora_A")),
    }
    return torch, model, info


def torch_train(args):
    torch, model, info = torch_setup(args.threads, args.family)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq), generator=g)
    info["rss_after_build_mib"] = rss_mib()
    phases, losses = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        losses.append(out.loss.item())
        del out
        if step >= args.warmup:
            phases.append([(t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3])
    steps = [sum(p) for p in phases]
    med = statistics.median(steps)
    tokens = args.batch * args.seq
    return {
        **info,
        "step_ms": {"median": med, "min": min(steps), "max": max(steps), "all": steps},
        "tokens_per_s": tokens / med * 1e3,
        "tokens_per_s_best": tokens / min(steps) * 1e3,
        "phases_ms": {
            "forward+loss": statistics.median(p[0] for p in phases),
            "backward": statistics.median(p[1] for p in phases),
            "optimizer": statistics.median(p[2] for p in phases),
        },
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "tokens_per_step": tokens,
        "peak_rss_mib": rss_mib(),
    }


def torch_gen(args):
    torch, model, info = torch_setup(args.threads, args.family)
    model.eval()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, PROMPT_LEN), generator=g)
    n = args.gen_tokens
    kw = dict(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    with torch.no_grad():
        first = model.generate(**kw)  # warm-up
        times = []
        for _ in range(args.gen_rounds):
            t0 = time.perf_counter()
            out = model.generate(**kw)
            times.append((time.perf_counter() - t0) * 1e3)
            assert torch.equal(out, first), "greedy decoding is deterministic"
    new = first.shape[1] - PROMPT_LEN
    med = statistics.median(times)
    batched = torch_gen_batched(torch, model, g, n, args.gen_rounds)
    return {
        **info,
        "call_ms": {"median": med, "min": min(times), "max": max(times), "all": times},
        "new_tokens": new,
        "prompt_len": PROMPT_LEN,
        "tokens_per_s": new / med * 1e3,
        "tokens_per_s_best": new / min(times) * 1e3,
        "ms_per_token": med / new,
        "cache": type(model.generation_config).__name__ + ", use_cache=" + str(model.generation_config.use_cache),
        "batched": batched,
        "peak_rss_mib": rss_mib(),
    }


def torch_gen_batched(torch, model, g, n, rounds):
    """`generate` of n tokens after random prompts of BATCH_PROMPT_LENS tokens, left-padded
    (pad id 0, attention mask 0 there) into one batch, greedy, under no_grad."""
    width = max(BATCH_PROMPT_LENS)
    ids = torch.zeros((len(BATCH_PROMPT_LENS), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, length in enumerate(BATCH_PROMPT_LENS):
        ids[r, width - length:] = torch.randint(0, SHAPE["vocab_size"], (length,), generator=g)
        mask[r, width - length:] = 1
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
              do_sample=False, pad_token_id=0)
    with torch.no_grad():
        first = model.generate(**kw)  # warm-up
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = model.generate(**kw)
            times.append((time.perf_counter() - t0) * 1e3)
            assert torch.equal(out, first), "greedy decoding is deterministic"
    med = statistics.median(times)
    new = len(BATCH_PROMPT_LENS) * (first.shape[1] - width)
    return {
        "call_ms": {"median": med, "min": min(times), "max": max(times), "all": times},
        "prompt_lens": BATCH_PROMPT_LENS,
        "new_tokens_per_row": first.shape[1] - width,
        "tokens_per_s": new / med * 1e3,
        "tokens_per_s_best": new / min(times) * 1e3,
    }


def time_ms(f, budget_ms):
    """Median and minimum in ms: 2 warm-up calls, then >= 5 calls and more within the budget."""
    for _ in range(2):
        f()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or ((time.perf_counter() - start) * 1e3 < budget_ms and len(times) < 100):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(times), min(times)]


def torch_ops(args):
    """The pieces of a PyTorch training step, as transformers' Llama and PEFT compose them."""
    torch, model, info = torch_setup(args.threads, args.family)
    from peft import LoraConfig, get_peft_model
    from transformers.activations import ACT2FN
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

    b, t = args.batch, args.seq
    h, inter, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    nh, nkv = SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    hd, L = h // nh, SHAPE["num_hidden_layers"]
    budget = args.ops_budget_ms
    torch.manual_seed(3)
    pieces = []

    def outputs(y):
        return list(y) if isinstance(y, (tuple, list)) else [y]

    def piece(name, group, count, f, inputs, backward=True):
        """Forward, and forward + backward from fixed random upstream gradients g_i on the outputs
        y_i (contiguous gradients reach the piece, as in the model)."""
        fwd = time_ms(f, budget)
        fb = None
        if backward:
            gs = [torch.randn_like(y) for y in outputs(f())]

            def step():
                for x in inputs:
                    x.grad = None
                torch.autograd.backward(outputs(f()), gs)
            fb = time_ms(step, budget)
        pieces.append({"name": name, "group": group, "count": count, "fwd_ms": fwd, "fwd_bwd_ms": fb})

    def leaf(*shape):
        return torch.randn(*shape, requires_grad=True)

    linears = [("q_proj", h, nh * hd), ("k_proj", h, nkv * hd), ("v_proj", h, nkv * hd), ("o_proj", nh * hd, h),
               ("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)]
    for name, d_in, d_out in linears:
        layer = get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False)),
            LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["0"]),
        ).base_model.model[0]
        layer.train()
        x = leaf(b, t, d_in)
        piece(f"PEFT LoRA linear {name} {d_in}→{d_out}", "linears (LoRA)", L, lambda: layer(x),
              [x] + [p for p in layer.parameters() if p.requires_grad])
    head = torch.nn.Linear(h, v, bias=False).requires_grad_(False)
    xh = leaf(b, t, h)
    norm = LlamaRMSNorm(h, eps=SHAPE["rms_norm_eps"]).requires_grad_(False)
    xn = leaf(b, t, h)
    piece("LlamaRMSNorm", "norms", 2 * L + 1, lambda: norm(xn), [xn])
    ql, kl, vl = leaf(b, t, nh * hd), leaf(b, t, nkv * hd), leaf(b, t, nkv * hd)
    piece("q/k/v head views (view + transpose)", "attention glue", L,
          lambda: (ql.view(b, t, -1, hd).transpose(1, 2), kl.view(b, t, -1, hd).transpose(1, 2),
                   vl.view(b, t, -1, hd).transpose(1, 2)), [ql, kl, vl])
    rot = LlamaRotaryEmbedding(config=model.base_model.model.config)
    pos = torch.arange(t).unsqueeze(0).expand(b, t)
    qh, kh, vh = leaf(b, nh, t, hd), leaf(b, nkv, t, hd), leaf(b, nkv, t, hd)
    cos, sin = rot(qh, pos)

    piece("RoPE q and k (apply_rotary_pos_emb)", "RoPE", L, lambda: apply_rotary_pos_emb(qh, kh, cos, sin), [qh, kh])

    class Attn(torch.nn.Module):
        num_key_value_groups = nh // nkv
        is_causal = True

    attn = Attn()
    piece("sdpa attention (GQA, causal) + output reshape", "attention core", L,
          lambda: sdpa_attention_forward(attn, qh, kh, vh, None, dropout=0.0, scaling=hd**-0.5)[0].reshape(b, t, -1),
          [qh, kh, vh])
    act = ACT2FN["silu"]
    gate, up = leaf(b, t, inter), leaf(b, t, inter)
    piece("act_fn(gate)·up", "MLP glue", L, lambda: act(gate) * up, [gate, up])
    r1, r2 = leaf(b, t, h), leaf(b, t, h)
    piece("residual add", "residuals", 2 * L, lambda: r1 + r2, [r1, r2])
    emb = torch.nn.Embedding(v, h).requires_grad_(False)
    ids = torch.randint(0, v, (b, t))
    piece("embedding lookup", "embedding", 1, lambda: emb(ids), [], backward=False)
    # The head and the loss as transformers' model(input_ids, labels=...) runs them.
    piece(f"lm_head {h}→{v} (frozen) + ForCausalLMLoss", "lm_head + loss", 1,
          lambda: ForCausalLMLoss(head(xh), ids, vocab_size=v), [xh])
    params = []
    for _, d_in, d_out in linears:
        for _ in range(L):
            for shape in [(RANK, d_in), (d_out, RANK)]:
                p = torch.nn.Parameter(torch.randn(*shape))
                p.grad = torch.randn(*shape) * 1e-3
                params.append(p)
    opt = torch.optim.AdamW(params, lr=LR)
    o = time_ms(opt.step, budget)
    pieces.append({"name": f"AdamW step ({len(params)} tensors)", "group": "optimizer", "count": 1,
                   "fwd_ms": o, "fwd_bwd_ms": o})

    # torch.profiler over two training steps of the whole model.
    from torch.profiler import ProfilerActivity, profile

    model.train()
    popt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    g = torch.Generator().manual_seed(1)
    tids = torch.randint(0, v, (b, t), generator=g)

    def train_step():
        out = model(input_ids=tids, labels=tids)
        out.loss.backward()
        popt.step()
        popt.zero_grad(set_to_none=True)

    train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            train_step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=48)
    fwd_sum = sum(p["fwd_ms"][0] * p["count"] for p in pieces if p["group"] != "optimizer")
    step_sum = sum((p["fwd_bwd_ms"] or p["fwd_ms"])[0] * p["count"] for p in pieces)
    return {**info, "pieces": pieces, "sum_forward_ms": fwd_sum, "sum_step_ms": step_sum,
            "profile_table": table, "peak_rss_mib": rss_mib()}


def child_main(args):
    fn = {"train": torch_train, "gen": torch_gen, "ops": torch_ops}[args.child]
    print(json.dumps({"side": "torch", args.child: fn(args)}))


# --------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------


def cpu_info():
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    ext = "AVX-512" if "avx512f" in flags else ("AVX2" + ("+FMA" if "fma" in flags else "") if "avx2" in flags
                                                 else "no AVX2")
    return name, ext


def mem_total_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        return None


def loadavg():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def run_json(cmd, env=None):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def lorakit_cmd(args, mode):
    return [args.lorakit_bin, "--json", "--family", args.family, "--moe-experts", str(args.moe_experts),
            "--mode", mode, "--threads", str(args.threads),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--gen-tokens", str(args.gen_tokens),
            "--gen-rounds", str(args.gen_rounds), "--batch", str(args.batch), "--seq", str(args.seq),
            "--ops-budget-ms", str(args.ops_budget_ms)]


def torch_cmd(args, mode):
    return [sys.executable, os.path.abspath(__file__), "--child", mode, "--family", args.family,
            "--moe-experts", str(args.moe_experts),
            "--threads", str(args.threads),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--gen-tokens", str(args.gen_tokens),
            "--gen-rounds", str(args.gen_rounds), "--batch", str(args.batch), "--seq", str(args.seq),
            "--ops-budget-ms", str(args.ops_budget_ms)]


def child_env(args):
    # Neither side may pick up a different thread count from the environment.
    env = dict(os.environ)
    for k in ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"]:
        env[k] = str(args.threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def med_range(xs):
    return statistics.median(xs), min(xs), max(xs)


def fmt_cell(xs, digits=0):
    m, lo, hi = med_range(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def main_table(res, args):
    k, t = res["lorakit"], res["torch"]
    rows = []

    def row(case, kx, tx, digits, higher_better, better="faster"):
        km, tm = statistics.median(kx), statistics.median(tx)
        ratio = km / tm
        rows.append(f"| {case} | {fmt_cell(kx, digits)} | {fmt_cell(tx, digits)} | {ratio:.2f}"
                    + (f" (lorakit {better})" if (ratio > 1) == higher_better and abs(ratio - 1) > 0.02 else "")
                    + " |")

    row(f"training tokens/s (batch {args.batch} × seq {args.seq}, fwd+loss+bwd+AdamW)",
        [r["tokens_per_s"] for r in k["train"]], [r["tokens_per_s"] for r in t["train"]], 0, True)
    row("training step ms", [r["step_ms"]["median"] for r in k["train"]],
        [r["step_ms"]["median"] for r in t["train"]], 1, False)
    row(f"generation tokens/s (batch 1, {PROMPT_LEN}-token prompt, {args.gen_tokens} new, greedy, KV cache)",
        [r["tokens_per_s"] for r in k["gen"]], [r["tokens_per_s"] for r in t["gen"]], 1, True)
    row(f"generation tokens/s (batch of prompts {BATCH_PROMPT_LENS} left-padded, {args.gen_tokens} new each, greedy, KV cache)",
        [r["batched"]["tokens_per_s"] for r in k["gen"]], [r["batched"]["tokens_per_s"] for r in t["gen"]], 1, True)
    for key, label in [("adapter_merged", "merged"), ("adapter_disabled", "disabled (base alone)")]:
        kx = [r["reference_tokens_per_s"][key] for r in k["gen"]]
        rows.append(f"| generation tokens/s, lorakit with the adapter {label} (reference) | {fmt_cell(kx, 1)} | – | – |")
    row("peak RSS, training process (MiB)", [r["peak_rss_mib"] for r in k["train"]],
        [r["peak_rss_mib"] for r in t["train"]], 0, False, "lower")
    row("peak RSS, generation process (MiB)", [r["peak_rss_mib"] for r in k["gen"]],
        [r["peak_rss_mib"] for r in t["gen"]], 0, False, "lower")
    lines = ["| case | lorakit | PyTorch+PEFT | lorakit / PyTorch |", "|---|---|---|---|"] + rows
    return "\n".join(lines)


def phase_table(res):
    k, t = res["lorakit"]["train"], res["torch"]["train"]
    kp = lambda key: statistics.median(r["phases_ms"][key] for r in k)  # noqa: E731
    tp = lambda key: statistics.median(r["phases_ms"][key] for r in t)  # noqa: E731
    kfl = kp("forward+loss")
    lines = [
        "| phase (ms, median over rounds) | lorakit | PyTorch+PEFT | lorakit / PyTorch |",
        "|---|---|---|---|",
        f"| forward + loss | {kfl:.1f} | {tp('forward+loss'):.1f} | {kfl / tp('forward+loss'):.2f} |",
        f"| backward | {kp('backward'):.1f} | {tp('backward'):.1f} | {kp('backward') / tp('backward'):.2f} |",
        f"| optimizer (AdamW) | {kp('optimizer'):.1f} | {tp('optimizer'):.1f} | "
        f"{kp('optimizer') / tp('optimizer'):.2f} |",
    ]
    return "\n".join(lines)


GROUPS = ["linears (LoRA)", "norms", "RoPE", "attention glue", "attention core", "MLP glue",
          "residuals", "embedding", "lm_head + loss", "optimizer"]


def ops_tables(ko, to, k_step, t_step):
    def total(p):
        return (p["fwd_bwd_ms"] or p["fwd_ms"])[0] * p["count"]

    def fwd_total(p):
        return p["fwd_ms"][0] * p["count"]

    def group_sums(o):
        out = {}
        for p in o["pieces"]:
            f, s = out.get(p["group"], (0.0, 0.0))
            out[p["group"]] = (f + (fwd_total(p) if p["group"] != "optimizer" else 0.0), s + total(p))
        return out

    kg, tg = group_sums(ko), group_sums(to)
    ksum, tsum = ko["sum_step_ms"], to["sum_step_ms"]
    lines = [
        "Per step, by group (each piece timed alone at the step's shapes, × its count per step; "
        "ms; share of the sum of the pieces):",
        "",
        "| group | lorakit fwd | lorakit fwd+bwd | share | PyTorch fwd | PyTorch fwd+bwd | share | "
        "lorakit − PyTorch (fwd+bwd) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in GROUPS:
        kf, ks = kg.get(g, (0.0, 0.0))
        tf, ts = tg.get(g, (0.0, 0.0))
        lines.append(f"| {g} | {kf:.1f} | {ks:.1f} | {100 * ks / ksum:.0f}% | {tf:.1f} | {ts:.1f} | "
                     f"{100 * ts / tsum:.0f}% | {ks - ts:+.1f} |")
    lines.append(f"| **sum of pieces** | {ko['sum_forward_ms']:.1f} | {ksum:.1f} | 100% | {to['sum_forward_ms']:.1f} "
                 f"| {tsum:.1f} | 100% | {ksum - tsum:+.1f} |")
    lines.append(f"| measured step (same run's median) | | {k_step:.1f} | | | {t_step:.1f} | | {k_step - t_step:+.1f} |")
    lines += ["", "Each piece (ms per call, median; fwd+bwd is forward + backward from a fixed random "
              "upstream gradient, every input requiring a gradient as in the model):", "",
              "| side | piece | × per step | fwd | fwd+bwd | × count |", "|---|---|---|---|---|---|"]
    for side, o in [("lorakit", ko), ("PyTorch", to)]:
        for p in o["pieces"]:
            fb = p["fwd_bwd_ms"]
            lines.append(f"| {side} | {p['name']} | {p['count']} | {p['fwd_ms'][0]:.2f} | "
                         f"{'–' if fb is None else f'{fb[0]:.2f}'} | {total(p):.1f} |")
    lines += ["", "lorakit alternatives at the same shapes (the candle compositions that the step's fused ops "
              "replace; the head and the loss apart, as the step ran them "
              "before they became one op; candle-nn's fused kernels, which have no backward in candle 0.11; "
              "the head through lorakit's fused op, which computes no weight gradient):", "",
              "| piece | × per step | fwd | fwd+bwd | × count |", "|---|---|---|---|---|"]
    for p in ko.get("alternatives", []):
        fb = p["fwd_bwd_ms"]
        lines.append(f"| {p['name']} | {p['count']} | {p['fwd_ms'][0]:.2f} | "
                     f"{'–' if fb is None else f'{fb[0]:.2f}'} | {total(p):.1f} |")
    lines += ["", "lorakit, one generated token's pieces (batch 1; eval mode; ms per call):", "",
              "| piece | × per token | ms | × count |", "|---|---|---|---|"]
    for p in ko.get("decode", []):
        lines.append(f"| {p['name']} | {p['count']} | {p['fwd_ms'][0]:.4f} | {total(p):.3f} |")
    return "\n".join(lines)


def driver(args):
    if args.quick:
        args.rounds, args.steps, args.warmup, args.gen_tokens, args.gen_rounds = 1, 2, 1, 32, 1
        args.ops_budget_ms = 200.0
    if args.lorakit_bin is None:
        args.lorakit_bin = DEFAULT_BIN
        if not args.no_build:
            subprocess.run(["cargo", "build", "--release", "--example", "llama_speed"], cwd=ROOT, check=True)
    if not os.path.exists(args.lorakit_bin):
        raise SystemExit(f"no lorakit binary at {args.lorakit_bin} (cargo build --release --example llama_speed)")
    env = child_env(args)
    cpu, ext = cpu_info()
    load_before = loadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    res = {"lorakit": {"train": [], "gen": []}, "torch": {"train": [], "gen": []}}
    log = []
    for rnd in range(args.rounds):
        for mode in ["train", "gen"]:
            sides = ["lorakit", "torch"] if rnd % 2 == 0 else ["torch", "lorakit"]
            for side in sides:
                cmd = lorakit_cmd(args, mode) if side == "lorakit" else torch_cmd(args, mode)
                out = run_json(cmd, env)
                r = out[mode]
                r["wall_s"] = out["wall_s"]
                if side == "lorakit":
                    r["header"] = {k: out[k] for k in ["cpu", "vector_ext", "threads", "candle"]}
                res[side][mode].append(r)
                msg = (f"round {rnd + 1} {mode} {side}: {r['tokens_per_s']:.1f} tokens/s, "
                       f"peak {r['peak_rss_mib']:.0f} MiB (process {out['wall_s']:.1f} s)")
                log.append(msg)
                print(msg, file=sys.stderr, flush=True)
    ops = None
    if not args.no_ops and args.family == "llama":
        ko = run_json(lorakit_cmd(args, "ops"), env)["ops"]
        print("ops lorakit done", file=sys.stderr, flush=True)
        to = run_json(torch_cmd(args, "ops"), env)["ops"]
        print("ops torch done", file=sys.stderr, flush=True)
        ops = (ko, to)
    load_after = loadavg()

    kt, tt = res["lorakit"]["train"][0], res["torch"]["train"][0]
    tg = res["torch"]["gen"][0]
    th = kt["header"]["threads"]
    mem = mem_total_gib()
    header = [
        f"CPU: {cpu} ({ext}), {os.cpu_count()} logical CPUs"
        + (f", {mem:.0f} GiB RAM" if mem else "")
        + f"; threads: {args.threads} (torch.set_num_threads → {tt['torch_threads']}, interop "
        f"{tt['torch_interop_threads']}, ATen CPU capability {tt['torch_cpu_capability']}; lorakit "
        f"RAYON_NUM_THREADS/CANDLE_NUM_THREADS → candle gemm {th['candle_get_num_threads (gemm)']}, rayon pool "
        f"{th['rayon_global_pool']}, candle element-wise spin limit "
        f"{th.get('candle elementwise spin limit', 'not reported')})",
        f"date: {started:%Y-%m-%d %H:%M} UTC; load average before {load_before}, after {load_after} (1, 5, 15 min)",
        "versions: " + ", ".join(f"{k} {v}" for k, v in tt["versions"].items())
        + f"; lorakit {args.lorakit_bin}",
        f"PyTorch attention: {tt['attn_implementation']}; generation cache: transformers' default "
        f"(use_cache={tg['cache'].split('=')[-1]}); lorakit: its fused attention op in training and in generation (over the KvCache's buffers, in place)",
        f"model: {family_label(args.family)}, {SHAPE['num_hidden_layers']} layers, hidden {SHAPE['hidden_size']}, "
        f"{SHAPE['num_attention_heads']} heads / {SHAPE['num_key_value_heads']} KV heads, MLP "
        f"{SHAPE['intermediate_size']}, vocab {SHAPE['vocab_size']} (untied), f32; LoRA r={RANK}, alpha={ALPHA} "
        f"on {'/'.join(t.replace('_proj', '') for t in targets_of(args.family))}_proj"
        + (f" and target_parameters {', '.join(target_parameters_of(args.family))}"
           if target_parameters_of(args.family) else ""),
        f"check: trainable params lorakit {kt['trainable_params']} in {kt['adapted_layers']} layers, PyTorch "
        f"{tt['trainable_params']} in {tt['adapted_layers']} layers; frozen base params lorakit {kt['base_params']}, "
        f"PyTorch {tt['base_params']}; first-step loss lorakit {kt['loss_first']:.3f}, PyTorch "
        f"{tt['loss_first']:.3f} (ln {SHAPE['vocab_size']} = {kt['ln_vocab']:.3f})",
        f"python import of torch + transformers + peft: {tt['import_s']:.1f} s, RSS after it "
        f"{tt['rss_after_import_mib']:.0f} MiB (inside PyTorch's peaks below)",
        f"rounds: {args.rounds} (alternating order), {args.warmup} warm-up + {args.steps} timed training steps, "
        f"1 warm-up + {args.gen_rounds} timed generate calls per process; cells: median over rounds (range)",
    ]
    md = "\n".join(f"- {h}" for h in header) + "\n\n" + main_table(res, args) + "\n\n" + phase_table(res)
    if ops:
        ko, to = ops
        k_step = statistics.median(r["step_ms"]["median"] for r in res["lorakit"]["train"])
        t_step = statistics.median(r["step_ms"]["median"] for r in res["torch"]["train"])
        md += "\n\n" + ops_tables(ko, to, k_step, t_step)
        md += "\n\ntorch.profiler, two PyTorch training steps (self CPU time):\n\n```\n" + to["profile_table"] + "\n```"
    md += "\n\nProcesses, in order:\n\n" + "\n".join(f"- {m}" for m in log)
    if args.quick:
        md = "**--quick: a check that the scripts run, not a measurement.**\n\n" + md
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": res, "ops": ops and {"lorakit": ops[0], "torch": ops[1]}}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe-experts", type=int, default=8,
                    help="--family qwen3_moe(_experts), gpt_oss_experts: the number of experts (2 per token)")
    ap.add_argument("--child", choices=["train", "gen", "ops"], help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--family", choices=["llama", "gemma2", "gemma3", "olmo2", "qwen3_moe", "qwen3_moe_experts", "gpt_oss_experts"], default="llama",
                    help="the architecture at the benchmark's shape (gemma2/3, olmo2: training and generation only)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per process")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up training steps per process")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--gen-rounds", type=int, default=3, help="timed generate calls per process")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--ops-budget-ms", type=float, default=1500.0, help="time budget per piece of the per-op run")
    ap.add_argument("--no-ops", action="store_true", help="skip the per-op run and the profile")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lorakit-bin", help="a built examples/llama_speed (default: build it)")
    ap.add_argument("--no-build", action="store_true", help="use the default binary path without building")
    ap.add_argument("--markdown", help="also write the output to this file")
    ap.add_argument("--json", help="also write every raw result to this file")
    args = ap.parse_args()
    QWEN3_MOE_EXTRA["num_experts"] = args.moe_experts
    GPT_OSS_EXTRA["num_local_experts"] = args.moe_experts
    if args.child:
        child_main(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
