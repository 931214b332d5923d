"""DiT training-step benchmark: step time, tokens/s, model TFLOP/s and MFU against a bf16 matmul timed in this run.

  python benchmarks/bench_dit.py                 # paper size: SD3.5-medium CVD DiT, 19 frames x 6 views, 32x56 latents
  python benchmarks/bench_dit.py --model sd3     # the spatial MM-DiT alone on 114 images (diffusers anchor's workload)
  python benchmarks/bench_dit.py --tiny          # CPU smoke run
  python benchmarks/bench_dit.py --remat full    # start from this remat policy instead of the fastest that fits
                                                 # ("auto", which traces the model once per policy it sizes)
  python benchmarks/bench_dit.py --plan          # no run: memory and recomputation of each remat policy (any CPU)
  python benchmarks/bench_dit.py --model sd3 --anchor OUT/mmdit_anchor.json   # + the ratios to diffusers' run

Prints one JSON line (``timing.emit``). "model FLOPs" are analytic (cvd_dit.flops_per_clip: every matmul incl.
attention, forward x3, no recomputation). The diffusers anchor counts with torch's FlopCounterMode, which counts a
flash-attention backward as 2.5 forwards (not 2): 1.2 % more than ours at the paper size, so the like-for-like ratio
of the sd3 workload, ``speedup_vs_anchor``, is the anchor's fwd+bwd time over our step time (one workload, whatever
the count; our step also runs the AdamW update, the anchor's does not), and ``tflops_vs_anchor`` compares each side's
own TFLOP/s. The ceiling is an 8192^3 bf16 matmul on random data through XLA, same device, same run. Inputs are
random (normal latents and text, uniform timesteps), as the anchor's.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import optax
from flax.core import meta

from cvd_storm_jax import memory
from cvd_storm_jax.models import cvd_dit, mmdit
from timing import emit, matmul_tflops, timed  # benchmarks/timing.py


def compare_with_anchor(step_s: float, tflops: float, path: str) -> dict:
  """Ratios to diffusers' MM-DiT anchor (mmdit_anchor.json of the same run); > 1 = faster than diffusers."""
  if not os.path.isfile(path):
    return {"anchor": f"{path} not found"}
  anchor = json.load(open(path))
  runs = [r for k, r in anchor.items() if k.startswith("B114_") and isinstance(r, dict)]
  if not runs:
    return {"anchor": f"no B114 run in {path} (out of memory?)"}
  best = min(runs, key=lambda r: r["fwd_bwd_ms"])  # the anchor's faster setting (gradient checkpointing or not)
  return {"anchor": {"gpu": anchor.get("gpu"), **best, "bf16_matmul_tflops": anchor.get("bf16_matmul_tflops")},
          "speedup_vs_anchor": round(best["fwd_bwd_ms"] / 1e3 / step_s, 3),
          "tflops_vs_anchor": round(tflops / best["tflops"], 3)}


def plan(build, loss_of, params, state: int, inputs, model_flops: float) -> None:
  """Prints one JSON line per remat policy: memory and recomputation at this size, without allocating or running.

  params: the abstract params (ShapeDtypeStructs); state: train_state_bytes of params and optimizer.
  """
  from check_gpu_lowering import pretend_gpu  # benchmarks/check_gpu_lowering.py
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs)
  for policy in ("none",) + memory.POLICY_PREFERENCE:
    loss = loss_of(build(policy))
    with pretend_gpu():  # the attention's residuals as cuDNN keeps them
      kept = memory.saved_activation_bytes(loss, params, *abstract)
    # XLA's count of the lowered step (the CPU lowering: cuDNN custom calls would count as no FLOPs).
    step_flops = jax.jit(jax.grad(loss)).lower(params, *abstract).cost_analysis()["flops"]
    print(json.dumps({"remat": policy, "activations_gb": round(kept / 2 ** 30, 2),
                      "state_gb": round(state / 2 ** 30, 2), "total_gb": round((kept + state) / 2 ** 30, 2),
                      "step_flops_over_model_flops": round(step_flops / model_flops, 3)}), flush=True)


