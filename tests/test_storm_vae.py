"""STORM-VAE task: the joint objective on synthetic clips, gradient routing (rendered loss -> rasteriser -> GS decoder
-> VAE encoder; OpenDV-style samples train the VAE only), the overfit targets, the trainer contract and the eval
metrics.

One jitted function (the two loss terms, each with its gradient, weighted by traced scalars) is compiled once per
module and reused by every test, overfit included: compilation dominates on CPU.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from _configs import RUN_FAST, storm_vae  # noqa: I100 (configs/ as a module)
from benchmarks.overfit_storm_vae import make_evaluator
from cvd_storm_jax import eval_storm
from cvd_storm_jax.data_pipelines import conditions, synthetic
from cvd_storm_jax.tasks import get_task

H, W, T, V = 16, 32, 3, 3  # 3 view slots (the recipe has 6): half the CPU time, same code paths
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # for programs that run once: 4x faster to compile on CPU


def _config():
  cfg = storm_vae.get_config("tiny")
  cfg.model.gs.pos_grid = (H // 8, W // 8)
  cfg.model.gs.rasterize_backend = "xla"
  cfg.model.gs.num_views = V
  cfg.data.num_views = V
  cfg.storm.context_frames = (0, 2)
  cfg.storm.target_frames = (0, 2)  # fixed: deterministic tests; the context frames (reconstruction, as overfit)
  cfg.data.buckets = [(H, W, 1.0)]
  cfg.data.num_frames = T
  cfg.data.synthetic.height, cfg.data.synthetic.width = H, W
  return cfg


def _clip(seed):
  clip = synthetic.generate_clip(seed, 0, synthetic.SyntheticOptions(height=H, width=W, num_frames=T, num_views=V,
                                                                     max_lidar_points=4096))
  clip["depth"] = conditions.depth_maps(clip)
  return clip


def _opendv_like(clip):
  """One real view, no LiDAR, no sky labels (what the OpenDV reader produces)."""
  out = dict(clip)
  vm = np.zeros(V, bool)
  vm[0] = True
  out["view_mask"] = vm
  out["images"] = np.where(vm[None, :, None, None, None], clip["images"], 0).astype(np.uint8)
  out["depth"] = np.zeros_like(clip["depth"])
  out["sky_mask"] = np.zeros_like(clip["sky_mask"])
  return out


def _host_batch(clips, has_sky):
  keys = ("images", "intrinsics", "cam_to_ego", "ego_to_world", "timestamps", "view_mask", "depth", "sky_mask")
  b = {k: np.stack([np.asarray(c[k]) for c in clips]) for k in keys}
  b["has_sky_mask"] = np.asarray(has_sky, bool)
  return b


@pytest.fixture(scope="module")
def env():
  cfg = _config()
  task = get_task(cfg)
  scene = _clip(1)
  opendv = _opendv_like(_clip(2))
  mixed = {k: jnp.asarray(v) for k, v in task.device_batch(_host_batch([scene, opendv], [True, False])).items()}
  only_opendv = {k: jnp.asarray(v) for k, v in task.device_batch(_host_batch([opendv, opendv], [False, False])).items()}
  init = lambda r, b: meta.unbox(task.init(r, b))
  params = jax.jit(init).lower(jax.random.key(0), mixed).compile(FAST_COMPILE)(jax.random.key(0), mixed)

  def weighted(params, batch, rng, w_vae, w_storm):
    l_vae, l_storm, metrics, aux = task.loss_terms(params, batch, rng, jnp.int32(0))
    return w_vae * l_vae + w_storm * l_storm, (metrics, aux)

  grad_fn = jax.jit(jax.value_and_grad(weighted, has_aux=True))
  return dict(cfg=cfg, task=task, scene=scene, mixed=mixed, only_opendv=only_opendv, params=params, grad_fn=grad_fn,
              weighted=weighted)


def _norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


def _all_finite(tree):
  return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))



def test_flow_regulariser_counts_real_view_slots_only():
  """storm_loss's velocity regulariser is the mean squared velocity over the real views' Gaussians: the padded slot's
  velocities (outputs of tokens the decoder discards) do not count, whatever they are."""
  from cvd_storm_jax import storm_losses
  b, tt, t, v, h, w = 1, 1, 2, 3, 4, 5
  vel = jnp.ones((b, t, v, h, w, 3)).at[:, :, 2].set(100.0)  # slot 2 is padded
  renders = {"rgb": jnp.zeros((b, tt, v, h, w, 3)), "depth": jnp.zeros((b, tt, v, h, w)),
             "alpha": jnp.zeros((b, tt, v, h, w))}
  _, m = storm_losses.storm_loss(renders, jnp.zeros((b, tt, v, h, w, 3)), jnp.zeros((b, tt, v, h, w)),
                                 jnp.array([[True, True, False]]), jnp.array([True]), vel,
                                 weights=storm_losses.StormLossWeights(lpips=0.0))
  np.testing.assert_allclose(float(m["storm_flow_reg"]), 1.0, rtol=1e-6)


def test_storm_lpips_is_not_computed_before_its_start_step():
  """Before lpips_start_step the LPIPS term is skipped (a cond), not computed and multiplied by 0; from it on it
  counts with its weight."""
  from cvd_storm_jax import storm_losses
  b, tt, v, h, w = 1, 1, 2, 4, 5
  renders = {"rgb": jnp.full((b, tt, v, h, w, 3), 0.5), "depth": jnp.zeros((b, tt, v, h, w)),
             "alpha": jnp.zeros((b, tt, v, h, w))}
  calls = []

  def lpips_fn(x0, x1):  # a stand-in distance that records each time it is traced
    calls.append(x0.shape)
    return jnp.mean(jnp.abs(x0 - x1), axis=(1, 2, 3))

  weights = storm_losses.StormLossWeights(rgb=0.0, depth=0.0, sky=0.0, flow_reg=0.0, lpips=2.0, lpips_start_step=10)
  loss = jax.jit(lambda step: storm_losses.storm_loss(
      renders, jnp.zeros((b, tt, v, h, w, 3)), jnp.zeros((b, tt, v, h, w)), jnp.ones((b, v), bool),
      jnp.ones((b,), bool), jnp.zeros((b, 2, v, h, w, 3)), lpips_fn=lpips_fn, step=step, weights=weights)[0])
  assert "cond" in str(jax.make_jaxpr(loss)(jnp.int32(0)))
  assert float(loss(jnp.int32(9))) == 0.0
  np.testing.assert_allclose(float(loss(jnp.int32(10))), 2.0 * 0.5, rtol=1e-6)
  assert calls


def test_storm_gradient_reaches_gs_decoder_and_encoder(env):
  (loss, (m, aux)), g = env["grad_fn"](env["params"], env["mixed"], jax.random.key(1), 0.0, 1.0)  # L_STORM only
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert _all_finite(g)
  assert float(m["storm_valid_frac"]) == 0.5  # the OpenDV-like sample is masked out
  assert float(m["rasterizer_overflow"]) == 0.0
  for name in ("gs_head", "block0", "patch_embed", "motion_basis_decoder", "sky_head"):
    assert _norm(g["gs"][name]) > 0, name
  assert _norm(g["vae"]["encoder"]) > 0  # through the latents, the rasteriser and the GS decoder
  assert _norm(g["vae"]["decoder"]) == 0.0  # the VAE decoder takes no part in L_STORM


def test_full_objective_metrics_and_shapes(env):
  task = env["task"]
  (loss, (m, aux)), g = env["grad_fn"](env["params"], env["mixed"], jax.random.key(1), 1.0, task.storm_lambda)
  assert _all_finite(g)
  np.testing.assert_allclose(float(loss), float(m["loss_vae"]) + 0.5 * float(m["loss_storm"]), rtol=1e-5)
  for k in ("vae_mse", "vae_kl", "vae_psnr", "storm_rgb", "storm_depth", "storm_sky", "storm_flow_reg",
            "storm_psnr"):
    assert np.isfinite(float(m[k])), k
  assert float(m["storm_depth"]) > 0 and float(m["storm_sky"]) > 0
  assert _norm(g["vae"]["decoder"]) > 0 and _norm(g["vae"]["encoder"]) > 0 and _norm(g["gs"]) > 0
  out = aux["out"]
  B = 2
  assert out["recon"].shape == (B, 2, V, H, W, 3)
  assert out["renders"]["rgb"].shape == (B, 2, V, H, W, 3)
  assert out["gaussians"]["means"].shape == (B, 2, V, H, W, 3)


def test_remat_switches_keep_less_and_give_the_same_gradients(env):
  # The paper recipe's memory switches change what the backward pass keeps, never the gradients: vae_remat, gs.remat
  # (ViT blocks and the per-pixel heads) and lpips_remat (LPIPS-VGG in both losses, traced only here).
  from cvd_storm_jax import memory
  task, batch, params = env["task"], env["mixed"], env["params"]
  rng, w_storm = jax.random.key(1), task.storm_lambda

  def kept(cfg):
    t = get_task(cfg)
    p = jax.eval_shape(lambda r, b: meta.unbox(t.init(r, b)), jax.random.key(0), batch)
    return memory.saved_activation_bytes(lambda p, b: t.loss_fn(p, b, rng, jnp.int32(10_000))[0], p,
                                         nondiff=(batch,))

  with_lpips = _config()
  with_lpips.loss.lpips_net, with_lpips.loss.vae.lpips, with_lpips.loss.storm.lpips = "vgg16", 1.0, 0.05
  on = with_lpips.copy_and_resolve_references()
  on.model.vae_remat, on.model.gs.remat, on.loss.lpips_remat = True, True, True
  sizes = [kept(with_lpips)]
  for section, field in (("model", "vae_remat"), ("gs", "remat"), ("loss", "lpips_remat")):
    cfg = with_lpips.copy_and_resolve_references()
    (cfg.model.gs if section == "gs" else cfg[section])[field] = True
    sizes.append(kept(cfg))
    assert sizes[-1] < sizes[0], (section, field, sizes)
  assert kept(on) < min(sizes)

  remat = _config()
  remat.model.vae_remat, remat.model.gs.remat = True, True
  rtask = get_task(remat)

  def weighted(p):
    l_vae, l_storm, _, _ = rtask.loss_terms(p, batch, rng, jnp.int32(0))
    return l_vae + w_storm * l_storm

  g = jax.jit(jax.grad(weighted)).lower(params).compile(FAST_COMPILE)(params)
  _, ref = env["grad_fn"](params, batch, rng, 1.0, w_storm)
  scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(ref))  # some grads are 0 up to rounding (key bias)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(g)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_stacked_independent_clips_are_not_a_scene(env):
  """Views without cross-view links (OpenDV clips stacked as views: identity adjacency) never train the GS decoder,
  even with several real views and depth; a real rig's ring does."""
  task = env["task"]
  host = _host_batch([env["scene"], env["scene"]], [True, True])
  host["view_adjacency"] = np.stack([conditions.view_adjacency(np.ones(V, bool)),
                                     conditions.view_adjacency(np.ones(V, bool), "opendv")])
  batch = {k: jnp.asarray(x) for k, x in task.device_batch(host).items()}
  sel = task.select(batch, None, target_frames=(0, 2))
  assert np.asarray(sel["storm_valid"]).tolist() == [True, False]


