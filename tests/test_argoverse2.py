"""Argoverse 2 reader on a tiny synthetic log in the real feather/JPEG/JSON format, checked against the fixture's
ground truth (poses, boxes, a planted LiDAR point, drawn box edges)."""
import json
import logging
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pytest

from cvd_storm_jax.data_pipelines import conditions, geometry, schema
from cvd_storm_jax.data_pipelines.argoverse2 import CAMERAS, Argoverse2Reader
from cvd_storm_jax.data_pipelines.readers import ReaderError

import argoverse2_fixture as fx

SIZES = dict(max_boxes=8, max_lidar_points=32, max_map_lines=16, map_points_per_line=4)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
  return fx.write_av2_log(str(tmp_path_factory.mktemp("av2")))


@pytest.fixture(scope="module")
def reader(log):
  return Argoverse2Reader(log.root, num_frames=8, **SIZES)


@pytest.fixture(scope="module")
def sample(reader):
  return reader.read_clip(reader.list_clips()[0])


def test_clips_views_and_schema(reader, sample):
  assert reader.list_clips() == [f"{fx.LOG_ID}/{k:04d}" for k in range(4)]
  dims = schema.validate(sample)
  assert dims["T"] == 8 and dims["V"] == 6 and (dims["H"], dims["W"]) == fx.HW
  assert sample["dataset"] == "argoverse2" and float(sample["fps"]) == 10.0
  np.testing.assert_allclose(sample["timestamps"], np.arange(8) / 10, atol=1e-9)
  assert sample["view_mask"].all()
  # Slot order is OpenDWM's ring (front_center dropped); the fixture colours encode the camera and the image index.
  for v, cam in enumerate(CAMERAS):
    ci = fx.RING.index(cam)
    np.testing.assert_allclose(sample["images"][3, v, 5, 5], [30 * ci, 10 * 6, 90], atol=6)  # frame 3 = image 6
  np.testing.assert_array_equal(sample["original_size"], [[48, 36]] * 6)
  assert set(sample["captions"].ravel()) == {"Driving in Pittsburgh."}


def test_poses_and_intrinsics(log, reader, sample):
  frames = reader.clip_frames(reader.list_clips()[0])
  for t, frame in enumerate(frames):
    ref = fx.ego_matrix(frame["lidar"])
    np.testing.assert_allclose(sample["ego_to_world"][t], ref, atol=2e-3)  # float32 of city coordinates
    for v, cam in enumerate(CAMERAS):
      assert frame[cam] == frame["lidar"] + fx.CAMERA_OFFSET_NS[cam]  # nearest 20 Hz image
      want = np.linalg.inv(ref) @ fx.ego_matrix(frame[cam]) @ fx.cam_to_ego(cam)
      np.testing.assert_allclose(sample["cam_to_ego"][t, v], want, atol=1e-5)
      np.testing.assert_allclose(sample["intrinsics"][t, v], fx.camera_k(cam), atol=1e-6)


def test_boxes(sample, reader):
  frames = reader.clip_frames(reader.list_clips()[0])
  for t, frame in enumerate(frames):
    w2e = geometry.invert_rigid(fx.ego_matrix(frame["lidar"]))
    m = sample["box_mask"][t]
    boxes, cls, tid = sample["boxes"][t][m], sample["box_class"][t][m], sample["box_track_id"][t][m]
    assert len(boxes) == 2  # the bollard is not a drawn class
    for track in fx.TRACKS[:2]:
      c, yaw = fx.track_world(track, frame["lidar"])
      ce = geometry.transform_points(w2e, c[None])[0]
      i = int(np.argmin(np.linalg.norm(boxes[:, :3] - ce, axis=1)))
      want_yaw = yaw - fx.ego_pose_at(frame["lidar"])[1]
      np.testing.assert_allclose(boxes[i, :6], [*ce, *track[5]], atol=1e-4)
      np.testing.assert_allclose(np.angle(np.exp(1j * (boxes[i, 6] - want_yaw))), 0.0, atol=1e-5)
      assert schema.BOX_CLASSES[cls[i]] == {"REGULAR_VEHICLE": "car", "PEDESTRIAN": "pedestrian"}[track[1]]
      # Track ids index the sorted uuids of the clip: "7a9d..." (car) < "b1c2..." (ped).
      assert tid[i] == (0 if track[1] == "REGULAR_VEHICLE" else 1)


