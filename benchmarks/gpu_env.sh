# Sourced by benchmarks/run_all_gpu.sh: makes cvd_storm_jax (and the wheels the GPU image lacks, from .whl/)
# importable, and defines find_anchor NAME, which prints the path of a peer's anchor script or nothing.
# The package-dir mapping (kernels/ -> cvd_storm_jax.kernels) only exists once installed, hence the --target install.
# The check runs from / : from the repo root, the source tree's cvd_storm_jax/ (no kernels/ inside) would shadow an
# installed package and the check would always fail.
if ! (cd / && python3 -c "import cvd_storm_jax.kernels, grain, ml_collections") 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "cvd_storm_jax or its wheels are not importable and .whl/ is empty: run benchmarks/prepare_gpu.sh first" >&2
    exit 2
  fi
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" .
  export PYTHONPATH=$SITE:${PYTHONPATH:-}
fi

# JAX takes 75 % of the card by default; the benchmarks run alone (the torch anchors in their own processes, one
# after another), so let it have more.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

find_anchor() {  # find_anchor FILE: the peer's anchor script, carried in .anchors/ or beside the checkout
  local cand
  for cand in ".anchors/$1" "shared/tools/anchors/$1" "../shared/tools/anchors/$1" "/work/shared/tools/anchors/$1"; do
    if [ -f "$cand" ]; then echo "$cand"; return; fi
  done
}
