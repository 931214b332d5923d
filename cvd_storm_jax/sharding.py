"""Device meshes and the mapping from logical axis names (in the models) to mesh axes (in the config).

Models name the axes of their params (``nn.with_logical_partitioning``) and activations
(``nn.with_logical_constraint``) with logical names ("batch", "embed", "mlp", "heads", ...). The config's
``sharding_rules`` maps each name to mesh axes, MaxText style, so that one model runs data-parallel, FSDP, tensor
parallel or any mix by changing only ``config.mesh`` and ``config.sharding_rules``.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every mesh axis that carries data-parallel work.
BATCH_AXES = ("data", "fsdp")


def default_rules() -> tuple[tuple[str, Any], ...]:
  """Logical axis -> mesh axes, the configs' default (MaxText style). Params: FSDP over 'fsdp' on the model width
  and on conv input channels (without it every conv kernel, e.g. the layout adapter's 21 M-param 3x3 convs and the
  whole VAE, stayed whole on every device), tensor parallelism over 'tensor' on the MLP / heads / vocab / conv-output
  dims. "conv_in" comes after "embed": a kernel annotated ("conv_in", "embed") is sharded on embed (a mesh axis is
  used once per array). Activations: the batch over ('data', 'fsdp'). Tuples, so that a ConfigDict holds them and the
  command line can override them."""
  return (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
      ("conv_out", "tensor"),
      ("kv", None),
      ("conv_in", "fsdp"),
      ("norm", None),
      ("layers", None),
      ("length", None),
  )


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ('data', 'fsdp', 'tensor') sized from ``mesh_config`` (a mapping; -1 = all remaining devices).

  Raises ValueError when the sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {name: int(mesh_config.get(name, 1)) for name in MESH_AXES}
  unknown = set(mesh_config.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; known: {MESH_AXES}")
  auto = [k for k, v in sizes.items() if v == -1]
  if len(auto) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {auto}")
  fixed = int(np.prod([v for v in sizes.values() if v != -1]))
  if auto:
    if len(devices) % fixed:
      raise ValueError(f"config.mesh {dict(mesh_config)}: {len(devices)} devices are not divisible by {fixed}")
    sizes[auto[0]] = len(devices) // fixed
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(f"config.mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, "
                     f"but {len(devices)} are available")
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(tuple(sizes[a] for a in MESH_AXES), devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
  return Mesh(grid, MESH_AXES)


def rules_from_config(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """ConfigDict lists -> the tuple-of-pairs form flax expects; mesh axes may be None, a name or a list of names."""
  out = []
  for rule in rules:
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    out.append((str(name), axes))
  return tuple(out)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh, path: str) -> P:
  """Drops mesh axes from dims they do not divide (small params, odd widths), so every rule is safe to apply."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    keep = []
    size = 1
    for a in names:
      if dim % (size * mesh.shape[a]) == 0:
        keep.append(a)
        size *= mesh.shape[a]
      else:
        log.debug("sharding: %s dim %d not divisible by mesh axis %s; left replicated", path, dim, a)
    fitted.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
  return P(*fitted)


def tree_shardings(boxed_abstract: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a (possibly logically boxed) abstract pytree; unboxed leaves are replicated."""
  logical_specs = nn.get_partition_spec(boxed_abstract)
  # The boxes' plain values: meta.unbox would also apply sharding constraints when a mesh is in context.
  is_box = lambda x: isinstance(x, meta.AxisMetadata)
  unboxed = jax.tree.map(lambda x: x.value if is_box(x) else x, boxed_abstract, is_leaf=is_box)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(unboxed)[0]
  specs_flat = jax.tree_util.tree_leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P) or x is None)
  if len(specs_flat) != len(paths_and_leaves):
    raise AssertionError("partition specs and params disagree in structure")
  shardings = [
      NamedSharding(mesh, _fit(spec if isinstance(spec, P) else P(), leaf.shape, mesh, jax.tree_util.keystr(path)))
      for (path, leaf), spec in zip(paths_and_leaves, specs_flat)
  ]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(unboxed), shardings)


def like_params(abstract_state: Any, abstract_params: Any, param_shardings: Any, default: NamedSharding) -> Any:
  """Shardings for a pytree that holds copies of the params somewhere inside (optimizer moments): a leaf whose path
  ends with a param's path and has that param's shape gets the param's sharding; everything else (counts, scalars)
  gets ``default``. Works for any optimizer structure (chains, masked and multi_transform states), where
  ``optax.tree_map_params`` trips over masked placeholders."""
  by_path = {}
  for (path, leaf), shard in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                 jax.tree.leaves(param_shardings)):
    by_path[jax.tree_util.keystr(path)] = (tuple(leaf.shape), shard)
  suffixes = sorted(by_path, key=len, reverse=True)

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    for suffix in suffixes:
      if key.endswith(suffix) and by_path[suffix][0] == tuple(leaf.shape):
        return by_path[suffix][1]
    return default

  return jax.tree_util.tree_map_with_path(pick, abstract_state)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel axes; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def split_microbatches(batch: Any, num: int, mesh: Mesh) -> Any:
  """Each (B, ...) leaf -> (num, B / num, ...), for gradient accumulation; microbatch j holds samples j, j + num,
  j + 2 num, ... Strided rather than in blocks because each device holds a contiguous block of B / dp rows
  (``batch_sharding``): with B divisible by num x dp, every microbatch takes B / (num x dp) of each device's own
  rows, so nothing moves between devices. Inside ``jax.jit`` under the mesh."""
  def split(x):
    if x.shape[0] % (num * data_parallel_size(mesh)):
      raise ValueError(f"batch of {x.shape[0]} does not split into {num} microbatches over "
                       f"{data_parallel_size(mesh)} data-parallel devices")
    x = x.reshape((x.shape[0] // num, num) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))
  return jax.tree.map(split, batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the global batch into global jax.Arrays sharded on the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in batch.items()}
