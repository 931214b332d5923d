"""Sampler (Euler / CFG / reference injection / autoregression) and the generate command end to end."""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _configs import small_dit_config, storm_vae  # noqa: I100 (configs/ as modules)
from cvd_storm_jax.diffusion import rectified_flow as rf
from cvd_storm_jax.diffusion import sampler

SHAPE = (2, 5, 3, 4, 4, 2)  # B, T, V, h, w, C


def _point_mass(x0):
  """The exact velocity of a data distribution concentrated at x0: v(x_t, sigma) = (x_t - x0) / sigma."""
  def fn(x, timesteps, uncond):
    del uncond
    sigma = (timesteps / rf.NUM_TRAIN_TIMESTEPS)[..., None, None, None]
    target = jnp.concatenate([x0] * (x.shape[0] // x0.shape[0]))  # the guided call doubles the batch
    return jnp.where(sigma > 0, (x - target) / jnp.maximum(sigma, 1e-12), 0.0)
  return fn


def test_point_mass_lands_on_x0():
  k0, k1 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k0, SHAPE)
  noise = jax.random.normal(k1, SHAPE)
  out = jax.jit(lambda n: sampler.sample(_point_mass(x0), n, num_steps=7, guidance=1.0))(noise)
  np.testing.assert_allclose(out, x0, atol=1e-5)
  # Guidance with identical branches changes nothing.
  out4 = sampler.sample(_point_mass(x0), noise, num_steps=3, guidance=4.0)
  np.testing.assert_allclose(out4, x0, atol=1e-4)


def test_euler_matches_diffusers_scheduler():
  torch = pytest.importorskip("torch")
  from diffusers import FlowMatchEulerDiscreteScheduler
  num_steps = 6
  noise = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)

  def field(x, t):  # a nonlinear field of x and the timestep (t = sigma * 1000)
    return np.sin(x) * (t / 1000.0) + 0.3 * x - 0.1

  sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
  sched.set_timesteps(num_steps)
  x = torch.from_numpy(noise)
  for t in sched.timesteps:
    v = torch.from_numpy(field(x.numpy(), float(t)).astype(np.float32))
    x = sched.step(v, t, x).prev_sample
  ours = sampler.sample(lambda x, ts, u: jnp.sin(x) * (ts / 1000.0)[..., None, None, None] + 0.3 * x - 0.1,
                        jnp.asarray(noise), num_steps=num_steps, shift=3.0, guidance=1.0)
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-5, atol=1e-5)


def test_classifier_free_guidance_formula():
  noise = jax.random.normal(jax.random.key(1), SHAPE)
  calls = []

  def fn(x, timesteps, uncond):
    calls.append(x.shape[0])
    u = uncond[:, None, None, None, None, None]
    return jnp.where(u, -2.0 * x + 1.0, 0.5 * x)  # cond = 0.5 x, uncond = -2 x + 1

  sigmas = rf.sampling_sigmas(1, shift=3.0)
  d = sigmas[1] - sigmas[0]
  for g in (1.0, 4.0, 0.0):
    calls.clear()
    out = sampler.sample(fn, noise, num_steps=1, guidance=g)
    cond, uncond = 0.5 * noise, -2.0 * noise + 1.0
    np.testing.assert_allclose(out, noise + d * (uncond + g * (cond - uncond)), rtol=1e-5, atol=1e-5)
    # One batched call of 2B with guidance, the conditional branch alone (B) for g = 1.
    assert calls == ([SHAPE[0]] if g == 1.0 else [2 * SHAPE[0]])


