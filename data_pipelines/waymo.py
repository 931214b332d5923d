"""Waymo Open Dataset v1 (perception) reader: TFRecord segments of ``Frame`` protos -> schema clip samples.

No TensorFlow: records are framed by ``data_pipelines.tfrecord`` (both CRCs checked) and parsed with the official
generated protos of ``waymo-open-dataset-tf-2-12-0`` (``pip install --no-deps waymo-open-dataset-tf-2-12-0==1.6.7``;
only ``dataset_pb2``, ``label_pb2`` and ``protos.map_pb2`` are imported -- they load with protobuf 7 (upb backend) as
generated, no PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION override or protobuf pin is needed).

Layout: ``root/**/segment-<context>_with_camera_labels.tfrecord`` (any ``*.tfrecord`` under root), one segment = one
scene of ~199 frames at 10 Hz. Clip ids are ``"<scene>@<first frame>"``; ``list_clips`` enumerates windows of
``clip_frames`` frames every ``clip_stride`` frames (OpenDWM starts a clip every 0.1 s = every frame).

Conventions (all documented choices):
  * View slots (6): FRONT, FRONT_RIGHT, SIDE_RIGHT, <empty back slot>, SIDE_LEFT, FRONT_LEFT -- the clockwise ring of
    nuScenes' FRONT, FRONT_RIGHT, BACK_RIGHT, BACK, BACK_LEFT, FRONT_LEFT with the missing rear camera left empty;
    view_mask = [1, 1, 1, 0, 1, 1]. The empty slot has a black image and identity K / cam_to_ego.
  * Cameras: Waymo camera axes are x forward, y left, z up; ``cam_to_ego = extrinsic @ [R_cv->waymo | 0]`` turns
    them into OpenCV axes. K = [[f_u, 0, c_u], [0, f_v, c_v], [0, 0, 1]] at the calibration width x height, rescaled
    to ``image_size`` (images are resized without keeping aspect, like OpenDWM). Lens distortion (k1, k2, p1, p2,
    k3) is ignored: the schema is pinhole.
  * World frame = the segment's map frame. ``frame.pose`` (vehicle -> pose frame, row-major 4x4) drifts against the
    map; each frame carries its own ``map_pose_offset`` that must be *added* to that frame's pose-frame points to
    align them with the map (dataset.proto; the official maps tutorial does ``points = pose @ p; points += offset``
    with each frame's own offset). So ``ego_to_world[t] = Translate(offset_t) @ pose_t``. Waymo's vehicle frame is
    x forward, y left, z up, like the schema's ego frame.
  * Boxes: ``laser_labels`` (vehicle frame of that frame): [center_x, y, z, length, width, height, heading].
    Types: VEHICLE -> car, PEDESTRIAN -> pedestrian, CYCLIST -> bicycle; SIGN and UNKNOWN are dropped (no schema
    class). Track ids are a CRC32 hash (31 bits) of the label's string id, so they are stable over the whole segment
    and independent of the clip window.
  * LiDAR: first returns of ``lasers`` (default all five) decoded from the zlib-compressed ``MatrixFloat`` range
    images (datasets.md §2.3, the official ``convert_range_image_to_cartesian``): inclinations from
    ``beam_inclinations`` when non-empty, else uniform between min and max at row centres, reversed so row 0 is the
    highest beam; azimuth ``((W - col - 0.5) / W * 2 - 1) * pi - atan2(E10, E00)``; spherical -> laser frame ->
    vehicle frame by the extrinsic E. TOP only: the per-pixel vehicle->pose-frame pose
    (``range_image_pose_compressed``, [H, W, 6] roll, pitch, yaw, x, y, z; R = Rz(yaw) Ry(pitch) Rx(roll)) is applied
    and the points are mapped back with inv(frame.pose) (both in the pose frame, so the map offset plays no part):
    rolling-shutter compensation into the frame's vehicle frame. Pixels with range <= 0 are no return. Each frame's
    cloud is subsampled to ``max_points`` with a seed derived from the frame index, so a frame's points do not depend
    on the clip window.
  * Map: ``map_features`` of the segment's first frame (the only frame that carries them). road_edge -> road_edge,
    road_line -> lane_line, crosswalk polygons (closed) -> crosswalk; lane centres -> lane_line only with
    ``include_lane_centers=True`` (OpenDWM draws road lines, road edges and crosswalks, not lane centres).
    Map points are kept as stored: they already are in the world (map) frame, and each frame's offset goes into its
    ego_to_world instead (moving the map by frame 0's offset alone would misalign frame t by offset_t - offset_0).
    Polylines are packed per clip with ``readers.pack_polylines`` anchored at the clip's ego path.
  * Captions: by default from ``context.stats`` (time_of_day, weather, location), the same for every frame and view.
    With ``caption_file``: OpenDWM's per-frame, per-camera DriveMLM captions (``waymo_caption_v2``), a JSON dict keyed
    ``"<scene>|<time>|<camera>"`` as OpenDWM's ``get_image_description`` builds it: scene = the context name (the
    segment file name without ``segment-`` and ``_with_camera_labels.tfrecord``, as ``scene_name``; a full segment
    file name is accepted too), time = the frame's ``timestamp_micros`` (int), camera = the Waymo ``CameraName``
    number (1 FRONT, 2 FRONT_LEFT, 3 FRONT_RIGHT, 4 SIDE_LEFT, 5 SIDE_RIGHT); e.g. ``"<context>|1550083467346370|1"``
    for the FRONT image of the frame at that timestamp_micros. Values: a DriveMLM dict (time, weather, environment,
    objects, image_description) or a plain string. Each view takes the entry at the labelled time of its scene and
    camera nearest to the frame's timestamp_micros (ties: the earlier; OpenDWM looks times up in a per-scene list,
    the same when all cameras are labelled at the same times). Per frame, ``time`` and ``weather`` of the dict
    entries are set to their majority over the views (``readers.align_caption_fields``, OpenDWM's ``align_keys``;
    ties: the first in slot order, where OpenDWM takes the first in its configured camera order), then each entry is
    joined by ``readers.format_caption`` (OpenDWM's default ``selected_keys``; its training-time ``reorder_keys`` /
    ``drop_rates`` are not applied here). A view whose scene and camera have no entry keeps the context.stats
    caption. A caption file none of whose keys names a (segment, camera) of this reader raises ReaderError at
    construction (a wrong key format must not silently leave every caption at context.stats); when only some keys
    or (segment, camera) pairs match, one warning gives the counts.

Errors: an unreadable/corrupt record, a missing camera or laser, or a bad JPEG raise ``ReaderError`` whose message
starts with the reason ("truncated record": the file ends inside a record, or holds none; "corrupt record": a CRC
mismatch or a malformed proto; "missing sensor", "corrupt image"; "cannot read segment" for an OS error).
"""
from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import zlib
from typing import Sequence

