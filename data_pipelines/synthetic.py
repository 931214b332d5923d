"""Embedded generator of structured driving clips in the canonical schema (no files, deterministic).

Every clip is a small 3D world, and every field of the sample is derived from that one world, so images, boxes,
map, LiDAR, depth and sky masks agree with each other (the geometry tests rely on it):
  * a road along world x with a gentle sinusoidal bend: 1-2 lanes per direction (right-hand traffic), lane lines,
    road edges, sidewalks, grass, sometimes a crosswalk; map polylines (world frame) for edges, lane lines and the
    crosswalk outline (schema.MAP_CLASSES);
  * an ego car driving forward in a right lane; boxes (cars, trucks, buses, cyclists, pedestrians...) moving along
    lanes/sidewalks with constant speeds, so their tracks are consistent over the clip (stable track ids);
  * a nuScenes-like 6-camera ring in the order front, front-right, back-right, back, back-left, front-left with
    intrinsics of a 1600x900 camera (fx ~1260, back camera ~800) rescaled to the render size;
    ``original_size`` = (1600, 900), so camera_params and line widths behave as for nuScenes;
  * images rendered by ray casting the ground plane per pixel (sky gradient, asphalt, markings, sidewalk, grass,
    distance fog) and painting the boxes as shaded cuboids (painter's algorithm over near-clipped projected faces);
    ``sky_mask`` marks the sky pixels left uncovered;
  * LiDAR from a spinning sensor at (0, 0, 1.8) in the ego frame: rays hit the nearest of the ground and the boxes
    (slab test), so the projected depth matches the rendered surfaces;
  * captions from the scene metadata (time of day, weather, road, objects visible in that camera).

API:
  SyntheticOptions(...)                      frozen dataclass of generator options (see its fields).
  options_from_config(cfg: Mapping | None, **overrides) -> SyntheticOptions
  generate_clip(seed: int, index: int, options=SyntheticOptions()) -> dict  (schema sample + sky_mask)
  SyntheticSource(num_clips, seed=0, options=SyntheticOptions())   grain RandomAccessDataSource of clips.
  CAMERA_NAMES: the 6 view names in slot order.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw

from . import geometry
from . import schema

CAMERA_NAMES = ("front", "front right", "back right", "back", "back left", "front left")
# (yaw deg, x, y, z, focal px at 1600x900) per view, after nuScenes' calibrated sensors (rounded).
_CAMERAS = (
    (0.0, 1.70, 0.00, 1.55, 1260.0),
    (-55.0, 1.52, -0.49, 1.55, 1260.0),
    (-110.0, 1.03, -0.48, 1.56, 1260.0),
    (180.0, 0.03, 0.00, 1.57, 800.0),
    (110.0, 1.04, 0.48, 1.56, 1260.0),
    (55.0, 1.50, 0.49, 1.55, 1260.0),
)
_ORIGINAL_WH = (1600, 900)
LANE_WIDTH = 3.5
SIDEWALK_WIDTH = 3.0
LIDAR_ORIGIN = np.array([0.0, 0.0, 1.8])
_LIDAR_RANGE = 80.0

# Per class: (probability, length, width, height, where) -- where: "lane", "park" or "walk".
_CLASS_SPEC = {
    "car": (0.50, 4.5, 1.9, 1.6, "lane"),
    "truck": (0.10, 7.5, 2.5, 3.0, "lane"),
    "bus": (0.05, 11.0, 2.6, 3.2, "lane"),
    "pedestrian": (0.17, 0.7, 0.7, 1.75, "walk"),
    "bicycle": (0.05, 1.8, 0.6, 1.5, "walk"),
    "motorcycle": (0.04, 2.1, 0.8, 1.5, "lane"),
    "construction": (0.03, 6.0, 2.8, 3.0, "park"),
    "emergency": (0.03, 5.2, 2.0, 2.2, "lane"),
    "trailer": (0.03, 9.0, 2.5, 3.5, "park"),
}
_CLASS_NAMES = tuple(_CLASS_SPEC)
_CLASS_PROBS = np.array([v[0] for v in _CLASS_SPEC.values()]) / sum(v[0] for v in _CLASS_SPEC.values())
_BODY_COLORS = np.array([[200, 30, 30], [30, 60, 160], [220, 220, 220], [30, 30, 30], [150, 150, 160],
                         [40, 120, 60], [230, 180, 40], [120, 70, 40]], np.float32)
_FACE_SHADE = np.array([0.75, 0.7, 0.85, 0.6, 1.0, 0.4], np.float32)  # front, back, left, right, top, bottom

TIMES = ("day", "dusk", "night")
WEATHERS = ("clear", "cloudy", "rain", "fog")
_TIME_LIGHT = {"day": (1.0, 1.0, 1.0), "dusk": (0.85, 0.65, 0.5), "night": (0.22, 0.24, 0.35)}
_SKY = {  # (horizon, zenith) colours per time of day
    "day": ((190, 215, 240), (70, 130, 220)),
    "dusk": ((250, 170, 110), (70, 60, 120)),
    "night": ((30, 35, 60), (5, 5, 20)),
}
_FOG_DISTANCE = {"clear": 400.0, "cloudy": 250.0, "rain": 90.0, "fog": 35.0}


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
  """Generator options. Sizes are the padded schema sizes (NB, NL, NP, NK)."""
  height: int = 64
  width: int = 112
  num_frames: int = 4
  frame_stride: int = 1          # frames are base_fps / frame_stride apart
  base_fps: float = 10.0
  num_views: int = 6             # 1..6 camera slots from CAMERA_NAMES (all real)
  max_boxes: int = 24
  max_lidar_points: int = 4096
  lidar_beams: int = 24
  lidar_azimuths: int = 160
  max_polylines: int = 12
  points_per_polyline: int = 48
  map_behind: float = 40.0       # metres of road mapped behind the ego's start
  map_ahead: float = 110.0       # ... and ahead of the ego's last position


def options_from_config(cfg: Mapping[str, Any] | None = None, **overrides) -> SyntheticOptions:
  """SyntheticOptions from a (Config)dict; unknown keys raise KeyError naming them."""
  values = dict(cfg or {})
  values.update(overrides)
  names = {f.name for f in dataclasses.fields(SyntheticOptions)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise KeyError(f"unknown synthetic option(s) {unknown}; known: {sorted(names)}")
  return SyntheticOptions(**values)


class _Road:
  """Centre line y = a sin(x / wavelength + phase); lateral offset d is to the left of +x."""

  def __init__(self, amplitude: float, wavelength: float, phase: float, lanes_per_dir: int):
    self.a, self.wl, self.ph = amplitude, wavelength, phase
    self.lanes = lanes_per_dir
    self.half = lanes_per_dir * LANE_WIDTH

  def centre_y(self, x):
    return self.a * np.sin(x / self.wl + self.ph)

  def heading(self, x):
    return np.arctan(self.a / self.wl * np.cos(x / self.wl + self.ph))

  def point(self, s, d):
    """World xy [..., 2] at parameter s (world x of the centre line) and lateral offset d."""
    psi = self.heading(s)
    return np.stack([s - d * np.sin(psi), self.centre_y(s) + d * np.cos(psi)], axis=-1)

  def lateral(self, x, y):
    """Approximate lateral offset of world points from the centre line (exact for straight roads)."""
    return (y - self.centre_y(x)) * np.cos(self.heading(x))


def _camera_rig(rng: np.random.Generator, num_views: int, hw: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
  """Intrinsics [V, 3, 3] at hw and cam_to_ego [V, 4, 4], with small per-clip calibration jitter."""
  Ks, Es = [], []
  for yaw, x, y, z, f in _CAMERAS[:num_views]:
    f = f * rng.uniform(0.98, 1.02)
    K = np.array([[f, 0, 800.0 + rng.uniform(-10, 10)], [0, f, 470.0 + rng.uniform(-20, 20)], [0, 0, 1]])
    Ks.append(geometry.resize_intrinsics(K, _ORIGINAL_WH[::-1], hw))
    R = geometry.camera_rotation(np.deg2rad(yaw + rng.uniform(-1, 1)), np.deg2rad(rng.uniform(-1, 1)))
    Es.append(geometry.make_rigid(R, [x, y, z]))
  return np.stack(Ks), np.stack(Es)


def _scene(rng: np.random.Generator, opt: SyntheticOptions) -> dict[str, Any]:
  """Samples the world: road, ego motion and object tracks (world frame, per frame)."""
  T = opt.num_frames
  dt = opt.frame_stride / opt.base_fps
  times = np.arange(T) * dt
  lanes = int(rng.integers(1, 3))
  road = _Road(rng.uniform(0, 6) * rng.integers(0, 2), rng.uniform(60, 160), rng.uniform(0, 2 * np.pi), lanes)
  lane_centres = (np.arange(2 * lanes) - lanes + 0.5) * LANE_WIDTH  # negative = our direction (right-hand traffic)
  ego_lane = int(rng.integers(0, lanes))
  lane_speed = np.where(lane_centres < 0, rng.uniform(4, 13, 2 * lanes), -rng.uniform(4, 13, 2 * lanes))
  ego_speed = float(lane_speed[ego_lane])
  ego_s = times * ego_speed
  ego_xy = road.point(ego_s, np.full(T, lane_centres[ego_lane]))
  ego_yaw = road.heading(ego_s)
  ego_to_world = np.stack([geometry.make_rigid(geometry.yaw_matrix(y), [p[0], p[1], 0.0])
                           for p, y in zip(ego_xy, ego_yaw)])

  n_obj = int(rng.integers(max(2, opt.max_boxes // 3), opt.max_boxes + 1))
  objs = []  # (schema.BOX_CLASSES index, lwh, s0, d, speed along s, colour)
  taken: list[tuple[float, float]] = [(lane_centres[ego_lane], 0.0)]  # (d, s0) of placed lane users
  for _ in range(n_obj * 3):
    if len(objs) == n_obj:
      break
    name = _CLASS_NAMES[rng.choice(len(_CLASS_NAMES), p=_CLASS_PROBS)]
    _, l, w, h, where = _CLASS_SPEC[name]
    lwh = np.array([l, w, h]) * rng.uniform(0.9, 1.1, 3)
    s0 = float(rng.uniform(-30, 75))
    if where == "lane":
      k = int(rng.integers(0, 2 * lanes))
      d, speed = lane_centres[k], float(lane_speed[k])
    elif where == "park":
      side = rng.choice([-1.0, 1.0])
      d, speed = side * (road.half - 1.6), 0.0
    else:
      side = rng.choice([-1.0, 1.0])
      d = side * (road.half + SIDEWALK_WIDTH * rng.uniform(0.3, 0.7))
      speed = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.8) * (4.0 if name == "bicycle" else 1.0))
    # Vehicles share their lane's speed, so keeping them 1.5 lengths apart at t=0 keeps them apart for the clip.
    if any(abs(d - d2) < 1.0 and abs(s0 - s2) < max(lwh[0], 5.0) * 1.5 for d2, s2 in taken):
      continue
    taken.append((d, s0))
    colour = (_BODY_COLORS[rng.integers(len(_BODY_COLORS))] if name in ("car", "motorcycle", "bicycle",
                                                                         "pedestrian")
              else {"truck": [230, 230, 225], "bus": [240, 190, 40], "construction": [250, 140, 0],
                    "emergency": [245, 245, 245], "trailer": [180, 180, 170]}[name])
    objs.append((schema.BOX_CLASSES.index(name), lwh, s0, d, speed, np.asarray(colour, np.float32)))

  # World-frame boxes per frame: [T, N, 7].
  boxes_w = np.zeros((T, len(objs), 7))
  for i, (_, lwh, s0, d, speed, _) in enumerate(objs):
    s = s0 + speed * times
    xy = road.point(s, np.full(T, d))
    yaw = road.heading(s) + (np.pi if speed < 0 else 0.0)
    boxes_w[:, i, :2] = xy
    boxes_w[:, i, 2] = lwh[2] / 2
    boxes_w[:, i, 3:6] = lwh
    boxes_w[:, i, 6] = yaw
  crosswalk = float(rng.uniform(10, 60)) if rng.uniform() < 0.35 else None
  return dict(times=times, road=road, ego_to_world=ego_to_world, objs=objs, boxes_w=boxes_w,
              crosswalk=crosswalk, ego_s=ego_s, lane_centres=lane_centres,
              time_of_day=TIMES[rng.choice(3, p=[0.6, 0.2, 0.2])],
              weather=WEATHERS[rng.choice(4, p=[0.5, 0.25, 0.15, 0.1])])


def _map_polylines(scene: dict[str, Any], opt: SyntheticOptions):
  road: _Road = scene["road"]
  s = np.linspace(scene["ego_s"].min() - opt.map_behind, scene["ego_s"].max() + opt.map_ahead,
                  opt.points_per_polyline)
  lines = []
  for side in (-1.0, 1.0):
    lines.append((road.point(s, np.full_like(s, side * road.half)), 0))
  for k in range(1, 2 * road.lanes):
    lines.append((road.point(s, np.full_like(s, k * LANE_WIDTH - road.half)), 1))
  if scene["crosswalk"] is not None:
    c = scene["crosswalk"]
    ss = np.array([c, c, c + 4.0, c + 4.0, c])
    dd = np.array([-road.half, road.half, road.half, -road.half, -road.half])
    lines.append((road.point(ss, dd), 2))
  NP, NK = opt.max_polylines, opt.points_per_polyline
  if len(lines) > NP:
    raise ValueError(f"synthetic max_polylines={NP} < {len(lines)} polylines of this road")
  pts = np.zeros((NP, NK, 3), np.float32)
  cls = np.full((NP,), -1, np.int32)
  mask = np.zeros((NP, NK), bool)
  for i, (xy, c) in enumerate(lines):
    pts[i, :len(xy), :2] = xy
    mask[i, :len(xy)] = True
    cls[i] = c
  return pts, cls, mask


def _ray_box_hits(origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray, max_range: float = 80.0) -> np.ndarray:
  """Distances [R] along unit rays [R, 3] from origin [3] to the nearest box [N, 7] (inf when none).

  Slab test in each box frame, only for the rays inside the box's azimuth interval as seen from the origin (a box
  covers a few degrees, so this skips almost all ray/box pairs).
  """
  out = np.full(len(dirs), np.inf)
  ray_az = np.arctan2(dirs[:, 1], dirs[:, 0])
  corners = geometry.box_corners(boxes) - origin  # [N, 8, 3]
  two_pi = 2 * np.pi
  for n in range(len(boxes)):
    reach = np.linalg.norm(boxes[n, :2] - origin[:2])
    if reach < 0.5 * np.linalg.norm(boxes[n, 3:5]) or reach > max_range + boxes[n, 3]:
      continue  # the sensor inside the box (not physical) or the box out of range
    centre_az = np.arctan2(boxes[n, 1] - origin[1], boxes[n, 0] - origin[0])
    rel = (np.arctan2(corners[n, :, 1], corners[n, :, 0]) - centre_az + np.pi) % two_pi - np.pi
    dr = (ray_az - centre_az + np.pi) % two_pi - np.pi
    sel = np.flatnonzero((dr >= rel.min()) & (dr <= rel.max()))
    if not len(sel):
      continue
    c, s = np.cos(boxes[n, 6]), np.sin(boxes[n, 6])
    rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])  # into the box frame
    o = rot @ (origin - boxes[n, :3])
    d = dirs[sel] @ rot.T
    half = boxes[n, 3:6] / 2
    with np.errstate(divide="ignore", invalid="ignore"):
      inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
    t1 = (-half - o) * inv
    t2 = (half - o) * inv
    tmin = np.minimum(t1, t2).max(-1)
    tmax = np.maximum(t1, t2).min(-1)
    hit = (tmax >= tmin) & (tmin > 0)
    out[sel] = np.minimum(out[sel], np.where(hit, tmin, np.inf))
  return out


def _lidar(scene: dict[str, Any], boxes_ego: np.ndarray, opt: SyntheticOptions, t: int) -> np.ndarray:
  """One sweep in the ego frame [n, 3]: beams hit the nearest of the ground (world z = 0) and the boxes."""
  elev = np.deg2rad(np.linspace(-25.0, 8.0, opt.lidar_beams))
  az = np.linspace(-np.pi, np.pi, opt.lidar_azimuths, endpoint=False) + t * 0.013  # sensor spins between frames
  e, a = np.meshgrid(elev, az, indexing="ij")
  dirs = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1).reshape(-1, 3)
  with np.errstate(divide="ignore"):
    ground = np.where(dirs[:, 2] < -1e-6, -LIDAR_ORIGIN[2] / dirs[:, 2], np.inf)
  dist = np.minimum(ground, _ray_box_hits(LIDAR_ORIGIN, dirs, boxes_ego, _LIDAR_RANGE))
  keep = dist < _LIDAR_RANGE
  return LIDAR_ORIGIN + dirs[keep] * dist[keep, None]


# Ground material labels and albedos (float 0..255): the renderer shades by palette lookup.
_GRASS, _SIDEWALK, _ASPHALT, _WHITE, _YELLOW = range(5)
_LEVELS = 64
_PALETTE = np.array([(70, 110, 50), (150, 148, 140), (72, 72, 76), (225, 225, 225), (230, 190, 40)], np.float32)


def _ground_labels(scene: dict[str, Any], x: np.ndarray, y: np.ndarray, dist: np.ndarray) -> np.ndarray:
  """Ground material label uint8 [...] at world points x, y (float32 arrays)."""
  road: _Road = scene["road"]
  if road.a > 0:
    phase = x / np.float32(road.wl) + np.float32(road.ph)
    slope = np.float32(road.a / road.wl) * np.cos(phase)
    d = (y - np.float32(road.a) * np.sin(phase)) / np.sqrt(1 + slope * slope)  # cos(atan(slope))
  else:
    d = y
  ad = np.abs(d)
  half = np.float32(road.half)
  label = np.where(ad < half, _ASPHALT, np.where(ad < half + SIDEWALK_WIDTH, _SIDEWALK, _GRASS)).astype(np.uint8)
  # Markings are 15 cm wide; far away they shrink below a pixel, so widen them with distance to avoid flicker.
  mw = np.maximum(np.float32(0.08), dist * np.float32(0.002))
  label[np.abs(ad - (half - 0.3)) < mw] = _WHITE  # solid edge lines
  label[ad < mw * 1.5] = _YELLOW  # centre line between the two directions
  if road.lanes > 1:
    dashed = np.mod(x, np.float32(9.0)) < 3.0
    for k in range(1, road.lanes):
      label[dashed & (np.abs(ad - k * LANE_WIDTH) < mw)] = _WHITE
  if scene["crosswalk"] is not None:
    c = scene["crosswalk"]
    label[(ad < half) & (x >= c) & (x <= c + 4.0) & (np.mod(d, np.float32(1.2)) < 0.6)] = _WHITE
  return label


def _render(scene: dict[str, Any], K: np.ndarray, cam_to_ego: np.ndarray, hw: tuple[int, int],
            opt: SyntheticOptions) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 [T, V, H, W, 3] and sky masks bool [T, V, H, W]."""
  H, W = hw
  T, V = len(scene["times"]), len(K)
  light = np.asarray(_TIME_LIGHT[scene["time_of_day"]], np.float32)
  horizon, zenith = (np.asarray(c, np.float32) for c in _SKY[scene["time_of_day"]])
  fog_dist = _FOG_DISTANCE[scene["weather"]]
  if scene["weather"] in ("rain", "fog", "cloudy"):
    grey = horizon.mean() * np.ones(3, np.float32)
    horizon = 0.3 * horizon + 0.7 * grey
    zenith = 0.4 * zenith + 0.6 * grey * 0.8
  fog_col = horizon
  # Camera rays [V, H*W, 3] in the camera frame, then world rays [T, V, H*W, 3] (matmul, not einsum: BLAS).
  u, v = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
  pix = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3)
  rays_cam = pix[None] @ np.swapaxes(np.linalg.inv(K), -1, -2).astype(np.float32)  # [V, HW, 3]
  cam_to_world = np.einsum("tij,vjk->tvik", scene["ego_to_world"], cam_to_ego)
  rays = rays_cam[None] @ np.swapaxes(cam_to_world[..., :3, :3], -1, -2).astype(np.float32)
  origin = cam_to_world[..., :3, 3].astype(np.float32)  # [T, V, 3]
  rx, ry, dz = rays[..., 0], rays[..., 1], rays[..., 2]
  norm = np.sqrt(rx * rx + ry * ry + dz * dz)  # (a reduce over a length-3 axis is several times slower)
  ground = dz < -1e-4
  tt = -origin[..., None, 2] / np.where(ground, dz, np.float32(-1e9))
  dist = tt * norm
  label = _ground_labels(scene, origin[..., None, 0] + tt * rx, origin[..., None, 1] + tt * ry, dist)
  # Shading through a uint8 look-up table: fog and sky elevation quantised to _LEVELS steps (invisible at 8 bit
  # colour for these smooth ramps), so the per-pixel work is integer index arithmetic and one gather.
  levels = np.arange(_LEVELS, dtype=np.float32) / (_LEVELS - 1)
  fog_rgb = (fog_col * light.mean() ** 0.5).astype(np.float32)
  lit = _PALETTE * light  # [materials, 3]
  ground_lut = lit[:, None] + (fog_rgb - lit[:, None]) * levels[None, :, None]  # [materials, levels, 3]
  sky_lut = horizon + (zenith - horizon) * np.sqrt(levels)[:, None]  # [levels, 3]
  lut = np.clip(np.concatenate([ground_lut.reshape(-1, 3), sky_lut]), 0, 255).astype(np.uint8)
  fog_q = ((_LEVELS - 1) * (1.0 - np.exp(-dist / np.float32(fog_dist))) + 0.5).astype(np.int32)
  sky_q = ((_LEVELS - 1) * np.clip(dz / norm, 0, 1) + 0.5).astype(np.int32)
  index = np.where(ground, label.astype(np.int32) * _LEVELS + fog_q, len(_PALETTE) * _LEVELS + sky_q)
  images = lut[index].reshape(T, V, H, W, 3)
  sky_mask = ~ground.reshape(T, V, H, W)

  # Boxes as shaded cuboids, far to near (painter's algorithm), per image. Faces are culled and projected in one
  # vectorised pass; only faces crossing the near plane take the polygon clipper.
  world_to_cam = geometry.invert_rigid(cam_to_world)
  colours = np.asarray([o[5] for o in scene["objs"]], np.float32).reshape(-1, 3)
  near = geometry.DEFAULT_NEAR
  for t in range(T):
    if not len(colours):
      break
    faces_w = geometry.box_faces(scene["boxes_w"][t])  # [N, 6, 4, 3]
    centres = scene["boxes_w"][t][:, :3]
    for vi in range(V):
      faces_c = geometry.transform_points(world_to_cam[t, vi], faces_w.reshape(-1, 3)).reshape(faces_w.shape)
      normals = np.cross(faces_c[:, :, 1] - faces_c[:, :, 0], faces_c[:, :, 2] - faces_c[:, :, 0])
      facing = np.einsum("nfi,nfi->nf", normals, faces_c.mean(2)) < 0  # the outward normal points at the camera
      z = faces_c[..., 2]
      all_front = z.min(-1) >= near
      uv, _ = geometry.project(faces_c, K[vi][None, None])  # [N, 6, 4, 2], valid where all_front
      off = (uv[..., 0].max(-1) < -1) | (uv[..., 0].min(-1) > W) | (uv[..., 1].max(-1) < -1) | (uv[..., 1].min(-1) > H)
      draw_face = facing & (z.max(-1) >= near) & ~(all_front & off)
      if not draw_face.any():
        continue
      dist_n = np.linalg.norm(centres - origin[t, vi], axis=-1)
      f_fog = (1.0 - np.exp(-dist_n / fog_dist))[:, None, None]
      face_rgb = colours[:, None] * _FACE_SHADE[None, :, None] * light * (1 - f_fog) + fog_rgb * f_fog  # [N, 6, 3]
      face_rgb = np.clip(face_rgb, 0, 255).astype(np.int64).tolist()
      uv_px = np.floor(np.clip(uv, -1e4, 1e4) + 0.5).astype(np.int64).tolist()
      im = Image.fromarray(images[t, vi])
      draw = ImageDraw.Draw(im)
      cover = Image.new("L", (W, H))
      cdraw = ImageDraw.Draw(cover)
      for n in np.argsort(-dist_n).tolist():
        for f in np.flatnonzero(draw_face[n]).tolist():
          if all_front[n, f]:
            xy = [tuple(p) for p in uv_px[n][f]]
          else:
            poly = geometry.clip_polygon_near(faces_c[n, f], near)
            p_uv, _ = geometry.project(poly, K[vi])
            xy = [tuple(p) for p in np.floor(np.clip(p_uv, -1e4, 1e4) + 0.5).astype(np.int64).tolist()]
          draw.polygon(xy, fill=tuple(face_rgb[n][f]))
          cdraw.polygon(xy, fill=1)
      images[t, vi] = np.asarray(im)
      sky_mask[t, vi] &= ~np.asarray(cover, bool)
  return images, sky_mask


