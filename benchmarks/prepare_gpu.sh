#!/usr/bin/env bash
# Run on the development machine (it reaches the package index) before a GPU session, from the repo root:
#   bash benchmarks/prepare_gpu.sh
# Fetches the wheels the GPU image lacks (plus the peers: gsplat, diffusers) into .whl/ and copies the peers' anchor
# scripts into .anchors/ (both git-ignored locally). Then run on the GPU with carry [".whl", ".anchors"]:
#   bash benchmarks/run_all_gpu.sh
set -euo pipefail
bash ../shared/tools/device-wheels.sh gsplat==1.5.3 diffusers==0.42.1 importlib-metadata
grep -qx '/.anchors/' .git/info/exclude 2>/dev/null || echo '/.anchors/' >> .git/info/exclude
mkdir -p .anchors && cp ../shared/tools/anchors/*.py .anchors/
ls .anchors
python -c "import triton" 2>/dev/null || pip install -q triton==3.5.0
python benchmarks/check_gpu_lowering.py