import numpy as np

from . import frames as frames_lib
from . import geometry
from . import readers
from . import schema
from . import tfrecord
from .readers import ReaderError

try:
  from google.protobuf.message import DecodeError
  from waymo_open_dataset import dataset_pb2
  from waymo_open_dataset import label_pb2
except ImportError as e:  # pragma: no cover - depends on the environment.
  raise ImportError("The Waymo reader needs the official protos: "
                    "pip install --no-deps waymo-open-dataset-tf-2-12-0==1.6.7 (and protobuf)") from e

FPS = 10.0
# Slot -> Waymo CameraName value (None = empty slot). FRONT=1, FRONT_LEFT=2, FRONT_RIGHT=3, SIDE_LEFT=4, SIDE_RIGHT=5.
VIEW_CAMERAS: tuple[int | None, ...] = (1, 3, 5, None, 4, 2)
VIEW_MASK = np.array([c is not None for c in VIEW_CAMERAS])
LASER_NAMES = {"TOP": 1, "FRONT": 2, "SIDE_LEFT": 3, "SIDE_RIGHT": 4, "REAR": 5}
# Waymo label type -> schema.BOX_CLASSES index.
TYPE_TO_CLASS = {
    label_pb2.Label.TYPE_VEHICLE: schema.BOX_CLASSES.index("car"),
    label_pb2.Label.TYPE_PEDESTRIAN: schema.BOX_CLASSES.index("pedestrian"),
    label_pb2.Label.TYPE_CYCLIST: schema.BOX_CLASSES.index("bicycle"),
}
# OpenCV camera axes in Waymo camera axes (x forward, y left, z up) == geometry's OpenCV -> ego rotation at yaw 0.
CV_TO_WAYMO_CAM = geometry.make_rigid(geometry.camera_rotation(0.0), (0.0, 0.0, 0.0))
CAPTION_KEY_FORMAT = "'<scene>|<timestamp_micros>|<CameraName 1-5>' (OpenDWM)"
_log = logging.getLogger(__name__)
_LOCATIONS = {"location_sf": "San Francisco", "location_phx": "Phoenix", "location_mtv": "Mountain View",
              "location_la": "Los Angeles", "location_det": "Detroit", "location_sea": "Seattle",
              "location_chd": "Chandler"}