def test_opendv_samples_train_the_vae_only(env):
  task = env["task"]
  (loss, (m, aux)), g = env["grad_fn"](env["params"], env["only_opendv"], jax.random.key(1), 1.0, task.storm_lambda)
  assert float(m["storm_valid_frac"]) == 0.0 and float(m["loss_storm"]) == 0.0
  for x in jax.tree.leaves(g["gs"]):
    assert not bool(jnp.any(x != 0))  # exactly zero, every GS-decoder parameter
  assert _norm(g["vae"]["encoder"]) > 0 and _norm(g["vae"]["decoder"]) > 0
  np.testing.assert_allclose(float(loss), float(m["loss_vae"]), rtol=1e-6)


def test_overfit_reaches_psnr_and_depth_targets(env):
  """The tiny config overfits one synthetic scene (known geometry) to rendered-view PSNR >= 28 dB and LiDAR depth
  RMSE < 5 % of the scene's depth range, rendered from the posterior means as in evaluation. 500 Adam steps on a
  batch of the one scene (the module's step, compiled for that batch), the rate cut 5x for the last 80 (about 2 min
  on 2 cores); recorded on 2026-11-28 (session 8): PSNR 12.5 -> 29.7 dB, depth RMSE 98 % -> 4.2 % (400 steps, cut at 320: 28.8 dB,
  4.4 %; 600, cut at 500: 30.1 dB, 3.8 %). A batch of two copies of the scene took twice the time per step for the
  same result (600 steps: 29.7 dB, 4.3 %)."""
  task = env["task"]
  # 500 steps: compiled with XLA's backend optimisations (the suite's default is off, see conftest.py).
  grad_fn = jax.jit(jax.value_and_grad(env["weighted"], has_aux=True), compiler_options=RUN_FAST)
  batch = {k: jnp.asarray(v) for k, v in task.device_batch(_host_batch([env["scene"]], [True])).items()}
  params = env["params"]
  tx = optax.chain(optax.clip_by_global_norm(3.0), optax.adam(optax.piecewise_constant_schedule(5e-3, {420: 0.2})))
  opt = tx.init(params)
  update = jax.jit(lambda g, o, p: (lambda u, o: (optax.apply_updates(p, u), o))(*tx.update(g, o, p)),
                   compiler_options=RUN_FAST)
  evaluate = make_evaluator(task, batch)  # benchmarks/overfit_storm_vae.py: the same metrics, one definition
  before = evaluate(params)
  first = before["psnr"], before["d_rmse_frac"]
  for i in range(500):
    (_, _), g = grad_fn(params, batch, jax.random.key(100 + i), 1.0, task.storm_lambda)
    params, opt = update(g, opt, params)
  after = evaluate(params)
  psnr, depth_frac = after["psnr"], after["d_rmse_frac"]
  print(f"overfit: PSNR {first[0]:.2f} -> {psnr:.2f} dB, depth RMSE {first[1]:.1%} -> {depth_frac:.1%} of range")
  assert psnr >= 28.0, (first, psnr)
  assert depth_frac < 0.05, (first, depth_frac)


