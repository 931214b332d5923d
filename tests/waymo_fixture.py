"""Synthesizes tiny Waymo v1 segments in the real on-disk format (TFRecord of ``Frame`` protos).

Each frame has 5 camera JPEGs (a distinct solid colour per camera), calibrations, a vehicle pose, laser labels,
first-return range images for all 5 lasers (zlib-compressed ``MatrixFloat``; the TOP one with a per-pixel pose), its
own ``map_pose_offset`` and, in frame 0 only, map features. The module's functions give the ground truth the tests
check: ``true_pose`` (vehicle -> map = world) is what the car really does; the stored ``frame.pose`` (``ego_pose``)
drifts from it by ``-map_offset(i)``, as in real segments, where adding each frame's offset re-aligns it with the map.
"""
from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image
from waymo_open_dataset import dataset_pb2, label_pb2

from cvd_storm_jax.data_pipelines import tfrecord

CAMERA_COLORS = {1: (200, 30, 30), 2: (30, 200, 30), 3: (30, 30, 200), 4: (200, 200, 30), 5: (30, 200, 200)}
FRONT_HW = (32, 48)
SIDE_HW = (24, 48)
TOP_HW = (4, 8)  # Range image rows x columns.
TOP_INCLINATIONS = np.array([-0.2, -0.1, 0.0, 0.1])  # Ascending, as stored by Waymo (row 0 gets the last one).
TOP_EXTRINSIC_YAW = 0.3
TOP_EXTRINSIC_T = np.array([1.0, 0.0, 2.0])
# The one TOP return: (row, col, range).
TOP_RETURN = (1, 2, 10.0)
STATS = {"time_of_day": "Day", "location": "location_sf", "weather": "sunny"}
# map_pose_offset of frame i = MAP_OFFSET + i * MAP_OFFSET_DRIFT: it differs per frame, so a reader that applies
# frame 0's offset to every frame is caught.
MAP_OFFSET = np.array([0.5, -0.25, 0.0])
MAP_OFFSET_DRIFT = np.array([0.4, -0.3, 0.1])


