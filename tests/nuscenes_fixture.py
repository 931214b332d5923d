"""Writes a tiny nuScenes tree in the real on-disk format (datasets.md §1.2-1.3), loadable by nuscenes-devkit.

One scene ("scene-0061", singapore-onenorth), 3 keyframes 0.5 s apart, 6 cameras at 12 Hz (13 images each, every 6th a
keyframe), LIDAR_TOP at 20 Hz, 4 instances, a map-expansion JSON. The ego drives along its heading at 5 m/s while
turning slowly; each sample_data has its own ego_pose. All numbers are floats (the devkit's Box needs float arrays).

``write_nuscenes_tree(root)`` returns a ``NuScenesTruth`` with the values the tests compare against: poses as
functions of time, instance trajectories, the planted LiDAR point. ``write_asap_12hz(root)`` adds the 12 Hz table
folder that ASAP's generator would make from it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
from PIL import Image

from cvd_storm_jax.data_pipelines import geometry

CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT")
CAM_YAW_DEG = (0.0, -55.0, -110.0, 180.0, 110.0, 55.0)
IMAGE_HW = (36, 64)
K = [[40.0, 0.0, 32.0], [0.0, 40.0, 18.0], [0.0, 0.0, 1.0]]
T0 = 1533151603512404
KEYFRAME_US = 500000
LOG_NAME = "n008-2018-08-01-15-16-36-0400"
LOCATION = "singapore-onenorth"
SCENE_TOKEN = "scene_0"  # the one scene's token (OpenDWM caption keys start with it)
# Instances: (token, category, {keyframe index: (x, y, yaw) world}, size w, l, h)
INSTANCES = (
    ("inst_car", "vehicle.car", {0: (612.0, 1604.0, 0.40), 1: (616.0, 1606.0, 0.50), 2: (620.0, 1608.5, 0.62)},
     (1.9, 4.5, 1.6)),
    ("inst_ped", "human.pedestrian.adult", {0: (608.0, 1598.0, -1.0), 1: (608.5, 1598.4, -0.9)}, (0.6, 0.7, 1.8)),
    ("inst_truck", "vehicle.truck", {1: (625.0, 1595.0, 3.0), 2: (624.0, 1595.3, 3.1)}, (2.5, 8.0, 3.2)),
    ("inst_cone", "movable_object.trafficcone", {0: (606.0, 1603.0, 0.0), 1: (606.0, 1603.0, 0.0),
                                                  2: (606.0, 1603.0, 0.0)}, (0.4, 0.4, 0.9)),
)
LIDAR_CALIB = ((0.94, 0.0, 1.84), 1.5707963)  # translation, yaw (the real LIDAR_TOP is turned ~90 deg)
ASAP_VERSION = "interp_12Hz_trainval"
ASAP_FACTOR = 6  # 12 Hz pseudo keyframes per 2 Hz keyframe interval


def yaw_quat(yaw: float) -> list[float]:
  return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def mat_quat(R: np.ndarray) -> list[float]:
  """(w, x, y, z) of a rotation matrix (Shepperd's method, trace > -1 branch plus fall-backs)."""
  from pyquaternion import Quaternion  # installed with the devkit's dependencies
  q = Quaternion(matrix=np.asarray(R, np.float64), atol=1e-7, rtol=1e-7)
  return [float(x) for x in q.elements]


def ego_pose_at(ts_us: int) -> tuple[np.ndarray, float]:
  """Ego (x, y, z) world and yaw at a timestamp: 5 m/s along the heading, yaw 0.3 rad + 0.1 rad/s."""
  s = (ts_us - T0) * 1e-6
  yaw = 0.3 + 0.1 * s
  # Integral of 5 * (cos, sin)(0.3 + 0.1 s) ds.
  x = 600.0 + 50.0 * (np.sin(yaw) - np.sin(0.3))
  y = 1600.0 - 50.0 * (np.cos(yaw) - np.cos(0.3))
  return np.array([x, y, 0.0]), yaw


def ego_matrix(ts_us: int) -> np.ndarray:
  pos, yaw = ego_pose_at(ts_us)
  return geometry.make_rigid(geometry.yaw_matrix(yaw), pos)


def cam_to_ego(v: int) -> np.ndarray:
  yaw = np.deg2rad(CAM_YAW_DEG[v])
  t = (1.5 * np.cos(yaw), 0.5 * np.sin(yaw), 1.6)
  return geometry.make_rigid(geometry.camera_rotation(yaw), t)


def lidar_to_ego() -> np.ndarray:
  t, yaw = LIDAR_CALIB
  return geometry.make_rigid(geometry.yaw_matrix(yaw), t)


def camera_time(v: int, j: int) -> int:
  """Image j (0..12) of camera v; keyframe images (j % 6 == 0) sit 3 ms x v after their sample."""
  return T0 + int(round(j * KEYFRAME_US / 6)) + 3000 * v


@dataclasses.dataclass
class NuScenesTruth:
  root: str
  version: str
  planted_world_point: np.ndarray  # [3], written into every lidar sweep
  camera_times: dict  # channel -> [13] timestamps
  sample_tokens: list
  image_paths: dict  # (channel, j) -> absolute path
  lidar_paths: list


def _write_json(folder: str, name: str, records) -> None:
  with open(os.path.join(folder, f"{name}.json"), "w") as f:
    json.dump(records, f)


def _jpeg(path: str, color) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = np.zeros(IMAGE_HW + (3,), np.uint8)
  img[...] = color
  img[: IMAGE_HW[0] // 2, : IMAGE_HW[1] // 2] = 255 - np.asarray(color, np.uint8)
  Image.fromarray(img).save(path, quality=90)


def write_map(root: str) -> dict:
  """maps/expansion/<LOCATION>.json with a drivable area around the path, a lane divider, a road divider and a
  ped crossing (node coordinates returned for the tests)."""
  nodes, polygons, lines = [], [], []

  def node(x, y):
    tok = f"node_{len(nodes)}"
    nodes.append({"token": tok, "x": float(x), "y": float(y)})
    return tok

  area = [node(590, 1590), node(640, 1590), node(640, 1625), node(590, 1625)]
  hole = [node(615, 1612), node(618, 1612), node(618, 1615)]
  polygons.append({"token": "poly_area", "exterior_node_tokens": area, "holes": [{"node_tokens": hole}]})
  cross = [node(630, 1598), node(633, 1598), node(633, 1610), node(630, 1610)]
  polygons.append({"token": "poly_cross", "exterior_node_tokens": cross, "holes": []})
  lane_line = [node(595, 1601), node(610, 1603), node(630, 1607)]
  road_line = [node(595, 1597), node(635, 1605)]
  far_line = [node(2000, 2000), node(2010, 2000)]  # far from the ego path: must be cropped away
  lines += [{"token": "line_lane", "node_tokens": lane_line}, {"token": "line_road", "node_tokens": road_line},
            {"token": "line_far", "node_tokens": far_line}]
  m = {
      "version": "1.3", "canvas_edge": [3000.0, 3000.0],
      "node": nodes, "polygon": polygons, "line": lines,
      "drivable_area": [{"token": "da_0", "polygon_tokens": ["poly_area"]}],
      "road_segment": [], "road_block": [], "lane": [],
      "ped_crossing": [{"token": "pc_0", "polygon_token": "poly_cross", "road_segment_token": ""}],
      "walkway": [], "stop_line": [], "carpark_area": [],
      "road_divider": [{"token": "rd_0", "line_token": "line_road", "road_segment_token": ""}],
      "lane_divider": [{"token": "ld_0", "line_token": "line_lane", "lane_divider_segments": []},
                       {"token": "ld_far", "line_token": "line_far", "lane_divider_segments": []}],
      "traffic_light": [], "arcline_path_3": {}, "connectivity": {}, "lane_connector": [],
  }
  folder = os.path.join(root, "maps", "expansion")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"{LOCATION}.json"), "w") as f:
    json.dump(m, f)
  xy = {n["token"]: (n["x"], n["y"]) for n in nodes}
  return {"area": [xy[t] for t in area], "hole": [xy[t] for t in hole], "cross": [xy[t] for t in cross],
          "lane": [xy[t] for t in lane_line], "road": [xy[t] for t in road_line]}


