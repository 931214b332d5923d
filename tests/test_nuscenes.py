"""nuScenes reader on a tiny synthetic tree in the real format, cross-checked with nuscenes-devkit and geometry."""
import json
import logging
import os
import shutil

import numpy as np
import pytest

from cvd_storm_jax.data_pipelines import conditions, geometry, schema
from cvd_storm_jax.data_pipelines.nuscenes import CAMERAS, NuScenesReader, category_class, read_pcd_bin
from cvd_storm_jax.data_pipelines.readers import ReaderError

import nuscenes_fixture as fx

SIZES = dict(max_boxes=8, max_lidar_points=64, max_map_lines=16, map_points_per_line=4)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return fx.write_nuscenes_tree(str(tmp_path_factory.mktemp("nusc")))


@pytest.fixture(scope="module")
def reader(tree):
  return NuScenesReader(tree.root, tree.version, num_frames=8, **SIZES)


@pytest.fixture(scope="module")
def nusc(tree):
  from nuscenes.nuscenes import NuScenes
  return NuScenes(version=tree.version, dataroot=tree.root, verbose=False)


def _quat_matrix(rec):
  from pyquaternion import Quaternion
  return geometry.make_rigid(Quaternion(rec["rotation"]).rotation_matrix, rec["translation"])


def _devkit_ego_boxes(nusc, sd_token, ego_pose):
  """Devkit boxes for a sample_data, moved into its ego frame: {instance: (centre, lwh, yaw)}."""
  from pyquaternion import Quaternion
  out = {}
  for box in nusc.get_boxes(sd_token):
    inst = nusc.get("sample_annotation", box.token)["instance_token"]
    box.translate(-np.asarray(ego_pose["translation"]))
    box.rotate(Quaternion(ego_pose["rotation"]).inverse)
    w, l, h = box.wlh
    out[inst] = (box.center.copy(), np.array([l, w, h]), box.orientation.yaw_pitch_roll[0], box.name)
  return out


def test_clips_and_schema(reader):
  # Clip starts every 0.1 s while 8 frames at 10 fps fit in the 1 s scene (+ half a frame of slack).
  assert reader.list_clips() == [f"scene-0061/{k:04d}" for k in range(4)]
  s = reader.read_clip("scene-0061/0000")
  dims = schema.validate(s)
  assert dims["T"] == 8 and dims["V"] == 6 and (dims["H"], dims["W"]) == fx.IMAGE_HW
  assert s["dataset"] == "nuscenes" and float(s["fps"]) == 10.0
  # 10 fps resampled from the 12 Hz front camera: each frame is the image nearest to i / 10 s.
  target = np.arange(8) / 10
  assert np.all(np.abs(s["timestamps"] - target) <= 0.5 / 12 + 1e-6)
  np.testing.assert_array_equal(s["original_size"], [[64, 36]] * 6)
  # The decoded pixels are the fixture's (per view/frame colour): view 1, frame 1 -> image j = 1.
  np.testing.assert_allclose(s["images"][1, 1, -1, -1], [40, 18, 100], atol=6)


def test_poses_and_calibration_match_devkit(reader, nusc):
  clip = reader.list_clips()[1]
  s = reader.read_clip(clip)
  for t, frame in enumerate(reader.clip_frames(clip)):
    front = nusc.get("sample_data", frame["CAM_FRONT"])
    e_front = _quat_matrix(nusc.get("ego_pose", front["ego_pose_token"]))
    np.testing.assert_allclose(s["ego_to_world"][t], e_front, atol=1e-3)
    for v, ch in enumerate(CAMERAS):
      sd = nusc.get("sample_data", frame[ch])
      assert sd["channel"] == ch
      calib = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
      e_v = _quat_matrix(nusc.get("ego_pose", sd["ego_pose_token"]))
      want = np.linalg.inv(e_front) @ e_v @ _quat_matrix(calib)
      np.testing.assert_allclose(s["cam_to_ego"][t, v], want, atol=1e-4)
      np.testing.assert_allclose(s["intrinsics"][t, v], calib["camera_intrinsic"], atol=1e-5)


def _ours(s, t):
  m = s["box_mask"][t]
  return s["boxes"][t][m], s["box_class"][t][m], s["box_track_id"][t][m]


