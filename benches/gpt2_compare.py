#!/usr/bin/env python3
"""LoRA fine-tuning speed on a GPT-2 model, side by side in one run: lorakit
(`examples/gpt2_speed.rs`) against PyTorch + transformers + PEFT.

The model: a GPT-2 written by transformers with random weights (default 4 layers, hidden
512, 8 heads, vocab 8000, 256 positions; f32; the config's dropouts 0.1), a fresh LoRA
r = 16, alpha = 32, no LoRA dropout on c_attn, c_proj and c_fc (PEFT with
fan_in_fan_out=True, GPT-2's Conv1D layout). Per step, at the level a user calls, in
training mode (the model's own embedding, attention and residual dropouts on both sides):
PyTorch `model.train()`, `model(input_ids=ids, labels=ids).loss`, `backward()`,
`AdamW.step()`, `zero_grad(set_to_none=True)`; lorakit `Gpt2LmHeadModel::loss_sum_t(ids,
mask, true)` over the predicted positions, `backward`, `candle_nn::AdamW`. (Before
2026-12-04 lorakit's GPT-2 had no dropout of its own: the earlier records in
`benches/RESULTS.md` timed PyTorch with those dropouts and lorakit without.)
Batch 4 x 256 ids; the same thread count on both sides. Rounds alternate the order;
cells are the median over rounds of each process's median step (`step_compare.py`).

    python3 benches/gpt2_compare.py [--rounds 3] [--threads 2] [--steps 12]
        [--layers 4] [--hidden 512] [--lorakit-bin PATH]
"""
import os, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_compare import main, timed_steps  # noqa: E402 (the benches share it)


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

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed_steps(step, steps, warmup)


if __name__ == "__main__":
    main(__doc__, "gpt2_speed", write_model, torch_step_ms, "GPT-2 LoRA step",
         lambda a: f"GPT-2 {a.layers} layers, hidden {a.hidden}, vocab 8000, f32; LoRA r=16 on "
                   "c_attn, c_proj, c_fc; batch 4 x 256")
