"""CVD-STORM's multi-view video diffusion transformer: the SD3.5 MM-DiT plus temporal and cross-view blocks.

Layout of one forward pass (UniMLVG / OpenDWM ``DiTCrossviewTemporalConditionModel``, the architecture the paper
says CVD-STORM shares; see shared/reference/cvd_storm_official.md §1):

  latents [B, T, V, h, w, C] -> B*T*V images -> pos_embed, context_embedder, time_text_embed (per (b, t, v):
  reference frames carry timestep 0 and so get their own adaLN modulation; text is per (t, v)).
  for each MM-DiT layer i:
    x += layout_residual[i]                  (i < num_adapter_blocks; zero-initialised projections)
    context, x = JointBlock_i(x, context, temb)              (per image)
    if i in temporal_layers:  x = AlphaBlend(x, VTBlock(x + frame_index_emb + camera_emb))   over T
    if i in crossview_layers: x = AlphaBlend(x, VTBlock(x + view_index_emb + camera_emb))    over views
  norm_out, proj_out, unpatchify -> velocity [B, T, V, h, w, C].

Temporal "pointwise": each token position attends over the T frames of its view (sequences of length T, per
(b, v, token)); "full": all T*S tokens of a view. Cross-view "rowwise": each token row attends to the same row of
all V views (V*w' tokens per (b, t, row)), masked by the V x V adjacency; "full": all V*S tokens of a frame, masked
likewise. AlphaBlender: out = a * x + (1 - a) * block_out with a = sigmoid(mix_factor) (init 2.0), forced to 1 for the
samples where ``disable_temporal`` / ``disable_crossview`` is set.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.core import meta
from jax.ad_checkpoint import checkpoint_name
from ml_collections import config_dict

from cvd_storm_jax.models.embeddings import (TORCH_INIT, TimestepEmbedding, as_dtype, dense, pixel_unshuffle,
                                             timestep_embedding)
from cvd_storm_jax.models.mmdit import (Attention, FeedForward, LayerNorm, build_mmdit, constrain, flops_per_image,
                                        mmdit_inputs, mmdit_outputs, remat)

Dtype = Any


class VTBlock(nn.Module):
  """Temporal / cross-view block (no adaLN): x += FF(LN(x)); x += Attn(LN(x)); x += FF(LN(x)); GEGLU FFs.

  x: [N, L, D]; mask: bool broadcastable to [N, heads, L, L] or None -> [N, L, D].
  """
  heads: int
  head_dim: int
  qk_norm: str | None = "rms_norm"
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))
    x = x + FeedForward(activation="geglu", name="ff_in", **kw)(LayerNorm(name="norm_in", **kw)(x))
    # diffusers Attention defaults: bias-free q/k/v, biased output, qk-norm eps 1e-5.
    a, _ = Attention(self.heads, self.head_dim, qkv_bias=False, qk_norm=self.qk_norm, qk_norm_eps=1e-5,
                     attention_impl=self.attention_impl, name="attn1", **kw)(LayerNorm(name="norm1", **kw)(x),
                                                                              mask=mask)
    x = x + a
    x = x + FeedForward(activation="geglu", name="ff", **kw)(LayerNorm(name="norm3", **kw)(x))
    return constrain(x, ("batch", "length", "embed"))


class AlphaBlender(nn.Module):
  """a * spatial + (1 - a) * mixed, a = sigmoid(mix_factor) or 1 where ``disable`` (per sample).

  spatial, mixed: [B, ...]; disable: [B] bool.
  """
  merge_factor: float = 2.0

  @nn.compact
  def __call__(self, spatial: jax.Array, mixed: jax.Array, disable: jax.Array) -> jax.Array:
    mix = self.param("mix_factor", nn.with_logical_partitioning(nn.initializers.constant(self.merge_factor),
                                                                (None,)), (1,), jnp.float32)
    alpha = jnp.where(disable, 1.0, jax.nn.sigmoid(mix[0])).astype(jnp.float32)
    alpha = alpha.reshape(alpha.shape + (1,) * (spatial.ndim - 1))
    out = alpha * spatial.astype(jnp.float32) + (1.0 - alpha) * mixed.astype(jnp.float32)
    return out.astype(spatial.dtype)


class IndexMixLayer(nn.Module):
  """Index embedding + VTBlock + AlphaBlender over one axis (temporal: frames; cross-view: views).

  x: [B, T, V, S, D] tokens of the grid (h', w') = ``grid``; cond: [B, T, V, D] added embedding (camera) or None;
  disable: [B] bool; adjacency: [B, V, V] bool (cross-view only). Returns [B, T, V, S, D].
  """
  axis: str  # "temporal" or "crossview"
  attention_type: str
  heads: int
  head_dim: int
  qk_norm: str | None = "rms_norm"
  merge_factor: float = 2.0
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array | None, disable: jax.Array,
               adjacency: jax.Array | None = None, grid: tuple[int, int] | None = None) -> jax.Array:
    b, t, v, s, d = x.shape
    if self.axis == "crossview" and self.attention_type == "rowwise" and grid is None:
      raise ValueError("row-wise cross-view attention needs the token grid (h', w')")
    hh, ww = grid if grid is not None else (1, s)
    if hh * ww != s:
      raise ValueError(f"token grid {grid} does not hold {s} tokens")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    count = t if self.axis == "temporal" else v
    # Sinusoid of the integer frame / view index (width D, flip_sin_to_cos, shift 0) through a per-block MLP.
    idx = TimestepEmbedding(4 * d, d, name="index_embed", **kw)(
        timestep_embedding(jnp.arange(count, dtype=jnp.float32), d))  # [count, D]
    emb = idx[None, :, None] if self.axis == "temporal" else idx[None, None, :]  # [1, T|1, 1|V, D]
    if cond is not None:
      emb = emb + cond
    h = x + emb[:, :, :, None, :].astype(x.dtype)

    block = VTBlock(self.heads, self.head_dim, self.qk_norm, self.attention_impl, name="block", **kw)
    if self.axis == "temporal":
      if self.attention_type == "pointwise":
        seq = h.transpose(0, 2, 3, 1, 4).reshape(b * v * s, t, d)
        out = block(seq).reshape(b, v, s, t, d).transpose(0, 3, 1, 2, 4)
      elif self.attention_type == "full":
        seq = h.transpose(0, 2, 1, 3, 4).reshape(b * v, t * s, d)
        out = block(seq).reshape(b, v, t, s, d).transpose(0, 2, 1, 3, 4)
      else:
        raise ValueError(f"temporal_attention_type must be 'pointwise' or 'full', got {self.attention_type!r}")
    else:
      if adjacency is None:
        raise ValueError("cross-view blocks need view_adjacency [B, V, V]")
      if self.attention_type == "rowwise":
        # (b, t, row) sequences of the V*w' tokens of that row in every view; view j's tokens are visible to view
        # i's iff adjacency[b, i, j].
        seq = h.reshape(b, t, v, hh, ww, d).transpose(0, 1, 3, 2, 4, 5).reshape(b * t * hh, v * ww, d)
        m = jnp.repeat(jnp.repeat(adjacency, ww, axis=1), ww, axis=2)  # [B, V*w', V*w']
        m = jnp.broadcast_to(m[:, None], (b, t * hh, v * ww, v * ww)).reshape(b * t * hh, 1, v * ww, v * ww)
        out = block(seq, m).reshape(b, t, hh, v, ww, d).transpose(0, 1, 3, 2, 4, 5).reshape(b, t, v, s, d)
      elif self.attention_type == "full":
        seq = h.reshape(b * t, v * s, d)
        m = jnp.repeat(jnp.repeat(adjacency, s, axis=1), s, axis=2)
        m = jnp.broadcast_to(m[:, None], (b, t, v * s, v * s)).reshape(b * t, 1, v * s, v * s)
        out = block(seq, m).reshape(b, t, v, s, d)
      else:
        raise ValueError(f"crossview_attention_type must be 'rowwise' or 'full', got {self.attention_type!r}")
    return AlphaBlender(self.merge_factor, name="mixer")(x, out, disable)


class AdapterBlock(nn.Module):
  """diffusers AdapterBlock: [avg-pool 2x2] -> [1x1 conv to width] -> res blocks (3x3 conv, ReLU, 1x1 conv, +x).

  x: [N, H, W, Cin] -> [N, H', W', width].
  """
  width: int
  num_res_blocks: int
  down: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.down:
      n, hh, ww, c = x.shape
      if hh % 2 or ww % 2:
        raise ValueError(f"layout adapter: latent grid {hh}x{ww} must be even to pool to the token grid")
      x = x.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
    if x.shape[-1] != self.width:
      x = dense(self.width, ("conv_in", "conv_out"), name="in_conv", **kw)(x)
    for r in range(self.num_res_blocks):
      h = nn.Conv(self.width, (3, 3), padding=1, name=f"resnets_{r}_block1", **kw,
                  kernel_init=nn.with_logical_partitioning(TORCH_INIT,
                                                           (None, None, "conv_in", "conv_out")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))(x)
      h = checkpoint_name(h, "adapter_conv")
      h = dense(self.width, ("conv_in", "conv_out"), name=f"resnets_{r}_block2", **kw)(nn.relu(h))
      x = x + h
    return x


class LayoutAdapter(nn.Module):
  """Box + map line images -> one residual per early MM-DiT layer (OpenDWM ImageAdapter with zero 1x1 convs).

  images: [N, 8h, 8w, in_channels] in [0, 1] -> list of num_blocks arrays [N, (h/2)*(w/2), width].
  """
  width: int
  num_blocks: int
  num_res_blocks: int = 2
  downscale: int = 8
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = pixel_unshuffle(images.astype(self.dtype), self.downscale)
    outs = []
    block = remat(AdapterBlock, self.remat_policy)
    for i in range(self.num_blocks):
      x = block(self.width, self.num_res_blocks, down=i == 0, name=f"body_{i}", **kw)(x)
      # Zero-initialised projection: the adapter starts as a no-op on the pretrained MM-DiT.
      r = dense(self.width, ("conv_in", "embed"), name=f"zero_convs_{i}", kernel_init=nn.initializers.zeros_init(),
                **kw)(x)
      outs.append(r.reshape(r.shape[0], -1, self.width))
    return outs


class CVDDiT(nn.Module):
  """The CVD-STORM diffusion transformer. Attributes are the ``config.model`` keys (``CVDDiT(**config.model)``).

  Params keep SD3's module names for the MM-DiT part (pos_embed, time_text_embed, context_embedder,
  transformer_blocks_{i}, norm_out, proj_out); the additions are camera_embed, temporal_blocks_{j},
  crossview_blocks_{j} and layout_adapter.
  """
  # SD3 / SD3.5 MM-DiT.
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  out_channels: int | None = 16
  num_layers: int = 24
  attention_head_dim: int = 64
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1536
  pooled_projection_dim: int = 2048
  pos_embed_max_size: int = 384
  # Position grid: None = diffusers' formula; else arange * scale - offset (embeddings.pos_embed_coords).
  pos_embed_scale: float | None = None
  pos_embed_offset: float = 0.0
  dual_attention_layers: Sequence[int] = tuple(range(13))
  qk_norm: str | None = "rms_norm"
  # Temporal / cross-view blocks.
  temporal_layers: Sequence[int] = (2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23)
  temporal_attention_type: str = "pointwise"
  crossview_layers: Sequence[int] = (1, 5, 9, 13, 17, 21)
  crossview_attention_type: str = "rowwise"
  qk_norm_additional: str | None = "rms_norm"
  merge_factor: float = 2.0
  camera_dim: int = 11
  camera_on_temporal: bool = True
  # Layout adapter (0 blocks = no adapter).
  num_adapter_blocks: int = 6
  adapter_res_blocks: int = 2
  layout_channels: int = 6
  layout_downscale: int = 8
  # Execution.
  remat_policy: str = "none"
  attention_impl: str = "auto"
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  @property
  def width(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  def setup(self):
    for name, layers in (("temporal_layers", self.temporal_layers), ("crossview_layers", self.crossview_layers),
                         ("dual_attention_layers", self.dual_attention_layers)):
      bad = [i for i in layers if not 0 <= i < self.num_layers]
      if bad:
        raise ValueError(f"{name} {tuple(layers)} has indices outside [0, num_layers={self.num_layers})")
    if self.num_adapter_blocks > self.num_layers:
      raise ValueError(f"num_adapter_blocks={self.num_adapter_blocks} > num_layers={self.num_layers}")
    build_mmdit(self)
    kw = dict(dtype=as_dtype(self.dtype), param_dtype=as_dtype(self.param_dtype))
    d = self.width
    self.camera_embed = TimestepEmbedding(d, d, **kw) if self.camera_dim else None
    if self.num_adapter_blocks:
      self.layout_adapter = LayoutAdapter(d, self.num_adapter_blocks, self.adapter_res_blocks,
                                          self.layout_downscale, self.remat_policy, **kw)
    mix_kw = dict(heads=self.num_attention_heads, head_dim=self.attention_head_dim, qk_norm=self.qk_norm_additional,
                  merge_factor=self.merge_factor, attention_impl=self.attention_impl, **kw)
    # The whole layer under remat, not only its VTBlock: the transposed sequences and the blender's float32 inputs
    # would otherwise stay alive for the backward pass (10 GiB at the paper size). `grid` (argument 5) is static.
    mix_layer = remat(IndexMixLayer, self.remat_policy, static_argnums=(5,))
    self.temporal_blocks = [mix_layer("temporal", self.temporal_attention_type, **mix_kw)
                            for _ in self.temporal_layers]
    self.crossview_blocks = [mix_layer("crossview", self.crossview_attention_type, **mix_kw)
                             for _ in self.crossview_layers]

  def layout_residuals(self, layout_images: jax.Array) -> tuple[jax.Array, ...]:
    """The layout adapter alone: [B, T, V, 8h, 8w, layout_channels] in [0, 1] -> num_adapter_blocks residuals
    [B*T*V, (h/2)*(w/2), width] for the first MM-DiT layers. A sampler computes them once per window and passes them
    to every step (``__call__(..., layout_residuals=...)``): they do not depend on the noisy latents, and the adapter
    is ~11 % of a paper-size denoising step."""
    if not self.num_adapter_blocks:
      raise ValueError("the config has no layout adapter (num_adapter_blocks == 0)")
    if layout_images.ndim != 6 or layout_images.shape[-1] != self.layout_channels:
      raise ValueError(f"CVDDiT input 'layout_images' has shape {tuple(layout_images.shape)}, expected "
                       f"[B, T, V, 8h, 8w, {self.layout_channels}]")
    return tuple(self.layout_adapter(layout_images.reshape(-1, *layout_images.shape[3:])))

  def __call__(self, latents: jax.Array, timesteps: jax.Array, text_tokens: jax.Array, pooled_text: jax.Array,
               layout_images: jax.Array | None, camera_params: jax.Array, view_adjacency: jax.Array,
               disable_temporal: jax.Array, disable_crossview: jax.Array, *,
               layout_residuals: tuple[jax.Array, ...] | None = None) -> jax.Array:
    """Velocity prediction.

    Args:
      latents: [B, T, V, h, w, C] channels-last model latents.
      timesteps: [B, T, V] float in [0, 1000] (reference frames: 0).
      text_tokens: [B, T, V, L, joint_attention_dim]; pooled_text: [B, T, V, pooled_projection_dim].
      layout_images: [B, T, V, 8h, 8w, layout_channels] in [0, 1], or None when num_adapter_blocks == 0 or when
        ``layout_residuals`` are given.
      camera_params: [B, T, V, camera_dim] (fps, fx/H, fy/H, cx/W, cy/H, camera z-axis in ego (3), translation (3)).
      view_adjacency: [B, V, V] bool, True = view i attends to view j.
      disable_temporal, disable_crossview: [B] bool; True bypasses those blocks for the sample.
      layout_residuals: ``self.layout_residuals(layout_images)`` computed beforehand, instead of layout_images.
    Returns:
      [B, T, V, h, w, out_channels] float32.
    """
    b, t, v, hh, ww, c = latents.shape
    n, p, d = b * t * v, self.patch_size, self.width
    _expect("timesteps", timesteps, (b, t, v))
    _expect("text_tokens", text_tokens, (b, t, v, None, self.joint_attention_dim))
    _expect("pooled_text", pooled_text, (b, t, v, self.pooled_projection_dim))
    _expect("camera_params", camera_params, (b, t, v, self.camera_dim))
    _expect("view_adjacency", view_adjacency, (b, v, v))
    _expect("disable_temporal", disable_temporal, (b,))
    _expect("disable_crossview", disable_crossview, (b,))
    if c != self.in_channels:
      raise ValueError(f"latents have {c} channels, the model expects in_channels={self.in_channels}")
    grid = (hh // p, ww // p)
    s = grid[0] * grid[1]

    x, context, temb = mmdit_inputs(self, latents.reshape(n, hh, ww, c), timesteps.reshape(n),
                                    text_tokens.reshape(n, text_tokens.shape[3], -1), pooled_text.reshape(n, -1))
    cam = None
    if self.camera_embed is not None:
      cam_sin = timestep_embedding(camera_params, 256)  # [B, T, V, camera_dim, 256]
      cam = self.camera_embed(cam_sin.reshape(b, t, v, self.camera_dim * 256))  # [B, T, V, D]

    residuals: tuple[jax.Array, ...] = ()
    if layout_residuals is not None:
      if layout_images is not None:
        raise ValueError("give layout_images or layout_residuals, not both")
      if len(layout_residuals) != self.num_adapter_blocks:
        raise ValueError(f"{len(layout_residuals)} layout_residuals; the config has num_adapter_blocks="
                         f"{self.num_adapter_blocks}")
      for i, r in enumerate(layout_residuals):
        _expect(f"layout_residuals[{i}]", r, (n, s, d))
      residuals = tuple(layout_residuals)
    elif self.num_adapter_blocks:
      if layout_images is None:
        raise ValueError("the config has a layout adapter (num_adapter_blocks > 0) but layout_images is None; pass "
                         "the unconditional fill colour for unconditioned samples")
      _expect("layout_images", layout_images,
              (b, t, v, hh * self.layout_downscale, ww * self.layout_downscale, self.layout_channels))
      residuals = self.layout_residuals(layout_images)
    elif layout_images is not None:
      raise ValueError("layout_images given but the config has no layout adapter (num_adapter_blocks == 0)")

    adjacency = view_adjacency.astype(bool)
    temporal = {i: j for j, i in enumerate(self.temporal_layers)}
    crossview = {i: j for j, i in enumerate(self.crossview_layers)}
    for i, block in enumerate(self.transformer_blocks):
      if i < len(residuals):
        x = x + residuals[i].astype(x.dtype)
      context, x = block(x, context, temb)
      if i in temporal:
        x = self.temporal_blocks[temporal[i]](x.reshape(b, t, v, s, d), cam if self.camera_on_temporal else None,
                                              disable_temporal, None, grid).reshape(n, s, d)
      if i in crossview:
        x = self.crossview_blocks[crossview[i]](x.reshape(b, t, v, s, d), cam, disable_crossview, adjacency,
                                                grid).reshape(n, s, d)

    out = mmdit_outputs(self, x, temb, hh, ww)
    return out.reshape(b, t, v, hh, ww, out.shape[-1])


def _expect(name: str, x: jax.Array, shape: tuple[int | None, ...]) -> None:
  if x.ndim != len(shape) or any(w is not None and a != w for a, w in zip(x.shape, shape)):
    want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
    raise ValueError(f"CVDDiT input {name!r} has shape {tuple(x.shape)}, expected {want}")


# ----------------------------------------------------------------------------------------------------------------------
# Configs, shapes, FLOPs.
# ----------------------------------------------------------------------------------------------------------------------
def default_model_config(size: str) -> ml_collections.ConfigDict:
  """``config.model`` for "sd35_medium" (the paper's scale, SD3.5-medium backbone) or "tiny" (CPU tests)."""
  if size == "sd35_medium":
    cfg = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
               num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
               pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
               qk_norm="rms_norm", temporal_layers=(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23),
               temporal_attention_type="pointwise", crossview_layers=(1, 5, 9, 13, 17, 21),
               crossview_attention_type="rowwise", qk_norm_additional="rms_norm", merge_factor=2.0, camera_dim=11,
               camera_on_temporal=True, num_adapter_blocks=6, adapter_res_blocks=2, layout_channels=6,
               layout_downscale=8, remat_policy="auto", attention_impl="auto",
               dtype="bfloat16", param_dtype="float32")
  elif size == "tiny":
    cfg = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=32,
               num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32,
               pos_embed_max_size=16, dual_attention_layers=(0, 1), qk_norm="rms_norm", temporal_layers=(1, 2),
               temporal_attention_type="pointwise", crossview_layers=(0, 2), crossview_attention_type="rowwise",
               qk_norm_additional="rms_norm", merge_factor=2.0, camera_dim=11, camera_on_temporal=True,
               num_adapter_blocks=2, adapter_res_blocks=1, layout_channels=6, layout_downscale=8,
               remat_policy="none", attention_impl="auto", dtype="float32", param_dtype="float32")
  else:
    raise ValueError(f"unknown model size {size!r}; choose 'sd35_medium' or 'tiny'")
  # The position grid (embeddings.pos_embed_coords): None = diffusers' formula. A typed placeholder, so that
  # --config.model.pos_embed_scale=1.0 can override it on the command line (a plain None field cannot be).
  cfg.update(pos_embed_scale=config_dict.placeholder(float), pos_embed_offset=0.0)
  return ml_collections.ConfigDict(cfg)


