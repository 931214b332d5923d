"""Data pipeline throughput in clips per second per CPU core (single process, BLAS/OpenMP pinned to 1 thread).

Measures, for clips of T frames x 6 views at the target bucket H x W with every condition drawn:
  conditions  resize (from the stored/render size) + box/map line images + LiDAR depth + camera params on clips
              already in memory: the per-clip work the pipeline adds to any source (real datasets included).
  pipeline    the whole grain pipeline with the synthetic source (render + the above + collate), num_workers=0.
  arrayrecord the production path: clips converted to ArrayRecord shards at H x W (not timed), then the whole
              pipeline reading them (record reads + JPEG decode of every view + the above + collate).
  ceiling     writing the output arrays of one clip (images/box/map uint8, depth float32): a memory-bandwidth
              upper bound for any implementation producing the same batch.
Prints one JSON line with clips/s and the ratios to the brief's target (2 clips/s/core) and to the ceiling.

  python benchmarks/bench_data.py            # 19 x 6 views at 256x448, synthetic rendered at 128x224
  python benchmarks/bench_data.py --tiny     # 4 x 6 views at 64x112 (seconds on a laptop CPU)
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")  # per-core numbers: keep numpy's BLAS on one thread

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from cvd_storm_jax.data_pipelines import conditions  # noqa: E402
from cvd_storm_jax.data_pipelines import pipeline  # noqa: E402
from cvd_storm_jax.data_pipelines import synthetic  # noqa: E402

TARGET_CLIPS_PER_S = 2.0


def _time(fn, repeats: int) -> tuple[float, float]:
  """Median (wall, CPU) seconds of fn() over ``repeats`` runs after one warm-up. CPU time (this process, all
  threads; BLAS is pinned to one) is the per-core cost even when other jobs share the machine."""
  fn()
  walls, cpus = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)
  return float(np.median(walls)), float(np.median(cpus))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="4 frames at 64x112 instead of 19 frames at 256x448")
  ap.add_argument("--clips", type=int, default=None, help="clips to time per measurement")
  ap.add_argument("--render", type=str, default=None, help="synthetic render size HxW (default 128x224 / 64x112)")
  args = ap.parse_args()
  if args.tiny:
    T, (H, W), render, clips = 4, (64, 112), (64, 112), args.clips or 3
  else:
    T, (H, W), render, clips = 19, (256, 448), (128, 224), args.clips or 4
  if args.render:
    render = tuple(int(x) for x in args.render.lower().split("x"))
  opts = synthetic.SyntheticOptions(height=render[0], width=render[1], num_frames=T, max_boxes=32,
                                    max_lidar_points=8192)
  samples = [synthetic.generate_clip(0, i, opts) for i in range(clips)]

  def conditions_pass():
    for s in samples:
      conditions.add_conditions(conditions.resize_sample(s, H, W))

  t_cond, c_cond = (x / clips for x in _time(conditions_pass, 2))

  config = pipeline.default_data_config("tiny")
  config.update(dict(num_frames=T, num_clips=1000, buckets=[(H, W, 1.0)], batch_size=1, num_workers=0, prefetch=0,
                     max_boxes=32, max_lidar_points=8192))
  config.synthetic.update(dict(height=render[0], width=render[1], max_boxes=32, max_lidar_points=8192))
  it = pipeline.make_iterator(config, seed=0)

  def pipeline_pass():
    for _ in range(clips):
      next(it)

  t_pipe, c_pipe = (x / clips for x in _time(pipeline_pass, 1))

  import tempfile
  from cvd_storm_jax.data_pipelines import convert
  with tempfile.TemporaryDirectory() as shards:
    convert.convert("synthetic", "unused", shards, image_size=(H, W), clip_frames=T, progress=False,
                    reader_kwargs=dict(num_clips=clips + 1, max_boxes=32, max_lidar_points=8192))
    ar_config = pipeline.default_data_config("tiny")
    ar_config.update(dict(num_frames=T, buckets=[(H, W, 1.0)], batch_size=1, num_workers=0, prefetch=0,
                          max_boxes=32, max_lidar_points=8192, mix=[("arrayrecord", 1.0, shards)]))
    ar_it = pipeline.make_iterator(ar_config, seed=0)

    def arrayrecord_pass():
      for _ in range(clips):
        next(ar_it)

    t_ar, c_ar = (x / clips for x in _time(arrayrecord_pass, 1))

  V = 6

  def ceiling_pass():
    out = [np.empty((T, V, H, W, 3), np.uint8) for _ in range(3)] + [np.empty((T, V, H, W), np.float32)]
    for a in out:
      a.fill(1)

  t_ceil, c_ceil = _time(ceiling_pass, 3)
  print(json.dumps({
      "bench": "data_pipeline", "frames": T, "views": V, "height": H, "width": W,
      "render_height": render[0], "render_width": render[1], "clips": clips,
      # Per core = clips per CPU-second of this process; wall rates also count time lost to other jobs.
      "conditions_clips_per_core_s": round(1 / c_cond, 3),
      "pipeline_clips_per_core_s": round(1 / c_pipe, 3),
      "arrayrecord_clips_per_core_s": round(1 / c_ar, 3),
      "arrayrecord_clips_per_wall_s": round(1 / t_ar, 3),
      "arrayrecord_ratio_to_target": round(1 / c_ar / TARGET_CLIPS_PER_S, 3),
      "ceiling_clips_per_core_s": round(1 / c_ceil, 3),
      "conditions_clips_per_wall_s": round(1 / t_cond, 3),
      "pipeline_clips_per_wall_s": round(1 / t_pipe, 3),
      "target_clips_per_core_s": TARGET_CLIPS_PER_S,
      "conditions_ratio_to_target": round(1 / c_cond / TARGET_CLIPS_PER_S, 3),
      "pipeline_ratio_to_target": round(1 / c_pipe / TARGET_CLIPS_PER_S, 3),
      "conditions_ratio_to_ceiling": round(c_ceil / c_cond, 4),
      "load_average_1m": round(os.getloadavg()[0], 2),
      "cpu_count": os.cpu_count(),
  }))


if __name__ == "__main__":
  main()
