"""The SD3.5 image VAE (diffusers ``AutoencoderKL``) in Flax linen: the base of STORM-VAE.

Layout is channels-last: images ``[B, H, W, 3]`` in [-1, 1], latents ``[B, H/f, W/f, latent_channels]`` with
``f = 2 ** (len(block_out_channels) - 1)`` (8 for SD3.5). Parameter names follow the diffusers module tree
(``encoder/down_blocks_0/resnets_1/conv1`` <-> ``encoder.down_blocks.0.resnets.1.conv1``) so that the importer in
``cvd_storm_jax.pretrained.vae`` is a list of one-to-one renaming rules.

SD3 latent normalisation (``shift_factor`` 0.0609, ``scaling_factor`` 1.5305 for SD3.5) is NOT applied inside
``encode``/``decode``: like diffusers, the VAE works on raw latents and the diffusion side applies
``to_model_latents(z) = (z - shift) * scale`` after sampling the posterior and ``from_model_latents`` before decoding
(SD3 pipeline / ODWM training code). ``encode_for_diffusion`` and ``decode_from_diffusion`` bundle exactly that.

Usage::

  vae = AutoencoderKL(VAEConfig.sd35(), dtype=jnp.bfloat16)
  params = vae.init(rng, x)["params"]                       # or cvd_storm_jax.pretrained.vae.load_vae(folder)
  mean, logvar = vae.apply({"params": params}, x, method=vae.encode)
  recon = vae.apply({"params": params}, sample(mean, logvar, rng), method=vae.decode)
  mean, logvar = vae.encode_chunked(params, frames, chunk=12)  # bounded memory over many frames
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvd_storm_jax.models.attention import dot_product_attention

Dtype = Any

# diffusers' DiagonalGaussianDistribution clamps logvar to this range before using it.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hyper-parameters of a diffusers ``AutoencoderKL`` (names as in its config.json)."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_block_add_attention: bool = True
  scaling_factor: float = 1.5305
  shift_factor: float = 0.0609

  @classmethod
  def sd35(cls) -> "VAEConfig":
    """The Stable Diffusion 3 / 3.5 VAE (83.8 M parameters)."""
    return cls()

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"block_out_channels {self.block_out_channels}: {c} is not divisible by "
                         f"norm_num_groups={self.norm_num_groups}")


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------------------------------------------------
# PyTorch's default Conv2d/Linear init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)). Same as diffusers' random
# init, and far cheaper to compile than flax's truncated-normal default.
_TORCH_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype, stride: int = 1,
          padding: Any = None, parent: Any = None) -> nn.Conv:
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  kw = {} if parent is None else dict(parent=parent)  # parent: set by _out_tail (a module inside a lifted function)
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(_TORCH_INIT, (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)), name=name, **kw)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over channels-last input with statistics in fp32 (two-pass variance, as torch)."""
  num_groups: int
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, ..., C] -> same shape, in ``dtype``."""
    c = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (c,),
                       self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (c,),
                      self.param_dtype)
    g = self.num_groups
    xf = x.astype(jnp.float32).reshape(x.shape[0], -1, g, c // g)
    mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding: GN-SiLU-conv-GN-SiLU-conv + (1x1 conv) shortcut."""
  out_channels: int
  groups: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H, W, out_channels]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
    h = _conv(self.out_channels, 3, "conv1", **kw)(h)
    h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
    # Dropout is 0 in every AutoencoderKL config: not modelled.
    h = _conv(self.out_channels, 3, "conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
    return x.astype(self.dtype) + h


class MidAttention(nn.Module):
  """diffusers' single-head spatial self-attention of the VAE mid block (GN, q/k/v, out, residual).

  ``heads`` is channels // attention_head_dim = 1 in AutoencoderKL, so head_dim = channels (512 for SD3.5). cuDNN's
  fused attention does not take head dims that large, so those go through the XLA implementation.
  """
  groups: int
  eps: float = 1e-6
  heads: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    b, hh, ww, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x).reshape(b, hh * ww, c)
    h = nn.with_logical_constraint(h, ("batch", "length", "embed"))

    def dense(name, axes):
      return nn.Dense(c, name=name, kernel_init=nn.with_logical_partitioning(_TORCH_INIT, axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)), **kw)

    head_dim = c // self.heads
    q, k, v = (dense(n, ("embed", "heads"))(h).reshape(b, hh * ww, self.heads, head_dim)
               for n in ("to_q", "to_k", "to_v"))
    impl = "xla" if head_dim > 128 else "auto"
    o = dot_product_attention(q, k, v, implementation=impl).reshape(b, hh * ww, c)
    o = dense("to_out_0", ("heads", "embed"))(o)
    return x.astype(self.dtype) + o.reshape(b, hh, ww, c)


