"""Grain random-access source over converted ArrayRecord shards (``data_pipelines.convert``): index -> clip samples.

  source = ArrayRecordClipSource(out_dir)        # len(source) clips, sorted by clip id
  sample = source[i]                             # a schema sample (validated), images decoded from JPEG

Each clip's frames are read from its scene's shard (one record per timestamp), decoded and stacked with
``frames.assemble_clip`` -- the same code the Waymo / OpenDV readers use -- with the scene's padding sizes and map
file, so geometry comes back exactly and images up to JPEG loss. Shard readers are opened lazily per process and
are not pickled, so the source can be handed to grain worker processes.

Registered as grain source "arrayrecord" through ``pipeline.register_source`` (factory ``make_source(path=..., ...)``).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

from . import frames as frames_lib
from .convert import decode_frame, read_map, record_captions


class ArrayRecordClipSource:
  """A grain ``RandomAccessDataSource`` of schema clip samples (``__len__``, ``__getitem__``)."""

  def __init__(self, path: str | os.PathLike, *, clip_frames: int | None = None):
    """Args:
      path: the converter's output folder (holding index.json).
      clip_frames: frames per sample (a prefix of each stored clip); None = the stored clip length.
    """
    self.path = os.fspath(path)
    index_path = os.path.join(self.path, "index.json")
    try:
      with open(index_path) as f:
        index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise FileNotFoundError(f"no readable ArrayRecord clip index at {index_path} ({e}); run the converter") from e
    self.dataset = index["dataset"]
    self._scenes = index["scenes"]
    self._clip_ids = sorted(index["clips"])
    self._clips = index["clips"]
    self.clip_frames = clip_frames
    if clip_frames is not None:
      short = [c for c in self._clip_ids if len(self._clips[c]["frames"]) < clip_frames]
      if short:
        raise ValueError(f"clip_frames={clip_frames} exceeds the stored length of clip {short[0]!r} "
                         f"({len(self._clips[short[0]]['frames'])} frames)")
    self._readers: dict[str, Any] = {}

  def __len__(self) -> int:
    return len(self._clip_ids)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"] = {}  # ArrayRecordReader handles do not pickle; reopened lazily in the worker.
    return state

  def _reader(self, shard: str):
    if shard not in self._readers:
      from array_record.python.array_record_module import ArrayRecordReader
      self._readers[shard] = ArrayRecordReader(os.path.join(self.path, shard))
    return self._readers[shard]

  @functools.lru_cache(maxsize=32)
  def _map(self, scene: str):
    return read_map(os.path.join(self.path, self._scenes[scene]["map"]))

  def captions(self, chunk: int = 256):
    """Every caption string of every stored frame and view (repeats included), shard by shard: what the training
    batches look up in a text-embedding store (``precompute_text --captions-from-shards``). No image is decoded."""
    for shard in sorted({entry["shard"] for entry in self._scenes.values()}):
      reader = self._reader(shard)
      n = reader.num_records()
      for start in range(0, n, chunk):
        for data in reader.read(list(range(start, min(start + chunk, n)))):
          yield from record_captions(data)

  def clip_id(self, index: int) -> str:
    return self._clip_ids[index]

  def __getitem__(self, index: int) -> dict:
    clip_id = self._clip_ids[index]
    entry = self._clips[clip_id]
    refs = entry["frames"][:self.clip_frames] if self.clip_frames else entry["frames"]
    frames = []
    for shard, record in refs:
      (data,) = self._reader(shard).read([record])
      frames.append(decode_frame(data))
    scene = self._scenes[entry["scene"]]
    return frames_lib.assemble_clip(frames, self._map(entry["scene"]), dataset=self.dataset, clip_id=clip_id,
                                    fps=scene["fps"], **scene["sizes"])

  def __repr__(self) -> str:
    return f"ArrayRecordClipSource({self.path!r}, clips={len(self)}, dataset={self.dataset!r})"


def make_source(path: str, clip_frames: int | None = None, **unused) -> ArrayRecordClipSource:
  """Factory for ``pipeline.register_source("arrayrecord", ...)``."""
  return ArrayRecordClipSource(path, clip_frames=clip_frames)


def _register() -> bool:
  import importlib.util
  if importlib.util.find_spec(f"{__package__}.pipeline") is None:
    return False  # pipeline.py not present in this checkout.
  from . import pipeline
  if not hasattr(pipeline, "register_source"):
    return False
  pipeline.register_source("arrayrecord", make_source)
  return True


REGISTERED = _register()
