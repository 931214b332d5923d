"""Waymo v1 reader on a synthetic segment written in the real format (tests/waymo_fixture.py)."""
import json
import logging

import numpy as np
import pytest

import waymo_fixture as wf
from cvd_storm_jax.data_pipelines import arrayrecord_source, convert, geometry, readers, schema, tfrecord, waymo

HW = (16, 24)
STATS_CAPTION = "Day driving scene in San Francisco, sunny weather."


@pytest.fixture(scope="module")
def segment_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("waymo")
  wf.write_segment(d, "ctxA", 5)
  return d


@pytest.fixture(scope="module")
def reader(segment_dir):
  return waymo.WaymoReader(segment_dir, clip_frames=3, image_size=HW, max_points=64, max_boxes=4)


@pytest.fixture(scope="module")
def sample(reader):
  return reader.read_clip("ctxA@1")


def test_clips_and_schema(reader, sample):
  assert reader.list_clips() == ["ctxA@0", "ctxA@1", "ctxA@2"]
  dims = schema.validate(sample)
  assert (dims["T"], dims["V"], dims["H"], dims["W"]) == (3, 6, *HW)
  assert sample["dataset"] == "waymo" and sample["clip_id"] == "ctxA@1"
  np.testing.assert_allclose(sample["timestamps"], [0.0, 0.1, 0.2], atol=1e-9)
  assert sample["fps"] == 10.0


def test_view_slots_and_images(sample):
  np.testing.assert_array_equal(sample["view_mask"], [1, 1, 1, 0, 1, 1])
  # Slot order FRONT, FRONT_RIGHT, SIDE_RIGHT, empty, SIDE_LEFT, FRONT_LEFT (camera names 1, 3, 5, -, 4, 2).
  for slot, cam in enumerate(waymo.VIEW_CAMERAS):
    pix = sample["images"][0, slot, 8, 12].astype(int)
    if cam is None:
      assert np.all(sample["images"][:, slot] == 0)
      assert sample["captions"][0, slot] == ""
    else:
      np.testing.assert_allclose(pix, wf.CAMERA_COLORS[cam], atol=3)
  # Without a caption file: the context.stats caption for every frame and camera, "" in the empty slot.
  want = np.array([STATS_CAPTION if cam is not None else "" for cam in waymo.VIEW_CAMERAS], dtype=object)
  np.testing.assert_array_equal(sample["captions"], np.broadcast_to(want, (3, 6)))
  np.testing.assert_array_equal(sample["original_size"][0], [48, 32])
  np.testing.assert_array_equal(sample["original_size"][2], [48, 24])


def test_calibration_conversion_by_hand(sample):
  # FRONT_RIGHT (Waymo name 3) in slot 1. Waymo camera axes (x fwd, y left, z up) -> OpenCV (x right, y down, z fwd).
  e = wf.camera_extrinsic(3)
  c2e = sample["cam_to_ego"][0, 1].astype(np.float64)
  np.testing.assert_allclose(c2e[:3, 2], e[:3, 0], atol=1e-6)    # OpenCV z (forward) = Waymo x.
  np.testing.assert_allclose(c2e[:3, 0], -e[:3, 1], atol=1e-6)   # OpenCV x (right) = -Waymo y.
  np.testing.assert_allclose(c2e[:3, 1], -e[:3, 2], atol=1e-6)   # OpenCV y (down) = -Waymo z.
  np.testing.assert_allclose(c2e[:3, 3], e[:3, 3], atol=1e-6)
  # A point 10 m straight ahead of the camera projects to the principal point.
  ahead = e[:3, 3] + 10 * e[:3, 0]
  uv, z, valid = geometry.project_ego_points(ahead[None], sample["intrinsics"][0, 1], c2e)
  np.testing.assert_allclose(z, [10.0], atol=1e-5)
  k = sample["intrinsics"][0, 1]
  np.testing.assert_allclose(uv[0], k[:2, 2], atol=1e-4)
  # K: f_u = 43 at width 48 -> width 24 halves it; c_u = 24.5 -> (24.5 + 0.5) / 2 - 0.5 (pixel-centre convention).
  np.testing.assert_allclose(k[0, 0], 43.0 * 24 / 48, rtol=1e-6)
  np.testing.assert_allclose(k[1, 1], 44.0 * 16 / 32, rtol=1e-6)
  np.testing.assert_allclose(k[0, 2], (24.5 + 0.5) * 0.5 - 0.5, rtol=1e-6)
  np.testing.assert_array_equal(sample["intrinsics"][0, 3], np.eye(3))