def test_boxes_match_devkit_at_keyframes_and_sweeps(tree, nusc):
  reader = NuScenesReader(tree.root, tree.version, num_frames=13, fps=12.0, **SIZES)
  (clip,) = reader.list_clips()
  s = reader.read_clip(clip)
  track_of = {}
  for t, frame in enumerate(reader.clip_frames(clip)):
    sd = nusc.get("sample_data", frame["CAM_FRONT"])
    dev = _devkit_ego_boxes(nusc, sd["token"], nusc.get("ego_pose", sd["ego_pose_token"]))
    dev = {k: v for k, v in dev.items() if category_class(v[3]) >= 0}  # the cone is not a drawn class
    boxes, cls, tid = _ours(s, t)
    if sd["is_key_frame"]:
      assert len(boxes) == len(dev), (t, len(boxes), dev.keys())
    for inst, (centre, lwh, yaw, name) in dev.items():
      if inst == "inst_truck" and not sd["is_key_frame"] and t < 6:
        # The truck enters at keyframe 1: the devkit keeps its keyframe-1 box on earlier sweeps, ASAP drops it.
        continue
      match = [i for i in range(len(boxes)) if np.allclose(boxes[i, :3], centre, atol=1e-3)]
      assert len(match) == 1, (t, inst, boxes[:, :3], centre)
      i = match[0]
      np.testing.assert_allclose(boxes[i, 3:6], lwh, atol=1e-4)
      np.testing.assert_allclose(np.angle(np.exp(1j * (boxes[i, 6] - yaw))), 0.0, atol=1e-4)
      assert cls[i] == category_class(name)
      assert track_of.setdefault(inst, tid[i]) == tid[i]  # stable track ids
    if not sd["is_key_frame"] and t < 6:
      assert len(boxes) == 2  # car and pedestrian (in keyframes 0 and 1); not the entering truck
  assert len(set(track_of.values())) == 3


def test_interpolation_hand_computed(tree, reader):
  s = reader.read_clip("scene-0061/0000")
  t = 2  # target 0.2 s -> image j = 2 (0.1667 s), between keyframes 0 and 1
  ts = fx.camera_time(0, 2)
  alpha = (ts - fx.T0) / fx.KEYFRAME_US
  world_to_ego = geometry.invert_rigid(fx.ego_matrix(ts))
  boxes, cls, _ = _ours(s, t)
  for inst, cat, track, (w, l, h) in fx.INSTANCES[:2]:
    (x0, y0, yaw0), (x1, y1, yaw1) = track[0], track[1]
    c = np.array([x0 + alpha * (x1 - x0), y0 + alpha * (y1 - y0), 0.8])
    c_ego = geometry.transform_points(world_to_ego, c[None])[0]
    yaw = yaw0 + alpha * (yaw1 - yaw0) - fx.ego_pose_at(ts)[1]
    i = int(np.argmin(np.linalg.norm(boxes[:, :3] - c_ego, axis=1)))
    np.testing.assert_allclose(boxes[i], [*c_ego, l, w, h, yaw], atol=2e-4)
    assert schema.BOX_CLASSES[cls[i]] == ("car" if "car" in cat else "pedestrian")


def test_lidar_point_lands_on_expected_pixel(tree, reader):
  s = reader.read_clip("scene-0061/0000")
  depth = conditions.depth_maps(s)
  for t in (0, 3, 7):
    ts = fx.T0 + int(round(s["timestamps"][t] * 1e6))
    cam_to_world = fx.ego_matrix(ts) @ fx.cam_to_ego(0)
    p = geometry.transform_points(geometry.invert_rigid(cam_to_world), tree.planted_world_point[None])[0]
    u, v = np.asarray(fx.K)[:2] @ (p / p[2])
    row, col = int(np.floor(v + 0.5)), int(np.floor(u + 0.5))
    assert 0 <= row < fx.IMAGE_HW[0] and 0 <= col < fx.IMAGE_HW[1]
    assert depth[t, 0, row, col] == pytest.approx(p[2], abs=1e-3)
    assert np.count_nonzero(depth[t, 0]) == 1  # the other points are behind/below, out of view


