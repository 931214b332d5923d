"""Per-sample conditions drawn from a schema sample at a target resolution (numpy + Pillow, no cv2).

API (``sample`` is a schema sample, ``hw`` = (H, W) the target size; None = the size of ``sample["images"]``; the
sample's intrinsics belong to its own image size and are rescaled here, see geometry.resize_intrinsics):

  box_images(sample, hw=None, *, line_width=8.0, near=0.1) -> uint8 [T, V, H, W, 3]
      The 14 lines of each real box (12 edges + 2 diagonals of the front face, which mark the heading), coloured by
      schema.BOX_COLORS[class], clipped to z >= near in camera space before projection. ``line_width`` is in pixels
      of the ORIGINAL image (OpenDWM draws 8 px at 1600x900) and is scaled to the target by
      sqrt(H/H0 * W/W0), at least 1 px.
  map_images(sample, hw=None, *, line_width=8.0, map_range=65.0, near=0.1) -> uint8 [T, V, H, W, 3]
      World-frame polylines moved into each frame's ego frame, clipped to the disk of radius ``map_range`` metres
      (ego xy distance), then to z >= near, then projected; coloured by schema.MAP_COLORS[class].
  depth_maps(sample, hw=None, *, near=0.1) -> float32 [T, V, H, W]
      LiDAR points (ego frame of their frame) projected into every camera of the same frame: z-depth in metres at
      the pixel containing the projection, the nearest point wins, 0 where no point.
  camera_params(sample) -> float32 [T, V, 11]
      OpenDWM C35 implicit camera condition: [fps, fx/H0, fy/H0, cx/W0, cy/H0, R02, R12, R22, t0, t1, t2] where
      K is at the original (W0, H0) = sample["original_size"] (or the current size when absent), R/t from
      cam_to_ego (flat 4x4 entries 2, 6, 10 = camera z axis in ego; 3, 7, 11 = camera origin). Zero rows for
      padded view slots.
  view_adjacency(view_mask, dataset="") -> bool [V, V]
      Ring over the view slots: each real view attends to itself and to the previous/next slot (wrapping) when that
      slot is real, so a padded slot breaks the ring (Waymo: a chain). Padded slots attend only themselves.
      Identity when there is <= 1 real view or the dataset is "opendv".
  add_conditions(sample, hw=None, **kw, out=None) -> new sample with box_images, map_images, depth,
      camera_params, view_adjacency (sample must already be at ``hw``; use resize_sample first).
  resize_sample(sample, H, W, images_out=None) -> new sample
      Images resized with PIL bilinear (antialiased when shrinking, i.e. area-like), sky_mask with nearest,
      intrinsics rescaled; ``original_size`` is recorded (if absent) so camera_params stays at the original
      scale. Derived condition fields are dropped (they are stale at a new size; redraw with add_conditions).

box_images / map_images / depth_maps take ``out=`` (a preallocated array of the result's shape and dtype, e.g. a
row of a batch) to draw in place without a copy; add_conditions(out={name: array}) forwards them.

Lower-level drawers for readers that hold single frames:
  draw_segments(image_hw, seg_uv [S, 2, 2], colors [S, 3], width, runs=None) -> uint8 [H, W, 3]
  draw_boxes_view(boxes [N, 7], box_class [N], K, cam_to_ego, hw, width, near) -> uint8 [H, W, 3]
  draw_map_view(points_ego [NP, NK, 3], mask [NP, NK], map_class [NP], K, cam_to_ego, hw, width, map_range, near)
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw

from . import geometry
from . import schema

_BOX_COLORS = np.asarray(schema.BOX_COLORS, np.uint8)
_MAP_COLORS = np.asarray(schema.MAP_COLORS, np.uint8)
DEFAULT_LINE_WIDTH = 8.0
DEFAULT_MAP_RANGE = 65.0


def _target_hw(sample: Mapping[str, Any], hw: tuple[int, int] | None) -> tuple[tuple[int, int], tuple[int, int]]:
  src = tuple(int(x) for x in np.shape(sample["images"])[2:4])
  return src, (src if hw is None else (int(hw[0]), int(hw[1])))


def _original_hw(sample: Mapping[str, Any]) -> np.ndarray:
  """Original (H0, W0) per view [V, 2]; the current size where original_size is absent or not positive (readers
  leave padded view slots at 0)."""
  V, H, W = np.shape(sample["images"])[1:4]
  current = np.tile(np.array([[H, W]], np.float64), (V, 1))
  if "original_size" in sample:
    hw = np.asarray(sample["original_size"], np.float64).reshape(V, 2)[:, ::-1]
    return np.where(np.all(hw > 0, axis=1, keepdims=True), hw, current)
  return current


def scaled_line_width(base: float, hw: tuple[int, int], original_hw: tuple[float, float]) -> int:
  """Line width in target pixels for ``base`` px at the original resolution (geometric-mean scale, >= 1)."""
  scale = np.sqrt(hw[0] / original_hw[0] * hw[1] / original_hw[1])
  return max(1, int(round(base * scale)))


def draw_segments(image_hw: tuple[int, int], seg_uv: np.ndarray, colors: np.ndarray, width: int,
                  image: np.ndarray | None = None) -> np.ndarray:
  """Draws pixel segments [S, 2, 2] with per-segment colours [S, 3] into a black (or the given) uint8 image.

  Consecutive segments whose end meets the next start with the same colour are drawn as one polyline (one Pillow
  call, joined corners), which is what keeps map drawing fast.
  """
  H, W = image_hw
  im = Image.new("RGB", (W, H)) if image is None else Image.fromarray(image)
  if len(seg_uv):
    draw = ImageDraw.Draw(im)
    colors = np.asarray(colors, np.uint8)
    joined = np.zeros(len(seg_uv), bool)
    if len(seg_uv) > 1:
      joined[1:] = (np.all(np.abs(seg_uv[1:, 0] - seg_uv[:-1, 1]) < 1e-6, axis=-1)
                    & np.all(colors[1:] == colors[:-1], axis=-1))
    starts = np.flatnonzero(~joined)
    ends = np.append(starts[1:], len(seg_uv))
    # Pillow truncates float coordinates; round to the nearest pixel centre instead (OpenCV convention).
    pts = np.floor(seg_uv + 0.5).astype(np.int64).tolist()
    cols = [tuple(c) for c in colors.tolist()]
    for s, e in zip(starts.tolist(), ends.tolist()):
      xy = [tuple(pts[s][0])] + [tuple(pts[i][1]) for i in range(s, e)]
      draw.line(xy, fill=cols[s], width=width, joint="curve" if width > 2 and e - s > 1 else None)
  return np.asarray(im, np.uint8)


def _project_segments(seg_ego: np.ndarray, K: np.ndarray, cam_to_ego: np.ndarray, hw: tuple[int, int],
                      near: float, margin: float) -> tuple[np.ndarray, np.ndarray]:
  """Ego segments [S, 2, 3] into V cameras (K [V, 3, 3], cam_to_ego [V, 4, 4]) -> (pixel segments [V, S, 2, 2],
  keep [V, S]) with near-plane and image clipping; one vectorised pass over all views."""
  K = np.asarray(K, np.float64).reshape(-1, 3, 3)
  V, S = K.shape[0], seg_ego.shape[0]
  e2c = geometry.invert_rigid(np.asarray(cam_to_ego, np.float64).reshape(-1, 4, 4))
  seg_cam = seg_ego.reshape(1, -1, 3) @ np.swapaxes(e2c[:, :3, :3], -1, -2) + e2c[:, None, :3, 3]  # [V, 2S, 3]
  seg_cam, keep = geometry.clip_segments_near(seg_cam.reshape(V * S, 2, 3), near)
  Kr = np.repeat(K, S, axis=0)[:, None]  # [V*S, 1, 3, 3]
  uv, _ = geometry.project(seg_cam, Kr[:, 0])
  uv, in_rect = geometry.clip_segments_rect(uv, hw, margin)
  return uv.reshape(V, S, 2, 2), (keep & in_rect).reshape(V, S)


def draw_boxes_view(boxes: np.ndarray, box_class: np.ndarray, K: np.ndarray, cam_to_ego: np.ndarray,
                    hw: tuple[int, int], width: int, near: float = geometry.DEFAULT_NEAR) -> np.ndarray:
  """One camera's box image uint8 [H, W, 3] for real boxes [N, 7] (ego frame) with classes [N] (K at ``hw``)."""
  boxes = np.asarray(boxes).reshape(-1, 7)
  box_class = np.asarray(box_class).reshape(-1)
  if len(boxes) == 0:
    return np.zeros((*hw, 3), np.uint8)
  if np.any((box_class < 0) | (box_class >= len(_BOX_COLORS))):
    raise ValueError(f"box_class out of range [0, {len(_BOX_COLORS)}): {np.unique(box_class)}")
  seg = geometry.box_edges_3d(boxes).reshape(-1, 2, 3)
  uv, keep = _project_segments(seg, K, cam_to_ego, hw, near, width)
  colors = np.repeat(_BOX_COLORS[box_class], len(geometry.BOX_EDGES), axis=0)
  return draw_segments(hw, uv[0][keep[0]], colors[keep[0]], width)


