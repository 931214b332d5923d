"""The attention wrapper's cuDNN-route rewrites, checked through the XLA implementation (which accepts the same
key_value_seq_lengths) since CI has no GPU; benchmarks/check_gpu_lowering.py lowers the real cuDNN calls."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
