"""The one attention primitive every model in the package calls.

``dot_product_attention`` takes the layout [batch, length, heads, head_dim] and picks the implementation per backend
(``_pick``):

  GPU  cuDNN flash attention (``jax.nn.dot_product_attention``) for bf16/fp16 inputs without an additive bias.
  TPU  the Pallas splash-attention kernel ("tpu_splash", ``jax.experimental.pallas.ops.tpu.splash_attention``) when
       there is no bias and no general boolean mask (``key_valid`` only) and both lengths are >= SPLASH_MIN_LENGTH.
  else XLA (CPU tests, fp32 parity runs, masked / biased / short calls on TPU): materialises the [B, N, Lq, Lk] logits.

On TPU the XLA path would materialise the logits of the STORM-VAE's GS decoder (43,031 tokens a clip: 12 x 43031^2
f32 = 82.8 GiB per clip), more than any TPU chip holds; the flash kernel keeps one block of them in VMEM.

Key padding (``key_valid``) has its own argument because cuDNN turns any boolean ``mask`` into a dense
[B, 1, Lq, Lk] additive bias: at the STORM-VAE's 43k tokens that is 3.7 GB per clip, read by every layer. For a
per-key mask the cuDNN path instead moves each sample's valid keys to the front (a stable gather of K and V; softmax
attention does not depend on the order of its keys) and passes their count as ``key_value_seq_lengths``, which the
flash kernel handles without any mask tensor. The splash path expresses it as segment ids (``_splash_attention``).
The XLA path applies it as a broadcast mask, which XLA fuses.
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Implementation = Literal["auto", "xla", "cudnn", "tpu_splash"]

# Both lengths must reach this for "auto" to take the splash kernel on TPU. Its tiles are at least 128 wide (the TPU's
# lane count), so a shorter sequence is padded to 128 and most of the kernel's work is padding, while XLA's logits of
# a <128-token call are at most 64 KiB per head: nothing worth saving. From 128 on, padding costs at most 2x the work
# of the smallest tile (and <= 1/16 at long lengths, see _splash_block), and the kernel saves writing and reading back
# the Lq x Lk logits in the forward and again in the backward: the DiT's 602-token joint attention (3.7 GiB of logits
# a clip on XLA) and the GS decoder's 43k tokens (82.8 GiB) take it; the 19-frame temporal blocks stay on XLA.
SPLASH_MIN_LENGTH = 128
# Tile sizes tried, largest first. 512 is MaxText's default (base.yml sa_block_*; the library's own default is 128,
# "TODO: select better parameters"): a 512 x 512 f32 logits tile fills VMEM well on v4/v5/v6 while its K/V blocks
# double-buffer, and fewer grid steps amortise the per-step overhead. MaxText's tuned long-context runs use 2048
# with the fused backward kernel; that is a tuning step for a real TPU, not a default to take untested.
_SPLASH_BLOCKS = (512, 256, 128)


def _pick(q: jax.Array, k: jax.Array, bias: jax.Array | None, mask: jax.Array | None,
          implementation: Implementation) -> str | None:
  """The implementation to run: `implementation` unless "auto", else by jax.default_backend() (module docstring).
  q: [B, Lq, N, H]; k: [B, Lk, N, H]; mask: the general boolean mask (not key_valid) or None."""
  if implementation != "auto":
    return implementation
  backend = jax.default_backend()
  if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and bias is None:
    return "cudnn"
  if (backend == "tpu" and bias is None and mask is None and q.shape[1] >= SPLASH_MIN_LENGTH
      and k.shape[1] >= SPLASH_MIN_LENGTH):
    return "tpu_splash"
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
      Cheaper than the equivalent ``mask`` on cuDNN and the only mask "tpu_splash" takes; may be combined with
      ``mask`` (not on "tpu_splash").
    bias: additive logits bias, broadcastable to [B, N, Lq, Lk] (T5 relative positions).
    scale: logits scale, default 1/sqrt(H).
    implementation: "auto" (cudnn on GPU for half precision without bias; tpu_splash on TPU without bias or mask
      for lengths >= SPLASH_MIN_LENGTH; else xla), "xla", "cudnn" or "tpu_splash". "tpu_splash" asked for on a
      backend other than TPU runs the same Pallas kernel in interpret mode (``pallas_call(interpret=True)``: its
      program evaluated with ordinary XLA ops, slowly), so that CPU tests check the TPU path's numerics.
  Returns:
    [B, Lq, N, H] in q's dtype.
  """
  impl = _pick(q, k, bias, mask, implementation)
  if key_valid is not None:
    if tuple(key_valid.shape) != (k.shape[0], k.shape[1]):
      raise ValueError(f"key_valid has shape {tuple(key_valid.shape)}, expected {(k.shape[0], k.shape[1])}")
    key_valid = key_valid.astype(bool)
  if impl == "tpu_splash":
    if mask is not None or bias is not None:
      raise ValueError("implementation 'tpu_splash' takes key_valid only, no mask or bias; use 'xla'")
    return _splash_attention(q, k, v, key_valid, scale)
  lengths = None
  if key_valid is not None:
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