def test_reference_frames_kept_and_seen_at_timestep_zero():
  k = 2
  rng = np.random.default_rng(2)
  noise = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
  reference = jnp.asarray(rng.standard_normal((SHAPE[0], k) + SHAPE[2:]), jnp.float32)
  seen = []

  def fn(x, timesteps, uncond):
    jax.debug.callback(lambda a, b: seen.append((np.asarray(a), np.asarray(b))), x, timesteps)
    return jnp.ones_like(x) * 3.0  # would move the reference frames if they were not overwritten

  out = jax.jit(lambda n, r: sampler.sample(fn, n, num_steps=3, guidance=2.0, reference=r))(noise, reference)
  jax.effects_barrier()
  np.testing.assert_array_equal(np.asarray(out[:, :k]), np.asarray(reference))
  assert not np.allclose(out[:, k:], noise[:, k:])
  assert len(seen) == 3
  sig = np.asarray(rf.sampling_sigmas(3, shift=3.0))
  for i, (x, ts) in enumerate(seen):
    assert x.shape[0] == 2 * SHAPE[0]  # cond and uncond halves: same references
    np.testing.assert_array_equal(x[:, :k], np.concatenate([reference, reference]))
    assert np.all(ts[:, :k] == 0.0)
    np.testing.assert_allclose(ts[:, k:], sig[i] * 1000.0, rtol=1e-6)
  # A partial mask: masked-out reference slots are generated.
  mask = np.ones((SHAPE[0], k, SHAPE[2]), bool)
  mask[0, 1, 2] = False
  out = sampler.sample(fn, noise, num_steps=2, guidance=1.0, reference=reference, reference_mask=jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(out[0, 1, :2]), np.asarray(reference[0, 1, :2]))
  assert not np.allclose(out[0, 1, 2], reference[0, 1, 2])
  with pytest.raises(ValueError, match="reference_mask"):
    sampler.sample(fn, noise, num_steps=1, reference=reference, reference_mask=jnp.ones((1, 1, 1), bool))
  with pytest.raises(ValueError, match="k=5"):
    sampler.sample(fn, noise, num_steps=1, reference=jnp.zeros((SHAPE[0], 5) + SHAPE[2:]))


def test_autoregressive_windows_and_lengths():
  assert sampler.window_starts(19, window=19, num_reference=3) == [0]
  assert sampler.window_starts(51, window=19, num_reference=3) == [0, 16, 32]
  for bad in (18, 20, 34, 50):
    with pytest.raises(ValueError, match="does not tile"):
      sampler.window_starts(bad, window=19, num_reference=3)
  with pytest.raises(ValueError, match="num_reference"):
    sampler.window_starts(19, window=19, num_reference=19)

  window, k, B, V = 5, 2, 1, 2
  L = window + 2 * (window - k)  # 3 windows
  noise = jnp.asarray(np.random.default_rng(3).standard_normal((B, L, V, 2, 2, 1)), jnp.float32)
  calls = []

  def sample_window(start, noise_w, ref):
    calls.append((start, None if ref is None else np.asarray(ref)))
    # Marks each window's generated frames with its start so the stitching can be checked exactly.
    gen = noise_w + 100.0 * (start + 1)
    if ref is None:
      return gen
    return jnp.concatenate([ref, gen[:, ref.shape[1]:]], axis=1)

  out = sampler.autoregressive(sample_window, noise, window=window, num_reference=k)
  assert out.shape == noise.shape
  assert [c[0] for c in calls] == [0, 3, 6]
  assert calls[0][1] is None  # the first window is generated from 0 references
  expect = np.asarray(noise).copy()
  expect[:, 0:5] += 100.0 * 1
  expect[:, 5:8] += 100.0 * 4
  expect[:, 8:11] += 100.0 * 7
  np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-6)
  # Window i's references are the last k frames of window i - 1's output (no re-encoding).
  np.testing.assert_array_equal(calls[1][1], expect[:, 3:5])
  np.testing.assert_array_equal(calls[2][1], expect[:, 6:8])

  # Ground-truth references for the first window; the real sampler as the window function.
  gt = jnp.full((B, k, V, 2, 2, 1), 7.0)
  x0 = jnp.zeros((B, window, V, 2, 2, 1))
  out = sampler.autoregressive(
      lambda s, n, r: sampler.sample(_point_mass(x0), n, num_steps=2, guidance=1.0, reference=r), noise,
      window=window, num_reference=k, reference=gt)
  np.testing.assert_array_equal(np.asarray(out[:, :k]), np.asarray(gt))
  np.testing.assert_allclose(np.asarray(out[:, k:]), 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="num_reference=2"):
    sampler.autoregressive(sample_window, noise, window=window, num_reference=k, reference=gt[:, :1])


