"""OpenDV-YouTube reader on a synthetic MP4 (written with PyAV) and metadata JSON in the real layout."""
import fractions
import json
import logging
import re

import av
import numpy as np
import pytest

from cvd_storm_jax.data_pipelines import conditions, geometry, opendv, readers, schema

SRC_FPS = 30
SECONDS = 3
NATIVE_HW = (48, 64)


def frame_level(i: int) -> int:
  """Grey level that encodes the source frame index (robust to H.264 loss)."""
  return (i * 3) % 256


def write_video(path, seconds=SECONDS, fps=SRC_FPS, hw=NATIVE_HW, level=frame_level, first_pts=0):
  """first_pts > 0: the file's timeline starts at first_pts / fps seconds (its start_time), not at 0."""
  with av.open(str(path), "w") as out:
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height = hw[1], hw[0]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "10", "g": "12"}
    for i in range(seconds * fps):
      frame = av.VideoFrame.from_ndarray(np.full((*hw, 3), level(i), np.uint8), format="rgb24")
      if first_pts:
        frame.pts, frame.time_base = first_pts + i, fractions.Fraction(1, fps)
      for packet in stream.encode(frame):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def write_dataset(root, *, with_video=True):
  (root / "meta").mkdir(parents=True, exist_ok=True)
  (root / "videos" / "Some_Driver").mkdir(parents=True, exist_ok=True)
  meta = [
      {"id": 1, "videoid": "vidA", "youtuber": "Some Driver", "link": "", "duration": "00:00:03", "split": "Train",
       "subset": "Mini", "area": "Tokyo", "state": "Japan", "start_discard": 0.5, "end_discard": 0.5,
       "length": SECONDS},
      {"id": 2, "videoid": "vidVal", "youtuber": "Some Driver", "link": "", "duration": "00:00:03", "split": "Val",
       "subset": "Mini", "area": "", "state": "", "start_discard": 0, "end_discard": 0, "length": SECONDS},
  ]
  (root / "meta" / "OpenDV-YouTube.json").write_text(json.dumps(meta))
  if with_video:
    write_video(root / "videos" / "Some_Driver" / "vidA.mp4")
  return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return write_dataset(tmp_path_factory.mktemp("opendv"))


@pytest.fixture(scope="module")
def stack_root(tmp_path_factory):
  """``write_dataset`` plus a second Train video of another native size (flat layout) and a caption file."""
  root = write_dataset(tmp_path_factory.mktemp("opendv_stack"))
  meta = json.loads((root / "meta" / "OpenDV-YouTube.json").read_text())
  meta.append({"id": 3, "videoid": "vidB", "youtuber": "Other", "split": "Train", "area": "Paris", "state": "France",
               "start_discard": 0, "end_discard": 0, "length": 2})
  (root / "meta" / "OpenDV-YouTube.json").write_text(json.dumps(meta))
  write_video(root / "videos" / "vidB.mp4", seconds=2, hw=(32, 40), level=lambda i: 255 - frame_level(i))
  # Per-frame captions for vidA (they change at frame 6 of the video); vidB falls back to its metadata.
  (root / "caps.json").write_text(json.dumps({"vidA.500": "first", "vidA.1500": "later"}))
  return root


def stack_readers(root, n):
  kw = dict(clip_frames=5, clip_stride=5, image_size=(24, 32), caption_path=str(root / "caps.json"))
  return opendv.OpenDVReader(root, **kw), opendv.OpenDVReader(root, stack_views=n, **kw)


def test_clips_frames_and_timestamps(root):
  r = opendv.OpenDVReader(root, clip_frames=5, clip_stride=10, image_size=(24, 32))
  assert r.list_scenes() == ["vidA"]  # Train split only.
  assert r.scene_length("vidA") == 20  # (3 - 0.5 - 0.5) s * 10 fps.
  assert r.list_clips() == ["vidA@0", "vidA@10"]
  s = r.read_clip("vidA@10")
  dims = schema.validate(s)
  assert (dims["T"], dims["V"], dims["H"], dims["W"]) == (5, 6, 24, 32)
  np.testing.assert_allclose(s["timestamps"], np.arange(5) / 10.0)
  assert s["fps"] == 10.0
  # Frame k of clip start 10 is at t = 0.5 + (10 + k) / 10 s = source frame 15 + 3 (10 + k) at 30 fps.
  for k in range(5):
    level = s["images"][k, 0].astype(np.float64).mean()
    assert abs(level - frame_level(15 + 3 * (10 + k))) < 2.0, (k, level)
  assert np.all(s["images"][:, 1:] == 0)


