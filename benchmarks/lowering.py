"""What the lowering checks share (check_gpu_lowering.py: CUDA, check_tpu_lowering.py: TPU): no run commands here.

`jax.export` lowers a jitted function for any platform JAX knows, the local one or not: lowering needs the
platform's lowering rules, not its device. With `pretend_backend(...)`, `jax.default_backend()` names the target
platform, so that every "auto" choice of the package (attention implementation, rasterizer backend) resolves as on
that machine. Arguments are `jax.ShapeDtypeStruct`s (sharded ones for a mesh): nothing of the model is allocated.

  pretend_backend(platform, fakes)      context: jax.default_backend() answers `platform` (+ other fakes); restored
  recording(module, name[, describe])   context: a Counter of what `module.name(...)` returned while inside
  export_text(fn, platform, *args)      the StableHLO text of jax.jit(fn) (or of an already jitted fn) for platform
  custom_calls(text, targets)           {custom-call target: count}, of every target or only of `targets`
  custom_call_sites(text, target)       how often `target` runs (through the module's calls), in and out of shard_maps
  rasterizer_problem()                  the STORM-VAE-scale rasterizer's argument shapes and its summed outputs
  storm_vae_setup()                     the paper STORM-VAE config, task and one synthetic clip's batch shapes
  dit_setup(directory)                  the paper DiT config (a one-row text store in `directory`) and batch shapes
  trainer_step(config, mesh, batch)     the trainer's jitted update and its sharded abstract arguments
  run_parts(parts, ...)                 one JSON line per part, the exit status
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import re
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

# The repository root, for configs/; appended so that the installed cvd_storm_jax (which maps kernels/ into the
# package) wins over the source tree's cvd_storm_jax/, which has no kernels/ inside.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def pretend_backend(platform: str, fakes: dict | None = None):
  """Inside, jax.default_backend() returns `platform`, and each (module, name) of `fakes` is replaced by its value;
  everything is restored on exit. A name that is gone raises: a silent no-op patch would void the check."""
  fakes = {(jax, "default_backend"): lambda: platform, **(fakes or {})}
  for module, name in fakes:
    if not hasattr(module, name):
      raise RuntimeError(f"jax {jax.__version__}: {module.__name__}.{name} is gone; update the lowering check")
  saved = {key: getattr(*key) for key in fakes}
  try:
    for (module, name), fake in fakes.items():
      setattr(module, name, fake)
    yield
  finally:
    for (module, name), original in saved.items():
      setattr(module, name, original)


@contextlib.contextmanager
def recording(module, name: str, describe: Callable = lambda result, *args, **kwargs: str(result)):
  """Inside, counts describe(result, *args, **kwargs) of every call of module.name(...) (called through the module,
  as the package does) in the yielded Counter: which attention implementation or rasterizer backend an "auto" choice
  took (by default the result itself)."""
  original = getattr(module, name)
  seen = collections.Counter()

  @functools.wraps(original)
  def spy(*args, **kwargs):
    result = original(*args, **kwargs)
    seen[describe(result, *args, **kwargs)] += 1
    return result

  setattr(module, name, spy)
  try:
    yield seen
  finally:
    setattr(module, name, original)


def export_text(fn: Callable, platform: str, *args, allow: tuple[str, ...] = ()) -> str:
  """StableHLO of fn for `platform` ("cuda", "tpu", ...); `allow`: custom-call targets exempt from jax.export's
  stability check (the GPU kernels have no stable ABI; the check would refuse them)."""
  checks = [export.DisabledSafetyCheck.custom_call(t) for t in allow]
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  return export.export(jitted, platforms=[platform], disabled_checks=checks)(*args).mlir_module()


def custom_calls(text: str, targets: tuple[str, ...] | None = None) -> dict[str, int]:
  found = collections.Counter(re.findall(r"stablehlo\.custom_call @([^\s(]+)\(", text))
  return dict(sorted(found.items())) if targets is None else {t: found[t] for t in targets if found[t]}


def custom_call_sites(text: str, target: str) -> dict:
  """How many times the program runs custom call `target`, counted through its calls: a function that several call
  sites share (one lowering of the same kernel for equal shapes) counts once per call. Returns {"total": n,
  "in_shard_map": those inside an `sdy.manual_computation` region (a jax.shard_map), "manual_axes": the mesh axes
  those regions are manual over, sorted}. Relies on MLIR's printed form: one op per line, regions indented."""
  funcs, name = {}, None
  for line in text.splitlines():
    start = re.match(r"\s*func\.func (?:public |private )?@([\w.$-]+)\(", line)
    if start:
      name = start.group(1)
      funcs[name] = []
    elif name is not None:
      funcs[name].append(line)
  own = re.compile(r"stablehlo\.custom_call @" + re.escape(target) + r"\(")
  call = re.compile(r"\bcall @([\w.$-]+)\(")

  @functools.cache
  def count(fn: str) -> tuple[int, int, frozenset]:
    """(runs of `target` per call of fn, of which inside a manual computation, the axes those are manual over)."""
    total = inside = 0
    axes = set()
    region = region_axes = None  # indentation and manual axes of the enclosing manual_computation, if any
    for line in funcs.get(fn, ()):
      indent = len(line) - len(line.lstrip())
      if region is not None and indent <= region:
        region = None
      runs, runs_inside = len(own.findall(line)), 0
      for callee in call.findall(line):
        t, i, a = count(callee)
        runs, runs_inside, axes = runs + t, runs_inside + i, axes | a
      if region is not None and runs:
        runs_inside = runs
        axes |= region_axes
      total, inside = total + runs, inside + runs_inside
      if region is None and "sdy.manual_computation(" in line:
        region = indent
        manual = re.search(r"manual_axes=\{([^}]*)\}", line)
        region_axes = set(re.findall(r'"(\w+)"', manual.group(1))) if manual else set()
    return total, inside, frozenset(axes)

  total, inside, axes = count("main" if "main" in funcs else next(iter(funcs), ""))
  return {"total": total, "in_shard_map": inside, "manual_axes": sorted(axes)}