def test_box_edges_drawn_where_projection_says(tree, reader):
  s = reader.read_clip("scene-0061/0000")
  img = conditions.box_images(s, line_width=1.0)
  t, ts = 0, fx.camera_time(0, 0)
  x, y, yaw = fx.INSTANCES[0][2][0]
  w, l, h = fx.INSTANCES[0][3]
  corners = geometry.box_corners(np.array([x, y, 0.8, l, w, h, yaw]))  # world, from the fixture's truth
  cam = geometry.transform_points(geometry.invert_rigid(fx.ego_matrix(ts) @ fx.cam_to_ego(0)), corners)
  uv, z = geometry.project(cam, np.asarray(fx.K))
  checked = 0
  for a, b in geometry.BOX_EDGES:
    if min(z[a], z[b]) < 0.5:
      continue
    for f in (0.25, 0.5, 0.75):
      u, v = uv[a] + f * (uv[b] - uv[a])
      r, c = int(np.floor(v + 0.5)), int(np.floor(u + 0.5))
      if 1 <= r < fx.IMAGE_HW[0] - 1 and 1 <= c < fx.IMAGE_HW[1] - 1:
        patch = img[t, 0, r - 1:r + 2, c - 1:c + 2].reshape(-1, 3)
        assert any((px == schema.BOX_COLORS[1]).all() for px in patch), (a, b, f, u, v)
        checked += 1
  assert checked >= 10
  assert img[t, 0].any(axis=-1).mean() < 0.5  # lines, not a filled image


def test_map_polylines(tree, reader):
  s = reader.read_clip("scene-0061/0000")
  m = s["map_mask"]
  pts = {tuple(np.round(p[:2], 3)) for p in s["map_points"][m]}
  for name in ("area", "hole", "cross", "lane", "road"):
    for xy in np.asarray(_map_truth(tree)[name]):
      assert tuple(np.round(xy, 3)) in pts, (name, xy)
  assert all(p[0] < 1000 for p in pts)  # the far lane divider is cropped away
  classes = s["map_class"][s["map_class"] >= 0]
  assert set(classes.tolist()) == {0, 1, 2}
  # Polygon outlines are closed rings: the first real point of the first area piece starts the exterior.
  np.testing.assert_allclose(s["map_points"][0, 0, :2], _map_truth(tree)["area"][0])
  # The devkit's map API loads the same file (format check).
  from nuscenes.map_expansion.map_api import NuScenesMap
  nmap = NuScenesMap(dataroot=tree.root, map_name=fx.LOCATION)
  assert len(nmap.drivable_area) == 1 and len(nmap.ped_crossing) == 1


def _map_truth(tree):
  with open(os.path.join(tree.root, "maps", "expansion", f"{fx.LOCATION}.json")) as f:
    m = json.load(f)
  xy = {n["token"]: (n["x"], n["y"]) for n in m["node"]}
  poly = {p["token"]: p for p in m["polygon"]}
  line = {p["token"]: p for p in m["line"]}
  return {"area": [xy[t] for t in poly["poly_area"]["exterior_node_tokens"]],
          "hole": [xy[t] for t in poly["poly_area"]["holes"][0]["node_tokens"]],
          "cross": [xy[t] for t in poly["poly_cross"]["exterior_node_tokens"]],
          "lane": [xy[t] for t in line["line_lane"]["node_tokens"]],
          "road": [xy[t] for t in line["line_road"]["node_tokens"]]}


def test_keyframes_only(tree):
  r = NuScenesReader(tree.root, tree.version, num_frames=3, keyframes_only=True, **SIZES)
  (clip,) = r.list_clips()
  s = r.read_clip(clip)
  assert float(s["fps"]) == 2.0
  np.testing.assert_allclose(s["timestamps"], [0.0, 0.5, 1.0])
  assert s["box_mask"].sum(1).tolist() == [2, 3, 2]  # car+ped, car+ped+truck, car+truck


