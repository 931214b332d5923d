"""OpenDV-YouTube reader: metadata JSON + videos decoded with PyAV at 10 fps -> single-view schema clip samples.

Layout (datasets.md §4):
  ``meta_path`` (default ``<root>/meta/OpenDV-YouTube.json``): a list of dicts with at least ``videoid``, ``youtuber``,
    ``split`` ("Train"/"Val"), ``start_discard``, ``end_discard`` (seconds) and ``length`` (seconds); ``area`` and
    ``state`` are used for captions when present. A row of the split whose length or discards are not a number of
    seconds >= 0 ("N/A", NaN, null) is skipped, counted in ``skipped_videos`` and named in one warning.
  Videos: ``<video_root>/<youtuber with spaces -> _>/<videoid>.<mp4|webm|mkv>`` or flat ``<video_root>/<videoid>.*``
    (OpenDWM); ``video_root`` defaults to ``<root>/videos``.
  Captions (optional, ``caption_path``): OpenDWM's JSON dict (``opendv_caption.json``) keyed
    ``"<video file name>.<time_ms>"``, e.g. ``"zRXiDu2Ihyk.mp4.61500"`` (OpenDWM keys by the file name, extension
    included); ``"<videoid>.<time_ms>"`` is accepted too. The id part names a video of this reader either as is or
    after stripping a trailing ``.mp4`` / ``.webm`` / ``.mkv`` (VIDEO_EXTENSIONS). time_ms is the video time in ms,
    (start_discard + frame_idx / 10) * 1000. Values: a DriveMLM dict, joined by ``readers.format_caption`` as OpenDWM
    does with its default ``selected_keys`` (the present fields of time, weather, environment, objects,
    image_description, joined with ". "), or a plain string. Each frame takes the entry at the nearest labelled time
    of its video (ties: the earlier); OpenDWM's training-time ``reorder_keys`` / ``drop_rates`` are not applied here.
    There is no time / weather alignment: a sample has one video (OpenDWM aligns none for OpenDV). A video without
    any key, or a reader without a caption file, uses the metadata caption. A caption file none of whose keys names
    a video of this reader (its split) raises ReaderError at construction (a wrong key format must not silently turn
    every caption into the metadata one); when only some keys or videos match, one warning gives the counts.

Frames are the video frames nearest to ``start_discard + i / 10`` s (OpenDWM picks by nearest PTS); a scene is one
video with ``floor((length - start_discard - end_discard) * 10)`` frames; clip ids are ``"<videoid>@<first frame>"``,
windows of ``clip_frames`` every ``clip_stride`` frames (OpenDWM: 19 frames every 5 s = 50 frames).

No calibration exists, so every sample carries the documented fake front camera (cvd_storm_official.md §1.4): 1.7 m
forward, 1.5 m up, looking along +x, focal (W + H) / 2 and the principal point at the centre of the *native* video
frame, rescaled with the image. One view in slot 0 (view_mask [1, 0, 0, 0, 0, 0]; other slots black with identity
K / cam_to_ego), identity ego poses, no boxes, map or LiDAR (padded arrays, masks all False).

Stacking (``stack_views = N``, 1 <= N <= schema.NUM_VIEWS; default 1 = the single-view samples above): OpenDWM /
UniMLVG put six independent OpenDV clips into the six view slots of one item (``mini_batch: 6``, crossview mask
eye(6); cvd_storm_official.md §1.6), so the DiT's view slots are not spent on padding. With N > 1 a sample holds N
"base" clips (the single-view clips listed with N = 1) in slots 0..N-1 (view_mask True there), each slot with its
own frames, its own fake camera K (for its native size, rescaled to ``image_size``; the same fake cam_to_ego) and
its own per-frame captions (no time / weather alignment across slots: OpenDWM's align_keys is for the cameras of one
moment, and these are unrelated videos); slots N.. are padded as above. Grouping rule: ``perm`` =
``np.random.RandomState(STACK_SEED).permutation(len(base))`` over the sorted base clip list; group g takes base clips
``perm[g*N : (g+1)*N]`` in that order (slot j = the j-th of them), g < len(base) // N; the last len(base) % N clips
of ``perm`` are not listed. Groups are fixed for a fixed base list (same metadata, split, clip_frames, clip_stride);
two parts of a group may come from the same video. The stacked clip id joins the parts' ids with "+" in slot order,
e.g. ``"vidA@50+vidB@0+..."``; ``read_clip`` accepts any N such ids (listed or not). Timestamps are the per-frame
times k / 10 s (every part runs at 10 fps); ego poses stay identity; the dataset tag stays "opendv", so
``conditions.view_adjacency`` keeps the identity (no cross-view attention between unrelated clips). A stacked reader
needs a fixed ``image_size`` (parts may differ in native size). Its frame-level interface (``list_scenes``,
``read_frame(s)``) raises, as per-video frames would silently drop the stacking; ``convert.py`` converts a stacked
reader clip by clip (``list_clips`` / ``read_clip``).
"""
from __future__ import annotations

