"""The Flax SD3.5 VAE against diffusers' AutoencoderKL (random init, reduced width, real block structure), the folder
importer's error reporting, the chunked/latent-normalisation paths, and a short CPU training run."""
import collections
import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import save_file
from skimage import data

from _configs import RUN_FAST  # noqa: I100
from cvd_storm_jax import losses, memory
from cvd_storm_jax.models.vae import AutoencoderKL, VAEConfig, _chunked, param_count, sample
from cvd_storm_jax.pretrained.common import WeightImportError, param_shapes, read_folder, rename
from cvd_storm_jax.pretrained.vae import load_vae, vae_rules

TINY = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609)


def _torch_vae(quant: bool):
  from diffusers import AutoencoderKL as TorchVAE
  torch.manual_seed(1 if quant else 0)
  vae = TorchVAE(**TINY, use_quant_conv=quant, use_post_quant_conv=quant).eval()
  with torch.no_grad():  # GroupNorm params start at (1, 0): perturb them so that a scale/bias mix-up shows.
    for name, p in vae.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  return vae


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{"sd3": an AutoencoderKL folder without quant convs, "sd1_root": a checkpoint root with vae/ (quant convs)}."""
  root = tmp_path_factory.mktemp("vae")
  models = {"sd3": _torch_vae(False), "sd1_root": _torch_vae(True)}
  models["sd3"].save_pretrained(root / "sd3")
  models["sd1_root"].save_pretrained(root / "sd1_root" / "vae")
  (root / "sd1_root" / "transformer").mkdir()  # a checkpoint root has other subfolders too
  return {k: str(root / k) for k in models}, models


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("which", ["sd3", "sd1_root"])
def test_matches_diffusers(folders, which):
  paths, models = folders
  torch_vae = models[which]
  vae, params = load_vae(paths[which])
  assert vae.config.use_quant_conv == (which == "sd1_root")
  assert vae.config.block_out_channels == (32, 32, 64, 64) and vae.config.shift_factor == 0.0609
  x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 64, 48)).astype(np.float32)
  with torch.no_grad():
    dist = torch_vae.encode(torch.from_numpy(x)).latent_dist
    z = torch.from_numpy(np.random.RandomState(1).randn(*dist.mean.shape).astype(np.float32))
    want_img = torch_vae.decode(z).sample.numpy().transpose(0, 2, 3, 1)
  want_mean, want_logvar = (t.numpy().transpose(0, 2, 3, 1) for t in (dist.mean, dist.logvar))
  mean, logvar = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.encode))(params, x.transpose(0, 2, 3, 1))
  img = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.decode))(params, z.numpy().transpose(0, 2, 3, 1))
  errs = _rel(mean, want_mean), _rel(logvar, want_logvar), _rel(img, want_img)
  print(which, "max rel err mean/logvar/decode:", errs)
  assert mean.shape == (2, 8, 6, 16) and img.shape == (2, 64, 48, 3)
  assert max(errs) <= 1e-5


def _write_variant(src: str, dst: str, edit) -> str:
  config, state = read_folder(src)
  state = {k: np.array(v) for k, v in state.items()}
  edit(state)
  os.makedirs(dst)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  save_file(state, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
  return dst


def test_import_errors_name_key_and_shapes(folders, tmp_path):
  src = folders[0]["sd3"]
  key = "decoder.up_blocks.1.resnets.0.conv1.weight"
  with pytest.raises(WeightImportError, match="does not exist"):
    load_vae(str(tmp_path / "nowhere"))
  with pytest.raises(WeightImportError, match="neither an AutoencoderKL"):
    os.makedirs(tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    load_vae(str(tmp_path / "unet"))
  # A text encoder folder (transformers: no _class_name) was taken for a VAE with default settings.
  os.makedirs(tmp_path / "text_encoder")
  (tmp_path / "text_encoder" / "config.json").write_text(json.dumps(
      {"model_type": "clip_text_model", "architectures": ["CLIPTextModelWithProjection"]}))
  with pytest.raises(WeightImportError, match="transformers 'clip_text_model' model \\(CLIPTextModelWithProjection\\), "
                                              "not an AutoencoderKL"):
    load_vae(str(tmp_path / "text_encoder"))

  missing = _write_variant(src, str(tmp_path / "missing"), lambda s: s.pop(key))
  with pytest.raises(WeightImportError, match=rf"missing key: torch '{key}' \(64, 64, 3, 3\) for Flax param "
                                              r"'decoder/up_blocks_1/resnets_0/conv1/kernel' \(3, 3, 64, 64\)"):
    load_vae(missing)

  extra = _write_variant(src, str(tmp_path / "extra"),
                         lambda s: s.update({"encoder.mid_block.attentions.0.rel_pos": np.zeros((4, 4), np.float32)}))
  with pytest.raises(WeightImportError, match=r"unexpected key 'encoder\.mid_block\.attentions\.0\.rel_pos' \(4, 4\)"):
    load_vae(extra)

  def shrink(s):
    s[key] = s[key][:32]
  wrong = _write_variant(src, str(tmp_path / "wrong"), shrink)
  with pytest.raises(WeightImportError, match=rf"shape mismatch: torch '{key}' \(32, 64, 3, 3\) -> Flax "
                                              r"'decoder/up_blocks_1/resnets_0/conv1/kernel' expects \(3, 3, 64, 64\)"):
    load_vae(wrong)

  bad_cfg = str(tmp_path / "gelu")
  shutil.copytree(src, bad_cfg)
  cfg = json.load(open(os.path.join(bad_cfg, "config.json")))
  cfg["act_fn"] = "gelu"
  json.dump(cfg, open(os.path.join(bad_cfg, "config.json"), "w"))
  with pytest.raises(WeightImportError, match="act_fn='gelu' is not supported"):
    load_vae(bad_cfg)


def test_deprecated_attention_names_import(folders, tmp_path):
  """Pre-0.14 diffusers VAE folders name the mid-block attention query/key/value/proj_attn: same params."""
  src = folders[0]["sd3"]
  names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

  def rename_attention(state):
    for k in [k for k in state if ".attentions.0." in k]:
      for new, old in names.items():
        if f".{new}." in k:
          state[k.replace(f".{new}.", f".{old}.")] = state.pop(k)
  old = _write_variant(src, str(tmp_path / "old_names"), rename_attention)
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in read_folder(old)[1]
  _, want = load_vae(src)
  _, got = load_vae(old)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_sd35_structure_covered_by_rules():
  """Full-size SD3.5 config: every diffusers tensor renames onto a Flax param of the laid-out shape, 1:1."""
  from diffusers import AutoencoderKL as TorchVAE
  with torch.device("meta"):
    torch_vae = TorchVAE(**{**TINY, "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32},
                         use_quant_conv=False, use_post_quant_conv=False)
  vae = AutoencoderKL(VAEConfig.sd35())
  shapes = param_shapes(vae.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  flat = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
  seen = set()
  for key, t in torch_vae.state_dict().items():
    path, transform = rename(key, vae_rules())
    assert path in flat and path not in seen, key
    seen.add(path)
    assert transform(np.broadcast_to(np.float32(0), tuple(t.shape))).shape == flat[path], key
  assert seen == set(flat)
  assert param_count(shapes) == sum(p.numel() for p in torch_vae.parameters())


@pytest.fixture(scope="module")
def tiny_vae():
  vae = AutoencoderKL(VAEConfig(block_out_channels=(16, 32, 32, 32), norm_num_groups=8, layers_per_block=1))
  # Host-side init with PyTorch's default U(+-1/sqrt(fan_in)) kernels: compiling flax's init program (threefry per
  # param) costs ~10 s of CPU, far more than the model itself.
  shapes = param_shapes(vae.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  rs = np.random.RandomState(0)

  def init(path, leaf):
    if path[-1].key == "kernel":
      return jnp.asarray(rs.uniform(-1, 1, leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), jnp.float32)
    return jnp.full(leaf.shape, 1.0 if path[-1].key == "scale" else 0.0, jnp.float32)
  return vae, jax.tree_util.tree_map_with_path(init, shapes)


def test_chunked_paths_and_sd3_latent_normalisation(tiny_vae):
  vae, params = tiny_vae
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (5, 16, 24, 3)), jnp.float32)
  mean, logvar = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.encode))(params, x)
  # SD3: model latents = (z - 0.0609) * 1.5305 after sampling the posterior (chunked encode: 5 frames, chunks of 2).
  rng = jax.random.PRNGKey(3)
  lat = jax.jit(lambda p, v: vae.encode_for_diffusion(p, v, rng, chunk=2))(params, x)
  z = sample(mean, logvar, rng)
  np.testing.assert_allclose(lat, (z - 0.0609) * 1.5305, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(vae.from_model_latents(vae.to_model_latents(z)), z, rtol=1e-6, atol=1e-6)
  # ... and the pipeline inverts that before decoding (chunked decode: chunks of 2).
  img = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.decode))(params, z)
  img_c = jax.jit(lambda p, v: vae.decode_from_diffusion(p, v, chunk=2))(params, lat)
  assert img_c.shape == (5, 16, 24, 3)
  np.testing.assert_allclose(img_c, img, rtol=1e-4, atol=5e-5)
  with pytest.raises(ValueError, match="not a multiple of the VAE's downsample factor 8"):
    jax.eval_shape(lambda v: vae.apply({"params": params}, v, method=vae.encode), x[:, :12])


def test_chunked_balances_chunks():
  """steps = ceil(N / chunk) chunks of ceil(N / steps): fewer than ``steps`` padded items, never over ``chunk``."""
  for n, chunk, want in ((25, 12, 9), (114, 12, 12), (10, 4, 4), (7, 3, 3), (13, 6, 5), (5, 5, 5)):
    sizes = []

    def fn(c):
      sizes.append(c.shape[0])  # traced once: the size of every chunk
      return {"a": c * 2.0, "b": c.sum(axis=1)}
    x = jnp.arange(n * 2, dtype=jnp.float32).reshape(n, 2)
    out = _chunked(fn, x, chunk)
    assert sizes == [want], (n, chunk, sizes)
    steps = -(-n // chunk)
    assert want <= chunk and (steps * want - n < steps if n > chunk else want == n)
    np.testing.assert_array_equal(out["a"], x * 2.0)
    np.testing.assert_array_equal(out["b"], x.sum(axis=1))


def _residuals(f, *args) -> collections.Counter:
  """{(dtype, shape): count} of what ``jax.vjp(f, *args)`` keeps for the backward pass, arguments excluded."""
  return collections.Counter((jnp.dtype(s.dtype).name, tuple(s.shape)) for s in memory.saved_activations(f, *args))


def _bytes(res: collections.Counter) -> int:
  return sum(n * int(np.prod(s)) * jnp.dtype(d).itemsize for (d, s), n in res.items())


def test_remat_keeps_the_param_tree_and_the_numbers(tiny_vae):
  """remat (resnets, mid attention, resamplers, GN-SiLU-conv_out tails) changes neither params nor numbers (fp32)."""
  vae, params = tiny_vae
  vae_r = AutoencoderKL(vae.config, remat=True)
  shapes = lambda m: {k: v.shape for k, v in traverse_util.flatten_dict(
      param_shapes(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))).items()}
  assert shapes(vae_r) == shapes(vae)  # same names (diffusers import, checkpoints) and shapes
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 16, 24, 3)), jnp.float32)
  tgt = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, x.shape), jnp.float32)

  def loss(m):
    def f(p, x):
      recon, mean, logvar = m.apply({"params": p}, x, jax.random.PRNGKey(2))
      return jnp.mean(jnp.square(recon - tgt)) + 1e-2 * jnp.mean(jnp.square(mean) + jnp.exp(logvar))
    # Runs once: XLA's backend optimisations off compile it ~4x faster on CPU (and cannot differ between the two).
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(params, x).compile(
        {"xla_backend_optimization_level": 0})

  (l0, g0), (l1, g1) = loss(vae)(params, x), loss(vae_r)(params, x)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  # Same maths; only XLA's fusion and summation order differ: fp32 round-off, relative to each gradient's scale
  # (without remat, this program at XLA optimisation levels 0 and 3 differs by up to 7e-6; remat on/off: 9e-6).
  # The attention's key bias is left out: its gradient is zero up to round-off (softmax over keys is invariant to a
  # shift q.b_k common to all keys), so its relative error is noise over noise.
  errs = {jax.tree_util.keystr(path): _rel(a, np.asarray(b))
          for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0))
          if "'to_k']['bias'" not in jax.tree_util.keystr(path)}
  worst = max(errs, key=errs.get)
  print(f"remat on vs off: worst gradient max rel err {errs[worst]:.2e} ({worst}) over {len(errs)} arrays")
  assert errs[worst] <= 3e-5 and len(errs) == len(jax.tree.leaves(params)) + 1 - 2  # + the input, - 2 key biases


def test_remat_keeps_only_module_inputs(tiny_vae):
  """bf16 compute with remat: the backward keeps no fp32 activation (GroupNorm statistics of the GN-SiLU-conv_out
  tails, the mid attention's softmax), and at full resolution only the inputs of the last up block's resnets and of
  the decoder tail (not the tail's GN/SiLU intermediates, not the upsampler's 4x larger nearest-upsampled input)."""
  vae, params = tiny_vae
  cfg = vae.config
  b, hh, ww, f = 2, 32, 48, cfg.downsample_factor
  kept = {}
  for remat in (False, True):
    m = AutoencoderKL(cfg, remat=remat, dtype=jnp.bfloat16)
    z = jax.ShapeDtypeStruct((b, hh // f, ww // f, cfg.latent_channels), jnp.float32)
    x = jax.ShapeDtypeStruct((b, hh, ww, 3), jnp.float32)
    dec = _residuals(lambda p, z: m.apply({"params": p}, z, method=m.decode), params, z)
    enc = _residuals(lambda p, x: m.apply({"params": p}, x, method=m.encode), params, x)
    kept[remat] = dec, enc
  (dec0, enc0), (dec, enc) = kept[False], kept[True]
  print(f"kept bytes, remat off -> on: decoder {_bytes(dec0)} -> {_bytes(dec)}, encoder {_bytes(enc0)} -> "
        f"{_bytes(enc)}")
  lat = (b, hh // f, ww // f, cfg.latent_channels)
  assert not [k for k in dec if k[0] == "float32"], dec
  assert not [k for k in enc if k[0] == "float32" and k[1] != lat], enc  # (the logvar clamp keeps its input)
  c_last, c_prev = cfg.block_out_channels[0], cfg.block_out_channels[1]
  full = {k: n for k, n in dec.items() if int(np.prod(k[1])) >= b * hh * ww * c_last}  # full-resolution tensors
  # up_blocks_-1: resnets_0 input (c_prev channels, upsampled), resnets_1.. and tail inputs (c_last channels).
  assert full == {("bfloat16", (b, hh, ww, c_prev)): 1, ("bfloat16", (b, hh, ww, c_last)): cfg.layers_per_block + 1}
  assert _bytes(dec) < 0.6 * _bytes(dec0) and _bytes(enc) < _bytes(enc0)


def test_bf16_compute_close_to_fp32(tiny_vae):
  vae, params = tiny_vae
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  ref, _, _ = jax.jit(vae.apply)({"params": params}, x)
  vae16 = AutoencoderKL(vae.config, dtype=jnp.bfloat16)
  out, mean, _ = jax.jit(vae16.apply)({"params": params}, x)
  assert out.dtype == jnp.float32 and mean.dtype == jnp.float32  # outputs and stats come back in fp32
  assert _rel(out, np.asarray(ref)) < 5e-2


def _photo_crops(n: int, size: int, rs: np.random.RandomState) -> np.ndarray:
  photos = [data.astronaut(), data.coffee(), data.chelsea()]
  out = []
  for _ in range(n):
    img = photos[rs.randint(3)]
    r, c = rs.randint(img.shape[0] - 2 * size), rs.randint(img.shape[1] - 2 * size)
    out.append(img[r:r + 2 * size:2, c:c + 2 * size:2])  # 2x subsampled: more structure per pixel
  return np.stack(out).astype(np.float32) / 127.5 - 1.0


def test_training_lowers_reconstruction_error(tiny_vae):
  vae, params = tiny_vae
  rs = np.random.RandomState(0)
  train = _photo_crops(64, 32, rs)
  held_out = _photo_crops(16, 32, rs)
  weights = {"mse": 1.0, "lpips": 0.0, "kl": 1e-4}
  opt = optax.adam(2e-3)

  def loss_fn(p, x, rng):
    recon, mean, logvar = vae.apply({"params": p}, x, rng)
    return losses.vae_loss(recon, x, mean, logvar, None, weights)

  @functools.partial(jax.jit, compiler_options=RUN_FAST)  # 150 steps: XLA's backend optimisations on
  def step(p, o, x, rng):
    (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, rng)
    upd, o = opt.update(g, o, p)
    return optax.apply_updates(p, upd), o, m

  @jax.jit
  def eval_psnr(p):
    recon, _, _ = vae.apply({"params": p}, held_out)
    return jnp.mean(losses.psnr(recon, held_out))

  before = float(eval_psnr(params))
  o = opt.init(params)
  t0 = time.time()
  for i in range(150):
    idx = rs.randint(0, len(train), 4)
    params, o, m = step(params, o, train[idx], jax.random.PRNGKey(i))
  after = float(eval_psnr(params))
  print(f"held-out PSNR {before:.2f} dB -> {after:.2f} dB after 150 steps ({time.time() - t0:.1f} s); "
        f"last train mse {float(m['mse']):.4f} kl {float(m['kl']):.3f}")
  assert np.isfinite(after) and after > before + 3.0
