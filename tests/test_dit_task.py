"""The DiT task's pieces: tokenisation, the frozen VAE encoder in the step (diffusers folder or STORM-VAE export),
the reference-frame and condition-drop logic, and rectified flow against diffusers' scheduler."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from jax.extend.core import jaxprs_in_params

from _configs import small_dit_config  # noqa: I100 (configs/ as modules)
from cvd_storm_jax import checkpoint as ckpt_lib
from cvd_storm_jax.data_pipelines import pipeline
from cvd_storm_jax.diffusion import rectified_flow as rf
from cvd_storm_jax.tasks import dit as dit_task

TINY_VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16)


def test_hashed_word_ids():
  caps = np.array([["A red car.", ""], ["a RED car", "night, rain"]], dtype=object)
  ids = dit_task.hashed_word_ids(caps, vocab_size=64, length=4)
  assert ids.shape == (2, 2, 4) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids[0, 0], ids[1, 0])  # case and punctuation do not matter
  assert (ids[0, 1] == 0).all() and (ids[0, 0, :3] > 0).all() and ids[0, 0, 3] == 0
  assert ids.max() < 64


def test_rectified_flow_matches_diffusers_scheduler():
  torch = pytest.importorskip("torch")
  from diffusers import FlowMatchEulerDiscreteScheduler
  for n in (4, 40, 50):
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(n)
    np.testing.assert_allclose(np.asarray(rf.sampling_sigmas(n)), s.sigmas.numpy(), atol=1e-6)
  train = FlowMatchEulerDiscreteScheduler(shift=3.0)
  sig = np.asarray(rf.sample_training_sigmas(jax.random.key(0), (4096,)))
  grid = train.sigmas.numpy()
  assert np.abs(sig[:, None] - grid[None, :]).min(axis=1).max() < 1e-6  # every sigma is on the training grid
  assert 0.55 < np.median(sig) < 0.85  # logit-normal(0, 1) median 0.5, shifted by 3: 0.75
  # A positive logit mean samples u = sigmoid(N(1, 1)) towards index 1000, i.e. towards small timesteps (SD3's grid
  # descends): median timestep 1000 - floor(1000 sigmoid(1)) = 269, sigma = 3 * 0.269 / (1 + 2 * 0.269) = 0.525.
  sig = np.asarray(rf.sample_training_sigmas(jax.random.key(0), (4096,), logit_mean=1.0))
  assert abs(np.median(sig) - 0.525) < 0.02, np.median(sig)
  x0, eps = jnp.ones((2, 3)), jnp.zeros((2, 3))
  np.testing.assert_allclose(rf.add_noise(x0, eps, jnp.array([0.25, 1.0])), [[0.75] * 3, [0.0] * 3])
  torch.manual_seed(0)
  sample, v = torch.randn(2, 3), torch.randn(2, 3)
  s = FlowMatchEulerDiscreteScheduler(shift=3.0)
  s.set_timesteps(10)
  want = s.step(v, s.timesteps[3], sample.clone()).prev_sample.numpy()
  sig = rf.sampling_sigmas(10)
  got = rf.euler_step(jnp.asarray(sample.numpy()), jnp.asarray(v.numpy()), sig[3], sig[4])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def _init_and_grads(config, host):
  task = dit_task.make_task(config)
  batch = {k: jnp.asarray(v) for k, v in task.device_batch(host).items()}
  params = jax.jit(lambda r: meta.unbox(task.init(r, batch)))(jax.random.key(0))
  (loss, _), grads = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))(params, batch, jax.random.key(1), 0)
  return task, params, float(loss), grads


@pytest.fixture(scope="module")
def host_batch():
  return next(pipeline.make_iterator(small_dit_config().data, seed=0))


def _vae_encoder_from_diffusers(folder):
  torch = pytest.importorskip("torch")
  from diffusers import AutoencoderKL
  torch.manual_seed(0)
  vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                      use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
  vae.save_pretrained(folder)
  return vae


def test_vae_latents_from_diffusers_folder_are_frozen(tmp_path, host_batch):
  torch = pytest.importorskip("torch")
  folder = str(tmp_path / "vae")
  ref = _vae_encoder_from_diffusers(folder)
  config = small_dit_config()
  config.latents.kind, config.latents.vae_from = "vae", folder
  task, params, loss, grads = _init_and_grads(config, host_batch)
  assert np.isfinite(loss)
  # The encoder params are the imported ones (not a random init), and nothing flows into them.
  assert "decoder" not in params["vae"]
  conv_in = np.asarray(params["vae"]["encoder"]["conv_in"]["kernel"])
  want = ref.encoder.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_allclose(conv_in, want, rtol=1e-6)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["vae"]))
  assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads["dit"]))
  mask = task.trainable_mask(params)
  assert not any(jax.tree.leaves(mask["vae"])) and all(jax.tree.leaves(mask["dit"]))
  # The latents are SD3's: posterior mean ~ (diffusers encode mean - shift) * scale, up to the posterior noise.
  x = host_batch["images"][0, 0, 0].astype(np.float32) / 127.5 - 1.0
  with torch.no_grad():
    mean = ref.encode(torch.from_numpy(x.transpose(2, 0, 1)[None])).latent_dist.mean[0].numpy().transpose(1, 2, 0)
  mean_j, _ = task.vae.apply({"params": params["vae"]}, jnp.asarray(x[None]), method=task.vae.encode)
  np.testing.assert_allclose(np.asarray(mean_j[0]), mean, rtol=1e-4, atol=1e-4)


def test_vae_latents_from_storm_vae_export(tmp_path, host_batch):
  """A STORM-VAE export (export_params) names its VAE's architecture in vae_config.json: the DiT builds its encoder
  from it, with no latents.vae given (the default, the SD3.5 VAE's, would not fit the tiny export)."""
  from cvd_storm_jax.export_params import write_vae_config
  config = small_dit_config()
  config.latents.kind = "vae"
  from cvd_storm_jax.models import vae as vae_lib
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig(**TINY_VAE))
  full = meta.unbox(vae.init(jax.random.key(7), jnp.zeros((1, 32, 64, 3)))["params"])
  path = str(tmp_path / "storm_vae_params")
  ckpt_lib.save_params(path, {"vae": full, "gs": {"w": np.ones((3,), np.float32)}})
  write_vae_config(path, vae_lib.VAEConfig(**TINY_VAE))
  config.latents.vae_from = path
  task = dit_task.make_task(config)
  batch = {k: jnp.asarray(v) for k, v in task.device_batch(host_batch).items()}
  params = jax.jit(lambda r: meta.unbox(task.init(r, batch)))(jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(params["vae"]["encoder"]["conv_in"]["kernel"]),
                                np.asarray(full["encoder"]["conv_in"]["kernel"]))
  # The frozen encoder computes in the DiT's dtype: every convolution of a bf16 model's latents is bf16.
  config.model.dtype = "bfloat16"
  bf16_task = dit_task.make_task(config)
  jaxpr = jax.make_jaxpr(lambda p, b: bf16_task._latents(p, b, jax.random.key(0)))(params, batch)

  def eqns(j):  # into the chunked encoder's lax.map
    for e in j.eqns:
      yield e
      for sub in jaxprs_in_params(e.params):
        yield from eqns(sub)

  convs = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"]
  assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)


