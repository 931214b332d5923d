"""The FID feature network: InceptionV3 as converted from TensorFlow's 2015-12-05 graph, in Flax linen.

This is the network behind torchmetrics' ``FrechetInceptionDistance`` (torch-fidelity's ``FeatureExtractorInceptionV3``,
itself pytorch-fid's ``FIDInceptionA/C/E`` variant of torchvision's Inception3), the FID of OpenDWM / UniMLVG:

* the input is resized to 299x299 with TensorFlow 1.x bilinear resizing (``align_corners=False``: source coordinate
  ``dst_index * in_size / out_size`` with no half-pixel offset, the upper neighbour clamped to the last pixel), which
  is not ``jax.image.resize`` (that one uses half-pixel centres and antialiases when downsampling);
* then ``(x - 128) / 128``;
* every conv has no bias and is followed by an inference BatchNorm with ``eps = 1e-3`` and a ReLU;
* the TF patches: the pool branch of InceptionA/C/E averages over the valid pixels only (``count_include_pad=False``)
  and the last block (``Mixed_7c``) max-pools in its pool branch;
* a 1008-class ``fc`` head (1000 ImageNet classes + 8 unused).

FID uses ``pool``, the 2048-d spatial mean of ``Mixed_7c`` (torch-fidelity's feature "2048"). torchmetrics with
``normalize=True`` turns [0, 1] floats into uint8 with ``(x * 255).byte()`` (truncation) *before* this network; that
quantisation is the caller's business: this module takes values in [0, 255] as they are.

Layout is channels-last: images ``[N, H, W, 3]`` of any size, uint8 or float in [0, 255]. Submodule names follow the
torch module tree (``Mixed_6b/branch7x7dbl_3/conv`` <-> ``Mixed_6b.branch7x7dbl_3.conv``); each conv-bn unit holds
``conv/kernel`` in "params", ``bn/scale``, ``bn/bias`` in "params" and ``bn/mean``, ``bn/var`` in "batch_stats", so
``cvd_storm_jax.pretrained.inception.load_inception`` is a handful of renaming rules.

Usage::

  net, variables = load_inception("weights-inception-2015-12-05-6726825d.pth")
  out = jax.jit(net.apply)(variables, images)        # {"pool": [N, 2048], "logits": [N, 1008]}, fp32
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

INPUT_SIZE = 299
BN_EPS = 1e-3
NUM_CLASSES = 1008
FEATURE_DIM = 2048


def _tf1_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lo, hi, frac) of TF1 ``align_corners=False`` bilinear sampling along one axis.

  Computed in numpy at trace time (the sizes are static) with the reference's fp32 roundings: the coordinate
  ``fp32(i) * fp32(in / out)`` is rounded to fp32 before ``frac = coord - lo``. (Traced, XLA on CPU contracts the
  multiply and the subtraction into one FMA, which skips that rounding and moves ``frac`` by up to 3e-5 at 300 px.)
  """
  coord = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
  lo = coord.astype(np.int32)  # coord >= 0: truncation is floor; coord < in_size, so lo <= in_size - 1
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, coord - lo.astype(np.float32)


def resize_bilinear_tf1(x: jax.Array, height: int, width: int) -> jax.Array:
  """TensorFlow 1.x ``resize_bilinear(align_corners=False)``: x [N, H, W, C] -> [N, height, width, C] in fp32.

  Separable: two rows gathered per output row, two columns per output column; interpolated along the width first,
  then along the height (the order of torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``).
  """
  x = jnp.asarray(x).astype(jnp.float32)
  y_lo, y_hi, dy = _tf1_taps(x.shape[1], height)
  x_lo, x_hi, dx = _tf1_taps(x.shape[2], width)
  top, bottom = jnp.take(x, y_lo, axis=1, mode="clip"), jnp.take(x, y_hi, axis=1, mode="clip")  # [N, height, W, C]
  dx = dx[None, None, :, None]

  def along_width(rows: jax.Array) -> jax.Array:
    left, right = jnp.take(rows, x_lo, axis=2, mode="clip"), jnp.take(rows, x_hi, axis=2, mode="clip")
    return left + (right - left) * dx

  top, bottom = along_width(top), along_width(bottom)
  return top + (bottom - top) * dy[None, :, None, None]


