"""GS decoder of STORM-VAE: Gaussian layout and activations, view masking, motion, rendering and its gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from cvd_storm_jax import memory
from cvd_storm_jax.models.gs_decoder import (GSDecoder, apply_exposure, default_gs_decoder_config, flatten,
                                             gaussians_at, pixel_rays, plucker)

B, T, V, h, w = 1, 2, 3, 2, 3  # 16 x 24 images
H, W = 8 * h, 8 * w
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # CPU: 4x faster compiles; these programs run a few times


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def _cameras():
  K = np.array([[20.0, 0, W / 2], [0, 20.0, H / 2], [0, 0, 1]], np.float32)
  ks = np.broadcast_to(K, (B, T, V, 3, 3)).copy()
  c2r = np.broadcast_to(np.eye(4, dtype=np.float32), (B, T, V, 4, 4)).copy()
  for v in range(V):  # cameras side by side looking along +z, the second frame 0.5 m further forward
    c2r[:, :, v, 0, 3] = 0.3 * v
  c2r[:, 1, :, 2, 3] = 0.5
  return jnp.asarray(ks), jnp.asarray(c2r)


@pytest.fixture(scope="module")
def setup():
  cfg = default_gs_decoder_config("tiny", num_views=V, pos_grid=(h, w), near=0.5, far=30.0,
                                  rasterize_backend="reference", upscale_channels=(16, 16, 8))
  model = GSDecoder(cfg)
  ks, c2r = _cameras()
  lat = jax.random.normal(jax.random.key(0), (B, T, V, h, w, 16))
  times = jnp.array([[0.0, 0.5]])
  vm = jnp.array([[True, True, False]])
  params = meta.unbox(_compile(model.init, jax.random.key(1), lat, ks, c2r, times, vm)(jax.random.key(1), lat, ks,
                                                                                          c2r, times, vm))
  apply = _compile(model.apply, params, lat, ks, c2r, times, vm)

  def render_loss(p, lat):
    g = model.apply(p, lat, ks, c2r, times, vm)
    r = model.apply(p, g, c2r[:, :1], ks[:, :1], times[:, :1] + 0.25, H, W, method=GSDecoder.render)
    tgt = jnp.linspace(-1, 1, H * W * 3).reshape(H, W, 3)
    return jnp.mean(jnp.square(r["rgb"][:, :, :2] - tgt)) + 0.01 * jnp.mean(r["depth"][:, :, :2]), r

  grad_fn = _compile(jax.value_and_grad(render_loss, argnums=(0, 1), has_aux=True), params, lat)
  return dict(cfg=cfg, model=model, params=params, apply=apply, lat=lat, ks=ks, c2r=c2r, times=times, vm=vm,
              grad_fn=grad_fn)


def test_gaussian_layout_and_activations(setup):
  s = setup
  cfg = s["cfg"]
  g = s["apply"](s["params"], s["lat"], s["ks"], s["c2r"], s["times"], s["vm"])
  assert g["means"].shape == (B, T, V, H, W, 3)
  for k, c in (("scales", 3), ("quats", 4), ("colors", 3), ("velocities", 3), ("dirs", 3)):
    assert g[k].shape == (B, T, V, H, W, c), k
  assert g["opacities"].shape == g["depths"].shape == (B, T, V, H, W)
  assert g["affine"].shape == (B, V, 3, 4) and g["sky_token"].shape == (B, cfg.width)
  np.testing.assert_allclose(np.linalg.norm(g["quats"], axis=-1), 1.0, atol=1e-5)
  assert float(g["depths"].min()) >= cfg.near and float(g["depths"].max()) <= cfg.far
  assert float(g["scales"].max()) <= cfg.max_scale
  # Centres lie on the pixel rays at the predicted camera z-depth (cameras here have identity rotation).
  origins, dirs = pixel_rays(s["ks"], s["c2r"], H, W)
  np.testing.assert_allclose(g["means"], origins + dirs * g["depths"][..., None], rtol=1e-5, atol=1e-4)
  cam_z = g["means"][..., 2] - s["c2r"][:, :, :, None, None, 2, 3]
  np.testing.assert_allclose(cam_z, g["depths"], rtol=1e-5, atol=1e-4)
  # Padded view slot: no Gaussians; real views start at STORM's opacity sigmoid(x - 2) ~ 0.12.
  assert float(jnp.abs(g["opacities"][:, :, 2]).max()) == 0.0
  assert 0.05 < float(g["opacities"][:, :, :2].mean()) < 0.25
  # Exposure starts at the identity transform.
  np.testing.assert_array_equal(g["affine"], 0.0)
  x = jax.random.normal(jax.random.key(3), (B, 2, V, 4, 5, 3))
  np.testing.assert_allclose(apply_exposure(x, g["affine"]), x, atol=1e-6)


def test_padded_views_are_never_attended(setup):
  s = setup
  g0 = s["apply"](s["params"], s["lat"], s["ks"], s["c2r"], s["times"], s["vm"])
  lat2 = s["lat"].at[:, :, 2].set(100.0)  # garbage in the padded slot
  g1 = s["apply"](s["params"], lat2, s["ks"], s["c2r"], s["times"], s["vm"])
  for k in ("means", "colors", "opacities", "velocities", "affine", "sky_token"):
    a, b = (g0[k], g1[k]) if k in ("affine", "sky_token") else (g0[k][:, :, :2], g1[k][:, :, :2])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=k)
  # ... while a real view's content does change the others (attention is global over frames and views).
  lat3 = s["lat"].at[:, :, 1].set(3.0)
  g3 = s["apply"](s["params"], lat3, s["ks"], s["c2r"], s["times"], s["vm"])
  assert float(jnp.abs(g3["colors"][:, :, 0] - g0["colors"][:, :, 0]).max()) > 1e-4


def test_gaussians_at_moves_means_by_velocity(setup):
  s = setup
  g = s["apply"](s["params"], s["lat"], s["ks"], s["c2r"], s["times"], s["vm"])
  flat = flatten(g)
  n = T * V * H * W
  assert flat["means"].shape == (B, n, 3) and flat["opacities"].shape == (B, n)
  np.testing.assert_allclose(flat["gauss_times"][0, :V * H * W], 0.0)
  np.testing.assert_allclose(flat["gauss_times"][0, V * H * W:], 0.5)
  moved = gaussians_at(flat, jnp.array([1.5]))
  dt = 1.5 - flat["gauss_times"]
  np.testing.assert_allclose(moved["means"], flat["means"] + flat["velocities"] * dt[..., None], rtol=1e-6)
  for k in ("scales", "quats", "opacities", "colors"):
    np.testing.assert_array_equal(moved[k], flat[k])
  assert np.isfinite(np.asarray(flat["velocities"])).all()


def test_plucker():
  o = jnp.array([[1.0, 2.0, 3.0]])
  d = jnp.array([[0.0, 0.0, 2.0]])
  p = plucker(o, d)
  np.testing.assert_allclose(p, [[2.0, -1.0, 0.0, 0.0, 0.0, 1.0]], atol=1e-6)


def test_render_shapes_and_gradients(setup):
  s = setup
  (loss, r), (g_params, g_lat) = s["grad_fn"](s["params"], s["lat"])
  assert r["rgb"].shape == (B, 1, V, H, W, 3) and r["flow"].shape == (B, 1, V, H, W, 3)
  assert r["depth"].shape == r["alpha"].shape == (B, 1, V, H, W)
  assert int(r["overflow"]) == 0
  alpha = np.asarray(r["alpha"])
  assert 0.0 <= alpha.min() and alpha.max() <= 1.0
  assert alpha[:, :, :2].mean() > 0.3  # the cameras see their own (moved) Gaussians
  # The padded slot's camera (a real pose here) renders nothing: its work would be wasted, and with the schema's
  # identity camera of padded slots it would crowd a few tiles.
  assert alpha[:, :, 2].max() == 0.0
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves_with_path(g_params)
  for path, x in leaves:
    assert np.isfinite(np.asarray(x)).all(), jax.tree_util.keystr(path)
  norm = lambda t: float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t))))
  p = g_params["params"]
  # The rendered loss reaches the Gaussian head, the transformer, the motion branch, the sky and exposure heads ...
  for name in ("gs_head", "block0", "patch_embed", "motion_key_head", "motion_basis_decoder", "sky_head",
               "affine_head", "motion_upscaler"):
    assert norm(p[name]) > 0, name
  # ... and the input latents (so the VAE encoder upstream gets a signal), through real views only.
  assert norm(g_lat[:, :, :2]) > 0
  assert norm(g_lat[:, :, 2]) == 0.0


def test_motion_key_head_keeps_its_bf16_input(setup):
  """bf16 compute with remat: the backward keeps the upscaler's bf16 per-pixel features for the (fp32) motion key
  head, not an fp32 copy made outside the head's remat (1.3 GiB at the paper size)."""
  s = setup
  cfg = dataclasses.replace(s["cfg"], dtype=jnp.bfloat16, remat=True)
  model = GSDecoder(cfg)

  def velocities(p, lat):
    return model.apply(p, lat, s["ks"], s["c2r"], s["times"], s["vm"])["velocities"]

  saved = memory.saved_activations(velocities, s["params"], s["lat"])
  kept = {(jnp.dtype(v.dtype).name, tuple(v.shape)) for v in saved}
  feats = (B * T * V, H, W, cfg.upscale_channels[-1])
  assert ("bfloat16", feats) in kept and ("float32", feats) not in kept, kept


