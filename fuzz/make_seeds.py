"""Writes the seeds and hand-made inputs of the `checkpoint_folder` and `checkpoint_file` fuzz
targets (formats in fuzz/src/exercise.rs), from the transformers / PEFT fixtures of
tests/fixtures/checkpoints/:

- fuzz/adapters/{lora,dora}/: the tiny Llama's PEFT LoRA and DoRA adapters trimmed to one
  module, `model.layers.0.self_attn.q_proj` (config trimmed to the keys lorakit reads); the
  harness embeds them (`include_bytes!`) and merges one of them into every input.
- fuzz/corpus/checkpoint_folder/, fuzz/corpus/checkpoint_file/: seeds. Four of the Llama's
  tensors (q_proj, k_proj, input_layernorm, norm; f32 or bf16) re-split into two shards with
  a matching index, and variants whose index and shards disagree.
- fuzz/regressions/checkpoint_folder/, fuzz/regressions/checkpoint_file/: hand-made nasty
  inputs replayed by tests/suite/fuzz_regressions.rs (inputs the fuzzer finds are copied
  in next to these, unchanged).

Standard library only; deterministic. Run from the repository root:

    python3 fuzz/make_seeds.py
"""
import json
import os
import shutil
import struct

SEP = b"\n\xffLORAKIT-FUZZ-PART\xff\n"
FIX = "tests/fixtures/checkpoints"
SHARD_A = "model-00001-of-00002.safetensors"
SHARD_B = "model-00002-of-00002.safetensors"
Q = "model.layers.0.self_attn.q_proj"

# Options byte of both targets (see exercise.rs): bits 0-1 output dtype (keep, f32, f16,
# bf16), bit 2 the DoRA adapter (else LoRA), bit 3 (folder) base named by its index file /
# (file) no previous output, bit 4 (folder) an empty output folder exists, bit 5 a leftover
# of a killed run beside the output, bit 6 `remove_leftovers`.
KEEP, F32, F16, BF16 = 0, 1, 2, 3
DORA, VIA_INDEX, NO_PREVIOUS, OUT_DIR, LEFTOVER, REMOVE = 4, 8, 8, 16, 32, 64


def read_st(path):
    """(tensors {name: (dtype, shape, bytes)}, __metadata__) of a safetensors file."""
    with open(path, "rb") as f:
        b = f.read()
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    data = b[8 + n :]
    tensors = {}
    for name, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        s, e = v["data_offsets"]
        tensors[name] = (v["dtype"], v["shape"], data[s:e])
    return tensors, meta


def st(tensors, meta=None, raw_header=None):
    """A safetensors file from {name: (dtype, shape, bytes)} in this order, header padded to
    8 bytes as safetensors writes it."""
    header, data, off = {}, b"", 0
    if meta is not None:
        header["__metadata__"] = meta
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(blob)]}
        data += blob
        off += len(blob)
    h = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def index(weight_map, total_size):
    return json.dumps(
        {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2,
    ).encode() + b"\n"


def write(path, blob):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob)


def pick(tensors, names):
    return {n: tensors[n] for n in names}


# --- adapters: PEFT's, trimmed to q_proj of layer 0 ---------------------------------------
KEEP_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "use_dora", "use_rslora",
             "fan_in_fan_out", "bias", "lora_dropout", "base_model_name_or_path",
             "rank_pattern", "alpha_pattern"]
for kind in ["lora", "dora"]:
    src = f"{FIX}/llama_adapters/{kind}"
    with open(f"{src}/adapter_config.json") as f:
        cfg = json.load(f)
    cfg = {k: cfg[k] for k in KEEP_KEYS if k in cfg}
    cfg["target_modules"] = [Q]
    weights, meta = read_st(f"{src}/adapter_model.safetensors")
    weights = {n: t for n, t in weights.items() if f".{Q}." in n}
    assert weights, kind
    dst = f"fuzz/adapters/{kind}"
    shutil.rmtree(dst, ignore_errors=True)
    write(f"{dst}/adapter_config.json", json.dumps(cfg, indent=2).encode() + b"\n")
    write(f"{dst}/adapter_model.safetensors", st(weights, meta))

# --- base tensors --------------------------------------------------------------------------
f32, meta = read_st(f"{FIX}/llama_f32_single/model.safetensors")
bf16, _ = read_st(f"{FIX}/llama_bf16_single/model.safetensors")
LN = "model.layers.0.input_layernorm.weight"
K = "model.layers.0.self_attn.k_proj.weight"
NORM = "model.norm.weight"
A_NAMES, B_NAMES = [Q + ".weight", LN], [K, NORM]


