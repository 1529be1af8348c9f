#!/usr/bin/env bash
# The GPU check of issue "CUDA that has run", in two halves:
#
#   scripts/gpu-check.sh build   # here: a Rust toolchain, no GPU needed
#   scripts/gpu-check.sh run     # on the GPU machine: CUDA driver, PyTorch, PEFT; no Rust
#
# `build` compiles the `cuda` test binary (tests/cuda) and the `gpu_json` bench binary in
# the test profile (dependencies at opt-level 3; no release rebuild of candle's kernels),
# strips them and packs them into gpu-bundle/bins.tar.xz (git-ignored), with
# benches/gpu_compare.py and the CUDA runtime library they link; the bundle's size is
# printed (7.6 MiB on 2026-12-02, 6.8 of them the binaries' archive; it must fit the 64 MiB
# a device run carries).
# Linking needs the CUDA libraries' names only: where they are absent (no CUDA toolkit
# here, only PyPI's compiler) it links against stub libraries generated from the symbols
# cudarc uses, with the real libraries' sonames (libcuda.so.1, libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13), so the binaries load the GPU
# machine's real ones.
#
# `run` (from the repository root there, with gpu-bundle/ carried:
# `run(command = "bash scripts/gpu-check.sh run", carry = ["gpu-bundle"])`) unpacks the
# binaries, runs the CUDA tests, then the side-by-side timings against PEFT
# (benches/gpu_compare.py), writing gpu-check.log, gpu-compare.md and gpu-compare.json
# into $OUT (or gpu-bundle/out). It has not run yet (no GPU so far): whether binaries
# linked on this machine's image start on the GPU machine's is unverified; copy what it
# prints into benches/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=gpu-bundle

build() {
    source scripts/cuda-env.sh
    stubs
    local start; start=$(date +%s)
    local args=(--features cuda --target-dir target-cuda --no-run --message-format=json)
    local test_bin bench_bin
    test_bin=$(cargo test "${args[@]}" --test cuda | executable cuda)
    bench_bin=$(cargo test "${args[@]}" --bench gpu_json | executable gpu_json)
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
    strip -o "$BUNDLE/cuda_tests" "$test_bin"
    strip -o "$BUNDLE/gpu_json" "$bench_bin"
    # Stripped, the two are ~60 MiB each (candle-kernels' PTX and quantized-matmul code);
    # one xz archive of both is ~9 MiB (they share most bytes), within what a run carries.
    tar -C "$BUNDLE" -cf - cuda_tests gpu_json | xz -9 -T2 > "$BUNDLE/bins.tar.xz"
    rm "$BUNDLE/cuda_tests" "$BUNDLE/gpu_json"
    cp benches/gpu_compare.py "$BUNDLE/"
    # The CUDA runtime the binaries were linked with, as a fallback for a GPU machine
    # whose toolkit or wheels lack libcudart.so.13 (`run` puts it last on the path).
    mkdir -p "$BUNDLE/lib"
    cp -L "$CUDA_ROOT/lib/libcudart.so.13" "$BUNDLE/lib/"
    echo "gpu-check build: $(du -sh "$BUNDLE" | cut -f1) in $BUNDLE/ after $(( $(date +%s) - start )) s"
}

# The path of the test-harness executable of target $1 in cargo's JSON messages (cargo
# also builds the crate's `lorakit` binary for integration tests: not that one).
executable() {
    python3 -c 'import json,sys
exe=[m["executable"] for m in map(json.loads, sys.stdin)
     if m.get("reason")=="compiler-artifact" and m.get("executable")
     and m["target"]["name"]==sys.argv[1] and m["profile"]["test"]]
if len(exe)!=1: sys.exit(f"gpu-check: no single test executable for {sys.argv[1]}: {exe}")
print(exe[0])' "$1"
}

