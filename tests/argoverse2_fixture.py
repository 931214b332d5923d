"""Writes a tiny Argoverse 2 sensor log in the real on-disk format (datasets.md §3), read with pyarrow only.

One log (PIT), 1.0 s: 7 ring cameras at 20 Hz (each with its own small time offset), lidar sweeps at 10 Hz (float16
x, y, z in the ego frame), ego poses at every sensor timestamp, 3 annotated tracks (a car, a pedestrian, a bollard),
a map archive with two lanes sharing a boundary, a drivable area, a crossing and a far-away lane.
``write_av2_log(root)`` returns an ``AV2Truth`` with what the tests compare against.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
from PIL import Image

from cvd_storm_jax.data_pipelines import geometry

LOG_ID = "0c6e62d7-bdfa-3061-8d3d-03b13aa21f68"
RING = ("ring_front_center", "ring_front_left", "ring_front_right", "ring_rear_left", "ring_rear_right",
        "ring_side_left", "ring_side_right")
RING_YAW_DEG = {"ring_front_center": 0.0, "ring_front_left": 45.0, "ring_front_right": -45.0,
                "ring_side_left": 100.0, "ring_side_right": -100.0, "ring_rear_left": 150.0,
                "ring_rear_right": -150.0}
HW = (36, 48)  # landscape ring cameras; ring_front_center is portrait (48 x 36)
T0 = 315966265659927216
CAMERA_OFFSET_NS = {c: 2_000_000 * i for i, c in enumerate(RING)}
# Tracks: uuid, category, world (x, y, z) at t=0, world velocity (vx, vy), yaw (world), size l, w, h
TRACKS = (
    ("7a9d9f9c-car", "REGULAR_VEHICLE", (4512.0, 2308.0, 30.8), (3.0, 1.0), 0.5, (4.6, 1.9, 1.6)),
    ("b1c2-ped", "PEDESTRIAN", (4506.0, 2296.0, 30.9), (0.0, 1.0), 1.57, (0.6, 0.6, 1.8)),
    ("c3d4-bollard", "BOLLARD", (4503.0, 2298.0, 30.5), (0.0, 0.0), 0.0, (0.3, 0.3, 1.0)),
)


@dataclasses.dataclass
class AV2Truth:
  root: str
  log_dir: str
  planted_world_point: np.ndarray
  camera_times: dict
  lidar_times: list


def yaw_quat(yaw):
  return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def ego_pose_at(ts_ns: int):
  """Ego city position and yaw: 8 m/s along a slowly turning heading."""
  s = (ts_ns - T0) * 1e-9
  yaw = -0.4 + 0.2 * s
  x = 4500.0 + 40.0 * (np.sin(yaw) - np.sin(-0.4))
  y = 2300.0 - 40.0 * (np.cos(yaw) - np.cos(-0.4))
  return np.array([x, y, 30.0]), yaw


def opendwm_caption_key(log_id: str, cam: str, ts_ns: int, split: str = "train") -> str:
  """A caption key as OpenDWM's DriveMLM file for AV2 spells it: "sensor/<split>/<log_id>|cameras/<cam>|<ts_ns>"."""
  return f"sensor/{split}/{log_id}|cameras/{cam}|{ts_ns}"


def ego_matrix(ts_ns: int) -> np.ndarray:
  pos, yaw = ego_pose_at(ts_ns)
  return geometry.make_rigid(geometry.yaw_matrix(yaw), pos)


def cam_to_ego(cam: str) -> np.ndarray:
  yaw = np.deg2rad(RING_YAW_DEG[cam])
  return geometry.make_rigid(geometry.camera_rotation(yaw, pitch=0.05), (1.2 * np.cos(yaw), 0.8 * np.sin(yaw), 1.7))


def camera_hw(cam: str):
  return (HW[1], HW[0]) if cam == "ring_front_center" else HW


def camera_k(cam: str) -> np.ndarray:
  h, w = camera_hw(cam)
  return np.array([[30.0, 0.0, w / 2], [0.0, 30.0, h / 2], [0.0, 0.0, 1.0]])


