"""precompute_text CLI (resumable text-embedding store) and the TextEmbeddingStore reader."""
import json
import os
import pickle

import numpy as np
import pytest

from _text_fixtures import build_tiny_sd3_root  # noqa: I100 (also hides the broken torchvision)

from cvd_storm_jax import precompute_text  # noqa: E402
from cvd_storm_jax.data_pipelines.text_store import MissingCaptionError, TextEmbeddingStore  # noqa: E402
from cvd_storm_jax.pretrained.text import load_sd3_text_encoders  # noqa: E402

CAPTIONS = {
    "scene-1/frame-0": [["a car drives on the road in the rain.", "daytime, sunny, city street with pedestrians."],
                        ["night, cloudy, highway with trucks and cars.", "a car drives on the road in the rain."]],
    "scene-1/frame-1": [["a bus turns left at the intersection.", ""], ["a parking lot.", "the road is wet."]],
    "scene-2/frame-0": "a truck on the highway at night.",
}
DISTINCT = 8  # "" + 7 distinct non-empty captions


class _Killed(RuntimeError):
  pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  base = tmp_path_factory.mktemp("precompute")
  root = str(base / "sd3")
  build_tiny_sd3_root(root)
  captions = str(base / "captions.json")
  with open(captions, "w") as f:
    json.dump(CAPTIONS, f)
  full = str(base / "full")
  args = ["--weights", root, "--captions", captions, "--t5-length", "16", "--batch-size", "3"]
  assert precompute_text.run(args + ["--out", full]) == DISTINCT
  return base, root, captions, full, args


def test_read_captions_formats(tmp_path):
  path = tmp_path / "c.json"
  path.write_text(json.dumps(CAPTIONS))
  caps = precompute_text.read_captions(str(path))
  assert caps[0] == "" and len(caps) == DISTINCT and len(set(caps)) == DISTINCT
  assert caps[1] == "a car drives on the road in the rain."  # first-appearance order
  path.write_text(json.dumps(["b", ["a", "b"], []]))
  assert precompute_text.read_captions(str(path), include_empty=False) == ["b", "a"]
  path.write_text(json.dumps({"k": ["ok", 3]}))
  with pytest.raises(ValueError, match=r"'k'\[1\] is a int"):
    precompute_text.read_captions(str(path))


def test_captions_from_converted_shards(setup, tmp_path):
  """--captions-from-shards: the store holds exactly the distinct captions of the converted frames (all views), and a
  pipeline batch over those shards finds every caption it needs in it."""
  from cvd_storm_jax.data_pipelines import convert, pipeline
  _, root, _, _, _ = setup
  shards = str(tmp_path / "shards")
  convert.convert("synthetic", "unused", shards, image_size=(32, 56), clip_frames=3,
                  reader_kwargs=dict(num_clips=2, max_lidar_points=64), progress=False)
  config = pipeline.default_data_config("tiny")
  config.update(mix=(("arrayrecord", 1.0, shards),), num_frames=3, buckets=((32, 56, 1.0),))
  batch = next(pipeline.make_iterator(config, seed=0))
  wanted = {str(c) for c in batch["captions"].ravel()}
  caps = precompute_text.shard_captions([shards])
  assert caps[0] == "" and len(set(caps)) == len(caps) and wanted <= set(caps)
  out = str(tmp_path / "emb")
  args = ["--weights", root, "--t5-length", "16", "--batch-size", "3", "--captions-from-shards", shards, "--out", out]
  assert precompute_text.run(args) == len(caps)
  config.text_embeddings = out
  batch = next(pipeline.make_iterator(config, seed=0))  # every caption of the batch is in the store
  assert batch["text_tokens"].shape[:3] == batch["captions"].shape


