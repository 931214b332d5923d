"""The grain clip pipeline: sources -> global shuffle -> weighted mix -> process shard -> per-batch bucket resize and
condition drawing -> batches of numpy arrays (checkpointable iterator).

Data config keys (an ``ml_collections.ConfigDict`` or a plain dict; ``default_data_config`` gives both recipes):
  name          str    label of the data setup (logged only).
  root          str    dataset root handed to file-backed sources ("" for synthetic).
  num_clips     int    number of clips of the "synthetic" source.
  num_frames    int    T, frames per clip (19 in the recipe). Every source must return exactly T frames.
  frame_stride  int    frames of the source's base rate between clip frames (synthetic: base_fps / stride).
  num_views     int    V, camera slots per clip; every sample must have V slots.
  buckets       list of (H, W, prob)  resolutions; each BATCH draws one bucket from (shuffle_seed, batch index)
                       with these probabilities (normalised), so all processes agree on the bucket of global batch k.
  batch_size    int    GLOBAL batch size; each of the process_count processes yields batch_size / process_count.
  mix           list of (source_name, weight[, root])  sources (see ``register_source``) and mixing weights; the
                       optional third element is that source's root (default: ``root``), so that several converted
                       datasets mix: [("arrayrecord", 3, "/shards/nuscenes"), ("arrayrecord", 1, "/shards/waymo")].
  num_workers   int    grain mp_prefetch worker processes (0 = in-process).
  prefetch      int    batches buffered per worker process (mp_prefetch) and by the read threads.
  read_threads  int    threads computing batches inside each process/worker (grain ReadOptions.num_threads);
                       0 (default) = synchronous, one batch at a time.
  shuffle_seed  int    seed of the global shuffle, the mixing and the bucket draws.
  synthetic     dict   options of the "synthetic" source: any ``synthetic.SyntheticOptions`` field (height/width =
                       render size, max_boxes, ...) plus ``seed`` (the clip content seed, default 0).
                       num_frames, frame_stride and num_views always come from the keys above.
Optional keys:
  max_boxes, max_lidar_points, max_map_polylines, max_map_points   fixed padded sizes NB, NL, NP, NK of a batch
                       (None = the largest in the batch). Over-full samples keep the nearest boxes and an even
                       subsample of LiDAR points; extra polylines/points are cut (logged once per field).
  line_width (8.0, px at the original resolution), map_range (65.0 m), near (0.1 m)   condition drawing.
  text_embeddings  str  path of a ``text_store.TextEmbeddingStore``; adds text_tokens / pooled_text per caption.

Output batch (leading dim B = batch_size / process_count; all numpy):
  images uint8 [B, T, V, H, W, 3], box_images uint8 [B, T, V, H, W, 3], map_images uint8 [B, T, V, H, W, 3],
  depth float32 [B, T, V, H, W], sky_mask bool [B, T, V, H, W] (False where the source has none),
  has_sky_mask bool [B], camera_params float32 [B, T, V, 11], view_adjacency bool [B, V, V], view_mask bool [B, V],
  intrinsics float32 [B, T, V, 3, 3] (at H x W), cam_to_ego float32 [B, T, V, 4, 4], ego_to_world float32 [B, T, 4, 4],
  timestamps float64 [B, T], fps float32 [B], original_size int32 [B, V, 2], boxes float32 [B, T, NB, 7],
  box_class / box_track_id int32 [B, T, NB], box_mask bool [B, T, NB], map_points float32 [B, NP, NK, 3],
  map_class int32 [B, NP], map_mask bool [B, NP, NK], lidar_points float32 [B, T, NL, 3], lidar_mask bool [B, T, NL],
  captions object [B, T, V] (str), dataset / clip_id object [B] (str), bucket int32 [B] (index into buckets);
  with text_embeddings: text_tokens [B, T, V, L, D], pooled_text [B, T, V, P] in the store's dtype (SD3 layout:
  CLIP zero-padded to D ; T5 on the sequence axis, see text_store.TextEmbeddingStore.lookup).
Condition dropout is not done here (the model task does it).

API:
  register_source(name, factory)   a grain RandomAccessDataSource factory, called with keyword arguments only:
                                   factory(config=, seed=, path=root, clip_frames=num_frames,
                                   frame_stride=, num_views=) -- it must accept **unused for the ones it ignores.
                                   Items are schema samples (T = num_frames, V = num_views, any resolution).
                                   "arrayrecord" (arrayrecord_source.make_source) is imported on first use.
  make_dataset(config, *, seed, process_index=0, process_count=1, single_pass=False) -> grain.IterDataset of batches
                                   endless (every source re-shuffled each epoch) for training; ``single_pass``
                                   (evaluation): each clip at most once, then StopIteration; the clips past the
                                   last whole global batch are left out, counted in the log, so that every process
                                   yields the same number of batches.
  make_iterator(config, *, seed, process_index=0, process_count=1, single_pass=False) -> grain.DatasetIterator
                                   (get_state/set_state)
  bucket_for_batch(config, seed, batch_index) -> int      the bucket index of (global) batch ``batch_index``
  largest_bucket_config(config) -> dict                    the config drawing only its largest bucket (memory sizing)
  default_data_config(kind) -> ConfigDict                  "tiny" or "paper" (tuples, so that the command line
                                                           can override them: --config.data.mix="(('arrayrecord',
                                                           3.0, '/shards/nusc'), ('arrayrecord', 1.0, '/shards/waymo'))")
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, Mapping, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np

from . import conditions
from . import schema
from . import synthetic

SourceFactory = Callable[..., Any]
_SOURCES: dict[str, SourceFactory] = {}
# Sources provided by other modules, imported on first use so that their heavy deps stay optional.
_LAZY_SOURCES = {"arrayrecord": "cvd_storm_jax.data_pipelines.arrayrecord_source"}


def register_source(name: str, factory: SourceFactory) -> None:
  """Registers a source factory under ``name`` (overrides an older one); see the module docstring for the
  keyword arguments it is called with."""
  if not callable(factory):
    raise TypeError(f"source factory for {name!r} must be callable, got {type(factory).__name__}")
  _SOURCES[name] = factory


def get_source_factory(name: str) -> SourceFactory:
  if name not in _SOURCES and name in _LAZY_SOURCES:
    try:
      importlib.import_module(_LAZY_SOURCES[name])  # registers itself on import
    except ImportError as e:
      raise KeyError(f"data source {name!r} needs module {_LAZY_SOURCES[name]} which failed to import: {e}") from e
  if name not in _SOURCES:
    raise KeyError(f"unknown data source {name!r}; registered: {sorted(_SOURCES)}")
  return _SOURCES[name]


def _make_source(name: str, config: Mapping[str, Any], seed: int, root: str | None = None):
  factory = get_source_factory(name)
  root = config.get("root", "") if root is None else root
  return factory(config=config, seed=seed, path=root, clip_frames=int(config["num_frames"]),
                 frame_stride=int(config.get("frame_stride", 1)), num_views=int(config["num_views"]))


def _synthetic_factory(*, config: Mapping[str, Any], **unused) -> synthetic.SyntheticSource:
  # The shuffle seed must not change the clip contents (a dataset is fixed): only synthetic.seed does.
  opts = config.get("synthetic") or {}
  opts = dict(opts.to_dict() if hasattr(opts, "to_dict") else opts)
  content_seed = int(opts.pop("seed", 0))
  opts.update(num_frames=int(config["num_frames"]), frame_stride=int(config.get("frame_stride", 1)),
              num_views=int(config["num_views"]))
  return synthetic.SyntheticSource(int(config["num_clips"]), seed=content_seed,
                                   options=synthetic.options_from_config(opts))


register_source("synthetic", _synthetic_factory)


def _buckets(config: Mapping[str, Any]) -> tuple[list[tuple[int, int]], np.ndarray]:
  buckets = list(config["buckets"])
  if not buckets:
    raise ValueError("data config 'buckets' is empty")
  sizes, probs = [], []
  for b in buckets:
    if len(b) != 3:
      raise ValueError(f"data config bucket {b!r} must be (H, W, prob)")
    sizes.append((int(b[0]), int(b[1])))
    probs.append(float(b[2]))
  probs = np.asarray(probs, np.float64)
  if np.any(probs < 0) or probs.sum() <= 0:
    raise ValueError(f"data config bucket probabilities must be >= 0 with a positive sum, got {probs.tolist()}")
  return sizes, probs / probs.sum()


def largest_bucket_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of the data config that draws only its largest bucket (most pixels among those with probability > 0):
  a batch of it has the shapes that bound memory, whichever bucket the real iterator draws first."""
  sizes, probs = _buckets(config)
  h, w = max((s for s, p in zip(sizes, probs) if p > 0), key=lambda s: s[0] * s[1])
  out = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  out["buckets"] = ((h, w, 1.0),)
  return out


