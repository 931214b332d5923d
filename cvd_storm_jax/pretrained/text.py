"""Importers for SD3.5's text encoders from transformers ``save_pretrained`` folders.

``load_clip(folder)`` reads a ``CLIPTextModelWithProjection`` folder (SD3.5's ``text_encoder`` = CLIP-L,
``text_encoder_2`` = CLIP-G); ``load_t5(folder)`` a ``T5EncoderModel`` folder (``text_encoder_3`` = T5-XXL). Both
build the module config from ``config.json`` and return ``(module, params)`` with params checked leaf by leaf against
the module's ``param_shapes`` (a wrong folder, a missing key or a shape mismatch raises ``WeightImportError``).
``load_sd3_text_encoders(root)`` loads all three plus their tokenizers from a diffusers SD3/SD3.5 root.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvd_storm_jax.models.clip import CLIPTextConfig, CLIPTextModelWithProjection
from cvd_storm_jax.models.t5 import T5Config, T5EncoderModel
from cvd_storm_jax.models.text_encoders import SD3TextEncoders, params_on_device
from cvd_storm_jax.pretrained.common import (Rule, WeightImportError, convert, linear, param_shapes, read_config,
                                             read_folder)

CLIP_RULES = (
    Rule(r"text_model\.embeddings\.token_embedding\.weight", "token_embedding/embedding"),
    Rule(r"text_model\.embeddings\.position_embedding\.weight", "position_embedding"),
    Rule(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight",
         r"layers_\1/self_attn/\2/kernel", linear),
    Rule(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias",
         r"layers_\1/self_attn/\2/bias"),
    Rule(r"text_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.weight", r"layers_\1/mlp/\2/kernel", linear),
    Rule(r"text_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.bias", r"layers_\1/mlp/\2/bias"),
    Rule(r"text_model\.encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.weight", r"layers_\1/\2/scale"),
    Rule(r"text_model\.encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.bias", r"layers_\1/\2/bias"),
    Rule(r"text_model\.final_layer_norm\.weight", "final_layer_norm/scale"),
    Rule(r"text_model\.final_layer_norm\.bias", "final_layer_norm/bias"),
    Rule(r"text_projection\.weight", "text_projection/kernel", linear),
)
# Old checkpoints saved the non-persistent position_ids buffer.
CLIP_IGNORE = (r"text_model\.embeddings\.position_ids",)

T5_RULES = (
    Rule(r"shared\.weight", "shared/embedding"),
    Rule(r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", "relative_attention_bias"),
    Rule(r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.weight",
         r"block_\1/layer_0/SelfAttention/\2/kernel", linear),
    Rule(r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"block_\1/layer_0/layer_norm/scale"),
    Rule(r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight",
         r"block_\1/layer_1/DenseReluDense/\2/kernel", linear),
    Rule(r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"block_\1/layer_1/layer_norm/scale"),
    Rule(r"encoder\.final_layer_norm\.weight", "final_layer_norm/scale"),
)


def _read_text_config(folder: str, want: tuple[str, ...], what: str, subfolders: tuple[str, ...]) -> dict[str, Any]:
  """config.json of a transformers ``what`` folder whose model_type is one of ``want``; a checkpoint root (the
  message names the subfolder meant) or a diffusers folder is refused before any tensor is read."""
  if not os.path.isdir(folder):
    raise WeightImportError(f"weights folder {folder!r} does not exist")
  if not os.path.isfile(os.path.join(folder, "config.json")):
    subs = [os.path.join(folder, d) for d in subfolders if os.path.isfile(os.path.join(folder, d, "config.json"))]
    hint = f" (did you mean {' or '.join(subs)}?)" if subs else ": not a save_pretrained folder"
    raise WeightImportError(f"{folder!r} has no config.json{hint}")
  config = read_config(folder)
  got = config.get("model_type")
  if got is None and "_class_name" in config:
    raise WeightImportError(f"{folder!r}: config.json is a diffusers {config['_class_name']!r}, not a transformers "
                            f"{what} folder (model_type one of {want})")
  if got not in want:
    raise WeightImportError(f"{folder!r}: config.json has model_type {got!r}, expected one of {want} ({what})")
  return config


def load_clip(folder: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, variant: str | None = None
              ) -> tuple[CLIPTextModelWithProjection, dict]:
  """Imports a ``CLIPTextModelWithProjection`` folder. Returns (module, params) with params in ``param_dtype``.
  ``variant``: read the ``*.<variant>.safetensors`` files (``common.read_folder``)."""
  config = _read_text_config(folder, ("clip_text_model", "clip"), "CLIPTextModelWithProjection",
                             ("text_encoder", "text_encoder_2"))
  if "text_config" in config:  # a full CLIPModel (vision + text) is a different checkpoint layout
    raise WeightImportError(f"{folder!r} holds a full CLIPModel; save the CLIPTextModelWithProjection instead")
  _, state = read_folder(folder, variant=variant)
  cfg = CLIPTextConfig.from_hf(config)
  model = CLIPTextModelWithProjection(cfg, dtype=dtype, param_dtype=param_dtype)
  shapes = param_shapes(model.init, jax.random.key(0), jnp.zeros((1, cfg.max_position_embeddings), jnp.int32))
  params = convert(state, CLIP_RULES, shapes, ignore=CLIP_IGNORE, dtype=param_dtype, what=f"CLIP folder {folder!r}")
  return model, params


def load_t5(folder: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, variant: str | None = None
            ) -> tuple[T5EncoderModel, dict]:
  """Imports a ``T5EncoderModel`` folder (the encoder of a full T5 checkpoint works too; its decoder is skipped)."""
  config = _read_text_config(folder, ("t5", "umt5"), "T5EncoderModel", ("text_encoder_3",))
  if config.get("model_type") == "umt5":
    raise WeightImportError(f"{folder!r}: UMT5 has per-layer position biases, which this T5 encoder does not model")
  _, state = read_folder(folder, variant=variant)
  cfg = T5Config.from_hf(config)
  state = dict(state)
  # The input embedding is tied: checkpoints hold "shared.weight", "encoder.embed_tokens.weight", or both (equal).
  tied = state.pop("encoder.embed_tokens.weight", None)
  if tied is not None:
    if "shared.weight" not in state:
      state["shared.weight"] = tied
    elif tied.shape != state["shared.weight"].shape or not np.array_equal(tied, state["shared.weight"]):
      raise WeightImportError(f"{folder!r}: 'encoder.embed_tokens.weight' {tuple(tied.shape)} differs from the tied "
                              f"'shared.weight' {tuple(state['shared.weight'].shape)}")
  model = T5EncoderModel(cfg, dtype=dtype, param_dtype=param_dtype)
  shapes = param_shapes(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  params = convert(state, T5_RULES, shapes, ignore=(r"decoder\..*", r"lm_head\..*"), dtype=param_dtype,
                   what=f"T5 folder {folder!r}")
  return model, params


# Sub-folders of a diffusers SD3/SD3.5 checkpoint root.
SD3_FOLDERS = {
    "clip_l": ("text_encoder", "tokenizer"),
    "clip_g": ("text_encoder_2", "tokenizer_2"),
    "t5": ("text_encoder_3", "tokenizer_3"),
}


def load_clip_tokenizer(folder: str) -> Any:
  """transformers ``CLIPTokenizer`` from a local folder (vocab.json + merges.txt, or tokenizer.json); no network."""
  if not os.path.isdir(folder):
    raise WeightImportError(f"tokenizer folder {folder!r} does not exist")
  from transformers import CLIPTokenizer
  return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def load_t5_tokenizer(folder: str) -> Any:
  """transformers ``T5Tokenizer`` (= T5TokenizerFast) from a local folder (spiece.model or tokenizer.json)."""
  if not os.path.isdir(folder):
    raise WeightImportError(f"tokenizer folder {folder!r} does not exist")
  from transformers import T5Tokenizer
  return T5Tokenizer.from_pretrained(folder, local_files_only=True)


def load_sd3_text_encoders(root: str, *, with_t5: bool = True, dtype: Any = jnp.float32,
                           param_dtype: Any = jnp.float32, joint_dim: int = 4096, variant: str | None = None
                           ) -> SD3TextEncoders:
  """The SD3 text stack from a diffusers SD3/SD3.5 root (text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/).

  with_t5=False skips T5-XXL (its part of the conditioning is then zeros of width ``joint_dim``, as in diffusers).
  Params are put on the default device as each encoder is read: every encode call then sends only token ids, and
  the host holds one encoder's numpy copy at a time (T5-XXL in fp32 is 19 GB).
  """
  if not os.path.isdir(root):
    raise WeightImportError(f"SD3 weights root {root!r} does not exist")
  parts: dict[str, Any] = {}
  for key, (enc_dir, tok_dir) in SD3_FOLDERS.items():
    enc_dir, tok_dir = os.path.join(root, enc_dir), os.path.join(root, tok_dir)
    if key == "t5":
      if with_t5:
        parts["t5"], params = load_t5(enc_dir, dtype=dtype, param_dtype=param_dtype, variant=variant)
        parts["t5_params"] = params_on_device(params)
        parts["tokenizer_t5"] = load_t5_tokenizer(tok_dir)
    else:
      parts[key], params = load_clip(enc_dir, dtype=dtype, param_dtype=param_dtype, variant=variant)
      parts[f"{key}_params"] = params_on_device(params)
      parts["tokenizer_" + key[-1]] = load_clip_tokenizer(tok_dir)
  return SD3TextEncoders(**parts, joint_dim=joint_dim)