def test_fake_camera_and_stubs(root):
  r = opendv.OpenDVReader(root, clip_frames=3, image_size=None)
  s = r.read_clip("vidA@0")
  np.testing.assert_array_equal(s["view_mask"], [1, 0, 0, 0, 0, 0])
  h, w = NATIVE_HW
  f = (w + h) / 2
  np.testing.assert_allclose(s["intrinsics"][0, 0], [[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]])
  np.testing.assert_allclose(s["cam_to_ego"][0, 0][:3, 3], [1.7, 0.0, 1.5])
  # The camera looks along ego +x: a point 10 m ahead at camera height hits the principal point.
  uv, z, _ = geometry.project_ego_points(np.array([[11.7, 0.0, 1.5]]), s["intrinsics"][0, 0], s["cam_to_ego"][0, 0])
  np.testing.assert_allclose(uv[0], [w / 2, h / 2], atol=1e-5)
  np.testing.assert_allclose(z, [10.0], atol=1e-5)
  np.testing.assert_array_equal(s["ego_to_world"], np.tile(np.eye(4), (3, 1, 1)))
  assert not s["box_mask"].any() and not s["map_mask"].any() and not s["lidar_mask"].any()
  assert s["captions"][0, 0] == "A front-camera driving video in Tokyo, Japan."
  assert s["captions"][0, 1] == ""


def _drivemlm(time, description):
  return {"time": time, "weather": "Sunny", "environment": "An urban street", "objects": "Cars ahead",
          "image_description": description, "extra": "not part of the prompt"}


def test_captions_from_file(root, tmp_path, caplog):
  # OpenDWM's keys: "<video file name>.<time_ms>", extension included; DriveMLM dict values.
  caps = {"vidA.mp4.500": _drivemlm("Daytime", "first"), "vidA.mp4.1500": _drivemlm("Dusk", "later"),
          "vidVal.mp4.500": _drivemlm("Night", "other split")}
  path = tmp_path / "caps.json"
  path.write_text(json.dumps(caps))
  with caplog.at_level(logging.WARNING, logger="cvd_storm_jax.data_pipelines.opendv"):
    r = opendv.OpenDVReader(root, clip_frames=12, image_size=(24, 32), caption_path=str(path))
  # The Val video's key names no video of this (Train) reader: one warning with the count.
  warnings = [rec.getMessage() for rec in caplog.records if "caption file" in rec.getMessage()]
  assert len(warnings) == 1 and "1 of 3 keys" in warnings[0] and "'vidVal.mp4.500'" in warnings[0]
  s = r.read_clip("vidA@0")
  # Frame k is at video time 0.5 + k / 10: nearest labelled time 0.5 s up to k = 5, then 1.5 s. All five DriveMLM
  # fields joined with ". " (OpenDWM's default selected_keys); not the metadata caption.
  first = "Daytime. Sunny. An urban street. Cars ahead. first"
  later = "Dusk. Sunny. An urban street. Cars ahead. later"
  assert [s["captions"][k, 0] for k in (0, 5, 6, 11)] == [first, first, later, later]


def test_caption_file_matching_no_video_raises(root, tmp_path):
  path = tmp_path / "caps.json"
  # A video this reader does not have, and only the Val video (the reader is Train): no key matches.
  for caps in ({"zRXiDu2Ihyk.mp4.61500": _drivemlm("Daytime", "x")}, {"vidVal.mp4.500": "x", "vidVal.500": "y"}):
    path.write_text(json.dumps(caps))
    with pytest.raises(readers.ReaderError, match=r"no key of the OpenDV caption file names a video.*"
                       + re.escape(repr(next(iter(caps)))) + r".*<videoid>\.<mp4\|webm\|mkv>\.<time_ms>"):
      opendv.OpenDVReader(root, caption_path=str(path))
  path.write_text(json.dumps({"vidA.mp4.500": 3}))
  with pytest.raises(readers.ReaderError, match="must be a str or a dict"):
    opendv.OpenDVReader(root, caption_path=str(path))


def test_missing_video_is_a_reader_error(tmp_path):
  root = write_dataset(tmp_path, with_video=False)
  r = opendv.OpenDVReader(root, clip_frames=3)
  with pytest.raises(readers.ReaderError, match="^missing sensor"):
    r.read_clip("vidA@0")


