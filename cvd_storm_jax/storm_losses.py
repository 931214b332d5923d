"""STORM-VAE objective: L = L_VAE + lambda * L_STORM (CVD-STORM paper Eq. 3, lambda = 0.5).

L_VAE (paper §3.2: MSE + LPIPS + KL, no GAN) is computed per image here so that padded view slots (view_mask False)
are left out; it uses the primitives of ``cvd_storm_jax.losses``.

L_STORM (GaussianSTORM storm/utils/losses.py, main_storm.py; weights are STORM's README defaults):
  rgb      1.0   MSE of the rendered target views, on de-normalised [0, 1] images;
  lpips    0.05  LPIPS of the rendered target views (STORM turns it on from iteration 5000: ``lpips_start_step``),
                 on [-1, 1] images as LPIPS expects (STORM feeds [0, 1] into its [-1, 1] scaling layer);
  depth    1.0   L1 of rendered expected z-depth vs projected LiDAR depth on pixels with GT > 0.01, both divided by the
                 largest GT depth of the sample (STORM divides by the batch maximum; per sample here, so that one
                 sample's loss never depends on another's);
  sky      0.1   L1 between rendered alpha and 1 - sky_mask, only for samples that carry a sky mask;
  flow_reg 0.005 mean squared per-pixel Gaussian velocity over the real view slots (STORM has no padded slots).
All terms are reduced per sample and averaged over the samples that may train the GS branch (``storm_valid``); the
others (OpenDV: one view, no LiDAR) contribute exactly zero loss and exactly zero gradient to the GS decoder.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from cvd_storm_jax import losses as base_losses

Array = jax.Array
LpipsFn = Callable[[Array, Array], Array]  # ([N, H, W, 3], [N, H, W, 3]) in [-1, 1] -> [N]


@dataclasses.dataclass(frozen=True)
class StormLossWeights:
  rgb: float = 1.0
  lpips: float = 0.05
  depth: float = 1.0
  sky: float = 0.1
  flow_reg: float = 0.005
  lpips_start_step: int = 5000
  min_depth: float = 0.01  # GT depth below this is "no LiDAR point"


@dataclasses.dataclass(frozen=True)
class VAELossWeights:
  mse: float = 1.0
  lpips: float = 1.0
  # On the per-element MEAN KL beside the per-element MEAN reconstruction error (losses.kl_divergence). LDM's 1e-6
  # weighs SUMS of both: 16 latent values per 8 x 8 x 3 = 192 pixel values, so in means LDM's balance is 1e-6 / 12;
  # this KL is 12x LDM's relative strength (the paper gives no value).
  kl: float = 1e-6


STORM_LAMBDA = 0.5  # paper §3.2


def _masked_mean(x: Array, w: Array) -> Array:
  """sum(x w) / max(sum(w), 1) with x, w broadcastable; fp32."""
  w = jnp.broadcast_to(w.astype(jnp.float32), x.shape)
  return jnp.sum(x.astype(jnp.float32) * w) / jnp.maximum(jnp.sum(w), 1.0)


def _lpips_per_image(lpips_fn: LpipsFn, pred: Array, target: Array) -> Array:
  """LPIPS over images of any leading shape [..., H, W, 3] -> [...]."""
  lead = pred.shape[:-3]
  d = lpips_fn(pred.reshape((-1,) + pred.shape[-3:]), target.reshape((-1,) + target.shape[-3:]))
  return d.reshape(lead)


def vae_loss_masked(recon: Array, target: Array, mean: Array, logvar: Array, image_mask: Array,
                    lpips_fn: LpipsFn | None, weights: VAELossWeights = VAELossWeights()) -> tuple[Array, dict]:
  """L_VAE over real images only.

  Args:
    recon, target: [..., H, W, 3] in [-1, 1]; mean, logvar: [..., h, w, L]; image_mask: [...] (False = padded view).
  Returns:
    (loss, metrics {vae_mse, vae_lpips, vae_kl, vae_psnr}).
  """
  err = jnp.mean(jnp.square(recon.astype(jnp.float32) - target.astype(jnp.float32)), axis=(-3, -2, -1))
  kl = jnp.mean(base_losses.kl_per_element(mean, logvar), axis=(-3, -2, -1))
  l_mse, l_kl = _masked_mean(err, image_mask), _masked_mean(kl, image_mask)
  if weights.lpips != 0.0:
    if lpips_fn is None:
      raise ValueError(f"vae_loss_masked: LPIPS weight is {weights.lpips} but no lpips_fn was given")
    l_lpips = _masked_mean(_lpips_per_image(lpips_fn, recon, target), image_mask)
  else:
    l_lpips = jnp.zeros((), jnp.float32)
  loss = weights.mse * l_mse + weights.lpips * l_lpips + weights.kl * l_kl
  psnr = base_losses.psnr(jax.lax.stop_gradient(recon), target, data_range=2.0)
  return loss, {"vae_mse": l_mse, "vae_lpips": l_lpips, "vae_kl": l_kl, "vae_psnr": _masked_mean(psnr, image_mask)}


def storm_loss(renders: Mapping[str, Array], target_rgb: Array, target_depth: Array, view_mask: Array,
               storm_valid: Array, velocities: Array, *, sky_mask: Array | None = None, has_sky: Array | None = None,
               lpips_fn: LpipsFn | None = None, step: Array | int = 0,
               weights: StormLossWeights = StormLossWeights()) -> tuple[Array, dict]:
  """L_STORM of rendered target views, per sample, averaged over ``storm_valid`` samples.

  Args:
    renders: ``GSDecoder.render`` output: rgb [B, Tt, V, H, W, 3] in [-1, 1], depth, alpha [B, Tt, V, H, W].
    target_rgb: [B, Tt, V, H, W, 3] in [-1, 1]. target_depth: [B, Tt, V, H, W] LiDAR z-depth, 0 = none.
    view_mask: [B, V]. storm_valid: [B] bool (False: the sample trains the VAE branch only).
    velocities: [B, ...] per-pixel Gaussian velocities (m/s).
    sky_mask: [B, Tt, V, H, W] bool, True = sky; has_sky: [B] bool (samples without sky labels skip the sky term).
    lpips_fn: needed when weights.lpips != 0; applied from ``weights.lpips_start_step`` on (before it, not computed:
      the storm_lpips metric reads 0).
  Returns:
    (loss, metrics): metrics are the unweighted valid-sample means storm_{rgb,lpips,depth,sky,flow_reg,psnr} and
    storm_valid_frac.
  """
  b = target_rgb.shape[0]
  valid = storm_valid.astype(bool)
  vmask = view_mask.astype(jnp.float32)[:, None, :, None, None]  # [B, 1, V, 1, 1]
  pred01 = renders["rgb"].astype(jnp.float32) * 0.5 + 0.5
  tgt01 = target_rgb.astype(jnp.float32) * 0.5 + 0.5
  per_pix_mse = jnp.mean(jnp.square(pred01 - tgt01), axis=-1)  # [B, Tt, V, H, W]
  red = (1, 2, 3, 4)
  view_w = jnp.broadcast_to(vmask, per_pix_mse.shape)
  n_pix = jnp.maximum(jnp.sum(view_w, axis=red), 1.0)
  l_rgb = jnp.sum(per_pix_mse * view_w, axis=red) / n_pix  # [B]

  gt = target_depth.astype(jnp.float32)
  depth_w = (gt > weights.min_depth).astype(jnp.float32) * view_w
  scale = jnp.maximum(jnp.max(gt * depth_w, axis=red), 1e-6)  # per-sample max GT depth
  d_err = jnp.abs(renders["depth"].astype(jnp.float32) - gt) / scale[:, None, None, None, None]
  l_depth = jnp.sum(d_err * depth_w, axis=red) / jnp.maximum(jnp.sum(depth_w, axis=red), 1.0)

  if sky_mask is not None:
    sky_w = view_w * (jnp.ones((b,), bool) if has_sky is None else has_sky.astype(bool))[:, None, None, None, None]
    sky_err = jnp.abs(renders["alpha"].astype(jnp.float32) - (1.0 - sky_mask.astype(jnp.float32)))
    l_sky = jnp.sum(sky_err * sky_w, axis=red) / n_pix
  else:
    l_sky = jnp.zeros((b,), jnp.float32)

  # Real view slots only: padded slots' velocities are outputs of discarded tokens (the decoder's view mask).
  vel_w = jnp.broadcast_to(view_mask.astype(jnp.float32)[:, None, :, None, None], velocities.shape[:5])
  l_flow = (jnp.sum(jnp.square(velocities.astype(jnp.float32)).sum(-1) * vel_w, axis=(1, 2, 3, 4))
            / jnp.maximum(3.0 * jnp.sum(vel_w, axis=(1, 2, 3, 4)), 1.0))

  if weights.lpips != 0.0:
    if lpips_fn is None:
      raise ValueError(f"storm_loss: LPIPS weight is {weights.lpips} but no lpips_fn was given")

    def lpips_term() -> Array:
      lp = _lpips_per_image(lpips_fn, renders["rgb"].astype(jnp.float32), target_rgb.astype(jnp.float32))  # [B,Tt,V]
      lpw = jnp.broadcast_to(view_mask.astype(jnp.float32)[:, None, :], lp.shape)
      return jnp.sum(lp * lpw, axis=(1, 2)) / jnp.maximum(jnp.sum(lpw, axis=(1, 2)), 1.0)

    # Not computed at all before the start step (a cond, not a multiply by 0: VGG16's forward, recompute and backward
    # over every render would otherwise run for the first lpips_start_step steps).
    l_lpips = (lpips_term() if weights.lpips_start_step <= 0 else
               jax.lax.cond(jnp.asarray(step) >= weights.lpips_start_step, lpips_term,
                            lambda: jnp.zeros((b,), jnp.float32)))
  else:
    l_lpips = jnp.zeros((b,), jnp.float32)

  per_sample = (weights.rgb * l_rgb + weights.lpips * l_lpips + weights.depth * l_depth
                + weights.sky * l_sky + weights.flow_reg * l_flow)
  # where (not a multiply): an invalid sample's loss is exactly 0 whatever its value (also inf/NaN), and so is the
  # cotangent that flows back into its renders and Gaussians.
  per_sample = jnp.where(valid, per_sample, 0.0)
  n_valid = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
  loss = jnp.sum(per_sample) / n_valid
  mean_valid = lambda x: jnp.sum(jnp.where(valid, jax.lax.stop_gradient(x), 0.0)) / n_valid
  psnr = -10.0 * jnp.log10(jnp.maximum(jax.lax.stop_gradient(l_rgb), 1e-10))
  metrics = {"storm_rgb": mean_valid(l_rgb), "storm_lpips": mean_valid(l_lpips), "storm_depth": mean_valid(l_depth),
             "storm_sky": mean_valid(l_sky), "storm_flow_reg": mean_valid(l_flow), "storm_psnr": mean_valid(psnr),
             "storm_valid_frac": jnp.mean(valid.astype(jnp.float32))}
  return loss, metrics
