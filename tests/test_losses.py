"""Reconstruction losses and metrics against skimage / torch.distributions on real photographs."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cvd_storm_jax import losses


@pytest.fixture(scope="module")
def photo_pairs():
  """[3, 96, 96, 3] crops in [-1, 1] and distorted copies (noise, blur, another photo)."""
  rs = np.random.RandomState(1)
  a = np.stack([data.astronaut()[50:146, 170:266], data.coffee()[150:246, 250:346],
                data.chelsea()[60:156, 150:246]]).astype(np.float32) / 127.5 - 1
  b = np.stack([np.clip(a[0] + 0.1 * rs.randn(*a[0].shape), -1, 1), gaussian_filter(a[1], (2, 2, 0)), a[0]])
  return a, b.astype(np.float32)


def test_mse():
  rs = np.random.RandomState(0)
  x, y = rs.randn(2, 4, 5, 3).astype(np.float32), rs.randn(2, 4, 5, 3).astype(np.float32)
  np.testing.assert_allclose(float(losses.mse(x, y)), np.mean((x - y) ** 2), rtol=1e-6)
  assert losses.mse(jnp.asarray(x, jnp.bfloat16), y).dtype == jnp.float32


def test_kl_divergence_matches_torch_distributions():
  rs = np.random.RandomState(0)
  mean = rs.randn(2, 4, 6, 16).astype(np.float32)
  logvar = rs.uniform(-3, 1, mean.shape).astype(np.float32)
  want = torch.distributions.kl_divergence(
      torch.distributions.Normal(torch.from_numpy(mean), torch.from_numpy(np.exp(0.5 * logvar))),
      torch.distributions.Normal(0.0, 1.0)).mean().item()
  np.testing.assert_allclose(float(losses.kl_divergence(mean, logvar)), want, rtol=1e-5)
  assert float(losses.kl_divergence(np.zeros_like(mean), np.zeros_like(logvar))) == 0.0


@pytest.mark.parametrize("data_range", [2.0, 1.0])
def test_psnr_and_ssim_match_skimage(photo_pairs, data_range):
  a, b = photo_pairs
  if data_range == 1.0:  # the same images in [0, 1]
    a, b = (a + 1) / 2, (b + 1) / 2
  got_psnr = np.asarray(losses.psnr(b, a, data_range))
  got_ssim = np.asarray(losses.ssim(b, a, data_range))
  want_psnr = [peak_signal_noise_ratio(x, y, data_range=data_range) for x, y in zip(a, b)]
  want_ssim = [structural_similarity(x, y, data_range=data_range, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False) for x, y in zip(a, b)]
  print("psnr", got_psnr, want_psnr, "\nssim", got_ssim, want_ssim)
  np.testing.assert_allclose(got_psnr, want_psnr, rtol=1e-5)
  np.testing.assert_allclose(got_ssim, want_ssim, atol=2e-5)
  assert got_ssim[0] > got_ssim[2] and got_ssim[1] > got_ssim[2]  # an unrelated photo is least similar
  np.testing.assert_allclose(np.asarray(losses.ssim(a, a, data_range)), 1.0, atol=1e-5)


def test_ssim_leading_axes_and_errors(photo_pairs):
  a, b = photo_pairs
  got = losses.ssim(np.stack([b, b]), np.stack([a, a]))
  assert got.shape == (2, 3)
  np.testing.assert_allclose(np.asarray(got[1]), np.asarray(losses.ssim(b, a)), rtol=1e-6)
  with pytest.raises(ValueError, match="smaller than the 11x11 window"):
    losses.ssim(a[:, :8, :8], b[:, :8, :8])
  with pytest.raises(ValueError, match="shapes differ"):
    losses.ssim(a, b[:, :90])


def test_vae_loss_combines_weighted_terms(photo_pairs):
  a, b = photo_pairs
  rs = np.random.RandomState(0)
  mean, logvar = rs.randn(3, 12, 12, 16).astype(np.float32), rs.randn(3, 12, 12, 16).astype(np.float32) * 0.1
  fake_lpips = lambda x, y: jnp.mean(jnp.abs(x - y), axis=(1, 2, 3))  # any per-image distance [B]
  weights = ml_collections.ConfigDict({"mse": 2.0, "lpips": 0.5, "kl": 1e-3})
  loss, m = losses.vae_loss(b, a, mean, logvar, fake_lpips, weights)
  want_mse, want_kl = np.mean((a - b) ** 2), float(losses.kl_divergence(mean, logvar))
  want_lp = float(np.mean(np.abs(b - a)))
  np.testing.assert_allclose(float(loss), 2.0 * want_mse + 0.5 * want_lp + 1e-3 * want_kl, rtol=1e-5)
  np.testing.assert_allclose(float(m["mse"]), want_mse, rtol=1e-5)
  np.testing.assert_allclose(float(m["lpips"]), want_lp, rtol=1e-5)
  np.testing.assert_allclose(float(m["psnr"]), np.mean(np.asarray(losses.psnr(b, a))), rtol=1e-6)

  def must_not_run(x, y):
    raise AssertionError("lpips_fn evaluated although its weight is 0")
  loss0, m0 = losses.vae_loss(b, a, mean, logvar, must_not_run, {"mse": 1.0, "lpips": 0.0, "kl": 0.0})
  np.testing.assert_allclose(float(loss0), want_mse, rtol=1e-5)
  assert float(m0["lpips"]) == 0.0
  with pytest.raises(ValueError, match="no lpips_fn"):
    losses.vae_loss(b, a, mean, logvar, None, {"lpips": 1.0})
  with pytest.raises(ValueError, match="unknown weight keys"):
    losses.vae_loss(b, a, mean, logvar, fake_lpips, {"gan": 1.0})


def test_vae_loss_gradient_through_real_lpips(photo_pairs):
  """The LPIPS term gives finite gradients to the reconstruction, and a step along them lowers it."""
  from cvd_storm_jax.pretrained.lpips import load_lpips
  module, params = load_lpips()
  a, b = photo_pairs
  a, b = a[:2, :32, :32], b[:2, :32, :32]
  lpips_fn = lambda x, y: module.apply({"params": params}, x, y)
  mean = logvar = jnp.zeros((2, 4, 4, 16))
  w = {"mse": 0.0, "lpips": 1.0, "kl": 0.0}
  f = jax.jit(jax.value_and_grad(lambda r: losses.vae_loss(r, a, mean, logvar, lpips_fn, w)[0]))
  loss, g = f(jnp.asarray(b))
  assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0
  assert float(f(b - 2e-2 * g / jnp.abs(g).max())[0]) < float(loss)
