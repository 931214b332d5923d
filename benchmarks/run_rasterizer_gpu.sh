#!/usr/bin/env bash
# gsplat 1.5.3's anchor (CUDA, PyTorch) and our rasterizer benchmark (xla and pallas backends) on the same GPU, in one
# session, so that the ratios compare like with like.
#
# Prepare on a machine with the package index (from the repo root): the wheels the GPU image lacks, plus gsplat for the
# anchor:   bash ../shared/tools/device-wheels.sh gsplat==1.5.3 importlib-metadata
# Then on the GPU machine (repo root, .whl/ carried along):   bash benchmarks/run_rasterizer_gpu.sh [OUT_DIR]
# gsplat compiles its CUDA extension at first import (~60 s). Prints the anchor's lines and our JSON lines (with
# pallas/xla and */gsplat ratios); both JSONs are written to OUT_DIR.
set -euo pipefail
OUT_DIR=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$OUT_DIR"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}

source "$(dirname "$0")/gpu_env.sh"

run_anchor gsplat_rasterize.py GSPLAT_ANCHOR "$OUT_DIR" gsplat

echo "== cvd_storm_jax rasterizer"
python3 benchmarks/bench_rasterizer.py --gsplat-json "$OUT_DIR/gsplat_anchor.json" --out "$OUT_DIR/rasterizer_ours.json" \
  ${BENCH_ARGS:-}
if [ -f "$OUT_DIR/gsplat_anchor.json" ]; then echo "== gsplat_anchor.json"; cat "$OUT_DIR/gsplat_anchor.json"; fi