def _captions(scene: dict[str, Any], boxes_ego: np.ndarray, K: np.ndarray, cam_to_ego: np.ndarray,
              hw: tuple[int, int]) -> np.ndarray:
  """Captions object [T, V]: scene description plus the objects whose centre is visible in that view (mid frame)."""
  T, V = len(scene["times"]), len(K)
  road: _Road = scene["road"]
  shape = "winding" if road.a > 1.0 else "straight"
  weather = {"clear": "in clear weather", "cloudy": "under a cloudy sky", "rain": "in the rain", "fog": "in fog"}
  base = (f"A {scene['time_of_day']} drive on a {shape} {2 * road.lanes}-lane road {weather[scene['weather']]}"
          + (", approaching a crosswalk." if scene["crosswalk"] is not None else "."))
  mid = T // 2
  classes = np.array([o[0] for o in scene["objs"]], np.int64)
  out = np.empty((T, V), object)
  for v in range(V):
    if len(classes):
      uv, z, ok = geometry.project_ego_points(boxes_ego[mid, :, :3], K[v], cam_to_ego[v], near=0.5)
      vis = ok & (z < 60) & (uv[:, 0] >= 0) & (uv[:, 0] < hw[1]) & (uv[:, 1] >= 0) & (uv[:, 1] < hw[0])
      counts = np.bincount(classes[vis], minlength=len(schema.BOX_CLASSES))
    else:
      counts = np.zeros(len(schema.BOX_CLASSES), np.int64)
    names = {"construction": "construction vehicle", "emergency": "emergency vehicle"}
    items = [f"{c} {names.get(n, n)}{'s' if c > 1 else ''}" for n, c in zip(schema.BOX_CLASSES, counts) if c]
    seen = ", ".join(items) if items else "no other road users"
    out[:, v] = f"{base} The {CAMERA_NAMES[v]} camera sees {seen}."
  return out


