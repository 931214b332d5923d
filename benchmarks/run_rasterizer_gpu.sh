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

if ! python3 -c "import cvd_storm_jax.kernels" 2>/dev/null; then
  SITE=$(mktemp -d)
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  fi
  # The package-dir mapping (kernels/ -> cvd_storm_jax.kernels) only exists once installed.
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" .
  export PYTHONPATH=$SITE:${PYTHONPATH:-}
fi

ANCHOR=""
for cand in "${GSPLAT_ANCHOR:-}" ../shared/tools/anchors/gsplat_rasterize.py shared/tools/anchors/gsplat_rasterize.py \
            /work/shared/tools/anchors/gsplat_rasterize.py; do
  if [ -n "$cand" ] && [ -f "$cand" ]; then ANCHOR=$cand; break; fi
done

if [ -n "$ANCHOR" ]; then
  echo "== gsplat anchor: $ANCHOR"
  python3 "$ANCHOR" "$OUT_DIR" || echo "gsplat anchor failed (rc $?); our numbers follow without gsplat ratios" >&2
else
  echo "gsplat_rasterize.py anchor not found (set GSPLAT_ANCHOR); our numbers follow without gsplat ratios" >&2
fi

echo "== cvd_storm_jax rasterizer"
python3 benchmarks/bench_rasterizer.py --gsplat-json "$OUT_DIR/gsplat_anchor.json" --out "$OUT_DIR/rasterizer_ours.json" \
  ${BENCH_ARGS:-}
if [ -f "$OUT_DIR/gsplat_anchor.json" ]; then echo "== gsplat_anchor.json"; cat "$OUT_DIR/gsplat_anchor.json"; fi
