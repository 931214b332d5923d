"""What the trainer needs from a task (model + loss + metrics). One trainer (cvd_storm_jax/train.py) serves all tasks.

A task is built from the whole config: ``tasks.get_task(config) -> Task``. Everything it returns is pure: params are
explicit pytrees, randomness comes in as keys, nothing is stored on the task object between calls except config
and (frozen, host-side) helpers.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import jax

Params = Any
Batch = Mapping[str, jax.Array]


class Task(Protocol):
  """The contract between the trainer and a task."""

  def device_batch(self, host_batch: Mapping[str, Any]) -> dict[str, Any]:
    """Host-side: picks and converts the numeric arrays of a pipeline batch that the step needs (no strings).

    Runs on the host before ``jax.device_put``; returns numpy arrays with the global batch as the leading axis.
    """

  def init(self, rng: jax.Array, batch: Batch) -> Params:
    """Fresh params (the 'params' collection, possibly with logical partitioning boxes) for a batch like ``batch``."""

  def loss_fn(self, params: Params, batch: Batch, rng: jax.Array, step: jax.Array) -> tuple[jax.Array,
                                                                                            dict[str, jax.Array]]:
    """Scalar training loss and a dict of scalar metrics. Differentiated w.r.t. ``params`` by the trainer."""

  def trainable_mask(self, params: Params) -> Any:
    """Pytree of bools like params (False = frozen: no optimizer update, no weight decay), or None for all."""

  def flops_per_step(self, batch: Batch) -> float:
    """Analytic model FLOPs of one training step (forward + backward, no recomputation) on ``batch``."""

  def tokens_per_step(self, batch: Batch) -> int:
    """Tokens (or pixels, for image tasks: say which in the docstring) processed by one training step."""
