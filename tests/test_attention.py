"""The attention wrapper's cuDNN-route rewrites, checked through the XLA implementation (which accepts the same
key_value_seq_lengths) since CI has no GPU; benchmarks/check_gpu_lowering.py lowers the real cuDNN calls. The TPU route
(the Pallas splash kernel): numerics in Pallas interpret mode against XLA, the "auto" choice on a pretended TPU, and
the tiny train steps lowered for TPU (benchmarks/check_tpu_lowering.py does it at the paper size)."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _configs import REPO, small_dit_config, storm_vae
from cvd_storm_jax.models.attention import _pad_to_even, dot_product_attention, valid_keys_first


def _qkv(seed, lq, lk):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(2, lq, 2, 8)), jnp.float32),
          jnp.asarray(rng.normal(size=(2, lk, 2, 8)), jnp.float32),
          jnp.asarray(rng.normal(size=(2, lk, 2, 8)), jnp.float32), rng)


def test_key_valid_matches_masked_attention():
  # cuDNN route of `key_valid`: valid keys gathered to the front + key_value_seq_lengths, no mask tensor.
  q, k, v, rng = _qkv(0, 12, 12)
  valid = jnp.asarray(rng.random((2, 12)) < 0.5).at[:, 3].set(True)
  want = jax.nn.dot_product_attention(q, k, v, mask=valid[:, None, None, :])
  np.testing.assert_allclose(dot_product_attention(q, k, v, key_valid=valid), want, rtol=1e-6, atol=1e-6)
  k2, v2, lengths = valid_keys_first(k, v, valid)
  got = jax.nn.dot_product_attention(q, k2, v2, key_value_seq_lengths=lengths)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="key_valid has shape"):
    dot_product_attention(q, k, v, key_valid=valid[:, :5])


@pytest.mark.parametrize("masked", [False, True])
def test_odd_lengths_padded_to_even(masked):
  # cuDNN route for odd lengths (19 frames in the temporal blocks): one padded query and key, excluded again.
  q, k, v, rng = _qkv(1, 19, 19)
  mask = jnp.asarray(rng.random((2, 2, 19, 19)) < 0.7).at[..., 0].set(True) if masked else None
  want = jax.nn.dot_product_attention(q, k, v, mask=mask)
  q2, k2, v2, mask2, lengths = _pad_to_even(q, k, v, mask, None)
  assert q2.shape[1] == k2.shape[1] == 20 and (mask2 is None) == (lengths is not None)
  got = jax.nn.dot_product_attention(q2, k2, v2, mask=mask2, key_value_seq_lengths=lengths)[:, :19]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dit_attention_lowers_to_cudnn_for_cuda():
  # Every attention layer of the bf16 DiT, 3 (odd) frames included, must lower to cuDNN flash attention for CUDA:
  # an odd length once made JAX's cuDNN path refuse the 19-frame temporal blocks of the paper size.
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
  import check_gpu_lowering as gpu
  with gpu.pretend_gpu():
    assert jax.default_backend() == "gpu"
    found = gpu.lower_dit("tiny", 3, 3, (4, 4), 5)
  assert jax.default_backend() == "cpu"  # restored
  assert found["attention_layers"] >= 4 and found["cudnn_backward_calls"] == found["attention_layers"], found


# --- TPU: the Pallas splash-attention kernel ("tpu_splash"), in interpret mode off TPU. ---------------------------


@pytest.mark.parametrize("lq, lk, valid_keys", [(150, 150, True), (130, 200, False)])
def test_tpu_splash_matches_xla(lq, lk, valid_keys):
  # Lengths not multiples of the 128 block (padding of q and k), keys invalid at different places per sample, a
  # non-default scale; forward and every gradient against the XLA implementation.
  q, k, v, rng = _qkv(2, lq, lk)
  valid = jnp.asarray(rng.random((2, lk)) < 0.6).at[0, :128].set(False).at[1, -1].set(False) if valid_keys else None
  attend = lambda impl: lambda q, k, v: dot_product_attention(q, k, v, key_valid=valid, scale=0.3,
                                                              implementation=impl)
  np.testing.assert_allclose(attend("tpu_splash")(q, k, v), attend("xla")(q, k, v), rtol=1e-5, atol=1e-5)
  loss = lambda impl: lambda *a: jnp.sum(jnp.sin(attend(impl)(*a)) * jnp.arange(lq)[None, :, None, None])
  got = jax.grad(loss("tpu_splash"), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    assert np.all(np.isfinite(g)), name
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)
  if valid is not None:  # an invalid key gets exactly no gradient, as on XLA
    assert not np.any(np.asarray(got[1])[~np.asarray(valid)])


def test_tpu_splash_under_mesh_and_remat():
  # As the trainer runs it: jitted under jax.set_mesh with the config's logical-axis rules, inside jax.checkpoint.
  # The kernel then runs in a shard_map over the batch ("data", "fsdp") and head ("tensor") axes, one sample and head
  # per device here.
  import flax.linen as nn
  from cvd_storm_jax import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(4, 140, 2, 8)), jnp.float32) for _ in range(3))
  valid = jnp.asarray(rng.random((4, 140)) < 0.5).at[:, 0].set(True)

  def loss(impl, q, k, v):
    attend = jax.checkpoint(lambda q, k, v: dot_product_attention(q, k, v, key_valid=valid, implementation=impl))
    return jnp.sum(jnp.sin(attend(q, k, v)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3)), static_argnums=0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.default_rules()):
    text = step.lower("tpu_splash", q, k, v).as_text()
    got, want = step("tpu_splash", q, k, v), step("xla", q, k, v)
  assert "sdy.manual_computation" in text and 'manual_axes={"data", "fsdp", "tensor"}' in text, text[:2000]
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_pick_takes_splash_on_tpu_for_long_unmasked_calls():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  from lowering import pretend_backend
  from cvd_storm_jax.models.attention import SPLASH_MIN_LENGTH, _pick
  shape = lambda length: jax.ShapeDtypeStruct((2, length, 12, 64), jnp.bfloat16)
  long, short = shape(43031), shape(SPLASH_MIN_LENGTH - 1)
  mask, bias = jnp.ones((1, 1, 1, 43031), bool), jnp.zeros((1, 1, 1, 43031), jnp.bfloat16)
  with pretend_backend("tpu"):
    assert _pick(long, long, None, None, "auto") == "tpu_splash"  # key_valid alone is no `mask`
    assert _pick(shape(SPLASH_MIN_LENGTH), shape(SPLASH_MIN_LENGTH), None, None, "auto") == "tpu_splash"
    assert _pick(long, long, None, mask, "auto") == "xla"
    assert _pick(long, long, bias, None, "auto") == "xla"
    assert _pick(short, long, None, None, "auto") == "xla"
    assert _pick(long, short, None, None, "auto") == "xla"
    assert _pick(long, long, None, None, "xla") == "xla"
  for backend, want in (("gpu", "cudnn"), ("cpu", "xla")):  # unchanged off TPU
    with pretend_backend(backend):
      assert _pick(long, long, None, None, "auto") == want
      assert _pick(long, long, bias, None, "auto") == "xla"
  with pytest.raises(ValueError, match="takes key_valid only"):
    dot_product_attention(*(jnp.zeros((1, 4, 1, 8)),) * 3, mask=jnp.ones((1, 1, 4, 4), bool),
                          implementation="tpu_splash")


@pytest.mark.parametrize("task", ["dit", "storm_vae"])
def test_tiny_train_step_lowers_for_tpu(task):
  # The trainer's update of the tiny configs, exported for TPU on a data=2, fsdp=2, tensor=2 mesh of the 8 virtual CPU
  # devices, with jax.default_backend() answering "tpu": every attention call takes a TPU path, the long unmasked ones
  # the splash kernel, each a forward, a dq and a dkv Mosaic kernel (tpu_custom_call) that all run inside a shard_map
  # manual over every mesh axis, and the module stays partitioned over all of them.
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import check_tpu_lowering as tpu
  from lowering import pretend_backend
  from cvd_storm_jax import tasks
  from cvd_storm_jax.data_pipelines import pipeline
  config = small_dit_config() if task == "dit" else storm_vae.get_config("tiny")
  if task == "dit":  # 128x256: 8 x 16 = 128 image tokens, so that the joint and dual attentions reach the kernel
    config.data.buckets = [(128, 256, 1.0)]
  host = tasks.get_task(config).device_batch(next(pipeline.make_iterator(config.data, seed=0)))
  setup = lambda b: (config, {k: jax.ShapeDtypeStruct((b,) + v.shape[1:], v.dtype) for k, v in host.items()})
  with pretend_backend("tpu"):
    result = tpu.lower_train_step(task, {"data": 2, "fsdp": 2, "tensor": 2}, setup)
  assert jax.default_backend() == "cpu"  # restored
  assert result["ok"] and result["partitions"] == 8, result
  assert result["mesh_axes_used"] == ["data", "fsdp", "tensor"], result
  want = {
      # Joint attention (128 image + 16 text tokens) in both layers, layer 0's dual self-attention (128 image tokens);
      # the 2-frame temporal and the masked cross-view (6 x 16 tokens) attentions stay on XLA.
      "dit": {"tpu_splash q144 k144 2x32": 2, "tpu_splash q128 k128 2x32": 1, "xla q2 k2 2x32": 1,
              "xla q96 k96 2x32": 1},
      # The GS decoder's 2 blocks over 2 frames x 6 views x 4 x 7 tokens + its 11 extra tokens, key_valid-masked;
      # the VAE's mid-block attentions (encoder, decoder) over its 4 x 7 latent cells stay on XLA.
      "storm_vae": {"tpu_splash q347 k347 4x16": 2, "xla q28 k28 1x32": 2},
  }[task]
  assert result["attention_calls"] == want, result
  splash = result["attention"]["tpu_splash"]
  assert result["splash_kernels"] == {"total": 3 * splash, "in_shard_map": 3 * splash,
                                      "manual_axes": ["data", "fsdp", "tensor"]}, result
  assert set(result["custom_calls"]) == {"tpu_custom_call"} | ({"LuDecomposition"} if task == "storm_vae" else set()), \
      result
  assert result["rasterizer_backend"] == ({"xla": 1} if task == "storm_vae" else {}), result
