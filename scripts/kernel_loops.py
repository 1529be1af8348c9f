#!/usr/bin/env python3
"""The packed route's compiled register-block loops, counted, and their cycles per pass in
`llvm-mca`'s models of other CPUs.

    python3 scripts/kernel_loops.py BINARY [--mca haswell,znver2,skylake-avx512] [--keep DIR]

BINARY is a release build that links lorakit's packed route: the `compare_json` bench
(`cargo bench --bench compare_json --no-run`) or the library's tests built with `cargo test
--release --lib --no-run` (the plain test profile is not optimized like a release build).
The script disassembles each block's `multiply` (`kernel::avx2::multiply`,
`kernel::avx512::multiply`) with `objdump` and prints each innermost loop (closed by a
backward branch, with no other loop inside) that has at least two FMAs: its FMAs, vector
loads, broadcasts, stack references (a register spilled in the loop) and instructions a pass
of the loop, and its instructions per FMA. A pass is four steps of depth in each row
count's main loop, and one in the loop after it that takes the last `depth % 4` steps
(`kernel::accumulate`), or two where LLVM unrolls that loop too (at c1a2b04, AVX2's 1- and
2-row blocks and AVX-512's 1-row one); a step of the six-row block is twelve FMAs on AVX2
and 24 on AVX-512. The counts go by mnemonic: a vector load is a `vmovaps`/`vmovups` from memory, an
FMA with a memory operand counts as an FMA and not a load, AVX-512's embedded broadcasts
are not counted as broadcasts, and a stack reference is any `rsp` or `rbp` operand.

With `--mca` it runs `llvm-mca` on each loop for each CPU named (`llvm-mca -mcpu=help` lists
them) and prints the modeled cycles per pass, FMAs per cycle and the model's dispatch
width; loops on AVX-512 registers only on the models of CPUs with AVX-512
(`AVX512_MODELS`). A model is not
a measurement: it says which loops a narrower core's front end would hold back, not how fast
a real one runs them.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import quiet_pipe  # scripts/quiet_pipe.py, beside this file

# The `multiply` of each vector set's block, as its mangled name contains it.
BLOCKS = {"avx2": "6kernel4avx28multiply", "avx512": "6kernel6avx5128multiply"}

# `llvm-mca` CPU names of x86 CPUs with AVX-512F (LLVM 14 and later), on whose models the
# AVX-512 loops are run. Some models without AVX-512 accept its instructions and print
# cycles that mean nothing, so the script does not rely on `llvm-mca` refusing them.
AVX512_MODELS = {
    "knl", "knm", "skylake-avx512", "skx", "cascadelake", "cooperlake", "cannonlake",
    "icelake-client", "icelake-server", "tigerlake", "rocketlake", "sapphirerapids",
    "emeraldrapids", "graniterapids", "znver4", "znver5", "x86-64-v4",
}

ITERATIONS = 1000


def need(tool):
    if shutil.which(tool) is None:
        sys.exit(f"kernel_loops.py: `{tool}` is not on PATH")


def functions(binary):
    """Each block's instructions, as (address, text) pairs, from `objdump -d`."""
    need("objdump")
    run = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-M", "intel", binary],
        capture_output=True, text=True,
    )
    if run.returncode != 0:
        sys.exit(f"objdump {binary}: {run.stderr.strip()}")
    listing = run.stdout.splitlines()
    found = {}
    for name, mangled in BLOCKS.items():
        heads = [i for i, line in enumerate(listing) if mangled in line and line.endswith(">:")]
        if len(heads) != 1:
            sys.exit(f"{binary}: {len(heads)} symbols for the `{name}` block (`{mangled}`), "
                     "expected one")
        body = []
        for line in listing[heads[0] + 1:]:
            if not line.strip():
                break
            m = re.match(r"\s*([0-9a-f]+):\s+(.*)", line)
            if m:
                body.append((int(m.group(1), 16), re.sub(r"\s*#.*", "", m.group(2)).strip()))
        found[name] = body
    return found


def backward_branches(body):
    """(first, last) indices of each loop: a branch at `last` back to `first`."""
    index = {address: i for i, (address, _) in enumerate(body)}
    for last, (address, text) in enumerate(body):
        m = re.match(r"j\w+\s+([0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= address and int(m.group(1), 16) in index:
            yield index[int(m.group(1), 16)], last


def innermost_loops(body):
    """The loops with at least two FMAs and no other loop inside them, as their texts."""
    loops = list(backward_branches(body))
    for first, last in loops:
        if any(first <= f and l <= last and (f, l) != (first, last) for f, l in loops):
            continue
        loop = [text for _, text in body[first:last + 1]]
        if sum("fmadd" in t for t in loop) >= 2:
            yield loop


def as_source(loop):
    """The loop as `llvm-mca` input: Intel syntax, its branch to a label of its own."""
    lines = [".intel_syntax noprefix", ".Lstep:"]
    lines += ["  " + t for t in loop[:-1]]
    lines.append("  " + loop[-1].split()[0] + " .Lstep")
    return "\n".join(lines) + "\n"


def modeled(mca, source, cpu):
    """`llvm-mca`'s cycles per pass of `source` on `cpu`, and its dispatch width."""
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write(source)
    try:
        out = subprocess.run(
            [mca, f"-mcpu={cpu}", f"-iterations={ITERATIONS}", f.name],
            capture_output=True, text=True,
        )
    finally:
        os.unlink(f.name)
    cycles = re.search(r"Total Cycles:\s+(\d+)", out.stdout)
    width = re.search(r"Dispatch Width:\s+(\d+)", out.stdout)
    if out.returncode != 0 or not cycles or not width:
        sys.exit(f"{mca} -mcpu={cpu}: {(out.stderr or out.stdout).strip()[:500]}")
    return int(cycles.group(1)) / ITERATIONS, int(width.group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary")
    parser.add_argument("--mca", default="", help="comma-separated llvm-mca CPU names")
    parser.add_argument("--llvm-mca", default="llvm-mca", help="the llvm-mca to run")
    parser.add_argument("--keep", help="write each loop's llvm-mca input into this folder")
    args = parser.parse_args()
    cpus = [c for c in args.mca.split(",") if c]
    if cpus:
        need(args.llvm_mca)
    for name, body in functions(args.binary).items():
        for n, loop in enumerate(innermost_loops(body)):
            count = lambda word: sum(word in t for t in loop)  # noqa: E731
            loads = sum(bool(re.match(r"vmov[au]ps\s+[xyz]mm\d+,\s*\w*\s*ptr", t, re.I))
                        for t in loop)
            fmas = count("fmadd")
            print(f"{name} loop {n}: fmas {fmas} vector loads {loads} "
                  f"broadcasts {count('broadcast')} stack refs {count('rsp') + count('rbp')} "
                  f"instructions {len(loop)} ({len(loop) / fmas:.2f} an FMA)")
            source = as_source(loop)
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                with open(os.path.join(args.keep, f"{name}_{n}.s"), "w") as f:
                    f.write(source)
            for cpu in cpus:
                if "zmm" in source and cpu not in AVX512_MODELS:
                    print(f"  llvm-mca -mcpu={cpu}: skipped (AVX-512 loop, CPU without it)")
                    continue
                cycles, width = modeled(args.llvm_mca, source, cpu)
                print(f"  llvm-mca -mcpu={cpu}: {cycles:.2f} cycles a pass, "
                      f"{fmas / cycles:.2f} FMAs a cycle (dispatch width {width})")


if __name__ == "__main__":
    quiet_pipe.run(main)
