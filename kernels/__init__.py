"""Differentiable 3D Gaussian rasterizer (gsplat v1 conventions) with reference, XLA and Pallas backends.

Conventions (shared by every backend; the maths is in `projection.py`):
- Cameras: `viewmats` [K, 4, 4] world-to-camera, OpenCV axes (x right, y down, z forward); `Ks` [K, 3, 3] pixel
  intrinsics; pixel (i, j) has its centre at (j + 0.5, i + 0.5).
- Gaussians: means [N, 3] world; quats [N, 4] (w, x, y, z), normalised internally; scales [N, 3] linear;
  opacities [N] in [0, 1]; features [N, C], any C >= 1 (no spherical harmonics).
- Projection: EWA, Sigma2d = J W Sigma W^T J^T with the perspective Jacobian at the centre, x/z and y/z clamped to
  +-1.3 tan(half FOV) inside J (gsplat v1); + 0.3 on the diagonal (eps2d low-pass); conic = Sigma2d^-1.
- Culling: centre camera z outside [near, far] (STORM: 0.2, 400 m), det(Sigma2d) <= 0, the 3-sigma box
  (radius = ceil(3 sqrt(lambda_max))) entirely off-screen, or opacity < 1/255 (no effect on any output). A Gaussian is composited into every pixel of the 16x16
  tiles its box overlaps, as in gsplat (so `tile_size` is part of the definition, also for the reference).
- alpha = min(0.99, opacity * exp(-0.5 d^T Sigma2d^-1 d)), d = pixel - mean2d; splats with alpha < 1/255 are
  skipped; front-to-back in depth order (ties by Gaussian index); a pixel stops before the splat that would bring
  its transmittance to <= 1e-4.
- Outputs: features = sum w_i c_i + background * T_final; depth = sum w_i z_i (camera z of the centre, NOT divided
  by alpha: gsplat's "ED" is depth / max(alpha, 1e-10)); alpha = 1 - T_final; w_i = alpha_i prod_{j<i}(1 - alpha_j).

Backends: "reference" (dense, autodiff, tiny problems), "xla" (tiled, any platform; the TPU path), "pallas" (Triton
kernels on GPU, interpreter elsewhere). "auto" = pallas on GPU, xla otherwise. The tiled backends bin into a fixed
`capacity` buffer and return the number of dropped intersections as `overflow` (check it!).

Computed in float32 (float64 if the inputs are; bf16 inputs are promoted, outputs are float32).
Differentiable (jit/grad/vmap/shard_map) w.r.t. means, quats, scales, opacities, features, background, and also
viewmats and Ks (the projection is plain JAX; the tile assignment and depth order are piecewise constant).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import projection, reference, tiled_xla
from .projection import Projected, cull_transparent, project
from .tiled_xla import Geometry, Intersections, Splats, count_intersections, default_capacity, intersect

BACKENDS = ("auto", "reference", "xla", "pallas")
PALLAS_REDUCTIONS = ("quantities", "rows")  # how the Pallas backward sums over a tile's pixels (pallas_gpu)


class RenderOutput(NamedTuple):
  features: jax.Array  # [K, H, W, C] composited features (+ background * (1 - alpha) if background given)
  depth: jax.Array  # [K, H, W] expected depth sum_i w_i z_i (camera z), not normalised by alpha
  alpha: jax.Array  # [K, H, W] accumulated opacity
  overflow: jax.Array  # [] int32 tile-Gaussian intersections dropped for lack of capacity (0 for the reference)


def resolve_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"rasterize: backend={backend!r}, expected one of {BACKENDS}")
  if backend == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return backend


def _check(means, quats, scales, opacities, features, viewmats, Ks, background):
  n = means.shape[0]
  want = {"means": (means, (n, 3)), "quats": (quats, (n, 4)), "scales": (scales, (n, 3)),
          "opacities": (opacities, (n,))}
  for name, (x, shape) in want.items():
    if tuple(x.shape) != shape:
      raise ValueError(f"rasterize: {name} has shape {tuple(x.shape)}, expected {shape}")
  if features.ndim != 2 or features.shape[0] != n or features.shape[1] < 1:
    raise ValueError(f"rasterize: features has shape {tuple(features.shape)}, expected ({n}, C >= 1)")
  k = viewmats.shape[0]
  if tuple(viewmats.shape) != (k, 4, 4) or tuple(Ks.shape) != (k, 3, 3) or k < 1:
    raise ValueError(f"rasterize: viewmats {tuple(viewmats.shape)} / Ks {tuple(Ks.shape)}, expected (K, 4, 4) / "
                     f"(K, 3, 3) with the same K >= 1")
  c = features.shape[1]
  if background is not None and tuple(background.shape) not in ((c,), (k, c)):
    raise ValueError(f"rasterize: background has shape {tuple(background.shape)}, expected ({c},) or ({k}, {c})")


def rasterize(means, quats, scales, opacities, features, viewmats, Ks, width: int, height: int, *, near=0.2,
              far=400.0, background=None, backend="auto", tile_size=16, capacity=None, chunk=32,
              interpret=None, pallas_reduction="quantities") -> RenderOutput:
  """Render N Gaussians into K cameras. Shapes and conventions: see the module docstring.

  capacity: intersection buffer size of the tiled backends (default `default_capacity`); `chunk`: splats per
  compositing step (power of two for Pallas); `interpret`: Pallas interpreter (default: when not on GPU);
  `pallas_reduction`: how the Pallas backward sums each splat's gradient over a tile's pixels, "quantities" or
  "rows" (`PALLAS_REDUCTIONS`; same result, different speed; checked whatever the backend).
  """
  _check(means, quats, scales, opacities, features, viewmats, Ks, background)
  backend = resolve_backend(backend)
  if backend == "pallas" and interpret is None:
    interpret = jax.default_backend() != "gpu"
  if pallas_reduction not in PALLAS_REDUCTIONS:
    raise ValueError(f"rasterize: pallas_reduction={pallas_reduction!r}, expected one of {PALLAS_REDUCTIONS}")
  for name, value in (("width", width), ("height", height), ("tile_size", tile_size), ("chunk", chunk)):
    if int(value) < 1:
      raise ValueError(f"rasterize: {name}={value} must be >= 1")
  if capacity is not None and int(capacity) < 1:
    raise ValueError(f"rasterize: capacity={capacity} must be >= 1 (None: default_capacity)")
  if not 0 < float(near) < float(far):
    # z = 0 divides by zero in the projection; behind the camera (z < 0) nothing is drawn correctly.
    raise ValueError(f"rasterize: near={near}, far={far}: need 0 < near < far")
  if backend == "pallas":
    # Triton's block reductions run over chunk splats and tile_size^2 pixel lanes: both must be powers of two.
    if chunk & (chunk - 1):
      raise ValueError(f"rasterize: chunk={chunk} must be a power of two for the Pallas backend")
    if tile_size & (tile_size - 1):
      raise ValueError(f"rasterize: tile_size={tile_size} must be a power of two for the Pallas backend")
  return _rasterize_jit(means, quats, scales, opacities, features, viewmats, Ks, background, width=int(width),
                        height=int(height), near=float(near), far=float(far), backend=backend,
                        tile_size=int(tile_size), capacity=None if capacity is None else int(capacity),
                        chunk=int(chunk), interpret=bool(interpret), pallas_reduction=str(pallas_reduction))


_project_remat = jax.checkpoint(project, static_argnums=(5, 6, 7, 8))


@functools.partial(jax.jit, static_argnames=("width", "height", "near", "far", "backend", "tile_size", "capacity",
                                             "chunk", "interpret", "pallas_reduction"))
def _rasterize_jit(means, quats, scales, opacities, features, viewmats, Ks, background, *, width, height, near, far,
                   backend, tile_size, capacity, chunk, interpret, pallas_reduction) -> RenderOutput:
  # Jitted as a whole even when called eagerly: op-by-op dispatch of the loops is ~5x slower to run.
  k, n, c = viewmats.shape[0], means.shape[0], features.shape[1]
  # fp32 maths (float64 when the inputs are): STORM also renders with autocast off. bf16 inputs are promoted.
  dt = jnp.result_type(means, quats, scales, opacities, features, jnp.float32)
  means, quats, scales, opacities, features, viewmats, Ks = (
      x.astype(dt) for x in (means, quats, scales, opacities, features, viewmats, Ks))
  if n == 0:  # nothing to draw: static shapes allow the early exit
    f = jnp.zeros((k, height, width, c), dt)
    t = jnp.ones((k, height, width), dt)
    d = jnp.zeros((k, height, width), dt)
    overflow = jnp.int32(0)
  else:
    # The projection's per-(camera, Gaussian) intermediates (3x3 covariances, Jacobians, ...) are recomputed in the
    # backward pass rather than kept: elementwise work, against 17 GiB kept at the STORM-VAE scale (18 renders of
    # 2.75 M Gaussians).
    proj = cull_transparent(_project_remat(means, quats, scales, viewmats, Ks, width, height, near, far), opacities)
    if backend == "reference":
      f, d, t = reference.composite_dense(proj, opacities, features, width, height, tile_size)
      overflow = jnp.int32(0)
    else:
      geom = Geometry(k, width, height, tile_size, -(-width // tile_size), -(-height // tile_size), chunk)
      if capacity is None:
        capacity = default_capacity(n, k, geom.tiles_per_image)
      isect = intersect(proj, geom, capacity)
      # Inside shard_map with cameras sharded, the custom VJP must return cotangents typed like its inputs: adding
      # a zero that carries the cameras' varying axes (an empty sum) makes opacities/features varying here, and
      # autodiff of this add then sums their cotangents over the mesh. Outside shard_map it is a no-op.
      vzero = jnp.sum(proj.depths[:, :0])
      splats = Splats(proj.means2d.reshape(k * n, 2), proj.conics.reshape(k * n, 3), proj.depths.reshape(k * n),
                      opacities + vzero, features + vzero)
      if backend == "xla":
        f, d, t = tiled_xla.composite_xla(splats, isect, geom)
      else:
        from . import pallas_gpu  # imports jax.experimental.pallas only when asked for
        f, d, t = pallas_gpu.composite_pallas(splats, isect, geom, interpret, pallas_reduction)
      f, d, t = (tiled_xla.tiles_to_image(x, geom) for x in (f, d, t))
      overflow = isect.overflow
  if background is not None:
    bg = jnp.broadcast_to(jnp.asarray(background, dt), (k, c))
    f = f + t[..., None] * bg[:, None, None, :]
  return RenderOutput(f, d, 1.0 - t, overflow)


__all__ = ["RenderOutput", "rasterize", "PALLAS_REDUCTIONS", "resolve_backend", "project", "cull_transparent",
           "Projected", "Geometry", "Intersections", "Splats", "intersect", "count_intersections", "default_capacity",
           "projection", "reference", "tiled_xla"]