import glob
import json
import logging
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
STACK_SEED = 0  # Seed of the permutation that groups base clips when stack_views > 1 (module docstring).
CAPTION_KEY_FORMAT = "'<videoid>.<mp4|webm|mkv>.<time_ms>' (OpenDWM) or '<videoid>.<time_ms>'"

_log = logging.getLogger(__name__)


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


def _row_times(row: dict) -> dict[str, float]:
  """``length``, ``start_discard`` and ``end_discard`` (default 0) of a metadata row in seconds; ValueError naming the
  first that is not a finite number of seconds >= 0 ("N/A", NaN, null, ...)."""
  out = {}
  for key in ("length", "start_discard", "end_discard"):
    value = row.get(key, 0)
    try:
      t = _seconds(value)
    except (TypeError, ValueError):
      t = math.nan
    if not (math.isfinite(t) and t >= 0):
      raise ValueError(f"{key} {value!r} is not a number of seconds >= 0")
    out[key] = t
  return out


class OpenDVReader(readers.ClipReader):
  """Clips of OpenDV-YouTube videos (see the module docstring)."""

  dataset = "opendv"

  def __init__(self, root: str | os.PathLike, *, meta_path: str | None = None, video_root: str | None = None,
               caption_path: str | None = None, split: str | None = "Train", clip_frames: int = 19,
               clip_stride: int = 50, image_size: tuple[int, int] | None = (256, 448), max_boxes: int = 1,
               max_points: int = 1, max_polylines: int = 1, points_per_polyline: int = 2, stack_views: int = 1):
    """``stack_views``: independent clips per sample, in view slots 0..stack_views-1 (module docstring)."""
    # bool is an int subclass; a JSON "true" from ``convert --reader-arg`` must not become one view.
    if isinstance(stack_views, bool) or not isinstance(stack_views, (int, np.integer)) \
        or not 1 <= stack_views <= schema.NUM_VIEWS:
      raise ValueError(f"OpenDVReader stack_views must be an int in [1, {schema.NUM_VIEWS}] (the schema's view slots), "
                       f"got {stack_views!r}")
    if stack_views > 1 and image_size is None:
      raise ValueError(f"OpenDVReader stack_views={stack_views} needs a fixed image_size: stacked videos may differ in "
                       "native size")
    self.stack_views = int(stack_views)
    self._stacked_ids: list[str] | None = None  # Lazily built by list_clips (stack_views > 1).
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
    self.skipped_videos: dict[str, str] = {}  # videoid -> why its metadata row is unusable.
    for k, m in enumerate(meta):
      for key in ("videoid", "youtuber", "length"):
        if key not in m:
          raise ValueError(f"{meta_path}: entry {k} lacks {key!r}")
      if split is None or str(m.get("split", "")).lower() == split.lower():
        try:  # One bad row (a "N/A" discard) must not take the other videos down with it.
          self._meta[str(m["videoid"])] = {**m, **_row_times(m)}
        except ValueError as e:
          self.skipped_videos[str(m["videoid"])] = f"entry {k}: {e}"
    if self.skipped_videos:
      vid, why = next(iter(self.skipped_videos.items()))
      _log.warning("OpenDV metadata %s: skipping %d video(s) of split %r whose times are unusable (e.g. %r, %s)",
                   meta_path, len(self.skipped_videos), split, vid, why)
    if self.stack_views > 1:
      joined = sorted(v for v in self._meta if "+" in v)
      if joined:  # "+" separates the parts of a stacked clip id.
        raise ValueError(f"{meta_path}: videoid {joined[0]!r} contains '+', which stack_views > 1 cannot parse")
    self._split = split
    self._video_paths: dict[str, str | None] = {}
    self._captions = self._load_captions(os.fspath(caption_path)) if caption_path else readers.CaptionTable()

  def _caption_key(self, key: str) -> tuple[str | None, float]:
    """(videoid of this reader or None, time in s) of a caption-file key (module docstring)."""
    head, _, ms = key.rpartition(".")
    try:
      t = float(ms) / 1000.0
    except ValueError:
      return None, 0.0
    if not head or not math.isfinite(t):
      return None, 0.0
    if head in self._meta:  # An id without extension (or one that really ends like one) is taken as is.
      return head, t
    stem, dot, ext = head.rpartition(".")
    if dot and ext.lower() in VIDEO_EXTENSIONS and stem in self._meta:
      return stem, t
    return None, t

  def _load_captions(self, path: str) -> readers.CaptionTable:
    """Caption file -> the joined captions per videoid of this reader, by video time (s)."""
    raw = readers.read_caption_file(path, CAPTION_KEY_FORMAT)
    per_video: dict[str, list[tuple[float, str]]] = {}
    unmatched = []
    for key, value in raw.items():
      vid, t = self._caption_key(str(key))
      if vid is None:
        unmatched.append(key)
        continue
      readers.check_caption_entry(key, value, path)
      per_video.setdefault(vid, []).append((t, readers.format_caption(value)))
    if not per_video:
      example = repr(next(iter(raw))) if raw else "none (the file is empty)"
      raise ReaderError(f"no key of the OpenDV caption file names a video of this reader ({len(self._meta)} videos, "
                        f"split {self._split!r}); example key: {example}; expected {CAPTION_KEY_FORMAT} with time_ms "
                        "the video time in ms", path)
    uncaptioned = len(self._meta) - len(per_video)
    if unmatched or uncaptioned:
      # Expected when the file covers other splits; one line so that a half-wrong file is still noticed.
      _log.warning("OpenDV caption file %s: %d of %d keys name no video of this reader (e.g. %r; expected %s), "
                   "%d of %d videos have no caption and use the metadata caption", path, len(unmatched), len(raw),
                   unmatched[0] if unmatched else None, CAPTION_KEY_FORMAT, uncaptioned, len(self._meta))
    return readers.CaptionTable(per_video)

  def _frame_level_only_single_view(self, method: str) -> None:
    # The frame-level interface is per video (single view); a caller storing frames through it (as convert.py does
    # for single-view readers) would store the videos unstacked, silently ignoring stack_views. Fail instead.
    if self.stack_views > 1:
      raise ValueError(f"OpenDVReader.{method} is single-view (per video) and stack_views={self.stack_views} only "
                       "applies to list_clips / read_clip (convert.py converts a stacked reader clip by clip)")

  def list_scenes(self) -> list[str]:
    self._frame_level_only_single_view("list_scenes")
    return sorted(self._meta)

  def scene_length(self, scene: str) -> int:
    m = self._meta[scene]
    usable = _seconds(m["length"]) - _seconds(m.get("start_discard", 0)) - _seconds(m.get("end_discard", 0))
    return max(0, int(math.floor(usable * FPS + 1e-6)))

  def _folder(self, scene: str) -> str:
    return os.path.join(self.video_root, str(self._meta[scene]["youtuber"]).replace(" ", "_"))

  def _find_video(self, scene: str) -> str | None:
    for ext in VIDEO_EXTENSIONS:
      name = f"{scene}.{ext}"
      for p in (os.path.join(self._folder(scene), name), os.path.join(self.video_root, name)):
        if os.path.exists(p):
          return p
    found = glob.glob(os.path.join(self.video_root, "**", f"{scene}.*"), recursive=True)
    return sorted(found)[0] if found else None

  def video_path(self, scene: str) -> str:
    """The video file of ``scene``, looked up once per reader, a miss included (the recursive search of a large
    video tree is slow, and a missing video would otherwise be searched for again for every frame)."""
    if scene not in self._video_paths:
      self._video_paths[scene] = self._find_video(scene)
    path = self._video_paths[scene]
    if path is None:
      raise ReaderError(f"missing sensor: no video file for {scene}", self._folder(scene))
    return path

  def check_scene(self, scene: str) -> None:
    """ReaderError when the video of ``scene`` is missing, so that the converter skips the scene once instead of
    frame by frame."""
    self.video_path(scene)

  def caption(self, scene: str, time_s: float) -> str:
    """Caption at video time ``time_s`` (nearest labelled time), else one from the metadata."""
    if scene in self._captions:
      return self._captions.nearest(scene, time_s)
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
        # Video time counts from the file's start time, as ffmpeg's -ss does (OpenDV's frame extraction and the
        # caption times): some files' first timestamp is not 0 (edit lists, muxer offsets).
        start = container.start_time / av.time_base if container.start_time is not None else 0.0
        container.seek(max(0, int((start + targets[0] - 1.0) / tb)), stream=stream, backward=True, any_frame=False)
        native = None
        for frame in container.decode(stream):
          if frame.pts is None:
            continue
          t = frame.pts * tb - start
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

  def _slot(self, scene: str, start: int, count: int):
    """One view slot of frames ``start .. start+count-1`` of a video.

    Returns (images uint8 [count, H, W, 3] at image_size (native if None), K [3, 3] for that size (px),
    cam_to_ego [4, 4] (m), native (W0, H0) px, captions [count] (str)).
    """
    images, (h0, w0) = self.decode(scene, start, count)
    hw = self.image_size or (h0, w0)
    k0, c2e = fake_camera(w0, h0)
    if (h0, w0) != hw:
      from PIL import Image
      images = [np.asarray(Image.fromarray(im).resize((hw[1], hw[0]), Image.BILINEAR)) for im in images]
    t0 = _seconds(self._meta[scene].get("start_discard", 0))
    captions = [self.caption(scene, t0 + (start + k) / FPS) for k in range(count)]
    return np.stack(images), geometry.resize_intrinsics(k0, (h0, w0), hw), c2e, (w0, h0), captions

  def _frames(self, parts: list[tuple[str, int]], count: int) -> list[dict]:
    """Frame dicts (``frames`` module format) with ``parts[j]`` = (video, first frame) in view slot j."""
    slots = [self._slot(scene, start, count) for scene, start in parts]
    hw = slots[0][0].shape[1:3]  # Every slot is at image_size (a stacked reader requires one).
    v = schema.NUM_VIEWS
    intr = np.tile(np.eye(3), (v, 1, 1))
    c2e = np.tile(np.eye(4), (v, 1, 1))
    view_mask = np.zeros(v, bool)
    original = np.zeros((v, 2), np.int32)
    for j, (_, k, c, native, _) in enumerate(slots):
      intr[j], c2e[j], view_mask[j], original[j] = k, c, True, native
    out = []
    for k in range(count):
      views = np.zeros((v, hw[0], hw[1], 3), np.uint8)
      captions = np.array([""] * v, dtype=object)
      for j, slot in enumerate(slots):
        views[j], captions[j] = slot[0][k], slot[4][k]
      out.append({
          # Slot 0's video time; clips subtract the first frame's, so every part gets k / 10 s.
          "images": views, "view_mask": view_mask, "intrinsics": intr.astype(np.float32),
          "cam_to_ego": c2e.astype(np.float32), "ego_to_world": np.eye(4, dtype=np.float32),
          "timestamp": (parts[0][1] + k) / FPS, "original_size": original,
          "boxes": np.zeros((0, 7), np.float32), "box_class": np.zeros((0,), np.int32),
          "box_track_id": np.zeros((0,), np.int32), "lidar_points": np.zeros((0, 3), np.float32),
          "captions": captions,
      })
    return out

  def read_frames(self, scene: str, start: int, count: int) -> list[dict]:
    """Frame dicts (``frames`` module format) of frames ``start .. start+count-1`` of a video (single view)."""
    self._frame_level_only_single_view("read_frames")
    return self._frames([(scene, start)], count)

  def read_frame(self, scene: str, i: int) -> dict:
    return self.read_frames(scene, i, 1)[0]

  def scene_map(self, scene: str) -> list:
    return []

  def _base_clips(self) -> list[str]:
    """Single-view clip ids ``"<videoid>@<first frame>"``, sorted by video, then first frame."""
    out = []
    for scene in sorted(self._meta):
      n = self.scene_length(scene)
      out.extend(f"{scene}@{s}" for s in range(0, n - self.clip_frames + 1, self.clip_stride))
    return out

  def list_clips(self) -> list[str]:
    if self.stack_views == 1:
      return self._base_clips()
    if self._stacked_ids is None:
      base, n = self._base_clips(), self.stack_views
      # Legacy RandomState: its permutation is frozen across NumPy versions, so stacked ids (and converted data
      # keyed by them) stay the same; Generator streams may change between releases.
      perm = np.random.RandomState(STACK_SEED).permutation(len(base))
      self._stacked_ids = ["+".join(base[i] for i in perm[g * n:(g + 1) * n]) for g in range(len(base) // n)]
    return list(self._stacked_ids)

  def _parse_part(self, part: str, clip_id: str) -> tuple[str, int]:
    scene, _, start = part.rpartition("@")
    if scene not in self._meta or not start.isdigit():
      raise KeyError(f"bad OpenDV clip id {clip_id!r}; expected '<videoid>@<first frame>' of a listed video"
                     + (f", joined by '+' ({self.stack_views} parts)" if self.stack_views > 1 else ""))
    return scene, int(start)

  def read_clip(self, clip_id: str) -> dict:
    # Only a stacked reader splits on "+": a single-view id is one part whatever it contains.
    pieces = clip_id.split("+") if self.stack_views > 1 else [clip_id]
    if len(pieces) != self.stack_views:
      raise KeyError(f"bad OpenDV clip id {clip_id!r}: {len(pieces)} parts, stack_views={self.stack_views}")
    frames = self._frames([self._parse_part(p, clip_id) for p in pieces], self.clip_frames)
    return frames_lib.assemble_clip(frames, [], dataset=self.dataset, clip_id=clip_id, fps=FPS,
                                    max_boxes=self.max_boxes, max_points=self.max_points,
                                    max_polylines=self.max_polylines, points_per_polyline=self.points_per_polyline)