def generate_clip(seed: int, index: int, options: SyntheticOptions = SyntheticOptions()) -> dict[str, Any]:
  """One schema sample (plus sky_mask and original_size), a pure function of (seed, index, options)."""
  opt = options
  if not 1 <= opt.num_views <= len(_CAMERAS):
    raise ValueError(f"synthetic num_views must be in [1, {len(_CAMERAS)}], got {opt.num_views}")
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])
  hw = (opt.height, opt.width)
  K, E = _camera_rig(rng, opt.num_views, hw)
  scene = _scene(rng, opt)
  T, V, NB = opt.num_frames, opt.num_views, opt.max_boxes
  world_to_ego = geometry.invert_rigid(scene["ego_to_world"])
  N = len(scene["objs"])
  boxes_ego = np.zeros((T, N, 7))
  if N:
    boxes_ego[:, :, :3] = geometry.transform_points(world_to_ego, scene["boxes_w"][:, :, :3])
    boxes_ego[:, :, 3:6] = scene["boxes_w"][:, :, 3:6]
    ego_yaw = np.arctan2(scene["ego_to_world"][:, 1, 0], scene["ego_to_world"][:, 0, 0])
    boxes_ego[:, :, 6] = np.angle(np.exp(1j * (scene["boxes_w"][:, :, 6] - ego_yaw[:, None])))
  images, sky = _render(scene, K, E, hw, opt)
  boxes = np.zeros((T, NB, 7), np.float32)
  boxes[:, :N] = boxes_ego
  box_class = np.full((T, NB), -1, np.int32)
  box_class[:, :N] = [o[0] for o in scene["objs"]]
  track = np.full((T, NB), -1, np.int32)
  track[:, :N] = np.arange(N)
  box_mask = np.zeros((T, NB), bool)
  box_mask[:, :N] = True
  lidar = np.zeros((T, opt.max_lidar_points, 3), np.float32)
  lidar_mask = np.zeros((T, opt.max_lidar_points), bool)
  for t in range(T):
    pts = _lidar(scene, boxes_ego[t], opt, t)
    if len(pts) > opt.max_lidar_points:  # even subsample keeps coverage uniform
      pts = pts[np.linspace(0, len(pts) - 1, opt.max_lidar_points).astype(np.int64)]
    lidar[t, :len(pts)] = pts
    lidar_mask[t, :len(pts)] = True
  map_points, map_class, map_mask = _map_polylines(scene, opt)
  return {
      "images": images,
      "view_mask": np.ones(V, bool),
      "intrinsics": np.broadcast_to(K, (T, V, 3, 3)).astype(np.float32),
      "cam_to_ego": np.broadcast_to(E, (T, V, 4, 4)).astype(np.float32),
      "ego_to_world": scene["ego_to_world"].astype(np.float32),
      "timestamps": scene["times"].astype(np.float64),
      "fps": np.float32(opt.base_fps / opt.frame_stride),
      "boxes": boxes, "box_class": box_class, "box_track_id": track, "box_mask": box_mask,
      "map_points": map_points, "map_class": map_class, "map_mask": map_mask,
      "lidar_points": lidar, "lidar_mask": lidar_mask,
      "captions": _captions(scene, boxes_ego, K, E, hw),
      "sky_mask": sky,
      "original_size": np.tile(np.array([_ORIGINAL_WH], np.int32), (V, 1)),
      "dataset": "synthetic",
      "clip_id": generate_clip_id(seed, index),
  }