def _shuffle_seed(config: Mapping[str, Any], seed: int) -> int:
  return (int(config.get("shuffle_seed", 0)) + int(seed)) % 2**32


def bucket_for_batch(config: Mapping[str, Any], seed: int, batch_index: int) -> int:
  """Bucket index of batch ``batch_index`` of ``make_dataset(config, seed=seed, ...)``: a pure function of
  (shuffle_seed + seed, batch index), so every process agrees on the bucket of global batch k."""
  _, probs = _buckets(config)
  if len(probs) == 1:
    return 0
  u = np.random.default_rng([_shuffle_seed(config, seed), 0xB0C4E7, int(batch_index)]).random()
  return int(min(np.searchsorted(np.cumsum(probs), u, side="right"), len(probs) - 1))


# Ragged padded fields: name -> [(axis, symbol)], with their padding fill.
_RAGGED = {
    "boxes": [(1, "NB")], "box_class": [(1, "NB")], "box_track_id": [(1, "NB")], "box_mask": [(1, "NB")],
    "lidar_points": [(1, "NL")], "lidar_mask": [(1, "NL")],
    "map_points": [(0, "NP"), (1, "NK")], "map_class": [(0, "NP")], "map_mask": [(0, "NP"), (1, "NK")],
}
_FILL = {"box_class": -1, "box_track_id": -1, "map_class": -1}
_TRUNCATION_LOGGED: set[tuple[str, int]] = set()
_FIXED_KEYS = {"NB": "max_boxes", "NL": "max_lidar_points", "NP": "max_map_polylines", "NK": "max_map_points"}