# ---------------------------------------------------------------------------------------------------------------------
# TPU: Pallas splash attention.


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _splash_block(length: int) -> int:
  """The tile for a sequence of `length`: the largest of _SPLASH_BLOCKS whose padding of the sequence stays within
  1/16 of the 128-padded length (43,031 -> 512: 43,520 rows, 1% padding; 602 -> 128: 640 rows, where 512 would
  compute 1,024)."""
  least = _round_up(length, _SPLASH_BLOCKS[-1])
  return next(b for b in _SPLASH_BLOCKS if _round_up(length, b) <= least + least // 16)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, lq: int, lk: int, block_q: int, block_kv: int, interpret: bool):
  """The kernel for [heads, lq, H] x [heads, lk, H] (lengths already multiples of their blocks), with an unmasked
  static mask: key padding comes in as segment ids. Cached: building the block-sparsity tables is numpy work at trace
  time (2.5 s for 43k tokens in 128-blocks), repeated by every layer otherwise; the tables are small constants."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  blocks = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                         block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                         block_q_dq=block_q, block_kv_dq=block_kv)
  mask = sm.MultiHeadMask([sm.FullMask((lq, lk))] * heads)
  # The library converts the tables with jnp.array, which under a trace (this runs inside the model's jit) stages
  # them as traced values that a cache must not keep; evaluated eagerly and kept as numpy, they are plain constants
  # of every program that uses them (a jax.Array constant would become a hoisted "const arg", which jax.export
  # refuses).
  with jax.ensure_compile_time_eval():
    kernel = sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.tree.map(np.asarray, kernel)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, kv_segments: jax.Array | None, *,
                  interpret: bool) -> jax.Array:
  """The kernel on one device's (or the whole) arrays. q: [B, Lq, N, H] already scaled; k, v: [B, Lk, N, H];
  kv_segments: [B, Lk] int32 (1 = attendable) or None. Lengths are multiples of their blocks. -> [B, Lq, N, H]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  lq, heads, lk = q.shape[1], q.shape[2], k.shape[1]
  kernel = _splash_kernel(heads, lq, lk, _splash_block(lq), _splash_block(lk), interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel's layout: [N, L, H] per sample
  q, k, v = heads_first(q), heads_first(k), heads_first(v)
  if kv_segments is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    # Every query, padded ones included, is in segment 1: no query row is all-masked, so padded queries give finite
    # outputs (a mean of valid values) and, with a zero cotangent once sliced off, add exactly zero to every gradient.
    q_segments = jnp.ones((q.shape[0], lq), jnp.int32)
    out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sk.SegmentIds(qs, ks)))(
        q, k, v, q_segments, kv_segments)
  return heads_first(out)


def _shard_axes(mesh, logical: str, size: int) -> tuple[str, ...]:
  """The mesh axes the active logical-axis rules map `logical` to, less those not in `mesh`, already manual (inside
  an enclosing shard_map) or not dividing `size` (as sharding._fit drops them)."""
  spec = nn.logical_to_mesh_axes((logical,))[0]
  names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  keep, product = [], 1
  for name in names:
    if name in mesh.axis_names and name not in mesh.manual_axes and size % (product * mesh.shape[name]) == 0:
      keep.append(name)
      product *= mesh.shape[name]
  return tuple(keep)


def _splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None,
                      scale: float | None) -> jax.Array:
  """Splash attention for dot_product_attention. q: [B, Lq, N, H]; k, v: [B, Lk, N, H]; key_valid: [B, Lk] bool or
  None. -> [B, Lq, N, H] in q's dtype.

  The kernel does not scale its logits (q is pre-scaled here, in f32 before the cast back), needs lengths that are
  multiples of its blocks (q, k, v are zero-padded; padded queries' outputs are sliced off) and takes no mask here
  beyond segment ids: a key is attendable iff it is valid and not padding (segment 1), other keys are in segment 0,
  which no query belongs to, so no real query attends them.

  A Pallas TPU kernel is a custom call the SPMD partitioner cannot split: under a mesh (jax.set_mesh, as the trainer
  traces) it runs inside jax.shard_map over the mesh axes that the active flax logical-axis rules give "batch" and
  "heads" (as MaxText's splash attention does), each device on its own samples and heads; sequence and head_dim stay
  whole on every device (the kernel cannot split the keys). Without a mesh it is called directly.
  """
  b, lq, heads, head_dim = q.shape
  lk = k.shape[1]
  interpret = jax.default_backend() != "tpu"
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  pq, pk = _round_up(lq, _splash_block(lq)) - lq, _round_up(lk, _splash_block(lk)) - lk
  # head_dim zero-padded to a multiple of 128, the TPU's lane width, as maxdiffusion does for its splash attention
  # (SD's heads are 64 wide; SD3's and the GS decoder's too): zero columns change no logit (q.k over the padding is 0)
  # and give zero output columns, sliced off; the kernel's blocks are lane-aligned instead of half-empty.
  ph = _round_up(head_dim, 128) - head_dim
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, ph))) if n or ph else x
  q, k, v = pad(q, pq), pad(k, pk), pad(v, pk)
  kv_segments = None
  if key_valid is not None or pk:
    valid = jnp.ones((b, lk), bool) if key_valid is None else key_valid
    kv_segments = jnp.pad(valid, ((0, 0), (0, pk))).astype(jnp.int32)
  args = (q, k, v) if kv_segments is None else (q, k, v, kv_segments)
  run = lambda q, k, v, segments=None: _splash_local(q, k, v, segments, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  free = frozenset(a for a in mesh.axis_names if a not in mesh.manual_axes)  # empty: no mesh, or all manual already
  if free:
    batch, head = _shard_axes(mesh, "batch", b), _shard_axes(mesh, "heads", heads)
    spec = P(batch or None, None, head or None, None)
    specs = (spec,) * 3 + ((P(batch or None, None),) if kv_segments is not None else ())
    # check_vma=False: the Pallas call carries no varying-manual-axes types for shard_map to check.
    run = jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=spec, axis_names=free, check_vma=False)
  return run(*args)[:, :lq, :, :head_dim]