def test_lidar_point_lands_on_expected_pixel(log, reader, sample):
  depth = conditions.depth_maps(sample)
  frames = reader.clip_frames(reader.list_clips()[0])
  v = CAMERAS.index("ring_front_left")
  for t in (0, 4, 7):
    cam = "ring_front_left"
    cam_to_world = fx.ego_matrix(frames[t][cam]) @ fx.cam_to_ego(cam)
    p = geometry.transform_points(geometry.invert_rigid(cam_to_world), log.planted_world_point[None])[0]
    u, vv = fx.camera_k(cam)[:2] @ (p / p[2])
    row, col = int(np.floor(vv + 0.5)), int(np.floor(u + 0.5))
    assert 0 <= row < fx.HW[0] and 0 <= col < fx.HW[1]
    # float16 storage of the ego-frame point: ~1 cm at 10 m.
    assert depth[t, v, row, col] == pytest.approx(p[2], abs=0.03)
    assert np.count_nonzero(depth[t, v]) == 1


def test_box_edges_drawn_where_projection_says(reader, sample):
  img = conditions.box_images(sample, line_width=1.0)
  frame = reader.clip_frames(reader.list_clips()[0])[0]
  checked = 0
  for cam in CAMERAS:
    v = CAMERAS.index(cam)
    c, yaw = fx.track_world(fx.TRACKS[0], frame["lidar"])
    corners = geometry.box_corners(np.array([*c, *fx.TRACKS[0][5], yaw]))
    cam_to_world = fx.ego_matrix(frame[cam]) @ fx.cam_to_ego(cam)
    uv, z = geometry.project(geometry.transform_points(geometry.invert_rigid(cam_to_world), corners),
                             fx.camera_k(cam))
    for a, b in geometry.BOX_EDGES:
      if min(z[a], z[b]) < 0.5:
        continue
      for f in (0.25, 0.5, 0.75):
        u, vv = uv[a] + f * (uv[b] - uv[a])
        r, col = int(np.floor(vv + 0.5)), int(np.floor(u + 0.5))
        if 1 <= r < fx.HW[0] - 1 and 1 <= col < fx.HW[1] - 1:
          patch = img[0, v, r - 1:r + 2, col - 1:col + 2].reshape(-1, 3)
          assert any((px == schema.BOX_COLORS[1]).all() for px in patch), (cam, a, b, f)
          checked += 1
  assert checked >= 10


def test_map(sample):
  m = sample["map_mask"]
  pts = sample["map_points"][m]
  cls = np.broadcast_to(sample["map_class"][:, None], m.shape)[m]
  found = {tuple(np.round(p, 2)): c for p, c in zip(pts, cls)}
  expect = {"shared": 1, "left": 1, "right": 1, "area": 0, "edge1": 2, "edge2": 2}
  for name, c in expect.items():
    for p in fx.MAP[name]:
      assert found.get(tuple(np.round(p, 2))) == c, (name, p)
  assert pts[:, 0].max() < 9000  # the far lane is cropped away
  # The boundary shared by lanes 1 and 2 appears once.
  lane_rows = [i for i in range(len(sample["map_class"])) if sample["map_class"][i] == 1]
  assert len(lane_rows) == 3


def test_captions_file(log, tmp_path, caplog):
  ts = log.camera_times["ring_side_right"]
  path = tmp_path / "caps.json"
  path.write_text(json.dumps({f"{fx.LOG_ID}/ring_side_right/{ts[0]}": "start",
                              f"{fx.LOG_ID}/ring_side_right/{ts[10]}": {"time": "day", "weather": "sunny"}}))
  with caplog.at_level("WARNING"):
    r = Argoverse2Reader(log.root, num_frames=8, caption_file=str(path), **SIZES)
  assert [rec.getMessage() for rec in caplog.records if "5 of 6" in rec.getMessage()]  # the other 5 cameras
  s = r.read_clip(r.list_clips()[0])
  v = CAMERAS.index("ring_side_right")
  # Frames at 0..0.7 s; captions at 0 and 0.5 s: nearest wins. Dict fields are joined as OpenDWM does (no final ".").
  assert s["captions"][:, v].tolist() == ["start"] * 3 + ["day. sunny"] * 5
  # A real view whose camera has no entry is a missing caption: the metadata caption, never "".
  assert s["captions"][0, 0] == "Driving in Pittsburgh."
  # An empty slot (camera None) is padding and keeps "".
  cams = ("ring_side_right", None) + CAMERAS[2:]
  s = Argoverse2Reader(log.root, num_frames=8, cameras=cams, caption_file=str(path), **SIZES).read_clip(
      r.list_clips()[0])
  assert s["captions"][:, 1].tolist() == [""] * 8 and s["captions"][0, 0] == "start"


def _opendwm_entry(cam, i, time="daytime", weather="sunny"):
  return {"time": time, "weather": weather, "environment": "city street", "objects": f"cars by {cam}",
          "image_description": f"image {i}", "lane_count": "2"}  # lane_count is not a prompt field


