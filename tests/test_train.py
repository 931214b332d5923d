"""The trainer end to end on the tiny DiT config: sharding equivalence, overfitting, exact resume, config errors."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax.core import meta

from _configs import REPO, RUN_FAST, dit, small_dit_config, storm_vae, write_random_dit_params  # noqa: I100 (configs/)
from cvd_storm_jax import checkpoint as ckpt_lib
from cvd_storm_jax import sharding, tasks
from cvd_storm_jax.data_pipelines import pipeline



def tiny_config(*, small_model: bool = True, **data_overrides):
  """configs/dit.py:tiny for the trainer tests. By default with ``small_dit_config``'s two-layer model (every block
  kind present) and one 2-frame 32x64 clip per batch: the trainer's logic does not depend on the size, compile and
  step time do. Data keys (batch_size, ...) are overridable."""
  c = small_dit_config() if small_model else dit.get_config("tiny")
  c.progress_bar = False
  c.checkpoint.async_save = False
  for k, v in data_overrides.items():
    c.data[k] = v
  return c


def _grads_on_mesh(config, mesh_cfg, devices, batch_np, rng=None, microbatches=1):
  """(loss, metrics), grads of the task's loss on a device batch, with params and batch sharded over the mesh; with
  microbatches > 1 through the trainer's gradient accumulation. Also the number of params that are sharded."""
  from cvd_storm_jax import train as train_mod
  mesh = sharding.make_mesh(mesh_cfg, devices)
  rules = sharding.rules_from_config(config.sharding_rules)
  task = tasks.get_task(config)
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
  key = jax.random.key(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(task.init, key, abstract)
    shardings = sharding.tree_shardings(boxed, mesh, rules)
    params = jax.jit(lambda r: meta.unbox(task.init(r, jax.tree.map(jnp.zeros_like, abstract))),
                     out_shardings=shardings)(key)
    batch = sharding.host_to_global(batch_np, mesh)
    args = (params, batch, jax.random.key(1) if rng is None else rng, jnp.int32(0))
    value_and_grad = jax.value_and_grad(task.loss_fn, has_aux=True)
    if microbatches > 1:
      value_and_grad = functools.partial(train_mod.mean_over_microbatches, value_and_grad, microbatches, mesh,
                                         shardings)
    # Each mesh's program runs once: XLA's backend optimisations off (faster to compile on CPU). The SPMD
    # partitioning, what could make the meshes differ, still runs.
    fn = jax.jit(value_and_grad).lower(*args).compile({"xla_backend_optimization_level": 0})
    (loss, metrics), grads = fn(*args)
    # The params really are laid out over the mesh (not silently replicated).
    n_sharded = sum(1 for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated)
  return (float(loss), jax.device_get(metrics)), jax.device_get(grads), n_sharded


def _assert_grads_close(grads, reference, what):
  flat1 = jax.tree_util.tree_leaves_with_path(reference)
  scale = max(float(np.abs(g).max()) for _, g in flat1)
  for (path, g1), g in zip(flat1, jax.tree.leaves(grads)):
    err = float(np.abs(np.asarray(g) - np.asarray(g1)).max())
    assert err <= 1e-4 * scale, f"{what}: grad {jax.tree_util.keystr(path)} differs by {err} (scale {scale})"


def test_sharded_step_matches_single_device():
  config = tiny_config(batch_size=8)
  batch = tasks.get_task(config).device_batch(next(pipeline.make_iterator(config.data, seed=0)))
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py should give 8 virtual CPU devices"
  (loss1, _), grads1, _ = _grads_on_mesh(config, {"data": 1, "fsdp": 1, "tensor": 1}, devices[:1], batch)
  for mesh_cfg in ({"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
    (loss, _), grads, n_sharded = _grads_on_mesh(config, mesh_cfg, devices, batch)
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)
    _assert_grads_close(grads, grads1, mesh_cfg)
    if mesh_cfg["fsdp"] > 1:
      assert n_sharded > 0


def test_gradient_accumulation_is_the_mean_over_microbatches():
  """config.grad_accum_steps = 2 on a data x fsdp x tensor mesh: the loss, metrics and gradients are the mean of
  those of the two microbatches (samples 0, 2, 4, 6 and 1, 3, 5, 7, with randomness fold_in(rng, j)), each computed
  on its own on one device."""
  config = tiny_config(batch_size=8)
  batch = tasks.get_task(config).device_batch(next(pipeline.make_iterator(config.data, seed=0)))
  devices, rng = jax.devices(), jax.random.key(5)
  (loss, metrics), grads, _ = _grads_on_mesh(config, {"data": 2, "fsdp": 2, "tensor": 2}, devices, batch, rng,
                                             microbatches=2)
  parts = [_grads_on_mesh(config, {"data": 1, "fsdp": 1, "tensor": 1}, devices[:1],
                          {k: v[j::2] for k, v in batch.items()}, jax.random.fold_in(rng, j)) for j in range(2)]
  np.testing.assert_allclose(loss, np.mean([p[0][0] for p in parts]), rtol=1e-5)
  for name in metrics:
    np.testing.assert_allclose(metrics[name], np.mean([p[0][1][name] for p in parts]), rtol=1e-5, atol=1e-6,
                               err_msg=name)
  assert parts[0][0][0] != parts[1][0][0]  # two different microbatches, so the mean is not trivially either one
  _assert_grads_close(grads, jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1]), "accumulated")


