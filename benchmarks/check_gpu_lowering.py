r"""Lower the GPU code paths for CUDA on a machine without a GPU, and compile the Triton kernels to sm_90 machine code.

GPU time is scarce; this catches what would otherwise only fail on the GPU machine. `jax.export` lowers a jitted
function for a platform other than the local one, so the Pallas -> Triton lowering and the cuDNN attention lowering
run for real here, at the paper shapes (arguments are `jax.ShapeDtypeStruct`s: nothing is allocated). For the run,
`jax.default_backend()` reports "gpu", so every "auto" choice resolves as on a GPU (Pallas kernels, not interpreted;
cuDNN attention for bf16), and the cuDNN version / compute-capability probes, which need a GPU, answer "cuDNN 9.10 on
a Hopper" (the H100/H200 of the GPU machine). What this and check_tpu_lowering.py share is in lowering.py.

  python benchmarks/check_gpu_lowering.py                      # all parts
  python benchmarks/check_gpu_lowering.py --part rasterizer    # rasterizer | dit | storm_vae

With the `triton` package importable (`pip install triton`: PyPI's Triton, a CPU-side compiler that bundles ptxas),
the rasterizer's Triton IR is also compiled to a cubin for sm_90a, and ptxas reports registers, spills and shared
memory per kernel. That is PyPI's Triton, not the one inside XLA, so it proves the IR is compilable, not that
XLA's pipeline makes the same code. Prints one JSON line per part; exits non-zero when a part fails.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lowering import (custom_calls, export_text, pretend_backend, rasterizer_problem, run_parts,
                      storm_vae_setup)  # benchmarks/lowering.py

TRITON_CALL = "__gpu$xla.gpu.triton"
CUDNN_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "__cudnn$fmhaScaleBiasSoftmax",
               "__cudnn$fmhaScaleBiasSoftmaxBackward")
GPU_CALLS = (TRITON_CALL,) + CUDNN_CALLS


def pretend_gpu():
  """Inside, the "auto" choices and the cuDNN probes answer as on an H100/H200; restored on exit."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  return pretend_backend("gpu", {
      (fa, "check_cudnn_version"): lambda: 91000,
      (fa, "check_compute_capability"): lambda capability: tuple(map(int, capability.split("."))) <= (9, 0),
      (fa, "is_cuda_compute_capability_equal"): lambda capability: capability == "9.0"})


@contextlib.contextmanager
def capture_triton_ir():
  """Inside, records the Triton IR (text) of every Pallas kernel lowered, as (name, text) in the yielded list."""
  from jax._src.pallas.triton import pallas_call_registration as registration
  modules = []
  original = registration.lowering.lower_jaxpr_to_triton_module

  def recording(*args, **kwargs):
    result = original(*args, **kwargs)
    op = result.module.operation
    name = op.attributes["sym_name"].value if "sym_name" in op.attributes else f"kernel{len(modules)}"
    modules.append((name, op.get_asm(enable_debug_info=False)))
    return result

  registration.lowering.lower_jaxpr_to_triton_module = recording
  try:
    yield modules
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = original


def export_for_cuda(fn, *args) -> str:
  return export_text(fn, "cuda", *args, allow=GPU_CALLS)


def compile_with_triton(modules, num_warps: int = 8) -> list[dict]:
  """Compiles each Triton IR module to a cubin for sm_90a with PyPI's Triton; ptxas -v statistics per kernel."""
  try:
    import triton
    from triton.backends.compiler import GPUTarget
  except ImportError:
    return [{"skipped": "the triton package is not installed (pip install triton)"}]
  ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
  report = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, text in modules:
      path = os.path.join(tmp, f"{name}.ttir")
      with open(path, "w") as f:
        f.write(text)
      entry = {"kernel": name, "triton": triton.__version__}
      try:
        compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": 1})
      except Exception as e:  # noqa: BLE001 - reported, and the part fails
        entry["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        report.append(entry)
        continue
      entry["shared_bytes"] = int(compiled.metadata.shared)
      ptx = os.path.join(tmp, f"{name}.ptx")
      with open(ptx, "w") as f:
        f.write(compiled.asm["ptx"])
      out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True, text=True)
      stats = out.stdout + out.stderr
      for key, pattern in (("registers", r"Used (\d+) registers"), ("spill_store_bytes", r"(\d+) bytes spill stores"),
                           ("spill_load_bytes", r"(\d+) bytes spill loads")):
        m = re.search(pattern, stats)
        entry[key] = int(m.group(1)) if m else None
      report.append(entry)
  return report


def check_rasterizer(args) -> dict:
  """STORM-VAE scale (peer-anchors.md): 2.75 M Gaussians into 18 images of 256x448, 6 features + depth, forward and
  backward through the Pallas kernels, for each of the backward's reductions."""
  from cvd_storm_jax import kernels
  result = {"part": "rasterizer", **rasterizer_problem()[0], "ok": True}
  for reduction in kernels.PALLAS_REDUCTIONS:
    _, shapes, loss = rasterizer_problem(reduction)
    t0 = time.perf_counter()
    with capture_triton_ir() as modules:
      found = custom_calls(export_for_cuda(jax.grad(loss, argnums=tuple(range(5))), *shapes), GPU_CALLS)
    part = with_compiled_kernels({"lower_s": round(time.perf_counter() - t0, 1), "custom_calls": found,
                                  "kernels": sorted(name for name, _ in modules),
                                  "ok": found.get(TRITON_CALL) == 2}, modules, args)
    result[f"reduction_{reduction}"] = part
    result["ok"] &= part["ok"]
  return result


