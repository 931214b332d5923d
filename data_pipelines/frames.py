"""Per-frame records: the unit the converter stores, and the one code path that stacks frames into a clip sample.

A *frame dict* holds one timestamp of one scene, with the schema fields minus the T axis and with boxes / points
unpadded (so the clip padding sizes are chosen when a clip is assembled):

  images        uint8   [V, H, W, 3]      view_mask bool [V]      original_size int32 [V, 2] (W0, H0)
  intrinsics    float32 [V, 3, 3]         cam_to_ego float32 [V, 4, 4]        ego_to_world float32 [4, 4]
  timestamp     float   seconds (any origin; clips subtract their first frame's)
  boxes         float32 [n, 7]            box_class int32 [n]     box_track_id int32 [n]
  lidar_points  float32 [m, 3]            captions object [V] (str)

The Waymo and OpenDV readers build clips from frame dicts with ``assemble_clip``; the ArrayRecord source does the
same from the converted records, so a converted clip is assembled by exactly the code that assembled the read one.
``split_clip`` goes the other way for readers that only produce whole clip samples (nuScenes, Argoverse 2).
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from . import readers
from .readers import ReaderError


def decode_image(data: bytes, size: tuple[int, int] | None = None, *, what: str = "image",
                 path: str | None = None) -> np.ndarray:
  """Fully decodes encoded image bytes to uint8 [H, W, 3] RGB, resized (bilinear) to ``size`` = (H, W) if given.

  Raises ReaderError("corrupt image: ...") for truncated or corrupt data (the whole image is decoded here).
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      im = im.convert("RGB")
      if size is not None and (im.height, im.width) != tuple(size):
        im = im.resize((int(size[1]), int(size[0])), Image.BILINEAR)
      return np.asarray(im, dtype=np.uint8)
  except (OSError, SyntaxError, ValueError) as e:
    raise ReaderError(f"corrupt image: {what} ({e})", path) from e


def assemble_clip(frames: Sequence[dict], map_lines: Sequence[tuple[np.ndarray, int]], *, dataset: str,
                  clip_id: str, fps: float, max_boxes: int, max_points: int, max_polylines: int,
                  points_per_polyline: int) -> dict:
  """Stacks frame dicts into one schema sample (validated).

  Args:
    frames: T frame dicts (module docstring).
    map_lines: world-frame polylines [(points [n, 3], class index)], packed with ``readers.pack_polylines``
      anchored at the clip's ego positions.
  """
  def stack(key, dtype):
    return np.stack([np.asarray(f[key]) for f in frames]).astype(dtype)

  t = len(frames)
  if t == 0:
    raise ValueError("assemble_clip needs at least one frame")
  boxes = np.zeros((t, max_boxes, 7), np.float32)
  box_class = np.full((t, max_boxes), -1, np.int32)
  box_track = np.full((t, max_boxes), -1, np.int32)
  box_mask = np.zeros((t, max_boxes), bool)
  points = np.zeros((t, max_points, 3), np.float32)
  point_mask = np.zeros((t, max_points), bool)
  for k, f in enumerate(frames):
    nb = min(len(f["boxes"]), max_boxes)
    boxes[k, :nb] = np.asarray(f["boxes"], np.float32).reshape(-1, 7)[:nb]
    box_class[k, :nb] = np.asarray(f["box_class"])[:nb]
    box_track[k, :nb] = np.asarray(f["box_track_id"])[:nb]
    box_mask[k, :nb] = True
    n = min(len(f["lidar_points"]), max_points)
    points[k, :n] = np.asarray(f["lidar_points"], np.float32).reshape(-1, 3)[:n]
    point_mask[k, :n] = True
  ego_to_world = stack("ego_to_world", np.float32)
  times = np.array([f["timestamp"] for f in frames], np.float64)
  map_points, map_class, map_mask = readers.pack_polylines(
      map_lines, max_polylines, points_per_polyline, anchor=ego_to_world[:, :3, 3])
  sample = {
      "images": stack("images", np.uint8), "view_mask": np.asarray(frames[0]["view_mask"], bool),
      "intrinsics": stack("intrinsics", np.float32), "cam_to_ego": stack("cam_to_ego", np.float32),
      "ego_to_world": ego_to_world, "timestamps": times - times[0], "fps": np.float32(fps),
      "boxes": boxes, "box_class": box_class, "box_track_id": box_track, "box_mask": box_mask,
      "map_points": map_points, "map_class": map_class, "map_mask": map_mask,
      "lidar_points": points, "lidar_mask": point_mask,
      "captions": np.stack([np.asarray(f["captions"], dtype=object) for f in frames]),
      "dataset": dataset, "clip_id": clip_id,
  }
  if "original_size" in frames[0]:
    sample["original_size"] = np.asarray(frames[0]["original_size"], np.int32)
  return readers.check_sample(sample)


def split_clip(sample: dict) -> tuple[list[dict], list[tuple[np.ndarray, int]]]:
  """A schema sample -> (T frame dicts, its map polylines), the inverse of ``assemble_clip``.

  Re-assembling with the sample's own NB, NL, NP, NK gives the sample back exactly: boxes and points keep their
  packed order, and map polylines (each the True prefix of its mask, at most NK points, at most NP lines) are not
  re-split or re-ordered by ``pack_polylines``. Polylines with fewer than 2 points are not drawable and are dropped.
  """
  frames = []
  t = sample["images"].shape[0]
  times = np.asarray(sample["timestamps"], np.float64)
  for k in range(t):
    bm = np.asarray(sample["box_mask"][k], bool)
    lm = np.asarray(sample["lidar_mask"][k], bool)
    f = {
        "images": sample["images"][k], "view_mask": sample["view_mask"], "intrinsics": sample["intrinsics"][k],
        "cam_to_ego": sample["cam_to_ego"][k], "ego_to_world": sample["ego_to_world"][k], "timestamp": times[k],
        "boxes": sample["boxes"][k][bm], "box_class": sample["box_class"][k][bm],
        "box_track_id": sample["box_track_id"][k][bm], "lidar_points": sample["lidar_points"][k][lm],
        "captions": np.asarray(sample["captions"][k], dtype=object),
    }
    if "original_size" in sample:
      f["original_size"] = sample["original_size"]
    frames.append(f)
  lines = []
  for p, c, m in zip(sample["map_points"], sample["map_class"], sample["map_mask"]):
    n = int(np.asarray(m, bool).sum())
    if c >= 0 and n >= 2:
      lines.append((np.asarray(p[:n], np.float64), int(c)))
  return frames, lines
