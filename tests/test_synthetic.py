"""The synthetic clip generator: schema, determinism and geometric consistency of all fields."""
import numpy as np
import pytest

from cvd_storm_jax.data_pipelines import conditions
from cvd_storm_jax.data_pipelines import geometry
from cvd_storm_jax.data_pipelines import schema
from cvd_storm_jax.data_pipelines import synthetic

OPTS = synthetic.SyntheticOptions(height=64, width=112, num_frames=3, max_boxes=16, max_lidar_points=4096)


@pytest.fixture(scope="module")
def clips():
  return [synthetic.generate_clip(7, i, OPTS) for i in range(4)]


def test_schema_and_determinism(clips):
  for s in clips:
    dims = schema.validate(s)
    assert dims == {"T": 3, "V": 6, "H": 64, "W": 112, "NB": 16, "NP": 12, "NK": 48, "NL": 4096}
    assert s["sky_mask"].shape == (3, 6, 64, 112) and s["sky_mask"].dtype == bool
    np.testing.assert_array_equal(s["original_size"], np.tile([[1600, 900]], (6, 1)))
    assert s["box_mask"].any() and s["lidar_mask"].any() and s["map_mask"].any()
    np.testing.assert_allclose(s["timestamps"], [0.0, 0.1, 0.2])
  again = synthetic.generate_clip(7, 2, OPTS)
  for k, v in clips[2].items():
    if isinstance(v, np.ndarray):
      np.testing.assert_array_equal(v, again[k], err_msg=k)
    else:
      assert v == again[k]
  assert not np.array_equal(clips[0]["images"], clips[1]["images"])
  assert clips[0]["clip_id"] != clips[1]["clip_id"]
  src = synthetic.SyntheticSource(5, seed=7, options=OPTS)
  assert len(src) == 5
  np.testing.assert_array_equal(src[1]["images"], clips[1]["images"])
  with pytest.raises(IndexError):
    src[5]
  with pytest.raises(KeyError, match="bogus"):
    synthetic.options_from_config({"bogus": 1})
  stride = synthetic.generate_clip(7, 0, synthetic.SyntheticOptions(height=32, width=56, num_frames=2, frame_stride=3))
  assert stride["fps"] == pytest.approx(10 / 3)
  np.testing.assert_allclose(stride["timestamps"], [0.0, 0.3])


def test_tracks_are_consistent(clips):
  for s in clips:
    m = s["box_mask"]
    np.testing.assert_array_equal(m, m[:1].repeat(3, 0))  # every track present in every frame
    np.testing.assert_array_equal(s["box_track_id"], s["box_track_id"][:1].repeat(3, 0))
    n = m[0].sum()
    # World-frame centres move with (nearly) constant velocity: the second difference is tiny (the bend of the
    # road curves the paths by a few millimetres per frame at most).
    world = np.stack([geometry.transform_points(s["ego_to_world"][t].astype(np.float64), s["boxes"][t, :n, :3])
                      for t in range(3)])
    assert np.abs(world[2] - 2 * world[1] + world[0]).max() < 0.02
    assert np.all(s["boxes"][:, :n, 2] > 0)  # boxes stand on the ground (centre above z = 0)
    # The ego drives forward along its own x axis.
    step = np.linalg.inv(s["ego_to_world"][0]) @ s["ego_to_world"][1]
    assert step[0, 3] > 0.3 and abs(step[1, 3]) < 0.1


def test_lidar_lies_on_ground_or_box_surfaces(clips):
  for s in clips:
    for t in range(3):
      pts = s["lidar_points"][t][s["lidar_mask"][t]].astype(np.float64)
      boxes = s["boxes"][t][s["box_mask"][t]].astype(np.float64)
      on_ground = np.abs(pts[:, 2]) < 1e-3
      # Distance to each box surface in the box frame: max over axes of |p| - half (0 on the surface).
      rel = pts[:, None, :3] - boxes[None, :, :3]
      c, sn = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
      local = np.stack([c * rel[..., 0] + sn * rel[..., 1], -sn * rel[..., 0] + c * rel[..., 1], rel[..., 2]], -1)
      surf = np.abs(np.abs(local) - boxes[None, :, 3:6] / 2)
      inside = np.all(np.abs(local) <= boxes[None, :, 3:6] / 2 + 1e-3, axis=-1)
      on_box = (inside & (surf.min(-1) < 1e-3)).any(-1)
      assert np.all(on_ground | on_box)
      assert on_box.any(), "some beams must hit boxes"


def test_depth_agrees_with_rendered_images(clips):
  for s in clips:
    depth = conditions.depth_maps(s)
    has = depth > 0
    assert has.sum() > 500
    # LiDAR never returns from the sky: pixels with depth are (almost) never sky pixels (box silhouettes can be off
    # by one rasterised pixel).
    assert (s["sky_mask"] & has).sum() <= 0.01 * has.sum()
  # Day scenes: the top rows of the front camera are sky, the bottom rows are not.
  day = [s for s in clips if "day" in s["captions"][0, 0]]
  assert day
  for s in day:
    assert s["sky_mask"][:, 0, :3].mean() > 0.9 and not s["sky_mask"][:, 0, -3:].any()


def test_centre_line_rendered_where_map_says():
  """On a day clip with one lane per direction, the map's only lane line (the yellow centre line) projects onto
  yellow pixels of the front camera."""
  opts = synthetic.SyntheticOptions(height=128, width=224, num_frames=1, max_boxes=3)
  checked = 0
  for i in range(40):
    s = synthetic.generate_clip(3, i, opts)
    cap = s["captions"][0, 0]
    if not ("day" in cap and "2-lane" in cap and "clear" in cap):
      continue
    line = s["map_points"][s["map_class"] == 1][0].astype(np.float64)  # world frame
    ego = geometry.transform_points(np.linalg.inv(s["ego_to_world"][0].astype(np.float64)), line)
    pts = ego[(ego[:, 0] > 6) & (ego[:, 0] < 14)]
    if not len(pts):
      continue
    p = pts[0]
    uv, z, ok = geometry.project_ego_points(p[None], s["intrinsics"][0, 0], s["cam_to_ego"][0, 0])
    # Skip when a box may cover that pixel (no box within 30 m ahead in its lateral band).
    b = s["boxes"][0][s["box_mask"][0]]
    if np.any((b[:, 0] > 0) & (b[:, 0] < 30) & (np.abs(b[:, 1] - p[1]) < 4)):
      continue
    col, row = int(np.floor(uv[0, 0] + 0.5)), int(np.floor(uv[0, 1] + 0.5))
    patch = s["images"][0, 0, row - 1:row + 2, col - 1:col + 2].reshape(-1, 3).astype(int)
    yellow = (patch[:, 0] > 150) & (patch[:, 1] > 120) & (patch[:, 2] < 100)
    assert yellow.any(), (i, patch)
    checked += 1
    if checked == 2:
      break
  assert checked >= 1


def test_captions_describe_scene(clips):
  for s in clips:
    cap = s["captions"]
    assert cap.shape == (3, 6) and all(isinstance(c, str) and c for c in cap.reshape(-1))
    assert any(t in cap[0, 0] for t in synthetic.TIMES)
    for v, name in enumerate(synthetic.CAMERA_NAMES):
      assert f"The {name} camera" in cap[0, v]
