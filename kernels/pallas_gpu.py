"""Pallas (Triton lowering on GPU, interpreter elsewhere) forward/backward compositing kernels.

Projection, binning and sorting are the XLA code of `tiled_xla` (sorting is a radix sort there already); this module
replaces the per-tile compositing. Layout:
- Before the kernels, XLA gathers the splat parameters into depth-sorted per-intersection arrays (structure of
  arrays: mean x, mean y, conic a, b, c, opacity, depth [M + chunk], features [M + chunk, Cp], Cp = C padded to a
  power of two). The kernels then read contiguous memory only; the padding of `chunk` slots lets the last chunk of
  the last tile read past its end without a bounds mask (those reads are masked out by `i < end`).
- Grid: one program per 16x16 tile (all K images' tiles in one 1-D grid); the program holds its 256 pixels as vectors
  (one lane per pixel, i.e. one thread per pixel with num_warps = 8) and walks its [start, end) list in chunks of
  `chunk` splats with a scalar loop inside each chunk (each splat's parameters are a broadcast scalar load from L1,
  which is what gsplat's shared-memory staging buys). The chunk loop is a while loop that stops when every pixel
  of the tile is done (gsplat's `__syncthreads_count` early exit): no host synchronisation, no dynamic shapes.
- The forward kernel also writes each pixel's stop index. Backward: gsplat's walk, back to front from the last splat
  any pixel of the tile used, recovering T by division by (1 - alpha) and accumulating the colour/depth behind from
  the back. Each intersection belongs to exactly one tile, so each program writes its own slots of per-intersection
  gradient buffers (no atomics, deterministic; slots a tile never reaches keep the zeros of the aliased inputs), and
  XLA reduces them with `segment_sum`. That works identically in the interpreter and on Triton (atomics do not
  interpret everywhere).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import PALLAS_REDUCTIONS
from . import projection as pj
from .tiled_xla import Geometry, Intersections, Splats, make_composite

_ANY = pl.no_block_spec
_BIG = 2**31 - 1  # "never stopped" sentinel of the per-pixel stop index


def _next_pow2(x: int) -> int:
  return 1 << max(int(x) - 1, 0).bit_length()


def _compiler_params(interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=8, num_stages=1)


def _out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """Output type carrying `like`'s shard_map varying axes (required by `jax.shard_map` with check_vma). The field is
  `manual_axis_type` in jax 0.10 and `vma` in other releases; without either, a plain struct."""
  aval = jax.typeof(like)
  for field in ("manual_axis_type", "vma"):
    value = getattr(aval, field, None)
    if value is not None:
      try:
        return jax.ShapeDtypeStruct(shape, dtype, **{field: value})
      except TypeError:
        continue
  return jax.ShapeDtypeStruct(shape, dtype)


def _squeezed():
  return getattr(pl, "squeezed", None)


def _gather_sorted(splats: Splats, isect: Intersections, chunk: int, offset: int = 0, width: int | None = None):
  """Per-intersection SoA arrays in sorted order, padded by `chunk` slots. Returns (scalars tuple, features); the
  features sit in columns [offset, offset + C) of a power-of-two `width` (default: C rounded up), zeros elsewhere."""
  kn, n = splats.depths.shape[0], splats.opacities.shape[0]
  c = splats.features.shape[1]
  cp = width or _next_pow2(c)
  gid = jnp.concatenate([isect.gid, jnp.full((chunk,), kn, jnp.int32)])
  ok = gid < kn
  g = jnp.minimum(gid, kn - 1)
  gn = g % n

  def take(x):
    return jnp.where(ok, x, 0.0)

  scal = (take(splats.means2d[g, 0]), take(splats.means2d[g, 1]), take(splats.conics[g, 0]),
          take(splats.conics[g, 1]), take(splats.conics[g, 2]), take(splats.opacities[gn]), take(splats.depths[g]))
  feat = jnp.where(ok[:, None], splats.features[gn], 0.0)
  feat = jnp.pad(feat, ((0, 0), (offset, cp - c - offset)))
  return scal, feat


def _pixel_coords(t, geom: Geometry, dtype):
  local = t % geom.tiles_per_image
  tx, ty = local % geom.tiles_x, local // geom.tiles_x
  lane = jnp.arange(geom.pixels_per_tile, dtype=jnp.int32)
  px = (tx * geom.tile_size + lane % geom.tile_size).astype(dtype) + 0.5
  py = (ty * geom.tile_size + lane // geom.tile_size).astype(dtype) + 0.5
  return px, py


def _load_splat(i, refs):
  mx_ref, my_ref, ca_ref, cb_ref, cc_ref, op_ref, z_ref = refs
  return mx_ref[i], my_ref[i], ca_ref[i], cb_ref[i], cc_ref[i], op_ref[i], z_ref[i]


def _fwd_kernel(start_ref, end_ref, mx_ref, my_ref, ca_ref, cb_ref, cc_ref, op_ref, z_ref, f_ref,
                out_f_ref, out_d_ref, out_t_ref, out_stop_ref, *, geom: Geometry):
  t = pl.program_id(0)
  start, end = start_ref[t], end_ref[t]
  dt = out_d_ref.dtype
  px, py = _pixel_coords(t, geom, dt)
  p, cp = geom.pixels_per_tile, out_f_ref.shape[-1]
  chunk = geom.chunk
  n_chunks = (end - start + chunk - 1) // chunk
  splat_refs = (mx_ref, my_ref, ca_ref, cb_ref, cc_ref, op_ref, z_ref)

  def splat_step(j, state, c):
    tr, active, acc_f, acc_d, stop_at = state
    i = start + c * chunk + j
    mx, my, ca, cb, cc, op, z = _load_splat(i, splat_refs)
    alpha, _, _ = pj.gaussian_alpha(px - mx, py - my, ca, cb, cc, op)
    alpha = jnp.where(active & (i < end), alpha, 0.0)
    next_t = tr * (1.0 - alpha)
    stop = (alpha > 0) & (next_t <= pj.T_EPS)
    use = (alpha > 0) & ~stop
    w = jnp.where(use, alpha * tr, 0.0)
    acc_f = acc_f + w[:, None] * f_ref[i, :][None, :]
    acc_d = acc_d + w * z
    return jnp.where(use, next_t, tr), active & ~stop, acc_f, acc_d, jnp.where(stop, i, stop_at)

  def cond(carry):
    c, n_active = carry[0], carry[1]
    return (c < n_chunks) & (n_active > 0)

  def body(carry):
    c, _, *state = carry
    state = jax.lax.fori_loop(0, chunk, functools.partial(splat_step, c=c), tuple(state))
    return (c + 1, jnp.sum(state[1], dtype=jnp.int32)) + state  # int32 also under jax_enable_x64 (the carry's type)

  init = (jnp.int32(0), jnp.int32(p), jnp.ones((p,), dt), jnp.ones((p,), jnp.bool_), jnp.zeros((p, cp), dt),
          jnp.zeros((p,), dt), jnp.full((p,), _BIG, jnp.int32))
  _, _, tr, _, acc_f, acc_d, stop_at = jax.lax.while_loop(cond, body, init)
  out_f_ref[...] = acc_f
  out_d_ref[...] = acc_d
  out_t_ref[...] = tr
  out_stop_ref[...] = stop_at


def _bwd_kernel(start_ref, end_ref, mx_ref, my_ref, ca_ref, cb_ref, cc_ref, op_ref, z_ref, f_ref,
                t_fin_ref, stop_ref, gf_ref, gd_ref, gt_ref, *rest, geom: Geometry, reduction: str):
  # The sum of each splat's gradient over the tile's 256 pixels is the kernel's main cost besides the maths. Two
  # ways (PALLAS_REDUCTIONS; which is faster is for the GPU benchmark to say):
  # - "quantities": each of the 7 splat quantities reduced on its own, the features as one [256, Cp] block (8 block
  #   reductions per splat); written to 8 buffers: d mean x, d mean y, d conic a, b, c, d opacity, d depth [M'],
  #   d features [M', Cp]. rest = 8 aliased zero inputs, then those 8 outputs.
  # - "rows": the whole gradient row built per pixel and reduced once (one block reduction: fewer shuffles and
  #   barriers, more registers); features and their cotangents arrive in columns [_GRAD_FEAT, _GRAD_FEAT + C) of a
  #   power-of-two row, and one row per intersection is written: columns 0..6 the 7 quantities, then the features.
  #   rest = 1 aliased zero input, then that [M', width] output.
  outs = rest[len(rest) // 2:]
  t = pl.program_id(0)
  start, end = start_ref[t], end_ref[t]
  dt = t_fin_ref.dtype
  px, py = _pixel_coords(t, geom, dt)
  p, width = geom.pixels_per_tile, gf_ref.shape[-1]
  chunk = geom.chunk
  splat_refs = (mx_ref, my_ref, ca_ref, cb_ref, cc_ref, op_ref, z_ref)
  t_fin, stop_at, g_f, g_d = t_fin_ref[...], stop_ref[...], gf_ref[...], gd_ref[...]
  gt_term = gt_ref[...] * t_fin
  column = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
  # Back to front from the last splat any pixel of the tile used (gsplat's order).
  hi = jnp.minimum(jnp.max(stop_at), end)
  n_chunks = (hi - start + chunk - 1) // chunk

  def splat_step(j, state, c):
    t_after, s_f, s_d = state
    i = hi - 1 - (c * chunk + j)
    valid = i >= start
    i_ld = jnp.maximum(i, start)  # in-bounds load; masked below
    mx, my, ca, cb, cc, op, z = _load_splat(i_ld, splat_refs)
    feat = f_ref[i_ld, :]
    dx, dy = px - mx, py - my
    alpha, raw, gauss = pj.gaussian_alpha(dx, dy, ca, cb, cc, op)
    alpha = jnp.where(valid, alpha, 0.0)
    use = (alpha > 0) & (i < stop_at)
    t_before = t_after / jnp.where(use, 1.0 - alpha, 1.0)
    w = jnp.where(use, alpha * t_before, 0.0)
    q = jnp.sum(g_f * feat[None, :], axis=1)  # dL/dF . c_i per pixel (within a thread: no exchange)
    inv = 1.0 / (1.0 - alpha)
    dalpha = q * t_before - s_f * inv + g_d * (z * t_before - s_d * inv) - gt_term * inv
    dalpha = jnp.where(use, dalpha, 0.0)
    parts = pj.alpha_vjp(dalpha, dx, dy, ca, cb, cc, alpha, raw, gauss) + (w * g_d,)
    rows = w[:, None] * g_f  # [P, width]: d features in their columns
    if reduction == "rows":
      for col, part in enumerate(parts):
        rows = rows + jnp.where(column == col, part[:, None], 0.0)
      sums = (jnp.sum(rows, axis=0),)
    else:
      sums = tuple(jnp.sum(part) for part in parts) + (jnp.sum(rows, axis=0),)

    @pl.when(valid)
    def _store():
      for ref, value in zip(outs, sums):
        if value.ndim:
          ref[i, :] = value
        else:
          ref[i] = value

    return t_before, s_f + w * q, s_d + w * z

  def body(c, state):
    return jax.lax.fori_loop(0, chunk, functools.partial(splat_step, c=c), state)

  init = (t_fin, jnp.zeros((p,), dt), jnp.zeros((p,), dt))
  jax.lax.fori_loop(0, n_chunks, body, init)


def _tile_spec(geom: Geometry, extra=()):
  blk = (_squeezed(), geom.pixels_per_tile) + tuple(extra)
  return pl.BlockSpec(blk, lambda t: (t, 0) + (0,) * len(extra))


def pallas_forward(splats: Splats, isect: Intersections, geom: Geometry, interpret: bool):
  """Same contract as `tiled_xla.xla_forward`."""
  scal, feat = _gather_sorted(splats, isect, geom.chunk)
  dt = scal[0].dtype
  nt, p, c, cp = geom.n_tiles, geom.pixels_per_tile, splats.features.shape[1], feat.shape[1]
  f, d, t, stop_at = pl.pallas_call(
      functools.partial(_fwd_kernel, geom=geom),
      out_shape=(_out_struct((nt, p, cp), dt, isect.tile_start), _out_struct((nt, p), dt, isect.tile_start),
                 _out_struct((nt, p), dt, isect.tile_start), _out_struct((nt, p), jnp.int32, isect.tile_start)),
      grid=(nt,),
      in_specs=[_ANY] * 10,
      out_specs=(_tile_spec(geom, (cp,)), _tile_spec(geom), _tile_spec(geom), _tile_spec(geom)),
      interpret=interpret,
      compiler_params=_compiler_params(interpret),
      name="gs_composite_fwd",
  )(isect.tile_start, isect.tile_end, *scal, feat)
  return f[..., :c], d, t, stop_at


_GRAD_FEAT = 8  # "rows": first feature column of the gradient rows (7 splat quantities before it, one spare)


def pallas_backward(splats: Splats, isect: Intersections, geom: Geometry, t_fin, stop_at, g_f, g_d, g_t,
                    interpret: bool, reduction: str = "quantities"):
  """Same contract as `tiled_xla.xla_backward`."""
  c = splats.features.shape[1]
  offset = _GRAD_FEAT if reduction == "rows" else 0
  width = _next_pow2(offset + c)
  scal, feat = _gather_sorted(splats, isect, geom.chunk, offset=offset, width=width)
  dt = scal[0].dtype
  nt, mp = geom.n_tiles, feat.shape[0]
  g_f = jnp.pad(g_f, ((0, 0), (0, 0), (offset, width - c - offset)))
  zero = (isect.tile_start[:1] * 0).astype(dt)  # carries the inputs' shard_map varying axes (see tiled_xla)
  shapes = [(mp, width)] if reduction == "rows" else [(mp,)] * 7 + [(mp, width)]
  zeros = [jnp.zeros(shape, dt) + zero.reshape((1,) * (len(shape) - 1) + (1,)) for shape in shapes]
  n_in = 15
  outs = pl.pallas_call(
      functools.partial(_bwd_kernel, geom=geom, reduction=reduction),
      out_shape=tuple(_out_struct(z.shape, dt, isect.tile_start) for z in zeros),
      grid=(nt,),
      in_specs=[_ANY] * 10 + [_tile_spec(geom), _tile_spec(geom), _tile_spec(geom, (width,)), _tile_spec(geom),
                              _tile_spec(geom)] + [_ANY] * len(zeros),
      out_specs=tuple([_ANY] * len(zeros)),
      input_output_aliases={n_in + i: i for i in range(len(zeros))},
      interpret=interpret,
      compiler_params=_compiler_params(interpret),
      name="gs_composite_bwd",
  )(isect.tile_start, isect.tile_end, *scal, feat, t_fin, stop_at, g_f, g_d, g_t, *zeros)
  m = isect.gid.shape[0]
  if reduction == "rows":
    return outs[0][:m, :7], outs[0][:m, _GRAD_FEAT:_GRAD_FEAT + c]
  return jnp.stack([o[:m] for o in outs[:7]], -1), outs[7][:m, :c]


_composites = {
    (flag, reduction): make_composite(functools.partial(pallas_forward, interpret=flag),
                                      functools.partial(pallas_backward, interpret=flag, reduction=reduction))
    for flag in (False, True) for reduction in PALLAS_REDUCTIONS
}


def composite_pallas(splats: Splats, isect: Intersections, geom: Geometry, interpret: bool,
                     reduction: str = "quantities"):
  """Differentiable (F [n_tiles, P, C], D [n_tiles, P], T [n_tiles, P]) through the Pallas kernels; `reduction` one
  of PALLAS_REDUCTIONS."""
  return _composites[(bool(interpret), reduction)](splats, isect, geom)
