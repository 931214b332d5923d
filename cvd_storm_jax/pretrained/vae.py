"""Import a diffusers ``AutoencoderKL`` folder (SD3.5 ``vae/``, or any SD-style VAE) into ``models.vae``.

Accepted folders:
  * an ``AutoencoderKL.save_pretrained`` folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (sharded
    or bf16 files too, via ``common.read_folder``);
  * a Stable Diffusion 3 / 3.5 checkpoint root holding that folder as ``vae/``.

Usage::

  vae, params = load_vae("/ckpt/stable-diffusion-3.5-medium", dtype=jnp.bfloat16)
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cvd_storm_jax.models.vae import AutoencoderKL, VAEConfig
from cvd_storm_jax.pretrained.common import (Rule, WeightImportError, conv, convert, copy, param_shapes, read_config,
                                             read_folder)


def _linear_or_1x1(w: np.ndarray) -> np.ndarray:
  """nn.Linear (out, in) -> (in, out); also accepts the 1x1-conv form (out, in, 1, 1) of pre-0.14 diffusers VAEs."""
  if w.ndim == 4 and w.shape[2:] == (1, 1):
    w = w[:, :, 0, 0]
  return np.ascontiguousarray(w.T) if w.ndim == 2 else w


def _module_rules(torch_path: str, flax_path: str, kind: str) -> list[Rule]:
  """Rules for one torch module (regex ``torch_path``) -> Flax module ``flax_path``: conv, norm or linear."""
  weight = {"conv": ("kernel", conv), "norm": ("scale", copy), "linear": ("kernel", _linear_or_1x1)}[kind]
  return [Rule(rf"{torch_path}\.weight", f"{flax_path}/{weight[0]}", weight[1]),
          Rule(rf"{torch_path}\.bias", f"{flax_path}/bias", copy)]


def _resnet_rules(torch_prefix: str, flax_prefix: str) -> list[Rule]:
  rules = []
  for name in ("norm1", "norm2"):
    rules += _module_rules(rf"{torch_prefix}\.{name}", f"{flax_prefix}/{name}", "norm")
  for name in ("conv1", "conv2", "conv_shortcut"):
    rules += _module_rules(rf"{torch_prefix}\.{name}", f"{flax_prefix}/{name}", "conv")
  return rules


def vae_rules() -> list[Rule]:
  """The renaming rules diffusers AutoencoderKL -> ``models.vae.AutoencoderKL`` (first match wins)."""
  rules: list[Rule] = []
  for part in ("encoder", "decoder"):
    for name in ("conv_in", "conv_out"):
      rules += _module_rules(rf"{part}\.{name}", f"{part}/{name}", "conv")
    rules += _module_rules(rf"{part}\.conv_norm_out", f"{part}/conv_norm_out", "norm")
    blocks, sampler = ("down_blocks", "downsamplers") if part == "encoder" else ("up_blocks", "upsamplers")
    rules += _resnet_rules(rf"{part}\.{blocks}\.(\d+)\.resnets\.(\d+)", f"{part}/{blocks}_\\1/resnets_\\2")
    rules += _module_rules(rf"{part}\.{blocks}\.(\d+)\.{sampler}\.0\.conv", f"{part}/{blocks}_\\1/{sampler}_0/conv",
                           "conv")
    rules += _resnet_rules(rf"{part}\.mid_block\.resnets\.(\d+)", f"{part}/mid_block/resnets_\\1")
    attn = rf"{part}\.mid_block\.attentions\.0"
    rules += _module_rules(rf"{attn}\.group_norm", f"{part}/mid_block/attentions_0/group_norm", "norm")
    # Current names first, then the deprecated ones (query/key/value/proj_attn) that old VAE folders still carry.
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out\\.0", "proj_attn")):
      target = f"{part}/mid_block/attentions_0/{new.replace(chr(92) + '.', '_')}"
      rules += _module_rules(rf"{attn}\.(?:{new}|{old})", target, "linear")
  rules += _module_rules(r"quant_conv", "quant_conv", "conv")
  rules += _module_rules(r"post_quant_conv", "post_quant_conv", "conv")
  return rules


_DEPRECATED = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def torch_key_for(flax_path: str) -> str:
  """The current diffusers key that ``vae_rules`` map onto ``flax_path`` (for messages about missing tensors)."""
  key = re.sub(r"_(\d+)(?=/|$)", r".\1", flax_path)  # down_blocks_1/resnets_0 -> down_blocks.1/resnets.0
  return re.sub(r"/(kernel|scale)$", "/weight", key).replace("/", ".")


def _torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Flax kernel shape -> the torch shape it comes from (HWIO -> OIHW, (in, out) -> (out, in))."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape))


def convert_vae_state(state: Mapping[str, np.ndarray], target_shapes: Any, *, dtype: Any = np.float32,
                      what: str = "VAE") -> dict:
  """Renames a diffusers AutoencoderKL state dict onto ``target_shapes``; raises WeightImportError.

  A tensor the model needs but the checkpoint lacks is reported with its torch key, the torch shape expected, the
  Flax path and the Flax shape; everything else (unexpected keys, shape mismatches) by ``common.convert``.
  """
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(target_shapes).items()}
  missing = []
  for path, leaf in sorted(flat.items()):
    key = torch_key_for(path)
    old = re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{_DEPRECATED[m.group(1)]}.", key)
    if key not in state and old not in state:
      missing.append(f"missing key: torch {key!r} {_torch_layout(tuple(leaf.shape))} for Flax param {path!r} "
                     f"{tuple(leaf.shape)}")
  if missing:
    shown = "\n  ".join(missing[:40])
    more = f"\n  ... and {len(missing) - 40} more" if len(missing) > 40 else ""
    raise WeightImportError(f"cannot import {what}: {len(missing)} tensor(s) missing:\n  {shown}{more}")
  return convert(state, vae_rules(), target_shapes, dtype=dtype, what=what)


def config_from_diffusers(cfg: Mapping[str, Any], where: str = "config.json") -> VAEConfig:
  """Builds a ``VAEConfig`` from a diffusers AutoencoderKL config.json; raises WeightImportError on a config this
  port does not implement (other block types, activations, norms)."""
  cls = cfg.get("_class_name", "AutoencoderKL")
  if cls != "AutoencoderKL":
    raise WeightImportError(f"{where}: _class_name is {cls!r}, expected 'AutoencoderKL'")
  for key, want in (("act_fn", "silu"),):
    if cfg.get(key, want) != want:
      raise WeightImportError(f"{where}: {key}={cfg[key]!r} is not supported (only {want!r})")
  n = len(cfg.get("block_out_channels", (64,)))
  for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    types = tuple(cfg.get(key, (want,) * n))
    if types != (want,) * n:
      raise WeightImportError(f"{where}: {key}={types} is not supported (only {want} x {n})")
  shift = cfg.get("shift_factor")
  try:
    return VAEConfig(
        in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
        layers_per_block=int(cfg.get("layers_per_block", 1)), norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        shift_factor=0.0 if shift is None else float(shift))
  except ValueError as e:
    raise WeightImportError(f"{where}: {e}") from e


def _not_a_vae(config: Mapping[str, Any]) -> str | None:
  """What a config.json describes when it is not an AutoencoderKL, else None. A transformers folder (a text encoder)
  has no _class_name but a model_type; a diffusers one names its class."""
  cls = config.get("_class_name")
  if cls is None and ("model_type" in config or "architectures" in config):
    return (f"a transformers {config.get('model_type')!r} model ({', '.join(config.get('architectures') or ())}), "
            "not an AutoencoderKL")
  if cls not in (None, "AutoencoderKL"):
    return f"a diffusers {cls!r}, not an AutoencoderKL"
  return None


def resolve_vae_folder(folder: str) -> str:
  """The AutoencoderKL folder itself, or ``<folder>/vae`` for a checkpoint root; WeightImportError otherwise."""
  if not os.path.isdir(folder):
    raise WeightImportError(f"VAE weights folder {folder!r} does not exist")
  here = os.path.join(folder, "config.json")
  other = _not_a_vae(read_config(folder)) if os.path.isfile(here) else None
  if os.path.isfile(here) and other is None:
    return folder
  sub = os.path.join(folder, "vae")
  if os.path.isfile(os.path.join(sub, "config.json")):
    return sub
  found = f" ({here} describes {other})" if other else ""
  raise WeightImportError(
      f"{folder!r} is neither an AutoencoderKL save_pretrained folder (config.json with _class_name "
      f"'AutoencoderKL') nor a checkpoint root with a vae/ subfolder{found}")


def load_vae(folder: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
             remat: bool = False, variant: str | None = None) -> tuple[AutoencoderKL, dict]:
  """Reads a diffusers VAE folder (or a checkpoint root with vae/) -> (module, params).

  Args:
    folder: see ``resolve_vae_folder``.
    dtype: compute dtype of the returned module; param_dtype: dtype of the returned params.
    variant: read the ``*.<variant>.safetensors`` files (``common.read_folder``).
  Raises:
    WeightImportError: wrong folder, unsupported config, missing/unexpected keys or shape mismatches (names the key
      and both shapes).
  """
  vae_dir = resolve_vae_folder(folder)
  config_json, state = read_folder(vae_dir, variant=variant)
  cfg = config_from_diffusers(config_json, where=os.path.join(vae_dir, "config.json"))
  module = AutoencoderKL(cfg, remat=remat, dtype=dtype, param_dtype=param_dtype)
  f = cfg.downsample_factor
  shapes = param_shapes(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, f, f, cfg.in_channels),
                                                                                 jnp.float32))
  params = convert_vae_state(state, shapes, dtype=np.dtype(param_dtype), what=f"VAE folder {vae_dir!r}")
  return module, jax.tree.map(jnp.asarray, params)
