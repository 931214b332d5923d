"""The canonical clip sample: what every data pipeline produces and every task consumes.

A sample is a flat ``dict[str, np.ndarray]`` for one clip of T frames x V camera slots. Shapes and units:

Images and cameras (per frame t, view slot v):
  images        uint8   [T, V, H, W, 3]  RGB. Slots with view_mask False are black.
  view_mask     bool    [V]              True where the slot holds a real camera (Waymo 5 of 6; OpenDV 1, or N stacked).
  intrinsics    float32 [T, V, 3, 3]     pinhole K in pixels of *this* H x W (rescaled with the image).
  cam_to_ego    float32 [T, V, 4, 4]     camera -> ego. Camera frame is OpenCV (x right, y down, z forward);
                                         ego frame is x forward, y left, z up, metres.
  ego_to_world  float32 [T, 4, 4]        ego -> world (the dataset's global frame), metres.
  timestamps    float64 [T]              seconds since the clip's first frame.
  fps           float32 []               frame rate of the clip.

3D boxes (padded to NB per frame; box_mask marks real rows), in the ego frame of *that* frame:
  boxes         float32 [T, NB, 7]       centre x, y, z; size length (along heading), width, height; yaw (rad,
                                         about ego z, 0 = facing +x).
  box_class     int32   [T, NB]          index into BOX_CLASSES, -1 for padding.
  box_track_id  int32   [T, NB]          track id, stable over the clip; -1 for padding.
  box_mask      bool    [T, NB]

HD map (padded to NP polylines of NK points), in the *world* frame (static over the clip):
  map_points    float32 [NP, NK, 3]
  map_class     int32   [NP]             index into MAP_CLASSES, -1 for padding.
  map_mask      bool    [NP, NK]         True for real points (a polyline is its True prefix).

LiDAR (padded to NL points per frame), in the ego frame of that frame:
  lidar_points  float32 [T, NL, 3]
  lidar_mask    bool    [T, NL]

Text:
  captions      object  [T, V]           one caption (str) per frame and view; "" where none.

Bookkeeping:
  dataset       str                      "synthetic", "nuscenes", "waymo", "argoverse2", "opendv".
  clip_id       str                      unique within the dataset.

Derived conditions (added by ``data_pipelines.conditions`` from the fields above, at the training resolution):
  box_images    uint8   [T, V, H, W, 3]  3D boxes drawn as coloured line images.
  map_images    uint8   [T, V, H, W, 3]  HD-map polylines drawn as coloured line images (out to 65 m).
  depth         float32 [T, V, H, W]     LiDAR depth along the camera z axis (metres), 0 where no point.
  camera_params float32 [T, V, 11]       OpenDWM C35 "fps_camera_transforms": fps, fx/H, fy/H, cx/W, cy/H (original
                                         scale), cam_to_ego entries 2, 6, 10 (camera z axis) and 3, 7, 11 (origin).
  view_adjacency bool   [V, V]           cross-view attention mask: self + the neighbouring slots on the ring of
                                         view slots, where both are real (a padded slot breaks the ring: Waymo's
                                         five cameras form a chain); identity for single-view clips and OpenDV.

Optional fields (validated when present; ``validate`` never requires them):
  sky_mask      bool    [T, V, H, W]     True where the pixel shows sky (STORM sky loss); absent = no sky labels.
  original_size int32   [V, 2]           (W, H) of each camera's original image. Intrinsics stay consistent with the
                                         current H x W; this only lets camera_params use the original-scale
                                         normalisation after aspect-changing resizes. Absent = the current (W, H).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# The box classes of the layout condition and their line colours (OpenDWM's nuScenes table, cvd_storm_official §1.5).
BOX_CLASSES = ("pedestrian", "car", "truck", "bus", "bicycle", "motorcycle", "construction", "emergency", "trailer")
BOX_COLORS = ((255, 0, 0), (0, 0, 255), (255, 255, 0), (128, 0, 128), (128, 255, 0), (0, 255, 128),
              (128, 128, 255), (255, 128, 128), (255, 255, 255))
# Map classes: road_edge (nuScenes drivable_area outlines, Waymo road edges, AV2 drivable-area boundaries);
# lane_line (nuScenes lane and road dividers, Waymo road lines, AV2 lane boundaries); crosswalk (ped_crossing
# outlines / crosswalk polygons / pedestrian crossings). OpenDWM's nuScenes layout draws lane polygon outlines
# instead of dividers: a documented difference of the nuScenes reader.
MAP_CLASSES = ("road_edge", "lane_line", "crosswalk")
MAP_COLORS = ((0, 0, 255), (0, 255, 0), (255, 0, 0))
# Layout images of a dropped condition are filled with grey 32/255 (OpenDWM C35 uncondition_image_color).
UNCONDITIONED_LAYOUT_VALUE = 32

NUM_VIEWS = 6
DATASETS = ("synthetic", "nuscenes", "waymo", "argoverse2", "opendv")

# name -> (dtype, shape with symbolic dims). "" dtype kind marks non-array fields.
FIELDS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "images": (np.uint8, ("T", "V", "H", "W", 3)),
    "view_mask": (np.bool_, ("V",)),
    "intrinsics": (np.float32, ("T", "V", 3, 3)),
    "cam_to_ego": (np.float32, ("T", "V", 4, 4)),
    "ego_to_world": (np.float32, ("T", 4, 4)),
    "timestamps": (np.float64, ("T",)),
    "fps": (np.float32, ()),
    "boxes": (np.float32, ("T", "NB", 7)),
    "box_class": (np.int32, ("T", "NB")),
    "box_track_id": (np.int32, ("T", "NB")),
    "box_mask": (np.bool_, ("T", "NB")),
    "map_points": (np.float32, ("NP", "NK", 3)),
    "map_class": (np.int32, ("NP",)),
    "map_mask": (np.bool_, ("NP", "NK")),
    "lidar_points": (np.float32, ("T", "NL", 3)),
    "lidar_mask": (np.bool_, ("T", "NL")),
    "captions": (np.object_, ("T", "V")),
}
DERIVED_FIELDS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "box_images": (np.uint8, ("T", "V", "H", "W", 3)),
    "map_images": (np.uint8, ("T", "V", "H", "W", 3)),
    "depth": (np.float32, ("T", "V", "H", "W")),
    "camera_params": (np.float32, ("T", "V", 11)),
    "view_adjacency": (np.bool_, ("V", "V")),
}
OPTIONAL_FIELDS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "sky_mask": (np.bool_, ("T", "V", "H", "W")),
    "original_size": (np.int32, ("V", 2)),
}


class SampleError(ValueError):
  """A sample violates the schema (wrong key, dtype or shape)."""


def validate(sample: Mapping[str, Any], *, derived: bool = False) -> dict[str, int]:
  """Checks a sample against the schema and returns its symbolic dims {T, V, H, W, NB, NP, NK, NL}.

  Raises SampleError naming the field, the expected and the actual dtype/shape.
  """
  fields = dict(FIELDS, **DERIVED_FIELDS) if derived else dict(FIELDS)
  fields.update({k: v for k, v in OPTIONAL_FIELDS.items() if k in sample})
  dims: dict[str, int] = {}
  for name, (dtype, shape) in fields.items():
    if name not in sample:
      raise SampleError(f"sample lacks field {name!r}")
    value = np.asarray(sample[name]) if name != "captions" else sample[name]
    if not isinstance(value, np.ndarray):
      raise SampleError(f"field {name!r} must be a numpy array, got {type(value).__name__}")
    if value.dtype != np.dtype(dtype):
      raise SampleError(f"field {name!r} has dtype {value.dtype}, expected {np.dtype(dtype)}")
    if value.ndim != len(shape):
      raise SampleError(f"field {name!r} has shape {value.shape}, expected {shape}")
    for size, sym in zip(value.shape, shape):
      if isinstance(sym, int):
        if size != sym:
          raise SampleError(f"field {name!r} has shape {value.shape}, expected {shape}")
      elif dims.setdefault(sym, size) != size:
        raise SampleError(f"field {name!r} has {sym}={size}, but an earlier field has {sym}={dims[sym]}")
  for name in ("dataset", "clip_id"):
    if not isinstance(sample.get(name), str):
      raise SampleError(f"field {name!r} must be a str")
  if sample["dataset"] not in DATASETS:
    raise SampleError(f"unknown dataset {sample['dataset']!r}; expected one of {DATASETS}")
  return dims


def pad_axis(x: np.ndarray, size: int, axis: int, fill: Any = 0) -> np.ndarray:
  """Pads (or truncates) ``x`` along ``axis`` to ``size`` with ``fill``."""
  n = x.shape[axis]
  if n >= size:
    return np.take(x, np.arange(size), axis=axis)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - n)
  return np.pad(x, pad, constant_values=fill)