def test_trainer_contract(env):
  task = env["task"]
  from cvd_storm_jax.data_pipelines import pipeline
  host = next(pipeline.make_iterator(env["cfg"].data, seed=0))
  dev = task.device_batch(host)
  assert dev["images"].shape == (2, T, V, H, W, 3) and dev["timestamps"].dtype == np.float32
  assert dev["has_sky_mask"].all()
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in dev.items()}
  shapes = jax.eval_shape(task.init, jax.random.key(0), abstract)
  assert set(shapes) == {"vae", "gs"}
  assert task.trainable_mask(shapes) is None
  assert task.tokens_per_step(dev) == 2 * 2 * V * H * W
  assert task.flops_per_step(dev) > 1e8  # XLA's count of the lowered step (no compile)
  with pytest.raises(KeyError, match="depth"):
    task.device_batch({k: v for k, v in host.items() if k != "depth"})


def test_depth_colouring_spreads_street_depths():
  # A street scene's depths (2-80 m) with the paper's far plane (400 m): distinct, falling brightness; none is black.
  d = np.array([[0.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0]], np.float32)
  v = eval_storm.depth_to_rgb(d, 400.0)[0, :, 0].astype(int)
  assert v[0] == 0 and v[1] < 255 and (np.diff(v[1:]) < -10).all()


