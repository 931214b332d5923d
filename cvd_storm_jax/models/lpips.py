"""LPIPS (Zhang et al. 2018), VGG16 variant with the v0.1 linear layers, in Flax linen.

distance(x0, x1) = sum over 5 VGG16 stages l of mean_{h,w} || w_l * (n(f_l(x0)) - n(f_l(x1))) ||^2, where f_l are the
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 activations of ImageNet-scaled inputs, n() unit-normalises each position's
channel vector and w_l is a learned non-negative 1x1 conv to one channel. Same maths as the PyTorch ``lpips`` package
(``LPIPS(net='vgg', version='0.1')``); weights come from ``cvd_storm_jax.pretrained.lpips.load_lpips``.

Inputs are channels-last images ``[B, H, W, 3]`` in [-1, 1]; the output is ``[B]``. The module has no trainable role in
the VAE objective: pass its params as constants (gradients flow to the images only).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision VGG16 ``features``: (stage, convs per stage, channels). A 2x2 max-pool precedes stages 2-5.
VGG16_STAGES = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
# lpips' ScalingLayer: the ImageNet mean/std expressed for inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
  """The convolutional part of torchvision's VGG16; returns the five relu{s}_{last} feature maps."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """x: [B, H, W, 3] (ImageNet-scaled) -> [relu1_2 [B,H,W,64], relu2_2 [B,H/2,W/2,128], ..., relu5_3]."""
    feats = []
    for stage, n, c in VGG16_STAGES:
      if stage > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i in range(1, n + 1):
        x = nn.relu(nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=self.param_dtype,
                            name=f"conv{stage}_{i}")(x))
      feats.append(x)
    return feats


def _unit_normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
  """f / (||f||_2 over channels + eps), as lpips.normalize_tensor, in fp32."""
  f = f.astype(jnp.float32)
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """LPIPS-VGG (v0.1). ``__call__(x0, x1)`` with x0, x1: [B, H, W, 3] in [-1, 1] -> distances [B] (fp32)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(f"LPIPS expects two [B, H, W, 3] images of equal shape, got {x0.shape} and {x1.shape}")
    b = x0.shape[0]
    shift, scale = jnp.asarray(_SHIFT, jnp.float32), jnp.asarray(_SCALE, jnp.float32)
    vgg = VGG16Features(self.dtype, self.param_dtype, name="vgg")
    # The two images through the backbone one after the other, not as one concatenated batch: in a loss x1 is the
    # data, and with one batch the backward pass ran every transposed convolution over both halves.
    feats0, feats1 = [vgg(((x.astype(jnp.float32) - shift) / scale).astype(self.dtype)) for x in (x0, x1)]
    total = jnp.zeros((b,), jnp.float32)
    for i, (f0, f1) in enumerate(zip(feats0, feats1)):
      d = jnp.square(_unit_normalize(f0) - _unit_normalize(f1))
      # lpips' NetLinLayer: dropout (inactive at eval) + 1x1 conv to one channel without bias.
      w = self.param(f"lin{i}", nn.initializers.ones_init(), (d.shape[-1],), self.param_dtype)
      total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", d, w.astype(jnp.float32),
                                          precision=jax.lax.Precision.HIGHEST), axis=(1, 2))
    return total
