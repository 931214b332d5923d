"""Random FID InceptionV3 weights in torch-fidelity's layout, made with torch-fidelity's own module (the real weights
are a download). torch-fidelity's package ``__init__`` imports torchvision, which does not load in this venv
(tests/conftest.py marks it absent), so its submodules are imported through a stand-in package object that is
registered only for the duration of that import."""
import importlib
import importlib.util
import os
import sys
import types
from unittest import mock

import numpy as np
import pytest
from skimage import data

torch = pytest.importorskip("torch")


def torch_fidelity_inception() -> types.ModuleType:
  """torch_fidelity.feature_extractor_inceptionv3, imported without running the package's __init__."""
  spec = importlib.util.find_spec("torch_fidelity")  # finds the package without importing it
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("torch-fidelity is not installed")
  pkg = types.ModuleType("torch_fidelity")
  pkg.__path__ = list(spec.submodule_search_locations)
  before = set(sys.modules)
  saved = sys.modules.get("torch_fidelity", "absent")
  sys.modules["torch_fidelity"] = pkg
  try:
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
  finally:
    # Other tests in this process must not see the stand-in (nor submodules hanging off it).
    for name in set(sys.modules) - before:
      if name.startswith("torch_fidelity."):
        del sys.modules[name]
    if saved == "absent":
      sys.modules.pop("torch_fidelity", None)
    else:
      sys.modules["torch_fidelity"] = saved


def nchw(x: np.ndarray) -> "torch.Tensor":
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _randomize(net: "torch.nn.Module") -> None:
  """Random weights for the torch module, with BN statistics measured on photographs (not the test images).

  A deep random ReLU network with batch-normalised layers is chaotic: with zero-centred BN biases, input and rounding
  perturbations grow ~1.2x per layer, and the fp32 reference lands ~1e-4 (relative) away from its own fp64 result,
  so no fp32 re-implementation could agree to 1e-5. With BN scales in [0.5, 1] and biases in [1, 2], each ReLU still
  clips part of its inputs but the map is close to isometric: torch fp32 vs fp64 ~1e-6, and features of different
  images still differ by O(1).
  """
  torch.manual_seed(0)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0.0, float(np.sqrt(2.0 / m.weight[0].numel())))
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.0)
        m.bias.uniform_(1.0, 2.0)
        m.reset_running_stats()
        m.momentum = None  # cumulative average: the running statistics become those of the calibration batch
    net.fc.weight.normal_(0.0, 1.0 / np.sqrt(2048))
    net.fc.bias.normal_(0.0, 0.1)
    net.train()  # a train-mode pass stores each BN's batch statistics
    net(nchw(np.stack([data.astronaut()[:384, :448], data.rocket()[:384, :448]])))


def random_inception_weights(folder: str) -> str:
  """Writes folder/weights-inception-random.pth (torch-fidelity layout, random weights as ``_randomize`` makes them)
  and returns its path."""
  cls = torch_fidelity_inception().FeatureExtractorInceptionV3
  # The constructor always ends with load_state_dict(file or download). Stubbed out once, it yields the layer tree
  # with torch's default init, from which the random weights are made; a reference built later by the unmodified
  # constructor from the saved file loads it strictly (every name and shape of the file is checked by torch).
  empty = os.path.join(folder, "empty.pth")
  torch.save({}, empty)
  with mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None):
    net = cls("inception-v3-compat", ["2048", "logits"], feature_extractor_weights_path=empty)
  _randomize(net)
  path = os.path.join(folder, "weights-inception-random.pth")
  torch.save(net.state_dict(), path)  # includes each BN's num_batches_tracked, which the importer must ignore
  return path
