"""The SD3 / SD3.5 MM-DiT (diffusers ``SD3Transformer2DModel``) in Flax linen, channels-last.

Structure (diffusers names kept as Flax module names, so the weight import is a plain renaming):

  pos_embed (2x2 patches + cropped 2-D sin-cos)   context_embedder (Dense joint_attention_dim -> width)
  time_text_embed (sinusoid(t) MLP + pooled-text MLP) = temb
  transformer_blocks_{i}: JointBlock
    image:   adaLN-Zero (SD3.5 "X" variant with a second modulation triple in dual-attention layers)
    context: adaLN-Zero, or AdaLayerNormContinuous in the last block (``context_pre_only``: the context only
             feeds keys/values; its stream ends there)
    joint attention over [image; context] tokens with per-head RMS qk-norm (SD3.5), then in MMDiT-X layers a second
    image-only attention ``attn2``; GELU(tanh) FFNs for both streams.
  norm_out (AdaLayerNormContinuous) -> proj_out -> unpatchify.

Everything the CVD-STORM model (``cvd_dit.py``) shares with SD3 lives here.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cvd_storm_jax.models.attention import dot_product_attention
from cvd_storm_jax.models.embeddings import PatchEmbed, TimeTextEmbed, as_dtype, dense, unpatchify

Dtype = Any

# Names of the activations a remat policy may keep (``jax.ad_checkpoint.checkpoint_name`` in the modules). Per token
# and layer, in units of the width D: the q, k, v projections 3D; the attention's output projection D; the MLP's
# input projection 4D (SD3) or 8D (GEGLU, cvd_dit's temporal / cross-view blocks); its output projection D; the
# layout adapter's 3x3 convolutions D (cvd_dit.AdapterBlock).
CHECKPOINT_NAMES = ("qkv_proj", "out_proj", "mlp_in", "mlp_out", "adapter_conv")

# Most memory (least recomputation) first. "minimal" keeps every named activation (the attention itself, a small
# share of the FLOPs at these lengths, is recomputed); "save_dot_except_mlp_in" drops the widest, the MLP's hidden
# layer, and recomputes it (+~10 % of the step's FLOPs at SD3.5-medium width); "save_out_proj" keeps the outputs the
# adaLN gates need (D each) and the adapter's convolutions, and recomputes the q/k/v and MLP-input projections
# (+~20 %); "full" keeps the block inputs only and recomputes the whole forward (+~33 %). The two ``dots_*``
# policies are JAX's own. `benchmarks/bench_dit.py --plan` measures what each keeps at a given size.
_SAVE = {"minimal": CHECKPOINT_NAMES, "save_dot_except_mlp_in": ("qkv_proj", "out_proj", "mlp_out", "adapter_conv"),
         "save_out_proj": ("out_proj", "mlp_out", "adapter_conv")}
REMAT_POLICIES = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", *_SAVE, "full")


def remat(cls: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """Wraps a module class in nn.remat with a policy named in REMAT_POLICIES ("none" returns it unchanged; "auto",
  unresolved, means "full").

  static_argnums count ``self`` as 0 (flax's convention).
  """
  if policy == "auto":
    # The trainer replaces "auto" by the policy memory.choose_remat_policy measures for the device before it builds
    # the model it trains. Anywhere else (sampling, evaluation, a loop of one's own) "auto" is the safe "full".
    policy = "full"
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {policy!r}")
  if policy == "none":
    return cls
  if policy in _SAVE:
    jax_policy = jax.checkpoint_policies.save_only_these_names(*_SAVE[policy])
  else:
    jax_policy = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
  return nn.remat(cls, policy=jax_policy, static_argnums=static_argnums)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  return nn.with_logical_constraint(x, axes)


# ----------------------------------------------------------------------------------------------------------------------
# Norms (statistics in float32).
# ----------------------------------------------------------------------------------------------------------------------
def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """Affine-free LayerNorm over the last axis; float32 statistics, result in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nn.Module):
  """LayerNorm with learned scale and bias (torch nn.LayerNorm defaults: eps 1e-5). x: [..., D] -> same, in dtype."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (d,),
                       self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (d,),
                      self.param_dtype)
    y = layer_norm(x, self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learned scale (diffusers RMSNorm, elementwise_affine=True)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (d,),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Attention and feed-forward.
# ----------------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
  """Multi-head self-attention, optionally joint with a second ("context") token stream.

  With ``joint=True`` the context gets its own q/k/v projections (``add_{q,k,v}_proj``, qk-norm ``norm_added_{q,k}``)
  and attends together with the image tokens; its output goes through ``to_add_out`` unless ``context_pre_only``.

  x: [N, L, D]; context: [N, Lc, D] or None; mask: bool broadcastable to [N, heads, L(+Lc), L(+Lc)].
  Returns (x_out [N, L, D], context_out [N, Lc, D] or None).
  """
  heads: int
  head_dim: int
  qkv_bias: bool = True
  qk_norm: str | None = None
  qk_norm_eps: float = 1e-6
  joint: bool = False
  context_pre_only: bool = False
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _qkv(self, x: jax.Array, prefix: str, suffix: str, norm_prefix: str):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.qkv_bias)
    n, l, _ = x.shape
    inner = self.heads * self.head_dim
    q, k, v = (checkpoint_name(dense(inner, ("embed", "heads"), name=f"{prefix}{c}{suffix}", **kw)(x), "qkv_proj")
               .reshape(n, l, self.heads, self.head_dim) for c in "qkv")
    if self.qk_norm == "rms_norm":
      nkw = dict(eps=self.qk_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
      q = RMSNorm(name=f"{norm_prefix}q", **nkw)(q)
      k = RMSNorm(name=f"{norm_prefix}k", **nkw)(k)
    elif self.qk_norm is not None:
      raise ValueError(f"qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
    return q, k, v

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    d = x.shape[-1]
    q, k, v = self._qkv(x, "to_", "", "norm_")
    lx = x.shape[1]
    if self.joint:
      if context is None:
        raise ValueError("joint attention needs the context stream")
      cq, ck, cv = self._qkv(context, "add_", "_proj", "norm_added_")
      q, k, v = (jnp.concatenate([a, b], axis=1) for a, b in ((q, cq), (k, ck), (v, cv)))
    q = constrain(q, ("batch", "length", "heads", "kv"))
    o = dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
    o = o.reshape(o.shape[0], o.shape[1], self.heads * self.head_dim)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out = checkpoint_name(dense(d, ("heads", "embed"), name="to_out", **kw)(o[:, :lx]), "out_proj")
    ctx_out = None
    if self.joint and not self.context_pre_only:
      ctx_out = checkpoint_name(dense(d, ("heads", "embed"), name="to_add_out", **kw)(o[:, lx:]), "out_proj")
    return out, ctx_out


class FeedForward(nn.Module):
  """dim -> mult*dim -> dim. activation "gelu_tanh" (SD3's FFN) or "geglu" (gated, exact GELU on the gate half).

  x: [..., D] -> [..., D]. Params: ``proj`` (in; 2x wide for geglu, [value | gate]) and ``out``.
  """
  mult: int = 4
  activation: str = "gelu_tanh"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    inner = self.mult * d
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.activation == "gelu_tanh":
      h = nn.gelu(checkpoint_name(dense(inner, ("embed", "mlp"), name="proj", **kw)(x), "mlp_in"), approximate=True)
    elif self.activation == "geglu":
      h = checkpoint_name(dense(2 * inner, ("embed", "mlp"), name="proj", **kw)(x), "mlp_in")
      h, gate = jnp.split(h, 2, axis=-1)
      h = h * nn.gelu(gate, approximate=False)
    else:
      raise ValueError(f"unknown FeedForward activation {self.activation!r}")
    h = constrain(h, ("batch", "length", "mlp"))
    return checkpoint_name(dense(d, ("mlp", "embed"), name="out", **kw)(h), "mlp_out")


class Modulation(nn.Module):
  """adaLN modulation: SiLU(temb) -> Dense(n * D) split into n [N, 1, D] chunks (diffusers chunk order)."""
  n: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, temb: jax.Array, d: int) -> list[jax.Array]:
    m = dense(self.n * d, ("embed", "mlp"), name="linear", dtype=self.dtype, param_dtype=self.param_dtype)(
        nn.silu(temb.astype(self.dtype)))
    return [c[:, None, :] for c in jnp.split(m, self.n, axis=-1)]


def modulate(x_normed: jax.Array, shift: jax.Array, scale: jax.Array, dtype: Dtype) -> jax.Array:
  return (x_normed * (1.0 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The MM-DiT block.
# ----------------------------------------------------------------------------------------------------------------------
class JointBlock(nn.Module):
  """One MM-DiT block (diffusers ``JointTransformerBlock``).

  x: [N, S, D] image tokens; context: [N, L, D] text tokens; temb: [N, D].
  Returns (context' [N, L, D] or None when ``context_pre_only``, x' [N, S, D]).
  """
  heads: int
  head_dim: int
  context_pre_only: bool = False
  use_dual_attention: bool = False
  qk_norm: str | None = None
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array) -> tuple[jax.Array | None, jax.Array]:
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = constrain(x, ("batch", "length", "embed"))
    context = constrain(context, ("batch", "length", "embed"))

    # Image-stream modulation: (shift, scale, gate) for attention and MLP [and attn2 in MMDiT-X layers].
    mods = Modulation(9 if self.use_dual_attention else 6, name="norm1", **kw)(temb, d)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    x_ln = layer_norm(x, 1e-6)
    x_attn_in = modulate(x_ln, shift_msa, scale_msa, self.dtype)

    c_ln = layer_norm(context, 1e-6)
    if self.context_pre_only:
      # AdaLayerNormContinuous: (scale, shift) order.
      c_scale, c_shift = Modulation(2, name="norm1_context", **kw)(temb, d)
      c_attn_in = modulate(c_ln, c_shift, c_scale, self.dtype)
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = Modulation(
          6, name="norm1_context", **kw)(temb, d)
      c_attn_in = modulate(c_ln, c_shift_msa, c_scale_msa, self.dtype)

    attn_kw = dict(heads=self.heads, head_dim=self.head_dim, qk_norm=self.qk_norm, qk_norm_eps=1e-6,
                   attention_impl=self.attention_impl, **kw)
    attn_out, c_attn_out = Attention(joint=True, context_pre_only=self.context_pre_only, name="attn", **attn_kw)(
        x_attn_in, c_attn_in)
    x = x + gate_msa * attn_out

    if self.use_dual_attention:
      shift_msa2, scale_msa2, gate_msa2 = mods[6:]
      attn2_out, _ = Attention(name="attn2", **attn_kw)(modulate(x_ln, shift_msa2, scale_msa2, self.dtype))
      x = x + gate_msa2 * attn2_out

    h = modulate(layer_norm(x, 1e-6), shift_mlp, scale_mlp, self.dtype)
    x = x + gate_mlp * FeedForward(name="ff", **kw)(h)
    x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))

    if self.context_pre_only:
      return None, x
    context = context + c_gate_msa * c_attn_out
    h = modulate(layer_norm(context, 1e-6), c_shift_mlp, c_scale_mlp, self.dtype)
    context = context + c_gate_mlp * FeedForward(name="ff_context", **kw)(h)
    return constrain(context.astype(self.dtype), ("batch", "length", "embed")), x


class SD3Transformer(nn.Module):
  """The plain SD3 / SD3.5 MM-DiT (diffusers ``SD3Transformer2DModel`` config keys as attributes).

  Call: latents [B, H, W, C] (channels-last), timesteps [B] float in [0, 1000], text_tokens [B, L,
  joint_attention_dim], pooled_text [B, pooled_projection_dim] -> velocity [B, H, W, out_channels] (float32).
  """
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int | None = 16
  pos_embed_max_size: int = 96
  # Position grid: None = diffusers' formula; else arange * scale - offset (embeddings.pos_embed_coords).
  pos_embed_scale: float | None = None
  pos_embed_offset: float = 0.0
  dual_attention_layers: Sequence[int] = ()
  qk_norm: str | None = None
  remat_policy: str = "none"
  attention_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    build_mmdit(self)

  def __call__(self, latents: jax.Array, timesteps: jax.Array, text_tokens: jax.Array, pooled_text: jax.Array
               ) -> jax.Array:
    n, hh, ww, c = latents.shape
    if c != self.in_channels:
      raise ValueError(f"latents have {c} channels, the model expects in_channels={self.in_channels}")
    x, context, temb = mmdit_inputs(self, latents, timesteps, text_tokens, pooled_text)
    for block in self.transformer_blocks:
      context, x = block(x, context, temb)
    return mmdit_outputs(self, x, temb, hh, ww)


def build_mmdit(m: nn.Module) -> None:
  """Creates the SD3 submodules (under diffusers' names) on ``m`` inside its ``setup``; shared by CVDDiT.

  ``m`` must carry the SD3Transformer config attributes.
  """
  dtype, param_dtype = as_dtype(m.dtype), as_dtype(m.param_dtype)
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  width = m.num_attention_heads * m.attention_head_dim
  if m.caption_projection_dim != width:
    raise ValueError(f"caption_projection_dim={m.caption_projection_dim} must equal heads*head_dim={width}: the "
                     "joint attention concatenates text and image tokens")
  m.pos_embed = PatchEmbed(width, m.patch_size, m.pos_embed_max_size, m.sample_size,
                           pos_embed_scale=m.pos_embed_scale, pos_embed_offset=m.pos_embed_offset, **kw)
  m.time_text_embed = TimeTextEmbed(width, **kw)
  m.context_embedder = dense(m.caption_projection_dim, (None, "embed"), **kw)
  block_cls = remat(JointBlock, m.remat_policy)
  dual = set(m.dual_attention_layers)
  m.transformer_blocks = [
      block_cls(heads=m.num_attention_heads, head_dim=m.attention_head_dim, context_pre_only=i == m.num_layers - 1,
                use_dual_attention=i in dual, qk_norm=m.qk_norm, attention_impl=m.attention_impl, **kw)
      for i in range(m.num_layers)]
  # AdaLayerNormContinuous (eps 1e-6) + linear head.
  m.norm_out = Modulation(2, **kw)
  m.proj_out = dense(m.patch_size ** 2 * (m.out_channels or m.in_channels), ("embed", "conv_out"), **kw)


def mmdit_inputs(m: nn.Module, latents: jax.Array, timesteps: jax.Array, text_tokens: jax.Array,
                 pooled_text: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """latents [N, H, W, C], timesteps [N], text [N, L, Dj], pooled [N, Dp] -> (x [N, S, D], context [N, L, D],
  temb [N, D])."""
  dtype = as_dtype(m.dtype)
  x = m.pos_embed(latents)
  temb = m.time_text_embed(timesteps, pooled_text)
  context = m.context_embedder(constrain(text_tokens.astype(dtype), ("batch", "length", None)))
  return x, constrain(context, ("batch", "length", "embed")), temb


def mmdit_outputs(m: nn.Module, x: jax.Array, temb: jax.Array, hh: int, ww: int) -> jax.Array:
  """x [N, S, D] -> [N, H, W, C_out] float32."""
  p = m.patch_size
  scale, shift = m.norm_out(temb, x.shape[-1])  # AdaLayerNormContinuous chunks (scale, shift).
  norm = lambda x, shift, scale: modulate(layer_norm(x, 1e-6), shift, scale, as_dtype(m.dtype))
  if m.remat_policy != "none":
    # Outside every block's remat, the norm kept three float32 [N, S, D] tensors for the backward pass (~0.9 GiB per
    # clip at the paper size, ~9% of all it keeps under "full"); recomputed from x, it keeps none.
    norm = jax.checkpoint(norm)
  out = m.proj_out(norm(x, shift, scale))
  return unpatchify(out, p, hh // p, ww // p).astype(jnp.float32)


def flops_per_image(model_cfg: Any, h: int, w: int, text_len: int) -> int:
  """Analytic forward FLOPs of the SD3 MM-DiT on one h x w latent with text_len text tokens (2*m*n*k per matmul,
  attention QK^T and AV included; elementwise work not counted). ``model_cfg``: SD3Transformer / CVDDiT keys."""
  c = dict(model_cfg)
  p, d = c["patch_size"], c["num_attention_heads"] * c["attention_head_dim"]
  cin, cout = c["in_channels"], c.get("out_channels") or c["in_channels"]
  s, l = (h // p) * (w // p), text_len         # image / text tokens
  dual = set(c.get("dual_attention_layers", ()))
  num_layers = c["num_layers"]
  f = s * 2 * (p * p * cin) * d                # patch embed
  f += l * 2 * c["joint_attention_dim"] * d    # context embedder
  f += 2 * 256 * d + 2 * d * d                 # timestep MLP
  f += 2 * c["pooled_projection_dim"] * d + 2 * d * d  # pooled-text MLP
  for i in range(num_layers):
    last = i == num_layers - 1
    f += 2 * d * (9 if i in dual else 6) * d   # image adaLN
    f += 2 * d * (2 if last else 6) * d        # context adaLN (AdaLayerNormContinuous in the last block)
    f += (s + l) * 3 * 2 * d * d               # q, k, v of both streams
    f += 2 * 2 * (s + l) * (s + l) * d         # QK^T and AV
    f += s * 2 * d * d + (0 if last else l * 2 * d * d)    # to_out, to_add_out
    f += s * 16 * d * d + (0 if last else l * 16 * d * d)  # GELU FFNs (x4)
    if i in dual:
      f += s * (3 + 1) * 2 * d * d + 2 * 2 * s * s * d    # attn2
  f += 2 * d * 2 * d + s * 2 * d * (p * p * cout)         # norm_out, proj_out
  return int(f)
