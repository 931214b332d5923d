"""The grain clip pipeline: batch layout, buckets, mixing, sharding, determinism and exact resume."""
import collections

import numpy as np
import pytest

from cvd_storm_jax.data_pipelines import pipeline
from cvd_storm_jax.data_pipelines import schema
from cvd_storm_jax.data_pipelines import synthetic

_BASE_OPTS = synthetic.SyntheticOptions(height=32, width=56, num_frames=2, max_boxes=8, max_lidar_points=1024)


class TaggedSource:
  """A cheap source: a few pre-generated synthetic clips, re-labelled ``<tag>-<index>`` (module level: picklable)."""

  def __init__(self, tag: str, n: int, base: list):
    self.tag, self.n, self.base = tag, n, base

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    s = dict(self.base[i % len(self.base)])
    s["clip_id"] = f"{self.tag}-{i}"
    return s

  def __repr__(self):
    return f"TaggedSource({self.tag}, {self.n})"


_BASE_CLIPS = []


@pytest.fixture(scope="module")
def base_clips():
  _BASE_CLIPS[:] = [synthetic.generate_clip(0, i, _BASE_OPTS) for i in range(2)]
  return _BASE_CLIPS


@pytest.fixture(scope="module", autouse=True)
def tagged_sources(base_clips):
  pipeline.register_source("tagged_a", lambda **unused: TaggedSource("a", 50, base_clips))
  pipeline.register_source("tagged_b", lambda **unused: TaggedSource("b", 30, base_clips))
  pipeline.register_source("bad_frames", lambda **unused: TaggedSource(
      "x", 4, [synthetic.generate_clip(0, 0, synthetic.SyntheticOptions(height=32, width=56, num_frames=3))]))


def _config(**overrides):
  c = pipeline.default_data_config("tiny")
  c.num_frames = 2
  c.num_clips = 12
  c.buckets = [(32, 56, 1.0)]
  c.synthetic.height, c.synthetic.width = 32, 56
  c.synthetic.max_boxes, c.synthetic.max_lidar_points = 8, 1024
  c.max_boxes, c.max_lidar_points = 8, 1024
  c.update(overrides)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _ids(batches):
  return [list(b["clip_id"]) for b in batches]


def test_batch_layout():
  c = _config()
  b = next(pipeline.make_iterator(c, seed=0))
  B, T, V, H, W = 2, 2, 6, 32, 56
  want = {
      "images": (np.uint8, (B, T, V, H, W, 3)), "box_images": (np.uint8, (B, T, V, H, W, 3)),
      "map_images": (np.uint8, (B, T, V, H, W, 3)), "depth": (np.float32, (B, T, V, H, W)),
      "sky_mask": (np.bool_, (B, T, V, H, W)), "has_sky_mask": (np.bool_, (B,)),
      "camera_params": (np.float32, (B, T, V, 11)), "view_adjacency": (np.bool_, (B, V, V)),
      "view_mask": (np.bool_, (B, V)), "intrinsics": (np.float32, (B, T, V, 3, 3)),
      "cam_to_ego": (np.float32, (B, T, V, 4, 4)), "ego_to_world": (np.float32, (B, T, 4, 4)),
      "timestamps": (np.float64, (B, T)), "fps": (np.float32, (B,)), "original_size": (np.int32, (B, V, 2)),
      "boxes": (np.float32, (B, T, 8, 7)), "box_class": (np.int32, (B, T, 8)), "box_track_id": (np.int32, (B, T, 8)),
      "box_mask": (np.bool_, (B, T, 8)), "map_points": (np.float32, (B, 12, 48, 3)), "map_class": (np.int32, (B, 12)),
      "map_mask": (np.bool_, (B, 12, 48)), "lidar_points": (np.float32, (B, T, 1024, 3)),
      "lidar_mask": (np.bool_, (B, T, 1024)), "captions": (np.object_, (B, T, V)), "dataset": (np.object_, (B,)),
      "clip_id": (np.object_, (B,)), "bucket": (np.int32, (B,)),
  }
  assert set(b) == set(want)
  for k, (dtype, shape) in want.items():
    assert b[k].dtype == np.dtype(dtype) and b[k].shape == shape, (k, b[k].dtype, b[k].shape)
  assert isinstance(b["captions"][0, 0, 0], str) and b["captions"][0, 0, 0]
  assert b["box_images"].any() or b["map_images"].any()
  assert b["depth"].max() > 0 and b["has_sky_mask"].all()
  np.testing.assert_array_equal(b["view_adjacency"][0].sum(1), 3)


