"""What a training step keeps in device memory, measured by tracing (nothing is allocated, nothing runs).

Used to choose a remat policy for a device before compiling: the policies of ``models.mmdit.REMAT_POLICIES`` trade
memory for recomputation, and the fastest one is the one that keeps the most while still fitting.

  saved_activations(loss, params, nondiff=(batch,))      the values autodiff keeps for the backward pass
  saved_activation_bytes(loss, params, nondiff=(batch,))  their bytes
  train_state_bytes(params, opt_state[, shardings]) params + gradients + optimizer state (per device if sharded)
  choose_remat_policy(...)                        the least-recomputing policy whose estimate fits a budget

The activation count is JAX's own residual analysis of the traced ``vjp`` (what ``jax.ad_checkpoint.
print_saved_residuals`` prints): exact for the jaxpr, before XLA's buffer assignment. XLA then adds the working set
of the layer being differentiated and may fuse some residuals away, hence the headroom in ``choose_remat_policy``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.extend.core import Literal

# Policies in the order they are tried by choose_remat_policy: most memory, least recomputation first. "none" and
# JAX's dots_* policies are left out: "none" keeps every float32 intermediate (7x "minimal" at the paper size) and
# the dots_* policies keep what "minimal" keeps plus the attention's batched products.
POLICY_PREFERENCE = ("minimal", "save_dot_except_mlp_in", "save_out_proj", "full")


def nbytes(tree: Any, shardings: Any = None) -> int:
  """Total bytes of the arrays (or ShapeDtypeStructs) in a pytree; with ``shardings`` (a matching tree of
  jax.sharding.Sharding), the bytes of one device's shard of each."""
  leaves = jax.tree.leaves(tree)
  shapes = ([x.shape for x in leaves] if shardings is None else
            [s.shard_shape(x.shape) for x, s in zip(leaves, jax.tree.leaves(shardings))])
  return int(sum(np.prod(shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x, shape in zip(leaves, shapes)))


def saved_activations(loss: Callable[..., jax.Array], *args: Any, nondiff: tuple = ()) -> list[jax.ShapeDtypeStruct]:
  """The values ``jax.vjp`` of ``loss(*args, *nondiff)`` with respect to ``args`` keeps for the backward pass, the
  arguments themselves excluded, each once.

  args and nondiff may hold arrays or ``jax.ShapeDtypeStruct``s (only traced). ``nondiff`` (e.g. the batch) is not
  differentiated, as in a training step: differentiating it too would keep values the step never keeps (a float32
  copy of an fp16 input, masks for its tangent).
  """
  leaves, treedef = jax.tree.flatten((args, nondiff))

  def vjp_of_flat(*flat):
    args, nondiff = jax.tree.unflatten(treedef, flat)
    return jax.vjp(lambda *a: loss(*a, *nondiff), *args)

  jaxpr = jax.make_jaxpr(vjp_of_flat)(*leaves).jaxpr
  primal_out = len(jax.tree.leaves(jax.eval_shape(loss, *args, *nondiff)))
  inputs = set(jaxpr.invars)
  seen, saved = set(), []
  for var in jaxpr.outvars[primal_out:]:
    if isinstance(var, Literal) or var in inputs or var in seen:  # literals hold no memory; inputs are not new
      continue
    seen.add(var)
    saved.append(jax.ShapeDtypeStruct(var.aval.shape, var.aval.dtype))
  return saved


def saved_activation_bytes(loss: Callable[..., jax.Array], *args: Any, nondiff: tuple = ()) -> int:
  """Bytes of :func:`saved_activations`."""
  return nbytes(saved_activations(loss, *args, nondiff=nondiff))


def train_state_bytes(params: Any, opt_state: Any, param_shardings: Any = None, opt_shardings: Any = None) -> int:
  """params + one gradient per param (same dtype) + the optimizer state: what a step holds besides activations.
  Per device when the shardings are given (gradients are sharded like their params)."""
  return 2 * nbytes(params, param_shardings) + nbytes(opt_state, opt_shardings)


def device_memory_bytes(device: jax.Device | None = None) -> int | None:
  """What one device may allocate: the allocator's limit (on GPUs XLA_PYTHON_CLIENT_MEM_FRACTION of the card, 75 %
  by default), or on CPU the host's physical memory shared by its local devices; None if unknown."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # backends without memory statistics
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu" and hasattr(os, "sysconf"):
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(jax.local_device_count("cpu"), 1)
    except (ValueError, OSError):
      return None
  return None


def choose_remat_policy(activation_bytes: Callable[[str], int], state_bytes: int, budget_bytes: int,
                        headroom: float = 0.8, policies: Iterable[str] = POLICY_PREFERENCE
                        ) -> tuple[str, dict[str, int]]:
  """The first policy (least recomputation) whose state + kept activations fit ``headroom * budget_bytes``.

  activation_bytes(policy) measures one policy (e.g. ``saved_activation_bytes`` of the model built with it); it is
  called in order until one fits, so the cheap answer costs one trace. Returns (policy, {policy: bytes measured}).
  Raises ValueError when not even the last policy fits, with the numbers.
  """
  measured: dict[str, int] = {}
  limit = headroom * budget_bytes
  for policy in policies:
    measured[policy] = activation_bytes(policy)
    fits = state_bytes + measured[policy] <= limit
    logging.info("remat %-24s state %.1f GiB + activations %.1f GiB %s %.1f GiB (%.0f%% of %.1f GiB)", policy,
                 state_bytes / 2 ** 30, measured[policy] / 2 ** 30, "<=" if fits else ">", limit / 2 ** 30,
                 100 * headroom, budget_bytes / 2 ** 30)
    if fits:
      return policy, measured
  gib = ", ".join(f"{p} {b / 2 ** 30:.1f}" for p, b in measured.items())
  raise ValueError(f"no remat policy fits: training state {state_bytes / 2 ** 30:.1f} GiB plus activations "
                   f"({gib} GiB) exceeds {headroom:.0%} of {budget_bytes / 2 ** 30:.1f} GiB; shard the state "
                   "(mesh fsdp > 1), accumulate gradients over microbatches (config.grad_accum_steps) or shorten "
                   "the clip")