def _pad(padding: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """torch's symmetric (ph, pw) -> flax ((ph, ph), (pw, pw))."""
  return (padding[0], padding[0]), (padding[1], padding[1])


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU; torch padding ``(ph, pw)`` on both sides."""
  features: int
  kernel: Sequence[int] = (1, 1)
  strides: Sequence[int] = (1, 1)
  padding: Sequence[int] = (0, 0)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, tuple(self.kernel), strides=tuple(self.strides), padding=_pad(self.padding),
                use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """avg_pool2d(3, stride 1, padding 1, count_include_pad=False): the mean over the valid pixels of each window."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """max_pool2d(3, stride 2), no padding."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
  """Base of the blocks and the network: ``conv(name, features, kernel, ...)`` builds a named BasicConv2d with the
  shared dtypes and precision."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  def conv(self, name: str, features: int, kernel: Sequence[int] = (1, 1), strides: Sequence[int] = (1, 1),
           padding: Sequence[int] = (0, 0)) -> BasicConv2d:
    return BasicConv2d(features, kernel, strides, padding, self.dtype, self.param_dtype, self.precision, name=name)


class InceptionA(_Block):
  """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv("branch1x1", 64)(x)
    b5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(self.conv("branch5x5_1", 48)(x))
    b3 = self.conv("branch3x3dbl_1", 64)(x)
    b3 = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
    b3 = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
    bp = self.conv("branch_pool", self.pool_features)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 384 + 96 + C_in channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv("branch3x3", 384, (3, 3), strides=(2, 2))(x)
    bd = self.conv("branch3x3dbl_1", 64)(x)
    bd = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
    bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=(2, 2))(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  """17x17 block (Mixed_6b..e) with factorised 7x7 convs -> 768 channels."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192)(x)
    b7 = self.conv("branch7x7_1", c7)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7)(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 320 + 192 + C_in channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv("branch3x3_2", 320, (3, 3), strides=(2, 2))(self.conv("branch3x3_1", 192)(x))
    b7 = self.conv("branch7x7x3_1", 192)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=(2, 2))(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  """8x8 block (Mixed_7b, Mixed_7c) with split 1x3 / 3x1 convs -> 2048 channels. ``max_pool``: the TF graph's
  Mixed_7c max-pools (3x3, stride 1, padding 1) in its pool branch where Mixed_7b averages (valid pixels only)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv("branch1x1", 320)(x)
    b3 = self.conv("branch3x3_1", 384)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448)(x)
    bd = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    if self.max_pool:  # padded with -inf, as torch's max_pool2d
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = self.conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(_Block):
  """``__call__(images)``: images [N, H, W, 3] (uint8, or float in [0, 255]) -> {"pool": [N, 2048] (the FID feature),
  "logits": [N, 1008]}, both fp32. Resizing and normalisation happen in fp32; the convs in ``dtype`` with
  ``precision`` (HIGHEST by default: FID is a measurement, and on GPUs the default would be TF32)."""

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"InceptionV3 expects images [N, H, W, 3], got {images.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    conv = self.conv

    x = resize_bilinear_tf1(images, INPUT_SIZE, INPUT_SIZE)
    x = ((x - 128.0) / 128.0).astype(self.dtype)                      # [N, 299, 299, 3]
    x = conv("Conv2d_1a_3x3", 32, (3, 3), strides=(2, 2))(x)          # [N, 149, 149, 32]
    x = conv("Conv2d_2a_3x3", 32, (3, 3))(x)                          # [N, 147, 147, 32]
    x = conv("Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))(x)          # [N, 147, 147, 64]
    x = _max_pool_3x3_s2(x)                                           # [N, 73, 73, 64]
    x = conv("Conv2d_3b_1x1", 80)(x)                                  # [N, 73, 73, 80]
    x = conv("Conv2d_4a_3x3", 192, (3, 3))(x)                         # [N, 71, 71, 192]
    x = _max_pool_3x3_s2(x)                                           # [N, 35, 35, 192]
    x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)        # [N, 35, 35, 256]
    x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)        # [N, 35, 35, 288]
    x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)        # [N, 35, 35, 288]
    x = InceptionB(name="Mixed_6a", **kw)(x)                          # [N, 17, 17, 768]
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(channels_7x7=c7, name=name, **kw)(x)             # [N, 17, 17, 768]
    x = InceptionD(name="Mixed_7a", **kw)(x)                          # [N, 8, 8, 1280]
    x = InceptionE(max_pool=False, name="Mixed_7b", **kw)(x)          # [N, 8, 8, 2048]
    x = InceptionE(max_pool=True, name="Mixed_7c", **kw)(x)           # [N, 8, 8, 2048]
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))               # [N, 2048]
    logits = nn.Dense(NUM_CLASSES, dtype=jnp.float32, param_dtype=self.param_dtype, precision=self.precision,
                      name="fc")(pool)                                # [N, 1008]
    return {"pool": pool, "logits": logits.astype(jnp.float32)}
