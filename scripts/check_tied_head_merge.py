#!/usr/bin/env python3
"""Merges each case of tests/fixtures/tied_head/ with `lorakit merge` and loads the merged
folder with transformers: its logits should be PEFT's unmerged ones (io.safetensors), its
head untied. PEFT's own merged save of the same files is off (peft_merge.json).

Usage (after `cargo build --release --bin lorakit`):
    python3 scripts/check_tied_head_merge.py [--lorakit target/release/lorakit]
"""

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "tied_head"


def main():
    ap = argparse.ArgumentParser()
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    ap.add_argument("--lorakit", default=os.path.join(target, "release", "lorakit"))
    args = ap.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for case in sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()):
            out = Path(tmp) / case
            subprocess.run([args.lorakit, "merge", "--base", str(FIXTURES / case / "base"),
                            "--adapter", str(FIXTURES / case / "adapter"), "--out", str(out),
                            "--quiet"], check=True)
            io = load_file(str(FIXTURES / case / "io.safetensors"))
            model = AutoModelForCausalLM.from_pretrained(out).eval()
            with torch.no_grad():
                logits = model(input_ids=io["input_ids"]).logits
            diff = (logits - io["logits"]).abs().max().item()
            tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
            print(f"{case}: max |lorakit merged - PEFT unmerged| = {diff:.2e}, head tied: {tied}")
            assert not tied and diff < 1e-5, case
            worst = max(worst, diff)
    print(f"ok (worst {worst:.2e})")


if __name__ == "__main__":
    main()