def test_single_bucket_batches_and_frequencies():
  c = _config(buckets=[(16, 32, 0.2), (24, 40, 0.3), (32, 56, 0.5)], mix=[("tagged_a", 1.0)])
  n = 4000
  counts = np.bincount([pipeline.bucket_for_batch(c, 3, k) for k in range(n)], minlength=3) / n
  np.testing.assert_allclose(counts, [0.2, 0.3, 0.5], atol=0.03)
  it = pipeline.make_iterator(c, seed=3)
  seen = set()
  for k, b in enumerate(_take(it, 8)):
    want = pipeline.bucket_for_batch(c, 3, k)
    H, W = c.buckets[want][:2]
    assert b["images"].shape[3:5] == (H, W) and b["depth"].shape[3:] == (H, W)
    np.testing.assert_array_equal(b["bucket"], want)
    seen.add(want)
  assert len(seen) >= 2
  # Another seed draws another bucket sequence.
  assert [pipeline.bucket_for_batch(c, 4, k) for k in range(50)] != [pipeline.bucket_for_batch(c, 3, k)
                                                                      for k in range(50)]


def test_largest_bucket_config_sizes_memory():
  # The trainer sizes memory (remat "auto") on a batch of the largest bucket with a nonzero probability.
  c = _config(buckets=[(16, 32, 0.2), (40, 72, 0.0), (32, 56, 0.5), (24, 40, 0.3)])
  big = pipeline.largest_bucket_config(c)
  assert big["buckets"] == ((32, 56, 1.0),) and c.buckets[2] == (32, 56, 0.5)  # the original is unchanged
  b = next(pipeline.make_iterator(big, seed=0))
  assert b["images"].shape[3:5] == (32, 56)


def test_mixing_weights():
  c = _config(mix=[("tagged_a", 3.0), ("tagged_b", 1.0)], batch_size=4)
  ids = sum(_ids(_take(pipeline.make_iterator(c, seed=0), 10)), [])
  tags = collections.Counter(i.split("-")[0] for i in ids)
  assert tags == {"a": 30, "b": 10}
  # Within a source, the first epoch is a permutation (global shuffle, no repeats).
  a_ids = [i for i in ids if i.startswith("a")]
  assert len(set(a_ids)) == len(a_ids) and a_ids != sorted(a_ids, key=lambda s: int(s.split("-")[1]))


def test_processes_get_disjoint_slices_of_the_global_batch():
  c = _config(mix=[("tagged_a", 1.0)], batch_size=4)
  single = _ids(_take(pipeline.make_iterator(c, seed=5), 4))
  p0 = _ids(_take(pipeline.make_iterator(c, seed=5, process_index=0, process_count=2), 4))
  p1 = _ids(_take(pipeline.make_iterator(c, seed=5, process_index=1, process_count=2), 4))
  assert all(len(b) == 2 for b in p0 + p1)
  flat0, flat1 = sum(p0, []), sum(p1, [])
  assert not set(flat0) & set(flat1)
  for k in range(4):  # together the local batches make up the global batch k
    assert sorted(p0[k] + p1[k]) == sorted(single[k])
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.make_dataset(c, seed=0, process_index=0, process_count=3)


def test_single_pass_sees_each_clip_once_and_ends_together(caplog):
  """Evaluation's single pass: every clip at most once, the partial last global batch left out (logged), and every
  process stops after the same number of batches."""
  c = _config(mix=[("tagged_b", 1.0)], batch_size=4)
  with caplog.at_level("WARNING"):
    batches = list(pipeline.make_iterator(c, seed=2, single_pass=True))
  ids = sum(_ids(batches), [])
  assert len(batches) == 7 and len(set(ids)) == 28  # 30 clips: 7 global batches of 4, 2 left out
  assert "2 left out" in caplog.text
  parts = [_ids(pipeline.make_iterator(c, seed=2, process_index=p, process_count=2, single_pass=True)) for p in (0, 1)]
  assert len(parts[0]) == len(parts[1]) == 7
  assert [sorted(a + b) for a, b in zip(*parts)] == [sorted(b) for b in _ids(batches)]
  mixed = sum(_ids(pipeline.make_iterator(_config(mix=[("tagged_a", 1.0), ("tagged_b", 1.0)], batch_size=4), seed=0,
                                          single_pass=True)), [])
  assert len(mixed) == len(set(mixed)) and len(mixed) % 4 == 0
  with pytest.raises(ValueError, match="larger than"):
    pipeline.make_dataset(_config(mix=[("tagged_b", 1.0)], batch_size=32), seed=0, single_pass=True)


