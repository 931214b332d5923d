"""DiT training-step benchmark: step time, tokens/s, model TFLOP/s and MFU against a bf16 matmul timed in this run.

  python benchmarks/bench_dit.py                 # paper size: SD3.5-medium CVD DiT, 19 frames x 6 views, 32x56 latents
  python benchmarks/bench_dit.py --model sd3     # the spatial MM-DiT alone on 114 images (diffusers anchor's workload)
  python benchmarks/bench_dit.py --tiny          # CPU smoke run

Prints one JSON line. "model FLOPs" are analytic (cvd_dit.flops_per_clip: every matmul incl. attention, forward x3,
no recomputation), the same definition as the diffusers anchor's FlopCounterMode count. The ceiling is a plain
8192^3 bf16 matmul through XLA on the same device in the same run.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax
from flax.core import meta

from cvd_storm_jax.models import cvd_dit, mmdit
from timing import timed  # benchmarks/timing.py


def matmul_tflops(n: int, repeats: int) -> float:
  x = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda a: a @ a)
  return 2 * n ** 3 / timed(f, x, repeats=repeats) / 1e12


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", choices=["cvd", "sd3"], default="cvd")
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--frames", type=int, default=19)
  ap.add_argument("--views", type=int, default=6)
  ap.add_argument("--latent-hw", type=int, nargs=2, default=(32, 56))
  ap.add_argument("--text-len", type=int, default=154)
  ap.add_argument("--remat", default="full", help="none | full | dots_saveable | dots_with_no_batch_dims_saveable")
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  cfg = cvd_dit.default_model_config("tiny" if args.tiny else "sd35_medium")
  cfg.remat_policy = args.remat
  cfg.dtype = "bfloat16"
  T, V = (2, 2) if args.tiny else (args.frames, args.views)
  h, w = (8, 8) if args.tiny else args.latent_hw
  L = 8 if args.tiny else args.text_len
  C = cfg.in_channels
  key = jax.random.key(0)
  if args.model == "cvd":
    model = cvd_dit.CVDDiT(**cfg)
    inputs = (jnp.zeros((1, T, V, h, w, C)), jnp.full((1, T, V), 500.0),
              jnp.zeros((1, T, V, L, cfg.joint_attention_dim)), jnp.zeros((1, T, V, cfg.pooled_projection_dim)),
              jnp.zeros((1, T, V, 8 * h, 8 * w, 6)), jnp.zeros((1, T, V, 11)),
              jnp.ones((1, V, V), bool), jnp.zeros((1,), bool), jnp.zeros((1,), bool))
    flops = 3 * cvd_dit.flops_per_clip(cfg, T, V, h, w, L)
    tokens = T * V * (h // cfg.patch_size) * (w // cfg.patch_size)
  else:
    model = mmdit.SD3Transformer(**{k: v for k, v in cfg.items() if k in mmdit.SD3Transformer.__dataclass_fields__})
    B = T * V
    inputs = (jnp.zeros((B, h, w, C)), jnp.full((B,), 500.0), jnp.zeros((B, L, cfg.joint_attention_dim)),
              jnp.zeros((B, cfg.pooled_projection_dim)))
    flops = 3 * mmdit.flops_per_image(cfg, h, w, L) * B
    tokens = B * (h // cfg.patch_size) * (w // cfg.patch_size)

  params = jax.jit(lambda k: meta.unbox(model.init(k, *inputs))["params"])(key)
  tx = optax.adamw(1e-5)
  opt = jax.jit(tx.init)(params)

  def step(params, opt, inputs):
    def loss(p):
      return jnp.mean(jnp.square(model.apply({"params": p}, *inputs).astype(jnp.float32)))
    l, g = jax.value_and_grad(loss)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, l

  step = jax.jit(step, donate_argnums=(0, 1))
  state = {"p": params, "o": opt}

  def run(inputs):
    state["p"], state["o"], l = step(state["p"], state["o"], inputs)
    return l

  sec = timed(run, inputs, repeats=args.repeats)
  mm = matmul_tflops(1024 if args.tiny else 8192, repeats=args.repeats)
  stats = jax.devices()[0].memory_stats() or {}
  tflops = flops / sec / 1e12
  print(json.dumps({
      "bench": "dit_train_step", "model": args.model, "device": jax.devices()[0].device_kind,
      "params": sum(x.size for x in jax.tree.leaves(params)), "frames": T, "views": V, "latent_hw": [h, w],
      "text_len": L, "remat": args.remat, "step_s": round(sec, 4), "tokens_per_s": round(tokens / sec, 1),
      "model_flops_per_step": flops, "model_tflops_per_s": round(tflops, 2),
      "bf16_matmul_tflops": round(mm, 1), "mfu_vs_matmul": round(tflops / mm, 4),
      "peak_mem_gb": round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2)}))


if __name__ == "__main__":
  main()