def test_clip_stride_frames_at_the_keyframe_rate(tree):
  """clip_stride_frames counts frames at the clip rate: 0.5 s keyframes with keyframes_only, whatever ``fps``."""
  def clips(**kw):
    return NuScenesReader(tree.root, tree.version, num_frames=2, keyframes_only=True, load_lidar=False, **kw,
                          **SIZES).list_clips()
  assert clips(clip_stride_frames=1) == clips(clip_stride_s=0.5) == ["scene-0061/0000", "scene-0061/0001"]
  assert clips(clip_stride_frames=2, fps=10.0) == clips(clip_stride_s=1.0) == ["scene-0061/0000"]
  with pytest.raises(ValueError, match="give clip_stride_s .* or clip_stride_frames .*, not both"):
    clips(clip_stride_s=1.0, clip_stride_frames=2)
  with pytest.raises(ValueError, match="clip_stride_frames must be an int >= 1"):
    clips(clip_stride_frames=0)


METADATA_CAPTION = "night. rainy. Night, rain, turn at intersection. singapore-onenorth."


def test_captions(tree, tmp_path, caplog):
  r = NuScenesReader(tree.root, tree.version, num_frames=8, **SIZES)
  s = r.read_clip(r.list_clips()[0])
  assert set(s["captions"].ravel()) == {METADATA_CAPTION}
  # Caption file keyed by token and by filename, captions at keyframes only: other frames take the nearest one.
  key1 = os.path.relpath(tree.image_paths[("CAM_BACK", 6)], tree.root)
  path = tmp_path / "captions.json"
  path.write_text(json.dumps({"sd_CAM_FRONT_0": "front start", "sd_CAM_FRONT_6": {"time": "night", "weather": "rainy",
                                                                                   "objects": "a car"},
                              key1: "back middle", "unknown_token": "ignored"}))
  with caplog.at_level(logging.WARNING):
    r = NuScenesReader(tree.root, tree.version, num_frames=8, caption_file=str(path), **SIZES)
  s = r.read_clip(r.list_clips()[0])
  # Frame times 0, .083, .167, .333, .417, .5, .583, .667: nearest of {0, .5}. Dicts are joined as OpenDWM does.
  assert s["captions"][:, 0].tolist() == ["front start"] * 3 + ["night. rainy. a car"] * 5
  assert s["captions"][:, 3].tolist() == ["back middle"] * 8
  # Cameras without any caption take the metadata caption, never "".
  assert s["captions"][:, 1].tolist() == [METADATA_CAPTION] * 8
  (warning,) = [m for m in caplog.records if "caption file" in m.getMessage()]
  assert "1 of 4 key(s)" in warning.getMessage() and "'unknown_token'" in warning.getMessage()
  assert "4 of 6 scene camera(s) have no caption" in warning.getMessage()


def _opendwm_key(channel: str, j: int) -> str:
  """OpenDWM's key of image j of a camera: "<scene_token>|<channel>|<sample_data timestamp us>"."""
  return f"{fx.SCENE_TOKEN}|{channel}|{fx.camera_time(CAMERAS.index(channel), j)}"


def _field_entry(time, weather, v, j):
  return {"time": time, "weather": weather, "environment": f"env {v}.{j}", "objects": f"obj {v}",
          "image_description": f"view {v} image {j}", "extra": "not in the prompt"}