def _loss_of_a_fixed_velocity(host_batch, monkeypatch, loss_form, on_reference):
  """The task's loss when the model is replaced by v = sin(3 x_t) + 0.5 (any fixed function of the input: the loss
  is checked, not the model), every sample with reference frames. Returns (loss, x_t, timesteps, x0, v, view weights
  [B, T, V]) as float64 numpy."""
  config = small_dit_config()
  config.diffusion.loss_form, config.diffusion.loss_on_reference_frames = loss_form, on_reference
  config.conditioning.generation_task_ratio = 0.0
  task = dit_task.make_task(config)
  batch = {k: jnp.asarray(v) for k, v in task.device_batch(host_batch).items()}
  params = jax.jit(lambda r: meta.unbox(task.init(r, batch)))(jax.random.key(0))
  seen = {}

  def fake_forward(params, batch, x_t, timesteps, *drops):
    seen["x_t"], seen["t"] = x_t, timesteps
    return jnp.sin(3.0 * x_t) + 0.5
  monkeypatch.setattr(task, "forward", fake_forward)
  loss, _ = task.loss_fn(params, batch, jax.random.key(3), 0)
  x_t, t = np.asarray(seen["x_t"], np.float64), np.asarray(seen["t"])
  assert (t[:, 0] == 0).all() and (t[:, -1] > 0).all()  # frame 0 is a reference, the last one is generated
  x0 = np.asarray(task._latents(params, batch, jax.random.key(9)), np.float64)  # pixel_unshuffle: no randomness
  w = np.broadcast_to(np.asarray(batch["view_mask"], np.float64)[:, None, :], t.shape)
  return float(loss), x_t, t, x0, np.sin(3.0 * x_t) + 0.5, w


