"""Inflated Inception-v1 (I3D, Carreira & Zisserman 2017), RGB stream trained on Kinetics-400, in Flax linen: FVD's
feature network.

FVD (Unterthiner et al. 2018) embeds each video with DeepMind's I3D (TF-Hub ``deepmind/i3d-kinetics-400/1``) and takes
the 400-way logits averaged over time (``RGB/inception_i3d/Mean:0``) as the feature. This module computes exactly that
tensor; weights come from ``cvd_storm_jax.pretrained.i3d.load_i3d``.

Architecture (DeepMind's ``kinetics-i3d/i3d.py``), written here as a layer table:
  * ``Unit3D`` = 3D conv without bias (TF "SAME" padding) + Sonnet-v1 BatchNorm (offset only, no scale, eps 1e-3,
    moving statistics) + relu;
  * a stem of convs and spatial max-pools, then nine Inception modules of four branches (1x1; 1x1 -> 3x3x3;
    1x1 -> 3x3x3; 3x3x3 max-pool -> 1x1) joined by channel concatenation, with two 3D max-pools in between;
    all max-pools use TF "SAME" padding (padding never wins the max);
  * head: AvgPool (2, 7, 7) stride 1 VALID -> 1x1x1 conv with bias to ``num_classes`` -> squeeze H, W -> mean over T.

Conventions: channels-last videos ``[B, T, H, W, 3]`` in [-1, 1]; output ``[B, num_classes]`` float32 logits (not
softmax). Inference only: BatchNorm uses its moving statistics and the (keep-prob 1) dropout is omitted. FVD's
preprocessing (resize every frame to 224x224, map to [-1, 1]) is the caller's job. The network downsamples time by 8
and space by 32 (ceil at every stride), so the head needs T >= 9 frames and 193 <= H, W <= 224 (FVD uses 16 or more
frames at 224x224); anything else raises ValueError instead of returning an empty or non-squeezable logit map.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Triple = tuple[int, int, int]


class Layer(NamedTuple):
  """One row of the I3D layer table. kind: "conv" (a Unit3D with ``widths[0]`` outputs), "pool" (max-pool) or
  "mixed" (an Inception module; ``widths`` = branch0 1x1, branch1 1x1, branch1 3x3x3, branch2 1x1, branch2 3x3x3,
  branch3 1x1, in DeepMind's order)."""
  name: str
  kind: str
  widths: tuple[int, ...] = ()
  window: Triple = (1, 1, 1)
  stride: Triple = (1, 1, 1)


# DeepMind's InceptionI3d endpoints up to Mixed_5c, in order. Windows and strides are (T, H, W).
I3D_LAYERS = (
    Layer("Conv3d_1a_7x7", "conv", (64,), (7, 7, 7), (2, 2, 2)),
    Layer("MaxPool3d_2a_3x3", "pool", (), (1, 3, 3), (1, 2, 2)),
    Layer("Conv3d_2b_1x1", "conv", (64,)),
    Layer("Conv3d_2c_3x3", "conv", (192,), (3, 3, 3)),
    Layer("MaxPool3d_3a_3x3", "pool", (), (1, 3, 3), (1, 2, 2)),
    Layer("Mixed_3b", "mixed", (64, 96, 128, 16, 32, 32)),
    Layer("Mixed_3c", "mixed", (128, 128, 192, 32, 96, 64)),
    Layer("MaxPool3d_4a_3x3", "pool", (), (3, 3, 3), (2, 2, 2)),
    Layer("Mixed_4b", "mixed", (192, 96, 208, 16, 48, 64)),
    Layer("Mixed_4c", "mixed", (160, 112, 224, 24, 64, 64)),
    Layer("Mixed_4d", "mixed", (128, 128, 256, 24, 64, 64)),
    Layer("Mixed_4e", "mixed", (112, 144, 288, 32, 64, 64)),
    Layer("Mixed_4f", "mixed", (256, 160, 320, 32, 128, 128)),
    Layer("MaxPool3d_5a_2x2", "pool", (), (2, 2, 2), (2, 2, 2)),
    Layer("Mixed_5b", "mixed", (256, 160, 320, 32, 128, 128)),
    Layer("Mixed_5c", "mixed", (384, 192, 384, 48, 128, 128)),
)
# The head's average pool over the Mixed_5c map (T/8, 7, 7 at 224x224).
LOGITS_POOL = (2, 7, 7)


def _inception_branches(widths: tuple[int, ...]) -> tuple[tuple[str, tuple[Layer, ...]], ...]:
  """The four branches of an Inception module as (branch name, layer list), with DeepMind's layer names."""
  b0, b1a, b1b, b2a, b2b, b3 = widths
  return (
      ("Branch_0", (Layer("Conv3d_0a_1x1", "conv", (b0,)),)),
      ("Branch_1", (Layer("Conv3d_0a_1x1", "conv", (b1a,)), Layer("Conv3d_0b_3x3", "conv", (b1b,), (3, 3, 3)))),
      ("Branch_2", (Layer("Conv3d_0a_1x1", "conv", (b2a,)), Layer("Conv3d_0b_3x3", "conv", (b2b,), (3, 3, 3)))),
      ("Branch_3", (Layer("MaxPool3d_0a_3x3", "pool", (), (3, 3, 3)), Layer("Conv3d_0b_1x1", "conv", (b3,)))),
  )


def _total_strides() -> Triple:
  """Product of all (T, H, W) strides of the layer table (Inception modules keep the size)."""
  return tuple(math.prod(layer.stride[a] for layer in I3D_LAYERS) for a in range(3))


def input_size_limits() -> tuple[int, int, int]:
  """(min frames, min side, max side) of a video the head accepts: the Mixed_5c map must hold at least one
  (2, 7, 7) pooling window, and exactly one spatially (DeepMind squeezes H and W of the logit map). With "SAME"
  padding every stride s maps n -> ceil(n / s), so n >= (k - 1) * S + 1 gives k outputs through total stride S."""
  st, sh, _ = _total_strides()
  kt, kh, _ = LOGITS_POOL
  return (kt - 1) * st + 1, (kh - 1) * sh + 1, kh * sh


def _check_input(shape: tuple[int, ...]) -> None:
  if len(shape) != 5 or shape[-1] != 3:
    raise ValueError(f"I3D expects RGB videos [B, T, H, W, 3], got shape {shape}")
  min_t, min_hw, max_hw = input_size_limits()
  _, t, h, w, _ = shape
  if t < min_t or min(h, w) < min_hw:
    raise ValueError(f"I3D input {shape} is too small: the final (2, 7, 7) VALID average pool needs T >= {min_t} "
                     f"frames and H, W >= {min_hw} (FVD resizes frames to 224x224); got T={t}, H={h}, W={w}")
  if max(h, w) > max_hw:
    raise ValueError(f"I3D input {shape} is too large spatially: H, W must be <= {max_hw} so that the logit map is "
                     f"1x1 (FVD resizes frames to 224x224); got H={h}, W={w}")


def _max_pool(x: jax.Array, layer: Layer) -> jax.Array:
  # TF "SAME" max-pool: padding by -inf, so a padded position never wins.
  return nn.max_pool(x, layer.window, strides=layer.stride, padding="SAME")


class Unit3D(nn.Module):
  """Conv3D (no bias, "SAME") -> BatchNorm with moving statistics, offset only (eps 1e-3) -> relu.
  [B, T, H, W, C] -> [B, ceil(T/st), ceil(H/sh), ceil(W/sw), features]."""
  features: int
  window: Triple = (1, 1, 1)
  stride: Triple = (1, 1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, self.window, strides=self.stride, padding="SAME", use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv_3d")(x)
    # Sonnet v1 BatchNorm as DeepMind configured it: a learned offset (beta) but no scale (gamma).
    x = nn.BatchNorm(use_running_average=True, use_scale=False, epsilon=1e-3, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="batch_norm")(x)
    return nn.relu(x)


def _run(layers: tuple[Layer, ...], x: jax.Array, parent: nn.Module) -> jax.Array:
  """Applies a layer list; submodules are created in ``parent``'s compact scope under the layer names."""
  for layer in layers:
    if layer.kind == "conv":
      x = Unit3D(layer.widths[0], layer.window, layer.stride, parent.dtype, parent.param_dtype, name=layer.name)(x)
    elif layer.kind == "pool":
      x = _max_pool(x, layer)
    elif layer.kind == "mixed":
      x = InceptionModule(layer.widths, parent.dtype, parent.param_dtype, name=layer.name)(x)
    else:
      raise ValueError(f"unknown I3D layer kind {layer.kind!r} ({layer.name})")
  return x


class _Branch(nn.Module):
  """One Inception branch: a short layer list."""
  layers: tuple[Layer, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _run(self.layers, x, self)


class InceptionModule(nn.Module):
  """Four parallel branches concatenated on channels: [B, T, H, W, C] -> [B, T, H, W, b0 + b1b + b2b + b3]."""
  widths: tuple[int, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    outs = [_Branch(layers, self.dtype, self.param_dtype, name=name)(x)
            for name, layers in _inception_branches(self.widths)]
    return jnp.concatenate(outs, axis=-1)


class _Logits(nn.Module):
  """The head: [B, T', 7, 7, 1024] -> AvgPool (2, 7, 7) VALID -> 1x1x1 conv with bias -> mean over time -> [B, K]."""
  num_classes: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.avg_pool(x, LOGITS_POOL, strides=(1, 1, 1), padding="VALID")
    x = nn.Conv(self.num_classes, (1, 1, 1), use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                name="Conv3d_0c_1x1")(x)
    # Spatially 1x1 by the input check; the time mean is FVD's "averaged logits" and is taken in fp32.
    return jnp.mean(x[:, :, 0, 0, :].astype(jnp.float32), axis=1)


class InceptionI3D(nn.Module):
  """I3D RGB (Kinetics-400). ``__call__(videos)``: [B, T, H, W, 3] in [-1, 1] (T >= 9, 193 <= H, W <= 224; FVD
  uses 224x224) -> time-averaged logits [B, num_classes] float32. Params: ``params`` and ``batch_stats``."""
  num_classes: int = 400
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, videos: jax.Array) -> jax.Array:
    _check_input(tuple(videos.shape))
    x = _run(I3D_LAYERS, videos.astype(self.dtype), self)
    return _Logits(self.num_classes, self.dtype, self.param_dtype, name="Logits")(x)
