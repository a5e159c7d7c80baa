#!/bin/sh
# The device check on a bare CUDA machine (PyTorch + nvcc, no SGLang), from the repository root:
#   scripts/gpu_check.sh BUNDLE.tar.xz [OUT_DIR] [slkv gpu-check options]
# BUNDLE is the FlashInfer 0.7.2 bundle described in docs/gpu.md; without CUDA it runs the dry mode.
set -e
bundle=$1; out=${2:-.}
shift $(( $# < 2 ? $# : 2 ))
site=${TMPDIR:-/tmp}/slkv-flashinfer
if [ -n "$bundle" ] && [ ! -d "$site/flashinfer" ]; then
    mkdir -p "$site" && tar -xJf "$bundle" -C "$site"
fi
export PYTHONPATH="$site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1
exec python3 -m slkv_sglang.cli gpu-check --out "$out" "$@"
