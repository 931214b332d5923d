r"""The one trainer: every task (the CVD-STORM DiT, STORM-VAE) trains through this file.

  python -m cvd_storm_jax.train --config=configs/dit.py:tiny --workdir=/tmp/cvd_tiny
  python -m cvd_storm_jax.train --config=configs/dit.py --workdir=gs://.../run1 --config.optimizer.lr=1e-4

A linear program in named sections (big_vision's habit): setup, mesh, task and data, shapes first, optimizer and
state shardings, state (fresh / init_from / resumed), the jitted update (gradients optionally accumulated over
microbatches), the loop with logging, checkpointing, preemption and non-finite handling. Restarting in the same
workdir resumes from the latest checkpoint, with the data iterator at the same position, and ends with exactly the
params of an uninterrupted run.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

from absl import app, flags
from ml_collections import config_flags

from cvd_storm_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/dit.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and metrics go.")

log = logging.getLogger("cvd_storm_jax.train")


def _optimizer(opt_cfg: Any, total_steps: int, trainable_mask: Any):
  """AdamW with linear warmup and cosine decay (paper §4.1.3: 6e-5 -> 1e-7) or a constant rate (OpenDWM), gradient
  clipping, and no update at all for frozen params."""
  import optax
  warmup = int(opt_cfg.warmup_steps)
  if opt_cfg.schedule == "cosine":
    decay_steps = max(total_steps - warmup, 1)
    after = optax.cosine_decay_schedule(opt_cfg.lr, decay_steps, alpha=opt_cfg.end_lr / opt_cfg.lr)
  elif opt_cfg.schedule == "constant":
    after = optax.constant_schedule(opt_cfg.lr)
  else:
    raise ValueError(f"config.optimizer.schedule={opt_cfg.schedule!r}; expected 'cosine' or 'constant'")
  lr = optax.join_schedules([optax.linear_schedule(0.0, opt_cfg.lr, warmup), after], [warmup]) if warmup else after
  parts = []
  if opt_cfg.grad_clip:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  parts.append(optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
                           mask=trainable_mask))
  tx = optax.chain(*parts)
  if trainable_mask is not None:
    import jax
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx, lr


def _write_text(path: Any, text: str) -> None:
  """Replaces the file at ``path`` (an etils.epath.Path: a local path or a bucket URL such as gs://) with ``text``,
  written first beside it and then moved over it, so that a crash mid-write leaves the old file whole. Buckets have
  no append: the metrics file is rewritten whole at each log (a few hundred KB after 100 k steps)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def _write_config(config: Any, workdir: str) -> None:
  """The record of the run: ``workdir/config.json``."""
  from etils import epath
  _write_text(epath.Path(workdir) / "config.json", config.to_json_best_effort(indent=1))


def _resolve_remat_policy(config: Any, mesh: Any, rules: Any, abstract_batch: Any, abstract_params: Any,
                          abstract_opt: Any, param_shardings: Any, opt_shardings: Any, accum: int) -> str:
  """config.model.remat_policy = "auto": the least-recomputing policy whose per-device memory fits (memory.py).

  Per device: the state as sharded (params, gradients, optimizer moments; with gradient accumulation one more
  gradient, the running sum) plus the activations the backward pass keeps, measured by tracing the task's loss on
  one device's share of one microbatch (global batch / (accum x data x fsdp)) of the largest bucket: values that do
  not scale with the batch count whole, as each device holds them (tensor parallelism, not counted, only lowers the
  rest). The budget is the allocator's limit of the first device, or config.memory_budget_gib when set.
  """
  import flax.linen as nn
  import jax
  import numpy as np

  from cvd_storm_jax import memory, sharding, tasks

  state_bytes = memory.train_state_bytes(abstract_params, abstract_opt, param_shardings, opt_shardings)
  if accum > 1:
    state_bytes += memory.nbytes(abstract_params, param_shardings)
  # The trainer has checked that the batch splits into accum x dp equal parts.
  per_device = max(jax.tree.leaves(abstract_batch)[0].shape[0] // (accum * sharding.data_parallel_size(mesh)), 1)
  abstract_batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct((per_device,) + s.shape[1:], s.dtype), abstract_batch)
  budget = int(config.get("memory_budget_gib", 0) * 2 ** 30) or memory.device_memory_bytes(mesh.devices.flat[0])
  if not budget:
    log.warning("remat_policy=auto: the device reports no memory limit and config.memory_budget_gib is 0; using "
                "'full'")
    return "full"
  rng, step = jax.random.key(0), np.int32(0)

  def activation_bytes(policy):
    trial = config.copy_and_resolve_references()
    with trial.unlocked():
      trial.model.remat_policy = policy
    task = tasks.get_task(trial)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return memory.saved_activation_bytes(lambda p, b: task.loss_fn(p, b, rng, step)[0], abstract_params,
                                           nondiff=(abstract_batch,))

  policy, measured = memory.choose_remat_policy(activation_bytes, state_bytes, budget)
  log.info("remat_policy auto -> %s (per device: state %.1f GiB, activations %.1f GiB, budget %.1f GiB)", policy,
           state_bytes / 2 ** 30, measured[policy] / 2 ** 30, budget / 2 ** 30)
  return policy


def make_fresh_state(task: Any, tx: Any, abstract_batch: Any) -> Callable[[Any], dict]:
  """rng -> a fresh train state {step, params, opt_state, nonfinite_total, nonfinite_run} (jit it with the state's
  shardings as out_shardings). abstract_batch: the global batch's ShapeDtypeStructs."""
  import jax
  import jax.numpy as jnp
  from flax.core import meta

  def fresh_state(rng):
    # init needs shapes only: zeros stand in for a batch (no host batch is consumed, whatever the mesh).
    batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_batch)
    params = meta.unbox(task.init(rng, batch))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "nonfinite_total": jnp.zeros((), jnp.int32), "nonfinite_run": jnp.zeros((), jnp.int32)}

  return fresh_state


