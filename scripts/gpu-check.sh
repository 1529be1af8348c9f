#!/usr/bin/env bash
# The GPU check of issue "CUDA that has run", in two halves:
#
#   scripts/gpu-check.sh build   # here: a Rust toolchain, no GPU needed
#   scripts/gpu-check.sh run     # on the GPU machine: CUDA driver, PyTorch, PEFT; no Rust
#
# `build` compiles the `cuda` test binary (tests/cuda) and the `gpu_json` bench binary in
# the test profile (dependencies at opt-level 3; no release rebuild of candle's kernels),
# strips them and copies them into gpu-bundle/ (git-ignored; the size is printed: it must fit the 64 MiB a device run carries) with
# benches/gpu_compare.py. Linking needs the CUDA libraries' names only: where they are
# absent (no CUDA toolkit here, only PyPI's compiler) it links against stub libraries
# generated from the symbols cudarc uses, with the real libraries' sonames
# (libcuda.so.1, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13), so
# the binaries load the GPU machine's real ones.
#
# `run` (from the repository root there, with gpu-bundle/ carried) runs the CUDA tests,
# then the side-by-side timings against PEFT (benches/gpu_compare.py), writing
# gpu-check.log, gpu-compare.md and gpu-compare.json into $OUT (or gpu-bundle/out). It
# has not run yet (no GPU so far); copy what it prints into benches/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=gpu-bundle

build() {
    source scripts/cuda-env.sh
    stubs
    local start; start=$(date +%s)
    local args=(--features cuda --target-dir target-cuda --no-run --message-format=json)
    local test_bin bench_bin
    test_bin=$(cargo test "${args[@]}" --test cuda | executable)
    bench_bin=$(cargo test "${args[@]}" --bench gpu_json | executable)
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
    strip -o "$BUNDLE/cuda_tests" "$test_bin"
    strip -o "$BUNDLE/gpu_json" "$bench_bin"
    cp benches/gpu_compare.py "$BUNDLE/"
    echo "gpu-check build: $(du -sh "$BUNDLE" | cut -f1) in $BUNDLE/ after $(( $(date +%s) - start )) s"
}

# The path of the executable cargo's JSON messages name last.
executable() {
    python3 -c 'import json,sys
exe=[m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable")]
print(exe[-1])'
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
}

run() {
    local out=${OUT:-$BUNDLE/out}
    mkdir -p "$out"
    # The real CUDA libraries: the toolkit's, or the ones PyTorch's wheels bring.
    local dirs
    dirs=$(python3 - <<'PY'
import glob, os, site
roots = site.getsitepackages() + ["/usr/local/cuda"]
found = set()
for r in roots:
    for name in ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13"]:
        for p in glob.glob(os.path.join(r, "**", name), recursive=True):
            found.add(os.path.dirname(p))
print(":".join(sorted(found)))
PY
)
    export LD_LIBRARY_PATH="${dirs}:${LD_LIBRARY_PATH:-}"
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
