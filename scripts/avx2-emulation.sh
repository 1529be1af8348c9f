#!/usr/bin/env bash
# benches/peft_compare.py on an AVX-512 x86 CPU as if it had AVX2 only, both sides:
#
#   scripts/avx2-emulation.sh [peft_compare.py's options, e.g. --threads 2 --rounds 3 --no-faults]
#
# There is no switch in the `gemm` crate that lowers its own AVX-512 detection (it asks
# `is_x86_feature_detected!` on every call), so this builds lorakit from a git worktree of
# HEAD whose Cargo.toml patches `gemm-common` with a copy in which
# `feature_detected!("avx512f")` answers false while `GEMM_NO_AVX512` is set. Nothing in
# the repository changes; the patched copy, a worktree per run (removed at exit) and the
# build live under $AVX2_EMULATION_DIR (default /tmp/lorakit-avx2-emulation;
# CARGO_TARGET_DIR, if set, is used as it is). Relative paths among the benchmark's
# options (`--markdown`) are taken from the directory the script is run in.
#
# Then it runs the benchmark with lorakit held to AVX2 (`LORAKIT_CPU_ISA=avx2`, which also
# picks the packed route's AVX2 block) and PyTorch too (`ATEN_CPU_CAPABILITY=avx2`,
# `MKL_ENABLE_INSTRUCTIONS=AVX2`, `ONEDNN_MAX_CPU_ISA=AVX2`). What it shows is AVX2 code
# on this CPU's caches and FMA units, not a CPU without AVX-512 (on a Zen 4, AVX2 and
# AVX-512 FMAs have the same peak; on Intel's server cores they do not). Whether MKL
# honours its variable on an AMD CPU is not reported by MKL. `benches/RESULTS.md`, "The
# packed route on AVX2", has the first runs (2026-12-06).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
work="${AVX2_EMULATION_DIR:-/tmp/lorakit-avx2-emulation}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"

version="$(grep -A1 '^name = "gemm-common"$' "$root/Cargo.lock" | sed -n 's/^version = "\(.*\)"$/\1/p' || true)"
if [ -z "$version" ]; then
  echo "avx2-emulation: no gemm-common in Cargo.lock" >&2
  exit 1
fi
(cd "$root" && cargo fetch --quiet --locked)
registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
source_dir="$(ls -d "$registry"/*/"gemm-common-$version" 2>/dev/null | head -1 || true)"
if [ -z "$source_dir" ]; then
  echo "avx2-emulation: gemm-common $version not found under $registry" >&2
  exit 1
fi

patched="$work/gemm-common-$version"
if [ ! -f "$patched/.avx2-emulation" ]; then
  rm -rf "$patched"
  cp -r "$source_dir" "$patched"
  python3 - "$patched/src/lib.rs" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
old = """macro_rules! feature_detected {
    ($tt: tt) => {
        ::std::arch::is_x86_feature_detected!($tt)
    };
}"""
new = """macro_rules! feature_detected {
    ($tt: tt) => {
        (::std::arch::is_x86_feature_detected!($tt) && !($tt == "avx512f" && $crate::no_avx512()))
    };
}
#[doc(hidden)]
pub fn no_avx512() -> bool {
    static NO: ::std::sync::OnceLock<bool> = ::std::sync::OnceLock::new();
    *NO.get_or_init(|| ::std::env::var_os("GEMM_NO_AVX512").is_some())
}"""
if text.count(old) != 1:
    sys.exit("avx2-emulation: gemm-common's x86 feature_detected! macro is not where it was in 0.19")
open(path, "w").write(text.replace(old, new))
EOF
  touch "$patched/.avx2-emulation"
fi

# A worktree of its own per run (runs side by side do not remove each other's), after
# forgetting the worktrees of runs that were killed before their cleanup.
git -C "$root" worktree prune
tree="$(mktemp -d "$work/tree.XXXXXX")"
trap 'git -C "$root" worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"' EXIT
git -C "$root" worktree add --quiet --detach "$tree" HEAD
printf '\n[patch.crates-io]\ngemm-common = { path = "%s" }\n' "$patched" >> "$tree/Cargo.toml"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$work/target}"
# peft_compare.py builds the crate its own file sits in: the worktree's.
GEMM_NO_AVX512=1 LORAKIT_CPU_ISA=avx2 \
  ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
  python3 "$tree/benches/peft_compare.py" "$@"
