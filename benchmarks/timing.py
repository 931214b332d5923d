"""The one timing helper of the benchmark scripts (imported as a sibling module: scripts run as
``python benchmarks/<name>.py``, which puts this folder on sys.path)."""
from __future__ import annotations

import statistics
import time

import jax


def timed(fn, *args, repeats: int, warmup: int = 2) -> float:
  """Median seconds of fn(*args) after ``warmup`` calls (compile + steady state); blocks on the results."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)