def test_opendwm_captions_nearest_and_aligned(tree, tmp_path, caplog):
  """OpenDWM's published DriveMLM format: keys by scene token|channel|timestamp, dict values; each image takes the
  nearest captioned time of its scene and camera, and time and weather agree across the 6 views of a frame."""
  # Keyframe j = 0: the first view is outvoted (daytime / sunny vs 4 x night / rainy).
  times0 = ["daytime", "night", "night", "night", "night", "daytime"]
  weather0 = ["sunny", "rainy", "rainy", "rainy", "rainy", "sunny"]
  # Keyframe j = 6: CAM_BACK is a plain str (passes unchanged, takes no part in the vote); 4 x cloudy vs 1 x rainy.
  weather6 = ["cloudy", "cloudy", "cloudy", None, "rainy", "cloudy"]
  entries = {}
  for v, ch in enumerate(CAMERAS):
    entries[_opendwm_key(ch, 0)] = _field_entry(times0[v], weather0[v], v, 0)
    entries[_opendwm_key(ch, 6)] = "back str" if ch == "CAM_BACK" else _field_entry("dusk", weather6[v], v, 6)
    entries[_opendwm_key(ch, 12)] = _field_entry("noon", "snowy", v, 12)
  path = tmp_path / "opendwm.json"
  path.write_text(json.dumps(entries))
  with caplog.at_level(logging.WARNING):
    r = NuScenesReader(tree.root, tree.version, num_frames=8, caption_file=str(path), **SIZES)
  assert not [m for m in caplog.records if "caption file" in m.getMessage()]  # every key and camera matched
  s = r.read_clip(r.list_clips()[0])
  # Frames are images j = 0, 1, 2, 4, 5, 6, 7, 8: the first 3 nearest keyframe 0, the rest keyframe 6.
  for v, ch in enumerate(CAMERAS):
    want0 = f"night. rainy. env {v}.0. obj {v}. view {v} image 0"
    want6 = "back str" if ch == "CAM_BACK" else f"dusk. cloudy. env {v}.6. obj {v}. view {v} image 6"
    assert s["captions"][:, v].tolist() == [want0] * 3 + [want6] * 5, ch
  # The alignment works on copies: the file's entries stay as written (a second read gives the same captions).
  np.testing.assert_array_equal(r.read_clip(r.list_clips()[0])["captions"], s["captions"])
  # Later clips reach past 0.75 s: the 1 s keyframe's captions (all agree: nothing to align).
  last = r.read_clip(r.list_clips()[-1])
  assert last["captions"][-1, 2] == "noon. snowy. env 2.12. obj 2. view 2 image 12"


def test_caption_file_matching_nothing_raises(tree, tmp_path):
  path = tmp_path / "other.json"
  # Another scene's OpenDWM keys, a bad timestamp, an unknown token and a non-camera image: nothing to caption.
  path.write_text(json.dumps({"cc8c0bf57f984915a77078b10eb33198|CAM_FRONT|1531883530412470": {"time": "day"},
                              f"{fx.SCENE_TOKEN}|CAM_FRONT|not-a-time": "x", "unknown_token": "y",
                              "sd_LIDAR_TOP_0": "z"}))
  with pytest.raises(ReaderError) as e:
    NuScenesReader(tree.root, tree.version, num_frames=8, caption_file=str(path), **SIZES)
  msg = str(e.value)
  assert e.value.path == str(path)
  assert "cc8c0bf57f984915a77078b10eb33198|CAM_FRONT|1531883530412470" in msg
  assert "<scene_token>|<channel>|<timestamp_us>" in msg and "sample_data token" in msg and "filename" in msg
  path.write_text("{}")
  with pytest.raises(ReaderError, match="empty"):
    NuScenesReader(tree.root, tree.version, num_frames=8, caption_file=str(path), **SIZES)
  path.write_text(json.dumps({_opendwm_key("CAM_FRONT", 0): ["not", "a", "caption"]}))
  with pytest.raises(ReaderError, match="must be a str or a dict"):
    NuScenesReader(tree.root, tree.version, num_frames=8, caption_file=str(path), **SIZES)


def test_caption_file_partly_matching_warns_and_falls_back(tree, tmp_path, caplog):
  path = tmp_path / "partial.json"
  entries = {_opendwm_key("CAM_FRONT", j): {"time": "day", "weather": "clear", "objects": f"front {j}"}
             for j in (0, 6, 12)}
  entries.update({"other_scene|CAM_FRONT|1": "a", f"{fx.SCENE_TOKEN}|CAM_FRONT|": "b",
                  f"{fx.SCENE_TOKEN}|LIDAR_TOP|{fx.T0}": "c", "sd_LIDAR_TOP_0": "d"})
  # An empty entry counts as no caption: the metadata one, never "".
  entries[_opendwm_key("CAM_BACK", 0)] = {"extra": "no prompt field"}
  path.write_text(json.dumps(entries))
  with caplog.at_level(logging.WARNING):
    r = NuScenesReader(tree.root, tree.version, num_frames=8, caption_file=str(path), **SIZES)
  (warning,) = [m for m in caplog.records if "caption file" in m.getMessage()]
  assert warning.levelno == logging.WARNING
  assert "4 of 8 key(s) match no camera image" in warning.getMessage()
  assert "4 of 6 scene camera(s) have no caption" in warning.getMessage()
  s = r.read_clip(r.list_clips()[0])
  assert s["captions"][:, 0].tolist() == ["day. clear. front 0"] * 3 + ["day. clear. front 6"] * 5
  assert (s["captions"][:, 1:] == METADATA_CAPTION).all()