def add_size_args(ap: argparse.ArgumentParser) -> None:
  """--tiny and the clip's size (paper: 19 frames x 6 views, 32x56 latents, 154 text tokens)."""
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--frames", type=int, default=19)
  ap.add_argument("--views", type=int, default=6)
  ap.add_argument("--latent-hw", type=int, nargs=2, default=(32, 56))
  ap.add_argument("--text-len", type=int, default=154)


def sizes(args) -> tuple[int, int, int, int, int]:
  """(T, V, h, w, text length) of add_size_args' flags (--tiny: 2 x 2 clips of 8x8 latents, 8 tokens)."""
  if args.tiny:
    return 2, 2, 8, 8, 8
  return args.frames, args.views, args.latent_hw[0], args.latent_hw[1], args.text_len


def random_cvd_inputs(cfg, b: int, T: int, V: int, h: int, w: int, L: int, ks) -> tuple:
  """Random CVDDiT inputs for ``b`` clips (normal latents, text and cameras, uniform timesteps and layouts, all views
  adjacent, no block disabled); ``ks`` an iterator of keys."""
  normal = lambda *shape: jax.random.normal(next(ks), shape, jnp.float32)
  return (normal(b, T, V, h, w, cfg.in_channels), jax.random.uniform(next(ks), (b, T, V)) * 1000,
          normal(b, T, V, L, cfg.joint_attention_dim), normal(b, T, V, cfg.pooled_projection_dim),
          jax.random.uniform(next(ks), (b, T, V, 8 * h, 8 * w, cfg.layout_channels)),
          normal(b, T, V, cfg.camera_dim), jnp.ones((b, V, V), bool), jnp.zeros((b,), bool), jnp.zeros((b,), bool))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", choices=["cvd", "sd3"], default="cvd")
  add_size_args(ap)
  ap.add_argument("--remat", default="auto", choices=("auto",) + mmdit.REMAT_POLICIES,
                  help="auto: the least recomputation whose estimate fits the device (cvd_storm_jax.memory); a "
                       "policy: start there. If the step runs out of memory, the next policy of "
                       "memory.POLICY_PREFERENCE")
  ap.add_argument("--anchor", default=None, help="mmdit_anchor.json of diffusers_mmdit_step.py (same card, same run)")
  ap.add_argument("--memory-gib", type=float, default=0.0, help="budget for --remat auto (0: the device's limit)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--plan", action="store_true",
                  help="run nothing: per remat policy, the activations kept (GiB, cuDNN attention as on a GPU) and "
                       "XLA's FLOP count of the step over the model FLOPs (the recomputation), from tracing alone")
  args = ap.parse_args()

  cfg = cvd_dit.default_model_config("tiny" if args.tiny else "sd35_medium")
  cfg.dtype = "bfloat16"
  T, V, h, w, L = sizes(args)
  C = cfg.in_channels
  key = jax.random.key(0)
  ks = iter(jax.random.split(jax.random.key(1), 8))
  normal = lambda *shape: jax.random.normal(next(ks), shape, jnp.float32)
  if args.model == "cvd":
    build = lambda policy: cvd_dit.CVDDiT(**dict(cfg, remat_policy=policy))
    inputs = random_cvd_inputs(cfg, 1, T, V, h, w, L, ks)
    flops = 3 * cvd_dit.flops_per_clip(cfg, T, V, h, w, L)
    tokens = T * V * (h // cfg.patch_size) * (w // cfg.patch_size)
  else:
    sd3_keys = mmdit.SD3Transformer.__dataclass_fields__
    build = lambda policy: mmdit.SD3Transformer(**{k: v for k, v in dict(cfg, remat_policy=policy).items()
                                                   if k in sd3_keys})
    B = T * V
    inputs = (normal(B, h, w, C), jax.random.uniform(next(ks), (B,)) * 1000, normal(B, L, cfg.joint_attention_dim),
              normal(B, cfg.pooled_projection_dim))
    flops = 3 * mmdit.flops_per_image(cfg, h, w, L) * B
    tokens = B * (h // cfg.patch_size) * (w // cfg.patch_size)

  def loss_of(model):
    return lambda p, *x: jnp.mean(jnp.square(model.apply({"params": p}, *x).astype(jnp.float32)))

  tx = optax.adamw(1e-5)
  init = lambda k: meta.unbox(build("full").init(k, *inputs))["params"]
  budget = int(args.memory_gib * 2 ** 30) or memory.device_memory_bytes()
  measured, state_bytes = {}, None
  if args.remat == "auto" or args.plan:
    # Shapes first: the policy is chosen (or found not to fit) before anything is allocated or compiled.
    abstract_params = jax.eval_shape(init, key)
    state_bytes = memory.train_state_bytes(abstract_params, jax.eval_shape(tx.init, abstract_params))
    if args.plan:
      plan(build, loss_of, abstract_params, state_bytes, inputs, flops)
      return
    activation_bytes = lambda policy: memory.saved_activation_bytes(loss_of(build(policy)), abstract_params, *inputs)
    first, measured = memory.choose_remat_policy(activation_bytes, state_bytes, budget)
  else:
    first = args.remat  # no tracing to size it (each trace of the paper-size model takes ~20 s of host time)
  prefs = memory.POLICY_PREFERENCE
  candidates = prefs[prefs.index(first):] if first in prefs else (first,)

  params = jax.jit(init)(key)
  opt = jax.jit(tx.init)(params)
  state = {"p": params, "o": opt}
  for policy in candidates:
    loss = loss_of(build(policy))

    def step(params, opt, inputs):
      l, g = jax.value_and_grad(loss)(params, *inputs)
      u, opt = tx.update(g, opt, params)
      return optax.apply_updates(params, u), opt, l

    step = jax.jit(step, donate_argnums=(0, 1))

    def run(inputs):
      state["p"], state["o"], l = step(state["p"], state["o"], inputs)
      return l

    try:
      sec = timed(run, inputs, repeats=args.repeats)
      break
    except Exception as e:  # XlaRuntimeError: its class moved between jax releases; the message says what it was
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower() or policy == candidates[-1]:
        raise
      print(f"remat {policy}: out of memory ({str(e).splitlines()[0][:200]}); trying the next policy", flush=True)
      if any(x.is_deleted() for x in jax.tree.leaves(state)):  # donated into the failed call: rebuild the state
        state["p"] = jax.jit(init)(key)
        state["o"] = jax.jit(tx.init)(state["p"])
  mm = matmul_tflops(1024 if args.tiny else 8192)
  stats = jax.devices()[0].memory_stats() or {}
  tflops = flops / sec / 1e12
  res = {
      "bench": "dit_train_step", "model": args.model, "device": jax.devices()[0].device_kind,
      "params": sum(x.size for x in jax.tree.leaves(state["p"])), "frames": T, "views": V, "latent_hw": [h, w],
      "text_len": L, "remat": policy, "remat_asked": args.remat, "step_s": round(sec, 4),
      "tokens_per_s": round(tokens / sec, 1), "model_flops_per_step": flops, "model_tflops_per_s": round(tflops, 2),
      "bf16_matmul_tflops": round(mm, 1), "mfu_vs_matmul": round(tflops / mm, 4),
      "estimate_gb": (round((state_bytes + measured[policy]) / 2 ** 30, 2) if policy in measured else None),
      "budget_gb": round(budget / 2 ** 30, 2) if budget else None,
      "peak_mem_gb": round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2)}
  if args.anchor:
    res.update(compare_with_anchor(sec, tflops, args.anchor))
  emit(res)


if __name__ == "__main__":
  main()