def test_pixel_rays_hand_computed():
  """Block-centre rays with fx != fy: the ray of latent block (row 1, col 2) at stride 8 passes through pixel
  centre (20, 12): direction ((20 - cx) / fx, (12 - cy) / fy, 1) in the camera frame."""
  ks = jnp.array([[20.0, 0, 12.0], [0, 30.0, 8.0], [0, 0, 1]])
  _, dirs = pixel_rays(ks, jnp.eye(4), 16, 24, stride=8)
  np.testing.assert_allclose(np.asarray(dirs[1, 2]), [(20 - 12) / 20, (12 - 8) / 30, 1.0], rtol=1e-6)


def test_head_layout_depth_range_and_velocity_mix(setup):
  """With the head's kernel zeroed, its bias alone sets every pixel: a ramp over the 8x8 sub-pixel index of the
  depth channel must land at pixel (y, x) by (y % 8, x % 8), mapped to near + sigmoid * (far - near). Motion bases
  all equal to b make every velocity b (the softmax weights over motion tokens sum to one)."""
  from cvd_storm_jax.models.gs_decoder import GS_CHANNELS
  s = setup
  cfg = s["cfg"]
  p = jax.tree.map(np.array, s["params"])
  head, basis = p["params"]["gs_head"], p["params"]["motion_basis_decoder"]["fc2"]
  ramp = np.linspace(-3.0, 3.0, 64, dtype=np.float32).reshape(8, 8)
  head["kernel"][:] = 0.0
  bias = head["bias"].reshape(8, 8, GS_CHANNELS)
  bias[..., 0] = ramp
  head["bias"] = bias.reshape(-1)
  b = np.array([0.7, -1.2, 0.3], np.float32)
  basis["kernel"][:], basis["bias"][:] = 0.0, b
  g = s["apply"](p, s["lat"], s["ks"], s["c2r"], s["times"], s["vm"])
  sub = ramp[np.arange(H)[:, None] % 8, np.arange(W)[None, :] % 8]
  want = cfg.near + (cfg.far - cfg.near) / (1.0 + np.exp(-sub))
  np.testing.assert_allclose(np.asarray(g["depths"]), np.broadcast_to(want, g["depths"].shape), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g["velocities"]), np.broadcast_to(b, g["velocities"].shape), atol=1e-5)


