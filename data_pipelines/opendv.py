"""OpenDV-YouTube reader: metadata JSON + videos decoded with PyAV at 10 fps -> single-view schema clip samples.

Layout (datasets.md §4):
  ``meta_path`` (default ``<root>/meta/OpenDV-YouTube.json``): a list of dicts with at least ``videoid``, ``youtuber``,
    ``split`` ("Train"/"Val"), ``start_discard``, ``end_discard`` (seconds) and ``length`` (seconds); ``area`` and
    ``state`` are used for captions when present.
  Videos: ``<video_root>/<youtuber with spaces -> _>/<videoid>.<mp4|webm|mkv>`` or flat ``<video_root>/<videoid>.*``
    (OpenDWM); ``video_root`` defaults to ``<root>/videos``.
  Captions (optional, ``caption_path``): OpenDWM's dict keyed ``"<videoid>.<time_ms>"`` with time_ms =
    (frame_idx / 10 + start_discard) * 1000 and values {image_description, ...} (or plain strings); the nearest
    labelled time of the video is used. Without a caption file the caption comes from the metadata.

Frames are the video frames nearest to ``start_discard + i / 10`` s (OpenDWM picks by nearest PTS); a scene is one
video with ``floor((length - start_discard - end_discard) * 10)`` frames; clip ids are ``"<videoid>@<first frame>"``,
windows of ``clip_frames`` every ``clip_stride`` frames (OpenDWM: 19 frames every 5 s = 50 frames).

No calibration exists, so every sample carries the documented fake front camera (cvd_storm_official.md §1.4): 1.7 m
forward, 1.5 m up, looking along +x, focal (W + H) / 2 and the principal point at the centre of the *native* video
frame, rescaled with the image. One view in slot 0 (view_mask [1, 0, 0, 0, 0, 0]; other slots black with identity
K / cam_to_ego), identity ego poses, no boxes, map or LiDAR (padded arrays, masks all False).
"""
from __future__ import annotations

import bisect
import functools
import glob
import json
import math
import os

import numpy as np

from . import frames as frames_lib
from . import geometry
from . import readers
from . import schema
from .readers import ReaderError

FPS = 10.0
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv")
FAKE_CAMERA_TRANSLATION = (1.7, 0.0, 1.5)


def fake_camera(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
  """(K [3, 3], cam_to_ego [4, 4]) of the fake front camera for a W x H image (OpenDWM ``opendv.py``)."""
  f = (width + height) / 2.0
  k = np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])
  return k, geometry.make_rigid(geometry.camera_rotation(0.0), FAKE_CAMERA_TRANSLATION)


def _seconds(value) -> float:
  """Seconds from a number or an "HH:MM:SS" string."""
  if isinstance(value, (int, float)):
    return float(value)
  parts = [float(p) for p in str(value).split(":")]
  return sum(p * 60 ** k for k, p in enumerate(reversed(parts)))