def scene_name(path: str) -> str:
  """Scene id of a segment file: the context name without ``segment-`` and ``_with_camera_labels``."""
  stem = os.path.basename(path)
  stem = stem[:-len(".tfrecord")] if stem.endswith(".tfrecord") else stem
  stem = stem[len("segment-"):] if stem.startswith("segment-") else stem
  return stem[:-len("_with_camera_labels")] if stem.endswith("_with_camera_labels") else stem


def track_id(label_id: str) -> int:
  """Stable 31-bit integer track id of a Waymo string object id."""
  return zlib.crc32(label_id.encode("utf-8")) & 0x7FFFFFFF


def transform_from_proto(t) -> np.ndarray:
  """[4, 4] float64 from a Waymo ``Transform`` (16 row-major doubles)."""
  values = np.asarray(t.transform, np.float64)
  if values.size != 16:
    raise ValueError(f"Transform has {values.size} values, expected 16")
  return values.reshape(4, 4)


def camera_to_ego(extrinsic: np.ndarray) -> np.ndarray:
  """Waymo camera->vehicle extrinsic [4, 4] (camera axes x fwd, y left, z up) -> OpenCV camera->ego [4, 4]."""
  return np.asarray(extrinsic, np.float64) @ CV_TO_WAYMO_CAM


def intrinsic_matrix(intrinsic: Sequence[float]) -> np.ndarray:
  """Pinhole K [3, 3] from Waymo [f_u, f_v, c_u, c_v, k1, k2, p1, p2, k3] (distortion dropped)."""
  if len(intrinsic) < 4:
    raise ValueError(f"camera intrinsic has {len(intrinsic)} values, expected 9")
  f_u, f_v, c_u, c_v = intrinsic[:4]
  return np.array([[f_u, 0.0, c_u], [0.0, f_v, c_v], [0.0, 0.0, 1.0]])


def _decode_matrix(compressed: bytes, what: str, path: str) -> np.ndarray:
  """zlib-compressed ``MatrixFloat`` -> float32 array of its shape."""
  try:
    m = dataset_pb2.MatrixFloat.FromString(zlib.decompress(compressed))
  except (zlib.error, DecodeError) as e:
    raise ReaderError(f"corrupt record: cannot decode {what} ({e})", path) from e
  dims = tuple(m.shape.dims)
  data = np.asarray(m.data, np.float32)
  if int(np.prod(dims)) != data.size:
    raise ReaderError(f"corrupt record: {what} has {data.size} values for shape {dims}", path)
  return data.reshape(dims)


@contextlib.contextmanager
def _corrupt_record(path: str, i: int, what: str = ""):
  """Turns the ValueError of a malformed proto field (a Transform without 16 values, a short intrinsic, ...) into the
  ReaderError the converter counts as a skip, naming the file, the frame and ``what`` (a prefix of the message)."""
  try:
    yield
  except ValueError as e:
    raise ReaderError(f"corrupt record: {what}{e} (frame {i})", path) from e


