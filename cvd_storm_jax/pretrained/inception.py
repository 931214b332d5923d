"""FID InceptionV3 weights from a torch state dict.

Accepted files (the same tensors under the same names, TensorFlow's 2015-12-05 Inception graph converted to torch):
  * torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (what torchmetrics' FID downloads);
  * pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torchvision ``Inception3`` names, built with
    ``aux_logits=False``).
Keys: ``<unit>.conv.weight`` (OIHW), ``<unit>.bn.{weight,bias,running_mean,running_var}`` for every conv-bn unit
(``Conv2d_1a_3x3``, ``Mixed_5b.branch1x1``, ...), and ``fc.weight`` (1008, 2048), ``fc.bias``. Files saved from a
torch module carry ``<unit>.bn.num_batches_tracked`` counters (meaningless at inference): they are ignored, as are
``AuxLogits.*`` (torchvision's training-only auxiliary head, present when a model was built with ``aux_logits=True``).
Anything else, a missing tensor or a shape mismatch raises ``WeightImportError`` naming the key and both shapes.

Usage::

  net, variables = load_inception(path)     # variables = {"params": ..., "batch_stats": ...}
  feats = jax.jit(net.apply)(variables, images)["pool"]
"""
from __future__ import annotations

import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvd_storm_jax.models.inception import InceptionV3
from cvd_storm_jax.pretrained.common import (Rule, WeightImportError, conv, convert, copy, linear, read_torch_state,
                                             variable_shapes)

# A conv-bn unit sits at the top level (``Conv2d_1a_3x3``) or inside a mixed block (``Mixed_5b.branch1x1``).
_UNITS = ((r"(\w+)", r"\1"), (r"(\w+)\.(\w+)", r"\1/\2"))

PARAM_RULES = [rule for key, path in _UNITS for rule in (
    Rule(rf"{key}\.conv\.weight", rf"{path}/conv/kernel", conv),
    Rule(rf"{key}\.bn\.weight", rf"{path}/bn/scale", copy),
    Rule(rf"{key}\.bn\.bias", rf"{path}/bn/bias", copy),
)] + [Rule(r"fc\.weight", "fc/kernel", linear), Rule(r"fc\.bias", "fc/bias", copy)]

STATS_RULES = [rule for key, path in _UNITS for rule in (
    Rule(rf"{key}\.bn\.running_mean", rf"{path}/bn/mean", copy),
    Rule(rf"{key}\.bn\.running_var", rf"{path}/bn/var", copy),
)]

IGNORED = (r".*\.num_batches_tracked", r"AuxLogits\..*")


def _is_stat(key: str) -> bool:
  return key.endswith((".running_mean", ".running_var"))


def load_inception(path: str, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32) -> tuple[InceptionV3, dict[str, Any]]:
  """-> (InceptionV3 module, {"params": ..., "batch_stats": ...}) from a torch-fidelity / pytorch-fid ``.pth``.

  ``dtype`` is the conv compute dtype, ``param_dtype`` that of "params"; "batch_stats" stay fp32 (flax's BatchNorm
  keeps them fp32).
  Raises:
    WeightImportError: the file is missing or not a torch state dict, a key is missing or unexpected, or a shape does
      not match (the message names the torch key and both shapes).
  """
  try:
    state = read_torch_state(path)
  except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:
    raise WeightImportError(f"{path}: not a torch state dict ({type(e).__name__}: {e})") from e
  module = InceptionV3(dtype=dtype, param_dtype=param_dtype)
  shapes = variable_shapes(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
  what = f"InceptionV3 weights ({path})"
  # Two collections, one check each: the running statistics go to "batch_stats", everything else to "params"; a key
  # that fits neither (or a tensor either one lacks) is reported by the `convert` call that sees it.
  params = convert({k: v for k, v in state.items() if not _is_stat(k)}, PARAM_RULES, shapes["params"],
                   ignore=IGNORED, dtype=np.dtype(param_dtype), what=what)
  stats = convert({k: v for k, v in state.items() if _is_stat(k)}, STATS_RULES, shapes["batch_stats"],
                  ignore=IGNORED, dtype=np.float32, what=what)
  return module, {"params": jax.tree.map(jnp.asarray, params), "batch_stats": jax.tree.map(jnp.asarray, stats)}