def _tiny_dit_config():
  c = small_dit_config()
  c.num_devices = 1
  c.total_steps, c.checkpoint.every_steps, c.checkpoint.async_save, c.progress_bar = 2, 2, False, False
  return c


def _random_storm_vae(dit_config, path):
  """A random-init tiny STORM-VAE params file (the DiT's latent size: 16 channels, 4x8 latents) and its config."""
  from cvd_storm_jax import checkpoint as ckpt_lib
  from cvd_storm_jax import tasks
  from cvd_storm_jax.data_pipelines import pipeline
  from cvd_storm_jax.models.storm_vae import StormVAE
  s = storm_vae.get_config("tiny")
  s.storm.context_frames, s.storm.num_targets, s.storm.target_frames = (0, 1), 1, (1,)
  s.model.gs.pos_grid = (4, 8)
  s.data = dit_config.data
  task = tasks.get_task(s)
  batch = task.device_batch(next(pipeline.make_iterator(s.data, seed=0)))
  sel = task.select({k: jnp.asarray(v) for k, v in batch.items()}, None)
  latents = jnp.zeros(sel["ctx_images"].shape[:3] + (4, 8, 16))
  # Only the GS decoder is needed to decode generated latents (a cheaper program than the whole task's init).
  init = jax.jit(lambda rng: task.model.init(rng, latents, sel["ctx_intrinsics"], sel["ctx_cams"], sel["ctx_times"],
                                             sel["view_mask"], method=StormVAE.gaussians)["params"])
  ckpt_lib.save_params(path, init(jax.random.key(0)))
  return s, path