def rotation_rpy(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
  """R = Rz(yaw) Ry(pitch) Rx(roll) [..., 3, 3] (Waymo ``transform_utils.get_rotation_matrix``)."""
  cr, sr = np.cos(roll), np.sin(roll)
  cp, sp = np.cos(pitch), np.sin(pitch)
  cy, sy = np.cos(yaw), np.sin(yaw)
  return np.stack([
      np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], -1),
      np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], -1),
      np.stack([-sp, cp * sr, cp * cr], -1),
  ], -2)


def range_image_to_points(range_image: np.ndarray, extrinsic: np.ndarray, inclinations: np.ndarray,
                          pixel_pose: np.ndarray | None = None, frame_pose: np.ndarray | None = None
                          ) -> np.ndarray:
  """Converts one range image to vehicle-frame points (official algorithm, numpy).

  Args:
    range_image: [H, W, C] with channel 0 = range (metres); range <= 0 = no return.
    extrinsic: [4, 4] laser -> vehicle.
    inclinations: [H] beam inclinations (rad) with row 0 = the HIGHEST beam (i.e. already reversed).
    pixel_pose: optional [H, W, 6] per-pixel vehicle->world pose (roll, pitch, yaw, x, y, z), TOP laser only.
    frame_pose: [4, 4] vehicle -> world of the frame; required with ``pixel_pose``.
  Returns:
    float64 [N, 3] points of the valid pixels, row-major pixel order.
  """
  h, w = range_image.shape[:2]
  rng = range_image[..., 0].astype(np.float64)
  extrinsic = np.asarray(extrinsic, np.float64)
  az_correction = np.arctan2(extrinsic[1, 0], extrinsic[0, 0])
  azimuth = ((w - np.arange(w) - 0.5) / w * 2.0 - 1.0) * np.pi - az_correction  # [W]
  incl = np.asarray(inclinations, np.float64)[:, None]  # [H, 1]
  cos_incl = np.cos(incl)
  pts = np.stack([np.cos(azimuth)[None] * cos_incl * rng, np.sin(azimuth)[None] * cos_incl * rng,
                  np.broadcast_to(np.sin(incl), (h, w)) * rng], axis=-1)  # [H, W, 3], laser frame
  pts = pts @ extrinsic[:3, :3].T + extrinsic[:3, 3]
  valid = rng > 0
  if pixel_pose is not None:
    if frame_pose is None:
      raise ValueError("pixel_pose needs frame_pose")
    pp = np.asarray(pixel_pose, np.float64)[valid]  # [N, 6]
    rot = rotation_rpy(pp[:, 0], pp[:, 1], pp[:, 2])
    world = np.einsum("nij,nj->ni", rot, pts[valid]) + pp[:, 3:6]
    return geometry.transform_points(geometry.invert_rigid(np.asarray(frame_pose, np.float64)), world)
  return pts[valid]


def beam_inclinations(calib, height: int) -> np.ndarray:
  """[H] inclinations of a ``LaserCalibration``, row 0 = highest beam."""
  if len(calib.beam_inclinations) > 0:  # Emptiness, not None (OpenDWM's port gets this wrong, datasets.md §2.3).
    incl = np.asarray(calib.beam_inclinations, np.float64)
    if incl.size != height:
      raise ValueError(f"laser {calib.name}: {incl.size} beam inclinations for a range image of {height} rows")
  else:
    incl = calib.beam_inclination_min + (np.arange(height) + 0.5) / height * (
        calib.beam_inclination_max - calib.beam_inclination_min)
  return incl[::-1].copy()


def caption_from_stats(stats) -> str:
  """A short scene description from ``context.stats`` (time_of_day, location, weather); "" when all are empty."""
  if not (stats.time_of_day or stats.location or stats.weather):
    return ""
  text = f"{stats.time_of_day} driving scene" if stats.time_of_day else "Driving scene"
  if stats.location:
    text += f" in {_LOCATIONS.get(stats.location, stats.location.replace('location_', ''))}"
  if stats.weather:
    text += f", {stats.weather.lower()} weather"
  return text + "."