def track_world(track, ts_ns):
  """World centre and yaw of a track at a time."""
  _, _, p0, vel, yaw, _ = track
  s = (ts_ns - T0) * 1e-9
  return np.array([p0[0] + vel[0] * s, p0[1] + vel[1] * s, p0[2]]), yaw


def _write_feather(path, columns: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  feather.write_feather(pa.table(columns), path)


def _mat_quat(R):
  from pyquaternion import Quaternion
  return [float(x) for x in Quaternion(matrix=np.asarray(R), atol=1e-7, rtol=1e-7).elements]


def write_av2_log(root: str) -> AV2Truth:
  d = os.path.join(root, LOG_ID)
  rng = np.random.default_rng(0)
  camera_times = {c: [T0 + 50_000_000 * j + CAMERA_OFFSET_NS[c] for j in range(21)] for c in RING}
  lidar_times = [T0 + 100_000_000 * i for i in range(11)]
  for ci, cam in enumerate(RING):
    for j, ts in enumerate(camera_times[cam]):
      img = np.zeros(camera_hw(cam) + (3,), np.uint8)
      img[...] = (30 * ci, 10 * j, 90)
      path = os.path.join(d, "sensors", "cameras", cam, f"{ts}.jpg")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(img).save(path, quality=90)
  # Ego poses at every sensor timestamp, sorted.
  pose_ts = sorted(set(lidar_times) | {t for ts in camera_times.values() for t in ts})
  cols = {k: [] for k in ("timestamp_ns", "qw", "qx", "qy", "qz", "tx_m", "ty_m", "tz_m")}
  for ts in pose_ts:
    pos, yaw = ego_pose_at(ts)
    for k, val in zip(cols, [ts, *yaw_quat(yaw), *pos]):
      cols[k].append(val)
  cols["timestamp_ns"] = pa.array(cols["timestamp_ns"], pa.int64())
  _write_feather(os.path.join(d, "city_SE3_egovehicle.feather"), cols)
  # Calibration: sensors in alphabetical order as in the real files.
  sensors = sorted(RING + ("down_lidar", "up_lidar"))
  cal = {k: [] for k in ("sensor_name", "qw", "qx", "qy", "qz", "tx_m", "ty_m", "tz_m")}
  intr = {k: [] for k in ("sensor_name", "fx_px", "fy_px", "cx_px", "cy_px", "k1", "k2", "k3", "height_px",
                          "width_px")}
  for name in sensors:
    T = cam_to_ego(name) if name in RING else geometry.make_rigid(np.eye(3), (1.35, 0.0, 1.64))
    for k, val in zip(cal, [name, *_mat_quat(T[:3, :3]), *T[:3, 3]]):
      cal[k].append(val)
  for name in sorted(RING):
    K = camera_k(name)
    h, w = camera_hw(name)
    for k, val in zip(intr, [name, K[0, 0], K[1, 1], K[0, 2], K[1, 2], -0.2, 0.1, -0.01, h, w]):
      intr[k].append(val)
  intr["height_px"] = pa.array(intr["height_px"], pa.uint16())
  intr["width_px"] = pa.array(intr["width_px"], pa.uint16())
  _write_feather(os.path.join(d, "calibration", "egovehicle_SE3_sensor.feather"), cal)
  _write_feather(os.path.join(d, "calibration", "intrinsics.feather"), intr)
  # Annotations in the ego frame at each lidar timestamp.
  ann = {k: [] for k in ("timestamp_ns", "track_uuid", "category", "length_m", "width_m", "height_m", "qw", "qx",
                         "qy", "qz", "tx_m", "ty_m", "tz_m", "num_interior_pts")}
  for ts in lidar_times:
    w2e = geometry.invert_rigid(ego_matrix(ts))
    ego_yaw = ego_pose_at(ts)[1]
    for tr in TRACKS:
      c, yaw = track_world(tr, ts)
      ce = geometry.transform_points(w2e, c[None])[0]
      l, w, h = tr[5]
      for k, val in zip(ann, [ts, tr[0], tr[1], l, w, h, *yaw_quat(yaw - ego_yaw), *ce, 12]):
        ann[k].append(val)
  ann["timestamp_ns"] = pa.array(ann["timestamp_ns"], pa.int64())
  _write_feather(os.path.join(d, "annotations.feather"), ann)
  # LiDAR: a planted static city point 10 m ahead-left of the start (seen by ring_front_left), plus clutter behind.
  planted = np.array([4500.0 + 10.0 * np.cos(-0.4 + 0.6), 2300.0 + 10.0 * np.sin(-0.4 + 0.6), 31.0])
  for ts in lidar_times:
    p = geometry.transform_points(geometry.invert_rigid(ego_matrix(ts)), planted[None])
    other = rng.uniform([-30, -10, -1.5], [-10, 10, -1.0], size=(15, 3))
    pts = np.concatenate([p, other]).astype(np.float16)
    _write_feather(os.path.join(d, "sensors", "lidar", f"{ts}.feather"), {
        "x": pa.array(pts[:, 0], pa.float16()), "y": pa.array(pts[:, 1], pa.float16()),
        "z": pa.array(pts[:, 2], pa.float16()),
        "intensity": pa.array(np.full(len(pts), 7, np.uint8)),
        "laser_number": pa.array(np.arange(len(pts), dtype=np.uint8)),
        "offset_ns": pa.array(np.zeros(len(pts), np.int32))})
  write_map(d)
  return AV2Truth(root=root, log_dir=d, planted_world_point=planted, camera_times=camera_times,
                  lidar_times=lidar_times)


def _xyz(points):
  return [{"x": float(x), "y": float(y), "z": float(z)} for x, y, z in points]


MAP = {
    "shared": [(4495.0, 2302.0, 30.0), (4510.0, 2302.0, 30.0), (4525.0, 2304.0, 30.0)],
    "left": [(4495.0, 2305.5, 30.0), (4510.0, 2305.5, 30.0), (4525.0, 2307.5, 30.0)],
    "right": [(4495.0, 2298.5, 30.0), (4510.0, 2298.5, 30.0), (4525.0, 2300.5, 30.0)],
    "area": [(4490.0, 2290.0, 30.0), (4540.0, 2290.0, 30.0), (4540.0, 2320.0, 30.0), (4490.0, 2320.0, 30.0)],
    "edge1": [(4515.0, 2296.0, 30.0), (4515.0, 2310.0, 30.0)],
    "edge2": [(4518.0, 2296.0, 30.0), (4518.0, 2310.0, 30.0)],
    "far": [(9000.0, 9000.0, 30.0), (9010.0, 9000.0, 30.0)],
}


def write_map(log_dir: str) -> None:
  def lane(i, left, right):
    return {"id": i, "is_intersection": False, "lane_type": "VEHICLE", "left_lane_boundary": _xyz(left),
            "right_lane_boundary": _xyz(right), "left_lane_mark_type": "DASHED_WHITE",
            "right_lane_mark_type": "SOLID_WHITE", "successors": [], "predecessors": [], "left_neighbor_id": None,
            "right_neighbor_id": None}
  m = {
      "lane_segments": {"1": lane(1, MAP["left"], MAP["shared"]), "2": lane(2, MAP["shared"], MAP["right"]),
                        "3": lane(3, MAP["far"], MAP["far"][::-1])},
      "drivable_areas": {"10": {"id": 10, "area_boundary": _xyz(MAP["area"])}},
      "pedestrian_crossings": {"20": {"id": 20, "edge1": _xyz(MAP["edge1"]), "edge2": _xyz(MAP["edge2"])}},
  }
  os.makedirs(os.path.join(log_dir, "map"), exist_ok=True)
  with open(os.path.join(log_dir, "map", f"log_map_archive_{LOG_ID}____PIT_city_31785.json"), "w") as f:
    json.dump(m, f)