def generate_clip_id(seed: int, index: int) -> str:
  """The clip_id of ``generate_clip(seed, index, ...)``."""
  return f"synthetic-{int(seed)}-{int(index)}"


class SyntheticSource:
  """grain RandomAccessDataSource of ``num_clips`` synthetic clips (picklable; item i = generate_clip(seed, i))."""

  def __init__(self, num_clips: int, seed: int = 0, options: SyntheticOptions = SyntheticOptions()):
    if num_clips <= 0:
      raise ValueError(f"synthetic num_clips must be positive, got {num_clips}")
    self.num_clips = int(num_clips)
    self.seed = int(seed)
    self.options = options

  def __len__(self) -> int:
    return self.num_clips

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_clips:
      raise IndexError(f"synthetic clip index {index} out of range [0, {self.num_clips})")
    return generate_clip(self.seed, index, self.options)

  def __repr__(self) -> str:  # grain keys checkpoint state by the source's repr: keep it stable and explicit
    return f"SyntheticSource(num_clips={self.num_clips}, seed={self.seed}, options={self.options})"


class SyntheticClipReader:
  """The generator behind the converter's reader interface (``readers.ClipReader``): ``python -m
  cvd_storm_jax.data_pipelines.convert --dataset synthetic --root <unused> --out DIR`` writes ArrayRecord shards of
  ``num_clips`` clips, so that the production path (shards -> ArrayRecord source -> pipeline) runs without a dataset.
  Clips are rendered at ``image_size`` (H, W) with ``num_frames`` frames."""

  dataset = "synthetic"

  def __init__(self, *, num_clips: int = 16, seed: int = 0, num_frames: int = 19,
               image_size: tuple[int, int] | None = None, **options):
    if image_size is not None:
      options.update(height=int(image_size[0]), width=int(image_size[1]))
    self.source = SyntheticSource(num_clips, seed, options_from_config(options, num_frames=num_frames))

  def list_clips(self) -> list[str]:
    return [generate_clip_id(self.source.seed, i) for i in range(len(self.source))]

  def read_clip(self, clip_id: str) -> dict[str, Any]:
    try:
      index = int(clip_id.rsplit("-", 1)[1])
    except (IndexError, ValueError) as e:
      raise KeyError(f"not a synthetic clip id: {clip_id!r}") from e
    return self.source[index]
