"""Converts a dataset into ArrayRecord shards for training: one record per timestamp, a clip index and per-scene maps.

  python -m cvd_storm_jax.data_pipelines.convert --dataset {nuscenes,waymo,argoverse2,opendv,synthetic} --root ROOT --out OUT \
      [--workers N] [--image-size 256x448] [--clip-frames 19] [--clip-stride FRAMES] [--reader-arg key=json ...]

Output (everything under OUT):
  shards/<scene>.array_record   one record per frame (``encode_frame``: msgpack, no pickle): every view as JPEG bytes
                                at ``--image-size`` (the largest training resolution), view mask, K, cam_to_ego,
                                ego_to_world, timestamp, unpadded boxes / classes / track ids, LiDAR points (ego
                                frame), captions. Written with ``group_size:1`` (grain random access).
  maps/<scene>.npz              the scene's world-frame map polylines (points float64, offsets, classes).
  scenes/<scene>.json           the scene's done marker: records per frame, its clips, skips per reason, sizes.
  index.json                    {"clips": {clip_id: {"scene", "frames": [[shard, record], ...]}}, "scenes": {...}}.
  summary.json                  counts: scenes, clips, records, and skipped items per reason.
  settings.json                 the settings that shape the data (dataset, image size, clip frames / stride, reader
                                args); a rerun with other settings is refused (it would reuse the old scenes).

Scenes: Waymo segments and OpenDV videos are read frame by frame (``read_frame``), so every frame is stored once and
clips are windows of ``--clip-frames`` consecutive stored frames every ``--clip-stride`` frames. Readers that only
produce clip samples (nuScenes, Argoverse 2) are converted clip by clip (a "scene" is then one clip); their clips
start every ``--clip-stride`` frames at the reader's own rate (default clip_frames: non-overlapping, every frame
stored once; nuScenes ``keyframes_only`` runs at 2 fps). Synthetic clips have no stride (``--clip-stride`` refused).

Robustness: a frame (or clip) whose reader raises ``ReaderError`` (corrupt image, missing sensor, truncated record,
...) is skipped, logged and counted per reason; clips never span a skipped frame. A scene that cannot be read at all
(a Waymo segment whose first frame is damaged, a missing OpenDV video) is one ``unreadable_scene`` skip, with a done
marker of no records, so that a rerun moves on. Resumable: a scene's shard and map are written under tmp/ and renamed
into place when complete, and its done marker is written last; a restart skips scenes with a marker and the index is
rebuilt from all markers, so a kill at any point leaves nothing half-written that looks complete.
``--fail-after-scenes K`` (or env CVD_STORM_CONVERT_FAIL_AFTER=K) makes the (K+1)-th scene of this run raise after
writing one record -- the tests use it to simulate a kill; with env CVD_STORM_CONVERT_FAIL_MODE=exit the process
exits there instead, as one the OS kills (out of memory) does: a worker dying that way stops the run with an error
(it used to wait forever for the dead worker's scene).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import importlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import zlib
from typing import Any, Callable

import msgpack
import numpy as np
from PIL import Image

from . import frames as frames_lib
from .readers import ReaderError

log = logging.getLogger("cvd_storm_jax.convert")

JPEG_QUALITY = 95
WRITER_OPTIONS = "group_size:1"
FAIL_ENV = "CVD_STORM_CONVERT_FAIL_AFTER"
FAIL_MODE_ENV = "CVD_STORM_CONVERT_FAIL_MODE"  # "exit": the simulated kill is a process exit
CHUNK_FRAMES = 50  # Frames decoded per seek by readers with ``read_frames`` (videos).
SETTINGS_FILE = "settings.json"


class SimulatedKill(RuntimeError):
  """Raised by ``--fail-after-scenes`` to simulate a kill mid-conversion."""


# ---- readers ------------------------------------------------------------------------------------------------------
def _set_reader_arg(kw: dict, key: str, value) -> None:
  """Sets reader argument ``key`` from ``--clip-stride``; a ``--reader-arg`` giving it another value is refused (one
  of the two would be silently ignored)."""
  if key in kw and kw[key] != value:
    raise ValueError(f"--clip-stride {value} conflicts with --reader-arg {key}={kw[key]!r}; give only one of them")
  kw[key] = value


def _make_waymo(root, clip_frames, image_size, cli_stride=None, **kw):
  from .waymo import WaymoReader
  if cli_stride is not None:
    _set_reader_arg(kw, "clip_stride", cli_stride)
  return WaymoReader(root, clip_frames=clip_frames, image_size=image_size, **kw)


def _make_opendv(root, clip_frames, image_size, cli_stride=None, **kw):
  from .opendv import OpenDVReader
  if cli_stride is not None:  # A stacked reader is converted clip by clip: its own stride lists the clips.
    _set_reader_arg(kw, "clip_stride", cli_stride)
  return OpenDVReader(root, clip_frames=clip_frames, image_size=image_size, **kw)


def _clip_stride_frames(kw: dict, clip_frames: int, clip_stride: int | None) -> None:
  """Stride of the clip-only readers (nuScenes, Argoverse 2), given in frames so that the reader turns it into
  seconds at its own rate (nuScenes ``keyframes_only`` runs at 2 fps whatever ``fps`` says). Default clip_frames:
  non-overlapping clips, every frame stored once."""
  if clip_stride is None:
    if "clip_stride_s" not in kw:
      kw.setdefault("clip_stride_frames", clip_frames)
    return
  if "clip_stride_s" in kw:
    raise ValueError(f"--clip-stride {clip_stride} (frames) conflicts with --reader-arg clip_stride_s="
                     f"{kw['clip_stride_s']!r} (seconds); give only one of them")
  _set_reader_arg(kw, "clip_stride_frames", clip_stride)


def _make_nuscenes(root, clip_frames, image_size, cli_stride=None, **kw):
  from .nuscenes import NuScenesReader
  _clip_stride_frames(kw, clip_frames, cli_stride)
  return NuScenesReader(root, num_frames=clip_frames, image_size=image_size, **kw)


def _make_argoverse2(root, clip_frames, image_size, cli_stride=None, **kw):
  from .argoverse2 import Argoverse2Reader
  _clip_stride_frames(kw, clip_frames, cli_stride)
  return Argoverse2Reader(root, num_frames=clip_frames, image_size=image_size, **kw)


def _make_synthetic(root, clip_frames, image_size, cli_stride=None, **kw):
  del root  # generated, not read
  if cli_stride is not None:
    raise ValueError(f"--clip-stride {cli_stride} does not apply to the synthetic dataset: its clips are generated "
                     "whole, not cut from longer scenes")
  from .synthetic import SyntheticClipReader
  return SyntheticClipReader(num_frames=clip_frames, image_size=image_size, **kw)


READERS: dict[str, Callable[..., Any]] = {
    "synthetic": _make_synthetic,
    "nuscenes": _make_nuscenes, "waymo": _make_waymo, "argoverse2": _make_argoverse2, "opendv": _make_opendv,
}


def skip_reason(error: ReaderError) -> str:
  """Summary bucket of a reader error (readers start their messages with the reason)."""
  text = str(error).lower()
  for reason in ("corrupt image", "missing sensor", "truncated record", "corrupt record", "truncated video",
                 "corrupt video"):
    if text.startswith(reason):
      return reason.replace(" ", "_")
  if "image" in text:
    return "corrupt_image"
  if "missing" in text or "not found" in text or "cannot read" in text:
    return "missing_file"
  return "reader_error"


# ---- records ------------------------------------------------------------------------------------------------------
def _pack(obj):
  if isinstance(obj, np.ndarray):
    if obj.dtype == object:
      return [str(x) for x in obj.tolist()]
    return {"__nd__": [obj.dtype.str, list(obj.shape), np.ascontiguousarray(obj).tobytes()]}
  raise TypeError(f"cannot serialise {type(obj).__name__}")


def _unpack(obj):
  if "__nd__" in obj:
    dtype, shape, data = obj["__nd__"]
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()
  return obj


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def encode_frame(frame: dict, scene: str, index: int) -> bytes:
  """Serialises a frame dict (``frames`` module format) compactly: JPEG views + msgpack arrays (no pickle)."""
  mask = np.asarray(frame["view_mask"], bool)
  record = {
      "scene": scene, "frame_index": int(index), "timestamp": float(frame["timestamp"]),
      "jpeg": [encode_jpeg(np.asarray(im)) if m else b"" for im, m in zip(frame["images"], mask)],
      "image_hw": [int(x) for x in np.shape(frame["images"])[1:3]],
      "captions": [str(c) for c in frame["captions"]],
  }
  for key in ("view_mask", "intrinsics", "cam_to_ego", "ego_to_world", "boxes", "box_class", "box_track_id",
              "lidar_points", "original_size"):
    if key in frame:
      record[key] = np.asarray(frame[key])
  return msgpack.packb(record, default=_pack, use_bin_type=True)


def decode_frame(data: bytes) -> dict:
  """Inverse of ``encode_frame``: a frame dict with decoded uint8 views [V, H, W, 3] (black where masked)."""
  record = msgpack.unpackb(data, object_hook=_unpack, raw=False)
  h, w = record.pop("image_hw")
  views = np.zeros((len(record["jpeg"]), h, w, 3), np.uint8)
  for v, jpeg in enumerate(record.pop("jpeg")):
    if jpeg:
      views[v] = frames_lib.decode_image(jpeg, (h, w), what=f"view {v} of {record['scene']}:{record['frame_index']}")
  record["images"] = views
  record["captions"] = np.array(record["captions"], dtype=object)
  return record


def record_captions(data: bytes) -> list[str]:
  """The captions [V] of an ``encode_frame`` record, without decoding its images."""
  return [str(c) for c in msgpack.unpackb(data, raw=False)["captions"]]


def safe_name(scene: str) -> str:
  """A file name for a scene id: readable prefix + CRC32 of the full id (distinct ids never collide on disk)."""
  return f"{re.sub(r'[^A-Za-z0-9._-]', '_', scene)[:80]}-{zlib.crc32(scene.encode()):08x}"


def _atomic_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _write_map(path: str, lines) -> None:
  pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 3) for p, _ in lines]) if lines else np.zeros((0, 3))
  offsets = np.cumsum([0] + [len(p) for p, _ in lines]).astype(np.int64)
  classes = np.asarray([c for _, c in lines], np.int32)
  tmp = path + ".tmp.npz"
  np.savez(tmp, points=pts, offsets=offsets, classes=classes)
  os.replace(tmp, path)


def read_map(path: str) -> list[tuple[np.ndarray, int]]:
  """The world-frame polylines of a ``maps/<scene>.npz`` file."""
  with np.load(path) as z:
    pts, offsets, classes = z["points"], z["offsets"], z["classes"]
  return [(pts[offsets[k]:offsets[k + 1]], int(classes[k])) for k in range(len(classes))]


# ---- per-scene conversion (runs in the workers) -------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(dataset: str, root: str, clip_frames: int, image_size, clip_stride: int | None,
                 reader_kwargs: dict) -> None:
  logging.basicConfig(level=logging.INFO)
  _WORKER["reader"] = READERS[dataset](root, clip_frames, image_size, cli_stride=clip_stride, **reader_kwargs)


def _is_scene_reader(reader) -> bool:
  # A reader that stacks independent clips into the view slots (OpenDV ``stack_views`` > 1, OpenDWM's layout) has no
  # per-frame scenes: it is converted clip by clip, each stacked clip one "scene".
  return (all(hasattr(reader, a) for a in ("list_scenes", "scene_length", "read_frame", "scene_map"))
          and getattr(reader, "stack_views", 1) == 1)


def _reader_sizes(reader) -> dict[str, int]:
  return {"max_boxes": reader.max_boxes, "max_points": reader.max_points, "max_polylines": reader.max_polylines,
          "points_per_polyline": reader.points_per_polyline}


def _convert_scene(task: dict) -> dict:
  """Converts one scene; returns its done-marker dict (also written to scenes/<name>.json)."""
  from array_record.python.array_record_module import ArrayRecordWriter

  reader = _WORKER["reader"]
  out, scene, name = task["out"], task["scene"], safe_name(task["scene"])
  shard_rel, map_rel = f"shards/{name}.array_record", f"maps/{name}.npz"
  tmp_shard = os.path.join(out, "tmp", f"{name}.array_record")
  if os.path.exists(tmp_shard):
    os.remove(tmp_shard)  # A previous run died mid-scene.
  skipped: collections.Counter = collections.Counter()
  records: list[int | None] = []
  clips: dict[str, list[int]] = {}
  writer = ArrayRecordWriter(tmp_shard, WRITER_OPTIONS)
  try:
    written = [0]

    def put(frame, i):
      writer.write(encode_frame(frame, scene, i))
      records.append(written[0])
      written[0] += 1
      if task["fail"]:
        if os.environ.get(FAIL_MODE_ENV) == "exit":
          os._exit(137)  # what the OOM killer leaves: no exception, no cleanup
        raise SimulatedKill(f"simulated kill while converting scene {scene!r}")

    if _is_scene_reader(reader):
      fps = float(importlib.import_module(type(reader).__module__).FPS)
      sizes = _reader_sizes(reader)
      try:  # Waymo parses frame 0 here, OpenDV finds the video: a scene unreadable as a whole is one counted skip.
        if hasattr(reader, "check_scene"):
          reader.check_scene(scene)
        map_lines = reader.scene_map(scene)
        n = reader.scene_length(scene)
      except ReaderError as e:
        skipped["unreadable_scene"] += 1
        log.warning("skipping scene %s (unreadable_scene): %s", scene, e)
        map_lines, n = [], 0  # A marker with no record: a rerun moves on instead of failing here again.
      chunk = CHUNK_FRAMES if hasattr(reader, "read_frames") else 1
      for c0 in range(0, n, chunk):
        count = min(chunk, n - c0)
        try:  # Video readers decode a chunk in one seek; a failing chunk is retried frame by frame.
          batch = reader.read_frames(scene, c0, count) if chunk > 1 else None
        except ReaderError:
          batch = None
        for i in range(c0, c0 + count):
          try:
            frame = batch[i - c0] if batch is not None else reader.read_frame(scene, i)
          except ReaderError as e:
            reason = skip_reason(e)
            skipped[reason] += 1
            log.warning("skipping frame %d of %s (%s): %s", i, scene, reason, e)
            records.append(None)
            continue
          put(frame, i)
      length, stride = task["clip_frames"], task["clip_stride"] or getattr(reader, "clip_stride", 1)
      for s in range(0, n - length + 1, stride):
        window = records[s:s + length]
        if all(r is not None for r in window):
          clips[f"{scene}@{s}"] = window
    else:
      try:
        sample = reader.read_clip(scene)
      except ReaderError as e:
        reason = skip_reason(e)
        skipped[reason] += 1
        log.warning("skipping clip %s (%s): %s", scene, reason, e)
        sample = None
      fps, map_lines, sizes = 0.0, [], {}
      if sample is not None:
        frame_list, map_lines = frames_lib.split_clip(sample)
        fps = float(sample["fps"])
        sizes = {"max_boxes": sample["boxes"].shape[1], "max_points": sample["lidar_points"].shape[1],
                 "max_polylines": sample["map_points"].shape[0], "points_per_polyline": sample["map_points"].shape[1]}
        for i, frame in enumerate(frame_list):
          put(frame, i)
        clips[scene] = list(range(len(frame_list)))
  finally:
    writer.close()
  os.replace(tmp_shard, os.path.join(out, shard_rel))
  _write_map(os.path.join(out, map_rel), map_lines)
  marker = {"scene": scene, "shard": shard_rel, "map": map_rel, "records": records, "clips": clips,
            "skipped": dict(skipped), "fps": fps, "sizes": {k: int(v) for k, v in sizes.items()}}
  _atomic_json(os.path.join(out, "scenes", f"{name}.json"), marker)
  return marker


# ---- driver -------------------------------------------------------------------------------------------------------
def convert(dataset: str, root: str, out: str, *, workers: int = 1, image_size: tuple[int, int] = (256, 448),
            clip_frames: int = 19, clip_stride: int | None = None, reader_kwargs: dict | None = None,
            fail_after_scenes: int | None = None, progress: bool = True) -> dict:
  """Converts ``dataset`` at ``root`` into ``out`` (module docstring); returns the summary dict."""
  if dataset not in READERS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(READERS)}")
  if clip_frames < 1 or (clip_stride is not None and clip_stride < 1):
    raise ValueError(f"clip_frames and clip_stride must be >= 1, got {clip_frames} and {clip_stride}")
  reader_kwargs = dict(reader_kwargs or {})
  if fail_after_scenes is None and os.environ.get(FAIL_ENV):
    fail_after_scenes = int(os.environ[FAIL_ENV])
  for sub in ("shards", "maps", "scenes", "tmp"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  check_settings(out, {"dataset": dataset, "image_size": image_size, "clip_frames": clip_frames,
                       "clip_stride": clip_stride, **{f"reader_arg {k}": v for k, v in reader_kwargs.items()}})
  init_args = (dataset, root, clip_frames, image_size, clip_stride, reader_kwargs)
  _init_worker(*init_args)
  reader = _WORKER["reader"]
  scenes = reader.list_scenes() if _is_scene_reader(reader) else reader.list_clips()
  done = {s for s in scenes if os.path.exists(os.path.join(out, "scenes", f"{safe_name(s)}.json"))}
  todo = [s for s in scenes if s not in done]
  tasks = [{"out": out, "scene": s, "clip_frames": clip_frames, "clip_stride": clip_stride,
            "fail": fail_after_scenes is not None and k >= fail_after_scenes} for k, s in enumerate(todo)]
  log.info("%s: %d scenes, %d already converted, %d to go", dataset, len(scenes), len(done), len(todo))
  from tqdm import tqdm
  bar = tqdm(total=len(todo), desc=f"convert {dataset}", unit="scene", disable=not progress)
  try:
    if workers <= 1:
      for t in tasks:
        _convert_scene(t)
        bar.update(1)
    else:
      # concurrent.futures, not multiprocessing.Pool: a worker killed by the OS (out of memory) breaks the pool with
      # an error here, where Pool would wait forever for its scene.
      pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_init_worker, initargs=init_args)
      try:
        for future in concurrent.futures.as_completed([pool.submit(_convert_scene, t) for t in tasks]):
          future.result()
          bar.update(1)
      except concurrent.futures.process.BrokenProcessPool as e:
        raise RuntimeError(f"a conversion worker died (killed by the OS? out of memory: try fewer than --workers "
                           f"{workers}); the finished scenes are kept and a rerun resumes") from e
      finally:
        pool.shutdown(cancel_futures=True)
  finally:
    bar.close()
  return build_index(out, dataset, scenes)


def check_settings(out: str, settings: dict) -> None:
  """Records the settings that shape the stored data in OUT/settings.json, or refuses to resume into a folder whose
  done scenes were written with other ones: markers are keyed by scene only, so their shards (other image size, clip
  length, ...) would be reused as they are, mixed with new ones. Before any scene is done (a first run that failed
  early, e.g. on a mistyped reader argument) the settings are simply replaced."""
  path = os.path.join(out, SETTINGS_FILE)
  settings = json.loads(json.dumps(settings, default=str))  # As stored: tuples become lists.
  if any(name.endswith(".json") for name in os.listdir(os.path.join(out, "scenes"))):
    if not os.path.exists(path):
      log.warning("%s has done scenes but no %s (written by an older converter): their settings cannot be checked "
                  "and are taken to be these", out, SETTINGS_FILE)
    else:
      try:
        with open(path) as f:
          old = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the conversion settings {path} ({e}); convert into a new folder") from e
      differ = [f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in sorted(set(old) | set(settings))
                if old.get(k) != settings.get(k)]
      if differ:
        raise ValueError(f"{out} holds a conversion made with other settings ({'; '.join(differ)}); rerun with "
                         "its settings to resume it, or convert into a new folder")
      return
  _atomic_json(path, settings)


def build_index(out: str, dataset: str, scenes: list[str]) -> dict:
  """Rebuilds index.json and summary.json from the done markers of ``scenes`` (in order)."""
  clips, scene_info = {}, {}
  skipped: collections.Counter = collections.Counter()
  n_records = 0
  for s in scenes:
    path = os.path.join(out, "scenes", f"{safe_name(s)}.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      m = json.load(f)
    skipped.update(m["skipped"])
    n_records += sum(r is not None for r in m["records"])
    scene_info[s] = {"shard": m["shard"], "map": m["map"], "fps": m["fps"], "sizes": m["sizes"]}
    for cid, recs in m["clips"].items():
      clips[cid] = {"scene": s, "frames": [[m["shard"], r] for r in recs]}
  _atomic_json(os.path.join(out, "index.json"), {"dataset": dataset, "clips": clips, "scenes": scene_info})
  summary = {"dataset": dataset, "scenes_total": len(scenes), "scenes_converted": len(scene_info),
             "clips": len(clips), "records": n_records, "skipped": dict(sorted(skipped.items())),
             "skipped_total": int(sum(skipped.values()))}
  _atomic_json(os.path.join(out, "summary.json"), summary)
  return summary


def _parse_size(text: str) -> tuple[int, int]:
  m = re.fullmatch(r"(\d+)x(\d+)", text)
  if not m:
    raise argparse.ArgumentTypeError(f"--image-size must be HxW, e.g. 256x448, got {text!r}")
  return int(m.group(1)), int(m.group(2))


def _parse_kv(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"--reader-arg must be key=value, got {text!r}")
  try:
    return key, json.loads(value)
  except json.JSONDecodeError:
    return key, value


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", required=True, choices=sorted(READERS))
  p.add_argument("--root", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--image-size", type=_parse_size, default=(256, 448))
  p.add_argument("--clip-frames", type=int, default=19)
  p.add_argument("--clip-stride", type=int, default=None, help="frames between clip starts (default: the reader's)")
  p.add_argument("--reader-arg", type=_parse_kv, action="append", default=[],
                 help="extra reader constructor argument key=value (JSON value), e.g. version=\"v1.0-mini\"")
  p.add_argument("--fail-after-scenes", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  summary = convert(args.dataset, args.root, args.out, workers=args.workers, image_size=args.image_size,
                    clip_frames=args.clip_frames, clip_stride=args.clip_stride, reader_kwargs=dict(args.reader_arg),
                    fail_after_scenes=args.fail_after_scenes, progress=not args.no_progress)
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
