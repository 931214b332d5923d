"""The one attention primitive every model in the package calls.

``dot_product_attention`` wraps ``jax.nn.dot_product_attention`` (layout [batch, length, heads, head_dim]) and picks
the implementation per backend: cuDNN flash attention on GPU for bf16/fp16 inputs without an additive bias, XLA
everywhere else (CPU tests, TPU, fp32 parity runs). Nothing here assumes a GPU.
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


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
                          bias: jax.Array | None = None, scale: float | None = None,
                          implementation: Implementation = "auto") -> jax.Array:
  """Softmax attention.

  Args:
    q: [B, Lq, N, H]; k, v: [B, Lk, N, H].
    mask: boolean, broadcastable to [B, N, Lq, Lk]; True = attend.
    bias: additive logits bias, broadcastable to [B, N, Lq, Lk] (T5 relative positions).
    scale: logits scale, default 1/sqrt(H).
    implementation: "auto" (cudnn on GPU for half precision without bias, else xla), "xla" or "cudnn".
  Returns:
    [B, Lq, N, H] in q's dtype.
  """
  impl = _pick(q, bias, implementation)
  if impl == "cudnn" and mask is not None:
    mask = jnp.broadcast_to(mask, (q.shape[0], 1 if mask.shape[-3] == 1 else q.shape[2], q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl)