def _map_segments(points_ego: np.ndarray, mask: np.ndarray, map_class: np.ndarray, map_range: float
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Ego-frame map segments [S, 2, 3] inside the range disk and their classes [S]."""
  seg, poly = geometry.polyline_segments(points_ego, mask)
  cls = np.asarray(map_class)[poly]
  real = cls >= 0
  if np.any(cls[real] >= len(_MAP_COLORS)):
    raise ValueError(f"map_class out of range [0, {len(_MAP_COLORS)}): {np.unique(cls)}")
  seg, keep = geometry.clip_segments_disk(seg[real], map_range)
  return seg[keep], cls[real][keep]


def draw_map_view(points_ego: np.ndarray, mask: np.ndarray, map_class: np.ndarray, K: np.ndarray,
                  cam_to_ego: np.ndarray, hw: tuple[int, int], width: int,
                  map_range: float = DEFAULT_MAP_RANGE, near: float = geometry.DEFAULT_NEAR) -> np.ndarray:
  """One camera's map image uint8 [H, W, 3] for polylines [NP, NK, 3] already in this frame's ego frame."""
  seg, cls = _map_segments(points_ego, mask, map_class, map_range)
  uv, keep = _project_segments(seg, K, cam_to_ego, hw, near, width)
  return draw_segments(hw, uv[0][keep[0]], _MAP_COLORS[cls[keep[0]]], width)


def _output(out: np.ndarray | None, shape: tuple[int, ...], dtype, name: str) -> np.ndarray:
  """A zeroed output array: ``out`` (checked, written in place) or a new one."""
  if out is None:
    return np.zeros(shape, dtype)
  if out.shape != shape or out.dtype != np.dtype(dtype):
    raise ValueError(f"{name}: out has {out.dtype} {out.shape}, expected {np.dtype(dtype)} {shape}")
  out[...] = 0
  return out


def box_images(sample: Mapping[str, Any], hw: tuple[int, int] | None = None, *,
               line_width: float = DEFAULT_LINE_WIDTH, near: float = geometry.DEFAULT_NEAR,
               out: np.ndarray | None = None) -> np.ndarray:
  """Box line images uint8 [T, V, H, W, 3] (see module docstring)."""
  src, hw = _target_hw(sample, hw)
  T, V = np.shape(sample["images"])[:2]
  K = geometry.resize_intrinsics(np.asarray(sample["intrinsics"], np.float64), src, hw)
  orig = _original_hw(sample)
  view_mask = np.asarray(sample["view_mask"], bool)
  out = _output(out, (T, V, *hw, 3), np.uint8, "box_images")
  views = np.flatnonzero(view_mask)
  widths = [scaled_line_width(line_width, hw, orig[v]) for v in views]
  cam_to_ego = np.asarray(sample["cam_to_ego"], np.float64)
  for t in range(T):
    m = np.asarray(sample["box_mask"][t], bool)
    boxes, cls = np.asarray(sample["boxes"][t])[m], np.asarray(sample["box_class"][t])[m]
    if not len(boxes) or not len(views):
      continue
    if np.any((cls < 0) | (cls >= len(_BOX_COLORS))):
      raise ValueError(f"box_class out of range [0, {len(_BOX_COLORS)}) in frame {t}: {np.unique(cls)}")
    seg = geometry.box_edges_3d(boxes).reshape(-1, 2, 3)
    colors = np.repeat(_BOX_COLORS[cls], len(geometry.BOX_EDGES), axis=0)
    uv, keep = _project_segments(seg, K[t, views], cam_to_ego[t, views], hw, near, max(widths))
    for i, v in enumerate(views):
      if keep[i].any():
        out[t, v] = draw_segments(hw, uv[i][keep[i]], colors[keep[i]], widths[i])
  return out


def map_images(sample: Mapping[str, Any], hw: tuple[int, int] | None = None, *,
               line_width: float = DEFAULT_LINE_WIDTH, map_range: float = DEFAULT_MAP_RANGE,
               near: float = geometry.DEFAULT_NEAR, out: np.ndarray | None = None) -> np.ndarray:
  """HD-map line images uint8 [T, V, H, W, 3] (see module docstring)."""
  src, hw = _target_hw(sample, hw)
  T, V = np.shape(sample["images"])[:2]
  K = geometry.resize_intrinsics(np.asarray(sample["intrinsics"], np.float64), src, hw)
  orig = _original_hw(sample)
  view_mask = np.asarray(sample["view_mask"], bool)
  out = _output(out, (T, V, *hw, 3), np.uint8, "map_images")
  world_to_ego = geometry.invert_rigid(np.asarray(sample["ego_to_world"], np.float64))
  points = np.asarray(sample["map_points"], np.float64)
  mask = np.asarray(sample["map_mask"], bool)
  if not mask.any():
    return out
  views = np.flatnonzero(view_mask)
  widths = [scaled_line_width(line_width, hw, orig[v]) for v in views]
  cam_to_ego = np.asarray(sample["cam_to_ego"], np.float64)
  for t in range(T):
    points_ego = geometry.transform_points(world_to_ego[t], points.reshape(-1, 3)).reshape(points.shape)
    seg, cls = _map_segments(points_ego, mask, sample["map_class"], map_range)
    if not len(seg) or not len(views):
      continue
    uv, keep = _project_segments(seg, K[t, views], cam_to_ego[t, views], hw, near, max(widths))
    colors = _MAP_COLORS[cls]
    for i, v in enumerate(views):
      if keep[i].any():
        out[t, v] = draw_segments(hw, uv[i][keep[i]], colors[keep[i]], widths[i])
  return out


def depth_maps(sample: Mapping[str, Any], hw: tuple[int, int] | None = None, *,
               near: float = geometry.DEFAULT_NEAR, out: np.ndarray | None = None) -> np.ndarray:
  """Sparse LiDAR z-depth float32 [T, V, H, W]; nearest point per pixel, 0 where none."""
  src, hw = _target_hw(sample, hw)
  H, W = hw
  T, V = np.shape(sample["images"])[:2]
  K = geometry.resize_intrinsics(np.asarray(sample["intrinsics"], np.float64), src, hw)
  points = np.asarray(sample["lidar_points"], np.float32)  # [T, NL, 3] ego frame
  lmask = np.asarray(sample["lidar_mask"], bool)
  e2c = geometry.invert_rigid(np.asarray(sample["cam_to_ego"], np.float64)).astype(np.float32)  # [T, V, 4, 4]
  # z first (one row of the rotation), then the full projection only for points in front of the camera.
  z = np.matmul(e2c[..., 2, :3], np.swapaxes(points, 1, 2)) + e2c[..., 2, 3:4]  # [T, V, NL] (BLAS, not einsum)
  front = (z >= near) & lmask[:, None] & np.asarray(sample["view_mask"], bool)[None, :, None]
  ti, vi, ni = np.nonzero(front)
  R = e2c[ti, vi]  # [M, 4, 4]
  p = points[ti, ni]  # [M, 3]
  x = np.einsum("mj,mj->m", R[:, 0, :3], p) + R[:, 0, 3]
  y = np.einsum("mj,mj->m", R[:, 1, :3], p) + R[:, 1, 3]
  zs = z[ti, vi, ni]
  Km = K[ti, vi]
  col = np.floor(Km[:, 0, 0] * x / zs + Km[:, 0, 1] * y / zs + Km[:, 0, 2] + 0.5)
  row = np.floor(Km[:, 1, 1] * y / zs + Km[:, 1, 2] + 0.5)
  inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
  flat = (((ti * V + vi) * H + row.astype(np.int64)) * W + col.astype(np.int64))[inside]
  zs = zs[inside]
  out = _output(out, (T, V, H, W), np.float32, "depth")
  # The nearest point wins: order by depth, then np.unique's return_index gives each pixel's first (nearest) hit.
  by_z = np.argsort(zs, kind="stable")
  pixels, first = np.unique(flat[by_z], return_index=True)
  flat_out = out.reshape(-1)
  if not np.shares_memory(flat_out, out):
    raise ValueError("depth: out must be C-contiguous")
  flat_out[pixels] = zs[by_z][first]
  return out


def camera_params(sample: Mapping[str, Any]) -> np.ndarray:
  """C35 implicit camera condition float32 [T, V, 11] (see module docstring).

  cam_to_ego is the sample's, i.e. the camera in the frame's reference ego (nuScenes: the CAM_FRONT time; AV2: the
  LiDAR time), exact for the geometry. Where cameras fire at other times than the reference, its translation moves
  with the ego speed (~0.3 m at 15 m/s over a 25 ms trigger offset); OpenDWM's condition is the static calibration."""
  T, V, H, W = np.shape(sample["images"])[:4]
  orig = _original_hw(sample)  # [V, (H0, W0)]
  K = geometry.resize_intrinsics(np.asarray(sample["intrinsics"], np.float64), (H, W), (1, 1))
  # Undo the current resize per view: K at the original (H0, W0), via the unit size to apply per-view scales.
  K[..., 0, 0] *= orig[None, :, 1]
  K[..., 0, 2] = (K[..., 0, 2] + 0.5) * orig[None, :, 1] - 0.5
  K[..., 1, 1] *= orig[None, :, 0]
  K[..., 1, 2] = (K[..., 1, 2] + 0.5) * orig[None, :, 0] - 0.5
  E = np.asarray(sample["cam_to_ego"], np.float64).reshape(T, V, 16)
  h0, w0 = orig[None, :, 0], orig[None, :, 1]
  fps = np.broadcast_to(np.float64(np.asarray(sample["fps"])), (T, V))
  out = np.stack([fps, K[..., 0, 0] / h0, K[..., 1, 1] / h0, K[..., 0, 2] / w0, K[..., 1, 2] / h0,
                  E[..., 2], E[..., 6], E[..., 10], E[..., 3], E[..., 7], E[..., 11]], axis=-1)
  out = np.where(np.asarray(sample["view_mask"], bool)[None, :, None], out, 0.0)  # padded slots: zeros
  return out.astype(np.float32)


def view_adjacency(view_mask: np.ndarray, dataset: str = "") -> np.ndarray:
  """Cross-view attention mask bool [V, V] (see module docstring)."""
  view_mask = np.asarray(view_mask, bool)
  V = view_mask.shape[0]
  adj = np.eye(V, dtype=bool)
  if dataset == "opendv" or view_mask.sum() <= 1:
    return adj
  # Neighbours by slot position, linked only when both slots are real: a padded slot breaks the ring, so Waymo's
  # five cameras (empty back slot) form OpenDWM's chain SIDE_LEFT .. SIDE_RIGHT, without linking the two side
  # cameras, which look in opposite directions.
  for v in np.flatnonzero(view_mask):
    for u in ((v - 1) % V, (v + 1) % V):
      adj[v, u] |= bool(view_mask[u])
  return adj


def add_conditions(sample: Mapping[str, Any], hw: tuple[int, int] | None = None, *,
                   line_width: float = DEFAULT_LINE_WIDTH, map_range: float = DEFAULT_MAP_RANGE,
                   near: float = geometry.DEFAULT_NEAR, out: Mapping[str, np.ndarray] | None = None
                   ) -> dict[str, Any]:
  """Returns a new sample with every derived field of schema.DERIVED_FIELDS drawn at the sample's own size.

  ``out`` may hold preallocated box_images / map_images / depth arrays (e.g. rows of a batch) to draw into.
  """
  out_arrays = dict(out or {})
  src, hw = _target_hw(sample, hw)
  if src != hw:
    raise ValueError(f"add_conditions: sample images are {src} but hw={hw}; call resize_sample(sample, *hw) first")
  out = dict(sample)
  out["box_images"] = box_images(sample, hw, line_width=line_width, near=near, out=out_arrays.get("box_images"))
  out["map_images"] = map_images(sample, hw, line_width=line_width, map_range=map_range, near=near,
                                 out=out_arrays.get("map_images"))
  out["depth"] = depth_maps(sample, hw, near=near, out=out_arrays.get("depth"))
  out["camera_params"] = camera_params(sample)
  out["view_adjacency"] = view_adjacency(sample["view_mask"], sample.get("dataset", ""))
  return out


def resize_sample(sample: Mapping[str, Any], H: int, W: int, *, images_out: np.ndarray | None = None
                  ) -> dict[str, Any]:
  """Returns a copy of ``sample`` at H x W (see module docstring); ``images_out`` [T, V, H, W, 3] uint8 receives
  the images when given (e.g. a row of a batch)."""
  images = np.asarray(sample["images"])
  T, V, H0, W0 = images.shape[:4]
  out = {k: v for k, v in sample.items() if k not in schema.DERIVED_FIELDS}
  if "original_size" not in out:
    out["original_size"] = np.tile(np.array([[W0, H0]], np.int32), (V, 1))
  if images_out is not None and (images_out.shape != (T, V, H, W, 3) or images_out.dtype != np.uint8):
    raise ValueError(f"resize_sample: images_out has {images_out.dtype} {images_out.shape}, expected uint8 "
                     f"{(T, V, H, W, 3)}")
  if (H0, W0) == (H, W):
    if images_out is not None:
      images_out[...] = images
      out["images"] = images_out
    return out
  resized = np.empty((T, V, H, W, 3), np.uint8) if images_out is None else images_out
  for t in range(T):
    for v in range(V):
      resized[t, v] = np.asarray(Image.fromarray(images[t, v]).resize((W, H), Image.BILINEAR))
  out["images"] = resized
  out["intrinsics"] = geometry.resize_intrinsics(np.asarray(sample["intrinsics"]), (H0, W0), (H, W)
                                                 ).astype(np.float32)
  if "sky_mask" in sample:
    sky = np.asarray(sample["sky_mask"], bool)
    # Nearest sampling at target pixel centres.
    rows = np.minimum(((np.arange(H) + 0.5) * H0 / H).astype(np.int64), H0 - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * W0 / W).astype(np.int64), W0 - 1)
    out["sky_mask"] = sky[:, :, rows][:, :, :, cols]
  return out
