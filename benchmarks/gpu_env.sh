# Sourced by the run_*_gpu.sh scripts: makes cvd_storm_jax (and the wheels the GPU image lacks, from .whl/) importable,
# and defines find_anchor NAME, which prints the path of a peer's anchor script or nothing, and run_anchor, which runs
# it.
# The package-dir mapping (kernels/ -> cvd_storm_jax.kernels) only exists once installed, hence the --target install.
if ! python3 -c "import cvd_storm_jax.kernels, grain, ml_collections" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "cvd_storm_jax or its wheels are not importable and .whl/ is empty: run benchmarks/prepare_gpu.sh first" >&2
    exit 2
  fi
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" .
  export PYTHONPATH=$SITE:${PYTHONPATH:-}
fi

# JAX takes 75 % of the card by default; the benchmarks run alone, and bench_dit's "--remat auto" sizes its policy by
# the allocator's limit, so let it have more (the torch anchors run in their own processes, one after another).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

find_anchor() {  # find_anchor FILE [ENV_OVERRIDE_PATH]
  local cand
  for cand in "${2:-}" ".anchors/$1" "shared/tools/anchors/$1" "../shared/tools/anchors/$1" "/work/shared/tools/anchors/$1"; do
    if [ -n "$cand" ] && [ -f "$cand" ]; then echo "$cand"; return; fi
  done
}

run_anchor() {  # run_anchor FILE PATH_VARIABLE OUT_DIR LABEL: the peer's anchor script into OUT_DIR, if found
  local anchor
  anchor=$(find_anchor "$1" "${!2:-}")
  if [ -n "$anchor" ]; then
    echo "== $4 anchor: $anchor"
    python3 "$anchor" "$3" || echo "$4 anchor failed (rc $?); our numbers follow without its ratios" >&2
  else
    echo "$1 not found (set $2); our numbers follow without $4 ratios" >&2
  fi
}
