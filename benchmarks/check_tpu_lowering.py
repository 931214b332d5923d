r"""Lower the TPU code paths for TPU on a machine without a TPU (the TPU twin of check_gpu_lowering.py).

No TPU has run this code; this shows, before one does, that every paper-size program lowers for it and that every
"auto" choice takes a TPU path. `jax.export` lowers for platform "tpu" here (lowering needs JAX's TPU lowering rules,
not a TPU, nor libtpu), at the paper shapes (arguments are `jax.ShapeDtypeStruct`s: nothing is allocated), with
`jax.default_backend()` reporting "tpu". The train steps are the trainer's own `update` (cvd_storm_jax/train.py),
jitted with its shardings, on a one-device mesh and on a mesh of 8 virtual CPU devices standing in for 8 TPU chips
(the exported module carries the mesh and the shardings; XLA partitions it when a TPU compiles it).

  python benchmarks/check_tpu_lowering.py                       # all parts (~4 min on 2 busy CPU cores, 4.3 GB RSS)
  python benchmarks/check_tpu_lowering.py --part dit_sharded    # rasterizer | dit | dit_sharded | storm_vae |
                                                                # storm_vae_sharded
  python benchmarks/check_tpu_lowering.py --mesh data=1,fsdp=4,tensor=2   # the *_sharded mesh (default 2,2,2)
  python benchmarks/check_tpu_lowering.py --remat full          # the DiT's policy in place of the trainer's "auto"

Parts: "rasterizer" (forward + backward at the STORM-VAE scale, backend "auto"); "dit" / "dit_sharded" (the train
step of configs/dit.py: SD3.5-medium CVD DiT in bf16 with its frozen VAE encoder, one 19-frame 6-view 256x448 clip per
data-parallel device); "storm_vae" / "storm_vae_sharded" (the train step of configs/storm_vae.py, likewise). Expect
every line "ok": true. A part passes when every attention call chose a TPU path ("tpu_splash", the Pallas
splash-attention kernel, or "xla"; `attention_calls` lists each choice with its lengths and heads), every rasterizer
call "xla" (Pallas would run its Triton kernels or, off GPU, its interpreter, which leaves no custom call to spot:
hence the recorded choice), no GPU-only custom call (`__gpu$xla.gpu.triton`, `__cudnn$...`, `cu_...`) is in the
module, each splash call lowered to Mosaic kernels (`tpu_custom_call`: forward, dq and dkv, plus a recomputed forward
under remat) that, in a sharded module, all run inside a shard_map (the SPMD partitioner cannot split a custom call;
`splash_kernels`), and a sharded module spans the mesh with every axis of size > 1 in use. "LuDecomposition"
(jnp.linalg.inv of the poses) is TPU's own. `largest_tensor` is the largest value in the module (global shapes, before
partitioning): the logits of the calls left on "xla" are materialised there, the splash kernel's never are. Prints one
JSON line per part; exits non-zero when a part fails.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

from lowering import (custom_call_sites, custom_calls, dit_setup, export_text, parse_mesh, pretend_backend,
                      rasterizer_problem, recording, run_parts, storm_vae_setup, trainer_step)  # benchmarks/lowering.py

# Targets that only a GPU runtime implements: any of them in a TPU module means a GPU path was taken.
GPU_ONLY = re.compile(r"^(__gpu\$|__cudnn\$|__cublas|cu_|cublas|triton|mosaic_gpu)")
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}
_BYTES = {"i1": 1, "i8": 1, "ui8": 1, "f16": 2, "bf16": 2, "i16": 2, "f32": 4, "i32": 4, "ui32": 4, "f64": 8,
          "i64": 8, "ui64": 8}


def largest_tensor(text: str) -> dict:
  """The largest ranked tensor type in the module, by bytes (sizes before any partitioning)."""
  best, best_bytes = None, 0
  for dims, dtype in sorted(set(re.findall(r"tensor<((?:\d+x)+)(\w+)>", text))):  # sorted: ties break alike
    size = _BYTES.get(dtype, 4)
    for d in dims[:-1].split("x"):
      size *= int(d)
    if size > best_bytes:
      best, best_bytes = f"{dims}{dtype}", size
  return {"type": best, "gib": round(best_bytes / 2 ** 30, 2)}


def attention_choices():
  """Context: records each attention call's choice with its shapes ("tpu_splash q43031 k43031 12x64": count) in the
  yielded Counter; attention._pick is what dot_product_attention consults once per call."""
  from cvd_storm_jax.models import attention
  describe = lambda result, q, k, *args, **kwargs: f"{result} q{q.shape[1]} k{k.shape[1]} {q.shape[2]}x{q.shape[3]}"
  return recording(attention, "_pick", describe)


def lower_for_tpu(fn, *args) -> dict:
  """Exports fn for TPU and reports what the package chose on the way and what the module holds."""
  from cvd_storm_jax import kernels
  t0 = time.perf_counter()
  with attention_choices() as calls, recording(kernels, "resolve_backend") as raster:
    text = export_text(fn, "tpu", *args)
  chosen = collections.Counter()
  for key, n in calls.items():
    chosen[key.split()[0]] += n
  found = custom_calls(text)
  gpu_only = sorted(t for t in found if GPU_ONLY.match(t))
  partitions = re.search(r"mhlo\.num_partitions = (\d+)", text)
  # Mesh axes that some sharding annotation (arguments, results, constraints) splits a value over.
  axes = set(re.findall(r'"(\w+)"', " ".join(re.findall(r"sdy\.sharding<@mesh, \[([^>]*)\]>", text))))
  # Each splash call is a forward, a dq and a dkv kernel at least (a recomputed forward more under remat), and in a
  # partitioned module every one of them must run inside a shard_map (on a one-device mesh JAX emits none: nothing
  # to split there).
  partitions = int(partitions.group(1)) if partitions else 1
  kernels_run = custom_call_sites(text, "tpu_custom_call")
  kernels_ok = (kernels_run["total"] >= 3 * chosen["tpu_splash"] and
                (partitions == 1 or kernels_run["in_shard_map"] == kernels_run["total"]) and
                (kernels_run["total"] > 0) == (chosen["tpu_splash"] > 0))
  return {"lower_s": round(time.perf_counter() - t0, 1), "attention": dict(chosen),
          "attention_calls": dict(sorted(calls.items())), "rasterizer_backend": dict(raster), "custom_calls": found,
          "splash_kernels": kernels_run, "gpu_only_calls": gpu_only, "largest_tensor": largest_tensor(text),
          "f64_types": text.count("xf64>") + text.count("<f64>"), "mlir_mb": round(len(text) / 2 ** 20, 1),
          "partitions": partitions, "mesh_axes_used": sorted(axes),
          "ok": (not gpu_only and set(chosen) <= {"xla", "tpu_splash"} and set(raster) <= {"xla"} and kernels_ok)}


def check_rasterizer(args) -> dict:
  """STORM-VAE scale: "auto" must be the tiled XLA path on TPU."""
  problem, shapes, loss = rasterizer_problem()
  result = {"part": "rasterizer", **problem, **lower_for_tpu(jax.grad(loss, argnums=tuple(range(5))), *shapes)}
  result["ok"] &= result["rasterizer_backend"] == {"xla": 1}
  return result


def lower_train_step(part: str, mesh_config: dict, setup) -> dict:
  """The trainer's update on a mesh of `mesh_config` (config.mesh's form) over this process's CPU devices, one clip
  per data-parallel device; setup(global batch size) -> (config, abstract batch)."""
  import flax.linen as nn

  from cvd_storm_jax import sharding
  size = int(np.prod(list(mesh_config.values())))
  devices = jax.devices("cpu")
  if len(devices) < size:
    raise RuntimeError(f"mesh {mesh_config} needs {size} devices, {len(devices)} CPU devices here: set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={size} before JAX starts")
  mesh = sharding.make_mesh(mesh_config, devices[:size])
  config, batch = setup(sharding.data_parallel_size(mesh))
  update_fn, abstract_args = trainer_step(config, mesh, batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config.sharding_rules)):
    result = lower_for_tpu(update_fn, *abstract_args)
  # One SPMD program over the whole mesh, in which every axis of size > 1 shards something (FSDP and tensor
  # parallelism reach the TPU module, not only the data split).
  result["ok"] &= (result["partitions"] == mesh.size and
                   set(result["mesh_axes_used"]) >= {a for a, n in mesh.shape.items() if n > 1})
  return {"part": part, "mesh": dict(mesh.shape), "images": list(batch["images"].shape), **result}


def _dit_setup(args):
  return lambda batch_size: dit_setup(args.text_store, args.remat, batch_size)[::2]  # (config, batch)


def check_dit(args) -> dict:
  """Paper DiT train step on one device."""
  return {**lower_train_step("dit", ONE_DEVICE, _dit_setup(args)), "remat": args.remat}


def check_dit_sharded(args) -> dict:
  """Paper DiT train step on args.mesh (data=2, fsdp=2, tensor=2 by default): FSDP + tensor parallel shardings."""
  return {**lower_train_step("dit_sharded", args.mesh, _dit_setup(args)), "remat": args.remat}


def check_storm_vae(args) -> dict:
  """Paper STORM-VAE train step on one device: GS-decoder attention and the rasterizer under the renderer's vmaps."""
  return lower_train_step("storm_vae", ONE_DEVICE, lambda batch_size: storm_vae_setup(batch_size)[::2])