def test_pose_and_boxes_by_hand(sample):
  for t in range(3):  # World = map frame: the stored pose plus that frame's own map_pose_offset.
    np.testing.assert_allclose(sample["ego_to_world"][t], wf.true_pose(t + 1), atol=1e-4)
  # SIGN dropped; VEHICLE -> car, PEDESTRIAN -> pedestrian; sorted by distance (pedestrian at 5 m first).
  frame = 1
  got = {int(c): b for c, b, m in zip(sample["box_class"][0], sample["boxes"][0], sample["box_mask"][0]) if m}
  want = {schema.BOX_CLASSES.index("car"): wf.boxes(frame)[0][2],
          schema.BOX_CLASSES.index("pedestrian"): wf.boxes(frame)[1][2]}
  assert set(got) == set(want)
  for c in want:
    np.testing.assert_allclose(got[c], want[c], atol=1e-6)
  assert sample["box_mask"].sum(1).tolist() == [2, 2, 2]
  car = sample["box_class"] == schema.BOX_CLASSES.index("car")
  ids = sample["box_track_id"][car]
  assert np.all(ids == waymo.track_id("car_a")) and ids.size == 3


def _expected_top_point() -> np.ndarray:
  """The TOP return by hand: vehicle azimuth of column c is ((W - c - 0.5) / W * 2 - 1) * pi (the extrinsic yaw is
  subtracted from the azimuth, then added back by the extrinsic rotation); row 0 is the highest beam."""
  r, c, rng = wf.TOP_RETURN
  h, w = wf.TOP_HW
  incl = wf.TOP_INCLINATIONS[::-1][r]
  az_vehicle = ((w - c - 0.5) / w * 2 - 1) * np.pi
  direction = np.array([np.cos(az_vehicle) * np.cos(incl), np.sin(az_vehicle) * np.cos(incl), np.sin(incl)])
  return wf.TOP_EXTRINSIC_T + rng * direction


def test_lidar_return_at_known_range_azimuth_inclination(reader):
  frame = reader.read_frame("ctxA", 2)
  expected = _expected_top_point()
  d = np.linalg.norm(frame["lidar_points"] - expected, axis=1)
  assert d.min() < 1e-4, (frame["lidar_points"], expected)
  # Four auxiliary lasers with one return each at range 5, inclination row 0 of a uniform [-0.5, 0.5] 2-row image.
  assert len(frame["lidar_points"]) == 5
  aux = frame["lidar_points"][np.argsort(d)[1:]]
  incl = -0.5 + 1.5 / 2 * 1.0  # Uniform at row centres, reversed: row 0 = the highest = min + 1.5/2 * (max-min).
  az = ((4 - 1 - 0.5) / 4 * 2 - 1) * np.pi
  want = np.array([2.0, 0.0, 1.0]) + 5.0 * np.array([np.cos(az) * np.cos(incl), np.sin(az) * np.cos(incl),
                                                      np.sin(incl)])
  np.testing.assert_allclose(aux, np.tile(want, (4, 1)), atol=1e-4)