def test_missing_video_is_looked_up_once_and_skipped_once(tmp_path, monkeypatch, caplog):
  """A missing video: one recursive search per reader (not one per frame), one counted scene skip, one warning."""
  from cvd_storm_jax.data_pipelines import convert
  root = write_dataset(tmp_path / "src", with_video=False)
  searches = []
  real_glob = opendv.glob.glob
  monkeypatch.setattr(opendv.glob, "glob", lambda *a, **k: searches.append(a) or real_glob(*a, **k))
  r = opendv.OpenDVReader(root, clip_frames=3)
  for clip in ("vidA@0", "vidA@5"):
    with pytest.raises(readers.ReaderError, match="^missing sensor: no video file for vidA"):
      r.read_clip(clip)
  assert len(searches) == 1
  with caplog.at_level(logging.WARNING):
    summary = convert.convert("opendv", str(root), str(tmp_path / "out"), image_size=(24, 32), clip_frames=5,
                              progress=False)
  assert summary["skipped"] == {"unreadable_scene": 1} and summary["records"] == 0
  assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING and "vidA" in
          rec.getMessage()] == [f"skipping scene vidA (unreadable_scene): missing sensor: no video file for vidA: "
                                f"{root / 'videos' / 'Some_Driver'}"]
  assert len(searches) == 2  # One more for the converter's own reader.


def test_unusable_metadata_rows_are_skipped(tmp_path, caplog):
  """A row with a "N/A" / NaN / null length or discard is skipped, counted and named in one warning; the other videos
  of the split are listed as usual (a bad row used to make list_clips raise for the whole reader)."""
  root = write_dataset(tmp_path, with_video=False)
  meta = json.loads((root / "meta" / "OpenDV-YouTube.json").read_text())
  bad = {"vidNA": {"start_discard": "N/A"}, "vidNaN": {"end_discard": float("nan")}, "vidNull": {"length": None},
         "vidNeg": {"length": -3}}
  for vid, fields in bad.items():
    meta.append({**meta[0], "videoid": vid, **fields})
  (root / "meta" / "OpenDV-YouTube.json").write_text(json.dumps(meta))  # NaN written as JSON's NaN literal.
  with caplog.at_level(logging.WARNING):
    r = opendv.OpenDVReader(root, clip_frames=5, clip_stride=10)
  assert r.list_scenes() == ["vidA"] and r.list_clips() == ["vidA@0", "vidA@10"]
  assert sorted(r.skipped_videos) == sorted(bad)
  assert "start_discard 'N/A' is not a number of seconds" in r.skipped_videos["vidNA"]
  warnings = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
  assert len(warnings) == 1 and "skipping 4 video(s) of split 'Train'" in warnings[0]


def test_truncated_video_is_a_reader_error(root, tmp_path):
  meta = json.loads((root / "meta" / "OpenDV-YouTube.json").read_text())
  meta[0]["length"] = 10  # Claims 10 s; the file has 3 s.
  (tmp_path / "meta").mkdir()
  (tmp_path / "meta" / "OpenDV-YouTube.json").write_text(json.dumps(meta))
  r = opendv.OpenDVReader(tmp_path, video_root=str(root / "videos"), clip_frames=3)
  with pytest.raises(readers.ReaderError, match="^truncated video"):
    r.read_clip("vidA@40")


