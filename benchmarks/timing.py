"""The timing and reporting helpers of the benchmark scripts (imported as a sibling module: scripts run as
``python benchmarks/<name>.py``, which puts this folder on sys.path).

  timed(fn, *args, repeats)        median seconds of one call, each call blocked on (steps of 10 ms and more)
  pipelined(fn, *args, iters)      mean seconds over back-to-back calls blocked on once (short kernels: what CUDA
                                   events around a kernel measure, without a host round trip per call)
  matmul_tflops(n, dtype)          the ceiling: an n^3 matmul on random data, pipelined (the peers time random
                                   data with CUDA events; ones run cooler and a sync per 1.4 ms call costs ~10 %)
  emit(record)                     prints the record as one JSON line and, when CVD_BENCH_OUT names a file, appends it
                                   there at once (benchmarks/run_all_gpu.sh: a part killed by its time limit keeps
                                   what it measured before)
"""
from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

OUT_ENV = "CVD_BENCH_OUT"


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


def pipelined(fn, *args, iters: int, warmup: int = 2) -> float:
  """Mean seconds of fn(*args) over ``iters`` calls dispatched back to back and blocked on once."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  out = None
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / iters


def matmul_tflops(n: int = 8192, dtype=jnp.bfloat16, iters: int = 20) -> float:
  """TFLOP/s of a square n^3 matmul on normal random data of ``dtype``, on the default device."""
  a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in jax.random.split(jax.random.key(0)))
  f = jax.jit(lambda x, y: x @ y)
  return 2 * n ** 3 / pipelined(f, a, b, iters=iters) / 1e12


def emit(record: dict) -> None:
  """One JSON line on stdout and, with CVD_BENCH_OUT set, appended to that file (flushed at once)."""
  line = json.dumps(record)
  print(line, flush=True)
  path = os.environ.get(OUT_ENV)
  if path:
    with open(path, "a") as f:
      f.write(line + "\n")