def test_resize_rescales_intrinsics(tree):
  r = NuScenesReader(tree.root, tree.version, num_frames=4, image_size=(18, 32), **SIZES)
  s = r.read_clip(r.list_clips()[0])
  assert s["images"].shape[2:4] == (18, 32)
  np.testing.assert_allclose(s["intrinsics"][0, 0], geometry.resize_intrinsics(np.asarray(fx.K), (36, 64), (18, 32)),
                             atol=1e-5)
  np.testing.assert_array_equal(s["original_size"][0], [64, 36])


def _corrupted_reader(tmp_path, damage):
  tree = fx.write_nuscenes_tree(str(tmp_path / "nusc"))
  target = damage(tree)
  return NuScenesReader(tree.root, tree.version, num_frames=8, **SIZES), target


def test_corrupt_jpeg_raises_reader_error(tmp_path):
  def damage(tree):
    p = tree.image_paths[("CAM_BACK_LEFT", 1)]
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])  # truncated JPEG
    return p
  r, target = _corrupted_reader(tmp_path, damage)
  with pytest.raises(ReaderError) as e:
    r.read_clip(r.list_clips()[0])
  assert e.value.path == target and target in str(e.value)


def test_missing_camera_file_raises_reader_error(tmp_path):
  def damage(tree):
    p = tree.image_paths[("CAM_FRONT_RIGHT", 2)]
    os.remove(p)
    return p
  r, target = _corrupted_reader(tmp_path, damage)
  with pytest.raises(ReaderError) as e:
    r.read_clip(r.list_clips()[0])
  assert e.value.path == target and str(e.value).startswith("missing sensor file")


def test_truncated_lidar_raises_reader_error(tmp_path):
  def damage(tree):
    p = tree.lidar_paths[0]
    data = open(p, "rb").read()
    open(p, "wb").write(data[:-7])
    return p
  r, target = _corrupted_reader(tmp_path, damage)
  with pytest.raises(ReaderError) as e:
    r.read_clip(r.list_clips()[0])
  assert e.value.path == target and "truncated" in str(e.value)
  with pytest.raises(ReaderError):
    read_pcd_bin(str(tmp_path / "absent.pcd.bin"))


@pytest.fixture(scope="module")
def asap_root(tree, tmp_path_factory):
  """A copy of the tree with an ASAP interp_12Hz folder written as ASAP writes it (fixture write_asap_12hz)."""
  root = str(tmp_path_factory.mktemp("nusc12") / "nusc")
  shutil.copytree(tree.root, root)
  fx.write_asap_12hz(root, tree.version)
  return root


def test_interp_12hz_version_folder(tree, asap_root):
  """An ASAP interp_12Hz folder (12 Hz pseudo keyframes carrying interpolated annotations) gives the same
  boxes, poses and times as interpolating the 2 Hz annotations at read time."""
  # No LiDAR: then no table folder but the ASAP one is read (LiDAR: test_interp_12hz_lidar_from_v1_tables).
  kw = dict(num_frames=13, fps=12.0, load_lidar=False, **SIZES)
  base = NuScenesReader(asap_root, tree.version, **kw)
  r12 = NuScenesReader(asap_root, fx.ASAP_VERSION, **kw)
  assert r12.lidar_version is None
  a = base.read_clip(base.list_clips()[0])
  b = r12.read_clip(r12.list_clips()[0])
  np.testing.assert_array_equal(a["box_mask"], b["box_mask"])
  np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-4)
  np.testing.assert_allclose(a["cam_to_ego"], b["cam_to_ego"], atol=1e-6)
  np.testing.assert_array_equal(a["timestamps"], b["timestamps"])


