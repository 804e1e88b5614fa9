#!/usr/bin/env bash
# Prepare .bnb/: a trimmed bitsandbytes (its Python files, its CUDA 13.0 and CPU libraries) and expecttest,
# for a GPU machine that has no internet and neither package.  Run HERE, from any directory, with pip online:
#
#     bash benchmarks/fetch_bnb_cuda.sh            # BNB_VERSION=0.50.2 by default ("latest" for the newest)
#
# Then copy .bnb with the working tree to the GPU machine; benchmarks/gpu_session.sh puts it first on PYTHONPATH:
#
#     bash benchmarks/gpu_session.sh
#
# Why this works: the bitsandbytes wheel is py3-none-manylinux (no Python-ABI tag), so the copy loads under
# the GPU machine's Python 3.12.  At import, bitsandbytes/cextension.py picks libbitsandbytes_cuda{MAJOR}{MINOR}.so
# from torch.version.cuda ("13.0" on torch 2.11+cu130 -> cuda130; another 13.x falls back to the closest 13.x
# shipped, with a warning), so BNB_CUDA_VERSION is NOT needed; set it (e.g. 130) only to force a library.
# The CUDA library needs libcudart.so.13, libcublas.so.13 and libcublasLt.so.13, which torch's CUDA build
# has already loaded by then.  Its other imports (numpy, packaging) are in the GPU image.  Size: ~6 MB.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${DEST:-$ROOT/.bnb}
PY=${PYTHON:-python3}
BNB_VERSION=${BNB_VERSION:-0.50.2}
EXPECTTEST_VERSION=${EXPECTTEST_VERSION:-0.3.0}
CUDA_LIBS=${CUDA_LIBS:-cuda130}  # space-separated stems of libbitsandbytes_<stem>.so to keep

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

spec=bitsandbytes
[[ $BNB_VERSION != latest ]] && spec="bitsandbytes==$BNB_VERSION"
platforms=()
for tag in manylinux_2_24_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
    platforms+=(--platform "$tag")
done
echo "[fetch] downloading $spec (manylinux x86_64, Python 3.12) and expecttest==$EXPECTTEST_VERSION" >&2
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$TMP" "$spec"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$TMP" \
    "expecttest==$EXPECTTEST_VERSION"

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" - "$TMP" "$DEST" "$CUDA_LIBS" <<'EOF'
"""Extract the Python files, dist-info metadata and the chosen native libraries of the two wheels."""
import sys
import zipfile
from pathlib import Path

tmp, dest, stems = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split()
keep_libs = {"libbitsandbytes_cpu.so", *(f"libbitsandbytes_{s}.so" for s in stems)}
for wheel in sorted(tmp.glob("*.whl")):
    kept = 0
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            top = name.split("/", 1)[0]
            if name.endswith("/"):
                continue
            if top.endswith(".dist-info"):
                ok = base in ("METADATA", "LICENSE", "WHEEL", "top_level.txt")  # importlib.metadata.version
            elif base.endswith(".so"):
                ok = base in keep_libs
            else:
                ok = base.endswith((".py", ".typed"))
            if ok:
                z.extract(name, dest)
                kept += 1
    print(f"[fetch] {wheel.name}: kept {kept} files", file=sys.stderr)
missing = [lib for lib in keep_libs if not (dest / "bitsandbytes" / lib).is_file()]
if missing:
    sys.exit(f"[fetch] the wheel lacks {missing}: pick CUDA_LIBS from what it ships")
EOF

# Import check here (CPU torch: loads libbitsandbytes_cpu.so); the copy must win over any installed one.
PYTHONPATH="$DEST" "$PY" -c "
import bitsandbytes, expecttest, importlib.metadata as md, os
assert os.path.realpath(bitsandbytes.__file__).startswith(os.path.realpath('$DEST')), bitsandbytes.__file__
print('[fetch] import ok:', bitsandbytes.__version__, md.version('bitsandbytes'), bitsandbytes.__file__)
"
ls "$DEST"/bitsandbytes/*.so >&2
echo "[fetch] $(du -sh "$DEST" | cut -f1) in $DEST ($(find "$DEST" -type f | wc -l) files)" >&2
