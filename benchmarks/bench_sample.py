"""Sampling benchmark: Euler steps of one classifier-free-guided window of the CVD DiT (paper size: 19 frames x 6
views, 32x56 latents, 154 text tokens, the 4.1 B-param SD3.5-medium model), three ways:

  plain_fp32     the layout adapter and conditions inside every step, fp32 master weights (before session 9)
  hoisted_fp32   the adapter's residuals computed once per window (as generate.ClipSampler does)
  hoisted_bf16   and the kernels in the compute dtype (ClipSampler.device_params): what ClipSampler runs

  python benchmarks/bench_sample.py             # paper size, 2 steps, guidance 4
  python benchmarks/bench_sample.py --tiny      # CPU smoke run

Prints one JSON line (``timing.emit``): per-step seconds of each way (the window's time over its steps), the
speedups against plain_fp32, model TFLOP/s and MFU against a bf16 matmul timed in the same run. Model FLOPs are
analytic (cvd_dit.flops_per_clip, forward only, both guidance branches); the hoisted ways are credited with the plain
step's FLOPs, so their TFLOP/s is the useful work rate. XLA:CPU hoists loop-invariant work out of the loop by itself,
so on a CPU the three ways may time alike; the question is what XLA:GPU does. Inputs are random.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax.core import meta

from cvd_storm_jax.diffusion import sampler
from cvd_storm_jax.generate import kernels_in
from cvd_storm_jax.models import cvd_dit
from bench_dit import add_size_args, random_cvd_inputs, sizes  # benchmarks/bench_dit.py
from timing import emit, matmul_tflops, timed  # benchmarks/timing.py


def main():
  ap = argparse.ArgumentParser()
  add_size_args(ap)
  ap.add_argument("--steps", type=int, default=2, help="Euler steps per timed window")
  ap.add_argument("--guidance", type=float, default=4.0)
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()

  cfg = cvd_dit.default_model_config("tiny" if args.tiny else "sd35_medium")
  cfg.dtype, cfg.remat_policy = "bfloat16", "none"  # no gradients: nothing to recompute
  T, V, h, w, L = sizes(args)
  model = cvd_dit.CVDDiT(**dict(cfg))
  # The doubled batch of guidance: [cond; uncond] (the unconditional half's values do not change the cost).
  b2 = 2 if args.guidance != 1.0 else 1
  inputs = random_cvd_inputs(cfg, b2, T, V, h, w, L, iter(jax.random.split(jax.random.key(1), 8)))
  noise = inputs[0][:1]
  text, pooled, layout, cams, adjacency, off = inputs[2], inputs[3], inputs[4], inputs[5], inputs[6], inputs[7]
  params = jax.jit(lambda k: meta.unbox(model.init(k, *inputs))["params"])(jax.random.key(0))

  def window(hoisted: bool):
    def run(params, noise):
      residuals = (model.apply({"params": params}, layout, method=cvd_dit.CVDDiT.layout_residuals)
                   if hoisted else None)

      def velocity(x, t, uncond):
        del uncond
        return model.apply({"params": params}, x, t, text, pooled, None if hoisted else layout, cams, adjacency,
                           off, off, layout_residuals=residuals)
      return sampler.sample(velocity, noise, num_steps=args.steps, guidance=args.guidance)
    return jax.jit(run)

  step_s = {}
  bf16_params = jax.device_put(kernels_in(params, jnp.bfloat16))
  for name, fn, p in (("plain_fp32", window(False), params), ("hoisted_fp32", window(True), params),
                      ("hoisted_bf16", window(True), bf16_params)):
    step_s[name] = timed(fn, p, noise, repeats=args.repeats, warmup=1) / args.steps
  flops = b2 * cvd_dit.flops_per_clip(cfg, T, V, h, w, L)
  no_adapter = b2 * cvd_dit.flops_per_clip(dict(cfg, num_adapter_blocks=0), T, V, h, w, L)
  mm = matmul_tflops(1024 if args.tiny else 8192)
  stats = jax.devices()[0].memory_stats() or {}
  emit({"bench": "dit_sampling_step", "device": jax.devices()[0].device_kind, "frames": T, "views": V,
        "latent_hw": [h, w], "text_len": L, "guidance": args.guidance, "steps_timed": args.steps,
        "step_s": {k: round(v, 4) for k, v in step_s.items()},
        "speedup_vs_plain_fp32": {k: round(step_s["plain_fp32"] / v, 3) for k, v in step_s.items()},
        "model_flops_per_step": flops, "adapter_share_of_step": round(1 - no_adapter / flops, 4),
        "model_tflops_per_s": {k: round(flops / v / 1e12, 2) for k, v in step_s.items()},
        "bf16_matmul_tflops": round(mm, 1), "mfu_vs_matmul": round(flops / step_s["hoisted_bf16"] / 1e12 / mm, 4),
        "params_gb": {"fp32": round(sum(x.nbytes for x in jax.tree.leaves(params)) / 2 ** 30, 2),
                      "bf16_kernels": round(sum(x.nbytes for x in jax.tree.leaves(bf16_params)) / 2 ** 30, 2)},
        "peak_mem_gb": round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2)})


if __name__ == "__main__":
  main()
