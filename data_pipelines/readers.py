"""The small interface every dataset reader implements, and the helpers they share.

A reader turns one dataset on disk (nuScenes, Argoverse 2, Waymo, OpenDV) into canonical clip samples
(``data_pipelines.schema``). The converter only needs::

  reader.list_clips() -> list[str]          # clip ids, stable across runs
  reader.read_clip(clip_id) -> dict         # one schema sample (schema.validate passes)

Corrupt or missing inputs raise ``ReaderError`` naming the file, so the converter can count and skip the clip;
a reader never returns a sample built from partial data.

Shared helpers (used by all readers so that padding and resampling behave the same everywhere):
  ``read_jpeg``          decode (and optionally resize) an image file, ReaderError on a bad file.
  ``resample_nearest``   pick source frames nearest to t0 + i / fps (OpenDWM ``enumerate_segments`` rule).
  ``clip_stride_seconds``  seconds between clip starts, from seconds or frames at the clip rate.
  ``nearest_indices``    vectorised nearest-timestamp lookup.
  ``pack_boxes``, ``pack_lidar``, ``pack_polylines``   pad per-frame lists to the fixed schema sizes.
  ``crop_polylines_near``  keep the map parts within a radius of the ego path.
  ``quat_to_matrix``, ``pose_matrix``, ``quat_slerp``, ``yaw_of``   (w, x, y, z) quaternion poses (nuScenes, AV2).
  ``format_caption``     caption-file entries (str or DriveMLM-style dict of fields) as one string, as OpenDWM joins.
  ``align_caption_fields`` one frame's entries with time and weather agreeing across views (OpenDWM align_keys).
  ``read_caption_file``, ``check_caption_entry``, ``CaptionTable``   caption files: read, checked, looked up by time.
"""
from __future__ import annotations

import abc
import collections
import io
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image


class ReaderError(RuntimeError):
  """An input file of a clip is missing, truncated or corrupt. ``path`` names it."""

  def __init__(self, message: str, path: str | os.PathLike | None = None):
    self.path = None if path is None else os.fspath(path)
    super().__init__(message if path is None else f"{message}: {self.path}")


class ClipReader(abc.ABC):
  """Base class of the dataset readers. Subclasses set ``dataset`` (one of schema.DATASETS)."""

  dataset: str = ""

  @abc.abstractmethod
  def list_clips(self) -> list[str]:
    """Returns the ids of all clips this reader can produce, in a deterministic order."""

  @abc.abstractmethod
  def read_clip(self, clip_id: str) -> dict:
    """Returns one schema sample for ``clip_id``; raises ReaderError for missing/corrupt inputs."""

  def __len__(self) -> int:
    return len(self.list_clips())


