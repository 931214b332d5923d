"""Tests of the 3D Gaussian rasterizer (cvd_storm_jax.kernels): tiled XLA and Pallas-interpret vs the dense
reference, gradients, float64 finite differences, edge cases, overflow accounting, jit/vmap/shard_map, geometry."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from cvd_storm_jax import kernels as K
from cvd_storm_jax.kernels import projection as pj

W, H = 48, 32


def look_at(eye, target, up=(0.0, 0.0, 1.0)):
  """World-to-camera matrix (OpenCV axes) of a camera at `eye` looking at `target`."""
  eye, target, up = (np.asarray(v, np.float64) for v in (eye, target, up))
  fwd = target - eye
  fwd /= np.linalg.norm(fwd)
  right = np.cross(fwd, up)
  right /= np.linalg.norm(right)
  down = np.cross(fwd, right)
  r = np.stack([right, down, fwd])
  m = np.eye(4)
  m[:3, :3] = r
  m[:3, 3] = -r @ eye
  return m


def random_scene(seed, n=300, k=3, c=3, width=W, height=H, dtype=np.float32):
  """Anisotropic, overlapping Gaussians around the origin seen by k cameras on a ring; a few huge, a few tiny,
  some behind camera 0, some off-screen."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(n, 3)) * np.array([1.5, 1.5, 0.8])
  means[: n // 10] = rng.normal(size=(n // 10, 3)) * 12.0  # wide: many off-screen for some cameras
  quats = rng.normal(size=(n, 4))
  scales = np.exp(rng.normal(-2.3, 0.8, size=(n, 3)))
  scales[n // 10: n // 10 + n // 20] *= 15.0  # huge
  scales[n // 5: n // 5 + n // 20] *= 1e-3  # tiny
  opac = rng.uniform(0.05, 1.0, size=n)
  feats = rng.normal(size=(n, c))
  views, ks = [], []
  for i in range(k):
    ang = 2 * np.pi * i / k + 0.3
    eye = np.array([6 * np.cos(ang), 6 * np.sin(ang), 1.0 + 0.3 * i])
    views.append(look_at(eye, rng.normal(size=3) * 0.3))
    if i == 0:  # behind camera 0 and between its near plane and the lens
      back = eye + (eye - rng.normal(size=3) * 0.3) / np.linalg.norm(eye) * rng.uniform(0.05, 3, size=(n // 20, 1))
      means[n // 2: n // 2 + n // 20] = back
    f = rng.uniform(30, 60)
    ks.append(np.array([[f, 0, width / 2 + rng.normal()], [0, f * 1.05, height / 2 + rng.normal()], [0, 0, 1]]))
  return tuple(jnp.asarray(x, dtype) for x in (means, quats, scales, opac, feats, np.stack(views), np.stack(ks)))


def loss_and_outputs(backend, params, cams, bg, **kw):
  """A loss touching every output with fixed pseudo-random weights; returns (loss, RenderOutput)."""
  out = K.rasterize(*params, *cams, W, H, background=bg, backend=backend, **kw)
  wf = jnp.sin(jnp.arange(out.features.size, dtype=out.features.dtype)).reshape(out.features.shape)
  wd = jnp.cos(jnp.arange(out.depth.size, dtype=out.depth.dtype)).reshape(out.depth.shape)
  return jnp.sum(out.features * wf) + 0.05 * jnp.sum(out.depth * wd) + jnp.sum(out.alpha * wd[::-1]), out


@jax.jit
def _project(means, quats, scales, views, ks):
  return K.project(means, quats, scales, views, ks, W, H, 0.2, 400.0)


VARIANTS = {"pallas_rows": ("pallas", dict(pallas_reduction="rows"))}  # the Pallas backward's other reduction


@functools.lru_cache(maxsize=None)
def _value_and_grad(backend):
  backend, kw = VARIANTS.get(backend, (backend, {}))
  return jax.jit(jax.value_and_grad(lambda p, c, b: loss_and_outputs(backend, p, c, b, **kw), argnums=(0, 2),
                                    has_aux=True))


@pytest.fixture(scope="module")
def scene_c7():
  """K=3, C=7, per-camera background; rendered with value_and_grad once per backend."""
  s = random_scene(0, n=400, k=3, c=7)
  params, cams = s[:5], s[5:]
  bg = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7)), jnp.float32)
  res = {b: _value_and_grad(b)(params, cams, bg) for b in ("reference", "xla", "pallas", "pallas_rows")}
  return s, res


def _close(got, want, rel=1e-5, name=""):
  got, want = np.asarray(got), np.asarray(want)
  assert np.all(np.isfinite(got)), name
  scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-6)
  err = float(np.max(np.abs(got - want), initial=0.0))
  assert err <= rel * scale, f"{name}: max abs err {err:.3g} > {rel:g} x {scale:.3g}"


def test_scene_exercises_the_rules(scene_c7):
  s, res = scene_c7
  out = res["reference"][0][1]
  proj = _project(*s[:3], *s[5:])
  z = np.einsum("kij,nj->kni", np.asarray(s[5])[:, :3, :3], np.asarray(s[0])) + np.asarray(s[5])[:, None, :3, 3]
  z = z[..., 2]
  assert (z[0] < 0.2).sum() >= 15  # behind / too close to camera 0
  assert (~np.asarray(proj.valid)).sum() > (z < 0.2).sum()  # plus off-screen culls
  a = np.asarray(out.alpha)
  assert (a > 0.9998).mean() > 0.05 and (a < 0.9).mean() > 0.05  # both saturated (T cut) and thin pixels
  assert int(res["xla"][0][1].overflow) == 0


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_forward_matches_reference_c7(scene_c7, backend):
  _, res = scene_c7
  ref, got = res["reference"][0][1], res[backend][0][1]
  assert int(got.overflow) == 0
  for name in ("features", "depth", "alpha"):
    _close(getattr(got, name), getattr(ref, name), 1e-5, f"{backend} {name}")


@pytest.mark.parametrize("backend", ["xla", "pallas", "pallas_rows"])
def test_gradients_match_reference(scene_c7, backend):
  _, res = scene_c7
  (g_ref, gbg_ref), (g, gbg) = res["reference"][1], res[backend][1]
  for name, a, b in zip(("means", "quats", "scales", "opacities", "features"), g, g_ref):
    assert float(jnp.max(jnp.abs(b))) > 0, name
    _close(a, b, 2e-5, f"{backend} d{name}")
  _close(gbg, gbg_ref, 1e-5, f"{backend} dbackground")


def test_forward_matches_reference_c3_shared_background_ragged_tiles():
  w, h = 44, 27  # not multiples of the tile size: padded last tile row/column
  s = random_scene(3, n=250, k=2, c=3, width=w, height=h)
  bg = jnp.array([0.2, -0.1, 0.7])
  ref = K.rasterize(*s, w, h, background=bg, backend="reference")
  assert ref.features.shape == (2, h, w, 3)
  for backend, kw in (("xla", dict(chunk=16)), ("pallas", dict(chunk=8))):
    got = K.rasterize(*s, w, h, background=bg, backend=backend, **kw)
    assert int(got.overflow) == 0
    for name in ("features", "depth", "alpha"):
      _close(getattr(got, name), getattr(ref, name), 1e-5, f"{backend} {name}")


def test_early_exit_when_tiles_saturate():
  """Opaque walls in front: every pixel stops after a few splats, so the tiled loops exit after the first chunk and
  the gradient slots of the splats behind are never written (they must stay exactly zero, as in the reference)."""
  rng = np.random.default_rng(8)
  n_front, n_walls, n_back = 6, 4, 54
  walls = np.stack([np.zeros(n_walls), np.zeros(n_walls), 2.0 + 0.2 * np.arange(n_walls)], -1)
  front = np.concatenate([rng.uniform(-0.3, 0.3, size=(n_front, 2)), rng.uniform(1.0, 1.8, size=(n_front, 1))], -1)
  back = np.concatenate([rng.uniform(-2, 2, size=(n_back, 2)), rng.uniform(4, 8, size=(n_back, 1))], -1)
  means = np.concatenate([front, walls, back])
  n = means.shape[0]
  scales = np.concatenate([np.full((n_front, 3), 0.05), np.tile([[5.0, 5.0, 0.01]], (n_walls, 1)),
                           np.full((n_back, 3), 0.3)])
  opac = np.concatenate([np.full(n_front, 0.5), np.ones(n_walls), np.full(n_back, 0.8)])
  quats = rng.normal(size=(n, 4))
  quats[n_front:n_front + n_walls] = [1, 0, 0, 0]  # walls face the camera
  params = tuple(jnp.asarray(x, jnp.float32) for x in (means, quats, scales, opac, rng.normal(size=(n, 3))))
  cams = (jnp.eye(4)[None], jnp.array([[[40.0, 0, 24], [0, 40, 16], [0, 0, 1]]]))
  res = {b: jax.jit(jax.value_and_grad(lambda p, b=b: loss_and_outputs(b, p, cams, None, chunk=8), has_aux=True))(
      params) for b in ("reference", "xla", "pallas")}
  ref_out, ref_g = res["reference"][0][1], res["reference"][1]
  # Every pixel terminated at the walls (T would reach <= 1e-4 there; the stopping splat is excluded, so alpha can
  # stay at ~0.99), and nothing behind them contributes.
  assert float(jnp.min(ref_out.alpha)) > 0.98
  assert np.all(np.asarray(ref_g[4][n_front + n_walls:]) == 0)
  assert float(jnp.min(jnp.abs(ref_g[4][:n_front]))) > 0
  for b in ("xla", "pallas"):
    (_, out), g = res[b]
    _close(out.features, ref_out.features, 1e-5, f"{b} features")
    for name, a, r in zip(("means", "quats", "scales", "opacities", "features"), g, ref_g):
      if name == "quats":  # isotropic front splats and camera-facing walls: ~0 up to rounding
        assert float(jnp.max(jnp.abs(a))) < 1e-5 and float(jnp.max(jnp.abs(r))) < 1e-5
      else:
        _close(a, r, 2e-5, f"{b} d{name}")
      assert np.all(np.asarray(a[n_front + n_walls:]) == 0), f"{b} d{name} behind the walls"


def _sequential_oracle(proj, opac, feats, tile_size=16):
  """gsplat's per-pixel loop in plain Python (one camera): tile membership, 1/255 skip, 0.99 clamp, T cut."""
  m2, con, z, valid, rad = (np.asarray(x[0], np.float64) for x in proj[:2] + (proj.depths, proj.valid, proj.radii))
  tx = -(-W // tile_size)
  ty = -(-H // tile_size)
  x0, x1, y0, y1 = (np.asarray(v[0]) for v in pj.tile_rect(proj.means2d, proj.radii, tile_size, tx, ty))
  order = np.argsort(np.where(valid > 0, z, np.inf), kind="stable")
  f = np.zeros((H, W, feats.shape[1]))
  d = np.zeros((H, W))
  t_out = np.ones((H, W))
  for i in range(H):
    for j in range(W):
      t = 1.0
      for g in order:
        if not valid[g] or not (x0[g] <= j // tile_size < x1[g] and y0[g] <= i // tile_size < y1[g]):
          continue
        dx, dy = j + 0.5 - m2[g, 0], i + 0.5 - m2[g, 1]
        sig = 0.5 * (con[g, 0] * dx * dx + con[g, 2] * dy * dy) + con[g, 1] * dx * dy
        a = min(0.99, opac[g] * np.exp(-sig))
        if sig < 0 or a < 1 / 255:
          continue
        nt = t * (1 - a)
        if nt <= 1e-4:
          break
        f[i, j] += feats[g] * a * t
        d[i, j] += z[g] * a * t
        t = nt
      t_out[i, j] = t
  return f, d, t_out


def test_reference_matches_sequential_loop():
  s = random_scene(5, n=150, k=1, c=2)
  s = s[:2] + (s[2] * 1.5, 0.6 + 0.4 * s[3]) + s[4:]  # opaque: many pixels hit the T cut
  proj = _project(*s[:3], *s[5:])
  f, d, t = _sequential_oracle(proj, np.asarray(s[3], np.float64), np.asarray(s[4], np.float64))
  assert (t < 1e-3).mean() > 0.05
  out = K.rasterize(*s, W, H, backend="reference")
  np.testing.assert_allclose(out.features[0], f, atol=2e-5)
  np.testing.assert_allclose(out.depth[0], d, atol=1e-4)
  np.testing.assert_allclose(out.alpha[0], 1 - t, atol=2e-6)


def test_reference_gradients_vs_finite_differences_float64():
  with jax.enable_x64(True):
    s = random_scene(7, n=12, k=2, c=2, dtype=np.float64)
    s = s[:2] + (s[2] * 3,) + s[3:]
    params, cams = s[:5], s[5:]
    rng = np.random.default_rng(0)

    def f(p):
      return loss_and_outputs("reference", p, cams, None)[0]

    grads = jax.grad(f)(params)
    eps = 1e-6
    for i, name in enumerate(("means", "quats", "scales", "opacities", "features")):
      v = jnp.asarray(rng.normal(size=params[i].shape))
      plus = list(params)
      minus = list(params)
      plus[i] = params[i] + eps * v
      minus[i] = params[i] - eps * v
      fd = (f(tuple(plus)) - f(tuple(minus))) / (2 * eps)
      an = jnp.sum(grads[i] * v)
      assert abs(float(an)) > 1e-3, name
      np.testing.assert_allclose(float(an), float(fd), rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
def test_edge_cases_are_finite(backend):
  rng = np.random.default_rng(2)
  _, _, _, _, _, views, ks = random_scene(2, n=8, k=2, c=3)
  bg = jnp.array([0.5, 0.25, 1.0])
  run = jax.jit(jax.value_and_grad(lambda p, cams: loss_and_outputs(backend, p, cams, bg), has_aux=True))

  # N = 0: background only, empty gradients.
  empty = (jnp.zeros((0, 3)), jnp.zeros((0, 4)), jnp.zeros((0, 3)), jnp.zeros((0,)), jnp.zeros((0, 3)))
  (_, out), g = run(empty, (views, ks))
  np.testing.assert_array_equal(out.alpha, 0.0)
  np.testing.assert_array_equal(out.features, jnp.broadcast_to(bg, out.features.shape))
  assert all(x.shape[0] == 0 for x in g)
  # Everything behind both cameras (or in front of the lens but nearer than `near`).
  n = 40
  back = jnp.stack([jnp.asarray(look_at((0, 0, 0), (1, 0, 0.1))), jnp.asarray(look_at((0, 0, 0), (0, 1, -0.1)))])
  means = np.concatenate([rng.normal(size=(n - 2, 3)) * 0.5 + [-4, -4, 0], [[0.1, 0, 0], [0, 0.05, 0]]])
  params = (jnp.asarray(means, jnp.float32), jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
            jnp.full((n, 3), 0.3), jnp.full((n,), 0.9), jnp.ones((n, 3)))
  (val, out), g = run(params, (back.astype(jnp.float32), ks))
  np.testing.assert_array_equal(out.alpha, 0.0)
  assert np.isfinite(float(val))
  for x in g:
    assert np.all(np.asarray(x) == 0)
  # Degenerate: zero and tiny scales, a zero quaternion, a Gaussian exactly on a camera centre.
  s = random_scene(4, n=n, k=2, c=3)
  scales = s[2].at[:10].set(0.0).at[10:20].set(1e-9)
  quats = s[1].at[0].set(0.0)
  cam_c = -np.asarray(views)[0, :3, :3].T @ np.asarray(views)[0, :3, 3]
  means = s[0].at[20].set(jnp.asarray(cam_c, jnp.float32))
  (val, out), g = run((means, quats, scales) + s[3:5], (views, ks))
  assert np.isfinite(float(val)) and float(jnp.max(out.alpha)) > 0.1
  for x in g:
    assert np.all(np.isfinite(np.asarray(x)))
  assert float(jnp.max(jnp.abs(g[0]))) > 0


def test_capacity_overflow_is_counted():
  s = random_scene(6, n=200, k=2, c=3)
  k = s[5].shape[0]
  geom = K.Geometry(k, W, H, 16, 3, 2, 32)
  total = int(jax.jit(lambda *a: K.count_intersections(_project(*a), geom))(*s[:3], *s[5:]))
  assert total > 100
  ref = K.rasterize(*s, W, H, backend="reference")
  for backend in ("xla", "pallas"):
    out = K.rasterize(*s, W, H, backend=backend, capacity=100)
    assert int(out.overflow) == total - 100
    assert float(jnp.max(jnp.abs(out.features - ref.features))) > 1e-3  # something really was dropped
  exact = K.rasterize(*s, W, H, backend="xla", capacity=total)
  assert int(exact.overflow) == 0
  _close(exact.features, ref.features, 1e-5, "exact capacity")


def test_transparent_gaussians_take_no_intersections():
  """Gaussians with opacity below 1/255 (STORM-VAE's padded view slots have opacity 0) are culled at projection, as
  in gsplat: they change no output and no gradient, and take no place in the intersection lists."""
  s = random_scene(4, n=200, k=2, c=3)
  faint = random_scene(5, n=200, k=2, c=3)
  faint_opacity = jnp.where(jnp.arange(200) % 2 == 0, 0.0, 0.99 / 255.0)
  both = tuple(jnp.concatenate([a, b]) for a, b in zip(s[:5], faint[:3] + (faint_opacity, faint[4]))) + s[5:]
  k = s[5].shape[0]
  geom = K.Geometry(k, W, H, 16, 3, 2, 32)
  needed = int(jax.jit(lambda *a: K.count_intersections(_project(*a), geom))(*s[:3], *s[5:]))
  with_faint = int(jax.jit(lambda *a: K.count_intersections(_project(*a), geom))(*both[:3], *both[5:]))
  assert with_faint > needed + 100  # without the opacity cull they would need that many more places
  for backend in ("xla", "pallas"):
    loss = lambda p: loss_and_outputs(backend, p, s[5:], None, capacity=needed)
    (l1, out1), g1 = jax.value_and_grad(loss, has_aux=True)(s[:5])
    (l2, out2), g2 = jax.value_and_grad(loss, has_aux=True)(both[:5])
    assert int(out2.overflow) == 0, backend
    for a, b, name in zip(out1[:3], out2[:3], ("features", "depth", "alpha")):
      _close(b, a, 1e-6, f"{backend} {name}")
    for a, b, name in zip(g1, g2, ("means", "quats", "scales", "opacities", "features")):
      _close(b[:200], a, 1e-5, f"{backend} d{name}")
      assert float(jnp.abs(b[200:]).max()) == 0.0, f"{backend} d{name} of the culled"


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_vmap_over_scenes_and_jit(backend):
  # The STORM-VAE renderer vmaps the rasterizer over samples and target times: forward and gradients under vmap.
  scenes = [random_scene(10 + i, n=120, k=2, c=3) for i in range(2)]
  stacked = tuple(jnp.stack(x) for x in zip(*scenes))

  def loss(b, *a):
    out = K.rasterize(*a, W, H, backend=b)
    return jnp.sum(out.features ** 2) + jnp.sum(out.depth), out

  grad = lambda b: jax.value_and_grad(functools.partial(loss, b), argnums=(0, 4), has_aux=True)
  (_, out), g = jax.jit(jax.vmap(grad(backend)))(*stacked)
  for i, sc in enumerate(scenes):
    (_, ref), g_ref = grad("reference")(*sc)
    _close(out.features[i], ref.features, 1e-5, f"scene {i}")
    _close(out.depth[i], ref.depth, 1e-5, f"scene {i} depth")
    _close(g[0][i], g_ref[0], 2e-5, f"scene {i} d means")
    _close(g[1][i], g_ref[1], 2e-5, f"scene {i} d features")
  assert out.overflow.shape == (2,)


def test_shard_map_over_cameras():
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8
  mesh = Mesh(devices, ("cam",))
  s = random_scene(12, n=150, k=8, c=3)
  params, (views, ks) = s[:5], s[5:]

  def local(views, ks, *params):
    out = K.rasterize(*params, views, ks, W, H, backend="xla")
    return out.features, out.alpha, jax.lax.psum(out.overflow, "cam")

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P("cam"), P("cam")) + (P(),) * 5,
                     out_specs=(P("cam"), P("cam"), P()))

  def sharded(m):
    feats, alpha, overflow = fn(views, ks, m, *params[1:])
    return jnp.sum(feats * feats), (feats, alpha, overflow)

  def unsharded(m):
    out = K.rasterize(m, *params[1:], views, ks, W, H, backend="reference")
    return jnp.sum(out.features * out.features), (out.features, out.alpha, out.overflow)

  (_, (feats, alpha, overflow)), g = jax.jit(jax.value_and_grad(sharded, has_aux=True))(params[0])
  (_, (rf, ra, _)), g_ref = jax.jit(jax.value_and_grad(unsharded, has_aux=True))(params[0])
  _close(feats, rf, 1e-5, "sharded features")
  _close(alpha, ra, 1e-5, "sharded alpha")
  assert int(overflow) == 0
  # Means are replicated: their cotangent is summed over the mesh by shard_map's transpose.
  _close(g, g_ref, 2e-5, "sharded d means")


def test_pallas_kernels_lower_to_triton_for_cuda():
  # No GPU in CI: cross-lowering the jitted forward + backward for CUDA (jax.export) runs Pallas's Triton lowering of
  # both kernels for real (op support, block shapes, dtypes), which interpret mode never does.
  from jax import export
  params, cams = random_scene(13, n=64, k=2, c=7)[:5], random_scene(13, n=64, k=2, c=7)[5:]
  triton = "__gpu$xla.gpu.triton"
  for reduction in ("quantities", "rows"):
    loss = lambda *p: loss_and_outputs("pallas", p, cams, None, interpret=False, pallas_reduction=reduction)[0]
    exp = export.export(jax.jit(jax.grad(loss, argnums=tuple(range(5)))), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(*params)
    text = exp.mlir_module()
    assert text.count(f"@{triton}(") == 2, "expected the forward and the backward kernel"
    assert 'name = "gs_composite_fwd"' in text and 'name = "gs_composite_bwd"' in text
    assert "num_warps = 8" in text


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
def test_single_gaussian_lands_on_the_pinhole_pixel(backend):
  f, cx, cy, z = 40.0, 24.0, 16.0, 5.0
  u, v = 28.5, 14.5  # the centre of pixel (row 14, col 28)
  mean = jnp.array([[(u - cx) * z / f, (v - cy) * z / f, z]])
  ks = jnp.array([[[f, 0, cx], [0, f, cy], [0, 0, 1]]])
  out = K.rasterize(mean, jnp.array([[1.0, 0, 0, 0]]), jnp.full((1, 3), 0.1), jnp.array([0.8]), jnp.ones((1, 1)),
                    jnp.eye(4)[None], ks, W, H, backend=backend)
  a = np.asarray(out.alpha[0])
  assert np.unravel_index(np.argmax(a), a.shape) == (14, 28)
  np.testing.assert_allclose(a[14, 27], a[14, 29], rtol=1e-5)  # point-symmetric footprint
  np.testing.assert_allclose(a[13, 27], a[15, 29], rtol=1e-5)
  # Peak alpha: 0.8 exp(0) at the centre; depth = alpha * z (expected depth is not normalised).
  np.testing.assert_allclose(a[14, 28], 0.8, rtol=1e-6)
  np.testing.assert_allclose(out.depth[0, 14, 28], 0.8 * z, rtol=1e-6)
  np.testing.assert_allclose(out.features[0, 14, 28, 0], 0.8, rtol=1e-6)
  # Footprint one pixel to the right: EWA 2D covariance J (0.01 I) J^T + 0.3 I, worked out in numpy.
  x, y = np.asarray(mean[0, :2])
  jac = np.array([[f / z, 0, -f * x / z**2], [0, f / z, -f * y / z**2]])
  cov2 = 0.01 * jac @ jac.T + pj.EPS2D * np.eye(2)
  np.testing.assert_allclose(a[14, 29], 0.8 * np.exp(-0.5 * np.linalg.inv(cov2)[0, 0]), rtol=1e-5)


def test_bad_inputs_raise():
  s = random_scene(0, n=10, k=1, c=3)
  with pytest.raises(ValueError, match="quats"):
    K.rasterize(s[0], s[1][:, :3], *s[2:], W, H)
  with pytest.raises(ValueError, match="background"):
    K.rasterize(*s, W, H, background=jnp.zeros(4))
  with pytest.raises(ValueError, match="backend"):
    K.rasterize(*s, W, H, backend="cuda")
  with pytest.raises(ValueError, match="pallas_reduction"):
    K.rasterize(*s, W, H, backend="xla", pallas_reduction="row")
  for kwargs, match in ((dict(chunk=0), "chunk=0"), (dict(tile_size=0), "tile_size=0"), (dict(capacity=0), "capacity"),
                        (dict(near=0.0), "near"), (dict(near=5.0, far=1.0), "near"),
                        (dict(backend="pallas", tile_size=12), "tile_size=12 must be a power of two")):
    with pytest.raises(ValueError, match=match):
      K.rasterize(*s, W, H, **kwargs)
  with pytest.raises(ValueError, match="K >= 1"):
    K.rasterize(*s[:5], s[5][:0], s[6][:0], W, H)


def test_pallas_runs_with_x64_enabled():
  """The kernels' loop carries stay int32 under jax_enable_x64 (a sum promoted to int64 broke the while_loop)."""
  with jax.enable_x64(True):
    s = random_scene(1, n=30, k=1, c=3)
    _close(K.rasterize(*s, 48, 32, backend="pallas").features, K.rasterize(*s, 48, 32, backend="xla").features, 1e-5,
           "pallas under x64")


def test_intersection_count_saturates_instead_of_wrapping():
  """33,000 Gaussians covering all 65,536 1x1 tiles make 2.16e9 intersections, past int32: the running count used to
  wrap negative, drawing nothing and reporting no overflow."""
  n, side = 33_000, 256
  means = jnp.asarray(np.stack([np.linspace(0, 1e-3, n)] * 2 + [np.full(n, 5.0)], -1), jnp.float32)
  quats, scales = jnp.tile(jnp.array([[1.0, 0, 0, 0]]), (n, 1)), jnp.full((n, 3), 50.0)
  cams = (jnp.eye(4)[None], jnp.array([[[100.0, 0, 128], [0, 100, 128], [0, 0, 1]]]))
  geom = K.Geometry(1, side, side, 1, side, side, 32)
  proj = jax.jit(K.project, static_argnums=(5, 6, 7, 8))(means, quats, scales, *cams, side, side, 0.2, 400.0)
  assert int(K.count_intersections(proj, geom)) == K.tiled_xla.COUNT_LIMIT
  out = K.rasterize(means, quats, scales, jnp.full((n,), 0.5), jnp.ones((n, 1)), *cams, side, side, backend="xla",
                    tile_size=1, capacity=4096)
  assert int(out.overflow) == K.tiled_xla.COUNT_LIMIT - 4096 and float(out.alpha.max()) > 0.4


def _quat_wxyz_to_matrix(q):
  w, x, y, z = q / np.linalg.norm(q)
  return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                   [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                   [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def test_project_matches_an_independent_numpy_ewa():
  """project() (shared by every backend, so backend comparisons cannot see its errors) against EWA splatting written
  out in numpy: rotated camera, fx != fy, anisotropic rotated Gaussians, wxyz quaternions, gsplat's 0.3 px
  dilation and 3-sigma radius."""
  rng = np.random.default_rng(0)
  n, W, H = 20, 64, 48
  means = rng.uniform([-1, -1, 4], [1, 1, 8], (n, 3))
  quats = rng.normal(size=(n, 4))
  quats /= np.linalg.norm(quats, axis=1, keepdims=True)
  scales = rng.uniform(0.05, 0.4, (n, 3))
  # The last one lies beyond the Jacobian's clamp (|x/z| <= 1.3 * tan(half FOV) = 0.83 here), large enough to reach
  # into the image.
  means[-1], scales[-1] = [6.0, 0.0, 5.0], [2.0, 1.5, 1.0]
  rot = _quat_wxyz_to_matrix(np.array([0.97, 0.05, -0.1, 0.15]))
  view = np.eye(4)
  view[:3, :3], view[:3, 3] = rot, [0.2, -0.1, 0.5]
  Ks = np.array([[50.0, 0, 31.0], [0, 45.0, 25.0], [0, 0, 1]])
  p = pj.project(jnp.asarray(means, jnp.float32), jnp.asarray(quats, jnp.float32), jnp.asarray(scales, jnp.float32),
                 jnp.asarray(view[None], jnp.float32), jnp.asarray(Ks[None], jnp.float32), W, H, 0.2, 400.0)
  for i in range(n):
    R = _quat_wxyz_to_matrix(quats[i])
    cov = R @ np.diag(scales[i] ** 2) @ R.T
    x, y, z = rot @ means[i] + view[:3, 3]
    tx = z * np.clip(x / z, -1.3 * 0.5 * W / Ks[0, 0], 1.3 * 0.5 * W / Ks[0, 0])
    ty = z * np.clip(y / z, -1.3 * 0.5 * H / Ks[1, 1], 1.3 * 0.5 * H / Ks[1, 1])
    J = np.array([[Ks[0, 0] / z, 0, -Ks[0, 0] * tx / z ** 2], [0, Ks[1, 1] / z, -Ks[1, 1] * ty / z ** 2]])
    cov2 = J @ rot @ cov @ rot.T @ J.T + 0.3 * np.eye(2)
    inv = np.linalg.inv(cov2)
    assert bool(p.valid[0, i])
    np.testing.assert_allclose(np.asarray(p.conics[0, i]), [inv[0, 0], inv[0, 1], inv[1, 1]], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(p.means2d[0, i]), [Ks[0, 0] * x / z + Ks[0, 2], Ks[1, 1] * y / z + Ks[1, 2]],
                               rtol=1e-5)
    assert float(p.radii[0, i]) == np.ceil(3 * np.sqrt(np.linalg.eigvalsh(cov2).max()))
