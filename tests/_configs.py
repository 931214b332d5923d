"""configs/*.py as importable modules for the tests (``from _configs import dit``), and the small DiT config that the
task-level tests share."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import dit, storm_vae  # noqa: E402,F401

# The suite compiles with XLA's CPU backend optimisations off (conftest.py); a loop of hundreds of steps jits with
# these compiler options instead, which override the flag for that program.
RUN_FAST = {"xla_backend_optimization_level": 3}


def small_dit_config():
  """configs/dit.py:tiny with one 2-frame 32x64 clip per batch and two layers (every block kind still present)."""
  c = dit.get_config("tiny")
  c.data.batch_size, c.data.num_frames, c.data.buckets = 1, 2, [(32, 64, 1.0)]
  # Two layers keep compile time small.
  c.model.num_layers, c.model.dual_attention_layers = 2, (0,)
  c.model.temporal_layers, c.model.crossview_layers, c.model.num_adapter_blocks = (1,), (0,), 1
  return c


def write_random_dit_params(config, path: str, seed: int):
  """A params file (``checkpoint.save_params``) for ``config.init_from``: random values for the DiT's params of the
  config's task, none for the rest (the text embedder, a VAE), which init_from leaves freshly initialised. Returns
  (the DiT params written, the abstract params of the whole task)."""
  import jax
  import numpy as np
  from flax.core import meta

  from cvd_storm_jax import checkpoint, tasks
  from cvd_storm_jax.data_pipelines import pipeline
  task = tasks.get_task(config)
  batch = task.device_batch(next(pipeline.make_iterator(config.data, seed=0)))
  shapes = meta.unbox(jax.eval_shape(task.init, jax.random.key(0),
                                     {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}))
  rng = np.random.default_rng(seed)
  dit = jax.tree.map(lambda x: rng.normal(0.0, 0.02, x.shape).astype(x.dtype), shapes["dit"])
  checkpoint.save_params(path, {"dit": dit})
  return dit, shapes
