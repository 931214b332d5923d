"""Embeddings of the SD3 / SD3.5 MM-DiT and of the CVD-STORM additions.

Semantics follow diffusers (the reference the SD3.5 weights were trained with), re-derived here:

- ``timestep_embedding``: diffusers ``get_timestep_embedding`` / ``Timesteps`` (``flip_sin_to_cos``,
  ``downscale_freq_shift``), computed in float32 for any leading shape.
- ``TimestepEmbedding``: Dense -> SiLU -> Dense (``linear_1`` / ``linear_2``).
- ``sincos_pos_embed_2d`` + ``crop_pos_embed``: SD3's fixed 2-D sin-cos table of ``pos_embed_max_size``^2 positions,
  centre-cropped to the token grid (diffusers ``PatchEmbed.cropped_pos_embed``); its grid is diffusers' formula or an
  explicit ``arange * pos_embed_scale - pos_embed_offset`` (``pos_embed_coords``).
- ``PatchEmbed``: the 2x2 patchifying conv written as a Dense on flattened patches (kernel rows ordered (dy, dx, c),
  i.e. a conv's HWIO kernel reshaped) plus the cropped position table.
- ``TimeTextEmbed``: diffusers ``CombinedTimestepTextProjEmbeddings`` (256-d sinusoid of the timestep through a
  ``TimestepEmbedding``, plus the pooled text through Dense -> SiLU -> Dense).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def as_dtype(d: Any) -> jnp.dtype:
  """Accepts "bfloat16" / jnp.bfloat16 / np.dtype (ConfigDicts carry strings)."""
  return jnp.dtype(d)


# torch's nn.Linear / nn.Conv default (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)). The blocks CVD-STORM adds to a
# pretrained SD3.5 start from this init in the reference code, and their initial perturbation of the pretrained
# features (mixed in at 1 - sigmoid(2) ~ 12%) depends on its scale.
TORCH_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense(features: int, axes: tuple[str | None, str | None], *, name: str | None = None, dtype: Dtype,
          param_dtype: Dtype, use_bias: bool = True, kernel_init: Callable = TORCH_INIT,
          bias_init: Callable = nn.initializers.zeros_init()) -> nn.Dense:
  """nn.Dense whose kernel carries logical axis names ``axes`` (in, out) and whose bias carries ``(axes[1],)``."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                  bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)))


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       scale: float = 1.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps.

  Args:
    t: [...] timesteps (any leading shape).
    dim: embedding width.
  Returns:
    [..., dim] float32: (sin, cos) halves, swapped to (cos, sin) when ``flip_sin_to_cos``; zero-padded if dim is odd.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  args = scale * (t.astype(jnp.float32)[..., None] * jnp.exp(exponent))
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


class TimestepEmbedding(nn.Module):
  """Dense(hidden) -> SiLU -> Dense(out): diffusers ``TimestepEmbedding`` (``linear_1``, ``linear_2``).

  x: [..., in] -> [..., out_features or hidden].
  """
  hidden: int
  out_features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.hidden, ("embed", "mlp"), name="linear_1", **kw)(x.astype(self.dtype))  # FSDP over the input
    x = nn.silu(x)
    return dense(self.out_features or self.hidden, ("mlp", "embed"), name="linear_2", **kw)(x)


