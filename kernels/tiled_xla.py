"""Tiled rasterizer in plain XLA (any backend; the TPU path), plus the binning and custom VJP shared with Pallas.

Pipeline (all static shapes, no host synchronisation):
1. `projection.project` (plain JAX, differentiated by autodiff, so gradients also reach viewmats and Ks).
2. `intersect`: each visible (camera, Gaussian) emits one entry per overlapped tile into a fixed `capacity` buffer
   (`jnp.repeat` with `total_repeat_length`); entries beyond `capacity` are dropped and COUNTED (`overflow`). The
   running count saturates at COUNT_LIMIT (2^30 - 1) instead of wrapping int32: past it, `overflow` is a lower bound.
   Two stable uint32 radix sorts (by depth bits, then by camera*tiles + tile) give gsplat's (camera, tile, depth)
   order without 64-bit keys (x64 need not be on); per-tile [start, end) come from `searchsorted`.
3. Per-tile compositing, here vectorised over all tiles: a `while_loop` over chunks of `chunk` sorted splats; inside
   a chunk the transmittance is a cumulative product. The trip count is the longest tile list (dynamic, so there is
   no per-tile cap and no second overflow source), cut short once every pixel is done.

Gradients: a `jax.custom_vjp` around step 3 (`make_composite`). Why not autodiff: reverse-mode cannot go through a
while_loop with a dynamic trip count, and a static-length scan would store per-chunk state of every tile
([tiles, 256, chunk] floats per step) for the backward pass: gigabytes at STORM-VAE scale. The forward pass also
returns each pixel's stop index (the slot at which it terminated), so the backward pass knows the used splats
without re-deciding any threshold. The backward pass runs gsplat's way, back to front from the last used chunk:
T before a splat is T after it divided by (1 - alpha) (alpha <= 0.99), and the colour/depth of the splats behind is
accumulated from the back, dotted with the output cotangent first so only [tiles, 256, chunk] scalars are live
(a front-to-back "total - prefix" variant lost ~eps |F| / (1 - alpha) to cancellation in float32). Per-intersection
gradients go to an [M, 7 + C] buffer and are reduced to Gaussians with `segment_sum` (deterministic, no atomics).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from . import projection as pj


class Geometry(NamedTuple):
  """Static layout of the tiled image batch (hashable: used as a nondiff argument)."""
  n_images: int
  width: int
  height: int
  tile_size: int
  tiles_x: int
  tiles_y: int
  chunk: int

  @property
  def tiles_per_image(self) -> int:
    return self.tiles_x * self.tiles_y

  @property
  def n_tiles(self) -> int:
    return self.n_images * self.tiles_per_image

  @property
  def pixels_per_tile(self) -> int:
    return self.tile_size * self.tile_size


class Intersections(NamedTuple):
  gid: jax.Array  # [M] int32 flat (camera * N + gaussian) index in (camera, tile, depth) order; K*N = unused slot
  tile_start: jax.Array  # [n_tiles] int32
  tile_end: jax.Array  # [n_tiles] int32
  total: jax.Array  # [] int32 intersections requested (may exceed capacity)
  overflow: jax.Array  # [] int32 intersections dropped = max(total - capacity, 0) (a lower bound once saturated)


class Splats(NamedTuple):
  """Differentiable inputs of the compositing step."""
  means2d: jax.Array  # [K*N, 2]
  conics: jax.Array  # [K*N, 3]
  depths: jax.Array  # [K*N]
  opacities: jax.Array  # [N]
  features: jax.Array  # [N, C]


def default_capacity(n_gaussians: int, n_images: int, tiles_per_image: int) -> int:
  """Default intersection buffer: 16 per Gaussian (gsplat's STORM-VAE scene needs ~10.4), at least 4096, at most
  every (camera, Gaussian, tile) triple; rounded up to a multiple of 1024. Pass `capacity` for dense/huge splats."""
  cap = max(16 * n_gaussians, 4096)
  cap = min(cap, max(n_gaussians * n_images * tiles_per_image, 1))
  return -(-cap // 1024) * 1024


def tile_counts(proj: pj.Projected, geom: Geometry):
  x0, x1, y0, y1 = pj.tile_rect(proj.means2d, proj.radii, geom.tile_size, geom.tiles_x, geom.tiles_y)
  return x0, x1, y0, y1, (x1 - x0) * (y1 - y0)


# Saturation point of the intersection counts: a running int32 sum wraps negative past 2^31 (the K x N x tiles of
# large Gaussians at the STORM-VAE scale can get there), which would draw nothing and report no overflow; two
# saturated partial sums still fit in int32.
COUNT_LIMIT = 2 ** 30 - 1


def _saturating_cumsum(counts: jax.Array) -> jax.Array:
  """Inclusive prefix sums of non-negative int32 counts (each <= COUNT_LIMIT), saturating at COUNT_LIMIT."""
  return jax.lax.associative_scan(lambda a, b: jnp.minimum(a + b, COUNT_LIMIT), counts)


def count_intersections(proj: pj.Projected, geom: Geometry) -> jax.Array:
  """Number of (camera, Gaussian, tile) intersections, saturating at COUNT_LIMIT: call it eagerly to size
  `capacity`."""
  counts = tile_counts(proj, geom)[-1].reshape(-1)
  return _saturating_cumsum(counts)[-1] if counts.size else jnp.int32(0)


def intersect(proj: pj.Projected, geom: Geometry, capacity: int) -> Intersections:
  """Bin the projected Gaussians [K, N] into tiles; see the module docstring."""
  k, n = proj.depths.shape
  kn = k * n
  x0, x1, y0, y1, counts = (a.reshape(-1) for a in tile_counts(proj, geom))
  ends = _saturating_cumsum(counts) if kn else counts
  total = ends[-1] if kn else jnp.int32(0)
  # Only the first `capacity` entries are kept: capping the ends there keeps every sum below (jnp.repeat's own
  # cumsum included) exact, and leaves the entries that fit unchanged.
  ends = jnp.minimum(ends, capacity)
  starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]]) if kn else ends
  counts = ends - starts
  slot = jnp.arange(capacity, dtype=jnp.int32)
  if kn:
    src = jnp.repeat(jnp.arange(kn, dtype=jnp.int32), counts, total_repeat_length=capacity)
  else:
    src = jnp.zeros((capacity,), jnp.int32)
  live = slot < total
  local = slot - starts[src]
  w = jnp.maximum(x1 - x0, 1)[src]
  tx = x0[src] + local % w
  ty = y0[src] + local // w
  cam = src // max(n, 1)
  tile_key = (cam * geom.tiles_per_image + ty * geom.tiles_x + tx).astype(jnp.uint32)
  depth = jax.lax.stop_gradient(proj.depths).reshape(-1)[src] if kn else jnp.zeros((capacity,))
  # Positive float32 bit patterns sort like the floats (depth >= near > 0).
  depth_key = jax.lax.bitcast_convert_type(depth.astype(jnp.float32), jnp.uint32)
  sentinel = jnp.uint32(0xFFFFFFFF)
  depth_key = jnp.where(live, depth_key, sentinel)
  tile_key = jnp.where(live, tile_key, sentinel)
  gid = jnp.where(live, src, kn)
  # LSD order: stable sort by the minor key (depth), then by the major key (camera, tile).
  _, perm = jax.lax.sort_key_val(depth_key, slot, is_stable=True)
  tile_sorted, perm = jax.lax.sort_key_val(tile_key[perm], perm, is_stable=True)
  gid = gid[perm]
  tiles = jnp.arange(geom.n_tiles, dtype=jnp.uint32)
  tile_start = jnp.searchsorted(tile_sorted, tiles, side="left").astype(jnp.int32)
  tile_end = jnp.searchsorted(tile_sorted, tiles, side="right").astype(jnp.int32)
  total = total.astype(jnp.int32)
  overflow = jnp.maximum(total - capacity, 0).astype(jnp.int32)
  return Intersections(gid, tile_start, tile_end, total, overflow)


def pixel_centres(geom: Geometry, dtype):
  """[n_tiles, P] x and y pixel centres (+0.5) of every tile's pixels (row-major inside the tile)."""
  t = jnp.arange(geom.n_tiles) % geom.tiles_per_image
  lane = jnp.arange(geom.pixels_per_tile)
  px = (t % geom.tiles_x)[:, None] * geom.tile_size + (lane % geom.tile_size)[None]
  py = (t // geom.tiles_x)[:, None] * geom.tile_size + (lane // geom.tile_size)[None]
  return px.astype(dtype) + 0.5, py.astype(dtype) + 0.5


def tiles_to_image(x: jax.Array, geom: Geometry) -> jax.Array:
  """[n_tiles, P, ...] -> [K, H, W, ...] (crops the padding of the last tile row/column)."""
  ts = geom.tile_size
  rest = x.shape[2:]
  x = x.reshape((geom.n_images, geom.tiles_y, geom.tiles_x, ts, ts) + rest)
  x = jnp.moveaxis(x, 3, 2)
  x = x.reshape((geom.n_images, geom.tiles_y * ts, geom.tiles_x * ts) + rest)
  return x[:, :geom.height, :geom.width]


def image_to_tiles(x: jax.Array, geom: Geometry) -> jax.Array:
  """Inverse of `tiles_to_image` (zero padding)."""
  ts = geom.tile_size
  rest = x.shape[3:]
  pad = [(0, 0), (0, geom.tiles_y * ts - geom.height), (0, geom.tiles_x * ts - geom.width)] + [(0, 0)] * len(rest)
  x = jnp.pad(x, pad)
  x = x.reshape((geom.n_images, geom.tiles_y, ts, geom.tiles_x, ts) + rest)
  x = jnp.moveaxis(x, 2, 3)
  return x.reshape((geom.n_tiles, geom.pixels_per_tile) + rest)


# ------------------------------------------------------------------------------------------------------------------
# XLA compositing (forward and backward), vectorised over all tiles.

def _gather_chunk(splats: Splats, isect: Intersections, c, chunk: int):
  """Splat parameters of chunk c of every tile: each [n_tiles, chunk(, ...)], plus the slot index and mask."""
  m = isect.gid.shape[0]
  kn = splats.depths.shape[0]
  n = splats.opacities.shape[0]
  idx = isect.tile_start[:, None] + c * chunk + jnp.arange(chunk, dtype=jnp.int32)[None]
  ok = idx < isect.tile_end[:, None]
  g = jnp.where(ok, isect.gid[jnp.minimum(idx, m - 1)], 0)
  ok = ok & (g < kn)
  g = jnp.minimum(g, kn - 1)
  gn = g % n
  return (idx, ok, splats.means2d[g], splats.conics[g], splats.depths[g], splats.opacities[gn],
          splats.features[gn])


def _chunk_alpha(px, py, m2, con, op, ok, active):
  """alpha etc. [n_tiles, P, chunk] for one chunk; splats outside the tile list or for done pixels get 0."""
  dx = px[:, :, None] - m2[:, None, :, 0]
  dy = py[:, :, None] - m2[:, None, :, 1]
  ca, cb, cc = (con[:, None, :, i] for i in range(3))
  alpha, raw, gauss = pj.gaussian_alpha(dx, dy, ca, cb, cc, op[:, None, :])
  alpha = jnp.where(ok[:, None, :] & active[:, :, None], alpha, 0.0)
  return alpha, raw, gauss, dx, dy, ca, cb, cc


def _chunk_weights(alpha, t):
  """Sequential front-to-back rule for one chunk, as a cumulative product. t: [n_tiles, P] at chunk start."""
  onem = 1.0 - alpha
  t_incl = t[..., None] * jnp.cumprod(onem, axis=-1)
  t_before = jnp.concatenate([t[..., None], t_incl[..., :-1]], axis=-1)
  stop = (alpha > 0) & (t_incl <= pj.T_EPS)
  use = (alpha > 0) & ~stop
  w = jnp.where(use, alpha * t_before, 0.0)
  t_new = t * jnp.prod(jnp.where(use, onem, 1.0), axis=-1)
  return use, w, t_before, t_new, jnp.any(stop, axis=-1)


def _n_chunks(isect: Intersections, chunk: int):
  return (jnp.max(isect.tile_end - isect.tile_start, initial=0) + chunk - 1) // chunk


def _varying_zero(isect: Intersections, dtype):
  """[n_tiles] zeros computed from the inputs: loop carries initialised from it carry the inputs' shard_map
  varying-axes type, so the while loops type-check inside `jax.shard_map` (cameras sharded)."""
  return (isect.tile_start * 0).astype(dtype)


def xla_forward(splats: Splats, isect: Intersections, geom: Geometry):
  """-> F [n_tiles, P, C] (no background), D [n_tiles, P], T [n_tiles, P], stop [n_tiles, P] int32.

  stop: sorted-slot index of the splat at which the pixel stopped (excluded), or INT32_MAX: splat i was used by
  the pixel iff alpha_i > 0 and i < stop. The backward pass takes the used set from it (no threshold re-decided).
  """
  dt = splats.means2d.dtype
  px, py = pixel_centres(geom, dt)
  nt, p, cdim = geom.n_tiles, geom.pixels_per_tile, splats.features.shape[-1]
  n_chunks = _n_chunks(isect, geom.chunk)
  big = jnp.iinfo(jnp.int32).max

  def cond(carry):
    c, _, active, _, _, _ = carry
    return (c < n_chunks) & jnp.any(active)

  def body(carry):
    c, t, active, f, d, stop_at = carry
    idx, ok, m2, con, z, op, feat = _gather_chunk(splats, isect, c, geom.chunk)
    alpha = _chunk_alpha(px, py, m2, con, op, ok, active)[0]
    use, w, _, t, stopped = _chunk_weights(alpha, t)
    first = jnp.min(jnp.where((alpha > 0) & ~use, idx[:, None, :], big), -1)
    stop_at = jnp.minimum(stop_at, first)
    f = f + jnp.einsum("tpb,tbc->tpc", w, feat)
    d = d + jnp.einsum("tpb,tb->tp", w, z)
    return c + 1, t, active & ~stopped, f, d, stop_at

  zero = _varying_zero(isect, dt)[:, None]
  init = (jnp.int32(0), 1.0 + jnp.zeros((nt, p), dt) + zero, jnp.ones((nt, p), bool) & (zero == 0),
          jnp.zeros((nt, p, cdim), dt) + zero[..., None], jnp.zeros((nt, p), dt) + zero,
          jnp.full((nt, p), big, jnp.int32) + zero.astype(jnp.int32))
  _, t, _, f, d, stop_at = jax.lax.while_loop(cond, body, init)
  return f, d, t, stop_at


def xla_backward(splats: Splats, isect: Intersections, geom: Geometry, t_fin, stop_at, g_f, g_d, g_t):
  """Per-intersection cotangents: ([M, 7] for (mean x, mean y, conic a, b, c, opacity, depth), [M, C]).

  gsplat's order: chunks from the back to the front; T before a chunk is T after it divided by the chunk's
  prod(1 - alpha) over used splats, and the colour/depth behind splat i is accumulated from the back (no
  total - prefix cancellation).
  """
  dt = splats.means2d.dtype
  px, py = pixel_centres(geom, dt)
  nt, p = geom.n_tiles, geom.pixels_per_tile
  m, cdim = isect.gid.shape[0], splats.features.shape[-1]
  # Chunks beyond every pixel's stop hold no used splat: start from the last chunk that can.
  last = jnp.minimum(jnp.max(stop_at, -1), isect.tile_end)
  c_hi = (jnp.max(last - isect.tile_start, initial=0) + geom.chunk - 1) // geom.chunk
  gt_term = g_t * t_fin  # dT_final/dalpha_i = -T_final / (1 - alpha_i)

  def excl_suffix(x):  # sum over k > i within the chunk, without subtracting x_i
    incl = jnp.flip(jnp.cumsum(jnp.flip(x, -1), -1), -1)
    return jnp.concatenate([incl[..., 1:], jnp.zeros_like(incl[..., :1])], -1)

  def cond(carry):
    return carry[0] >= 0

  def body(carry):
    c, t_after, s_f, s_d, g_s, g_c = carry
    idx, ok, m2, con, z, op, feat = _gather_chunk(splats, isect, c, geom.chunk)
    alpha, raw, gauss, dx, dy, ca, cb, cc = _chunk_alpha(px, py, m2, con, op, ok, jnp.ones_like(t_after, bool))
    use = (alpha > 0) & (idx[:, None, :] < stop_at[..., None])
    onem = jnp.where(use, 1.0 - alpha, 1.0)
    t_start = t_after / jnp.prod(onem, -1)
    t_before = t_start[..., None] * jnp.concatenate([jnp.ones_like(onem[..., :1]), jnp.cumprod(onem, -1)[..., :-1]],
                                                    -1)
    w = jnp.where(use, alpha * t_before, 0.0)
    q = jnp.einsum("tpc,tbc->tpb", g_f, feat)  # dL/dF . c_i
    wq, wz = w * q, w * z[:, None, :]
    behind_f = s_f[..., None] + excl_suffix(wq)  # dL/dF . (colour of the used splats behind i)
    behind_d = s_d[..., None] + excl_suffix(wz)
    inv = 1.0 / (1.0 - alpha)
    zz = z[:, None, :]
    dalpha = (q * t_before - behind_f * inv + g_d[..., None] * (zz * t_before - behind_d * inv)
              - gt_term[..., None] * inv)
    dalpha = jnp.where(use, dalpha, 0.0)
    parts = pj.alpha_vjp(dalpha, dx, dy, ca, cb, cc, alpha, raw, gauss)
    g_z = jnp.sum(w * g_d[..., None], 1)
    scal = jnp.stack([jnp.sum(x, 1) for x in parts] + [g_z], -1)  # [nt, chunk, 7]
    s_idx = jnp.where(ok, idx, m).reshape(-1)  # out of range -> dropped
    g_s = g_s.at[s_idx].set(scal.reshape(-1, 7), mode="drop")
    g_c = g_c.at[s_idx].set(jnp.einsum("tpb,tpc->tbc", w, g_f).reshape(-1, cdim), mode="drop")
    return c - 1, t_start, s_f + jnp.sum(wq, -1), s_d + jnp.sum(wz, -1), g_s, g_c

  zero = _varying_zero(isect, dt)[:, None]
  zero_m = (isect.gid[:, None] * 0).astype(dt)
  init = (c_hi - 1, t_fin + zero, jnp.zeros((nt, p), dt) + zero, jnp.zeros((nt, p), dt) + zero,
          jnp.zeros((m, 7), dt) + zero_m, jnp.zeros((m, cdim), dt) + zero_m)
  out = jax.lax.while_loop(cond, body, init)
  return out[4], out[5]


# ------------------------------------------------------------------------------------------------------------------
# custom_vjp shared by the XLA and Pallas compositors.

def _reduce_to_splats(splats: Splats, isect: Intersections, g_s, g_c) -> Splats:
  """Sum per-intersection cotangents into per-(camera, Gaussian) / per-Gaussian ones (unused slots dropped)."""
  kn, n = splats.depths.shape[0], splats.opacities.shape[0]
  gid = isect.gid
  gn = jnp.where(gid < kn, gid % max(n, 1), n)
  per_kn = jax.ops.segment_sum(g_s[:, [0, 1, 2, 3, 4, 6]], gid, num_segments=kn)
  per_n = jax.ops.segment_sum(jnp.concatenate([g_s[:, 5:6], g_c], -1), gn, num_segments=n)
  return Splats(per_kn[:, 0:2], per_kn[:, 2:5], per_kn[:, 5], per_n[:, 0], per_n[:, 1:])


def make_composite(forward: Callable, backward: Callable):
  """Wrap a (forward, backward) pair with the signatures of `xla_forward` / `xla_backward` into a differentiable
  `composite(splats, isect, geom) -> (F, D, T)` (cotangents for splats only)."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def composite(splats: Splats, isect: Intersections, geom: Geometry):
    return forward(splats, isect, geom)[:3]

  def fwd(splats, isect, geom):
    f, d, t, stop_at = forward(splats, isect, geom)
    return (f, d, t), (splats, isect, t, stop_at)

  def bwd(geom, res, cts):
    splats, isect, t, stop_at = res
    g_f, g_d, g_t = cts
    g_s, g_c = backward(splats, isect, geom, t, stop_at, g_f, g_d, g_t)
    zero_isect = jax.tree.map(lambda x: None, isect)
    return _reduce_to_splats(splats, isect, g_s, g_c), zero_isect

  composite.defvjp(fwd, bwd)
  return composite


composite_xla = make_composite(xla_forward, xla_backward)