def test_deterministic_and_seeded():
  c = _config(mix=[("tagged_a", 1.0)], buckets=[(16, 32, 0.5), (32, 56, 0.5)])
  a = _take(pipeline.make_iterator(c, seed=1), 4)
  b = _take(pipeline.make_iterator(c, seed=1), 4)
  for x, y in zip(a, b):
    assert list(x["clip_id"]) == list(y["clip_id"])
    np.testing.assert_array_equal(x["images"], y["images"])
    np.testing.assert_array_equal(x["box_images"], y["box_images"])
  other = _take(pipeline.make_iterator(c, seed=2), 4)
  assert _ids(other) != _ids(a)


def _assert_same(xs, ys):
  assert _ids(xs) == _ids(ys)
  for x, y in zip(xs, ys):
    for k in ("images", "box_images", "map_images", "depth", "bucket"):
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_kill_and_resume_reproduces_batches():
  c = _config(mix=[("tagged_a", 2.0), ("tagged_b", 1.0)], buckets=[(16, 32, 0.5), (32, 56, 0.5)])
  it = pipeline.make_iterator(c, seed=9)
  _take(it, 3)
  state = it.get_state()
  rest = _take(it, 4)
  resumed = pipeline.make_iterator(c, seed=9)
  resumed.set_state(state)
  _assert_same(_take(resumed, 4), rest)


def test_multiprocess_prefetch_matches_in_process_and_resumes():
  # Real synthetic source (importable in the worker processes); two workers interleave batches 0, 2, 4 / 1, 3.
  c = _config(num_workers=2, prefetch=1, buckets=[(16, 32, 0.5), (32, 56, 0.5)])
  ref = _take(pipeline.make_iterator(_config(buckets=[(16, 32, 0.5), (32, 56, 0.5)]), seed=4), 5)
  it = pipeline.make_iterator(c, seed=4)
  first = _take(it, 2)
  state = it.get_state()
  rest = _take(it, 3)
  _assert_same(first + rest, ref)
  resumed = pipeline.make_iterator(c, seed=4)
  resumed.set_state(state)
  _assert_same(_take(resumed, 3), ref[2:])


def test_fixed_padding_and_errors(base_clips):
  c = _config(mix=[("tagged_a", 1.0)], max_boxes=3, max_lidar_points=100)
  b = next(pipeline.make_iterator(c, seed=0))
  assert b["boxes"].shape[2] == 3 and b["lidar_points"].shape[2] == 100 and b["lidar_mask"].all()
  # Truncation keeps the 3 nearest real boxes of each frame.
  for j, cid in enumerate(b["clip_id"]):
    src = base_clips[int(cid.split("-")[1]) % len(base_clips)]
    for t in range(2):
      real = src["boxes"][t][src["box_mask"][t]]
      assert len(real) > 3
      want = np.sort(np.linalg.norm(real[:, :2], axis=-1))[:3]
      np.testing.assert_allclose(np.sort(np.linalg.norm(b["boxes"][j, t, :, :2], axis=-1)), want, rtol=1e-6)
      assert b["box_mask"][j, t].all()
  with pytest.raises(KeyError, match="unknown data source"):
    pipeline.make_dataset(_config(mix=[("nope", 1.0)]), seed=0)
  with pytest.raises(schema.SampleError, match="num_frames"):
    next(pipeline.make_iterator(_config(mix=[("bad_frames", 1.0)]), seed=0))
  with pytest.raises(ValueError, match="only the synthetic source"):
    pipeline.make_dataset(_config(root="/data/shards/nuscenes"), seed=0)
  with pytest.raises(ValueError, match="unknown data config kind"):
    pipeline.default_data_config("huge")
  paper = pipeline.default_data_config("paper")
  assert paper.num_frames == 19 and [b[2] for b in paper.buckets] == [0.1, 0.3, 0.6]


