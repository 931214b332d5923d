#!/usr/bin/env bash
# Every GPU measurement of the project, in named parts, each with its own time limit (a part that runs over is killed
# and the next one starts). After benchmarks/prepare_gpu.sh here, with the device tool (from the repo root):
#   run(command="bash benchmarks/run_all_gpu.sh core", carry=[".whl", ".anchors"], timeout_s=600)
#   then, at once (the machine stays warm 30 s), if status's budget_left_s allows:
#   run(command="bash benchmarks/run_all_gpu.sh extra", carry=[".whl", ".anchors"], timeout_s=<what is left - 30>)
# Parts, in the order given (the groups in their priority order):
#   core  = dit_anchor dit_cvd vae storm_vae     the issues' targets: the CVD DiT at the paper size beside
#                                                 diffusers' MM-DiT, the VAE beside diffusers, the STORM-VAE step
#   extra = dit_sd3 rasterizer                    our MM-DiT on the anchor's own workload (like for like), the
#                                                 rasterizer beside gsplat (its ~60 s CUDA build included)
# Or name single parts: bash benchmarks/run_all_gpu.sh vae storm_vae
# Not in a group (no issue target; when the budget allows): sample = DiT sampling steps at the paper size, the
# conditions computed once per window against inside every step (does XLA:GPU hoist them itself?)
# What comes back in $OUT (the device tool returns at most 8 files): run.log (everything printed), results.jsonl (one
# JSON line per measurement, appended as it is made, so a killed part keeps what it measured), the peers' anchor
# JSONs (mmdit_anchor.json, vae_anchor.json, gsplat_anchor.json), rasterizer_ours.json and summary.txt
# (benchmarks/summarize_gpu.py: every target with its ratio; run it here again on the fetched folder).
set -uo pipefail
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(core)
OUT_DIR=${OUT:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/run.log") 2>&1
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
export CVD_BENCH_OUT="$OUT_DIR/results.jsonl" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
START=$(date +%s)

part() {  # part LIMIT_S NAME COMMAND...: runs the command under its limit, says how it ended
  local limit=$1 name=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "== $name (limit ${limit} s; ${t0}s - start = $((t0 - START)) s into the run)"
  timeout --signal=TERM --kill-after=5 "$limit" "$@"
  rc=$?
  echo "== $name: rc $rc after $(( $(date +%s) - t0 )) s$([ $rc -eq 124 ] && echo ' (time limit)')"
}

anchor() {  # anchor LIMIT_S FILE LABEL: a peer's anchor script into OUT_DIR
  local path
  path=$(find_anchor "$2")
  if [ -z "$path" ]; then echo "== $3 anchor: $2 not found (run benchmarks/prepare_gpu.sh, carry .anchors)"; return; fi
  part "$1" "$3 anchor" python3 "$path" "$OUT_DIR"
}

run_part() {
  case "$1" in
    core) for p in dit_anchor dit_cvd vae storm_vae; do run_part "$p"; done ;;
    extra) for p in dit_sd3 rasterizer; do run_part "$p"; done ;;
    dit_anchor) anchor 90 diffusers_mmdit_step.py "diffusers MM-DiT" ;;
    # Remat policies as --remat auto picks them on an H200 (docs/benchmarks.md), given: sizing them traces the
    # model once per policy (~20 s of host time each at this size). On out-of-memory the next policy is tried.
    dit_cvd) part 190 "CVD DiT, one 19 x 6 clip" python3 benchmarks/bench_dit.py --model cvd --remat save_out_proj \
               --anchor "$OUT_DIR/mmdit_anchor.json" ;;
    dit_sd3) part 170 "MM-DiT on the anchor's workload" python3 benchmarks/bench_dit.py --model sd3 --remat minimal \
               --anchor "$OUT_DIR/mmdit_anchor.json" ;;
    vae) anchor 70 diffusers_vae.py "diffusers VAE"
         part 110 "VAE" python3 benchmarks/bench_vae.py --batch 24 --anchor "$OUT_DIR/vae_anchor.json" ;;
    storm_vae) part 100 "STORM-VAE step" python3 benchmarks/bench_storm_vae.py ;;
    sample) part 300 "DiT sampling steps" python3 benchmarks/bench_sample.py ;;
    rasterizer)
      export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
      anchor 110 gsplat_rasterize.py gsplat
      part 150 "rasterizer" python3 benchmarks/bench_rasterizer.py --backends pallas,xla,pallas_rows \
        --gsplat-json "$OUT_DIR/gsplat_anchor.json" --out "$OUT_DIR/rasterizer_ours.json" ;;
    *) echo "unknown part $1 (core, extra, dit_anchor, dit_cvd, dit_sd3, vae, storm_vae, rasterizer, sample)" ;;
  esac
}

for p in "${PARTS[@]}"; do run_part "$p"; done
python3 benchmarks/summarize_gpu.py "$OUT_DIR" | tee "$OUT_DIR/summary.txt"
ls -la "$OUT_DIR"
sleep 1  # tee (the log) writes its last lines