def sincos_frequencies(dim: int) -> np.ndarray:
  """The dim // 2 frequencies 1 / 10000^(2i / dim) of a dim-wide 1-D sin-cos embedding, falling from 1 (float64)."""
  return 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[M] positions -> [M, dim] (sin half, cos half), frequencies ``sincos_frequencies(dim)``; float64 like diffusers."""
  out = np.outer(pos.reshape(-1).astype(np.float64), sincos_frequencies(dim))
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_embed_coords(grid_size: int, base_size: int, interpolation_scale: float = 1.0,
                     scale: float | None = None, offset: float = 0.0) -> np.ndarray:
  """The 1-D coordinates of SD3's position table (the same along rows and columns), [grid_size].

  scale None: diffusers' ``arange(grid_size) / (grid_size / base_size) / interpolation_scale`` in float32, as
  diffusers computes the table of a freshly built model. scale set: ``arange(grid_size) * scale - offset`` in float64,
  the explicit grid of a checkpoint whose stored table was computed otherwise; Stability's MMDiTX
  (``grid / pos_embed_scaling_factor - pos_embed_offset``) is ``scale = 1 / scaling_factor`` (1.0 when None) and
  ``offset = pos_embed_offset`` (0.0 when None). Diffusers' own grid is ``scale = base_size / (grid_size *
  interpolation_scale)``, offset 0.
  """
  if scale is None:
    if offset:
      raise ValueError(f"pos_embed_offset={offset} needs an explicit pos_embed_scale (None = diffusers' grid, which "
                       "has no offset)")
    return np.arange(grid_size, dtype=np.float32) / (grid_size / base_size) / interpolation_scale
  return np.arange(grid_size, dtype=np.float64) * float(scale) - float(offset)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0, *,
                        scale: float | None = None, offset: float = 0.0) -> np.ndarray:
  """SD3's square 2-D sin-cos table.

  Positions are ``pos_embed_coords(grid_size, base_size, interpolation_scale, scale, offset)``; the first half of the
  channels encodes the column (x) coordinate, the second half the row (y) coordinate (diffusers' meshgrid order);
  each half is (sin of every frequency, then cos of every frequency), frequencies falling from 1.
  Returns [grid_size * grid_size, embed_dim] float32, row-major over (row, col).
  """
  if embed_dim % 4:
    raise ValueError(f"2-D sin-cos position embedding needs embed_dim % 4 == 0, got {embed_dim}")
  coords = pos_embed_coords(grid_size, base_size, interpolation_scale, scale, offset)
  cols, rows = np.meshgrid(coords, coords, indexing="xy")  # both [rows, cols]
  emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
  return emb.astype(np.float32)


def crop_pos_embed(table: np.ndarray, max_size: int, h: int, w: int) -> np.ndarray:
  """Centre crop of a [max_size^2, D] table to an h x w token grid -> [h * w, D]."""
  if h > max_size or w > max_size:
    raise ValueError(f"token grid {h}x{w} is larger than pos_embed_max_size={max_size}")
  top, left = (max_size - h) // 2, (max_size - w) // 2
  grid = table.reshape(max_size, max_size, -1)[top:top + h, left:left + w]
  return grid.reshape(h * w, -1)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[N, H, W, C] -> [N, H/p, W/p, p*p*C], patch features ordered (dy, dx, c)."""
  n, hh, ww, c = x.shape
  if hh % p or ww % p:
    raise ValueError(f"latent size {hh}x{ww} is not divisible by patch_size={p}")
  x = x.reshape(n, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, hh // p, ww // p, p * p * c)


def unpatchify(x: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """[N, h*w, p*p*C] (features ordered (dy, dx, c)) -> [N, h*p, w*p, C]."""
  n, _, f = x.shape
  c = f // (p * p)
  x = x.reshape(n, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * p, w * p, c)


class PatchEmbed(nn.Module):
  """Patchify + linear projection + cropped 2-D sin-cos positions.

  latents: [N, H, W, C] -> tokens [N, (H/p)*(W/p), embed_dim].
  """
  embed_dim: int
  patch_size: int = 2
  pos_embed_max_size: int = 96
  sample_size: int = 128  # diffusers' base_size = sample_size // patch_size shapes the table's frequencies.
  interpolation_scale: float = 1.0
  # Explicit position grid (``pos_embed_coords``): None = diffusers' formula above; set it when a checkpoint's stored
  # table is on another grid (the SD3 importer reads the grid off the table and names the values to set).
  pos_embed_scale: float | None = None
  pos_embed_offset: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def table(self) -> np.ndarray:
    return sincos_pos_embed_2d(self.embed_dim, self.pos_embed_max_size, self.sample_size // self.patch_size,
                               self.interpolation_scale, scale=self.pos_embed_scale, offset=self.pos_embed_offset)

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    p = self.patch_size
    patches = patchify(latents.astype(self.dtype), p)
    n, h, w, _ = patches.shape
    x = dense(self.embed_dim, ("conv_in", "embed"), name="proj", dtype=self.dtype,
              param_dtype=self.param_dtype)(patches)
    pos = crop_pos_embed(self.table(), self.pos_embed_max_size, h, w)
    # diffusers adds the float32 table, then casts to the activation dtype.
    x = (x.reshape(n, h * w, self.embed_dim).astype(jnp.float32) + jnp.asarray(pos)[None]).astype(self.dtype)
    return x


class TimeTextEmbed(nn.Module):
  """temb = TimestepEmbedding(sinusoid_256(t)) + MLP(pooled_text).

  timesteps: [N] float; pooled: [N, pooled_dim] -> [N, embed_dim].
  """
  embed_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timesteps: jax.Array, pooled: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t = timestep_embedding(timesteps, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0)
    t_emb = TimestepEmbedding(self.embed_dim, name="timestep_embedder", **kw)(t)
    # diffusers' PixArtAlphaTextProjection with act_fn="silu" has exactly TimestepEmbedding's structure.
    y = TimestepEmbedding(self.embed_dim, name="text_embedder", **kw)(pooled)
    return t_emb + y


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
  """[N, H, W, C] -> [N, H/r, W/r, C*r*r], channel index c*r*r + dy*r + dx (torch.nn.PixelUnshuffle's order)."""
  n, hh, ww, c = x.shape
  if hh % r or ww % r:
    raise ValueError(f"image size {hh}x{ww} is not divisible by the unshuffle factor {r}")
  x = x.reshape(n, hh // r, r, ww // r, r, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(n, hh // r, ww // r, c * r * r)


__all__ = (
    "TORCH_INIT", "as_dtype", "dense", "timestep_embedding", "TimestepEmbedding", "sincos_frequencies",
    "sincos_1d", "pos_embed_coords", "sincos_pos_embed_2d", "crop_pos_embed", "patchify", "unpatchify", "PatchEmbed",
    "TimeTextEmbed", "pixel_unshuffle",
)
