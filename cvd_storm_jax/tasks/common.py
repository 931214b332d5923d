"""Helpers shared by the tasks."""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax.core import meta


def load_in_init(fresh: Any, load: Callable[[], Any]) -> Any:
  """Replaces the leaves of a freshly initialised (possibly logically boxed) param subtree with host arrays returned by
  ``load()`` (same structure), from inside a jitted ``init``: pretrained weights land directly in their shardings,
  and under ``jax.eval_shape`` nothing is read."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), meta.unbox(fresh))

  def host():
    loaded = load()
    if jax.tree.structure(loaded) != jax.tree.structure(shapes):
      # The paths that differ, not two whole tree dumps: usually a different architecture (layer count, ...).
      paths = lambda tree: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}
      extra, missing = sorted(paths(loaded) - paths(shapes)), sorted(paths(shapes) - paths(loaded))
      raise ValueError(f"pretrained params do not match the model (another architecture?): {len(extra)} params only "
                       f"in the file, e.g. {extra[:3]}; {len(missing)} only in the model, e.g. {missing[:3]}")
    def cast(path, s, v):
      if tuple(np.shape(v)) != tuple(s.shape):
        raise ValueError(f"pretrained param {jax.tree_util.keystr(path)} has shape {tuple(np.shape(v))}, "
                         f"the model expects {tuple(s.shape)}")
      return np.asarray(v, s.dtype)
    return jax.tree_util.tree_map_with_path(cast, shapes, loaded)

  values = jax.pure_callback(host, shapes)
  is_box = lambda x: isinstance(x, meta.AxisMetadata)
  return jax.tree.map(lambda box, v: box.replace_boxed(v) if is_box(box) else v, fresh, values, is_leaf=is_box)


def frozen_mask(params: Any, frozen: tuple[str, ...]) -> Any:
  """A trainable mask (True = train) that freezes the named top-level subtrees."""
  return {k: jax.tree.map(lambda _: k not in frozen, v) for k, v in params.items()}