def test_generate_end_to_end(tmp_path, caplog):
  av = pytest.importorskip("av")
  from cvd_storm_jax import generate as gen
  from cvd_storm_jax.data_pipelines import pipeline
  from cvd_storm_jax.tasks.dit import DiTTask
  from cvd_storm_jax.train import train
  c = _tiny_dit_config()
  workdir, out = str(tmp_path / "wd"), str(tmp_path / "gen")
  train(c, workdir)
  storm_cfg, storm_params = _random_storm_vae(c, str(tmp_path / "storm_params"))
  # Pixel-unshuffle latents are not the STORM-VAE's: refused before sampling, decoded only when asked, and said.
  with pytest.raises(ValueError, match="allow_foreign_latents"):
    gen.generate(c, workdir, out, num_steps=2, storm_vae_config=storm_cfg, storm_vae_params=storm_params)
  with caplog.at_level(logging.WARNING, logger="cvd_storm_jax.generate"):
    summary = gen.generate(c, workdir, out, num_steps=2, guidance=4.0, reference_frames=1,
                           ground_truth_reference=True, seed=0, storm_vae_config=storm_cfg,
                           storm_vae_params=storm_params, allow_foreign_latents=True)
  assert "show the pipeline only" in caplog.text and summary["storm_latents_match"] is False
  matched = c.copy_and_resolve_references()
  matched.latents.kind, matched.latents.vae_from = "vae", storm_params
  assert gen.storm_latents_match(matched.latents, storm_params + "/")
  assert summary["window_starts"] == [0]
  latents = np.load(os.path.join(out, "latents.npy"))
  assert latents.shape == (1, 2, 6, 4, 8, 16) and np.isfinite(latents).all()
  # The reference frame is the clip's own first frame, encoded (pixel_unshuffle is deterministic) and kept exactly.
  task = DiTTask(c)
  batch = task.device_batch(next(pipeline.make_iterator(c.data, seed=c.seed)))
  gt = np.asarray(task._latents({}, {k: jnp.asarray(v) for k, v in batch.items()}, None))
  np.testing.assert_allclose(latents[:, :1], gt[:, :1], atol=1e-6)
  assert not np.allclose(latents[:, 1], gt[:, 1], atol=1e-2)
  # Decoding is the projection's least-squares inverse: re-encoding the decoded video gives the latents back (up to
  # uint8 rounding; pixels clipped to [0, 255] make the rest).
  rgb = gen.decode_latents(task, gt)
  assert rgb.shape == batch["images"].shape and rgb.dtype == np.uint8
  again = np.asarray(task._latents({}, {"images": jnp.asarray(rgb)}, None))
  err = np.abs(again - gt)
  assert np.median(err) < 0.02
  views = [f for f in summary["files"] if f.endswith(".mp4")]
  assert "sample0_mosaic.mp4" in views and len(views) == 2 + int(batch["view_mask"].sum())  # views, mosaic, depth
  for name in ("sample0_view0.mp4", "sample0_mosaic.mp4"):
    with av.open(os.path.join(out, name)) as container:
      frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 2
  assert frames[0].shape == (64, 3 * 64, 3)  # mosaic: 2 rows x 3 views of 32x64
  # STORM-VAE outputs: a depth video over the generated frames and the Gaussians as a readable .ply.
  with av.open(os.path.join(out, "sample0_depth.mp4")) as container:
    assert len([f for f in container.decode(video=0)]) == 2
  from cvd_storm_jax.eval_storm import read_ply
  ply = read_ply(os.path.join(out, "sample0.ply"))
  assert len(ply["means"]) > 0 and np.isfinite(ply["means"]).all()
  # Sliding windows (the paper's 4D decoding of long clips): a 1-frame STORM context decodes the 2 frames in two
  # windows, each frame from its own window, with the same GS decoder params.
  one = storm_cfg.copy_and_resolve_references()
  one.storm.context_frames, one.storm.target_frames = (0,), (0,)
  host = next(pipeline.make_iterator(c.data, seed=c.seed))
  two = str(tmp_path / "two_windows")
  os.makedirs(two)
  gen._storm_outputs(gen._storm_task(one, 2, 16), storm_params, host, latents, two, 10.0, 2)
  with av.open(os.path.join(two, "sample0_depth.mp4")) as container:
    windowed = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
  assert len(windowed) == 2 and windowed[0].std() > 0 and windowed[1].std() > 0
  with pytest.raises(ValueError, match="storm_vae_config"):
    gen.generate(c, workdir, str(tmp_path / "bad"), num_steps=1, storm_vae_params=storm_params)
  with pytest.raises(ValueError, match="without --storm_vae_params"):
    gen.generate(c, workdir, str(tmp_path / "bad"), num_steps=1, storm_vae_config=storm_cfg)
  with pytest.raises(ValueError, match="num_frames=3 but the data"):
    gen.generate(c, workdir, str(tmp_path / "bad"), num_steps=1, num_frames=3)
  with pytest.raises(ValueError, match="num_reference=2"):
    gen.generate(c, workdir, str(tmp_path / "bad"), num_steps=1, reference_frames=2, ground_truth_reference=True)


def _random_tiny_dit(dtype):
  """(task, device batch, random params) of a 3-frame tiny DiT computing in ``dtype``; the adapter's zero-initialised
  projections are random too, so that the layouts change the output."""
  from flax.core import meta

  from cvd_storm_jax.data_pipelines import pipeline
  from cvd_storm_jax.tasks.dit import DiTTask
  c = small_dit_config()
  c.data.num_frames, c.model.dtype = 3, dtype  # windows of 2 frames carrying 1: two windows
  task = DiTTask(c)
  batch = {k: jnp.asarray(v) for k, v in task.device_batch(next(pipeline.make_iterator(c.data, seed=0))).items()}
  shapes = meta.unbox(jax.eval_shape(task.init, jax.random.key(0), batch))
  rng = np.random.default_rng(0)
  return task, batch, jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.05, x.shape), x.dtype), shapes)


