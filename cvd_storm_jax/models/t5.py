"""T5 encoder (Hugging Face ``T5EncoderModel``) in Flax linen; T5 v1.1 / T5-XXL as used by SD3 and SD3.5.

Structure:
  shared(ids) -> num_layers x [x + SelfAttention(T5Norm(x), bias=pos_bias + pad_mask);
                               x + FFN(T5Norm(x))] -> final T5Norm
  * T5Norm is an RMS norm without mean subtraction and without bias, statistics in fp32 (``mmdit.RMSNorm``, the
    same function as diffusers' RMSNorm; in bf16 it multiplies by the weight in fp32 before rounding, where
    transformers rounds first: a last-bit difference only).
  * Attention logits are *not* scaled by 1/sqrt(d_kv) (T5 folds the scale into its init).
  * The relative position bias is a learned [num_buckets, heads] table owned by the first layer and reused by all
    layers (bidirectional buckets: half for each direction, half of those exact, the rest log-spaced up to
    max_distance).
  * FFN: "gated-gelu" (v1.1): wo(gelu_tanh(wi_0 x) * wi_1 x); "relu" (original T5): wo(relu(wi x)).

Parameter names follow the torch keys (``block_{i}/layer_0/SelfAttention/q`` ...).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cvd_storm_jax.models.attention import dot_product_attention
from cvd_storm_jax.models.clip import activation
from cvd_storm_jax.models.embeddings import dense
from cvd_storm_jax.models.mmdit import RMSNorm

Dtype = Any


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The fields of a transformers ``T5Config`` the encoder needs (defaults: t5-v1_1-xxl)."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.split("-")[0] == "gated"

  @property
  def dense_act_fn(self) -> str:
    # Same parsing as transformers' T5Config: "gated-gelu" means the tanh GELU ("gelu_new") for legacy reasons.
    if self.feed_forward_proj == "gated-gelu":
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "T5Config":
    names = {f.name for f in dataclasses.fields(cls)}
    out = cls(**{k: v for k, v in config.items() if k in names})
    parts = out.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"T5 feed_forward_proj {out.feed_forward_proj!r} is not 'relu', 'gated-gelu' or 'gated-<act>'")
    activation(out.dense_act_fn)  # fail early on an unknown activation
    return out


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets of (key_pos - query_pos): [Lq, Lk] int32.

  Computed in numpy at trace time (the lengths are static) with the same float32 operation order as transformers'
  ``T5Attention._relative_position_bucket``, so that bucket boundaries (a truncation of a float32 log) agree exactly.
  """
  rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  num_buckets //= 2
  buckets = (rel > 0).astype(np.int64) * num_buckets
  rel = np.abs(rel)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):  # log(0) at rel == 0 is discarded by the where below
    large = np.log(rel.astype(np.float32) / np.float32(max_exact))
  large = large / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
  large = max_exact + np.where(np.isfinite(large), large, 0).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


def _dense(features: int, names: tuple[str | None, str | None], dtype: Dtype, param_dtype: Dtype, name: str,
           std: float = 0.05) -> nn.Dense:
  """The shared logically-named Dense, bias-free as in T5."""
  return dense(features, names, name=name, dtype=dtype, param_dtype=param_dtype, use_bias=False,
               kernel_init=nn.initializers.normal(std))


class T5Attention(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    """x: [B, L, D]; bias: additive logits bias broadcastable to [B, heads, L, L]. Returns [B, L, D]."""
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    split = lambda t: t.reshape(*t.shape[:-1], cfg.num_heads, cfg.d_kv)
    q = split(_dense(inner, ("embed", "heads"), self.dtype, self.param_dtype, "q")(x))
    k = split(_dense(inner, ("embed", "heads"), self.dtype, self.param_dtype, "k")(x))
    v = split(_dense(inner, ("embed", "heads"), self.dtype, self.param_dtype, "v")(x))
    # T5 does not scale the logits; the padding mask is already folded into `bias` as a large negative value
    # (exactly how transformers adds it), so no boolean mask is passed.
    o = dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=1.0)
    return _dense(cfg.d_model, ("heads", "embed"), self.dtype, self.param_dtype, "o")(o.reshape(*o.shape[:-2], inner))


class T5FeedForward(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    act = activation(cfg.dense_act_fn)
    if cfg.is_gated_act:
      h = act(_dense(cfg.d_ff, ("embed", "mlp"), self.dtype, self.param_dtype, "wi_0")(x))
      h = h * _dense(cfg.d_ff, ("embed", "mlp"), self.dtype, self.param_dtype, "wi_1")(x)
    else:
      h = act(_dense(cfg.d_ff, ("embed", "mlp"), self.dtype, self.param_dtype, "wi")(x))
    return _dense(cfg.d_model, ("mlp", "embed"), self.dtype, self.param_dtype, "wo")(h)


def _clamp_fp16(x: jax.Array) -> jax.Array:
  """transformers clamps fp16 hidden states just below the fp16 maximum (more so when an inf appeared)."""
  if x.dtype != jnp.float16:
    return x
  big = jnp.finfo(jnp.float16).max
  clamp = jnp.where(jnp.isinf(x).any(), big - 1000, big).astype(x.dtype)
  return jnp.clip(x, -clamp, clamp)


class _SelfAttentionLayer(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    cfg = self.config
    h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, self.param_dtype, name="layer_norm")(x)
    return x + T5Attention(cfg, self.dtype, self.param_dtype, name="SelfAttention")(h, bias)


class _FeedForwardLayer(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, self.param_dtype, name="layer_norm")(x)
    return x + T5FeedForward(cfg, self.dtype, self.param_dtype, name="DenseReluDense")(h)


class T5Block(nn.Module):
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    x = _clamp_fp16(_SelfAttentionLayer(self.config, self.dtype, self.param_dtype, name="layer_0")(x, bias))
    x = _clamp_fp16(_FeedForwardLayer(self.config, self.dtype, self.param_dtype, name="layer_1")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class T5EncoderModel(nn.Module):
  """T5 encoder stack.

  __call__(input_ids [B, L] int, attention_mask [B, L] {0,1} or None) -> last_hidden_state [B, L, d_model].
  SD3's pipeline passes no attention mask (padding tokens are attended to), so None is the SD3-faithful default.
  """
  config: T5Config
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    length = input_ids.shape[-1]
    x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                 name="shared")(input_ids)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    # The position-bias table belongs to block 0 in the checkpoint; it is created here once and shared.
    table = self.param("relative_attention_bias",
                       nn.with_logical_partitioning(nn.initializers.normal(0.05), (None, None)),
                       (cfg.relative_attention_num_buckets, cfg.num_heads), self.param_dtype)
    buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    bias = jnp.transpose(jnp.asarray(table, jnp.float32)[buckets], (2, 0, 1))[None]  # [1, heads, L, L]
    if attention_mask is not None:
      # transformers adds finfo(dtype).min at masked keys; the same additive form keeps fully-masked rows finite.
      neg = jnp.finfo(self.dtype).min
      bias = bias + jnp.where(attention_mask.astype(jnp.bool_), 0.0, neg)[:, None, None, :].astype(jnp.float32)
      bias = jnp.maximum(bias, neg)

    for i in range(cfg.num_layers):
      x = T5Block(cfg, self.dtype, self.param_dtype, name=f"block_{i}")(x, bias)
    return RMSNorm(cfg.layer_norm_epsilon, self.dtype, self.param_dtype, name="final_layer_norm")(x)
