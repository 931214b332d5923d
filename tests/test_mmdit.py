"""SD3 MM-DiT parity with diffusers SD3Transformer2DModel (random init, SD3.5 features on), plus embedding checks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cvd_storm_jax.models import embeddings  # noqa: E402
from cvd_storm_jax.models.mmdit import REMAT_POLICIES, SD3Transformer  # noqa: E402
from cvd_storm_jax.pretrained.sd3_transformer import load_sd3_transformer  # noqa: E402

# Small SD3.5-like config: dual attention in the first layers, RMS qk-norm, last block context_pre_only, and a
# pos_embed_max_size larger than the token grid (non-square) so that the centre crop is exercised.
CFG = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
           joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
           pos_embed_max_size=10, dual_attention_layers=(0, 1), qk_norm="rms_norm")


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
  torch.manual_seed(0)
  model = diffusers.SD3Transformer2DModel(**CFG).eval()
  # Randomise everything (zero-inited or ones-inited params too), so nothing is trivially 0 or 1.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and p.ndim == 1 and "linear" not in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(max(p.shape[-1] if p.ndim > 1 else 16, 1)))
  folder = tmp_path_factory.mktemp("sd3") / "transformer"
  model.save_pretrained(folder)
  return str(folder), model


def test_parity_with_diffusers(sd3_folder):
  folder, tmodel = sd3_folder
  rng = np.random.default_rng(0)
  b, hh, ww = 2, 8, 12  # token grid 4x6 inside a 10x10 table.
  lat = rng.standard_normal((b, CFG["in_channels"], hh, ww)).astype(np.float32)
  txt = rng.standard_normal((b, 7, CFG["joint_attention_dim"])).astype(np.float32)
  pooled = rng.standard_normal((b, CFG["pooled_projection_dim"])).astype(np.float32)
  t = np.array([3.0, 871.5], np.float32)
  with torch.no_grad():
    ref = tmodel(hidden_states=torch.from_numpy(lat), encoder_hidden_states=torch.from_numpy(txt),
                 pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t)).sample.numpy()
  model, params = load_sd3_transformer(folder)
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(lat.transpose(0, 2, 3, 1)), jnp.asarray(t),
                             jnp.asarray(txt), jnp.asarray(pooled))
  out = np.asarray(out).transpose(0, 3, 1, 2)
  assert out.shape == ref.shape
  rel = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
  assert rel <= 1e-5, rel
  assert np.std(ref) > 1e-2  # the comparison is not between near-constant outputs


def test_remat_policies_wrap_blocks():
  # Tracing only (no compile): every policy but "none" puts the blocks under jax.checkpoint, and the traced forward
  # is the same function. Gradients through remat are exercised in test_cvd_dit.py.
  model = SD3Transformer(**{**CFG, "num_layers": 1, "dual_attention_layers": (0,)})
  rng = np.random.default_rng(1)
  args = (jnp.asarray(rng.standard_normal((1, 4, 4, 4)), jnp.float32), jnp.array([500.0]),
          jnp.asarray(rng.standard_normal((1, 3, 24)), jnp.float32), jnp.asarray(rng.standard_normal((1, 20)),
                                                                                jnp.float32))
  params = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  for policy in REMAT_POLICIES + ("auto",):  # "auto" outside the trainer is "full"
    m = model.clone(remat_policy=policy)
    jaxpr = str(jax.make_jaxpr(lambda p: m.apply({"params": p}, *args))(params))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (policy != "none"), policy
  with pytest.raises(ValueError, match="remat_policy"):
    model.clone(remat_policy="bogus").init(jax.random.key(0), *args)


def test_remat_keeps_no_float32_copy_of_the_tokens_for_the_output_norm():
  # Under remat the output head's LayerNorm (outside every block) is recomputed too: it used to keep three float32
  # [N, S, D] tensors, ~9% of all the paper step keeps under "full".
  from cvd_storm_jax import memory
  model = SD3Transformer(**{**CFG, "num_layers": 1, "dual_attention_layers": (), "dtype": "bfloat16"})
  args = (jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32),
          jax.ShapeDtypeStruct((2, 3, 24), jnp.float32), jax.ShapeDtypeStruct((2, 20), jnp.float32))
  params = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  tokens = (2, (8 // CFG["patch_size"]) ** 2, CFG["num_attention_heads"] * CFG["attention_head_dim"])

  def float32_token_copies(policy):
    m = model.clone(remat_policy=policy)
    saved = memory.saved_activations(lambda p, *x: jnp.mean(m.apply({"params": p}, *x) ** 2), params, nondiff=args)
    return sum(s.shape == tokens and s.dtype == jnp.float32 for s in saved)

  assert float32_token_copies("none") > 0 and float32_token_copies("full") == 0


def test_timestep_embedding_matches_diffusers():
  from diffusers.models.embeddings import get_timestep_embedding
  t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
  for flip, shift, dim in ((True, 0.0, 256), (False, 1.0, 33)):
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    ours = embeddings.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    # float32 sin of arguments ~1e3 rad: a 1-ulp difference in the frequency moves the result by ~1e-4.
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4)


def test_cropped_pos_embed_matches_diffusers():
  from diffusers.models.embeddings import PatchEmbed as TorchPatchEmbed
  pe = TorchPatchEmbed(height=16, width=16, patch_size=2, in_channels=4, embed_dim=32, pos_embed_max_size=12)
  ref = pe.cropped_pos_embed(6, 10)[0].numpy()  # 3x5 token grid
  table = embeddings.sincos_pos_embed_2d(32, 12, 8)
  np.testing.assert_allclose(embeddings.crop_pos_embed(table, 12, 3, 5), ref, atol=1e-6)
  with pytest.raises(ValueError, match="pos_embed_max_size"):
    embeddings.crop_pos_embed(table, 12, 13, 2)


def test_pixel_unshuffle_matches_torch():
  x = np.random.default_rng(0).standard_normal((2, 3, 16, 8)).astype(np.float32)
  ref = torch.nn.functional.pixel_unshuffle(torch.from_numpy(x), 4).numpy()
  ours = embeddings.pixel_unshuffle(jnp.asarray(x.transpose(0, 2, 3, 1)), 4)
  np.testing.assert_array_equal(np.asarray(ours).transpose(0, 3, 1, 2), ref)


def test_bad_latent_channels_raise():
  model = SD3Transformer(**{**CFG, "num_layers": 1})
  with pytest.raises(ValueError, match="channels"):
    model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,)), jnp.zeros((1, 2, 24)), jnp.zeros((1, 20)))


def test_flop_count_is_the_anchors_definition():
  # benchmarks/bench_dit.py reports 3 x flops_per_image as model FLOPs; the diffusers anchor counts its forward and
  # backward with torch's FlopCounterMode. On meta tensors (nothing allocated, ~2 s) at the paper's shapes (SD3.5
  # medium, 32x56 latents, 154 text tokens) both must be one number, or the TFLOP/s ratio of the two would not be
  # honest. The anchor's count is a little lower: no input gradients for the embedders' first matmuls.
  from torch.utils.flop_counter import FlopCounterMode
  from cvd_storm_jax.models import cvd_dit, mmdit
  cfg = cvd_dit.default_model_config("sd35_medium")
  keys = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
          "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
          "pos_embed_max_size", "dual_attention_layers", "qk_norm")
  b, text_len = 2, 154
  with torch.device("meta"):
    model = diffusers.SD3Transformer2DModel(**{k: cfg[k] for k in keys})
    inputs = dict(hidden_states=torch.randn(b, 16, 32, 56), encoder_hidden_states=torch.randn(b, text_len, 4096),
                  pooled_projections=torch.randn(b, 2048), timestep=torch.rand(b) * 1000)
    counter = FlopCounterMode(display=False)
    with counter:
      (model(**inputs, return_dict=False)[0] ** 2).mean().backward()
  ours = 3 * mmdit.flops_per_image(cfg, 32, 56, text_len)
  anchor = counter.get_total_flops() / b
  assert 1.0 <= ours / anchor < 1.002, (ours, anchor)
