"""Geometry and condition drawing checked against hand-computed projections."""
import numpy as np
import pytest

from cvd_storm_jax.data_pipelines import conditions
from cvd_storm_jax.data_pipelines import geometry
from cvd_storm_jax.data_pipelines import schema

H, W = 90, 160  # 1/10 of nuScenes 900x1600
K0 = np.array([[1266.0, 0.0, 816.0], [0.0, 1266.0, 491.0], [0.0, 0.0, 1.0]])  # at 1600x900


def _sample(boxes=(), classes=(), lidar=(), polylines=(), T=1, V=2, view_mask=None, hw=(H, W)):
  """Hand-built schema sample: view 0 looks forward from (1.5, 0, 1.6), view 1 looks left; ego at the world origin."""
  K = geometry.resize_intrinsics(K0, (900, 1600), hw)
  extr = [geometry.make_rigid(geometry.camera_rotation(np.pi / 2 * v), [1.5, 0.0, 1.6]) for v in range(V)]
  NB, NL, NP = max(len(boxes), 1), max(len(lidar), 1), max(len(polylines), 1)
  NK = max([len(p[0]) for p in polylines] + [2])
  s = {
      "images": np.zeros((T, V, *hw, 3), np.uint8),
      "view_mask": np.ones(V, bool) if view_mask is None else np.asarray(view_mask),
      "intrinsics": np.broadcast_to(K, (T, V, 3, 3)).astype(np.float32),
      "cam_to_ego": np.broadcast_to(np.stack(extr), (T, V, 4, 4)).astype(np.float32),
      "ego_to_world": np.broadcast_to(np.eye(4), (T, 4, 4)).astype(np.float32),
      "timestamps": np.arange(T, dtype=np.float64) / 10,
      "fps": np.float32(10),
      "boxes": np.zeros((T, NB, 7), np.float32), "box_class": np.full((T, NB), -1, np.int32),
      "box_track_id": np.full((T, NB), -1, np.int32), "box_mask": np.zeros((T, NB), bool),
      "map_points": np.zeros((NP, NK, 3), np.float32), "map_class": np.full((NP,), -1, np.int32),
      "map_mask": np.zeros((NP, NK), bool),
      "lidar_points": np.zeros((T, NL, 3), np.float32), "lidar_mask": np.zeros((T, NL), bool),
      "captions": np.full((T, V), "", object), "dataset": "synthetic", "clip_id": "hand",
      "original_size": np.tile(np.array([[1600, 900]], np.int32), (V, 1)),
  }
  for i, (b, c) in enumerate(zip(boxes, classes)):
    s["boxes"][:, i] = b
    s["box_class"][:, i] = c
    s["box_track_id"][:, i] = i
    s["box_mask"][:, i] = True
  for i, p in enumerate(lidar):
    s["lidar_points"][:, i] = p
    s["lidar_mask"][:, i] = True
  for i, (pts, c) in enumerate(polylines):
    s["map_points"][i, :len(pts)] = pts
    s["map_mask"][i, :len(pts)] = True
    s["map_class"][i] = c
  schema.validate(s)
  return s


def _proj(p_ego, v=0, hw=(H, W)):
  s = _sample(hw=hw, V=max(v + 1, 2))
  uv, z, _ = geometry.project_ego_points(np.asarray([p_ego], float), s["intrinsics"][0, v], s["cam_to_ego"][0, v])
  return uv[0], z[0]


def test_lidar_point_lands_on_expected_pixel_with_depth():
  # A point 20 m ahead of the front camera, 2 m right, 0.6 m below it: by hand u = cx + fx*2/20, v = cy + fy*0.6/20.
  K = geometry.resize_intrinsics(K0, (900, 1600), (H, W))
  p = np.array([21.5, -2.0, 1.0])
  u = K[0, 2] + K[0, 0] * 2.0 / 20.0
  v = K[1, 2] + K[1, 1] * 0.6 / 20.0
  # A farther point on the same ray must lose; a point behind the camera must not appear.
  far = np.array([1.5 + 40.0, -4.0, 1.6 - 1.2])
  behind = np.array([-18.5, 2.0, 1.0])
  s = _sample(lidar=[far, p, behind])
  depth = conditions.depth_maps(s)
  assert depth.shape == (1, 2, H, W) and depth.dtype == np.float32
  row, col = int(np.floor(v + 0.5)), int(np.floor(u + 0.5))
  assert depth[0, 0, row, col] == pytest.approx(20.0, abs=1e-4)
  assert np.count_nonzero(depth[0, 0]) == 1  # the far point fell on the same pixel and lost
  # The left camera does not see points ahead; the behind point projects nowhere.
  assert np.count_nonzero(depth[0, 1]) == 0
  # At another resolution the pixel moves with the rescaled intrinsics.
  d2 = conditions.depth_maps(s, (45, 80))
  K2 = geometry.resize_intrinsics(K0, (900, 1600), (45, 80))
  u2, v2 = K2[0, 2] + K2[0, 0] * 0.1, K2[1, 2] + K2[1, 1] * 0.03
  assert d2[0, 0, int(np.floor(v2 + 0.5)), int(np.floor(u2 + 0.5))] == pytest.approx(20.0, abs=1e-4)


