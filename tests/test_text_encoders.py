"""SD3 text encoders (CLIP-L/G, T5) and SD3 prompt conditioning vs transformers / diffusers (random tiny models)."""
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _text_fixtures import build_tiny_sd3_root, max_rel_err  # noqa: I100 (also hides the broken torchvision)

import torch  # noqa: E402

from cvd_storm_jax.models.t5 import relative_position_buckets  # noqa: E402
from cvd_storm_jax.pretrained.common import WeightImportError  # noqa: E402
from cvd_storm_jax.pretrained.text import (load_clip, load_clip_tokenizer, load_sd3_text_encoders, load_t5,  # noqa: E402
                                           load_t5_tokenizer)

TOL = 1e-5
PROMPTS = [
    "a car drives on the road in the rain.",
    "",
    "night, cloudy, highway with trucks and cars. " * 6,  # longer than 77 CLIP tokens: truncation
    "Daytime,   SUNNY city street!",
]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sd3_text"))
  refs = build_tiny_sd3_root(root)
  return root, refs


def _clip_ids(eos: int, vocab: int) -> np.ndarray:
  """Random ids with EOS at different places (and once repeated as padding, as CLIP-L pads with EOS)."""
  rng = np.random.RandomState(0)
  ids = rng.randint(0, eos - 1, size=(3, 77))
  ids[:, 0] = eos - 1  # start-of-text
  ids[0, 20:] = eos
  ids[1, 5] = eos
  ids[2, 76] = eos
  assert ids.max() < vocab
  return ids


@pytest.mark.parametrize("folder", ["text_encoder", "text_encoder_2"])
def test_clip_matches_transformers(sd3, folder):
  root, refs = sd3
  ref = refs["clip_l" if folder == "text_encoder" else "clip_g"]
  model, params = load_clip(os.path.join(root, folder))
  eos = refs["tokenizer"].convert_tokens_to_ids("<|endoftext|>")
  ids = _clip_ids(eos, model.config.vocab_size)
  mask = np.ones_like(ids)
  mask[0, 30:] = 0
  for attention_mask in (None, mask):
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids),
                               None if attention_mask is None else jnp.asarray(attention_mask))
    with torch.no_grad():
      r = ref(torch.tensor(ids), attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
              output_hidden_states=True)
    assert len(out["hidden_states"]) == len(r.hidden_states) == model.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(out["hidden_states"], r.hidden_states)):
      assert max_rel_err(a, b.numpy()) <= TOL, f"hidden_states[{i}]"
    assert max_rel_err(out["last_hidden_state"], r.last_hidden_state.numpy()) <= TOL
    assert max_rel_err(out["text_embeds"], r.text_embeds.numpy()) <= TOL
  # The two pooling rules (legacy eos_token_id == 2: argmax of ids; else first EOS) are both exercised.
  assert (model.config.eos_token_id == 2) == (folder == "text_encoder")


def test_t5_matches_transformers(sd3):
  root, refs = sd3
  model, params = load_t5(os.path.join(root, "text_encoder_3"))
  assert model.config.is_gated_act and model.config.dense_act_fn == "gelu_new"
  ids = np.random.RandomState(1).randint(0, model.config.vocab_size, size=(2, 256))  # 256: log-spaced buckets too
  mask = np.ones_like(ids)
  mask[1, 100:] = 0
  with torch.no_grad():
    ref = refs["t5"](torch.tensor(ids)).last_hidden_state.numpy()
    ref_masked = refs["t5"](torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  apply = jax.jit(model.apply)
  assert max_rel_err(apply({"params": params}, jnp.asarray(ids)), ref) <= TOL
  assert max_rel_err(apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)), ref_masked) <= TOL


def test_t5_relu_variant_matches_transformers(tmp_path):
  from transformers import T5Config, T5EncoderModel
  torch.manual_seed(3)
  ref = T5EncoderModel(T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=2,
                                relative_attention_num_buckets=16, relative_attention_max_distance=20,
                                feed_forward_proj="relu", is_encoder_decoder=False, use_cache=False)).eval()
  ref.save_pretrained(str(tmp_path))
  model, params = load_t5(str(tmp_path))
  assert not model.config.is_gated_act
  ids = np.random.RandomState(2).randint(0, 50, size=(2, 40))
  with torch.no_grad():
    want = ref(torch.tensor(ids)).last_hidden_state.numpy()
  assert max_rel_err(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)), want) <= TOL


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (64, 300), (16, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
  from transformers.models.t5.modeling_t5 import T5Attention
  length = 700
  rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=num_buckets,
                                               max_distance=max_distance).numpy()
  np.testing.assert_array_equal(relative_position_buckets(length, length, num_buckets, max_distance), want)


