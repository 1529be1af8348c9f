# Sourced before building or running with `--features mkl`: Intel oneMKL from PyPI's
# wheels, for a machine without an MKL install. Downloads the static MKL libraries, the
# headers and Intel's OpenMP runtime once into $MKL_PIP_DIR (default target-mkl/mkl,
# about 800 MB unpacked), then exports what candle's `intel-mkl-src` looks for (MKLROOT)
# and where the binaries find `libiomp5.so` at run time (LD_LIBRARY_PATH).
#
#     source scripts/mkl-env.sh
#     cargo test --release --features mkl --lib kernels
#     python3 benches/peft_compare.py --lorakit-features default mkl
#
# A machine with oneMKL installed (MKLROOT set, or /opt/intel) needs none of this.
# Versions are pinned so a build is reproducible; MKL_VERSION overrides them.
MKL_DIR=${MKL_PIP_DIR:-target-mkl/mkl}
MKL_VERSION=${MKL_VERSION:-2026.2.0}
if [ ! -f "$MKL_DIR/include/mkl.h" ] || [ ! -f "$MKL_DIR/lib/libmkl_core.a" ]; then
    mkl_wheels=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --dest "$mkl_wheels" \
        "mkl-static==$MKL_VERSION" "mkl-include==$MKL_VERSION" "intel-openmp==$MKL_VERSION" &&
        mkdir -p "$MKL_DIR" &&
        for wheel in "$mkl_wheels"/*.whl; do
            # A wheel's files for the install prefix sit under <name>.data/data/.
            python3 - "$wheel" "$MKL_DIR" <<'EOF'
import os, shutil, sys, zipfile

wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        parts = info.filename.split("/")
        if len(parts) > 3 and parts[0].endswith(".data") and parts[1] == "data" and not info.is_dir():
            target = os.path.join(dest, *parts[2:])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
EOF
        done
    rm -rf "$mkl_wheels"
fi
if [ -f "$MKL_DIR/include/mkl.h" ] && [ -f "$MKL_DIR/lib/libmkl_core.a" ]; then
    MKLROOT=$(cd "$MKL_DIR" && pwd)
    export MKLROOT
    export LD_LIBRARY_PATH="$MKLROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    echo "mkl-env.sh: could not set up oneMKL from PyPI in $MKL_DIR" >&2
fi