def make_state_shardings(abstract_params: Any, abstract_opt: Any, param_shardings: Any, mesh: Any) -> dict:
  """The train state's shardings (the structure of :func:`make_fresh_state`'s state): optimizer moments
  (abstract_opt = jax.eval_shape(tx.init, abstract_params)) follow their params' shardings; counts and scalars are
  replicated."""
  from cvd_storm_jax import sharding
  repl = sharding.replicated(mesh)
  opt_shardings = sharding.like_params(abstract_opt, abstract_params, param_shardings, repl)
  return {"step": repl, "params": param_shardings, "opt_state": opt_shardings, "nonfinite_total": repl,
          "nonfinite_run": repl}


def make_update(task: Any, tx: Any, lr_schedule: Callable, accum: int = 1, mesh: Any = None,
                param_shardings: Any = None) -> Callable:
  """The trainer's step (state, batch, rng) -> (state, metrics): the task's loss and gradients (averaged over
  ``accum`` microbatches, see :func:`mean_over_microbatches`, which needs the mesh and the params' shardings), the
  optimizer update, and the non-finite guard. The trainer jits it with explicit shardings and the state donated;
  the lowering checks (benchmarks/check_*_lowering.py) lower this same function."""
  import jax
  import jax.numpy as jnp
  import optax
  value_and_grad = jax.value_and_grad(task.loss_fn, has_aux=True)
  if accum > 1:
    value_and_grad = functools.partial(mean_over_microbatches, value_and_grad, accum, mesh, param_shardings)

  def update(state, batch, rng):
    step_rng = jax.random.fold_in(rng, state["step"])
    (loss, metrics), grads = value_and_grad(state["params"], batch, step_rng, state["step"])
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    # A non-finite loss or gradient never reaches the params: keep the old params and moments, count the step.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, state["params"]),
        "opt_state": keep(new_opt, state["opt_state"]),
        "nonfinite_total": state["nonfinite_total"] + (~finite).astype(jnp.int32),
        "nonfinite_run": jnp.where(finite, 0, state["nonfinite_run"] + 1),
    }
    # The rate this step applies: skipped steps keep the optimizer's state, its schedule count included.
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=lr_schedule(state["step"] - state["nonfinite_total"]),
                   param_norm=optax.global_norm(state["params"]), nonfinite_total=new_state["nonfinite_total"],
                   nonfinite_run=new_state["nonfinite_run"])
    return new_state, metrics

  return update