def test_x0_loss_with_reference_frames_is_c35s(host_batch, monkeypatch):
  """diffusion.loss_form="x0" with loss_on_reference_frames (OpenDWM's C35): the loss is C35's mean over every frame
  and valid view of ||x_t - sigma v - x0||^2, reference frames included with the sample's sigma."""
  loss, x_t, t, x0, v, w = _loss_of_a_fixed_velocity(host_batch, monkeypatch, "x0", True)
  sigma = (t[:, -1, 0] / 1000.0)[:, None, None, None, None, None]
  err = ((x_t - sigma * v - x0) ** 2).mean(axis=(3, 4, 5))
  np.testing.assert_allclose(loss, (err * w).sum() / w.sum(), rtol=1e-5)


@pytest.mark.parametrize("on_reference", [False, True])
def test_velocity_loss_frames(host_batch, monkeypatch, on_reference):
  """The default velocity loss: (v - (eps - x0))^2 averaged over generated frames and valid views; reference frames
  are left out, or (loss_on_reference_frames) kept with target zero velocity."""
  loss, x_t, t, x0, v, w = _loss_of_a_fixed_velocity(host_batch, monkeypatch, "velocity", on_reference)
  is_ref = t == 0
  sigma = (t[:, -1, 0] / 1000.0)[:, None, None, None, None, None]
  eps = (x_t - (1.0 - sigma) * x0) / sigma  # x_t = (1 - sigma) x0 + sigma eps on generated frames
  target = np.where(is_ref[..., None, None, None], 0.0, eps - x0)
  err = ((v - target) ** 2).mean(axis=(3, 4, 5))
  w = w if on_reference else w * ~is_ref
  np.testing.assert_allclose(loss, (err * w).sum() / w.sum(), rtol=1e-4)


def _write_text_store(path, captions, *, clip_length=3, clip_dim=4, joint_dim=8, pooled_dim=6, t5_length=0):
  """A TextEmbeddingStore in its documented on-disk format; row i holds the value i everywhere."""
  import json
  os.makedirs(path, exist_ok=True)
  n = len(captions)
  rows = np.arange(n, dtype=np.float32)
  np.save(os.path.join(path, "clip.npy"), np.broadcast_to(rows[:, None, None], (n, clip_length, clip_dim)).copy())
  np.save(os.path.join(path, "pooled.npy"), np.broadcast_to(rows[:, None], (n, pooled_dim)).copy())
  with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump(dict(format="cvd_storm_text_embeddings/v1", captions=list(captions), clip_length=clip_length,
                   t5_length=t5_length, clip_dim=clip_dim, joint_dim=joint_dim, pooled_dim=pooled_dim,
                   dtype="float32", has_t5=False), f)
  with open(os.path.join(path, "progress.json"), "w") as f:
    json.dump({"done": n}, f)


def test_precomputed_text_drops_to_the_data_stores_empty_prompt(tmp_path):
  """text.kind=precomputed: the dropped prompt is row 0 ("") of data.text_embeddings unless text.null_embedding names
  another store, which must have been computed the same way; neither given is an error naming the keys."""
  config = small_dit_config()
  config.text.kind = "precomputed"
  config.model.joint_attention_dim, config.model.pooled_projection_dim = 8, 6
  _write_text_store(str(tmp_path / "data"), ["", "a road", "a bridge"])
  config.data.text_embeddings = str(tmp_path / "data")
  task = dit_task.make_task(config)
  np.testing.assert_array_equal(task.null_text[1], 0.0)  # row 0
  _write_text_store(str(tmp_path / "other"), ["x", ""], clip_length=5)
  config.text.null_embedding = str(tmp_path / "other")
  with pytest.raises(ValueError, match="clip_length"):
    dit_task.make_task(config)
  config.text.null_embedding, config.data.text_embeddings = "", ""
  with pytest.raises(ValueError, match="data.text_embeddings"):
    dit_task.make_task(config)


def test_dropped_conditions_change_the_prediction_and_grey_layout(host_batch):
  config = small_dit_config()
  task = dit_task.make_task(config)
  batch = {k: jnp.asarray(v) for k, v in task.device_batch(host_batch).items()}
  params = jax.jit(lambda r: meta.unbox(task.init(r, batch)))(jax.random.key(0))
  # Make the zero-initialised adapter outputs non-zero so that the layout reaches the prediction.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if "adapter" in jax.tree_util.keystr(p) else x, params)
  x0 = task._latents(params, batch, jax.random.key(2))
  B, T, V = x0.shape[:3]
  t = jnp.full((B, T, V), 500.0)
  f = jnp.zeros((B,), bool)
  tr = jnp.ones((B,), bool)
  base = task.forward(params, batch, x0, t, f, f, f, f, f)
  for drops in ((tr, f, f), (f, tr, f), (f, f, tr)):
    out = task.forward(params, batch, x0, t, *drops, f, f)
    assert float(jnp.abs(out - base).max()) > 0, drops