def test_arrayrecord_source_plugs_in(tmp_path):
  """The converter's ArrayRecord source (another module) through the registry: Waymo-like 5-of-6 views."""
  import waymo_fixture as wf  # pylint: disable=g-import-not-at-top  (tests/ is on sys.path under pytest)
  from cvd_storm_jax.data_pipelines import convert  # pylint: disable=g-import-not-at-top
  (tmp_path / "src").mkdir()
  wf.write_segment(tmp_path / "src", "ctxA", 5)
  convert.convert("waymo", str(tmp_path / "src"), str(tmp_path / "out"), image_size=(16, 24), clip_frames=3,
                  reader_kwargs=dict(max_points=64, max_boxes=4), progress=False)
  # The ArrayRecord source names its own root in the mix (the top-level root stays unused).
  c = _config(mix=[("arrayrecord", 1.0, str(tmp_path / "out")), ("tagged_a", 1.0)], root="/nonexistent", num_frames=3,
              batch_size=2, max_boxes=None, max_lidar_points=None, max_map_polylines=None, max_map_points=None)
  pipeline.register_source("tagged_a", lambda **unused: TaggedSource("a", 50, [synthetic.generate_clip(
      0, 0, synthetic.SyntheticOptions(height=32, width=56, num_frames=3))]))
  try:
    it = pipeline.make_iterator(c, seed=0)
    b = next(it)
  finally:
    pipeline.register_source("tagged_a", lambda **unused: TaggedSource("a", 50, _BASE_CLIPS))
  assert b["images"].shape[:5] == (2, 3, 6, 32, 56)
  assert sorted(b["dataset"]) == ["synthetic", "waymo"]
  w = list(b["dataset"]).index("waymo")
  assert b["view_mask"][w].sum() == 5 and not b["has_sky_mask"][w] and not b["sky_mask"][w].any()
  np.testing.assert_array_equal(b["images"][w][:, ~b["view_mask"][w]], 0)  # padded slot stays black
  # Ragged sizes padded to the batch maximum with the documented fills.
  assert b["boxes"].shape[2] == synthetic.SyntheticOptions().max_boxes  # max(4 Waymo, 24 synthetic)
  assert (b["box_class"][w][~b["box_mask"][w]] == -1).all() and (b["box_track_id"][w][~b["box_mask"][w]] == -1).all()
  assert np.isfinite(b["camera_params"]).all() and (b["camera_params"][w][:, ~b["view_mask"][w]] == 0).all()


def test_text_embeddings_attached(tmp_path, base_clips):
  """A hand-written TextEmbeddingStore (its documented on-disk format) with row i's values = i."""
  import json  # pylint: disable=g-import-not-at-top
  caps = sorted({str(c) for s in base_clips for c in s["captions"].reshape(-1)})
  n, L, D, P = len(caps), 3, 4, 2
  rows = np.arange(n, dtype=np.float32)
  np.save(tmp_path / "clip.npy", np.broadcast_to(rows[:, None, None], (n, L, D)).copy())
  np.save(tmp_path / "pooled.npy", np.broadcast_to(rows[:, None], (n, P)).copy())
  (tmp_path / "meta.json").write_text(json.dumps(dict(
      format="cvd_storm_text_embeddings/v1", captions=caps, clip_length=L, t5_length=0, clip_dim=D, joint_dim=D,
      pooled_dim=P, dtype="float32", has_t5=False)))
  (tmp_path / "progress.json").write_text(json.dumps({"done": n}))
  c = _config(mix=[("tagged_a", 1.0)], text_embeddings=str(tmp_path))
  b = next(pipeline.make_iterator(c, seed=0))
  assert b["text_tokens"].shape == (2, 2, 6, L, D) and b["pooled_text"].shape == (2, 2, 6, P)
  for idx in np.ndindex(*b["captions"].shape):
    assert b["pooled_text"][idx][0] == caps.index(b["captions"][idx])
    assert np.all(b["text_tokens"][idx] == caps.index(b["captions"][idx]))
