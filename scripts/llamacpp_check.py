#!/usr/bin/env python3
"""Loads `lorakit export-gguf` adapters in real llama.cpp and compares its logits with
transformers + PEFT.

Everything else checks the GGUF export against gguf-py replicating llama.cpp's
`convert_lora_to_gguf.py` (scripts/make_gguf_fixtures.py). This runs llama.cpp itself:
for each case below it writes an all-f32 base-model GGUF from the HF fixture folder, exports
the PEFT adapter with the lorakit binary, evaluates fixed token ids in llama.cpp (through
llama-cpp-python) with and without the adapter, evaluates the same ids with transformers
and with PEFT's `PeftModel` (eval, no grad, f32), and compares.

Needs (made with these):

    pip install cmake ninja scikit-build-core
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \\
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \\
      CMAKE_BUILD_PARALLEL_LEVEL=2 pip install --no-build-isolation llama-cpp-python==0.3.36

(an sdist: it compiles the llama.cpp it vendors, ggml-org/llama.cpp@0c1e57098, CPU only;
about 25 minutes on 2 cores), plus torch, transformers, peft and gguf-py (`pip install
gguf`; checked with torch 2.15.0, transformers 5.24.0, peft 0.21.2, gguf 0.19.0) and a
built lorakit (`cargo build --release --bin lorakit`). Run from the repository root:

    python3 scripts/llamacpp_check.py [--lorakit target/release/lorakit] [--keep DIR]

Runs in under a minute; writes only to a temporary folder (or --keep DIR). Exit status 0
when every check passes, 1 otherwise.

Cases (tests/fixtures; the `mistral` ... `llama3_rope` adapters are the ones
make_gguf_fixtures.py converts):

- `mistral`: llama arch, GQA 4/2, head_dim 12 ≠ hidden/heads, all linear layers: the
  q/k `lora_b` row permutation matters here;
- `llama3_rope`: llama arch, llama3 RoPE (`rope_freqs.weight`), q/k/v/down_proj;
- `llama_embed`: llama arch, LoRA on embed_tokens (llama.cpp's transposed token_embd
  pair), lm_head (`output`), q/v_proj, 2/1 heads;
- `qwen3`: qwen3 arch (q_norm / k_norm, no permutation), all linear layers;
- `qwen2`: qwen2 arch (q/k/v biases, tied embeddings) with rsLoRA, rank_pattern and
  alpha_pattern, which lorakit folds into one `adapter.lora.alpha` plus rescaled `lora_b`.

Checks, per case, on two sequences of 9 token ids (no tokenizer; llama.cpp adds no BOS):

1. base: llama.cpp without the adapter vs transformers (validates the base GGUF and the
   comparison itself, so that 2. tests only the adapter);
2. lora: llama.cpp with lorakit's adapter vs PEFT;
3. effect: (llama.cpp with − without the adapter) vs (PEFT − transformers), relative to
   the effect's own size, so that a small or mis-scaled delta cannot hide under the base;
4. greedy: the argmax next token at every position agrees (reported; the 1.–3. bounds
   decide);
5. `--dtype f16`: the f16 export loads too; its error is reported, not bounded (it is the
   f16 rounding of lora_a / lora_b plus ggml casting activations to f16 for an f16 matmul:
   about 1e-3 relative on the effect, up to ~6e-3 for qwen2).

Tolerance: everything is f32 on both sides (f32 weights, f32 adapter, f32 KV cache, no
flash attention, so llama.cpp quantizes no activations); what remains is summation order,
ggml's f32 RoPE / SiLU / softmax, so the expected error is a few 1e-6 relative (measured
with llama.cpp@0c1e57098: at most 2.6e-6, so the bounds below leave a margin of ~40x). Passing
needs max |Δ| ≤ 1e-4 · max |reference| for 1. and 2. and ≤ 1e-3 · max |effect| for 3.
(the effect is a difference of two logit sets, so it carries their absolute error on a
smaller scale). A wrong permutation, alpha or orientation gives errors of order 1 (see the
negative controls).

Negative controls (must FAIL the effect check, or the test has no teeth): the mistral
adapter with `lora_b` of attn_q / attn_k left unpermuted, and the qwen2 adapter as
convert_lora_to_gguf.py writes it (make_gguf_fixtures.py's replica: one plain `lora_alpha`,
rsLoRA and the patterns ignored).
Bad inputs (llama.cpp must refuse to load them): the mistral adapter on the qwen3 model
(arch mismatch) and on the llama3_rope model (same arch, other shapes).

Deviations of the HF side, on purpose: mistral's `sliding_window` (4) and qwen3's sliding
layer are switched off in transformers, because llama.cpp's llama / qwen3 graphs have no
sliding-window attention (a base-model matter, not the adapter's). Base GGUF metadata
beyond make_gguf_fixtures.py's: `tokenizer.ggml.model = "none"` (llama.cpp's loader
requires the key; "none" means no vocabulary, sized by `{arch}.vocab_size`).
"""

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(ROOT / "scripts"))
import make_gguf_fixtures as mgf  # noqa: E402  (permute, rope factors, arch map)