def test_interp_12hz_own_lidar_paired_by_ego_pose_time(asap_root):
  """ASAP's own LiDAR rows (opted into with lidar_version=the ASAP folder): row k claims +83 k ms but holds the
  sweep at +50 k ms (its ego pose's time): each frame must get the sweep nearest in that real time, within half a
  frame interval, and report real times."""
  table = os.path.join(asap_root, fx.ASAP_VERSION)
  with open(os.path.join(table, "ego_pose.json")) as f:
    ego_time = {e["token"]: e["timestamp"] for e in json.load(f)}
  with open(os.path.join(table, "sample_data.json")) as f:
    sd = {r["token"]: r for r in json.load(f)}
  real = {tok: ego_time[r["ego_pose_token"]] for tok, r in sd.items()}
  lidar_times = sorted(real[tok] for tok in sd if tok.startswith("sd_LIDAR_TOP"))
  # The sweeps left are at 0-250 ms, 500-750 ms and 1 s: the images at 333 and 417 ms have none within 50 ms.
  assert [(t - fx.T0) // 1000 for t in lidar_times] == [0, 50, 100, 150, 200, 250, 500, 550, 600, 650, 700, 750, 1000]
  r = NuScenesReader(asap_root, fx.ASAP_VERSION, num_frames=3, fps=10.0, lidar_version=fx.ASAP_VERSION, **SIZES)
  for clip in r.list_clips():
    s = r.read_clip(clip)
    frames = r.clip_frames(clip)
    front = np.asarray([real[f["CAM_FRONT"]] for f in frames])
    for t, f in enumerate(frames):
      lidar = sd[f["LIDAR_TOP"]]
      assert f"__LIDAR_TOP__{real[lidar['token']]}." in lidar["filename"]  # the ego pose time is the file's
      nearest = min(lidar_times, key=lambda x: abs(x - front[t]))
      assert real[lidar["token"]] == nearest, (clip, t, front[t] - fx.T0, real[lidar["token"]] - fx.T0)
      assert abs(nearest - front[t]) <= 50000
    np.testing.assert_allclose(s["timestamps"], (front - front[0]) * 1e-6, atol=1e-9)
  # Frames 0.1 s apart from 0 and from 0.5 s are within 50 ms of a sweep; every other start hits the gap.
  assert r.list_clips() == ["scene-0061/0000", "scene-0061/0005"]


def _real_times(root, version):
  """{sample_data token: its ego pose's timestamp} of a table folder, and its sample_data rows by token."""
  with open(os.path.join(root, version, "ego_pose.json")) as f:
    ego_time = {e["token"]: e["timestamp"] for e in json.load(f)}
  with open(os.path.join(root, version, "sample_data.json")) as f:
    sd = {r["token"]: r for r in json.load(f)}
  return {tok: ego_time[r["ego_pose_token"]] for tok, r in sd.items()}, sd


def _check_lidar_from_v1_tables(root, v1_version):
  """With load_lidar, the ASAP folder yields the clips the v1.0 folder yields, each frame's sweep is the v1.0 sweep
  nearest in real time to the CAM_FRONT image (within half a frame interval), and the points are the v1.0
  reader's."""
  kw = dict(num_frames=3, fps=10.0, **SIZES)
  base = NuScenesReader(root, v1_version, **kw)
  r12 = NuScenesReader(root, fx.ASAP_VERSION, **kw)
  # ASAP's own rows leave only 2 of these clips (test_interp_12hz_own_lidar_paired_by_ego_pose_time).
  assert len(base.list_clips()) == 9
  assert r12.list_clips() == base.list_clips()
  assert r12.lidar_version == v1_version
  real12, sd12 = _real_times(root, fx.ASAP_VERSION)
  real1, sd1 = _real_times(root, v1_version)
  sweeps = sorted(real1[tok] for tok, r in sd1.items() if "LIDAR_TOP" in r["filename"])
  assert len(sweeps) == 21  # every 20 Hz sweep is a candidate, not only ASAP's ~0-250 ms ones
  for clip in r12.list_clips():
    frames, frames1 = r12.clip_frames(clip), base.clip_frames(clip)
    for f, f1 in zip(frames, frames1):
      front = real12[f["CAM_FRONT"]]
      assert sd12[f["CAM_FRONT"]]["filename"] == sd1[f1["CAM_FRONT"]]["filename"]  # the frames coincide
      lidar = sd1[f["LIDAR_TOP"]]  # a v1.0 row
      assert real1[lidar["token"]] == min(sweeps, key=lambda x: abs(x - front))
      assert abs(real1[lidar["token"]] - front) <= 50000
      assert f["LIDAR_TOP"] == f1["LIDAR_TOP"]
    a, b = base.read_clip(clip), r12.read_clip(clip)
    np.testing.assert_array_equal(b["lidar_mask"], a["lidar_mask"])
    np.testing.assert_allclose(b["lidar_points"], a["lidar_points"], atol=1e-6)
    np.testing.assert_allclose(b["ego_to_world"], a["ego_to_world"], atol=1e-6)


def test_interp_12hz_lidar_from_v1_tables(tree, asap_root):
  """ASAP folder made from v1.0-mini (ASAP still names it *_trainval): no v1.0-trainval beside it, so the LiDAR comes
  from v1.0-mini, the v1.0 folder that shares its scenes."""
  assert not os.path.exists(os.path.join(asap_root, "v1.0-trainval"))
  _check_lidar_from_v1_tables(asap_root, tree.version)


def test_interp_12hz_lidar_prefers_split_and_matches_scene_by_name(tree, asap_root, tmp_path):
  """v1.0-<split> is preferred (over v1.0-mini, which would also match), and its scenes are matched by name when
  their tokens differ."""
  root = str(tmp_path / "nusc")
  shutil.copytree(asap_root, root)
  v1 = os.path.join(root, "v1.0-trainval")
  shutil.copytree(os.path.join(root, tree.version), v1)
  for name in ("scene", "sample"):
    path = os.path.join(v1, f"{name}.json")
    with open(path) as f:
      rows = json.load(f)
    for r in rows:
      r["token" if name == "scene" else "scene_token"] = "other_scene_token"
    with open(path, "w") as f:
      json.dump(rows, f)
  _check_lidar_from_v1_tables(root, "v1.0-trainval")


def test_interp_12hz_lidar_without_v1_tables(asap_root, tmp_path):
  """Only the ASAP folder: load_lidar raises (rather than silently dropping most clips) and says how to opt in to
  ASAP's own LiDAR rows; without LiDAR, or with that opt-in, the folder reads as before."""
  root = str(tmp_path / "nusc")
  os.makedirs(root)
  shutil.copytree(os.path.join(asap_root, fx.ASAP_VERSION), os.path.join(root, fx.ASAP_VERSION))
  kw = dict(num_frames=3, fps=10.0, **SIZES)
  with pytest.raises(ReaderError) as e:
    NuScenesReader(root, fx.ASAP_VERSION, **kw)
  assert e.value.path == root and f"lidar_version='{fx.ASAP_VERSION}'" in str(e.value)
  assert len(NuScenesReader(root, fx.ASAP_VERSION, load_lidar=False, **kw).list_clips()) == 9
  own = NuScenesReader(root, fx.ASAP_VERSION, lidar_version=fx.ASAP_VERSION, **kw)
  assert own.list_clips() == ["scene-0061/0000", "scene-0061/0005"]
  with pytest.raises(ReaderError) as e:
    NuScenesReader(root, fx.ASAP_VERSION, lidar_version="v1.0-mini", **kw)
  assert e.value.path == os.path.join(root, "v1.0-mini")


def test_lidar_version_with_no_shared_scene_raises(tree, asap_root, tmp_path):
  """An explicit lidar_version whose scenes match none of the folder's (by token or name) is an error, not a reader
  without clips."""
  root = str(tmp_path / "nusc")
  shutil.copytree(asap_root, root)
  path = os.path.join(root, tree.version, "scene.json")
  with open(path) as f:
    rows = json.load(f)
  for r in rows:
    r["token"], r["name"] = "other_scene_token", "scene-9999"
  with open(path, "w") as f:
    json.dump(rows, f)
  with pytest.raises(ReaderError) as e:
    NuScenesReader(root, fx.ASAP_VERSION, lidar_version=tree.version, num_frames=3, **SIZES)
  assert e.value.path == os.path.join(root, tree.version)
