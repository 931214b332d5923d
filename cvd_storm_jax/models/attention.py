"""The one attention primitive every model in the package calls.

``dot_product_attention`` wraps ``jax.nn.dot_product_attention`` (layout [batch, length, heads, head_dim]) and picks
the implementation per backend: cuDNN flash attention on GPU for bf16/fp16 inputs without an additive bias, XLA
everywhere else (CPU tests, TPU, fp32 parity runs). Nothing here assumes a GPU.

Key padding (``key_valid``) has its own argument because cuDNN turns any boolean ``mask`` into a dense
[B, 1, Lq, Lk] additive bias: at the STORM-VAE's 43k tokens that is 3.7 GB per clip, read by every layer. For a
per-key mask the cuDNN path instead moves each sample's valid keys to the front (a stable gather of K and V; softmax
attention does not depend on the order of its keys) and passes their count as ``key_value_seq_lengths``, which the
flash kernel handles without any mask tensor. The XLA path applies it as a broadcast mask, which XLA fuses.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["auto", "xla", "cudnn"]


def _pick(q: jax.Array, bias: jax.Array | None, implementation: Implementation) -> str | None:
  if implementation != "auto":
    return implementation
  if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and bias is None:
    return "cudnn"
  return "xla"


def valid_keys_first(k: jax.Array, v: jax.Array, key_valid: jax.Array):
  """Reorders keys and values so each sample's valid keys come first (stable). k, v: [B, Lk, N, H]; key_valid:
  [B, Lk] bool. Returns (k, v, lengths [B] int32)."""
  order = jnp.argsort(~key_valid, axis=1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)
  return take(k), take(v), jnp.sum(key_valid, axis=1, dtype=jnp.int32)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          key_valid: jax.Array | None = None, bias: jax.Array | None = None,
                          scale: float | None = None, implementation: Implementation = "auto") -> jax.Array:
  """Softmax attention.

  Args:
    q: [B, Lq, N, H]; k, v: [B, Lk, N, H].
    mask: boolean, broadcastable to [B, N, Lq, Lk]; True = attend.
    key_valid: [B, Lk] bool, False for padding keys that no query may attend (every sample needs one valid key).
      Cheaper than the equivalent ``mask`` on cuDNN; may be combined with it.
    bias: additive logits bias, broadcastable to [B, N, Lq, Lk] (T5 relative positions).
    scale: logits scale, default 1/sqrt(H).
    implementation: "auto" (cudnn on GPU for half precision without bias, else xla), "xla" or "cudnn".
  Returns:
    [B, Lq, N, H] in q's dtype.
  """
  impl = _pick(q, bias, implementation)
  lengths = None
  if key_valid is not None:
    if tuple(key_valid.shape) != (k.shape[0], k.shape[1]):
      raise ValueError(f"key_valid has shape {tuple(key_valid.shape)}, expected {(k.shape[0], k.shape[1])}")
    key_valid = key_valid.astype(bool)
    if impl == "cudnn" and mask is None:
      k, v, lengths = valid_keys_first(k, v, key_valid)
    else:
      kmask = key_valid[:, None, None, :]
      mask = kmask if mask is None else mask & kmask
  if impl == "cudnn" and mask is not None:
    mask = jnp.broadcast_to(mask, (q.shape[0], 1 if mask.shape[-3] == 1 else q.shape[2], q.shape[1], k.shape[1]))
  lq = q.shape[1]
  if impl == "cudnn" and (lq % 2 or k.shape[1] % 2):
    q, k, v, mask, lengths = _pad_to_even(q, k, v, mask, lengths)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, key_value_seq_lengths=lengths,
                                     implementation=impl)
  return out[:, :lq]


def _pad_to_even(q, k, v, mask, lengths):
  """JAX's cuDNN attention rejects odd sequence lengths in training (e.g. 19 frames in the temporal blocks): pad
  queries and keys by one; the padded key is excluded (a False mask column, or the key lengths), the padded query's
  output is sliced off by the caller."""
  pad = lambda x: jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))
  lk = k.shape[1]
  q, k, v = pad(q), pad(k), pad(v)
  if mask is not None:
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, q.shape[1] - mask.shape[2]), (0, k.shape[1] - lk)))
  elif lengths is None:
    lengths = jnp.full((q.shape[0],), lk, jnp.int32)
  return q, k, v, mask, lengths
