#!/usr/bin/env bash
# Every GPU measurement of the project in one session (about 8-9 minutes on an H200, most of it compiling and the
# peers' first-use builds). After benchmarks/prepare_gpu.sh, with the device tool:
#   run(command="bash benchmarks/run_all_gpu.sh", carry=[".whl", ".anchors"], timeout_s=560)
# Each part has its own time limit so that one slow part cannot take the others down; results land in $OUT.
set -uo pipefail
OUT_DIR=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$OUT_DIR"
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
timeout 200 bash benchmarks/run_dit_gpu.sh "$OUT_DIR" 2>&1 | tail -n 40
timeout 170 bash benchmarks/run_rasterizer_gpu.sh "$OUT_DIR" 2>&1 | tail -n 40
timeout 100 bash benchmarks/run_vae_gpu.sh "$OUT_DIR" 2>&1 | tail -n 20
timeout 80 python3 benchmarks/bench_storm_vae.py 2>&1 | tail -n 5 | tee "$OUT_DIR/storm_vae_ours.json"
# Last, so that it cannot starve the rest: the Pallas backward's other reduction at the STORM-VAE scale.
timeout 60 python3 benchmarks/bench_rasterizer.py --scenes storm_vae_256x448_F4_V6 --backends pallas_rows \
  --out "$OUT_DIR/rasterizer_rows.json" 2>&1 | tail -n 3
ls -la "$OUT_DIR"
