#!/usr/bin/env bash
# Run on the development machine (it reaches the package index) before a GPU session, from the repo root:
#   bash benchmarks/prepare_gpu.sh
# Fetches the wheels the GPU image lacks (plus the peers: gsplat, diffusers) into .whl/ and copies the peers' anchor
# scripts into .anchors/ (both git-ignored locally). Then checks here, on the CPU, what would otherwise fail only on
# the GPU: the GPU lowering of every paper-size program (check_gpu_lowering.py), each benchmark script run end to end
# at its tiny size (results.jsonl and summarize_gpu.py included), and run_all_gpu.sh's shell syntax. Then the GPU
# calls, with carry [".whl", ".anchors"] (see run_all_gpu.sh's header):
#   bash benchmarks/run_all_gpu.sh core        and, time permitting,        bash benchmarks/run_all_gpu.sh extra
set -euo pipefail
bash ../shared/tools/device-wheels.sh gsplat==1.5.3 diffusers==0.42.1 importlib-metadata
grep -qx '/.anchors/' .git/info/exclude 2>/dev/null || echo '/.anchors/' >> .git/info/exclude
mkdir -p .anchors && cp ../shared/tools/anchors/*.py .anchors/
ls .anchors
python -c "import triton" 2>/dev/null || pip install -q triton==3.5.0
bash -n benchmarks/run_all_gpu.sh
python benchmarks/check_gpu_lowering.py
SMOKE=$(mktemp -d)
export CVD_BENCH_OUT=$SMOKE/results.jsonl
python benchmarks/bench_dit.py --tiny --repeats 2 --remat save_out_proj --anchor "$SMOKE/none.json"
python benchmarks/bench_dit.py --tiny --repeats 2 --model sd3
python benchmarks/bench_vae.py --tiny
python benchmarks/bench_rasterizer.py --tiny --backends pallas,xla,pallas_rows --out "$SMOKE/rasterizer_ours.json"
python benchmarks/bench_storm_vae.py --tiny
python benchmarks/bench_sample.py --tiny
python benchmarks/summarize_gpu.py "$SMOKE"
echo "prepare_gpu: all checks passed ($SMOKE)"
