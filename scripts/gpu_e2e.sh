#!/bin/bash
# The project's end-to-end device run (docs/gpu.md, "The end-to-end device run"), from the repository root:
#   scripts/gpu_e2e.sh OUT_DIR [slkv gpu-e2e options]         on the GPU machine, the shared kit in .gpu/
#   scripts/gpu_e2e.sh --dry OUT_DIR [slkv gpu-e2e options]   on CPU with this checkout's .venv, small shapes (CI)
# Writes OUT_DIR/gpu_e2e.json (slkv gpu-e2e), and on the device OUT_DIR/kit.log and OUT_DIR/jit.log. The kit (SGLang
# 0.5.23 trimmed for the device's torch 2.11, its device scripts, FlashInfer 0.7.2 for sm_90a) is not project code:
# scripts/gpu_kit.sh copies it into the git-ignored .gpu/ folder, which then travels with the checkout. PYTHON picks
# the interpreter (default: .venv/bin/python with --dry, python3 on the device); LIMIT_S the run's seconds (480).
set -o pipefail
dry=
if [ "$1" = --dry ]; then dry=--dry; shift; fi
out=${1:?usage: scripts/gpu_e2e.sh [--dry] OUT_DIR [slkv gpu-e2e options]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -n "$dry" ]; then
    exec "${PYTHON:-.venv/bin/python}" -m slkv_sglang.cli gpu-e2e --dry --out "$out" "$@"
fi

kit=.gpu
for f in sglang-0.5.23-torch211-site.tar.xz flashinfer-0.7.2-sm90a.tar.xz device/prewarm_jit.py \
         device/llama3-8b-dummy/config.json; do
    [ -e "$kit/$f" ] || { echo "gpu_e2e.sh: $kit/$f is missing: run scripts/gpu_kit.sh and carry .gpu" >&2; exit 2; }
done
py=${PYTHON:-python3}
work=${TMPDIR:-/tmp}/slkv-e2e
mkdir -p "$work/sglang" "$work/flashinfer"
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvcc --version | tail -1; c++ --version | head -1; } \
    > "$out/kit.log" 2>&1
SECONDS=0
tar -xJf "$kit/sglang-0.5.23-torch211-site.tar.xz" -C "$work/sglang" &&
    tar -xJf "$kit/flashinfer-0.7.2-sm90a.tar.xz" -C "$work/flashinfer"
unpack_rc=$? unpack_s=$SECONDS

# The unpacked sites first (as the kit's run.sh), then this checkout, then the plugin's entry point: a dist-info
# written from pyproject.toml (slkv gpu-e2e --entry-point-dir), which SGLang's plugin loader finds on the path
# as it finds an installed package's, with nothing installed into the machine's Python.
export PYTHONPATH="$work/sglang:$work/flashinfer:$(pwd):$work/entry-point"
export PATH="$work/flashinfer/bin:$PATH" CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
# The two torch-2.11 work-arounds the kit's README gives. SGLang's Rust radix-tree core in the site is built for
# torch 2.14 and misreads tensor dtypes under 2.11: use its Python implementation (so the radix cache runs
# another code path than on CI's CPU engine).
export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python
# Extend (prefill) through FlashInfer's paged wrapper: the ragged one would pick the fa3 kernel on Hopper, which
# the bundle does not hold compiled (a JIT build); the bundle's fa2 paged kernel is.
export SGLANG_FLASHINFER_USE_PAGED=1
# JIT caches in the run's folder; FlashInfer builds (what it must) for sm_90a, the bundle's architecture.
export SGLANG_JIT_CACHE_DIR="$work/sglang-jit" FLASHINFER_WORKSPACE_BASE="$work/flashinfer-ws" \
       FLASHINFER_CUDA_ARCH_LIST=9.0a
"$py" -m slkv_sglang.cli gpu-e2e --entry-point-dir "$work/entry-point" >> "$out/kit.log" 2>&1
entry_rc=$?

SECONDS=0
"$py" "$kit/device/prewarm_jit.py" > "$out/jit.log" 2>&1
jit_rc=$? jit_s=$SECONDS

# What is left of LIMIT_S goes to the checks; the report is rewritten after each part, so a run cut short keeps
# what it measured.
left=$(( ${LIMIT_S:-480} - unpack_s - jit_s ))
[ "$left" -ge 60 ] || left=60   # (timeout 0 would mean no limit)
timeout --signal=TERM --kill-after=20 "$left" "$py" -m slkv_sglang.cli gpu-e2e --out "$out" \
    --serve-model "$kit/device/llama3-8b-dummy" \
    --kit "unpack_rc=$unpack_rc" "unpack_s=$unpack_s" "entry_point_rc=$entry_rc" "jit_rc=$jit_rc" "jit_s=$jit_s" \
    "$@" 2>&1 | tee "$out/e2e.log"
