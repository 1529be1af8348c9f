#!/usr/bin/env python3
"""The packed route's compiled register-block loops, counted, and their cycles per step in
`llvm-mca`'s models of other CPUs.

    python3 scripts/kernel_loops.py BINARY [--mca haswell,znver2,skylake-avx512] [--keep DIR]

BINARY is any release binary that links lorakit's packed route (the `compare_json` bench,
the library's test binary). The script disassembles each block's `multiply`
(`kernel::avx2::multiply`, `kernel::avx512::multiply`) with `objdump`, finds the loops that a
backward branch closes, and prints those with 12 or more FMAs and no stack references (the
depth loops of the widest row counts): how many FMAs, vector loads, broadcasts and
instructions a step of depth takes. With `--mca` it runs `llvm-mca` on each such loop for
each CPU named (`llvm-mca -mcpu=help` lists them) and prints the modeled cycles per step
and the model's dispatch width. A model is not a measurement: it says which loops a
narrower core's front end would hold back, not how fast a real one runs them.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

# The `multiply` of each vector set's block, as its mangled name contains it.
BLOCKS = {"avx2": "6kernel4avx28multiply", "avx512": "6kernel6avx5128multiply"}

ITERATIONS = 1000


def functions(binary):
    """Each block's instructions, as (address, text) pairs, from `objdump -d`."""
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-M", "intel", binary],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    found = {}
    for name, mangled in BLOCKS.items():
        heads = [i for i, line in enumerate(listing) if mangled in line and line.endswith(">:")]
        if not heads:
            sys.exit(f"{binary}: no `{name}` block (`{mangled}`) in its symbols")
        body = []
        for line in listing[heads[0] + 1:]:
            if not line.strip():
                break
            m = re.match(r"\s*([0-9a-f]+):\s+(.*)", line)
            if m:
                body.append((int(m.group(1), 16), re.sub(r"\s*#.*", "", m.group(2)).strip()))
        found[name] = body
    return found


def depth_loops(body):
    """The loops closed by a backward branch, with 12 or more FMAs and no stack reference."""
    index = {address: i for i, (address, _) in enumerate(body)}
    loops = []
    for end, (address, text) in enumerate(body):
        m = re.match(r"j\w+\s+([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) > address or int(m.group(1), 16) not in index:
            continue
        loop = [t for _, t in body[index[int(m.group(1), 16)]:end + 1]]
        if sum("fmadd" in t for t in loop) >= 12 and not any("rsp" in t for t in loop):
            loops.append(loop)
    return loops


def as_source(loop):
    """The loop as `llvm-mca` input: Intel syntax, its branch to a label of its own."""
    lines = [".intel_syntax noprefix", "loop:"]
    lines += ["  " + t.replace(" PTR", " ptr") for t in loop[:-1]]
    lines.append("  " + loop[-1].split()[0] + " loop")
    return "\n".join(lines) + "\n"


def modeled(source, cpu):
    """`llvm-mca`'s cycles per step of `source` on `cpu`, and its dispatch width; `None`
    where the model lacks one of the loop's instructions (AVX-512 on an AVX2 model)."""
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write(source)
    try:
        out = subprocess.run(
            ["llvm-mca", f"-mcpu={cpu}", f"-iterations={ITERATIONS}", f.name],
            capture_output=True, text=True,
        )
    finally:
        os.unlink(f.name)
    if "unsupported instruction" in out.stderr:
        return None
    if out.returncode != 0:
        sys.exit(f"llvm-mca -mcpu={cpu}: {out.stderr.strip()}")
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", out.stdout).group(1))
    width = int(re.search(r"Dispatch Width:\s+(\d+)", out.stdout).group(1))
    return cycles / ITERATIONS, width


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary")
    parser.add_argument("--mca", default="", help="comma-separated llvm-mca CPU names")
    parser.add_argument("--keep", help="write each loop's llvm-mca input into this folder")
    args = parser.parse_args()
    cpus = [c for c in args.mca.split(",") if c]
    for name, body in functions(args.binary).items():
        for n, loop in enumerate(depth_loops(body)):
            count = lambda word: sum(word in t for t in loop)  # noqa: E731
            loads = sum(t.startswith("vmovaps") or t.startswith("vmovups") for t in loop)
            print(f"{name} loop {n}: fmas {count('fmadd')} vector loads {loads} "
                  f"broadcasts {count('broadcast')} instructions {len(loop)}")
            source = as_source(loop)
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                with open(os.path.join(args.keep, f"{name}_{n}.s"), "w") as f:
                    f.write(source)
            for cpu in cpus:
                result = modeled(source, cpu)
                if result is None:
                    print(f"  llvm-mca -mcpu={cpu}: the model lacks the loop's instructions")
                    continue
                cycles, width = result
                print(f"  llvm-mca -mcpu={cpu}: {cycles:.2f} cycles a step "
                      f"(dispatch width {width})")


if __name__ == "__main__":
    main()