class MidBlock(nn.Module):
  """diffusers UNetMidBlock2D (no time embedding): resnet, [attention], resnet."""
  channels: int
  groups: int
  add_attention: bool = True
  eps: float = 1e-6
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    x = block(self.channels, self.groups, self.eps, name="resnets_0", **kw)(x)
    if self.add_attention:
      # head_dim = channels goes through XLA attention, which keeps the fp32 softmax [B, hw, hw] (SD3.5 at 256x448:
      # 24 x 1792^2 per image batch) and the q/k/v projections; remat keeps only the block input.
      attn = nn.remat(MidAttention) if self.remat else MidAttention
      x = attn(self.groups, self.eps, name="attentions_0", **kw)(x)
    return block(self.channels, self.groups, self.eps, name="resnets_1", **kw)(x)


class Resample(nn.Module):
  """diffusers Downsample2D / Upsample2D with a conv (the param lives under ``<name>/conv``)."""
  channels: int
  down: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.down:
      # Downsample2D(padding=0) pads right/bottom by one before a stride-2 3x3 conv.
      return _conv(self.channels, 3, "conv", stride=2, padding=((0, 1), (0, 1)), **kw)(x)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # F.interpolate(scale_factor=2, mode="nearest")
    return _conv(self.channels, 3, "conv", **kw)(x)


class ResnetStack(nn.Module):
  """diffusers DownEncoderBlock2D (``resample="down"``: resnets then a stride-2 downsampler) or UpDecoderBlock2D
  (``resample="up"``: resnets then nearest-x2 + conv); ``resample=None`` for the last block (no resampler)."""
  channels: int
  num_layers: int
  groups: int
  resample: str | None
  eps: float = 1e-6
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H', W', channels] with H' = H/2, 2H or H."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    for j in range(self.num_layers):
      x = block(self.channels, self.groups, self.eps, name=f"resnets_{j}", **kw)(x)
    if self.resample is not None:
      down = self.resample == "down"
      # Remat keeps the upsampler's input instead of the 4x larger nearest-upsampled conv input.
      resample = nn.remat(Resample) if self.remat else Resample
      x = resample(self.channels, down, name="downsamplers_0" if down else "upsamplers_0", **kw)(x)
    return x


def _out_tail(mdl: nn.Module, h: jax.Array, features: int, cfg: VAEConfig, remat: bool, dtype: Dtype,
              param_dtype: Dtype) -> jax.Array:
  """The encoder's / decoder's GN -> SiLU -> 3x3 ``conv_out``. h: [B, H, W, C] -> [B, H, W, features].

  Params stay ``<mdl>/conv_norm_out`` and ``<mdl>/conv_out`` (diffusers names): the tail is a function lifted over
  ``mdl`` rather than a submodule. With ``remat`` the backward keeps only h: otherwise the decoder's tail at full
  resolution keeps GroupNorm's fp32 intermediates, its output and the SiLU's (SD3.5, 24 x 256 x 448 x 128: ~6.6 GiB
  where h is 0.66 GiB in bf16).
  """
  kw = dict(dtype=dtype, param_dtype=param_dtype)

  def tail(m: nn.Module, x: jax.Array) -> jax.Array:
    x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", parent=m, **kw)(x))
    return _conv(features, 3, "conv_out", parent=m, **kw)(x)

  return (nn.remat(tail) if remat else tail)(mdl, h)


