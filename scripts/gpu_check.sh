#!/bin/sh
# The device check on a bare CUDA machine (PyTorch + nvcc, no SGLang), from the repository root:
#   scripts/gpu_check.sh BUNDLE.tar.xz [OUT_DIR] [slkv gpu-check options]
# BUNDLE is the FlashInfer 0.7.2 bundle described in docs/gpu.md ("" for none); without CUDA it runs the dry
# mode. PYTHON picks the interpreter (default python3).
set -e
bundle=$1; out=${2:-.}
shift $(( $# < 2 ? $# : 2 ))
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "$bundle" ]; then
    site=${TMPDIR:-/tmp}/slkv-flashinfer
    [ -d "$site/flashinfer" ] || { mkdir -p "$site" && tar -xJf "$bundle" -C "$site"; }
    export PYTHONPATH="$site:$PYTHONPATH" PATH="$site/bin:$PATH"
fi
exec "${PYTHON:-python3}" -m slkv_sglang.cli gpu-check --out "$out" "$@"