def test_box_faces_are_planar_quads_with_outward_normals():
  # The synthetic renderer draws the faces whose outward normal points at the camera (back-face culling).
  box = np.array([3.0, -2.0, 0.8, 4.5, 2.0, 1.6, 0.7])
  faces = geometry.box_faces(box[None])[0]  # [6, 4, 3]
  n = np.cross(faces[:, 1] - faces[:, 0], faces[:, 2] - faces[:, 0])
  out = faces.mean(1) - box[:3]  # from the box centre to each face centre
  assert (np.einsum("fi,fi->f", n, out) > 0).all()
  assert np.allclose(np.einsum("fi,fi->f", n, faces[:, 3] - faces[:, 0]), 0.0)  # the 4th corner is on the plane
  assert sorted(map(tuple, np.sort(geometry.BOX_FACES, axis=1))) == sorted(  # the six faces of the box
      [(0, 1, 2, 3), (4, 5, 6, 7), (0, 3, 4, 7), (1, 2, 5, 6), (2, 3, 6, 7), (0, 1, 4, 5)])


def test_box_edges_drawn_where_projection_says():
  box = np.array([15.0, 1.0, 0.8, 4.5, 2.0, 1.6, 0.4])  # a car ahead-left, yawed
  s = _sample(boxes=[box], classes=[1], hw=(180, 320))
  img = conditions.box_images(s)[0, 0]
  assert img.shape == (180, 320, 3)
  color = np.array(schema.BOX_COLORS[1])
  corners = geometry.box_corners(box)
  K, E = s["intrinsics"][0, 0], s["cam_to_ego"][0, 0]
  checked = 0
  for a, b in geometry.BOX_EDGES:  # all 14 lines, diagonals included
    for f in np.linspace(0.1, 0.9, 5):
      uv, z, ok = geometry.project_ego_points((corners[a] + f * (corners[b] - corners[a]))[None], K, E)
      assert ok[0]
      c, r = int(np.floor(uv[0, 0] + 0.5)), int(np.floor(uv[0, 1] + 0.5))
      # Rasterising a 2 px line puts the centre pixel or its neighbour on the line: allow one pixel.
      assert np.all(img[r - 1:r + 2, c - 1:c + 2] == color, axis=-1).any(), (a, b, f, uv)
      checked += 1
  assert checked == 14 * 5
  # Nothing else than the class colour and black; nothing far from the box.
  colours = np.unique(img.reshape(-1, 3), axis=0)
  assert len(colours) == 2
  uv_all, _, _ = geometry.project_ego_points(corners, K, E)
  rows, cols = np.nonzero(img.any(-1))
  assert cols.min() >= uv_all[:, 0].min() - 3 and cols.max() <= uv_all[:, 0].max() + 3
  # Line width: 8 px at 1600x900 -> 1.6 px at 320x180 -> 2 px.
  assert conditions.scaled_line_width(8, (180, 320), (900, 1600)) == 2
  assert conditions.scaled_line_width(8, (256, 448), (900, 1600)) == 2
  assert conditions.scaled_line_width(8, (900, 1600), (900, 1600)) == 8
  # The heading diagonals sit on the front face: a box facing away shows them, its mirror (yaw+pi) does not draw them
  # at the same place.
  flipped = box.copy()
  flipped[6] += np.pi
  img_f = conditions.box_images(_sample(boxes=[flipped], classes=[1], hw=(180, 320)))[0, 0]
  assert not np.array_equal(img, img_f)


