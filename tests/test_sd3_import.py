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


def _variant(src, dst, edit, edit_config=None):
  """Copy of a save_pretrained folder with its state dict (and config.json) edited."""
  os.makedirs(dst)
  config, state = read_folder(src)
  if edit_config is not None:
    edit_config(config)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  state = {k: np.array(v) for k, v in state.items()}
  edit(state)
  save_file(state, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
  return dst


def _write_config_file(path, **model_overrides):
  """A trainer config file: config.model = the tiny CVD config of cvd_cfg() (+ overrides)."""
  overrides = json.dumps(dict(num_layers=2, dual_attention_layers=[0], temporal_layers=[1], crossview_layers=[0],
                              num_adapter_blocks=1, **model_overrides))
  path.write_text(
      "import ml_collections\n"
      "from cvd_storm_jax.models import cvd_dit\n"
      "def get_config(arg=''):\n"
      "  assert arg == 'tiny', arg\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.model = cvd_dit.default_model_config(arg)\n"
      f"  c.model.update({overrides})\n"
      "  return c\n")
  return f"{path}:tiny"


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
  out = str(tmp_path / "ckpt")
  sd3.main(["--src", path, "--out", out, "--config", _write_config_file(tmp_path / "dit_cfg.py")])
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


def test_cli_refuses_bad_arguments_naming_them(folder, tmp_path, capsys):
  path, _ = folder
  cfg_file = _write_config_file(tmp_path / "dit_cfg.py")
  out = str(tmp_path / "never")
  # Overrides are parsed by ml_collections' config flags, as the trainer parses them.
  for args, says in [(["--config.model.pos_embed_scal=1.0"], "the config has no key 'pos_embed_scal'"),
                     (["--config.model.num_layers=two"], "num_layers"),
                     (["--pos_embed_scale=1.0"], "with --config, set the grid as the trainer does"),
                     (["--srcc", path], "Unknown command line flag 'srcc'")]:
    with pytest.raises(SystemExit) as exc:
      sd3.main(["--src", path, "--out", out, "--config", cfg_file, *args])
    assert says in f"{exc.value.code} {capsys.readouterr().err}", args
  with pytest.raises(SystemExit):
    sd3.main(["--out", out])
  assert "--src" in capsys.readouterr().err
  assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------------------------------
# The stored position table on another grid than diffusers' formula (Stability's MMDiTX: unscaled arange).
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stability_grid_folder(folder, tmp_path_factory):
  """The fixture model with its pos_embed buffer replaced by the table on the unscaled grid arange(16) (diffusers'
  own function with base_size = grid size: arange(16) / (16 / 16)), saved as diffusers saves it."""
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  _, tmodel = folder
  model = diffusers.SD3Transformer2DModel.from_config(tmodel.config).eval()
  model.load_state_dict(tmodel.state_dict())
  m = SD3_CFG["pos_embed_max_size"]
  table = get_2d_sincos_pos_embed(64, m, base_size=m, interpolation_scale=1.0, output_type="pt")
  with torch.no_grad():
    model.pos_embed.pos_embed.copy_(table.float()[None])
  path = tmp_path_factory.mktemp("sd3_stability") / "transformer"
  model.save_pretrained(path)
  return str(path), model


def test_stability_grid_table_imports_with_the_named_override(stability_grid_folder, tmp_path):
  path, tmodel = stability_grid_folder
  # Refused, naming the overrides that select the checkpoint's grid (diffusers' formula here: arange(16) * 0.5).
  with pytest.raises(WeightImportError, match=r"grid arange\(16\) \* 1\.0 - 0\.0 .*--pos_embed_scale=1\.0 "
                                              r"--pos_embed_offset=0\.0"):
    sd3.load_sd3_transformer(path)
  with pytest.raises(WeightImportError, match=r"--config\.model\.pos_embed_scale=1\.0 "
                                              r"--config\.model\.pos_embed_offset=0\.0"):
    sd3.import_into_cvd(path, dict(cvd_cfg()))
  # With them: the Flax forward is diffusers' (which uses the stored buffer).
  model, params = sd3.load_sd3_transformer(path, pos_embed_scale=1.0, pos_embed_offset=0.0)
  rng = np.random.default_rng(1)
  lat = rng.standard_normal((2, 8, 12, 16)).astype(np.float32)  # 4 x 6 tokens: an off-centre crop of the 16 x 16
  txt = rng.standard_normal((2, 5, 64)).astype(np.float32)
  pooled = rng.standard_normal((2, 32)).astype(np.float32)
  ts = np.array([3.0, 800.0], np.float32)
  out = np.asarray(jax.jit(model.apply)({"params": params}, lat, ts, txt, pooled))
  with torch.no_grad():
    ref = tmodel(hidden_states=torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()),
                 encoder_hidden_states=torch.from_numpy(txt), pooled_projections=torch.from_numpy(pooled),
                 timestep=torch.from_numpy(ts)).sample.numpy().transpose(0, 2, 3, 1)
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert rel <= 1e-5, rel
  # The same through both CLI forms (--config.model.* overrides as the trainer takes them).
  cfg_file = _write_config_file(tmp_path / "dit_cfg.py")
  sd3.main(["--src", path, "--out", str(tmp_path / "cvd"), "--config", cfg_file,
            "--config.model.pos_embed_scale=1.0", "--config.model.pos_embed_offset=0.0"])
  sd3.main(["--src", path, "--out", str(tmp_path / "bare"), "--pos_embed_scale=1.0", "--pos_embed_offset=0.0"])
  np.testing.assert_array_equal(checkpoint.load_params(str(tmp_path / "cvd"))["dit"]["proj_out"]["kernel"],
                                checkpoint.load_params(str(tmp_path / "bare"))["proj_out"]["kernel"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fit_pos_grid_reads_scale_and_offset(dtype):
  import ml_dtypes
  from cvd_storm_jax.models.embeddings import sincos_pos_embed_2d
  table = sincos_pos_embed_2d(128, 48, 1, scale=0.75, offset=7.0)[None].astype(getattr(ml_dtypes, dtype, dtype))
  scale, offset = sd3.fit_pos_grid(table, 48)
  assert abs(scale - 0.75) < 1e-4 and abs(offset - 7.0) < 1e-3, (scale, offset)
  cfg = dict(num_attention_heads=2, attention_head_dim=64, pos_embed_max_size=48, patch_size=2, sample_size=32)
  with pytest.raises(WeightImportError, match=r"pos_embed_scale=0\.75 --config\.model\.pos_embed_offset=7\.0"):
    sd3._check_pos_embed({"pos_embed.pos_embed": table}, cfg, "t", sd3.cvd_override_hint)
  sd3._check_pos_embed({"pos_embed.pos_embed": table}, dict(cfg, pos_embed_scale=0.75, pos_embed_offset=7.0), "t",
                       sd3.cvd_override_hint)


# ----------------------------------------------------------------------------------------------------------------------
# Wrong folders, variant files, configs without newer keys.
# ----------------------------------------------------------------------------------------------------------------------
def test_wrong_folders_are_named(folder, tmp_path):
  path, _ = folder
  vae = tmp_path / "vae"
  vae.mkdir()
  (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 16}))
  with pytest.raises(WeightImportError, match="_class_name 'AutoencoderKL', expected 'SD3Transformer2DModel'"):
    sd3.load_sd3_transformer(str(vae))
  clip = tmp_path / "text_encoder"
  clip.mkdir()
  (clip / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
  with pytest.raises(WeightImportError, match="transformers folder: model_type 'clip_text_model'"):
    sd3.import_into_cvd(str(clip), dict(cvd_cfg()))
  root = tmp_path / "root"
  shutil.copytree(path, root / "transformer")
  with pytest.raises(WeightImportError, match=f"no config.json \\(did you mean {root}/transformer\\?\\)"):
    sd3.load_sd3_transformer(str(root))


def test_variant_files_are_read_apart(folder, tmp_path):
  import ml_dtypes
  path, _ = folder
  both = tmp_path / "both"
  shutil.copytree(path, both)
  _, state = read_folder(path)
  save_file({k: np.asarray(v).astype(np.float16) for k, v in state.items()},
            str(both / "diffusion_pytorch_model.fp16.safetensors"))
  _, plain = read_folder(str(both))  # was: "appears in more than one shard"
  assert {v.dtype for v in plain.values()} == {np.dtype(np.float32)}
  _, half = read_folder(str(both), variant="fp16")
  assert {v.dtype for v in half.values()} == {np.dtype(np.float16)}
  sd3.load_sd3_transformer(str(both), variant="fp16")
  with pytest.raises(WeightImportError, match=r"no weight files of variant 'bf16'; it has \['plain', 'fp16'\]"):
    read_folder(str(both), variant="bf16")
  os.remove(both / "diffusion_pytorch_model.safetensors")  # only the variant left: read, as the one there is
  _, only = read_folder(str(both))
  assert set(only) == set(state) and {v.dtype for v in only.values()} == {np.dtype(np.float16)}
  save_file({k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in state.items()},
            str(both / "diffusion_pytorch_model.bf16.safetensors"))
  with pytest.raises(WeightImportError, match=r"only variant weight files \['bf16', 'fp16'\]; pick one"):
    read_folder(str(both))
  # diffusers' / transformers' names of plain and variant files, sharded or not.
  from cvd_storm_jax.pretrained.common import weights_variant
  names = ("diffusion_pytorch_model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
           "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16-00001-of-00007.safetensors",
           "diffusion_pytorch_model.safetensors.index.fp16.json")
  assert [weights_variant(n) for n in names] == [None] * 3 + ["fp16"] * 3


def test_config_without_qk_norm_is_diffusers_default(folder, tmp_path):
  path, _ = folder

  def drop_qk_norm(c):  # SD3-medium's config.json predates the key
    del c["qk_norm"]

  sd3_medium = _variant(path, str(tmp_path / "sd3_medium"), lambda s: [s.pop(k) for k in list(s) if ".norm_" in k],
                        drop_qk_norm)
  with pytest.raises(WeightImportError, match="qk_norm mismatch: checkpoint has none, model config rms_norm") as e:
    sd3.import_into_cvd(sd3_medium, dict(cvd_cfg()))
  assert "missing key" not in str(e.value)
  sd3.import_into_cvd(sd3_medium, dict(cvd_cfg(), qk_norm=None))
  # The defaults used for absent keys are diffusers' own.
  import inspect
  sig = inspect.signature(diffusers.SD3Transformer2DModel.__init__)
  assert sd3.CONFIG_DEFAULTS == {k: p.default for k, p in sig.parameters.items() if k in sd3.CONFIG_DEFAULTS}
  assert set(sd3.CONFIG_DEFAULTS) == set(sig.parameters) - {"self"}