def ego_to_map(frame) -> np.ndarray:
  """[4, 4] vehicle -> map (= schema world) of one frame: ``frame.pose``, then that frame's ``map_pose_offset``.

  The offset compensates the pose drift of its own frame, so frame 0's offset cannot stand in for later frames.
  """
  pose = transform_from_proto(frame.pose)
  pose[:3, 3] += (frame.map_pose_offset.x, frame.map_pose_offset.y, frame.map_pose_offset.z)
  return pose


def _map_polylines(frame, include_lane_centers: bool) -> list[tuple[np.ndarray, int]]:
  """World(= map)-frame polylines of a Frame's ``map_features`` ([(points [n, 3] float64, class)])."""
  out = []
  for feature in frame.map_features:
    kind = feature.WhichOneof("feature_data")
    if kind == "road_edge":
      pts, cls, closed = feature.road_edge.polyline, "road_edge", False
    elif kind == "road_line":
      pts, cls, closed = feature.road_line.polyline, "lane_line", False
    elif kind == "crosswalk":
      pts, cls, closed = feature.crosswalk.polygon, "crosswalk", True
    elif kind == "lane" and include_lane_centers:
      pts, cls, closed = feature.lane.polyline, "lane_line", False
    else:
      continue
    p = np.array([[q.x, q.y, q.z] for q in pts], np.float64).reshape(-1, 3)
    if closed and len(p) > 2:
      p = np.concatenate([p, p[:1]])
    if len(p) >= 2:
      out.append((p, schema.MAP_CLASSES.index(cls)))
  return out