def dummy_inputs(model_cfg: Any, b: int = 1, t: int = 1, v: int = 1, h: int | None = None, w: int | None = None,
                 text_len: int = 2) -> tuple:
  """Zero inputs of the right shapes (init / eval_shape / tracing)."""
  cfg = dict(model_cfg)
  p = cfg.get("patch_size", 2)
  h = h or 2 * p
  w = w or 2 * p
  f = cfg.get("layout_downscale", 8)
  layout = (jnp.zeros((b, t, v, h * f, w * f, cfg.get("layout_channels", 6)), jnp.float32)
            if cfg.get("num_adapter_blocks", 6) else None)
  return (jnp.zeros((b, t, v, h, w, cfg.get("in_channels", 16)), jnp.float32), jnp.zeros((b, t, v), jnp.float32),
          jnp.zeros((b, t, v, text_len, cfg.get("joint_attention_dim", 4096)), jnp.float32),
          jnp.zeros((b, t, v, cfg.get("pooled_projection_dim", 2048)), jnp.float32), layout,
          jnp.zeros((b, t, v, cfg.get("camera_dim", 11)), jnp.float32), jnp.ones((b, v, v), bool),
          jnp.zeros((b,), bool), jnp.zeros((b,), bool))


def param_shapes_for(model_cfg: Any) -> dict:
  """Unboxed params ShapeDtypeStruct tree of CVDDiT(**model_cfg), without allocating."""
  model = CVDDiT(**dict(model_cfg))
  return meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model_cfg)))["params"]