def rasterizer_problem(reduction: str = "quantities"):
  """STORM-VAE scale (peer-anchors.md): 2.75 M Gaussians into 18 images of 256x448, 6 features + depth.
  Returns (description, argument shapes, loss) with loss = the sum of every output, through backend "auto"."""
  from cvd_storm_jax import kernels
  n, k, h, w, c = 4 * 6 * 256 * 448, 18, 256, 448, 6
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  shapes = (f32(n, 3), f32(n, 4), f32(n, 3), f32(n), f32(n, c), f32(k, 4, 4), f32(k, 3, 3))

  def loss(means, quats, scales, opacities, features, viewmats, ks):
    out = kernels.rasterize(means, quats, scales, opacities, features, viewmats, ks, w, h, backend="auto",
                            pallas_reduction=reduction)
    return jnp.sum(out.features) + jnp.sum(out.depth) + jnp.sum(out.alpha)

  return {"gaussians": n, "images": k, "hw": [h, w], "features": c}, shapes, loss


def storm_vae_setup(batch_size: int = 1):
  """The paper STORM-VAE config (4 context frames x 6 views at 256x448, 3 targets), its task, and the shapes of a
  device batch of `batch_size` synthetic 6-view clips (one is generated; the others repeat its shapes)."""
  from configs.storm_vae import get_config
  from cvd_storm_jax.tasks import get_task
  cfg = get_config("")
  cfg.storm.context_frames = (0, 6, 12, 18)
  cfg.storm.num_targets = 3
  task = get_task(cfg)
  from bench_storm_vae import _batch  # benchmarks/: one synthetic 6-view clip at 256x448
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype),
                       _batch(task, 256, 448, 19))
  return cfg, task, batch