def folder_input(options, tensors_a, tensors_b, weight_map=None, config=None, idx=None):
    """options byte ++ index.json, SEP, shard A, SEP, shard B [, SEP, config.json]."""
    a, b = st(tensors_a, meta), st(tensors_b, meta)
    if idx is None:
        if weight_map is None:
            weight_map = {**{n: SHARD_A for n in tensors_a}, **{n: SHARD_B for n in tensors_b}}
        total = sum(len(t[2]) for t in list(tensors_a.values()) + list(tensors_b.values()))
        idx = index(weight_map, total)
    parts = [idx, a, b] + ([config] if config is not None else [])
    return bytes([options]) + SEP.join(parts)


def file_input(options, blob):
    return bytes([options]) + blob


def clean(d):
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)


# --- checkpoint_folder seeds ---------------------------------------------------------------
D = "fuzz/corpus/checkpoint_folder"
clean(D)
fa, fb = pick(f32, A_NAMES), pick(f32, B_NAMES)
ba, bb = pick(bf16, A_NAMES), pick(bf16, B_NAMES)
# Extra non-float and half tensors: copied as they are, never converted.
mixed_b = {
    **fb,
    "model.position_ids": ("I64", [1, 7], struct.pack("<7q", *range(7))),
    "model.mask": ("BOOL", [2, 4], bytes([1, 0, 1, 1, 0, 0, 1, 0])),
    "model.codes": ("U8", [5], bytes([1, 2, 3, 250, 255])),
    "model.half": ("F16", [2, 2], struct.pack("<4e", 1.0, -2.5, 0.0, 65504.0)),
}
seeds = {
    "f32_keep_lora": folder_input(KEEP, fa, fb),
    "f32_to_bf16_dora": folder_input(BF16 | DORA, fa, fb),
    "bf16_to_f32_via_index_out_dir": folder_input(F32 | VIA_INDEX | OUT_DIR, ba, bb),
    "f32_to_f16_leftover_kept": folder_input(F16 | LEFTOVER, fa, fb),
    "bf16_dora_leftover_removed": folder_input(DORA | LEFTOVER | REMOVE, ba, bb),
    "mixed_dtypes_to_bf16": folder_input(BF16, fa, mixed_b),
    "other_model_config": folder_input(
        KEEP, fa, fb, config=b'{"_name_or_path": "Qwen/Qwen2.5-0.5B", "model_type": "qwen2"}'),
    # No index: two .safetensors files, an error (which one?); one file: a plain folder.
    "no_index_two_files": bytes([KEEP]) + SEP.join([b"", st(fa, meta), st(fb, meta)]),
    "no_index_one_file": bytes([KEEP]) + SEP.join([b"", st({**fa, **fb}, meta), b""]),
    # Index and shards that disagree.
    "moved_tensor": folder_input(KEEP, fa, fb, {**{n: SHARD_A for n in A_NAMES}, K: SHARD_A,
                                                 NORM: SHARD_B}),
    "unlisted_tensor": folder_input(KEEP, fa, fb, {**{n: SHARD_A for n in A_NAMES}, K: SHARD_B}),
    "listed_not_held": folder_input(KEEP, fa, fb, {**{n: SHARD_A for n in A_NAMES},
                                                    K: SHARD_B, NORM: SHARD_B,
                                                    "lm_head.weight": SHARD_B}),
    "dotdot_shard": folder_input(KEEP, fa, fb, {**{n: SHARD_A for n in A_NAMES},
                                                 K: "../" + SHARD_B, NORM: "../" + SHARD_B}),
    "one_of_two_shards": folder_input(KEEP, {**fa, **fb}, {}, {n: SHARD_A for n in A_NAMES + B_NAMES}),
    "weight_map_missing": folder_input(KEEP, fa, fb, idx=b'{"metadata": {"total_size": 1664}}'),
}
trunc = folder_input(KEEP, fa, fb).rsplit(SEP, 1)
seeds["truncated_shard"] = trunc[0] + SEP + trunc[1][:-5]
seeds["trailing_bytes_shard"] = trunc[0] + SEP + trunc[1] + b"\0" * 8
for name, blob in seeds.items():
    write(f"{D}/{name}", blob)

# --- checkpoint_file seeds -----------------------------------------------------------------
D = "fuzz/corpus/checkpoint_file"
clean(D)
f_all, b_all = {**fa, **fb}, {**ba, **bb}
good = st(f_all, meta)
n = struct.unpack("<Q", good[:8])[0]
seeds = {
    "f32_keep_lora": file_input(KEEP, good),
    "f32_to_bf16_dora": file_input(BF16 | DORA, good),
    "bf16_to_f32_no_previous": file_input(F32 | NO_PREVIOUS, st(b_all, meta)),
    "f32_to_f16_leftover_kept": file_input(F16 | LEFTOVER, good),
    "bf16_dora_leftover_removed": file_input(DORA | LEFTOVER | REMOVE, st(b_all, meta)),
    "mixed_dtypes_to_bf16": file_input(BF16, st({**fa, **mixed_b}, meta)),
    "no_metadata": file_input(KEEP, st(f_all)),
    "truncated": file_input(KEEP, good[:-5]),
    "trailing_bytes": file_input(KEEP, good + b"\0" * 8),
    "header_past_end": file_input(KEEP, struct.pack("<Q", len(good)) + good[8:]),
    "offsets_gap": file_input(KEEP, st(f_all, meta, raw_header=good[8 : 8 + n].replace(
        b'"data_offsets":[0,1024]', b'"data_offsets":[4,1028]'))),
}
assert seeds["offsets_gap"] != seeds["f32_keep_lora"]
for name, blob in seeds.items():
    write(f"{D}/{name}", blob)