def test_depth_and_image_metrics():
  gt = np.zeros((2, 4, 5), np.float32)
  gt[0, :2] = 10.0
  pred = np.full((2, 4, 5), 12.0, np.float32)
  m = eval_storm.depth_metrics(pred, gt)
  np.testing.assert_allclose(m["d_rmse"][0], 2.0, rtol=1e-6)
  np.testing.assert_allclose(m["abs_rel"][0], 0.2, rtol=1e-6)
  np.testing.assert_allclose(m["delta1"][0], 1.0)  # 1.2 < 1.25
  assert np.isnan(m["d_rmse"][1]) and m["valid_pixels"].tolist() == [10, 0]
  pred[0, 0] = 20.0  # ratio 2: outside delta1
  np.testing.assert_allclose(eval_storm.depth_metrics(pred, gt)["delta1"][0], 0.5)
  rng = np.random.default_rng(0)
  img = rng.uniform(0.2, 0.8, (3, 16, 16, 3)).astype(np.float32)
  noisy = img + 0.01
  im = eval_storm.image_metrics(noisy, img)
  np.testing.assert_allclose(im["psnr"], 40.0, rtol=1e-3)
  np.testing.assert_allclose(eval_storm.image_metrics(img, img)["ssim"], 1.0, atol=1e-5)
  assert (im["ssim"] < 1.0).all()