def test_opendwm_captions(log, tmp_path, caplog):
  # OpenDWM's DriveMLM keys for every image of 4 of the 6 cameras (rear_left and side_left have none); view 0 says
  # night/rainy and view 1 cloudy, the rest daytime/sunny, so each frame's majority is daytime/sunny.
  odd = {"ring_front_left": ("night", "rainy"), "ring_front_right": ("daytime", "cloudy")}
  covered = ("ring_front_left", "ring_front_right", "ring_side_right", "ring_rear_right", "ring_front_center")
  caps = {fx.opendwm_caption_key(fx.LOG_ID, cam, ts): _opendwm_entry(cam, i, *odd.get(cam, ()))
          for cam in covered for i, ts in enumerate(log.camera_times[cam])}
  caps[fx.opendwm_caption_key("another-log", "ring_rear_left", 1)] = "another log: ignored"
  path = tmp_path / "av2_sensor_caption_v2_train.json"
  path.write_text(json.dumps(caps))
  with caplog.at_level("WARNING"):
    r = Argoverse2Reader(log.root, num_frames=8, caption_file=str(path), **SIZES)
  warned = [rec.getMessage() for rec in caplog.records if str(path) in rec.getMessage()]
  assert len(warned) == 1 and "2 of 6" in warned[0]
  s = r.read_clip(r.list_clips()[0])
  for t in range(8):
    for v, cam in enumerate(CAMERAS):
      if cam in covered:  # frame t takes image 2t, the nearest in time
        want = f"daytime. sunny. city street. cars by {cam}. image {2 * t}"
      else:
        want = "Driving in Pittsburgh."
      assert s["captions"][t, v] == want, (t, cam)
  # The portrait front camera's own entries are read when it is a slot, and the views still align.
  cams = ("ring_front_center",) + CAMERAS[1:]
  s = Argoverse2Reader(log.root, num_frames=8, cameras=cams, image_size=fx.HW, caption_file=str(path),
                       **SIZES).read_clip(r.list_clips()[0])
  assert s["captions"][2, 0] == "daytime. sunny. city street. cars by ring_front_center. image 4"


def test_caption_file_errors(log, tmp_path):
  path = tmp_path / "caps.json"
  # Well-formed keys, but of other logs only: a wrong file, not a partial one.
  key = fx.opendwm_caption_key("00a6ffc1-6ce9-3bc3-a060-6006e9893a1a", "ring_front_left", 315966070559696000)
  path.write_text(json.dumps({key: _opendwm_entry("ring_front_left", 0)}))
  with pytest.raises(ReaderError, match="no caption key names a log") as e:
    Argoverse2Reader(log.root, num_frames=8, caption_file=str(path), **SIZES)
  assert e.value.path == str(path) and key in str(e.value) and "sensor/<split>/<log_id>|cameras/" in str(e.value)
  for bad in ({f"{fx.LOG_ID}|ring_front_left|1": "x"}, {}):
    path.write_text(json.dumps(bad))
    with pytest.raises(ReaderError, match="<log_id>/<camera>/<timestamp_ns>"):
      Argoverse2Reader(log.root, num_frames=8, caption_file=str(path), **SIZES)
  ts = log.camera_times["ring_front_left"][0]
  path.write_text(json.dumps({f"{fx.LOG_ID}/ring_front_left/{ts}": "a",
                              fx.opendwm_caption_key(fx.LOG_ID, "ring_front_left", ts): "b"}))
  with pytest.raises(ReaderError, match="two entries"):
    Argoverse2Reader(log.root, num_frames=8, caption_file=str(path), **SIZES)


def test_custom_camera_slots_and_resize(log):
  cams = ("ring_front_center", "ring_front_right", None, "ring_rear_right", "ring_rear_left", "ring_front_left")
  with pytest.raises(ValueError, match="image_size"):
    r = Argoverse2Reader(log.root, num_frames=4, cameras=cams, **SIZES)
    r.read_clip(r.list_clips()[0])
  r = Argoverse2Reader(log.root, num_frames=4, cameras=cams, image_size=(18, 24), **SIZES)
  s = r.read_clip(r.list_clips()[0])
  schema.validate(s)
  assert s["view_mask"].tolist() == [True, True, False, True, True, True]
  assert not s["images"][:, 2].any()
  np.testing.assert_allclose(s["intrinsics"][0, 0], geometry.resize_intrinsics(
      fx.camera_k("ring_front_center"), (48, 36), (18, 24)), atol=1e-5)
  np.testing.assert_array_equal(s["original_size"][0], [36, 48])


def _fresh(tmp_path):
  return fx.write_av2_log(str(tmp_path / "av2"))


def _read_first(root):
  r = Argoverse2Reader(root, num_frames=8, **SIZES)
  return r.read_clip(r.list_clips()[0])


def test_corrupt_jpeg(tmp_path):
  log = _fresh(tmp_path)
  p = os.path.join(log.log_dir, "sensors", "cameras", "ring_rear_left", f"{log.camera_times['ring_rear_left'][2]}.jpg")
  open(p, "wb").write(b"\xff\xd8\xff\xe0 not really a jpeg")
  with pytest.raises(ReaderError) as e:
    _read_first(log.root)
  assert e.value.path == p


