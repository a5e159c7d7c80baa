#!/bin/sh
# Copy the shared GPU kit into this checkout's git-ignored .gpu/ folder, where scripts/gpu_e2e.sh looks for it:
# SGLang 0.5.23 trimmed for the device's torch 2.11, the kit's device scripts, and the FlashInfer 0.7.2 bundle
# (about 35 MB; a device run carries .gpu). From the repository root:
#   scripts/gpu_kit.sh [KIT]        KIT: the shared kit's folder (default ../shared/gpu)
set -eu
kit=${1:-../shared/gpu}
[ -d .gpu ] && chmod -R u+w .gpu && rm -rf .gpu   # the kit's files come read-only; a copy made earlier goes
mkdir .gpu
cp -r "$kit/e2e/device" .gpu/device
cp "$kit/e2e/sglang-0.5.23-torch211-site.tar.xz" "$kit/flashinfer-0.7.2-sm90a.tar.xz" .gpu/
chmod -R u+w .gpu
du -sh .gpu
