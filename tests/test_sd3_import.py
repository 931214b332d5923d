"""SD3 weight import into CVDDiT (end-to-end parity with diffusers through the CVD model), the CLI, and the errors."""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax.core import meta  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from cvd_storm_jax import checkpoint  # noqa: E402
from cvd_storm_jax.models import cvd_dit  # noqa: E402
from cvd_storm_jax.pretrained import sd3_transformer as sd3  # noqa: E402
from cvd_storm_jax.pretrained.common import WeightImportError, read_folder  # noqa: E402

SD3_CFG = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=32,
               num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32,
               out_channels=16, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def cvd_cfg():
  cfg = cvd_dit.default_model_config("tiny")
  cfg.update(num_layers=2, dual_attention_layers=(0,), temporal_layers=(1,), crossview_layers=(0,),
             num_adapter_blocks=1)
  return cfg


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  torch.manual_seed(0)
  model = diffusers.SD3Transformer2DModel(**SD3_CFG).eval()
  with torch.no_grad():  # randomise everything, norm weights included
    for name, p in model.named_parameters():
      base = 1.0 if (p.ndim == 1 and "norm" in name and "linear" not in name) else 0.0
      scale = 0.2 if p.ndim == 1 else 1.0 / np.sqrt(p[0].numel())
      p.copy_(base + scale * torch.randn_like(p))
  path = tmp_path_factory.mktemp("sd3") / "transformer"
  model.save_pretrained(path)
  return str(path), model


def _variant(src, dst, edit):
  """Copy of a save_pretrained folder with its state dict edited."""
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  _, state = read_folder(src)
  state = {k: np.array(v) for k, v in state.items()}
  edit(state)
  save_file(state, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
  return dst


def test_import_into_cvd_matches_diffusers_per_image(folder):
  path, tmodel = folder
  cfg = cvd_cfg()
  partial, fresh = sd3.import_into_cvd(path, dict(cfg))
  assert set(partial) == {"pos_embed", "time_text_embed", "context_embedder", "transformer_blocks_0",
                          "transformer_blocks_1", "norm_out", "proj_out"}
  assert {p.split("/")[0] for p in fresh} == {"camera_embed", "layout_adapter", "temporal_blocks_0",
                                               "crossview_blocks_0"}
  model = cvd_dit.CVDDiT(**cfg)
  b, t, v, h, w, l = 1, 2, 2, 4, 6, 5
  args = cvd_dit.dummy_inputs(cfg, b, t, v, h, w, l)
  fresh_shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))["params"]
  rng = np.random.default_rng(0)
  fresh_params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), fresh_shapes)
  params, fresh2 = checkpoint.merge_params(fresh_params, partial)
  assert fresh2 == fresh

  lat = rng.standard_normal((b, t, v, h, w, 16)).astype(np.float32)
  ts = np.array([[[0.0, 0.0], [500.0, 999.0]]], np.float32)
  txt = rng.standard_normal((b, t, v, l, 64)).astype(np.float32)
  pooled = rng.standard_normal((b, t, v, 32)).astype(np.float32)
  layout = rng.uniform(0, 1, (b, t, v, 8 * h, 8 * w, 6)).astype(np.float32)
  params["layout_adapter"] = jax.tree.map(np.zeros_like, params["layout_adapter"])  # no layout residuals
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(lat), jnp.asarray(ts), jnp.asarray(txt),
                             jnp.asarray(pooled), jnp.asarray(layout), jnp.zeros((b, t, v, 11)),
                             jnp.ones((b, v, v), bool), jnp.ones((b,), bool), jnp.ones((b,), bool))
  n = b * t * v
  with torch.no_grad():
    ref = tmodel(hidden_states=torch.from_numpy(lat.reshape(n, h, w, 16).transpose(0, 3, 1, 2).copy()),
                 encoder_hidden_states=torch.from_numpy(txt.reshape(n, l, 64)),
                 pooled_projections=torch.from_numpy(pooled.reshape(n, 32)),
                 timestep=torch.from_numpy(ts.reshape(n))).sample.numpy()
  out = np.asarray(out).reshape(n, h, w, 16).transpose(0, 3, 1, 2)
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert rel <= 1e-5, rel


def test_missing_key_names_both_names_and_shape(folder, tmp_path):
  path, _ = folder
  bad = _variant(path, str(tmp_path / "missing"), lambda s: s.pop("transformer_blocks.1.attn.norm_added_k.weight"))
  with pytest.raises(WeightImportError) as e:
    sd3.load_sd3_transformer(bad)
  msg = str(e.value)
  assert "'transformer_blocks.1.attn.norm_added_k.weight'" in msg
  assert "'transformer_blocks_1/attn/norm_added_k/scale' (32,)" in msg


