"""Grain random-access source over converted ArrayRecord shards (``data_pipelines.convert``): index -> clip samples.

  source = ArrayRecordClipSource(out_dir)        # len(source) clips, sorted by clip id
  sample = source[i]                             # a schema sample (validated), images decoded from JPEG

Each clip's frames are read from its scene's shard (one record per timestamp), decoded and stacked with
``frames.assemble_clip`` -- the same code the Waymo / OpenDV readers use -- with the scene's padding sizes and map
file, so geometry comes back exactly and images up to JPEG loss. Shard readers are opened lazily per process and
are not pickled, so the source can be handed to grain worker processes. At most ``max_open_shards`` readers are open
at a time (least recently used closed first): nuScenes / Argoverse 2 conversions hold one clip per shard, thousands
of shards, which one open reader each would take past a 1024 open-file limit.

Registered as grain source "arrayrecord" through ``pipeline.register_source`` (factory ``make_source(path=..., ...)``).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import threading

from . import frames as frames_lib
from .convert import decode_frame, read_map, record_captions


MAX_OPEN_SHARDS = 64


class _ShardReaders:
  """Open ArrayRecordReaders of at most ``capacity`` shards, the least recently used closed first.

  Thread-safe: grain's read threads share one source. A reader evicted while another thread still reads from it is
  closed by the last such thread, when its read ends.
  """

  class _Entry:
    __slots__ = ("reader", "users", "evicted")

    def __init__(self, reader):
      self.reader, self.users, self.evicted = reader, 0, False

  def __init__(self, root: str, capacity: int):
    self.root, self.capacity = root, capacity
    self._open: collections.OrderedDict[str, _ShardReaders._Entry] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._open)

  @contextlib.contextmanager
  def lease(self, shard: str):
    """The open reader of ``shard`` (opened if needed), kept open until the ``with`` block ends."""
    with self._lock:
      entry = self._open.pop(shard, None)
      if entry is None:
        from array_record.python.array_record_module import ArrayRecordReader
        entry = self._Entry(ArrayRecordReader(os.path.join(self.root, shard)))
      self._open[shard] = entry  # Now the most recently used.
      entry.users += 1
      while len(self._open) > self.capacity:
        _, old = self._open.popitem(last=False)
        old.evicted = True
        if old.users == 0:
          old.reader.close()
    try:
      yield entry.reader
    finally:
      with self._lock:
        entry.users -= 1
        close = entry.evicted and entry.users == 0
      if close:
        entry.reader.close()

  def close(self) -> None:
    """Closes every reader no thread is reading from (the others close when their reads end)."""
    with self._lock:
      entries = list(self._open.values())
      self._open.clear()
      for entry in entries:
        entry.evicted = True
      idle = [entry for entry in entries if entry.users == 0]
    for entry in idle:
      entry.reader.close()


class ArrayRecordClipSource:
  """A grain ``RandomAccessDataSource`` of schema clip samples (``__len__``, ``__getitem__``)."""

  def __init__(self, path: str | os.PathLike, *, clip_frames: int | None = None,
               max_open_shards: int = MAX_OPEN_SHARDS):
    """Args:
      path: the converter's output folder (holding index.json).
      clip_frames: frames per sample (a prefix of each stored clip); None = the stored clip length.
      max_open_shards: shard readers kept open at a time per process (each holds a file descriptor and a buffer).
    """
    if isinstance(max_open_shards, bool) or not isinstance(max_open_shards, int) or max_open_shards < 1:
      raise ValueError(f"max_open_shards must be an int >= 1, got {max_open_shards!r}")
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
    self.max_open_shards = max_open_shards
    self._readers = _ShardReaders(self.path, max_open_shards)

  def __len__(self) -> int:
    return len(self._clip_ids)

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_readers"]  # ArrayRecordReader handles (and the lock) do not pickle; reopened lazily in the worker.
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._readers = _ShardReaders(self.path, self.max_open_shards)

  def close(self) -> None:
    """Closes the open shard readers (later reads reopen them)."""
    self._readers.close()

  @functools.lru_cache(maxsize=32)
  def _map(self, scene: str):
    return read_map(os.path.join(self.path, self._scenes[scene]["map"]))

  def captions(self, chunk: int = 256):
    """Every caption string of every stored frame and view (repeats included), shard by shard: what the training
    batches look up in a text-embedding store (``precompute_text --captions-from-shards``). No image is decoded."""
    for shard in sorted({entry["shard"] for entry in self._scenes.values()}):
      with self._readers.lease(shard) as reader:
        n = reader.num_records()
      for start in range(0, n, chunk):
        with self._readers.lease(shard) as reader:  # Not held across a yield: the consumer may stop anywhere.
          records = reader.read(list(range(start, min(start + chunk, n))))
        for data in records:
          yield from record_captions(data)

  def clip_id(self, index: int) -> str:
    return self._clip_ids[index]

  def __getitem__(self, index: int) -> dict:
    clip_id = self._clip_ids[index]
    entry = self._clips[clip_id]
    refs = entry["frames"][:self.clip_frames] if self.clip_frames else entry["frames"]
    frames = []
    for shard, record in refs:
      with self._readers.lease(shard) as reader:
        (data,) = reader.read([record])
      frames.append(decode_frame(data))
    scene = self._scenes[entry["scene"]]
    return frames_lib.assemble_clip(frames, self._map(entry["scene"]), dataset=self.dataset, clip_id=clip_id,
                                    fps=scene["fps"], **scene["sizes"])

  def __repr__(self) -> str:
    return f"ArrayRecordClipSource({self.path!r}, clips={len(self)}, dataset={self.dataset!r})"


def make_source(path: str, clip_frames: int | None = None, max_open_shards: int = MAX_OPEN_SHARDS,
                **unused) -> ArrayRecordClipSource:
  """Factory for ``pipeline.register_source("arrayrecord", ...)``."""
  return ArrayRecordClipSource(path, clip_frames=clip_frames, max_open_shards=max_open_shards)


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
