"""The trainer over two processes (jax.distributed on CPU, 4 devices each, FSDP across both), as launch/* runs it on
a cluster: a SIGTERM delivered to one process stops both at one agreed step with a checkpoint, and the resumed run
ends with exactly the params and losses of an uninterrupted one."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from _configs import REPO, small_dit_config, write_random_dit_params  # noqa: I100 (configs/ as a module)
from cvd_storm_jax import checkpoint as ckpt_lib

TESTS = os.path.dirname(os.path.abspath(__file__))
TOTAL = 6  # steps; the preemption notice arrives at step 1 (process 1 only)


def multihost_config(init_from: str):
  """A one-layer DiT (joint, temporal and cross-view attention), global batch 8 (4 per process) over fsdp=8 (every
  parameter sharded over both processes' devices), the DiT's params from ``init_from``, asynchronous checkpoints as
  in the recipes."""
  c = small_dit_config()
  c.model.num_layers, c.model.dual_attention_layers, c.model.num_adapter_blocks = 1, (), 0
  c.model.temporal_layers, c.model.crossview_layers = (0,), (0,)
  c.progress_bar = False
  c.data.batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
  c.total_steps, c.log_every, c.checkpoint.every_steps = TOTAL, 1, 100
  c.init_from = init_from
  return c


# One process of the run.
_DRIVER = r"""
import logging, os, signal, sys
sys.path.insert(0, sys.argv[1])
import jax
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
from test_multihost import multihost_config
from cvd_storm_jax.train import train
workdir, init_from, notice_at = sys.argv[2], sys.argv[3], int(sys.argv[4])

def after_step(step):
  if step == notice_at and jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGTERM)

train(multihost_config(init_from), workdir, after_step=after_step)
print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, done", flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(workdir: str, init_from: str, notice_at: int = 0) -> list[str]:
  """Both processes of one training run; returns their outputs."""
  outs = _run_processes(_DRIVER, TESTS, workdir, init_from, str(notice_at))
  for out in outs:
    assert "of 2: 8 devices, done" in out, out[-2000:]
  return outs


def _run_processes(source: str, *args: str) -> list[str]:
  """``python -c source *args`` as two jax.distributed processes with 4 CPU devices each; returns their outputs
  (and fails with them if either exits non-zero or they do not finish)."""
  port = _free_port()
  procs = []
  for index in range(2):
    # Backend optimisation off: the steps are bound by gloo's collectives, the test's time by compiling.
    env = dict(os.environ, JAX_PLATFORMS="cpu", CVD_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index),
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
    procs.append(subprocess.Popen([sys.executable, "-c", source, *args],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs, deadline = [], time.monotonic() + 300
  try:
    for p in procs:
      try:
        outs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1.0))[0])
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        tails = "\n----\n".join(q.communicate()[0][-1500:] for q in procs)
        pytest.fail(f"the two processes did not finish within 300 s (one waiting for the other?):\n{tails}")
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(m["step"], m["loss"]) for m in map(json.loads, f)]


def test_two_processes_stop_together_and_resume_exactly(tmp_path):
  # The DiT's params from a file (the text embedder's stay fresh): each process places its shards of them.
  import jax
  init_from = str(tmp_path / "dit_params")
  dit, shapes = write_random_dit_params(multihost_config(""), init_from, seed=3)
  n_loaded = len(jax.tree.leaves(dit))
  n_fresh = len(jax.tree.leaves(shapes)) - n_loaded

  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  for out in _run(full, init_from):
    assert f"{n_loaded} params loaded, {n_fresh} initialised fresh" in out, out[-3000:]

  outs = _run(split, init_from, notice_at=1)
  mngr = ckpt_lib.make_manager(os.path.join(split, "checkpoints"), max_to_keep=3, async_save=False)
  stopped = mngr.latest_step()
  mngr.close()
  print(f"SIGTERM to process 1 after step 1; both stopped after step {stopped}")
  assert stopped is not None and 1 <= stopped < TOTAL, f"stopped at {stopped}: the notice did not stop the run"
  for out in outs:  # both processes, the one without the signal too, stopped at the same step
    assert f"preempted at step {stopped}; checkpoint saved" in out, out[-3000:]

  _run(split, init_from)
  (step_a, a), (step_b, b) = ckpt_lib.restore_params(full), ckpt_lib.restore_params(split)
  assert step_a == step_b == TOTAL
  flat_a, flat_b = ckpt_lib.flatten_for_log(a), ckpt_lib.flatten_for_log(b)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_b[k]), np.asarray(flat_a[k]), err_msg=k)
  la, lb = _losses(full), _losses(split)
  assert [s for s, _ in la] == list(range(1, TOTAL + 1)) and la == lb


# Pretrained weights loaded inside a jitted init (tasks.common.load_in_init: init_from_vae, latents.vae_from), the
# output sharded over both processes' devices: every process holds the file's values in its shards.
_LOAD_IN_INIT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from cvd_storm_jax.tasks.common import load_in_init
from cvd_storm_jax.train import _init_distributed
_init_distributed()  # as the trainer does: the layout from the environment, gloo on CPU
mesh = jax.make_mesh((8,), ("fsdp",))
want = {"w": np.arange(64 * 3, dtype=np.float32).reshape(64, 3), "b": np.arange(5, dtype=np.float32)}
init = lambda rng: load_in_init({"w": jax.random.normal(rng, (64, 3)), "b": jnp.zeros(5)}, lambda: want)
got = jax.jit(init, out_shardings={"w": NamedSharding(mesh, P("fsdp")), "b": NamedSharding(mesh, P())})(
    jax.random.key(0))
shards = [(s, want[k]) for k in want for s in got[k].addressable_shards]
assert len(shards) == 8, len(shards)
for shard, full in shards:
  np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
print(f"process {jax.process_index()}: shards hold the loaded values", flush=True)
"""


def test_weights_loaded_inside_a_jitted_init_reach_both_processes():
  outs = _run_processes(_LOAD_IN_INIT)
  for index, out in enumerate(outs):
    assert f"process {index}: shards hold the loaded values" in out, out[-2000:]
