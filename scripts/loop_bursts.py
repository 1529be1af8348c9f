#!/usr/bin/env python3
"""How much of its best rate a register-block loop keeps, moment by moment, on a shared
host: replicas of the packed route's six-row AVX2 loop at 1, 2 and 4 steps of depth a
pass, and of its AVX-512 loop at one, timed in turns of short bursts on every CPU at once.

    python3 scripts/loop_bursts.py [--rounds 20000] [--cpus 0,1] [--keep DIR]

The loops are written out in assembly (the same instructions a step as lorakit's compiled
`kernel::accumulate`: two aligned loads of the column panel, six broadcasts from the rows,
twelve FMAs; AVX-512: four loads, six broadcasts, 24 FMAs; then the step's count, the
panel's pointer, a compare and the branch once a pass), so that no compiler decides how
they are unrolled. Each works on operands in L1 (96 steps deep). A round times each loop
for a burst of a millisecond or two, one after the other, the loop that starts a round
moving on by one each round; one process per CPU, pinned, runs its rounds while the others
run theirs, as the route's threads do. A burst is timed by the wall clock, so anything that
takes the CPU from it (the host, or another process on this machine) counts against it.

It prints, per loop, the best rate (the 99th percentile of its bursts) and the fraction
of it that the loop kept at the 5th and 25th percentiles, the median and the mean; and
per unrolled loop, its rate over the one-step loop's in the same round. On a core of its
own each loop runs at the FMA rate; the fractions say how much each loses when the host
takes part of the core. Needs `cc` (gcc or clang), x86-64 Linux and AVX2 with FMA;
the AVX-512 loop runs only where `/proc/cpuinfo` lists `avx512f`.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import quiet_pipe  # scripts/quiet_pipe.py, beside this file

DEPTH = 96  # A multiple of 4: the unrolled loops end only on a whole pass.
assert DEPTH % 4 == 0
ROWS = ["%rdi", "%r9", "%r10", "%r11", "%rax", "%rsi"]


def head(name, reg, sums):
    """A System V function `name(rows, row_stride, panel, depth, out)`'s start: the six
    rows' starts in `ROWS`, the depth in bytes in `rcx`, the step's offset `r12` at 0,
    `sums` registers of kind `reg` zeroed, then the loop's label."""
    lines = [f".globl {name}", f".type {name},@function", f"{name}:", "push %r12",
             "shl $2, %rsi", "lea (%rdi,%rsi), %r9", "lea (%r9,%rsi), %r10",
             "lea (%r10,%rsi), %r11", "lea (%r11,%rsi), %rax", "add %rax, %rsi",
             "shl $2, %rcx", "xor %r12, %r12"]
    lines += [f"vxorps %{reg}{i}, %{reg}{i}, %{reg}{i}" if reg == "ymm"
              else f"vpxord %{reg}{i}, %{reg}{i}, %{reg}{i}" for i in range(sums)]
    return lines + [f".L{name}:"]


def tail(reg, sums):
    """The function's end: the sums added into one register and stored at `out`."""
    lines = [f"vaddps %{reg}{i}, %{reg}0, %{reg}0" for i in range(1, sums)]
    return lines + [f"vmovups %{reg}0, (%r8)", "vzeroupper", "pop %r12", "ret"]


def avx2_loop(unroll):
    """A six-row, two-register AVX2 block over `DEPTH` steps, `unroll` steps a pass, as a
    System V function `(rows, row_stride, panel, depth, out)`."""
    name = f"avx2_x{unroll}"
    lines = head(name, "ymm", 12)
    for u in range(unroll):
        lines += [f"vmovaps {64 * u}(%rdx), %ymm12", f"vmovaps {64 * u + 32}(%rdx), %ymm13"]
        for i, row in enumerate(ROWS):
            lines += [f"vbroadcastss {4 * u}({row},%r12), %ymm14",
                      f"vfmadd231ps %ymm12, %ymm14, %ymm{2 * i}",
                      f"vfmadd231ps %ymm13, %ymm14, %ymm{2 * i + 1}"]
    lines += [f"add ${4 * unroll}, %r12", f"add ${64 * unroll}, %rdx", "cmp %r12, %rcx",
              f"jne .L{name}"]
    return "\n".join(lines + tail("ymm", 12)) + "\n"


def avx512_loop():
    """The six-row, four-register AVX-512 block, one step a pass."""
    name = "avx512_x1"
    lines = head(name, "zmm", 24)
    lines += [f"vmovaps {64 * v}(%rdx), %zmm{24 + v}" for v in range(4)]
    for i, row in enumerate(ROWS):
        lines.append(f"vbroadcastss ({row},%r12), %zmm28")
        lines += [f"vfmadd231ps %zmm{24 + v}, %zmm28, %zmm{4 * i + v}" for v in range(4)]
    lines += ["add $4, %r12", "add $256, %rdx", "cmp %r12, %rcx", f"jne .L{name}"]
    return "\n".join(lines + tail("zmm", 24)) + "\n"


DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
typedef void (*Loop)(const float *, long, const float *, long, float *);
void avx2_x1(const float *, long, const float *, long, float *);
void avx2_x2(const float *, long, const float *, long, float *);
void avx2_x4(const float *, long, const float *, long, float *);
#ifdef WITH_AVX512
void avx512_x1(const float *, long, const float *, long, float *);
#endif
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(int argc, char **argv) {
  long depth = DEPTH, rounds = atol(argv[1]);
  float *rows = aligned_alloc(64, 6 * depth * 4), *panel = aligned_alloc(64, 64 * depth * 4);
  float out[16];
  for (long i = 0; i < 6 * depth; i++) rows[i] = 1e-3f * (i % 7);
  for (long i = 0; i < 64 * depth; i++) panel[i] = 1e-3f * (i % 5);
  Loop loops[] = {avx2_x1, avx2_x2, avx2_x4
#ifdef WITH_AVX512
                  , avx512_x1
#endif
  };
  long columns[] = {16, 16, 16, 64}, calls[] = {8000, 8000, 8000, 2000};
  int n = sizeof loops / sizeof loops[0];
  double rate[8];
  for (long r = 0; r < rounds; r++) {
    for (int j = 0; j < n; j++) {
      int v = (int)((r + j) % n);
      double t = now();
      for (long i = 0; i < calls[v]; i++) loops[v](rows, depth, panel, depth, out);
      t = now() - t;
      rate[v] = calls[v] * 12.0 * columns[v] * depth / t / 1e9;
    }
    for (int v = 0; v < n; v++) printf(v ? " %.3f" : "%.3f", rate[v]);
    printf("\n");
  }
  return out[0] > 1e30f;
}
"""


def cpu_flags():
    """The first CPU's flags in `/proc/cpuinfo` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(folder, avx512):
    """Writes the loops and the driver into `folder` and compiles them with `cc`: the
    binary's path."""
    source = os.path.join(folder, "loops.S")
    with open(source, "w") as f:
        f.write(".text\n" + "".join(avx2_loop(u) for u in (1, 2, 4)))
        if avx512:
            f.write(avx512_loop())
        f.write('.section .note.GNU-stack,"",@progbits\n')
    driver = os.path.join(folder, "driver.c")
    with open(driver, "w") as f:
        f.write(DRIVER)
    binary = os.path.join(folder, "loop_bursts")
    flags = [f"-DDEPTH={DEPTH}"] + (["-DWITH_AVX512"] if avx512 else [])
    compiled = subprocess.run(["cc", "-O2", *flags, driver, source, "-o", binary],
                              capture_output=True, text=True)
    if compiled.returncode != 0:
        sys.exit(f"loop_bursts.py: cc failed: {compiled.stderr.strip()[:800]}")
    return binary


def summarize(rows, names):
    for v, name in enumerate(names):
        rates = sorted(r[v] for r in rows)
        best = rates[int(len(rates) * 0.99)]
        kept = lambda p: rates[int(len(rates) * p)] / best  # noqa: E731
        print(f"{name:10s} best {best:6.1f} GFLOP/s  kept p5 {kept(0.05):.3f}  "
              f"p25 {kept(0.25):.3f}  median {kept(0.5):.3f}  "
              f"mean {statistics.mean(rates) / best:.3f}")
    for v in (1, 2):
        ratios = sorted(r[v] / r[0] for r in rows)
        q = lambda p: ratios[int(len(ratios) * p)]  # noqa: E731
        print(f"{names[v]} / {names[0]} in the same round: p10 {q(0.1):.3f}  "
              f"median {q(0.5):.3f}  p90 {q(0.9):.3f}  mean {statistics.mean(ratios):.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20000,
                        help="rounds on each CPU (default 20000, about two minutes)")
    parser.add_argument("--cpus", help="comma-separated CPUs, one process on each "
                        "(default: every CPU this process may run on)")
    parser.add_argument("--keep", help="write the sources, the binary and each CPU's "
                        "bursts into this folder")
    args = parser.parse_args()
    if args.rounds < 100:
        sys.exit("loop_bursts.py: --rounds must be at least 100")
    if shutil.which("cc") is None:
        sys.exit("loop_bursts.py: `cc` is not on PATH")
    allowed = os.sched_getaffinity(0)
    try:
        cpus = ([int(c) for c in args.cpus.split(",")] if args.cpus is not None
                else sorted(allowed))
    except ValueError:
        sys.exit(f"loop_bursts.py: --cpus {args.cpus}: not a list of CPU numbers")
    if not cpus or len(set(cpus)) != len(cpus) or any(c not in allowed for c in cpus):
        sys.exit(f"loop_bursts.py: --cpus {args.cpus}: give distinct CPUs among "
                 f"{sorted(allowed)}, the ones this process may run on")
    flags = cpu_flags()
    if not {"avx2", "fma"} <= flags:
        sys.exit("loop_bursts.py: this CPU does not report AVX2 and FMA (/proc/cpuinfo)")
    avx512 = "avx512f" in flags
    folder = args.keep or tempfile.mkdtemp(prefix="loop_bursts")
    try:
        run(args, cpus, avx512, folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def run(args, cpus, avx512, folder):
    """Builds the loops in `folder`, runs them on `cpus` and prints the summary."""
    os.makedirs(folder, exist_ok=True)
    binary = build(folder, avx512)
    outputs, procs = [], []
    try:
        for cpu in cpus:
            out = open(os.path.join(folder, f"bursts_cpu{cpu}.txt"), "w")
            outputs.append(out)
            procs.append(subprocess.Popen(
                [binary, str(args.rounds)], stdout=out,
                preexec_fn=lambda c=cpu: os.sched_setaffinity(0, {c})))
        failed = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for out in outputs:
            out.close()
    if any(failed):
        sys.exit(f"loop_bursts.py: a run failed (exit codes {failed}; CPUs {cpus})")
    rows = []
    for out in outputs:
        with open(out.name) as f:
            rows += [[float(x) for x in line.split()] for line in f]
    names = ["avx2 x1", "avx2 x2", "avx2 x4"] + (["avx512 x1"] if avx512 else [])
    print(f"{args.rounds} rounds on each of CPUs {cpus} ({len(rows)} in all), {DEPTH} "
          "steps deep, operands in L1")
    summarize(rows, names)


if __name__ == "__main__":
    quiet_pipe.run(main)
