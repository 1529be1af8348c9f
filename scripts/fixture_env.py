"""What every fixture script needs before it imports PEFT's results into files."""

import os
import sys


def rerun_pinned():
    """Re-executes the running script with PYTHONHASHSEED=0 and HF_HUB_OFFLINE=1 unless
    they are already set so. PEFT stores target_modules as a set, so its JSON lists keep
    one order only under a fixed hash seed; offline, because PEFT's save looks
    base_model_name_or_path up on the Hub otherwise."""
    if os.environ.get("PYTHONHASHSEED") != "0" or os.environ.get("HF_HUB_OFFLINE") != "1":
        os.environ["PYTHONHASHSEED"] = "0"
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.execv(sys.executable, [sys.executable] + sys.argv)


def saved_tensor_names(folder):
    """The tensor names of every `*.safetensors` file in `folder` (what a `save_pretrained`
    wrote), sorted."""
    from pathlib import Path

    from safetensors import safe_open

    keys = []
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            keys.extend(f.keys())
    return sorted(keys)