# Stub libraries for the CUDA libraries cudarc links, where the real ones are absent.
stubs() {
    local lib="$CUDA_ROOT/lib"
    declare -A soname=(
        [cuda]=libcuda.so.1 [cublas]=libcublas.so.13 [cublasLt]=libcublasLt.so.13
        [curand]=libcurand.so.10 [nvrtc]=libnvrtc.so.13
    )
    local rlib
    rlib=$(ls target-cuda/debug/deps/libcudarc-*.rlib 2>/dev/null | head -1 || true)
    if [ -z "$rlib" ]; then
        cargo build --features cuda --lib --target-dir target-cuda
        rlib=$(ls target-cuda/debug/deps/libcudarc-*.rlib | head -1)
    fi
    local syms; syms=$(mktemp)
    nm -u "$rlib" 2>/dev/null | awk '{print $2}' | grep -E '^(cu|nvrtc)' | sort -u > "$syms"
    for name in "${!soname[@]}"; do
        [ -e "$lib/lib$name.so" ] && continue
        local pattern
        case $name in
            cublasLt) pattern='^cublasLt' ;;
            cublas) pattern='^cublas[^L]' ;;
            curand) pattern='^curand' ;;
            nvrtc) pattern='^nvrtc' ;;
            cuda) pattern='^cu[A-Z]' ;;
        esac
        grep -E "$pattern" "$syms" | sed 's/.*/void &(void) {}/' > "$lib/stub_$name.c" || true
        cc -shared -fPIC -Wl,-soname,"${soname[$name]}" -o "$lib/lib$name.so" "$lib/stub_$name.c"
        rm -f "$lib/stub_$name.c"
    done
    rm -f "$syms"
    # candle-kernels links `-lcudart`; PyPI's runtime wheel ships only the versioned name.
    if [ ! -e "$lib/libcudart.so" ] && [ -e "$lib/libcudart.so.13" ]; then
        ln -s libcudart.so.13 "$lib/libcudart.so"
    fi
}

run() {
    local out=${OUT:-$BUNDLE/out}
    if [ ! -f "$BUNDLE/bins.tar.xz" ] && [ ! -x "$BUNDLE/cuda_tests" ]; then
        echo "gpu-check run: no $BUNDLE/bins.tar.xz: run 'scripts/gpu-check.sh build' first and carry $BUNDLE/" >&2
        exit 2
    fi
    mkdir -p "$out"
    # The binaries, unpacked with python's own lzma (no xz binary needed there).
    [ -x "$BUNDLE/cuda_tests" ] ||
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
            "$BUNDLE/bins.tar.xz" "$BUNDLE"
    # The real CUDA libraries: the toolkit's, or the ones PyTorch's wheels bring.
    local dirs
    dirs=$(python3 - <<'PY'
import glob, os, site
roots = site.getsitepackages() + ["/usr/local/cuda"]
found = set()
for r in roots:
    for name in ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13",
                 "libcudart.so.13"]:
        for p in glob.glob(os.path.join(r, "**", name), recursive=True):
            found.add(os.path.dirname(p))
print(":".join(sorted(found)))
PY
)
    export LD_LIBRARY_PATH="${dirs}:${LD_LIBRARY_PATH:-}:$(pwd)/$BUNDLE/lib"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu-check.log"
    echo "== CUDA tests" | tee -a "$out/gpu-check.log"
    "$BUNDLE/cuda_tests" --test-threads 1 2>&1 | tee -a "$out/gpu-check.log" ||
        echo "== CUDA tests FAILED" | tee -a "$out/gpu-check.log"
    echo "== side by side with PEFT" | tee -a "$out/gpu-check.log"
    python3 "$BUNDLE/gpu_compare.py" --lorakit-bin "$BUNDLE/gpu_json" \
        --markdown "$out/gpu-compare.md" --json "$out/gpu-compare.json" 2>&1 | tee -a "$out/gpu-check.log"
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *) echo "usage: scripts/gpu-check.sh build|run" >&2; exit 2 ;;
esac