def dit_setup(directory: str, remat: str, batch_size: int = 1, hw: tuple[int, int] = (256, 448)):
  """The paper DiT config (configs/dit.py: SD3.5-medium CVD DiT, bf16, frozen SD3.5-shaped VAE encoder in the step,
  precomputed SD3 text) with `remat` for the trainer's "auto", and a device batch of `batch_size` clips at `hw`
  (the largest bucket). The text conditioning needs a store for the dropped prompt: a one-row store of the
  precompute_text layout (77 CLIP + 77 T5 tokens, float16) is written in `directory`."""
  from configs.dit import get_config
  from cvd_storm_jax.data_pipelines import text_store
  from cvd_storm_jax.tasks import get_task
  cfg = get_config("")
  m = cfg.model
  clip_length, t5_length, clip_dim = 77, 77, 768 + 1280  # SD3: CLIP-L || CLIP-G, T5-XXL at precompute_text's default
  os.makedirs(directory, exist_ok=True)
  for name, shape in (("clip", (1, clip_length, clip_dim)), ("t5", (1, t5_length, m.joint_attention_dim)),
                      ("pooled", (1, m.pooled_projection_dim))):
    np.save(os.path.join(directory, f"{name}.npy"), np.zeros(shape, np.float16))
  meta = dict(format=text_store.FORMAT, captions=[""], clip_length=clip_length, t5_length=t5_length,
              clip_dim=clip_dim, joint_dim=m.joint_attention_dim, pooled_dim=m.pooled_projection_dim,
              dtype="float16", has_t5=True)
  for name, content in (("meta.json", meta), ("progress.json", {"done": 1})):
    with open(os.path.join(directory, name), "w") as f:
      json.dump(content, f)
  cfg.data.text_embeddings = directory
  # The random-encoder branch (no weights needed) with VAEConfig's defaults, the SD3.5 VAE's architecture.
  cfg.latents.vae = dict(block_out_channels=(128, 256, 512, 512))
  cfg.model.remat_policy = remat
  task = get_task(cfg)
  # The pipeline's host batch (pipeline.py's docstring) as zero-strided arrays, through the task's own selection:
  # a key the task needs and this list lacks fails here, as it would in the trainer.
  b, t, v, (h, w) = batch_size, cfg.data.num_frames, cfg.data.num_views, hw
  length = clip_length + t5_length
  host = {"images": ((b, t, v, h, w, 3), np.uint8), "box_images": ((b, t, v, h, w, 3), np.uint8),
          "map_images": ((b, t, v, h, w, 3), np.uint8), "camera_params": ((b, t, v, 11), np.float32),
          "view_adjacency": ((b, v, v), np.bool_), "view_mask": ((b, v), np.bool_),
          "text_tokens": ((b, t, v, length, m.joint_attention_dim), np.float16),
          "pooled_text": ((b, t, v, m.pooled_projection_dim), np.float16)}
  host = {k: np.broadcast_to(np.zeros((), dtype), shape) for k, (shape, dtype) in host.items()}
  batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype) for k, x in task.device_batch(host).items()}
  return cfg, task, batch


def trainer_step(config, mesh, abstract_batch) -> tuple[Callable, tuple]:
  """The update step exactly as cvd_storm_jax.train jits it for `config` on `mesh`: its `make_fresh_state`,
  `make_state_shardings` and `make_update`, the params' and batch's shardings from the same sharding helpers.
  `abstract_batch`: the global batch's shapes. Returns (the jitted update, its arguments as sharded ShapeDtypeStructs); lower it under jax.set_mesh(mesh)
  and nn.logical_axis_rules(sharding.rules_from_config(config.sharding_rules))."""
  import flax.linen as nn
  from flax.core import meta

  from cvd_storm_jax import sharding, tasks, train
  jax.config.update("jax_threefry_partitionable", True)  # as train.train sets it
  rules = sharding.rules_from_config(config.sharding_rules)
  accum = config.get("grad_accum_steps", 1)
  task = tasks.get_task(config)
  init_rng = jax.random.split(jax.random.key(config.seed))[0]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed_params = jax.eval_shape(task.init, init_rng, abstract_batch)
  param_shardings = sharding.tree_shardings(boxed_params, mesh, rules)
  abstract_params = meta.unbox(boxed_params)
  tx, lr_schedule = train._optimizer(config.optimizer, config.total_steps, task.trainable_mask(abstract_params))
  repl = sharding.replicated(mesh)
  state_shardings = train.make_state_shardings(abstract_params, jax.eval_shape(tx.init, abstract_params),
                                               param_shardings, mesh)
  fresh_state = train.make_fresh_state(task, tx, abstract_batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_state = jax.eval_shape(fresh_state, init_rng)
  update = train.make_update(task, tx, lr_schedule, accum, mesh, param_shardings)
  batch_shardings = {k: sharding.batch_sharding(mesh, len(s.shape)) for k, s in abstract_batch.items()}
  update_fn = jax.jit(update, in_shardings=(state_shardings, batch_shardings, repl),
                      out_shardings=(state_shardings, repl), donate_argnums=(0,))
  placed = lambda tree, shardings: jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                                tree, shardings)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
  return update_fn, (placed(abstract_state, state_shardings), placed(abstract_batch, batch_shardings), rng)


def parse_mesh(text: str) -> dict[str, int]:
  """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2} (config.mesh's form)."""
  try:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
  except ValueError:
    raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected axis=size,... e.g. data=2,fsdp=2,tensor=2") from None


def run_parts(parts: dict[str, Callable], names: list[str], args, context: Callable) -> int:
  """Runs each named part inside context() and prints its JSON line (a part that raises prints its error);
  returns the exit status: 1 when any part failed."""
  failed = False
  for name in names:
    t0 = time.perf_counter()
    try:
      with context():
        result = parts[name](args)
    except Exception as e:  # noqa: BLE001 - one JSON line per part, then a non-zero exit
      result = {"part": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:3000]}"}
    result.setdefault("part_s", round(time.perf_counter() - t0, 1))
    failed |= not result["ok"]
    print(json.dumps(result), flush=True)
  return 1 if failed else 0