def test_rendered_depth_is_normalised_by_alpha(setup):
  """Faint Gaussians (opacity 0.05) all at camera depth 5 m render alpha well below 1 and depth 5 m ("ED": expected
  depth divided by the accumulated alpha), not 5 * alpha."""
  s = setup
  g = dict(s["apply"](s["params"], s["lat"], s["ks"], s["c2r"], s["times"], s["vm"]))
  cam = s["c2r"][:, :, :, None, None]  # frame 0 cameras: translation only, looking along +z
  g["means"] = cam[..., :3, 3] + g["dirs"] * 5.0 - jnp.array([0.0, 0.0, 1.0]) * cam[..., 2:3, 3]
  g["opacities"] = jnp.where(g["opacities"] > 0, 0.05, 0.0)
  g["scales"] = jnp.full_like(g["scales"], 0.05)
  g["velocities"] = jnp.zeros_like(g["velocities"])
  render = jax.jit(lambda p, g: s["model"].apply(p, g, s["c2r"][:, :1], s["ks"][:, :1], s["times"][:, :1], H, W,
                                                 method=GSDecoder.render))
  r = render(s["params"], g)
  alpha, depth = np.asarray(r["alpha"])[0, 0, :2], np.asarray(r["depth"])[0, 0, :2]
  seen = alpha > 0.05
  assert seen.mean() > 0.5 and alpha[seen].max() < 0.95
  np.testing.assert_allclose(depth[seen], 5.0, rtol=1e-3)
