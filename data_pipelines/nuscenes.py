"""nuScenes reader: the official on-disk layout -> canonical clip samples (``data_pipelines.schema``).

Reads ``<dataroot>/<version>/*.json`` (the 13 tables nuscenes-devkit loads), ``samples/`` and ``sweeps/`` JPEGs and
``LIDAR_TOP`` ``.pcd.bin`` files, and ``maps/expansion/<location>.json``. No nuscenes-devkit at run time.

Frames and rates:
  * Views are the 6 cameras in the canonical order ``CAMERAS`` (front, then clockwise).
  * ``keyframes_only=False`` (default): the clip timeline is the ~12 Hz CAM_FRONT stream (keyframes + sweeps),
    resampled to ``fps`` (10) by nearest timestamp; a clip is dropped when any frame is off by more than half a
    frame interval (OpenDWM ``enumerate_segments``). Each other camera takes its image nearest in time to the
    CAM_FRONT frame (again within half an interval).
  * ``keyframes_only=True``: the 2 Hz keyframes, ``fps`` = 2.
  * Frames are restricted to [first keyframe, last keyframe] (+-50 ms) of the scene, where boxes are defined.
  * A sample_data's time is that of its own ego pose (``ego_pose[sd["ego_pose_token"]]["timestamp"]``), not its
    ``timestamp`` field: in the v1.0 tables the two are equal, but ASAP's 12 Hz ``sample_data.json`` gives its
    pseudo-keyframe rows invented times (key + k / 6 of the keyframe interval) while their file and ego pose are
    the k-th real sweep after the keyframe (ego_pose.json is copied unchanged). Streams are ordered, matched,
    checked against the tolerance and reported (``timestamps``) by that time.

Poses: each frame's reference ego pose (``ego_to_world``) and time are those of its CAM_FRONT image. Every camera
has its own ego pose in nuScenes (the cameras fire as the lidar sweeps past), so ``cam_to_ego`` of view v is
``inv(E_front) @ E_v @ C_v`` -- exact camera -> world geometry, expressed in the frame's reference ego frame.
calibrated_sensor is sensor -> ego, ego_pose is ego -> global, quaternions (w, x, y, z); the nuScenes camera frame
is already OpenCV (x right, y down, z forward).

Boxes (in the reference ego frame, for the frame's CAM_FRONT image):
  * A keyframe image (is_key_frame): every annotation of its sample (as the devkit and OpenDWM pair them; the
    sample time is the lidar's, a few tens of ms from the image).
  * A sweep image at time t between samples s0 <= t < s1: ASAP's "interp" rule (MagicDrive / UniMLVG's 12 Hz
    labels): only instances annotated in both s0 and s1; centre and size linearly interpolated, rotation slerped
    (shortest arc) with a = (t - t0) / (t1 - t0). Instances leaving or entering between two keyframes are absent
    in between. (The devkit's ``get_boxes`` instead keeps entering instances at their s1 box; on instances of both
    keyframes the two agree, which the tests check.)
  * An ASAP ``interp_12Hz_*`` version folder (12 Hz pseudo keyframes) is read with ``version="interp_12Hz_trainval"``:
    its samples are simply denser, and the same rule applies between them. Camera sample_data rows that ASAP
    duplicates (same filename) are merged. Its LiDAR comes from the v1.0 tables (below, "LiDAR").
  * size: nuScenes (w, l, h) -> schema (l, w, h); yaw = heading of the rotated box x axis in the ego frame.
  * classes: ``CATEGORY_TO_CLASS`` (first matching prefix), others (barriers, cones, animals, ...) dropped; the
    track id is the index of the instance_token in the sorted instance tokens of the clip.

LiDAR: the LIDAR_TOP sample_data (20 Hz) nearest to the frame time (within half a frame interval); points (x, y, z
of float32 x5) go sensor -> ego(lidar time) -> world -> reference ego. Which table folder the LIDAR_TOP stream
(sample_data rows, their ego poses and calibrations) comes from (``lidar_version``, ``reader.lidar_version``):
  * a v1.0 ``version``: the same folder.
  * an ASAP ``<strategy>_<N>Hz_<split>`` ``version`` (e.g. interp_12Hz_trainval): ASAP's sample_data.json keeps,
    for LIDAR_TOP, only the first 5 sweeps after each keyframe (~0-250 ms of every 500 ms), so frames in the rest
    would have no LiDAR within the tolerance. The stream is read instead from the original tables beside it, where
    all 20 Hz sweeps exist: ``v1.0-<split>`` if present, else the first other ``v1.0-*`` folder (sorted) whose
    scene.json shares a scene with the ASAP folder (ASAP names its output ``*_trainval`` even when made from
    v1.0-mini). Scenes are matched by token, else by name (ASAP copies scene.json). With ``load_lidar`` and no
    such folder: ReaderError, rather than silently losing most clips; pass ``lidar_version=version`` to accept
    ASAP's own sparse LiDAR rows, or ``load_lidar=False``. Without ``load_lidar`` no other folder is read.
  * ``lidar_version="<folder>"`` names the folder explicitly (it must exist).
  ``clip_frames`` gives the LIDAR_TOP tokens of that folder. Another folder's tables are read once, at construction
  (v1.0-trainval's sample_data.json and ego_pose.json are large); only its LIDAR_TOP rows and their poses are kept.

Map (world frame, z = 0): from ``maps/expansion/<log location>.json``: drivable_area polygon outlines (exterior and
holes) as road_edge, lane_divider and road_divider lines as lane_line, ped_crossing polygon outlines as crosswalk;
only the parts within ``map_radius_m`` of the clip's ego path. Missing map file -> the map is empty when
``require_map=False`` (default True: ReaderError).

Captions (one per frame and view):
  * ``caption_file``: a JSON object whose keys are any mix of
      - a camera sample_data token;
      - an image filename relative to dataroot (``samples/CAM_FRONT/....jpg``);
      - OpenDWM's ``"<scene_token>|<channel>|<timestamp>"`` (its published nuScenes DriveMLM captions, e.g.
        ``"cc8c0bf57f984915a77078b10eb33198|CAM_FRONT|1531883530412470"``; the timestamp is the image's sample_data
        timestamp in microseconds, as OpenDWM reads it),
    and whose values are a str or a dict of fields (time, weather, environment, objects, image_description).
    Captions are usually made at 2 Hz: an image takes the entry of the nearest-in-time captioned image of the same
    camera in the same scene (ties: the earlier; OpenDWM's ``find_nearest``), compared with the image's capture
    time (its ego pose's, equal to its timestamp in the v1.0 tables). The 6 entries of a frame then get the most
    common time and weather of their dicts (``readers.align_caption_fields``, OpenDWM's ``align_keys``) and are
    joined as in ``readers.format_caption``; str entries pass unchanged.
  * A file is never dropped silently: when no key matches a scene of the reader: ReaderError; keys that match
    nothing (unknown token / filename / scene, a non-camera channel, a bad timestamp) and scene cameras left without
    any caption are reported in one warning. Keys of a table scene that ``scenes`` did not select are skipped quietly
    (a split reader given the caption file of all scenes).
  * otherwise -- and for an image whose scene and camera have no entry in the file, or whose entry is empty -- from
    scene metadata: "<night|daytime>. <rainy|clear>. <scene description>. <location>." with night/rain detected
    from the scene description (nuScenes descriptions mark "night" and "rain"). A caption is never "".
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import re
from typing import Any

import numpy as np

from . import geometry, schema
from .readers import (CaptionTable, ClipReader, ReaderError, align_caption_fields, check_caption_entry, check_sample,
                      clip_stride_seconds, crop_polylines_near, format_caption, nearest_indices, pack_boxes, pack_lidar,
                      pack_polylines, pose_matrix, quat_slerp, quat_to_matrix, read_caption_file, read_jpeg,
                      resample_nearest, yaw_of)

# The caption-file keys the reader accepts (module docstring, "Captions").
CAPTION_KEY_FORMATS = ("a camera sample_data token, an image filename relative to dataroot (samples/CAM_FRONT/...jpg) "
                       "or OpenDWM's '<scene_token>|<channel>|<timestamp_us>'")

CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT")
LIDAR = "LIDAR_TOP"
TABLES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
          "scene", "sample", "sample_data", "sample_annotation", "map")
# nuScenes category name prefixes -> schema.BOX_CLASSES (first match wins).
CATEGORY_TO_CLASS = (
    ("human.pedestrian", "pedestrian"),
    ("vehicle.car", "car"),
    ("vehicle.truck", "truck"),
    ("vehicle.bus", "bus"),
    ("vehicle.bicycle", "bicycle"),
    ("vehicle.motorcycle", "motorcycle"),
    ("vehicle.construction", "construction"),
    ("vehicle.emergency", "emergency"),
    ("vehicle.trailer", "trailer"),
)
_log = logging.getLogger(__name__)
# ASAP's output folders: "{ann_strategy}_{ann_frequency}Hz_trainval" (sAP3D/nusc_annotation_generator.py).
_ASAP_VERSION = re.compile(r"^[A-Za-z]+_\d+Hz_(?P<split>\w+)$")
# Camera images are kept from 50 ms before the first to 50 ms after the last sample: keyframe images sit a few tens
# of ms from their sample (lidar) time.
_SPAN_SLACK_US = 50000


def category_class(name: str) -> int:
  """schema.BOX_CLASSES index of a nuScenes category name, -1 if it is not drawn."""
  for prefix, cls in CATEGORY_TO_CLASS:
    if name == prefix or name.startswith(prefix + "."):
      return schema.BOX_CLASSES.index(cls)
  return -1


def _load_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise ReaderError(f"cannot read ({e.strerror})", path) from e
  except json.JSONDecodeError as e:
    raise ReaderError(f"corrupt JSON ({e})", path) from e


def read_pcd_bin(path: str) -> np.ndarray:
  """x, y, z [N, 3] float32 of a nuScenes ``.pcd.bin`` (float32 x5: x, y, z, intensity, ring)."""
  try:
    data = np.fromfile(path, dtype=np.uint8)
  except FileNotFoundError as e:
    raise ReaderError("missing sensor file (LiDAR)", path) from e
  except OSError as e:
    raise ReaderError(f"cannot read LiDAR file ({e.strerror})", path) from e
  if data.size == 0 or data.size % 20:
    raise ReaderError(f"truncated LiDAR file ({data.size} bytes, not a multiple of 5 float32)", path)
  pts = data.view(np.float32).reshape(-1, 5)[:, :3]
  if not np.all(np.isfinite(pts)):
    raise ReaderError("corrupt LiDAR file (non-finite coordinates)", path)
  return pts


class NuScenesReader(ClipReader):
  """Clips of ``num_frames`` frames x 6 cameras from a nuScenes tree. See the module docstring."""

  dataset = "nuscenes"

  def __init__(self, dataroot: str, version: str = "v1.0-trainval", *, num_frames: int = 19, fps: float = 10.0,
               keyframes_only: bool = False, clip_stride_s: float | None = None, clip_stride_frames: int | None = None,
               image_size: tuple[int, int] | None = None, scenes: list[str] | None = None,
               max_boxes: int = 128, max_lidar_points: int = 40000, max_map_lines: int = 512,
               map_points_per_line: int = 32, map_radius_m: float = 100.0, require_map: bool = True,
               load_lidar: bool = True, caption_file: str | None = None, lidar_version: str | None = None):
    """
    Args:
      dataroot: folder holding ``<version>/``, ``samples/``, ``sweeps/``, ``maps/``.
      version: table folder, e.g. "v1.0-trainval", "v1.0-mini", or an ASAP "interp_12Hz_trainval".
      num_frames, fps: clip length and rate (fps is forced to 2 with ``keyframes_only``).
      clip_stride_s: seconds between clip starts (default one frame, 1 / fps, as OpenDWM's training sets).
      clip_stride_frames: the stride in frames at the clip rate instead (2 fps with keyframes_only); the converter
        gives this.
      image_size: (H, W) to resize images to (intrinsics rescaled); None keeps 900 x 1600.
      scenes: scene names to use (e.g. a split list); None = all.
      max_boxes, max_lidar_points, max_map_lines, map_points_per_line: padded sizes NB, NL, NP, NK.
      lidar_version: table folder of the LIDAR_TOP stream; None picks it (module docstring, "LiDAR").
    """
    self.dataroot = dataroot
    self.version = version
    self.num_frames = int(num_frames)
    self.keyframes_only = keyframes_only
    self.fps = 2.0 if keyframes_only else float(fps)
    self.clip_stride_s = clip_stride_seconds(self.fps, clip_stride_s, clip_stride_frames)
    self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    self.max_boxes, self.max_lidar_points = max_boxes, max_lidar_points
    self.max_map_lines, self.map_points_per_line = max_map_lines, map_points_per_line
    self.map_radius_m, self.require_map, self.load_lidar = map_radius_m, require_map, load_lidar
    table_dir = os.path.join(dataroot, version)
    if not os.path.isdir(table_dir):
      raise ReaderError("nuScenes table folder not found", table_dir)
    self.tables = {name: _load_json(os.path.join(table_dir, f"{name}.json")) for name in TABLES}
    self.lidar_version = (lidar_version or self._default_lidar_version()) if load_lidar else None
    self._index(scenes)
    self._captions = self._load_captions(caption_file) if caption_file else None
    self._maps: dict[str, list[tuple[np.ndarray, int]]] = {}

  # ---------------------------------------------------------------- indexing
  def _index(self, scene_names: list[str] | None) -> None:
    t = self.tables
    by_token = {name: {r["token"]: r for r in t[name]} for name in TABLES}
    self._by_token = by_token
    channel_of_calib = {c["token"]: by_token["sensor"][c["sensor_token"]]["channel"] for c in t["calibrated_sensor"]}
    # Per scene: sorted samples, and per channel the sorted sample_data (keyframes + sweeps).
    samples_by_scene: dict[str, list[dict]] = {}
    for s in t["sample"]:
      samples_by_scene.setdefault(s["scene_token"], []).append(s)
    anns_by_sample: dict[str, list[dict]] = {}
    for a in t["sample_annotation"]:
      anns_by_sample.setdefault(a["sample_token"], []).append(a)
    self._anns_by_sample = anns_by_sample
    # The lidar's rows and lookups: this folder's, or those of another folder (module docstring, "LiDAR").
    own_lidar = self.lidar_version in (None, self.version)
    self._lidar_by_token = by_token
    wanted = set(CAMERAS) | ({LIDAR} if own_lidar else set())
    sd_by_scene: dict[tuple[str, str], dict[str, dict]] = {}
    for sd in t["sample_data"]:
      channel = channel_of_calib.get(sd["calibrated_sensor_token"])
      if channel not in wanted:
        continue
      sample = by_token["sample"].get(sd["sample_token"])
      if sample is None:
        continue
      key = (sample["scene_token"], channel)
      # ASAP's 12 Hz folders repeat sweep images as pseudo keyframes: merge rows of the same file (keyframe wins).
      seen = sd_by_scene.setdefault(key, {})
      prev = seen.get(sd["filename"])
      if prev is None or (sd["is_key_frame"] and not prev["is_key_frame"]):
        seen[sd["filename"]] = sd
    if not own_lidar:
      self._lidar_by_token, lidar_rows = self._foreign_lidar(self.lidar_version)
      for scene_token, rows in lidar_rows.items():
        sd_by_scene[(scene_token, LIDAR)] = {r["filename"]: r for r in rows}
    self._scenes: dict[str, dict] = {}
    names = None if scene_names is None else set(scene_names)
    for scene in sorted(t["scene"], key=lambda s: s["name"]):
      if names is not None and scene["name"] not in names:
        continue
      samples = sorted(samples_by_scene.get(scene["token"], []), key=lambda s: s["timestamp"])
      if not samples:
        continue
      lo, hi = samples[0]["timestamp"], samples[-1]["timestamp"]
      streams = {}
      for ch in CAMERAS + (LIDAR,):
        rows = sorted(sd_by_scene.get((scene["token"], ch), {}).values(), key=lambda r, c=ch: self._time(r, c))
        if ch != LIDAR:
          rows = [r for r in rows if lo - _SPAN_SLACK_US <= self._time(r) <= hi + _SPAN_SLACK_US]
          if self.keyframes_only:
            rows = [r for r in rows if r["is_key_frame"]]
        streams[ch] = rows
      stream_times = {ch: np.asarray([self._time(r, ch) for r in rows], np.int64) for ch, rows in streams.items()}
      self._scenes[scene["name"]] = {"scene": scene, "samples": samples, "streams": streams,
                                     "stream_times": stream_times,
                                     "sample_times": [s["timestamp"] for s in samples]}
    if not own_lidar:
      missing = sorted(n for n, sc in self._scenes.items() if not sc["streams"][LIDAR])
      if missing and len(missing) == len(self._scenes):
        raise ReaderError(f"no scene of {self.version} has LIDAR_TOP rows in {self.lidar_version} (by scene token or "
                          "name); pass lidar_version", os.path.join(self.dataroot, self.lidar_version))
      if missing:
        # Their clips are dropped (no LiDAR frame matches): say so once rather than per clip.
        _log.warning("nuScenes %s: %d scene(s) have no LIDAR_TOP rows in %s and give no clips with load_lidar, "
                     "e.g. %s", self.version, len(missing), self.lidar_version, ", ".join(missing[:3]))
    # Clip enumeration from timestamps only (cheap; files are touched in read_clip).
    self._clips: dict[str, tuple[str, list[dict]]] = {}
    for name, sc in self._scenes.items():
      if not sc["streams"][CAMERAS[0]]:
        continue
      times = sc["stream_times"][CAMERAS[0]].astype(np.float64) * 1e-6
      k = 0
      while times[0] + k * self.clip_stride_s + (self.num_frames - 1) / self.fps <= times[-1] + 0.5 / self.fps:
        frames = self._frames(sc, times, times[0] + k * self.clip_stride_s)
        if frames is not None:
          self._clips[f"{name}/{k:04d}"] = (name, frames)
        k += 1

  def _default_lidar_version(self) -> str:
    """The table folder of the LIDAR_TOP stream when ``lidar_version`` is not given (module docstring, "LiDAR")."""
    m = _ASAP_VERSION.match(self.version)
    if m is None:
      return self.version
    preferred = f"v1.0-{m['split']}"
    others = sorted(n for n in os.listdir(self.dataroot) if n.startswith("v1.0-") and n != preferred)
    tokens, names = {s["token"] for s in self.tables["scene"]}, {s["name"] for s in self.tables["scene"]}
    for folder in [preferred] + others:
      path = os.path.join(self.dataroot, folder)
      if not os.path.isfile(os.path.join(path, "sample_data.json")):
        continue
      scenes = _load_json(os.path.join(path, "scene.json"))
      if any(s["token"] in tokens or s["name"] in names for s in scenes):
        return folder
    raise ReaderError(f"{self.version} keeps LIDAR_TOP only ~0-250 ms after each keyframe, and no v1.0-* table folder "
                      f"beside it shares its scenes (looked for {preferred} first). Add the v1.0 tables, pass "
                      f"lidar_version={self.version!r} to use ASAP's sparse LiDAR rows, or load_lidar=False",
                      self.dataroot)

  def _foreign_lidar(self, folder: str) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """LIDAR_TOP of another table folder: ({"ego_pose", "calibrated_sensor"} lookups of its rows, and its rows per
    scene token of this folder, scenes matched by token, else by name)."""
    path = os.path.join(self.dataroot, folder)
    if not os.path.isdir(path):
      raise ReaderError("LiDAR table folder (lidar_version) not found", path)
    t = {n: _load_json(os.path.join(path, f"{n}.json"))
         for n in ("sensor", "calibrated_sensor", "scene", "sample", "sample_data", "ego_pose")}
    lidar_sensors = {s["token"] for s in t["sensor"] if s["channel"] == LIDAR}
    calib = {c["token"]: c for c in t["calibrated_sensor"] if c["sensor_token"] in lidar_sensors}
    ours_by_name = {s["name"]: s["token"] for s in self.tables["scene"]}
    ours = set(ours_by_name.values())
    scene_map = {s["token"]: s["token"] if s["token"] in ours else ours_by_name.get(s["name"]) for s in t["scene"]}
    scene_of_sample = {s["token"]: scene_map.get(s["scene_token"]) for s in t["sample"]}
    rows: dict[str, list[dict]] = {}
    for sd in t["sample_data"]:
      scene_token = scene_of_sample.get(sd["sample_token"])
      if sd["calibrated_sensor_token"] in calib and scene_token is not None:
        rows.setdefault(scene_token, []).append(sd)
    # Keep only the lidar's ego poses: the full tables of v1.0-trainval are large and not needed past this point.
    needed = {sd["ego_pose_token"] for scene_rows in rows.values() for sd in scene_rows}
    ego = {e["token"]: e for e in t["ego_pose"] if e["token"] in needed}
    return {"ego_pose": ego, "calibrated_sensor": calib}, rows

  def _frames(self, sc: dict, front_times: np.ndarray, start: float) -> list[dict] | None:
    """Per frame: {channel: sample_data} for the 6 cameras and the lidar; None if any stream misses a frame."""
    idx = resample_nearest(front_times, start, self.num_frames, self.fps)
    if idx is None or len(set(idx.tolist())) != self.num_frames:
      return None
    ref_us = sc["stream_times"][CAMERAS[0]][idx]
    picks = {CAMERAS[0]: idx}
    for ch in CAMERAS[1:] + ((LIDAR,) if self.load_lidar else ()):
      times = sc["stream_times"][ch]
      if times.size == 0:
        return None
      j = nearest_indices(times, ref_us)
      if np.any(np.abs(times[j] - ref_us) * 1e-6 > 0.5 / self.fps):
        return None
      picks[ch] = j
    return [{ch: sc["streams"][ch][j[t]] for ch, j in picks.items()} for t in range(self.num_frames)]

  def list_clips(self) -> list[str]:
    return list(self._clips)

  def clip_frames(self, clip_id: str) -> list[dict[str, str]]:
    """The sample_data tokens of a clip: per frame {channel: token} (6 cameras, and LIDAR_TOP with load_lidar)."""
    return [{ch: sd["token"] for ch, sd in frame.items()} for frame in self._clips[clip_id][1]]

  # ---------------------------------------------------------------- poses
  # ``channel`` selects the lookups: LIDAR_TOP rows may come from another table folder (``lidar_version``).
  def _lookup(self, channel: str | None) -> dict[str, dict]:
    return self._lidar_by_token if channel == LIDAR else self._by_token

  def _time(self, sd: dict, channel: str | None = None) -> int:
    """Capture time (us) of a sample_data record: its ego pose's, which ASAP's 12 Hz tables keep true when they
    invent the record's ``timestamp`` (module docstring)."""
    rec = self._lookup(channel)["ego_pose"].get(sd["ego_pose_token"])
    if rec is None:
      folder = self.lidar_version if channel == LIDAR else self.version
      raise ReaderError(f"sample_data {sd['token']} has no ego_pose {sd['ego_pose_token']}",
                        os.path.join(self.dataroot, folder, "ego_pose.json"))
    return int(rec["timestamp"])

  def _ego_pose(self, sd: dict, channel: str | None = None) -> np.ndarray:
    rec = self._lookup(channel)["ego_pose"][sd["ego_pose_token"]]
    return pose_matrix(rec["rotation"], rec["translation"])

  def _calib(self, sd: dict, channel: str | None = None) -> dict:
    return self._lookup(channel)["calibrated_sensor"][sd["calibrated_sensor_token"]]

  def _sensor_to_ego(self, sd: dict, channel: str | None = None) -> np.ndarray:
    c = self._calib(sd, channel)
    return pose_matrix(c["rotation"], c["translation"])

  # ---------------------------------------------------------------- boxes
  def boxes_at(self, scene_name: str, sd: dict) -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
    """World-frame boxes for a camera sample_data record: list of (instance_token, category name, centre [3],
    size wlh [3], rotation quaternion wxyz [4]), by the rule of the module docstring."""
    if sd["is_key_frame"]:
      return [(a["instance_token"], self._category(a), np.asarray(a["translation"], np.float64),
               np.asarray(a["size"], np.float64), np.asarray(a["rotation"], np.float64))
              for a in self._anns_by_sample.get(sd["sample_token"], [])]
    sc = self._scenes[scene_name]
    times = sc["sample_times"]
    ts = self._time(sd)
    j = min(max(bisect.bisect_right(times, ts) - 1, 0), len(times) - 2)
    if j < 0:
      return []  # a single-sample scene has nothing to interpolate between
    t0, t1 = times[j], times[j + 1]
    alpha = min(max((ts - t0) / (t1 - t0), 0.0), 1.0)
    nxt = {a["instance_token"]: a for a in self._anns_by_sample.get(sc["samples"][j + 1]["token"], [])}
    out = []
    for a in self._anns_by_sample.get(sc["samples"][j]["token"], []):
      b = nxt.get(a["instance_token"])
      if b is None:
        continue
      c = (1 - alpha) * np.asarray(a["translation"], np.float64) + alpha * np.asarray(b["translation"], np.float64)
      s = (1 - alpha) * np.asarray(a["size"], np.float64) + alpha * np.asarray(b["size"], np.float64)
      q = quat_slerp(a["rotation"], b["rotation"], alpha)
      out.append((a["instance_token"], self._category(a), c, s, q))
    return out

  def _category(self, ann: dict) -> str:
    inst = self._by_token["instance"][ann["instance_token"]]
    return self._by_token["category"][inst["category_token"]]["name"]

  @staticmethod
  def _to_ego_boxes(boxes, world_to_ego: np.ndarray):
    """World boxes (from boxes_at) -> (schema boxes [n, 7] in the ego frame, class [n], instance tokens)."""
    rows, cls, tokens = [], [], []
    for token, cat, centre, size, quat in boxes:
      k = category_class(cat)
      if k < 0:
        continue
      c = world_to_ego[:3, :3] @ centre + world_to_ego[:3, 3]
      yaw = yaw_of(world_to_ego[:3, :3] @ quat_to_matrix(quat))
      rows.append([c[0], c[1], c[2], size[1], size[0], size[2], yaw])
      cls.append(k)
      tokens.append(token)
    return np.asarray(rows, np.float64).reshape(-1, 7), np.asarray(cls, np.int32), tokens

  # ---------------------------------------------------------------- map
  def _map_lines(self, location: str) -> list[tuple[np.ndarray, int]]:
    """All polylines [n, 2] of a map-expansion JSON with their schema.MAP_CLASSES index (cached per location)."""
    if location in self._maps:
      return self._maps[location]
    path = os.path.join(self.dataroot, "maps", "expansion", f"{location}.json")
    if not os.path.exists(path) and not self.require_map:
      self._maps[location] = []
      return []
    m = _load_json(path)
    try:
      nodes = {n["token"]: (n["x"], n["y"]) for n in m["node"]}
      polygons = {p["token"]: p for p in m["polygon"]}
      lines = {ln["token"]: ln for ln in m["line"]}

      def ring(tokens):
        pts = np.asarray([nodes[t] for t in tokens], np.float64).reshape(-1, 2)
        return np.concatenate([pts, pts[:1]]) if len(pts) > 2 else pts

      def outlines(poly_token):
        p = polygons[poly_token]
        return [ring(p["exterior_node_tokens"])] + [ring(h["node_tokens"]) for h in p.get("holes", [])]

      road_edge, lane_line, crosswalk = (schema.MAP_CLASSES.index(c) for c in ("road_edge", "lane_line", "crosswalk"))
      out = []
      for area in m["drivable_area"]:
        for pt in area["polygon_tokens"]:
          out += [(r, road_edge) for r in outlines(pt)]
      for layer in ("lane_divider", "road_divider"):
        for rec in m[layer]:
          out.append((np.asarray([nodes[t] for t in lines[rec["line_token"]]["node_tokens"]], np.float64), lane_line))
      for rec in m["ped_crossing"]:
        out += [(r, crosswalk) for r in outlines(rec["polygon_token"])[:1]]
    except (KeyError, TypeError) as e:
      raise ReaderError(f"malformed map-expansion JSON (missing {e})", path) from e
    self._maps[location] = out
    return out

  # ---------------------------------------------------------------- captions
  def _load_captions(self, path: str) -> CaptionTable:
    """caption file -> the raw entries per (scene name, channel), by capture time (us).

    Entries stay raw (str or dict) because a frame's views are aligned before they are formatted (read_clip).
    """
    raw = read_caption_file(path, CAPTION_KEY_FORMATS)
    table_scenes = {s["token"] for s in self.tables["scene"]}
    selected = {sc["scene"]["token"]: n for n, sc in self._scenes.items()}
    by_file: dict[str, dict] = {}
    rows: dict[tuple[str, str], list[tuple[int, Any]]] = {}
    unmatched: list[str] = []
    for key, value in raw.items():
      check_caption_entry(key, value, path, allow_none=False)
      if not by_file and "|" not in key and key not in self._by_token["sample_data"]:
        # Built only when a filename key appears: v1.0-trainval has millions of sample_data rows.
        by_file = {sd["filename"]: sd for sd in self.tables["sample_data"]}
      where = self._caption_key(key, by_file)
      if where is None or where[0] not in table_scenes:
        unmatched.append(key)
      elif where[0] in selected:
        rows.setdefault((selected[where[0]], where[1]), []).append((where[2], value))
    if not rows:
      example = f"e.g. {next(iter(raw))!r}" if raw else "the file is empty"
      raise ReaderError(f"no key of the caption file matches an image of the {len(self._scenes)} scene(s) of this "
                        f"{self.version} reader ({example}); keys must be {CAPTION_KEY_FORMATS}", path)
    uncaptioned = [f"{n}/{ch}" for n in self._scenes for ch in CAMERAS if (n, ch) not in rows]
    if unmatched or uncaptioned:
      _log.warning("nuScenes caption file %s: %d of %d key(s) match no camera image of %s (e.g. %s); %d of %d scene "
                   "camera(s) have no caption and use the metadata caption (e.g. %s)", path, len(unmatched), len(raw),
                   self.version, ", ".join(repr(k) for k in unmatched[:3]) or "-", len(uncaptioned),
                   len(self._scenes) * len(CAMERAS), ", ".join(uncaptioned[:3]) or "-")
    return CaptionTable(rows)

  def _caption_key(self, key: str, by_file: dict[str, dict]) -> tuple[str, str, int] | None:
    """(scene token, camera channel, capture time us) named by a caption-file key, None if it names no camera
    image (module docstring, "Captions")."""
    sd = self._by_token["sample_data"].get(key) or by_file.get(key)
    if sd is not None:
      sample = self._by_token["sample"].get(sd["sample_token"])
      calib = self._by_token["calibrated_sensor"].get(sd["calibrated_sensor_token"])
      channel = self._by_token["sensor"][calib["sensor_token"]]["channel"] if calib else None
      if sample is None or channel not in CAMERAS:
        return None
      return sample["scene_token"], channel, self._time(sd)
    parts = key.split("|")
    if len(parts) != 3 or parts[1] not in CAMERAS:
      return None
    try:
      ts = int(parts[2])
    except ValueError:
      try:
        ts = float(parts[2])  # a time list made from ASAP's tables would print its float timestamps
      except ValueError:
        return None
      if not np.isfinite(ts):
        return None
      ts = int(round(ts))
    return parts[0], parts[1], ts

  def _caption_entry(self, scene_name: str, channel: str, ts: int) -> Any:
    """The raw caption-file entry for an image at capture time ``ts`` (nearest captioned time of its scene and
    camera), None without one."""
    return None if self._captions is None else self._captions.nearest((scene_name, channel), ts)

  def frame_captions(self, scene_name: str, frame: dict[str, dict]) -> list[str]:
    """The 6 captions of one frame ({channel: sample_data}), in CAMERAS order (module docstring, "Captions")."""
    fallback = self.metadata_caption(scene_name)
    if self._captions is None:
      return [fallback] * len(CAMERAS)
    entries = [self._caption_entry(scene_name, ch, self._time(frame[ch])) for ch in CAMERAS]
    # Uncaptioned views (None) pass through the alignment untouched and become the metadata caption.
    return [format_caption(e) or fallback for e in align_caption_fields(entries)]

  def metadata_caption(self, scene_name: str) -> str:
    scene = self._scenes[scene_name]["scene"]
    desc = scene.get("description", "").strip().rstrip(".")
    location = self._by_token["log"][scene["log_token"]]["location"]
    low = desc.lower()
    time = "night" if "night" in low else "daytime"
    weather = "rainy" if "rain" in low else "clear"
    return ". ".join(p for p in (time, weather, desc, location) if p) + "."

  # ---------------------------------------------------------------- clips
  def read_clip(self, clip_id: str) -> dict:
    if clip_id not in self._clips:
      raise KeyError(f"unknown nuScenes clip {clip_id!r}")
    scene_name, frames = self._clips[clip_id]
    sc = self._scenes[scene_name]
    num_t, num_v = len(frames), len(CAMERAS)
    images, intrinsics = [], np.zeros((num_t, num_v, 3, 3))
    cam_to_ego, ego_to_world = np.zeros((num_t, num_v, 4, 4)), np.zeros((num_t, 4, 4))
    captions = np.empty((num_t, num_v), dtype=object)
    original_size = np.zeros((num_v, 2), np.int32)
    box_frames, lidar_frames = [], []
    t0 = self._time(frames[0][CAMERAS[0]])
    track_tokens: dict[str, int] = {}
    frame_boxes = []
    for t, frame in enumerate(frames):
      ref = frame[CAMERAS[0]]
      ref_pose = self._ego_pose(ref)
      world_to_ego = geometry.invert_rigid(ref_pose)
      ego_to_world[t] = ref_pose
      row = []
      for v, ch in enumerate(CAMERAS):
        sd = frame[ch]
        path = os.path.join(self.dataroot, sd["filename"])
        img = read_jpeg(path, self.image_size)
        if self.image_size is None and row and img.shape != row[0].shape:
          raise ReaderError(f"image size {img.shape[:2]} differs from the other views; pass image_size", path)
        row.append(img)
        k = np.asarray(self._calib(sd)["camera_intrinsic"], np.float64).reshape(3, 3)
        src_hw = (int(sd.get("height") or img.shape[0]), int(sd.get("width") or img.shape[1]))
        original_size[v] = (src_hw[1], src_hw[0])
        intrinsics[t, v] = geometry.resize_intrinsics(k, src_hw, img.shape[:2]) if src_hw != img.shape[:2] else k
        cam_to_ego[t, v] = world_to_ego @ self._ego_pose(sd) @ self._sensor_to_ego(sd)
      images.append(np.stack(row))
      for v, caption in enumerate(self.frame_captions(scene_name, frame)):
        captions[t, v] = caption
      b, c, tokens = self._to_ego_boxes(self.boxes_at(scene_name, ref), world_to_ego)
      frame_boxes.append((b, c, tokens))
      if self.load_lidar:
        lsd = frame[LIDAR]
        pts = read_pcd_bin(os.path.join(self.dataroot, lsd["filename"]))
        to_ref = world_to_ego @ self._ego_pose(lsd, LIDAR) @ self._sensor_to_ego(lsd, LIDAR)
        lidar_frames.append(geometry.transform_points(to_ref, pts.astype(np.float64)))
      else:
        lidar_frames.append(np.zeros((0, 3)))
    for token in sorted({tok for _, _, toks in frame_boxes for tok in toks}):
      track_tokens[token] = len(track_tokens)
    for b, c, tokens in frame_boxes:
      box_frames.append((b, c, np.asarray([track_tokens[x] for x in tokens], np.int32)))
    boxes, box_class, box_track, box_mask = pack_boxes(box_frames, self.max_boxes)
    lidar, lidar_mask = pack_lidar(lidar_frames, self.max_lidar_points)
    location = self._by_token["log"][sc["scene"]["log_token"]]["location"]
    path_xy = ego_to_world[:, :2, 3]
    lines = crop_polylines_near(self._map_lines(location), path_xy, self.map_radius_m)
    anchor = np.concatenate([path_xy, np.zeros((num_t, 1))], -1)
    map_points, map_class, map_mask = pack_polylines(lines, self.max_map_lines, self.map_points_per_line, anchor)
    sample = {
        "images": np.stack(images).astype(np.uint8),
        "view_mask": np.ones((num_v,), bool),
        "intrinsics": intrinsics.astype(np.float32),
        "cam_to_ego": cam_to_ego.astype(np.float32),
        "ego_to_world": ego_to_world.astype(np.float32),
        "timestamps": np.asarray([(self._time(f[CAMERAS[0]]) - t0) * 1e-6 for f in frames], np.float64),
        "fps": np.asarray(self.fps, np.float32),
        "boxes": boxes, "box_class": box_class, "box_track_id": box_track, "box_mask": box_mask,
        "map_points": map_points, "map_class": map_class, "map_mask": map_mask,
        "lidar_points": lidar, "lidar_mask": lidar_mask,
        "captions": captions,
        "dataset": self.dataset,
        "clip_id": clip_id,
    }
    # (W, H) of the camera images before any resize, for camera_params' original-scale normalisation.
    sample["original_size"] = original_size
    return check_sample(sample)