def test_eval_outputs(env, tmp_path):
  """Renders, videos and the .ply of an evaluation (from arrays shaped like evaluate_batch's)."""
  (_, (_, aux)), _ = env["grad_fn"](env["params"], env["mixed"], jax.random.key(1), 1.0, 0.5)
  sel, out = jax.device_get((aux["sel"], aux["out"]))
  res = {"rgb01": np.asarray(out["renders"]["rgb"]) * 0.5 + 0.5, "gt01": np.asarray(sel["tgt_images"]) * 0.5 + 0.5,
         "depth": np.asarray(out["renders"]["depth"]), "gt_depth": np.asarray(sel["tgt_depth"]),
         "view_mask": np.asarray(sel["view_mask"]), "target_index": np.asarray(sel["target_index"]),
         "storm_valid": np.asarray(sel["storm_valid"]), "gaussians": jax.device_get(out["gaussians"])}
  metrics = eval_storm.batch_metrics(res)
  assert len(metrics["psnr"]) == 2 * V  # storm-valid sample only: 2 targets x V real views
  assert np.isfinite(metrics["d_rmse"]).any()
  eval_storm.write_outputs(str(tmp_path), res, ["a", "b"], fps=10.0, ply_time=0.1, max_depth=50.0)
  assert os.path.getsize(tmp_path / "a_rgb.mp4") > 0 and os.path.getsize(tmp_path / "b_depth.mp4") > 0
  assert (tmp_path / "renders" / f"a_t00_v{V - 1}_rgb.png").exists() and (tmp_path / "renders" / "b_t02_v0_gt.png").exists()
  assert not (tmp_path / "renders" / "b_t00_v1_rgb.png").exists()  # padded view of the OpenDV-like sample
  ply = eval_storm.read_ply(str(tmp_path / "a.ply"))
  assert len(ply["means"]) == 2 * V * H * W  # every Gaussian of the multi-view sample has opacity > 0
  assert len(eval_storm.read_ply(str(tmp_path / "b.ply"))["means"]) == 2 * 1 * H * W


def test_evaluate_is_one_pass(tmp_path, monkeypatch):
  """eval_storm.evaluate reads each clip at most once: asked for 5 batches of a 3-clip split at batch 2, it evaluates
  the one whole batch (it used to cycle the data and count clips twice). The model is stubbed: this is the loop."""
  cfg = _config()
  cfg.data.num_clips, cfg.data.batch_size = 3, 2
  seen = []
  monkeypatch.setattr(eval_storm, "evaluate_batch", lambda task, params, batch: seen.append(batch) or {"overflow": 0})
  monkeypatch.setattr(eval_storm, "batch_metrics", lambda res, lpips_fn: {"psnr": np.ones(2)})
  summary = eval_storm.evaluate(cfg, "in-memory", str(tmp_path), num_batches=5, write_media=False, params={})
  assert summary["batches"] == 1 and len(seen) == 1
  assert json.load(open(tmp_path / "metrics.json"))["batches"] == 1
  with pytest.raises(ValueError, match="num_batches"):
    eval_storm.evaluate(cfg, "in-memory", str(tmp_path), num_batches=-1, params={})


def test_init_from_vae_folder(tmp_path):
  """config.init_from_vae: the "vae" params come from a diffusers AutoencoderKL folder (inside the jitted init)."""
  if "torchvision" not in sys.modules:  # the venv's torchvision does not load beside CPU torch; diffusers needs none
    sys.modules["torchvision"] = None
  import torch
  from diffusers import AutoencoderKL as TorchVAE

  from cvd_storm_jax.pretrained.vae import load_vae
  torch.manual_seed(0)
  TorchVAE(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=1, norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609,
           use_quant_conv=False, use_post_quant_conv=False).save_pretrained(tmp_path / "vae")
  cfg = _config()
  cfg.init_from_vae = str(tmp_path / "vae")
  task = get_task(cfg)
  scene = _clip(1)
  batch = {k: jnp.asarray(v) for k, v in task.device_batch(_host_batch([scene], [True])).items()}
  init = lambda r, b: meta.unbox(task.init(r, b))
  params = jax.jit(init).lower(jax.random.key(0), batch).compile(FAST_COMPILE)(jax.random.key(0), batch)
  _, want = load_vae(str(tmp_path / "vae"))
  got_leaves = jax.tree_util.tree_leaves_with_path(params["vae"])
  want_leaves = jax.tree.leaves(meta.unbox(want))
  assert len(got_leaves) == len(want_leaves) > 0
  for (path, g), w in zip(got_leaves, want_leaves):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))
  assert _norm(params["gs"]) > 0  # the GS decoder is freshly initialised