class OpenDVReader(readers.ClipReader):
  """Clips of OpenDV-YouTube videos (see the module docstring)."""

  dataset = "opendv"

  def __init__(self, root: str | os.PathLike, *, meta_path: str | None = None, video_root: str | None = None,
               caption_path: str | None = None, split: str | None = "Train", clip_frames: int = 19,
               clip_stride: int = 50, image_size: tuple[int, int] | None = (256, 448), max_boxes: int = 1,
               max_points: int = 1, max_polylines: int = 1, points_per_polyline: int = 2):
    self.root = os.fspath(root)
    meta_path = meta_path or os.path.join(self.root, "meta", "OpenDV-YouTube.json")
    self.video_root = video_root or os.path.join(self.root, "videos")
    self.clip_frames, self.clip_stride = int(clip_frames), int(clip_stride)
    self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    self.max_boxes, self.max_points = int(max_boxes), int(max_points)
    self.max_polylines, self.points_per_polyline = int(max_polylines), int(points_per_polyline)
    try:
      with open(meta_path) as f:
        meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ReaderError(f"cannot read OpenDV metadata ({e})", meta_path) from e
    self._meta: dict[str, dict] = {}
    for k, m in enumerate(meta):
      for key in ("videoid", "youtuber", "length"):
        if key not in m:
          raise ValueError(f"{meta_path}: entry {k} lacks {key!r}")
      if split is None or str(m.get("split", "")).lower() == split.lower():
        self._meta[str(m["videoid"])] = m
    self._captions: dict[str, tuple[list[float], list[str]]] = {}
    if caption_path:
      with open(caption_path) as f:
        raw = json.load(f)
      per_video: dict[str, list[tuple[float, str]]] = {}
      for key, value in raw.items():
        vid, _, ms = key.rpartition(".")
        text = value.get("image_description", "") if isinstance(value, dict) else str(value)
        per_video.setdefault(vid, []).append((float(ms) / 1000.0, text))
      for vid, items in per_video.items():
        items.sort()
        self._captions[vid] = ([t for t, _ in items], [c for _, c in items])

  def list_scenes(self) -> list[str]:
    return sorted(self._meta)

  def scene_length(self, scene: str) -> int:
    m = self._meta[scene]
    usable = _seconds(m["length"]) - _seconds(m.get("start_discard", 0)) - _seconds(m.get("end_discard", 0))
    return max(0, int(math.floor(usable * FPS + 1e-6)))

  @functools.lru_cache(maxsize=256)
  def video_path(self, scene: str) -> str:
    m = self._meta[scene]
    folder = str(m["youtuber"]).replace(" ", "_")
    for ext in VIDEO_EXTENSIONS:
      for p in (os.path.join(self.video_root, folder, f"{scene}.{ext}"), os.path.join(self.video_root, f"{scene}.{ext}")):
        if os.path.exists(p):
          return p
    found = glob.glob(os.path.join(self.video_root, "**", f"{scene}.*"), recursive=True)
    if found:
      return sorted(found)[0]
    raise ReaderError(f"missing sensor: no video file for {scene}", os.path.join(self.video_root, folder))

  def caption(self, scene: str, time_s: float) -> str:
    """Caption at video time ``time_s`` (nearest labelled time), else one from the metadata."""
    if scene in self._captions:
      times, texts = self._captions[scene]
      j = bisect.bisect_left(times, time_s)
      if j == len(times) or (j > 0 and time_s - times[j - 1] <= times[j] - time_s):
        j -= 1
      return texts[j]
    m = self._meta[scene]
    place = ", ".join(str(m[k]) for k in ("area", "state") if m.get(k))
    return f"A front-camera driving video{' in ' + place if place else ''}."

  def decode(self, scene: str, start: int, count: int) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Decodes frames ``start .. start+count-1`` (at 10 fps after start_discard): (RGB frames, native (H, W))."""
    import av  # Lazy: PyAV is only needed for OpenDV.

    path = self.video_path(scene)
    t0 = _seconds(self._meta[scene].get("start_discard", 0))
    targets = [t0 + (start + k) / FPS for k in range(count)]
    half = 0.5 / FPS
    out: list = [None] * count
    best = [math.inf] * count
    try:
      with av.open(path) as container:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        container.seek(max(0, int((targets[0] - 1.0) / tb)), stream=stream, backward=True, any_frame=False)
        native = None
        for frame in container.decode(stream):
          if frame.pts is None:
            continue
          t = frame.pts * tb
          if t > targets[-1] + half:
            break
          # Frames closest to each target (ties go to the earlier frame).
          for k, target in enumerate(targets):
            d = abs(t - target)
            if d < best[k] and d <= half + 1e-6:
              best[k] = d
              out[k] = frame.to_ndarray(format="rgb24")
              native = out[k].shape[:2]
    except (av.error.FFmpegError, OSError) as e:
      raise ReaderError(f"corrupt video: cannot decode {scene} ({e})", path) from e
    missing = [k for k in range(count) if out[k] is None]
    if missing:
      raise ReaderError(f"truncated video: no frame within half a frame of t={targets[missing[0]]:.2f}s", path)
    return out, native

  def read_frames(self, scene: str, start: int, count: int) -> list[dict]:
    """Frame dicts (``frames`` module format) of frames ``start .. start+count-1`` of a video."""
    images, (h0, w0) = self.decode(scene, start, count)
    hw = self.image_size or (h0, w0)
    k0, c2e0 = fake_camera(w0, h0)
    v = schema.NUM_VIEWS
    intr = np.tile(np.eye(3), (v, 1, 1))
    intr[0] = geometry.resize_intrinsics(k0, (h0, w0), hw)
    c2e = np.tile(np.eye(4), (v, 1, 1))
    c2e[0] = c2e0
    view_mask = np.zeros(v, bool)
    view_mask[0] = True
    original = np.zeros((v, 2), np.int32)
    original[0] = (w0, h0)
    t0 = _seconds(self._meta[scene].get("start_discard", 0))
    out = []
    for k, im in enumerate(images):
      views = np.zeros((v, hw[0], hw[1], 3), np.uint8)
      if im.shape[:2] != hw:
        from PIL import Image
        im = np.asarray(Image.fromarray(im).resize((hw[1], hw[0]), Image.BILINEAR))
      views[0] = im
      time_s = (start + k) / FPS
      captions = np.array([""] * v, dtype=object)
      captions[0] = self.caption(scene, t0 + time_s)
      out.append({
          "images": views, "view_mask": view_mask, "intrinsics": intr.astype(np.float32),
          "cam_to_ego": c2e.astype(np.float32), "ego_to_world": np.eye(4, dtype=np.float32),
          "timestamp": time_s, "original_size": original,
          "boxes": np.zeros((0, 7), np.float32), "box_class": np.zeros((0,), np.int32),
          "box_track_id": np.zeros((0,), np.int32), "lidar_points": np.zeros((0, 3), np.float32),
          "captions": captions,
      })
    return out

  def read_frame(self, scene: str, i: int) -> dict:
    return self.read_frames(scene, i, 1)[0]

  def scene_map(self, scene: str) -> list:
    return []

  def list_clips(self) -> list[str]:
    out = []
    for scene in self.list_scenes():
      n = self.scene_length(scene)
      out.extend(f"{scene}@{s}" for s in range(0, n - self.clip_frames + 1, self.clip_stride))
    return out

  def read_clip(self, clip_id: str) -> dict:
    scene, _, start = clip_id.rpartition("@")
    if scene not in self._meta or not start.isdigit():
      raise KeyError(f"bad OpenDV clip id {clip_id!r}; expected '<videoid>@<first frame>' of a listed video")
    frames = self.read_frames(scene, int(start), self.clip_frames)
    return frames_lib.assemble_clip(frames, [], dataset=self.dataset, clip_id=clip_id, fps=FPS,
                                    max_boxes=self.max_boxes, max_points=self.max_points,
                                    max_polylines=self.max_polylines, points_per_polyline=self.points_per_polyline)