def test_per_pixel_pose_is_applied(tmp_path):
  # A TOP pixel pose 1 m further along world x than the frame pose moves the point by R_frame^T [1, 0, 0].
  wf.write_segment(tmp_path, "ctxS", 1, pixel_pose_shift=(1.0, 0.0, 0.0))
  r = waymo.WaymoReader(tmp_path, clip_frames=1, image_size=HW, lasers=("TOP",))
  pts = r.read_frame("ctxS", 0)["lidar_points"]
  shift = wf.ego_pose(0)[:3, :3].T @ np.array([1.0, 0.0, 0.0])
  np.testing.assert_allclose(pts, (_expected_top_point() + shift)[None], atol=1e-4)


def test_uniform_inclinations_when_list_empty():
  class Calib:
    name, beam_inclinations, beam_inclination_min, beam_inclination_max = 2, [], -0.4, 0.4
  incl = waymo.beam_inclinations(Calib, 4)
  np.testing.assert_allclose(incl, [0.3, 0.1, -0.1, -0.3])


def _sample_map_lines(sample) -> dict:
  return {int(c): p[m] for p, c, m in zip(sample["map_points"], sample["map_class"], sample["map_mask"]) if c >= 0}


def test_map_in_world_frame(sample):
  # World = map frame, so the stored map points are kept as they are (the offset goes into ego_to_world). Lane
  # centres are left out by default (OpenDWM draws road edges, road lines and crosswalks).
  lines = _sample_map_lines(sample)
  src = dict((k, p) for k, p in wf.map_lines())
  assert sorted(lines) == [0, 1, 2]
  np.testing.assert_allclose(lines[schema.MAP_CLASSES.index("road_edge")], src["road_edge"], atol=1e-5)
  np.testing.assert_allclose(lines[schema.MAP_CLASSES.index("lane_line")], src["road_line"], atol=1e-5)
  closed = np.concatenate([src["crosswalk"], src["crosswalk"][:1]])
  np.testing.assert_allclose(lines[schema.MAP_CLASSES.index("crosswalk")], closed, atol=1e-5)


def test_map_lands_at_true_ego_position_every_frame(sample):
  # Each frame has its own map_pose_offset and the car moves, so the map seen from frame t's ego frame must match the
  # ground-truth vehicle pose of frame t -- not only of frame 0 (using frame 0's offset for all frames misplaces the
  # map by offset_t - offset_0, here 0.5-1.5 m).
  lines = _sample_map_lines(sample)
  src = dict((k, p) for k, p in wf.map_lines())
  road_line = lines[schema.MAP_CLASSES.index("lane_line")].astype(np.float64)
  for t in range(3):
    world_to_ego = geometry.invert_rigid(sample["ego_to_world"][t].astype(np.float64))
    want = geometry.transform_points(geometry.invert_rigid(wf.true_pose(t + 1)), src["road_line"])
    np.testing.assert_allclose(geometry.transform_points(world_to_ego, road_line), want, atol=1e-3)
  # By hand for frame 1 (yaw 0.05, car at (101, 50.2, 3)): the line's start (90, 50, 0) is ~11 m behind, 0.35 m left.
  c, s = np.cos(0.05), np.sin(0.05)
  d = np.array([90.0 - 101.0, 50.0 - 50.2, -3.0])
  by_hand = np.array([c * d[0] + s * d[1], -s * d[0] + c * d[1], d[2]])
  world_to_ego = geometry.invert_rigid(sample["ego_to_world"][0].astype(np.float64))
  np.testing.assert_allclose(geometry.transform_points(world_to_ego, road_line[:1])[0], by_hand, atol=1e-3)


