"""Camera maths shared by every reader, drawer and the synthetic renderer (numpy only).

Conventions (see ``schema.py``):
  * ego frame: x forward, y left, z up, metres.
  * camera frame: OpenCV, x right, y down, z forward. ``cam_to_ego`` maps camera points to ego points.
  * pixels: OpenCV, the centre of pixel (i, j) (row i, column j) is at (u, v) = (j, i); the image covers
    u in [-0.5, W - 0.5]. Intrinsics K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]].
  * boxes: [..., 7] = centre x, y, z, length (along heading), width, height, yaw (about +z, 0 = facing +x).

API (all functions accept leading batch dims where stated and never mutate their inputs):
  invert_rigid(T [..., 4, 4]) -> [..., 4, 4]
  transform_points(T [..., 4, 4], p [..., N, 3]) -> [..., N, 3]
  project(points_cam [..., N, 3], K [..., 3, 3]) -> (uv [..., N, 2], z [..., N])   (no near test; see below)
  project_ego_points(points_ego [N, 3], K [3, 3], cam_to_ego [4, 4], near=0.1) -> (uv [N, 2], z [N], valid [N])
  box_corners(boxes [..., 7]) -> [..., 8, 3]          corner order in BOX_CORNER_SIGNS, edges in BOX_EDGES
  box_edges_3d(boxes [N, 7]) -> [N, 14, 2, 3]          the 12 edges + 2 heading diagonals on the front face
  box_faces(boxes [N, 7]) -> [N, 6, 4, 3]              outward-wound quads (front, back, left, right, top, bottom)
  polyline_segments(points [NP, NK, 3], mask [NP, NK]) -> (segments [S, 2, 3], polyline_index [S])
  clip_segments_near(seg_cam [S, 2, 3], near=0.1) -> (clipped [S, 2, 3], keep [S])
  clip_segments_disk(seg [S, 2, 3], radius) -> (clipped [S, 2, 3], keep [S])   (xy distance from the origin)
  clip_segments_rect(seg_uv [S, 2, 2], (H, W), margin) -> (clipped [S, 2, 2], keep [S])
  clip_polygon_near(poly_cam [K, 3], near=0.1) -> [K', 3]   (Sutherland-Hodgman against z >= near)
  resize_intrinsics(K [..., 3, 3], (H0, W0), (H, W)) -> [..., 3, 3]
  crop_intrinsics(K [..., 3, 3], top, left) -> [..., 3, 3]
  yaw_matrix(yaw) -> [3, 3];  make_rigid(R [3, 3], t [3]) -> [4, 4]
  camera_rotation(yaw, pitch=0) -> [3, 3]: OpenCV camera -> ego rotation of a camera looking along ego heading ``yaw``.

Near-plane clipping matters because the perspective divide of a point behind the camera flips it to the wrong side of
the image: every drawer clips segments/polygons to z >= near in camera space *before* projecting.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_NEAR = 0.1

# Box corners as (sign of length, sign of width, sign of height) multiples of the half sizes, in the box frame
# (x along heading). Corners 0-3 are the front face (x = +l/2), 4-7 the back face, corner i+4 behind corner i.
BOX_CORNER_SIGNS = np.array([
    [1, 1, -1], [1, -1, -1], [1, -1, 1], [1, 1, 1],
    [-1, 1, -1], [-1, -1, -1], [-1, -1, 1], [-1, 1, 1],
], dtype=np.float64)
# 12 edges, then the 2 diagonals of the front face that mark the heading (OpenDWM get_3dbox_image draws 14 lines).
BOX_EDGES = np.array([
    [0, 1], [1, 2], [2, 3], [3, 0],
    [4, 5], [5, 6], [6, 7], [7, 4],
    [0, 4], [1, 5], [2, 6], [3, 7],
    [0, 2], [1, 3],
], dtype=np.int64)
# Faces as corner quads wound counter-clockwise seen from outside (normal = (c1 - c0) x (c2 - c0) points out).
BOX_FACES = np.array([
    [3, 2, 1, 0],  # front  (+x)
    [6, 7, 4, 5],  # back   (-x)
    [7, 3, 0, 4],  # left   (+y)
    [2, 6, 5, 1],  # right  (-y)
    [7, 6, 2, 3],  # top    (+z)
    [0, 1, 5, 4],  # bottom (-z)
], dtype=np.int64)

# OpenCV camera axes expressed in the ego frame for a camera looking along ego +x: x_cam = -y_ego (right),
# y_cam = -z_ego (down), z_cam = +x_ego (forward). Columns are the camera axes.
_CV_TO_EGO = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def invert_rigid(T: np.ndarray) -> np.ndarray:
  """Inverse of rigid transforms [..., 4, 4] (R^T, -R^T t); exact for rotations, cheaper than np.linalg.inv."""
  T = np.asarray(T)
  R = T[..., :3, :3]
  t = T[..., :3, 3]
  Rt = np.swapaxes(R, -1, -2)
  out = np.zeros(T.shape, dtype=T.dtype)
  out[..., :3, :3] = Rt
  out[..., :3, 3] = -np.einsum("...ij,...j->...i", Rt, t)
  out[..., 3, 3] = 1
  return out


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
  """Applies rigid/affine transforms T [..., 4, 4] to points [..., N, 3]."""
  T = np.asarray(T)
  points = np.asarray(points)
  return np.einsum("...ij,...nj->...ni", T[..., :3, :3], points) + T[..., None, :3, 3]


def project(points_cam: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Pinhole projection of camera-frame points [..., N, 3] -> (uv [..., N, 2], z [..., N]).

  No near test: callers must clip (points with z <= 0 get meaningless uv; z is returned to test).
  """
  points_cam = np.asarray(points_cam)
  K = np.asarray(K)
  z = points_cam[..., 2]
  safe_z = np.where(np.abs(z) < 1e-9, 1e-9, z)
  x = points_cam[..., 0] / safe_z
  y = points_cam[..., 1] / safe_z
  u = K[..., None, 0, 0] * x + K[..., None, 0, 1] * y + K[..., None, 0, 2]
  v = K[..., None, 1, 1] * y + K[..., None, 1, 2]
  return np.stack([u, v], axis=-1), z