def flops_per_clip(model_cfg: Any, T: int, V: int, h: int, w: int, text_len: int) -> int:
  """Analytic forward FLOPs of one clip (2*m*n*k per matmul/conv, attention QK^T and AV included).

  h, w: latent size; text_len: text tokens per image. Elementwise work (norms, softmax, activations) is not counted.
  """
  c = dict(model_cfg)
  p, d = c["patch_size"], c["num_attention_heads"] * c["attention_head_dim"]
  n = T * V                                    # images
  hs, ws = h // p, w // p
  s = hs * ws                                  # image tokens per image
  f = n * flops_per_image(c, h, w, text_len)   # the MM-DiT, per image

  cam = c.get("camera_dim", 11)
  if cam:
    f += n * (2 * cam * 256 * d + 2 * d * d)

  def vt_block(tokens: int, groups: int, seq: int, index_count: int) -> int:
    g = index_count * (2 * d * 4 * d + 2 * 4 * d * d)      # index MLP
    g += tokens * 2 * (2 * d * 8 * d + 2 * 4 * d * d)      # two GEGLU FFNs (proj to 2x4d, out from 4d)
    g += tokens * 4 * 2 * d * d                            # q, k, v, out
    g += groups * 2 * 2 * seq * seq * d                    # QK^T and AV
    return g

  tokens = n * s
  for _ in c.get("temporal_layers", ()):
    if c.get("temporal_attention_type", "pointwise") == "pointwise":
      f += vt_block(tokens, V * s, T, T)
    else:
      f += vt_block(tokens, V, T * s, T)
  for _ in c.get("crossview_layers", ()):
    if c.get("crossview_attention_type", "rowwise") == "rowwise":
      f += vt_block(tokens, T * hs, V * ws, V)
    else:
      f += vt_block(tokens, T, V * s, V)

  nb = c.get("num_adapter_blocks", 0)
  if nb:
    cin_adapter = c.get("layout_channels", 6) * c.get("layout_downscale", 8) ** 2
    f += n * s * 2 * cin_adapter * d                                 # in_conv (after the 2x2 pool)
    f += nb * n * s * c.get("adapter_res_blocks", 2) * (2 * 9 * d * d + 2 * d * d)  # 3x3 + 1x1 convs
    f += nb * n * s * 2 * d * d                                      # zero 1x1 projections
  return int(f)