def test_tokenizers_match_transformers(sd3):
  root, refs = sd3
  for folder, ref in (("tokenizer", refs["tokenizer"]), ("tokenizer_2", refs["tokenizer_2"])):
    ours = load_clip_tokenizer(os.path.join(root, folder))
    kw = dict(padding="max_length", max_length=77, truncation=True)
    assert ours(PROMPTS, **kw).input_ids == ref(PROMPTS, **kw).input_ids
  # CLIP-G pads with "!" as in SD3, CLIP-L with end-of-text: the two pad ids must differ.
  assert refs["tokenizer"].pad_token_id != refs["tokenizer_2"].pad_token_id
  ours = load_t5_tokenizer(os.path.join(root, "tokenizer_3"))
  kw = dict(padding="max_length", max_length=32, truncation=True, add_special_tokens=True)
  got = ours(PROMPTS, **kw).input_ids
  assert got == refs["tokenizer_3"](PROMPTS, **kw).input_ids
  # And the T5 tokens agree with sentencepiece itself (the .model file the tokenizer was converted from).
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=os.path.join(root, "_src", "t5", "spiece.model"))
  first = sp.encode(PROMPTS[0]) + [sp.eos_id()]
  assert got[0][:len(first)] == first


def _diffusers_pipeline(refs, with_t5: bool, joint_dim: int):
  from diffusers import StableDiffusion3Pipeline
  pipe = StableDiffusion3Pipeline(
      transformer=None, scheduler=None, vae=None, text_encoder=refs["clip_l"], tokenizer=refs["tokenizer"],
      text_encoder_2=refs["clip_g"], tokenizer_2=refs["tokenizer_2"],
      text_encoder_3=refs["t5"] if with_t5 else None, tokenizer_3=refs["tokenizer_3"] if with_t5 else None)
  if not with_t5:
    # encode_prompt reads the joint width from the transformer's config when T5 is absent.
    pipe.transformer = types.SimpleNamespace(config=types.SimpleNamespace(joint_attention_dim=joint_dim))
  return pipe


def test_encode_prompts_matches_diffusers(sd3):
  root, refs = sd3
  encoders = load_sd3_text_encoders(root)
  pipe = _diffusers_pipeline(refs, with_t5=True, joint_dim=0)
  for t5_length in (256, 77):  # diffusers' default and OpenDWM's CVD recipe
    with torch.no_grad():
      pe, neg_pe, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                          do_classifier_free_guidance=True,
                                                          max_sequence_length=t5_length)
    embeds, ours_pooled = encoders.encode_prompts(PROMPTS, t5_length=t5_length)
    assert embeds.shape == (len(PROMPTS), 77 + t5_length, 192) and ours_pooled.shape == (len(PROMPTS), 32 + 48)
    assert max_rel_err(embeds, pe.numpy()) <= TOL
    assert max_rel_err(ours_pooled, pooled.numpy()) <= TOL
    # The unconditional branch: diffusers' negative prompt "" for every row.
    embeds, ours_pooled = encoders.encode_prompts([""] * len(PROMPTS), t5_length=t5_length)
    assert max_rel_err(embeds, neg_pe.numpy()) <= TOL
    assert max_rel_err(ours_pooled, neg_pooled.numpy()) <= TOL
  # Zero padding of the CLIP part (64 + 96 channels) up to T5's width (192) is really there.
  assert encoders.encode_parts(PROMPTS, t5_length=77)["clip"].shape == (len(PROMPTS), 77, 64 + 96)
  np.testing.assert_array_equal(np.asarray(embeds)[:, :77, 160:], 0)


def test_encode_prompts_without_t5_matches_diffusers(sd3):
  root, refs = sd3
  encoders = load_sd3_text_encoders(root, with_t5=False, joint_dim=256)
  assert encoders.t5 is None
  pipe = _diffusers_pipeline(refs, with_t5=False, joint_dim=256)
  with torch.no_grad():
    pe, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False,
                                          max_sequence_length=77)
  embeds, ours_pooled = encoders.encode_prompts(PROMPTS, t5_length=77)
  assert embeds.shape == tuple(pe.shape) == (len(PROMPTS), 154, 256)
  assert max_rel_err(embeds, pe.numpy()) <= TOL
  assert max_rel_err(ours_pooled, pooled.numpy()) <= TOL
  np.testing.assert_array_equal(np.asarray(embeds)[:, 77:], 0)