def test_bad_inputs_raise_reader_error(tmp_path):
  wf.write_segment(tmp_path, "bad", 4, corrupt_jpeg_frame=1, missing_camera_frame=2)
  path = tmp_path / "segment-bad_with_camera_labels.tfrecord"
  path.write_bytes(path.read_bytes()[:-10])  # Truncate the last frame.
  r = waymo.WaymoReader(tmp_path, clip_frames=1, image_size=HW)
  assert r.scene_length("bad") == 4
  r.read_frame("bad", 0)
  with pytest.raises(readers.ReaderError, match="^corrupt image"):
    r.read_frame("bad", 1)
  with pytest.raises(readers.ReaderError, match="^missing sensor.*SIDE_LEFT"):
    r.read_frame("bad", 2)
  with pytest.raises(readers.ReaderError, match="^truncated record"):
    r.read_frame("bad", 3)


def test_damaged_records_name_their_reason(tmp_path):
  """A CRC mismatch is a "corrupt record", a file ending inside a record (or holding none) a "truncated record"; an
  empty segment is a ReaderError, not an IndexError."""
  path = wf.write_segment(tmp_path, "crc", 3)
  wf.flip_record_byte(path, 1)
  path = wf.write_segment(tmp_path, "header", 3)
  wf.flip_record_byte(path, 1, in_header=True)
  (tmp_path / "segment-empty_with_camera_labels.tfrecord").write_bytes(b"")
  r = waymo.WaymoReader(tmp_path, clip_frames=1, image_size=HW)
  r.read_frame("crc", 0)
  with pytest.raises(readers.ReaderError, match="^corrupt record: .*data CRC mismatch"):
    r.read_frame("crc", 1)
  assert r.scene_length("header") == 2  # The scan stops at the bad header; it counts as one damaged frame.
  with pytest.raises(readers.ReaderError, match="^corrupt record: .*length CRC mismatch"):
    r.read_frame("header", 1)
  assert r.scene_length("empty") == 0
  with pytest.raises(readers.ReaderError, match="^truncated record: segment holds no record"):
    r.scene_map("empty")


def test_malformed_protos_are_corrupt_records(tmp_path):
  """A Transform without 16 values or a short intrinsic is a counted "corrupt record" skip, not a ValueError that
  would stop the converter."""
  frames = [wf.make_frame("ctx", i, with_map=(i == 0)) for i in range(4)]
  frames[1].ClearField("pose")
  del frames[2].context.camera_calibrations[0].extrinsic.transform[:]
  del frames[3].context.camera_calibrations[1].intrinsic[2:]
  tfrecord.write_records(tmp_path / "segment-ctx_with_camera_labels.tfrecord", [f.SerializeToString() for f in frames])
  r = waymo.WaymoReader(tmp_path, clip_frames=1, image_size=HW)
  r.read_frame("ctx", 0)
  for i, what in ((1, "frame pose: Transform has 0 values"), (2, "camera FRONT calibration: Transform has 0 values"),
                  (3, "camera FRONT_LEFT calibration: camera intrinsic has 2 values")):
    with pytest.raises(readers.ReaderError, match=f"^corrupt record: {what}.*frame {i}") as e:
      r.read_frame("ctx", i)
    assert convert.skip_reason(e.value) == "corrupt_record"


# ---- caption files (OpenDWM's waymo_caption_v2 format) ---------------------------------------------------------------
def _time_us(i: int) -> int:
  return wf.make_frame("ctxA", i, with_map=False).timestamp_micros


def _caption_entry(cam: int, i: int) -> dict:
  """A DriveMLM dict whose time and weather disagree between cameras (the majority is "day" / "sunny")."""
  return {"time": "night" if cam == 1 else "day", "weather": "rainy" if cam == 4 else "sunny",
          "environment": f"env{cam}", "objects": f"obj{cam}", "image_description": f"cam{cam} f{i}",
          "extra": "not part of the prompt"}