class _Processor:
  """Per-sample check and bucket tag (picklable for grain worker processes). The heavy per-sample work (resize and
  drawing) happens in ``_Collate`` so that it writes straight into the batch arrays instead of being copied."""

  def __init__(self, config: Mapping[str, Any], seed: int, local_batch: int):
    _buckets(config)  # validates
    self.config = {k: config[k] for k in ("buckets", "num_frames", "num_views")}
    self.config["shuffle_seed"] = int(config.get("shuffle_seed", 0))
    self.seed = int(seed)
    self.local_batch = local_batch

  def __call__(self, index: int, sample: Mapping[str, Any]) -> dict[str, Any]:
    dims = schema.validate(sample)
    name = f"{sample.get('dataset')}/{sample.get('clip_id')}"
    if dims["T"] != self.config["num_frames"]:
      raise schema.SampleError(f"sample {name} has T={dims['T']} frames, data config num_frames="
                               f"{self.config['num_frames']}")
    if dims["V"] != self.config["num_views"]:
      raise schema.SampleError(f"sample {name} has V={dims['V']} views, data config num_views="
                               f"{self.config['num_views']}")
    out = dict(sample)
    out["bucket"] = np.int32(bucket_for_batch(self.config, self.seed, index // self.local_batch))
    return out


def _fit(name: str, x: np.ndarray, axis: int, size: int, sample: Mapping[str, Any]) -> np.ndarray:
  """Pads/truncates x along axis to size; truncation keeps the most useful rows (see module docstring)."""
  n = x.shape[axis]
  if n <= size:
    return schema.pad_axis(x, size, axis, _FILL.get(name, 0))
  if (name, axis) not in _TRUNCATION_LOGGED:
    _TRUNCATION_LOGGED.add((name, axis))
    logging.warning("data: field %s has %d rows on axis %d, more than the configured %d; truncating (logged once)",
                    name, n, axis, size)
  if name.startswith("box") and axis == 1:  # nearest real boxes first, per frame
    key = np.where(sample["box_mask"], np.linalg.norm(sample["boxes"][..., :2], axis=-1), np.inf)
    order = np.sort(np.argsort(key, axis=1, kind="stable")[:, :size], axis=1)
    return np.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
  if name.startswith("lidar"):  # an even subsample of each frame's real points
    idx = []
    for m in np.asarray(sample["lidar_mask"], bool):
      real = np.flatnonzero(m)
      pick = real[np.linspace(0, len(real) - 1, size).astype(np.int64)] if len(real) > size else \
          np.concatenate([real, np.flatnonzero(~m)[:size - len(real)]])
      idx.append(np.sort(pick))
    idx = np.stack(idx)
    return np.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
  return np.take(x, np.arange(size), axis=axis)


class _Collate:
  """Resizes the samples of one batch to its bucket, draws the conditions into preallocated batch arrays and stacks
  the remaining fields (picklable)."""

  def __init__(self, config: Mapping[str, Any]):
    self.sizes, _ = _buckets(config)
    self.fixed = {sym: config.get(key) for sym, key in _FIXED_KEYS.items()}
    self.line_width = float(config.get("line_width", conditions.DEFAULT_LINE_WIDTH))
    self.map_range = float(config.get("map_range", conditions.DEFAULT_MAP_RANGE))
    self.near = float(config.get("near", 0.1))
    self.text_path = config.get("text_embeddings") or None
    self._store = None

  def _text_store(self):
    if self._store is None:
      try:
        from . import text_store  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(f"data config text_embeddings={self.text_path!r} needs data_pipelines/text_store.py: {e}"
                          ) from e
      self._store = text_store.TextEmbeddingStore(self.text_path)
    return self._store

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_store"] = None  # re-opened lazily in each worker
    return state

  def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    buckets = {int(s["bucket"]) for s in samples}
    if len(buckets) != 1:
      raise RuntimeError(f"batch mixes buckets {sorted(buckets)}; batches must be aligned to local_batch")
    H, W = self.sizes[buckets.pop()]
    B = len(samples)
    T, V = np.shape(samples[0]["images"])[:2]
    batch: dict[str, Any] = {
        "images": np.empty((B, T, V, H, W, 3), np.uint8),
        "box_images": np.empty((B, T, V, H, W, 3), np.uint8),
        "map_images": np.empty((B, T, V, H, W, 3), np.uint8),
        "depth": np.empty((B, T, V, H, W), np.float32),
        "sky_mask": np.zeros((B, T, V, H, W), bool),
    }
    processed = []
    for j, s in enumerate(samples):
      r = conditions.resize_sample(s, H, W, images_out=batch["images"][j])
      r = conditions.add_conditions(r, line_width=self.line_width, map_range=self.map_range, near=self.near,
                                    out={k: batch[k][j] for k in ("box_images", "map_images", "depth")})
      if "sky_mask" in r:
        batch["sky_mask"][j] = r["sky_mask"]
      processed.append(r)
    sizes = {}
    for name, axes in _RAGGED.items():
      for axis, sym in axes:
        sizes[sym] = int(self.fixed[sym] or max(s[name].shape[axis] for s in processed))
    skip = set(batch) | {"captions"}
    for name in list(schema.FIELDS) + list(schema.DERIVED_FIELDS) + ["original_size", "bucket"]:
      if name in skip:
        continue
      arrays = []
      for s in processed:
        x = np.asarray(s[name])
        for axis, sym in _RAGGED.get(name, []):
          if x.shape[axis] != sizes[sym]:
            x = _fit(name, x, axis, sizes[sym], s)
        arrays.append(x)
      shapes = {a.shape for a in arrays}
      if len(shapes) > 1:
        raise schema.SampleError(f"batch field {name!r} has mixed shapes {sorted(shapes)}")
      batch[name] = np.stack(arrays)
    batch["captions"] = np.stack([np.asarray(s["captions"], object) for s in processed])
    batch["has_sky_mask"] = np.array(["sky_mask" in s for s in processed])
    batch["dataset"] = np.array([s["dataset"] for s in processed], object)
    batch["clip_id"] = np.array([s["clip_id"] for s in processed], object)
    if self.text_path:
      batch["text_tokens"], batch["pooled_text"] = self._text_store().lookup(batch["captions"])
    return batch


def _local_batch(config: Mapping[str, Any], process_count: int) -> int:
  batch_size = int(config["batch_size"])
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"data config batch_size={batch_size} must be a positive multiple of process_count="
                     f"{process_count}")
  return batch_size // process_count


def make_dataset(config: Mapping[str, Any], *, seed: int, process_index: int = 0, process_count: int = 1,
                 single_pass: bool = False) -> grain.IterDataset:
  """The batched, sharded, prefetched clip dataset of this process (see module docstring)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  local_batch = _local_batch(config, process_count)
  shuffle_seed = _shuffle_seed(config, seed)
  mix = list(config["mix"])
  if not mix:
    raise ValueError("data config 'mix' is empty")
  if config.get("root") and all(entry[0] == "synthetic" for entry in mix):
    # The tiny configs draw synthetic clips: a root given to them would be ignored, and the run would train on
    # synthetic data believing it trains on the dataset.
    raise ValueError(f"data config root={config['root']!r} but the mix {mix} holds only the synthetic source, which "
                     "reads no files: to train on converted shards set --config.data.mix=\"(('arrayrecord', 1.0),)\"")
  datasets, weights = [], []
  for k, entry in enumerate(mix):
    if len(entry) not in (2, 3):
      raise ValueError(f"data config mix entry {k} is {entry!r}; expected (source, weight) or (source, weight, root)")
    name, weight = entry[0], entry[1]
    root = str(entry[2]) if len(entry) == 3 else None
    source = _make_source(name, config, shuffle_seed, root)
    if len(source) == 0:
      raise ValueError(f"data source {name!r} (root {root or config.get('root', '')!r}) is empty")
    # Global shuffle, re-shuffled every epoch (repeat passes the epoch through to the shuffle).
    ds = grain.MapDataset.source(source).shuffle(seed=(shuffle_seed * 1000003 + k) % 2**32)
    datasets.append(ds if single_pass else ds.repeat())
    weights.append(float(weight))
  if any(w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f"data config mix weights must be >= 0 with a positive sum, got {weights}")
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  if single_pass:
    # A mix of finite sources ends when its first source runs out; the tail that fills no whole global batch is
    # left out, so that all processes yield the same number of batches (a collective would wait forever otherwise).
    total = sum(len(d) for d in datasets)
    kept = len(ds) // int(config["batch_size"]) * int(config["batch_size"])
    if kept == 0:
      raise ValueError(f"data config batch_size={config['batch_size']} is larger than the {len(ds)} clips a single "
                       f"pass over {mix} yields")
    if kept < total:
      logging.warning("single pass over %s: %d of %d clips in %d global batches of %d (%d left out: the mix's end "
                      "or a partial last batch)", mix, kept, total, kept // int(config["batch_size"]),
                      int(config["batch_size"]), total - kept)
    ds = ds[:kept]
  # Process p takes positions p, p + P, ...: local batch k of every process together forms global batch k.
  ds = ds[process_index::process_count]
  ds = ds.map_with_index(_Processor(config, seed, local_batch))
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_Collate(config))
  workers = int(config.get("num_workers", 0))
  prefetch = int(config.get("prefetch", 0))
  threads = int(config.get("read_threads", 0))
  # Explicit ReadOptions: grain's default (16 threads, 500 prefetched elements) would hold hundreds of ~200 MB
  # paper-size batches in memory. 0 threads = batches are computed synchronously on next().
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                               prefetch_buffer_size=max(prefetch, threads) if threads else 0))
  if workers > 0:
    # grain reads absl flags in mp_prefetch; outside an absl app (tests, notebooks) they are unparsed and reading
    # them raises. Marking them parsed keeps every flag at its default and changes nothing for absl apps.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                           per_worker_buffer_size=max(prefetch, 1)))
  logging.info("data %s: sources %s, local batch %d, buckets %s", config.get("name", ""), mix, local_batch,
               list(config["buckets"]))
  return it_ds


def make_iterator(config: Mapping[str, Any], *, seed: int, process_index: int = 0, process_count: int = 1,
                  single_pass: bool = False) -> grain.DatasetIterator:
  """A checkpointable iterator over ``make_dataset``: ``get_state()`` / ``set_state(state)`` resume exactly."""
  return iter(make_dataset(config, seed=seed, process_index=process_index, process_count=process_count,
                           single_pass=single_pass))


def default_data_config(kind: str) -> ml_collections.ConfigDict:
  """"tiny": synthetic, 4 frames x 6 views at 64x112, batch 2 (CPU tests/training).
  "paper": 19 frames x 6 views, the C35 buckets 144x256 / 176x304 / 256x448 at 0.1 / 0.3 / 0.6, global batch 32
  (the paper's "batch size 32"; OpenDWM's C35 averages 96: --config.data.batch_size=96)."""
  if kind == "tiny":
    return ml_collections.ConfigDict(dict(
        name="synthetic_tiny", root="", num_clips=64, num_frames=4, frame_stride=1, num_views=6,
        buckets=((64, 112, 1.0),), batch_size=2, mix=(("synthetic", 1.0),), num_workers=0, prefetch=0, read_threads=0,
        shuffle_seed=0, synthetic=dict(height=64, width=112, seed=0, max_boxes=16, max_lidar_points=2048),
        max_boxes=16, max_lidar_points=2048, max_map_polylines=12, max_map_points=48,
        line_width=8.0, map_range=65.0, text_embeddings=""))
  if kind == "paper":
    return ml_collections.ConfigDict(dict(
        name="paper", root="", num_clips=100_000, num_frames=19, frame_stride=1, num_views=6,
        buckets=((144, 256, 0.1), (176, 304, 0.3), (256, 448, 0.6)), batch_size=32,
        mix=(("arrayrecord", 1.0),), num_workers=8, prefetch=2, read_threads=1, shuffle_seed=0,
        synthetic=dict(height=128, width=224, seed=0, max_boxes=32, max_lidar_points=8192),
        max_boxes=64, max_lidar_points=32768, max_map_polylines=64, max_map_points=64,
        line_width=8.0, map_range=65.0, text_embeddings=""))
  raise ValueError(f"unknown data config kind {kind!r}; expected 'tiny' or 'paper'")
