"""CLIP text transformer (Hugging Face ``CLIPTextModelWithProjection``) in Flax linen.

SD3/SD3.5 use two of them: CLIP-L (openai/clip-vit-large-patch14, width 768, quick_gelu) and CLIP-G
(laion/CLIP-ViT-bigG-14, width 1280, gelu). SD3 conditions on the *penultimate* hidden state (``hidden_states[-2]``,
the output of the second-to-last encoder layer, before the final LayerNorm) and on the projected pooled output.

Structure (pre-LN transformer with a causal mask):
  token_embedding(ids) + position_embedding(arange(L))
  -> num_layers x [x + attn(LN1(x)); x + mlp(LN2(x))]
  -> final_layer_norm -> last_hidden_state
  pooled = last_hidden_state[b, eos_position(b)] -> text_projection (no bias) -> text_embeds

Parameter names follow the torch keys so that the importer (``cvd_storm_jax.pretrained.text``) is a plain renaming.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvd_storm_jax.models.attention import dot_product_attention
from cvd_storm_jax.models.embeddings import dense

Dtype = Any


def _quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


# HF ACT2FN names -> functions. "gelu" in HF is the exact (erf) GELU; "gelu_new"/"gelu_pytorch_tanh" the tanh one.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of a transformers ``CLIPTextConfig`` that the forward pass needs."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
    """From a ``config.json`` dict (a ``CLIPTextConfig``, or a full ``CLIPConfig`` with a ``text_config``)."""
    if "text_config" in config and isinstance(config["text_config"], Mapping):
      config = config["text_config"]
    names = {f.name for f in dataclasses.fields(cls)}
    out = cls(**{k: v for k, v in config.items() if k in names})
    if out.hidden_size % out.num_attention_heads:
      raise ValueError(f"CLIP hidden_size {out.hidden_size} not divisible by {out.num_attention_heads} heads")
    activation(out.hidden_act)  # fail early on an unknown activation
    return out


def _dense(features: int, names: tuple[str | None, str | None], dtype: Dtype, param_dtype: Dtype, name: str,
           use_bias: bool = True) -> nn.Dense:
  """The shared logically-named Dense with CLIP's N(0, 0.02) kernel init."""
  return dense(features, names, name=name, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
               kernel_init=nn.initializers.normal(0.02))


def _layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  # Flax LayerNorm reduces in fp32 even for bf16 inputs (statistics in fp32, as the project requires).
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class CLIPAttention(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, D]; mask: bool, broadcastable to [B, 1, L, L] (True = attend). Returns [B, L, D]."""
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)
    q = split(_dense(cfg.hidden_size, ("embed", "heads"), self.dtype, self.param_dtype, "q_proj")(x))
    k = split(_dense(cfg.hidden_size, ("embed", "heads"), self.dtype, self.param_dtype, "k_proj")(x))
    v = split(_dense(cfg.hidden_size, ("embed", "heads"), self.dtype, self.param_dtype, "v_proj")(x))
    o = dot_product_attention(q, k, v, mask=mask, scale=head_dim ** -0.5)
    o = o.reshape(*o.shape[:-2], cfg.hidden_size)
    return _dense(cfg.hidden_size, ("heads", "embed"), self.dtype, self.param_dtype, "out_proj")(o)


class CLIPMLP(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = _dense(cfg.intermediate_size, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1")(x)
    h = activation(cfg.hidden_act)(h)
    return _dense(cfg.hidden_size, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(h)


class CLIPEncoderLayer(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    h = _layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm1")(x)
    x = x + CLIPAttention(cfg, self.dtype, self.param_dtype, name="self_attn")(h, mask)
    h = _layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm2")(x)
    x = x + CLIPMLP(cfg, self.dtype, self.param_dtype, name="mlp")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Where transformers' CLIPTextModel pools, per row. input_ids: [B, L] -> [B] int32.

  With the legacy ``eos_token_id == 2`` of old configs (SD3's CLIP-L/G configs among them) it takes the argmax of the
  ids (the end-of-text token has the highest id in CLIP's vocabulary); otherwise the first position holding
  ``eos_token_id``. Both take the first occurrence on ties, as torch.argmax does.
  """
  ids = input_ids.astype(jnp.int32)
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextModelWithProjection(nn.Module):
  """CLIP text tower with its projection head.

  __call__(input_ids [B, L] int, attention_mask [B, L] {0,1} or None) returns a dict:
    hidden_states: tuple of num_layers + 1 arrays [B, L, D] (embeddings, then each layer's output; the last one is
      *before* the final LayerNorm, as in transformers); SD3 uses hidden_states[-2].
    last_hidden_state: [B, L, D] after final_layer_norm.
    pooler_output: [B, D], last_hidden_state at the EOS position.
    text_embeds: [B, projection_dim], pooler_output @ text_projection.
  """
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> dict[str, Any]:
    cfg = self.config
    length = input_ids.shape[-1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"CLIP input length {length} > max_position_embeddings {cfg.max_position_embeddings}")
    tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                   embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                   name="token_embedding")
    pos = self.param("position_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
                     (cfg.max_position_embeddings, cfg.hidden_size), self.param_dtype)
    x = tok(input_ids) + jnp.asarray(pos[:length], self.dtype)[None]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    # Causal mask, combined with the optional padding mask (keys only), as transformers' create_causal_mask does.
    mask = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask.astype(jnp.bool_)[:, None, None, :])

    hidden_states = [x]
    for i in range(cfg.num_hidden_layers):
      x = CLIPEncoderLayer(cfg, self.dtype, self.param_dtype, name=f"layers_{i}")(x, mask)
      hidden_states.append(x)
    last = _layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "final_layer_norm")(x)

    pooled = jnp.take_along_axis(last, eos_positions(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
    text_embeds = _dense(cfg.projection_dim, ("embed", None), self.dtype, self.param_dtype, "text_projection",
                         use_bias=False)(pooled)
    return {"hidden_states": tuple(hidden_states), "last_hidden_state": last, "pooler_output": pooled,
            "text_embeds": text_embeds}
