"""Checkpoints: the trainer's Orbax CheckpointManager (state + data-iterator state) and plain params files.

Two kinds of files:
- Training checkpoints in ``WORKDIR/checkpoints/<step>/``: ``state`` (step, params, optimizer state, counters; saved
  sharded and asynchronously by Orbax) and ``data`` (the grain iterator state, one small JSON per process), so that a
  restart resumes at the same step with the same next batch.
- Params files (``save_params`` / ``load_params``): a bare params pytree (an Orbax PyTree checkpoint directory), as
  the weight-import CLIs write and ``--config.init_from=PATH`` reads.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from flax.core import meta

log = logging.getLogger(__name__)


def _path(path: Any) -> epath.Path:
  """A local path made absolute, or a bucket URL (gs://...) kept as it is: os.path.abspath would turn
  gs://b/run into $PWD/gs:/b/run, a local folder."""
  path = str(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


# ----------------------------------------------------------------------------------------------------------------------
# Params files.
# ----------------------------------------------------------------------------------------------------------------------
def save_params(path: str, params: Any) -> None:
  """Writes a params pytree (host or device arrays; partitioning boxes are stripped) to ``path`` (a new directory)."""
  path = _path(path)
  params = jax.tree.map(np.asarray, meta.unbox(params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params)
    ckptr.wait_until_finished()


def _restore_to_host(directory: str, key: str | None = None) -> Any:
  """A PyTree checkpoint directory (or its subtree ``key``) as numpy arrays on the host, whatever the devices and
  shardings of the run that wrote it (they name that run's topology)."""
  with ocp.PyTreeCheckpointer() as ckptr:
    saved = ckptr.metadata(directory).item_metadata.tree
    wanted = saved if key is None else {key: saved[key]}
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    out = ckptr.restore(directory, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                               partial_restore=key is not None))
  return out if key is None else out[key]


def load_params(path: str) -> Any:
  """Reads a params pytree written by ``save_params`` as numpy arrays on the host."""
  path = _path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"params checkpoint {str(path)!r} does not exist")
  return _restore_to_host(path)


def merge_params(fresh: Any, loaded: Any, *, what: str = "init_from") -> tuple[Any, list[str]]:
  """Overwrites leaves of ``fresh`` with those of ``loaded`` at the same paths.

  Every loaded leaf must exist in ``fresh`` with the same shape (else ValueError naming both); leaves of ``fresh``
  that ``loaded`` lacks keep their fresh initialisation and are returned as a list of '/'-joined paths.
  A ``loaded`` tree that is one of ``fresh``'s top-level subtrees on its own (a bare SD3 transformer from the import
  CLI run without --config, for the DiT's "dit") is placed there, as logged.
  """
  fresh = meta.unbox(fresh)
  if isinstance(loaded, Mapping) and loaded and not set(loaded) <= set(fresh):
    homes = [k for k, sub in fresh.items() if isinstance(sub, Mapping) and set(loaded) <= set(sub)]
    if len(homes) == 1:
      log.info("%s: the file holds a bare %r subtree; loading it there", what, homes[0])
      loaded = {homes[0]: loaded}
  flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
  flat_loaded = traverse_util.flatten_dict(loaded, sep="/")
  errors = []
  for k, v in flat_loaded.items():
    if k not in flat_fresh:
      errors.append(f"{what}: param {k!r} {tuple(np.shape(v))} does not exist in the model")
    elif tuple(np.shape(v)) != tuple(np.shape(flat_fresh[k])):
      errors.append(f"{what}: param {k!r} has shape {tuple(np.shape(v))} in the file, "
                    f"{tuple(np.shape(flat_fresh[k]))} in the model")
  if errors:
    raise ValueError("\n".join(errors))
  # Fresh leaves are kept as they are (device arrays stay on their devices); loaded ones take the fresh dtype.
  merged = {k: (np.asarray(flat_loaded[k]).astype(v.dtype) if k in flat_loaded else v) for k, v in flat_fresh.items()}
  fresh_paths = sorted(k for k in flat_fresh if k not in flat_loaded)
  return traverse_util.unflatten_dict(merged, sep="/"), fresh_paths


# ----------------------------------------------------------------------------------------------------------------------
# Training checkpoints.
# ----------------------------------------------------------------------------------------------------------------------
def _replica_parallel_on_tpu_only() -> None:
  """Orbax writes a replicated array cooperatively, each replica a slice ("replica-parallel"), unless JAX_PLATFORMS
  names a GPU. Every array it slices costs a slicing program compiled for its shape: on 8 virtual CPU devices the
  first save of 150 small arrays took 28 s instead of 0.3 s. It pays on TPU pods (many hosts, one array each); Orbax
  already turns it off for GPUs, but only when JAX_PLATFORMS says so. Here the backend in use decides."""
  want = jax.default_backend() == "tpu"
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if isinstance(handler, ocp.type_handlers.ArrayHandler) and getattr(handler, "_use_replica_parallel", want) != want:
    handler = copy.copy(handler)  # the registered handler's other settings (array metadata store, ...) are kept
    handler._use_replica_parallel = want
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def make_manager(directory: str, *, max_to_keep: int, save_interval_steps: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """An Orbax CheckpointManager with items 'state' (a pytree) and 'data' (a grain iterator)."""
  _replica_parallel_on_tpu_only()
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                         enable_async_checkpointing=async_save, create=True)
  if max_to_keep is not None and max_to_keep < 1:
    raise ValueError(f"config.checkpoint.keep={max_to_keep}: keep at least 1 checkpoint (None keeps all)")
  return ocp.CheckpointManager(_path(directory), options=options,
                               item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: grain.DatasetIterator | None,
         *, force: bool = False) -> bool:
  """Saves (asynchronously) the train state and the data iterator position at ``step``."""
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iterator: grain.DatasetIterator | None) -> tuple[int, Any] | None:
  """Restores the latest checkpoint into ``abstract_state``'s shapes/shardings and moves ``data_iterator`` to the
  saved position. Returns (step, state), or None when the directory holds no checkpoint."""
  step = manager.latest_step()
  if step is None:
    return None
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except ValueError as e:  # Orbax: the saved tree or shapes differ from this run's state
    raise ValueError(f"the checkpoint of step {step} in {manager.directory} does not fit this run's state (was it "
                     f"trained with another model or optimizer config? compare the workdir's config.json): "
                     f"{str(e)[:500]}") from e
  except FileNotFoundError as e:
    if "process_" not in str(e):
      raise
    # grain keeps one iterator state per process (process_<i>-of-<n>.json): a run resumed over a different number
    # of processes has no state for some of them, and a data order that would differ anyway.
    raise ValueError(f"the checkpoint of step {step} in {manager.directory} was written by a different number of "
                     f"processes than this run's {jax.process_count()} ({e}); resume with the same process count, "
                     "or export its params (python -m cvd_storm_jax.export_params) and start a new workdir with "
                     "--config.init_from=<the export>") from e
  log.info("restored checkpoint at step %d from %s", step, manager.directory)
  return step, restored["state"]


def restore_params(path: str, step: int | None = None) -> tuple[int | None, Any]:
  """(step, params) from a trainer workdir, its ``checkpoints/`` folder (``step`` or the latest), or a params file
  written by ``save_params`` (step None). Host numpy arrays; no mesh needed."""
  path = _path(path)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint or params file at {str(path)!r}")
  if (path / "_CHECKPOINT_METADATA").exists() and not any(p.name.isdigit() for p in path.iterdir()):
    return None, load_params(path)  # a params file
  manager = make_manager(path, max_to_keep=1_000_000, async_save=False)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {str(path)!r}")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {str(path)!r} (steps: {sorted(manager.all_steps())})")
  finally:
    manager.close()
  # Only the params, as host arrays (the optimizer state would take twice the params' memory for nothing).
  params = _restore_to_host(path / str(step) / "state", "params")
  log.info("loaded params of step %d from %s", step, path)
  return step, params


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target for ``restore_latest``."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def flatten_for_log(tree: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")
