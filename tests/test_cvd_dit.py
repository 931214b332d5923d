"""CVDDiT: shapes, composition with the plain MM-DiT, masking/locality of the added blocks, gradients, bf16, FLOPs."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax.core import meta

from cvd_storm_jax.models import cvd_dit
from cvd_storm_jax.models.mmdit import SD3Transformer
from cvd_storm_jax.pretrained.sd3_transformer import split_mmdit

B, T, V, H, W, L = 2, 3, 3, 4, 6, 5
SD3_KEYS = ("sample_size", "patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
            "pos_embed_max_size", "dual_attention_layers", "qk_norm")


def make_inputs(cfg, seed=0, b=B, t=T, v=V, h=H, w=W):
  rng = np.random.default_rng(seed)
  f = cfg.layout_downscale
  return dict(
      latents=jnp.asarray(rng.standard_normal((b, t, v, h, w, cfg.in_channels)), jnp.float32),
      timesteps=jnp.asarray(rng.uniform(0, 1000, (b, t, v)), jnp.float32).at[:, 0].set(0.0),  # frame 0: reference
      text_tokens=jnp.asarray(rng.standard_normal((b, t, v, L, cfg.joint_attention_dim)), jnp.float32),
      pooled_text=jnp.asarray(rng.standard_normal((b, t, v, cfg.pooled_projection_dim)), jnp.float32),
      layout_images=jnp.asarray(rng.uniform(0, 1, (b, t, v, h * f, w * f, cfg.layout_channels)), jnp.float32),
      camera_params=jnp.asarray(rng.standard_normal((b, t, v, 11)), jnp.float32),
      view_adjacency=jnp.ones((b, v, v), bool),
      disable_temporal=jnp.zeros((b,), bool),
      disable_crossview=jnp.zeros((b,), bool),
  )


def random_params(model, inputs, seed=0):
  """Random params of the model's shapes (numpy; avoids compiling ``init`` of the whole model on a busy CPU).

  Same conventions as the real init where they matter: norm scales near 1, AlphaBlender mix_factor 2.0, the
  layout adapter's zero_convs exactly 0 (the real init of those is checked in test_zero_init_adapter_is_a_no_op).
  """
  shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0), **inputs))["params"]
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if "zero_convs" in name:
      return np.zeros(x.shape, np.float32)
    if "mix_factor" in name:
      return np.full(x.shape, 2.0, np.float32)
    if name.endswith("['scale']"):
      return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    if name.endswith("['bias']"):
      return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    fan_in = int(np.prod(x.shape[:-1]))
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def tiny():
  cfg = cvd_dit.default_model_config("tiny")
  model = cvd_dit.CVDDiT(**cfg)
  inputs = make_inputs(cfg)
  params = random_params(model, inputs)
  apply = jax.jit(lambda p, kw: model.apply({"params": p}, **kw))
  return cfg, model, params, inputs, apply


@pytest.fixture(scope="module")
def one_layer():
  """Every feature in a single MM-DiT layer (dual attention, temporal, cross-view, 1 adapter block): cheap compiles."""
  cfg = cvd_dit.default_model_config("tiny")
  cfg.update(num_layers=1, dual_attention_layers=(0,), temporal_layers=(0,), crossview_layers=(0,),
             num_adapter_blocks=1)
  inputs = make_inputs(cfg, b=1, t=2, v=2)
  model = cvd_dit.CVDDiT(**cfg)
  return cfg, inputs, random_params(model, inputs, seed=1)


def test_shapes_and_finite(tiny):
  cfg, _, params, inputs, apply = tiny
  out = apply(params, inputs)
  assert out.shape == (B, T, V, H, W, cfg.out_channels) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))


def test_disabled_blocks_reduce_to_sd3_per_image(tiny):
  cfg, _, params, inputs, apply = tiny
  off = dict(inputs, disable_temporal=jnp.ones((B,), bool), disable_crossview=jnp.ones((B,), bool))
  out = np.asarray(apply(params, off))
  sd3 = SD3Transformer(**{k: cfg[k] for k in SD3_KEYS})
  mm_params, added = split_mmdit(params)
  assert {"camera_embed", "layout_adapter", "temporal_blocks_0", "crossview_blocks_0"} <= set(added)
  n = B * T * V
  ref = jax.jit(sd3.apply)({"params": mm_params}, inputs["latents"].reshape(n, H, W, -1),
                           inputs["timesteps"].reshape(n), inputs["text_tokens"].reshape(n, L, -1),
                           inputs["pooled_text"].reshape(n, -1))
  ref = np.asarray(ref).reshape(out.shape)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  # And the added blocks do act when enabled (so the equality above is not vacuous).
  assert np.abs(np.asarray(apply(params, inputs)) - ref).max() > 1e-3 * np.abs(ref).max()


def test_zero_init_adapter_is_a_no_op(tiny):
  cfg, _, params, inputs, apply = tiny
  # The real init: zero projections, so every residual is exactly 0.
  adapter = cvd_dit.LayoutAdapter(64, 2, 1)
  images = inputs["layout_images"][0, 0]
  variables, residuals = jax.jit(lambda im: adapter.init_with_output(jax.random.key(0), im)[::-1])(images)
  assert len(residuals) == 2 and all(np.all(np.asarray(r) == 0) for r in residuals)
  kernel = meta.unbox(variables)["params"]["body_1"]["resnets_0_block1"]["kernel"]
  assert np.abs(np.asarray(kernel)).max() > 0
  # In the model: with zero projections the layout does not matter ...
  other = dict(inputs, layout_images=jnp.flip(inputs["layout_images"], axis=3))
  np.testing.assert_array_equal(np.asarray(apply(params, inputs)), np.asarray(apply(params, other)))
  # ... and with non-zero ones it does.
  rng = np.random.default_rng(5)
  p2 = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
      if "zero_convs" in jax.tree_util.keystr(path) else x, params)
  assert np.abs(np.asarray(apply(p2, inputs)) - np.asarray(apply(p2, other))).max() > 1e-3


def test_view_adjacency_blocks_cross_view_attention(tiny):
  _, _, params, inputs, apply = tiny
  adj = jnp.asarray([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
  base = dict(inputs, view_adjacency=jnp.broadcast_to(adj, (B, V, V)))
  out = np.asarray(apply(params, base))

  def perturbed(view, **kw):
    lat = base["latents"].at[:, :, view].add(1.0)
    return np.asarray(apply(params, dict(base, latents=lat, **kw)))

  o2 = perturbed(2)
  np.testing.assert_allclose(o2[:, :, :2], out[:, :, :2], rtol=0, atol=1e-6)  # views 0, 1 never see view 2
  assert np.abs(o2[:, :, 2] - out[:, :, 2]).max() > 1e-3
  o1 = perturbed(1)
  assert np.abs(o1[:, :, 0] - out[:, :, 0]).max() > 1e-4  # adjacent views do see each other
  off = dict(disable_crossview=jnp.ones((B,), bool))
  ref_off = np.asarray(apply(params, dict(base, **off)))
  np.testing.assert_allclose(perturbed(1, **off)[:, :, 0], ref_off[:, :, 0], rtol=0, atol=1e-6)


def _layer_locality(axis, attention_type, pos, shape=(1, 4, 3, 6, 64), grid=(2, 3), adjacency=None):
  layer = cvd_dit.IndexMixLayer(axis, attention_type, heads=2, head_dim=32)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  cond = jnp.asarray(rng.standard_normal(shape[:3] + shape[-1:]), jnp.float32)
  disable = jnp.zeros((shape[0],), bool)
  adj = jnp.ones((shape[0], shape[2], shape[2]), bool) if adjacency is None else jnp.asarray(adjacency)[None]
  params = meta.unbox(jax.jit(lambda x: layer.init(jax.random.key(0), x, cond, disable, adj, grid=grid))(x))
  assert float(params["params"]["mixer"]["mix_factor"][0]) == 2.0  # alpha starts at sigmoid(2) ~ 0.88
  f = jax.jit(lambda x: layer.apply(params, x, cond, disable, adj, grid=grid))
  # A random direction (a constant shift across channels would be removed by the LayerNorms).
  delta = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  changed = np.abs(np.asarray(f(x.at[pos].add(delta))) - np.asarray(f(x))).max(axis=-1) > 1e-6
  return changed[0]  # [T, V, S]


def test_temporal_pointwise_mixes_only_same_token():
  changed = _layer_locality("temporal", "pointwise", (0, 1, 2, 4))
  expect = np.zeros_like(changed)
  expect[:, 2, 4] = True  # the same (view, token) in every frame, nothing else
  np.testing.assert_array_equal(changed, expect)


def test_crossview_rowwise_mixes_only_same_row():
  changed = _layer_locality("crossview", "rowwise", (0, 1, 0, 4))  # view 0, token 4 = row 1 of a 2x3 grid
  expect = np.zeros_like(changed)
  expect[1, :, 3:] = True  # frame 1, all views, row 1 (tokens 3..5)
  np.testing.assert_array_equal(changed, expect)


@pytest.mark.parametrize("attention_type", ["rowwise", "full"])
def test_crossview_follows_a_one_way_adjacency(attention_type):
  """adjacency[i, j] = view i attends to view j: with view 0 not attending to view 1 (but 1 to 0), a change in
  view 1 reaches views 1 and 2 and never view 0."""
  adjacency = np.ones((3, 3), bool)
  adjacency[0, 1] = False
  changed = _layer_locality("crossview", attention_type, (0, 1, 1, 4), adjacency=adjacency)
  assert not changed[:, 0].any()
  assert changed[1, 1, 4] and changed[1, 2].any()


def test_full_variants_stay_within_view_or_frame():
  # Temporal "full": one view's tokens of all frames; cross-view "full": one frame's tokens of all (adjacent) views.
  changed = _layer_locality("temporal", "full", (0, 1, 2, 4))
  expect = np.zeros_like(changed)
  expect[:, 2, :] = True
  np.testing.assert_array_equal(changed, expect)
  changed = _layer_locality("crossview", "full", (0, 1, 0, 4))
  expect = np.zeros_like(changed)
  expect[1] = True
  np.testing.assert_array_equal(changed, expect)


def test_every_remat_policy_gives_the_same_gradients(one_layer):
  # Remat changes what the backward pass keeps, never what it computes: each policy (the named-checkpoint ones,
  # whole temporal / cross-view layers and adapter blocks under remat, the static token grid) gives the gradients of
  # "none".
  cfg, inputs, params = one_layer

  def grads(policy):
    model = cvd_dit.CVDDiT(**dict(cfg, remat_policy=policy))
    g = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, **inputs) ** 2)))(params)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(g)}

  ref = grads("none")
  assert all(np.all(np.isfinite(g)) for g in ref.values())
  # Gradient reaches the added blocks, the mixing scalars and the zero-initialised adapter projections.
  for name in ("temporal_blocks_0']['block']['attn1']['to_q", "crossview_blocks_0']['mixer", "zero_convs_0",
               "camera_embed", "transformer_blocks_0']['attn2"):
    assert any(name in k and np.abs(g).max() > 0 for k, g in ref.items()), name
  # The named-checkpoint policies at both ends (keeping every name, keeping only the gates' inputs); "full" and
  # JAX's own are the same mechanism without names (tracing of every policy: test_mmdit.py).
  for policy in ("minimal", "save_out_proj"):
    got = grads(policy)
    for k, g in ref.items():
      np.testing.assert_allclose(got[k], g, rtol=1e-5, atol=1e-6 * np.abs(g).max(), err_msg=f"{policy}: {k}")


def test_bf16_jit(tiny):
  cfg, _, params, inputs, apply = tiny  # fp32 params, bf16 compute; the fp32 forward is the fixture's (compiled once)
  m16 = cvd_dit.CVDDiT(**dict(cfg, dtype="bfloat16"))
  out16 = jax.jit(lambda p, kw: m16.apply({"params": p}, **kw))(params, inputs)
  assert out16.dtype == jnp.float32
  ref = np.asarray(apply(params, inputs))
  rel = np.abs(np.asarray(out16) - ref).max() / np.abs(ref).max()
  assert np.isfinite(rel) and 1e-5 < rel < 0.1, rel  # really ran in bf16, and still close


def test_flops_match_xla_cost_analysis():
  # Width 256 and a 16x16 latent: XLA's count also includes elementwise ops (and skips zero-padded conv taps), which
  # only stay at the few-% level once matmuls dominate.
  cfg = cvd_dit.default_model_config("tiny")
  cfg.num_attention_heads, cfg.caption_projection_dim = 8, 256
  model = cvd_dit.CVDDiT(**cfg)
  args = cvd_dit.dummy_inputs(cfg, b=1, t=2, v=3, h=16, w=16, text_len=5)
  shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))
  cost = jax.jit(model.apply).lower(shapes, *args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = cvd_dit.flops_per_clip(cfg, T=2, V=3, h=16, w=16, text_len=5)
  assert abs(cost["flops"] / ours - 1) < 0.03, (cost["flops"], ours)


def test_sd35_medium_params_are_sharded_under_fsdp():
  """The paper-size DiT on data=1, fsdp=8 with the default rules: each device holds 1/8 of the params (conv kernels
  and the index/camera embedders' first layers included; they were replicated, ~0.46 B params, 6 GiB of state per
  device). Shapes only (eval_shape)."""
  import flax.linen as nn
  from cvd_storm_jax import sharding
  cfg = cvd_dit.default_model_config("sd35_medium")
  args = cvd_dit.dummy_inputs(cfg, b=1, t=2, v=2, h=8, w=8, text_len=4)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  rules = sharding.rules_from_config(sharding.default_rules())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(cvd_dit.CVDDiT(**cfg).init, jax.random.key(0), *args)
  shardings = jax.tree.leaves(sharding.tree_shardings(boxed, mesh, rules))
  leaves = jax.tree.leaves(meta.unbox(boxed))
  total = sum(int(np.prod(x.shape)) for x in leaves)
  per_device = sum(int(np.prod(s.shard_shape(x.shape))) for x, s in zip(leaves, shardings))
  replicated = sum(int(np.prod(x.shape)) for x, s in zip(leaves, shardings) if s.is_fully_replicated)
  assert per_device < 1.01 * total / 8 and replicated < 0.001 * total, (total, per_device, replicated)


def test_sd35_medium_flops_scale():
  # Pure arithmetic (tracing the 4 B model on a shared 2-core CPU costs ~1 min): one 19-frame 6-view 256x448 clip.
  # Rough cross-check: 114 images x 24 MM-DiT layers x ~38 GFLOP + 18 VT blocks x 51k tokens x ~132 MFLOP + adapter.
  cfg = cvd_dit.default_model_config("sd35_medium")
  fl = cvd_dit.flops_per_clip(cfg, T=19, V=6, h=32, w=56, text_len=154)
  assert 2.0e14 < fl < 3.5e14, fl
  assert cvd_dit.flops_per_clip(dict(cfg, temporal_layers=(), crossview_layers=(), num_adapter_blocks=0, camera_dim=0),
                                T=19, V=6, h=32, w=56, text_len=154) < 0.5 * fl


def test_bad_inputs_name_the_field(tiny):
  cfg, model, params, inputs, _ = tiny
  with pytest.raises(ValueError, match="pooled_text"):
    model.apply({"params": params}, **dict(inputs, pooled_text=inputs["pooled_text"][..., :-1]))
  with pytest.raises(ValueError, match="layout_images"):
    model.apply({"params": params}, **dict(inputs, layout_images=None))
  with pytest.raises(ValueError, match="temporal_layers"):
    cvd_dit.CVDDiT(**dict(cfg, temporal_layers=(7,))).init(jax.random.key(0), **inputs)
  with pytest.raises(ValueError, match="unknown model size"):
    cvd_dit.default_model_config("huge")


def test_position_grid_config_keys(monkeypatch):
  """config.model.pos_embed_scale / pos_embed_offset select the position grid (for SD3 checkpoints whose stored table
  is not on diffusers' grid); both can be set from the command line, and None keeps diffusers' formula."""
  import ml_collections
  from absl import flags
  from ml_collections import config_flags
  from cvd_storm_jax.models.embeddings import PatchEmbed
  cfg = cvd_dit.default_model_config("tiny")
  assert cfg.pos_embed_scale is None and cfg.pos_embed_offset == 0.0
  argv = ["prog", "--config.model.pos_embed_scale=1.0", "--config.model.pos_embed_offset=2"]
  monkeypatch.setattr("sys.argv", argv)  # config_flags reads the overrides from sys.argv
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict("config", ml_collections.ConfigDict({"model": cfg}), flag_values=fv)
  fv(argv)
  model_cfg = fv.config.model
  assert (model_cfg.pos_embed_scale, model_cfg.pos_embed_offset) == (1.0, 2.0)
  table = cvd_dit.CVDDiT(**model_cfg).bind({}).pos_embed.table().reshape(16, 16, 64)
  # Column c, row r at coordinates (c - 2, r - 2); channels [x: sin, cos | y: sin, cos], frequencies 1e-4^(i/16).
  omega = 1e-4 ** (np.arange(16) / 16)
  np.testing.assert_allclose(table[5, 9, :16], np.sin(7 * omega), atol=1e-6)
  np.testing.assert_allclose(table[5, 9, 48:], np.cos(3 * omega), atol=1e-6)
  # Diffusers' formula is the explicit grid arange(M) * base / M.
  default = cvd_dit.CVDDiT(**cvd_dit.default_model_config("tiny")).bind({}).pos_embed.table()
  np.testing.assert_allclose(default, PatchEmbed(64, 2, 16, 16, pos_embed_scale=0.5).table(), atol=1e-6)
  with pytest.raises(ValueError, match="pos_embed_offset=1.0 needs an explicit pos_embed_scale"):
    PatchEmbed(64, 2, 16, 16, pos_embed_offset=1.0).table()
