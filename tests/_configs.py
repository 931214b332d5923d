"""configs/*.py as importable modules for the tests (``from _configs import dit``), and the small DiT config that the
task-level tests share."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import dit, storm_vae  # noqa: E402,F401


def small_dit_config():
  """configs/dit.py:tiny with one 2-frame 32x64 clip per batch and two layers (every block kind still present)."""
  c = dit.get_config("tiny")
  c.data.batch_size, c.data.num_frames, c.data.buckets = 1, 2, [(32, 64, 1.0)]
  # Two layers keep compile time small.
  c.model.num_layers, c.model.dual_attention_layers = 2, (0,)
  c.model.temporal_layers, c.model.crossview_layers, c.model.num_adapter_blocks = (1,), (0,), 1
  return c
