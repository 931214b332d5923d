#!/usr/bin/env bash
# The diffusers AutoencoderKL anchor (SD3.5 VAE config, PyTorch bf16) and our Flax VAE benchmark on the same GPU, in
# one session, so that the ratios compare like with like.
#
# Prepare on a machine with the package index (from the repo root): the wheels the GPU image lacks, plus diffusers for
# the anchor:   bash ../shared/tools/device-wheels.sh diffusers==0.42.1
# Then on the GPU machine (repo root, .whl/ carried along):   bash benchmarks/run_vae_gpu.sh [OUT_DIR]
# Prints the anchor's lines and our JSON line (with ratio_vs_diffusers); both JSONs are written to OUT_DIR.
set -euo pipefail
OUT_DIR=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$OUT_DIR"

source "$(dirname "$0")/gpu_env.sh"

run_anchor diffusers_vae.py VAE_ANCHOR "$OUT_DIR" "diffusers VAE"

echo "== cvd_storm_jax VAE"
python3 benchmarks/bench_vae.py --batch "${BATCH:-24}" --anchor "$OUT_DIR/vae_anchor.json" | tee "$OUT_DIR/vae_ours.json"