def test_params_stay_on_device_and_a_call_sends_only_ids(sd3):
  """Params are put on the device once at load: a repeat encode copies nothing host->device implicitly (the fp32
  T5-XXL was re-sent, 19 GB, on every batch when they were numpy trees handed to the jitted encoder)."""
  root, _ = sd3
  encoders = load_sd3_text_encoders(root)
  want = encoders.encode_prompts(PROMPTS[:2], t5_length=16)  # compiles
  with jax.transfer_guard_host_to_device("disallow"):
    got = encoders.encode_prompts(PROMPTS[:2], t5_length=16)
  np.testing.assert_array_equal(got[0], want[0])
  leaves = jax.tree.leaves((encoders.clip_l_params, encoders.clip_g_params, encoders.t5_params))
  assert all(isinstance(x, jax.Array) for x in leaves)


def test_bf16_compute_stays_close(sd3):
  """bf16 compute and params (the accelerator recipe) run and stay near fp32; T5 has the riskier additive bias."""
  root, _ = sd3
  ids = jnp.asarray(np.random.RandomState(4).randint(0, 89, size=(2, 40)))
  m32, p32 = load_t5(os.path.join(root, "text_encoder_3"))
  m16, p16 = load_t5(os.path.join(root, "text_encoder_3"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  mask = jnp.ones((2, 40), jnp.int32).at[1, 25:].set(0)
  a = jax.jit(m32.apply)({"params": p32}, ids, mask)
  b = jax.jit(m16.apply)({"params": p16}, ids, mask)
  assert b.dtype == jnp.bfloat16 and jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
  assert max_rel_err(b.astype(jnp.float32), a) < 5e-2


def _copy_with(src: str, dst: str, edit) -> str:
  from safetensors.numpy import load_file, save_file
  shutil.copytree(src, dst)
  tensors = load_file(os.path.join(dst, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  return dst


def test_import_errors_name_key_and_shapes(sd3, tmp_path):
  root, _ = sd3
  clip_dir = os.path.join(root, "text_encoder")
  with pytest.raises(WeightImportError, match="does not exist"):
    load_clip(str(tmp_path / "nope"))
  with pytest.raises(WeightImportError, match="model_type 't5'"):
    load_clip(os.path.join(root, "text_encoder_3"))
  with pytest.raises(WeightImportError, match="model_type 'clip_text_model'"):
    load_t5(clip_dir)
  with pytest.raises(WeightImportError, match="does not exist"):
    load_sd3_text_encoders(str(tmp_path / "no_root"))
  # A checkpoint root, or a diffusers folder, is named before any tensor is read.
  with pytest.raises(WeightImportError, match=f"no config.json \\(did you mean {root}/text_encoder_3\\?\\)"):
    load_t5(root)
  vae = tmp_path / "vae"
  os.makedirs(vae)
  (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
  with pytest.raises(WeightImportError, match="diffusers 'AutoencoderKL', not a transformers "
                                              "CLIPTextModelWithProjection folder"):
    load_clip(str(vae))

  missing = _copy_with(clip_dir, str(tmp_path / "missing"),
                       lambda t: t.pop("text_model.encoder.layers.1.mlp.fc1.weight"))
  with pytest.raises(WeightImportError, match=r"missing key: Flax param 'layers_1/mlp/fc1/kernel' \(64, 128\)"):
    load_clip(missing)

  def shrink(t):
    t["text_model.encoder.layers.2.self_attn.q_proj.weight"] = t["text_model.encoder.layers.2.self_attn.q_proj.weight"][:, :60]
  bad = _copy_with(clip_dir, str(tmp_path / "bad_shape"), shrink)
  with pytest.raises(WeightImportError) as e:
    load_clip(bad)
  msg = str(e.value)
  assert "text_model.encoder.layers.2.self_attn.q_proj.weight" in msg and "(64, 60)" in msg and "(64, 64)" in msg
  assert "layers_2/self_attn/q_proj/kernel" in msg

  t5_missing = _copy_with(os.path.join(root, "text_encoder_3"), str(tmp_path / "t5_missing"),
                          lambda t: t.pop("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
  with pytest.raises(WeightImportError, match=r"'relative_attention_bias' \(32, 4\)"):
    load_t5(t5_missing)

  def extra(t):
    t["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = np.zeros((32, 4), np.float32)
  t5_extra = _copy_with(os.path.join(root, "text_encoder_3"), str(tmp_path / "t5_extra"), extra)
  with pytest.raises(WeightImportError, match="block.1.layer.0.SelfAttention.relative_attention_bias"):
    load_t5(t5_extra)

  cfg_path = tmp_path / "cfg_only"
  os.makedirs(cfg_path)
  with open(cfg_path / "config.json", "w") as f:
    json.dump({"model_type": "clip_text_model"}, f)
  with pytest.raises(WeightImportError, match="no \\*.safetensors"):
    load_clip(str(cfg_path))