def check_storm_vae_sharded(args) -> dict:
  """Paper STORM-VAE train step on args.mesh: the renderer's vmaps over a batch split across devices."""
  return lower_train_step("storm_vae_sharded", args.mesh, lambda batch_size: storm_vae_setup(batch_size)[::2])


PARTS = {"rasterizer": check_rasterizer, "dit": check_dit, "dit_sharded": check_dit_sharded,
         "storm_vae": check_storm_vae, "storm_vae_sharded": check_storm_vae_sharded}


def main():
  from cvd_storm_jax.models import mmdit
  ap = argparse.ArgumentParser()
  ap.add_argument("--part", choices=["all", *PARTS], default="all")
  ap.add_argument("--mesh", type=parse_mesh, default=parse_mesh("data=2,fsdp=2,tensor=2"),
                  help="the mesh of the *_sharded parts (config.mesh's axes; their product in virtual CPU devices)")
  ap.add_argument("--remat", default="save_out_proj", choices=mmdit.REMAT_POLICIES,
                  help="the DiT's remat policy in place of the trainer's 'auto' (sized on the device it runs on)")
  args = ap.parse_args()
  devices = int(np.prod(list(args.mesh.values())))
  # Read when JAX starts its CPU backend (the first device query), which has not happened yet.
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  with tempfile.TemporaryDirectory() as tmp:
    args.text_store = os.path.join(tmp, "text_store")  # the DiT config's one-row text store (lowering.dit_setup)
    sys.exit(run_parts(PARTS, list(PARTS) if args.part == "all" else [args.part], args,
                       lambda: pretend_backend("tpu")))


if __name__ == "__main__":
  main()