def rigid(yaw: float, t) -> np.ndarray:
  c, s = np.cos(yaw), np.sin(yaw)
  m = np.eye(4)
  m[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
  m[:3, 3] = t
  return m


def camera_extrinsic(name: int) -> np.ndarray:
  """Waymo camera->vehicle (camera axes x fwd, y left, z up): cameras looking around the car."""
  yaw = {1: 0.0, 2: 0.8, 3: -0.8, 4: 1.6, 5: -1.6}[name]
  return rigid(yaw, (1.5, 0.1 * name, 2.0))


def map_offset(i: int) -> np.ndarray:
  return MAP_OFFSET + i * MAP_OFFSET_DRIFT


def true_pose(i: int) -> np.ndarray:
  """Ground-truth vehicle -> map (= schema world) of frame i: the car drives forward and turns."""
  return rigid(0.05 * i, (100.0 + 1.0 * i, 50.0 + 0.2 * i, 3.0))


def ego_pose(i: int) -> np.ndarray:
  """The stored ``frame.pose`` (vehicle -> pose frame): the true pose minus frame i's map offset (pose drift)."""
  pose = true_pose(i)
  pose[:3, 3] -= map_offset(i)
  return pose


def boxes(i: int):
  """[(type, id, [cx, cy, cz, length, width, height, heading])] of frame i (vehicle frame)."""
  return [
      (label_pb2.Label.TYPE_VEHICLE, "car_a", [10.0 - 0.5 * i, 2.0, 0.8, 4.5, 1.9, 1.6, 0.1]),
      (label_pb2.Label.TYPE_PEDESTRIAN, "ped_b", [5.0, -3.0 + 0.1 * i, 0.9, 0.6, 0.7, 1.8, 1.2]),
      (label_pb2.Label.TYPE_SIGN, "sign_c", [8.0, 4.0, 2.0, 0.2, 0.8, 0.8, 0.0]),
  ]


def map_lines():
  """Map features as (kind, points [n, 3]) in map coordinates (= the schema's world frame)."""
  return [
      ("road_edge", np.array([[90.0, 40.0, 0.0], [120.0, 40.0, 0.0], [130.0, 42.0, 0.0]])),
      ("road_line", np.array([[90.0, 50.0, 0.0], [120.0, 50.0, 0.0]])),
      ("crosswalk", np.array([[110.0, 45.0, 0.0], [112.0, 45.0, 0.0], [112.0, 55.0, 0.0], [110.0, 55.0, 0.0]])),
      ("lane", np.array([[90.0, 48.0, 0.0], [120.0, 48.0, 0.0]])),
  ]


def _jpeg(color, hw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((*hw, 3), color, np.uint8)).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _matrix(array: np.ndarray) -> bytes:
  m = dataset_pb2.MatrixFloat()
  m.data.extend(np.asarray(array, np.float32).ravel().tolist())
  m.shape.dims.extend(array.shape)
  return zlib.compress(m.SerializeToString())


def top_range_image() -> np.ndarray:
  ri = np.zeros((*TOP_HW, 4), np.float32)
  r, c, rng = TOP_RETURN
  ri[r, c, 0] = rng
  ri[r, c, 1] = 0.5  # Intensity (unused).
  return ri


def top_pixel_pose(i: int, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
  """[H, W, 6] per-pixel vehicle->world pose = the frame pose (+ a world shift), as roll, pitch, yaw, x, y, z."""
  pose = ego_pose(i)
  yaw = np.arctan2(pose[1, 0], pose[0, 0])
  pp = np.zeros((*TOP_HW, 6), np.float32)
  pp[..., 2] = yaw
  pp[..., 3:6] = pose[:3, 3] + np.asarray(shift)
  return pp


def make_frame(context_name: str, i: int, *, with_map: bool, corrupt_jpeg: bool = False,
               missing_camera: int | None = None, pixel_pose_shift=(0.0, 0.0, 0.0)) -> dataset_pb2.Frame:
  f = dataset_pb2.Frame()
  f.context.name = context_name
  for k, v in STATS.items():
    setattr(f.context.stats, k, v)
  for name in range(1, 6):
    hw = FRONT_HW if name in (1, 2, 3) else SIDE_HW
    c = f.context.camera_calibrations.add()
    c.name = name
    c.width, c.height = hw[1], hw[0]
    c.intrinsic.extend([40.0 + name, 41.0 + name, hw[1] / 2 + 0.5, hw[0] / 2 - 0.5, 0.01, 0, 0, 0, 0])
    c.extrinsic.transform.extend(camera_extrinsic(name).ravel().tolist())
    if name == missing_camera:
      continue
    im = f.images.add()
    im.name = name
    im.image = _jpeg(CAMERA_COLORS[name], hw)[:60] if (corrupt_jpeg and name == 1) else _jpeg(CAMERA_COLORS[name], hw)
  for name in range(1, 6):
    lc = f.context.laser_calibrations.add()
    lc.name = name
    if name == 1:
      lc.beam_inclinations.extend(TOP_INCLINATIONS.tolist())
      lc.beam_inclination_min, lc.beam_inclination_max = -0.25, 0.15
      lc.extrinsic.transform.extend(rigid(TOP_EXTRINSIC_YAW, TOP_EXTRINSIC_T).ravel().tolist())
    else:
      lc.beam_inclination_min, lc.beam_inclination_max = -0.5, 0.5
      lc.extrinsic.transform.extend(rigid(0.0, (2.0, 0.0, 1.0)).ravel().tolist())
    laser = f.lasers.add()
    laser.name = name
    if name == 1:
      laser.ri_return1.range_image_compressed = _matrix(top_range_image())
      laser.ri_return1.range_image_pose_compressed = _matrix(top_pixel_pose(i, pixel_pose_shift))
    else:
      ri = np.zeros((2, 4, 4), np.float32)
      ri[0, 1, 0] = 5.0  # One return per auxiliary laser.
      laser.ri_return1.range_image_compressed = _matrix(ri)
  f.timestamp_micros = 1_600_000_000_000_000 + 100_000 * i
  f.pose.transform.extend(ego_pose(i).ravel().tolist())
  for typ, oid, b in boxes(i):
    lab = f.laser_labels.add()
    lab.type, lab.id = typ, oid
    (lab.box.center_x, lab.box.center_y, lab.box.center_z, lab.box.length, lab.box.width, lab.box.height,
     lab.box.heading) = b
  f.map_pose_offset.x, f.map_pose_offset.y, f.map_pose_offset.z = map_offset(i)
  if with_map:
    for k, (kind, pts) in enumerate(map_lines()):
      feat = f.map_features.add()
      feat.id = k
      target = {"road_edge": lambda: feat.road_edge.polyline, "road_line": lambda: feat.road_line.polyline,
                "crosswalk": lambda: feat.crosswalk.polygon, "lane": lambda: feat.lane.polyline}[kind]()
      for p in pts:
        q = target.add()
        q.x, q.y, q.z = p
  return f


def write_segment(directory, context_name: str, num_frames: int, *, corrupt_jpeg_frame: int | None = None,
                  missing_camera_frame: int | None = None, pixel_pose_shift=(0.0, 0.0, 0.0)) -> str:
  """Writes ``segment-<context_name>_with_camera_labels.tfrecord`` under ``directory``; returns its path."""
  path = f"{directory}/segment-{context_name}_with_camera_labels.tfrecord"
  with tfrecord.TFRecordWriter(path) as w:
    for i in range(num_frames):
      w.write(make_frame(context_name, i, with_map=(i == 0), corrupt_jpeg=(i == corrupt_jpeg_frame),
                         missing_camera=(4 if i == missing_camera_frame else None),
                         pixel_pose_shift=pixel_pose_shift).SerializeToString())
  return path


def flip_record_byte(path, record: int, *, in_header: bool = False) -> None:
  """Flips one bit of record ``record`` of a TFRecord file: in its payload (the data CRC no longer matches) or, with
  ``in_header``, in its length field (the length CRC no longer matches). The file keeps its size."""
  offset, length = tfrecord.scan_records(path)[0][record]
  at = offset if in_header else offset + 12 + length // 2  # 12 = length (8) + length CRC (4).
  with open(path, "r+b") as f:
    f.seek(at)
    byte = f.read(1)[0]
    f.seek(at)
    f.write(bytes([byte ^ 1]))
