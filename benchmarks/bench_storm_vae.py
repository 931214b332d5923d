r"""STORM-VAE training-step benchmark: step time, peak memory, the rasteriser's share, MFU against a matmul ceiling.

Paper scale (default): one sample of 4 context frames x 6 views at 256x448 (2.75 M Gaussians), 3 target frames x 6
views rendered, the paper config (SD3.5 VAE + STORM-B/8-like GS decoder, bf16, LPIPS-VGG in both losses):

  python benchmarks/bench_storm_vae.py                 # GPU
  python benchmarks/bench_storm_vae.py --tiny          # CPU: the tiny config at 32x56, 2 context frames
  python benchmarks/bench_storm_vae.py --plan          # any CPU: activation memory per remat setting, no run

Prints one JSON line (``timing.emit``):
  step_ms          forward + backward of the task's loss (the trainer's update minus the optimizer), mean over
                   back-to-back steps.
  render_ms        forward + backward of GSDecoder.render alone on the same Gaussians and cameras (rasteriser,
                   sky and exposure), timed separately; render_share = render_ms / step_ms.
  peak_mem_gb      device peak (GPU memory_stats) or the process max RSS (CPU).
  xla_counted_tflops  task.flops_per_step (3 x XLA's cost analysis of the forward) / step time, and
                   mfu_vs_matmul = that / a same-dtype 8192^3 matmul's rate measured in the same run. A LOWER BOUND:
                   XLA counts custom calls as no FLOPs (on a GPU the GS decoder's cuDNN attention, most of its
                   FLOPs), and the rasteriser and LPIPS are left out.
The rasteriser against gsplat is bench_rasterizer.py's (the same scene for both); the Gaussians here come from a
random-init decoder, a different problem.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# The repository root, for configs/ (appended: the installed cvd_storm_jax, which maps kernels/ into the package,
# must win over the source tree's cvd_storm_jax/, which has no kernels/ inside).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import emit, matmul_tflops, pipelined  # noqa: E402 (benchmarks/timing.py)


def _batch(task, height, width, num_frames, seed=0):
  """One synthetic 6-view clip (real geometry, LiDAR depth, sky mask) as a device batch of 1."""
  from cvd_storm_jax.data_pipelines import conditions, synthetic
  opts = synthetic.SyntheticOptions(height=height, width=width, num_frames=num_frames, num_views=6,
                                    max_lidar_points=8192)
  clip = synthetic.generate_clip(seed, 0, opts)
  host = {k: np.asarray(clip[k])[None] for k in ("images", "intrinsics", "cam_to_ego", "ego_to_world", "timestamps",
                                                   "view_mask", "sky_mask")}
  host["has_sky_mask"] = np.ones((1,), bool)
  host["depth"] = conditions.depth_maps(clip)[None]
  return {k: jnp.asarray(v) for k, v in task.device_batch(host).items()}


def plan(cfg, batch) -> None:
  """One JSON line per remat setting: GiB of activations kept for the backward pass and of params + grads + AdamW."""
  import optax
  from flax.core import meta

  from check_gpu_lowering import pretend_gpu  # benchmarks/check_gpu_lowering.py
  from cvd_storm_jax import memory
  from cvd_storm_jax.tasks import get_task
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  # switch -> (the config section that holds it, its field there)
  switches = {"vae_remat": (lambda c: c.model, "vae_remat"), "gs_remat": (lambda c: c.model.gs, "remat"),
              "lpips_remat": (lambda c: c.loss, "lpips_remat")}
  settings = [("as configured", ())] + [(f"{k} off", (k,)) for k in switches] + [("all off", tuple(switches))]
  for label, off in settings:
    trial = cfg.copy_and_resolve_references()
    for name in off:
      section, field = switches[name]
      section(trial)[field] = False
    task = get_task(trial)
    with pretend_gpu():
      params = jax.eval_shape(lambda r, b: meta.unbox(task.init(r, b)), jax.random.key(0), abstract)
      kept = memory.saved_activation_bytes(
          lambda p, b: task.loss_fn(p, b, jax.random.key(1), jnp.int32(10_000))[0], params, abstract)
    trainable = {k: v for k, v in params.items() if k != "lpips"}  # LPIPS is frozen: no gradient, no moments
    state = memory.train_state_bytes(trainable, jax.eval_shape(optax.adamw(1e-4).init, trainable))
    emit({"setting": label, "activations_gb": round(kept / 2 ** 30, 2), "state_gb": round(state / 2 ** 30, 2)})


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tiny", action="store_true", help="CPU size: the tiny config at 32x56")
  ap.add_argument("--iters", type=int, default=None)
  ap.add_argument("--no_lpips", action="store_true", help="drop LPIPS from both losses")
  ap.add_argument("--plan", action="store_true",
                  help="run nothing: the activations the backward pass keeps, with the config's remat switches and "
                       "with each turned off (tracing only, cuDNN attention and Pallas as on a GPU; any CPU)")
  args = ap.parse_args()

  from flax.core import meta

  from configs.storm_vae import get_config
  from cvd_storm_jax.models.gs_decoder import GSDecoder
  from cvd_storm_jax.tasks import get_task

  cfg = get_config("tiny" if args.tiny else "")
  if args.no_lpips:
    cfg.loss.lpips_net = "none"
    cfg.loss.vae.lpips = 0.0
    cfg.loss.storm.lpips = 0.0
  height, width = (32, 56) if args.tiny else (256, 448)
  num_frames = 4 if args.tiny else 19
  if not args.tiny:
    cfg.storm.context_frames = (0, 6, 12, 18)
    cfg.storm.num_targets = 3
  task = get_task(cfg)
  batch = _batch(task, height, width, num_frames)
  if args.plan:
    plan(cfg, batch)
    return
  iters = args.iters or (3 if args.tiny else 10)

  params = jax.jit(lambda r, b: meta.unbox(task.init(r, b)))(jax.random.key(0), batch)
  grad_fn = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))
  rng, step = jax.random.key(1), jnp.int32(10_000)  # past lpips_start_step: the full loss
  t0 = time.perf_counter()
  jax.block_until_ready(grad_fn(params, batch, rng, step))
  compile_s = time.perf_counter() - t0
  step_ms = pipelined(grad_fn, params, batch, rng, step, iters=iters, warmup=1) * 1e3

  # The render alone, on the Gaussians of this batch.
  sel = jax.jit(lambda b: task.select(b, jax.random.key(2)))(batch)
  gauss = jax.jit(lambda p, s: task.forward(p, s, None, decode=False)["gaussians"])(params, sel)
  gs_params = {"params": params["gs"]}
  model = GSDecoder(task.gs_config)
  weights = jax.random.normal(jax.random.key(3), sel["tgt_images"].shape, jnp.float32)

  # Gradients w.r.t. the float fields (means, scales, ..., velocities); the rest (the view mask) rides along.
  floats = {k: v for k, v in gauss.items() if jnp.issubdtype(v.dtype, jnp.floating)}
  others = {k: v for k, v in gauss.items() if k not in floats}

  def render_loss(g):
    r = model.apply(gs_params, {**g, **others}, sel["tgt_cams"], sel["tgt_intrinsics"], sel["tgt_times"], height,
                    width, method=GSDecoder.render)
    return jnp.sum(r["rgb"] * weights) + jnp.sum(r["depth"]) * 1e-3, r["overflow"]

  render_fn = jax.jit(jax.value_and_grad(render_loss, has_aux=True))
  render_ms = pipelined(render_fn, floats, iters=iters, warmup=1) * 1e3
  overflow = int(render_fn(floats)[0][1])

  flops = task.flops_per_step(batch)
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    peak_gb = stats["peak_bytes_in_use"] / 2 ** 30
  else:
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
  mm_dtype = jnp.float32 if args.tiny else jnp.bfloat16
  ceiling = matmul_tflops(1024 if args.tiny else 8192, mm_dtype) * 1e12
  n_gauss = int(np.prod(gauss["opacities"].shape))
  out = {
      "bench": "storm_vae_train_step", "tiny": args.tiny, "device": str(dev.device_kind), "platform": dev.platform,
      "context": list(task.context_frames), "views": 6, "height": height, "width": width,
      "targets": int(sel["tgt_images"].shape[1]), "gaussians": n_gauss, "lpips": task.lpips_net,
      "compile_s": round(compile_s, 1), "step_ms": round(step_ms, 2), "render_ms": round(render_ms, 2),
      "render_share": round(render_ms / step_ms, 3), "rasterizer_overflow": overflow,
      "peak_mem_gb": round(peak_gb, 2), "xla_counted_step_flops": flops,
      "xla_counted_tflops": round(flops / (step_ms * 1e-3) / 1e12, 3),
      "matmul_ceiling_tflops": round(ceiling / 1e12, 3),
      "mfu_vs_matmul": round(flops / (step_ms * 1e-3) / ceiling, 4),
      "flops_note": "lower bound: XLA cost analysis counts custom calls (cuDNN attention) as 0; rasteriser and "
                    "LPIPS not counted",
  }
  emit(out)


if __name__ == "__main__":
  main()
