#!/usr/bin/env bash
# diffusers' SD3Transformer2DModel anchor and our DiT benchmarks on the same GPU, in one session:
#   bash benchmarks/run_dit_gpu.sh [OUT_DIR]      (after benchmarks/prepare_gpu.sh; see its header)
set -euo pipefail
OUT_DIR=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$OUT_DIR"
source "$(dirname "$0")/gpu_env.sh"
run_anchor diffusers_mmdit_step.py MMDIT_ANCHOR "$OUT_DIR" "diffusers MM-DiT"
echo "== cvd_storm_jax: the anchor's workload (spatial MM-DiT on 114 images)"
python3 benchmarks/bench_dit.py --model sd3 | tee "$OUT_DIR/dit_sd3_ours.json"
echo "== cvd_storm_jax: the full CVD-STORM DiT, one 19 x 6 clip"
python3 benchmarks/bench_dit.py --model cvd | tee "$OUT_DIR/dit_cvd_ours.json"