def test_shape_mismatch_names_both_names_and_shapes(folder, tmp_path):
  path, _ = folder

  def edit(s):
    s["transformer_blocks.0.attn2.to_q.weight"] = s["transformer_blocks.0.attn2.to_q.weight"][:, :48]

  bad = _variant(path, str(tmp_path / "shape"), edit)
  with pytest.raises(WeightImportError) as e:
    sd3.load_sd3_transformer(bad)
  msg = str(e.value)
  assert "'transformer_blocks.0.attn2.to_q.weight' (64, 48)" in msg
  assert "'transformer_blocks_0/attn2/to_q/kernel' expects (64, 64)" in msg


def test_unexpected_key_and_config_mismatch(folder, tmp_path):
  path, _ = folder
  bad = _variant(path, str(tmp_path / "extra"), lambda s: s.update({"transformer_blocks.0.attn.lora.weight":
                                                                    np.zeros((2, 2), np.float32)}))
  with pytest.raises(WeightImportError, match="lora"):
    sd3.load_sd3_transformer(bad)
  with pytest.raises(WeightImportError, match="num_layers=2.*num_layers=3"):
    sd3.import_into_cvd(path, dict(cvd_cfg(), num_layers=3))
  with pytest.raises(WeightImportError, match="sample_size=16.*sample_size=32"):
    sd3.import_into_cvd(path, dict(cvd_cfg(), sample_size=32))
  # The stored position table must equal the one computed from the config.
  bad = _variant(path, str(tmp_path / "pos"), lambda s: s.update({"pos_embed.pos_embed": s["pos_embed.pos_embed"][
      :, ::-1].copy()}))
  with pytest.raises(WeightImportError, match="pos_embed.pos_embed"):
    sd3.load_sd3_transformer(bad)


def test_bf16_checkpoint_imports(folder, tmp_path):
  import ml_dtypes
  path, _ = folder

  def to_bf16(s):
    for k in s:
      s[k] = s[k].astype(ml_dtypes.bfloat16)

  bf16 = _variant(path, str(tmp_path / "bf16"), to_bf16)
  _, params = sd3.load_sd3_transformer(bf16)  # the bf16-rounded position table still passes its check
  _, state = read_folder(path)
  got = np.asarray(params["transformer_blocks_0"]["attn"]["norm_q"]["scale"])
  np.testing.assert_array_equal(got, state["transformer_blocks.0.attn.norm_q.weight"].astype(ml_dtypes.bfloat16)
                                .astype(np.float32))


def test_torch_key_inverse_covers_every_tensor(folder):
  path, _ = folder
  _, state = read_folder(path)
  for key in state:
    if key == "pos_embed.pos_embed":
      continue
    flax_path, _ = sd3.rename_key(key)
    assert sd3.torch_key_for(flax_path) == key


def test_cli_writes_params_for_init_from(folder, tmp_path):
  path, _ = folder
  cfg_file = tmp_path / "dit_cfg.py"
  overrides = json.dumps(dict(num_layers=2, dual_attention_layers=[0], temporal_layers=[1], crossview_layers=[0],
                              num_adapter_blocks=1))
  cfg_file.write_text(
      "import ml_collections\n"
      "from cvd_storm_jax.models import cvd_dit\n"
      "def get_config(arg=''):\n"
      "  assert arg == 'tiny', arg\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.model = cvd_dit.default_model_config(arg)\n"
      f"  c.model.update({overrides})\n"
      "  return c\n")
  out = str(tmp_path / "ckpt")
  sd3.main(["--src", path, "--out", out, "--config", f"{cfg_file}:tiny"])
  loaded = checkpoint.load_params(out)
  assert set(loaded) == {"dit"}  # the trainer's params tree: {"dit": CVDDiT params, ...}
  loaded = loaded["dit"]
  partial, _ = sd3.import_into_cvd(path, dict(cvd_cfg()))
  flat_a = jax.tree_util.tree_leaves_with_path(loaded)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(partial))
  assert len(flat_a) == len(flat_b)
  for k, v in flat_a:
    np.testing.assert_array_equal(v, flat_b[k])
  # Without --config: the plain SD3Transformer's bare params tree.
  out2 = str(tmp_path / "ckpt_sd3")
  sd3.main(["--src", path, "--out", out2])
  assert "transformer_blocks_1" in checkpoint.load_params(out2)