def test_missing_camera_file(tmp_path):
  log = _fresh(tmp_path)
  r = Argoverse2Reader(log.root, num_frames=8, **SIZES)  # indexed before the file disappears
  p = os.path.join(log.log_dir, "sensors", "cameras", "ring_side_left", f"{log.camera_times['ring_side_left'][4]}.jpg")
  os.remove(p)
  with pytest.raises(ReaderError) as e:
    r.read_clip(r.list_clips()[0])
  assert e.value.path == p and str(e.value).startswith("missing sensor file")
  r = Argoverse2Reader(log.root, num_frames=8, cameras=("ring_front_left",) + (None,) * 5, **SIZES)
  os.remove(os.path.join(log.log_dir, "sensors", "lidar", f"{log.lidar_times[0]}.feather"))
  with pytest.raises(ReaderError, match="missing sensor file"):
    r.read_clip(r.list_clips()[0])


def test_truncated_lidar(tmp_path):
  log = _fresh(tmp_path)
  p = os.path.join(log.log_dir, "sensors", "lidar", f"{log.lidar_times[1]}.feather")
  data = open(p, "rb").read()
  open(p, "wb").write(data[: len(data) // 2])
  with pytest.raises(ReaderError) as e:
    _read_first(log.root)
  assert e.value.path == p and p in str(e.value)


def test_missing_pose_row(tmp_path):
  log = _fresh(tmp_path)
  p = os.path.join(log.log_dir, "city_SE3_egovehicle.feather")
  table = feather.read_table(p)
  drop = log.camera_times["ring_front_right"][0]
  feather.write_feather(table.filter(pc.not_equal(table["timestamp_ns"], drop)), p)
  with pytest.raises(ReaderError, match=str(drop)) as e:
    _read_first(log.root)
  assert e.value.path == p


class _NoPythonLists:
  """A pyarrow Table whose ``to_pydict`` fails: a sweep of ~100k points as Python lists is ~35x slower to read."""

  def __init__(self, table):
    self._table = table

  def __getattr__(self, name):
    return getattr(self._table, name)

  def to_pydict(self):
    raise AssertionError("a LiDAR sweep was read as Python lists")


def test_lidar_columns_read_exactly_and_nulls_refused(tmp_path, monkeypatch):
  """Sweeps are read column-wise, never as Python lists (float16 on disk -> the same float32 values as before); a
  null coordinate is a ReaderError naming the file."""
  log = _fresh(tmp_path)
  r = Argoverse2Reader(log.root, num_frames=8, **SIZES)
  clip = r.list_clips()[0]
  read_table = feather.read_table
  with monkeypatch.context() as m:
    m.setattr(feather, "read_table", lambda path, *a, **k: (_NoPythonLists if f"{os.sep}lidar{os.sep}" in str(path)
                                                             else lambda t: t)(read_table(path, *a, **k)))
    s = r.read_clip(clip)
  for t, frame in enumerate(r.clip_frames(clip)):
    table = feather.read_table(os.path.join(log.log_dir, "sensors", "lidar", f"{frame['lidar']}.feather"))
    assert table.schema.field("x").type == pa.float16()
    want = np.stack([np.asarray(table.to_pydict()[c], np.float32) for c in "xyz"], -1)  # The old, slow read.
    assert s["lidar_points"].dtype == np.float32
    np.testing.assert_array_equal(s["lidar_points"][t][s["lidar_mask"][t]], want)
  p = os.path.join(log.log_dir, "sensors", "lidar", f"{log.lidar_times[1]}.feather")
  table = feather.read_table(p)
  z = pa.array([None] + table["z"].to_pylist()[1:], pa.float16())
  feather.write_feather(table.set_column(table.schema.get_field_index("z"), "z", z), p)
  with pytest.raises(ReaderError, match="corrupt LiDAR sweep") as e:
    r.read_clip(clip)
  assert e.value.path == p


def test_log_without_lidar_or_camera_folder_is_named(tmp_path, caplog):
  log = _fresh(tmp_path)
  shutil.rmtree(os.path.join(log.log_dir, "sensors", "lidar"))
  shutil.rmtree(os.path.join(log.log_dir, "sensors", "cameras", "ring_side_left"))
  with caplog.at_level(logging.WARNING):
    r = Argoverse2Reader(log.root, num_frames=8, **SIZES)
  assert r.list_clips() == []
  (message,) = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
  log_id = os.path.basename(log.log_dir)
  assert message.startswith(f"Argoverse 2 log {log_id} gives no clips: no LiDAR sweeps (sensors/lidar), no "
                            "ring_side_left images (sensors/cameras/ring_side_left)")