def test_near_plane_clipping_for_box_straddling_camera():
  # The front camera sits at ego (1.5, 0, 1.6). This box spans ego x in [0.5, 3.5] (camera z in [-1, 2]) and lies
  # 1..3 m to the right (camera x in [1, 3]). Its visible part therefore projects right of cx only; an unclipped
  # projection of the corners behind the camera would mirror them to the left half.
  box = np.array([2.0, -2.0, 1.6, 3.0, 2.0, 1.0, 0.0])
  s = _sample(boxes=[box], classes=[0])
  img = conditions.box_images(s)[0, 0]
  K = s["intrinsics"][0, 0]
  cols = np.nonzero(img.any(-1))[1]
  assert cols.size > 0
  assert cols.min() > K[0, 2]
  assert np.all(img[img.any(-1)] == np.array(schema.BOX_COLORS[0]))
  # The naive projection would have put corners left of the centre (so the check above can fail).
  uv, z, _ = geometry.project_ego_points(geometry.box_corners(box), K, s["cam_to_ego"][0, 0], near=0.1)
  assert np.any((uv[:, 0] < K[0, 2]) & (z < 0))


def test_map_lines_only_out_to_range():
  # A lane line across the road 60 m ahead, from y=-40 to 40: clipped to |y| <= sqrt(65^2 - 60^2) = 25.
  # One at 70 m must vanish entirely.
  near_line = np.stack([np.full(81, 60.0), np.linspace(-40, 40, 81), np.zeros(81)], -1)
  far_line = np.stack([np.full(11, 70.0), np.linspace(-5, 5, 11), np.zeros(11)], -1)
  s = _sample(polylines=[(near_line, 1), (far_line, 2)], hw=(450, 800))
  img = conditions.map_images(s)[0, 0]
  assert np.all(img[img.any(-1)] == np.array(schema.MAP_COLORS[1]))  # no red (the crosswalk class) anywhere
  cols = np.nonzero(img.any(-1))[1]
  (u_left, _), _ = _proj([60.0, 25.0, 0.0], hw=(450, 800))
  (u_right, _), _ = _proj([60.0, -25.0, 0.0], hw=(450, 800))
  assert abs(cols.min() - u_left) <= 3 and abs(cols.max() - u_right) <= 3
  # The same world line seen from an ego that drove 20 m forward is now 40 m ahead and entirely in range.
  s2 = dict(s)
  s2["ego_to_world"] = geometry.make_rigid(np.eye(3), [20.0, 0, 0])[None].astype(np.float32)
  img2 = conditions.map_images(s2)[0, 0]
  assert np.any(np.all(img2 == np.array(schema.MAP_COLORS[2]), -1))
  with pytest.raises(ValueError, match="map_class"):
    bad = dict(s)
    bad["map_class"] = np.array([7, 1], np.int32)
    conditions.map_images(bad)


def test_camera_params_against_hand_computed():
  s = _sample(T=2, V=3, view_mask=[True, True, False], hw=(64, 112))
  s["fps"] = np.float32(12)
  p = conditions.camera_params(s)
  assert p.shape == (2, 3, 11) and p.dtype == np.float32
  # Front camera: z axis = ego +x, origin (1.5, 0, 1.6); K at 1600x900.
  want = [12, 1266 / 900, 1266 / 900, 816 / 1600, 491 / 900, 1, 0, 0, 1.5, 0, 1.6]
  np.testing.assert_allclose(p[0, 0], want, atol=1e-5)
  # Left camera: z axis = ego +y.
  np.testing.assert_allclose(p[1, 1, 5:8], [0, 1, 0], atol=1e-6)
  np.testing.assert_array_equal(p[:, 2], 0)  # padded slot
  s["original_size"][2] = 0  # readers leave padded slots at 0: still finite zeros, not NaN
  np.testing.assert_array_equal(conditions.camera_params(s)[:, 2], 0)
  # Without original_size the current image size normalises.
  s.pop("original_size")
  K = s["intrinsics"][0, 0]
  np.testing.assert_allclose(conditions.camera_params(s)[0, 0, 1:5],
                             [K[0, 0] / 64, K[1, 1] / 64, K[0, 2] / 112, K[1, 2] / 64], rtol=1e-5)


def test_view_adjacency_ring_and_identity():
  adj = conditions.view_adjacency(np.ones(6, bool))
  for v in range(6):
    assert set(np.flatnonzero(adj[v])) == {v, (v - 1) % 6, (v + 1) % 6}
  # Waymo: 5 real views, the back slot 3 padded -> the chain SIDE_RIGHT (2) .. FRONT (0) .. SIDE_LEFT (4), without
  # linking the two side cameras across the missing back camera (OpenDWM's chain); slot 3 only itself.
  adj = conditions.view_adjacency(np.array([1, 1, 1, 0, 1, 1], bool))
  assert set(np.flatnonzero(adj[0])) == {5, 0, 1}
  assert set(np.flatnonzero(adj[2])) == {1, 2}
  assert set(np.flatnonzero(adj[4])) == {4, 5}
  assert set(np.flatnonzero(adj[3])) == {3}
  np.testing.assert_array_equal(adj, adj.T)
  np.testing.assert_array_equal(conditions.view_adjacency(np.ones(6, bool), "opendv"), np.eye(6, dtype=bool))
  np.testing.assert_array_equal(conditions.view_adjacency(np.array([1, 0, 0], bool)), np.eye(3, dtype=bool))


