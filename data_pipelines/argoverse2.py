"""Argoverse 2 Sensor dataset reader -> canonical clip samples (``data_pipelines.schema``), pyarrow only (no av2).

Per log ``<root>/<log_id>/``: ``sensors/cameras/<cam>/<timestamp_ns>.jpg``, ``sensors/lidar/<timestamp_ns>.feather``
(x, y, z float16 in the ego frame at the sweep time), ``calibration/egovehicle_SE3_sensor.feather`` (sensor -> ego,
quaternion w, x, y, z), ``calibration/intrinsics.feather``, ``city_SE3_egovehicle.feather`` (ego -> city, one row per
sensor timestamp, looked up exactly as av2 and OpenDWM do), ``annotations.feather`` (cuboids in the ego frame at
the lidar timestamps) and ``map/log_map_archive_<log_id>____<CITY>_city_<n>.json``.

Views: 7 ring cameras -> 6 slots. Default ``CAMERAS`` is OpenDWM's choice (cvd_storm_official §3.1): ring_front_left,
ring_front_right, ring_side_right, ring_rear_right, ring_rear_left, ring_side_left -- a clockwise ring with the portrait
ring_front_center left out, so every slot is real (view_mask all True). ``cameras`` may name another 6 (None marks an
empty slot: black image, identity pose/intrinsics, view_mask False); mixing the portrait 1550x2048 front_center with
the landscape cameras needs ``image_size``.

Frames: the clip timeline is the 10 Hz lidar sweeps (where the boxes are annotated), resampled to ``fps`` by nearest
timestamp (a clip is dropped when a frame is off by more than half an interval). Each camera takes its 20 Hz image
nearest to the sweep (within half an interval). Each frame's reference ego frame is the ego at the sweep time, so
boxes and LiDAR need no motion compensation; ``cam_to_ego`` of a view is ``inv(E(t_lidar)) @ E(t_cam) @ ego_SE3_cam``,
which is exact camera -> city geometry (av2's ``project_ego_to_img_motion_compensated`` does the same chain).
The AV2 camera frame is OpenCV already (x right, y down, z forward; av2 ``PinholeCamera``). Lens distortion
(k1..k3) is ignored: the schema is pinhole and the images are not undistorted (AV2's distortion is mild).

Boxes: ``CATEGORY_TO_CLASS``; other categories (bollards, cones, signs, animals, ...) dropped. Size (l, w, h) as is;
yaw from the quaternion. Track ids: index of the track_uuid in the sorted uuids of the clip.

Map (city frame): lane_segments' left/right lane boundaries -> lane_line (shared boundaries de-duplicated),
drivable_areas' area_boundary -> road_edge (closed), pedestrian_crossings (edge1 + reversed edge2, closed) ->
crosswalk; only the parts within ``map_radius_m`` of the ego path.

Captions: ``caption_file`` is a JSON object of per-image entries (a str, or a DriveMLM dict of fields joined by
``readers.format_caption``), keyed either way (timestamps in ns):
  "<log_id>/<camera>/<timestamp_ns>"                          e.g. "0c6e.../ring_side_right/315966265659927216"
  "sensor/<split>/<log_id>|cameras/<camera>|<timestamp_ns>"   OpenDWM's DriveMLM file for AV2 (its argoverse.py)
An image takes the entry of its log and camera nearest in time (as OpenDWM does). Dict entries stay raw until a frame's
views are assembled; then time and weather are set to their most common value over the views
(``readers.align_caption_fields``, OpenDWM's align_keys ["time", "weather"]) and only then joined. A file none of whose
keys names a (log, camera) of the reader raises ReaderError (a wrong file or key format); keys of other logs or
cameras are ignored (a file may cover a whole split); real views whose log and camera have no entry, or whose entry
joins to "", take the metadata caption, with one warning per reader naming how many (log, camera) pairs lack entries.
Metadata caption (also without a file): "Driving in <city>." ("Driving." when the map names no city). Empty slots
(camera None) have the caption "".
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re

import numpy as np

from . import geometry, schema
from .readers import (CaptionTable, ClipReader, ReaderError, align_caption_fields, check_caption_entry, check_sample,
                      clip_stride_seconds, crop_polylines_near, format_caption, nearest_indices, pack_boxes, pack_lidar,
                      pack_polylines, pose_matrix, quat_to_matrix, read_caption_file, read_jpeg, resample_nearest,
                      yaw_of)

CAMERAS = ("ring_front_left", "ring_front_right", "ring_side_right", "ring_rear_right", "ring_rear_left",
           "ring_side_left")
RING_CAMERAS = ("ring_front_center", "ring_front_left", "ring_front_right", "ring_rear_left", "ring_rear_right",
                "ring_side_left", "ring_side_right")
CATEGORY_TO_CLASS = {
    "REGULAR_VEHICLE": "car",
    "PEDESTRIAN": "pedestrian", "OFFICIAL_SIGNALER": "pedestrian",
    "BICYCLE": "bicycle", "BICYCLIST": "bicycle",
    "MOTORCYCLE": "motorcycle", "MOTORCYCLIST": "motorcycle",
    "BUS": "bus", "SCHOOL_BUS": "bus", "ARTICULATED_BUS": "bus",
    "TRUCK": "truck", "BOX_TRUCK": "truck", "TRUCK_CAB": "truck", "LARGE_VEHICLE": "truck",
    "VEHICULAR_TRAILER": "trailer",
}
CITY_NAMES = {"PIT": "Pittsburgh", "WDC": "Washington DC", "MIA": "Miami", "ATX": "Austin", "PAO": "Palo Alto",
              "DTW": "Detroit"}
# Caption-file key formats (see the module docstring): ours, and OpenDWM's "<scene_camera>|<timestamp>" with
# scene_camera = "sensor/<split>/<log_id>|cameras/<camera>".
CAPTION_KEY_FORMATS = ("<log_id>/<camera>/<timestamp_ns>", "sensor/<split>/<log_id>|cameras/<camera>|<timestamp_ns>")
_CAPTION_KEY_RES = (re.compile(r"^(?P<log>[^/|]+)/(?P<cam>[^/|]+)/(?P<ts>\d+)$"),
                    re.compile(r"^sensor/[^/|]+/(?P<log>[^/|]+)\|cameras/(?P<cam>[^/|]+)\|(?P<ts>\d+)$"))

_log = logging.getLogger(__name__)


def _read_table(path: str, what: str = "file (feather)"):
  """The pyarrow Table of a feather file; ReaderError naming the file when it is missing or unreadable."""
  import pyarrow.feather as feather  # local: pyarrow is an optional ("data") dependency
  try:
    return feather.read_table(path)
  except FileNotFoundError as e:
    raise ReaderError(f"missing {what}", path) from e
  except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for truncated or corrupt files.
    raise ReaderError(f"corrupt feather file ({type(e).__name__}: {e})", path) from e


def _read_feather(path: str, what: str = "file (feather)") -> dict[str, list]:
  return _read_table(path, what).to_pydict()


def _read_points(path: str) -> np.ndarray:
  """float32 [N, 3] x, y, z of a LiDAR sweep, straight from its Arrow columns (float16 on disk, cast exactly): a
  Python list per value (``to_pydict``) is ~35x slower. A null coordinate becomes NaN, refused below."""
  table = _read_table(path, "sensor file (LiDAR)")
  _require(table.column_names, ("x", "y", "z"), path)
  try:
    pts = np.stack([table.column(c).to_numpy().astype(np.float32) for c in ("x", "y", "z")], -1)
  except (TypeError, ValueError) as e:  # A non-numeric column.
    raise ReaderError(f"corrupt LiDAR sweep ({e})", path) from e
  if not np.all(np.isfinite(pts)):
    raise ReaderError("corrupt LiDAR sweep (non-finite or null coordinates)", path)
  return pts


def _require(table, columns: tuple[str, ...], path: str) -> None:
  """ReaderError unless ``table`` (a column dict or a list of column names) has ``columns``."""
  missing = [c for c in columns if c not in table]
  if missing:
    raise ReaderError(f"feather file lacks columns {missing}", path)


def _timestamps(folder: str, ext: str) -> list[int]:
  if not os.path.isdir(folder):
    return []
  return sorted(int(f[: -len(ext)]) for f in os.listdir(folder) if f.endswith(ext) and f[: -len(ext)].isdigit())


class Argoverse2Reader(ClipReader):
  """Clips of ``num_frames`` frames x 6 ring cameras from AV2 sensor logs. See the module docstring."""

  dataset = "argoverse2"

  def __init__(self, root: str, *, num_frames: int = 19, fps: float = 10.0, clip_stride_s: float | None = None,
               clip_stride_frames: int | None = None,
               cameras: tuple[str | None, ...] = CAMERAS, image_size: tuple[int, int] | None = None,
               logs: list[str] | None = None, max_boxes: int = 128, max_lidar_points: int = 40000,
               max_map_lines: int = 512, map_points_per_line: int = 32, map_radius_m: float = 100.0,
               require_map: bool = True, load_lidar: bool = True, caption_file: str | None = None):
    """
    Args:
      root: a split folder holding ``<log_id>/`` folders (e.g. ``sensor/train``).
      cameras: 6 slot names (None = empty slot), default OpenDWM's ring order.
      clip_stride_s: seconds between clip starts (default 1 / fps).
      clip_stride_frames: the stride in frames at ``fps`` instead (the converter gives this).
      image_size: (H, W) to resize to (intrinsics rescaled); None keeps the native size.
      logs: log ids to use; None = every folder with a city_SE3_egovehicle.feather.
    """
    if len(cameras) != schema.NUM_VIEWS:
      raise ValueError(f"cameras must name {schema.NUM_VIEWS} slots, got {len(cameras)}")
    self.root = root
    self.cameras = tuple(cameras)
    self.num_frames, self.fps = int(num_frames), float(fps)
    self.clip_stride_s = clip_stride_seconds(self.fps, clip_stride_s, clip_stride_frames)
    self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    self.max_boxes, self.max_lidar_points = max_boxes, max_lidar_points
    self.max_map_lines, self.map_points_per_line = max_map_lines, map_points_per_line
    self.map_radius_m, self.require_map, self.load_lidar = map_radius_m, require_map, load_lidar
    if logs is None:
      logs = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "city_SE3_egovehicle.feather")))
    self._logs = list(logs)
    self._clips: dict[str, tuple[str, list[dict[str, int]]]] = {}
    for log in logs:
      self._index_log(log)
    self._cache: dict[str, dict] = {}  # the last log's tables
    self._captions = self._load_captions(caption_file) if caption_file else None

  def _index_log(self, log: str) -> None:
    """Clip frames from file names only: per frame {"lidar": ts, camera: ts}."""
    base = os.path.join(self.root, log, "sensors")
    lidar = np.asarray(_timestamps(os.path.join(base, "lidar"), ".feather"), np.int64)
    cams = {c: np.asarray(_timestamps(os.path.join(base, "cameras", c), ".jpg"), np.int64)
            for c in self.cameras if c is not None}
    lacking = (["LiDAR sweeps (sensors/lidar)"] if lidar.size == 0 else []) + [
        f"{c} images (sensors/cameras/{c})" for c, ts in cams.items() if ts.size == 0]
    if lacking:
      # Once per log: a half-downloaded log would otherwise vanish from the clip list without a trace.
      _log.warning("Argoverse 2 log %s gives no clips: no %s under %s", log, ", no ".join(lacking), base)
      return
    # Nearest image of every camera to every sweep, and whether it is within half a frame interval.
    near = {c: ts[nearest_indices(ts, lidar)] for c, ts in cams.items()}
    ok = np.all([np.abs(n - lidar) * 1e-9 <= 0.5 / self.fps for n in near.values()], axis=0)
    times = lidar * 1e-9
    k = 0
    while times[0] + k * self.clip_stride_s + (self.num_frames - 1) / self.fps <= times[-1] + 0.5 / self.fps:
      idx = resample_nearest(times, times[0] + k * self.clip_stride_s, self.num_frames, self.fps)
      if idx is not None and len(set(idx.tolist())) == self.num_frames and ok[idx].all():
        frames = [dict({"lidar": int(lidar[i])}, **{c: int(n[i]) for c, n in near.items()}) for i in idx]
        self._clips[f"{log}/{k:04d}"] = (log, frames)
      k += 1

  def list_clips(self) -> list[str]:
    return list(self._clips)

  def clip_frames(self, clip_id: str) -> list[dict[str, int]]:
    """Per frame {"lidar": timestamp_ns, <camera>: timestamp_ns}."""
    return [dict(f) for f in self._clips[clip_id][1]]

  # ---------------------------------------------------------------- per-log tables
  def _log(self, log: str) -> dict:
    if log in self._cache:
      return self._cache[log]
    d = os.path.join(self.root, log)
    path = os.path.join(d, "city_SE3_egovehicle.feather")
    poses = _read_feather(path)
    _require(poses, ("timestamp_ns", "qw", "qx", "qy", "qz", "tx_m", "ty_m", "tz_m"), path)
    pose_rows = {int(ts): i for i, ts in enumerate(poses["timestamp_ns"])}
    cpath = os.path.join(d, "calibration", "egovehicle_SE3_sensor.feather")
    calib = _read_feather(cpath)
    _require(calib, ("sensor_name", "qw", "qx", "qy", "qz", "tx_m", "ty_m", "tz_m"), cpath)
    ego_sensor = {n: pose_matrix([calib[q][i] for q in ("qw", "qx", "qy", "qz")],
                                 [calib[t][i] for t in ("tx_m", "ty_m", "tz_m")])
                  for i, n in enumerate(calib["sensor_name"])}
    ipath = os.path.join(d, "calibration", "intrinsics.feather")
    intr = _read_feather(ipath)
    _require(intr, ("sensor_name", "fx_px", "fy_px", "cx_px", "cy_px", "height_px", "width_px"), ipath)
    intrinsics = {n: (np.array([[intr["fx_px"][i], 0.0, intr["cx_px"][i]], [0.0, intr["fy_px"][i], intr["cy_px"][i]],
                                [0.0, 0.0, 1.0]]), (int(intr["height_px"][i]), int(intr["width_px"][i])))
                  for i, n in enumerate(intr["sensor_name"])}
    for c in self.cameras:
      if c is not None and (c not in ego_sensor or c not in intrinsics):
        raise ReaderError(f"no calibration for camera {c!r}", cpath if c not in ego_sensor else ipath)
    apath = os.path.join(d, "annotations.feather")
    ann = _read_feather(apath)
    _require(ann, ("timestamp_ns", "track_uuid", "category", "length_m", "width_m", "height_m", "qw", "qx", "qy",
                   "qz", "tx_m", "ty_m", "tz_m"), apath)
    ann_rows: dict[int, list[int]] = {}
    for i, ts in enumerate(ann["timestamp_ns"]):
      ann_rows.setdefault(int(ts), []).append(i)
    maps = sorted(glob.glob(os.path.join(d, "map", "log_map_archive_*.json")))
    city = ""
    if maps:
      name = os.path.basename(maps[0])
      city = name.split("____")[-1].split("_city")[0] if "____" in name else ""
    elif self.require_map:
      raise ReaderError("missing map archive", os.path.join(d, "map", "log_map_archive_*.json"))
    entry = {"poses": poses, "pose_rows": pose_rows, "pose_path": path, "ego_sensor": ego_sensor,
             "intrinsics": intrinsics, "ann": ann, "ann_rows": ann_rows, "map_path": maps[0] if maps else None,
             "city": city, "map_lines": None}
    self._cache = {log: entry}
    return entry

  @staticmethod
  def _pose(entry: dict, ts: int) -> np.ndarray:
    i = entry["pose_rows"].get(int(ts))
    if i is None:
      raise ReaderError(f"no ego pose at timestamp {ts}", entry["pose_path"])
    p = entry["poses"]
    return pose_matrix([p[q][i] for q in ("qw", "qx", "qy", "qz")], [p[t][i] for t in ("tx_m", "ty_m", "tz_m")])

  def _map_lines(self, entry: dict) -> list[tuple[np.ndarray, int]]:
    if entry["map_lines"] is not None:
      return entry["map_lines"]
    out: list[tuple[np.ndarray, int]] = []
    path = entry["map_path"]
    if path is not None:
      try:
        with open(path) as f:
          m = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise ReaderError(f"corrupt map archive ({e})", path) from e
      road_edge, lane_line, crosswalk = (schema.MAP_CLASSES.index(c) for c in ("road_edge", "lane_line", "crosswalk"))

      def pts(rows):
        return np.asarray([[p["x"], p["y"], p.get("z", 0.0)] for p in rows], np.float64).reshape(-1, 3)

      def closed(p):
        return np.concatenate([p, p[:1]]) if len(p) > 2 else p

      try:
        seen = set()
        for lane in m.get("lane_segments", {}).values():
          for side in ("left_lane_boundary", "right_lane_boundary"):
            p = pts(lane[side])
            key = tuple(np.round(p, 2).ravel())  # neighbouring lanes share their boundary polyline
            if key not in seen and tuple(np.round(p[::-1], 2).ravel()) not in seen:
              seen.add(key)
              out.append((p, lane_line))
        for area in m.get("drivable_areas", {}).values():
          out.append((closed(pts(area["area_boundary"])), road_edge))
        for cross in m.get("pedestrian_crossings", {}).values():
          out.append((closed(np.concatenate([pts(cross["edge1"]), pts(cross["edge2"])[::-1]])), crosswalk))
      except (KeyError, TypeError) as e:
        raise ReaderError(f"malformed map archive (missing {e})", path) from e
    entry["map_lines"] = out
    return out

  # ---------------------------------------------------------------- captions
  def _load_captions(self, path: str) -> CaptionTable:
    """The raw entries per (log, camera) of this reader, by timestamp (ns)."""
    formats = " or ".join(repr(f) for f in CAPTION_KEY_FORMATS)
    raw = read_caption_file(path, formats)
    if not raw:
      raise ReaderError(f"caption file has no entries (keys {formats})", path)
    wanted = {(log, c) for log in self._logs for c in self.cameras if c is not None}
    rows: dict[tuple[str, str], dict[int, object]] = {}
    for key, value in raw.items():
      m = next((m for m in (r.match(key) for r in _CAPTION_KEY_RES) if m), None)
      if m is None:
        raise ReaderError(f"caption key {key!r} is in no accepted format ({formats})", path)
      check_caption_entry(key, value, path)
      pair, ts = (m["log"], m["cam"]), int(m["ts"])
      if pair not in wanted:
        continue  # another log or camera than this reader's: a caption file may cover a whole split
      per_time = rows.setdefault(pair, {})
      if ts in per_time:  # the same image under both key formats: which one is meant is unknowable
        raise ReaderError(f"caption file has two entries for {pair[0]}/{pair[1]}/{ts}", path)
      per_time[ts] = value
    if wanted and not rows:
      raise ReaderError(f"no caption key names a log and camera of this reader ({len(self._logs)} log(s), e.g. "
                        f"{self._logs[0]!r}); example key {next(iter(raw))!r}; accepted keys {formats}", path)
    missing = sorted(wanted - set(rows))
    if missing:
      # Once per reader, not per image: these views take the metadata caption (read_clip).
      _log.warning("Argoverse 2 caption file %s has no entries for %d of %d (log, camera) pairs of the reader "
                   "(e.g. %s/%s); their images take the metadata caption", path, len(missing), len(wanted),
                   *missing[0])
    return CaptionTable({pair: list(per_time.items()) for pair, per_time in rows.items()})

  def _caption_entry(self, log: str, cam: str, ts: int, fallback: str):
    """The raw entry (str or dict) nearest in time of ``log``/``cam``, or ``fallback`` when it has none."""
    return fallback if self._captions is None else self._captions.nearest((log, cam), ts, fallback)

  # ---------------------------------------------------------------- clips
  def read_clip(self, clip_id: str) -> dict:
    if clip_id not in self._clips:
      raise KeyError(f"unknown Argoverse 2 clip {clip_id!r}")
    log, frames = self._clips[clip_id]
    entry = self._log(log)
    d = os.path.join(self.root, log)
    num_t, num_v = len(frames), schema.NUM_VIEWS
    view_mask = np.asarray([c is not None for c in self.cameras])
    hw = self.image_size
    if hw is None:
      sizes = {entry["intrinsics"][c][1] for c in self.cameras if c is not None}
      if len(sizes) != 1:
        raise ValueError(f"cameras {self.cameras} have different sizes {sizes}; pass image_size")
      hw = sizes.pop()
    images = np.zeros((num_t, num_v, hw[0], hw[1], 3), np.uint8)
    intrinsics = np.tile(np.eye(3), (num_t, num_v, 1, 1))
    cam_to_ego = np.tile(np.eye(4), (num_t, num_v, 1, 1))
    ego_to_world = np.zeros((num_t, 4, 4))
    captions = np.full((num_t, num_v), "", dtype=object)
    original_size = np.tile(np.asarray([hw[1], hw[0]], np.int32), (num_v, 1))  # empty slots: the output size
    city = entry["city"]
    fallback = f"Driving in {CITY_NAMES.get(city, city)}." if city else "Driving."
    box_frames, lidar_frames, tracks = [], [], set()
    ann = entry["ann"]
    for t, frame in enumerate(frames):
      lt = frame["lidar"]
      ref = self._pose(entry, lt)
      world_to_ego = geometry.invert_rigid(ref)
      ego_to_world[t] = ref
      entries = [None] * num_v  # raw caption entries of this frame's views; None = empty slot
      for v, cam in enumerate(self.cameras):
        if cam is None:
          continue
        ct = frame[cam]
        path = os.path.join(d, "sensors", "cameras", cam, f"{ct}.jpg")
        img = read_jpeg(path, hw)
        images[t, v] = img
        k, src_hw = entry["intrinsics"][cam]
        original_size[v] = (src_hw[1], src_hw[0])
        intrinsics[t, v] = geometry.resize_intrinsics(k, src_hw, hw) if src_hw != hw else k
        cam_to_ego[t, v] = world_to_ego @ self._pose(entry, ct) @ entry["ego_sensor"][cam]
        entries[v] = self._caption_entry(log, cam, ct, fallback)
      # Align time / weather over the frame's views before joining, as OpenDWM does; an entry that joins to ""
      # (no known field) would give a real view no caption at all.
      for v, raw in enumerate(align_caption_fields(entries)):
        text = format_caption(raw)
        captions[t, v] = text if text or self.cameras[v] is None else fallback
      rows, cls, uuids = [], [], []
      for i in entry["ann_rows"].get(int(lt), []):
        name = CATEGORY_TO_CLASS.get(ann["category"][i])
        if name is None:
          continue
        yaw = yaw_of(quat_to_matrix([ann[q][i] for q in ("qw", "qx", "qy", "qz")]))
        rows.append([ann["tx_m"][i], ann["ty_m"][i], ann["tz_m"][i], ann["length_m"][i], ann["width_m"][i],
                     ann["height_m"][i], yaw])
        cls.append(schema.BOX_CLASSES.index(name))
        uuids.append(ann["track_uuid"][i])
      tracks.update(uuids)
      box_frames.append((np.asarray(rows, np.float64).reshape(-1, 7), np.asarray(cls, np.int32), uuids))
      if self.load_lidar:
        # Already in the ego frame at the sweep time = this frame's reference.
        lidar_frames.append(_read_points(os.path.join(d, "sensors", "lidar", f"{lt}.feather")))
      else:
        lidar_frames.append(np.zeros((0, 3), np.float32))
    track_ids = {u: i for i, u in enumerate(sorted(tracks))}
    boxes, box_class, box_track, box_mask = pack_boxes(
        [(b, c, np.asarray([track_ids[u] for u in us], np.int32)) for b, c, us in box_frames], self.max_boxes)
    lidar, lidar_mask = pack_lidar(lidar_frames, self.max_lidar_points)
    path_xyz = ego_to_world[:, :3, 3]
    lines = crop_polylines_near(self._map_lines(entry), path_xyz[:, :2], self.map_radius_m)
    map_points, map_class, map_mask = pack_polylines(lines, self.max_map_lines, self.map_points_per_line, path_xyz)
    sample = {
        "images": images, "view_mask": view_mask,
        "intrinsics": intrinsics.astype(np.float32), "cam_to_ego": cam_to_ego.astype(np.float32),
        "ego_to_world": ego_to_world.astype(np.float32),
        "timestamps": np.asarray([(f["lidar"] - frames[0]["lidar"]) * 1e-9 for f in frames], np.float64),
        "fps": np.asarray(self.fps, np.float32),
        "boxes": boxes, "box_class": box_class, "box_track_id": box_track, "box_mask": box_mask,
        "map_points": map_points, "map_class": map_class, "map_mask": map_mask,
        "lidar_points": lidar, "lidar_mask": lidar_mask,
        "captions": captions, "dataset": self.dataset, "clip_id": clip_id,
        "original_size": original_size,
    }
    return check_sample(sample)