def with_compiled_kernels(result: dict, modules, args) -> dict:
  if not args.no_triton_compile:
    result["compiled"] = compile_with_triton(modules)
    result["ok"] &= not any("error" in e for e in result["compiled"])
  return result


def lower_dit(size: str, frames: int, views: int, latent_hw: tuple[int, int], text_len: int,
              remat: str = "save_out_proj") -> dict:
  """Lowers the CVD DiT's bf16 forward + backward for CUDA with a remat policy (the default is the one bench_dit's
  "auto" takes for this model on an H200). Returns the parameter count, the custom calls found and the number of
  attention layers of the config (each must be one cuDNN backward call)."""
  from flax.core import meta

  from cvd_storm_jax.models import cvd_dit
  cfg = cvd_dit.default_model_config(size)
  cfg.dtype = "bfloat16"
  cfg.remat_policy = remat
  model = cvd_dit.CVDDiT(**cfg)
  t, v, (h, w), length = frames, views, latent_hw, text_len
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  inputs = (f32(1, t, v, h, w, cfg.in_channels), f32(1, t, v), f32(1, t, v, length, cfg.joint_attention_dim),
            f32(1, t, v, cfg.pooled_projection_dim), f32(1, t, v, 8 * h, 8 * w, 6), f32(1, t, v, 11),
            jax.ShapeDtypeStruct((1, v, v), jnp.bool_), jax.ShapeDtypeStruct((1,), jnp.bool_),
            jax.ShapeDtypeStruct((1,), jnp.bool_))
  params = jax.eval_shape(lambda key, *x: meta.unbox(model.init(key, *x))["params"], jax.random.key(0), *inputs)

  def loss(p, *x):
    return jnp.mean(jnp.square(model.apply({"params": p}, *x).astype(jnp.float32)))

  found = custom_calls(export_for_cuda(jax.grad(loss), params, *inputs), GPU_CALLS)
  layers = (cfg.num_layers + len(cfg.dual_attention_layers) + len(cfg.temporal_layers) + len(cfg.crossview_layers))
  cudnn_bwd = sum(n for name, n in found.items() if name.startswith("__cudnn") and name.endswith("Backward"))
  return {"params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))), "remat": remat,
          "custom_calls": found, "attention_layers": layers, "cudnn_backward_calls": cudnn_bwd}


def check_dit(args) -> dict:
  """The paper-size CVD DiT (SD3.5-medium width, 19 frames x 6 views, 32x56 latents, 154 text tokens) forward and
  backward in bf16: every attention layer must take the cuDNN path."""
  t0 = time.perf_counter()
  result = {"part": "dit", **lower_dit("sd35_medium", 19, 6, (32, 56), 154)}
  result["lower_s"] = round(time.perf_counter() - t0, 1)
  result["ok"] = result["cudnn_backward_calls"] == result["attention_layers"]
  return result


def check_storm_vae(args) -> dict:
  """The paper-scale STORM-VAE loss and gradient (4 context frames x 6 views at 256x448, 3 targets): cuDNN attention
  in the GS decoder, the Pallas rasterizer under the renderer's vmaps."""
  from flax.core import meta
  _, task, batch = storm_vae_setup()
  params = jax.eval_shape(lambda r, b: meta.unbox(task.init(r, b)), jax.random.key(0), batch)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  t0 = time.perf_counter()
  grad_fn = jax.grad(lambda p, b, r: task.loss_fn(p, b, r, jnp.int32(10_000))[0])
  with capture_triton_ir() as modules:
    text = export_for_cuda(grad_fn, params, batch, rng)
  found = custom_calls(text, GPU_CALLS)
  result = {"part": "storm_vae", "lower_s": round(time.perf_counter() - t0, 1), "custom_calls": found,
            "kernels": sorted({name for name, _ in modules}),
            "ok": found.get(TRITON_CALL, 0) >= 2 and any(name.startswith("__cudnn") for name in found)}
  return with_compiled_kernels(result, modules, args)  # the kernels as batched by the renderer's vmaps


PARTS = {"rasterizer": check_rasterizer, "dit": check_dit, "storm_vae": check_storm_vae}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--part", choices=["all", *PARTS], default="all")
  ap.add_argument("--no_triton_compile", action="store_true", help="lower only; skip PyPI Triton's compile")
  args = ap.parse_args()
  if jax.devices()[0].platform == "gpu":
    print("a GPU is present: run the benchmarks instead (benchmarks/run_all_gpu.sh)", file=sys.stderr)
  sys.exit(run_parts(PARTS, list(PARTS) if args.part == "all" else [args.part], args, pretend_gpu))


if __name__ == "__main__":
  main()
