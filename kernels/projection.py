"""Shared 3D Gaussian splatting maths (gsplat v1 conventions), used by every rasterizer backend.

One copy of each rule lives here so that the dense reference, the tiled XLA path and the Pallas kernels cannot
drift apart:

- `quat_to_rotmat`, `covariance_3d`: Sigma = R S S^T R^T from a (w, x, y, z) quaternion (normalised here) and
  linear scales.
- `project`: world -> camera (OpenCV: x right, y down, z forward), EWA 2D covariance through the perspective
  Jacobian with x/z, y/z clamped to 1.3 x tan(half FOV) (gsplat v1 `persp_proj`), + eps2d (0.3) on the diagonal,
  conic = Sigma2d^-1, radius = ceil(3 sqrt(lambda_max)) (discriminant floored at 0.01), culling on near <= z <= far,
  det > 0 and the on-screen test.
- `tile_rect`: the tiles a Gaussian's 3-sigma box overlaps (gsplat `isect_tiles`). A Gaussian contributes to every
  pixel of those tiles (not only to pixels inside the box), exactly as in gsplat.
- `gaussian_alpha` / `alpha_vjp`: alpha = min(0.99, o exp(-sigma)), sigma = 0.5 d^T conic d, d = pixel - mean,
  skipped (alpha = 0) when sigma < 0 or alpha < 1/255; and its hand-written derivative (used by the custom VJPs).
- compositing constants: `ALPHA_MIN`, `ALPHA_MAX`, `T_EPS`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

ALPHA_MIN = 1.0 / 255.0  # gsplat ALPHA_THRESHOLD: weaker splats are skipped (no termination test either)
ALPHA_MAX = 0.99  # gsplat >= Feb 2026 / Inria MAX alpha (gsplat <= 1.5.3, STORM's pin, used 0.999)
T_EPS = 1e-4  # a pixel stops before the splat that would bring transmittance to <= T_EPS (exclusive)
EPS2D = 0.3  # low-pass dilation added to the 2D covariance diagonal
FOV_CLAMP = 1.3  # Jacobian clamp: |x/z| <= 1.3 * tan(half horizontal FOV), likewise y
SIGMA_CUT = 3.0  # radius = ceil(3 sqrt(lambda_max))


class Projected(NamedTuple):
  """Per (camera, Gaussian) screen-space quantities. Shapes [K, N, ...]."""
  means2d: jax.Array  # [K, N, 2] pixel coordinates (pixel centres at +0.5)
  conics: jax.Array  # [K, N, 3] (a, b, c) of Sigma2d^-1 = [[a, b], [b, c]]
  depths: jax.Array  # [K, N] camera z
  radii: jax.Array  # [K, N] float, integral-valued; 0 where culled
  valid: jax.Array  # [K, N] bool


def quat_to_rotmat(quats: jax.Array) -> jax.Array:
  """quats: [..., 4] (w, x, y, z), any norm (zero -> identity) -> [..., 3, 3]."""
  n2 = jnp.sum(quats * quats, axis=-1, keepdims=True)
  ok = n2 > 1e-24
  ident = jnp.zeros_like(quats).at[..., 0].set(1.0)
  # Double `where` keeps the gradient of a zero quaternion finite (zero) instead of NaN.
  q = jnp.where(ok, quats, ident) * jax.lax.rsqrt(jnp.where(ok, n2, 1.0))
  w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
  r = jnp.stack([
      1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
      2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
      2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
  ], axis=-1)
  return r.reshape(quats.shape[:-1] + (3, 3))


def covariance_3d(quats: jax.Array, scales: jax.Array) -> jax.Array:
  """quats [..., 4], scales [..., 3] (linear) -> Sigma [..., 3, 3] = (R S)(R S)^T."""
  m = quat_to_rotmat(quats) * scales[..., None, :]
  return m @ jnp.swapaxes(m, -1, -2)


def project(means: jax.Array, quats: jax.Array, scales: jax.Array, viewmats: jax.Array, Ks: jax.Array,
            width: int, height: int, near: float, far: float) -> Projected:
  """EWA projection of N Gaussians into K pinhole cameras.

  means [N, 3], quats [N, 4], scales [N, 3], viewmats [K, 4, 4] world-to-camera, Ks [K, 3, 3].
  Culled entries have valid = False, radius 0 and finite (masked) values, with zero (not NaN) gradients.
  """
  cov_w = covariance_3d(quats, scales)  # [N, 3, 3]
  rot = viewmats[:, None, :3, :3]  # [K, 1, 3, 3]
  p = jnp.einsum("knij,nj->kni", rot, means) + viewmats[:, None, :3, 3]  # [K, N, 3]
  x, y, z = p[..., 0], p[..., 1], p[..., 2]
  in_depth = (z >= near) & (z <= far)
  zs = jnp.where(in_depth, z, 1.0)  # safe divisor: culled entries never see z <= 0
  fx, fy = Ks[:, 0, 0][:, None], Ks[:, 1, 1][:, None]
  cx, cy = Ks[:, 0, 2][:, None], Ks[:, 1, 2][:, None]
  lim_x = FOV_CLAMP * 0.5 * width / fx
  lim_y = FOV_CLAMP * 0.5 * height / fy
  tx = zs * jnp.clip(x / zs, -lim_x, lim_x)
  ty = zs * jnp.clip(y / zs, -lim_y, lim_y)
  zero = jnp.zeros_like(zs)
  jac = jnp.stack([
      jnp.stack([fx / zs, zero, -fx * tx / (zs * zs)], -1),
      jnp.stack([zero, fy / zs, -fy * ty / (zs * zs)], -1),
  ], -2)  # [K, N, 2, 3]
  cov_c = rot @ cov_w[None] @ jnp.swapaxes(rot, -1, -2)  # [K, N, 3, 3]
  cov2 = jac @ cov_c @ jnp.swapaxes(jac, -1, -2)  # [K, N, 2, 2]
  a = cov2[..., 0, 0] + EPS2D
  b = 0.5 * (cov2[..., 0, 1] + cov2[..., 1, 0])
  c = cov2[..., 1, 1] + EPS2D
  det = a * c - b * b
  det_ok = det > 0
  dets = jnp.where(det_ok, det, 1.0)
  conics = jnp.stack([c / dets, -b / dets, a / dets], -1)
  half = 0.5 * (a + c)
  lam = half + jnp.sqrt(jnp.maximum(0.01, half * half - det))
  radius = jnp.ceil(SIGMA_CUT * jnp.sqrt(jnp.maximum(lam, 0.0)))
  mx = fx * x / zs + cx
  my = fy * y / zs + cy
  on_screen = (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
  valid = in_depth & det_ok & (radius > 0) & on_screen
  radius = jnp.where(valid, jax.lax.stop_gradient(radius), 0.0)
  means2d = jnp.where(valid[..., None], jnp.stack([mx, my], -1), 0.0)
  conics = jnp.where(valid[..., None], conics, 0.0)
  depths = jnp.where(valid, z, 0.0)
  return Projected(means2d, conics, depths, radius, valid)


def cull_transparent(proj: Projected, opacities: jax.Array) -> Projected:
  """Also culls the Gaussians with opacity below ALPHA_MIN (opacities [N]): their alpha is below it at every pixel,
  where every backend skips them (no colour, no gradient), so dropping them from the tile lists changes no output
  and no gradient, only the work (gsplat's projection culls them too). Zero-opacity Gaussians are common: STORM-VAE
  gives padded view slots opacity 0."""
  keep = proj.valid & (jax.lax.stop_gradient(opacities) >= ALPHA_MIN)[None, :]
  return Projected(jnp.where(keep[..., None], proj.means2d, 0.0), jnp.where(keep[..., None], proj.conics, 0.0),
                   jnp.where(keep, proj.depths, 0.0), jnp.where(keep, proj.radii, 0.0), keep)


def tile_rect(means2d: jax.Array, radii: jax.Array, tile_size: int, tiles_x: int, tiles_y: int):
  """Tile range [x0, x1) x [y0, y1) (int32) overlapped by each Gaussian's box; empty where radius == 0.

  means2d [..., 2], radii [...]. Same float rounding in every backend, so the sets of tiles agree exactly.
  """
  m = jax.lax.stop_gradient(means2d) / tile_size
  r = radii / tile_size
  x0 = jnp.clip(jnp.floor(m[..., 0] - r), 0, tiles_x).astype(jnp.int32)
  x1 = jnp.clip(jnp.ceil(m[..., 0] + r), 0, tiles_x).astype(jnp.int32)
  y0 = jnp.clip(jnp.floor(m[..., 1] - r), 0, tiles_y).astype(jnp.int32)
  y1 = jnp.clip(jnp.ceil(m[..., 1] + r), 0, tiles_y).astype(jnp.int32)
  live = radii > 0
  x1 = jnp.where(live, jnp.maximum(x1, x0), x0)
  y1 = jnp.where(live, jnp.maximum(y1, y0), y0)
  return x0, x1, y0, y1


def gaussian_alpha(dx, dy, ca, cb, cc, opacity):
  """Splat alpha at offset d = pixel - mean (all broadcastable arrays). Returns (alpha, raw, gauss).

  alpha: min(ALPHA_MAX, raw), zero where sigma < 0 or alpha < ALPHA_MIN; raw = opacity * gauss,
  gauss = exp(-sigma). Differentiable with autodiff (the reference relies on that).
  """
  sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
  gauss = jnp.exp(-jnp.maximum(sigma, 0.0))
  raw = opacity * gauss
  alpha = jnp.minimum(raw, ALPHA_MAX)
  keep = (sigma >= 0) & (alpha >= ALPHA_MIN)
  return jnp.where(keep, alpha, 0.0), raw, gauss


def alpha_vjp(dalpha, dx, dy, ca, cb, cc, alpha, raw, gauss):
  """Cotangents of (mean_x, mean_y, conic a, b, c, opacity) from dL/dalpha (elementwise, not reduced).

  Matches autodiff of `gaussian_alpha`: zero where the splat was skipped or alpha was clamped at ALPHA_MAX.
  """
  live = (alpha > 0) & (raw < ALPHA_MAX)
  da = jnp.where(live, dalpha, 0.0)
  dsigma = -raw * da  # d alpha / d sigma = -o exp(-sigma)
  d_op = gauss * da
  d_ca = 0.5 * dx * dx * dsigma
  d_cb = dx * dy * dsigma
  d_cc = 0.5 * dy * dy * dsigma
  # d = pixel - mean, so d sigma / d mean = -(conic @ d).
  d_mx = -(ca * dx + cb * dy) * dsigma
  d_my = -(cb * dx + cc * dy) * dsigma
  return d_mx, d_my, d_ca, d_cb, d_cc, d_op
