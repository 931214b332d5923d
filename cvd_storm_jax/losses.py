"""Image-reconstruction losses and metrics for the VAE / STORM-VAE (pure functions, no model construction).

Conventions: images are channels-last ``[..., H, W, C]``; the VAE works in [-1, 1], so ``psnr``/``ssim`` take a
``data_range`` (2.0 for [-1, 1], 1.0 for [0, 1]). Every function computes in fp32 whatever the input dtype.

The STORM-VAE objective (CVD-STORM paper, Sec. 3.2) is L_VAE = MSE + LPIPS + KL, without the GAN term;
``vae_loss`` combines them with weights from the config (the paper gives no LPIPS/KL weights).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

# The image axes (H, W, C) of a channels-last batch.
_IMAGE_AXES = (-3, -2, -1)


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over all elements -> scalar (fp32)."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL( N(mean, exp(logvar)) || N(0, I) ) of a diagonal Gaussian posterior -> scalar (fp32).

  Reduction: the per-element KL 0.5 * (mean^2 + exp(logvar) - 1 - logvar) is MEANED over every latent element
  (batch, h, w, channels). diffusers' ``DiagonalGaussianDistribution.kl()`` SUMS over (C, H, W) per sample instead:
  multiply by h * w * C to get that per-sample value. A KL weight from an SD/LDM config, whose reconstruction loss is
  also a per-sample sum, carries over to means as weight x (latent values / pixel values) = weight / 12 for the SD3.5
  VAE (16 channels at 1/8 resolution).
  """
  return jnp.mean(kl_per_element(mean, logvar))


def kl_per_element(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """The per-element KL 0.5 * (mean^2 + exp(logvar) - 1 - logvar) in fp32, shaped like ``mean``."""
  mean = mean.astype(jnp.float32)
  logvar = logvar.astype(jnp.float32)
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def psnr(pred: jax.Array, target: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Peak signal-to-noise ratio per image in dB: 10 log10(data_range^2 / MSE over (H, W, C)).

  pred, target: [..., H, W, C] -> [...]. data_range: 2.0 for images in [-1, 1].
  """
  err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=_IMAGE_AXES)
  return 10.0 * jnp.log10(data_range ** 2 / err)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> jax.Array:
  """Normalised 1-D Gaussian taps (scipy.ndimage.gaussian_filter with truncate=3.5 gives size 11 for sigma 1.5)."""
  x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  w = jnp.exp(-0.5 * jnp.square(x / sigma))
  return w / jnp.sum(w)


def _filter_valid(x: jax.Array, taps: jax.Array) -> jax.Array:
  """Separable 'valid' filtering of each channel. x: [B, H, W, C] -> [B, H-k+1, W-k+1, C]."""
  c, k = x.shape[-1], taps.shape[0]
  dn = ("NHWC", "HWIO", "NHWC")
  kh = jnp.broadcast_to(taps.reshape(k, 1, 1, 1), (k, 1, 1, c))
  kw = jnp.broadcast_to(taps.reshape(1, k, 1, 1), (1, k, 1, c))
  hp = jax.lax.Precision.HIGHEST
  x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=hp)
  return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                      precision=hp)


def ssim(pred: jax.Array, target: jax.Array, data_range: float = 2.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Structural similarity per image, Gaussian-weighted (Wang et al. 2004).

  Same definition as ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=..., channel_axis=-1)`` and torchmetrics' SSIM: local statistics from an
  11x11 Gaussian window, the SSIM map averaged over the positions where the window lies inside the image (skimage
  crops the (win_size-1)/2 border) and over channels.

  pred, target: [..., H, W, C] with H, W >= win_size -> [...].
  """
  if pred.shape != target.shape:
    raise ValueError(f"ssim: shapes differ, {pred.shape} vs {target.shape}")
  if min(pred.shape[-3:-1]) < win_size:
    raise ValueError(f"ssim: image {pred.shape[-3:-1]} is smaller than the {win_size}x{win_size} window")
  lead = pred.shape[:-3]
  x = pred.astype(jnp.float32).reshape((-1,) + pred.shape[-3:])
  y = target.astype(jnp.float32).reshape((-1,) + target.shape[-3:])
  taps = gaussian_window(win_size, sigma)
  c = x.shape[-1]
  # One filtering pass over the five statistics stacked along channels.
  stats = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), taps)
  ux, uy, uxx, uyy, uxy = (stats[..., i * c:(i + 1) * c] for i in range(5))
  vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=_IMAGE_AXES).reshape(lead)


# The paper gives no LPIPS/KL weights; recipes set them in the config. kl 1e-6 is LDM's usual weight, but note that LDM
# applies it to the per-sample SUM while ``kl_divergence`` is a MEAN (see there).
DEFAULT_VAE_LOSS_WEIGHTS = {"mse": 1.0, "lpips": 1.0, "kl": 1e-6}


def vae_loss(recon: jax.Array, target: jax.Array, mean: jax.Array, logvar: jax.Array,
             lpips_fn: Callable[[jax.Array, jax.Array], jax.Array] | None,
             weights: Mapping[str, float] | Any = None, data_range: float = 2.0) -> tuple[jax.Array, dict]:
  """L_VAE = w_mse * MSE + w_lpips * LPIPS + w_kl * KL (no GAN term, as in CVD-STORM).

  Args:
    recon, target: [B, H, W, C] images in [-1, 1].
    mean, logvar: the posterior, [B, h, w, L].
    lpips_fn: (recon, target) -> per-image distances [B] (e.g. ``models.lpips.LPIPS`` bound to its params); may be
      None only when the LPIPS weight is 0 (then it is not evaluated at all).
    weights: mapping or ConfigDict with keys ``mse``, ``lpips``, ``kl`` (missing keys: DEFAULT_VAE_LOSS_WEIGHTS).
  Returns:
    (loss scalar, metrics {loss, mse, lpips, kl, psnr}) — metrics are unweighted and fp32; psnr is the batch mean.
  """
  w = dict(DEFAULT_VAE_LOSS_WEIGHTS)
  if weights is not None:
    unknown = set(weights.keys()) - set(w)
    if unknown:
      raise ValueError(f"vae_loss: unknown weight keys {sorted(unknown)}; expected {sorted(w)}")
    w.update({k: float(weights[k]) for k in weights.keys()})
  l_mse = mse(recon, target)
  l_kl = kl_divergence(mean, logvar)
  if w["lpips"] != 0.0:
    if lpips_fn is None:
      raise ValueError(f"vae_loss: LPIPS weight is {w['lpips']} but no lpips_fn was given")
    l_lpips = jnp.mean(lpips_fn(recon, target).astype(jnp.float32))
  else:
    l_lpips = jnp.zeros((), jnp.float32)
  loss = w["mse"] * l_mse + w["lpips"] * l_lpips + w["kl"] * l_kl
  metrics = {"loss": loss, "mse": l_mse, "lpips": l_lpips, "kl": l_kl,
             "psnr": jnp.mean(psnr(jax.lax.stop_gradient(recon), target, data_range))}
  return loss, metrics