class Encoder(nn.Module):
  """diffusers vae.Encoder: conv_in, DownEncoderBlock2D x N (stride-2 conv between), mid block, GN-SiLU-conv_out."""
  config: VAEConfig
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = cfg.block_out_channels
    h = _conv(chans[0], 3, "conv_in", **kw)(x.astype(self.dtype))
    for i, c in enumerate(chans):
      h = ResnetStack(c, cfg.layers_per_block, cfg.norm_num_groups, "down" if i < len(chans) - 1 else None,
                      cfg.norm_eps, self.remat, name=f"down_blocks_{i}", **kw)(h)
    h = MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, cfg.norm_eps, self.remat,
                 name="mid_block", **kw)(h)
    return _out_tail(self, h, 2 * cfg.latent_channels, cfg, self.remat, **kw)


class Decoder(nn.Module):
  """diffusers vae.Decoder: conv_in, mid block, UpDecoderBlock2D x N (nearest x2 + conv between), GN-SiLU-conv_out."""
  config: VAEConfig
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """z: [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels]."""
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = tuple(reversed(cfg.block_out_channels))
    h = _conv(chans[0], 3, "conv_in", **kw)(z.astype(self.dtype))
    h = MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, cfg.norm_eps, self.remat,
                 name="mid_block", **kw)(h)
    for i, c in enumerate(chans):
      h = ResnetStack(c, cfg.layers_per_block + 1, cfg.norm_num_groups, "up" if i < len(chans) - 1 else None,
                      cfg.norm_eps, self.remat, name=f"up_blocks_{i}", **kw)(h)
    return _out_tail(self, h, cfg.out_channels, cfg, self.remat, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# The autoencoder.
# ----------------------------------------------------------------------------------------------------------------------
def sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """Reparameterised draw from N(mean, exp(logvar)); mean, logvar: [B, h, w, L] -> [B, h, w, L] (fp32 noise)."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps).astype(mean.dtype)


class AutoencoderKL(nn.Module):
  """diffusers ``AutoencoderKL`` (SD3.5 VAE by default), channels-last.

  Attributes:
    config: the architecture (``VAEConfig``).
    remat: rematerialise in the backward pass (training memory) the resnet blocks, the mid-block attention, the
      resamplers and the GN-SiLU-conv_out tails of encoder and decoder; the backward then keeps only their inputs.
      Changes neither the params (names, shapes) nor the numbers.
    dtype: compute dtype (bf16 in recipes); param_dtype: storage dtype of params (fp32). GroupNorm stats in fp32.
  """
  config: VAEConfig = dataclasses.field(default_factory=VAEConfig)
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(self.config, self.remat, **kw)
    self.decoder = Decoder(self.config, self.remat, **kw)
    lat = self.config.latent_channels
    self.quant_conv = _conv(2 * lat, 1, "quant_conv", **kw) if self.config.use_quant_conv else None
    self.post_quant_conv = _conv(lat, 1, "post_quant_conv", **kw) if self.config.use_post_quant_conv else None

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels], fp32.

    Runs the encoder only (cheap: STORM-VAE's GS decoder consumes ``mean``). logvar is clamped to [-30, 20] as in
    diffusers' DiagonalGaussianDistribution.
    """
    _check_image(x, self.config)
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z: jax.Array) -> jax.Array:
    """z: raw latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels] (fp32, unclipped)."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"decode expects latents [B, h, w, {self.config.latent_channels}], got {z.shape}")
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Full reconstruction. x: [B, H, W, C]; rng: posterior sample (None: use the mean).

    Returns (recon [B, H, W, C], mean, logvar).
    """
    mean, logvar = self.encode(x)
    z = mean if rng is None else sample(mean, logvar, rng)
    return self.decode(z), mean, logvar

  # --- SD3 latent normalisation (pure functions of the config; no params) ---------------------------------------------
  @nn.nowrap
  def to_model_latents(self, z: jax.Array) -> jax.Array:
    """Raw VAE latents -> the diffusion model's latent space: (z - shift_factor) * scaling_factor."""
    return (z - self.config.shift_factor) * self.config.scaling_factor

  @nn.nowrap
  def from_model_latents(self, latents: jax.Array) -> jax.Array:
    """Inverse of ``to_model_latents``: latents / scaling_factor + shift_factor (SD3 pipeline, before decode)."""
    return latents / self.config.scaling_factor + self.config.shift_factor

  # --- memory-bounded paths over many frames ---------------------------------------------------------------------------
  @nn.nowrap
  def encode_chunked(self, params: Any, x: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """``encode`` over a large batch, ``chunk`` images at a time under ``lax.map`` (peak activation memory of one
    chunk). x: [N, H, W, C] -> (mean, logvar) [N, H/f, W/f, L]. N need not be a multiple of ``chunk``."""
    return _chunked(lambda xc: self.apply({"params": params}, xc, method=AutoencoderKL.encode), x, chunk)

  @nn.nowrap
  def decode_chunked(self, params: Any, z: jax.Array, chunk: int) -> jax.Array:
    """``decode`` over a large batch of raw latents, ``chunk`` at a time. z: [N, h, w, L] -> [N, H, W, C]."""
    return _chunked(lambda zc: self.apply({"params": params}, zc, method=AutoencoderKL.decode), z, chunk)

  @nn.nowrap
  def encode_for_diffusion(self, params: Any, x: jax.Array, rng: jax.Array, chunk: int = 12) -> jax.Array:
    """Images [N, H, W, C] -> model latents: posterior sample, then (z - shift) * scale (SD3/ODWM training)."""
    mean, logvar = self.encode_chunked(params, x, chunk)
    return self.to_model_latents(sample(mean, logvar, rng))

  @nn.nowrap
  def decode_from_diffusion(self, params: Any, latents: jax.Array, chunk: int = 12) -> jax.Array:
    """Model latents [N, h, w, L] -> images: latents / scale + shift, then decode (SD3 pipeline)."""
    return self.decode_chunked(params, self.from_model_latents(latents), chunk)


def _check_image(x: jax.Array, cfg: VAEConfig) -> None:
  f = cfg.downsample_factor
  if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
    raise ValueError(f"encode expects images [B, H, W, {cfg.in_channels}] (channels-last), got {x.shape}")
  if x.shape[1] % f or x.shape[2] % f:
    raise ValueError(f"image size {x.shape[1:3]} is not a multiple of the VAE's downsample factor {f}")


def _chunked(fn: Callable[[jax.Array], Any], x: jax.Array, chunk: int) -> Any:
  """Applies ``fn`` to x[N, ...] with ``lax.map`` over ``steps = ceil(N / chunk)`` equal chunks of
  ``ceil(N / steps) <= chunk`` items (one chunk live at a time). Balancing the chunks pads fewer than ``steps``
  items (copies of the last one, dropped afterwards) instead of up to ``chunk - 1``: e.g. N = 25, chunk 12 runs
  3 x 9 (2 padded), not 3 x 12 (11 padded)."""
  if chunk <= 0:
    raise ValueError(f"chunk must be positive, got {chunk}")
  n = x.shape[0]
  if n <= chunk:
    return fn(x)
  steps = math.ceil(n / chunk)
  chunk = math.ceil(n / steps)
  pad = steps * chunk - n
  if pad:
    x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
  out = jax.lax.map(fn, x.reshape(steps, chunk, *x.shape[1:]))
  return jax.tree.map(lambda y: y.reshape(steps * chunk, *y.shape[2:])[:n], out)


def param_count(params: Any) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))


__all__: Sequence[str] = ("VAEConfig", "AutoencoderKL", "Encoder", "Decoder", "GroupNorm", "sample", "param_count",
                          "LOGVAR_MIN", "LOGVAR_MAX")
