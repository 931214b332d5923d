"""The Gaussian-splatting decoder of STORM-VAE (D_GS, CVD-STORM paper §3.2): a STORM-style ViT over VAE latents.

Inputs are the VAE latents of the context frames x views ([B, T, V, h, w, C], h = H/8). Each latent cell carries its
16 latent channels plus the 6-channel Plücker ray (o x d, d) of the 8x8 pixel block it covers; ``latent_patch`` x
``latent_patch`` cells form one token (``latent_patch = 1`` covers the same 8x8 pixels per token as STORM-B/8). A
learned absolute position embedding (bilinearly resized for other grids) and a DiT timestep embedding of the frame's
time (seconds / ``timespan``) are added per token. All frames and views form ONE sequence with STORM's auxiliary tokens
prepended: 1 sky token, ``num_views`` exposure (affine) tokens, ``num_motion_tokens`` motion tokens. Padded view slots
(view_mask False) are masked out as keys, so no real token ever attends to them; their outputs are discarded and their
Gaussians get opacity 0.

The head is STORM's pixel-aligned ("dummy") head: one Gaussian per IMAGE pixel. A linear layer predicts
``(8 * latent_patch)**2 x 12`` channels per token (depth 1, scale 3, quaternion 4, opacity 1, colour 3), unpatchified to
pixels. Velocities come from STORM's motion predictor: token features are upsampled to pixels with transposed convs,
an MLP makes per-pixel keys, each motion token has its own query MLP and a shared MLP turns it into a 3-D velocity basis;
a pixel's velocity is the softmax(q.k / tau) mix of the bases (m/s).

Activations (STORM, storm.py): depth = near + sigmoid(x) (far - near) is camera z-depth (centre = origin + R K^-1
[u, v, 1] depth, with the unnormalised ray), scale = min(exp(x + scale_offset), max_scale) metres, opacity =
sigmoid(x + opacity_offset), colour linear in [-1, 1] space (STORM's released setting, sigmoid_rgb=False), quaternion
normalised here (wxyz) with a +1 bias on w so training starts at the identity rotation.

Deviations from STORM, on purpose:
- Pixel centres are at j + 0.5 (gsplat's convention) for both the Plücker rays and the Gaussian rays; STORM's
  embedder puts them at j + 1 (a double +0.5).
- The exposure token gives a full 3x4 affine colour transform initialised at identity (out = (I + A) rgb + b); STORM's
  einsum collapses its 3x4 matrix to a per-channel gain (the row sum) that starts near 0.
- The reference frame is the ego frame of the first context frame (x forward, y left, z up), not STORM's front camera.

Rendering: ``render`` moves the Gaussians to each target time (means + v dt, dt in seconds; only the means move),
rasterises RGB + velocity in one pass with ``kernels.rasterize`` (expected z-depth and alpha come with it), composites
the sky (``rgb + (1 - alpha) sky(dir)``, STORM's ModulatedLinearLayer on the unnormalised target ray direction,
conditioned on the sky token) and applies the target view slot's exposure transform.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvd_storm_jax import kernels
from cvd_storm_jax.models.attention import dot_product_attention

Array = jax.Array
Gaussians = dict[str, Array]

GS_CHANNELS = 12  # depth 1, scale 3, quaternion 4, opacity 1, colour 3 (STORM's split order)


@dataclasses.dataclass(frozen=True)
class GSDecoderConfig:
  """Hyper-parameters of the GS decoder. Frozen (hashable) so it can sit on a linen module."""
  latent_channels: int = 16
  vae_downsample: int = 8  # image pixels per latent cell (SD3.5 VAE: 8)
  latent_patch: int = 1  # latent cells per token side; pixels per token side = vae_downsample * latent_patch
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  num_views: int = 6  # view slots = exposure tokens
  num_motion_tokens: int = 16
  motion_dim: int = 32  # projected motion key/query width
  tau: float = 0.5
  upscale_channels: tuple[int, ...] = (512, 256, 128)  # transposed-conv stages (x2 each) of the motion branch
  motion_key_hidden: int = 256
  motion_basis_hidden: int = 256
  sky_hidden: int = 512
  time_freq_dim: int = 256
  timespan: float = 2.0  # seconds; context times are divided by it for the time embedding (STORM)
  pos_grid: tuple[int, int] = (32, 56)  # token grid of the learned position embedding (256x448 at patch 1)
  near: float = 0.2
  far: float = 400.0
  scale_offset: float = -2.3
  max_scale: float = 0.5
  opacity_offset: float = -2.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False  # the ViT blocks and the per-pixel heads (upscaler, motion keys, sky) recompute in backward
  attention_impl: Literal["auto", "xla", "cudnn"] = "auto"
  rasterize_backend: str = "auto"
  rasterize_capacity: int | None = None  # tile-intersection buffer of the tiled backends (None: their default)

  @property
  def pixels_per_token(self) -> int:
    return self.vae_downsample * self.latent_patch


def default_gs_decoder_config(size: str = "paper", **overrides: Any) -> GSDecoderConfig:
  """``"paper"``: STORM-B/8-like (width 768, 12 layers, 12 heads, 16 motion tokens, 8x8 pixels per token).

  ``"tiny"``: a CPU-test model (width 64, 2 layers) with near/far suited to the synthetic scenes.
  """
  if size == "paper":
    cfg = GSDecoderConfig()
  elif size == "tiny":
    cfg = GSDecoderConfig(width=64, depth=2, heads=4, num_motion_tokens=4, motion_dim=16,
                          upscale_channels=(32, 32, 16), motion_key_hidden=32, motion_basis_hidden=32, sky_hidden=32,
                          time_freq_dim=32, pos_grid=(4, 7), near=0.5, far=80.0, scale_offset=-2.3, max_scale=0.5)
  else:
    raise ValueError(f"unknown GS decoder size {size!r}; expected 'paper' or 'tiny'")
  return dataclasses.replace(cfg, **overrides)


def _dense(features: int, names: tuple[str, str], cfg: GSDecoderConfig, *, zero: bool = False,
           dtype: Any = None, name: str | None = None) -> nn.Dense:
  init = nn.initializers.zeros_init() if zero else nn.initializers.truncated_normal(0.02)
  return nn.Dense(features, dtype=dtype or cfg.dtype, param_dtype=cfg.param_dtype,
                  kernel_init=nn.with_logical_partitioning(init, names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)), name=name)


def _layer_norm(cfg: GSDecoderConfig, *, affine: bool = True, name: str | None = None) -> nn.LayerNorm:
  # Statistics in fp32 whatever the compute dtype.
  return nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=cfg.param_dtype, use_bias=affine,
                      use_scale=affine, scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), name=name)


# ---------------------------------------------------------------------------------------------------------------------
# Cameras and rays.


def pixel_rays(intrinsics: Array, cam_to_ref: Array, height: int, width: int, stride: int = 1) -> tuple[Array, Array]:
  """Rays through the centres of ``stride`` x ``stride`` pixel blocks.

  Args:
    intrinsics: [..., 3, 3] pinhole K in pixels of the height x width image.
    cam_to_ref: [..., 4, 4] camera (OpenCV) -> reference frame.
    stride: block size; the grid is (height // stride, width // stride), block centres at stride * (j + 0.5).
  Returns:
    origins [..., h, w, 3] and unnormalised directions [..., h, w, 3] = R K^-1 [u, v, 1] (z-depth 1 in the camera).
  """
  h, w = height // stride, width // stride
  v, u = jnp.meshgrid((jnp.arange(h, dtype=jnp.float32) + 0.5) * stride,
                      (jnp.arange(w, dtype=jnp.float32) + 0.5) * stride, indexing="ij")
  fx, fy = intrinsics[..., 0, 0], intrinsics[..., 1, 1]
  cx, cy = intrinsics[..., 0, 2], intrinsics[..., 1, 2]
  expand = lambda a: a[..., None, None]
  x = (u - expand(cx)) / expand(fx)
  y = (v - expand(cy)) / expand(fy)
  cam_dirs = jnp.stack([x, y, jnp.ones_like(x)], axis=-1)  # [..., h, w, 3]
  rot = cam_to_ref[..., :3, :3]
  dirs = jnp.einsum("...ij,...hwj->...hwi", rot, cam_dirs)
  origins = jnp.broadcast_to(cam_to_ref[..., None, None, :3, 3], dirs.shape)
  return origins, dirs


def plucker(origins: Array, dirs: Array) -> Array:
  """Plücker coordinates (o x d_hat, d_hat): [..., 6]."""
  d = dirs / jnp.maximum(jnp.linalg.norm(dirs, axis=-1, keepdims=True), 1e-8)
  return jnp.concatenate([jnp.cross(origins, d), d], axis=-1)


def timestep_frequencies(t: Array, dim: int, max_period: float = 1e4) -> Array:
  """DiT sinusoidal features of t: [...] -> [..., dim] (cos first, as DiT's TimestepEmbedder)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t[..., None].astype(jnp.float32) * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks.


class Mlp(nn.Module):
  """Linear -> GELU -> Linear (timm Mlp); Linear -> SiLU -> Linear with silu=True (DiT's and STORM's time
  embedder)."""
  hidden: int
  out: int
  cfg: GSDecoderConfig
  dtype: Any = None
  silu: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., D_in] in any float dtype -> [..., out] in ``dtype`` (default cfg.dtype)."""
    # Cast here, inside the module and so inside its remat: the backward then keeps the caller's (bf16) input rather
    # than an fp32 copy made outside (motion_key_head: [T V, H, W, 128] per-pixel features, 1.3 GiB at the paper size).
    x = x.astype(self.dtype or self.cfg.dtype)
    x = _dense(self.hidden, ("embed", "mlp"), self.cfg, dtype=self.dtype, name="fc1")(x)
    x = nn.silu(x) if self.silu else nn.gelu(x, approximate=False)
    return _dense(self.out, ("mlp", "embed"), self.cfg, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
  """Pre-norm ViT block (LayerNorm eps 1e-6, MLP ratio 4, no qk-norm)."""
  cfg: GSDecoderConfig

  @nn.compact
  def __call__(self, x: Array, key_valid: Array | None) -> Array:
    cfg = self.cfg
    b, n, d = x.shape
    head_dim = d // cfg.heads
    y = _layer_norm(cfg, name="norm1")(x).astype(cfg.dtype)
    qkv = _dense(3 * d, ("embed", "heads"), cfg, name="qkv")(y).reshape(b, n, 3, cfg.heads, head_dim)
    attn = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_valid=key_valid,
                                 implementation=cfg.attention_impl)
    x = x + _dense(d, ("heads", "embed"), cfg, name="proj")(attn.reshape(b, n, d))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    y = _layer_norm(cfg, name="norm2")(x).astype(cfg.dtype)
    x = x + Mlp(int(d * cfg.mlp_ratio), d, cfg, name="mlp")(y)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class SkyHead(nn.Module):
  """STORM's ModulatedLinearLayer: sky colour from a ray direction, conditioned on the sky token (adaLN)."""
  cfg: GSDecoderConfig

  @nn.compact
  def __call__(self, dirs: Array, token: Array) -> Array:
    """dirs: [B, ..., 3] unnormalised ray directions; token: [B, D]. Returns [B, ..., 3] in [-1, 1] space."""
    cfg = self.cfg
    hid = cfg.sky_hidden
    x = _dense(hid, ("embed", "mlp"), cfg, dtype=jnp.float32, name="linear")(dirs)
    c = _dense(hid, ("embed", "mlp"), cfg, dtype=jnp.float32, name="condition_mapping")(token)
    shift, scale = jnp.split(_dense(2 * hid, ("mlp", "embed"), cfg, dtype=jnp.float32, name="modulation")(nn.silu(c)),
                             2, axis=-1)
    expand = lambda a: a.reshape(a.shape[:1] + (1,) * (dirs.ndim - 2) + a.shape[1:])
    x = _layer_norm(cfg, affine=False, name="norm")(x) * (1 + expand(scale)) + expand(shift)
    return _dense(3, ("mlp", "embed"), cfg, dtype=jnp.float32, name="output")(x)


class MotionUpscaler(nn.Module):
  """Token grid -> pixel grid: log2(pixels_per_token) x [ConvTranspose(k2, s2) -> LayerNorm2d -> GELU] (STORM)."""
  cfg: GSDecoderConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, gh, gw, D] -> [N, gh * p, gw * p, C_last]."""
    cfg = self.cfg
    stages = int(round(math.log2(cfg.pixels_per_token)))
    if 2 ** stages != cfg.pixels_per_token:
      raise ValueError(f"pixels_per_token {cfg.pixels_per_token} must be a power of two")
    chans = list(cfg.upscale_channels)
    chans = (chans + [chans[-1]] * stages)[:stages]  # STORM adds a repeated last stage for patch 16
    for i, c in enumerate(chans):
      x = nn.ConvTranspose(c, (2, 2), strides=(2, 2), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                           kernel_init=nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                                                    (None, None, "conv_in", "conv_out")),
                           name=f"up{i}")(x)
      x = nn.gelu(_layer_norm(cfg, name=f"norm{i}")(x), approximate=False).astype(cfg.dtype)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# The decoder.


class GSDecoder(nn.Module):
  """STORM-style GS decoder on VAE latents. Methods: ``__call__`` (latents -> Gaussians) and ``render``."""
  cfg: GSDecoderConfig

  def setup(self):
    cfg = self.cfg
    d = cfg.width
    normal = lambda names: nn.with_logical_partitioning(nn.initializers.normal(0.02), names)
    self.patch_embed = _dense(d, ("conv_in", "embed"), cfg, name="patch_embed")
    self.pos_embed = self.param("pos_embed", normal((None, None, "embed")), (*cfg.pos_grid, d), cfg.param_dtype)
    self.time_mlp = Mlp(d, d, cfg, silu=True, name="time_embed")
    self.sky_token = self.param("sky_token", normal((None, "embed")), (1, d), cfg.param_dtype)
    self.affine_tokens = self.param("affine_tokens", normal((None, "embed")), (cfg.num_views, d), cfg.param_dtype)
    self.motion_tokens = self.param("motion_tokens", normal((None, "embed")), (cfg.num_motion_tokens, d),
                                    cfg.param_dtype)
    # Remat also covers the per-pixel heads: at 256x448 their float32 activations (GELU, LayerNorm over the sky
    # head's 512 channels for every target pixel) were ~35 GiB of what the backward kept, more than the ViT's.
    rm = nn.remat if cfg.remat else (lambda cls: cls)
    block = rm(Block)
    self.blocks = [block(cfg, name=f"block{i}") for i in range(cfg.depth)]
    self.norm = _layer_norm(cfg, name="norm")
    p = cfg.pixels_per_token
    self.gs_head = _dense(p * p * GS_CHANNELS, ("embed", "mlp"), cfg, dtype=jnp.float32, name="gs_head")
    self.upscaler = rm(MotionUpscaler)(cfg, name="motion_upscaler")
    self.motion_key_head = rm(Mlp)(cfg.motion_key_hidden, cfg.motion_dim, cfg, dtype=jnp.float32,
                                   name="motion_key_head")
    # One query MLP per motion token (STORM: a ModuleList of Mlp(D, D, motion_dim)), as stacked weights.
    k = cfg.num_motion_tokens
    self.query_w1 = self.param("motion_query_w1", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, "embed", "mlp")), (k, d, d), cfg.param_dtype)
    self.query_b1 = self.param("motion_query_b1", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (None, "mlp")), (k, d), cfg.param_dtype)
    self.query_w2 = self.param("motion_query_w2", nn.with_logical_partitioning(
        nn.initializers.truncated_normal(0.02), (None, "mlp", None)), (k, d, cfg.motion_dim), cfg.param_dtype)
    self.query_b2 = self.param("motion_query_b2", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (None, None)), (k, cfg.motion_dim), cfg.param_dtype)
    self.motion_basis = Mlp(cfg.motion_basis_hidden, 3, cfg, dtype=jnp.float32, name="motion_basis_decoder")
    self.sky_head = rm(SkyHead)(cfg, name="sky_head")
    # Exposure: zero-initialised, so every view starts at the identity colour transform.
    self.affine_head = _dense(12, ("embed", None), cfg, zero=True, dtype=jnp.float32, name="affine_head")

  def _pos(self, gh: int, gw: int) -> Array:
    pos = self.pos_embed
    if (gh, gw) != tuple(pos.shape[:2]):
      pos = jax.image.resize(pos, (gh, gw, pos.shape[-1]), method="bilinear")
    return pos

  def __call__(self, latents: Array, intrinsics: Array, cam_to_ref: Array, times: Array,
               view_mask: Array) -> Gaussians:
    """Latents of the context frames -> pixel-aligned Gaussians.

    Args:
      latents: [B, T, V, h, w, C] VAE latents (already shifted/scaled to ~unit variance).
      intrinsics: [B, T, V, 3, 3] K in pixels of the H x W image (H = h * vae_downsample).
      cam_to_ref: [B, T, V, 4, 4] camera (OpenCV) -> reference frame.
      times: [B, T] seconds since the first context frame.
      view_mask: [B, V] bool, True for real cameras.
    Returns:
      dict with means, dirs [B, T, V, H, W, 3]; scales [.., 3]; quats [.., 4] (wxyz, unit); opacities, depths
      [B, T, V, H, W]; colors [.., 3] ([-1, 1] space); velocities [.., 3] (m/s); times [B, T]; sky_token [B, D];
      affine [B, V, 3, 4] (colour transform, identity at init); view_mask [B, V] (``render`` draws nothing into
      padded slots).
    """
    cfg = self.cfg
    b, t, v, h, w, c = latents.shape
    if c != cfg.latent_channels:
      raise ValueError(f"latents have {c} channels, the GS decoder expects {cfg.latent_channels}")
    if v != cfg.num_views:
      raise ValueError(f"latents have {v} view slots, the GS decoder has {cfg.num_views} exposure tokens")
    lp, ds, pp = cfg.latent_patch, cfg.vae_downsample, cfg.pixels_per_token
    if h % lp or w % lp:
      raise ValueError(f"latent grid {h}x{w} is not divisible by latent_patch {lp}")
    height, width = h * ds, w * ds
    gh, gw = h // lp, w // lp

    # Token inputs: latent cell + Plücker ray of its 8x8 pixel block, patchified lp x lp.
    cell_o, cell_d = pixel_rays(intrinsics, cam_to_ref, height, width, stride=ds)  # [B, T, V, h, w, 3]
    x = jnp.concatenate([latents.astype(jnp.float32), plucker(cell_o, cell_d)], axis=-1)
    x = x.reshape(b, t, v, gh, lp, gw, lp, c + 6).transpose(0, 1, 2, 3, 5, 4, 6, 7)
    x = x.reshape(b, t, v, gh, gw, lp * lp * (c + 6)).astype(cfg.dtype)
    x = self.patch_embed(x) + self._pos(gh, gw).astype(cfg.dtype)
    temb = self.time_mlp(timestep_frequencies(times / cfg.timespan, cfg.time_freq_dim).astype(cfg.dtype))  # [B, T, D]
    x = x + temb[:, :, None, None, None, :]
    n_img = t * v * gh * gw
    x = x.reshape(b, n_img, cfg.width)

    aux = [self.sky_token, self.affine_tokens, self.motion_tokens]
    n_aux = sum(a.shape[0] for a in aux)
    aux = jnp.broadcast_to(jnp.concatenate(aux, axis=0).astype(cfg.dtype)[None], (b, n_aux, cfg.width))
    x = jnp.concatenate([aux, x], axis=1)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    view_mask = view_mask.astype(bool)
    token_valid = jnp.broadcast_to(view_mask[:, None, :, None, None], (b, t, v, gh, gw)).reshape(b, n_img)
    token_valid = jnp.concatenate([jnp.ones((b, n_aux), bool), token_valid], axis=1)
    for blk in self.blocks:  # padded views are never attended (keys masked out)
      x = blk(x, token_valid)
    x = self.norm(x)
    sky_tok = x[:, 0]
    affine_tok = x[:, 1:1 + v]
    motion_tok = x[:, 1 + v:n_aux]
    img = x[:, n_aux:].reshape(b * t * v, gh, gw, cfg.width)

    # Pixel-aligned Gaussian parameters.
    raw = self.gs_head(img.astype(jnp.float32)).reshape(b * t * v, gh, gw, pp, pp, GS_CHANNELS)
    raw = raw.transpose(0, 1, 3, 2, 4, 5).reshape(b, t, v, height, width, GS_CHANNELS)
    depth_raw, scale_raw, quat_raw, opa_raw, colors = jnp.split(raw, [1, 4, 8, 9], axis=-1)
    depths = cfg.near + jax.nn.sigmoid(depth_raw[..., 0]) * (cfg.far - cfg.near)
    origins, dirs = pixel_rays(intrinsics, cam_to_ref, height, width)
    means = origins + dirs * depths[..., None]
    scales = jnp.minimum(jnp.exp(scale_raw + cfg.scale_offset), cfg.max_scale)
    quat = quat_raw + jnp.array([1.0, 0.0, 0.0, 0.0], jnp.float32)
    quats = quat / jnp.sqrt(jnp.sum(quat * quat, axis=-1, keepdims=True) + 1e-12)
    opacities = jax.nn.sigmoid(opa_raw[..., 0] + cfg.opacity_offset)
    # Padded view slots contribute no Gaussians.
    opacities = jnp.where(view_mask[:, None, :, None, None], opacities, 0.0)

    # Velocities: softmax mix of motion-token bases (STORM's motion predictor).
    feats = self.upscaler(img)  # [BTV, H, W, C]
    # The head computes in fp32 and casts feats itself (see Mlp).
    keys = self.motion_key_head(feats).reshape(b, t, v, height, width, cfg.motion_dim)
    mt = motion_tok.astype(jnp.float32)
    q = nn.gelu(jnp.einsum("bkd,kde->bke", mt, self.query_w1) + self.query_b1, approximate=False)
    q = jnp.einsum("bke,kec->bkc", q, self.query_w2) + self.query_b2  # [B, K, motion_dim]
    bases = self.motion_basis(mt)  # [B, K, 3]
    logits = jnp.einsum("bkc,btvhwc->btvhwk", q, keys) / cfg.tau
    weights = jax.nn.softmax(logits, axis=-1)
    velocities = jnp.einsum("btvhwk,bkc->btvhwc", weights, bases)

    affine = self.affine_head(affine_tok.astype(jnp.float32)).reshape(b, v, 3, 4)
    if self.is_initializing():  # the sky head runs only in ``render``: create its params here
      self.sky_head(jnp.zeros((b, 1, 3), jnp.float32), sky_tok.astype(jnp.float32))
    return dict(means=means, dirs=dirs, scales=scales, quats=quats, opacities=opacities, depths=depths,
                colors=colors, velocities=velocities, times=times.astype(jnp.float32),
                sky_token=sky_tok.astype(jnp.float32), affine=affine, view_mask=view_mask)

  def sky(self, dirs: Array, sky_token: Array) -> Array:
    """Sky colour [B, ..., 3] ([-1, 1] space) for unnormalised ray directions [B, ..., 3]."""
    return self.sky_head(dirs, sky_token)

  def render(self, gaussians: Gaussians, cam_to_ref: Array, intrinsics: Array, target_times: Array, height: int,
             width: int) -> dict[str, Array]:
    """Renders the Gaussians into target cameras at target times.

    Args:
      gaussians: output of ``__call__``.
      cam_to_ref: [B, Tt, V, 4, 4] target cameras -> reference frame; V = the view slots (exposure per slot).
      intrinsics: [B, Tt, V, 3, 3] in pixels of height x width.
      target_times: [B, Tt] seconds since the first context frame.
    Returns:
      rgb [B, Tt, V, H, W, 3] ([-1, 1] space, sky and exposure applied), depth [B, Tt, V, H, W] (expected camera z
      divided by max(alpha, 1e-10), gsplat's "ED"), alpha [B, Tt, V, H, W], flow [B, Tt, V, H, W, 3] (rendered
      velocity, m/s, not normalised),
      overflow [] int32 (sum of the rasterizer's overflow counters).
    """
    cfg = self.cfg
    b, tt, v = cam_to_ref.shape[:3]
    flat = flatten(gaussians)
    viewmats = jnp.linalg.inv(cam_to_ref.astype(jnp.float32))
    if gaussians.get("view_mask") is not None:
      # Padded view slots render nothing: a camera with every point behind it. The schema's identity camera of a
      # padded slot (at the ego origin, looking up, one pixel per metre) would pile the scene into a few tiles,
      # whose long lists set the loop length of every tile and fill the shared intersection capacity.
      blind = jnp.zeros((4, 4), jnp.float32).at[2, 3].set(-1.0).at[3, 3].set(1.0)
      viewmats = jnp.where(gaussians["view_mask"][:, None, :, None, None], viewmats, blind)

    def one(g: Gaussians, tgt_t: Array, vm: Array, ks: Array):
      moved = gaussians_at(g, tgt_t)
      feats = jnp.concatenate([moved["colors"], moved["velocities"]], axis=-1)
      out = kernels.rasterize(moved["means"], moved["quats"], moved["scales"], moved["opacities"], feats, vm, ks,
                              width, height, near=cfg.near, far=cfg.far, backend=cfg.rasterize_backend,
                              capacity=cfg.rasterize_capacity)
      return out.features, out.depth, out.alpha, out.overflow

    per_time = jax.vmap(one, in_axes=(None, 0, 0, 0))
    feats, depth, alpha, overflow = jax.vmap(per_time)(flat, target_times.astype(jnp.float32), viewmats,
                                                       intrinsics.astype(jnp.float32))
    rgb, flow = feats[..., :3], feats[..., 3:6]
    # gsplat's "RGB+ED" (what STORM supervises with LiDAR): expected z-depth normalised by the accumulated alpha.
    depth = depth / jnp.maximum(alpha, 1e-10)
    _, dirs = pixel_rays(intrinsics.astype(jnp.float32), cam_to_ref.astype(jnp.float32), height, width)
    sky = self.sky_head(dirs, gaussians["sky_token"])
    rgb = rgb + (1.0 - alpha[..., None]) * sky
    rgb = apply_exposure(rgb, gaussians["affine"])
    return dict(rgb=rgb, depth=depth, alpha=alpha, flow=flow, overflow=jnp.sum(overflow).astype(jnp.int32))


def apply_exposure(rgb: Array, affine: Array) -> Array:
  """Per-view affine colour transform. rgb: [B, Tt, V, H, W, 3]; affine: [B, V, 3, 4] (identity at zero)."""
  mat = affine[..., :3] + jnp.eye(3, dtype=affine.dtype)
  return jnp.einsum("bvij,btvhwj->btvhwi", mat, rgb) + affine[:, None, :, None, None, :, 3]


_PER_GAUSSIAN = ("means", "scales", "quats", "opacities", "colors", "velocities", "depths")


def flatten(gaussians: Gaussians) -> Gaussians:
  """Pixel-aligned Gaussians [B, T, V, H, W, ...] -> per-scene lists [B, N, ...] (N = T V H W).

  Adds ``gauss_times`` [B, N] (each Gaussian's context time, seconds).
  """
  b, t = gaussians["times"].shape
  # Per-pixel arrays are [B, T, V, H, W] or [B, T, V, H, W, C]: keep the channel axis, fold the rest.
  out = {k: gaussians[k].reshape((b, -1) + gaussians[k].shape[5:]) for k in _PER_GAUSSIAN if k in gaussians}
  n = out["means"].shape[1]
  out["gauss_times"] = jnp.repeat(gaussians["times"], n // t, axis=1)
  return out


def gaussians_at(flat: Gaussians, t: Array) -> Gaussians:
  """Moves flat Gaussians (one scene: [N, ...], or batched [B, N, ...] with t [B]) to time t (seconds).

  Only the means move, by velocity x (t - t_context) (STORM); scale, rotation, opacity and colour are shared.
  """
  t = jnp.asarray(t, jnp.float32)
  dt = t[..., None] - flat["gauss_times"]  # [..., N]
  moved = dict(flat)
  moved["means"] = flat["means"] + flat["velocities"] * dt[..., None]
  return moved
