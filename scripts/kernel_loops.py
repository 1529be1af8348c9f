#!/usr/bin/env python3
"""The packed route's compiled register-block loops, counted, and their cycles per pass in
`llvm-mca`'s models of other CPUs.

    python3 scripts/kernel_loops.py [--mca haswell,znver2,skylake-avx512] [--keep DIR]

It runs the test that reads the loops back from the optimized test binary
(`src/kernels/cpu/packed/kernel/compiled_loops.rs`: `cargo test --release --lib
compiled_loops`, in the repository this script is in, with cargo's usual
`CARGO_TARGET_DIR`), which disassembles each block's `multiply` (`kernel::avx2::multiply`,
`kernel::avx512::multiply`) with `objdump`, prints each innermost loop (closed by a
backward branch, with no other loop inside) that has at least two FMAs (its FMAs, vector
loads, broadcasts, stack references and instructions a pass), checks them, and writes each
as `llvm-mca` input into a folder. A pass is four steps of depth in each row count's main
loop, and one in the loop after it that takes the last `depth % 4` steps
(`kernel::accumulate`), or two where LLVM unrolls that loop too; a step of the six-row
block is twelve FMAs on AVX2 and 24 on AVX-512. The test's module doc says how it counts.

With `--mca` it runs `llvm-mca` on each loop for each CPU named (`llvm-mca -mcpu=help` lists
them) and prints the modeled cycles per pass, FMAs per cycle and the model's dispatch
width; loops on AVX-512 registers only on the models of CPUs with AVX-512
(`AVX512_MODELS`). A model is not a measurement: it says which loops a narrower core's
front end would hold back, not how fast a real one runs them.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import quiet_pipe  # scripts/quiet_pipe.py, beside this file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def write_loops(folder):
    """Runs the compiled-loops test, its loops written into `folder`; prints its counts."""
    need("cargo")
    need("objdump")
    env = dict(os.environ, LORAKIT_KERNEL_LOOPS_OUT=folder)
    run = subprocess.run(
        ["cargo", "test", "--release", "--quiet", "--lib", "compiled_loops", "--",
         "--nocapture"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    for line in run.stdout.splitlines():
        if " loop " in line:
            print(line)
    if run.returncode != 0:
        sys.exit(f"the compiled-loops test failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")


def modeled(mca, path, cpu):
    """`llvm-mca`'s cycles per pass of the loop in `path` on `cpu`, and its dispatch width."""
    out = subprocess.run(
        [mca, f"-mcpu={cpu}", f"-iterations={ITERATIONS}", path],
        capture_output=True, text=True,
    )
    cycles = re.search(r"Total Cycles:\s+(\d+)", out.stdout)
    width = re.search(r"Dispatch Width:\s+(\d+)", out.stdout)
    if out.returncode != 0 or not cycles or not width:
        sys.exit(f"{mca} -mcpu={cpu}: {(out.stderr or out.stdout).strip()[:500]}")
    return int(cycles.group(1)) / ITERATIONS, int(width.group(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mca", default="", help="comma-separated llvm-mca CPU names")
    parser.add_argument("--llvm-mca", default="llvm-mca", help="the llvm-mca to run")
    parser.add_argument("--keep", help="keep each loop's llvm-mca input in this folder")
    args = parser.parse_args()
    cpus = [c for c in args.mca.split(",") if c]
    if cpus:
        need(args.llvm_mca)
    with tempfile.TemporaryDirectory() as scratch:
        folder = os.path.abspath(args.keep) if args.keep else scratch
        write_loops(folder)
        if not cpus:
            return
        key = lambda name: (name.split("_")[0], int(re.sub(r"\D", "", name.split("_")[1])))  # noqa: E731
        for name in sorted((n for n in os.listdir(folder) if n.endswith(".s")), key=key):
            path = os.path.join(folder, name)
            with open(path) as f:
                source = f.read()
            fmas = source.count("fmadd")
            print(f"{name[:-2]}:")
            for cpu in cpus:
                if "zmm" in source and cpu not in AVX512_MODELS:
                    print(f"  llvm-mca -mcpu={cpu}: skipped (AVX-512 loop, CPU without it)")
                    continue
                cycles, width = modeled(args.llvm_mca, path, cpu)
                print(f"  llvm-mca -mcpu={cpu}: {cycles:.2f} cycles a pass, "
                      f"{fmas / cycles:.2f} FMAs a cycle (dispatch width {width})")


if __name__ == "__main__":
    quiet_pipe.run(main)