def test_resize_sample_and_add_conditions():
  p = np.array([21.5, -2.0, 1.0])
  s = _sample(boxes=[np.array([15.0, 1.0, 0.8, 4.5, 2.0, 1.6, 0.4])], classes=[2], lidar=[p])
  s["images"][:] = 200
  s["sky_mask"] = np.zeros((1, 2, H, W), bool)
  s["sky_mask"][:, :, : H // 2] = True
  r = conditions.resize_sample(s, 45, 80)
  assert r["images"].shape == (1, 2, 45, 80, 3) and np.all(r["images"] == 200)
  # Nearest sampling at target pixel centres: row 22 samples source row 45, the first non-sky one.
  assert r["sky_mask"].shape == (1, 2, 45, 80) and r["sky_mask"][0, 0, :22].all() and not r["sky_mask"][0, 0, 22:].any()
  # The projected pixel (in pixel-centre units) scales with the image.
  uv0, _, _ = geometry.project_ego_points(p[None], s["intrinsics"][0, 0], s["cam_to_ego"][0, 0])
  uv1, _, _ = geometry.project_ego_points(p[None], r["intrinsics"][0, 0], r["cam_to_ego"][0, 0])
  np.testing.assert_allclose((uv1[0] + 0.5), (uv0[0] + 0.5) * 0.5, atol=1e-4)
  # camera_params do not depend on the training resolution (original_size carries the scale), even when the
  # aspect ratio changes.
  np.testing.assert_allclose(conditions.camera_params(conditions.resize_sample(s, 64, 64)),
                             conditions.camera_params(s), rtol=1e-5, atol=1e-6)
  full = conditions.add_conditions(r)
  dims = schema.validate(full, derived=True)
  assert (dims["H"], dims["W"]) == (45, 80)
  assert full["depth"].max() == pytest.approx(20.0, abs=1e-4)
  with pytest.raises(ValueError, match="resize_sample"):
    conditions.add_conditions(r, (90, 160))
  # Drawing into preallocated (non-zero) batch rows gives the same result without allocating.
  rows = {"box_images": np.full((2, 1, 2, 45, 80, 3), 7, np.uint8), "map_images": np.full((2, 1, 2, 45, 80, 3), 7,
                                                                                              np.uint8),
          "depth": np.full((2, 1, 2, 45, 80), 7, np.float32), "images": np.zeros((2, 1, 2, 45, 80, 3), np.uint8)}
  r2 = conditions.resize_sample(s, 45, 80, images_out=rows["images"][1])
  in_place = conditions.add_conditions(r2, out={k: rows[k][1] for k in ("box_images", "map_images", "depth")})
  for k in ("images", "box_images", "map_images", "depth"):
    np.testing.assert_array_equal(rows[k][1], full[k], err_msg=k)
    assert np.shares_memory(in_place[k], rows[k])
  with pytest.raises(ValueError, match="box_images: out"):
    conditions.box_images(r, out=np.zeros((1, 2, 45, 81, 3), np.uint8))


def test_near_plane_clipping_keeps_segments_that_cross_it():
  """A segment from behind the camera to in front is kept and cut at the near plane (lane lines beside the car)."""
  seg = np.array([[[0.0, 0.0, -1.0], [0.0, 3.0, 2.0]], [[0.0, 0.0, -1.0], [1.0, 0.0, -0.5]]])
  clipped, keep = geometry.clip_segments_near(seg, near=0.5)
  assert keep.tolist() == [True, False]
  np.testing.assert_allclose(clipped[0, 0], [0.0, 1.5, 0.5])
  np.testing.assert_allclose(clipped[0, 1], [0.0, 3.0, 2.0])


def test_segments_are_drawn_at_the_nearest_pixel():
  """Pixel centres at integer coordinates (OpenCV intrinsics): v = 10.6 is drawn on row 11, u = 3.4 starts at col 3."""
  img = conditions.draw_segments((20, 30), np.array([[[3.4, 10.6], [25.0, 10.6]]]), np.array([[255, 0, 0]]), 1)
  rows = np.flatnonzero(img[..., 0].any(axis=1))
  assert rows.tolist() == [11] and np.flatnonzero(img[11, :, 0])[0] == 3