def test_storm_loss_terms_by_hand():
  """Depth L1 divided by each sample's largest LiDAR depth, over LiDAR pixels only; sky: alpha pushed to 0 on sky
  and 1 elsewhere, for samples with sky labels only."""
  from cvd_storm_jax import storm_losses as sl
  b, tt, v, h, w = 2, 1, 2, 2, 2
  rgb = jnp.zeros((b, tt, v, h, w, 3))
  gt = np.zeros((b, tt, v, h, w), np.float32)
  gt[:, 0, 0, 0, 0], gt[:, 0, 1, 1, 1] = 20.0, 40.0
  sky = np.zeros((b, tt, v, h, w), bool)
  sky[:, 0, :, 0, 0] = True  # one pixel in four is sky
  renders = {"rgb": rgb, "depth": jnp.full((b, tt, v, h, w), 10.0), "alpha": jnp.full((b, tt, v, h, w), 0.3)}
  _, m = sl.storm_loss(renders, rgb, jnp.asarray(gt), jnp.ones((b, v), bool), jnp.ones((b,), bool),
                       jnp.zeros((b, tt, v, h, w, 3)), sky_mask=jnp.asarray(sky), has_sky=jnp.array([True, False]),
                       weights=sl.StormLossWeights(lpips=0.0))
  np.testing.assert_allclose(float(m["storm_depth"]), (10 / 40 + 30 / 40) / 2, rtol=1e-6)
  # Sample 1 has no sky labels: it adds nothing to the sky term (and counts in the mean over valid samples).
  np.testing.assert_allclose(float(m["storm_sky"]), (0.25 * 0.3 + 0.75 * 0.7) / 2, rtol=1e-6)


def test_vae_loss_masked_by_hand():
  """MSE and KL over real view slots only (padded views are black images, not reconstructions to learn)."""
  from cvd_storm_jax import losses as base
  from cvd_storm_jax import storm_losses as sl
  rng = np.random.default_rng(0)
  recon, tgt = (jnp.asarray(rng.normal(size=(1, 2, 8, 8, 3)), jnp.float32) for _ in range(2))
  mean, logvar = (jnp.asarray(rng.normal(size=(1, 2, 1, 1, 4)), jnp.float32) for _ in range(2))
  _, m = sl.vae_loss_masked(recon, tgt, mean, logvar, jnp.array([[True, False]]), None, sl.VAELossWeights(lpips=0.0))
  np.testing.assert_allclose(float(m["vae_mse"]), float(jnp.mean((recon[0, 0] - tgt[0, 0]) ** 2)), rtol=1e-6)
  np.testing.assert_allclose(float(m["vae_kl"]), float(base.kl_divergence(mean[0, :1], logvar[0, :1])), rtol=1e-5)


def test_reference_frame_cameras_with_rotated_ego_poses():
  """Camera -> reference ego = inv(E_ref) @ E_t @ C, with rotated poses (the synthetic clips only translate)."""
  from cvd_storm_jax.tasks.storm_vae import reference_frame_cameras
  rng = np.random.default_rng(0)

  def rigid():
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = q * np.sign(np.linalg.det(q)), rng.normal(size=3) * 5
    return m
  ego = np.stack([rigid() for _ in range(3)])[None]            # [1, T, 4, 4]
  cams = np.stack([[rigid() for _ in range(2)] for _ in range(3)])[None]  # [1, T, V, 4, 4]
  out = np.asarray(reference_frame_cameras(jnp.asarray(cams), jnp.asarray(ego), ref_index=1))
  for t in range(3):
    for v in range(2):
      np.testing.assert_allclose(out[0, t, v], np.linalg.inv(ego[0, 1]) @ ego[0, t] @ cams[0, t, v], atol=1e-4)