@pytest.mark.parametrize("n", [6, 3])
def test_stacked_views_are_the_single_view_clips(stack_root, n):
  single, stacked = stack_readers(stack_root, n)
  base = single.list_clips()
  assert base == [f"vid{v}@{s}" for v in "AB" for s in (0, 5, 10, 15)]  # 8 base clips, 20 frames per video.
  ids = stacked.list_clips()
  # The documented rule: group g = base clips perm[g*n:(g+1)*n] of a fixed-seed permutation; the rest unlisted.
  perm = np.random.RandomState(opendv.STACK_SEED).permutation(len(base))
  assert ids == ["+".join(base[i] for i in perm[g * n:(g + 1) * n]) for g in range(len(base) // n)]
  assert len(stacked) == len(base) // n and stack_readers(stack_root, n)[1].list_clips() == ids  # Deterministic.
  parts_of = [cid.split("+") for cid in ids]
  used = [p for parts in parts_of for p in parts]
  assert len(used) == len(set(used)) == len(ids) * n  # Groups are disjoint.
  assert {p.split("@")[0] for p in used} == {"vidA", "vidB"}  # Both native sizes are stacked and resized.
  for cid, parts in zip(ids, parts_of):
    s = stacked.read_clip(cid)
    dims = schema.validate(s)
    assert (dims["T"], dims["V"], dims["H"], dims["W"]) == (5, 6, 24, 32)
    assert s["clip_id"] == cid and s["dataset"] == "opendv"
    np.testing.assert_array_equal(s["view_mask"], np.arange(6) < n)
    np.testing.assert_array_equal(conditions.view_adjacency(s["view_mask"], s["dataset"]), np.eye(6, dtype=bool))
    np.testing.assert_allclose(s["timestamps"], np.arange(5) / 10.0)
    np.testing.assert_array_equal(s["ego_to_world"], np.tile(np.eye(4), (5, 1, 1)))
    assert not s["box_mask"].any() and not s["map_mask"].any() and not s["lidar_mask"].any()
    for j, part in enumerate(parts):
      one = single.read_clip(part)
      np.testing.assert_array_equal(s["images"][:, j], one["images"][:, 0])  # Pixel-equal.
      np.testing.assert_array_equal(s["captions"][:, j], one["captions"][:, 0])
      np.testing.assert_array_equal(s["intrinsics"][:, j], one["intrinsics"][:, 0])
      np.testing.assert_array_equal(s["cam_to_ego"][:, j], one["cam_to_ego"][:, 0])
      np.testing.assert_array_equal(s["original_size"][j], one["original_size"][0])
    # Padded slots as in the single-view samples.
    assert np.all(s["images"][:, n:] == 0) and np.all(s["captions"][:, n:] == "")
    np.testing.assert_array_equal(s["intrinsics"][:, n:], np.broadcast_to(np.eye(3), (5, 6 - n, 3, 3)))
    np.testing.assert_array_equal(s["original_size"][n:], 0)


def test_stacked_slots_keep_their_own_camera_and_captions(stack_root):
  _, stacked = stack_readers(stack_root, 2)
  s = stacked.read_clip("vidB@10+vidA@0")  # Any N parts may be read, listed or not.
  np.testing.assert_array_equal(s["original_size"][:2], [(40, 32), (64, 48)])
  for j, (w, h) in enumerate([(40, 32), (64, 48)]):
    want = geometry.resize_intrinsics(opendv.fake_camera(w, h)[0], (h, w), (24, 32))
    np.testing.assert_allclose(s["intrinsics"][0, j], want, rtol=1e-6)
  assert s["captions"][0, 0] == "A front-camera driving video in Paris, France."
  assert list(s["captions"][:, 1]) == ["first"] * 5
  # Each slot holds its own video's frames: vidB frame 10 + k is at t = (10 + k) / 10 s (source frame 3 (10 + k),
  # inverted levels); vidA frame k at t = 0.5 + k / 10 s (source frame 15 + 3 k).
  for k in range(5):
    assert abs(s["images"][k, 0].astype(np.float64).mean() - (255 - frame_level(3 * (10 + k)))) < 2.0, k
    assert abs(s["images"][k, 1].astype(np.float64).mean() - frame_level(15 + 3 * k)) < 2.0, k


def test_bad_stack_views(root, stack_root):
  for bad in (0, 7, -1, 2.0, "6", True, None):
    with pytest.raises(ValueError, match="stack_views"):
      opendv.OpenDVReader(root, stack_views=bad)
  with pytest.raises(ValueError, match="stack_views=2 needs a fixed image_size"):
    opendv.OpenDVReader(root, stack_views=2, image_size=None)
  assert opendv.OpenDVReader(root, clip_frames=5, clip_stride=10).list_clips() == \
      opendv.OpenDVReader(root, clip_frames=5, clip_stride=10, stack_views=1).list_clips() == ["vidA@0", "vidA@10"]
  _, stacked = stack_readers(stack_root, 3)
  with pytest.raises(KeyError, match="2 parts, stack_views=3"):
    stacked.read_clip("vidA@0+vidB@0")
  with pytest.raises(KeyError, match="bad OpenDV clip id"):
    stacked.read_clip("vidA@0+nope@0+vidB@0")
  # The frame-level (per-video) interface that convert.py uses would drop the stacking: it refuses.
  for call in (stacked.list_scenes, lambda: stacked.read_frame("vidA", 0)):
    with pytest.raises(ValueError, match="stack_views=3"):
      call()
  # Too few base clips for one group: an empty reader, not an error.
  assert opendv.OpenDVReader(root, clip_frames=5, clip_stride=10, stack_views=3).list_clips() == []


def test_video_time_counts_from_the_file_start(tmp_path):
  """A file whose first timestamp is 2 s (its start_time): frame k of the clip is the k-th 10 fps frame after the
  file's start, as ffmpeg -ss counts (it used to look for t = 0 and find no frame)."""
  root = write_dataset(tmp_path, with_video=False)
  write_video(root / "videos" / "Some_Driver" / "vidA.mp4", first_pts=2 * SRC_FPS)
  with av.open(str(root / "videos" / "Some_Driver" / "vidA.mp4")) as container:
    assert container.start_time == 2_000_000
  images, _ = opendv.OpenDVReader(root, clip_frames=3, clip_stride=3).decode("vidA", 0, 3)
  # start_discard 0.5 s: source frames 15, 18, 21 at 30 fps.
  np.testing.assert_allclose([im.mean() for im in images], [frame_level(i) for i in (15, 18, 21)], atol=2)