def test_clip_sampler_hoists_conditions_and_compiles_once():
  """ClipSampler computes text, cameras and the layout adapter once per window and runs every window (the first has
  no references) through one compiled program; its latents are those of sampling with the task's plain forward pass
  (conditions and adapter inside every step; no reference argument for the first window)."""
  from cvd_storm_jax.generate import ClipSampler, slice_frames
  task, batch, params = _random_tiny_dit("float32")
  drops, conditions = [], task.conditions

  def recording(params, batch, text_drop, box_drop, map_drop, **kw):
    jax.debug.callback(lambda *d: drops.append(np.stack(d)), text_drop, box_drop, map_drop)
    return conditions(params, batch, text_drop, box_drop, map_drop, **kw)
  task.conditions = recording
  clip_sampler = ClipSampler(task, num_steps=2, guidance=3.0)
  out = clip_sampler(clip_sampler.device_params(params), batch, window=2, reference_frames=1, seed=3)
  assert clip_sampler._run_window._cache_size() == 1
  # The unconditional half of the doubled batch drops text, boxes and map alike; the conditional half none.
  B = batch["box_images"].shape[0]
  assert len(drops) == 2 and all((d == [[False] * B + [True] * B] * 3).all() for d in drops), drops
  task.conditions = conditions
  B, T, V, h, w, C = task._latent_shape(batch)
  noise = jax.random.normal(jax.random.split(jax.random.key(3))[0], (B, T, V, h, w, C), jnp.float32)

  def sample_window(start, noise_w, ref):
    wbatch = {k: jnp.concatenate([v, v]) for k, v in slice_frames(batch, start, start + 2).items()}
    false = jnp.zeros((2 * B,), bool)
    fn = lambda x, t, u: task.forward(params, wbatch, x, t, u, u, u, false, false)
    return sampler.sample(fn, noise_w, num_steps=2, guidance=3.0, reference=ref)

  want = np.asarray(sampler.autoregressive(jax.jit(sample_window, static_argnums=0), noise, window=2,
                                           num_reference=1))
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max())
  # The layouts do reach the output through the hoisted adapter residuals.
  grey = dict(batch, box_images=jnp.full_like(batch["box_images"], 32))
  assert np.abs(clip_sampler(params, grey, window=2, reference_frames=1, seed=3) - out).max() > 1e-3


def test_sampling_params_hold_kernels_in_the_compute_dtype():
  """device_params: the DiT's kernels in bf16 (every layer casts them to it at use), the rest as stored; one
  velocity evaluation is the same as with the fp32 master weights."""
  from cvd_storm_jax.diffusion.sampler import branch_uncond
  from cvd_storm_jax.generate import ClipSampler
  task, batch, params = _random_tiny_dit("bfloat16")
  dparams = ClipSampler(task, num_steps=1).device_params(params)
  leaves = jax.tree_util.tree_leaves_with_path(dparams["dit"])
  assert all(x.dtype == (jnp.bfloat16 if x.ndim >= 2 else jnp.float32) for _, x in leaves)
  assert any(x.ndim == 1 for _, x in leaves) and all(isinstance(x, jax.Array) for _, x in leaves)
  assert jax.tree.map(lambda x: x.dtype, dparams["text"]) == jax.tree.map(lambda x: x.dtype, params["text"])
  x = jax.random.normal(jax.random.key(1), task._latent_shape(batch)[:3] + task._latent_shape(batch)[3:])
  t, u = jnp.full(x.shape[:3], 700.0), branch_uncond(x.shape[0], 1.0)
  velocity = jax.jit(lambda p: task.forward(p, batch, x, t, u, u, u, u, u))
  np.testing.assert_array_equal(np.asarray(velocity(dparams), np.float32), np.asarray(velocity(params), np.float32))


def test_pixel_shuffle_inverts_unshuffle():
  from cvd_storm_jax.generate import pixel_shuffle
  from cvd_storm_jax.models.embeddings import pixel_unshuffle
  x = np.random.default_rng(4).standard_normal((2, 16, 24, 3)).astype(np.float32)
  np.testing.assert_array_equal(pixel_shuffle(np.asarray(pixel_unshuffle(jnp.asarray(x), 8)), 8), x)