# --- hand-made nasty inputs (tests/suite/fuzz_regressions.rs) ------------------------------
D = "fuzz/regressions/checkpoint_folder"
os.makedirs(D, exist_ok=True)
tiny = {"w": ("F32", [1], bytes(4))}
nasty = {
    # An index that announces 99,999,999,999 shards but lists one.
    "announced_shards_huge.bin": folder_input(
        KEEP, tiny, {}, {"w": "model-00001-of-99999999999.safetensors"}),
    "index_not_object.bin": folder_input(KEEP, fa, fb, idx=b"[1, 2]"),
    "weight_map_not_string.bin": folder_input(KEEP, fa, fb, idx=b'{"weight_map": {"w": 5}}'),
    "weight_map_empty.bin": folder_input(KEEP, fa, fb, idx=b'{"weight_map": {}}'),
    "absolute_shard.bin": folder_input(KEEP, fa, fb, {n: "/etc/passwd" for n in A_NAMES + B_NAMES}),
    # A 4-bit tensor: 3 bytes for 6 elements; the index's total_size must count them.
    "f4_tensor.bin": folder_input(KEEP, fa, {**fb, "model.f4": ("F4", [6], bytes([1, 2, 3]))}),
    # A shard named like the folder's other files (`config.json`): written merged, it must
    # not be replaced by the copy of the input's `config.json`.
    "shard_named_config_json.bin": bytes([KEEP]) + SEP.join([
        index({**{n: "config.json" for n in A_NAMES}, **{n: SHARD_B for n in B_NAMES}}, 1664),
        b"", st(fb, meta), st(fa, meta)]),
    # No `metadata`: the output index gets one with total_size.
    "index_without_metadata.bin": folder_input(KEEP, fa, fb, idx=json.dumps({
        "weight_map": {**{n: SHARD_A for n in A_NAMES}, **{n: SHARD_B for n in B_NAMES}}}).encode()),
    # A non-object `metadata`: passed through as it is (no total_size).
    "metadata_not_object.bin": folder_input(KEEP, fa, fb, idx=json.dumps({
        "metadata": 5, "weight_map": {**{n: SHARD_A for n in A_NAMES},
                                      **{n: SHARD_B for n in B_NAMES}}}).encode()),
}
for name, blob in nasty.items():
    write(f"{D}/{name}", blob)

D = "fuzz/regressions/checkpoint_file"
os.makedirs(D, exist_ok=True)
U8_MAX = 2**61 - 1  # the most bytes a tensor may declare (its bit count fits in 64 bits)
nasty = {
    "huge_header_length.bin": file_input(KEEP, struct.pack("<Q", 2**63) + b"{}"),
    "short_file.bin": file_input(KEEP, b"\x08\0\0"),
    # Eight U8 tensors of 2^61 - 1 bytes each: their end offset plus the header's length
    # overflows 64 bits.
    "data_len_overflow.bin": file_input(KEEP, st({}, raw_header=json.dumps({
        f"t{i}": {"dtype": "U8", "shape": [U8_MAX], "data_offsets": [i * U8_MAX, (i + 1) * U8_MAX]}
        for i in range(8)}).encode())),
    # A zero-element 3-D tensor whose strides overflow: [0, 2^33, 2^33].
    "zero_elements_huge_dims.bin": file_input(KEEP, st({**f_all, "z": ("F32", [0, 2**33, 2**33], b"")})),
    "f4_tensor.bin": file_input(KEEP, st({**f_all, "model.f4": ("F4", [6], bytes([1, 2, 3]))})),
    "target_wrong_dtype.bin": file_input(KEEP, st({Q + ".weight": ("I32", [16, 16], bytes(1024))})),
    "target_3d.bin": file_input(KEEP, st({Q + ".weight": ("F32", [1, 16, 16], f32[Q + ".weight"][2])})),
    "target_wrong_shape.bin": file_input(KEEP, st({Q + ".weight": ("F32", [16, 8], bytes(512))})),
}
for name, blob in nasty.items():
    write(f"{D}/{name}", blob)