def test_store_matches_encoders(setup):
  _, root, _, full, _ = setup
  store = TextEmbeddingStore(full)
  assert store.complete and len(store) == DISTINCT and store.captions[0] == ""
  caps = ["", "a parking lot.", "a truck on the highway at night."]
  embeds, pooled = store.lookup(caps)
  assert embeds.dtype == np.float16 and embeds.shape == (3, 77 + 16, 192) and pooled.shape == (3, 80)
  want_embeds, want_pooled = load_sd3_text_encoders(root).encode_prompts(caps, t5_length=16)
  np.testing.assert_allclose(embeds.astype(np.float32), np.asarray(want_embeds), rtol=2e-3, atol=2e-3)
  np.testing.assert_allclose(pooled.astype(np.float32), np.asarray(want_pooled), rtol=2e-3, atol=2e-3)
  # Array-shaped lookups (the clip sample's [T, V] captions) keep their shape.
  grid = np.array(CAPTIONS["scene-1/frame-1"], dtype=object)
  e, p = store.lookup(grid, dtype=np.float32)
  assert e.shape == (2, 2, 93, 192) and p.shape == (2, 2, 80) and e.dtype == np.float32
  np.testing.assert_array_equal(e[0, 1], embeds[0].astype(np.float32))  # "" at [0, 1]
  with pytest.raises(MissingCaptionError, match="'never seen' is not in the text-embedding store"):
    store.lookup(["a parking lot.", "never seen"])
  with pytest.raises(TypeError):
    store.lookup("a parking lot.")
  # Pickles without its memory maps (data-loader workers), and still reads after unpickling.
  clone = pickle.loads(pickle.dumps(store))
  np.testing.assert_array_equal(clone.lookup(caps)[0], embeds)


def test_killed_and_resumed_equals_uninterrupted(setup):
  base, _, _, full, args = setup
  out = str(base / "resumed")
  # 1) Stop cleanly after one batch.
  assert precompute_text.run(args + ["--out", out, "--max-batches", "1"]) == 3
  # 2) Die after the second batch's rows hit the disk but before the done-count moved: those rows must not count.
  def kill(start, stop):
    raise _Killed(f"killed after writing rows {start}:{stop}")
  with pytest.raises(_Killed):
    precompute_text.run(args + ["--out", out], after_rows_written=kill)
  partial = TextEmbeddingStore(out)
  assert partial.done == 3 and not partial.complete
  unfinished = partial.captions[4]
  assert unfinished not in partial
  with pytest.raises(MissingCaptionError, match="not computed yet"):
    partial.lookup([unfinished])
  # 3) Resume to the end; the result equals the uninterrupted run bit for bit.
  assert precompute_text.run(args + ["--out", out]) == DISTINCT
  a, b = TextEmbeddingStore(full), TextEmbeddingStore(out)
  assert a.captions == b.captions and b.complete
  for name in ("clip", "t5", "pooled"):
    np.testing.assert_array_equal(np.load(os.path.join(full, f"{name}.npy")), np.load(os.path.join(out, f"{name}.npy")))
  # 4) A finished store is left alone; one made with other settings is refused.
  assert precompute_text.run(args + ["--out", out]) == DISTINCT
  with pytest.raises(SystemExit, match="other captions or settings"):
    precompute_text.run(args[:-4] + ["--t5-length", "8", "--batch-size", "3", "--out", out])


def test_store_without_t5(setup):
  base, root, captions, _, _ = setup
  out = str(base / "no_t5")
  assert precompute_text.run(["--weights", root, "--captions", captions, "--out", out, "--no-t5", "--joint-dim",
                              "256", "--batch-size", "8", "--dtype", "float32"]) == DISTINCT
  assert not os.path.exists(os.path.join(out, "t5.npy"))
  store = TextEmbeddingStore(out)
  embeds, _ = store.lookup(["a parking lot."])
  assert embeds.shape == (1, 154, 256) and embeds.dtype == np.float32
  np.testing.assert_array_equal(embeds[:, 77:], 0)
  np.testing.assert_array_equal(embeds[:, :77, 160:], 0)
  assert np.abs(embeds[:, :77, :160]).max() > 0


def test_store_open_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no meta.json"):
    TextEmbeddingStore(str(tmp_path))
