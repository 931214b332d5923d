"""cvd_storm_jax.memory: what a step keeps for its backward pass, per remat policy, and the policy "auto" picks."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax.core import meta
from jax import ad_checkpoint

from cvd_storm_jax import memory
from cvd_storm_jax.models import cvd_dit


def test_saved_activation_bytes_counts_what_the_backward_keeps():
  x, w1, w2 = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((4, 8), (8, 16), (16, 2)))

  def two_layers(x, w1, w2):
    return jnp.sum(jnp.sin(x @ w1) @ w2)

  # Kept: h = sin(x @ w1) [4, 16] (the second product's transpose needs it) and cos(x @ w1) [4, 16] (sin's
  # derivative); x, w1, w2 are arguments and not counted.
  assert memory.saved_activation_bytes(two_layers, x, w1, w2) == 4 * (4 * 16 + 4 * 16)
  # Rematerialised whole, the function keeps only its arguments.
  assert memory.saved_activation_bytes(jax.checkpoint(two_layers), x, w1, w2) == 0
  # Keeping the named value alone: h; cos is recomputed.
  named = jax.checkpoint(
      lambda x, w1, w2: jnp.sum(ad_checkpoint.checkpoint_name(jnp.sin(x @ w1), "h") @ w2),
      policy=jax.checkpoint_policies.save_only_these_names("h"))
  assert memory.saved_activation_bytes(named, x, w1, w2) == 4 * 4 * 16
  # Differentiated for the weights only, as a training step is: sin(x) (w1's gradient needs it), h and cos(x @ w1)
  # are kept. Differentiating x as well (the batch, as the "auto" remat sizing once did) also kept cos(x).
  scaled = lambda w1, w2, x: two_layers(jnp.sin(x), w1, w2)
  assert memory.saved_activation_bytes(scaled, w1, w2, nondiff=(x,)) == 4 * (4 * 8 + 4 * 16 + 4 * 16)
  assert memory.saved_activation_bytes(scaled, w1, w2, x) == 4 * (2 * 4 * 8 + 4 * 16 + 4 * 16)


def test_remat_policies_keep_less_in_order_of_preference():
  # The two-block tiny model at a size where each policy's choice shows. POLICY_PREFERENCE is "most memory
  # first": choose_remat_policy relies on that order.
  cfg = cvd_dit.default_model_config("tiny")
  inputs = cvd_dit.dummy_inputs(cfg, b=1, t=2, v=2, h=8, w=8, text_len=4)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs)
  params = jax.eval_shape(lambda k, *x: meta.unbox(cvd_dit.CVDDiT(**cfg).init(k, *x))["params"],
                          jax.random.key(0), *abstract)

  def kept(policy):
    model = cvd_dit.CVDDiT(**dict(cfg, remat_policy=policy))
    return memory.saved_activation_bytes(lambda p, *x: jnp.mean(model.apply({"params": p}, *x) ** 2), params,
                                         *abstract)

  sizes = [kept(p) for p in ("none",) + memory.POLICY_PREFERENCE]
  assert all(a > b for a, b in zip(sizes, sizes[1:])), dict(zip(("none",) + memory.POLICY_PREFERENCE, sizes))
  assert sizes[-1] > 0  # "full" still keeps each block's input


def test_choose_remat_policy_takes_the_first_that_fits_and_stops_measuring():
  sizes = {"minimal": 90, "save_dot_except_mlp_in": 51, "save_out_proj": 20, "full": 5}
  asked = []

  def measure(policy):
    asked.append(policy)
    return sizes[policy]

  policy, measured = memory.choose_remat_policy(measure, state_bytes=30, budget_bytes=100, headroom=0.8)
  assert policy == "save_out_proj" and asked == ["minimal", "save_dot_except_mlp_in", "save_out_proj"]
  assert measured == {p: sizes[p] for p in asked}
  assert memory.choose_remat_policy(measure, 30, 1000)[0] == "minimal"
  with pytest.raises(ValueError, match=r"no remat policy fits.*full 0\.0 GiB"):
    memory.choose_remat_policy(measure, state_bytes=100, budget_bytes=100)


def test_train_state_bytes_and_device_memory():
  params = {"w": np.zeros((3, 4), np.float32), "b": np.zeros((4,), np.float32)}
  opt = {"mu": params, "nu": params, "count": np.zeros((), np.int32)}
  assert memory.train_state_bytes(params, opt) == 2 * 64 + 2 * 64 + 4
  # Per device: "w" split 8 ways along its first axis (8 x 4 floats -> 1 x 4 on each device), the rest replicated.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  split, repl = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s)) for s in (("fsdp",), ()))
  big = {"w": np.zeros((8, 4), np.float32), "b": np.zeros((4,), np.float32)}
  shardings = {"w": split, "b": repl}
  assert memory.nbytes(big, shardings) == 16 + 16
  assert memory.train_state_bytes(big, {"mu": big}, shardings, {"mu": shardings}) == 2 * 32 + 32
  limit = memory.device_memory_bytes()
  assert limit is None or limit > 0