def mean_over_microbatches(value_and_grad: Callable, num: int, mesh: Any, param_shardings: Any, params: Any,
                           batch: Any, rng: Any, step: Any) -> Any:
  """Gradient accumulation: ((loss, metrics), grads) of ``value_and_grad(params, batch, rng, step)`` averaged over
  ``num`` microbatches (``sharding.split_microbatches``: microbatch j holds samples j, j + num, ...), run one after
  another in a ``lax.scan`` so that one microbatch's activations are live at a time. Microbatch j draws its
  randomness from ``fold_in(rng, j)``. Each microbatch's loss is its own mean, as in PyTorch's and MaxText's
  accumulation. Inside ``jax.jit`` under the mesh; the running gradient sum keeps the params' shardings."""
  import jax
  import jax.numpy as jnp

  from cvd_storm_jax import sharding

  micro = sharding.split_microbatches(batch, num, mesh)
  keep_sharded = lambda grads: jax.lax.with_sharding_constraint(grads, param_shardings)

  def add_one(total, j_and_microbatch):
    j, microbatch = j_and_microbatch
    (loss, metrics), grads = value_and_grad(params, microbatch, jax.random.fold_in(rng, j), step)
    total = jax.tree.map(jnp.add, total, ((loss, metrics), grads))
    return (total[0], keep_sharded(total[1])), None

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(value_and_grad, params, jax.tree.map(lambda x: x[0], micro), rng, step))
  total, _ = jax.lax.scan(add_one, (zeros[0], keep_sharded(zeros[1])), (jnp.arange(num), micro))
  return jax.tree.map(lambda x: x / num, total)


def _check_config(config: Any) -> None:
  """Values the loop divides by or counts with, checked before anything is built or compiled (a bad one used to
  surface as a ZeroDivisionError after the first step had compiled)."""
  positive = {"total_steps": config.total_steps, "log_every": config.log_every,
              "checkpoint.every_steps": config.checkpoint.every_steps, "checkpoint.keep": config.checkpoint.keep}
  if config.optimizer.schedule == "cosine":
    positive["optimizer.lr"] = config.optimizer.lr
  for key, value in positive.items():
    if not value > 0:
      raise ValueError(f"config.{key}={value!r} must be > 0")
  for key, value in {"optimizer.warmup_steps": config.optimizer.warmup_steps,
                     "max_consecutive_nonfinite": config.max_consecutive_nonfinite,
                     "num_devices": config.get("num_devices", 0)}.items():
    if not value >= 0:
      raise ValueError(f"config.{key}={value!r} must be >= 0")
  for axis, size in config.mesh.items():
    if not (size == -1 or size >= 1):
      raise ValueError(f"config.mesh.{axis}={size!r}: a size >= 1, or -1 for all remaining devices")


def _init_distributed() -> None:
  """``jax.distributed.initialize()``. SLURM and Cloud TPU layouts are detected; anywhere else (plain machines,
  several processes on one machine) the environment gives them: JAX_COORDINATOR_ADDRESS (host:port of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID. CPU processes exchange collectives over gloo."""
  import jax
  count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
  if (count is None) != (index is None):
    raise ValueError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither (cluster auto-detection)")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(num_processes=None if count is None else int(count),
                             process_id=None if index is None else int(index))


