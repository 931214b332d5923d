"""OpenDV-YouTube reader on a synthetic MP4 (written with PyAV) and metadata JSON in the real layout."""
import json

import av
import numpy as np
import pytest

from cvd_storm_jax.data_pipelines import geometry, opendv, readers, schema

SRC_FPS = 30
SECONDS = 3
NATIVE_HW = (48, 64)


def frame_level(i: int) -> int:
  """Grey level that encodes the source frame index (robust to H.264 loss)."""
  return (i * 3) % 256


def write_video(path, seconds=SECONDS, fps=SRC_FPS, hw=NATIVE_HW):
  with av.open(str(path), "w") as out:
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height = hw[1], hw[0]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "10", "g": "12"}
    for i in range(seconds * fps):
      img = np.full((*hw, 3), frame_level(i), np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
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


def test_captions_from_file(root, tmp_path):
  caps = {"vidA.500": {"image_description": "first"}, "vidA.1500": {"image_description": "later"}}
  path = tmp_path / "caps.json"
  path.write_text(json.dumps(caps))
  r = opendv.OpenDVReader(root, clip_frames=12, image_size=(24, 32), caption_path=str(path))
  s = r.read_clip("vidA@0")
  # Frame k is at video time 0.5 + k / 10: nearest labelled time 0.5 s up to k = 5, then 1.5 s.
  assert [s["captions"][k, 0] for k in (0, 5, 6, 11)] == ["first", "first", "later", "later"]


def test_missing_video_is_a_reader_error(tmp_path):
  root = write_dataset(tmp_path, with_video=False)
  r = opendv.OpenDVReader(root, clip_frames=3)
  with pytest.raises(readers.ReaderError, match="^missing sensor"):
    r.read_clip("vidA@0")


def test_truncated_video_is_a_reader_error(root, tmp_path):
  meta = json.loads((root / "meta" / "OpenDV-YouTube.json").read_text())
  meta[0]["length"] = 10  # Claims 10 s; the file has 3 s.
  (tmp_path / "meta").mkdir()
  (tmp_path / "meta" / "OpenDV-YouTube.json").write_text(json.dumps(meta))
  r = opendv.OpenDVReader(tmp_path, video_root=str(root / "videos"), clip_frames=3)
  with pytest.raises(readers.ReaderError, match="^truncated video"):
    r.read_clip("vidA@40")
