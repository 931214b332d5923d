"""Dense reference rasterizer: every Gaussian against every pixel, plain jnp, plain autodiff. The oracle.

Cost is O(K * H * W * N) memory and time: for tests and tiny images only. It follows exactly the rules of
`projection.py` (shared with the tiled backends), with the compositing written as a cumulative product:
  T_i = prod_{j < i} (1 - alpha_j) over the depth-sorted splats of a pixel,
  splat i is used iff alpha_i > 0 and T_i (1 - alpha_i) > T_EPS (the product is monotone, so this is the same as
  gsplat's sequential "stop before the splat that would bring T to <= 1e-4"),
  features = sum_used alpha_i T_i c_i, depth = sum_used alpha_i T_i z_i, T_final = prod_used (1 - alpha_i).
Depth ties are broken by Gaussian index (stable sort), like gsplat's stable radix sort of (tile, depth) keys.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from . import projection as pj


def composite_dense(proj: pj.Projected, opacities, features, width: int, height: int, tile_size: int):
  """proj: [K, N, ...]; opacities [N]; features [N, C] -> (F [K, H, W, C] without background, D [K, H, W], T [K, H, W])."""
  tiles_x = -(-width // tile_size)
  tiles_y = -(-height // tile_size)
  x0, x1, y0, y1 = pj.tile_rect(proj.means2d, proj.radii, tile_size, tiles_x, tiles_y)  # [K, N]
  ys, xs = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  xs, ys = xs.reshape(-1), ys.reshape(-1)  # [P]
  dt = proj.means2d.dtype
  px, py = xs.astype(dt) + 0.5, ys.astype(dt) + 0.5
  ptx, pty = xs // tile_size, ys // tile_size

  def one_camera(m2, con, z, valid, x0, x1, y0, y1):
    order = jnp.argsort(jnp.where(valid, jax.lax.stop_gradient(z), jnp.inf), stable=True)
    m2, con, z, valid = m2[order], con[order], z[order], valid[order]
    x0, x1, y0, y1 = x0[order], x1[order], y0[order], y1[order]
    op, feat = opacities[order], features[order]
    inside = ((ptx[:, None] >= x0) & (ptx[:, None] < x1) & (pty[:, None] >= y0) & (pty[:, None] < y1)
              & valid[None])  # [P, N]
    alpha, _, _ = pj.gaussian_alpha(px[:, None] - m2[None, :, 0], py[:, None] - m2[None, :, 1],
                                    con[None, :, 0], con[None, :, 1], con[None, :, 2], op[None])
    alpha = jnp.where(inside, alpha, 0.0)
    onem = 1.0 - alpha
    t_incl = jnp.cumprod(onem, axis=1)
    t_before = jnp.concatenate([jnp.ones_like(onem[:, :1]), t_incl[:, :-1]], axis=1)
    use = (alpha > 0) & (t_incl > pj.T_EPS)
    w = jnp.where(use, alpha * t_before, 0.0)
    f = w @ feat
    d = w @ z
    t = jnp.prod(jnp.where(use, onem, 1.0), axis=1)
    return f, d, t

  f, d, t = jax.vmap(one_camera)(proj.means2d, proj.conics, proj.depths, proj.valid, x0, x1, y0, y1)
  k = f.shape[0]
  return (f.reshape(k, height, width, -1), d.reshape(k, height, width), t.reshape(k, height, width))
