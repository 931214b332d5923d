"""STORM-VAE (CVD-STORM paper §3.2, Fig. 2 top): the SD3.5 VAE with a Gaussian-splatting decoder on its latents.

    images --E--> posterior (mean, logvar) --sample z--> D_VAE(z)          (reconstruction, L_VAE)
                                                   \\--> D_GS(norm(z))   (4D Gaussians -> renders, L_STORM)

Which latent feeds the GS branch: by default the SAME posterior sample z that the VAE decoder gets (``gs_latent =
"sample"``), normalised as the diffusion model sees latents (``(z - shift) * scale``, SD3). Why: after training, D_GS
decodes latents produced by the diffusion model, which is trained on posterior samples (encode_for_diffusion), so D_GS
should see that distribution, noise included; the paper's "sampled context latents" reads the same way. ``"mean"``
uses the posterior mean instead (deterministic; the STORM gradient then reaches only the mean head of the encoder).

Parameters: {"vae": AutoencoderKL params (diffusers names, importable from an SD3.5 folder), "gs": GSDecoder params}.
"""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvd_storm_jax.models import vae as vae_lib
from cvd_storm_jax.models.gs_decoder import GSDecoder, GSDecoderConfig

Array = jax.Array


class StormVAE(nn.Module):
  """The joint model. Methods: ``encode``, ``decode``, ``gaussians``, ``render``, ``__call__`` (training forward)."""
  vae_config: vae_lib.VAEConfig
  gs_config: GSDecoderConfig
  gs_latent: Literal["sample", "mean"] = "sample"
  vae_remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.gs_config.latent_channels != self.vae_config.latent_channels:
      raise ValueError(f"GS decoder latent_channels={self.gs_config.latent_channels} but the VAE has "
                       f"{self.vae_config.latent_channels}")
    if self.gs_config.vae_downsample != self.vae_config.downsample_factor:
      raise ValueError(f"GS decoder vae_downsample={self.gs_config.vae_downsample} but the VAE downsamples by "
                       f"{self.vae_config.downsample_factor}")
    if self.gs_latent not in ("sample", "mean"):
      raise ValueError(f"gs_latent={self.gs_latent!r}; expected 'sample' or 'mean'")
    self.vae = vae_lib.AutoencoderKL(self.vae_config, remat=self.vae_remat, dtype=self.dtype,
                                     param_dtype=self.param_dtype)
    self.gs = GSDecoder(self.gs_config)

  def encode(self, images: Array) -> tuple[Array, Array]:
    """images [..., H, W, 3] in [-1, 1] -> (mean, logvar) [..., h, w, L] (raw VAE latent space)."""
    lead = images.shape[:-3]
    mean, logvar = self.vae.encode(images.reshape((-1,) + images.shape[-3:]))
    return mean.reshape(lead + mean.shape[1:]), logvar.reshape(lead + logvar.shape[1:])

  def decode(self, z: Array) -> Array:
    """Raw latents [..., h, w, L] -> images [..., H, W, 3]."""
    lead = z.shape[:-3]
    x = self.vae.decode(z.reshape((-1,) + z.shape[-3:]))
    return x.reshape(lead + x.shape[1:])

  def gaussians(self, model_latents: Array, intrinsics: Array, cam_to_ref: Array, times: Array,
                view_mask: Array) -> dict[str, Array]:
    """Diffusion-space latents [B, T, V, h, w, L] -> Gaussians (see ``GSDecoder.__call__``)."""
    return self.gs(model_latents, intrinsics, cam_to_ref, times, view_mask)

  def render(self, gaussians: dict[str, Array], cam_to_ref: Array, intrinsics: Array, target_times: Array,
             height: int, width: int) -> dict[str, Array]:
    """See ``GSDecoder.render``."""
    return self.gs.render(gaussians, cam_to_ref, intrinsics, target_times, height, width)

  def init_forward(self, images: Array, intrinsics: Array, cam_to_ref: Array, times: Array,
                   view_mask: Array) -> dict[str, Array]:
    """Everything that owns params (encoder, decoder, GS decoder incl. its sky head) without rendering: a cheaper
    program for ``init`` (the rasteriser has no params)."""
    mean, logvar = self.encode(images)
    recon = self.decode(mean)
    gaussians = self.gaussians(self.vae.to_model_latents(mean), intrinsics, cam_to_ref, times, view_mask)
    return {"recon": recon, "gaussians": gaussians}

  def __call__(self, images: Array, intrinsics: Array, cam_to_ref: Array, times: Array, view_mask: Array,
               target_cam_to_ref: Array, target_intrinsics: Array, target_times: Array, rng: Array | None,
               *, decode: bool = True) -> dict[str, Any]:
    """Training forward.

    Args:
      images: [B, T, V, H, W, 3] context images in [-1, 1]; intrinsics [B, T, V, 3, 3]; cam_to_ref [B, T, V, 4, 4];
        times [B, T] (seconds since the first context frame); view_mask [B, V].
      target_*: [B, Tt, V, ...] target cameras, [B, Tt] target times.
      rng: posterior sample key (None: use the mean in both branches).
      decode: run the VAE decoder (False skips the reconstruction branch, e.g. for evaluation of D_GS).
    Returns:
      {"mean", "logvar", "z", "recon" (or None), "gaussians", "renders"}.
    """
    b, t, v, height, width, _ = images.shape
    mean, logvar = self.encode(images)
    z = mean if rng is None else vae_lib.sample(mean, logvar, rng)
    recon = self.decode(z) if decode else None
    gs_in = z if self.gs_latent == "sample" else mean
    gaussians = self.gaussians(self.vae.to_model_latents(gs_in), intrinsics, cam_to_ref, times, view_mask)
    renders = self.render(gaussians, target_cam_to_ref, target_intrinsics, target_times, height, width)
    return {"mean": mean, "logvar": logvar, "z": z, "recon": recon, "gaussians": gaussians, "renders": renders}