TOL_LOGITS = 1e-4
TOL_EFFECT = 1e-3
N_CTX = 32  # >= len(SEQS[i]); the fixtures' context lengths are 32 to 128

LLAMA = FIX / "models" / "llama"
CASES = {  # name -> (HF base folder, PEFT adapter folder)
    "mistral": (LLAMA / "mistral" / "base", LLAMA / "mistral" / "lora"),
    "llama3_rope": (LLAMA / "llama3_rope" / "base", LLAMA / "llama3_rope" / "lora"),
    "llama_embed": (FIX / "peft_options" / "llama_embed" / "base",
                    FIX / "peft_options" / "llama_embed" / "adapter"),
    "qwen3": (LLAMA / "qwen3" / "base", LLAMA / "qwen3" / "lora"),
    "qwen2": (LLAMA / "qwen2" / "base", LLAMA / "qwen2" / "lora"),
}

# Fixed token ids (vocab 64 in every fixture): two sequences of 9.
SEQS = [[3, 17, 42, 8, 63, 0, 25, 11, 50], [60, 2, 2, 31, 7, 44, 19, 5, 38]]


# ---------------------------------------------------------------- base GGUF (f32)

def write_base_gguf(base_dir, path):
    """The HF model as convert_hf_to_gguf.py writes it, all f32, plus
    `tokenizer.ggml.model = "none"` (make_gguf_fixtures.py's writer)."""
    return mgf.write_model_gguf(base_dir, path, quantize_q=False, no_vocab=True)


# ---------------------------------------------------------------- transformers / PEFT