def _write_captions(path) -> str:
  """Captions labelled at frames 0 and 2 of ctxA for cameras 1-4 (SIDE_RIGHT = 5 has none), keyed as OpenDWM does
  ("<context name>|<timestamp_micros>|<CameraName>"); camera 2 keyed by the full segment file name; plus keys of a
  segment this reader does not have."""
  caps = {}
  for i in (0, 2):
    for cam in (1, 2, 3, 4):
      scene = "segment-ctxA_with_camera_labels.tfrecord" if cam == 2 else "ctxA"
      caps[f"{scene}|{_time_us(i)}|{cam}"] = _caption_entry(cam, i)
  caps[f"otherSegment|{_time_us(0)}|1"] = "elsewhere"
  path.write_text(json.dumps(caps))
  return str(path)


def _joined(cam: int, i: int) -> str:
  # After alignment every view has the majority time "day" and weather "sunny"; the five fields joined with ". ".
  return f"day. sunny. env{cam}. obj{cam}. cam{cam} f{i}"


def _want_captions(num_frames: int) -> np.ndarray:
  want = np.empty((num_frames, 6), dtype=object)
  for i in range(num_frames):
    label = 0 if i <= 1 else 2  # Nearest labelled frame; frame 1 is equidistant and takes the earlier one.
    for slot, cam in enumerate(waymo.VIEW_CAMERAS):
      want[i, slot] = "" if cam is None else STATS_CAPTION if cam == 5 else _joined(cam, label)
  return want


def test_caption_file_per_frame_and_camera(segment_dir, tmp_path, caplog):
  path = _write_captions(tmp_path / "caps.json")
  with caplog.at_level(logging.WARNING, logger="cvd_storm_jax.data_pipelines.waymo"):
    r = waymo.WaymoReader(segment_dir, clip_frames=5, image_size=HW, max_points=64, max_boxes=4, caption_file=path)
  # Partial coverage: one warning with the counts (1 of 9 keys for another segment; SIDE_RIGHT uncaptioned).
  warnings = [rec.getMessage() for rec in caplog.records if "caption file" in rec.getMessage()]
  assert len(warnings) == 1 and "1 of 9 keys" in warnings[0] and "1 of 5 (segment, camera)" in warnings[0]
  s = r.read_clip("ctxA@0")
  np.testing.assert_array_equal(s["captions"], _want_captions(5))
  schema.validate(s)


def test_caption_file_no_match_raises(segment_dir, tmp_path):
  path = tmp_path / "caps.json"
  # OpenDV-style keys, an unknown segment and a camera number that is no Waymo camera match nothing.
  path.write_text(json.dumps({f"ctxA.{_time_us(0)}": "a", f"nope|{_time_us(0)}|1": "b", f"ctxA|{_time_us(0)}|7": "c"}))
  with pytest.raises(readers.ReaderError, match=r"no key of the Waymo caption file.*ctxA\.1600000000000000.*"
                     r"<scene>\|<timestamp_micros>\|<CameraName"):
    waymo.WaymoReader(segment_dir, caption_file=str(path))
  path.write_text("{}")
  with pytest.raises(readers.ReaderError, match="no key of the Waymo caption file.*empty"):
    waymo.WaymoReader(segment_dir, caption_file=str(path))
  path.write_text(json.dumps({f"ctxA|{_time_us(0)}|1": 3}))
  with pytest.raises(readers.ReaderError, match="must be a str or a dict"):
    waymo.WaymoReader(segment_dir, caption_file=str(path))


def test_caption_file_through_the_converter(segment_dir, tmp_path):
  # ``convert --reader-arg caption_file=...`` reaches WaymoReader (convert's _make_waymo forwards reader kwargs).
  path = _write_captions(tmp_path / "caps.json")
  out = tmp_path / "out"
  assert convert.main(["--dataset", "waymo", "--root", str(segment_dir), "--out", str(out), "--image-size", "16x24",
                       "--clip-frames", "5", "--reader-arg", f"caption_file={json.dumps(path)}", "--reader-arg",
                       "max_points=64", "--no-progress"]) == 0
  source = arrayrecord_source.ArrayRecordClipSource(out)
  assert len(source) == 1
  np.testing.assert_array_equal(source[0]["captions"], _want_captions(5))