def read_jpeg(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
  """Reads an image file fully. Returns uint8 [H, W, 3] RGB, resized to ``size`` = (H, W) if given.

  The whole file is decoded (``Image.load``), so a truncated or corrupt JPEG raises here, not later.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise ReaderError("missing sensor file (image)", path) from e
  except OSError as e:
    raise ReaderError(f"cannot read image ({e.strerror})", path) from e
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      im = im.convert("RGB")
      if size is not None and (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), Image.BILINEAR)
      return np.asarray(im, dtype=np.uint8)
  except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for truncated/corrupt data.
    raise ReaderError(f"corrupt image ({e})", path) from e


def quat_to_matrix(q: Sequence[float]) -> np.ndarray:
  """Rotation [3, 3] of a quaternion (w, x, y, z) (nuScenes and Argoverse 2 order); normalised first."""
  w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
  return np.array([
      [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
  ])


def pose_matrix(q: Sequence[float], t: Sequence[float]) -> np.ndarray:
  """Rigid transform [4, 4] from a quaternion (w, x, y, z) and a translation [3]."""
  T = np.eye(4)
  T[:3, :3] = quat_to_matrix(q)
  T[:3, 3] = np.asarray(t, np.float64)
  return T


def quat_slerp(q0: Sequence[float], q1: Sequence[float], amount: float) -> np.ndarray:
  """Shortest-path spherical interpolation of unit quaternions (w, x, y, z), as pyquaternion's slerp."""
  q0 = np.asarray(q0, np.float64) / np.linalg.norm(q0)
  q1 = np.asarray(q1, np.float64) / np.linalg.norm(q1)
  dot = float(np.dot(q0, q1))
  if dot < 0:  # q and -q are the same rotation; take the short arc.
    q1, dot = -q1, -dot
  if dot > 0.9995:
    q = q0 + amount * (q1 - q0)
  else:
    theta = np.arccos(min(dot, 1.0))
    q = (np.sin((1 - amount) * theta) * q0 + np.sin(amount * theta) * q1) / np.sin(theta)
  return q / np.linalg.norm(q)


def yaw_of(rotation: np.ndarray) -> float:
  """Heading (rad about +z, 0 = +x) of a rotation matrix [3, 3]: the angle of its x axis in the xy plane."""
  return float(np.arctan2(rotation[1, 0], rotation[0, 0]))


# DriveMLM caption fields as OpenDWM joins them (its ``selected_keys``), and those it makes agree across the views of
# one frame (its ``align_keys``).
CAPTION_FIELDS = ("time", "weather", "environment", "objects", "image_description")
ALIGNED_CAPTION_FIELDS = ("time", "weather")


def format_caption(value) -> str:
  """A caption-file entry as one string: a str as is (stripped); a dict of fields (DriveMLM / OpenDWM) as OpenDWM
  joins it, ``". ".join`` of the CAPTION_FIELDS it has, in that order (other keys are not part of the prompt)."""
  if value is None:
    return ""
  if isinstance(value, str):
    return value.strip()
  if isinstance(value, dict):
    return ". ".join(str(value[k]) for k in CAPTION_FIELDS if k in value)
  raise ValueError(f"caption entry must be a str or a dict of fields, got {type(value).__name__}")


def read_caption_file(path: str, key_formats: str) -> dict:
  """A caption file's JSON object {key: entry}; ReaderError naming the file (and the accepted ``key_formats``) when it
  cannot be read or holds something else."""
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ReaderError(f"cannot read caption file ({e})", path) from e
  if not isinstance(raw, dict):
    raise ReaderError(f"caption file must hold a JSON object keyed {key_formats}", path)
  return raw


def check_caption_entry(key: str, value: Any, path: str, *, allow_none: bool = True) -> None:
  """ReaderError unless a caption-file entry is what ``format_caption`` reads: a str or a dict of fields (or null,
  an empty caption, where ``allow_none``)."""
  if not isinstance(value, (str, dict)) and not (allow_none and value is None):
    raise ReaderError(f"caption entry {key!r} must be a str or a dict of fields, got {type(value).__name__}", path)


class CaptionTable:
  """Caption-file entries per key (a scene and camera, a video, ...), each key's entries sorted by their labelled
  time (equal times keep the file's order). ``nearest(key, time)`` is the entry labelled nearest to ``time`` (ties:
  the earlier), as OpenDWM's ``find_nearest``. Each reader builds it from its own key formats."""

  def __init__(self, rows: Mapping[Any, Sequence[tuple[float, Any]]] | None = None):
    """rows: {key: [(time, entry), ...]} in any order."""
    self._rows = {}
    for key, items in (rows or {}).items():
      items = sorted(items, key=lambda item: item[0])
      self._rows[key] = (np.asarray([t for t, _ in items]), [e for _, e in items])

  def __contains__(self, key: Any) -> bool:
    return key in self._rows

  def __len__(self) -> int:
    return len(self._rows)

  def nearest(self, key: Any, time: float, default: Any = None) -> Any:
    """The entry of ``key`` labelled nearest to ``time``; ``default`` when the key has none."""
    if key not in self._rows:
      return default
    times, entries = self._rows[key]
    return entries[int(nearest_indices(times, np.asarray([time]))[0])]


def align_caption_fields(values: Sequence[Any], keys: Sequence[str] = ALIGNED_CAPTION_FIELDS) -> list[Any]:
  """The caption entries of one frame's views with ``keys`` set to their most common value over the views that have
  them (ties: the first view's), as OpenDWM's ``align_keys`` does, so that time of day and weather cannot disagree
  between the cameras of one moment. Str / None entries pass unchanged; dicts are copied, never modified."""
  out = [dict(v) if isinstance(v, dict) else v for v in values]
  for key in keys:
    seen = [v[key] for v in out if isinstance(v, dict) and key in v]
    if seen:
      common = collections.Counter(seen).most_common(1)[0][0]
      for v in out:
        if isinstance(v, dict) and key in v:
          v[key] = common
  return out


def nearest_indices(source_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Index of the nearest source time for each target (ties go to the earlier one).

  Args:
    source_times: [N] increasing (N >= 1); targets: [M] in the same unit.
  Returns:
    int [M].
  """
  source_times = np.asarray(source_times)
  targets = np.asarray(targets)
  if source_times.size == 0:
    raise ValueError("nearest_indices needs at least one source time")
  right = np.clip(np.searchsorted(source_times, targets), 0, source_times.size - 1)
  left = np.maximum(right - 1, 0)
  return np.where(np.abs(source_times[left] - targets) <= np.abs(source_times[right] - targets), left, right)


def clip_stride_seconds(fps: float, clip_stride_s: float | None, clip_stride_frames: int | None) -> float:
  """Seconds between clip starts: ``clip_stride_s``, or ``clip_stride_frames`` frames at ``fps`` (the clip rate the
  reader really uses), or one frame when neither is given."""
  if clip_stride_s is not None and clip_stride_frames is not None:
    raise ValueError(f"give clip_stride_s ({clip_stride_s}) or clip_stride_frames ({clip_stride_frames}), not both")
  if clip_stride_frames is not None:
    # bool is an int subclass: a JSON "true" from ``convert --reader-arg`` must not become a stride of one frame.
    if isinstance(clip_stride_frames, bool) or not isinstance(clip_stride_frames, (int, np.integer)) \
        or clip_stride_frames < 1:
      raise ValueError(f"clip_stride_frames must be an int >= 1, got {clip_stride_frames!r}")
    return int(clip_stride_frames) / fps
  stride = 1.0 / fps if clip_stride_s is None else float(clip_stride_s)
  if not stride > 0:  # A zero or negative stride would index clips forever.
    raise ValueError(f"clip_stride_s must be > 0, got {clip_stride_s!r}")
  return stride


def resample_nearest(source_times: np.ndarray, start_time: float, num_frames: int,
                     fps: float) -> np.ndarray | None:
  """Indices of the source frames nearest to ``start_time + i / fps``, i < num_frames.

  Args:
    source_times: [N] increasing times in seconds.
  Returns:
    int [num_frames], or None when any frame is off by more than half a target interval (a dropped camera frame
    or the end of the sequence) -- OpenDWM rejects such clips too.
  """
  source_times = np.asarray(source_times, dtype=np.float64)
  if source_times.size == 0:
    return None
  targets = start_time + np.arange(num_frames) / fps
  pick = nearest_indices(source_times, targets)
  if np.any(np.abs(source_times[pick] - targets) > 0.5 / fps + 1e-6):
    return None
  return pick


def pack_boxes(frames: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], max_boxes: int):
  """Pads per-frame boxes to ``max_boxes`` rows, keeping the nearest boxes to the ego origin when over.

  Args:
    frames: per frame (boxes [n, 7], class [n], track id [n]) in the ego frame.
  Returns:
    boxes [T, NB, 7] f32, box_class [T, NB] i32, box_track_id [T, NB] i32, box_mask [T, NB] bool.
  """
  t = len(frames)
  boxes = np.zeros((t, max_boxes, 7), np.float32)
  cls = np.full((t, max_boxes), -1, np.int32)
  tid = np.full((t, max_boxes), -1, np.int32)
  mask = np.zeros((t, max_boxes), bool)
  for i, (b, c, k) in enumerate(frames):
    b = np.asarray(b, np.float64).reshape(-1, 7)
    order = np.argsort(np.linalg.norm(b[:, :2], axis=-1), kind="stable")[:max_boxes]
    n = order.size
    boxes[i, :n] = b[order]
    cls[i, :n] = np.asarray(c)[order]
    tid[i, :n] = np.asarray(k)[order]
    mask[i, :n] = True
  return boxes, cls, tid, mask


def pack_lidar(frames: Sequence[np.ndarray], max_points: int, seed: int = 0):
  """Pads per-frame point clouds [n, 3] to ``max_points``; over-full clouds are subsampled uniformly at random
  (deterministic ``seed``) so that coverage stays even. Returns lidar_points [T, NL, 3] f32, lidar_mask [T, NL]."""
  rng = np.random.default_rng(seed)
  pts = np.zeros((len(frames), max_points, 3), np.float32)
  mask = np.zeros((len(frames), max_points), bool)
  for i, p in enumerate(frames):
    p = np.asarray(p, np.float32).reshape(-1, 3)
    if p.shape[0] > max_points:
      p = p[np.sort(rng.choice(p.shape[0], max_points, replace=False))]
    pts[i, :p.shape[0]] = p
    mask[i, :p.shape[0]] = True
  return pts, mask


def pack_polylines(lines: Sequence[tuple[np.ndarray, int]], max_lines: int, points_per_line: int,
                   anchor: np.ndarray | None = None):
  """Packs world-frame polylines into [NP, NK, 3] without dropping geometry inside a polyline.

  A polyline longer than ``points_per_line`` is split into consecutive pieces that share their end point, so
  the drawn lines are unchanged. When there are more than ``max_lines`` pieces, those nearest to ``anchor``
  (e.g. the ego path, [M, 3]) are kept.

  Args:
    lines: (points [n, 3] (n >= 2), class index into schema.MAP_CLASSES).
  Returns:
    map_points [NP, NK, 3] f32, map_class [NP] i32 (-1 pad), map_mask [NP, NK] bool.
  """
  if points_per_line < 2:
    raise ValueError(f"points_per_line must be >= 2, got {points_per_line}")
  pieces: list[tuple[np.ndarray, int]] = []
  for pts, c in lines:
    pts = np.asarray(pts, np.float64).reshape(-1, 3)
    if pts.shape[0] < 2:
      continue
    step = points_per_line - 1
    for s in range(0, pts.shape[0] - 1, step):
      pieces.append((pts[s:s + points_per_line], int(c)))
  if len(pieces) > max_lines and anchor is not None:
    anchor = np.asarray(anchor, np.float64).reshape(-1, 3)[:, :2]
    dist = [np.min(np.linalg.norm(p[:, None, :2] - anchor[None], axis=-1)) for p, _ in pieces]
    pieces = [pieces[i] for i in np.argsort(dist, kind="stable")]
  pieces = pieces[:max_lines]
  out = np.zeros((max_lines, points_per_line, 3), np.float32)
  cls = np.full((max_lines,), -1, np.int32)
  mask = np.zeros((max_lines, points_per_line), bool)
  for i, (p, c) in enumerate(pieces):
    out[i, :p.shape[0]] = p
    cls[i] = c
    mask[i, :p.shape[0]] = True
  return out, cls, mask


def crop_polylines_near(lines: Sequence[tuple[np.ndarray, int]], path_xy: np.ndarray, radius: float
                        ) -> list[tuple[np.ndarray, int]]:
  """Keeps the parts of polylines that pass within ``radius`` (xy) of any point of ``path_xy`` [M, 2].

  Works per segment (point-to-segment distance), so a long straight edge whose vertices are both far away but
  which passes next to the ego is kept. Runs of consecutive kept segments become separate polylines.

  Args:
    lines: (points [n, 2 or 3], class) in the same frame as ``path_xy``.
  Returns:
    list of (points [m, 3], class), m >= 2.
  """
  path_xy = np.asarray(path_xy, np.float64).reshape(-1, 2)
  lo, hi = path_xy.min(0) - radius, path_xy.max(0) + radius
  out = []
  for pts, c in lines:
    pts = np.asarray(pts, np.float64)
    if pts.shape[-1] == 2:
      pts = np.concatenate([pts, np.zeros_like(pts[:, :1])], -1)
    if pts.shape[0] < 2:
      continue
    xy = pts[:, :2]
    # Cheap reject on the bounding boxes before the per-segment distances.
    if np.any(xy.max(0) < lo) or np.any(xy.min(0) > hi):
      continue
    a, d = xy[:-1], xy[1:] - xy[:-1]  # [S, 2]
    dd = np.maximum(np.sum(d * d, -1), 1e-12)
    t = np.clip(np.einsum("smk,sk->sm", path_xy[None] - a[:, None], d) / dd[:, None], 0.0, 1.0)  # [S, M]
    dist = np.linalg.norm(a[:, None] + t[..., None] * d[:, None] - path_xy[None], axis=-1).min(-1)
    keep = dist <= radius
    s = 0
    while s < keep.size:
      if not keep[s]:
        s += 1
        continue
      e = s
      while e + 1 < keep.size and keep[e + 1]:
        e += 1
      out.append((pts[s:e + 2], int(c)))
      s = e + 1
  return out


def check_sample(sample: dict) -> dict:
  """Validates a reader's output against the schema (a reader bug surfaces here, not in training)."""
  from . import schema  # local: schema is only needed here
  schema.validate(sample)
  return sample
