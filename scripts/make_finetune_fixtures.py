#!/usr/bin/env python3
"""Reference values for `lorakit::finetune` (tests/suite/finetune_train.rs), computed by
transformers 5.24 + PEFT 0.21.2 + PyTorch on the CPU.

    python3 scripts/make_finetune_fixtures.py            # writes tests/fixtures/finetune/
    python3 scripts/make_finetune_fixtures.py --check-trained DIR BASE
        loads the PEFT adapter folder DIR (e.g. one lorakit's Trainer saved) onto the base
        model folder BASE with PeftModel.from_pretrained and writes DIR/peft_logits.safetensors
        (input_ids and PEFT's logits), so a test can compare lorakit's logits on that
        adapter with PEFT's.

Writes:
  schedules.json     transformers.get_scheduler's learning-rate multipliers for cosine,
                     linear, constant_with_warmup and cosine_with_min_lr (min_lr_rate 0.1)
                     over 20 steps with 5 warmup steps (the rate of each optimizer step).
  step/              one training step on tests/fixtures/models/llama/qwen2 with its PEFT
                     LoRA (rsLoRA, rank and alpha patterns) loaded trainable:
                       batch.safetensors  input_ids (2, 9) i64 and loss_mask (2, 9) f32
                                          (row 0: a 4-token prompt masked; row 1: its last
                                          3 tokens padding with id 0, masked)
                       expected.safetensors
                                          loss (the labels=-100 mean transformers
                                          computes), every lora weight after one
                                          torch.optim.AdamW step (lr 1e-2, no weight decay)
                                          with clip_grad_norm_(1.0), named as lorakit names
                                          its variables (`<module path>.lora_A`), and
                                          grad_norm (before clipping)
                       accum_expected.safetensors
                                          the same step with the batch as two micro-batches
                                          of one row, the loss summed over both and divided
                                          by their target-token count (what transformers'
                                          Trainer does with gradient accumulation)

  trained_dora/      an adapter lorakit's Trainer wrote (the finetune example, DoRA r=4 on
                     q_proj, v_proj, up_proj of the tiny Qwen2 with tests/fixtures/tokenizer,
                     40 steps on examples/finetune/tiny.jsonl, lr 1e-2):
                       mkdir /tmp/qwen2-tok
                       cp tests/fixtures/models/llama/qwen2/base/* tests/fixtures/tokenizer/tokenizer*.json /tmp/qwen2-tok/
                       cargo run --release --example finetune -- --model /tmp/qwen2-tok \
                           --data examples/finetune/tiny.jsonl --method dora --rank 4 \
                           --targets q_proj,v_proj,up_proj --steps 40 --lr 1e-2 --out /tmp/trained_dora
                     then its adapter_config.json and adapter_model.safetensors copied here and
                     peft_logits.safetensors written by --check-trained (PEFT's logits on it).
  trained_gpt2_lora/ likewise for GPT-2 (Conv1D layers, fan_in_fan_out): LoRA r=4, all-linear,
                     on tests/fixtures/peft_options/gpt2_lora/base (n_positions 16, so packed):
                       mkdir /tmp/gpt2-tok
                       cp tests/fixtures/peft_options/gpt2_lora/base/* tests/fixtures/tokenizer/tokenizer*.json /tmp/gpt2-tok/
                       cargo run --release --example finetune -- --model /tmp/gpt2-tok \
                           --data examples/finetune/tiny.jsonl --method lora --rank 4 \
                           --steps 40 --lr 1e-2 --pack --out /tmp/ft-gpt2
                     then copied and checked as trained_dora/ (--check-trained DIR with
                     tests/fixtures/peft_options/gpt2_lora/base).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "finetune"
QWEN2 = ROOT / "tests" / "fixtures" / "models" / "llama" / "qwen2"


def schedules():
    from transformers import get_scheduler

    out = {"warmup": 5, "total": 20, "cases": {}}
    for name, kwargs in [
        ("cosine", {}),
        ("linear", {}),
        ("constant_with_warmup", {}),
        ("cosine_with_min_lr", {"scheduler_specific_kwargs": {"min_lr_rate": 0.1}}),
    ]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=20, **kwargs)
        factors = []
        for _ in range(20):
            factors.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        out["cases"][name] = factors
    (OUT / "schedules.json").write_text(json.dumps(out, indent=1) + "\n")


def lorakit_name(peft_name):
    # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    name = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return name.removesuffix(".weight")


def load_trainable():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(QWEN2 / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(QWEN2 / "lora"), is_trainable=True)
    model.train()
    return model


def batch():
    ids = load_file(str(QWEN2 / "logits.safetensors"))["input_ids"].clone()
    mask = torch.ones(ids.shape, dtype=torch.float32)
    mask[0, :4] = 0  # a prompt
    ids[1, 6:] = 0  # padding
    mask[1, 6:] = 0
    return ids, mask


def step(micro_batches):
    model = load_trainable()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids, mask = batch()
    # The mean over every target token of the step, as the Trainer normalizes with
    # num_items_in_batch; each micro-batch's labels are -100 where the mask is 0.
    total = int(mask[:, 1:].sum())
    loss_sum = 0.0
    for rows in micro_batches:
        labels = ids[rows].clone()
        labels[mask[rows] == 0] = -100
        out = model(input_ids=ids[rows], labels=labels)
        n = int(mask[rows][:, 1:].sum())
        (out.loss * n / total).backward()
        loss_sum += float(out.loss) * n
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    expected = {
        "loss": torch.tensor(loss_sum / total, dtype=torch.float64),
        "grad_norm": torch.tensor(float(norm), dtype=torch.float64),
    }
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected[lorakit_name(name)] = p.detach().clone().contiguous()
    return ids, mask, expected


def one_step_fixtures():
    d = OUT / "step"
    d.mkdir(parents=True, exist_ok=True)
    ids, mask, expected = step([[0, 1]])
    save_file({"input_ids": ids.contiguous(), "loss_mask": mask.contiguous()}, str(d / "batch.safetensors"))
    save_file(expected, str(d / "expected.safetensors"))
    _, _, accum = step([[0], [1]])
    save_file(accum, str(d / "accum_expected.safetensors"))
    # The whole-batch loss equals transformers' own labels=-100 mean.
    model = load_trainable()
    labels = ids.clone()
    labels[mask == 0] = -100
    hf = float(model(input_ids=ids, labels=labels).loss)
    assert abs(hf - float(expected["loss"])) < 1e-6, (hf, float(expected["loss"]))
    print(f"step: loss {hf:.6f}, grad norm {float(expected['grad_norm']):.4f}")


def check_trained(adapter_dir, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    save_file({"input_ids": ids, "logits": logits.contiguous()}, str(Path(adapter_dir) / "peft_logits.safetensors"))
    print(f"PEFT loaded {adapter_dir} onto {base_dir}: logits {tuple(logits.shape)} written")


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--check-trained":
        check_trained(sys.argv[2], sys.argv[3])
        return
    OUT.mkdir(parents=True, exist_ok=True)
    schedules()
    one_step_fixtures()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