def hf_logits(base_dir, adapter_dir):
    """(base logits, PEFT logits), each (n_seq, T, V) f32."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(base_dir)
    # llama.cpp's llama / qwen2 / qwen3 graphs attend to the whole prefix.
    if getattr(cfg, "sliding_window", None) is not None:
        cfg.sliding_window = None
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * len(cfg.layer_types)
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, config=cfg, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = torch.tensor(SEQS, dtype=torch.long)
    with torch.no_grad():
        base = model(input_ids=ids).logits.float().numpy()
        peft = PeftModel.from_pretrained(model, adapter_dir)
        peft.eval()
        lora = peft(input_ids=ids).logits.float().numpy()
        with peft.disable_adapter():
            again = peft(input_ids=ids).logits.float().numpy()
    assert np.array_equal(base, again), "PEFT's disable_adapter is not the base model"
    return base, lora


# ---------------------------------------------------------------- llama.cpp

LOG = []


def install_log():
    import llama_cpp  # noqa: F401  (fails early when llama-cpp-python is missing)

    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):
        LOG.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    install_log.cb = cb  # keep the callback alive


def llamacpp_logits(model_path, lora_path, n_ctx):
    """(n_seq, T, V) logits from llama.cpp and its log; raises with llama.cpp's log if it
    refuses the adapter.

    The adapter is loaded here rather than by `Llama(lora_path=...)`: llama-cpp-python
    0.3.36 tests the result of `llama_adapter_lora_init` with `is None`, but its ctypes
    restype is a POINTER, so a refused adapter (NULL) passes unnoticed and the next decode
    segfaults."""
    import llama_cpp  # noqa: F401  (fails early when llama-cpp-python is missing)
    from llama_cpp import Llama
    del LOG[:]
    llm = Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                n_threads=2, n_threads_batch=2, n_gpu_layers=0, logits_all=True,
                type_k=0, type_v=0,  # GGML_TYPE_F32 KV cache (the default is f16)
                flash_attn=False, verbose=False, seed=0)
    adapter = None
    try:
        if lora_path is not None:
            adapter = llama_cpp.llama_adapter_lora_init(llm._model.model,
                                                        str(lora_path).encode())
            if not adapter:  # a NULL POINTER is falsy, not None
                adapter = None
                raise RuntimeError("llama_adapter_lora_init returned NULL\n" + "".join(LOG))
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, 1, scales):
                raise RuntimeError("llama_set_adapters_lora failed\n" + "".join(LOG))
        out = []
        for seq in SEQS:
            llm.reset()
            llm.eval(seq)
            out.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
        return np.stack(out), "".join(LOG)
    finally:
        if adapter is not None:
            llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
            llama_cpp.llama_adapter_lora_free(adapter)
        llm.close()


# ---------------------------------------------------------------- lorakit

def export(lorakit, adapter_dir, base_dir, out, dtype="f32"):
    r = subprocess.run([lorakit, "export-gguf", "--adapter", str(adapter_dir),
                        "--base", str(base_dir), "--out", str(out), "--dtype", dtype],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"lorakit export-gguf failed:\n{r.stdout}{r.stderr}")
    return (r.stdout + r.stderr).strip()


def rewrite_adapter(src, dst, alpha=None, tensor_fn=None):
    """Copies an adapter GGUF with gguf-py, optionally with another alpha or tensors."""
    r = gguf.GGUFReader(str(src))
    kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    w = gguf.GGUFWriter(str(dst), kv["general.architecture"])
    w.add_type(kv["general.type"])
    w.add_string(gguf.Keys.Adapter.TYPE, kv["adapter.type"])
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha if alpha is not None
                                                      else kv["adapter.lora.alpha"]))
    w.add_file_type(kv["general.file_type"])
    w.add_quantization_version(kv["general.quantization_version"])
    for t in r.tensors:
        data = np.array(t.data, dtype=np.float32).reshape(list(reversed(t.shape.tolist())))
        if tensor_fn is not None:
            data = tensor_fn(t.name, data)
        w.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def unpermute(data, n_head):
    """Inverse of make_gguf_fixtures.permute on the rows of `data`."""
    return (data.reshape(n_head, data.shape[0] // n_head // 2, 2, *data.shape[1:])
            .swapaxes(1, 2).reshape(data.shape))


# ---------------------------------------------------------------- comparison

def rel(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def compare(name, cpp_base, cpp_lora, hf_base, hf_lora, effect_only=False):
    rows = []
    ok = True
    eff_cpp, eff_hf = cpp_lora - cpp_base, hf_lora - hf_base
    checks = [] if effect_only else [
        ("base", cpp_base, hf_base, TOL_LOGITS),
        ("lora", cpp_lora, hf_lora, TOL_LOGITS)]
    checks.append(("effect", eff_cpp, eff_hf, TOL_EFFECT))
    for what, got, ref, tol in checks:
        abs_d = float(np.abs(got - ref).max())
        r = rel(got, ref)
        passed = r <= tol
        ok &= passed
        rows.append(f"{name:<22} {what:<7} {abs_d:10.3e} {r:10.3e} {float(np.abs(ref).max()):9.3f}"
                    f" {'ok' if passed else 'FAIL'}")
    g_base = (cpp_base.argmax(-1) == hf_base.argmax(-1)).mean()
    g_lora = (cpp_lora.argmax(-1) == hf_lora.argmax(-1)).mean()
    changed = (hf_lora.argmax(-1) != hf_base.argmax(-1)).mean()
    rows.append(f"{'':<22} greedy  base {g_base:.0%} agree, lora {g_lora:.0%} agree"
                f" (the adapter changes {changed:.0%} of PEFT's argmaxes)")
    return ok, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lorakit", default=str(ROOT / "target" / "release" / "lorakit"))
    ap.add_argument("--keep", type=Path, help="write the GGUF files here (kept)")
    args = ap.parse_args()
    import llama_cpp  # noqa: F401  (fails early when llama-cpp-python is missing)
    install_log()
    from importlib.metadata import version
    print("versions:", ", ".join(f"{p} {version(p)}" for p in
                                 ("llama_cpp_python", "gguf", "torch", "transformers", "peft")))
    if not Path(args.lorakit).is_file():
        raise SystemExit(f"no lorakit binary at {args.lorakit} (cargo build --release --bin lorakit)")
    tmp = tempfile.TemporaryDirectory()
    work = args.keep or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    all_ok = True
    table = [f"{'case':<22} {'check':<7} {'max|Δ|':>10} {'max|Δ|/ref':>10} {'max|ref|':>9}"]
    results = {}
    for case, (base_dir, adapter_dir) in CASES.items():
        model = work / f"model_{case}.gguf"
        adapter = work / f"adapter_{case}.gguf"
        cfg = write_base_gguf(base_dir, model)
        note = export(args.lorakit, adapter_dir, base_dir, adapter)
        print(f"\n== {case}: lorakit export-gguf says:\n   " + note.replace("\n", "\n   "))
        hf_base, hf_lora = hf_logits(base_dir, adapter_dir)
        n_ctx = N_CTX
        cpp_base, _ = llamacpp_logits(model, None, n_ctx)
        cpp_lora, log = llamacpp_logits(model, adapter, n_ctx)
        for line in log.splitlines():
            if "lora" in line.lower() and ("loaded" in line or "alpha" in line
                                          or "kv   0" in line or "warn" in line.lower()):
                print("   llama.cpp:", line.strip())
        ok, rows = compare(case, cpp_base, cpp_lora, hf_base, hf_lora)
        all_ok &= ok
        table += rows
        export(args.lorakit, adapter_dir, base_dir, work / f"adapter_{case}_f16.gguf", "f16")
        cpp_f16, _ = llamacpp_logits(model, work / f"adapter_{case}_f16.gguf", n_ctx)
        table.append(f"{'':<22} f16     export loads; effect max|Δ|/ref "
                     f"{rel(cpp_f16 - cpp_base, hf_lora - hf_base):.3e} (not bounded)")
        results[case] = (cfg, model, adapter, cpp_base, hf_base, hf_lora)

    # Negative control 1: mistral without the q/k lora_b permutation.
    cfg, model, adapter, cpp_base, hf_base, hf_lora = results["mistral"]
    bad = work / "control_mistral_unpermuted.gguf"

    def unperm(name, data):
        if name.endswith("attn_q.weight.lora_b"):
            return unpermute(data, cfg.num_attention_heads)
        if name.endswith("attn_k.weight.lora_b"):
            return unpermute(data, cfg.num_key_value_heads)
        return data

    rewrite_adapter(adapter, bad, tensor_fn=unperm)
    same, _ = llamacpp_logits(model, adapter, N_CTX)
    rewrite_adapter(adapter, work / "roundtrip.gguf")
    rt, _ = llamacpp_logits(model, work / "roundtrip.gguf", N_CTX)
    assert np.array_equal(rt, same), "gguf-py rewrite changed the adapter"
    ctl, _ = llamacpp_logits(model, bad, N_CTX)
    ctl_ok, rows = compare("control: unpermuted", cpp_base, ctl, hf_base, hf_lora, effect_only=True)
    table += rows[:1]
    # Negative control 2: qwen2 (rsLoRA + patterns) as convert_lora_to_gguf.py writes it
    # (make_gguf_fixtures.py's replica: one plain lora_alpha, patterns and rsLoRA ignored).
    cfg, model, adapter, cpp_base, hf_base, hf_lora = results["qwen2"]
    mgf.OUT = work
    mgf.convert_adapter("converter_qwen2", CASES["qwen2"][1], CASES["qwen2"][0])
    ctl, _ = llamacpp_logits(model, work / "adapter_converter_qwen2.gguf", N_CTX)
    ctl2_ok, rows = compare("control: converter", cpp_base, ctl, hf_base, hf_lora, effect_only=True)
    table += rows[:1]
    controls_ok = not ctl_ok and not ctl2_ok

    # Bad inputs: llama.cpp must refuse.
    refusals = []
    for what, model in (("mistral adapter on qwen3 model", results["qwen3"][1]),
                        ("mistral adapter on llama3_rope model", results["llama3_rope"][1])):
        try:
            llamacpp_logits(model, results["mistral"][2], N_CTX)
            refusals.append((what, False, "loaded (should have been refused)"))
        except RuntimeError as e:
            msg = [l.strip() for l in str(e).splitlines() if "failed to apply lora" in l]
            refusals.append((what, True, msg[0] if msg else str(e).splitlines()[0]))

    print("\n" + "\n".join(table))
    print(f"\nnegative controls fail as they must: {'ok' if controls_ok else 'NO (test has no teeth)'}")
    for what, refused, msg in refusals:
        print(f"bad input, {what}: {'refused' if refused else 'NOT refused'}: {msg}")
    all_ok &= controls_ok and all(r for _, r, _ in refusals)
    print("\nRESULT:", "PASS" if all_ok else "FAIL")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