def write_nuscenes_tree(root: str, version: str = "v1.0-mini",
                        description: str = "Night, rain, turn at intersection") -> NuScenesTruth:
  table = os.path.join(root, version)
  os.makedirs(table, exist_ok=True)
  rng = np.random.default_rng(0)
  sensors = [{"token": f"sensor_{ch}", "channel": ch, "modality": "camera"} for ch in CAMERAS]
  sensors.append({"token": "sensor_LIDAR_TOP", "channel": "LIDAR_TOP", "modality": "lidar"})
  calibs = []
  for v, ch in enumerate(CAMERAS):
    T = cam_to_ego(v)
    calibs.append({"token": f"calib_{ch}", "sensor_token": f"sensor_{ch}",
                   "translation": [float(x) for x in T[:3, 3]], "rotation": mat_quat(T[:3, :3]),
                   "camera_intrinsic": K})
  L = lidar_to_ego()
  calibs.append({"token": "calib_LIDAR_TOP", "sensor_token": "sensor_LIDAR_TOP",
                 "translation": [float(x) for x in L[:3, 3]], "rotation": mat_quat(L[:3, :3]),
                 "camera_intrinsic": []})
  scene_token, log_token = SCENE_TOKEN, "log_0"
  sample_tokens = [f"sample_{k}" for k in range(3)]
  samples = []
  for k, tok in enumerate(sample_tokens):
    samples.append({"token": tok, "timestamp": T0 + k * KEYFRAME_US, "scene_token": scene_token,
                    "prev": sample_tokens[k - 1] if k > 0 else "", "next": sample_tokens[k + 1] if k < 2 else ""})
  ego_poses, sample_data = [], []
  image_paths, camera_times = {}, {}

  def add_sd(token, channel, ts, key, sample_token, filename, fileformat, w, h):
    pos, yaw = ego_pose_at(ts)
    ego_poses.append({"token": f"ep_{token}", "translation": [float(x) for x in pos], "rotation": yaw_quat(yaw),
                      "timestamp": ts})
    sample_data.append({"token": token, "sample_token": sample_token, "ego_pose_token": f"ep_{token}",
                        "calibrated_sensor_token": f"calib_{channel}", "filename": filename,
                        "fileformat": fileformat, "width": w, "height": h, "timestamp": ts, "is_key_frame": key,
                        "prev": "", "next": ""})

  for v, ch in enumerate(CAMERAS):
    tokens = [f"sd_{ch}_{j}" for j in range(13)]
    camera_times[ch] = [camera_time(v, j) for j in range(13)]
    for j, tok in enumerate(tokens):
      ts = camera_times[ch][j]
      key = j % 6 == 0
      folder = "samples" if key else "sweeps"
      filename = f"{folder}/{ch}/{LOG_NAME}__{ch}__{ts}.jpg"
      # Non-keyframe sample_data points to the NEXT sample (schema doc; the devkit's get_boxes relies on it).
      sample_token = sample_tokens[-(-j // 6)]
      add_sd(tok, ch, ts, key, sample_token, filename, "jpg", IMAGE_HW[1], IMAGE_HW[0])
      path = os.path.join(root, filename)
      _jpeg(path, (40 * v, 18 * j, 100))
      image_paths[(ch, j)] = path
    for j in range(13):
      sample_data[-13 + j]["prev"] = tokens[j - 1] if j > 0 else ""
      sample_data[-13 + j]["next"] = tokens[j + 1] if j < 12 else ""
  # LiDAR at 20 Hz with a planted world point 12 m ahead of the ego start, 1 m up, seen by CAM_FRONT.
  planted = np.array([600.0 + 12.0 * np.cos(0.3), 1600.0 + 12.0 * np.sin(0.3), 1.0])
  lidar_paths = []
  tokens = [f"sd_LIDAR_TOP_{i}" for i in range(21)]
  for i, tok in enumerate(tokens):
    ts = T0 + i * 50000
    key = i % 10 == 0
    folder = "samples" if key else "sweeps"
    filename = f"{folder}/LIDAR_TOP/{LOG_NAME}__LIDAR_TOP__{ts}.pcd.bin"
    add_sd(tok, "LIDAR_TOP", ts, key, sample_tokens[-(-i // 10)], filename, "pcd", 0, 0)
    sensor_to_world = ego_matrix(ts) @ lidar_to_ego()
    p = geometry.transform_points(geometry.invert_rigid(sensor_to_world), planted[None])[0]
    # Other points far behind/below so they never land in front of CAM_FRONT near the planted pixel.
    other_ego = rng.uniform([-30, -30, -1.5], [-10, 30, -1.0], size=(20, 3))
    other = geometry.transform_points(geometry.invert_rigid(lidar_to_ego()), other_ego)
    pts = np.concatenate([p[None], other])
    data = np.concatenate([pts, np.ones((len(pts), 1)), np.zeros((len(pts), 1))], 1).astype(np.float32)
    path = os.path.join(root, filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data.tofile(path)
    lidar_paths.append(path)
  for i in range(21):
    sample_data[-21 + i]["prev"] = tokens[i - 1] if i > 0 else ""
    sample_data[-21 + i]["next"] = tokens[i + 1] if i < 20 else ""

  categories, instances, anns = [], [], []
  for n, (inst, cat, track, size) in enumerate(INSTANCES):
    categories.append({"token": f"cat_{n}", "name": cat, "description": ""})
    ks = sorted(track)
    ann_tokens = [f"ann_{inst}_{k}" for k in ks]
    instances.append({"token": inst, "category_token": f"cat_{n}", "nbr_annotations": len(ks),
                      "first_annotation_token": ann_tokens[0], "last_annotation_token": ann_tokens[-1]})
    for i, k in enumerate(ks):
      x, y, yaw = track[k]
      anns.append({"token": ann_tokens[i], "sample_token": sample_tokens[k], "instance_token": inst,
                   "attribute_tokens": [], "visibility_token": "4", "translation": [x, y, 0.8],
                   "size": [float(s) for s in size], "rotation": yaw_quat(yaw), "num_lidar_pts": 5,
                   "num_radar_pts": 0, "prev": ann_tokens[i - 1] if i > 0 else "",
                   "next": ann_tokens[i + 1] if i + 1 < len(ks) else ""})
  map_png = "maps/map_0.png"
  os.makedirs(os.path.join(root, "maps"), exist_ok=True)
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(os.path.join(root, map_png))
  _write_json(table, "category", categories)
  _write_json(table, "attribute", [{"token": "attr_0", "name": "vehicle.moving", "description": ""}])
  _write_json(table, "visibility", [{"token": "4", "level": "v80-100", "description": ""}])
  _write_json(table, "instance", instances)
  _write_json(table, "sensor", sensors)
  _write_json(table, "calibrated_sensor", calibs)
  _write_json(table, "ego_pose", ego_poses)
  _write_json(table, "log", [{"token": log_token, "logfile": LOG_NAME, "vehicle": "n008",
                              "date_captured": "2018-08-01", "location": LOCATION}])
  _write_json(table, "scene", [{"token": scene_token, "name": "scene-0061", "description": description,
                                "log_token": log_token, "nbr_samples": 3, "first_sample_token": sample_tokens[0],
                                "last_sample_token": sample_tokens[-1]}])
  _write_json(table, "sample", samples)
  _write_json(table, "sample_data", sample_data)
  _write_json(table, "sample_annotation", anns)
  _write_json(table, "map", [{"token": "map_0", "log_tokens": [log_token], "category": "semantic_prior",
                              "filename": map_png}])
  write_map(root)
  return NuScenesTruth(root=root, version=version, planted_world_point=planted, camera_times=camera_times,
                       sample_tokens=sample_tokens, image_paths=image_paths, lidar_paths=lidar_paths)


def write_asap_12hz(root: str, version: str = "v1.0-mini") -> str:
  """Writes ``<root>/interp_12Hz_trainval`` from ``<root>/<version>`` as ASAP's generator does (JeffWang987/ASAP,
  sAP3D/nusc_annotation_generator.py, "interp" strategy) and returns the folder name. What the reader meets:
    * sample: every keyframe, and between two keyframes 5 pseudo samples ``<token><k>`` at t0 + k / 6 (t1 - t0).
    * sample_annotation: at a pseudo sample, the instances of both keyframes, centre lerped, rotation slerped.
    * sample_data: the original sweep rows are DROPPED. Each keyframe row gets pseudo-keyframe rows ``<token><k>``
      with an INVENTED timestamp, t_row + k / 6 (t_next_sample - t_row), while filename, ego_pose_token and
      calibrated_sensor_token are those of the row k steps along the ``next`` chain (stopping before a keyframe).
      For the 20 Hz LiDAR that is the sweep at ~+50 k ms, not the +83 k ms its timestamp claims, and the sweeps
      after +250 ms are gone.
    * every other table, ego_pose.json included, is copied unchanged (so each row's ego pose time stays true).
  """
  from pyquaternion import Quaternion  # as ASAP slerps
  src, dst = os.path.join(root, version), os.path.join(root, ASAP_VERSION)
  os.makedirs(dst, exist_ok=True)
  tables = {}
  for name in ("sample", "sample_data", "sample_annotation"):
    with open(os.path.join(src, f"{name}.json")) as f:
      tables[name] = json.load(f)
  sample_of = {s["token"]: s for s in tables["sample"]}
  sd_of = {r["token"]: r for r in tables["sample_data"]}
  anns_of: dict = {}
  for a in tables["sample_annotation"]:
    anns_of.setdefault(a["sample_token"], []).append(a)
  samples, anns, sample_data = [], [], []
  for s in tables["sample"]:
    samples.append(dict(s))
    anns += [dict(a) for a in anns_of.get(s["token"], [])]
    if not s["next"]:
      continue
    t0, t1 = s["timestamp"], sample_of[s["next"]]["timestamp"]
    nxt = {a["instance_token"]: a for a in anns_of.get(s["next"], [])}
    for k in range(1, ASAP_FACTOR):
      ts = t0 + k / ASAP_FACTOR * (t1 - t0)  # a float, as ASAP writes it
      samples.append({"token": f"{s['token']}{k}", "timestamp": ts, "scene_token": s["scene_token"], "prev": "",
                      "next": ""})
      for a in anns_of.get(s["token"], []):
        b = nxt.get(a["instance_token"])
        if b is None:
          continue  # "interp" drops instances that leave or enter
        q = Quaternion.slerp(Quaternion(a["rotation"]), Quaternion(b["rotation"]), amount=(ts - t0) / (t1 - t0))
        anns.append({**a, "token": f"{a['token']}{k}", "sample_token": f"{s['token']}{k}", "prev": "", "next": "",
                     "translation": [float(np.interp(ts, [t0, t1], [c0, c1]))
                                     for c0, c1 in zip(a["translation"], b["translation"])],
                     "rotation": [float(x) for x in q.elements]})
  for r in tables["sample_data"]:
    if not r["is_key_frame"]:
      continue
    sample_data.append(dict(r))
    nxt_sample = sample_of[r["sample_token"]]["next"]
    if not nxt_sample:
      continue
    for k in range(1, ASAP_FACTOR):
      walked = r
      for _ in range(k):
        if sd_of[walked["next"]]["is_key_frame"]:
          break
        walked = sd_of[walked["next"]]
      sample_data.append({**r, "token": f"{r['token']}{k}", "sample_token": f"{r['sample_token']}{k}",
                          "timestamp": r["timestamp"] + k / ASAP_FACTOR * (sample_of[nxt_sample]["timestamp"]
                                                                           - r["timestamp"]),
                          "ego_pose_token": walked["ego_pose_token"], "filename": walked["filename"],
                          "calibrated_sensor_token": walked["calibrated_sensor_token"], "is_key_frame": True,
                          "prev": "", "next": ""})
  for name, rows in (("sample", samples), ("sample_data", sample_data), ("sample_annotation", anns)):
    _write_json(dst, name, rows)
  for name in os.listdir(src):
    if name not in ("sample.json", "sample_data.json", "sample_annotation.json"):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
  return ASAP_VERSION