def train(config: Any, workdir: str, *, after_step: Callable[[int], None] | None = None) -> dict[str, float]:
  """Runs (or resumes) training; returns the last logged metrics. ``main`` wraps it.

  ``after_step(step)`` is called on the host after each step is dispatched (tests use it to deliver a SIGTERM at a
  chosen step, exactly as a preemption would).
  """
  # ------------------------------------------------------------------------------------------------------------------
  # Setup.
  # ------------------------------------------------------------------------------------------------------------------
  import flax.linen as nn
  import jax
  import numpy as np
  from flax.core import meta

  from cvd_storm_jax import checkpoint as ckpt_lib
  from cvd_storm_jax import sharding, tasks
  from cvd_storm_jax.data_pipelines import pipeline

  _check_config(config)
  if os.environ.get("CVD_DISTRIBUTED") == "1" and not jax.distributed.is_initialized():
    _init_distributed()  # multi-host (set by launch/*): before any backend use
  jax.config.update("jax_threefry_partitionable", True)
  is_main = jax.process_index() == 0
  # The workdir may be a local path or a bucket (gs://..., through etils.epath; TensorBoard events through
  # tensorboardX's own gs:// writer; checkpoints through Orbax): every file the run writes goes to it.
  from etils import epath
  workdir_path = epath.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  recorded = workdir_path / "config.json"
  # A workdir holds one run: its record is replaced only once this run's state fits (below), so that a wrong
  # --config or --workdir fails without touching it; a new workdir is recorded at once.
  if recorded.exists():
    previous_task = json.loads(recorded.read_text()).get("task")
    if previous_task != config.get("task"):
      raise ValueError(f"{workdir} holds a {previous_task!r} run (see its config.json); this config trains "
                       f"{config.get('task')!r}: give another --workdir")
  elif is_main:
    _write_config(config, workdir)

  # ------------------------------------------------------------------------------------------------------------------
  # Mesh.
  # ------------------------------------------------------------------------------------------------------------------
  devices = jax.devices()[:config.num_devices] if config.get("num_devices", 0) else jax.devices()
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config.sharding_rules)
  dp = sharding.data_parallel_size(mesh)
  accum = config.get("grad_accum_steps", 1)
  if not isinstance(accum, int) or accum < 1:
    raise ValueError(f"config.grad_accum_steps={accum!r}; expected an integer >= 1")
  if config.data.batch_size % (dp * accum):
    raise ValueError(f"config.data.batch_size={config.data.batch_size} is not divisible by the data-parallel size "
                     f"{dp} of mesh {dict(mesh.shape)}" + (f" x config.grad_accum_steps={accum}" if accum > 1 else ""))
  log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

  # ------------------------------------------------------------------------------------------------------------------
  # Task and data.
  # ------------------------------------------------------------------------------------------------------------------
  task = tasks.get_task(config)

  def new_iterator(data_config=config.data):
    return pipeline.make_iterator(data_config, seed=config.seed, process_index=jax.process_index(),
                                  process_count=jax.process_count())

  probe = task.device_batch(next(new_iterator()))  # a throw-away iterator: shapes only, the real one stays unread
  if len(config.data.buckets) > 1:  # memory is sized for the largest bucket, whichever the first batch draws
    largest = task.device_batch(next(new_iterator(pipeline.largest_bucket_config(config.data))))
  else:
    largest = probe

  # ------------------------------------------------------------------------------------------------------------------
  # Shapes first, then shardings.
  # ------------------------------------------------------------------------------------------------------------------
  def as_global(host_batch):
    return sharding.host_to_global(host_batch, mesh)

  global_shapes = lambda host_batch: {k: jax.ShapeDtypeStruct((config.data.batch_size,) + v.shape[1:], v.dtype)
                                     for k, v in host_batch.items()}
  abstract_batch = global_shapes(probe)
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed_params = jax.eval_shape(task.init, init_rng, abstract_batch)
  param_shardings = sharding.tree_shardings(boxed_params, mesh, rules)
  abstract_params = meta.unbox(boxed_params)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
  log.info("model: %.2fM params", num_params / 1e6)

  trainable = task.trainable_mask(abstract_params)
  tx, lr_schedule = _optimizer(config.optimizer, config.total_steps, trainable)
  repl = sharding.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  state_shardings = make_state_shardings(abstract_params, abstract_opt, param_shardings, mesh)
  opt_shardings = state_shardings["opt_state"]

  # ------------------------------------------------------------------------------------------------------------------
  # Remat policy: "auto" becomes the least recomputation that fits the device (measured by tracing, before compiling).
  # ------------------------------------------------------------------------------------------------------------------
  if config.get("model") and config.model.get("remat_policy") == "auto":
    policy = _resolve_remat_policy(config, mesh, rules, global_shapes(largest), abstract_params, abstract_opt,
                                   param_shardings, opt_shardings, accum)
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model.remat_policy = policy
    task = tasks.get_task(config)

  # ------------------------------------------------------------------------------------------------------------------
  # State: fresh, or init_from a params file, or resumed from the workdir.
  # ------------------------------------------------------------------------------------------------------------------
  fresh_state = make_fresh_state(task, tx, abstract_batch)
  manager = ckpt_lib.make_manager(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                                  async_save=config.checkpoint.async_save)
  data_iter = new_iterator()
  abstract_state = jax.eval_shape(fresh_state, init_rng)
  restored = ckpt_lib.restore_latest(manager, ckpt_lib.abstract_like(abstract_state, state_shardings), data_iter)
  if restored is not None:
    start_step, state = restored
    log.info("resumed at step %d", start_step)
    if start_step >= config.total_steps:  # a finished run, started again: its results stay as they are
      manager.close()
      final = workdir_path / "final_metrics.json"
      log.warning("the workdir's checkpoint is at step %d, total_steps=%d: nothing to train", start_step,
                  config.total_steps)
      return json.loads(final.read_text()) if final.exists() else {}
  else:
    start_step = 0
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = jax.jit(fresh_state, out_shardings=state_shardings)(init_rng)
    if config.get("init_from"):
      loaded = ckpt_lib.load_params(config.init_from)  # every process reads the whole file
      # Merged where the params are: the fresh leaves stay on their devices (params sharded over several processes
      # cannot be fetched to one host), each process places its shards of the loaded ones.
      merged, fresh_paths = ckpt_lib.merge_params(state["params"], loaded, what=f"init_from={config.init_from}")
      log.info("init_from %s: %d params loaded, %d initialised fresh", config.init_from,
               len(jax.tree.leaves(loaded)), len(fresh_paths))
      params = jax.tree.map(lambda x, s: x if isinstance(x, jax.Array) else
                            jax.make_array_from_callback(x.shape, s, lambda index, x=x: x[index]),
                            merged, param_shardings)
      state = dict(state, params=params, opt_state=jax.jit(tx.init, out_shardings=opt_shardings)(params))
  if is_main:
    # The state fits: this run's config is the record (the remat policy "auto" chose, overrides such as total_steps).
    _write_config(config, workdir)

  # ------------------------------------------------------------------------------------------------------------------
  # The update step.
  # ------------------------------------------------------------------------------------------------------------------
  update = make_update(task, tx, lr_schedule, accum, mesh, param_shardings)
  batch_shardings = {k: sharding.batch_sharding(mesh, len(s.shape)) for k, s in abstract_batch.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    update_fn = jax.jit(update, in_shardings=(state_shardings, batch_shardings, repl),
                        out_shardings=(state_shardings, repl), donate_argnums=(0,),
                        compiler_options=dict(config.get("compiler_options") or {}) or None)

  # ------------------------------------------------------------------------------------------------------------------
  # Logging and preemption.
  # ------------------------------------------------------------------------------------------------------------------
  writer = None
  metrics_file = workdir_path / "metrics.jsonl"  # one JSON line per logged step, earlier runs' lines kept
  metrics_lines = ""
  if is_main:
    (workdir_path / "final_metrics.json").unlink(missing_ok=True)  # this run writes its own, or none
    if metrics_file.exists():
      # Lines past the checkpoint resumed from were logged by steps that are run again now: dropped, not doubled.
      metrics_lines = "".join(line + "\n" for line in metrics_file.read_text().splitlines()
                              if line.strip() and json.loads(line)["step"] <= start_step)
  if is_main:
    from tensorboardX import SummaryWriter
    # purge_step: TensorBoard drops the earlier run's events from the resumed step on (they are logged again).
    writer = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1 if start_step else None)
  # Preemption. With jax.distributed, JAX's preemption notifier owns SIGTERM: a notice on any process makes every
  # process agree on one step to stop at (a Python handler here would replace the notifier, and processes stopping
  # at different steps would deadlock in the checkpoint's collectives). A single process handles the signal itself.
  sigterm = {"flag": False}
  restore_sigterm = None
  if jax.distributed.is_initialized():
    from jax.experimental import multihost_utils

    def preempted(step: int) -> bool:
      return multihost_utils.reached_preemption_sync_point(step)
  else:
    def on_sigterm(signum, frame):
      del frame
      log.warning("signal %d: saving a checkpoint after this step and exiting", signum)
      sigterm["flag"] = True

    def preempted(step: int) -> bool:
      del step
      return sigterm["flag"]

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    # None: the previous handler was not installed from Python, which cannot reinstall it; the default then.
    restore_sigterm = lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

  # ------------------------------------------------------------------------------------------------------------------
  # The loop.
  # ------------------------------------------------------------------------------------------------------------------
  from tqdm import tqdm
  total = int(config.total_steps)
  bar = tqdm(total=total, initial=start_step, disable=not is_main or not config.get("progress_bar", True),
             dynamic_ncols=True, desc="train")
  last = {}
  step = start_step
  # Profiling (config.profile): a trace of a few steps after compilation, where TensorBoard's profile plugin finds it.
  profile = config.get("profile") or {}
  profile_from, profile_steps = int(profile.get("start_step", 0)), int(profile.get("num_steps", 0))
  profile_dir, profiling = os.path.join(workdir, "tb"), False
  t_last, steps_since, flops_since, tokens_since = time.perf_counter(), 0, 0.0, 0
  # The host batch is this process's share: the counts are scaled to the global batch, and FLOPs are per mesh device.
  processes, mesh_devices = jax.process_count(), mesh.size
  previous_run = None  # the last step's non-finite run length, read one step late (see below)
  try:
    while step < total:
      if is_main and profile_steps and step == profile_from:
        jax.profiler.start_trace(profile_dir)
        profiling = True
      host = task.device_batch(next(data_iter))
      flops_since += task.flops_per_step(host) * processes
      tokens_since += task.tokens_per_step(host) * processes
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, metrics = update_fn(state, as_global(host), train_rng)
      step += 1
      steps_since += 1
      bar.update(1)
      if step == start_step + 1:
        # The first step compiles: it is left out of the throughput of the first logging window.
        jax.block_until_ready(metrics)
        t_last, steps_since, flops_since, tokens_since = time.perf_counter(), 0, 0.0, 0
      if profiling and (step == profile_from + profile_steps or step == total):
        jax.block_until_ready(state)  # the trace holds the whole of its last step
        jax.profiler.stop_trace()
        profiling = False
        log.info("profile of steps %d-%d in %s", profile_from + 1, step, profile_dir)
      if after_step is not None:
        after_step(step)
      stop_preempted = preempted(step)
      # A run of non-finite steps stops once it passes the limit. The count is read one step late, the previous
      # step's, which has finished by now: reading this step's would make the host wait for the device every step,
      # and the next batch could no longer be prepared while the device computes. Skipped steps never touch the
      # params, so stopping one step later changes nothing.
      stop_nonfinite = previous_run is not None and int(previous_run) > config.max_consecutive_nonfinite
      previous_run = metrics["nonfinite_run"]
      log_now = step % config.log_every == 0 or step == total or stop_preempted or stop_nonfinite
      if log_now:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if steps_since:  # none when only the compiling first step has run since the last log
          dt = time.perf_counter() - t_last
          metrics.update({"steps_per_s": steps_since / dt, "tokens_per_s": tokens_since / dt,
                          "model_tflops_per_s_per_device": flops_since / dt / 1e12 / mesh_devices})
        t_last, steps_since, flops_since, tokens_since = time.perf_counter(), 0, 0.0, 0
        last = dict(metrics, step=step)
        if is_main:
          bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
          log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
          for k, v in metrics.items():
            writer.add_scalar(f"train/{k}", v, step)
          writer.flush()
          metrics_lines += json.dumps(last) + "\n"
          _write_text(metrics_file, metrics_lines)
      if step % config.checkpoint.every_steps == 0 or step == total or stop_preempted or stop_nonfinite:
        ckpt_lib.save(manager, step, state, data_iter, force=True)
      if stop_nonfinite:
        manager.wait_until_finished()
        raise FloatingPointError(
            f"{int(last['nonfinite_run'])} consecutive non-finite steps at step {step}; the params were not "
            f"updated by them and a checkpoint of them is in {workdir}")
      if stop_preempted:
        log.warning("preempted at step %d; checkpoint saved", step)
        if step < total:
          last["preempted"] = 1  # in final_metrics.json: launch/slurm_gpu.sbatch requeues the job on it
        break
  finally:
    if profiling:  # stopped early (preemption, non-finite steps): the trace so far
      jax.profiler.stop_trace()
    bar.close()
    manager.wait_until_finished()
    manager.close()
    if restore_sigterm is not None:
      restore_sigterm()
    if writer is not None:
      writer.close()

  if is_main and last:
    _write_text(workdir_path / "final_metrics.json", json.dumps(last, indent=1))
    print(f"{'preempted at' if last.get('preempted') else 'final'} step {last['step']}: loss {last['loss']:.6f}",
          flush=True)
  return last


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                      stream=sys.stderr)
  # Orbax and grain narrate every save at INFO through absl; keep the console for the trainer's own lines.
  logging.getLogger("absl").setLevel(logging.WARNING)
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/dit.py:tiny")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  train(_CONFIG.value, _WORKDIR.value)


def run():
  cli.run(main)


if __name__ == "__main__":
  run()
