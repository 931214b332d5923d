"""The FID InceptionV3 in Flax against torch-fidelity's ``FeatureExtractorInceptionV3`` (torchmetrics' FID network).

The reference is torch-fidelity's own module, loaded from a random-weights state dict through its own constructor
(the real weights are a download; tests/_fid_weights.py makes the random ones and imports torch-fidelity).
"""
import jax
import numpy as np
import pytest
from skimage import data

from _fid_weights import nchw, random_inception_weights, torch_fidelity_inception
from cvd_storm_jax.models.inception import resize_bilinear_tf1
from cvd_storm_jax.pretrained.common import WeightImportError
from cvd_storm_jax.pretrained.inception import load_inception

torch = pytest.importorskip("torch")


def _images() -> list[np.ndarray]:
  """Real photographs as uint8 [N, H, W, 3] batches: two 96x160 crops (upsampled to 299, non-square) and one 320x320
  crop (downsampled)."""
  small = np.stack([data.astronaut()[40:136, 150:310], data.chelsea()[60:156, 120:280]])
  large = data.coffee()[40:360, 140:460][None]
  return [np.ascontiguousarray(small), np.ascontiguousarray(large)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(weights .pth path, the imported torch_fidelity.feature_extractor_inceptionv3, uint8 image batches,
  [(features "2048", "logits")] per batch from the reference)."""
  fe = torch_fidelity_inception()
  path = random_inception_weights(str(tmp_path_factory.mktemp("inception")))
  images = _images()
  ref = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits"], feature_extractor_weights_path=path)
  with torch.no_grad():
    outs = [tuple(t.numpy() for t in ref(nchw(x))) for x in images]
  return path, fe, images, outs


def _rel_err(got, want) -> float:
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def test_matches_torch_fidelity(reference):
  path, _, images, outs = reference
  net, variables = load_inception(path)
  f = jax.jit(net.apply)
  assert np.abs(outs[0][0][0] - outs[0][0][1]).max() > 0.5, "degenerate random network: features hardly depend on images"
  for x, (want_pool, want_logits) in zip(images, outs):
    got = f(variables, x)
    assert got["pool"].shape == (x.shape[0], 2048) and got["logits"].shape == (x.shape[0], 1008)
    e_pool, e_logits = _rel_err(got["pool"], want_pool), _rel_err(got["logits"], want_logits)
    print(f"{x.shape}: |ref pool| max {np.abs(want_pool).max():.3f} std {want_pool.std():.3f}; "
          f"rel err pool {e_pool:.2e} logits {e_logits:.2e}")
    assert e_pool <= 1e-5 and e_logits <= 1e-5


def test_resize_matches_torch_fidelity(reference):
  _, fe, images, _ = reference
  resize = fe.interpolate_bilinear_2d_like_tensorflow1x  # imported by the reference module from its own package
  ours = jax.jit(resize_bilinear_tf1, static_argnums=(1, 2))
  for x in images:
    xf = x.astype(np.float32)
    for size in ((299, 299), (37, 211), x.shape[1:3]):
      want = resize(nchw(xf), size=size, align_corners=False).numpy().transpose(0, 2, 3, 1)
      got = np.asarray(ours(xf, *size))
      assert got.shape == want.shape
      print(x.shape, "->", size, "max abs diff", np.abs(got - want).max())
      # Same taps and roundings; only XLA's FMA contraction of the lerps may differ (1 ulp: 1.5e-5 at 255).
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{x.shape} -> {size}")


def test_import_errors_name_key_and_shapes(reference, tmp_path):
  state = torch.load(reference[0], weights_only=True)

  def load(name, sd):
    torch.save(sd, tmp_path / name)
    return load_inception(str(tmp_path / name))

  missing = dict(state)
  del missing["Mixed_6c.branch7x7dbl_3.conv.weight"]
  with pytest.raises(WeightImportError, match=r"missing key: Flax param 'Mixed_6c/branch7x7dbl_3/conv/kernel' "
                                              r"\(1, 7, 160, 160\)"):
    load("missing.pth", missing)
  with pytest.raises(WeightImportError, match=r"'fc\.weight' \(1008, 2047\) -> Flax 'fc/kernel' expects "
                                              r"\(2048, 1008\), got \(2047, 1008\)"):
    load("wrong_param.pth", {**state, "fc.weight": torch.zeros(1008, 2047)})
  with pytest.raises(WeightImportError, match=r"'Mixed_7b\.branch_pool\.bn\.running_var' \(191,\) -> Flax "
                                              r"'Mixed_7b/branch_pool/bn/var' expects \(192,\)"):
    load("wrong_stat.pth", {**state, "Mixed_7b.branch_pool.bn.running_var": torch.ones(191)})
  with pytest.raises(WeightImportError, match=r"unexpected key 'Mixed_7c\.extra\.weight' \(3,\)"):
    load("extra.pth", {**state, "Mixed_7c.extra.weight": torch.ones(3)})
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(WeightImportError, match="not a torch state dict"):
    load_inception(str(tmp_path / "junk.pth"))


def test_pytorch_fid_layout(reference, tmp_path):
  """Without num_batches_tracked (torch-fidelity's converter writes none) and with a torchvision AuxLogits head (a
  model built with aux_logits=True): the same variables."""
  _, want = load_inception(reference[0])
  state = {k: v for k, v in torch.load(reference[0], weights_only=True).items()
           if not k.endswith("num_batches_tracked")}
  state.update({"AuxLogits.conv0.conv.weight": torch.zeros(128, 768, 1, 1),
                "AuxLogits.conv0.bn.running_mean": torch.zeros(128), "AuxLogits.fc.weight": torch.zeros(1000, 768)})
  torch.save(state, tmp_path / "pt_inception.pth")
  _, got = load_inception(str(tmp_path / "pt_inception.pth"))
  jax.tree.map(np.testing.assert_array_equal, got, want)