class WaymoReader(readers.ClipReader):
  """Clips of Waymo v1 perception segments (see the module docstring for every convention)."""

  dataset = "waymo"

  def __init__(self, root: str | os.PathLike, *, clip_frames: int = 19, clip_stride: int = 1,
               image_size: tuple[int, int] | None = (256, 448), max_boxes: int = 64, max_points: int = 32768,
               max_polylines: int = 256, points_per_polyline: int = 20,
               lasers: Sequence[str] = ("TOP", "FRONT", "SIDE_LEFT", "SIDE_RIGHT", "REAR"),
               include_lane_centers: bool = False, caption_file: str | None = None):
    """Args:
      root: directory searched recursively for ``*.tfrecord`` segments.
      image_size: (H, W) of every view; None = the FRONT calibration size (sides stretched to it).
      caption_file: OpenDWM's per-frame, per-camera caption JSON (module docstring); None = context.stats captions.
    """
    self.root = os.fspath(root)
    self.clip_frames = int(clip_frames)
    self.clip_stride = int(clip_stride)
    self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    self.max_boxes, self.max_points = int(max_boxes), int(max_points)
    self.max_polylines, self.points_per_polyline = int(max_polylines), int(points_per_polyline)
    unknown = set(lasers) - set(LASER_NAMES)
    if unknown:
      raise ValueError(f"unknown Waymo lasers {sorted(unknown)}; expected some of {sorted(LASER_NAMES)}")
    self.lasers = tuple(LASER_NAMES[n] for n in lasers)
    self.include_lane_centers = include_lane_centers
    files = sorted(glob.glob(os.path.join(self.root, "**", "*.tfrecord"), recursive=True))
    self._paths: dict[str, str] = {}
    for f in files:
      name = scene_name(f)
      if name in self._paths:
        raise ValueError(f"two Waymo segments named {name!r}: {self._paths[name]} and {f}")
      self._paths[name] = f
    # Raw entries per (scene, CameraName) by timestamp_micros; formatted per frame, after the cross-view alignment.
    self._captions = self._load_captions(os.fspath(caption_file)) if caption_file else readers.CaptionTable()

  # ---- captions -----------------------------------------------------------------------------------------------
  def _load_captions(self, path: str) -> readers.CaptionTable:
    raw = readers.read_caption_file(path, CAPTION_KEY_FORMAT)
    cameras = {c for c in VIEW_CAMERAS if c is not None}
    rows: dict[tuple[str, int], list[tuple[int, object]]] = {}
    unmatched = []
    for key, value in raw.items():
      parts = str(key).rsplit("|", 2)
      try:
        scene, time_us, cam = scene_name(parts[0]), int(parts[1]), int(parts[2])
      except (IndexError, ValueError):
        scene, time_us, cam = "", 0, 0
      if scene not in self._paths or cam not in cameras:
        unmatched.append(key)
        continue
      readers.check_caption_entry(key, value, path)
      rows.setdefault((scene, cam), []).append((time_us, value))
    if not rows:
      example = repr(next(iter(raw))) if raw else "none (the file is empty)"
      raise ReaderError(f"no key of the Waymo caption file names a segment and camera of this reader "
                        f"({len(self._paths)} segments under {self.root}); example key: {example}; expected "
                        f"{CAPTION_KEY_FORMAT}", path)
    uncaptioned = len(self._paths) * len(cameras) - len(rows)
    if unmatched or uncaptioned:
      # Expected when the file covers more segments than root holds; one line so that a half-wrong file is noticed.
      _log.warning("Waymo caption file %s: %d of %d keys name no segment and camera of this reader (e.g. %r; expected "
                   "%s), %d of %d (segment, camera) pairs have no caption and keep the context.stats one", path,
                   len(unmatched), len(raw), unmatched[0] if unmatched else None, CAPTION_KEY_FORMAT, uncaptioned,
                   len(self._paths) * len(cameras))
    return readers.CaptionTable(rows)

  def frame_captions(self, scene: str, timestamp_us: int, fallback: str) -> np.ndarray:
    """Captions [V] (object) of one frame: caption-file entries at the nearest labelled time of each view's camera,
    time / weather aligned across the views, joined; ``fallback`` for views without entries; "" for the empty slot."""
    missing = object()  # Not None: a null value in the file is an (empty) entry, as readers.format_caption reads it.
    entries = [self._captions.nearest((scene, cam), timestamp_us, missing) for cam in VIEW_CAMERAS]
    aligned = readers.align_caption_fields(entries)
    return np.array(["" if cam is None else fallback if e is missing else readers.format_caption(e)
                     for cam, e in zip(VIEW_CAMERAS, aligned)], dtype=object)

  # ---- scenes -------------------------------------------------------------------------------------------------
  def list_scenes(self) -> list[str]:
    return sorted(self._paths)

  @functools.lru_cache(maxsize=64)
  def _index(self, scene: str) -> tuple[tuple[tuple[int, int], ...], tuple[str, str] | None]:
    """(offset, length) of the readable records, and (reason, message) of the damage that ends them, or None."""
    path = self._path(scene)
    try:
      index, error = tfrecord.scan_records(path)
    except OSError as e:  # Unreadable file (permissions, vanished): the scene's problem, not the run's.
      raise ReaderError(f"cannot read segment ({e.strerror})", path) from e
    return tuple(index), None if error is None else (error.reason, str(error))

  def _path(self, scene: str) -> str:
    if scene not in self._paths:
      raise KeyError(f"unknown Waymo scene {scene!r} under {self.root}")
    return self._paths[scene]

  def scene_length(self, scene: str) -> int:
    """Number of frames of ``scene``; a damaged tail counts as one more frame, whose read raises ReaderError."""
    index, error = self._index(scene)
    return len(index) + (error is not None)

  def _frame(self, scene: str, i: int):
    path = self._path(scene)
    index, error = self._index(scene)
    if i >= len(index):
      if error is not None and i == len(index):
        raise ReaderError(f"{error[0]}: {error[1]}", path)
      if not index:  # A 0-byte (or header-less) segment: a damaged input, not a caller's bad index.
        raise ReaderError("truncated record: segment holds no record", path)
      raise IndexError(f"frame {i} out of range for scene {scene!r} ({len(index)} frames)")
    try:
      data = tfrecord.read_record(path, index[i][0])
    except tfrecord.TFRecordError as e:  # "corrupt record" (CRC mismatch) or "truncated record".
      raise ReaderError(f"{e.reason}: {e}", path) from e
    except OSError as e:
      raise ReaderError(f"cannot read segment ({e.strerror})", path) from e
    try:
      return dataset_pb2.Frame.FromString(data)
    except DecodeError as e:
      raise ReaderError(f"corrupt record: frame {i} does not parse as a Frame ({e})", path) from e

  @functools.lru_cache(maxsize=8)
  def _scene_info(self, scene: str):
    """(context of frame 0, world(= map)-frame map polylines, timestamp_micros of frame 0) of a scene."""
    first = self._frame(scene, 0)
    return first.context, _map_polylines(first, self.include_lane_centers), first.timestamp_micros

  def scene_map(self, scene: str) -> list[tuple[np.ndarray, int]]:
    """World(= map)-frame map polylines [(points [n, 3] float64, class)] of a scene (before per-clip packing)."""
    return self._scene_info(scene)[1]

  def _output_hw(self, context) -> tuple[int, int]:
    if self.image_size is not None:
      return self.image_size
    for c in context.camera_calibrations:
      if c.name == 1 and c.height > 0:
        return int(c.height), int(c.width)
    raise ReaderError("missing sensor: no FRONT camera calibration to size the images", None)

  def read_frame(self, scene: str, i: int) -> dict:
    """One frame as a dict of per-frame arrays (schema fields without the T axis, boxes/points unpadded)."""
    path = self._path(scene)
    frame = self._frame(scene, i)
    first_context, _, first_us = self._scene_info(scene)
    context = frame.context if len(frame.context.camera_calibrations) else first_context
    hw = self._output_hw(context)
    calibs = {c.name: c for c in context.camera_calibrations}
    images = {im.name: im for im in frame.images}
    v = len(VIEW_CAMERAS)
    out_images = np.zeros((v, hw[0], hw[1], 3), np.uint8)
    intr = np.tile(np.eye(3), (v, 1, 1))
    c2e = np.tile(np.eye(4), (v, 1, 1))
    original = np.zeros((v, 2), np.int32)
    for slot, cam in enumerate(VIEW_CAMERAS):
      if cam is None:
        continue
      cam_name = dataset_pb2.CameraName.Name.Name(cam)
      if cam not in calibs:
        raise ReaderError(f"missing sensor: no calibration for camera {cam_name} in frame {i}", path)
      if cam not in images or not images[cam].image:
        raise ReaderError(f"missing sensor: no image for camera {cam_name} in frame {i}", path)
      calib = calibs[cam]
      what = f"camera {cam_name} of frame {i}"
      if calib.height > 0 and calib.width > 0:
        calib_hw = (int(calib.height), int(calib.width))
        out_images[slot] = frames_lib.decode_image(images[cam].image, hw, what=what, path=path)
      else:  # No size in the calibration: K belongs to the JPEG's own size.
        decoded = frames_lib.decode_image(images[cam].image, None, what=what, path=path)
        calib_hw = decoded.shape[:2]
        out_images[slot] = frames_lib.decode_image(images[cam].image, hw, what=what, path=path)
      with _corrupt_record(path, i, f"camera {cam_name} calibration: "):
        intr[slot] = geometry.resize_intrinsics(intrinsic_matrix(calib.intrinsic), calib_hw, hw)
        c2e[slot] = camera_to_ego(transform_from_proto(calib.extrinsic))
      original[slot] = (calib_hw[1], calib_hw[0])
    with _corrupt_record(path, i, "frame pose: "):
      pose = transform_from_proto(frame.pose)  # Pose frame, not world: the TOP per-pixel poses are expressed in it.
      ego_to_world = ego_to_map(frame)

    boxes, cls, tids = [], [], []
    for label in frame.laser_labels:
      if label.type not in TYPE_TO_CLASS:
        continue
      b = label.box
      boxes.append([b.center_x, b.center_y, b.center_z, b.length, b.width, b.height, b.heading])
      cls.append(TYPE_TO_CLASS[label.type])
      tids.append(track_id(label.id))
    boxes_p, cls_p, tids_p, bmask = readers.pack_boxes(
        [(np.asarray(boxes, np.float64).reshape(-1, 7), np.asarray(cls, np.int32), np.asarray(tids, np.int32))],
        self.max_boxes)
    n_boxes = int(bmask[0].sum())

    points = self._points(frame, context, pose, path, i)
    pts_p, pmask = readers.pack_lidar([points], self.max_points, seed=i)
    captions = self.frame_captions(scene, frame.timestamp_micros, caption_from_stats(first_context.stats))
    return {
        "images": out_images, "view_mask": VIEW_MASK.copy(), "intrinsics": intr.astype(np.float32),
        "cam_to_ego": c2e.astype(np.float32), "ego_to_world": ego_to_world.astype(np.float32),
        # Relative to the segment start: absolute seconds (~1.6e9) would lose sub-microsecond precision.
        "timestamp": (frame.timestamp_micros - first_us) * 1e-6, "original_size": original,
        "boxes": boxes_p[0, :n_boxes], "box_class": cls_p[0, :n_boxes], "box_track_id": tids_p[0, :n_boxes],
        "lidar_points": pts_p[0, :int(pmask[0].sum())],
        "captions": captions,
    }

  def _points(self, frame, context, pose: np.ndarray, path: str, i: int) -> np.ndarray:
    calibs = {c.name: c for c in context.laser_calibrations}
    lasers = {l.name: l for l in frame.lasers}
    clouds = []
    for name in self.lasers:
      laser_name = dataset_pb2.LaserName.Name.Name(name)
      if name not in lasers or name not in calibs or not lasers[name].ri_return1.range_image_compressed:
        raise ReaderError(f"missing sensor: no range image or calibration for laser {laser_name} in frame {i}",
                          path)
      ri = lasers[name].ri_return1
      image = _decode_matrix(ri.range_image_compressed, f"{laser_name} range image of frame {i}", path)
      calib = calibs[name]
      with _corrupt_record(path, i, f"laser {laser_name} calibration: "):
        incl = beam_inclinations(calib, image.shape[0])
        extrinsic = transform_from_proto(calib.extrinsic)
      pixel_pose = None
      if name == LASER_NAMES["TOP"] and ri.range_image_pose_compressed:
        pixel_pose = _decode_matrix(ri.range_image_pose_compressed, f"TOP range image pose of frame {i}", path)
        if pixel_pose.shape[:2] != image.shape[:2]:
          raise ReaderError(f"corrupt record: TOP pixel pose {pixel_pose.shape} vs range image {image.shape}", path)
      clouds.append(range_image_to_points(image, extrinsic, incl, pixel_pose, pose))
    return np.concatenate(clouds) if clouds else np.zeros((0, 3))

  # ---- clips --------------------------------------------------------------------------------------------------
  def list_clips(self) -> list[str]:
    out = []
    for scene in self.list_scenes():
      n = self.scene_length(scene)
      out.extend(f"{scene}@{s}" for s in range(0, n - self.clip_frames + 1, self.clip_stride))
    return out

  def read_clip(self, clip_id: str) -> dict:
    scene, _, start = clip_id.rpartition("@")
    if not scene or not start.isdigit():
      raise KeyError(f"bad Waymo clip id {clip_id!r}; expected '<scene>@<first frame>'")
    frames = [self.read_frame(scene, int(start) + k) for k in range(self.clip_frames)]
    return frames_lib.assemble_clip(frames, self.scene_map(scene), dataset=self.dataset, clip_id=clip_id, fps=FPS,
                         max_boxes=self.max_boxes, max_points=self.max_points, max_polylines=self.max_polylines,
                         points_per_polyline=self.points_per_polyline)