def test_gradient_accumulation_and_profiling_in_the_trainer(tmp_path):
  """The trainer with grad_accum_steps = 2 over a data=2 mesh: remat "auto" sizes one microbatch, the run trains;
  a batch that does not split into microbatches over the data-parallel devices stops before anything compiles.
  config.profile: a jax.profiler trace of step 2 lands where TensorBoard's profile plugin looks."""
  import glob
  from cvd_storm_jax import train as train_mod
  config = tiny_config(batch_size=4)
  config.num_devices, config.mesh.data = 2, 2
  config.grad_accum_steps = 2
  config.total_steps, config.log_every = 2, 1
  config.model.remat_policy, config.memory_budget_gib = "auto", 1000.0
  config.profile.start_step, config.profile.num_steps = 1, 1
  train_mod.train(config, str(tmp_path / "run"))
  losses = _losses(str(tmp_path / "run"))
  assert [m["step"] for m in losses] == [1, 2] and all(np.isfinite(m["loss"]) for m in losses)
  traces = glob.glob(str(tmp_path / "run" / "tb" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  config.data.batch_size = 6
  with pytest.raises(ValueError, match="grad_accum_steps=2"):
    train_mod.train(config, str(tmp_path / "bad"))


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_tiny_model_overfits_one_clip(tmp_path):
  # One small clip (2 frames x 6 views at 32x64) keeps the 2-core CPU run short.
  config = tiny_config(small_model=False, num_clips=1, batch_size=1, num_frames=2, buckets=[(32, 64, 1.0)])
  config.num_devices = 1
  c = config.conditioning
  c.text_drop = c.box_drop = c.map_drop = c.crossview_drop = 0.0
  c.generation_task_ratio, c.image_generation_ratio = 1.0, 0.0  # no reference frames: every frame is in the loss
  config.total_steps = 300
  config.log_every = 1
  config.checkpoint.every_steps = 1000
  config.optimizer.lr, config.optimizer.warmup_steps, config.optimizer.end_lr = 3e-3, 10, 3e-4
  config.compiler_options = RUN_FAST  # 300 steps: XLA's backend optimisations on (off in the suite, conftest.py)
  from cvd_storm_jax import train as train_mod
  train_mod.train(config, str(tmp_path))
  losses = [m["loss"] for m in _losses(str(tmp_path))]
  first, last = np.mean(losses[:10]), np.mean(losses[-20:])
  print(f"overfit: first-10 mean loss {first:.4f}, last-20 mean loss {last:.4f}")
  assert last <= 0.1 * first, (first, last)


def test_stop_and_resume_equals_uninterrupted(tmp_path, capfd):
  from cvd_storm_jax import train as train_mod
  n = 3
  config = tiny_config(batch_size=4)  # and a data x fsdp x tensor mesh: the sharded trainer resumes exactly
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  config.total_steps = 2 * n
  config.log_every = 1
  config.checkpoint.every_steps = 100
  # remat "auto" with room for everything: resolves (the same way on each restart) to the policy that keeps most.
  config.model.remat_policy, config.memory_budget_gib = "auto", 1000.0

  full = str(tmp_path / "full")
  train_mod.train(config, full)
  # XLA's partitioner found a layout for every activation on the data x fsdp x tensor mesh (it says so, on stderr,
  # when it cannot and replicates a tensor instead; it compiles here unless the persistent cache had the program).
  assert "Involuntary full rematerialization" not in capfd.readouterr().err

  split = str(tmp_path / "split")

  def preempt(step):
    if step == n:
      os.kill(os.getpid(), signal.SIGTERM)

  train_mod.train(config, split, after_step=preempt)
  mngr = ckpt_lib.make_manager(os.path.join(split, "checkpoints"), max_to_keep=3, async_save=False)
  assert mngr.latest_step() == n, "SIGTERM must leave a checkpoint at the step it arrived"
  mngr.close()
  with open(os.path.join(split, "final_metrics.json")) as f:  # what launch/slurm_gpu.sbatch requeues on
    assert json.load(f)["preempted"] == 1
  with open(os.path.join(split, "metrics.jsonl"), "a") as f:  # as if a crash came after a step past the checkpoint
    f.write(json.dumps({"step": n + 1, "loss": -1.0}) + "\n")
  train_mod.train(config, split)
  assert [m["step"] for m in _losses(split)] == list(range(1, 2 * n + 1))  # that step's line replaced, not doubled
  finished = train_mod.train(config, split)  # a finished run started again: nothing trains, its results stay
  assert finished["step"] == 2 * n and os.path.exists(os.path.join(split, "final_metrics.json"))
  # Another task's config, or another model, in this workdir: refused, and the run's config.json left as it was.
  record = open(os.path.join(split, "config.json")).read()
  with pytest.raises(ValueError, match="holds a 'dit' run"):
    train_mod.train(storm_vae.get_config("tiny"), split)
  deeper = config.copy_and_resolve_references()
  deeper.model.num_layers, deeper.model.remat_policy = 3, "full"  # (no remat sizing traces: the restore fails)
  with pytest.raises(ValueError, match="does not fit this run's state"):
    train_mod.train(deeper, split)
  assert open(os.path.join(split, "config.json")).read() == record

  def final_params(workdir):
    m = ckpt_lib.make_manager(os.path.join(workdir, "checkpoints"), max_to_keep=3, async_save=False)
    assert m.latest_step() == 2 * n
    restored = m.restore(2 * n, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    m.close()
    return restored["state"]

  a, b = final_params(full), final_params(split)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  la, lb = _losses(full), _losses(split)
  assert [m["loss"] for m in la] == [m["loss"] for m in lb]
  for workdir in (full, split):
    assert os.listdir(os.path.join(workdir, "tb")), "TensorBoard events expected"
    with open(os.path.join(workdir, "final_metrics.json")) as f:
      assert "preempted" not in json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
      assert json.load(f)["model"]["remat_policy"] == "minimal"  # the record names the policy that ran


def test_auto_remat_that_cannot_fit_stops_before_compiling(tmp_path):
  from cvd_storm_jax import train as train_mod
  config = tiny_config()
  config.num_devices = 1
  config.model.remat_policy, config.memory_budget_gib = "auto", 1e-6
  with pytest.raises(ValueError, match="no remat policy fits"):
    train_mod.train(config, str(tmp_path))


def _run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "cvd_storm_jax.train", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_bad_config_key_exits_naming_it(tmp_path):
  r = _run_cli("--config=configs/dit.py:tiny", f"--workdir={tmp_path}", "--config.optimizer.lrr=1e-4")
  assert r.returncode != 0
  # One line naming the override and ml_collections' hint, not a chained traceback.
  assert "--config.optimizer.lrr=1e-4: the config has no key 'lrr'. Did you mean \"lr\"" in r.stderr
  assert "Traceback" not in r.stderr


def test_bad_config_value_exits_naming_it(tmp_path):
  r = _run_cli("--config=configs/dit.py:tiny", f"--workdir={tmp_path}", "--config.optimizer.lr=fast")
  assert r.returncode != 0
  assert "lr" in r.stderr and "fast" in r.stderr


def test_bad_loop_values_stop_before_anything_is_built(tmp_path):
  from cvd_storm_jax import train as train_mod
  for key, value in (("log_every", 0), ("checkpoint.every_steps", 0), ("checkpoint.keep", 0), ("total_steps", 0),
                     ("optimizer.lr", 0.0), ("optimizer.warmup_steps", -5), ("max_consecutive_nonfinite", -1),
                     ("mesh.data", 0)):
    config = tiny_config()
    section, _, name = key.rpartition(".")
    setattr(config[section] if section else config, name, value)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
      train_mod.train(config, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")


def test_checkpoint_paths_and_bare_init_from_trees(tmp_path):
  """Bucket URLs stay URLs (os.path.abspath made gs://b/run a local folder $PWD/gs:/b/run); a params file holding
  one top-level subtree of the model on its own (the SD3 import CLI without --config) is loaded into that subtree."""
  assert str(ckpt_lib._path("gs://bucket/run/checkpoints")) == "gs://bucket/run/checkpoints"
  assert str(ckpt_lib._path("rel")) == os.path.abspath("rel")
  fresh = {"dit": {"a": np.zeros(2), "b": {"c": np.zeros(3)}}, "vae": {"a": np.zeros(1)}}
  merged, fresh_paths = ckpt_lib.merge_params(fresh, {"b": {"c": np.ones(3)}})
  np.testing.assert_array_equal(merged["dit"]["b"]["c"], 1.0)
  assert fresh_paths == ["dit/a", "vae/a"]
  with pytest.raises(ValueError, match="does not exist in the model"):
    ckpt_lib.merge_params(fresh, {"a": np.ones(2)})  # "a" fits both subtrees: ambiguous, not guessed


def test_bad_mesh_is_reported():
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh({"data": 4, "fsdp": 4, "tensor": 1})
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.make_mesh({"data": -1, "model": 2})


def test_nonfinite_step_never_reaches_params(tmp_path):
  """A NaN learning signal: the step is skipped and counted; after too many in a row the run stops, params intact."""
  from cvd_storm_jax import train as train_mod
  config = tiny_config(batch_size=2)
  config.num_devices = 1
  config.total_steps = 6
  config.log_every = 100  # the stop comes between log steps: it is checked every step
  config.max_consecutive_nonfinite = 2
  config.optimizer.grad_clip = 0.0
  config.diffusion.logit_std = float("nan")  # every sigma is NaN -> loss NaN
  with pytest.raises(FloatingPointError, match="consecutive non-finite"):
    train_mod.train(config, str(tmp_path))
  logged = _losses(str(tmp_path))
  assert all(not np.isfinite(m["loss"]) for m in logged)
  # The run passes the limit (2) at step 3 and stops at step 4: the count is read one step late (no host sync).
  assert logged[-1]["nonfinite_total"] == 4 and logged[-1]["step"] == 4
  assert logged[-1]["lr"] == 0.0  # the rate the step applies: no update yet, so the warmup's first (0), not step 3's
  m = ckpt_lib.make_manager(os.path.join(str(tmp_path), "checkpoints"), max_to_keep=3, async_save=False)
  state = m.restore(m.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  m.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_optimizer_state_shardings_follow_params_through_masks():
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  params = {"a": jax.ShapeDtypeStruct((64, 128), jnp.float32), "b": {"c": jax.ShapeDtypeStruct((8,), jnp.float32)},
            "frozen": jax.ShapeDtypeStruct((16, 16), jnp.float32)}
  shard = {"a": NamedSharding(mesh, P("fsdp", "tensor")), "b": {"c": NamedSharding(mesh, P())},
           "frozen": NamedSharding(mesh, P("fsdp"))}
  labels = {"a": "train", "b": {"c": "train"}, "frozen": "freeze"}
  tx = optax.multi_transform({"train": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
                              "freeze": optax.set_to_zero()}, labels)
  out = sharding.like_params(jax.eval_shape(tx.init, params), params, shard, sharding.replicated(mesh))
  specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(out)}
  assert sum(1 for k, s in specs.items() if k.endswith(".mu['a']") and s == P("fsdp", "tensor")) == 1
  assert sum(1 for k, s in specs.items() if k.endswith(".nu['a']") and s == P("fsdp", "tensor")) == 1
  assert all(s == P() for k, s in specs.items() if k.endswith(".count"))


def test_frozen_vae_encoder_stays_fixed_in_training(tmp_path):
  """latents.kind=vae: the trainer's multi_transform leaves the VAE encoder exactly as initialised. And
  config.init_from: the file's params (here the DiT's) replace the fresh ones, the rest (the VAE) stays fresh."""
  from cvd_storm_jax import train as train_mod
  config = tiny_config()
  config.num_devices = 1
  config.total_steps, config.log_every, config.checkpoint.every_steps = 2, 1, 1
  config.latents.kind = "vae"
  config.latents.vae = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
  given, _ = write_random_dit_params(config, str(tmp_path / "dit_params"), seed=7)
  config.init_from = str(tmp_path / "dit_params")
  train_mod.train(config, str(tmp_path / "run"))
  m = ckpt_lib.make_manager(os.path.join(str(tmp_path / "run"), "checkpoints"), max_to_keep=3, async_save=False)
  first, last = (m.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]
                 for s in (1, 2))
  m.close()
  # The first step's learning rate is 0 (warmup): after it the params are still the initial ones.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(given), jax.tree.leaves(first["dit"])):
    np.testing.assert_array_equal(np.asarray(b), a, err_msg=jax.tree_util.keystr(path))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(first["vae"]), jax.tree.leaves(last["vae"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(first["dit"]), jax.tree.leaves(last["dit"])))


class _NanGradientTask:
  """loss = sum(w^2), plus (when batch["bad"]) a term whose value is 0 but whose gradient is NaN: a finite loss with
  non-finite gradients, which a loss-only check would let through."""

  def loss_fn(self, params, batch, rng, step):
    del rng, step
    w = params["w"]
    nan_gradient = lambda: jnp.sum(jnp.where(w > 1e6, jnp.sqrt(w - 2e6), 0.0))
    return jnp.sum(w ** 2) + jax.lax.cond(batch["bad"], nan_gradient, lambda: 0.0), {}


def _optimizer_config(**overrides):
  import ml_collections
  c = dict(lr=0.1, end_lr=1e-3, warmup_steps=2, schedule="cosine", grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8,
           weight_decay=0.0)
  return ml_collections.ConfigDict(dict(c, **overrides))


def test_update_skips_nonfinite_gradients_under_a_finite_loss():
  """A step with NaN gradients leaves params and optimizer moments untouched and is counted; a good step resets the
  consecutive count, not the total."""
  from cvd_storm_jax import train as train_mod
  tx, lr = train_mod._optimizer(_optimizer_config(warmup_steps=0), 10, None)  # the first good step moves the params
  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params), "nonfinite_total": jnp.int32(0),
           "nonfinite_run": jnp.int32(0)}
  update = jax.jit(train_mod.make_update(_NanGradientTask(), tx, lr))
  s1, m1 = update(state, {"bad": jnp.bool_(True)}, jax.random.key(0))
  assert not np.isfinite(float(m1["grad_norm"])) and np.isfinite(float(m1["loss"]))
  for a, b in zip(jax.tree.leaves((s1["params"], s1["opt_state"])), jax.tree.leaves((params, state["opt_state"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(s1["nonfinite_run"]) == 1
  s2, _ = update(s1, {"bad": jnp.bool_(False)}, jax.random.key(0))
  assert int(s2["nonfinite_run"]) == 0 and not np.array_equal(np.asarray(s2["params"]["w"]), np.asarray(params["w"]))
  s3, _ = update(s2, {"bad": jnp.bool_(True)}, jax.random.key(0))
  assert int(s3["nonfinite_total"]) == 2 and int(s3["nonfinite_run"]) == 1


def test_schedule_endpoints_and_gradient_clipping():
  """Warmup from 0 to lr, cosine down to end_lr exactly at the last step; updates are optax's clip-then-AdamW."""
  import optax

  from cvd_storm_jax import train as train_mod
  tx, lr = train_mod._optimizer(_optimizer_config(), 10, None)
  assert float(lr(0)) == 0.0 and abs(float(lr(2)) - 0.1) < 1e-7 and abs(float(lr(10)) - 1e-3) < 1e-8
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
  p = {"w": jnp.ones(3)}
  s, r = tx.init(p), ref.init(p)
  for g in (100.0, 0.01):  # the first is clipped, and it sets the moments the second step sees
    grads = {"w": jnp.array([g, -g, 0.5 * g])}
    u, s = tx.update(grads, s, p)
    v, r = ref.update(grads, r, p)
  np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(v["w"]), rtol=1e-6)