def project_ego_points(points_ego: np.ndarray, K: np.ndarray, cam_to_ego: np.ndarray,
                       near: float = DEFAULT_NEAR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Projects ego-frame points [N, 3] into one camera: (uv [N, 2], z-depth [N], valid = z >= near [N])."""
  cam = transform_points(invert_rigid(np.asarray(cam_to_ego, np.float64)), np.asarray(points_ego, np.float64))
  uv, z = project(cam, np.asarray(K, np.float64))
  return uv, z, z >= near


def yaw_matrix(yaw: float) -> np.ndarray:
  """Rotation [3, 3] by ``yaw`` radians about +z."""
  c, s = np.cos(yaw), np.sin(yaw)
  return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def make_rigid(R: np.ndarray, t: Sequence[float]) -> np.ndarray:
  """[4, 4] transform from a rotation [3, 3] and a translation [3]."""
  T = np.eye(4)
  T[:3, :3] = R
  T[:3, 3] = t
  return T


def camera_rotation(yaw: float, pitch: float = 0.0) -> np.ndarray:
  """Camera -> ego rotation [3, 3] of an OpenCV camera looking along ego heading ``yaw`` (rad, 0 = +x, +pi/2 = left),
  tilted down by ``pitch`` radians."""
  c, s = np.cos(pitch), np.sin(pitch)
  # About camera x; camera y points down, so a positive pitch moves the optical axis towards +y (down).
  tilt = np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])
  return yaw_matrix(yaw) @ _CV_TO_EGO @ tilt


def box_corners(boxes: np.ndarray) -> np.ndarray:
  """Corners [..., 8, 3] of boxes [..., 7] (centre, lwh, yaw), ordered as BOX_CORNER_SIGNS."""
  boxes = np.asarray(boxes, np.float64)
  half = boxes[..., None, 3:6] * 0.5 * BOX_CORNER_SIGNS  # [..., 8, 3] in the box frame
  c, s = np.cos(boxes[..., 6])[..., None], np.sin(boxes[..., 6])[..., None]
  x = c * half[..., 0] - s * half[..., 1]
  y = s * half[..., 0] + c * half[..., 1]
  return np.stack([x, y, half[..., 2]], axis=-1) + boxes[..., None, :3]


def box_edges_3d(boxes: np.ndarray) -> np.ndarray:
  """The 14 drawn edges [N, 14, 2, 3] of boxes [N, 7]: 12 box edges + the 2 heading diagonals of the front face."""
  return box_corners(boxes)[..., BOX_EDGES, :]


def box_faces(boxes: np.ndarray) -> np.ndarray:
  """Faces [N, 6, 4, 3] of boxes [N, 7], each quad wound so that its normal points outwards."""
  return box_corners(boxes)[..., BOX_FACES, :]


def polyline_segments(points: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Consecutive-point segments of padded polylines.

  points: [NP, NK, 3]; mask: [NP, NK] (a polyline is its True prefix). Returns (segments [S, 2, 3], index [S]) where
  index names the polyline of each segment; a segment exists where both its end points are real.
  """
  points = np.asarray(points)
  mask = np.asarray(mask, bool)
  if points.shape[:2] != mask.shape:
    raise ValueError(f"polyline points {points.shape} and mask {mask.shape} disagree")
  both = mask[:, :-1] & mask[:, 1:]
  p, k = np.nonzero(both)
  seg = np.stack([points[p, k], points[p, k + 1]], axis=1)
  return seg, p


def clip_segments_near(seg: np.ndarray, near: float = DEFAULT_NEAR) -> tuple[np.ndarray, np.ndarray]:
  """Clips camera-frame segments [S, 2, 3] to the half space z >= near. Returns (clipped [S, 2, 3], keep [S])."""
  seg = np.asarray(seg, np.float64)
  a, b = seg[:, 0], seg[:, 1]
  za, zb = a[:, 2], b[:, 2]
  keep = (za >= near) | (zb >= near)
  dz = zb - za
  with np.errstate(divide="ignore", invalid="ignore"):
    t = np.where(np.abs(dz) > 1e-12, (near - za) / dz, 0.0)
  cut = a + t[:, None] * (b - a)
  cut[:, 2] = near  # exact, guards against rounding to just below near
  a2 = np.where((za < near)[:, None], cut, a)
  b2 = np.where((zb < near)[:, None], cut, b)
  return np.stack([a2, b2], axis=1), keep


def _clip_param_interval(seg: np.ndarray, lo: np.ndarray, hi: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Liang-Barsky: parameter interval [t0, t1] of segments [S, 2, D] inside the box lo <= p <= hi ([D])."""
  a, d = seg[:, 0], seg[:, 1] - seg[:, 0]
  t0 = np.zeros(len(seg))
  t1 = np.ones(len(seg))
  ok = np.ones(len(seg), bool)
  for axis in range(seg.shape[-1]):
    for p, q in ((-d[:, axis], a[:, axis] - lo[axis]), (d[:, axis], hi[axis] - a[:, axis])):
      parallel = np.abs(p) < 1e-12
      ok &= ~(parallel & (q < 0))
      with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(parallel, 0.0, q / np.where(parallel, 1.0, p))
      t0 = np.where(~parallel & (p < 0), np.maximum(t0, r), t0)
      t1 = np.where(~parallel & (p > 0), np.minimum(t1, r), t1)
  return t0, t1, ok & (t0 <= t1)


def clip_segments_rect(seg_uv: np.ndarray, hw: tuple[int, int], margin: float = 0.0
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Clips pixel segments [S, 2, 2] to the image rectangle grown by ``margin`` px. Returns (clipped, keep [S])."""
  seg_uv = np.asarray(seg_uv, np.float64)
  H, W = hw
  lo = np.array([-0.5 - margin, -0.5 - margin])
  hi = np.array([W - 0.5 + margin, H - 0.5 + margin])
  t0, t1, keep = _clip_param_interval(seg_uv, lo, hi)
  a, d = seg_uv[:, 0], seg_uv[:, 1] - seg_uv[:, 0]
  out = np.stack([a + t0[:, None] * d, a + t1[:, None] * d], axis=1)
  return out, keep


def clip_segments_disk(seg: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
  """Clips segments [S, 2, 3] to the vertical cylinder x^2 + y^2 <= radius^2. Returns (clipped, keep [S])."""
  seg = np.asarray(seg, np.float64)
  a = seg[:, 0, :2]
  d = seg[:, 1, :2] - a
  A = np.sum(d * d, -1)
  B = 2 * np.sum(a * d, -1)
  C = np.sum(a * a, -1) - radius ** 2
  disc = B * B - 4 * A * C
  degenerate = A < 1e-12
  sq = np.sqrt(np.maximum(disc, 0.0))
  with np.errstate(divide="ignore", invalid="ignore"):
    r0 = np.where(degenerate, 0.0, (-B - sq) / np.where(degenerate, 1.0, 2 * A))
    r1 = np.where(degenerate, 1.0, (-B + sq) / np.where(degenerate, 1.0, 2 * A))
  t0 = np.maximum(r0, 0.0)
  t1 = np.minimum(r1, 1.0)
  keep = np.where(degenerate, C <= 0, (disc >= 0) & (t0 <= t1))
  full = seg[:, 1] - seg[:, 0]
  out = np.stack([seg[:, 0] + t0[:, None] * full, seg[:, 0] + t1[:, None] * full], axis=1)
  return out, keep


def clip_polygon_near(poly: np.ndarray, near: float = DEFAULT_NEAR) -> np.ndarray:
  """Sutherland-Hodgman clip of a camera-frame polygon [K, 3] to z >= near; returns [K', 3] (K' may be 0)."""
  poly = np.asarray(poly, np.float64)
  inside = poly[:, 2] >= near
  if inside.all():
    return poly
  if not inside.any():
    return poly[:0]
  out = []
  n = len(poly)
  for i in range(n):
    cur, nxt = poly[i], poly[(i + 1) % n]
    cin, nin = inside[i], inside[(i + 1) % n]
    if cin:
      out.append(cur)
    if cin != nin:
      t = (near - cur[2]) / (nxt[2] - cur[2])
      p = cur + t * (nxt - cur)
      p[2] = near
      out.append(p)
  return np.asarray(out).reshape(-1, 3)


def resize_intrinsics(K: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
  """Rescales intrinsics [..., 3, 3] for an image resized (without keeping aspect) from src_hw to dst_hw.

  Pixel-centre convention (matches PIL/OpenCV resize): u' = (u + 0.5) * W'/W - 0.5.
  """
  K = np.array(K, dtype=np.float64 if np.asarray(K).dtype == np.float64 else np.float32)
  sy = dst_hw[0] / src_hw[0]
  sx = dst_hw[1] / src_hw[1]
  K[..., 0, 0] *= sx
  K[..., 0, 1] *= sx
  K[..., 0, 2] = (K[..., 0, 2] + 0.5) * sx - 0.5
  K[..., 1, 1] *= sy
  K[..., 1, 2] = (K[..., 1, 2] + 0.5) * sy - 0.5
  return K


def crop_intrinsics(K: np.ndarray, top: float, left: float) -> np.ndarray:
  """Intrinsics [..., 3, 3] after cropping ``top`` rows and ``left`` columns off the image."""
  K = np.array(K)
  K[..., 0, 2] -= left
  K[..., 1, 2] -= top
  return K
